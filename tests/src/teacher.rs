//! A teacher LLM server on loopback that speaks the request and response shapes of the
//! Anthropic Messages and Message Batches endpoints and of the OpenAI chat completions,
//! Files and Batches endpoints, including the batch lifecycle, per-request errors, expiry
//! and cancellation, 429 with `retry-after`, 500s and malformed bodies.
//!
//! Its "model" writes deterministic replies: for an instruction prompt ("Write N different
//! instructions") a JSON array of N distinct requests wrapped in stray text and a fence;
//! for a rubric prompt (the LLM judge's "Score each criterion") the scores of an uncritical
//! grader, in prose around the JSON: 5 everywhere, 4 for correctness when the prompt says the
//! file could not be loaded (so the judge's cap, not the grader, decides); for a pairwise
//! prompt ("Two Airflow DAG files") the DAG with fewer reported problems, and "A" when they
//! tie (a position bias, as real judges have, which asking in both orders must catch); for
//! anything else a
//! short explanation. Usage is counted at four characters a token.

use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fault the server answers the next request with.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with `retry-after: secs`.
    RateLimited(u64),
    /// 500 with a JSON error.
    ServerError,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 502 with an HTML page.
    Html,
    /// 200 with an empty body.
    Empty,
    /// 400 with this message.
    BadRequest(String),
}

struct Batch {
    kind: &'static str,
    metadata: Value,
    created: Instant,
    requests: Vec<(String, Value)>,
    cancelled: bool,
    input_file: Option<String>,
}

/// Knobs and counters of a [`Teacher`].
#[derive(Default)]
pub struct TeacherState {
    faults: Mutex<VecDeque<Fault>>,
    batches: Mutex<HashMap<String, Batch>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    /// Custom ids answered with an error the first time they are seen in a batch.
    pub error_once: Mutex<HashSet<String>>,
    /// Custom ids answered as expired the first time they are seen in a batch.
    pub expire_once: Mutex<HashSet<String>>,
    seen_in_batch: Mutex<HashSet<String>>,
    /// How long a batch stays in progress, in milliseconds.
    pub batch_ms: AtomicU64,
    /// Batches never end (until cancelled).
    pub never_end: AtomicBool,
    /// The model answers instruction prompts with prose instead of JSON.
    pub prose: AtomicBool,
    /// The key every request must carry, if set.
    pub key: Mutex<Option<String>>,
    /// Batches created.
    pub batches_created: AtomicU64,
    /// Batches cancelled.
    pub batches_cancelled: AtomicU64,
    /// Online chat requests answered with a reply.
    pub chat_calls: AtomicU64,
    /// Every HTTP request received.
    pub http_requests: AtomicU64,
    next_id: AtomicU64,
}

/// A running teacher server.
pub struct Teacher {
    /// Root URL, e.g. `http://127.0.0.1:4321`.
    pub url: String,
    /// Knobs and counters.
    pub state: Arc<TeacherState>,
    _task: tokio::task::JoinHandle<()>,
}

impl Teacher {
    /// Starts a server on a free loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(TeacherState::default());
        let app = Router::new()
            .route("/v1/messages", post(anthropic_message))
            .route("/v1/messages/batches", post(anthropic_create))
            .route("/v1/messages/batches/{id}", get(anthropic_get))
            .route("/v1/messages/batches/{id}/results", get(anthropic_results))
            .route("/v1/messages/batches/{id}/cancel", post(cancel))
            .route("/v1/chat/completions", post(openai_chat))
            .route("/v1/files", post(openai_upload))
            .route("/v1/files/{id}/content", get(openai_file))
            .route("/v1/batches", post(openai_create).get(openai_list))
            .route("/v1/batches/{id}", get(openai_get))
            .route("/v1/batches/{id}/cancel", post(cancel))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind teacher");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            state,
            _task: task,
        }
    }

    /// Queues faults for the next requests, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.faults.lock().expect("lock").extend(faults);
    }

    /// Batches created so far.
    pub fn batches_created(&self) -> u64 {
        self.state.batches_created.load(Ordering::SeqCst)
    }

    /// Online chat replies so far.
    pub fn chat_calls(&self) -> u64 {
        self.state.chat_calls.load(Ordering::SeqCst)
    }
}

