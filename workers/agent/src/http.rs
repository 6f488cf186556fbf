//! The agent over HTTP, on `dagfleet serve`:
//! - `POST /v1/dags` takes `{"instruction", "airflow_version"?, "max_attempts"?,
//!   "max_tokens"?}` and answers the [`AgentResult`] as JSON (the DAG, its verdict, every
//!   attempt);
//! - the model name [`AGENT_MODEL`] on `/v1/chat/completions` runs the same loop for any
//!   OpenAI client: the last user message is the instruction, the answer is the best DAG in
//!   a ```python block (streamed as one chunk when asked to stream), and `/v1/models` lists
//!   it beside the served model.
//!
//! [`with_agent`] layers both over another router (the inference server's), which keeps
//! answering every other request.

use crate::{run, AgentConfig, AgentError, AgentResult, Generator};
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use dagfleet_judge::dagbag::Dagbag;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The OpenAI model name that runs the agent.
pub const AGENT_MODEL: &str = "dagfleet-agent";

/// Most attempts one request may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

/// Largest request body read (the inference server's JSON limit, 2 MiB).
const BODY_LIMIT: usize = 2 << 20;

/// The agent a server runs: the model it generates with, its defaults, and DagBag where an
/// Airflow environment was given.
pub struct AgentService<G> {
    /// The model.
    pub generator: G,
    /// Defaults for requests that do not say.
    pub config: AgentConfig,
    /// Airflow's DagBag, for the versions it loads.
    pub dagbag: Option<Arc<Dagbag>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DagRequest {
    instruction: String,
    #[serde(default)]
    airflow_version: Option<String>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

fn error(status: StatusCode, message: String) -> Response {
    let kind = match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::BAD_GATEWAY => "upstream_error",
        _ => "server_error",
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

impl<G: Generator> AgentService<G> {
    /// The settings for one request: the service's defaults with what it asks, checked.
    fn settings(
        &self,
        version: Option<&str>,
        attempts: Option<u32>,
        max_tokens: Option<u32>,
    ) -> Result<AgentConfig, String> {
        let mut cfg = self.config.clone();
        if let Some(v) = version {
            cfg.airflow_version = dagfleet_judge::parse_airflow_version(v)?;
        }
        if let Some(n) = attempts {
            if !(1..=MAX_ATTEMPTS).contains(&n) {
                return Err(format!(
                    "max_attempts {n} is out of range: 1 to {MAX_ATTEMPTS}"
                ));
            }
            cfg.max_attempts = n;
        }
        if let Some(t) = max_tokens {
            if t == 0 {
                return Err("max_tokens must be at least 1".into());
            }
            cfg.max_tokens = t;
        }
        Ok(cfg)
    }

    async fn answer(&self, instruction: &str, cfg: &AgentConfig) -> Result<AgentResult, Response> {
        // DagBag loads the versions its environment has; another version is judged statically.
        let dagbag = self
            .dagbag
            .as_ref()
            .filter(|d| dagfleet_judge::dagbag::version_key(d.version()) == cfg.airflow_version);
        run(&self.generator, instruction, cfg, dagbag, |_| {})
            .await
            .map_err(|e| match e {
                AgentError::Config(m) => error(StatusCode::BAD_REQUEST, m),
                e @ AgentError::Generate { .. } => error(StatusCode::BAD_GATEWAY, e.to_string()),
            })
    }
}

/// `other`'s routes plus `POST /v1/dags` and the [`AGENT_MODEL`] model.
pub fn with_agent<G: Generator + 'static>(other: Router, svc: Arc<AgentService<G>>) -> Router {
    let dags = Router::new()
        .route("/v1/dags", post(dags::<G>))
        .with_state(svc.clone());
    other
        .merge(dags)
        .layer(axum::middleware::from_fn_with_state(svc, intercept::<G>))
}

async fn dags<G: Generator>(
    State(svc): State<Arc<AgentService<G>>>,
    body: axum::body::Bytes,
) -> Response {
    let req: DagRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not a DAG request ({{\"instruction\": ..., \"airflow_version\"?, \"max_attempts\"?, \"max_tokens\"?}}): {e}"),
            )
        }
    };
    let cfg = match svc.settings(
        req.airflow_version.as_deref(),
        req.max_attempts,
        req.max_tokens,
    ) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match svc.answer(&req.instruction, &cfg).await {
        Ok(r) => Json(r).into_response(),
        Err(resp) => resp,
    }
}

/// Chat completions for [`AGENT_MODEL`] and the model list; everything else goes on.
async fn intercept<G: Generator>(
    State(svc): State<Arc<AgentService<G>>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET && path == "/v1/models" {
        let resp = next.run(req).await;
        if !resp.status().is_success() {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let Ok(bytes) = to_bytes(body, BODY_LIMIT).await else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model list could not be read".into(),
            );
        };
        let mut v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"object": "list", "data": []}));
        if let Some(data) = v["data"].as_array_mut() {
            data.push(json!({"id": AGENT_MODEL, "object": "model", "owned_by": "dagfleet"}));
        }
        let mut r = Json(v).into_response();
        *r.status_mut() = parts.status;
        return r;
    }
    if req.method() != Method::POST || path != "/v1/chat/completions" {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read (at most {BODY_LIMIT} bytes): {e}"),
            )
        }
    };
    let v: Option<Value> = serde_json::from_slice(&bytes).ok();
    let is_agent = v
        .as_ref()
        .and_then(|v| v["model"].as_str())
        .is_some_and(|m| m == AGENT_MODEL);
    if !is_agent {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let v = v.unwrap_or_default();
    agent_chat(&svc, &v).await
}

async fn agent_chat<G: Generator>(svc: &AgentService<G>, v: &Value) -> Response {
    let Some(instruction) = v["messages"].as_array().and_then(|m| {
        m.iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
    }) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{AGENT_MODEL} needs a user message with the instruction as its text content"),
        );
    };
    let tokens = v["max_completion_tokens"]
        .as_u64()
        .or(v["max_tokens"].as_u64())
        .map(|t| t.min(u32::MAX as u64) as u32);
    let cfg = match svc.settings(v["airflow_version"].as_str(), None, tokens) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let r = match svc.answer(instruction, &cfg).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let content = format!("```python\n{}\n```", r.dag.trim_end());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let best = &r.attempts[(r.best - 1) as usize];
    let summary = json!({
        "valid": r.valid,
        "best": r.best,
        "attempts": r.attempts.len(),
        "findings": best.verdict.findings,
        "dagbag": best.dagbag,
    });
    let usage = json!({
        "prompt_tokens": r.attempts.iter().map(|a| a.prompt_tokens).sum::<u64>(),
        "completion_tokens": r.attempts.iter().map(|a| a.completion_tokens).sum::<u64>(),
        "total_tokens": r.total_tokens,
    });
    let id = format!("chatcmpl-agent-{created}");
    if v["stream"].as_bool().unwrap_or(false) {
        let chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": AGENT_MODEL,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}],
        });
        let last = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": AGENT_MODEL,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": usage, "dagfleet_agent": summary,
        });
        let body = format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n");
        return (
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            body,
        )
            .into_response();
    }
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": AGENT_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage,
        "dagfleet_agent": summary,
    }))
    .into_response()
}
