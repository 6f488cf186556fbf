//! Fault tests: killed workers, SIGTERM, a restarted nats-server, a killed coordinator, and a
//! chaos run. Workers and coordinators that get killed run as real `dagfleet` processes.

#![allow(clippy::unwrap_used)]

/// Points the helpers at the binary cargo built for this test target.
fn init() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

use dagfleet_protocol::{subjects, RunStatus};
use dagfleet_tests::*;
use futures::StreamExt;
use std::time::{Duration, Instant};

fn noop_spec(name: &str, jobs: u32, extra: &str) -> String {
    format!("name = \"{name}\"\nstages = [\"noop\"]\n[noop]\njobs = {jobs}\n{extra}")
}

/// Environment for `dagfleet` child processes: the test's servers and fast queues.
fn env(nats: &str, store: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DAGFLEET_NATS__URL", nats.to_string()),
        ("DAGFLEET_STORE__URL", store.to_string()),
        ("DAGFLEET_QUEUES__STAGES__NOOP__ACK_WAIT", "2s".into()),
        ("DAGFLEET_QUEUES__STAGES__NOOP__MAX_ATTEMPTS", "20".into()),
        (
            "DAGFLEET_QUEUES__STAGES__NOOP__BACKOFF",
            "[\"50ms\"]".into(),
        ),
        ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms".into()),
        ("DAGFLEET_COORDINATOR__RECONCILE_EVERY", "300ms".into()),
        ("DAGFLEET_COORDINATOR__DISPATCH_LEASE", "3s".into()),
    ]
}

fn spawn(args: &[&str], env: &[(&'static str, String)], extra: &[(&'static str, &str)]) -> Proc {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    Proc::spawn(args, &all, None)
}

