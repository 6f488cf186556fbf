//! Splitting a stage into jobs.
//!
//! Each planner is a pure function of the run state (and, for later stages, the job records
//! of the stage before), so planning the same stage twice yields the same job ids.

use dagfleet_protocol::jobs::{
    DatasetBuild, InferBatch, JudgeBatch, MineShard, NoopJob, ReportJob, Source, SynthChunk,
    TrainJob,
};
use dagfleet_protocol::{ArtifactRef, Envelope, Job, JobRecord, RunState, Stage};
use dagfleet_runtime::ArtifactStore;

/// Why a stage cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// This build has no planner for the stage yet.
    #[error("stage `{0}` cannot be planned by this coordinator: the `{1}` role is not built yet")]
    Unsupported(Stage, dagfleet_protocol::Role),
    /// The store could not be read while planning.
    #[error("planning stage `{0}`: {1}")]
    Store(Stage, String),
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

/// What the live fleet advertises, for stages that size their jobs to it.
#[derive(Clone, Debug, Default)]
pub struct FleetHints {
    /// The largest `max_batch` any live inference worker advertises.
    pub infer_max_batch: Option<u64>,
}

/// `[start, end)` ranges of at most `size` rows covering `rows` rows.
fn row_ranges(rows: u64, size: u64) -> impl Iterator<Item = (u64, u64)> {
    let size = size.max(1);
    (0..rows.div_ceil(size)).map(move |i| (i * size, ((i + 1) * size).min(rows)))
}

/// Rows per inference batch when neither the spec nor the fleet says.
pub const DEFAULT_INFER_BATCH_ROWS: u64 = 64;