/// The deterministic reply to `prompt`.
pub fn reply_to(prompt: &str) -> String {
    if prompt.starts_with("Two Airflow DAG files") {
        let problems = |s: &str| {
            s.matches("could NOT load").count() + s.matches("static checker, line").count()
        };
        let (a, b) = prompt.split_once("\nDAG B:\n").unwrap_or((prompt, ""));
        let w = if problems(b) < problems(a) { "B" } else { "A" };
        return format!(
            "Having compared both: {{\"winner\": \"{w}\", \"reason\": \"fewer problems\"}}"
        );
    }
    if prompt.contains("Score each criterion from 1 (bad) to 5") {
        let c = if prompt.contains("could NOT load") {
            4
        } else {
            5
        };
        return format!(
            "Here is my assessment.\n{{\"correctness\": {{\"score\": {c}, \"reason\": \"looks right\"}}, \"completeness\": {{\"score\": 5, \"reason\": \"all steps\"}}, \"best_practices\": {{\"score\": 5, \"reason\": \"idiomatic\"}}, \"instruction\": {{\"score\": 5, \"reason\": \"as asked\"}}}}"
        );
    }
    let tag = dag_tag(prompt);
    if let Some(n) = prompt
        .split("Write ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| prompt.contains("different instructions"))
    {
        let templates = [
            "Create an Airflow DAG called {t} that keeps the reporting data of the business fresh every day for analysts.",
            "Write a workflow named {t} whose tasks run in a fixed order, each step wired to the next as a dependency.",
            "I need a data-processing pipeline ({t}) that reads records, transforms them and loads the result downstream.",
            "Set up {t} so that an operations team can rerun failed steps without touching the healthy ones.",
        ];
        let items: Vec<String> = (0..n)
            .map(|i| {
                let base = templates[i % templates.len()].replace("{t}", &tag);
                if i < templates.len() {
                    base
                } else {
                    format!("{base} Variant {i} also sends a summary email at the end of run number {i}.")
                }
            })
            .collect();
        return format!(
            "Here are the instructions you asked for:\n```json\n{}\n```\nLet me know if you need more.",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
    }
    format!("The DAG {tag} schedules a small pipeline: it extracts data, transforms it and loads it, with each task depending on the one before.")
}

fn dag_tag(prompt: &str) -> String {
    for key in ["dag_id=\"", "DAG(\"", "dag_id='", "DAG('"] {
        if let Some(rest) = prompt.split(key).nth(1) {
            if let Some(id) = rest.split(['"', '\'']).next() {
                return id.to_string();
            }
        }
    }
    let h = prompt
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    format!("pipeline_{:x}", h % 0xffff)
}

fn prompt_of(params: &Value) -> String {
    params["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}

fn tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4)
}

fn anthropic_reply(st: &TeacherState, params: &Value) -> Value {
    let prompt = prompt_of(params);
    let text = if st.prose.load(Ordering::SeqCst) {
        "I'm sorry, but I would rather describe this DAG in my own words.".to_string()
    } else {
        reply_to(&prompt)
    };
    let system = params["system"].as_str().unwrap_or("");
    json!({
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": params["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": tokens(&prompt) + tokens(system), "output_tokens": tokens(&text)},
    })
}

fn openai_reply(body: &Value) -> Value {
    let prompt = prompt_of(body);
    let text = reply_to(&prompt);
    let all: String = body["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["content"].as_str()).collect())
        .unwrap_or_default();
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens(&all), "completion_tokens": tokens(&text)},
    })
}

/// An error answer in the shape both vendors use: `{"type": "error", "error": {"type",
/// "message"}}` (OpenAI reads the same `error.message`).
fn api_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let message: String = message.into();
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Checks the key and applies a queued fault, if any.
fn gate(st: &TeacherState, headers: &HeaderMap) -> Option<Response> {
    st.http_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(k) = st.key.lock().expect("lock").clone() {
        let anthropic = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if anthropic != Some(k.as_str()) && bearer != Some(k.as_str()) {
            return Some(api_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            ));
        }
    }
    let fault = st.faults.lock().expect("lock").pop_front()?;
    Some(match fault {
        Fault::RateLimited(s) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", s.to_string())],
            Json(json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of requests has exceeded your rate limit"}})),
        )
            .into_response(),
        Fault::ServerError => api_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "Internal server error"),
        Fault::Malformed => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"id\": \"msg_",
        )
            .into_response(),
        Fault::Html => (
            StatusCode::BAD_GATEWAY,
            [("content-type", "text/html")],
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        )
            .into_response(),
        Fault::Empty => (StatusCode::OK, [("content-type", "application/json")], "").into_response(),
        Fault::BadRequest(m) => api_error(StatusCode::BAD_REQUEST, "invalid_request_error", m),
    })
}

