//! The inference batch job end to end through the coordinator: `dagfleet up --run` with an
//! infer → judge spec, a real model (SmolLM2-135M from PyPI, on CPU), prompts uploaded with
//! the run, generations judged.

#![allow(clippy::unwrap_used)]

use dagfleet_tests::*;

#[test]
fn an_infer_then_judge_run_goes_through_the_coordinator() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let sys =
        "You are an expert Apache Airflow engineer. Write complete, correct Airflow DAG files.";
    let rows: Vec<String> = [
        "Write an Airflow DAG that runs a bash command every day.",
        "Write an Airflow DAG with two Python tasks, one after the other.",
        "Write an Airflow DAG that prints hello.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| {
        serde_json::json!({"id": format!("p{i}"), "messages": [
            {"role": "system", "content": sys}, {"role": "user", "content": p}]})
        .to_string()
    })
    .collect();
    std::fs::write(&prompts, rows.join("\n") + "\n").unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"infer-judge\"\nstages = [\"infer\", \"judge\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[infer]\nprompts = \"{}\"\nmax_tokens = 48\nbatch_rows = 2\n",
            smollm2().display(),
            prompts.display()
        ),
    )
    .unwrap();
    let (_, _, run) = up_run(dir.path(), &spec);
    let artifacts = dir.path().join(".dagfleet/artifacts");
    assert!(
        run.join("inputs/prompts.jsonl").exists(),
        "the prompts travelled with the run"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let jobs = m["jobs"].as_array().unwrap();
    let infer: Vec<_> = jobs.iter().filter(|j| j["stage"] == "infer").collect();
    assert_eq!(infer.len(), 2, "3 prompts in batches of 2");
    let mut generated = Vec::new();
    for j in &infer {
        let key = j["outputs"][0]["key"].as_str().unwrap();
        assert!(key.ends_with("generations.jsonl"));
        for l in std::fs::read_to_string(artifacts.join(key))
            .unwrap()
            .lines()
        {
            generated.push(serde_json::from_str::<serde_json::Value>(l).unwrap());
        }
    }
    assert_eq!(generated.len(), 3);
    for g in &generated {
        assert_eq!(g["system_prompt"], sys);
        assert!(g["output"].as_str().unwrap().len() > 10, "{g}");
        assert!(["stop", "length"].contains(&g["finish_reason"].as_str().unwrap()));
        assert!(g["ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(g["generated_tokens"].as_u64().unwrap() > 0);
    }
    let judged: f64 = jobs
        .iter()
        .filter(|j| j["stage"] == "judge")
        .map(|j| j["metrics"]["rows"].as_f64().unwrap())
        .sum();
    assert_eq!(judged, 3.0, "every generation was judged");
}

/// The DAG agent as a job kind: `infer.repair` runs the repair loop in the inference
/// workers beside the single-shot generations, through the coordinator; the judge judges
/// both sets of rows and the report sets them side by side.
#[test]
fn the_repair_loop_runs_through_the_coordinator_and_the_report_compares_it() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let rows: Vec<String> = [
        "Write an Airflow DAG that runs a bash command every day.\n\nAirflow Version: 2.10.5",
        "Write an Airflow DAG that prints hello.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| {
        serde_json::json!({"id": format!("p{i}"), "messages": [{"role": "user", "content": p}]})
            .to_string()
    })
    .collect();
    std::fs::write(&prompts, rows.join("\n") + "\n").unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"agent\"\nstages = [\"infer\", \"judge\", \"report\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[infer]\nprompts = \"{}\"\nmax_tokens = 40\nrepair = 1\n",
            smollm2().display(),
            prompts.display()
        ),
    )
    .unwrap();
    let (_, _, run) = up_run(dir.path(), &spec);
    let artifacts = dir.path().join(".dagfleet/artifacts");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let jobs = m["jobs"].as_array().unwrap();
    let mut rows = Vec::new();
    for j in jobs.iter().filter(|j| j["stage"] == "infer") {
        let key = j["outputs"][0]["key"].as_str().unwrap();
        for l in std::fs::read_to_string(artifacts.join(key))
            .unwrap()
            .lines()
        {
            rows.push(serde_json::from_str::<serde_json::Value>(l).unwrap());
        }
    }
    let model = smollm2().display().to_string();
    let single: Vec<_> = rows
        .iter()
        .filter(|r| r["model"] == model.as_str())
        .collect();
    let repaired: Vec<_> = rows
        .iter()
        .filter(|r| r["model"] == format!("{model} + repair (1)").as_str())
        .collect();
    assert_eq!((single.len(), repaired.len()), (2, 2), "{rows:?}");
    for r in &repaired {
        let n = r["attempts"].as_u64().unwrap();
        let valid = r["attempts_valid"].as_array().unwrap();
        assert_eq!(valid.len() as u64, n);
        // A first attempt the judge passed ends the loop; a refused one gets its repair turn.
        assert_eq!(n, if valid[0] == true { 1 } else { 2 }, "{r}");
        let first = single.iter().find(|s| s["id"] == r["id"]).unwrap();
        if r["best_attempt"] == 1 {
            assert_eq!(
                r["output"], first["output"],
                "attempt 1 is the single-shot answer"
            );
        }
        assert!(
            r["generated_tokens"].as_u64().unwrap() >= first["generated_tokens"].as_u64().unwrap()
        );
    }
    let judged: f64 = jobs
        .iter()
        .filter(|j| j["stage"] == "judge")
        .map(|j| j["metrics"]["rows"].as_f64().unwrap())
        .sum();
    assert_eq!(judged, 4.0, "single-shot and repaired rows were judged");
    let report_job = jobs.iter().find(|j| j["stage"] == "report").unwrap();
    let key = report_job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .find(|k| k.ends_with("report.md"))
        .unwrap();
    let report = std::fs::read_to_string(artifacts.join(key)).unwrap();
    assert!(
        report.contains("With up to 1 repair turns, ") && report.contains("single-shot"),
        "{report}"
    );
}

