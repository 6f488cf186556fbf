//! GitHub through octocrab: the tree at a tag (`git/trees/{ref}?recursive=1`) and the blobs
//! of the files that match. The token comes from `GITHUB_TOKEN` and is never logged. Rate
//! limits are honoured: a 403/429 with `retry-after`, or with `x-ratelimit-remaining: 0` and
//! a reset time, waits when the wait is short and otherwise hands the job back with the
//! delay, so the queue retries it after the reset.

use base64::Engine;
use http_body_util::BodyExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::archive::Limits;
use crate::sources::SourceError;

/// Longest wait inside a job; longer waits hand the job back with the delay.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(60);
/// Attempts per request before giving up to the queue.
const ATTEMPTS: u32 = 4;

fn client(api: &str) -> Result<octocrab::Octocrab, SourceError> {
    let mut b = octocrab::OctocrabBuilder::new()
        .base_uri(api)
        .map_err(|e| SourceError::Refused(format!("GitHub API URL `{api}`: {e}")))?;
    if let Ok(token) = std::env::var("GITHUB_TOKEN") {
        if !token.is_empty() {
            b = b.personal_token(token);
        }
    }
    b.build()
        .map_err(|e| SourceError::Transient(format!("GitHub client: {e}")))
}

/// How long the server asks us to wait, if this is a rate-limit answer.
fn rate_limit_wait(resp: &http::Response<impl Sized>) -> Option<Duration> {
    let status = resp.status().as_u16();
    if status != 403 && status != 429 {
        return None;
    }
    let h = resp.headers();
    let num = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(s) = num("retry-after") {
        return Some(Duration::from_secs(s));
    }
    if num("x-ratelimit-remaining") == Some(0) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let reset = num("x-ratelimit-reset").unwrap_or(now + 60);
        return Some(Duration::from_secs(reset.saturating_sub(now).max(1)));
    }
    // A 429 without headers still means "slow down".
    (status == 429).then_some(Duration::from_secs(5))
}

/// GETs `path` as JSON, honouring rate limits. `Ok(None)` on 404.
async fn get_json(
    gh: &octocrab::Octocrab,
    path: &str,
) -> Result<Option<serde_json::Value>, SourceError> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let resp = match gh._get(path).await {
            Ok(r) => r,
            Err(e) if attempt < ATTEMPTS => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                let _ = e;
                continue;
            }
            Err(e) => return Err(SourceError::Transient(format!("GitHub {path}: {e}"))),
        };
        if let Some(wait) = rate_limit_wait(&resp) {
            if wait <= MAX_INLINE_WAIT && attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(SourceError::RateLimited(
                wait,
                format!("GitHub rate limit on {path}; retry in {}s", wait.as_secs()),
            ));
        }
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SourceError::Transient(format!("GitHub {path}: {e}")))?
            .to_bytes();
        match status {
            200 => {
                return serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| SourceError::Transient(format!("GitHub {path}: not JSON: {e}")))
            }
            404 | 422 => return Ok(None),
            500..=599 if attempt < ATTEMPTS => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            s => {
                let msg: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                return Err(if s >= 500 {
                    SourceError::Transient(format!("GitHub {path}: HTTP {s}: {msg}"))
                } else {
                    SourceError::Refused(format!("GitHub {path}: HTTP {s}: {msg}"))
                });
            }
        }
    }
    Err(SourceError::Transient(format!(
        "GitHub {path}: no answer after {ATTEMPTS} attempts"
    )))
}

/// Files of `repo` at `reference` whose paths match `globs`.
pub async fn read(
    api: &str,
    repo: &str,
    reference: &str,
    globs: &globset::GlobSet,
) -> Result<Vec<(String, Vec<u8>)>, SourceError> {
    if repo.split('/').count() != 2 || repo.contains("..") {
        return Err(SourceError::Refused(format!(
            "GitHub repo `{repo}` must be OWNER/NAME"
        )));
    }
    let gh = client(api)?;
    let tree_path = format!("/repos/{repo}/git/trees/{reference}?recursive=1");
    let Some(tree) = get_json(&gh, &tree_path).await? else {
        return Err(SourceError::Missing(format!(
            "{repo} has no ref `{reference}`"
        )));
    };
    let mut out = Vec::new();
    let entries = tree["tree"].as_array().cloned().unwrap_or_default();
    for e in entries {
        let (Some(path), Some(sha)) = (e["path"].as_str(), e["sha"].as_str()) else {
            continue;
        };
        if e["type"] != "blob" || !path.ends_with(".py") || !globs.is_match(path) {
            continue;
        }
        if e["size"].as_u64().unwrap_or(0) > Limits::default().max_file_bytes {
            continue;
        }
        let Some(blob) = get_json(&gh, &format!("/repos/{repo}/git/blobs/{sha}")).await? else {
            continue;
        };
        let b64: String = blob["content"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let data = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| SourceError::Transient(format!("blob {sha} of {path}: {e}")))?;
        out.push((path.to_string(), data));
    }
    Ok(out)
}
