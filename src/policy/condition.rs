//! Compiled conditions and their evaluation (docs/semantics.md §4, the op table).
//!
//! Everything a test needs is prepared at load: pointers split and unescaped, regexes
//! compiled, literal durations and duration defaults parsed. Evaluation only reads the twin;
//! it allocates nothing, except for a test on the empty pointer (the whole twin), which has
//! to build the exported object.

use regex::Regex;

use crate::value::{Map, Value};

use super::duration::{self, Duration};
use super::pointer::{JsonType, Node, Pointer, Resolver};

#[derive(Debug)]
pub(crate) enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Test(Box<Test>),
}

/// A test `{path, op, value?, other?, default?, other_default?}`.
#[derive(Debug)]
pub(crate) struct Test {
    pub(crate) path: Pointer,
    /// Taken when `path` finds nothing (never by `exists` and `absent`).
    pub(crate) default: Option<Value>,
    pub(crate) check: Check,
}

/// The op with its right-hand side, in the form that op needs.
#[derive(Debug)]
pub(crate) enum Check {
    Exists,
    Absent,
    /// `eq`, or `ne` when `negate`.
    Eq {
        rhs: Operand,
        negate: bool,
    },
    /// `in`, or `not_in` when `negate`; a literal right-hand side is an array.
    In {
        rhs: Operand,
        negate: bool,
    },
    Compare {
        rhs: Operand,
        order: Order,
    },
    /// A duration test; the left default is parsed here because `default` is a literal.
    Duration {
        default: Option<Duration>,
        rhs: DurationOperand,
        order: Order,
    },
    Matches(Regex),
    MultipleOf(Operand),
    Type(JsonType),
    /// A literal right-hand side is an array.
    ContainsAny(Operand),
    SubsetOf(Operand),
}

/// The right-hand side of a test: `value`, or the value at `other` (else `other_default`).
#[derive(Debug)]
pub(crate) enum Operand {
    Literal(Value),
    Other {
        pointer: Pointer,
        default: Option<Value>,
    },
}

#[derive(Debug)]
pub(crate) enum DurationOperand {
    Literal(Duration),
    Other {
        pointer: Pointer,
        default: Option<Duration>,
    },
}

/// `lt`, `le`, `gt`, `ge`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Order {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Order {
    fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Greater, Less};
        match self {
            Order::Lt => ordering == Less,
            Order::Le => ordering != Greater,
            Order::Gt => ordering == Greater,
            Order::Ge => ordering != Less,
        }
    }
}

impl Condition {
    pub(crate) fn holds(&self, resolver: &mut Resolver<'_, '_>) -> bool {
        match self {
            Condition::All(conditions) => conditions.iter().all(|c| c.holds(resolver)),
            Condition::Any(conditions) => conditions.iter().any(|c| c.holds(resolver)),
            Condition::Not(condition) => !condition.holds(resolver),
            Condition::Test(test) => test.holds(resolver),
        }
    }

    /// Calls `f` on every pointer of this condition, in order.
    pub(crate) fn for_each_pointer<'c>(&'c mut self, f: &mut impl FnMut(&'c mut Pointer)) {
        match self {
            Condition::All(conditions) | Condition::Any(conditions) => {
                for condition in conditions {
                    condition.for_each_pointer(f);
                }
            }
            Condition::Not(condition) => condition.for_each_pointer(f),
            Condition::Test(test) => {
                f(&mut test.path);
                match &mut test.check {
                    Check::Eq { rhs, .. }
                    | Check::In { rhs, .. }
                    | Check::Compare { rhs, .. }
                    | Check::MultipleOf(rhs)
                    | Check::ContainsAny(rhs)
                    | Check::SubsetOf(rhs) => {
                        if let Operand::Other { pointer, .. } = rhs {
                            f(pointer);
                        }
                    }
                    Check::Duration {
                        rhs: DurationOperand::Other { pointer, .. },
                        ..
                    } => f(pointer),
                    _ => {}
                }
            }
        }
    }
}

impl Operand {
    fn pointer(&self) -> Option<&Pointer> {
        match self {
            Operand::Literal(_) => None,
            Operand::Other { pointer, .. } => Some(pointer),
        }
    }

    fn resolve<'r, 'a: 'r>(
        &'r self,
        resolver: &mut Resolver<'a, '_>,
        root: Option<&'r Value>,
    ) -> Option<Node<'r>> {
        match self {
            Operand::Literal(value) => Some(Node::Json(value)),
            Operand::Other { pointer, default } => pointer
                .resolve(resolver, root)
                .or_else(|| default.as_ref().map(Node::Json)),
        }
    }
}

