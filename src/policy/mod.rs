//! The policy engine: loads rules from YAML files, compiles them, and tells which rules a twin
//! fails (docs/semantics.md §4).
//!
//! This module is pure: it reads files only in [`Policy::load`], and evaluation is a function
//! of the compiled policy and one twin. It owns the policy language (rule shape, conditions,
//! ops, load errors) and the built-in pack `policies/security-twin-baseline.yaml`; what a
//! failing rule turns into (alerts, transitions) belongs to the pipeline.
//!
//! Promises:
//! - everything that can be checked in a policy is checked at load, and every problem of every
//!   file is reported, each naming its file and rule;
//! - evaluation re-parses nothing and allocates nothing (except for a test on the empty
//!   pointer, which needs the whole exported twin built), and looks each pointer prefix that
//!   several tests share up once per twin;
//! - a twin value that does not fit an op makes the test false, never an error.

mod condition;
mod duration;
mod error;
mod load;
mod pointer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

/// A rule's severity. It lives in `model` because stored violations carry it and the store
/// sits below the policy; named here too, as the policy language's.
pub use crate::model::Severity;
use crate::value::{Map, Value};

use condition::Condition;
pub use error::{PolicyError, PolicyErrors, PolicyProblem};
use pointer::{Pointer, Resolver};

// The pipeline may share one compiled policy between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
};

/// The built-in pack's text, and the name its problems would be reported under.
const BASELINE_NAME: &str = "policies/security-twin-baseline.yaml";
const BASELINE_TEXT: &str = include_str!("../../policies/security-twin-baseline.yaml");

/// An ordered list of compiled rules.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Indices of the rules that target device twins, in policy order.
    device_rules: Vec<usize>,
    /// Indices of the rules that target every module twin (`module: "*"`), in policy order:
    /// the rules of a module twin whose id no rule names.
    all_module_rules: Vec<usize>,
    /// For each module id that some rule names, sorted by id: the indices of the rules that
    /// target it (by name or by `"*"`), in policy order.
    rules_by_module: Vec<(Box<str>, Vec<usize>)>,
    /// The pointer prefixes that evaluation caches, by slot (see [`pointer::Resolver`]).
    cached_prefixes: Vec<Pointer>,
    /// SHA-256 (hex) of every field of every rule, in order (`docs/semantics.md` §8).
    fingerprint: String,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    /// Defaults to the id.
    pub title: String,
    pub severity: Severity,
    /// The file the rule came from.
    source: String,
    /// Every field as loaded, as canonical JSON (see [`Policy::fingerprint`]).
    canonical: String,
    /// `for`: how long the rule must fail on a twin before the failure is an alert
    /// (`docs/semantics.md` §9); `None` alerts at once.
    pub grace: Option<crate::time::Ticks>,
    target: Target,
    when: Option<Condition>,
    check: Condition,
}

/// Which twins a rule applies to.
#[derive(Debug, Default)]
struct Target {
    modules: ModuleTarget,
    /// Each tag must equal the twin's own `tags[key]`.
    tags: Vec<(Box<str>, Value)>,
}

#[derive(Debug, Default)]
enum ModuleTarget {
    /// `module` omitted.
    #[default]
    DeviceTwins,
    /// `module: "*"`.
    AllModules,
    /// `module: id` or `module: [id, ...]` (where `"*"` is a literal id).
    Modules(Vec<Box<str>>),
}

/// A twin as the policy sees it, without building the exported JSON object.
#[derive(Clone, Copy, Debug)]
pub struct TwinView<'a> {
    pub hub_name: &'a str,
    pub device_id: &'a str,
    /// `""` for a device twin.
    pub module_id: &'a str,
    pub version: i64,
    /// Every stored top-level field except `hubName`, `deviceId`, `moduleId` and `version`:
    /// `tags`, `properties`, `etag`, ...
    pub doc: &'a Map,
    /// Device twins: the sorted ids of the modules that currently have a twin (the virtual
    /// `/$modules`). Ignored for module twins.
    pub modules: &'a [&'a str],
}

impl TwinView<'_> {
    /// The twin as exported (§6), with `$modules` on a device twin: what the empty pointer
    /// selects. Allocates, so evaluation builds it only for a test that needs it.
    fn exported(&self) -> Value {
        let mut map = self.doc.clone();
        map.insert("hubName", Value::from(self.hub_name));
        map.insert("deviceId", Value::from(self.device_id));
        if self.module_id.is_empty() {
            let modules = self.modules.iter().map(|&id| Value::from(id)).collect();
            map.insert("$modules", Value::Array(modules));
        } else {
            map.insert("moduleId", Value::from(self.module_id));
        }
        map.insert("version", Value::I64(self.version));
        Value::Object(map)
    }
}

