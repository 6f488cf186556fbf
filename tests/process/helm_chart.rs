//! The Helm chart renders (Helm's Go SDK, offline) and every manifest validates against the
//! Kubernetes schemas; the rendered dagfleet config is accepted by the binary.
//! Needs the Python packages in tests/helm/requirements.txt (`tests/run.sh` installs them);
//! `DAGFLEET_PYTHON` names the interpreter that has them.

#![allow(clippy::unwrap_used)]

/// Points the helpers at the binary cargo built for this test target.
fn init() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

use std::path::PathBuf;
use std::process::Command;

#[test]
fn helm_chart_renders_and_validates_against_kubernetes_schemas() {
    init();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("DAGFLEET_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(root.join("tests/helm/check_chart.py"))
        .arg(root.join("helm/dagfleet"))
        .arg(dagfleet_tests::dagfleet_bin())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("chart ok"), "{stdout}");
}