async fn anthropic_message(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    if headers.get("anthropic-version").is_none() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version header is required",
        );
    }
    st.chat_calls.fetch_add(1, Ordering::SeqCst);
    Json(anthropic_reply(&st, &body)).into_response()
}

fn new_id(st: &TeacherState, prefix: &str) -> String {
    format!("{prefix}{:06}", st.next_id.fetch_add(1, Ordering::SeqCst))
}

fn ended(st: &TeacherState, b: &Batch) -> bool {
    b.cancelled
        || (!st.never_end.load(Ordering::SeqCst)
            && b.created.elapsed() >= Duration::from_millis(st.batch_ms.load(Ordering::SeqCst)))
}

async fn anthropic_create(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let Some(reqs) = body["requests"].as_array() else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "requests: field required",
        );
    };
    let requests: Vec<(String, Value)> = reqs
        .iter()
        .map(|r| {
            (
                r["custom_id"].as_str().unwrap_or("").to_string(),
                r["params"].clone(),
            )
        })
        .collect();
    let id = new_id(&st, "msgbatch_");
    st.batches_created.fetch_add(1, Ordering::SeqCst);
    st.batches.lock().expect("lock").insert(
        id.clone(),
        Batch {
            kind: "anthropic",
            metadata: Value::Null,
            created: Instant::now(),
            requests,
            cancelled: false,
            input_file: None,
        },
    );
    anthropic_batch_json(&st, &id, &headers).into_response()
}

fn anthropic_batch_json(st: &TeacherState, id: &str, headers: &HeaderMap) -> Response {
    let batches = st.batches.lock().expect("lock");
    let Some(b) = batches.get(id) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("batch {id} not found"),
        );
    };
    let done = ended(st, b);
    let n = b.requests.len() as u64;
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Json(json!({
        "id": id,
        "type": "message_batch",
        "processing_status": if done { "ended" } else if b.cancelled { "canceling" } else { "in_progress" },
        "request_counts": if done { json!({"processing": 0, "succeeded": n, "errored": 0, "canceled": 0, "expired": 0}) } else { json!({"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}) },
        "results_url": if done { json!(format!("http://{host}/v1/messages/batches/{id}/results")) } else { Value::Null },
    }))
    .into_response()
}

async fn anthropic_get(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    anthropic_batch_json(&st, &id, &headers)
}

/// What becomes of one batch request.
fn outcome(st: &TeacherState, b: &Batch, cid: &str) -> &'static str {
    if b.cancelled && !b.created.elapsed().is_zero() && st.never_end.load(Ordering::SeqCst) {
        return "canceled";
    }
    let first = st
        .seen_in_batch
        .lock()
        .expect("lock")
        .insert(cid.to_string());
    if first && st.error_once.lock().expect("lock").contains(cid) {
        return "errored";
    }
    if first && st.expire_once.lock().expect("lock").contains(cid) {
        return "expired";
    }
    "succeeded"
}

async fn anthropic_results(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let batches = st.batches.lock().expect("lock");
    let Some(b) = batches.get(&id).filter(|b| ended(&st, b)) else {
        return (StatusCode::NOT_FOUND, "no results").into_response();
    };
    let mut out = String::new();
    for (cid, params) in &b.requests {
        let result = match outcome(&st, b, cid) {
            "succeeded" => json!({"type": "succeeded", "message": anthropic_reply(&st, params)}),
            "errored" => {
                json!({"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}})
            }
            other => json!({"type": other}),
        };
        out.push_str(&json!({"custom_id": cid, "result": result}).to_string());
        out.push('\n');
    }
    ([("content-type", "application/binary")], out).into_response()
}

async fn cancel(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let kind = {
        let mut batches = st.batches.lock().expect("lock");
        let Some(b) = batches.get_mut(&id) else {
            return api_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such batch",
            );
        };
        b.cancelled = true;
        b.kind
    };
    st.batches_cancelled.fetch_add(1, Ordering::SeqCst);
    if kind == "anthropic" {
        anthropic_batch_json(&st, &id, &headers)
    } else {
        openai_batch_json(&st, &id)
    }
}

async fn openai_chat(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    if body["messages"].as_array().is_none_or(|m| m.is_empty()) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages must be a non-empty array",
        );
    }
    st.chat_calls.fetch_add(1, Ordering::SeqCst);
    Json(openai_reply(&body)).into_response()
}

