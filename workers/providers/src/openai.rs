//! OpenAI-compatible chat completions and the OpenAI Batch API (Files + Batches).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::{decode, send};
use crate::{
    finish_reason, BatchState, BatchStatus, ChatReply, ChatRequest, Outcome, Provider,
    ProviderError, Usage,
};

const ENDPOINT: &str = "/v1/chat/completions";

/// The chat completions body of one request.
pub(crate) fn body(model: &str, r: &ChatRequest) -> Value {
    let mut messages = Vec::with_capacity(r.messages.len() + 1);
    if let Some(s) = &r.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    for m in &r.messages {
        messages.push(json!({"role": m.role, "content": m.content}));
    }
    let mut v = json!({
        "model": model,
        "messages": messages,
        "max_tokens": r.max_tokens,
    });
    if let Some(t) = r.temperature {
        v["temperature"] = json!(t);
    }
    v
}

/// One line of a batch input file.
pub(crate) fn batch_line(model: &str, r: &ChatRequest) -> Value {
    json!({"custom_id": r.custom_id, "method": "POST", "url": ENDPOINT, "body": body(model, r)})
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct CompletionUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<CompletionUsage>,
}

fn reply(p: &Provider, what: &str, c: Completion) -> Result<ChatReply, ProviderError> {
    let usage = c.usage.unwrap_or_default();
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| p.protocol_err(what, "the completion has no choices"))?;
    Ok(ChatReply {
        text: choice.message.content.unwrap_or_default(),
        finish_reason: finish_reason(choice.finish_reason.as_deref()),
        usage: Usage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        },
    })
}

pub(crate) async fn chat(
    p: &Provider,
    model: &str,
    r: &ChatRequest,
) -> Result<ChatReply, ProviderError> {
    let what = "a chat completion";
    let url = p.url(ENDPOINT);
    let b = body(model, r);
    let data = send(p, what, true, move |c| c.post(&url).json(&b)).await?;
    reply(p, what, decode(p, what, &data)?)
}

#[derive(Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Deserialize, Default)]
struct Counts {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    completed: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Deserialize)]
struct BatchObject {
    id: String,
    status: String,
    #[serde(default)]
    request_counts: Option<Counts>,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
    #[serde(default)]
    errors: Option<Value>,
}

pub(crate) async fn create_batch(
    p: &Provider,
    model: &str,
    reqs: &[ChatRequest],
    tag: &str,
) -> Result<String, ProviderError> {
    let mut jsonl = Vec::new();
    for r in reqs {
        jsonl.extend_from_slice(batch_line(model, r).to_string().as_bytes());
        jsonl.push(b'\n');
    }
    let what = "uploading a batch input file";
    let url = p.url("/v1/files");
    let data = send(p, what, true, move |c| {
        let part = reqwest::multipart::Part::bytes(jsonl.clone())
            .file_name("dagfleet-batch.jsonl")
            .mime_str("application/jsonl")
            .unwrap_or_else(|_| reqwest::multipart::Part::bytes(jsonl.clone()));
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        c.post(&url).multipart(form)
    })
    .await?;
    let file: FileObject = decode(p, what, &data)?;
    let what = "creating a batch";
    let url = p.url("/v1/batches");
    let b = json!({
        "input_file_id": file.id,
        "endpoint": ENDPOINT,
        "completion_window": "24h",
        "metadata": {"dagfleet_job": tag},
    });
    let data = send(p, what, true, move |c| c.post(&url).json(&b)).await?;
    let batch: BatchObject = decode(p, what, &data)?;
    Ok(batch.id)
}

async fn get_batch(p: &Provider, id: &str) -> Result<BatchObject, ProviderError> {
    let what = format!("batch {id}");
    let url = p.url(&format!("/v1/batches/{id}"));
    let data = send(p, &what, true, move |c| c.get(&url)).await?;
    decode(p, &what, &data)
}

