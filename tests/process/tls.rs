//! NATS security against real nats-server configs. Per-role permissions
//! (`deploy/nats/permissions.conf`): a worker runs its role's jobs with only its role's
//! rights, and cannot publish jobs, write run state, create streams or pull another role's
//! jobs. TLS: a server that requires TLS (a private CA
//! the client is given with `nats.tls_ca`), and one that also verifies client certificates
//! (`nats.tls_cert`, `nats.tls_key`). A whole noop run goes through `dagfleet up --run` on
//! each; a client without the CA, or without its certificate, is refused with an error, and
//! never panics (`tls://` URLs used to abort with rustls' CryptoProvider panic, exit 101).

#![allow(clippy::unwrap_used)]

use dagfleet_tests::*;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, in `dir`.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dagfleet test CA",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &format!("{who}-key.pem"),
                "-out",
                &format!("{who}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ],
        );
    }
}

fn server(dir: &Path, verify: bool) -> NatsServer {
    let conf = dir.join(if verify { "verify.conf" } else { "tls.conf" });
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: \"{d}/server.pem\"\n  key_file: \"{d}/server-key.pem\"\n  ca_file: \"{d}/ca.pem\"\n  verify: {verify}\n  timeout: 3\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    NatsServer::start_with(&["-c", conf.to_str().unwrap()])
}

