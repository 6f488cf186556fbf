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
    /// Sums of the job records' metrics.
    metrics: std::collections::BTreeMap<String, f64>,
}

/// Money spent on teacher calls. `usd` is `None` (unknown, never zero) when some requests
/// had no price in the provider's price table.
#[derive(Serialize)]
struct Cost {
    usd: Option<f64>,
    known_usd: f64,
    unknown_requests: u64,
}

#[derive(Serialize)]
struct Manifest<'a> {
    run_id: &'a str,
    status: String,
    error: Option<&'a str>,
    spec: &'a dagfleet_protocol::RunSpec,
    cost: Cost,
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
    let sums = |stage| {
        let mut m = std::collections::BTreeMap::new();
        for j in jobs.iter().filter(|j| j.stage == stage) {
            for (k, v) in &j.metrics {
                *m.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        m
    };
    let known: f64 = jobs.iter().filter_map(|j| j.metrics.get("cost_usd")).sum();
    let unknown: f64 = jobs
        .iter()
        .filter_map(|j| j.metrics.get("cost_unknown_requests"))
        .sum();
    let m = Manifest {
        cost: Cost {
            usd: (unknown == 0.0).then_some(known),
            known_usd: known,
            unknown_requests: unknown as u64,
        },
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
                metrics: sums(s.stage),
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
