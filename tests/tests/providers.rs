//! The provider layer against loopback servers that speak the Anthropic and OpenAI APIs.

#![allow(clippy::unwrap_used)]

use dagfleet_providers::{
    BatchState, ChatRequest, Outcome, Provider, ProviderConfig, ProviderError, ProviderKind,
};
use dagfleet_runtime::Secret;
use dagfleet_tests::teacher::{Fault, Teacher};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn provider(t: &Teacher, kind: ProviderKind, retries: u32) -> Provider {
    let mut cfg = ProviderConfig::new(kind, Some(t.url.clone()));
    cfg.backoff = Duration::from_millis(5);
    cfg.max_retries = retries;
    cfg.timeout = Duration::from_secs(10);
    cfg.batch = Some(true);
    Provider::new("t", cfg).unwrap()
}

fn req(id: &str) -> ChatRequest {
    ChatRequest::user(
        id,
        Some("You write requests.".into()),
        format!("Here is a DAG:\nwith DAG(\"{id}\") as dag: pass\nWrite 3 different instructions for it."),
    )
}

#[tokio::test]
async fn retries_429_5xx_and_malformed_bodies_then_succeeds() {
    let t = Teacher::start().await;
    for kind in [ProviderKind::Anthropic, ProviderKind::Openai] {
        let p = provider(&t, kind, 6);
        t.fail_next([
            Fault::RateLimited(1),
            Fault::ServerError,
            Fault::Malformed,
            Fault::Html,
            Fault::Empty,
        ]);
        let before = t.state.http_requests.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let rep = p.chat("m", &req("etl")).await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(950),
            "retry-after: 1 was honoured"
        );
        assert_eq!(t.state.http_requests.load(Ordering::SeqCst) - before, 6);
        assert!(rep.text.contains("etl"), "{}", rep.text);
        assert_eq!(rep.finish_reason, "stop");
        assert!(rep.usage.input_tokens > 0 && rep.usage.output_tokens > 0);
    }
}

#[tokio::test]
async fn client_errors_are_fatal_with_the_servers_message() {
    let t = Teacher::start().await;
    let p = provider(&t, ProviderKind::Anthropic, 6);
    t.fail_next([Fault::BadRequest("max_tokens: 100000 > 8192".into())]);
    let before = t.state.http_requests.load(Ordering::SeqCst);
    let e = p.chat("m", &req("x")).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Refused { status: 400, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("max_tokens: 100000 > 8192"), "{e}");
    assert_eq!(
        t.state.http_requests.load(Ordering::SeqCst) - before,
        1,
        "no retry"
    );

    let p = provider(&t, ProviderKind::Openai, 2);
    t.fail_next([Fault::ServerError, Fault::Html, Fault::ServerError]);
    let e = p.chat("m", &req("x")).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Exhausted { attempts: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("Internal server error"), "{e}");

    t.fail_next([Fault::Html, Fault::Html, Fault::Html]);
    let e = p.chat("m", &req("x")).await.unwrap_err();
    assert!(
        e.to_string().contains("502 Bad Gateway"),
        "an HTML error page is named: {e}"
    );
    t.fail_next([Fault::Empty, Fault::Empty, Fault::Empty]);
    let e = p.chat("m", &req("x")).await.unwrap_err();
    assert!(e.to_string().contains("empty body"), "{e}");
}

