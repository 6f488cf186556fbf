//! Every class of error CPython's compiler raises (tests/data/syntax-corpus: indentation,
//! tabs and spaces, Python 2 statements, assignment targets, misplaced statements, bad
//! f-strings, literals, characters and encodings, with files that compile beside them) is a
//! syntax finding, and nothing CPython accepts is. The labels were made by `compile()`
//! (label.py there); where python3 is installed, the test makes them again and checks they
//! still hold.

#![allow(clippy::unwrap_used)]

use dagfleet_analysis::{analyze, decode_source, Category, Options};
use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/syntax-corpus")
}

fn labels(path: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["files"].as_object().unwrap().clone()
}

#[test]
fn the_judge_rejects_exactly_what_cpython_rejects() {
    let dir = corpus();
    let files = labels(&dir.join("labels.json"));
    assert!(files.len() >= 120, "{} files", files.len());
    assert!(
        files
            .values()
            .filter(|l| !l["compiles"].as_bool().unwrap())
            .count()
            >= 90,
        "too few error classes"
    );
    let mut wrong = Vec::new();
    for (name, label) in &files {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let findings = match decode_source(&bytes) {
            Ok(src) => analyze(&src, &Options::default()).findings,
            Err(f) => vec![f],
        };
        let syntax: Vec<_> = findings
            .iter()
            .filter(|f| matches!(f.category, Category::SyntaxError | Category::Truncated))
            .collect();
        let compiles = label["compiles"].as_bool().unwrap();
        if compiles != syntax.is_empty() {
            wrong.push(format!(
                "{name}: CPython says {}, the judge found {:?}",
                label["error"].as_str().unwrap_or("it compiles"),
                syntax.iter().map(|f| &f.message).collect::<Vec<_>>()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        files.len(),
        wrong.join("\n")
    );
}

#[test]
fn the_labels_are_what_cpython_says_today() {
    let py = std::env::var("DAGFLEET_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = corpus();
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new(&py)
        .arg(dir.join("label.py"))
        .arg(&dir)
        .arg(out.path())
        .status();
    match status {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("SKIPPED: no {py} to re-check the labels with");
            return;
        }
    }
    let now = labels(out.path());
    for (name, label) in labels(&dir.join("labels.json")) {
        assert_eq!(
            now[&name]["compiles"], label["compiles"],
            "{name}: this Python disagrees with the committed label"
        );
    }
}
