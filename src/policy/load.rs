//! From YAML text to compiled rules (docs/semantics.md §4).
//!
//! Files are read as YAML 1.2 (so `Off`, `yes` and `no` stay strings) into a generic YAML
//! tree, which is then walked by hand rather than deserialised into structs: a walk can go
//! on after a problem and report every problem of every rule, each with the field it is in.

use std::collections::HashMap;

use regex::Regex;
use serde_yaml_ng::Value as Yaml;

use crate::value::{Map, Value};

use super::condition::{Check, Condition, DurationOperand, Operand, Order, Test};
use super::duration;
use super::error::{PolicyError, PolicyProblem};
use super::pointer::{JsonType, Pointer};
use super::{ModuleTarget, Rule, Severity, Target};

/// Compiles files one after the other, collecting rules and problems.
#[derive(Default)]
pub(crate) struct Loader {
    pub(crate) rules: Vec<Rule>,
    pub(crate) errors: Vec<PolicyError>,
    /// Each rule id seen so far, with the file that defined it first.
    first_file_of_id: HashMap<String, String>,
}

/// Where problems are being reported: a file, and a rule in it.
pub(crate) struct Place<'l> {
    file: &'l str,
    rule: Option<String>,
    errors: &'l mut Vec<PolicyError>,
}

impl Place<'_> {
    fn report(&mut self, at: &str, problem: PolicyProblem) {
        self.errors.push(PolicyError {
            file: self.file.to_string(),
            rule: self.rule.clone(),
            at: at.to_string(),
            problem,
        });
    }

    fn shape(&mut self, at: &str, message: impl Into<String>) {
        self.report(at, PolicyProblem::Shape(message.into()));
    }
}

const RULE_FIELDS: &[&str] = &["id", "title", "severity", "target", "when", "check", "for"];
const TARGET_FIELDS: &[&str] = &["module", "tags"];
const TEST_FIELDS: &[&str] = &["path", "op", "value", "other", "default", "other_default"];
const COMBINATORS: &[&str] = &["all", "any", "not"];

impl Loader {
    /// A problem with a file as a whole.
    pub(crate) fn file_error(&mut self, file: &str, problem: PolicyProblem) {
        self.errors.push(PolicyError {
            file: file.to_string(),
            rule: None,
            at: String::new(),
            problem,
        });
    }

    /// Compiles one file's text, appending its rules (and problems).
    pub(crate) fn add_source(&mut self, file: &str, text: &str) {
        let document: Yaml = match serde_yaml_ng::from_str(text) {
            Ok(document) => document,
            Err(error) => {
                self.file_error(file, PolicyProblem::Yaml(error.to_string()));
                return;
            }
        };
        let shape = |message: &str| PolicyProblem::Shape(message.to_string());
        let Yaml::Mapping(top) = document else {
            self.file_error(
                file,
                shape("a policy file must be a mapping with a `rules` list"),
            );
            return;
        };
        let mut rules = None;
        for (key, value) in &top {
            match key.as_str() {
                Some("rules") => rules = Some(value),
                _ => self.file_error(
                    file,
                    PolicyProblem::Shape(format!("unknown field {}", describe_key(key))),
                ),
            }
        }
        match rules {
            None => self.file_error(file, shape("missing field `rules`")),
            Some(Yaml::Sequence(rules)) => {
                for (i, rule) in rules.iter().enumerate() {
                    self.add_rule(file, i + 1, rule);
                }
            }
            Some(_) => self.file_error(file, shape("`rules` must be a list")),
        }
    }

