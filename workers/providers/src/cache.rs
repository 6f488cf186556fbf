//! Replies kept in the artifact store, keyed by what was asked, so re-running a stage calls
//! nothing and costs nothing.

use bytes::Bytes;
use dagfleet_runtime::{sha256_hex, ArtifactStore, StoreError};
use serde_json::json;

use crate::{ChatReply, ChatRequest, Provider};

/// A response cache over an artifact store.
#[derive(Clone, Debug)]
pub struct ResponseCache {
    store: ArtifactStore,
}

impl ResponseCache {
    /// A cache under `cache/llm/` of `store`.
    pub fn new(store: ArtifactStore) -> Self {
        Self { store }
    }

    /// The cache key of `req` to `model` on `provider`: the hash of (provider kind and
    /// server, model, parameters, prompt). The `custom_id` is not part of it.
    pub fn key(provider: &Provider, model: &str, req: &ChatRequest) -> String {
        let ident = json!({
            "kind": provider.kind(),
            "server": provider.base_url(),
            "model": model,
            "system": req.system,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        });
        sha256_hex(ident.to_string().as_bytes())
    }

    fn path(key: &str) -> String {
        format!("cache/llm/{}/{key}.json", &key[..2.min(key.len())])
    }

    /// The cached reply for `key`, if any. An unreadable entry counts as a miss.
    pub async fn get(&self, key: &str) -> Result<Option<ChatReply>, StoreError> {
        Ok(self
            .store
            .get_opt(&Self::path(key))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Keeps `reply` under `key`.
    pub async fn put(&self, key: &str, reply: &ChatReply) -> Result<(), StoreError> {
        let data = serde_json::to_vec(reply).unwrap_or_default();
        self.store
            .put_if_absent(&Self::path(key), Bytes::from(data))
            .await?;
        Ok(())
    }
}
