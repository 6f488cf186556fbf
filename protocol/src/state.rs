//! Run state, as the coordinator keeps it in the `dagfleet_runs` KV bucket.
//!
//! Every change is a compare-and-set on the entry's revision, and applying an event twice is
//! harmless (completions are set bits), so any number of coordinators can share the work.

use serde::{Deserialize, Serialize};

use crate::{RunId, RunSpec, Stage};

/// A growable set of job indices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bitset(Vec<u64>);

impl Bitset {
    /// Adds `i`; returns whether it was new.
    pub fn insert(&mut self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let new = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        new
    }

    /// Whether `i` is in the set.
    pub fn contains(&self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.0.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Number of members.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Submitted; stages are being dispatched and run.
    Running,
    /// Every stage is done and the manifest is written.
    Done,
    /// A stage failed, or the deadline passed.
    Failed,
    /// `dagfleet cancel` stopped it: its queued jobs are dropped by the workers that pull
    /// them, its running ones are told to stop, and nothing more is dispatched.
    Cancelled,
}

/// Where a stage is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Waiting for the stages before it.
    Pending,
    /// A coordinator holds the dispatch lease and is publishing jobs.
    Dispatching,
    /// All jobs are published.
    Dispatched,
    /// All jobs finished.
    Done,
    /// Too many jobs were dead-lettered.
    Failed,
}

/// State of one stage of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    /// The stage.
    pub stage: Stage,
    /// Where it is.
    pub status: StageStatus,
    /// Number of jobs, known once planned.
    pub jobs: u32,
    /// Indices of finished jobs.
    pub done: Bitset,
    /// Indices of dead-lettered jobs.
    pub failed: Bitset,
    /// Coordinator holding the dispatch lease.
    #[serde(default)]
    pub lease_holder: Option<String>,
    /// When the lease expires, ms since the epoch.
    #[serde(default)]
    pub lease_until_ms: i64,
    /// When dispatch started.
    #[serde(default)]
    pub started_at_ms: i64,
    /// When the last job finished.
    #[serde(default)]
    pub finished_at_ms: i64,
    /// Times another coordinator took the dispatch over from a holder whose lease ran out.
    #[serde(default)]
    pub dispatch_takeovers: u32,
    /// Sums of the metrics of finished jobs (rows, tokens, `cost_usd`, ...), each job counted
    /// once.
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, f64>,
}

impl StageState {
    /// Jobs finished or dead-lettered.
    pub fn settled(&self) -> u32 {
        self.done.len() + self.failed.len()
    }
}

/// State of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The run.
    pub run_id: RunId,
    /// What was asked for.
    pub spec: RunSpec,
    /// Where it is.
    pub status: RunStatus,
    /// One entry per stage of the spec, in order.
    pub stages: Vec<StageState>,
    /// Submission time, ms since the epoch.
    pub created_at_ms: i64,
    /// Why the run failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Why a running run has not started yet (e.g. `caps.max_active_runs` reached).
    #[serde(default)]
    pub waiting: Option<String>,
}

impl RunState {
    /// A freshly submitted run.
    pub fn new(run_id: RunId, spec: RunSpec, now_ms: i64) -> Self {
        let stages = spec
            .stages
            .iter()
            .map(|&stage| StageState {
                stage,
                status: StageStatus::Pending,
                jobs: 0,
                done: Bitset::default(),
                failed: Bitset::default(),
                lease_holder: None,
                lease_until_ms: 0,
                started_at_ms: 0,
                finished_at_ms: 0,
                dispatch_takeovers: 0,
                metrics: Default::default(),
            })
            .collect();
        Self {
            run_id,
            spec,
            status: RunStatus::Running,
            stages,
            created_at_ms: now_ms,
            error: None,
            waiting: None,
        }
    }

    /// The state of `stage`, if the run has it.
    pub fn stage_mut(&mut self, stage: Stage) -> Option<&mut StageState> {
        self.stages.iter_mut().find(|s| s.stage == stage)
    }

    /// The state of `stage`, if the run has it.
    pub fn stage(&self, stage: Stage) -> Option<&StageState> {
        self.stages.iter().find(|s| s.stage == stage)
    }

    /// The first stage that is not done.
    pub fn current(&self) -> Option<&StageState> {
        self.stages.iter().find(|s| s.status != StageStatus::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_counts_once() {
        let mut b = Bitset::default();
        assert!(b.insert(3));
        assert!(!b.insert(3));
        assert!(b.insert(200));
        assert!(b.contains(200) && b.contains(3) && !b.contains(4));
        assert_eq!(b.len(), 2);
    }
}
