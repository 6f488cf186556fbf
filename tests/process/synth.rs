//! The synthesize and dataset stages as a user runs them: `dagfleet up --run` with a mine,
//! synthesize and dataset spec against an OpenAI-compatible server and against the
//! Anthropic endpoints (both loopback servers speaking the real protocols), the response
//! cache on a re-run, and the fault test: the synth worker killed while its provider batch
//! runs, and no second batch created.

#![allow(clippy::unwrap_used)]

use dagfleet_tests::teacher::Teacher;
use dagfleet_tests::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn init() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/judge-corpus")
}

fn spec(name: &str, provider: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
stages = ["mine", "synthesize", "dataset"]

[[sources]]
kind = "dir"
path = "{}"

[mine]
globs = ["**/valid_*.py"]

[models.teacher]
provider = "{provider}"
model = "tm"

[synthesize]
poll_interval = "200ms"
{extra}
"#,
        corpus().display()
    )
}

fn config(dir: &Path, teacher: &Teacher) -> PathBuf {
    let p = dir.join("dagfleet.toml");
    std::fs::write(
        &p,
        format!(
            r#"[providers.local]
kind = "openai"
base_url = "{url}/v1"
[providers.local.prices.tm]
input_per_mtok = 1.0
output_per_mtok = 2.0

[providers.anthropic]
kind = "anthropic"
base_url = "{url}"
backoff = "10ms"
"#,
            url = teacher.url
        ),
    )
    .unwrap();
    p
}

/// Runs `dagfleet up --run SPEC` in `dir` on its own nats-server; returns stdout.
async fn up_run(dir: &Path, cfg: &Path, spec_text: &str, key: Option<&str>) -> String {
    let spec = dir.join("spec.toml");
    std::fs::write(&spec, spec_text).unwrap();
    let mut cmd = std::process::Command::new(dagfleet_bin());
    cmd.current_dir(dir)
        .arg("--config")
        .arg(cfg)
        .args([
            "--nats-url",
            &format!("nats://127.0.0.1:{}", free_port()),
            "up",
            "--run",
        ])
        .arg(&spec)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY");
    if let Some(k) = key {
        cmd.env("ANTHROPIC_API_KEY", k);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    if let Some(k) = key {
        assert!(!stdout.contains(k) && !stderr.contains(k), "the key leaked");
    }
    stdout
}

fn manifest(artifacts: &Path, run_prefix: &str) -> serde_json::Value {
    let runs = artifacts.join("runs");
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(run_prefix))
        .unwrap_or_else(|| panic!("no run {run_prefix} in {}", runs.display()))
        .path();
    serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap()
}

