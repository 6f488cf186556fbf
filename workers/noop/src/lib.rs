//! The `noop` worker role.
//!
//! It runs the job layer end to end without doing real work, for tests, the chaos test and
//! `dagfleet bench queue`. A [`NoopJob`] can sleep, write an artifact of a given size (whose
//! content depends only on the job id, so redelivered and racing attempts write the same
//! bytes), fail retryably on its first deliveries, or fail fatally.

use bytes::Bytes;
use dagfleet_protocol::jobs::NoopJob;
use dagfleet_protocol::{Caps, Envelope, Job, Role};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use std::time::Duration;

/// Handler of the `noop` role. A job asking for more than the operator's caps allow (it
/// did not come through a coordinator with the same caps) is refused and dead-lettered, so
/// one job cannot take the worker and its other in-flight jobs down.
#[derive(Clone, Debug, Default)]
pub struct NoopHandler {
    caps: Caps,
}

impl NoopHandler {
    /// A handler that refuses jobs over `caps`.
    pub fn new(caps: Caps) -> Self {
        Self { caps }
    }
}

/// The artifact a noop job writes: its job id repeated to `len` bytes.
pub fn noop_output(env: &Envelope, len: usize) -> Bytes {
    let id = env.job_id.as_str().as_bytes();
    Bytes::from(id.iter().copied().cycle().take(len).collect::<Vec<u8>>())
}

impl Handler for NoopHandler {
    fn role(&self) -> Role {
        Role::Noop
    }

    fn writes_artifacts(&self, job: &Job) -> bool {
        matches!(job, Job::Noop(NoopJob { output_bytes, .. }) if *output_bytes > 0)
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let Job::Noop(job) = &env.job else {
            return Err(JobError::fatal(format!(
                "the noop role got a `{}` job",
                env.job.stage()
            )));
        };
        if u64::from(job.output_bytes) > self.caps.max_artifact_bytes {
            return Err(JobError::fatal(format!(
                "noop job {} asks for a {}-byte artifact, over caps.max_artifact_bytes = {}",
                env.index, job.output_bytes, self.caps.max_artifact_bytes
            )));
        }
        if Duration::from_millis(job.work_ms) > self.caps.max_job_time {
            return Err(JobError::fatal(format!(
                "noop job {} asks to work {} ms, over caps.max_job_time = {} ms",
                env.index,
                job.work_ms,
                self.caps.max_job_time.as_millis()
            )));
        }
        if job.fatal {
            return Err(JobError::fatal(format!(
                "noop job {} is configured to fail (noop.fatal_jobs)",
                env.index
            )));
        }
        if ctx.attempt() <= job.fail_attempts {
            return Err(JobError::Retry {
                reason: format!(
                    "noop job {} fails its first {} deliveries (noop.fail_attempts)",
                    env.index, job.fail_attempts
                ),
                after: Some(Duration::from_millis(50)),
            });
        }
        if job.work_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(job.work_ms)) => {}
                _ = ctx.cancelled().cancelled() => return Err(JobError::retry("worker stopping")),
            }
        }
        let mut out = JobOutput::default();
        if job.output_bytes > 0 {
            let r = ctx
                .put("out.bin", noop_output(env, job.output_bytes as usize))
                .await?;
            out = out.metric("bytes", r.bytes as f64);
        }
        Ok(out)
    }
}
