//! The OpenAI-compatible server over a real model (SmolLM2-135M on CPU): SSE streaming,
//! completions, models, health, metrics, overload and client disconnects.

#![allow(clippy::unwrap_used)]

use dagfleet_inference::*;
use dagfleet_tests::smollm2 as model_path;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn start(cfg: EngineConfig) -> (String, Engine) {
    let (model, codec) = load(&model_path(), &candle_core::Device::Cpu).unwrap();
    let engine = Engine::start(model, codec, cfg, "smollm2".into());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let e = engine.clone();
    tokio::spawn(async move {
        server::serve(l, e, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap()
    });
    (url, engine)
}

fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn chat_streams_server_sent_events_equal_to_the_full_answer() {
    let (url, _e) = start(EngineConfig::default()).await;
    let c = reqwest::Client::new();
    let req = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
        "max_tokens": 48, "temperature": 0,
    });
    let full: Value = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("def "), "{full}");
    assert!(full["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(full["timings"]["ttft_ms"].as_f64().unwrap() > 0.0);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let resp = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&sreq)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        full["choices"][0]["finish_reason"]
    );
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // Completions, models, health, metrics.
    let comp: Value = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(comp["choices"][0]["finish_reason"], "length");
    let models: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    // The engine frees the last sequence at its next step, just after the answer is sent.
    let t0 = std::time::Instant::now();
    let health = loop {
        let h: Value = c
            .get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["status"] != "busy" || t0.elapsed() > Duration::from_secs(10) {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health["status"], "ok", "{health}");
    let metrics = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dagfleet_infer_requests_total 3"),
        "{metrics}"
    );
    // Bad requests name the problem.
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("serves `smollm2`"));
}

#[tokio::test]
async fn overload_answers_429_at_once_and_disconnects_free_their_slot() {
    let (url, e) = start(EngineConfig {
        max_batch: 1,
        kv_budget_tokens: 100_000,
        max_queue: 1,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let long = json!({
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 4000, "temperature": 0, "stream": true,
    });
    // One streaming request runs; read its first chunk, then hang up.
    let mut resp = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    // The next fills the queue; the one after is refused with retry-after, immediately.
    let queued = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        let mut body = long.clone();
        body["stream"] = json!(false);
        body["max_tokens"] = json!(4);
        async move {
            c.post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let t0 = Instant::now();
    while e.stats.waiting.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(resp);
    // The dropped stream frees its slot, so the queued request runs and finishes.
    assert_eq!(queued.await.unwrap(), 200);
    assert_eq!(e.stats.disconnected.load(Ordering::Relaxed), 1);
    assert!(e.stats.generated_tokens.load(Ordering::Relaxed) < 4000);
}

#[tokio::test]
async fn bad_requests_get_openai_error_json_naming_the_field() {
    let (url, engine) = start(EngineConfig::default()).await;
    let c = reqwest::Client::new();
    let msg = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"messages": msg, "temperature": -5}), "temperature"),
        (json!({"messages": msg, "top_p": 7}), "top_p"),
        (json!({"messages": msg, "max_tokens": 0}), "max_tokens"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (json!({"messages": "not a list"}), "messages"),
        (json!({"max_tokens": 4}), "messages"),
    ];
    for (body, field) in cases {
        let r = c
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(field), "{body}: {m}");
    }
    // Not JSON at all, and a completion with a bad setting.
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "x", "temperature": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Nothing refused reached the engine.
    assert_eq!(engine.stats.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_lone_disconnect_brings_the_running_gauge_back_to_zero() {
    let (url, e) = start(EngineConfig::default()).await;
    let c = reqwest::Client::new();
    let mut resp = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 4000, "temperature": 0, "stream": true,
        }))
        .send()
        .await
        .unwrap();
    resp.chunk().await.unwrap().unwrap();
    drop(resp);
    let t0 = Instant::now();
    while e.stats.disconnected.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the disconnect was never seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // With nobody else waiting the engine idles; its gauges must say so (it used to keep
    // `running 1` while blocked waiting for the next request).
    while e.stats.running.load(Ordering::Relaxed) != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "running stayed at 1"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h: Value = c
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["running"], 0, "{h}");
}

