//! The `dagfleet` command as a user runs it: `up --run`, `run`, `status`, and bad input.

#![allow(clippy::unwrap_used)]

use dagfleet_tests::*;
use std::path::PathBuf;
use std::process::Command;

fn dagfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dagfleet"))
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

#[test]
fn up_starts_its_own_nats_server_and_runs_a_spec_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port, so `up` starts nats-server with its store in the data dir.
    let port = free_port();
    let out = dagfleet()
        .current_dir(dir.path())
        .args([
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
            "up",
            "--run",
        ])
        .arg(example("noop.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("done"), "{stdout}");
    assert!(dir.path().join(".dagfleet/nats/jetstream").exists());
    let runs: Vec<_> = std::fs::read_dir(dir.path().join(".dagfleet/artifacts/runs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(runs.len(), 1);
    let manifest = std::fs::read(runs[0].path().join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["status"], "done");
    assert_eq!(m["jobs"].as_array().unwrap().len(), 200);
}

#[test]
fn run_status_and_bad_specs() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_str().unwrap();
    let common = ["--nats-url", &nats.url(), "--store-url", store];
    let mut worker = Proc::spawn_bin(
        env!("CARGO_BIN_EXE_dagfleet"),
        &[&common[..], &["worker", "--role", "noop"]].concat(),
        &[],
        None,
    );
    let mut coord = Proc::spawn_bin(
        env!("CARGO_BIN_EXE_dagfleet"),
        &[&common[..], &["coordinator"]].concat(),
        &[],
        None,
    );

    let out = dagfleet()
        .args(common)
        .arg("run")
        .arg(example("noop.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = stdout
        .lines()
        .find_map(|l| l.strip_prefix("submitted run "))
        .unwrap()
        .to_string();
    assert!(stdout.contains(&format!("run {run} done")), "{stdout}");

    let out = dagfleet().args(common).arg("status").output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains(&run) && listing.contains("done"),
        "{listing}"
    );
    let out = dagfleet()
        .args(common)
        .args(["status", &run, "--once"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("200/200 jobs"));

    // Bad input: clear errors that name the key, exit status 2, nothing submitted.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nstages = [\"noop\"]\n[noop]\njobs = 5\nfatal_jobs = [9]\n",
    )
    .unwrap();
    let out = dagfleet()
        .args(common)
        .arg("run")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("noop.fatal_jobs") && err.contains("out of range"),
        "{err}"
    );
    let out = dagfleet()
        .args(common)
        .arg("run")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    // Every role is built into the default binary; an unknown one is refused by name.
    let out = dagfleet()
        .args(common)
        .args(["worker", "--role", "teacher"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("teacher") && err.contains("trainer"), "{err}");

    // A failing run exits 1 with the reason.
    let failing = dir.path().join("failing.toml");
    std::fs::write(
        &failing,
        "name = \"f\"\nstages = [\"noop\"]\n[noop]\njobs = 3\nfatal_jobs = [1]\n",
    )
    .unwrap();
    let out = dagfleet()
        .args(common)
        .arg("run")
        .arg(&failing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("limits.max_failed_jobs"));
    worker.term();
    coord.term();
    assert!(worker
        .wait_for(std::time::Duration::from_secs(20))
        .unwrap()
        .success());
    assert!(coord
        .wait_for(std::time::Duration::from_secs(20))
        .unwrap()
        .success());
}

#[test]
fn judge_gives_a_verdict_per_file_and_fails_on_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nDAG_ID = \"x\"\nwith DAG(dag_id=DAG_ID) as dag:\n    EmptyOperator(task_id=\"a\")\n";
    std::fs::write(dir.path().join("good.py"), good).unwrap();
    let out = dagfleet().arg("judge").arg(dir.path()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/cycle.py"), "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG(\"c\") as dag:\n    a = EmptyOperator(task_id=\"a\")\n    b = EmptyOperator(task_id=\"b\")\n    a >> b >> a\n").unwrap();
    std::fs::write(dir.path().join("sub/binary.py"), [0u8, 159, 146, 150]).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not python").unwrap();
    let out = dagfleet()
        .args(["judge", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "only .py files: {rows:?}");
    let by_name = |n: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(n))
            .unwrap()
    };
    assert_eq!(by_name("good.py")["valid"], true);
    assert_eq!(by_name("cycle.py")["valid"], false);
    assert_eq!(
        by_name("cycle.py")["findings"][0]["category"],
        "CIRCULAR_DEPENDENCY"
    );
    assert!(by_name("cycle.py")["findings"][0]["line"]
        .as_u64()
        .is_some());
    assert_eq!(by_name("binary.py")["valid"], false);
    let out = dagfleet()
        .args(["judge", "--airflow-version", "three"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--airflow-version"));
    // A version of Airflow that does not exist is refused like a word.
    let out = dagfleet()
        .args(["judge", "--airflow-version", "9.99"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--airflow-version `9.99`"));

    // Paths that cannot be judged are error rows; every other verdict is still printed.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dagfleet()
        .args(["judge", "--json"])
        .arg(dir.path().join("good.py"))
        .arg(dir.path().join("missing.py"))
        .arg(&empty)
        .arg("/dev/zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0]["valid"], true);
    assert!(
        rows[1]["error"].as_str().unwrap().contains("No such file"),
        "{rows:?}"
    );
    assert!(
        rows[2]["error"].as_str().unwrap().contains("no .py files"),
        "{rows:?}"
    );
    assert!(
        rows[3]["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{rows:?}"
    );
}

#[test]
fn a_mine_and_judge_run_goes_through_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("repo/airflow/example_dags");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("example_ok.py"), "# Licensed to the Apache Software Foundation\nfrom airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG(\"ok\") as dag:\n    EmptyOperator(task_id=\"a\") >> EmptyOperator(task_id=\"b\")\n").unwrap();
    std::fs::write(src.join("example_cycle.py"), "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG(\"cyc\") as dag:\n    a = EmptyOperator(task_id=\"a\")\n    b = EmptyOperator(task_id=\"b\")\n    a >> b >> a\n").unwrap();
    std::fs::write(src.join("helper.py"), "X = 1\n").unwrap();
    std::fs::create_dir_all(dir.path().join("repo/tests/example_dags")).unwrap();
    std::fs::write(
        dir.path().join("repo/tests/example_dags/example_t.py"),
        "from airflow import DAG\nwith DAG(\"t\") as dag:\n    pass\n",
    )
    .unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"mj\"\nstages = [\"mine\", \"judge\"]\n[[sources]]\nkind = \"dir\"\npath = \"{}\"\n[[sources]]\nkind = \"dir\"\npath = \"{}\"\n",
            dir.path().join("repo").display(),
            dir.path().join("nowhere").display()
        ),
    )
    .unwrap();
    let out = dagfleet()
        .current_dir(dir.path())
        .args([
            "--nats-url",
            &format!("nats://127.0.0.1:{}", free_port()),
            "up",
            "--run",
        ])
        .arg(&spec)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = dir.path().join(".dagfleet/artifacts/runs");
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let jobs = m["jobs"].as_array().unwrap();
    let mine: Vec<_> = jobs.iter().filter(|j| j["stage"] == "mine").collect();
    let judge: Vec<_> = jobs.iter().filter(|j| j["stage"] == "judge").collect();
    assert_eq!(mine.len(), 2, "one shard per source");
    assert_eq!(
        judge.len(),
        1,
        "one judge batch over the one shard with rows"
    );
    // The missing directory is recorded, not fatal.
    let missing = mine
        .iter()
        .find(|j| j["metrics"]["missing"] == 1.0)
        .unwrap();
    let sum_key = missing["outputs"][1]["key"].as_str().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(".dagfleet/artifacts").join(sum_key)).unwrap(),
    )
    .unwrap();
    assert!(summary["missing"]
        .as_str()
        .unwrap()
        .contains("not a directory"));
    // Two DAG files mined (the helper and the test file are dropped), one judged invalid.
    let eval_key = judge[0]["outputs"][0]["key"].as_str().unwrap();
    let eval =
        std::fs::read_to_string(dir.path().join(".dagfleet/artifacts").join(eval_key)).unwrap();
    let rows: Vec<serde_json::Value> = eval
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(
        !rows
            .iter()
            .any(|r| r["output"].as_str().unwrap().contains("Licensed")),
        "licence header stripped"
    );
    let invalid: Vec<_> = rows
        .iter()
        .filter(|r| r["verdict"]["valid"] == false)
        .collect();
    assert_eq!(invalid.len(), 1);
    assert_eq!(
        invalid[0]["verdict"]["findings"][0]["category"],
        "CIRCULAR_DEPENDENCY"
    );
}

#[test]
fn mine_runs_a_spec_locally_and_writes_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("repo/example_dags");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("example_one.py"),
        "from airflow import DAG\nwith DAG(\"one\") as dag:\n    pass\n",
    )
    .unwrap();
    std::fs::write(src.join("util.py"), "X = 1\n").unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"m\"\nstages = [\"mine\"]\n[[sources]]\nkind = \"dir\"\npath = \"{}\"\n",
            dir.path().join("repo").display()
        ),
    )
    .unwrap();
    let out = dagfleet().arg("mine").arg(&spec).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["path"], "example_dags/example_one.py");
    assert_eq!(rows[0]["dag_ids"][0], "one");
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"defines no DAG\":1"));
}

#[test]
fn every_example_spec_is_valid() {
    let dir = example("");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        dagfleet_protocol::RunSpec::from_toml(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    assert!(n >= 5, "examples found: {n}");
}

#[test]
fn small_inputs_are_refused_or_handled() {
    // A mistyped store URL is not a local directory.
    let out = dagfleet()
        .args([
            "--store-url",
            "s3:/bucket/prefix",
            "worker",
            "--role",
            "noop",
        ])
        .env("DAGFLEET_NATS__URL", "nats://127.0.0.1:1")
        .env("DAGFLEET_NATS__CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("malformed scheme"), "{err}");
    // Zero concurrency is refused before anything connects.
    let out = dagfleet()
        .args(["worker", "--role", "noop", "--concurrency", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency"));
    // Credentials in nats.url are refused without being repeated.
    let out = dagfleet()
        .arg("config")
        .env("DAGFLEET_NATS__URL", "nats://alice:hunter2@127.0.0.1:4222")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains("hunter2") && all.contains("carries credentials"),
        "{all}"
    );
    // A closed pipe ends the output quietly.
    let mut child = dagfleet()
        .arg("config")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
