//! NATS over TLS against real nats-server configs: a server that requires TLS (a private CA
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