/// `dagfleet generate` against a real `dagfleet serve` (SmolLM2 on CPU): every attempt is a
/// real generation judged by the static judge, a failed one is answered with a repair turn
/// (the server sees one request per attempt), the best attempt is written out, and a server
/// that is down is a clear error.
#[test]
fn dagfleet_generate_judges_and_repairs_against_a_served_model() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let (serve, url) = serve_smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("dag.py");
    let out = std::process::Command::new(dagfleet_bin())
        .args([
            "generate",
            "Write an Airflow DAG named hello that runs one BashOperator task every day.",
            "--url",
            &url,
            "--attempts",
            "2",
            "--max-tokens",
            "160",
            "--json",
            "-o",
        ])
        .arg(&out_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    let attempts = r["attempts"].as_array().unwrap();
    let valid = r["valid"].as_bool().unwrap();
    assert_eq!(
        out.status.code(),
        Some(if valid { 0 } else { 1 }),
        "{stderr}"
    );
    // A valid first attempt ends the loop; otherwise the repair turn ran.
    assert_eq!(
        attempts.len(),
        if attempts[0]["valid"] == true { 1 } else { 2 },
        "{r}"
    );
    assert!(stderr.contains("attempt 1:"), "{stderr}");
    for a in attempts {
        assert!(a["completion_tokens"].as_u64().unwrap() > 0, "{a}");
        assert!(a["verdict"]["findings"].is_array());
    }
    let best = r["best"].as_u64().unwrap() as usize;
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap(),
        attempts[best - 1]["code"].as_str().unwrap()
    );
    assert!(r["total_tokens"].as_u64().unwrap() > 0);
    // The server answered one chat request per attempt.
    let metrics = http_get(&format!("{url}/metrics"));
    assert!(
        metrics.contains(&format!("dagfleet_infer_requests_total {}", attempts.len())),
        "{metrics}"
    );
    serve.term();

    // A server that is down: exit 2 and a message that says where and what to do.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = std::process::Command::new(dagfleet_bin())
        .args(["generate", "x", "--url", &dead])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no model server at") && err.contains("dagfleet serve"),
        "{err}"
    );
}

