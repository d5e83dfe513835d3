//! RFC 6901 JSON pointers into a twin as exported (docs/semantics.md §4, §6), parsed once at load
//! and resolved against a [`TwinView`] without building the exported object.
//!
//! Pointers of one policy share long prefixes (`/properties/desired/<agent object>/...`
//! starts dozens of them), and looking keys up dominates evaluation. So the policy gives the
//! most shared prefixes a slot in a per-evaluation cache ([`Resolver`]): each is looked up at
//! most once per twin, and a pointer descends only from its deepest cached prefix.

use std::collections::HashMap;

use crate::value::{Map, Value};

use super::TwinView;

/// A parsed pointer: its first token decides where resolution starts, later tokens descend.
#[derive(Clone, Debug)]
pub(crate) struct Pointer {
    head: Head,
    /// Every token, unescaped; the first is the head's. Empty for the empty pointer.
    tokens: Vec<Token>,
    /// The deepest prefix of this pointer that has a cache slot: (slot, number of tokens).
    cached: Option<(usize, usize)>,
}

/// Where the first token of a pointer leads.
#[derive(Clone, Copy, Debug)]
enum Head {
    /// The empty pointer: the whole twin.
    Root,
    HubName,
    DeviceId,
    /// Absent on a device twin.
    ModuleId,
    Version,
    /// The virtual module list of a device twin; on a module twin, an ordinary `$modules` key.
    Modules,
    /// Any other top-level key of the stored twin.
    Field,
}

/// One unescaped reference token, with its array index worked out at load so that
/// resolution parses nothing.
#[derive(Clone, Debug)]
struct Token {
    key: Box<str>,
    /// The index this token selects in an array: `0`, or decimal digits without a leading
    /// zero (RFC 6901); `None` when it selects no element of any array.
    index: Option<usize>,
}

impl Token {
    fn new(key: String) -> Token {
        let is_index = !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_digit())
            && (key == "0" || !key.starts_with('0'));
        let index = if is_index { key.parse().ok() } else { None };
        Token {
            key: key.into(),
            index,
        }
    }
}

/// A value found in a twin. Fields that a [`TwinView`] carries outside its document
/// (identity, version, the module list) are borrowed as they are rather than turned into
/// [`Value`]s, so resolving allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Node<'a> {
    Json(&'a Value),
    Str(&'a str),
    Int(i64),
    /// The sorted module ids of `/$modules`: an array of strings.
    Modules(&'a [&'a str]),
}

/// The most prefixes a policy caches. Enough for the built-in pack; a policy with more
/// shared prefixes caches the most shared ones.
pub(crate) const MAX_CACHED_PREFIXES: usize = 32;

/// Resolves pointers against one twin, remembering the cached prefixes it has looked up.
pub(crate) struct Resolver<'a, 'p> {
    pub(crate) twin: TwinView<'a>,
    /// The pointer of each slot (its prefixes come before it).
    prefixes: &'p [Pointer],
    /// `None`: not looked up yet; `Some(None)`: the twin has no value there.
    slots: [Option<Option<Node<'a>>>; MAX_CACHED_PREFIXES],
}

impl<'a, 'p> Resolver<'a, 'p> {
    pub(crate) fn new(twin: TwinView<'a>, prefixes: &'p [Pointer]) -> Resolver<'a, 'p> {
        Resolver {
            twin,
            prefixes,
            slots: [None; MAX_CACHED_PREFIXES],
        }
    }

    fn slot(&mut self, slot: usize) -> Option<Node<'a>> {
        if let Some(found) = self.slots[slot] {
            return found;
        }
        let prefixes = self.prefixes;
        let found = prefixes[slot].resolve(self, None);
        self.slots[slot] = Some(found);
        found
    }
}

