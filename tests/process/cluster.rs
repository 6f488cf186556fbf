//! A clustered JetStream (three nats-server nodes routed on loopback, streams and buckets
//! with three replicas): a 2,000-job run while one node is killed -9 and restarted, then a
//! second run while the jobs stream's leader is killed. Workers run as `dagfleet`
//! processes and, like the coordinators, are given all three URLs. Every job must finish
//! exactly once; the figures (time to recover, throughput dip) are printed for
//! BENCHMARKS.md.

#![allow(clippy::unwrap_used)]

use dagfleet_protocol::{subjects, RunId, RunStatus};
use dagfleet_runtime::ArtifactStore;
use dagfleet_tests::*;
use std::time::{Duration, Instant};

fn init() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

const JOBS: usize = 2000;

fn noop_spec(name: &str) -> String {
    format!(
        "name = \"{name}\"\nstages = [\"noop\"]\n[noop]\njobs = {JOBS}\nwork_ms = 20\noutput_bytes = 8\n"
    )
}

/// Polls the run every 100 ms until it ends; `at` is called once with the number of jobs
/// done when it first reaches `trigger`. Returns the samples (seconds since start, done).
async fn follow(
    stack: &Stack,
    run: &RunId,
    trigger: usize,
    mut at: impl FnMut(),
) -> Vec<(f64, usize)> {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut fired = false;
    loop {
        if let Ok(Some((st, _))) = dagfleet_coordinator::load_run(&stack.bus, run).await {
            let done = st.stages[0].done.len() as usize;
            samples.push((t0.elapsed().as_secs_f64(), done));
            if !fired && done >= trigger {
                fired = true;
                at();
                samples.push((t0.elapsed().as_secs_f64(), usize::MAX));
            }
            if st.status != RunStatus::Running {
                return samples;
            }
        }
        if t0.elapsed() > Duration::from_secs(150) {
            panic!(
                "run {run} did not finish: {:?}\n{}",
                samples.last(),
                diagnose(stack, run).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The jobs stream, the noop consumer, the events stream and the coordinators' consumer,
/// and what the run state says is missing, for a run that stalls.
async fn diagnose(stack: &Stack, run: &RunId) -> String {
    let js = stack.bus.jetstream();
    let mut out = String::new();
    for s in [subjects::JOBS_STREAM, subjects::EVENTS_STREAM] {
        if let Ok(mut st) = js.get_stream(s).await {
            if let Ok(i) = st.info().await {
                out += &format!(
                    "{s}: {:?} leader {:?}\n",
                    i.state,
                    i.cluster.as_ref().and_then(|c| c.leader.clone())
                );
            }
            for c in [
                subjects::role_consumer(dagfleet_protocol::Role::Noop),
                subjects::COORDINATOR_CONSUMER.to_string(),
            ] {
                if let Ok(mut con) = st
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&c)
                    .await
                {
                    if let Ok(i) = con.info().await {
                        out += &format!("  consumer {c}: pending {} ack_pending {} redelivered {} delivered {:?} ack_floor {:?}\n", i.num_pending, i.num_ack_pending, i.num_redelivered, i.delivered, i.ack_floor);
                    }
                }
            }
        }
    }
    if let Ok(Some((st, _))) = dagfleet_coordinator::load_run(&stack.bus, run).await {
        out += &format!(
            "stage: status {:?} jobs {} done {} failed {} takeovers {}\n",
            st.stages[0].status,
            st.stages[0].jobs,
            st.stages[0].done.len(),
            st.stages[0].failed.len(),
            st.stages[0].dispatch_takeovers
        );
    }
    // Which completions the events stream holds for the run.
    if let Ok(st) = js.get_stream(subjects::EVENTS_STREAM).await {
        use futures::StreamExt;
        let c = st
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: subjects::run_events(run),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await;
        if let Ok(c) = c {
            let mut done = std::collections::BTreeSet::new();
            let mut events = 0;
            if let Ok(mut batch) = c
                .fetch()
                .max_messages(100_000)
                .expires(Duration::from_secs(3))
                .messages()
                .await
            {
                while let Some(Ok(m)) = batch.next().await {
                    events += 1;
                    if let Ok(ev) = dagfleet_protocol::codec::decode_event(&m.payload) {
                        if let dagfleet_protocol::EventKind::JobsDone { records } = ev.kind {
                            done.extend(records.into_iter().map(|r| r.index));
                        }
                    }
                }
            }
            out += &format!(
                "events of the run in the stream: {events}, distinct jobs done in them: {}\n",
                done.len()
            );
        }
    }
    let recs = job_records(&stack.store, run).await.len();
    out += &format!("job records in the store: {recs}\n");
    out
}

/// Jobs/s before the fault, seconds until the first 50 jobs finish after it, and jobs/s
/// over the 5 s after it.
fn figures(samples: &[(f64, usize)]) -> (f64, f64, f64) {
    let k = samples.iter().position(|s| s.1 == usize::MAX).unwrap();
    let (t_fault, at_fault) = samples[k - 1];
    let (t_start, d_start) = samples
        .iter()
        .find(|s| s.1 > 0)
        .copied()
        .unwrap_or((0.0, 0));
    let before = (at_fault - d_start) as f64 / (t_fault - t_start).max(1e-3);
    let after: Vec<(f64, usize)> = samples[k + 1..].to_vec();
    let recover = after
        .iter()
        .find(|s| s.1 >= at_fault + 50)
        .map(|s| s.0 - t_fault)
        .unwrap_or(f64::NAN);
    let in5 = after
        .iter()
        .take_while(|s| s.0 - t_fault <= 5.0)
        .last()
        .map(|s| (s.1 - at_fault) as f64 / (s.0 - t_fault).max(1e-3))
        .unwrap_or(0.0);
    (before, recover, in5)
}

/// A stream's configuration, state and cluster placement.
async fn stream_info(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> async_nats::jetstream::stream::Info {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

async fn exactly_once(stack: &Stack, store: &ArtifactStore, run: &RunId) {
    let st = wait_run(&stack.bus, run, Duration::from_secs(30)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    assert_eq!(st.stages[0].done.len() as usize, JOBS, "0 lost");
    assert_eq!(st.stages[0].failed.len(), 0);
    let arts = store.list(&format!("runs/{run}/noop")).await.unwrap();
    assert_eq!(arts.len(), JOBS, "one artifact per job");
    let dirs: std::collections::BTreeSet<_> = arts
        .iter()
        .map(|k| k.rsplit_once('/').unwrap().0.to_string())
        .collect();
    assert_eq!(dirs.len(), JOBS);
    assert_eq!(
        job_records(store, run).await.len(),
        JOBS,
        "one record per job"
    );
}

fn worker_env<'a>(url: &'a str, store: &'a str, replicas: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DAGFLEET_NATS__URL", url),
        ("DAGFLEET_STORE__URL", store),
        ("DAGFLEET_QUEUES__REPLICAS", replicas),
        ("DAGFLEET_QUEUES__STAGES__NOOP__ACK_WAIT", "2s"),
        ("DAGFLEET_QUEUES__STAGES__NOOP__MAX_ATTEMPTS", "20"),
        ("DAGFLEET_QUEUES__STAGES__NOOP__BACKOFF", "[\"50ms\"]"),
        ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms"),
        ("DAGFLEET_WORKER__CONCURRENCY", "8"),
    ]
}

/// The same run with no fault on one nats-server (one replica): the peer the cluster's
/// figures are read against. Returns jobs/s over the run.
async fn single_server_baseline() -> f64 {
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let stack = Stack::start(&nats.config(), store.clone(), 2, 0).await;
    let url = nats.url();
    let env = worker_env(&url, dir.path().to_str().unwrap(), "1");
    let _workers: Vec<Proc> = (0..3)
        .map(|_| Proc::spawn(&["worker", "--role", "noop"], &env, None))
        .collect();
    let run = stack.submit(&noop_spec("single-server")).await;
    let samples = follow(&stack, &run, usize::MAX, || {}).await;
    exactly_once(&stack, &store, &run).await;
    stack.stop().await;
    let (t_start, _) = samples
        .iter()
        .find(|s| s.1 > 0)
        .copied()
        .unwrap_or((0.0, 0));
    let (t_end, _) = *samples.last().unwrap();
    JOBS as f64 / (t_end - t_start).max(1e-3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_and_then_its_stream_leader_without_losing_a_job() {
    init();
    let peer = single_server_baseline().await;
    println!("single server, one replica, no fault: {peer:.0} jobs/s");
    let mut cluster = NatsCluster::start().await;
    let (dir, store) = temp_store();
    let mut queues = fast_queues();
    queues.replicas = 3;
    let stack = Stack::start_with(&cluster.config(), queues, store.clone(), 2, 0).await;
    let js = stack.bus.jetstream().clone();
    for s in [
        subjects::JOBS_STREAM,
        subjects::EVENTS_STREAM,
        "KV_dagfleet_runs",
    ] {
        let info = stream_info(&js, s).await;
        assert_eq!(info.config.num_replicas, 3, "{s}");
        let replicas = info.cluster.as_ref().map(|c| c.replicas.len()).unwrap_or(0);
        assert_eq!(replicas, 2, "{s}: a leader and two followers");
    }
    let url = cluster.url();
    let env = worker_env(&url, dir.path().to_str().unwrap(), "3");
    let _workers: Vec<Proc> = (0..3)
        .map(|_| Proc::spawn(&["worker", "--role", "noop"], &env, None))
        .collect();

    // 1. A node (not chosen for its role) killed -9 mid-run, restarted 3 s later.
    let run = stack.submit(&noop_spec("cluster-node-loss")).await;
    let killed = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let k2 = killed.clone();
    let samples = {
        let cluster = &mut cluster;
        follow(&stack, &run, 300, move || {
            cluster.kill(1);
            *k2.lock().unwrap() = Some(Instant::now());
        })
        .await
    };
    cluster.restart(1);
    exactly_once(&stack, &store, &run).await;
    let (before, recover, in5) = figures(&samples);
    println!(
        "node loss: {before:.0} jobs/s before, first 50 jobs after the kill in {recover:.2} s, {in5:.0} jobs/s over the next 5 s; run took {:.1} s",
        samples.last().unwrap().0
    );
    cluster.wait_ready(Duration::from_secs(30)).await;

    // 2. The jobs stream's leader killed -9 mid-run (and kept down until the run ends).
    let leader = stream_info(&js, subjects::JOBS_STREAM)
        .await
        .cluster
        .and_then(|c| c.leader)
        .expect("a stream leader");
    let li = NatsCluster::index_of(&leader).expect("leader name");
    let run = stack.submit(&noop_spec("cluster-leader-loss")).await;
    let samples = {
        let cluster = &mut cluster;
        follow(&stack, &run, 300, move || cluster.kill(li)).await
    };
    exactly_once(&stack, &store, &run).await;
    let (before, recover, in5) = figures(&samples);
    println!(
        "leader loss ({leader}): {before:.0} jobs/s before, first 50 jobs after the kill in {recover:.2} s, {in5:.0} jobs/s over the next 5 s; run took {:.1} s",
        samples.last().unwrap().0
    );
    // Once every job is acked the work queue must empty. nats-server 2.9 keeps some acked
    // messages after a leader change; the coordinators' sweep (every 2 s here) deletes
    // what lies at or below each consumer's ack floor.
    let t0 = Instant::now();
    let left = wait_jobs_stream_empty(&stack.bus, Duration::from_secs(30)).await;
    println!(
        "jobs stream after both runs: {left} acked messages left, none {:.1} s later",
        t0.elapsed().as_secs_f64()
    );
    let dlq = stream_info(&js, subjects::DLQ_STREAM).await;
    assert_eq!(dlq.state.messages, 0);
    drop(killed);
    stack.stop().await;
}
