//! The judge agrees with Airflow's DagBag on every file of the labelled corpus
//! (tests/data/judge-corpus: files we wrote, labels made by loading each with real Airflow
//! 2.10.5 — see label.py there).

#![allow(clippy::unwrap_used)]

use dagfleet_analysis::Options;
use std::path::PathBuf;

#[test]
fn the_judge_agrees_with_dagbag_on_the_labelled_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/judge-corpus");
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).unwrap()).unwrap();
    let files = labels["files"].as_object().unwrap();
    assert!(files.len() >= 60, "the corpus has {} files", files.len());
    let opts = Options::default();
    let mut disagreements = Vec::new();
    for (name, label) in files {
        let verdict = dagfleet_judge::judge_file(&dir.join(name), &opts);
        let want = label["valid"].as_bool().unwrap();
        if verdict.valid != want {
            disagreements.push(format!(
                "{name}: DagBag says {} ({}), the judge says {} {:?}",
                if want { "valid" } else { "invalid" },
                label["import_error"].as_str().unwrap_or("no import error"),
                if verdict.valid { "valid" } else { "invalid" },
                verdict.findings
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
