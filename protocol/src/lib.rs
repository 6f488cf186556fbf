//! Wire types of dagfleet. This crate does no I/O.
//!
//! # Overview
//! Everything that crosses a process boundary is defined here, so the coordinator, every worker
//! role and the CLI agree on one vocabulary:
//!
//! - [`Envelope`]: the versioned wrapper around every [`Job`] put on a JetStream work queue.
//! - [`Job`]: one payload type per pipeline [`Stage`] (mine shard, synth chunk, dataset build,
//!   train, infer batch, judge batch, report, and the `noop` stage used by tests and benchmarks).
//! - [`JobRecord`]: what a finished job produced; it is both part of the `JobsDone` event and the
//!   run-manifest entry written next to the artifacts.
//! - [`Event`]: progress and results on the events stream.
//! - [`RunState`]: the coordinator's per-run state, kept in a JetStream KV bucket.
//! - [`RunSpec`]: the user's TOML description of a run; [`Caps`]: the operator's limits on it.
//! - [`subjects`]: every stream, subject, consumer, bucket and header name, in one place.
//! - [`codec`]: the rmp-serde codec (named fields) with typed errors for bad bytes and unknown
//!   schema versions.

pub mod caps;
pub mod codec;
pub mod envelope;
pub mod event;
pub mod ids;
pub mod jobs;
pub mod spec;
pub mod stage;
pub mod state;
pub mod subjects;

pub use caps::Caps;
pub use codec::{decode_envelope, decode_event, encode, CodecError};
pub use envelope::{Envelope, TraceContext, SCHEMA_VERSION};
pub use event::{Event, EventKind};
pub use ids::{IdError, JobId, RunId};
pub use jobs::{ArtifactRef, Job, JobRecord};
pub use spec::{RunSpec, SpecError};
pub use stage::{Role, Stage};
pub use state::{Bitset, RunState, RunStatus, StageState, StageStatus};
