//! Events on the events stream: progress, results and failures.

use serde::{Deserialize, Serialize};

use crate::{JobId, JobRecord, RunId, Stage};

/// One event. Subject: [`crate::subjects::event`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always [`crate::SCHEMA_VERSION`] when written by this build.
    pub schema_version: u16,
    /// The run it concerns.
    pub run_id: RunId,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A run was submitted; the coordinator should look at it.
    RunSubmitted,
    /// A stage's jobs were published.
    StageDispatched {
        /// The stage.
        stage: Stage,
        /// Number of jobs.
        jobs: u32,
    },
    /// A worker reports progress within a job.
    JobProgress {
        /// The job.
        job_id: JobId,
        /// Its stage.
        stage: Stage,
        /// Units done.
        done: u64,
        /// Units in all, 0 when unknown.
        total: u64,
        /// Short free-text note.
        message: String,
    },
    /// A trainer finished an optimizer step.
    TrainStep {
        /// The train job.
        job_id: JobId,
        /// Optimizer steps done.
        step: u64,
        /// Optimizer steps in all.
        total_steps: u64,
        /// Mean training loss per label token over the step.
        loss: f64,
        /// Learning rate of the step.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Tokens (padding excluded) per second over the step.
        tokens_per_s: f64,
        /// Device memory in use, bytes, where the device reports it.
        gpu_mem_bytes: Option<u64>,
        /// Validation loss, when it was measured at this step.
        valid_loss: Option<f64>,
    },
    /// Jobs finished; their outputs are in the store. A worker batches the completions it
    /// has ready into one event, so the event stream carries far fewer messages than jobs.
    JobsDone {
        /// One record per finished job.
        records: Vec<JobRecord>,
    },
    /// A job failed and will be retried.
    JobRetrying {
        /// The job.
        job_id: JobId,
        /// Its stage.
        stage: Stage,
        /// Its index.
        index: u32,
        /// Delivery attempt that failed.
        attempt: u32,
        /// Why.
        reason: String,
        /// Delay before redelivery.
        delay_ms: u64,
    },
    /// A job was moved to the dead-letter stream and will not run again.
    JobDeadLettered {
        /// The job.
        job_id: JobId,
        /// Its stage.
        stage: Stage,
        /// Its index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// Every job of a stage is finished.
    StageDone {
        /// The stage.
        stage: Stage,
        /// Jobs that failed and were tolerated by `limits.max_failed_jobs`.
        failed: u32,
    },
    /// The run finished; the manifest is written.
    RunDone,
    /// The run failed.
    RunFailed {
        /// Why.
        reason: String,
    },
    /// The run was cancelled (`dagfleet cancel`). Workers subscribe to these on
    /// [`crate::subjects::RUN_CANCELLED`] and stop the run's jobs.
    RunCancelled {
        /// Who or why, as the canceller gave it.
        reason: String,
    },
}

impl EventKind {
    /// Short name, used as the last subject token.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::RunSubmitted => "run_submitted",
            EventKind::StageDispatched { .. } => "stage_dispatched",
            EventKind::JobProgress { .. } => "job_progress",
            EventKind::TrainStep { .. } => "train_step",
            EventKind::JobsDone { .. } => "jobs_done",
            EventKind::JobRetrying { .. } => "job_retrying",
            EventKind::JobDeadLettered { .. } => "job_dead_lettered",
            EventKind::StageDone { .. } => "stage_done",
            EventKind::RunDone => "run_done",
            EventKind::RunFailed { .. } => "run_failed",
            EventKind::RunCancelled { .. } => "run_cancelled",
        }
    }
}
