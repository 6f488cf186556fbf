//! Run and job identifiers.
//!
//! Both end up inside NATS subjects and object-store keys, so they are restricted to
//! `[A-Za-z0-9_-]`. Job ids are derived from (run, stage, key) so that planning the same stage
//! twice yields the same ids, which JetStream then deduplicates through `Nats-Msg-Id`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

use crate::Stage;

/// Longest run id accepted; it is part of subjects and keys.
pub const MAX_RUN_ID_LEN: usize = 64;

/// A malformed identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty or longer than [`MAX_RUN_ID_LEN`].
    #[error("run id `{0}` must be 1 to {MAX_RUN_ID_LEN} characters long")]
    Length(String),
    /// The id contains a character other than ASCII letters, digits, `_` and `-`.
    #[error("run id `{0}` may only contain ASCII letters, digits, `_` and `-` (it becomes part of NATS subjects and storage keys)")]
    Charset(String),
}

/// Identifier of one pipeline run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// Validates `s` as a run id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_RUN_ID_LEN {
            return Err(IdError::Length(s));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(IdError::Charset(s));
        }
        Ok(Self(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> Self {
        id.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of one job: 32 hex characters, a hash of (run, stage, planning key).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// Derives the id of the job planned under `key` in `stage` of `run`.
    pub fn derive(run: &RunId, stage: Stage, key: &str) -> Self {
        let mut h = Sha256::new();
        h.update(run.as_str().as_bytes());
        h.update([0]);
        h.update(stage.as_str().as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        let digest = h.finalize();
        Self(hex::encode(&digest[..16]))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_checked() {
        assert!(RunId::new("airflow-2026_01").is_ok());
        assert_eq!(RunId::new(""), Err(IdError::Length(String::new())));
        assert!(matches!(RunId::new("a.b"), Err(IdError::Charset(_))));
        assert!(matches!(RunId::new("a b"), Err(IdError::Charset(_))));
        assert!(matches!(
            RunId::new("x".repeat(65)),
            Err(IdError::Length(_))
        ));
    }

    #[test]
    fn job_ids_are_stable_and_distinct() {
        let run = RunId::new("r1").unwrap();
        let a = JobId::derive(&run, Stage::Mine, "shard-0");
        assert_eq!(a, JobId::derive(&run, Stage::Mine, "shard-0"));
        assert_ne!(a, JobId::derive(&run, Stage::Mine, "shard-1"));
        assert_ne!(a, JobId::derive(&run, Stage::Judge, "shard-0"));
        assert_eq!(a.as_str().len(), 32);
    }
}
