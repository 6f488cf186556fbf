//! API keys for dagfleet's HTTP servers (`dagfleet serve`, `dagfleet mcp --http`): every
//! route but `/health` takes `Authorization: Bearer <key>` when a key is set, and a server
//! refuses to listen beyond loopback without one unless told `--insecure-no-auth`.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use std::net::ToSocketAddrs;
use std::sync::Arc;

/// How a server authenticates its clients.
#[derive(Clone, Default)]
pub struct Access {
    /// The key clients send as a bearer token (`http.api_key`); `None`: no key asked.
    pub api_key: Option<String>,
    /// Listen beyond loopback without a key (`--insecure-no-auth`).
    pub insecure_no_auth: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("insecure_no_auth", &self.insecure_no_auth)
            .finish()
    }
}

impl Access {
    /// Refuses `addr` when it reaches beyond loopback and no key is set, unless
    /// `insecure_no_auth`. The message names the address and both ways out.
    pub fn check_listen(&self, addr: &str) -> Result<(), String> {
        if self.api_key.is_some() || self.insecure_no_auth {
            return Ok(());
        }
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve the listen address {addr}: {e}"))?
            .collect();
        if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {addr} without an API key: anyone who reaches it could use it. Set http.api_key (e.g. DAGFLEET_HTTP__API_KEY; clients send `Authorization: Bearer <key>`), listen on 127.0.0.1, or pass --insecure-no-auth"
        ))
    }

    /// `app` with every route but `/health` behind the key, when one is set.
    pub fn layer(&self, app: Router) -> Router {
        match &self.api_key {
            None => app,
            Some(k) => app.layer(axum::middleware::from_fn_with_state(
                Arc::new(k.clone()),
                require_key,
            )),
        }
    }
}

/// Equal without an early exit, so the time taken does not tell how much of a guess
/// matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(key): State<Arc<String>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        other => {
            let message = if other.is_some() {
                "the API key is not valid"
            } else {
                "this server needs an API key: send `Authorization: Bearer <key>`"
            };
            let mut r = (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"message": message, "type": "invalid_api_key"}})),
            )
                .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_needs_no_key_and_the_rest_does() {
        let open = Access::default();
        assert!(open.check_listen("127.0.0.1:8080").is_ok());
        assert!(open.check_listen("[::1]:8080").is_ok());
        let e = open.check_listen("0.0.0.0:8080").unwrap_err();
        assert!(
            e.contains("0.0.0.0:8080") && e.contains("--insecure-no-auth"),
            "{e}"
        );
        let keyed = Access {
            api_key: Some("k".into()),
            ..Default::default()
        };
        assert!(keyed.check_listen("0.0.0.0:8080").is_ok());
        let insecure = Access {
            insecure_no_auth: true,
            ..Default::default()
        };
        assert!(insecure.check_listen("0.0.0.0:8080").is_ok());
        assert!(!format!("{keyed:?}").contains("\"k\""));
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
