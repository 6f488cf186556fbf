//! The synthesize stage through the coordinator with in-process miner and synthesizer
//! workers, against the loopback Anthropic server: resubmission of errored and expired
//! requests, a batch that never ends, DAGs too long for the teacher, unparseable replies.

#![allow(clippy::unwrap_used)]

use dagfleet_protocol::{JobRecord, RunId, RunStatus, Stage};
use dagfleet_providers::{ProviderConfig, ProviderKind};
use dagfleet_runtime::{ArtifactStore, Bus, Worker, WorkerConfig};
use dagfleet_tests::teacher::Teacher;
use dagfleet_tests::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Fleet {
    stack: Stack,
    stop: CancellationToken,
    teacher: Teacher,
    _nats: NatsServer,
    _dir: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let teacher = Teacher::start().await;
    teacher.state.batch_ms.store(200, Ordering::SeqCst);
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    let stop = CancellationToken::new();
    let mut cfg = ProviderConfig::new(ProviderKind::Anthropic, Some(teacher.url.clone()));
    cfg.backoff = Duration::from_millis(10);
    let mut oa = ProviderConfig::new(ProviderKind::Openai, Some(teacher.url.clone()));
    oa.batch = Some(true);
    oa.backoff = Duration::from_millis(10);
    let providers = BTreeMap::from([("anthropic".to_string(), cfg), ("oa".to_string(), oa)]);
    let nc = nats.config();
    let bus = || Bus::connect(&nc, fast_queues(), "w");
    let m = Worker::new(
        bus().await.unwrap(),
        store.clone(),
        dagfleet_miner::MinerHandler,
        WorkerConfig::new(dagfleet_protocol::Role::Miner),
    );
    let s = Worker::new(
        bus().await.unwrap(),
        store.clone(),
        dagfleet_synth::SynthHandler::new(providers),
        WorkerConfig::new(dagfleet_protocol::Role::Synthesizer),
    );
    let (a, b) = (stop.clone(), stop.clone());
    tokio::spawn(async move { m.run(a).await });
    tokio::spawn(async move { s.run(b).await });
    Fleet {
        stack,
        stop,
        teacher,
        _nats: nats,
        _dir: dir,
    }
}

fn spec(name: &str, extra: &str) -> String {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/judge-corpus");
    format!(
        "name = \"{name}\"\nstages = [\"mine\", \"synthesize\"]\n[[sources]]\nkind = \"dir\"\npath = \"{}\"\n[mine]\nglobs = [\"**/valid_c*.py\"]\n[models.teacher]\nprovider = \"anthropic\"\nmodel = \"claude-test\"\n[synthesize]\npoll_interval = \"100ms\"\n{extra}\n",
        corpus.display()
    )
}

async fn synth_record(store: &ArtifactStore, run: &RunId) -> JobRecord {
    let keys = store
        .list(&format!("runs/{run}/jobs/{}", Stage::Synthesize))
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    serde_json::from_slice(&store.get_opt(&keys[0]).await.unwrap().unwrap()).unwrap()
}

