//! DagBag, Airflow's own loader, as the judge's ground-truth backend: `dagfleet judge
//! --dagbag` on files with known labels, a mine → judge run whose judge batch goes to the
//! Airflow 2.10 lane, and a run asking for an Airflow no judge has.
//!
//! Needs the Airflow 2.10 environment `bash tests/airflow-env.sh` installs (tests/run.sh
//! does), under `$DAGFLEET_AIRFLOW_ENVS` or `~/.cache/dagfleet-airflow`.

#![allow(clippy::unwrap_used)]

use dagfleet_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dagfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dagfleet"))
}

fn envs_root() -> PathBuf {
    let root = std::env::var("DAGFLEET_AIRFLOW_ENVS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/dagfleet-airflow")
        });
    assert!(
        root.join("2.10/bin/python").exists(),
        "no Airflow 2.10 environment in {}: run `bash tests/airflow-env.sh` (tests/run.sh does) or set DAGFLEET_AIRFLOW_ENVS",
        root.display()
    );
    root
}

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/judge-corpus")
}

/// Corpus files whose DagBag label does not depend on which providers are installed.
const LABELLED: &[&str] = &[
    "bad_cycle.py",
    "bad_duplicate_task_id.py",
    "bad_hallucinated_module.py",
    "bad_module_airflow_sdk_on_2.py",
    "bad_module_hallucinated_provider_path.py",
    "bad_no_dag.py",
    "bad_syntax_missing_colon.py",
    "bad_undefined_name.py",
    "valid_python_operator.py",
    "valid_sensor.py",
    "valid_taskflow.py",
];

/// Files that test the sandbox: each must get the verdict named, not disturb the judge.
const SANDBOX: &[(&str, &str, Option<&str>)] = &[
    (
        "hangs.py",
        "from airflow import DAG\nwhile True:\n    pass\n",
        Some("Timeout"),
    ),
    (
        "calls_network.py",
        "import socket\nfrom airflow import DAG\nsocket.create_connection((\"127.0.0.1\", 9))\nwith DAG(\"net\"):\n    pass\n",
        Some("OSError"),
    ),
    (
        "prints.py",
        "print('{\"id\": 1, \"ready\": true}')\nfrom airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG(\"loud\"):\n    EmptyOperator(task_id=\"a\")\n",
        None,
    ),
    (
        // The worker's environment (credentials included) never reaches the code judged.
        "reads_secret.py",
        "import os\nfrom airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nif os.environ.get(\"DAGFLEET_TEST_SECRET\"):\n    raise RuntimeError(\"the judged file saw a secret\")\nwith DAG(\"quiet\"):\n    EmptyOperator(task_id=\"a\")\n",
        None,
    ),
];

fn labels() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(corpus().join("labels.json")).unwrap()).unwrap()
}