    /// Compiles the `position`-th rule (from 1) of `file`.
    fn add_rule(&mut self, file: &str, position: usize, yaml: &Yaml) {
        let mut place = Place {
            file,
            rule: Some(format!("#{position}")),
            errors: &mut self.errors,
        };
        let Yaml::Mapping(fields) = yaml else {
            place.shape("", "a rule must be a mapping");
            return;
        };
        let id = match fields.get("id") {
            Some(Yaml::String(id)) if is_valid_id(id) => Some(id.clone()),
            _ => None,
        };
        if let Some(id) = &id {
            place.rule = Some(id.clone());
        }
        for key in fields.keys() {
            if !key.as_str().is_some_and(|k| RULE_FIELDS.contains(&k)) {
                place.shape("", format!("unknown field {}", describe_key(key)));
            }
        }
        match fields.get("id") {
            None => place.shape("", "missing field `id`"),
            Some(Yaml::String(text)) if id.is_none() => {
                place.report("", PolicyProblem::BadId(text.clone()))
            }
            Some(Yaml::String(_)) => {}
            Some(_) => place.shape("id", "must be a string"),
        }
        if let Some(id) = &id {
            match self.first_file_of_id.get(id) {
                Some(first) => place.report("", PolicyProblem::DuplicateId(first.clone())),
                None => {
                    self.first_file_of_id.insert(id.clone(), file.to_string());
                }
            }
        }
        let title = match fields.get("title") {
            None => None,
            Some(Yaml::String(title)) => Some(title.clone()),
            Some(_) => {
                place.shape("title", "must be a string");
                None
            }
        };
        let severity = match fields.get("severity") {
            None => {
                place.shape("", "missing field `severity`");
                None
            }
            Some(Yaml::String(name)) => {
                let severity = Severity::parse(name);
                if severity.is_none() {
                    place.report("severity", PolicyProblem::UnknownSeverity(name.clone()));
                }
                severity
            }
            Some(_) => {
                place.shape("severity", "must be a string");
                None
            }
        };
        let target = match fields.get("target") {
            None => Some(Target::default()),
            Some(yaml) => compile_target(&mut place, yaml),
        };
        let when = fields
            .get("when")
            .map(|yaml| compile_condition(&mut place, "when", yaml));
        // `for`: how long a failure must last before it is an alert (`docs/semantics.md` §9).
        let grace = match fields.get("for") {
            None => Some(None),
            Some(yaml) => match compile_duration(&mut place, "for", yaml) {
                Some(duration) if duration.ticks_ceil() > 0 => Some(Some(duration.ticks_ceil())),
                Some(_) => {
                    place.report(
                        "for",
                        PolicyProblem::BadOperand("`for` must be longer than zero".into()),
                    );
                    None
                }
                None => None,
            },
        };
        let check = match fields.get("check") {
            None => {
                place.shape("", "missing field `check`");
                None
            }
            Some(yaml) => compile_condition(&mut place, "check", yaml),
        };
        let (Some(id), Some(severity), Some(target), Some(check), Some(grace)) =
            (id, severity, target, check, grace)
        else {
            return;
        };
        let when = match when {
            None => None,
            Some(Some(when)) => Some(when),
            Some(None) => return,
        };
        // An empty title would make an alert nobody can read: it defaults like a missing one.
        let title = title
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| id.clone());
        let canonical = canonical_rule(yaml, &title);
        self.rules.push(Rule {
            title,
            canonical,
            grace: grace.map(crate::time::Ticks),
            id,
            severity,
            source: file.to_string(),
            target,
            when,
            check,
        });
    }
}

/// Every field of a rule as one line of JSON with sorted keys and the title as loaded (a
/// missing or empty title is the id): what the policy's fingerprint hashes, so that two
/// files that say the same thing in another key order or layout have the same fingerprint.
fn canonical_rule(yaml: &Yaml, title: &str) -> String {
    match to_value(yaml) {
        Ok(Value::Object(mut fields)) => {
            fields.insert("title", Value::from(title));
            Value::Object(fields).to_string()
        }
        // A rule that compiled is a mapping of JSON-compatible values; this is a fallback
        // that still changes whenever the text does.
        _ => serde_yaml_ng::to_string(yaml).unwrap_or_default(),
    }
}

/// `[a-z0-9][a-z0-9._-]*`
fn is_valid_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A mapping key for a message: `` `name` `` for a string, the YAML text otherwise.
fn describe_key(key: &Yaml) -> String {
    match key {
        Yaml::String(key) => format!("`{key}`"),
        other => format!("`{}`", describe(other)),
    }
}