impl Test {
    /// Whether this test needs the exported twin built, which only the empty pointer does.
    fn needs_root(&self) -> bool {
        let other = match &self.check {
            Check::Eq { rhs, .. }
            | Check::In { rhs, .. }
            | Check::Compare { rhs, .. }
            | Check::MultipleOf(rhs)
            | Check::ContainsAny(rhs)
            | Check::SubsetOf(rhs) => rhs.pointer(),
            Check::Duration {
                rhs: DurationOperand::Other { pointer, .. },
                ..
            } => Some(pointer),
            _ => None,
        };
        self.path.is_root() || other.is_some_and(Pointer::is_root)
    }

    pub(crate) fn holds(&self, resolver: &mut Resolver<'_, '_>) -> bool {
        // Built only for the empty pointer; `None` costs nothing.
        let root_storage = if self.needs_root() {
            Some(resolver.twin.exported())
        } else {
            None
        };
        self.holds_with_root(resolver, root_storage.as_ref())
    }

    fn holds_with_root<'r, 'a: 'r>(
        &'r self,
        resolver: &mut Resolver<'a, '_>,
        root: Option<&'r Value>,
    ) -> bool {
        let found = self.path.resolve(resolver, root);
        match &self.check {
            Check::Exists => return found.is_some(),
            Check::Absent => return found.is_none(),
            Check::Duration {
                default,
                rhs,
                order,
            } => {
                let left = match found {
                    Some(node) => node.as_str().and_then(duration::parse),
                    None => *default,
                };
                let right = match rhs {
                    DurationOperand::Literal(d) => Some(*d),
                    DurationOperand::Other { pointer, default } => {
                        match pointer.resolve(resolver, root) {
                            Some(node) => node.as_str().and_then(duration::parse),
                            None => *default,
                        }
                    }
                };
                return match (left, right) {
                    (Some(left), Some(right)) => order.holds(left.cmp(&right)),
                    _ => false,
                };
            }
            _ => {}
        }
        // A value that is still missing makes every remaining op false.
        let Some(left) = found.or_else(|| self.default.as_ref().map(Node::Json)) else {
            return false;
        };
        match &self.check {
            Check::Exists | Check::Absent | Check::Duration { .. } => {
                unreachable!("answered above")
            }
            Check::Eq { rhs, negate } => match rhs.resolve(resolver, root) {
                Some(right) => left.json_eq(right) != *negate,
                None => false,
            },
            Check::In { rhs, negate } => match rhs.resolve(resolver, root) {
                Some(right) => match right.array_len() {
                    Some(len) => contains(right, len, left) != *negate,
                    None => false,
                },
                None => false,
            },
            Check::Compare { rhs, order } => {
                let right = rhs.resolve(resolver, root).and_then(Node::as_number);
                match (left.as_number(), right) {
                    (Some(a), Some(b)) => a.compare(b).is_some_and(|o| order.holds(o)),
                    _ => false,
                }
            }
            Check::Matches(regex) => left.as_str().is_some_and(|s| regex.is_match(s)),
            Check::MultipleOf(rhs) => {
                let right = rhs.resolve(resolver, root).and_then(Node::as_number);
                let left = left.as_number().and_then(|n| n.as_integer());
                match (left, right.and_then(|n| n.as_integer())) {
                    (Some(a), Some(b)) if b > 0 => a % b == 0,
                    _ => false,
                }
            }
            Check::Type(json_type) => left.is_type(*json_type),
            Check::ContainsAny(rhs) => {
                let Some(right) = rhs.resolve(resolver, root) else {
                    return false;
                };
                match (left.array_len(), right.array_len()) {
                    (Some(left_len), Some(right_len)) => (0..left_len)
                        .filter_map(|i| left.element(i))
                        .any(|item| contains(right, right_len, item)),
                    _ => false,
                }
            }
            Check::SubsetOf(rhs) => {
                let right = rhs.resolve(resolver, root).and_then(Node::as_object);
                match (left.as_object(), right) {
                    (Some(a), Some(b)) => is_subset(a, b),
                    _ => false,
                }
            }
        }
    }
}

/// Whether the array `array` (of `len` elements) has an element JSON-equal to `item`.
fn contains(array: Node<'_>, len: usize, item: Node<'_>) -> bool {
    (0..len)
        .filter_map(|i| array.element(i))
        .any(|element| element.json_eq(item))
}

/// Every key of `left` is in `right` with an equal value, recursively for objects.
fn is_subset(left: &Map, right: &Map) -> bool {
    left.iter().all(|(key, left_value)| match right.get(key) {
        Some(right_value) => match (left_value, right_value) {
            (Value::Object(a), Value::Object(b)) => is_subset(a, b),
            (a, b) => a == b,
        },
        None => false,
    })
}
