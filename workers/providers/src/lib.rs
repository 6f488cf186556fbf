//! The LLM provider layer: one [`Provider`] type over several real protocols.
//!
//! - Anthropic: the Messages API (`POST /v1/messages`) and the Message Batches API (create,
//!   poll, stream results by `custom_id`, cancel);
//! - OpenAI-compatible servers (vLLM, llama.cpp, Ollama, LM Studio, dagfleet's own inference
//!   server): `POST /v1/chat/completions`; and the OpenAI Batch API (upload a JSONL file,
//!   create a batch, poll, read the output and error files, cancel).
//!
//! Every call goes through one retry loop ([`http`]): 429 and 5xx are retried with
//! exponential backoff and jitter, honouring `retry-after`; other 4xx answers are fatal and
//! carry the server's message. Keys come from the config, a mounted secret file or an
//! environment variable and are never formatted anywhere. [`ResponseCache`] keeps replies in
//! the artifact store so a re-run costs nothing; [`Price`] turns token usage into dollars.

#![forbid(unsafe_code)]

mod anthropic;
pub mod cache;
mod http;
mod openai;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub use cache::ResponseCache;
/// A secret setting (API keys): redacted in `Debug` and when serialized.
pub use dagfleet_runtime::Secret;

/// Which wire protocol a provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Anthropic Messages and Message Batches.
    Anthropic,
    /// OpenAI chat completions (any compatible server) and the OpenAI Batch API.
    Openai,
}

impl ProviderKind {
    fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Openai => "https://api.openai.com",
        }
    }

    fn default_key_env(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Openai => "OPENAI_API_KEY",
        }
    }

    /// Most requests in one provider batch.
    pub fn max_batch_requests(self) -> usize {
        match self {
            ProviderKind::Anthropic => 100_000,
            ProviderKind::Openai => 50_000,
        }
    }

    /// Most bytes in one provider batch (request bodies as sent).
    pub fn max_batch_bytes(self) -> usize {
        match self {
            ProviderKind::Anthropic => 256 * 1024 * 1024,
            ProviderKind::Openai => 200 * 1024 * 1024,
        }
    }
}

/// Dollars per million tokens for one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input (prompt) tokens.
    pub input_per_mtok: f64,
    /// Output (completion) tokens.
    pub output_per_mtok: f64,
    /// Fraction taken off for batch requests, e.g. `0.5`.
    #[serde(default)]
    pub batch_discount: f64,
}

impl Price {
    /// The cost of `usage`.
    pub fn cost(&self, usage: Usage, batch: bool) -> f64 {
        let full = (usage.input_tokens as f64 * self.input_per_mtok
            + usage.output_tokens as f64 * self.output_per_mtok)
            / 1e6;
        if batch {
            full * (1.0 - self.batch_discount)
        } else {
            full
        }
    }
}

/// Settings of one provider, from `[providers.NAME]` in the worker config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The wire protocol.
    pub kind: ProviderKind,
    /// Server root, without `/v1`; the vendor's public API when absent.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The key itself (set it through `DAGFLEET_PROVIDERS__NAME__API_KEY`, never in a file
    /// under version control).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A file holding the key, e.g. a mounted Kubernetes secret.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// An environment variable holding the key; `ANTHROPIC_API_KEY` or `OPENAI_API_KEY` when
    /// absent. A missing key is fine for local servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most online requests in flight.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Retries of a request answered with 429, 5xx, a malformed body or a transport error.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First backoff delay; doubled per retry, with jitter, capped at a minute.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Whether the server has the batch API. Default: yes for Anthropic and for OpenAI's
    /// own API, no for other OpenAI-compatible servers.
    #[serde(default)]
    pub batch: Option<bool>,
    /// Prices per model name. A model without one has an unknown cost, never zero.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_concurrency() -> usize {
    8
}
fn default_retries() -> u32 {
    6
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

impl ProviderConfig {
    /// A config with defaults for `kind` at `base_url`.
    pub fn new(kind: ProviderKind, base_url: Option<String>) -> Self {
        Self {
            kind,
            base_url,
            api_key: None,
            api_key_file: None,
            api_key_env: None,
            timeout: default_timeout(),
            concurrency: default_concurrency(),
            max_retries: default_retries(),
            backoff: default_backoff(),
            batch: None,
            prices: BTreeMap::new(),
        }
    }
}

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One request to a teacher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Caller's id, unique within a batch; results are matched on it.
    pub custom_id: String,
    /// System prompt.
    pub system: Option<String>,
    /// The conversation, ending with a user turn.
    pub messages: Vec<Message>,
    /// Token limit of the reply.
    pub max_tokens: u32,
    /// Sampling temperature; the server's default when absent.
    pub temperature: Option<f32>,
}

impl ChatRequest {
    /// A single-turn request.
    pub fn user(custom_id: impl Into<String>, system: Option<String>, text: String) -> Self {
        Self {
            custom_id: custom_id.into(),
            system,
            messages: vec![Message {
                role: "user".into(),
                content: text,
            }],
            max_tokens: 1024,
            temperature: None,
        }
    }
}