impl Pointer {
    /// Parses a pointer (`""` or `/`-separated tokens with `~0` and `~1` escapes).
    pub(crate) fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer::from_tokens(Vec::new()));
        }
        let Some(body) = text.strip_prefix('/') else {
            return Err("a pointer must be empty or start with `/`".to_string());
        };
        let tokens = body
            .split('/')
            .map(|token| unescape(token).map(Token::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pointer::from_tokens(tokens))
    }

    fn from_tokens(tokens: Vec<Token>) -> Pointer {
        let head = match tokens.first().map(|t| &*t.key) {
            None => Head::Root,
            Some("hubName") => Head::HubName,
            Some("deviceId") => Head::DeviceId,
            Some("moduleId") => Head::ModuleId,
            Some("version") => Head::Version,
            Some("$modules") => Head::Modules,
            Some(_) => Head::Field,
        };
        Pointer {
            head,
            tokens,
            cached: None,
        }
    }

    /// Whether this is the empty pointer, which needs the whole exported twin.
    pub(crate) fn is_root(&self) -> bool {
        matches!(self.head, Head::Root)
    }

    /// The value this pointer selects in the resolver's twin. `root` is the exported twin,
    /// which the caller builds only for an empty pointer ([`Pointer::is_root`]).
    pub(crate) fn resolve<'r, 'a: 'r>(
        &self,
        resolver: &mut Resolver<'a, '_>,
        root: Option<&'r Value>,
    ) -> Option<Node<'r>> {
        let (mut node, done): (Node<'r>, usize) = match self.cached {
            Some((slot, depth)) => (resolver.slot(slot)?, depth),
            None => (self.resolve_head(&resolver.twin, root)?, 1),
        };
        for token in self.tokens.get(done..).unwrap_or_default() {
            node = node.child(token)?;
        }
        Some(node)
    }

    fn resolve_head<'r, 'a: 'r>(
        &self,
        twin: &TwinView<'a>,
        root: Option<&'r Value>,
    ) -> Option<Node<'r>> {
        let is_device_twin = twin.module_id.is_empty();
        Some(match self.head {
            Head::Root => Node::Json(root?),
            Head::HubName => Node::Str(twin.hub_name),
            Head::DeviceId => Node::Str(twin.device_id),
            Head::ModuleId if is_device_twin => return None,
            Head::ModuleId => Node::Str(twin.module_id),
            Head::Version => Node::Int(twin.version),
            Head::Modules if is_device_twin => Node::Modules(twin.modules),
            Head::Modules => Node::Json(lookup(twin.doc, "$modules")?),
            Head::Field => Node::Json(lookup(twin.doc, &self.tokens.first()?.key)?),
        })
    }
}

/// Gives the most shared prefixes of `pointers` cache slots, points every pointer at its
/// deepest cached prefix, and returns the slots' pointers (see [`Resolver`]).
pub(crate) fn share_prefixes(pointers: &mut [&mut Pointer]) -> Vec<Pointer> {
    // How many pointers start with each prefix (as token keys), and when it was first seen.
    let mut uses: HashMap<Vec<&str>, (usize, usize)> = HashMap::new();
    for pointer in pointers.iter() {
        if pointer.is_root() {
            continue;
        }
        for depth in 1..=pointer.tokens.len() {
            let prefix: Vec<&str> = pointer.tokens[..depth].iter().map(|t| &*t.key).collect();
            let first_seen = uses.len();
            uses.entry(prefix).or_insert((0, first_seen)).0 += 1;
        }
    }
    // A prefix has at least the uses of any longer one, so taking the most used first keeps
    // every cached prefix's own prefixes cached too (ties go to the shorter, seen earlier).
    let mut shared: Vec<(Vec<&str>, usize, usize)> = uses
        .into_iter()
        .filter(|(_, (count, _))| *count >= 2)
        .map(|(prefix, (count, first_seen))| (prefix, count, first_seen))
        .collect();
    shared.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(a.0.len().cmp(&b.0.len()))
            .then(a.2.cmp(&b.2))
    });
    shared.truncate(MAX_CACHED_PREFIXES);
    // Slots in order of length, so that each slot's prefixes come before it.
    shared.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.2.cmp(&b.2)));
    let slot_of: HashMap<Vec<String>, usize> = shared
        .iter()
        .enumerate()
        .map(|(slot, (prefix, _, _))| (prefix.iter().map(|k| k.to_string()).collect(), slot))
        .collect();
    let deepest_cached = |tokens: &[Token], below: usize| -> Option<(usize, usize)> {
        (1..=below.min(tokens.len())).rev().find_map(|depth| {
            let prefix: Vec<String> = tokens[..depth].iter().map(|t| t.key.to_string()).collect();
            slot_of.get(&prefix).map(|&slot| (slot, depth))
        })
    };
    let mut prefixes: Vec<Pointer> = Vec::with_capacity(shared.len());
    for (prefix, _, _) in &shared {
        let source = pointers
            .iter()
            .find(|p| {
                p.tokens.len() >= prefix.len()
                    && p.tokens.iter().zip(prefix).all(|(t, k)| &*t.key == *k)
            })
            .expect("every shared prefix comes from a pointer");
        let mut pointer = Pointer::from_tokens(source.tokens[..prefix.len()].to_vec());
        // Strictly shorter, so that resolving a slot never needs itself.
        pointer.cached = deepest_cached(&pointer.tokens, prefix.len() - 1);
        prefixes.push(pointer);
    }
    for pointer in pointers.iter_mut() {
        if !pointer.is_root() {
            pointer.cached = deepest_cached(&pointer.tokens, pointer.tokens.len());
        }
    }
    prefixes
}

/// `map.get(key)`, faster on the small objects twins are made of: a scan that compares
/// lengths first calls `memcmp` about once, where a binary search calls it at every step.
pub(crate) fn lookup<'a>(map: &'a Map, key: &str) -> Option<&'a Value> {
    const SCAN_UP_TO: usize = 16;
    if map.len() > SCAN_UP_TO {
        return map.get(key);
    }
    map.iter()
        .find(|(k, _)| k.len() == key.len() && *k == key)
        .map(|(_, value)| value)
}