fn config(dir: &Path, root: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("dagfleet.toml");
    std::fs::write(
        &cfg,
        format!(
            "[judge]\nairflow_envs = \"{}\"\ndagbag_procs = 2\ndagbag_timeout = \"6s\"\n{extra}",
            root.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn dagbag_agrees_with_the_labels_and_contains_what_it_loads() {
    let root = envs_root();
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    for f in LABELLED {
        std::fs::copy(corpus().join(f), files.join(f)).unwrap();
    }
    for (name, code, _) in SANDBOX {
        std::fs::write(files.join(name), code).unwrap();
    }
    let cfg = config(dir.path(), &root, "");
    let out = dagfleet()
        .env("DAGFLEET_TEST_SECRET", "hunter2")
        .arg("--config")
        .arg(&cfg)
        .args(["judge", "--dagbag", "--json"])
        .arg(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "some files are invalid\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), LABELLED.len() + SANDBOX.len());
    let labels = labels();
    let by_name = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("no row for {name}"))
    };
    for f in LABELLED {
        let d = &by_name(f)["dagbag"];
        let want = labels["files"][f]["valid"].as_bool().unwrap();
        assert_eq!(d["clean"], want, "{f}: {d}");
        assert!(d["airflow"].as_str().unwrap().starts_with("2.10."), "{d}");
        if let Some(err) = labels["files"][f]["import_error"].as_str() {
            let class = err.split(':').next().unwrap().rsplit('.').next().unwrap();
            assert_eq!(d["error_class"], class, "{f}: {d}");
        }
    }
    assert_eq!(by_name("bad_no_dag.py")["dagbag"]["error_class"], "NoDag");
    assert_eq!(
        by_name("bad_hallucinated_module.py")["dagbag"]["cause"],
        "no_such_module"
    );
    assert_eq!(by_name("valid_taskflow.py")["dagbag"]["tasks"], 3);
    for (name, _, class) in SANDBOX {
        let d = &by_name(name)["dagbag"];
        match class {
            Some(c) => assert_eq!(d["error_class"], *c, "{name}: {d}"),
            None => assert_eq!(d["clean"], true, "{name}: {d}"),
        }
    }
    assert!(by_name("calls_network.py")["dagbag"]["error"]
        .as_str()
        .unwrap()
        .contains("network access is disabled"));
    assert!(!stdout.contains("hunter2"));
}

#[test]
fn a_judge_batch_with_dagbag_goes_to_a_judge_that_has_the_airflow_version() {
    let root = envs_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("repo/example_dags");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["valid_taskflow.py", "bad_undefined_name.py", "bad_cycle.py"] {
        std::fs::copy(corpus().join(f), src.join(format!("example_{f}"))).unwrap();
    }
    let cfg = config(dir.path(), &root, "[coordinator]\nlane_wait = \"2s\"\n");
    let spec = |name: &str, version: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\nstages = [\"mine\", \"judge\", \"report\"]\n[[sources]]\nkind = \"dir\"\npath = \"{}\"\n[judge]\ndagbag = true\nairflow_version = \"{version}\"\n",
                dir.path().join("repo").display()
            ),
        )
        .unwrap();
        p
    };
    let url = format!("nats://127.0.0.1:{}", free_port());
    let out = dagfleet()
        .current_dir(dir.path())
        .arg("--config")
        .arg(&cfg)
        .args(["--nats-url", &url, "up", "--run"])
        .arg(spec("db", "2.10"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let arts = dir.path().join(".dagfleet/artifacts");
    let run = std::fs::read_dir(arts.join("runs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let judge = m["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["stage"] == "judge")
        .unwrap()
        .clone();
    assert_eq!(judge["metrics"]["rows"], 3.0, "{judge}");
    assert_eq!(judge["metrics"]["dagbag_clean"], 1.0, "{judge}");
    let eval_key = judge["outputs"][0]["key"].as_str().unwrap();
    let eval = std::fs::read_to_string(arts.join(eval_key)).unwrap();
    let rows: Vec<serde_json::Value> = eval
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let classes: Vec<&str> = rows
        .iter()
        .map(|r| r["dagbag"]["error_class"].as_str().unwrap_or("clean"))
        .collect();
    let mut sorted = classes.clone();
    sorted.sort();
    assert_eq!(sorted, ["AirflowDagCycleException", "NameError", "clean"]);
    // The static judge and DagBag agree on all three; the summary says so.
    let summary_key = judge["outputs"][2]["key"].as_str().unwrap();
    let md = std::fs::read_to_string(arts.join(summary_key)).unwrap();
    assert!(md.contains("Static judge vs DagBag"), "{md}");
    assert!(md.contains("| 100.0% | 1 | 0 | 0 | 2 |"), "{md}");

    // Nobody can load Airflow 2.9 here: the run fails and says what it needs.
    let out = dagfleet()
        .current_dir(dir.path())
        .arg("--config")
        .arg(&cfg)
        .args(["--nats-url", &url, "up", "--run"])
        .arg(spec("db29", "2.9"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Airflow 2.9"), "{text}");
    assert!(
        text.contains("airflow-2_10"),
        "the live lanes are named: {text}"
    );
}
