//! Data-driven tests: every case is a file under `tests/data/policy/`, run by [`check`].
//!
//! - `conditions/*.yaml`: `{twins?, cases: [{name?, twin, condition, expected: bool}]}`, one
//!   file per op or feature; a condition is compiled as a rule's `check` would be;
//! - `policies/*.yaml`: `{policy: <text>, twins?, rules?: [[id, title, severity]], cases:
//!   [{name?, twin, expected: [failing rule ids in order]}]}`; `policy: builtin` is the
//!   built-in pack;
//! - `load_errors.yaml`: `{cases: [{name, files: {name: text} | paths: [file], expected:
//!   <error text>, kinds?: [kind]}]}`, where `$DATA` in paths and texts stands for this
//!   directory.
//!
//! A twin is written as exported (`hubName`, `deviceId`, `moduleId` for a module twin,
//! `version`, `tags`, `properties`, ...), with `$modules` on a device twin for the module ids;
//! `twin: name` refers to `twins.name` of the same file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value as Yaml;

use super::load::{compile_for_test, to_value};
use super::pointer::{share_prefixes, Resolver};
use super::{Policy, TwinView};
use crate::value::{Map, Value};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/policy");

/// Every op of docs/semantics.md §4.
const OPS: &[&str] = &[
    "exists",
    "absent",
    "eq",
    "ne",
    "in",
    "not_in",
    "lt",
    "le",
    "gt",
    "ge",
    "duration_lt",
    "duration_le",
    "duration_gt",
    "duration_ge",
    "matches",
    "multiple_of",
    "type",
    "contains_any",
    "subset_of",
];

/// What a case gives as input.
enum Input<'a> {
    /// A condition evaluated on a twin.
    Condition { condition: &'a Yaml, twin: &'a Twin },
    /// A compiled policy evaluated on a twin: the failing rule ids.
    Policy { policy: &'a Policy, twin: &'a Twin },
    /// Policy sources (name, text) that must not load: the error text.
    Sources(Vec<(String, String)>),
    /// Policy files that must not load: the error text.
    Paths(Vec<PathBuf>),
}

/// Runs one case and compares its outcome with `expected`; `Err` describes a mismatch.
fn check(input: Input<'_>, expected: &Yaml) -> Result<(), String> {
    match input {
        Input::Condition { condition, twin } => {
            let mut condition = compile_for_test(condition).map_err(|errors| {
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                format!("does not compile: {}", lines.join("; "))
            })?;
            let actual = twin.with_view(|view| condition.holds(&mut Resolver::new(*view, &[])));
            // Again with the prefixes its pointers share cached, as a policy evaluates it.
            let mut pointers = Vec::new();
            condition.for_each_pointer(&mut |pointer| pointers.push(pointer));
            let prefixes = share_prefixes(&mut pointers);
            let cached =
                twin.with_view(|view| condition.holds(&mut Resolver::new(*view, &prefixes)));
            if cached != actual {
                return Err(format!(
                    "holds = {actual}, but {cached} with cached prefixes"
                ));
            }
            let expected = expected
                .as_bool()
                .ok_or("`expected` must be true or false")?;
            if actual != expected {
                return Err(format!("holds = {actual}, expected {expected}"));
            }
        }
        Input::Policy { policy, twin } => {
            let mut failing = Vec::new();
            twin.with_view(|view| policy.evaluate(view, &mut failing));
            let actual: Vec<&str> = failing
                .iter()
                .map(|&i| policy.rules()[i].id.as_str())
                .collect();
            let expected = string_list(expected).ok_or("`expected` must be a list of rule ids")?;
            if actual != expected {
                return Err(format!("failing = {actual:?}, expected {expected:?}"));
            }
        }
        Input::Sources(sources) => {
            let result = Policy::from_sources(&sources);
            compare_errors(result, expected)?;
        }
        Input::Paths(paths) => {
            let result = Policy::load(&paths);
            compare_errors(result, expected)?;
        }
    }
    Ok(())
}