fn jsonl(artifacts: &Path, key: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(artifacts.join(key))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn output<'a>(job: &'a serde_json::Value, name: &str) -> &'a str {
    job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .find(|k| k.ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in {job}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mine_synthesize_dataset_on_one_machine_against_both_protocols() {
    init();
    let teacher = Teacher::start().await;
    teacher.state.batch_ms.store(500, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &teacher);
    let artifacts = dir.path().join(".dagfleet/artifacts");

    // 1. OpenAI-compatible server, online requests, priced; one corpus DAG (with its
    // DAG renamed) is held out as if it were an evaluation's source.
    let held_src = std::fs::read_to_string(corpus().join("valid_taskflow.py")).unwrap();
    let held = dir.path().join("held_out.jsonl");
    std::fs::write(
        &held,
        format!(
            "{}\n",
            serde_json::json!({"content": held_src.replace("taskflow_etl", "held_etl")})
        ),
    )
    .unwrap();
    let out = up_run(
        dir.path(),
        &cfg,
        &spec(
            "openai-run",
            "local",
            &format!(
                "chunk_rows = 8\n[dataset]\nheld_out = \"{}\"\n",
                held.display()
            ),
        ),
        None,
    )
    .await;
    assert!(out.contains("cost $"), "status shows the cost: {out}");
    let m = manifest(&artifacts, "openai-run");
    let jobs = m["jobs"].as_array().unwrap();
    let synth: Vec<_> = jobs.iter().filter(|j| j["stage"] == "synthesize").collect();
    let dags: f64 = synth
        .iter()
        .map(|j| j["metrics"]["dags"].as_f64().unwrap())
        .sum();
    assert!(
        dags >= 20.0,
        "the valid corpus files were mined and synthesized: {dags}"
    );
    assert!(synth.len() >= 3, "chunked into jobs of 8 DAGs");
    let calls = teacher.chat_calls();
    assert_eq!(calls as f64, dags, "one teacher call per DAG");
    assert!(m["cost"]["usd"].as_f64().unwrap() > 0.0, "{}", m["cost"]);
    let pairs = jsonl(&artifacts, output(synth[0], "pairs.jsonl"));
    assert!(pairs
        .iter()
        .any(|p| p["kind"] == "instruction" && p["instruction_source"] == "local/tm"));
    assert!(
        pairs.iter().any(|p| p["kind"] == "troubleshoot"),
        "failure injection adds troubleshooting pairs"
    );
    let variants: std::collections::BTreeSet<u64> = pairs
        .iter()
        .filter(|p| p["kind"] == "instruction")
        .map(|p| p["variant"].as_u64().unwrap())
        .collect();
    assert_eq!(variants.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    let ds = jobs.iter().find(|j| j["stage"] == "dataset").unwrap();
    let train = jsonl(&artifacts, output(ds, "train.jsonl"));
    assert!(!train.is_empty());
    let msgs = train[0]["messages"].as_array().unwrap();
    assert_eq!(
        msgs.iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["system", "user", "assistant"]
    );
    // Decontamination: the held-out DAG's pairs are gone from every split, and listed.
    assert!(
        ds["metrics"]["held_out_removed"].as_f64().unwrap() >= 1.0,
        "{ds}"
    );
    let removed = jsonl(&artifacts, output(ds, "held_out_removed.jsonl"));
    assert!(removed.iter().all(|r| r["held_out"]
        .as_str()
        .unwrap()
        .starts_with("held_out.jsonl:")
        || r["field"] == "source"));
    assert!(removed
        .iter()
        .any(|r| r["field"] == "response" && r["similarity"].as_f64().unwrap() >= 0.5));
    let gone: std::collections::HashSet<&str> = removed
        .iter()
        .map(|r| r["source_id"].as_str().unwrap())
        .collect();
    for split in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        for row in jsonl(&artifacts, output(ds, split)) {
            let src = row["meta"]["source_id"].as_str().unwrap();
            assert!(!gone.contains(src), "{split} still has {src}");
            let answer = row["messages"][2]["content"].as_str().unwrap();
            assert!(
                !answer.contains(held_src.trim()),
                "{split} has the held-out DAG"
            );
        }
    }
    let total: f64 = ["train_rows", "valid_rows", "test_rows"]
        .iter()
        .map(|k| ds["metrics"][k].as_f64().unwrap())
        .sum();
    assert_eq!(total, ds["metrics"]["rows"].as_f64().unwrap());

    // 2. The same spec again: every reply comes from the cache; nothing is called or paid.
    up_run(
        dir.path(),
        &cfg,
        &spec("openai-rerun", "local", "chunk_rows = 8"),
        None,
    )
    .await;
    assert_eq!(teacher.chat_calls(), calls, "a re-run calls nothing");
    let m2 = manifest(&artifacts, "openai-rerun");
    assert_eq!(m2["cost"]["usd"].as_f64(), Some(0.0));
    let cached: f64 = m2["stages"][1]["metrics"]["cached"].as_f64().unwrap();
    assert_eq!(cached, dags);

    // 3. Anthropic Message Batches, with a key from the environment and no price: the
    // cost is unknown, not zero.
    *teacher.state.key.lock().unwrap() = Some("sk-ant-test-secret-42".into());
    let out = up_run(
        dir.path(),
        &cfg,
        &spec("anthropic-run", "anthropic", "variants = 2\nchunk_rows = 8"),
        Some("sk-ant-test-secret-42"),
    )
    .await;
    assert!(out.contains("cost unknown"), "{out}");
    assert_eq!(teacher.chat_calls(), calls, "batches, not online calls");
    assert!(teacher.batches_created() >= 3, "one batch per chunk");
    let m3 = manifest(&artifacts, "anthropic-run");
    assert!(m3["cost"]["usd"].is_null(), "{}", m3["cost"]);
    assert!(m3["cost"]["unknown_requests"].as_u64().unwrap() > 0);
    // The key reached no artifact, record, cache entry or NATS file.
    fn scan(p: &Path, needle: &[u8]) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                scan(&path, needle);
            } else if let Ok(b) = std::fs::read(&path) {
                assert!(
                    !b.windows(needle.len()).any(|w| w == needle),
                    "the key leaked into {}",
                    path.display()
                );
            }
        }
    }
    scan(&dir.path().join(".dagfleet"), b"sk-ant-test-secret-42");
    let all = std::fs::read_dir(artifacts.join("runs"))
        .unwrap()
        .flatten()
        .count();
    assert_eq!(all, 3);
}

