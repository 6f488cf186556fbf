//! Every JetStream stream, subject, consumer, bucket and header name, in one place.
//!
//! # Layout
//! | what | name |
//! |---|---|
//! | job work queue | stream `DAGFLEET_JOBS`, subjects `dagfleet.jobs.<role>.<stage>` |
//! | per-role consumer | durable pull `dagfleet-<role>`, filter `dagfleet.jobs.<role>.>` |
//! | events | stream `DAGFLEET_EVENTS`, subjects `dagfleet.events.<run>.<event>` |
//! | coordinator consumer | durable pull `dagfleet-coordinator` on the events stream |
//! | dead letters | stream `DAGFLEET_DLQ`, subjects `dagfleet.dlq.<role>.<stage>` |
//! | run state | KV bucket `dagfleet_runs`, key = run id |
//! | worker heartbeats | KV bucket `dagfleet_workers`, key `<role>.<worker id>` |

use crate::{Role, RunId, Stage};

/// Work-queue stream holding all jobs.
pub const JOBS_STREAM: &str = "DAGFLEET_JOBS";
/// Subjects of [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "dagfleet.jobs.>";
/// Stream of progress, result and failure events.
pub const EVENTS_STREAM: &str = "DAGFLEET_EVENTS";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "dagfleet.events.>";
/// Dead-letter stream.
pub const DLQ_STREAM: &str = "DAGFLEET_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "dagfleet.dlq.>";
/// KV bucket of run state.
pub const RUNS_BUCKET: &str = "dagfleet_runs";
/// KV bucket of worker heartbeats.
pub const WORKERS_BUCKET: &str = "dagfleet_workers";
/// Durable consumer shared by all coordinators.
pub const COORDINATOR_CONSUMER: &str = "dagfleet-coordinator";

/// Header carrying the JetStream deduplication id.
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the schema version, readable without decoding the body.
pub const HDR_SCHEMA: &str = "Dagfleet-Schema";
/// Header on dead letters: why the message was dead-lettered.
pub const HDR_REASON: &str = "Dagfleet-Reason";
/// Header on dead letters: the subject the message came from.
pub const HDR_ORIGIN: &str = "Dagfleet-Origin";
/// Header on dead letters: the job id, when the body could be decoded.
pub const HDR_JOB_ID: &str = "Dagfleet-Job-Id";
/// W3C trace context header.
pub const HDR_TRACEPARENT: &str = "traceparent";

/// Subject a job of `stage` is published on.
pub fn job(stage: Stage) -> String {
    format!("dagfleet.jobs.{}.{}", stage.role(), stage)
}

/// The subject of a job of `stage` on `lane` (see [`crate::Job::lane`]). A lane is a
/// separate subject tree, `dagfleet.jobs.<role>-<lane>.<stage>`, so the role's shared
/// consumer never sees it and only workers that subscribe to the lane take its jobs.
pub fn job_on(stage: Stage, lane: Option<&str>) -> String {
    match lane {
        None => job(stage),
        Some(l) => format!("dagfleet.jobs.{}-{l}.{}", stage.role(), stage),
    }
}

/// The filter of the consumer of `role`'s `lane`.
pub fn lane_filter(role: Role, lane: &str) -> String {
    format!("dagfleet.jobs.{role}-{lane}.>")
}

/// The durable consumer shared by the workers of `role` that serve `lane`.
pub fn lane_consumer(role: Role, lane: &str) -> String {
    format!("dagfleet-{role}-{lane}")
}

/// Filter subject of `role`'s consumer.
pub fn role_filter(role: Role) -> String {
    format!("dagfleet.jobs.{role}.>")
}

/// Durable consumer name of `role`.
pub fn role_consumer(role: Role) -> String {
    format!("dagfleet-{role}")
}

/// Subject of an event named `name` about `run`.
pub fn event(run: &RunId, name: &str) -> String {
    format!("dagfleet.events.{run}.{name}")
}

/// Every run's cancellation event (core NATS subscribers see JetStream-stored messages
/// too): workers subscribe to it to stop a cancelled run's jobs.
pub const RUN_CANCELLED: &str = "dagfleet.events.*.run_cancelled";

/// Filter for every event of `run`.
pub fn run_events(run: &RunId) -> String {
    format!("dagfleet.events.{run}.>")
}

/// Subject a dead-lettered job of `stage` is published on; `None` when the stage is unknown
/// (undecodable message).
pub fn dead_letter(role: Role, stage: Option<Stage>) -> String {
    match stage {
        Some(s) => format!("dagfleet.dlq.{role}.{s}"),
        None => format!("dagfleet.dlq.{role}.undecodable"),
    }
}

/// KV key of a worker heartbeat.
pub fn worker_key(role: Role, worker: &str) -> String {
    format!("{role}.{worker}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_nest_under_their_streams() {
        for s in Stage::ALL {
            let subj = job(s);
            assert!(subj.starts_with("dagfleet.jobs."));
            assert!(subj.starts_with(role_filter(s.role()).trim_end_matches('>')));
            assert!(dead_letter(s.role(), Some(s)).starts_with("dagfleet.dlq."));
        }
        let lane = job_on(Stage::Judge, Some("airflow-2_10"));
        assert_eq!(lane, "dagfleet.jobs.judge-airflow-2_10.judge");
        assert!(lane.starts_with(lane_filter(Role::Judge, "airflow-2_10").trim_end_matches('>')));
        assert!(!lane.starts_with(role_filter(Role::Judge).trim_end_matches('>')));
        let run = RunId::new("r1").unwrap();
        assert_eq!(event(&run, "job_done"), "dagfleet.events.r1.job_done");
        let cancelled = event(&run, "run_cancelled");
        let pattern: Vec<&str> = RUN_CANCELLED.split('.').collect();
        let subject: Vec<&str> = cancelled.split('.').collect();
        assert_eq!(pattern.len(), subject.len());
        assert!(pattern
            .iter()
            .zip(&subject)
            .all(|(p, s)| *p == "*" || p == s));
    }
}
