//! The crate's layers (ARCHITECTURE.md, "Layers"): every top-level module imports only
//! modules below it, so there is no import cycle between modules and no arrow that runs up.
//! Read from the source itself (`crate::<module>` paths outside test code), so that a new
//! import that breaks the order fails here with the file and the line.

use std::path::{Path, PathBuf};

/// The top-level modules from the bottom up: each may use only those before it.
const LAYERS: &[&str] = &[
    "time",
    "model",
    "value",
    "failpoint",
    "telemetry",
    "policy",
    "twin",
    "decode",
    "compliance",
    "generate",
    "iothub",
    "emulator",
    "config",
    "cli",
    "store",
    "source",
    "alert",
    "pipeline",
    "http",
    "app",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for the crate's roots).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative
        .components()
        .next()?
        .as_os_str()
        .to_str()?
        .to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// The file's text without its test code: a file of tests (`tests.rs`, `*_tests.rs`) is all
/// test code; elsewhere, inline test modules sit at the end, from the first `#[cfg(test)]`
/// before a `mod … {`.
fn without_tests(path: &Path, text: &str) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == "tests.rs" || name.ends_with("_tests.rs") {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim() == "#[cfg(test)]"
                && lines.get(i + 1).is_some_and(|next| {
                    let next = next.trim();
                    next.starts_with("mod ") && next.ends_with('{')
                })
        })
        .unwrap_or(lines.len());
    lines[..end].join("\n")
}

/// Each `crate::<module>` a text names, with its line number (from 1). Comments count too:
/// a doc link to a module above is an arrow of its own.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `$crate::` in a macro and `twinwatch_crate::`-like names are not this crate's paths.
            let before = rest[..at].chars().last();
            if !name.is_empty() && !matches!(before, Some('$') | Some('_')) {
                found.push((n + 1, name));
            }
            rest = after;
        }
    }
    found
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let layer = |name: &str| LAYERS.iter().position(|l| *l == name);
    let mut problems = Vec::new();
    let mut modules_seen = std::collections::BTreeSet::new();
    for path in &files {
        let relative = path.strip_prefix(&src).expect("below src");
        let Some(module) = module_of(relative) else {
            continue;
        };
        modules_seen.insert(module.clone());
        let Some(own) = layer(&module) else {
            problems.push(format!(
                "src/{}: module `{module}` is in no layer: add it to LAYERS (tests/it/layers.rs) and to ARCHITECTURE.md",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(path).expect("a source file");
        for (line, used) in crate_paths(&without_tests(path, &text)) {
            if used == module {
                continue;
            }
            match layer(&used) {
                Some(theirs) if theirs < own => {}
                Some(_) => problems.push(format!(
                    "src/{}:{line}: `{module}` uses `crate::{used}`, which is not below it",
                    relative.display()
                )),
                None => problems.push(format!(
                    "src/{}:{line}: `crate::{used}` is in no layer",
                    relative.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every layer is a module that exists: the list cannot keep a name that checks nothing.
    for name in LAYERS {
        assert!(
            modules_seen.contains(*name),
            "LAYERS names `{name}`, which is not a module of src/"
        );
    }
}

/// The check itself: a use of a module above is found, with its line, and test code is not
/// read.
#[test]
fn the_layer_check_finds_an_arrow_up_and_skips_tests() {
    let text = "use crate::store::Store;\n/// See [`crate::app::run`].\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::app::x;\n}\n";
    let kept = without_tests(Path::new("src/pipeline/mod.rs"), text);
    assert_eq!(
        crate_paths(&kept),
        vec![(1, "store".to_owned()), (2, "app".to_owned())]
    );
    assert!(without_tests(Path::new("src/pipeline/tests.rs"), text).is_empty());
    assert_eq!(
        crate_paths("m!($crate::x); crate::time::Ticks"),
        vec![(1, "time".to_owned())]
    );
}