/// The jobs of `stage`, reading the outputs of earlier stages from `store` where the stage
/// consumes them.
pub async fn plan_stage(
    state: &RunState,
    stage: Stage,
    now_ms: i64,
    store: &ArtifactStore,
    hints: &FleetHints,
) -> Result<Vec<Envelope>, PlanError> {
    match stage {
        Stage::Infer => {
            let model = state
                .spec
                .models
                .base
                .clone()
                .ok_or(PlanError::Unsupported(stage, stage.role()))?;
            let inputs = match &state.spec.infer.prompts {
                Some(p) => vec![uploaded(stage, store, "infer.prompts", p).await?],
                None => jsonl_outputs(state, Stage::Dataset, store, Some("test.jsonl")).await?,
            };
            let batch = match state.spec.infer.batch_rows {
                0 => hints
                    .infer_max_batch
                    .map(|b| b * 2)
                    .unwrap_or(DEFAULT_INFER_BATCH_ROWS),
                n => n,
            }
            .max(1);
            // After a train stage, the fine-tune generates for the same prompts beside its
            // base, so the judge and the report can compare them.
            let mut variants = vec![(model.clone(), None, None)];
            if state.spec.stages.contains(&Stage::Train) {
                variants.push(fine_tune(state, store, &model).await?);
            }
            let mut jobs = Vec::new();
            for (m, weights, adapter) in &variants {
                for (input, rows) in &inputs {
                    for (start, end) in row_ranges(*rows, batch) {
                        let key = match (weights, adapter) {
                            (None, None) => format!("{}:{start}-{end}", input.key),
                            _ => format!("{}:{}:{start}-{end}", m.model, input.key),
                        };
                        jobs.push((
                            key,
                            Job::Infer(InferBatch {
                                model: m.clone(),
                                adapter: adapter.clone(),
                                weights: weights.clone(),
                                input: input.clone(),
                                rows: (start, end),
                                spec: state.spec.infer.clone(),
                            }),
                        ));
                    }
                }
            }
            finish(state, stage, now_ms, jobs)
        }
        Stage::Train => {
            let base = state
                .spec
                .models
                .base
                .clone()
                .ok_or(PlanError::Unsupported(stage, stage.role()))?;
            let t = &state.spec.train;
            let (train, valid) = match &t.dataset {
                Some(p) => {
                    let train = uploaded(stage, store, "train.dataset", p).await?.0;
                    let valid = match &t.valid {
                        Some(v) => Some(uploaded(stage, store, "train.valid", v).await?.0),
                        None => None,
                    };
                    (train, valid)
                }
                None => {
                    let one = |name: &'static str| async move {
                        jsonl_outputs(state, Stage::Dataset, store, Some(name))
                            .await
                            .map(|v| v.into_iter().next().map(|(a, _)| a))
                    };
                    let train = one("train.jsonl").await?.ok_or_else(|| {
                        PlanError::Store(
                            stage,
                            "the dataset stage produced no training rows (train.jsonl)".into(),
                        )
                    })?;
                    let valid = match &t.valid {
                        Some(v) => Some(uploaded(stage, store, "train.valid", v).await?.0),
                        None => one("valid.jsonl").await?,
                    };
                    (train, valid)
                }
            };
            let jobs = vec![(
                "train".to_string(),
                Job::Train(TrainJob {
                    base,
                    train,
                    valid,
                    spec: t.clone(),
                }),
            )];
            finish(state, stage, now_ms, jobs)
        }
        Stage::Report => {
            // What the report reads: the judge's summaries, the training summary and loss
            // curve, the dataset's statistics.
            let mut inputs = Vec::new();
            for (st, names) in [
                (Stage::Dataset, &["stats.json"][..]),
                (Stage::Train, &["train.json", "loss.png"][..]),
                (Stage::Judge, &["summary.json"][..]),
            ] {
                if !state.spec.stages.contains(&st) {
                    continue;
                }
                for r in stage_records(state, st, store).await? {
                    inputs.extend(
                        r.outputs.into_iter().filter(|o| {
                            names.contains(&o.key.rsplit('/').next().unwrap_or_default())
                        }),
                    );
                }
            }
            let jobs = vec![("report".to_string(), Job::Report(ReportJob { inputs }))];
            finish(state, stage, now_ms, jobs)
        }
        Stage::Judge => {
            let prev = state
                .spec
                .stages
                .iter()
                .rev()
                .find(|s| matches!(s, Stage::Mine | Stage::Infer))
                .copied()
                .ok_or(PlanError::Unsupported(stage, stage.role()))?;
            let inputs = jsonl_outputs(state, prev, store, None).await?;
            let batch = state.spec.judge.batch_rows.max(1);
            let mut jobs = Vec::new();
            for (input, rows) in inputs {
                for (start, end) in row_ranges(rows, batch) {
                    jobs.push((
                        format!("{}:{start}-{end}", input.key),
                        Job::Judge(JudgeBatch {
                            input: input.clone(),
                            rows: (start, end),
                            airflow_version: state.spec.judge.airflow_version.clone(),
                        }),
                    ));
                }
            }
            finish(state, stage, now_ms, jobs)
        }
        Stage::Synthesize => {
            let teacher = state
                .spec
                .models
                .teacher
                .clone()
                .ok_or(PlanError::Unsupported(stage, stage.role()))?;
            let inputs = jsonl_outputs(state, Stage::Mine, store, Some("dags.jsonl")).await?;
            let chunk = state.spec.synthesize.chunk_rows.max(1);
            let mut jobs = Vec::new();
            for (input, rows) in inputs {
                for (start, end) in row_ranges(rows, chunk) {
                    jobs.push((
                        format!("{}:{start}-{end}", input.key),
                        Job::Synthesize(SynthChunk {
                            inputs: vec![input.clone()],
                            rows: (start, end),
                            teacher: teacher.clone(),
                            spec: state.spec.synthesize.clone(),
                        }),
                    ));
                }
            }
            finish(state, stage, now_ms, jobs)
        }
        Stage::Dataset => {
            let inputs: Vec<ArtifactRef> =
                jsonl_outputs(state, Stage::Synthesize, store, Some("pairs.jsonl"))
                    .await?
                    .into_iter()
                    .map(|(a, _)| a)
                    .collect();
            // One job even without inputs: it fails with a clear "no pairs" error, which
            // fails the run instead of producing an empty dataset.
            let jobs = vec![(
                "dataset".to_string(),
                Job::Dataset(DatasetBuild {
                    inputs,
                    spec: state.spec.dataset.clone(),
                }),
            )];
            finish(state, stage, now_ms, jobs)
        }
        _ => plan(state, stage, now_ms),
    }
}

/// The fine-tuned model of the run's train stage, as the infer stage runs it: the PEFT
/// adapter over the very base it was trained on (the exact fine-tune), else its q8_0 GGUF,
/// else its q4_k_m GGUF. A merge re-quantized to a quantized base's grid rounds most small
/// updates back to the base's values (BENCHMARKS.md measures how much), so the report judges
/// the adapter wherever there is one.
async fn fine_tune(
    state: &RunState,
    store: &ArtifactStore,
    base: &dagfleet_protocol::jobs::ModelRef,
) -> Result<
    (
        dagfleet_protocol::jobs::ModelRef,
        Option<ArtifactRef>,
        Option<ArtifactRef>,
    ),
    PlanError,