pub(crate) async fn batch_status(p: &Provider, id: &str) -> Result<BatchStatus, ProviderError> {
    let b = get_batch(p, id).await?;
    let c = b.request_counts.unwrap_or_default();
    let state = match b.status.as_str() {
        "validating" | "in_progress" | "finalizing" | "cancelling" => BatchState::InProgress,
        "completed" | "expired" | "cancelled" => BatchState::Ended,
        "failed" => BatchState::Failed(
            b.errors
                .map(|e| e.to_string())
                .unwrap_or_else(|| "the batch failed without errors listed".into()),
        ),
        other => BatchState::Failed(format!("unknown batch status `{other}`")),
    };
    Ok(BatchStatus {
        id: b.id,
        state,
        done: c.completed + c.failed,
        total: c.total,
    })
}

async fn file_lines(p: &Provider, file: &str) -> Result<Vec<Value>, ProviderError> {
    let what = format!("file {file}");
    let url = p.url(&format!("/v1/files/{file}/content"));
    let data = send(p, &what, false, move |c| c.get(&url)).await?;
    let text =
        std::str::from_utf8(&data).map_err(|e| p.protocol_err(&what, format!("not UTF-8: {e}")))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| p.protocol_err(&what, format!("line {}: not JSON: {e}", n + 1)))
        })
        .collect()
}

pub(crate) async fn batch_results(
    p: &Provider,
    id: &str,
) -> Result<Vec<(String, Outcome)>, ProviderError> {
    let b = get_batch(p, id).await?;
    let what = format!("results of batch {id}");
    let mut lines = Vec::new();
    for f in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
        lines.extend(file_lines(p, f).await?);
    }
    let mut out = Vec::new();
    for (n, v) in lines.into_iter().enumerate() {
        let cid = v
            .get("custom_id")
            .and_then(|c| c.as_str())
            .ok_or_else(|| p.protocol_err(&what, format!("result {n} has no custom_id")))?
            .to_string();
        let status = v
            .pointer("/response/status_code")
            .and_then(|s| s.as_u64())
            .unwrap_or(0);
        let err_code = v.pointer("/error/code").and_then(|c| c.as_str());
        let outcome = if status == 200 {
            let c: Completion =
                serde_json::from_value(v.pointer("/response/body").cloned().unwrap_or(Value::Null))
                    .map_err(|e| p.protocol_err(&what, format!("result {cid}: {e}")))?;
            Outcome::Ok(reply(p, &what, c)?)
        } else if err_code == Some("batch_expired") {
            Outcome::Expired
        } else if err_code == Some("batch_cancelled") {
            Outcome::Canceled
        } else {
            Outcome::Errored(
                v.pointer("/response/body/error/message")
                    .or_else(|| v.pointer("/error/message"))
                    .and_then(|m| m.as_str())
                    .map(|m| format!("HTTP {status}: {m}"))
                    .unwrap_or_else(|| format!("HTTP {status} without a message")),
            )
        };
        out.push((cid, outcome));
    }
    Ok(out)
}

pub(crate) async fn cancel_batch(p: &Provider, id: &str) -> Result<(), ProviderError> {
    let what = format!("cancelling batch {id}");
    let url = p.url(&format!("/v1/batches/{id}/cancel"));
    send(p, &what, true, move |c| c.post(&url)).await?;
    Ok(())
}

#[derive(Deserialize)]
struct BatchList {
    data: Vec<Value>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// The newest batch whose `metadata.dagfleet_job` is `tag` and that was not cancelled,
/// expired or failed, looking through the most recent 500 batches.
pub(crate) async fn find_batch(p: &Provider, tag: &str) -> Result<Option<String>, ProviderError> {
    let what = "listing batches";
    let mut after: Option<String> = None;
    for _ in 0..5 {
        let mut url = p.url("/v1/batches?limit=100");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let data = send(p, what, true, move |c| c.get(&url)).await?;
        let page: BatchList = decode(p, what, &data)?;
        for b in &page.data {
            let live = !matches!(
                b["status"].as_str(),
                Some("failed" | "expired" | "cancelled" | "cancelling")
            );
            if live && b["metadata"]["dagfleet_job"].as_str() == Some(tag) {
                return Ok(b["id"].as_str().map(String::from));
            }
        }
        if !page.has_more {
            break;
        }
        after = page.last_id.or_else(|| {
            page.data
                .last()
                .and_then(|b| b["id"].as_str().map(String::from))
        });
        if after.is_none() {
            break;
        }
    }
    Ok(None)
}