/// Tokens a request used, as the provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

/// A teacher's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatReply {
    /// The text of the reply.
    pub text: String,
    /// `stop` or `length` (the token limit was hit).
    pub finish_reason: String,
    /// Token usage.
    pub usage: Usage,
}

/// What became of one request of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It succeeded.
    Ok(ChatReply),
    /// The provider answered it with an error.
    Errored(String),
    /// The batch ended before it was processed.
    Expired,
    /// The batch was cancelled before it was processed.
    Canceled,
}

/// Where a provider batch is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchState {
    /// Still running.
    InProgress,
    /// Results (and per-request errors) can be read.
    Ended,
    /// The whole batch failed (e.g. OpenAI's `failed`: its input was rejected).
    Failed(String),
}

/// The provider's view of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchStatus {
    /// The batch id.
    pub id: String,
    /// Its state.
    pub state: BatchState,
    /// Requests finished so far, as far as the provider says.
    pub done: u64,
    /// Requests in the batch.
    pub total: u64,
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The server refused the request (4xx other than 429); retrying will not help.
    #[error("provider `{provider}` refused {what} with HTTP {status}: {message}")]
    Refused {
        /// Provider name.
        provider: String,
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Retries ran out on 429, 5xx, malformed bodies or transport errors.
    #[error("provider `{provider}`: {what} failed after {attempts} attempts; last error: {last}")]
    Exhausted {
        /// Provider name.
        provider: String,
        /// What was asked.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The answer could not be understood.
    #[error("provider `{provider}`: {what}: {message}")]
    Protocol {
        /// Provider name.
        provider: String,
        /// What was asked.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The provider cannot be used as configured.
    #[error("provider `{provider}`: {message}")]
    Config {
        /// Provider name.
        provider: String,
        /// What is wrong.
        message: String,
    },
}

/// A configured provider. Cheap to clone.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    cfg: ProviderConfig,
    base: String,
    key: Option<Secret>,
    client: reqwest::Client,
    slots: Semaphore,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.inner.name)
            .field("kind", &self.inner.cfg.kind)
            .field("base_url", &self.inner.base)
            .field("key", &self.inner.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Provider {
    /// Builds a provider named `name` from its config, reading its key.
    pub fn new(name: &str, cfg: ProviderConfig) -> Result<Self, ProviderError> {
        let err = |message: String| ProviderError::Config {
            provider: name.to_string(),
            message,
        };
        let key = if let Some(k) = &cfg.api_key {
            Some(k.clone())
        } else if let Some(path) = &cfg.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("cannot read api_key_file {}: {e}", path.display())))?;
            Some(Secret::new(text.trim()))
        } else {
            let var = cfg
                .api_key_env
                .clone()
                .unwrap_or_else(|| cfg.kind.default_key_env().to_string());
            std::env::var(&var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| Secret::new(v.trim()))
        };
        if key.as_ref().is_some_and(|k| {
            k.expose()
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ')
        }) {
            return Err(err(
                "the API key holds spaces or control characters; check the secret".into(),
            ));
        }
        let base = cfg
            .base_url
            .clone()
            .unwrap_or_else(|| cfg.kind.default_base_url().to_string())
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(err(format!(
                "base_url `{base}` must start with http:// or https://"
            )));
        }
        if cfg.concurrency == 0 {
            return Err(err("concurrency must be at least 1".into()));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                slots: Semaphore::new(cfg.concurrency),
                cfg,
                base,
                key,
                client,
            }),
        })
    }

    /// The provider's name in the config.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its wire protocol.
    pub fn kind(&self) -> ProviderKind {
        self.inner.cfg.kind
    }

    /// Its server root.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// Whether it has a batch API.
    pub fn supports_batch(&self) -> bool {
        self.inner.cfg.batch.unwrap_or(match self.inner.cfg.kind {
            ProviderKind::Anthropic => true,
            ProviderKind::Openai => self.inner.base == "https://api.openai.com",
        })
    }

    /// The cost of `usage` on `model`; `None` when the config has no price for it.
    pub fn cost(&self, model: &str, usage: Usage, batch: bool) -> Option<f64> {
        self.inner
            .cfg
            .prices
            .get(model)
            .map(|p| p.cost(usage, batch))
    }

    /// One online request, bounded by the provider's concurrency.
    pub async fn chat(&self, model: &str, req: &ChatRequest) -> Result<ChatReply, ProviderError> {
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| self.config_err("the provider is shut down"))?;
        match self.kind() {
            ProviderKind::Anthropic => anthropic::chat(self, model, req).await,
            ProviderKind::Openai => openai::chat(self, model, req).await,
        }
    }

    /// Cuts `requests` into index ranges that each fit one provider batch.
    pub fn batch_ranges(
        &self,
        model: &str,
        requests: &[ChatRequest],
    ) -> Vec<std::ops::Range<usize>> {
        let kind = self.kind();
        let (max_n, max_bytes) = (kind.max_batch_requests(), kind.max_batch_bytes());
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (i, r) in requests.iter().enumerate() {
            let size = match kind {
                ProviderKind::Anthropic => anthropic::batch_line(model, r).to_string().len(),
                ProviderKind::Openai => openai::batch_line(model, r).to_string().len() + 1,
            };
            if i > start && (i - start >= max_n || bytes + size > max_bytes) {
                out.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += size;
        }
        if start < requests.len() {
            out.push(start..requests.len());
        }
        out
    }

    /// Submits one provider batch (which must fit: see [`Provider::batch_ranges`]) and
    /// returns its id. `tag` is attached where the provider keeps metadata.
    pub async fn create_batch(
        &self,
        model: &str,
        requests: &[ChatRequest],
        tag: &str,
    ) -> Result<String, ProviderError> {
        if requests.is_empty() {
            return Err(self.config_err("a batch needs at least one request"));
        }
        match self.kind() {
            ProviderKind::Anthropic => anthropic::create_batch(self, model, requests).await,
            ProviderKind::Openai => openai::create_batch(self, model, requests, tag).await,
        }
    }

    /// Where batch `id` is.
    pub async fn batch_status(&self, id: &str) -> Result<BatchStatus, ProviderError> {
        match self.kind() {
            ProviderKind::Anthropic => anthropic::batch_status(self, id).await,
            ProviderKind::Openai => openai::batch_status(self, id).await,
        }
    }

    /// The results of an ended batch, by `custom_id`.
    pub async fn batch_results(&self, id: &str) -> Result<Vec<(String, Outcome)>, ProviderError> {
        match self.kind() {
            ProviderKind::Anthropic => anthropic::batch_results(self, id).await,
            ProviderKind::Openai => openai::batch_results(self, id).await,
        }
    }

    /// A live batch created earlier with `tag`, where the provider keeps metadata (OpenAI);
    /// `None` where it does not (Anthropic) or none matches. Closes the gap between creating a
    /// batch and recording its id: a job killed in between finds its batch here.
    pub async fn find_batch(&self, tag: &str) -> Result<Option<String>, ProviderError> {
        match self.kind() {
            ProviderKind::Anthropic => Ok(None),
            ProviderKind::Openai => openai::find_batch(self, tag).await,
        }
    }

    /// Asks the provider to cancel batch `id`.
    pub async fn cancel_batch(&self, id: &str) -> Result<(), ProviderError> {
        match self.kind() {
            ProviderKind::Anthropic => anthropic::cancel_batch(self, id).await,
            ProviderKind::Openai => openai::cancel_batch(self, id).await,
        }
    }

    fn config_err(&self, message: &str) -> ProviderError {
        ProviderError::Config {
            provider: self.inner.name.clone(),
            message: message.into(),
        }
    }

    fn protocol_err(&self, what: &str, message: impl Into<String>) -> ProviderError {
        ProviderError::Protocol {
            provider: self.inner.name.clone(),
            what: what.into(),
            message: message.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }
}

/// Maps a provider's stop reason to `stop` or `length`.
fn finish_reason(raw: Option<&str>) -> String {
    match raw {
        Some("max_tokens") | Some("length") => "length".into(),
        Some(other) if !other.is_empty() => match other {
            "end_turn" | "stop_sequence" | "stop" | "tool_use" => "stop".into(),
            o => o.into(),
        },
        _ => "stop".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_uses_the_batch_discount_and_unknown_prices_stay_unknown() {
        let mut cfg = ProviderConfig::new(ProviderKind::Anthropic, Some("http://x".into()));
        cfg.prices.insert(
            "m".into(),
            Price {
                input_per_mtok: 3.0,
                output_per_mtok: 15.0,
                batch_discount: 0.5,
            },
        );
        let p = Provider::new("a", cfg).unwrap();
        let u = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
        };
        assert_eq!(p.cost("m", u, false), Some(4.5));
        assert_eq!(p.cost("m", u, true), Some(2.25));
        assert_eq!(p.cost("other", u, false), None);
    }

    #[test]
    fn batches_are_cut_by_request_count() {
        let p = Provider::new(
            "a",
            ProviderConfig::new(ProviderKind::Openai, Some("http://x/v1/".into())),
        )
        .unwrap();
        assert_eq!(p.base_url(), "http://x");
        let reqs: Vec<_> = (0..50_001)
            .map(|i| ChatRequest::user(i.to_string(), None, "hi".into()))
            .collect();
        let ranges = p.batch_ranges("m", &reqs);
        assert_eq!(ranges, vec![0..50_000, 50_000..50_001]);
    }

    #[test]
    fn keys_never_show_in_debug() {
        let mut cfg = ProviderConfig::new(ProviderKind::Anthropic, None);
        cfg.api_key = Some(Secret::new("sk-ant-very-secret"));
        let p = Provider::new("a", cfg.clone()).unwrap();
        assert!(!format!("{p:?}").contains("very-secret"));
        assert!(!format!("{cfg:?}").contains("very-secret"));
        assert!(!serde_json::to_string(&cfg).unwrap().contains("very-secret"));
    }
}
