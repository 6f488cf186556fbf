//! The OpenAI-compatible HTTP server: `/v1/chat/completions` (with SSE streaming),
//! `/v1/completions`, `/v1/models`, `/health` and `/metrics` (Prometheus text).
//!
//! Overload answers 429 with `retry-after` at once; a client that disconnects mid-stream
//! drops its channel, and the engine frees its slot at the next token boundary.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

pub use dagfleet_agent::auth::Access;

use crate::engine::{collect, GenEvent, GenParams};
use crate::{ChatMessage, Engine, InferError};

/// The server's routes over `engine`.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(engine)
}

/// Serves `engine` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, router(engine), shutdown).await
}

/// Serves `app` (the engine's [`router`], with whatever was layered over it) on `listener`
/// until `shutdown`.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// `dagfleet serve`: loads `model` (a path, or a name in `inference.models_dir`) on the
/// configured device, binds `addr` (beyond loopback only with an API key, or when `access`
/// says insecure), prints where it serves, and serves until Ctrl-C. `extend` may layer more
/// routes over the engine's (the agent's `POST /v1/dags`); every route but `/health` then
/// takes the key.
pub async fn run<F>(
    settings: &crate::InferenceSettings,
    model: &str,
    addr: &str,
    access: &Access,
    extend: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Router, Engine) -> anyhow::Result<Router>,
{
    use crate::SettingsExt;
    use anyhow::Context;
    access.check_listen(addr).map_err(anyhow::Error::msg)?;
    let device = settings.device()?;
    let path = settings.resolve(model);
    let (m, codec) = crate::load_with(&path, &device, &settings.load_options())?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| model.to_string());
    let ctx = m.cfg.context;
    let engine = Engine::start(m, codec, settings.engine.clone(), name.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!(
        "serving {name} ({device:?}, context {ctx}, max_batch {}) on http://{}",
        settings.engine.max_batch,
        listener.local_addr()?
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s2.cancel();
    });
    let app = access.layer(extend(router(engine.clone()), engine)?);
    serve_router(listener, app, stop).await?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    /// vLLM's extension: generate through end-of-turn tokens (benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

impl Common {
    /// Sampling settings outside what OpenAI accepts are refused, naming the field and its
    /// range, rather than sampled with.
    fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("temperature {t} is out of range: 0 to 2"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p {p} is out of range: above 0, at most 1"));
            }
        }
        if let Some(0) = self.max_completion_tokens.or(self.max_tokens) {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    fn params(&self) -> GenParams {
        GenParams {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(256),
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            ignore_eos: self.ignore_eos,
        }
    }
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let mut r = (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    r
}

/// A body that is not JSON of the request's shape gets OpenAI's error JSON, not axum's text.
fn bad_body(r: JsonRejection) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        r.body_text(),
    )
}

/// Roles the chat template knows.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn infer_error(e: InferError) -> Response {
    match e {
        InferError::Request(m) => error(StatusCode::BAD_REQUEST, "invalid_request_error", m),
        InferError::Overloaded(m) => error(StatusCode::TOO_MANY_REQUESTS, "overloaded", m),
        InferError::Model(_) | InferError::Tensor(_) | InferError::Engine(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        ),
        InferError::Deadline(m) => error(StatusCode::GATEWAY_TIMEOUT, "timeout", m),
    }
}

/// The settings every endpoint shares: the model it names and the sampling ranges.
fn check_common(engine: &Engine, c: &Common) -> Option<Response> {
    if let Err(m) = c.validate() {
        return Some(error(StatusCode::BAD_REQUEST, "invalid_request_error", m));
    }
    match &c.model {
        Some(m) if !m.is_empty() && *m != engine.model_name => Some(error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "model `{m}` is not served here; this server serves `{}`",
                engine.model_name
            ),
        )),
        _ => None,
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

