//! The dagfleet coordinator.
//!
//! # Overview
//! The coordinator turns a submitted [`RunSpec`](dagfleet_protocol::RunSpec) into jobs, one
//! stage at a time, and follows the events stream until the run is done. It keeps nothing in
//! memory that matters: all run state is a [`RunState`](dagfleet_protocol::RunState) in the
//! `dagfleet_runs` KV bucket, changed only by compare-and-set on the entry's revision. So a
//! restarted coordinator resumes where the run was, and any number of coordinators can run
//! side by side:
//!
//! - **events** are pulled from one durable consumer shared by all coordinators, applied in
//!   batches (one CAS per run per batch), and acked after the state is stored. Applying an
//!   event twice is harmless: completions are bits in a set, and only indices of jobs the
//!   stage was planned with count.
//! - **dispatch** of a stage starts by taking a lease in the run state (CAS from `pending` to
//!   `dispatching`, naming the holder); only the holder publishes, page by page, renewing the
//!   lease as it goes. If it dies, the lease expires and another coordinator republishes: jobs
//!   carry deterministic ids used as `Nats-Msg-Id`, so JetStream drops the duplicates. A stage
//!   whose dispatch was taken over too often (its planners keep dying) fails its run.
//! - a **reconcile tick** looks at every running run, so a run submitted while no coordinator
//!   was up, or a lease left by a dead coordinator, is picked up. An error or a panic while
//!   moving one run forward is that run's problem: it is logged, counted, and after a few
//!   panics the run is failed; the coordinator goes on serving the others.
//!
//! # Layout
//! - [`client`]: what `dagfleet run`, `status` and `cancel` call ([`submit`], [`load_run`],
//!   [`list_runs`], [`cancel`]); the spec is checked against the operator's
//!   [`Caps`](dagfleet_protocol::Caps) before anything is stored.
//! - [`service`]: the [`Coordinator`] process: the event loop, the reconciler, dispatch.
//! - [`plan`]: splitting a stage into jobs, as a lazily made [`plan::StagePlan`].
//! - [`manifest`]: the run manifest written when a run ends.

pub mod client;
pub mod manifest;
pub mod plan;
pub mod service;

pub use client::{cancel, check_spec, list_runs, load_run, submit, Cancelled};
pub use service::{Coordinator, CoordinatorConfig};

use dagfleet_protocol::RunId;
use dagfleet_runtime::{BusError, StoreError};

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// NATS failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The artifact store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run spec cannot be run.
    #[error(transparent)]
    Spec(#[from] dagfleet_protocol::SpecError),
    /// The run spec asks for a stage this build cannot plan.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// A KV operation failed.
    #[error("run state `{run}`: {reason}")]
    State {
        /// The run.
        run: String,
        /// Why.
        reason: String,
    },
    /// A run's KV entry does not decode (written by another version, or by hand).
    #[error("run state `{run}` is unreadable: {reason}")]
    Unreadable {
        /// The run.
        run: String,
        /// The decoder's message.
        reason: String,
    },
}

fn state_err(run: &RunId, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::State {
        run: run.to_string(),
        reason: e.to_string(),
    }
}