fn compare_errors(
    result: Result<Policy, super::PolicyErrors>,
    expected: &Yaml,
) -> Result<(), String> {
    let expected = expected
        .as_str()
        .ok_or("`expected` must be the error text")?
        .replace("$DATA", DATA);
    match result {
        Ok(policy) => Err(format!(
            "loaded {} rules, expected errors",
            policy.rules().len()
        )),
        Err(errors) => {
            let actual = errors.to_string();
            if actual.trim_end() != expected.trim_end() {
                return Err(format!(
                    "errors:\n{actual}\nexpected:\n{}",
                    expected.trim_end()
                ));
            }
            Ok(())
        }
    }
}

fn string_list(yaml: &Yaml) -> Option<Vec<&str>> {
    yaml.as_sequence()?.iter().map(Yaml::as_str).collect()
}

/// A twin as the case files write it, held so that a [`TwinView`] can borrow it.
struct Twin {
    hub_name: String,
    device_id: String,
    module_id: String,
    version: i64,
    doc: Map,
    modules: Vec<String>,
}

impl Twin {
    fn parse(yaml: &Yaml) -> Result<Twin, String> {
        let Value::Object(mut doc) = to_value(yaml)? else {
            return Err("a twin must be a mapping".to_string());
        };
        let mut text = |key: &str, default: &str| -> Result<String, String> {
            match doc.remove(key) {
                None => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.to_string()),
                Some(_) => Err(format!("`{key}` must be a string")),
            }
        };
        let hub_name = text("hubName", "hub")?;
        let device_id = text("deviceId", "device")?;
        let module_id = text("moduleId", "")?;
        let version = match doc.remove("version") {
            None => 1,
            Some(Value::I64(n)) => n,
            Some(_) => return Err("`version` must be an integer".to_string()),
        };
        // `$modules` is virtual on a device twin only; on a module twin it is ordinary data.
        let mut modules = Vec::new();
        if module_id.is_empty() {
            if let Some(list) = doc.remove("$modules") {
                let ids = list.as_array().ok_or("`$modules` must be a list")?;
                for id in ids {
                    modules.push(
                        id.as_str()
                            .ok_or("`$modules` must hold strings")?
                            .to_string(),
                    );
                }
                if !modules.is_sorted() {
                    return Err("`$modules` must be sorted".to_string());
                }
            }
        }
        Ok(Twin {
            hub_name,
            device_id,
            module_id,
            version,
            doc,
            modules,
        })
    }

    fn with_view<R>(&self, f: impl FnOnce(&TwinView<'_>) -> R) -> R {
        let modules: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        f(&TwinView {
            hub_name: &self.hub_name,
            device_id: &self.device_id,
            module_id: &self.module_id,
            version: self.version,
            doc: &self.doc,
            modules: &modules,
        })
    }
}

/// A parsed case file.
struct CaseFile {
    path: PathBuf,
    yaml: Yaml,
    twins: BTreeMap<String, Twin>,
}

impl CaseFile {
    fn read(path: &Path) -> CaseFile {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let yaml: Yaml =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut twins = BTreeMap::new();
        if let Some(Yaml::Mapping(named)) = yaml.get("twins") {
            for (name, twin) in named {
                let name = name.as_str().expect("twin names are strings").to_string();
                let twin = Twin::parse(twin)
                    .unwrap_or_else(|e| panic!("{}: twin {name}: {e}", path.display()));
                twins.insert(name, twin);
            }
        }
        CaseFile {
            path: path.to_path_buf(),
            yaml,
            twins,
        }
    }

    fn cases(&self) -> &[Yaml] {
        let cases = self
            .yaml
            .get("cases")
            .and_then(Yaml::as_sequence)
            .unwrap_or_else(|| panic!("{}: no `cases` list", self.path.display()));
        assert!(!cases.is_empty(), "{}: no cases", self.path.display());
        cases
    }

    /// The twin of a case: `twin: name` or an inline twin, parsed into `storage`.
    fn twin<'a>(&'a self, case: &Yaml, storage: &'a mut Option<Twin>) -> Result<&'a Twin, String> {
        match case.get("twin") {
            Some(Yaml::String(name)) => self.twins.get(name).ok_or(format!("no twin named {name}")),
            Some(inline) => Ok(storage.insert(Twin::parse(inline)?)),
            None => Err("no `twin`".to_string()),
        }
    }
}