fn sse(
    rx: mpsc::UnboundedReceiver<GenEvent>,
    chunk: impl Fn(Option<&str>, Option<&str>) -> Value + Send + Sync + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let chunk = std::sync::Arc::new(chunk);
    let s = stream::unfold((rx, false), move |(mut rx, done)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(GenEvent::Delta(d)) => Some((
                    Event::default().data(chunk(Some(&d), None).to_string()),
                    (rx, false),
                )),
                Some(GenEvent::Done(_, st)) => {
                    let reason = serde_json::to_value(st.finish_reason)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_else(|| "stop".into());
                    let mut last = chunk(None, Some(&reason));
                    last["usage"] = json!({
                        "prompt_tokens": st.prompt_tokens,
                        "completion_tokens": st.generated_tokens,
                        "total_tokens": st.prompt_tokens + st.generated_tokens,
                    });
                    last["timings"] =
                        json!({"ttft_ms": st.ttft_ms, "decode_tok_s": st.decode_tok_s});
                    Some((Event::default().data(last.to_string()), (rx, true)))
                }
                Some(GenEvent::Error(e)) => Some((
                    Event::default()
                        .data(json!({"error": {"message": e, "type": "server_error"}}).to_string()),
                    (rx, true),
                )),
                Some(GenEvent::Deadline(e)) => Some((
                    Event::default()
                        .data(json!({"error": {"message": e, "type": "timeout"}}).to_string()),
                    (rx, true),
                )),
                None => None,
            }
        }
    });
    let s = futures::StreamExt::chain(
        futures::StreamExt::map(s, Ok),
        stream::once(async { Ok(Event::default().data("[DONE]")) }),
    );
    Sse::new(s).keep_alive(KeepAlive::default())
}

async fn chat(
    State(engine): State<Engine>,
    body: Result<Json<ChatBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(r) => return bad_body(r),
    };
    if let Some(r) = check_common(&engine, &body.common) {
        return r;
    }
    if body.messages.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages must not be empty".into(),
        );
    }
    if let Some((i, m)) = body
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "messages[{i}].role `{}` is not one of {}",
                m.role,
                ROLES.join(", ")
            ),
        );
    }
    let mut rx = match engine.submit_chat(&body.messages, body.common.params()) {
        Ok(rx) => rx,
        Err(e) => return infer_error(e),
    };
    let id = request_id("chatcmpl");
    let model = engine.model_name.clone();
    let created = now_s();
    if body.common.stream {
        let first = std::sync::atomic::AtomicBool::new(true);
        return sse(rx, move |delta, finish| {
            let mut d = json!({});
            if first.swap(false, Ordering::Relaxed) {
                d["role"] = json!("assistant");
            }
            if let Some(t) = delta {
                d["content"] = json!(t);
            }
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
            })
        })
        .into_response();
    }
    match collect(&mut rx).await {
        Ok((text, st)) => Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": st.finish_reason}],
            "usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens, "total_tokens": st.prompt_tokens + st.generated_tokens},
            "timings": {"ttft_ms": st.ttft_ms, "decode_tok_s": st.decode_tok_s},
        }))
        .into_response(),
        Err(e) => infer_error(e),
    }
}

async fn completions(
    State(engine): State<Engine>,
    body: Result<Json<CompletionBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(r) => return bad_body(r),
    };
    if let Some(r) = check_common(&engine, &body.common) {
        return r;
    }
    let ids = match engine.codec().encode(&body.prompt) {
        Ok(i) => i,
        Err(e) => return infer_error(e.into()),
    };
    let mut rx = match engine.submit(ids, body.common.params()) {
        Ok(rx) => rx,
        Err(e) => return infer_error(e),
    };
    let id = request_id("cmpl");
    let model = engine.model_name.clone();
    let created = now_s();
    if body.common.stream {
        return sse(rx, move |delta, finish| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish}],
            })
        })
        .into_response();
    }
    match collect(&mut rx).await {
        Ok((text, st)) => Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": st.finish_reason}],
            "usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens, "total_tokens": st.prompt_tokens + st.generated_tokens},
            "timings": {"ttft_ms": st.ttft_ms, "decode_tok_s": st.decode_tok_s},
        }))
        .into_response(),
        Err(e) => infer_error(e),
    }
}

async fn models(State(engine): State<Engine>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "dagfleet",
                  "context_length": engine.context()}],
    }))
    .into_response()
}

