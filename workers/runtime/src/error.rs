//! Errors of the job layer.
//!
//! [`JobError`] is what a [`crate::Handler`] returns; its variant decides what happens to the
//! job. [`BusError`] and [`StoreError`] are infrastructure failures.

use std::time::Duration;

/// Why a job did not finish, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// A transient failure (rate limit, network, busy GPU): redeliver after `after`, or after
    /// the stage's backoff when `None`, until the stage's `max_attempts` is used up.
    #[error("retryable: {reason}")]
    Retry {
        /// What went wrong.
        reason: String,
        /// Requested delay, e.g. from a `retry-after` header.
        after: Option<Duration>,
    },
    /// A failure that will not go away (bad input, unsupported model): dead-letter now.
    #[error("fatal: {reason}")]
    Fatal {
        /// What went wrong.
        reason: String,
    },
}

impl JobError {
    /// A retryable error with the stage's default delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after: None,
        }
    }

    /// A fatal error.
    pub fn fatal(reason: impl Into<String>) -> Self {
        Self::Fatal {
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HashMismatch { .. } | StoreError::Config(_) => {
                JobError::fatal(e.to_string())
            }
            StoreError::NotFound { .. } => JobError::fatal(e.to_string()),
            other => JobError::retry(other.to_string()),
        }
    }
}

/// A failure talking to the artifact store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL or options are unusable.
    #[error("artifact store config: {0}")]
    Config(String),
    /// The object does not exist.
    #[error("artifact `{key}` not found")]
    NotFound {
        /// Its key.
        key: String,
    },
    /// An object's content does not match the hash it was referenced with.
    #[error("artifact `{key}` has sha256 {found}, expected {expected}")]
    HashMismatch {
        /// Its key.
        key: String,
        /// The hash in the reference.
        expected: String,
        /// The hash of the content.
        found: String,
    },
    /// Any other store error.
    #[error("artifact store: {0}")]
    Backend(#[from] object_store::Error),
}

/// A failure talking to NATS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The server URL (credentials removed).
        url: String,
        /// Why.
        reason: String,
    },
    /// A stream, consumer or bucket could not be created or opened.
    #[error("JetStream topology: {0}")]
    Topology(String),
    /// A publish failed or was not acknowledged.
    #[error("publish to `{subject}` failed: {reason}")]
    Publish {
        /// Target subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// A KV operation failed.
    #[error("KV `{bucket}`: {reason}")]
    Kv {
        /// The bucket.
        bucket: String,
        /// Why.
        reason: String,
    },
    /// Encoding failed.
    #[error(transparent)]
    Codec(#[from] dagfleet_protocol::CodecError),
}
