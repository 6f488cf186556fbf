//! The dagfleet job layer: everything between a job on a queue and its artifact in the store.
//!
//! # Layout
//! - [`config`]: typed settings for NATS, the artifact store and the per-stage queues.
//! - [`bus`]: the JetStream topology (work-queue streams, per-role durable consumers, events,
//!   dead letters, KV buckets) and the [`Bus`] that publishes jobs and events over it.
//! - [`store`]: the [`ArtifactStore`], over any `object_store` backend (local directory, S3,
//!   MinIO, Ceph, R2, memory), with put-if-absent writes keyed by job id and content hash.
//! - [`worker`]: the [`Handler`] trait a role implements and the [`Worker`] that owns the pull
//!   loop, in-progress acks, heartbeats, retries, dead letters and graceful shutdown.
//! - [`error`]: [`JobError`], which tells the runtime whether to retry or dead-letter.
//!
//! Adding a role is one [`Handler`] implementation plus its job type in `dagfleet-protocol`.

pub mod bus;
pub mod config;
pub mod error;
pub mod store;
pub mod worker;

pub use bus::Bus;
pub use config::{NatsConfig, QueueConfig, Secret, StageQueue, StoreConfig};
pub use error::{BusError, JobError, StoreError};
pub use store::{sha256_hex, ArtifactStore};
pub use worker::{Handler, JobContext, JobOutput, JobState, Worker, WorkerConfig, WorkerStats};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
