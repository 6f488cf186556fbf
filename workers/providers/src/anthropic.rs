//! Anthropic Messages (`/v1/messages`) and Message Batches (`/v1/messages/batches`).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::{decode, send};
use crate::{
    finish_reason, BatchState, BatchStatus, ChatReply, ChatRequest, Outcome, Provider,
    ProviderError, Usage,
};

const VERSION: &str = "2023-06-01";

/// The `params` of one request: the Messages API body.
pub(crate) fn params(model: &str, r: &ChatRequest) -> Value {
    let mut v = json!({
        "model": model,
        "max_tokens": r.max_tokens,
        "messages": r.messages,
    });
    if let Some(s) = &r.system {
        v["system"] = json!(s);
    }
    if let Some(t) = r.temperature {
        v["temperature"] = json!(t);
    }
    v
}

/// One entry of a batch's `requests`.
pub(crate) fn batch_line(model: &str, r: &ChatRequest) -> Value {
    json!({"custom_id": r.custom_id, "params": params(model, r)})
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct MessageUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct MessageBody {
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: MessageUsage,
}

fn reply(m: MessageBody) -> ChatReply {
    ChatReply {
        text: m
            .content
            .into_iter()
            .filter(|b| b.kind == "text")
            .map(|b| b.text)
            .collect::<Vec<_>>()
            .join(""),
        finish_reason: finish_reason(m.stop_reason.as_deref()),
        usage: Usage {
            input_tokens: m.usage.input_tokens,
            output_tokens: m.usage.output_tokens,
        },
    }
}

fn post(
    p: &Provider,
    path: &str,
    body: Value,
) -> impl Fn(&reqwest::Client) -> reqwest::RequestBuilder {
    let url = p.url(path);
    move |c: &reqwest::Client| {
        c.post(&url)
            .header("anthropic-version", VERSION)
            .json(&body)
    }
}

fn get(url: String) -> impl Fn(&reqwest::Client) -> reqwest::RequestBuilder {
    move |c: &reqwest::Client| c.get(&url).header("anthropic-version", VERSION)
}

pub(crate) async fn chat(
    p: &Provider,
    model: &str,
    r: &ChatRequest,
) -> Result<ChatReply, ProviderError> {
    let what = "a message";
    let body = send(p, what, true, post(p, "/v1/messages", params(model, r))).await?;
    Ok(reply(decode(p, what, &body)?))
}

#[derive(Deserialize)]
struct Counts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

#[derive(Deserialize)]
struct Batch {
    id: String,
    processing_status: String,
    request_counts: Counts,
    #[serde(default)]
    results_url: Option<String>,
}

pub(crate) async fn create_batch(
    p: &Provider,
    model: &str,
    reqs: &[ChatRequest],
) -> Result<String, ProviderError> {
    let what = "a message batch";
    let lines: Vec<Value> = reqs.iter().map(|r| batch_line(model, r)).collect();
    let body = send(
        p,
        what,
        true,
        post(p, "/v1/messages/batches", json!({ "requests": lines })),
    )
    .await?;
    let b: Batch = decode(p, what, &body)?;
    Ok(b.id)
}

async fn get_batch(p: &Provider, id: &str) -> Result<Batch, ProviderError> {
    let what = format!("batch {id}");
    let body = send(
        p,
        &what,
        true,
        get(p.url(&format!("/v1/messages/batches/{id}"))),
    )
    .await?;
    decode(p, &what, &body)
}

pub(crate) async fn batch_status(p: &Provider, id: &str) -> Result<BatchStatus, ProviderError> {
    let b = get_batch(p, id).await?;
    let c = &b.request_counts;
    let done = c.succeeded + c.errored + c.canceled + c.expired;
    let state = match b.processing_status.as_str() {
        "ended" => BatchState::Ended,
        "in_progress" | "canceling" => BatchState::InProgress,
        other => BatchState::Failed(format!("unknown processing_status `{other}`")),
    };
    Ok(BatchStatus {
        id: b.id,
        state,
        done,
        total: done + c.processing,
    })
}

pub(crate) async fn batch_results(
    p: &Provider,
    id: &str,
) -> Result<Vec<(String, Outcome)>, ProviderError> {
    let b = get_batch(p, id).await?;
    let what = format!("results of batch {id}");
    let url = b
        .results_url
        .ok_or_else(|| p.protocol_err(&what, "the batch has no results_url yet"))?;
    let body = send(p, &what, false, get(url)).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| p.protocol_err(&what, format!("results are not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| p.protocol_err(&what, format!("line {}: not JSON: {e}", n + 1)))?;
        let cid = v
            .get("custom_id")
            .and_then(|c| c.as_str())
            .ok_or_else(|| p.protocol_err(&what, format!("line {} has no custom_id", n + 1)))?
            .to_string();
        let kind = v
            .pointer("/result/type")
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let outcome = match kind {
            "succeeded" => {
                let m: MessageBody = serde_json::from_value(
                    v.pointer("/result/message").cloned().unwrap_or(Value::Null),
                )
                .map_err(|e| p.protocol_err(&what, format!("line {}: {e}", n + 1)))?;
                Outcome::Ok(reply(m))
            }
            "errored" => Outcome::Errored(
                v.pointer("/result/error/error/message")
                    .or_else(|| v.pointer("/result/error/message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("errored without a message")
                    .to_string(),
            ),
            "expired" => Outcome::Expired,
            "canceled" => Outcome::Canceled,
            other => Outcome::Errored(format!("unknown result type `{other}`")),
        };
        out.push((cid, outcome));
    }
    Ok(out)
}

pub(crate) async fn cancel_batch(p: &Provider, id: &str) -> Result<(), ProviderError> {
    let what = format!("cancelling batch {id}");
    send(
        p,
        &what,
        true,
        post(p, &format!("/v1/messages/batches/{id}/cancel"), json!({})),
    )
    .await?;
    Ok(())
}