/// A prompt of about 3,000 tokens: seconds of prefill for SmolLM2 on CPU.
fn long_prompt() -> Value {
    json!({
        "messages": [{"role": "user", "content": "hello ".repeat(3000)}],
        "max_tokens": 16, "temperature": 0,
    })
}

async fn health(c: &reqwest::Client, url: &str) -> Value {
    c.get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_long_prompt_neither_blocks_a_short_request_nor_outlives_its_deadline() {
    let (url, e) = start(EngineConfig {
        prefill_chunk: 32,
        deadline: Duration::from_secs(4),
        max_batch: 2,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let long = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .json(&long_prompt())
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap(), Instant::now())
        })
    };
    // Once the long prompt is being prefilled, health says so, and a short request is
    // answered between its chunks.
    let t0 = Instant::now();
    while e.stats.prefilling.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "never prefilling");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h = health(&c, &url).await;
    assert_eq!(h["status"], "busy", "{h}");
    assert_eq!(h["prefilling"], 1, "{h}");
    let short: Value = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let short_done = Instant::now();
    assert_eq!(short["usage"]["completion_tokens"], 3, "{short}");
    assert_eq!(
        e.stats.prefilling.load(Ordering::Relaxed),
        1,
        "the long prompt finished first"
    );
    // The long one ends at its deadline with OpenAI's error shape, and frees the engine.
    let (status, body, long_done) = long.await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["type"], "timeout", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inference.engine.deadline"),
        "{body}"
    );
    assert!(short_done < long_done);
    assert_eq!(e.stats.expired.load(Ordering::Relaxed), 1);
    assert!(e.stats.prefill_chunks.load(Ordering::Relaxed) > 2);
    let h = health(&c, &url).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["prefilling"], 0, "{h}");
}

#[tokio::test]
async fn a_client_that_leaves_during_a_long_prefill_frees_the_engine() {
    // No deadline: only the disconnect can end it.
    let (url, e) = start(EngineConfig {
        prefill_chunk: 32,
        deadline: Duration::ZERO,
        max_batch: 2,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let client = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            c.post(format!("{url}/v1/chat/completions"))
                .json(&long_prompt())
                .send()
                .await
        })
    };
    let t0 = Instant::now();
    while e.stats.prefilling.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "never prefilling");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client goes away mid-prefill: its connection closes with the task.
    client.abort();
    let _ = client.await;
    // Cancelled between two chunks: far sooner than the prompt's prefill would take.
    let t0 = Instant::now();
    loop {
        let h = health(&c, &url).await;
        if h["status"] == "ok" {
            assert_eq!(h["prefilling"], 0, "{h}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "still busy: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(e.stats.disconnected.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats.generated_tokens.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn health_reports_a_stalled_engine() {
    // A stall threshold shorter than one prefill chunk of this prompt: the engine has work
    // and no step finished within it.
    let (url, e) = start(EngineConfig {
        prefill_chunk: 8192,
        stall_after: Duration::from_millis(200),
        deadline: Duration::ZERO,
        max_batch: 2,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let req = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            c.post(format!("{url}/v1/chat/completions"))
                .timeout(Duration::from_secs(60))
                .json(&long_prompt())
                .send()
                .await
        })
    };
    let t0 = Instant::now();
    let r = loop {
        let r = c.get(format!("{url}/health")).send().await.unwrap();
        if r.status() == 503 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let h: Value = r.json().await.unwrap();
    assert_eq!(h["status"], "stalled", "{h}");
    assert!(h["ms_since_last_step"].as_u64().unwrap() > 200, "{h}");
    req.abort();
    drop(e);
}