/// `ok` when idle or making progress; `stalled` (503) when the engine has work and no
/// step (a prefill chunk or a decode step) has finished for `inference.engine.stall_after`.
async fn health(State(engine): State<Engine>) -> Response {
    let s = &engine.stats;
    let busy = s.busy_for_ms();
    let stalled = busy.is_some_and(|ms| ms > engine.config().stall_after.as_millis() as u64);
    let body = Json(json!({
        "status": if stalled { "stalled" } else if busy.is_some() { "busy" } else { "ok" },
        "model": engine.model_name,
        "running": s.running.load(Ordering::Relaxed),
        "prefilling": s.prefilling.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "ms_since_last_step": busy.unwrap_or(0),
    }));
    if stalled {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        body.into_response()
    }
}

async fn metrics(State(engine): State<Engine>) -> Response {
    let s = &engine.stats;
    let c = engine.config();
    let body = format!(
        "# HELP dagfleet_infer_requests_total Requests accepted.\n# TYPE dagfleet_infer_requests_total counter\ndagfleet_infer_requests_total {}\n\
# HELP dagfleet_infer_rejected_total Requests refused (overload, too long).\n# TYPE dagfleet_infer_rejected_total counter\ndagfleet_infer_rejected_total {}\n\
# HELP dagfleet_infer_disconnected_total Requests whose client went away.\n# TYPE dagfleet_infer_disconnected_total counter\ndagfleet_infer_disconnected_total {}\n\
# HELP dagfleet_infer_prompt_tokens_total Prompt tokens processed.\n# TYPE dagfleet_infer_prompt_tokens_total counter\ndagfleet_infer_prompt_tokens_total {}\n\
# HELP dagfleet_infer_generated_tokens_total Tokens generated.\n# TYPE dagfleet_infer_generated_tokens_total counter\ndagfleet_infer_generated_tokens_total {}\n\
# HELP dagfleet_infer_decode_steps_total Batched decode steps.\n# TYPE dagfleet_infer_decode_steps_total counter\ndagfleet_infer_decode_steps_total {}\n\
# HELP dagfleet_infer_running Sequences decoding.\n# TYPE dagfleet_infer_running gauge\ndagfleet_infer_running {}\n\
# HELP dagfleet_infer_waiting Requests waiting.\n# TYPE dagfleet_infer_waiting gauge\ndagfleet_infer_waiting {}\n\
# HELP dagfleet_infer_prefilling Sequences whose prompt is being prefilled.\n# TYPE dagfleet_infer_prefilling gauge\ndagfleet_infer_prefilling {}\n\
# HELP dagfleet_infer_prefill_chunks_total Prefill chunks run.\n# TYPE dagfleet_infer_prefill_chunks_total counter\ndagfleet_infer_prefill_chunks_total {}\n\
# HELP dagfleet_infer_expired_total Requests ended by the deadline.\n# TYPE dagfleet_infer_expired_total counter\ndagfleet_infer_expired_total {}\n\
# HELP dagfleet_infer_preempted_total Sequences preempted for KV cache room (recomputed later).\n# TYPE dagfleet_infer_preempted_total counter\ndagfleet_infer_preempted_total {}\n\
# HELP dagfleet_infer_prefix_hit_tokens_total Prompt tokens found in the prefix cache.\n# TYPE dagfleet_infer_prefix_hit_tokens_total counter\ndagfleet_infer_prefix_hit_tokens_total {}\n\
# HELP dagfleet_infer_max_batch Most sequences per step.\n# TYPE dagfleet_infer_max_batch gauge\ndagfleet_infer_max_batch {}\n\
# HELP dagfleet_infer_kv_budget_tokens KV cache budget.\n# TYPE dagfleet_infer_kv_budget_tokens gauge\ndagfleet_infer_kv_budget_tokens {}\n",
        s.requests.load(Ordering::Relaxed),
        s.rejected.load(Ordering::Relaxed),
        s.disconnected.load(Ordering::Relaxed),
        s.prompt_tokens.load(Ordering::Relaxed),
        s.generated_tokens.load(Ordering::Relaxed),
        s.steps.load(Ordering::Relaxed),
        s.running.load(Ordering::Relaxed),
        s.waiting.load(Ordering::Relaxed),
        s.prefilling.load(Ordering::Relaxed),
        s.prefill_chunks.load(Ordering::Relaxed),
        s.expired.load(Ordering::Relaxed),
        s.preempted.load(Ordering::Relaxed),
        s.prefix_hit_tokens.load(Ordering::Relaxed),
        c.max_batch,
        c.kv_budget_tokens,
    );
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}