/// A short rendering of a YAML value for a message: a string as it is, anything else as
/// compact JSON (or, if it is not JSON, as YAML on one line).
fn describe(yaml: &Yaml) -> String {
    if let Yaml::String(text) = yaml {
        return text.clone();
    }
    match to_value(yaml) {
        Ok(value) => value.to_string(),
        Err(_) => match serde_yaml_ng::to_string(yaml) {
            Ok(text) => text.split_whitespace().collect::<Vec<_>>().join(" "),
            Err(_) => "?".to_string(),
        },
    }
}

fn compile_target(place: &mut Place<'_>, yaml: &Yaml) -> Option<Target> {
    let Yaml::Mapping(fields) = yaml else {
        place.shape("target", "must be a mapping");
        return None;
    };
    let mut ok = true;
    for key in fields.keys() {
        if !key.as_str().is_some_and(|k| TARGET_FIELDS.contains(&k)) {
            place.shape("target", format!("unknown field {}", describe_key(key)));
            ok = false;
        }
    }
    let modules = match fields.get("module") {
        None => ModuleTarget::DeviceTwins,
        // The string "*" alone means every module twin; inside a list it is a literal id.
        Some(Yaml::String(id)) if id == "*" => ModuleTarget::AllModules,
        Some(Yaml::String(id)) if !id.is_empty() => ModuleTarget::Modules(vec![id.as_str().into()]),
        Some(Yaml::Sequence(items)) if items.is_empty() => {
            place.shape("target.module", "an empty list would match no twin");
            return None;
        }
        Some(Yaml::Sequence(items)) => {
            let mut ids: Vec<Box<str>> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Yaml::String(id) if !id.is_empty() => ids.push(id.as_str().into()),
                    _ => {
                        place.shape(&format!("target.module[{i}]"), "must be a non-empty string");
                        ok = false;
                    }
                }
            }
            ModuleTarget::Modules(ids)
        }
        Some(_) => {
            place.shape(
                "target.module",
                "must be a non-empty module id, a list of them, or \"*\"",
            );
            return None;
        }
    };
    let mut tags = Vec::new();
    match fields.get("tags") {
        None => {}
        Some(Yaml::Mapping(entries)) => {
            for (key, value) in entries {
                let Some(key) = key.as_str() else {
                    place.shape(
                        "target.tags",
                        format!("key {} must be a string", describe_key(key)),
                    );
                    ok = false;
                    continue;
                };
                match to_value(value) {
                    Ok(value) => tags.push((key.into(), value)),
                    Err(message) => {
                        place.shape(&format!("target.tags.{key}"), message);
                        ok = false;
                    }
                }
            }
        }
        Some(_) => {
            place.shape("target.tags", "must be a mapping");
            ok = false;
        }
    }
    ok.then_some(Target { modules, tags })
}

