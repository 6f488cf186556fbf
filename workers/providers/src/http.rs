//! The one retry loop every provider call goes through.

use bytes::Bytes;
use rand::Rng;
use std::time::Duration;
use tracing::{debug, warn};

use crate::{Provider, ProviderError};

/// The longest wait between two attempts, whatever `retry-after` says.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Why one attempt failed.
enum Attempt {
    Retry(String, Option<Duration>),
    Fatal(u16, String),
}

/// Sends the request `build` makes (again on each attempt) and returns the body of a 2xx
/// answer. `json` says whether the body must be a JSON document.
pub(crate) async fn send(
    p: &Provider,
    what: &str,
    json: bool,
    build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
) -> Result<Bytes, ProviderError> {
    let cfg = &p.inner.cfg;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut req = build(&p.inner.client);
        if let Some(key) = &p.inner.key {
            req = match p.kind() {
                crate::ProviderKind::Anthropic => req.header("x-api-key", key.expose()),
                crate::ProviderKind::Openai => req.bearer_auth(key.expose()),
            };
        }
        let outcome = match req.send().await {
            Err(e) => Attempt::Retry(transport_error(&e), None),
            Ok(resp) => {
                let status = resp.status();
                let retry_after = retry_after(resp.headers());
                let content_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                match resp.bytes().await {
                    Err(e) => Attempt::Retry(
                        format!("HTTP {status}: body cut off: {}", transport_error(&e)),
                        None,
                    ),
                    Ok(body) if status.is_success() => {
                        match check_body(&body, &content_type, json) {
                            Ok(()) => return Ok(body),
                            Err(m) => Attempt::Retry(format!("HTTP {status}: {m}"), None),
                        }
                    }
                    Ok(body) => {
                        let msg = error_message(&body, &content_type);
                        if status.as_u16() == 429 || status.is_server_error() {
                            Attempt::Retry(format!("HTTP {status}: {msg}"), retry_after)
                        } else {
                            Attempt::Fatal(status.as_u16(), msg)
                        }
                    }
                }
            }
        };
        match outcome {
            Attempt::Fatal(status, message) => {
                return Err(ProviderError::Refused {
                    provider: p.name().into(),
                    what: what.into(),
                    status,
                    message,
                })
            }
            Attempt::Retry(last, after) => {
                if attempt > cfg.max_retries {
                    return Err(ProviderError::Exhausted {
                        provider: p.name().into(),
                        what: what.into(),
                        attempts: attempt,
                        last,
                    });
                }
                let wait = after
                    .unwrap_or_else(|| backoff(cfg.backoff, attempt))
                    .min(MAX_WAIT);
                warn!(provider = p.name(), what, attempt, wait_ms = wait.as_millis() as u64, error = %last, "provider call will be retried");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// `base * 2^(attempt-1)`, capped at a minute, with ±50% jitter.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt - 1).min(16));
    let capped = exp.min(Duration::from_secs(60));
    let f: f64 = rand::rng().random_range(0.5..1.5);
    capped.mul_f64(f)
}

/// `retry-after` in seconds or as an HTTP date; Anthropic also sends `retry-after-ms`
/// style headers on some answers.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).max(0.0)));
    }
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = httpdate(v)?;
    Some(when.saturating_sub(now_unix()))
}

fn now_unix() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into time since the epoch.
fn httpdate(s: &str) -> Option<Duration> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    u64::try_from(secs).ok().map(Duration::from_secs)
}

fn transport_error(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which never holds a key (keys travel in headers).
    if e.is_timeout() {
        format!("timed out: {e}")
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

/// A 2xx body that is not what was asked for is worth another try: proxies and overloaded
/// gateways answer with empty or HTML pages.
fn check_body(body: &[u8], content_type: &str, json: bool) -> Result<(), String> {
    if !json {
        return Ok(());
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("empty body where JSON was expected".into());
    }
    if content_type.contains("text/html") || looks_like_html(body) {
        return Err(format!(
            "an HTML page where JSON was expected: {}",
            html_title(body)
        ));
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(format!("malformed JSON ({e}): {}", snippet(body)));
    }
    Ok(())
}

fn looks_like_html(body: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&body[..body.len().min(256)]).to_ascii_lowercase();
    let t = head.trim_start();
    t.starts_with("<!doctype html") || t.starts_with("<html")
}

fn html_title(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).to_string();
    let lower = text.to_ascii_lowercase();
    match (lower.find("<title>"), lower.find("</title>")) {
        (Some(a), Some(b)) if b > a + 7 => format!("title `{}`", text[a + 7..b].trim()),
        _ => snippet(body),
    }
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]).replace('\n', " ");
    if body.len() > 200 {
        format!("`{s}…` ({} bytes)", body.len())
    } else {
        format!("`{s}`")
    }
}

/// The server's own message from an error body: `{"error": {"message": ...}}` (both
/// vendors), `{"error": "..."}`, `{"message": ...}`, or a snippet of whatever came.
fn error_message(body: &[u8], content_type: &str) -> String {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return "empty body".into();
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let m = v
            .pointer("/error/message")
            .or_else(|| v.pointer("/error"))
            .or_else(|| v.pointer("/message"))
            .or_else(|| v.pointer("/detail"));
        if let Some(m) = m {
            let kind = v
                .pointer("/error/type")
                .and_then(|t| t.as_str())
                .map(|t| format!("{t}: "))
                .unwrap_or_default();
            return match m.as_str() {
                Some(s) => format!("{kind}{s}"),
                None => format!("{kind}{m}"),
            };
        }
        return snippet(body);
    }
    if content_type.contains("text/html") || looks_like_html(body) {
        return format!("HTML page, {}", html_title(body));
    }
    snippet(body)
}

/// Reads `body` as JSON `T`, naming the call on failure.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    p: &Provider,
    what: &str,
    body: &[u8],
) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| {
        debug!(provider = p.name(), what, "undecodable body");
        p.protocol_err(
            what,
            format!("unexpected JSON shape ({e}): {}", snippet(body)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            httpdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::from_secs(784_111_777))
        );
        assert_eq!(httpdate("yesterday"), None);
    }

    #[test]
    fn error_bodies_yield_the_servers_message() {
        let b = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too large"}}"#;
        assert_eq!(
            error_message(b, "application/json"),
            "invalid_request_error: max_tokens: too large"
        );
        let html = b"<html><head><title>502 Bad Gateway</title></head></html>";
        assert!(error_message(html, "text/html").contains("502 Bad Gateway"));
        assert_eq!(error_message(b"", ""), "empty body");
        assert!(check_body(b"", "application/json", true).is_err());
        assert!(check_body(b"{\"a\":", "application/json", true)
            .unwrap_err()
            .contains("malformed"));
        assert!(check_body(b"<!DOCTYPE html><title>x</title>", "", true).is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Duration::from_millis(100);
        assert!(backoff(b, 1) <= Duration::from_millis(150));
        assert!(backoff(b, 4) >= Duration::from_millis(400));
        assert!(backoff(b, 30) <= Duration::from_secs(90));
    }
}