async fn openai_upload(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let mut purpose = String::new();
    let mut data = Vec::new();
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.unwrap_or_default(),
            Some("file") => data = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
            _ => {}
        }
    }
    if purpose != "batch" || data.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": {"message": "purpose must be `batch` and file must not be empty"}}),
            ),
        )
            .into_response();
    }
    let id = new_id(&st, "file-");
    let n = data.len();
    st.files.lock().expect("lock").insert(id.clone(), data);
    Json(json!({"id": id, "object": "file", "bytes": n, "purpose": "batch"})).into_response()
}

async fn openai_file(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    // Output files are made on demand from the batch they belong to.
    if let Some(bid) = id.strip_prefix("out-").or_else(|| id.strip_prefix("err-")) {
        let want_errors = id.starts_with("err-");
        let batches = st.batches.lock().expect("lock");
        let Some(b) = batches.get(bid) else {
            return (StatusCode::NOT_FOUND, "no file").into_response();
        };
        let mut out = String::new();
        for (cid, body) in &b.requests {
            let o = outcome(&st, b, cid);
            let line = match (o, want_errors) {
                ("succeeded", false) => {
                    json!({"id": "req", "custom_id": cid, "response": {"status_code": 200, "body": openai_reply(body)}, "error": null})
                }
                ("errored", true) => {
                    json!({"id": "req", "custom_id": cid, "response": {"status_code": 500, "body": {"error": {"message": "The server had an error"}}}, "error": null})
                }
                ("expired", true) => {
                    json!({"id": "req", "custom_id": cid, "response": null, "error": {"code": "batch_expired", "message": "expired"}})
                }
                ("canceled", true) => {
                    json!({"id": "req", "custom_id": cid, "response": null, "error": {"code": "batch_cancelled", "message": "cancelled"}})
                }
                _ => {
                    // Not this file's row; undo the "seen" mark so the other file reports it.
                    st.seen_in_batch.lock().expect("lock").remove(cid);
                    continue;
                }
            };
            out.push_str(&line.to_string());
            out.push('\n');
        }
        return out.into_response();
    }
    match st.files.lock().expect("lock").get(&id) {
        Some(d) => Bytes::from(d.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no file").into_response(),
    }
}

async fn openai_create(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let file = body["input_file_id"].as_str().unwrap_or("").to_string();
    let data = st.files.lock().expect("lock").get(&file).cloned();
    let Some(data) = data else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("file {file} not found"),
        );
    };
    let mut requests = Vec::new();
    for l in String::from_utf8_lossy(&data).lines() {
        let v: Value = match serde_json::from_str(l) {
            Ok(v) => v,
            Err(e) => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("bad line: {e}"),
                )
            }
        };
        requests.push((
            v["custom_id"].as_str().unwrap_or("").to_string(),
            v["body"].clone(),
        ));
    }
    let id = new_id(&st, "batch_");
    st.batches_created.fetch_add(1, Ordering::SeqCst);
    st.batches.lock().expect("lock").insert(
        id.clone(),
        Batch {
            kind: "openai",
            metadata: body["metadata"].clone(),
            created: Instant::now(),
            requests,
            cancelled: false,
            input_file: Some(file),
        },
    );
    openai_batch_json(&st, &id)
}

fn openai_batch_json(st: &TeacherState, id: &str) -> Response {
    let batches = st.batches.lock().expect("lock");
    let Some(b) = batches.get(id) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such batch",
        );
    };
    let done = ended(st, b);
    let n = b.requests.len() as u64;
    let status = match (done, b.cancelled) {
        (true, true) => "cancelled",
        (true, false) => "completed",
        (false, true) => "cancelling",
        (false, false) => "in_progress",
    };
    Json(json!({
        "id": id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": b.input_file,
        "status": status,
        "output_file_id": if done { json!(format!("out-{id}")) } else { Value::Null },
        "error_file_id": if done { json!(format!("err-{id}")) } else { Value::Null },
        "request_counts": {"total": n, "completed": if done { n } else { 0 }, "failed": 0},
        "metadata": b.metadata,
    }))
    .into_response()
}

async fn openai_list(State(st): State<Arc<TeacherState>>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    let mut ids: Vec<String> = st
        .batches
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, b)| b.kind == "openai")
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    ids.reverse(); // newest first, as OpenAI lists them
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let batches = st.batches.lock().expect("lock");
            batches.get(id).map(|b| {
                json!({"id": id, "object": "batch", "status": if b.cancelled { "cancelled" } else { "in_progress" }, "metadata": b.metadata})
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

async fn openai_get(
    State(st): State<Arc<TeacherState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = gate(&st, &headers) {
        return r;
    }
    openai_batch_json(&st, &id)
}
