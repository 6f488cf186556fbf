//! The run manifest: for each artifact, the job, inputs and hashes that made it.
//!
//! Built from the job records in the store when a run ends, and written to
//! `runs/<run>/manifest.json`. Its content depends only on the records and the run state, so
//! two coordinators writing it write the same bytes.

use bytes::Bytes;
use dagfleet_protocol::{JobRecord, RunState};
use dagfleet_runtime::store::{manifest_key, records_prefix};
use dagfleet_runtime::{ArtifactStore, StoreError};
use serde::Serialize;

#[derive(Serialize)]
struct StageSummary {
    stage: String,
    status: String,
    jobs: u32,
    done: u32,
    failed: u32,
    started_at_ms: i64,
    finished_at_ms: i64,
}

#[derive(Serialize)]
struct Manifest<'a> {
    run_id: &'a str,
    status: String,
    error: Option<&'a str>,
    spec: &'a dagfleet_protocol::RunSpec,
    stages: Vec<StageSummary>,
    jobs: Vec<JobRecord>,
}

/// Builds and writes the manifest of `state`'s run.
pub async fn write(store: &ArtifactStore, state: &RunState) -> Result<(), StoreError> {
    let mut jobs = Vec::new();
    for key in store.list(&records_prefix(&state.run_id)).await? {
        if let Some(b) = store.get_opt(&key).await? {
            match serde_json::from_slice::<JobRecord>(&b) {
                Ok(r) => jobs.push(r),
                Err(e) => {
                    tracing::warn!(key, error = %e, "unreadable job record left out of the manifest")
                }
            }
        }
    }
    jobs.sort_by_key(|j| (j.stage, j.index));
    let m = Manifest {
        run_id: state.run_id.as_str(),
        status: format!("{:?}", state.status).to_lowercase(),
        error: state.error.as_deref(),
        spec: &state.spec,
        stages: state
            .stages
            .iter()
            .map(|s| StageSummary {
                stage: s.stage.to_string(),
                status: format!("{:?}", s.status).to_lowercase(),
                jobs: s.jobs,
                done: s.done.len(),
                failed: s.failed.len(),
                started_at_ms: s.started_at_ms,
                finished_at_ms: s.finished_at_ms,
            })
            .collect(),
        jobs,
    };
    let body = serde_json::to_vec_pretty(&m)
        .map_err(|e| StoreError::Config(format!("cannot encode manifest: {e}")))?;
    store
        .put_overwrite(&manifest_key(&state.run_id), Bytes::from(body))
        .await?;
    Ok(())
}
