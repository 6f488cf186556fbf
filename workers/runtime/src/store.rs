//! The artifact store.
//!
//! A thin layer over `object_store` (the trait with a local-filesystem, S3 and in-memory
//! implementation), adding what dagfleet needs on top:
//!
//! - keys are laid out per run: `runs/<run>/<stage>/<job>/<name>` for artifacts and
//!   `runs/<run>/jobs/<stage>/<job>.json` for the job record that marks a job as done;
//! - writes are put-if-absent, so two workers racing on one job leave one object, and the
//!   loser adopts the winner's content and hash;
//! - every reference carries a SHA-256, checked on read.

use bytes::Bytes;
use dagfleet_protocol::{ArtifactRef, JobId, JobRecord, RunId, Stage};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::config::StoreConfig;
use crate::error::StoreError;

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Key of an artifact named `name` written by `job`.
pub fn artifact_key(run: &RunId, stage: Stage, job: &JobId, name: &str) -> String {
    format!("runs/{run}/{stage}/{job}/{name}")
}

/// Key of the job record (manifest entry) of `job`.
pub fn record_key(run: &RunId, stage: Stage, job: &JobId) -> String {
    format!("runs/{run}/jobs/{stage}/{job}.json")
}

/// Prefix under which all job records of a run lie.
pub fn records_prefix(run: &RunId) -> String {
    format!("runs/{run}/jobs")
}

/// Key of the run manifest.
pub fn manifest_key(run: &RunId) -> String {
    format!("runs/{run}/manifest.json")
}

/// Where artifacts live. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
}