fn env(nats: &str, store: &str, teacher: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DAGFLEET_NATS__URL", nats.to_string()),
        ("DAGFLEET_STORE__URL", store.to_string()),
        ("DAGFLEET_QUEUES__STAGES__SYNTHESIZE__ACK_WAIT", "2s".into()),
        (
            "DAGFLEET_QUEUES__STAGES__SYNTHESIZE__BACKOFF",
            "[\"50ms\"]".into(),
        ),
        ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "300ms".into()),
        (
            "DAGFLEET_PROVIDERS__ANTHROPIC__BASE_URL",
            teacher.to_string(),
        ),
        ("ANTHROPIC_API_KEY", "sk-ant-test-secret-42".into()),
    ]
}

fn spawn(args: &[&str], env: &[(&'static str, String)], id: &str) -> Proc {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("DAGFLEET_WORKER__ID", id));
    Proc::spawn(args, &all, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synth_worker_killed_during_its_batch_does_not_pay_twice() {
    init();
    let teacher = Teacher::start().await;
    teacher.state.batch_ms.store(5_000, Ordering::SeqCst);
    *teacher.state.key.lock().unwrap() = Some("sk-ant-test-secret-42".into());
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap(), &teacher.url);
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    let _miner = spawn(&["worker", "--role", "miner"], &env, "m");
    let mut a = spawn(&["worker", "--role", "synthesizer"], &env, "a");
    let run = stack
        .submit(&spec("killed", "anthropic", "chunk_rows = 1000"))
        .await;
    let t0 = Instant::now();
    while teacher.batches_created() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no batch was submitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the job record the batch and poll once, then kill the worker mid-batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill9();
    let _b = spawn(&["worker", "--role", "synthesizer"], &env, "b");
    let st = wait_run(&stack.bus, &run, Duration::from_secs(90)).await;
    assert_eq!(
        st.status,
        dagfleet_protocol::RunStatus::Done,
        "{:?}",
        st.error
    );
    assert_eq!(
        teacher.batches_created(),
        1,
        "the restarted job re-attached to its batch"
    );
    assert_eq!(teacher.chat_calls(), 0);
    let recs = store
        .list(&format!("runs/{run}/jobs/synthesize"))
        .await
        .unwrap();
    assert_eq!(recs.len(), 1);
    let rec: dagfleet_protocol::JobRecord =
        serde_json::from_slice(&store.get_opt(&recs[0]).await.unwrap().unwrap()).unwrap();
    assert!(
        rec.attempt >= 2,
        "the job was redelivered: attempt {}",
        rec.attempt
    );
    assert_eq!(
        rec.metrics["batches"], 0.0,
        "the attempt that finished created no batch"
    );
    assert!(rec.metrics["rows"] > 0.0);
    stack.stop().await;
}

/// The LLM judge through the coordinator: a mine -> judge -> report run over the judge corpus
/// with `judge.llm`, its judge model the loopback teacher (OpenAI protocol): every row scored
/// ungrounded and grounded, a file that does not load capped on correctness though the
/// grader said 4, tokens and cost counted, the report's LLM table, and a second run answered
/// from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_judge_scores_grounded_and_ungrounded_and_caches_its_replies() {
    init();
    let teacher = Teacher::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &teacher);
    let artifacts = dir.path().join(".dagfleet/artifacts");
    let spec = |name: &str| {
        format!(
            r#"name = "{name}"
stages = ["mine", "judge", "report"]

[[sources]]
kind = "dir"
path = "{}"

[mine]
globs = ["**/valid_*.py", "**/bad_hallucinated_module.py", "**/bad_cycle.py"]

[models.judge]
provider = "local"
model = "tm"

[judge]
llm = true
llm_cap = 2
"#,
            corpus().display()
        )
    };
    up_run(dir.path(), &cfg, &spec("llm-a"), None).await;
    let m = manifest(&artifacts, "llm-a");
    let jobs = m["jobs"].as_array().unwrap();
    let judge: Vec<_> = jobs.iter().filter(|j| j["stage"] == "judge").collect();
    let mut rows = Vec::new();
    for j in &judge {
        rows.extend(jsonl(&artifacts, output(j, "eval.jsonl")));
    }
    assert!(rows.len() >= 3, "{}", rows.len());
    let mut capped = 0;
    for r in &rows {
        let s = &r["llm_scores"];
        for c in [
            "correctness",
            "completeness",
            "best_practices",
            "instruction",
        ] {
            assert!(
                s[c].as_f64().is_some() && s[format!("ungrounded_{c}")].as_f64().is_some(),
                "{r}"
            );
        }
        assert!(s["length_chars"].as_f64().unwrap() > 0.0);
        if r["verdict"]["valid"] == false {
            // The grader said 4 (it was told the file fails, or 5 ungrounded); the cap rules.
            assert_eq!(s["correctness"], 2.0, "{r}");
            assert_eq!(s["ungrounded_correctness"], 5.0, "{r}");
            capped += 1;
        } else {
            assert_eq!(s["correctness"], 5.0, "{r}");
        }
    }
    assert!(capped >= 2, "the two broken files were capped");
    let metric = |j: &serde_json::Value, k: &str| j["metrics"][k].as_f64().unwrap_or(0.0);
    let asked: f64 = judge.iter().map(|j| metric(j, "llm_requests")).sum();
    assert_eq!(
        asked,
        2.0 * rows.len() as f64,
        "one ungrounded and one grounded request a row"
    );
    assert!(
        judge
            .iter()
            .map(|j| metric(j, "llm_input_tokens"))
            .sum::<f64>()
            > 0.0
    );
    assert!(
        judge.iter().map(|j| metric(j, "llm_cost_usd")).sum::<f64>() > 0.0,
        "priced model"
    );
    let report = jobs.iter().find(|j| j["stage"] == "report").unwrap();
    let md = std::fs::read_to_string(artifacts.join(output(report, "report.md"))).unwrap();
    assert!(
        md.contains("**LLM judge**") && md.contains("ungrounded"),
        "{md}"
    );
    // The same rows again: every reply comes from the cache.
    let calls = teacher.chat_calls();
    up_run(dir.path(), &cfg, &spec("llm-b"), None).await;
    let m = manifest(&artifacts, "llm-b");
    let cached: f64 = m["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["stage"] == "judge")
        .map(|j| metric(j, "llm_cached"))
        .sum();
    assert_eq!(cached, 2.0 * rows.len() as f64);
    assert_eq!(teacher.chat_calls(), calls, "nothing was asked twice");
}

/// The LLM judge with a real model behind it: `dagfleet serve` with SmolLM2 on CPU as the
/// judge model. A model that small often writes no readable rubric; every request is still
/// answered, counted, and either scored or counted unreadable, and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_judge_runs_against_dagfleet_serve() {
    init();
    let (serve, url) = tokio::task::spawn_blocking(serve_smollm2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dagfleet.toml");
    std::fs::write(
        &cfg,
        format!(
            "[providers.serve]\nkind = \"openai\"\nbase_url = \"{url}/v1\"\ntimeout = \"300s\"\n"
        ),
    )
    .unwrap();
    let spec = format!(
        r#"name = "llm-serve"
stages = ["mine", "judge"]

[[sources]]
kind = "dir"
path = "{}"

[mine]
globs = ["**/valid_chain.py", "**/bad_hallucinated_module.py"]

[models.judge]
provider = "serve"
model = "SmolLM2-135M-Instruct.Q4_1.gguf"

[judge]
llm = true
llm_max_tokens = 96
"#,
        corpus().display()
    );
    up_run(dir.path(), &cfg, &spec, None).await;
    let artifacts = dir.path().join(".dagfleet/artifacts");
    let m = manifest(&artifacts, "llm-serve");
    let judge: Vec<_> = m["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["stage"] == "judge")
        .cloned()
        .collect();
    let metric = |k: &str| -> f64 {
        judge
            .iter()
            .map(|j| j["metrics"][k].as_f64().unwrap_or(0.0))
            .sum()
    };
    let rows = metric("rows");
    assert_eq!(rows, 2.0, "{judge:?}");
    assert_eq!(metric("llm_requests"), 2.0 * rows, "{judge:?}");
    assert!(metric("llm_output_tokens") > 0.0);
    let mut scored = 0.0;
    for j in &judge {
        for r in jsonl(&artifacts, output(j, "eval.jsonl")) {
            if let Some(s) = r["llm_scores"].as_object() {
                scored += 1.0;
                if r["verdict"]["valid"] == false {
                    if let Some(c) = s.get("correctness").and_then(|c| c.as_f64()) {
                        assert!(c <= 2.0, "the cap holds for a real model's scores too: {r}");
                    }
                }
            }
        }
    }
    // Each row has scores unless both its replies were unreadable.
    assert!(
        scored + metric("llm_unreadable") / 2.0 >= rows,
        "scored {scored}, {judge:?}"
    );
    serve.term();
}