> {
    let stage = Stage::Infer;
    let outputs: Vec<ArtifactRef> = stage_records(state, Stage::Train, store)
        .await?
        .into_iter()
        .flat_map(|r| r.outputs)
        .collect();
    let find = |suffix: &str| outputs.iter().find(|o| o.key.ends_with(suffix)).cloned();
    let name = std::path::Path::new(&base.model)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| base.model.clone());
    let tuned = |kind: &str| dagfleet_protocol::jobs::ModelRef {
        provider: "store".into(),
        model: format!("{name} + LoRA ({kind})"),
    };
    if let Some(a) = find("adapter/adapter_model.safetensors") {
        return Ok((
            dagfleet_protocol::jobs::ModelRef {
                provider: base.provider.clone(),
                model: base.model.clone(),
            },
            None,
            Some(a),
        ));
    }
    if let Some(w) = find("-q8_0.gguf") {
        return Ok((tuned("q8_0"), Some(w), None));
    }
    if let Some(w) = find("-q4_k_m.gguf") {
        return Ok((tuned("q4_k_m"), Some(w), None));
    }
    Err(PlanError::Store(
        stage,
        "the train stage exported no model the infer stage can run: add `peft`, `q8_0` or `q4_k_m` to train.export".into(),
    ))
}

/// A file uploaded with the run (`store:<key>` in the spec), with its row count.
async fn uploaded(
    stage: Stage,
    store: &ArtifactStore,
    key_name: &str,
    value: &str,
) -> Result<(ArtifactRef, u64), PlanError> {
    let key = value.strip_prefix("store:").ok_or_else(|| {
        PlanError::Store(
            stage,
            format!("{key_name} `{value}` was not uploaded when the run was submitted"),
        )
    })?;
    let data = store
        .get_opt(key)
        .await
        .map_err(|e| PlanError::Store(stage, e.to_string()))?
        .ok_or_else(|| PlanError::Store(stage, format!("`{key}` is missing from the store")))?;
    let rows = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64;
    Ok((
        ArtifactRef {
            key: key.to_string(),
            sha256: dagfleet_runtime::sha256_hex(&data),
            bytes: data.len() as u64,
        },
        rows,
    ))
}

/// The job records of `stage`, in job order.
async fn stage_records(
    state: &RunState,
    stage: Stage,
    store: &ArtifactStore,
) -> Result<Vec<JobRecord>, PlanError> {
    let err = |e: dagfleet_runtime::StoreError| PlanError::Store(stage, e.to_string());
    let prefix = format!("runs/{}/jobs/{stage}", state.run_id);
    let mut records: Vec<JobRecord> = Vec::new();
    for key in store.list(&prefix).await.map_err(err)? {
        if let Some(b) = store.get_opt(&key).await.map_err(err)? {
            let r: JobRecord = serde_json::from_slice(&b)
                .map_err(|e| PlanError::Store(stage, format!("{key}: {e}")))?;
            records.push(r);
        }
    }
    records.sort_by_key(|r| r.index);
    Ok(records)
}

/// The JSONL outputs of `stage`'s jobs with their row counts, in job order.
async fn jsonl_outputs(
    state: &RunState,
    stage: Stage,
    store: &ArtifactStore,
    name: Option<&str>,
) -> Result<Vec<(ArtifactRef, u64)>, PlanError> {
    let wanted = |o: &&ArtifactRef| match name {
        Some(n) => o.key.rsplit('/').next() == Some(n),
        None => o.key.ends_with(".jsonl"),
    };
    let err = |e: dagfleet_runtime::StoreError| PlanError::Store(stage, e.to_string());
    let records = stage_records(state, stage, store).await?;
    let mut out = Vec::new();
    for r in records {
        for o in r.outputs.iter().filter(wanted) {
            let rows = match r.metrics.get("rows") {
                Some(n) if r.outputs.iter().filter(wanted).count() == 1 => *n as u64,
                _ => {
                    let data = store.get(o).await.map_err(err)?;
                    data.split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .count() as u64
                }
            };
            if rows > 0 {
                out.push((o.clone(), rows));
            }
        }
    }
    Ok(out)
}

/// The jobs of `stage` in `state`'s run, for stages that need no earlier outputs.
pub fn plan(state: &RunState, stage: Stage, now_ms: i64) -> Result<Vec<Envelope>, PlanError> {
    let spec = &state.spec;
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
    finish(state, stage, now_ms, jobs)
}

fn finish(
    state: &RunState,
    stage: Stage,
    now_ms: i64,
    jobs: Vec<(String, Job)>,
) -> Result<Vec<Envelope>, PlanError> {
    let limit = state.spec.limits.max_jobs_per_stage;
    if jobs.len() > limit as usize {
        return Err(PlanError::TooManyJobs {
            stage,
            jobs: jobs.len(),
            limit,
        });
    }
    Ok(jobs
        .into_iter()
        .enumerate()
        .map(|(i, (key, job))| {
            Envelope::new(state.run_id.clone(), stage, i as u32, &key, now_ms, job)
        })
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
    use dagfleet_protocol::{RunId, RunSpec};

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
    fn row_ranges_cover_every_row_once() {
        assert_eq!(
            row_ranges(5, 2).collect::<Vec<_>>(),
            vec![(0, 2), (2, 4), (4, 5)]
        );
        assert_eq!(row_ranges(4, 2).count(), 2);
        assert_eq!(row_ranges(0, 3).count(), 0);
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