/// Starts a noop worker process named `id` and waits for its first heartbeat.
async fn start_worker(
    bus: &dagfleet_runtime::Bus,
    env: &[(&'static str, String)],
    id: &'static str,
    extra: &[(&'static str, &'static str)],
) -> Proc {
    let mut all = vec![("DAGFLEET_WORKER__ID", id)];
    all.extend_from_slice(extra);
    let p = spawn(&["worker", "--role", "noop"], env, &all);
    wait_for_worker(bus, &format!("noop.{id}-")).await;
    p
}

async fn wait_for_worker(bus: &dagfleet_runtime::Bus, prefix: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(mut keys) = bus.workers().keys().await {
            while let Some(Ok(k)) = keys.next().await {
                if k.starts_with(prefix) {
                    return;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "worker {prefix} did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until some worker has a job in flight, per its heartbeat.
async fn wait_in_flight(bus: &dagfleet_runtime::Bus) {
    let t0 = Instant::now();
    loop {
        if let Ok(mut keys) = bus.workers().keys().await {
            while let Some(Ok(k)) = keys.next().await {
                if let Ok(Some(v)) = bus.workers().get(&k).await {
                    let hb: serde_json::Value = serde_json::from_slice(&v).unwrap();
                    if hb["in_flight"].as_u64().unwrap_or(0) > 0 {
                        return;
                    }
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no job went in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_is_replaced_and_the_job_completes_once() {
    init();
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;

    let mut a = start_worker(&stack.bus, &env, "a", &[]).await;
    let run = stack
        .submit(&noop_spec("kill9", 1, "work_ms = 3000\noutput_bytes = 16"))
        .await;
    wait_in_flight(&stack.bus).await;
    a.kill9();
    let _b = spawn(
        &["worker", "--role", "noop"],
        &env,
        &[("DAGFLEET_WORKER__ID", "b")],
    );

    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    let recs = job_records(&store, &run).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].worker, "b-noop");
    assert_eq!(recs[0].attempt, 2, "redelivered once after the kill");
    assert_eq!(
        store.list(&format!("runs/{run}/noop")).await.unwrap().len(),
        1
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_or_hands_them_back() {
    init();
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;

    // Within the grace period the job finishes on the worker being stopped.
    let mut a = start_worker(&stack.bus, &env, "a", &[]).await;
    let run = stack
        .submit(&noop_spec("drain", 1, "work_ms = 1500\noutput_bytes = 8"))
        .await;
    wait_in_flight(&stack.bus).await;
    a.term();
    let status = a
        .wait_for(Duration::from_secs(20))
        .expect("worker a exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done);
    let recs = job_records(&store, &run).await;
    assert_eq!((recs[0].worker.as_str(), recs[0].attempt), ("a-noop", 1));

    // Past the grace period the job is handed back and another worker takes it.
    let mut c = start_worker(
        &stack.bus,
        &env,
        "c",
        &[("DAGFLEET_WORKER__SHUTDOWN_GRACE", "200ms")],
    )
    .await;
    let run = stack
        .submit(&noop_spec(
            "handback",
            1,
            "work_ms = 2500\noutput_bytes = 8",
        ))
        .await;
    wait_in_flight(&stack.bus).await;
    c.term();
    let status = c
        .wait_for(Duration::from_secs(20))
        .expect("worker c exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let _d = spawn(
        &["worker", "--role", "noop"],
        &env,
        &[("DAGFLEET_WORKER__ID", "d")],
    );
    let st = wait_run(&stack.bus, &run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done);
    let recs = job_records(&store, &run).await;
    assert_eq!((recs[0].worker.as_str(), recs[0].attempt), ("d-noop", 2));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_a_nats_server_restart() {
    init();
    let mut nats = NatsServer::start();
    let (_dir, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 1, 2).await;
    let run = stack
        .submit(&noop_spec("restart", 400, "work_ms = 40\noutput_bytes = 8"))
        .await;
    // Let part of the run happen, then kill the server and start it on the same store.
    let t0 = Instant::now();
    loop {
        if let Ok(Some((st, _))) = dagfleet_coordinator::load_run(&stack.bus, &run).await {
            if st.stages[0].done.len() >= 50 {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nats.restart();
    let st = wait_run(&stack.bus, &run, Duration::from_secs(90)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 400);
    assert_eq!(
        store.list(&format!("runs/{run}/noop")).await.unwrap().len(),
        400
    );
    // A second restart after the run, then nothing acked may stay in the work queue.
    nats.restart();
    let left = wait_jobs_stream_empty(&stack.bus, Duration::from_secs(30)).await;
    println!("after the second restart the jobs stream held {left} acknowledged messages; swept");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_is_replaced_and_nothing_is_dispatched_twice() {
    init();
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    // Workers in-process; the coordinator is a process we can kill.
    let stack = Stack::start(&nats.config(), store.clone(), 0, 2).await;
    let mut c1 = spawn(&["coordinator"], &env, &[]);
    let run = stack.submit(&noop_spec("coord", 600, "work_ms = 20")).await;
    let t0 = Instant::now();
    loop {
        if let Ok(Some((st, _))) = dagfleet_coordinator::load_run(&stack.bus, &run).await {
            if st.stages[0].done.len() >= 30 {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "coordinator never dispatched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c1.kill9();
    // Workers go on; their events wait in the stream for the next coordinator.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _c2 = spawn(&["coordinator"], &env, &[]);
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 600);
    let mut s = stack
        .bus
        .jetstream()
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap();
    assert_eq!(
        s.info().await.unwrap().state.last_sequence,
        600,
        "one dispatch only"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_thousand_jobs_with_random_worker_kills() {
    init();
    use rand::Rng;
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    let extra = [("DAGFLEET_WORKER__CONCURRENCY", "8")];
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| spawn(&["worker", "--role", "noop"], &env, &extra))
        .collect();
    let run = stack
        .submit(&noop_spec("chaos", 1000, "work_ms = 40\noutput_bytes = 32"))
        .await;
    let mut kills = 0;
    let t0 = Instant::now();
    loop {
        let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &run)
            .await
            .unwrap()
            .unwrap();
        if st.status != RunStatus::Running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "chaos run stuck: {:?}",
            st.stages[0].done.len()
        );
        let pause = rand::rng().random_range(250..600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        // Keep killing while at least 100 jobs are left, so the run can end.
        if st.stages[0].done.len() < 900 {
            let i = rand::rng().random_range(0..workers.len());
            workers[i].kill9();
            workers[i] = spawn(&["worker", "--role", "noop"], &env, &extra);
            kills += 1;
        }
    }
    let st = wait_run(&stack.bus, &run, Duration::from_secs(10)).await;
    println!("chaos: {kills} kills, {:?}", t0.elapsed());
    assert!(
        kills >= 3,
        "the chaos test must actually kill workers ({kills})"
    );
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len(), 1000, "0 lost");
    assert_eq!(st.stages[0].failed.len(), 0);
    // 0 duplicates: exactly one artifact per job, and one record per job.
    let arts = store.list(&format!("runs/{run}/noop")).await.unwrap();
    assert_eq!(arts.len(), 1000);
    let dirs: std::collections::BTreeSet<_> = arts
        .iter()
        .map(|k| k.rsplit_once('/').unwrap().0.to_string())
        .collect();
    assert_eq!(dirs.len(), 1000);
    assert_eq!(job_records(&store, &run).await.len(), 1000);
    let mut dlq = stack
        .bus
        .jetstream()
        .get_stream(subjects::DLQ_STREAM)
        .await
        .unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dagfleet_cancel_drops_queued_jobs_stops_running_ones_and_records_cancelled() {
    init();
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    let stack = Stack::start(&nats.config(), store.clone(), 1, 0).await;
    // Four jobs at a time that would each work 30 s, and 200 queued behind them.
    let _w = start_worker(
        &stack.bus,
        &env,
        "c",
        &[("DAGFLEET_WORKER__CONCURRENCY", "4")],
    )
    .await;
    let run = stack
        .submit(&noop_spec(
            "cancel",
            204,
            "work_ms = 30000\noutput_bytes = 16",
        ))
        .await;
    wait_in_flight(&stack.bus).await;
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(dagfleet_bin());
        for (k, v) in &env {
            c.env(k, v);
        }
        c.args(args).output().unwrap()
    };
    let out = cli(&["cancel", run.as_str(), "--reason", "test"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cancelled"), "{stdout}");
    let t0 = Instant::now();
    // The running jobs stop and the queued ones are dropped: the queue and the consumer's
    // pending acks empty long before one job's 30 s of work could end.
    loop {
        let mut stream = stack
            .bus
            .jetstream()
            .get_stream(subjects::JOBS_STREAM)
            .await
            .unwrap();
        let msgs = stream.info().await.unwrap().state.messages;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(&subjects::role_consumer(dagfleet_protocol::Role::Noop))
            .await
            .unwrap();
        let pending = consumer.info().await.unwrap().num_ack_pending;
        if msgs == 0 && pending == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{msgs} jobs still queued, {pending} unacked, {:?} after the cancel",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.status, RunStatus::Cancelled);
    assert_eq!(st.error.as_deref(), Some("cancelled: test"));
    assert!(
        job_records(&store, &run).await.is_empty(),
        "no job finished"
    );
    let m: serde_json::Value = serde_json::from_slice(
        &store
            .get_opt(&format!("runs/{run}/manifest.json"))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["status"], "cancelled");
    // A second cancel changes nothing and says so; an unknown run is an error.
    let again = cli(&["cancel", run.as_str()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended (cancelled)"));
    let unknown = cli(&["cancel", "no-such-run"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no run `no-such-run`"));
    let status = cli(&["status", run.as_str(), "--once"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("Cancelled"));
    stack.stop().await;
}