/// Compiles a condition at `at` (a field path for messages); `None` when it has problems,
/// all of which are reported.
pub(crate) fn compile_condition(place: &mut Place<'_>, at: &str, yaml: &Yaml) -> Option<Condition> {
    let Yaml::Mapping(fields) = yaml else {
        place.shape(at, "a condition must be a mapping");
        return None;
    };
    let combinator = fields
        .keys()
        .find_map(|k| k.as_str().filter(|k| COMBINATORS.contains(k)));
    let Some(combinator) = combinator else {
        return compile_test(place, at, fields).map(|test| Condition::Test(Box::new(test)));
    };
    if fields.len() != 1 {
        let others: Vec<String> = fields
            .keys()
            .filter(|k| k.as_str() != Some(combinator))
            .map(describe_key)
            .collect();
        place.shape(
            at,
            format!(
                "`{combinator}` cannot be combined with {}",
                others.join(", ")
            ),
        );
        return None;
    }
    let inner = &fields[combinator];
    if combinator == "not" {
        let condition = compile_condition(place, &format!("{at}.not"), inner)?;
        return Some(Condition::Not(Box::new(condition)));
    }
    let Yaml::Sequence(items) = inner else {
        place.shape(
            &format!("{at}.{combinator}"),
            "must be a list of conditions",
        );
        return None;
    };
    let mut conditions = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match compile_condition(place, &format!("{at}.{combinator}[{i}]"), item) {
            Some(condition) => conditions.push(condition),
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(if combinator == "all" {
        Condition::All(conditions)
    } else {
        Condition::Any(conditions)
    })
}

/// What an op name asks for, before its operands are checked.
#[derive(Clone, Copy)]
enum OpKind {
    Exists,
    Absent,
    Eq { negate: bool },
    In { negate: bool },
    Compare(Order),
    Duration(Order),
    Matches,
    MultipleOf,
    Type,
    ContainsAny,
    SubsetOf,
}

fn op_kind(name: &str) -> Option<OpKind> {
    Some(match name {
        "exists" => OpKind::Exists,
        "absent" => OpKind::Absent,
        "eq" => OpKind::Eq { negate: false },
        "ne" => OpKind::Eq { negate: true },
        "in" => OpKind::In { negate: false },
        "not_in" => OpKind::In { negate: true },
        "lt" => OpKind::Compare(Order::Lt),
        "le" => OpKind::Compare(Order::Le),
        "gt" => OpKind::Compare(Order::Gt),
        "ge" => OpKind::Compare(Order::Ge),
        "duration_lt" => OpKind::Duration(Order::Lt),
        "duration_le" => OpKind::Duration(Order::Le),
        "duration_gt" => OpKind::Duration(Order::Gt),
        "duration_ge" => OpKind::Duration(Order::Ge),
        "matches" => OpKind::Matches,
        "multiple_of" => OpKind::MultipleOf,
        "type" => OpKind::Type,
        "contains_any" => OpKind::ContainsAny,
        "subset_of" => OpKind::SubsetOf,
        _ => return None,
    })
}

fn compile_test(place: &mut Place<'_>, at: &str, fields: &serde_yaml_ng::Mapping) -> Option<Test> {
    let mut ok = true;
    for key in fields.keys() {
        if !key.as_str().is_some_and(|k| TEST_FIELDS.contains(&k)) {
            place.shape(at, format!("unknown field {}", describe_key(key)));
            ok = false;
        }
    }
    if fields.is_empty() {
        place.shape(
            at,
            "an empty condition: expected `all`, `any`, `not`, or `path` and `op`",
        );
        return None;
    }
    let path = match fields.get("path") {
        None => {
            place.shape(at, "missing field `path`");
            None
        }
        Some(yaml) => compile_pointer(place, &format!("{at}.path"), yaml),
    };
    let op_name = match fields.get("op") {
        None => {
            place.shape(at, "missing field `op`");
            None
        }
        Some(Yaml::String(name)) => Some(name.as_str()),
        Some(_) => {
            place.shape(&format!("{at}.op"), "must be a string");
            None
        }
    };
    let op = op_name.and_then(|name| {
        let kind = op_kind(name);
        if kind.is_none() {
            place.report(
                &format!("{at}.op"),
                PolicyProblem::UnknownOp(name.to_string()),
            );
        }
        kind
    });
    let value = fields.get("value");
    let other = fields.get("other");
    let default_yaml = fields.get("default");
    let other_default = fields.get("other_default");
    let default =
        default_yaml.and_then(|yaml| literal(place, &format!("{at}.default"), yaml, &mut ok));

    let (Some(path), Some(op), Some(op_name)) = (path, op, op_name) else {
        return None;
    };

    // Operands that do not go with the op, whatever their values.
    let takes_other = !matches!(
        op,
        OpKind::Exists | OpKind::Absent | OpKind::Type | OpKind::Matches
    );
    if other.is_some() && !takes_other {
        place.report(
            at,
            PolicyProblem::ConflictingOperand(format!("`other` is not allowed with `{op_name}`")),
        );
        ok = false;
    }
    if value.is_some() && matches!(op, OpKind::Exists | OpKind::Absent) {
        place.report(
            at,
            PolicyProblem::ConflictingOperand(format!("`{op_name}` takes no `value`")),
        );
        ok = false;
    }
    if value.is_some() && other.is_some() && takes_other {
        place.report(
            at,
            PolicyProblem::ConflictingOperand("`value` and `other` are both given".to_string()),
        );
        ok = false;
    }
    if other_default.is_some() && other.is_none() {
        place.report(
            at,
            PolicyProblem::ConflictingOperand(
                "`other_default` is given without `other`".to_string(),
            ),
        );
        ok = false;
    }
    let needs_rhs = !matches!(op, OpKind::Exists | OpKind::Absent);
    // An `other` that the op does not take was reported above.
    if needs_rhs && value.is_none() && other.is_none() {
        let wanted = if takes_other {
            "a `value` or an `other`"
        } else {
            "a `value`"
        };
        place.report(
            at,
            PolicyProblem::MissingOperand(format!("`{op_name}` needs {wanted}")),
        );
        ok = false;
    }
    if !ok {
        return None;
    }

    let check = match op {
        OpKind::Exists => Check::Exists,
        OpKind::Absent => Check::Absent,
        OpKind::Type => {
            let name = value.and_then(Yaml::as_str);
            match name.and_then(JsonType::parse) {
                Some(json_type) => Check::Type(json_type),
                None => {
                    place.report(
                        &format!("{at}.value"),
                        PolicyProblem::BadOperand(
                            "`type` needs one of string, number, integer, boolean, object, array, null"
                                .to_string(),
                        ),
                    );
                    return None;
                }
            }
        }
        OpKind::Matches => {
            let at = format!("{at}.value");
            let Some(pattern) = value.and_then(Yaml::as_str) else {
                let pattern = value.map(describe).unwrap_or_default();
                let reason = "the pattern must be a string".to_string();
                place.report(&at, PolicyProblem::BadRegex { pattern, reason });
                return None;
            };
            match compile_anchored(pattern) {
                Ok(regex) => Check::Matches(regex),
                Err(reason) => {
                    let pattern = pattern.to_string();
                    place.report(&at, PolicyProblem::BadRegex { pattern, reason });
                    return None;
                }
            }
        }
        OpKind::Duration(order) => {
            // Every operand is checked before giving up, so that all their problems show.
            let mut ok = true;
            let mut duration = |place: &mut Place<'_>, field: &str, yaml: Option<&Yaml>| {
                let parsed =
                    yaml.map(|yaml| compile_duration(place, &format!("{at}.{field}"), yaml));
                ok &= !matches!(parsed, Some(None));
                parsed.flatten()
            };
            let left_default = duration(place, "default", default_yaml);
            let literal = duration(place, "value", value);
            let pointer =
                other.and_then(|other| compile_pointer(place, &format!("{at}.other"), other));
            let other_default = duration(place, "other_default", other_default);
            let rhs = match (literal, pointer) {
                (Some(literal), _) => DurationOperand::Literal(literal),
                (None, Some(pointer)) => DurationOperand::Other {
                    pointer,
                    default: other_default,
                },
                // A problem with the operand was reported.
                (None, None) => return None,
            };
            if !ok {
                return None;
            }
            Check::Duration {
                default: left_default,
                rhs,
                order,
            }
        }
        OpKind::Eq { negate } => Check::Eq {
            rhs: compile_operand(place, at, value, other, other_default, false)?,
            negate,
        },
        OpKind::In { negate } => Check::In {
            rhs: compile_operand(place, at, value, other, other_default, true)?,
            negate,
        },
        OpKind::Compare(order) => Check::Compare {
            rhs: compile_operand(place, at, value, other, other_default, false)?,
            order,
        },
        OpKind::MultipleOf => Check::MultipleOf(compile_operand(
            place,
            at,
            value,
            other,
            other_default,
            false,
        )?),
        OpKind::ContainsAny => Check::ContainsAny(compile_operand(
            place,
            at,
            value,
            other,
            other_default,
            true,
        )?),
        OpKind::SubsetOf => Check::SubsetOf(compile_operand(
            place,
            at,
            value,
            other,
            other_default,
            false,
        )?),
    };
    Some(Test {
        path,
        default,
        check,
    })
}

