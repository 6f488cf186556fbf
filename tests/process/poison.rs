//! A run spec must never take the coordinators down. Two `dagfleet coordinator` processes
//! and a noop worker; the CLI refuses the spec that once crashed the fleet before anything is
//! stored, and the worst specs written straight into the run-state bucket (as an older
//! client, or anyone with KV access, could) fail their runs with a reason while both
//! coordinators stay up; an unreadable entry is skipped; a normal run afterwards completes.

#![allow(clippy::unwrap_used)]

use dagfleet_protocol::{encode, Event, EventKind, RunId, RunSpec, RunState, RunStatus};
use dagfleet_tests::*;
use std::process::Command;
use std::time::Duration;

fn init() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

fn env(nats: &str, store: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DAGFLEET_NATS__URL", nats.to_string()),
        ("DAGFLEET_STORE__URL", store.to_string()),
        ("DAGFLEET_QUEUES__STAGES__NOOP__ACK_WAIT", "2s".into()),
        ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms".into()),
        ("DAGFLEET_COORDINATOR__RECONCILE_EVERY", "300ms".into()),
        ("DAGFLEET_COORDINATOR__DISPATCH_LEASE", "3s".into()),
    ]
}

fn cli(args: &[&str], env: &[(&'static str, String)]) -> std::process::Output {
    let mut c = Command::new(dagfleet_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

const POISON: &str = "name = \"poison\"\nstages = [\"noop\"]\n[noop]\njobs = 4000000000\n[limits]\nmax_jobs_per_stage = 4294967295";

/// Writes a run state for `spec_text` straight into the bucket (no client checks) and tells
/// the coordinators.
async fn forge(bus: &dagfleet_runtime::Bus, id: &str, spec_text: &str) -> RunId {
    let spec: RunSpec = toml::from_str(spec_text).unwrap();
    let run = RunId::new(id).unwrap();
    let st = RunState::new(run.clone(), spec, dagfleet_runtime::now_ms());
    bus.runs()
        .create(id, encode(&st).unwrap().into())
        .await
        .unwrap();
    submitted(bus, &run).await;
    run
}

async fn submitted(bus: &dagfleet_runtime::Bus, run: &RunId) {
    let ev = Event {
        schema_version: dagfleet_protocol::SCHEMA_VERSION,
        run_id: run.clone(),
        at_ms: dagfleet_runtime::now_ms(),
        kind: EventKind::RunSubmitted,
    };
    bus.publish_event(&ev, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_specs_fail_their_runs_while_both_coordinators_stay_up() {
    init();
    let nats = NatsServer::start();
    let (dir, store) = temp_store();
    let env = env(&nats.url(), dir.path().to_str().unwrap());
    let all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let logs = tempfile::tempdir().unwrap();
    let mut coords: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &["coordinator"],
                &all,
                Some(&logs.path().join(format!("c{i}.log"))),
            )
        })
        .collect();
    let _worker = Proc::spawn(&["worker", "--role", "noop"], &all, None);
    let bus = dagfleet_runtime::Bus::connect(&nats.config(), fast_queues(), "test")
        .await
        .unwrap();

    // The CLI refuses the spec, naming the field, the value and the cap, and stores nothing.
    let spec_dir = tempfile::tempdir().unwrap();
    let poison = spec_dir.path().join("poison.toml");
    std::fs::write(&poison, POISON).unwrap();
    let out = cli(&["run", poison.to_str().unwrap()], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in [
        "limits.max_jobs_per_stage",
        "4294967295",
        "caps.max_jobs_per_stage = 100000",
    ] {
        assert!(err.contains(want), "`{want}` missing from: {err}");
    }
    assert!(store.list("runs").await.unwrap().is_empty());
    assert!(dagfleet_coordinator::list_runs(&bus)
        .await
        .unwrap()
        .is_empty());

    // The same spec, and others as bad, written into the bucket by hand.
    let prompts: String = (0..50)
        .map(|i| {
            format!(
                "{{\"id\": \"{i}\", \"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}\n"
            )
        })
        .collect();
    store
        .put_overwrite("runs/many-rows/inputs/prompts.jsonl", prompts.into())
        .await
        .unwrap();
    let forged = [
        ("reported-poison", POISON, "limits.max_jobs_per_stage"),
        (
            "huge-artifact",
            "name = \"a\"\nstages = [\"noop\"]\n[noop]\njobs = 2\noutput_bytes = 4294967295",
            "noop.output_bytes",
        ),
        (
            "endless-work",
            "name = \"a\"\nstages = [\"noop\"]\n[noop]\njobs = 2\nwork_ms = 18446744073709551615",
            "noop.work_ms",
        ),
        ("no-stages", "name = \"a\"\nstages = []", "stages"),
        (
            "bad-name",
            "name = \"../../other-run\"\nstages = [\"noop\"]\n[noop]\njobs = 1",
            "name",
        ),
        (
            "many-rows",
            "name = \"a\"\nstages = [\"infer\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m\"\n[infer]\nprompts = \"store:runs/many-rows/inputs/prompts.jsonl\"\nbatch_rows = 1\n[limits]\nmax_jobs_per_stage = 10",
            "would need 50 jobs",
        ),
    ];
    let mut runs = Vec::new();
    for (id, text, why) in forged {
        runs.push((forge(&bus, id, text).await, why));
    }
    // An entry no version of dagfleet wrote.
    bus.runs()
        .create("garbage", bytes::Bytes::from_static(b"\xc1 not msgpack"))
        .await
        .unwrap();
    submitted(&bus, &RunId::new("garbage").unwrap()).await;

    for (run, why) in &runs {
        let st = wait_run(&bus, run, Duration::from_secs(60)).await;
        assert_eq!(st.status, RunStatus::Failed, "{run}");
        let reason = st.error.clone().unwrap_or_default();
        assert!(reason.contains(why), "{run}: `{why}` missing from {reason}");
        // The reason is in the manifest too.
        let m = store
            .get_opt(&format!("runs/{run}/manifest.json"))
            .await
            .unwrap()
            .expect("manifest");
        assert!(String::from_utf8_lossy(&m).contains(why), "{run} manifest");
    }
    for (i, c) in coords.iter_mut().enumerate() {
        assert!(
            c.child.try_wait().unwrap().is_none(),
            "coordinator {i} exited: {}",
            std::fs::read_to_string(logs.path().join(format!("c{i}.log"))).unwrap_or_default()
        );
    }

    // A job envelope published by hand for a run nobody submitted is dead-lettered by the
    // worker process, and nothing is written under that run's prefix.
    let forged = dagfleet_protocol::Envelope::new(
        RunId::new("ghost-run").unwrap(),
        dagfleet_protocol::Stage::Noop,
        0,
        "forged",
        0,
        dagfleet_protocol::Job::Noop(dagfleet_protocol::jobs::NoopJob {
            output_bytes: 16,
            ..Default::default()
        }),
    );
    bus.publish_jobs(&[forged]).await.unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let mut dlq = bus
            .jetstream()
            .get_stream(dagfleet_protocol::subjects::DLQ_STREAM)
            .await
            .unwrap();
        let n = dlq.info().await.unwrap().state.messages;
        let mut found = false;
        for seq in 1..=n {
            if let Ok(m) = dlq.get_raw_message(seq).await {
                let reason = m
                    .headers
                    .get(dagfleet_protocol::subjects::HDR_REASON)
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                found |= reason.contains("`ghost-run`, which does not exist");
            }
        }
        if found {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the forged job was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.list("runs/ghost-run").await.unwrap().is_empty());

    // A normal run after them completes, through the same two coordinators.
    let normal = spec_dir.path().join("normal.toml");
    std::fs::write(
        &normal,
        "name = \"after\"\nstages = [\"noop\"]\n[noop]\njobs = 20\noutput_bytes = 64",
    )
    .unwrap();
    let out = cli(&["run", normal.to_str().unwrap()], &env);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("done"));
    for (i, c) in coords.iter_mut().enumerate() {
        assert!(
            c.child.try_wait().unwrap().is_none(),
            "coordinator {i} exited"
        );
    }
    // `dagfleet status` lists the runs it can read, and names the failed ones' reasons.
    let out = cli(&["status"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