/// A label for a case in failure messages.
fn case_name(file: &CaseFile, i: usize, case: &Yaml) -> String {
    let name = case.get("name").and_then(Yaml::as_str).unwrap_or("");
    format!(
        "{} case #{} {name}",
        file.path.file_name().unwrap_or_default().to_string_lossy(),
        i + 1
    )
}

/// The case files of a directory, sorted; there must be some.
fn case_files(dir: &str) -> Vec<CaseFile> {
    let dir = Path::new(DATA).join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no case files in {}", dir.display());
    paths.iter().map(|path| CaseFile::read(path)).collect()
}

fn assert_no_failures(failures: Vec<String>, n_cases: usize) {
    assert!(n_cases > 0, "no cases ran");
    assert!(
        failures.is_empty(),
        "{} of {n_cases} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn condition_cases() {
    let mut failures = Vec::new();
    let mut n_cases = 0;
    // For each op used as a whole condition: the outcomes its cases expect.
    let mut outcomes: BTreeMap<String, BTreeSet<bool>> = BTreeMap::new();
    for file in case_files("conditions") {
        for (i, case) in file.cases().iter().enumerate() {
            n_cases += 1;
            let mut storage = None;
            let result = file.twin(case, &mut storage).and_then(|twin| {
                let condition = case.get("condition").ok_or("no `condition`")?;
                let expected = case.get("expected").ok_or("no `expected`")?;
                if let (Some(op), Some(expected)) = (
                    condition.get("op").and_then(Yaml::as_str),
                    expected.as_bool(),
                ) {
                    outcomes.entry(op.to_string()).or_default().insert(expected);
                }
                check(Input::Condition { condition, twin }, expected)
            });
            if let Err(message) = result {
                failures.push(format!("{}: {message}", case_name(&file, i, case)));
            }
        }
    }
    assert_no_failures(failures, n_cases);
    for op in OPS {
        let seen = outcomes.get(*op).cloned().unwrap_or_default();
        assert_eq!(
            seen.len(),
            2,
            "op {op} needs cases expecting true and false, has {seen:?}"
        );
    }
    let unknown: Vec<&String> = outcomes
        .keys()
        .filter(|op| !OPS.contains(&op.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "cases use ops outside SEMANTICS: {unknown:?}"
    );
}

/// Runs the cases of a file whose cases evaluate one policy on twins.
fn run_policy_file(file: &CaseFile, policy: &Policy, failures: &mut Vec<String>) -> usize {
    if let Some(expected_rules) = file.yaml.get("rules").and_then(Yaml::as_sequence) {
        let actual: Vec<Vec<&str>> = policy
            .rules()
            .iter()
            .map(|rule| {
                vec![
                    rule.id.as_str(),
                    rule.title.as_str(),
                    rule.severity.as_str(),
                ]
            })
            .collect();
        let expected: Vec<Vec<&str>> = expected_rules
            .iter()
            .map(|rule| string_list(rule).expect("rules are [id, title, severity]"))
            .collect();
        if actual != expected {
            failures.push(format!(
                "{}: rules = {actual:?}, expected {expected:?}",
                file.path.display()
            ));
        }
    }
    let mut n_cases = 0;
    for (i, case) in file.cases().iter().enumerate() {
        n_cases += 1;
        let mut storage = None;
        let result = file.twin(case, &mut storage).and_then(|twin| {
            let expected = case.get("expected").ok_or("no `expected`")?;
            check(Input::Policy { policy, twin }, expected)
        });
        if let Err(message) = result {
            failures.push(format!("{}: {message}", case_name(file, i, case)));
        }
    }
    n_cases
}

fn load_case_policy(file: &CaseFile) -> Policy {
    match file.yaml.get("policy") {
        Some(Yaml::String(text)) if text == "builtin" => Policy::baseline(),
        Some(Yaml::String(text)) => {
            let name = file
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            Policy::from_sources(&[(name, text.clone())]).unwrap_or_else(|errors| {
                panic!("{}: policy does not load:\n{errors}", file.path.display())
            })
        }
        _ => panic!("{}: no `policy` text", file.path.display()),
    }
}

#[test]
fn policy_cases() {
    let mut failures = Vec::new();
    let mut n_cases = 0;
    for file in case_files("policies") {
        let policy = load_case_policy(&file);
        n_cases += run_policy_file(&file, &policy, &mut failures);
    }
    assert_no_failures(failures, n_cases);
}

#[test]
fn baseline_cases() {
    let file = CaseFile::read(&Path::new(DATA).join("baseline.yaml"));
    let policy = load_case_policy(&file);
    assert!(matches!(file.yaml.get("policy"), Some(Yaml::String(s)) if s == "builtin"));
    let mut failures = Vec::new();
    let n_cases = run_policy_file(&file, &policy, &mut failures);
    assert_no_failures(failures, n_cases);

    // Every rule of the pack is shown failing by some case, and some twin of each kind
    // (device, each agent) passes every rule.
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    let mut compliant: BTreeSet<String> = BTreeSet::new();
    for case in file.cases() {
        let ids = string_list(&case["expected"]).expect("lists");
        failed.extend(ids.iter().copied());
        if ids.is_empty() {
            let mut storage = None;
            let twin = file.twin(case, &mut storage).expect("checked above");
            compliant.insert(twin.module_id.clone());
        }
    }
    let never_failed: Vec<&str> = policy
        .rules()
        .iter()
        .map(|rule| rule.id.as_str())
        .filter(|id| !failed.contains(id))
        .collect();
    assert!(
        never_failed.is_empty(),
        "no case fails these rules: {never_failed:?}"
    );
    for kind in ["", "azureiotsecurity", "DefenderIotMicroAgent"] {
        assert!(
            compliant.contains(kind),
            "no compliant twin of module {kind:?}"
        );
    }
}

#[test]
fn baseline_is_the_pack_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/security-twin-baseline.yaml");
    let loaded = Policy::load(&[path]).unwrap_or_else(|errors| panic!("{errors}"));
    let ids =
        |policy: &Policy| -> Vec<String> { policy.rules().iter().map(|r| r.id.clone()).collect() };
    assert_eq!(ids(&loaded), ids(&Policy::baseline()));
    assert!(
        loaded.rules().len() >= 10,
        "the pack has {} rules",
        loaded.rules().len()
    );
}

#[test]
fn load_error_cases() {
    let file = CaseFile::read(&Path::new(DATA).join("load_errors.yaml"));
    let mut failures = Vec::new();
    let mut n_cases = 0;
    for (i, case) in file.cases().iter().enumerate() {
        n_cases += 1;
        let input = if let Some(Yaml::Mapping(files)) = case.get("files") {
            let sources = files
                .iter()
                .map(|(name, text)| {
                    let name = name.as_str().expect("file names are strings").to_string();
                    let text = text
                        .as_str()
                        .expect("file texts are strings")
                        .replace("$DATA", DATA);
                    (name, text)
                })
                .collect();
            Input::Sources(sources)
        } else if let Some(paths) = case.get("paths").and_then(string_list) {
            Input::Paths(
                paths
                    .iter()
                    .map(|p| PathBuf::from(p.replace("$DATA", DATA)))
                    .collect(),
            )
        } else {
            failures.push(format!(
                "{}: no `files` or `paths`",
                case_name(&file, i, case)
            ));
            continue;
        };
        let kinds = case.get("kinds").and_then(string_list);
        let result = check(input, &case["expected"]).and_then(|()| {
            let Some(expected_kinds) = kinds else {
                return Ok(());
            };
            let sources: Vec<(String, String)> = match case.get("files") {
                Some(Yaml::Mapping(files)) => files
                    .iter()
                    .map(|(n, t)| {
                        (
                            n.as_str().unwrap_or("").to_string(),
                            t.as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect(),
                _ => return Err("`kinds` needs `files`".to_string()),
            };
            let errors = Policy::from_sources(&sources).err().ok_or("loaded")?;
            let actual: Vec<&str> = errors.0.iter().map(|e| e.kind()).collect();
            if actual != expected_kinds {
                return Err(format!("kinds = {actual:?}, expected {expected_kinds:?}"));
            }
            Ok(())
        });
        if let Err(message) = result {
            failures.push(format!("{}: {message}", case_name(&file, i, case)));
        }
    }
    assert_no_failures(failures, n_cases);
}
