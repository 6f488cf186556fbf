//! The job layer end to end, in-process, against a real nats-server and real stores.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use dagfleet_protocol::{encode, subjects, Envelope, Job, RunId, RunStatus, Stage};
use dagfleet_runtime::{ArtifactStore, StoreConfig};
use dagfleet_tests::*;
use futures::StreamExt;
use std::time::Duration;

fn noop_spec(name: &str, jobs: u32, extra: &str) -> String {
    format!("name = \"{name}\"\nstages = [\"noop\"]\n[noop]\njobs = {jobs}\n{extra}")
}

async fn artifacts_of(store: &ArtifactStore, run: &RunId) -> Vec<String> {
    store.list(&format!("runs/{run}/noop")).await.expect("list")
}

async fn jobs_published(bus: &dagfleet_runtime::Bus) -> u64 {
    let mut s = bus
        .jetstream()
        .get_stream(subjects::JOBS_STREAM)
        .await
        .expect("stream");
    s.info().await.expect("info").state.last_sequence
}

async fn dead_letters(bus: &dagfleet_runtime::Bus) -> Vec<(String, String)> {
    let mut s = bus
        .jetstream()
        .get_stream(subjects::DLQ_STREAM)
        .await
        .expect("dlq");
    let n = s.info().await.expect("info").state.messages;
    let mut out = Vec::new();
    for seq in 1..=n {
        if let Ok(m) = s.get_raw_message(seq).await {
            let reason = m
                .headers
                .get(subjects::HDR_REASON)
                .map(|v| v.to_string())
                .unwrap_or_default();
            out.push((m.subject.to_string(), reason));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_completes_once_with_two_coordinators_and_retries() {
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 2, 3).await;
    // Every job fails its first delivery, so every job is retried once.
    let run = stack
        .submit(&noop_spec(
            "retry",
            300,
            "output_bytes = 32\nfail_attempts = 1",
        ))
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 300);
    assert_eq!(st.stages[0].jobs, 300);

    // One artifact per job, no more.
    let arts = artifacts_of(&store, &run).await;
    assert_eq!(arts.len(), 300, "{arts:?}");
    // Two coordinators, one dispatch: 300 messages ever published on the jobs stream.
    assert_eq!(jobs_published(&stack.bus).await, 300);

    let manifest = store
        .get_opt(&format!("runs/{run}/manifest.json"))
        .await
        .unwrap()
        .expect("manifest");
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["status"], "done");
    let jobs = m["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 300);
    for j in jobs {
        assert_eq!(
            j["attempt"], 2,
            "every job succeeded on its second delivery"
        );
        let out = &j["outputs"][0];
        assert_eq!(out["bytes"], 32);
        assert_eq!(out["sha256"].as_str().unwrap().len(), 64);
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_go_to_an_s3_compatible_server() {
    let nats = NatsServer::start();
    let s3 = S3Server::start("dagfleet", "AKIDTEST", "test-secret-key").await;
    let store = ArtifactStore::open(&s3.store_config("prod")).expect("s3 store");

    // put-if-absent against the S3 protocol: the first writer wins.
    let a = store
        .put_if_absent("probe/x", Bytes::from_static(b"one"))
        .await
        .expect("put");
    let b = store
        .put_if_absent("probe/x", Bytes::from_static(b"two"))
        .await
        .expect("put again");
    assert_eq!(a, b);
    assert_eq!(store.get(&a).await.unwrap(), Bytes::from_static(b"one"));

    let stack = Stack::start(&nats.config(), store.clone(), 1, 2).await;
    let run = stack
        .submit(&noop_spec("s3", 40, "output_bytes = 1000"))
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(artifacts_of(&store, &run).await.len(), 40);
    // The objects are really on the S3 server's disk, under the prefix.
    let on_disk = walk(
        &s3.dir
            .path()
            .join("dagfleet/prod/runs")
            .join(run.as_str())
            .join("noop"),
    );
    assert_eq!(on_disk, 40);
    stack.stop().await;
}

fn walk(p: &std::path::Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                n += walk(&path);
            } else if !path.to_string_lossy().contains(".s3s") {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_queue_goes_on() {
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 1).await;
    let js = stack.bus.jetstream();
    let subject = subjects::job(Stage::Noop);

    // 1. bytes that are not MessagePack at all
    js.publish(subject.clone(), Bytes::from_static(b"\xc1garbage"))
        .await
        .unwrap()
        .await
        .unwrap();
    // 2. a well-formed envelope from a future schema
    let mut env = Envelope::new(
        RunId::new("poison").unwrap(),
        Stage::Noop,
        0,
        "future",
        0,
        Job::Noop(Default::default()),
    );
    env.schema_version = 99;
    js.publish(subject.clone(), Bytes::from(encode(&env).unwrap()))
        .await
        .unwrap()
        .await
        .unwrap();
    // 3. a message over queues.max_job_bytes (512 KiB by default)
    js.publish(subject.clone(), Bytes::from(vec![0x80u8; 600 * 1024]))
        .await
        .unwrap()
        .await
        .unwrap();

    // The consumer keeps going: a normal run behind the poison completes.
    let run = stack.submit(&noop_spec("after-poison", 5, "")).await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done);

    let dl = dead_letters(&stack.bus).await;
    assert_eq!(dl.len(), 3, "{dl:?}");
    // Workers run jobs concurrently, so the dead letters may come in any order.
    for want in [
        "undecodable job envelope",
        "schema version 99",
        "queues.max_job_bytes",
    ] {
        assert!(dl.iter().any(|(_, r)| r.contains(want)), "{want}: {dl:?}");
    }
    for (subj, _) in &dl {
        assert!(subj.starts_with("dagfleet.dlq.noop."), "{subj}");
    }
    // Nothing left behind in the work queue.
    let mut s = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_jobs_are_dead_lettered_and_fail_the_run_past_the_limit() {
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 2).await;

    let run = stack
        .submit(&noop_spec("fatal", 10, "fatal_jobs = [3]"))
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Failed);
    let err = st.error.unwrap();
    assert!(err.contains("limits.max_failed_jobs"), "{err}");
    assert!(st.stages[0].failed.contains(3));
    let dl = dead_letters(&stack.bus).await;
    assert_eq!(dl.len(), 1);
    assert!(dl[0].1.contains("configured to fail"), "{dl:?}");

    // Tolerated when the spec allows one failure.
    let run = stack
        .submit(&noop_spec(
            "tolerant",
            10,
            "fatal_jobs = [3]\n[limits]\nmax_failed_jobs = 1",
        ))
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 9);

    // A job that keeps failing retryably is dead-lettered after max_attempts (5 here).
    let run = stack
        .submit(&noop_spec("stubborn", 1, "fail_attempts = 100"))
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Failed);
    let dl = dead_letters(&stack.bus).await;
    assert!(
        dl.last().unwrap().1.contains("gave up after 5 attempts"),
        "{dl:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_events_and_bad_specs() {
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 1).await;
    let err = dagfleet_coordinator::submit(
        &stack.bus,
        &store,
        "name = \"x\"\nstages = [\"noop\"]\n[noop]\njobs = 0",
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("noop.jobs"), "{err}");
    let err = dagfleet_coordinator::submit(
        &stack.bus,
        &store,
        "name = \"x\"\nstages = [\"train\"]\n[models.base]\nprovider = \"file\"\nmodel = \"m\"",
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    // A train stage without rows names the key that gives them.
    assert!(err.contains("train.dataset"), "{err}");

    let mut events = stack
        .bus
        .client()
        .subscribe("dagfleet.events.>")
        .await
        .unwrap();
    let run = stack.submit(&noop_spec("events", 3, "")).await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done);
    let mut names = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        let ev = dagfleet_protocol::decode_event(&m.payload).unwrap();
        if ev.run_id == run {
            names.push(ev.kind.name());
        }
    }
    for want in [
        "run_submitted",
        "stage_dispatched",
        "jobs_done",
        "stage_done",
        "run_done",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let _ = StoreConfig::default();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_cut_short_by_a_dead_coordinator_is_finished_without_duplicates() {
    use dagfleet_protocol::{codec::decode, StageStatus};
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    // No coordinator yet: submit, then play a coordinator that took the dispatch lease,
    // published half the jobs and died.
    let bus = dagfleet_runtime::Bus::connect(&nats.config(), fast_queues(), "ghost")
        .await
        .unwrap();
    let run = dagfleet_coordinator::submit(
        &bus,
        &store,
        &noop_spec("ghost", 100, ""),
        &Default::default(),
    )
    .await
    .unwrap();
    let entry = bus.runs().entry(run.as_str()).await.unwrap().unwrap();
    let mut st: dagfleet_protocol::RunState = decode("run state", &entry.value).unwrap();
    st.stages[0].status = StageStatus::Dispatching;
    st.stages[0].lease_holder = Some("ghost".into());
    st.stages[0].lease_until_ms = dagfleet_runtime::now_ms() + 1500;
    bus.runs()
        .update(run.as_str(), encode(&st).unwrap().into(), entry.revision)
        .await
        .unwrap();
    let jobs: Vec<_> = dagfleet_coordinator::plan::plan(&st, Stage::Noop, 0, &Default::default())
        .unwrap()
        .collect();
    assert_eq!(bus.publish_jobs(&jobs[..50]).await.unwrap(), 50);

    // A live coordinator waits out the lease, takes over and republishes everything;
    // JetStream drops the 50 it has already seen.
    let stack = Stack::start(&nats.config(), store.clone(), 1, 2).await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 100);
    assert_eq!(st.stages[0].lease_holder.as_deref(), Some("c0"));
    assert_eq!(
        jobs_published(&stack.bus).await,
        100,
        "no job published twice"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_over_caps_max_active_runs_wait_their_turn_with_the_reason() {
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    // Workers only: the coordinator below has caps.max_active_runs = 1.
    let stack = Stack::start(&nats.config(), store.clone(), 0, 2).await;
    let mut cfg = fast_coordinator("capped");
    cfg.caps.max_active_runs = 1;
    let cbus = dagfleet_runtime::Bus::connect(&nats.config(), fast_queues(), "capped")
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let c = dagfleet_coordinator::Coordinator::new(cbus, store.clone(), cfg);
    let s = stop.clone();
    let task = tokio::spawn(async move { c.run(s).await });
    let first = stack.submit(&noop_spec("first", 4, "work_ms = 700")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = stack.submit(&noop_spec("second", 2, "")).await;
    // While the first runs, the second says why it has not started.
    let t0 = std::time::Instant::now();
    loop {
        let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &second)
            .await
            .unwrap()
            .unwrap();
        if let Some(w) = st.waiting {
            assert!(w.contains("caps.max_active_runs = 1"), "{w}");
            assert_eq!(st.stages[0].started_at_ms, 0);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "second run never waited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = wait_run(&stack.bus, &first, Duration::from_secs(30)).await;
    let b = wait_run(&stack.bus, &second, Duration::from_secs(30)).await;
    assert_eq!((a.status, b.status), (RunStatus::Done, RunStatus::Done));
    assert!(b.stages[0].started_at_ms >= a.stages[0].finished_at_ms);
    assert!(b.waiting.is_none());
    stop.cancel();
    task.await.unwrap().unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_published_jobs_done_event_does_not_finish_a_run() {
    use dagfleet_protocol::{Event, EventKind, JobId, JobRecord, StageStatus};
    let nats = NatsServer::start();
    let (_d, store) = temp_store();
    // A coordinator and no worker: nothing can really finish the jobs.
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    let run = stack.submit(&noop_spec("forged", 5, "")).await;
    let t0 = std::time::Instant::now();
    loop {
        let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &run)
            .await
            .unwrap()
            .unwrap();
        if st.stages[0].status == StageStatus::Dispatched {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = (0..5)
        .map(|i| JobRecord {
            job_id: JobId::derive(&run, Stage::Noop, &format!("noop-{i}")),
            run_id: run.clone(),
            stage: Stage::Noop,
            index: i,
            inputs: vec![],
            outputs: vec![],
            metrics: Default::default(),
            worker: "forger".into(),
            attempt: 1,
            duration_ms: 0,
            finished_at_ms: 0,
        })
        .collect();
    let ev = Event {
        schema_version: dagfleet_protocol::SCHEMA_VERSION,
        run_id: run.clone(),
        at_ms: 0,
        kind: EventKind::JobsDone { records },
    };
    stack.bus.publish_event(&ev, None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.status, RunStatus::Running);
    assert_eq!(st.stages[0].done.len(), 0, "forged completions counted");
    stack.stop().await;
}
