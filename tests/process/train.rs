//! Train jobs end to end: through the coordinator with `dagfleet up --run`, a trainer worker
//! killed with SIGKILL mid-training whose job resumes on another worker from the last
//! checkpoint with the losses of an uninterrupted run, and `dagfleet train` on one machine.
//!
//! The base is a small Llama-shaped model with random weights and SmolLM2's tokenizer and
//! chat template, written as a Hugging Face directory: real files through the real loader,
//! small enough to train in seconds on two cores. Learning itself is tested on SmolLM2's
//! real weights in `workers/trainer/tests/smollm2.rs`.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device};
use dagfleet_inference::model::{Arch, ModelConfig};
use dagfleet_inference::TextCodec;
use dagfleet_protocol::{RunId, RunStatus};
use dagfleet_runtime::ArtifactStore;
use dagfleet_tests::*;
use dagfleet_trainer::export;
use dagfleet_trainer::lora::{Lora, LoraConfig, Module};
use dagfleet_trainer::model::TrainModel;
use dagfleet_trainer::weights::BaseWeights;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn init() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

/// Writes a small random Llama-shaped model with SmolLM2's tokenizer under `dir`.
fn tiny_model(dir: &Path, hidden: usize, layers: usize) -> PathBuf {
    let codec = TextCodec::from_gguf(&smollm2()).unwrap();
    let cfg = ModelConfig {
        arch: Arch::Llama,
        hidden,
        layers,
        heads: 4,
        kv_heads: 2,
        head_dim: hidden / 4,
        vocab: 49_152,
        eps: 1e-5,
        rope_theta: 10_000.0,
        context: 2048,
        rope_neox: true,
        intermediate: hidden * 2,
    };
    let base = BaseWeights::random(cfg.clone(), true, 5, &Device::Cpu, DType::F32).unwrap();
    let model = TrainModel::new(base, 2048).unwrap();
    let lora = Lora::init(
        &cfg,
        LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            targets: vec![Module::Q],
        },
        0,
        &Device::Cpu,
    )
    .unwrap();
    let merged = export::merged_tensors(&model, &lora).unwrap();
    let out = dir.join("tiny-llama");
    std::fs::create_dir_all(&out).unwrap();
    for (name, data) in export::merged_dir(&merged, &model, &codec, DType::F32).unwrap() {
        std::fs::write(out.join(name), data).unwrap();
    }
    out
}

fn dataset(dir: &Path, rows: usize) -> PathBuf {
    let p = dir.join("train.jsonl");
    let mut text = String::new();
    for i in 0..rows {
        text.push_str(
            &serde_json::json!({"messages": [
                {"role": "system", "content": "You write Airflow DAGs."},
                {"role": "user", "content": format!("Write DAG number {i} with {} tasks.", i % 4 + 1)},
                {"role": "assistant", "content": format!(
                    "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\n\nwith DAG(\"dag_{i}\", schedule=None) as dag:\n{}",
                    (0..i % 4 + 1).map(|t| format!("    t{t} = EmptyOperator(task_id=\"t{t}\")\n")).collect::<String>())}
            ]})
            .to_string(),
        );
        text.push('\n');
    }
    // One row that is not ChatML: skipped and counted, not fatal.
    text.push_str("{\"prompt\": \"not a chat row\"}\n");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_train_run_goes_through_the_coordinator() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64, 2);
    let data = dataset(dir.path(), 12);
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"tiny-train\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[train]\ndataset = \"{}\"\nr = 4\nalpha = 8\nlr = 1e-3\nmicro_batch = 2\ngrad_accum = 2\nmax_seq_len = 256\nepochs = 2\ncheckpoint_every = 2\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let (stdout, progress, run) = up_run(dir.path(), &spec);
    assert!(stdout.contains("train"), "{stdout}");
    // Progress follows the optimizer steps from the train_step events: the first and the
    // last step always get a line.
    let steps: Vec<&str> = progress
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("train"))
        .map(str::trim_start)
        .filter_map(|l| l.strip_prefix("step "))
        .collect();
    assert!(
        steps.first().is_some_and(|l| l.starts_with("1/")),
        "{progress}"
    );
    let last = steps
        .last()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    assert!(
        last.split_once('/').is_some_and(|(a, b)| a == b)
            && steps.iter().all(|l| l.contains(" loss ")),
        "{progress}"
    );
    let train = std::fs::read_dir(run.join("train"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
        "merged/tokenizer_config.json",
        "gguf/tiny-llama-lora-q8_0.gguf",
        "gguf/tiny-llama-lora-q4_k_m.gguf",
        "gguf/Modelfile",
        "metrics.csv",
        "loss.png",
        "report.md",
        "train.json",
    ] {
        assert!(train.join(f).exists(), "{f} missing in {}", train.display());
    }
    let png = std::fs::read(train.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["train_rows"]["kept"], 12);
    assert_eq!(summary["steps"], summary["total_steps"]);
    let skipped = summary["train_rows"]["skipped"].as_object().unwrap();
    assert!(
        skipped.keys().any(|k| k.contains("no `messages` list")),
        "{skipped:?}"
    );
    let csv = std::fs::read_to_string(train.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count() as u64 - 1,
        summary["steps"].as_u64().unwrap()
    );
    // The adapter is PEFT's layout.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    // Checkpoints are state, not outputs: only the last ones are kept, and none is listed
    // in the manifest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let job = &manifest["jobs"][0];
    let outputs: Vec<&str> = job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert!(outputs.iter().all(|k| !k.contains("checkpoints/")));
    assert!(outputs.iter().any(|k| k.ends_with("report.md")));
    // The manifest names the dataset and the base model with their hashes.
    let inputs = job["inputs"].as_array().unwrap();
    assert!(inputs
        .iter()
        .any(|i| i["key"].as_str().unwrap().ends_with("inputs/train.jsonl")));
    let base = inputs
        .iter()
        .find(|i| i["key"].as_str().unwrap().starts_with("model:"))
        .unwrap();
    assert_eq!(base["sha256"].as_str().unwrap().len(), 64);
    let ckpts: Vec<_> = std::fs::read_dir(train.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!ckpts.is_empty() && ckpts.len() <= 2, "{}", ckpts.len());
}