async fn rejected(store: &ArtifactStore, rec: &JobRecord) -> Vec<serde_json::Value> {
    let r = rec
        .outputs
        .iter()
        .find(|o| o.key.ends_with("rejected.jsonl"))
        .unwrap();
    String::from_utf8(store.get(r).await.unwrap().to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_and_expired_requests_are_resubmitted() {
    let f = fleet().await;
    f.teacher
        .state
        .error_once
        .lock()
        .unwrap()
        .insert("r0-i".into());
    f.teacher
        .state
        .expire_once
        .lock()
        .unwrap()
        .insert("r1-i".into());
    let run = f.stack.submit(&spec("resubmit", "")).await;
    let st = wait_run(&f.stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let rec = synth_record(&f.stack.store, &run).await;
    let dags = rec.metrics["dags"];
    assert!(dags >= 3.0, "{:?}", rec.metrics);
    assert_eq!(
        rec.metrics["batches"], 2.0,
        "the first batch and one resubmission"
    );
    assert_eq!(rec.metrics["resubmitted"], 2.0);
    assert_eq!(rec.metrics["failed_requests"], 0.0);
    assert_eq!(rec.metrics["requests"], dags);
    assert!(
        rec.metrics["rows"] >= dags * 3.0,
        "every DAG got its 3 variants"
    );
    assert_eq!(f.teacher.batches_created(), 2);
    f.stop.cancel();
    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_never_ends_is_cancelled_at_its_deadline() {
    let f = fleet().await;
    f.teacher.state.never_end.store(true, Ordering::SeqCst);
    let run = f
        .stack
        .submit(&spec("deadline", "batch_deadline = \"1s\""))
        .await;
    let st = wait_run(&f.stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Failed);
    assert_eq!(f.teacher.batches_created(), 1);
    assert_eq!(f.teacher.state.batches_cancelled.load(Ordering::SeqCst), 1);
    // The reason is in the dead-letter stream.
    let js = f.stack.bus.jetstream();
    let mut dlq = js
        .get_stream(dagfleet_protocol::subjects::DLQ_STREAM)
        .await
        .unwrap();
    let (messages, first) = {
        let info = dlq.info().await.unwrap();
        (info.state.messages, info.state.first_sequence)
    };
    assert_eq!(messages, 1);
    let msg = dlq.get_raw_message(first).await.unwrap();
    let body = msg
        .headers
        .get(dagfleet_protocol::subjects::HDR_REASON)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        body.contains("did not end within synthesize.batch_deadline") && body.contains("cancelled"),
        "{body}"
    );
    f.stop.cancel();
    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_dags_are_skipped_and_unparseable_replies_are_kept() {
    let f = fleet().await;
    f.teacher.state.prose.store(true, Ordering::SeqCst);
    // One DAG far too long for a 3,000-token context.
    let long = tempfile::tempdir().unwrap();
    let mut src = String::from("from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\n\nwith DAG(dag_id=\"long\") as dag:\n");
    for i in 0..400 {
        src.push_str(&format!("    t{i} = EmptyOperator(task_id=\"step_{i}\")\n"));
    }
    std::fs::write(long.path().join("valid_c_long.py"), src).unwrap();
    let run = f
        .stack
        .submit(&spec(
            "bad-input",
            &format!(
                "context_tokens = 3000\nmax_tokens = 1000\nfailures_per_dag = 0\n[[sources]]\nkind = \"dir\"\npath = \"{}\"",
                long.path().display()
            ),
        ))
        .await;
    let st = wait_run(&f.stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    // Stage metrics are the sums over both synthesize jobs (one per mined shard).
    let m = &st.stages[1].metrics;
    assert_eq!(m["skipped_too_long"], 1.0, "{m:?}");
    assert!(m["requests"] >= 1.0, "{m:?}");
    assert_eq!(m["unparseable"], m["requests"], "{m:?}");
    assert_eq!(m["rows"], 0.0);
    let mut rej = Vec::new();
    for k in f
        .stack
        .store
        .list(&format!("runs/{run}/jobs/{}", Stage::Synthesize))
        .await
        .unwrap()
    {
        let rec: JobRecord =
            serde_json::from_slice(&f.stack.store.get_opt(&k).await.unwrap().unwrap()).unwrap();
        rej.extend(rejected(&f.stack.store, &rec).await);
    }
    let long = rej.iter().find(|r| r["reason"] == "too_long").unwrap();
    assert!(long["message"]
        .as_str()
        .unwrap()
        .contains("context is 3000 tokens"));
    let bad = rej.iter().find(|r| r["reason"] == "unparseable").unwrap();
    assert!(
        bad["reply"].as_str().unwrap().contains("my own words"),
        "the reply is kept"
    );
    f.stop.cancel();
    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_mode_goes_through_files_and_batches() {
    let f = fleet().await;
    let text = spec("oa-batch", "mode = \"batch\"")
        .replace("provider = \"anthropic\"", "provider = \"oa\"");
    let run = f.stack.submit(&text).await;
    let st = wait_run(&f.stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let rec = synth_record(&f.stack.store, &run).await;
    assert_eq!(rec.metrics["batches"], 1.0);
    assert_eq!(f.teacher.chat_calls(), 0);
    assert!(
        rec.metrics["rows"] >= rec.metrics["dags"] * 3.0,
        "{:?}",
        rec.metrics
    );
    f.stop.cancel();
    f.stack.stop().await;
}