/// The right-hand side of an op that takes `value` or `other`; `array` when a literal
/// `value` must be an array.
fn compile_operand(
    place: &mut Place<'_>,
    at: &str,
    value: Option<&Yaml>,
    other: Option<&Yaml>,
    other_default: Option<&Yaml>,
    array: bool,
) -> Option<Operand> {
    if let Some(yaml) = value {
        let mut ok = true;
        let value = literal(place, &format!("{at}.value"), yaml, &mut ok)?;
        if array && !matches!(value, Value::Array(_)) {
            place.report(
                &format!("{at}.value"),
                PolicyProblem::BadOperand("must be an array".to_string()),
            );
            return None;
        }
        return Some(Operand::Literal(value));
    }
    let other = other?;
    let pointer = compile_pointer(place, &format!("{at}.other"), other);
    let mut ok = true;
    let default = other_default
        .and_then(|yaml| literal(place, &format!("{at}.other_default"), yaml, &mut ok));
    let pointer = pointer?;
    ok.then_some(Operand::Other { pointer, default })
}

/// Compiles a pattern that must match the whole string; the error is one line about the
/// pattern as written.
fn compile_anchored(pattern: &str) -> Result<Regex, String> {
    // The pattern is checked alone first, so that an error points into what the operator
    // wrote rather than into the anchored wrapper.
    Regex::new(pattern).map_err(|error| regex_reason(&error))?;
    // `\A` and `\z` keep their meaning even if the pattern turns on multi-line mode, since
    // its flags stay inside the group.
    Regex::new(&format!(r"\A(?:{pattern})\z")).or_else(|error| {
        // A pattern that is fine alone but not wrapped ends inside a `(?x)` comment, which
        // swallowed the closing of the group: a newline ends the comment, and in `x` mode it
        // is otherwise ignored.
        Regex::new(&format!("\\A(?:{pattern}\n)\\z")).map_err(|_| regex_reason(&error))
    })
}