/// `dagfleet up --run` of a small noop spec against `url`, with extra environment.
fn up_run(url: &str, env: &[(&str, String)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("noop.toml");
    std::fs::write(
        &spec,
        "name = \"tls\"\nstages = [\"noop\"]\n[noop]\njobs = 5\noutput_bytes = 16",
    )
    .unwrap();
    let mut c = Command::new(dagfleet_bin());
    c.args(["up", "--run"])
        .arg(&spec)
        .env("DAGFLEET_NATS__URL", url)
        .env("DAGFLEET_NATS__CONNECT_TIMEOUT", "5s")
        .env("DAGFLEET_UP__DATA_DIR", dir.path().join(".dagfleet"))
        .env("DAGFLEET_UP__ROLES", "[\"noop\"]")
        .env("DAGFLEET_COORDINATOR__RECONCILE_EVERY", "300ms");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_run_goes_through_a_server_that_requires_tls_and_client_certificates() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let d = |f: &str| certs.path().join(f).to_string_lossy().into_owned();

    // TLS required by the server; the client trusts the private CA.
    let tls = server(certs.path(), false);
    let url = format!("tls://127.0.0.1:{}", tls.port);
    let out = up_run(&url, &[("DAGFLEET_NATS__TLS_CA", d("ca.pem"))]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("done"), "{}", text(&out));
    // A plain nats:// URL to the same server works too once TLS is asked for in the config.
    let out = up_run(
        &format!("nats://127.0.0.1:{}", tls.port),
        &[
            ("DAGFLEET_NATS__TLS_CA", d("ca.pem")),
            ("DAGFLEET_NATS__TLS_REQUIRED", "true".into()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // Without the CA the server's certificate is not trusted: an error, not a panic.
    let out = up_run(&url, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    // A CA file that does not exist is named.
    let out = up_run(
        &url,
        &[("DAGFLEET_NATS__TLS_CA", "/nonexistent/ca.pem".into())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("nats.tls_ca"), "{}", text(&out));

    // The server also verifies client certificates.
    let verify = server(certs.path(), true);
    let url = format!("tls://127.0.0.1:{}", verify.port);
    let out = up_run(&url, &[("DAGFLEET_NATS__TLS_CA", d("ca.pem"))]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "without a client certificate: {}",
        text(&out)
    );
    let out = up_run(
        &url,
        &[
            ("DAGFLEET_NATS__TLS_CA", d("ca.pem")),
            ("DAGFLEET_NATS__TLS_CERT", d("client.pem")),
            ("DAGFLEET_NATS__TLS_KEY", d("client-key.pem")),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("done"), "{}", text(&out));
}

/// A server with the per-role permissions of `deploy/nats/permissions.conf` (one password
/// per identity: `pw-<user>`).
fn server_with_permissions(dir: &Path) -> NatsServer {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/permissions.conf");
    let rules = std::fs::read_to_string(rules).unwrap();
    // The passwords are defined in the same file: an included file does not see them.
    let mut conf = String::new();
    for who in [
        "coordinator",
        "miner",
        "synthesizer",
        "trainer",
        "inference",
        "judge",
        "noop",
    ] {
        conf.push_str(&format!(
            "DAGFLEET_{}_PASSWORD: \"pw-{who}\"\n",
            who.to_uppercase()
        ));
    }
    conf.push_str(&rules);
    let main = dir.join("main.conf");
    std::fs::write(&main, conf).unwrap();
    NatsServer::start_with(&["-c", main.to_str().unwrap()])
}

fn as_user(nats: &NatsServer, user: &str) -> dagfleet_runtime::NatsConfig {
    let mut c = nats.config();
    c.user = Some(user.into());
    c.password = Some(dagfleet_runtime::Secret::new(format!("pw-{user}")));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_role_permissions_let_a_worker_do_its_job_and_nothing_else() {
    dagfleet_tests::set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    use dagfleet_protocol::subjects;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let nats = server_with_permissions(dir.path());
    let (store_dir, store) = temp_store();
    // The coordinator (all rights) sets up the topology and runs the run.
    let stack = Stack::start(&as_user(&nats, "coordinator"), store.clone(), 1, 0).await;
    // A noop worker process with only the noop role's rights.
    let worker = Proc::spawn(
        &["worker", "--role", "noop"],
        &[
            ("DAGFLEET_NATS__URL", &nats.url()),
            ("DAGFLEET_NATS__USER", "noop"),
            ("DAGFLEET_NATS__PASSWORD", "pw-noop"),
            ("DAGFLEET_STORE__URL", store_dir.path().to_str().unwrap()),
            ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms"),
        ],
        None,
    );
    let run = stack
        .submit("name = \"perm\"\nstages = [\"noop\"]\n[noop]\njobs = 20\noutput_bytes = 16")
        .await;
    let st = wait_run(&stack.bus, &run, Duration::from_secs(60)).await;
    assert_eq!(
        st.status,
        dagfleet_protocol::RunStatus::Done,
        "{:?}",
        st.error
    );
    // Its heartbeat landed under its role's key.
    let mut keys = stack.bus.workers().keys().await.unwrap();
    let mut seen = Vec::new();
    while let Some(Ok(k)) = futures::StreamExt::next(&mut keys).await {
        seen.push(k);
    }
    assert!(seen.iter().any(|k| k.starts_with("noop.")), "{seen:?}");

    // The same identity, by hand: every forgery is refused by the server.
    let client =
        async_nats::ConnectOptions::with_user_and_password("noop".into(), "pw-noop".into())
            .connect(nats.url())
            .await
            .unwrap();
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let jobs_before = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let forged_job = async {
        js.publish("dagfleet.jobs.noop.noop", "forged".into())
            .await?
            .await
    };
    assert!(forged_job.await.is_err(), "a worker published a job");
    let forged_state = async {
        js.publish("$KV.dagfleet_runs.perm-x", "forged".into())
            .await?
            .await
    };
    assert!(forged_state.await.is_err(), "a worker wrote run state");
    let other_role = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("dagfleet-miner".into()),
            filter_subject: "dagfleet.jobs.miner.>".into(),
            ..Default::default()
        })
        .await;
    assert!(other_role.is_err(), "a noop worker took the miner's queue");
    let wide = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("dagfleet-noop".into()),
            filter_subject: "dagfleet.jobs.>".into(),
            ..Default::default()
        })
        .await;
    assert!(
        wide.is_err(),
        "a noop worker widened its consumer to every job"
    );
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "EVIL".into(),
            subjects: vec!["evil.>".into()],
            ..Default::default()
        })
        .await;
    assert!(stream.is_err(), "a worker created a stream");
    let after = stack
        .bus
        .jetstream()
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(after, jobs_before, "the forged job reached the queue");
    let (st, _) = dagfleet_coordinator::load_run(&stack.bus, &run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.status, dagfleet_protocol::RunStatus::Done);
    assert!(dagfleet_coordinator::load_run(
        &stack.bus,
        &dagfleet_protocol::RunId::new("perm-x").unwrap()
    )
    .await
    .unwrap()
    .is_none());

    // A worker given another role's identity cannot act as this role: it writes no
    // heartbeat under the role's key (and so is never counted as a noop worker), whether it
    // stops with an error or keeps retrying.
    let noop_keys = || async {
        let mut keys = stack.bus.workers().keys().await.unwrap();
        let mut n = 0;
        while let Some(Ok(k)) = futures::StreamExt::next(&mut keys).await {
            n += usize::from(k.starts_with("noop."));
        }
        n
    };
    let before = noop_keys().await;
    let wrong = Proc::spawn(
        &["worker", "--role", "noop"],
        &[
            ("DAGFLEET_NATS__URL", &nats.url()),
            ("DAGFLEET_NATS__USER", "miner"),
            ("DAGFLEET_NATS__PASSWORD", "pw-miner"),
            ("DAGFLEET_STORE__URL", store_dir.path().to_str().unwrap()),
            ("DAGFLEET_WORKER__HEARTBEAT_EVERY", "500ms"),
        ],
        None,
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        noop_keys().await,
        before,
        "a worker with the miner's identity registered as noop"
    );
    wrong.term();
    worker.term();
    stack.stop().await;
}