impl Policy {
    /// Loads and compiles files in order; every error of every file is collected.
    pub fn load(paths: &[PathBuf]) -> Result<Policy, PolicyErrors> {
        let mut loader = load::Loader::default();
        for path in paths {
            let name = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => loader.add_source(&name, &text),
                Err(error) => loader.file_error(&name, PolicyProblem::Read(error.to_string())),
            }
        }
        Policy::finish(loader)
    }

    /// Same from (name, text) pairs (tests, and the embedded pack).
    pub fn from_sources(sources: &[(String, String)]) -> Result<Policy, PolicyErrors> {
        let mut loader = load::Loader::default();
        for (name, text) in sources {
            loader.add_source(name, text);
        }
        Policy::finish(loader)
    }

    /// The built-in pack `policies/security-twin-baseline.yaml`, compiled into the binary.
    pub fn baseline() -> Policy {
        let sources = [(BASELINE_NAME.to_string(), BASELINE_TEXT.to_string())];
        Policy::from_sources(&sources).expect("the built-in policy pack is valid: a test loads it")
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The policy's fingerprint: SHA-256, in hex, of every field of every rule in order (the
    /// title as loaded, keys sorted), so that any change a twin's evaluation or an alert could
    /// show changes it, and a mere reformatting of the files does not. The snapshot records
    /// it to know when to re-audit (`docs/semantics.md` §8).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The index of the rule with this id.
    pub fn rule_index(&self, id: &str) -> Option<usize> {
        self.rules.iter().position(|rule| rule.id == id)
    }

    /// Appends to `failing` the index (into [`Policy::rules`]) of every rule failing on this
    /// twin, in policy order: its target matches, its `when` (if any) holds, and its `check`
    /// does not.
    pub fn evaluate(&self, twin: &TwinView<'_>, failing: &mut Vec<usize>) {
        let candidates = self.candidates(twin.module_id);
        let mut resolver = Resolver::new(*twin, &self.cached_prefixes);
        for &i in candidates {
            if self.rules[i].fails(&mut resolver) {
                failing.push(i);
            }
        }
    }

    /// The rules whose module target matches twins of `module_id` (`""`: device twins), in
    /// policy order: when there are none, evaluating such a twin is a no-op.
    pub fn candidates(&self, module_id: &str) -> &[usize] {
        if module_id.is_empty() {
            &self.device_rules
        } else {
            match self
                .rules_by_module
                .binary_search_by(|(id, _)| id.as_bytes().cmp(module_id.as_bytes()))
            {
                Ok(i) => &self.rules_by_module[i].1,
                Err(_) => &self.all_module_rules,
            }
        }
    }

    fn finish(loader: load::Loader) -> Result<Policy, PolicyErrors> {
        if !loader.errors.is_empty() {
            return Err(PolicyErrors(loader.errors));
        }
        let mut rules = loader.rules;
        let mut pointers: Vec<&mut Pointer> = Vec::new();
        for rule in &mut rules {
            if let Some(when) = &mut rule.when {
                when.for_each_pointer(&mut |p| pointers.push(p));
            }
            rule.check.for_each_pointer(&mut |p| pointers.push(p));
        }
        let cached_prefixes = pointer::share_prefixes(&mut pointers);
        let mut device_rules = Vec::new();
        let mut all_module_rules = Vec::new();
        let mut named: Vec<Box<str>> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match &rule.target.modules {
                ModuleTarget::DeviceTwins => device_rules.push(i),
                ModuleTarget::AllModules => all_module_rules.push(i),
                ModuleTarget::Modules(ids) => named.extend(ids.iter().cloned()),
            }
        }
        named.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        named.dedup();
        let rules_by_module = named
            .into_iter()
            .map(|id| {
                let indices = (0..rules.len())
                    .filter(|&i| rules[i].target.matches_module(&id))
                    .collect();
                (id, indices)
            })
            .collect();
        let fingerprint = {
            use sha2::Digest as _;
            let mut hasher = sha2::Sha256::new();
            for rule in &rules {
                hasher.update(rule.canonical.as_bytes());
                hasher.update(b"\n");
            }
            hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        Ok(Policy {
            rules,
            device_rules,
            all_module_rules,
            rules_by_module,
            cached_prefixes,
            fingerprint,
        })
    }
}

impl Rule {
    /// The file (as named to the loader) this rule came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn fails(&self, resolver: &mut Resolver<'_, '_>) -> bool {
        let twin = &resolver.twin;
        let module_ok = if twin.module_id.is_empty() {
            matches!(self.target.modules, ModuleTarget::DeviceTwins)
        } else {
            self.target.matches_module(twin.module_id)
        };
        module_ok
            && self.target.tags_match(twin)
            && self.when.as_ref().is_none_or(|when| when.holds(resolver))
            && !self.check.holds(resolver)
    }
}

impl Target {
    fn matches_module(&self, module_id: &str) -> bool {
        match &self.modules {
            ModuleTarget::DeviceTwins => false,
            ModuleTarget::AllModules => true,
            ModuleTarget::Modules(ids) => ids.iter().any(|id| &**id == module_id),
        }
    }

    fn tags_match(&self, twin: &TwinView<'_>) -> bool {
        if self.tags.is_empty() {
            return true;
        }
        let Some(tags) = pointer::lookup(twin.doc, "tags").and_then(Value::as_object) else {
            return false;
        };
        self.tags
            .iter()
            .all(|(key, value)| pointer::lookup(tags, key).is_some_and(|tag| tag == value))
    }
}