/// `dagfleet serve` runs the agent itself: `POST /v1/dags` answers the loop's result as
/// JSON, and the model name `dagfleet-agent` on `/v1/chat/completions` gives any OpenAI
/// client the best DAG, while the served model keeps answering as before.
#[test]
fn dagfleet_serve_answers_v1_dags_and_the_dagfleet_agent_model() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let (serve, url) = serve_smollm2();
    let (status, body) = http_post(
        &format!("{url}/v1/dags"),
        r#"{"instruction": "Write an Airflow DAG named hello with one BashOperator task.", "max_attempts": 2, "max_tokens": 120}"#,
    );
    assert_eq!(status, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let attempts = r["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        if attempts[0]["valid"] == true { 1 } else { 2 },
        "{r}"
    );
    let best = r["best"].as_u64().unwrap() as usize;
    assert_eq!(r["dag"], attempts[best - 1]["code"]);
    assert_eq!(r["valid"], attempts[best - 1]["valid"]);
    assert!(attempts[0]["completion_tokens"].as_u64().unwrap() > 0);

    // Bad requests name the field and its limit; nothing reaches the model.
    let (status, body) = http_post(
        &format!("{url}/v1/dags"),
        r#"{"instruction": "x", "max_attempts": 50}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("max_attempts 50 is out of range: 1 to 10"),
        "{body}"
    );
    let (status, body) = http_post(
        &format!("{url}/v1/dags"),
        r#"{"instruction": "x", "airflow_version": "seven"}"#,
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = http_post(&format!("{url}/v1/dags"), r#"{"prompt": "x"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("instruction"), "{body}");

    // The agent as a model name, for OpenAI clients.
    let models = http_get(&format!("{url}/v1/models"));
    assert!(
        models.contains("\"dagfleet-agent\"") && models.contains("SmolLM2"),
        "{models}"
    );
    let (status, body) = http_post(
        &format!("{url}/v1/chat/completions"),
        r#"{"model": "dagfleet-agent", "max_tokens": 120, "messages": [{"role": "user", "content": "Write an Airflow DAG named hi with one PythonOperator."}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["model"], "dagfleet-agent");
    assert!(
        c["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("```python\n"),
        "{c}"
    );
    let n = c["dagfleet_agent"]["attempts"].as_u64().unwrap();
    assert!((1..=3).contains(&n), "{c}");
    assert!(c["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let (status, body) = http_post(
        &format!("{url}/v1/chat/completions"),
        r#"{"model": "dagfleet-agent", "messages": [{"role": "system", "content": "no user turn"}]}"#,
    );
    assert_eq!(status, 400, "{body}");
    // The served model answers as before, through the same router.
    let (status, body) = http_post(
        &format!("{url}/v1/chat/completions"),
        r#"{"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["object"],
        "chat.completion"
    );
    // 1 + 1..=3 + 1 requests reached the engine (2 of /v1/dags at most).
    let metrics = http_get(&format!("{url}/metrics"));
    let reqs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dagfleet_infer_requests_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(reqs, attempts.len() as u64 + n + 1, "{metrics}");
    serve.term();
}

/// A POST of JSON over a plain TCP socket: the status and the body.
fn http_post(url: &str, json: &str) -> (u16, String) {
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        json.len()
    );
    http_request("POST", url, &headers, json)
}

/// One HTTP/1.1 request over a plain TCP socket, with extra header lines; returns the
/// status and the body.
fn http_request(method: &str, url: &str, headers: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A GET over a plain TCP socket (the test crate has no HTTP client).
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// `dagfleet mcp` driven by the official MCP Python SDK (`tests/mcp/client.py`, `mcp` from
/// PyPI, installed by tests/run.sh) over stdio and streamable HTTP, with a real
/// `dagfleet serve` (SmolLM2 on CPU) behind `generate_dag` and `list_models`, and with the
/// model server down.
#[test]
fn the_mcp_server_answers_the_official_python_client() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let (serve, url) = serve_smollm2();
    let python = std::env::var("DAGFLEET_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp/client.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(dagfleet_bin())
        .arg(&url)
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .arg(free_port().to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("mcp ok"), "{stdout}\n{stderr}");
    serve.term();
}

/// A GET with extra header lines; returns the status and the body.
fn http_get_with(url: &str, headers: &str) -> (u16, String) {
    http_request("GET", url, headers, "")
}

/// `dagfleet serve` and `dagfleet mcp --http` refuse to listen beyond loopback without an
/// API key (before loading anything); with `http.api_key` every route but /health takes
/// it as a bearer token, and `dagfleet generate` sends it.
#[test]
fn servers_beyond_loopback_need_an_api_key_and_check_it() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let model = smollm2();
    let model = model.to_str().unwrap();
    let port = free_port().to_string();
    for args in [
        vec!["serve", model, "--addr", &format!("0.0.0.0:{port}")],
        vec!["mcp", "--http", &format!("0.0.0.0:{port}")],
    ] {
        let out = std::process::Command::new(dagfleet_bin())
            .args(&args)
            .env_remove("DAGFLEET_HTTP__API_KEY")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started without a key");
        assert!(
            err.contains("refusing to listen on 0.0.0.0") && err.contains("--insecure-no-auth"),
            "{args:?}: {err}"
        );
    }

    let port = free_port();
    let key = "k3y-for-the-test";
    let _serve = Proc::spawn(
        &["serve", model, "--addr", &format!("127.0.0.1:{port}")],
        &[
            ("DAGFLEET_INFERENCE__DEVICE", "cpu"),
            ("DAGFLEET_HTTP__API_KEY", key),
        ],
        None,
    );
    let url = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed().as_secs() < 60, "dagfleet serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (status, body) = http_get_with(&format!("{url}/health"), "");
    assert_eq!(status, 200, "/health stays open for probes: {body}");
    let (status, body) = http_get_with(&format!("{url}/v1/models"), "");
    assert_eq!(status, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_api_key", "{body}");
    let (status, _) = http_get_with(
        &format!("{url}/v1/models"),
        "Authorization: Bearer not-the-key\r\n",
    );
    assert_eq!(status, 401);
    let (status, body) = http_get_with(
        &format!("{url}/v1/models"),
        &format!("Authorization: Bearer {key}\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(key));
    // The agent endpoint is behind the key too.
    let (status, _) = http_post(&format!("{url}/v1/dags"), "{\"instruction\": \"x\"}");
    assert_eq!(status, 401);
    // `dagfleet generate` sends http.api_key to the model server.
    let out = std::process::Command::new(dagfleet_bin())
        .args([
            "generate",
            "Write an Airflow DAG that prints hello.",
            "--url",
            &url,
            "--attempts",
            "1",
            "--max-tokens",
            "16",
        ])
        .env("DAGFLEET_HTTP__API_KEY", key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("401"), "{err}");
    assert!(!err.contains(key), "the key is never printed: {err}");
    let out = std::process::Command::new(dagfleet_bin())
        .args([
            "generate",
            "x",
            "--url",
            &url,
            "--attempts",
            "1",
            "--max-tokens",
            "8",
        ])
        .env_remove("DAGFLEET_HTTP__API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a client without the key is refused");
}
