//! Splitting a stage into jobs.
//!
//! Each planner is a pure function of the run state (and, for later stages, the job records
//! of the stage before), so planning the same stage twice yields the same job ids.

use dagfleet_protocol::jobs::{MineShard, NoopJob, Source};
use dagfleet_protocol::{Envelope, Job, RunSpec, RunState, Stage};

/// Why a stage cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// This build has no planner for the stage yet.
    #[error("stage `{0}` cannot be planned by this coordinator: the `{1}` role is not built yet")]
    Unsupported(Stage, dagfleet_protocol::Role),
    /// The stage would exceed `limits.max_jobs_per_stage`.
    #[error("stage `{stage}` would need {jobs} jobs; limits.max_jobs_per_stage is {limit}")]
    TooManyJobs {
        /// The stage.
        stage: Stage,
        /// Jobs needed.
        jobs: usize,
        /// The limit.
        limit: u32,
    },
}

/// Checks that every stage of `spec` can be planned by this build.
pub fn check_supported(spec: &RunSpec) -> Result<(), PlanError> {
    for &st in &spec.stages {
        match st {
            Stage::Mine | Stage::Noop => {}
            other => return Err(PlanError::Unsupported(other, other.role())),
        }
    }
    Ok(())
}

/// The jobs of `stage` in `state`'s run.
pub fn plan(state: &RunState, stage: Stage, now_ms: i64) -> Result<Vec<Envelope>, PlanError> {
    let spec = &state.spec;
    let run = &state.run_id;
    let jobs: Vec<(String, Job)> = match stage {
        Stage::Noop => (0..spec.noop.jobs)
            .map(|i| {
                (
                    format!("noop-{i}"),
                    Job::Noop(NoopJob {
                        work_ms: spec.noop.work_ms,
                        output_bytes: spec.noop.output_bytes,
                        fail_attempts: spec.noop.fail_attempts,
                        fatal: spec.noop.fatal_jobs.contains(&i),
                    }),
                )
            })
            .collect(),
        Stage::Mine => spec
            .sources
            .iter()
            .flat_map(|src| {
                let refs: Vec<String> = match src {
                    Source::Github { refs, .. } | Source::Git { refs, .. } => refs.clone(),
                    Source::Pypi { versions, .. } => versions.clone(),
                    Source::Dir { .. } => vec![String::new()],
                };
                refs.into_iter().map(move |r| {
                    let key = format!("{}@{r}", source_key(src));
                    (
                        key,
                        Job::Mine(MineShard {
                            source: src.clone(),
                            reference: r,
                            globs: spec.mine.globs.clone(),
                        }),
                    )
                })
            })
            .collect(),
        other => return Err(PlanError::Unsupported(other, other.role())),
    };
    if jobs.len() > spec.limits.max_jobs_per_stage as usize {
        return Err(PlanError::TooManyJobs {
            stage,
            jobs: jobs.len(),
            limit: spec.limits.max_jobs_per_stage,
        });
    }
    Ok(jobs
        .into_iter()
        .enumerate()
        .map(|(i, (key, job))| Envelope::new(run.clone(), stage, i as u32, &key, now_ms, job))
        .collect())
}

fn source_key(src: &Source) -> String {
    match src {
        Source::Github { repo, .. } => format!("github:{repo}"),
        Source::Git { path, .. } => format!("git:{path}"),
        Source::Dir { path } => format!("dir:{path}"),
        Source::Pypi {
            package, index_url, ..
        } => format!(
            "pypi:{}:{package}",
            index_url.as_deref().unwrap_or("pypi.org")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagfleet_protocol::RunId;

    fn state(toml: &str) -> RunState {
        RunState::new(
            RunId::new("r1").unwrap(),
            RunSpec::from_toml(toml).unwrap(),
            0,
        )
    }

    #[test]
    fn planning_is_deterministic() {
        let s = state("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 3\nfatal_jobs = [1]");
        let a = plan(&s, Stage::Noop, 1).unwrap();
        let b = plan(&s, Stage::Noop, 2).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(
            a.iter().map(|e| &e.job_id).collect::<Vec<_>>(),
            b.iter().map(|e| &e.job_id).collect::<Vec<_>>()
        );
        assert!(matches!(&a[1].job, Job::Noop(NoopJob { fatal: true, .. })));
    }

    #[test]
    fn mine_makes_one_shard_per_ref() {
        let s = state(
            "name = \"n\"\nstages = [\"mine\"]\n[[sources]]\nkind = \"pypi\"\npackage = \"apache-airflow\"\nversions = [\"2.6.3\", \"2.10.5\"]\n[[sources]]\nkind = \"dir\"\npath = \"dags\"",
        );
        let jobs = plan(&s, Stage::Mine, 0).unwrap();
        assert_eq!(jobs.len(), 3);
    }

    #[test]
    fn job_limit_is_enforced() {
        let mut s = state("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 3");
        s.spec.limits.max_jobs_per_stage = 2;
        assert!(matches!(
            plan(&s, Stage::Noop, 0),
            Err(PlanError::TooManyJobs { .. })
        ));
    }
}