/// The gist of a regex error on one line: a syntax error's `error: ...` line (its other
/// lines draw the pattern and a caret), or the whole message.
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    match text.lines().find_map(|line| line.strip_prefix("error: ")) {
        Some(reason) => reason.to_string(),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn compile_pointer(place: &mut Place<'_>, at: &str, yaml: &Yaml) -> Option<Pointer> {
    let Some(text) = yaml.as_str() else {
        place.shape(at, "a pointer must be a string");
        return None;
    };
    match Pointer::parse(text) {
        Ok(pointer) => Some(pointer),
        Err(reason) => {
            place.report(
                at,
                PolicyProblem::BadPointer {
                    pointer: text.to_string(),
                    reason,
                },
            );
            None
        }
    }
}

fn compile_duration(place: &mut Place<'_>, at: &str, yaml: &Yaml) -> Option<duration::Duration> {
    let parsed = yaml.as_str().and_then(duration::parse);
    if parsed.is_none() {
        place.report(at, PolicyProblem::BadDuration(describe(yaml)));
    }
    parsed
}

/// A literal operand as a JSON value; problems are reported and clear `ok`.
fn literal(place: &mut Place<'_>, at: &str, yaml: &Yaml, ok: &mut bool) -> Option<Value> {
    match to_value(yaml) {
        Ok(value) => Some(value),
        Err(message) => {
            place.shape(at, message);
            *ok = false;
            None
        }
    }
}

/// Converts YAML to JSON: string keys only, finite numbers only, no YAML tags.
pub(crate) fn to_value(yaml: &Yaml) -> Result<Value, String> {
    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::I64(i)
            } else if let Some(u) = n.as_u64() {
                Value::U64(u)
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() => Value::F64(f),
                    _ => return Err(format!("`{n}` is not a JSON number")),
                }
            }
        }
        Yaml::String(s) => Value::String(s.as_str().into()),
        Yaml::Sequence(items) => {
            Value::Array(items.iter().map(to_value).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let Some(key) = key.as_str() else {
                    return Err(format!("object key {} must be a string", describe_key(key)));
                };
                out.push((key.into(), to_value(value)?));
            }
            Value::Object(Map::from_entries(out))
        }
        Yaml::Tagged(tagged) => {
            return Err(format!(
                "yaml tags such as `{}` are not supported",
                tagged.tag
            ));
        }
    })
}

/// Compiles one condition for the case-file tests, as a rule's `check` would be.
#[cfg(test)]
pub(crate) fn compile_for_test(yaml: &Yaml) -> Result<Condition, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut place = Place {
        file: "case",
        rule: None,
        errors: &mut errors,
    };
    match compile_condition(&mut place, "condition", yaml) {
        Some(condition) if errors.is_empty() => Ok(condition),
        _ => Err(errors),
    }
}