#[tokio::test]
async fn keys_come_from_config_file_or_environment_and_never_leak() {
    let t = Teacher::start().await;
    *t.state.key.lock().unwrap() = Some("sk-test-0123456789".into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "sk-test-0123456789\n").unwrap();
    for kind in [ProviderKind::Anthropic, ProviderKind::Openai] {
        let mut cfg = ProviderConfig::new(kind, Some(t.url.clone()));
        cfg.api_key_env = Some("DAGFLEET_TEST_NO_SUCH_VAR".into());
        let e = Provider::new("t", cfg.clone())
            .unwrap()
            .chat("m", &req("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProviderError::Refused { status: 401, .. }),
            "{e}"
        );
        cfg.api_key_file = Some(file.clone());
        let p = Provider::new("t", cfg.clone()).unwrap();
        p.chat("m", &req("a")).await.unwrap();
        assert!(!format!("{p:?}").contains("0123456789"));
        cfg.api_key_file = None;
        cfg.api_key = Some(Secret::new("sk-test-0123456789"));
        Provider::new("t", cfg)
            .unwrap()
            .chat("m", &req("a"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn batch_lifecycle_with_mixed_results() {
    let t = Teacher::start().await;
    t.state.batch_ms.store(300, Ordering::SeqCst);
    for kind in [ProviderKind::Anthropic, ProviderKind::Openai] {
        t.state
            .error_once
            .lock()
            .unwrap()
            .insert(format!("{kind:?}-r1"));
        t.state
            .expire_once
            .lock()
            .unwrap()
            .insert(format!("{kind:?}-r2"));
        let p = provider(&t, kind, 3);
        let reqs: Vec<ChatRequest> = (0..4).map(|i| req(&format!("{kind:?}-r{i}"))).collect();
        assert_eq!(p.batch_ranges("m", &reqs), vec![0..4]);
        let id = p.create_batch("m", &reqs, "job-1").await.unwrap();
        let st = p.batch_status(&id).await.unwrap();
        assert_eq!(st.state, BatchState::InProgress);
        assert_eq!(st.total, 4);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let st = p.batch_status(&id).await.unwrap();
        assert_eq!(st.state, BatchState::Ended, "{kind:?}");
        let mut res = p.batch_results(&id).await.unwrap();
        res.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(res.len(), 4, "{kind:?}: {res:?}");
        assert!(matches!(res[0].1, Outcome::Ok(ref r) if r.text.contains("r0")));
        assert!(
            matches!(res[1].1, Outcome::Errored(_)),
            "{kind:?}: {:?}",
            res[1]
        );
        assert_eq!(res[2].1, Outcome::Expired, "{kind:?}");
        assert!(matches!(res[3].1, Outcome::Ok(_)));
    }
    // A batch created but never recorded is found again by its tag (OpenAI keeps metadata);
    // cancelled ones are not adopted, and Anthropic has no metadata to search.
    let p = provider(&t, ProviderKind::Openai, 3);
    let id = p
        .create_batch("m", &[req("f0")], "job-9/0-0")
        .await
        .unwrap();
    assert_eq!(p.find_batch("job-9/0-0").await.unwrap(), Some(id.clone()));
    assert_eq!(p.find_batch("job-9/1-0").await.unwrap(), None);
    p.cancel_batch(&id).await.unwrap();
    assert_eq!(p.find_batch("job-9/0-0").await.unwrap(), None);
    assert_eq!(
        provider(&t, ProviderKind::Anthropic, 3)
            .find_batch("job-9/0-0")
            .await
            .unwrap(),
        None
    );
    // Cancelling a batch that never ends.
    t.state.never_end.store(true, Ordering::SeqCst);
    let p = provider(&t, ProviderKind::Anthropic, 3);
    let id = p.create_batch("m", &[req("c0")], "job-2").await.unwrap();
    p.cancel_batch(&id).await.unwrap();
    let st = p.batch_status(&id).await.unwrap();
    assert_eq!(st.state, BatchState::Ended);
    let res = p.batch_results(&id).await.unwrap();
    assert_eq!(res[0].1, Outcome::Canceled);
    assert_eq!(t.state.batches_cancelled.load(Ordering::SeqCst), 2);
}

/// The provider layer against dagfleet's own OpenAI-compatible server with a small real
/// model (SmolLM2-135M on CPU), so the synthesize stage can run offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_provider_against_dagfleets_own_server() {
    let path = dagfleet_tests::smollm2();
    let (model, codec) = dagfleet_inference::load(&path, &candle_core::Device::Cpu).unwrap();
    let engine = dagfleet_inference::Engine::start(
        model,
        codec,
        dagfleet_inference::EngineConfig::default(),
        "smollm2".into(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    tokio::spawn(dagfleet_inference::server::serve(
        l,
        engine,
        tokio_util::sync::CancellationToken::new(),
    ));
    let mut cfg = ProviderConfig::new(ProviderKind::Openai, Some(url));
    cfg.api_key_env = Some("DAGFLEET_TEST_NO_SUCH_VAR".into());
    let p = Provider::new("local", cfg).unwrap();
    assert!(
        !p.supports_batch(),
        "a local server has no batch API by default"
    );
    let mut r = ChatRequest::user(
        "x",
        None,
        "Write one sentence describing an Airflow DAG that loads data daily.".into(),
    );
    r.max_tokens = 32;
    r.temperature = Some(0.0);
    let rep = p.chat("smollm2", &r).await.unwrap();
    assert!(!rep.text.trim().is_empty());
    assert!(["stop", "length"].contains(&rep.finish_reason.as_str()));
    assert!(rep.usage.input_tokens > 10 && rep.usage.output_tokens > 0);
    // Greedy is deterministic, so a second identical request gives the same text.
    assert_eq!(p.chat("smollm2", &r).await.unwrap().text, rep.text);
    // The server's errors come back as the provider's fatal errors, with its message.
    let e = p.chat("gpt-9", &r).await.unwrap_err();
    assert!(e.to_string().contains("serves `smollm2`"), "{e}");
}
