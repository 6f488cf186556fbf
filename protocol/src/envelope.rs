//! The versioned envelope around every job.

use serde::{Deserialize, Serialize};

use crate::{Job, JobId, RunId, Stage};

/// Schema version this build writes and reads. Bump it on any incompatible change to
/// [`Envelope`], [`Job`] or [`crate::Event`]; readers reject other versions with
/// [`crate::CodecError::UnsupportedVersion`] instead of guessing.
pub const SCHEMA_VERSION: u16 = 1;

/// W3C trace context, so one run can be followed across the coordinator and every worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent` header value (`00-<trace id>-<span id>-<flags>`), empty when untraced.
    pub traceparent: String,
    /// Optional vendor `tracestate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context whose trace id is derived from the run id, so every job of a run shares
    /// one trace, with a span id derived from the job id.
    pub fn for_job(run: &RunId, job: &JobId) -> Self {
        use sha2::{Digest, Sha256};
        let trace = Sha256::digest(run.as_str().as_bytes());
        let span = Sha256::digest(job.as_str().as_bytes());
        Self {
            traceparent: format!(
                "00-{}-{}-01",
                hex::encode(&trace[..16]),
                hex::encode(&span[..8])
            ),
            tracestate: None,
        }
    }
}

/// One job on a work queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`SCHEMA_VERSION`] when written by this build.
    pub schema_version: u16,
    /// Deterministic id; also the JetStream `Nats-Msg-Id`, so re-publishing is deduplicated.
    pub job_id: JobId,
    /// The run this job belongs to.
    pub run_id: RunId,
    /// The stage this job belongs to.
    pub stage: Stage,
    /// Index of the job within its stage, `0..jobs`.
    pub index: u32,
    /// Delivery attempt as planned (1 on first dispatch); workers take the live count from
    /// JetStream's delivery counter.
    pub attempt: u32,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Trace context of the run.
    pub trace: TraceContext,
    /// Stage-specific payload.
    pub job: Job,
}

impl Envelope {
    /// Builds the envelope for the job planned under `key` at `index` of `stage`.
    pub fn new(
        run_id: RunId,
        stage: Stage,
        index: u32,
        key: &str,
        created_at_ms: i64,
        job: Job,
    ) -> Self {
        let job_id = JobId::derive(&run_id, stage, key);
        let trace = TraceContext::for_job(&run_id, &job_id);
        Self {
            schema_version: SCHEMA_VERSION,
            job_id,
            run_id,
            stage,
            index,
            attempt: 1,
            created_at_ms,
            trace,
            job,
        }
    }
}