fn env(nats: &str, store: &str, models: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DAGFLEET_NATS__URL", nats.to_string()),
        ("DAGFLEET_STORE__URL", store.to_string()),
        ("DAGFLEET_QUEUES__STAGES__TRAIN__ACK_WAIT", "3s".into()),
        (
            "DAGFLEET_QUEUES__STAGES__TRAIN__BACKOFF",
            "[\"200ms\"]".into(),
        ),
        ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms".into()),
        ("DAGFLEET_TRAINER__MODELS_DIR", models.to_string()),
    ]
}

fn losses(store_dir: &Path, run: &RunId) -> Vec<(u64, f64)> {
    let base = store_dir.join(format!("runs/{run}/train"));
    let job = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::read_to_string(job.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

async fn wait_for_checkpoint(store: &ArtifactStore, run: &RunId) -> String {
    let t0 = Instant::now();
    loop {
        let keys = store.list(&format!("runs/{run}/train")).await.unwrap();
        if let Some(k) = keys
            .iter()
            .find(|k| k.contains("checkpoints/") && k.ends_with("state.json"))
        {
            return k.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_resumes_from_its_checkpoint_with_the_same_losses() {
    init();
    let work = tempfile::tempdir().unwrap();
    let model = tiny_model(work.path(), 256, 4);
    let data = dataset(work.path(), 40);
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(
        &nats.url(),
        dir.path().to_str().unwrap(),
        work.path().to_str().unwrap(),
    );
    let all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    let spec = format!(
        "name = \"resume\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[train]\ndataset = \"{}\"\nr = 8\nalpha = 16\nlr = 1e-3\ndropout = 0.1\nmicro_batch = 2\ngrad_accum = 1\nmax_seq_len = 128\nepochs = 2\ncheckpoint_every = 3\nexport = [\"peft\"]\n",
        model.file_name().unwrap().to_string_lossy(),
        data.display()
    );
    // The uninterrupted run.
    let mut w = Proc::spawn(&["worker", "--role", "trainer"], &all, None);
    let run_a = stack.submit(&spec).await;
    let st = wait_run(&stack.bus, &run_a, Duration::from_secs(300)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let want = losses(dir.path(), &run_a);
    assert!(want.len() >= 10, "{}", want.len());
    // It ran far longer than the ack wait (3 s) on its first delivery: the in-progress acks
    // kept it.
    let rec_a = store
        .list(&format!("runs/{run_a}/jobs/train"))
        .await
        .unwrap();
    let rec_a: dagfleet_protocol::JobRecord =
        serde_json::from_slice(&store.get_opt(&rec_a[0]).await.unwrap().unwrap()).unwrap();
    assert_eq!(rec_a.attempt, 1);
    assert!(rec_a.duration_ms > 3_000, "{} ms", rec_a.duration_ms);

    // The same run, its worker killed once a checkpoint is in the store.
    let run_b = stack.submit(&spec).await;
    let ck = wait_for_checkpoint(&store, &run_b).await;
    w.kill9();
    let _w2 = Proc::spawn(&["worker", "--role", "trainer"], &all, None);
    let st = wait_run(&stack.bus, &run_b, Duration::from_secs(300)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let rec = store
        .list(&format!("runs/{run_b}/jobs/train"))
        .await
        .unwrap();
    let rec: dagfleet_protocol::JobRecord =
        serde_json::from_slice(&store.get_opt(&rec[0]).await.unwrap().unwrap()).unwrap();
    assert!(rec.attempt >= 2, "redelivered after the kill ({ck})");
    let resumed = rec.metrics["resumed_from_step"];
    assert!(resumed >= 3.0, "resumed from step {resumed}");
    let got = losses(dir.path(), &run_b);
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        want.iter().map(|w| w.0).collect::<Vec<_>>(),
        "every step once"
    );
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "step {s}: {a} vs {b}"
        );
    }
    stack.stop().await;
}

#[test]
fn dagfleet_train_runs_on_one_machine() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64, 2);
    let data = dataset(dir.path(), 8);
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"local\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[train]\ndataset = \"{}\"\nepochs = 1\nmicro_batch = 2\ngrad_accum = 1\nmax_seq_len = 128\nexport = [\"peft\", \"q8_0\"]\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = std::process::Command::new(dagfleet_bin())
        .args(["train"])
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("step 1/"), "{err}");
    for f in [
        "adapter/adapter_model.safetensors",
        "gguf/tiny-llama-lora-q8_0.gguf",
        "report.md",
        "loss.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(!out.join("merged").exists(), "only the exports asked for");
    // A bad spec names the key.
    std::fs::write(&spec, "name = \"x\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"m\"\n[train]\ndataset = \"d.jsonl\"\nr = 0\n").unwrap();
    let o = std::process::Command::new(dagfleet_bin())
        .args(["train"])
        .arg(&spec)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("train.r"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn train_then_infer_judge_and_report_compares_the_fine_tune_with_its_base() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64, 2);
    let data = dataset(dir.path(), 8);
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        (0..3)
            .map(|i| {
                serde_json::json!({"id": format!("p{i}"), "messages": [
                    {"role": "system", "content": "You write Airflow DAGs."},
                    {"role": "user", "content": format!("Write DAG number {i} with 2 tasks.")}]})
                .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"full\"\nstages = [\"train\", \"infer\", \"judge\", \"report\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[train]\ndataset = \"{}\"\nmax_seq_len = 256\nepochs = 1\nexport = [\"peft\", \"q4_k_m\"]\n[infer]\nprompts = \"{}\"\nmax_tokens = 24\n",
            model.display(),
            data.display(),
            prompts.display()
        ),
    )
    .unwrap();
    let (stdout, _, run) = up_run(dir.path(), &spec);
    // The verdict is printed, and the report names both models: the fine-tune is the adapter
    // over the base it was trained on, not the re-quantized merge.
    assert!(stdout.contains("The fine-tune"), "{stdout}");
    let report_dir = std::fs::read_dir(run.join("report"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(md.contains("tiny-llama + LoRA (adapter)"), "{md}");
    assert!(md.contains("![loss curve](loss.png)"), "{md}");
    assert!(report_dir.join("loss.png").exists());
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["models"].as_object().unwrap().len(), 2, "{rep}");
    assert_eq!(rep["fine_tune"], "tiny-llama + LoRA (adapter)");
    assert_eq!(rep["models"][rep["base"].as_str().unwrap()]["rows"], 3);
    assert_eq!(rep["models"]["tiny-llama + LoRA (adapter)"]["rows"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_at_once_and_another_worker_continues() {
    use futures::StreamExt;
    init();
    let work = tempfile::tempdir().unwrap();
    let model = tiny_model(work.path(), 256, 4);
    let data = dataset(work.path(), 40);
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(
        &nats.url(),
        dir.path().to_str().unwrap(),
        work.path().to_str().unwrap(),
    );
    let all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    // No periodic checkpoint before the end: the one found is the SIGTERM's.
    let spec = format!(
        "name = \"term\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[train]\ndataset = \"{}\"\nmicro_batch = 2\ngrad_accum = 1\nmax_seq_len = 128\nepochs = 3\ncheckpoint_every = 1000\nexport = [\"peft\"]\n",
        model.file_name().unwrap().to_string_lossy(),
        data.display()
    );
    let mut w = Proc::spawn(&["worker", "--role", "trainer"], &all, None);
    let run = stack.submit(&spec).await;
    // Wait for the second optimizer step's event, then SIGTERM.
    let mut steps = stack
        .bus
        .client()
        .subscribe(dagfleet_protocol::subjects::event(&run, "train_step"))
        .await
        .unwrap();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(120), steps.next())
            .await
            .expect("training steps")
            .unwrap();
    }
    w.term();
    let status = w
        .wait_for(Duration::from_secs(30))
        .expect("the worker exits");
    assert!(status.success(), "{status:?}");
    let ck = wait_for_checkpoint(&store, &run).await;
    let step: u64 = ck
        .split("step-")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 2, "{ck}");
    let _w2 = Proc::spawn(&["worker", "--role", "trainer"], &all, None);
    let st = wait_run(&stack.bus, &run, Duration::from_secs(300)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let rec = store.list(&format!("runs/{run}/jobs/train")).await.unwrap();
    let rec: dagfleet_protocol::JobRecord =
        serde_json::from_slice(&store.get_opt(&rec[0]).await.unwrap().unwrap()).unwrap();
    assert_eq!(rec.metrics["resumed_from_step"], step as f64);
    stack.stop().await;
}