/// Undoes RFC 6901 escaping: `~1` is `/`, `~0` is `~`, and any other `~` is an error.
fn unescape(token: &str) -> Result<String, String> {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return Err("`~` must be followed by `0` or `1`".to_string()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl<'a> Node<'a> {
    fn child(self, token: &Token) -> Option<Node<'a>> {
        match self {
            Node::Json(Value::Object(map)) => lookup(map, &token.key).map(Node::Json),
            Node::Json(Value::Array(items)) => items.get(token.index?).map(Node::Json),
            Node::Modules(ids) => ids.get(token.index?).map(|id| Node::Str(id)),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> Option<&'a str> {
        match self {
            Node::Json(value) => value.as_str(),
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_object(self) -> Option<&'a Map> {
        match self {
            Node::Json(value) => value.as_object(),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub(crate) fn as_number(self) -> Option<Number> {
        match self {
            Node::Json(value) => Number::of(value),
            Node::Int(n) => Some(Number::Int(n.into())),
            _ => None,
        }
    }

    /// The JSON type name, with `integer` for numbers that are integers.
    pub(crate) fn is_type(self, json_type: JsonType) -> bool {
        match (self, json_type) {
            (Node::Json(value), JsonType::Integer) => value.as_integer().is_some(),
            (Node::Json(value), _) => value.type_name() == json_type.as_str(),
            (Node::Str(_), JsonType::String) => true,
            (Node::Int(_), JsonType::Number | JsonType::Integer) => true,
            (Node::Modules(_), JsonType::Array) => true,
            _ => false,
        }
    }

    /// The number of elements, if this is an array.
    pub(crate) fn array_len(self) -> Option<usize> {
        match self {
            Node::Json(Value::Array(items)) => Some(items.len()),
            Node::Modules(ids) => Some(ids.len()),
            _ => None,
        }
    }

    /// Element `i` of an array (`i < array_len()`).
    pub(crate) fn element(self, i: usize) -> Option<Node<'a>> {
        match self {
            Node::Json(Value::Array(items)) => items.get(i).map(Node::Json),
            Node::Modules(ids) => ids.get(i).map(|id| Node::Str(id)),
            _ => None,
        }
    }

    /// JSON equality (numbers by numeric value, objects regardless of key order), across the
    /// borrowed forms.
    pub(crate) fn json_eq(self, other: Node<'_>) -> bool {
        match (self, other) {
            (Node::Json(a), Node::Json(b)) => a == b,
            (Node::Str(a), b) | (b, Node::Str(a)) => b.as_str() == Some(a),
            (Node::Int(a), b) | (b, Node::Int(a)) => {
                b.as_number().is_some_and(|n| n == Number::Int(a.into()))
            }
            (Node::Modules(_), _) | (_, Node::Modules(_)) => {
                let (Some(len_a), Some(len_b)) = (self.array_len(), other.array_len()) else {
                    return false;
                };
                len_a == len_b
                    && (0..len_a).all(|i| match (self.element(i), other.element(i)) {
                        (Some(a), Some(b)) => a.json_eq(b),
                        _ => false,
                    })
            }
        }
    }
}

/// A JSON number, exact for integers (a float with no fraction counts as one, as in
/// [`Value::as_integer`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    pub(crate) fn of(value: &Value) -> Option<Number> {
        if !value.is_number() {
            return None;
        }
        Some(match value.as_integer() {
            Some(n) => Number::Int(n),
            None => Number::Float(value.as_f64()?),
        })
    }

    pub(crate) fn as_integer(self) -> Option<i128> {
        match self {
            Number::Int(n) => Some(n),
            Number::Float(_) => None,
        }
    }

    /// Numeric order. Mixed pairs compare as `f64`, which is exact for JSON numbers that fit
    /// an `i128`: a float with a fraction is below 2^53 in magnitude, where integers convert
    /// exactly, and any larger integer lies beyond it whatever its rounding.
    pub(crate) fn compare(self, other: Number) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(n) => n as f64,
            Number::Float(f) => f,
        }
    }
}

/// The names that the `type` op accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
    Null,
}

impl JsonType {
    pub(crate) fn parse(name: &str) -> Option<JsonType> {
        Some(match name {
            "string" => JsonType::String,
            "number" => JsonType::Number,
            "integer" => JsonType::Integer,
            "boolean" => JsonType::Boolean,
            "object" => JsonType::Object,
            "array" => JsonType::Array,
            "null" => JsonType::Null,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Number => "number",
            JsonType::Integer => "integer",
            JsonType::Boolean => "boolean",
            JsonType::Object => "object",
            JsonType::Array => "array",
            JsonType::Null => "null",
        }
    }
}