impl ArtifactStore {
    /// Opens the store described by `cfg`. A plain path or `file://` URL is a local
    /// directory (created if missing); `s3://bucket/prefix` is any S3-compatible service;
    /// `memory://` keeps everything in this process.
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let url = cfg.url.trim();
        if url.is_empty() {
            return Err(StoreError::Config("store.url is empty".into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::Config(format!(
                    "store.url `{url}` names no bucket; expected s3://BUCKET[/PREFIX]"
                )));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &cfg.region {
                b = b.with_region(r);
            }
            if let Some(k) = &cfg.access_key_id {
                b = b.with_access_key_id(k.expose());
            }
            if let Some(k) = &cfg.secret_access_key {
                b = b.with_secret_access_key(k.expose());
            }
            if cfg.allow_http {
                b = b.with_allow_http(true);
            }
            let s3 = b
                .build()
                .map_err(|e| StoreError::Config(format!("store.url `{url}`: {e}")))?;
            return Ok(Self {
                inner: Arc::new(s3),
                root: Path::from(prefix),
                url: url.to_string(),
            });
        }
        if url == "memory://" {
            return Ok(Self {
                inner: Arc::new(object_store::memory::InMemory::new()),
                root: Path::default(),
                url: url.to_string(),
            });
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        // `s3:/bucket` or `s3:bucket` is a mistyped URL, not a directory named `s3:`.
        if let Some((scheme, _)) = url.split_once(':') {
            if !url.contains("://")
                && scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+')
            {
                return Err(StoreError::Config(format!(
                    "store.url `{url}` looks like a URL with a malformed scheme; write {scheme}://..., or ./{url} for a directory"
                )));
            }
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(StoreError::Config(format!(
                "store.url `{url}`: unsupported scheme; use a directory, file://, s3:// or memory://"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Config(format!("store.url `{url}`: cannot create directory: {e}"))
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::Config(format!("store.url `{url}`: {e}")))?;
        Ok(Self {
            inner: Arc::new(fs),
            root: Path::default(),
            url: url.to_string(),
        })
    }

    /// Wraps an existing `object_store` implementation.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: impl Into<String>) -> Self {
        Self {
            inner,
            root: Path::default(),
            url: url.into(),
        }
    }

    /// The URL the store was opened from (no credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> Path {
        let mut p = self.root.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// Writes `data` under `key` unless an object is already there. Returns the reference of
    /// what is stored afterwards: the new content, or the existing content when another
    /// writer got there first.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<ArtifactRef, StoreError> {
        let path = self.path(key);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let r = ArtifactRef {
            key: key.to_string(),
            sha256: sha256_hex(&data),
            bytes: data.len() as u64,
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(r),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get_raw(key).await?;
                Ok(ArtifactRef {
                    key: key.to_string(),
                    sha256: sha256_hex(&existing),
                    bytes: existing.len() as u64,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `data` under `key`, replacing what is there (run-level files such as the
    /// manifest, which the coordinator rebuilds from job records).
    pub async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<ArtifactRef, StoreError> {
        let r = ArtifactRef {
            key: key.to_string(),
            sha256: sha256_hex(&data),
            bytes: data.len() as u64,
        };
        self.inner
            .put(&self.path(key), PutPayload::from_bytes(data))
            .await?;
        Ok(r)
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_raw(&self, key: &str) -> Result<Bytes, StoreError> {
        match self.inner.get(&self.path(key)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound {
                key: key.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads `key` without a hash check; `None` when absent.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get_raw(key).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the object `r` points to and checks its hash.
    pub async fn get(&self, r: &ArtifactRef) -> Result<Bytes, StoreError> {
        let data = self.get_raw(&r.key).await?;
        let found = sha256_hex(&data);
        if found != r.sha256 {
            return Err(StoreError::HashMismatch {
                key: r.key.clone(),
                expected: r.sha256.clone(),
                found,
            });
        }
        Ok(data)
    }

    /// The reference of `key` and its count of non-empty lines, read as a stream so a large
    /// JSONL file never sits in memory whole; `None` when absent.
    pub async fn line_stats(&self, key: &str) -> Result<Option<(ArtifactRef, u64)>, StoreError> {
        use futures::StreamExt;
        let mut stream = match self.inner.get(&self.path(key)).await {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (mut hasher, mut bytes, mut rows, mut in_line) = (Sha256::new(), 0u64, 0u64, false);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            for b in chunk.iter() {
                if *b == b'\n' {
                    rows += u64::from(in_line);
                    in_line = false;
                } else {
                    in_line = true;
                }
            }
        }
        rows += u64::from(in_line);
        let r = ArtifactRef {
            key: key.to_string(),
            sha256: hex::encode(hasher.finalize()),
            bytes,
        };
        Ok(Some((r, rows)))
    }

    /// Keys under `prefix`, relative to the store root, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let p = self.path(prefix);
        let metas: Vec<_> = self.inner.list(Some(&p)).try_collect().await?;
        let root = self.root.as_ref();
        let mut keys: Vec<String> = metas
            .into_iter()
            .map(|m| {
                let s = m.location.as_ref();
                s.strip_prefix(root)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(s)
                    .to_string()
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The record of a finished job, if there is one.
    pub async fn job_record(
        &self,
        run: &RunId,
        stage: Stage,
        job: &JobId,
    ) -> Result<Option<JobRecord>, StoreError> {
        let Some(bytes) = self.get_opt(&record_key(run, stage, job)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Config(format!("job record of {job} is unreadable: {e}")))
    }

    /// Writes the record of a finished job, put-if-absent. Returns the record that is stored:
    /// `rec`, or the one an earlier attempt wrote.
    pub async fn write_job_record(&self, rec: &JobRecord) -> Result<JobRecord, StoreError> {
        let key = record_key(&rec.run_id, rec.stage, &rec.job_id);
        let data = serde_json::to_vec_pretty(rec)
            .map_err(|e| StoreError::Config(format!("cannot encode job record: {e}")))?;
        let mine = sha256_hex(&data);
        let stored = self.put_if_absent(&key, Bytes::from(data)).await?;
        if stored.sha256 == mine {
            return Ok(rec.clone());
        }
        Ok(self
            .job_record(&rec.run_id, rec.stage, &rec.job_id)
            .await?
            .unwrap_or_else(|| rec.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistyped_urls_are_refused() {
        for url in ["s3:/bucket/prefix", "s3:bucket", "file:/tmp/x"] {
            let e = ArtifactStore::open(&StoreConfig {
                url: url.into(),
                ..Default::default()
            })
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(e.to_string().contains("malformed scheme"), "{e}");
        }
    }

    #[tokio::test]
    async fn line_stats_streams_rows_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&StoreConfig {
            url: dir.path().to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
        for (data, rows) in [(&b"a\nb\n"[..], 2), (b"a\n\nb", 2), (b"", 0), (b"\n\n", 0)] {
            let r = store
                .put_overwrite("f.jsonl", Bytes::copy_from_slice(data))
                .await
                .unwrap();
            let (got, n) = store.line_stats("f.jsonl").await.unwrap().unwrap();
            assert_eq!((got, n), (r, rows));
        }
        assert!(store.line_stats("missing").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn put_if_absent_keeps_the_first_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&StoreConfig {
            url: dir.path().to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
        let a = store
            .put_if_absent("runs/r/x/j/out", Bytes::from_static(b"first"))
            .await
            .unwrap();
        let b = store
            .put_if_absent("runs/r/x/j/out", Bytes::from_static(b"second"))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(store.get(&a).await.unwrap(), Bytes::from_static(b"first"));
        assert_eq!(
            store.list("runs/r").await.unwrap(),
            vec!["runs/r/x/j/out".to_string()]
        );
        let bad = ArtifactRef {
            sha256: sha256_hex(b"other"),
            ..a
        };
        assert!(matches!(
            store.get(&bad).await,
            Err(StoreError::HashMismatch { .. })
        ));
    }

    #[test]
    fn bad_urls_name_the_key() {
        let e = ArtifactStore::open(&StoreConfig {
            url: "ftp://x".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("store.url"), "{e}");
    }
}
