//! Secrets (NATS password, S3 secret key) never reach logs, events, dead letters, run state
//! or artifacts, nor `dagfleet config` and error messages.

#![allow(clippy::unwrap_used)]

/// Points the helpers at the binary cargo built for this test target.
fn init() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
}

use dagfleet_protocol::{subjects, RunStatus};
use dagfleet_runtime::config::Secret;
use dagfleet_runtime::{ArtifactStore, NatsConfig};
use dagfleet_tests::*;
use std::process::Command;
use std::time::Duration;

const NATS_PW: &str = "nats-pw-7f3a9c41";
const S3_SECRET: &str = "s3-secret-5b2e1d88";

fn assert_clean(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert!(!text.contains(NATS_PW), "NATS password leaked into {what}");
    assert!(!text.contains(S3_SECRET), "S3 secret leaked into {what}");
}

fn walk_files(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk_files(&path, out);
            } else {
                out.push(path);
            }
        }
    }
}

async fn all_messages(bus: &dagfleet_runtime::Bus, stream: &str) -> Vec<Vec<u8>> {
    let mut s = bus.jetstream().get_stream(stream).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            let mut b = m.payload.to_vec();
            b.extend_from_slice(format!("{:?}", m.headers).as_bytes());
            out.push(b);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_events_or_artifacts() {
    init();
    let nats = NatsServer::start_with(&["--user", "dagfleet", "--pass", NATS_PW]);
    let s3 = S3Server::start("dagfleet", "AKIDSECRETTEST", S3_SECRET).await;
    let store = ArtifactStore::open(&s3.store_config("p")).unwrap();
    let nats_cfg = NatsConfig {
        url: nats.url(),
        user: Some("dagfleet".into()),
        password: Some(Secret::new(NATS_PW)),
        ..Default::default()
    };
    let stack = Stack::start(&nats_cfg, store.clone(), 1, 0).await;

    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("worker.log");
    let env = [
        ("DAGFLEET_NATS__URL", nats.url()),
        ("DAGFLEET_NATS__USER", "dagfleet".to_string()),
        ("DAGFLEET_NATS__PASSWORD", NATS_PW.to_string()),
        ("DAGFLEET_STORE__URL", "s3://dagfleet/p".to_string()),
        ("DAGFLEET_STORE__ENDPOINT", s3.endpoint.clone()),
        ("DAGFLEET_STORE__REGION", "us-east-1".to_string()),
        ("DAGFLEET_STORE__ALLOW_HTTP", "true".to_string()),
        // Standard AWS credentials from the environment.
        ("AWS_ACCESS_KEY_ID", "AKIDSECRETTEST".to_string()),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_string()),
        ("RUST_LOG", "trace".to_string()),
    ];
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker = Proc::spawn(&["worker", "--role", "noop"], &env_ref, Some(&log));

    let run = stack
        .submit("name = \"secrets\"\nstages = [\"noop\"]\n[noop]\njobs = 10\noutput_bytes = 64\nfatal_jobs = [2]\n[limits]\nmax_failed_jobs = 1\n")
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(st.status, RunStatus::Done, "{:?}", st.error);
    worker.term();
    worker
        .wait_for(Duration::from_secs(20))
        .expect("worker exits");

    let log_text = std::fs::read(&log).unwrap();
    assert!(
        String::from_utf8_lossy(&log_text).contains("worker started"),
        "the worker log is real"
    );
    assert_clean("the worker log (RUST_LOG=trace)", &log_text);
    for m in all_messages(&stack.bus, subjects::EVENTS_STREAM).await {
        assert_clean("an event", &m);
    }
    let dlq = all_messages(&stack.bus, subjects::DLQ_STREAM).await;
    assert_eq!(dlq.len(), 1);
    assert_clean("a dead letter", &dlq[0]);
    for m in all_messages(&stack.bus, &format!("KV_{}", subjects::RUNS_BUCKET)).await {
        assert_clean("run state", &m);
    }
    let mut files = Vec::new();
    walk_files(s3.dir.path(), &mut files);
    assert!(files.len() >= 10);
    for f in files {
        assert_clean(&f.display().to_string(), &std::fs::read(&f).unwrap());
    }

    // `dagfleet config` prints the effective configuration with secrets redacted.
    let out = Command::new(dagfleet_bin())
        .arg("config")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DAGFLEET_STORE__SECRET_ACCESS_KEY", S3_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("<redacted>"));
    assert_clean("`dagfleet config`", &out.stdout);

    // Credentials in the URL are refused (they have their own redacted keys), without being
    // repeated.
    let port = free_port();
    let out = Command::new(dagfleet_bin())
        .args([
            "--nats-url",
            &format!("nats://dagfleet:{NATS_PW}@127.0.0.1:{port}"),
            "worker",
            "--role",
            "noop",
        ])
        .env("DAGFLEET_NATS__CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nats.url carries credentials"), "{err}");
    assert_clean("the refusal of URL credentials", &out.stderr);
    stack.stop().await;
}
