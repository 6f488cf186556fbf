//! Splitting a stage into jobs.
//!
//! Each planner is a pure function of the run state (and, for later stages, the job records
//! of the stage before), so planning the same stage twice yields the same job ids.
//!
//! A plan is a [`StagePlan`]: the number of jobs, known up front and checked against the
//! jobs-per-stage limit before any job exists, and an iterator that makes the jobs on
//! demand. The coordinator publishes it in pages, so memory while planning stays flat
//! whatever the size of the stage.

use dagfleet_protocol::jobs::{
    DatasetBuild, InferBatch, JudgeBatch, MineShard, NoopJob, ReportJob, Source, SynthChunk,
    TrainJob,
};
use dagfleet_protocol::{ArtifactRef, Caps, Envelope, Job, JobRecord, RunState, Stage};
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
    #[error("stage `{stage}` would need {jobs} jobs; the limit in force (limits.max_jobs_per_stage, at most caps.max_jobs_per_stage) is {limit}")]
    TooManyJobs {
        /// The stage.
        stage: Stage,
        /// Jobs needed.
        jobs: u64,
        /// The limit.
        limit: u32,
    },
    /// The stage's jobs need a capability no live worker advertises.
    #[error("stage `{stage}` needs {need}, and no live worker serves it: {hint}")]
    NoLane {
        /// The stage.
        stage: Stage,
        /// What it needs.
        need: String,
        /// How to get it.
        hint: String,
    },
}

/// The lane a stage's jobs travel on, when they need one.
pub fn needed_lane(state: &RunState, stage: Stage) -> Option<String> {
    match stage {
        Stage::Judge => state
            .spec
            .judge
            .dagbag_version()
            .map(|v| dagfleet_protocol::jobs::airflow_lane(&v)),
        _ => None,
    }
}

/// The jobs of one stage, made on demand.
pub struct StagePlan {
    /// How many jobs the stage has.
    pub jobs: u32,
    iter: Box<dyn Iterator<Item = Envelope> + Send>,
}

impl std::fmt::Debug for StagePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagePlan")
            .field("jobs", &self.jobs)
            .finish()
    }
}

impl StagePlan {
    /// The next `n` jobs; empty when all have been taken.
    pub fn next_page(&mut self, n: usize) -> Vec<Envelope> {
        self.iter.by_ref().take(n).collect()
    }
}

impl Iterator for StagePlan {
    type Item = Envelope;
    fn next(&mut self) -> Option<Envelope> {
        self.iter.next()
    }
}

/// What the live fleet advertises, for stages that size their jobs to it.
#[derive(Clone, Debug, Default)]
pub struct FleetHints {
    /// The largest `max_batch` any live inference worker advertises.
    pub infer_max_batch: Option<u64>,
    /// Lanes live workers of the stage's role serve (e.g. `airflow-2_10` for judges that
    /// can run DagBag with Airflow 2.10).
    pub lanes: std::collections::BTreeSet<String>,
}

/// `[start, end)` ranges of at most `size` rows covering `rows` rows.
fn row_ranges(rows: u64, size: u64) -> impl Iterator<Item = (u64, u64)> + Send {
    let size = size.max(1);
    (0..rows.div_ceil(size)).map(move |i| {
        (
            i * size,
            (i.saturating_add(1).saturating_mul(size)).min(rows),
        )
    })
}

/// Jobs `row_ranges` makes for each of `inputs`, summed.
fn batches<T>(inputs: &[(T, u64)], size: u64) -> u64 {
    inputs
        .iter()
        .map(|(_, rows)| rows.div_ceil(size.max(1)))
        .fold(0u64, u64::saturating_add)
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
    caps: &Caps,
) -> Result<StagePlan, PlanError> {
    match stage {
        Stage::Infer => {
            let model = state
                .spec
                .models
                .base
                .clone()
                .ok_or(PlanError::Unsupported(stage, stage.role()))?;
            let inputs = match &state.spec.infer.prompts {
                Some(p) => vec![uploaded(state, caps, stage, store, "infer.prompts", p).await?],
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
            let count = batches(&inputs, batch).saturating_mul(variants.len() as u64);
            let spec = state.spec.infer.clone();
            let jobs = variants.into_iter().flat_map(move |(m, weights, adapter)| {
                let (inputs, spec) = (inputs.clone(), spec.clone());
                inputs.into_iter().flat_map(move |(input, rows)| {
                    let (m, weights, adapter, spec) =
                        (m.clone(), weights.clone(), adapter.clone(), spec.clone());
                    row_ranges(rows, batch).map(move |(start, end)| {
                        let key = match (&weights, &adapter) {
                            (None, None) => format!("{}:{start}-{end}", input.key),
                            _ => format!("{}:{}:{start}-{end}", m.model, input.key),
                        };
                        let job = Job::Infer(InferBatch {
                            model: m.clone(),
                            adapter: adapter.clone(),
                            weights: weights.clone(),
                            input: input.clone(),
                            rows: (start, end),
                            spec: spec.clone(),
                        });
                        (key, job)
                    })
                })
            });
            finish(state, stage, now_ms, caps, count, jobs)
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
                    let train = uploaded(state, caps, stage, store, "train.dataset", p)
                        .await?
                        .0;
                    let valid = match &t.valid {
                        Some(v) => Some(
                            uploaded(state, caps, stage, store, "train.valid", v)
                                .await?
                                .0,
                        ),
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
                        Some(v) => Some(
                            uploaded(state, caps, stage, store, "train.valid", v)
                                .await?
                                .0,
                        ),
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
            finish(state, stage, now_ms, caps, 1, jobs.into_iter())
        }
        Stage::Report => {
            // What the report reads: the judge's summaries, the training summary and loss
            // curve, the dataset's statistics.
            let mut inputs = Vec::new();
            let llm = state.spec.judge.llm && state.spec.stages.contains(&Stage::Judge);
            let judged: &[&str] = if llm {
                &["summary.json", "eval.jsonl"]
            } else {
                &["summary.json"]
            };
            for (st, names) in [
                (Stage::Dataset, &["stats.json"][..]),
                (Stage::Train, &["train.json", "loss.png"][..]),
                (Stage::Judge, judged),
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
            let llm = match (llm, &state.spec.models.judge) {
                (true, Some(m)) => Some(dagfleet_protocol::jobs::LlmJudging {
                    model: m.clone(),
                    cap: state.spec.judge.llm_cap,
                    max_tokens: state.spec.judge.llm_max_tokens,
                }),
                _ => None,
            };
            let jobs = vec![("report".to_string(), Job::Report(ReportJob { inputs, llm }))];
            finish(state, stage, now_ms, caps, 1, jobs.into_iter())
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
            let count = batches(&inputs, batch);
            let airflow_version = state.spec.judge.airflow_version.clone();
            let dagbag = state.spec.judge.dagbag_version();
            if let Some(v) = &dagbag {
                // Jobs on a lane nobody serves would wait forever: say so now.
                let lane = dagfleet_protocol::jobs::airflow_lane(v);
                if !hints.lanes.contains(&lane) {
                    return Err(PlanError::NoLane {
                        stage,
                        need: format!("a judge worker that can load DAG files with Airflow {v} (judge.dagbag)"),
                        hint: format!(
                            "install it where a judge runs with `bash tests/airflow-env.sh {v}` and restart that worker{}",
                            if hints.lanes.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "; live judges serve {}",
                                    hints.lanes.iter().cloned().collect::<Vec<_>>().join(", ")
                                )
                            }
                        ),
                    });
                }
            }
            let llm = match state.spec.judge.llm {
                false => None,
                true => Some(dagfleet_protocol::jobs::LlmJudging {
                    model: state
                        .spec
                        .models
                        .judge
                        .clone()
                        .ok_or(PlanError::Unsupported(stage, stage.role()))?,
                    cap: state.spec.judge.llm_cap,
                    max_tokens: state.spec.judge.llm_max_tokens,
                }),
            };
            let jobs = inputs.into_iter().flat_map(move |(input, rows)| {
                let (airflow_version, dagbag, llm) =
                    (airflow_version.clone(), dagbag.clone(), llm.clone());
                row_ranges(rows, batch).map(move |(start, end)| {
                    (
                        format!("{}:{start}-{end}", input.key),
                        Job::Judge(JudgeBatch {
                            input: input.clone(),
                            rows: (start, end),
                            airflow_version: airflow_version.clone(),
                            dagbag: dagbag.clone(),
                            llm: llm.clone(),
                        }),
                    )
                })
            });
            finish(state, stage, now_ms, caps, count, jobs)
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
            let count = batches(&inputs, chunk);
            let spec = state.spec.synthesize.clone();
            let jobs = inputs.into_iter().flat_map(move |(input, rows)| {
                let (teacher, spec) = (teacher.clone(), spec.clone());
                row_ranges(rows, chunk).map(move |(start, end)| {
                    (
                        format!("{}:{start}-{end}", input.key),
                        Job::Synthesize(SynthChunk {
                            inputs: vec![input.clone()],
                            rows: (start, end),
                            teacher: teacher.clone(),
                            spec: spec.clone(),
                        }),
                    )
                })
            });
            finish(state, stage, now_ms, caps, count, jobs)
        }
        Stage::Dataset => {
            let inputs: Vec<ArtifactRef> =
                jsonl_outputs(state, Stage::Synthesize, store, Some("pairs.jsonl"))
                    .await?
                    .into_iter()
                    .map(|(a, _)| a)
                    .collect();
            // What the run evaluates on is held out of its training data.
            let mut held_out = Vec::new();
            for (key, value) in [
                ("dataset.held_out", &state.spec.dataset.held_out),
                ("infer.prompts", &state.spec.infer.prompts),
            ] {
                if let Some(v) = value {
                    held_out.push(uploaded(state, caps, stage, store, key, v).await?.0);
                }
            }
            // One job even without inputs: it fails with a clear "no pairs" error, which
            // fails the run instead of producing an empty dataset.
            let jobs = vec![(
                "dataset".to_string(),
                Job::Dataset(DatasetBuild {
                    inputs,
                    spec: state.spec.dataset.clone(),
                    held_out,
                }),
            )];
            finish(state, stage, now_ms, caps, 1, jobs.into_iter())
        }
        _ => plan(state, stage, now_ms, caps),
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
/// Only the run's own uploads (`runs/<run>/...`) may be read, unless the operator allows
/// references across runs (`caps.store_refs_across_runs`).
async fn uploaded(
    state: &RunState,
    caps: &Caps,
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
    let own = format!("runs/{}/", state.run_id);
    if !caps.store_refs_across_runs && (!key.starts_with(&own) || key.contains("..")) {
        return Err(PlanError::Store(
            stage,
            format!(
                "{key_name} `{}` is not one of this run's uploads (`store:{own}...`); reading other runs' objects needs caps.store_refs_across_runs = true",
                dagfleet_protocol::spec::clip(value)
            ),
        ));
    }
    store
        .line_stats(key)
        .await
        .map_err(|e| PlanError::Store(stage, e.to_string()))?
        .ok_or_else(|| PlanError::Store(stage, format!("`{key}` is missing from the store")))
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
                    let (found, rows) =
                        store
                            .line_stats(&o.key)
                            .await
                            .map_err(err)?
                            .ok_or_else(|| {
                                PlanError::Store(
                                    stage,
                                    format!("`{}` is missing from the store", o.key),
                                )
                            })?;
                    if found.sha256 != o.sha256 {
                        return Err(PlanError::Store(
                            stage,
                            format!("`{}` changed after its job recorded it (SHA-256 {} expected, {} found)", o.key, o.sha256, found.sha256),
                        ));
                    }
                    rows
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
pub fn plan(
    state: &RunState,
    stage: Stage,
    now_ms: i64,
    caps: &Caps,
) -> Result<StagePlan, PlanError> {
    let spec = &state.spec;
    match stage {
        Stage::Noop => {
            let n = spec.noop.clone();
            let fatal: std::collections::BTreeSet<u32> = n.fatal_jobs.iter().copied().collect();
            let jobs = (0..n.jobs).map(move |i| {
                (
                    format!("noop-{i}"),
                    Job::Noop(NoopJob {
                        work_ms: n.work_ms,
                        output_bytes: n.output_bytes,
                        fail_attempts: n.fail_attempts,
                        fatal: fatal.contains(&i),
                    }),
                )
            });
            finish(state, stage, now_ms, caps, u64::from(spec.noop.jobs), jobs)
        }
        Stage::Mine => {
            let refs = |src: &Source| -> Vec<String> {
                match src {
                    Source::Github { refs, .. } | Source::Git { refs, .. } => refs.clone(),
                    Source::Pypi { versions, .. } => versions.clone(),
                    Source::Dir {
                        airflow_version, ..
                    } => vec![airflow_version.clone().unwrap_or_default()],
                }
            };
            let count = spec
                .sources
                .iter()
                .map(|s| refs(s).len() as u64)
                .fold(0u64, u64::saturating_add);
            let (sources, globs) = (spec.sources.clone(), spec.mine.globs.clone());
            let jobs = sources.into_iter().flat_map(move |src| {
                let globs = globs.clone();
                refs(&src).into_iter().map(move |r| {
                    let key = format!("{}@{r}", source_key(&src));
                    (
                        key,
                        Job::Mine(MineShard {
                            // Only this shard's ref: a source listing 100k versions must not
                            // travel whole in each of its 100k jobs.
                            source: shard_source(&src, &r),
                            reference: r,
                            globs: globs.clone(),
                        }),
                    )
                })
            });
            finish(state, stage, now_ms, caps, count, jobs)
        }
        other => Err(PlanError::Unsupported(other, other.role())),
    }
}

/// Checks the job count against the limit in force and numbers the jobs.
fn finish<I>(
    state: &RunState,
    stage: Stage,
    now_ms: i64,
    caps: &Caps,
    count: u64,
    jobs: I,
) -> Result<StagePlan, PlanError>
where
    I: Iterator<Item = (String, Job)> + Send + 'static,
{
    let limit = state.spec.max_jobs_per_stage(caps);
    if count > u64::from(limit) {
        return Err(PlanError::TooManyJobs {
            stage,
            jobs: count,
            limit,
        });
    }
    let run = state.run_id.clone();
    let iter = jobs
        .take(count as usize)
        .enumerate()
        .map(move |(i, (key, job))| Envelope::new(run.clone(), stage, i as u32, &key, now_ms, job));
    Ok(StagePlan {
        jobs: count as u32,
        iter: Box::new(iter),
    })
}

/// `src` narrowed to the one ref a shard reads.
fn shard_source(src: &Source, r: &str) -> Source {
    match src {
        Source::Github { repo, api_url, .. } => Source::Github {
            repo: repo.clone(),
            refs: vec![r.to_string()],
            api_url: api_url.clone(),
        },
        Source::Git { path, .. } => Source::Git {
            path: path.clone(),
            refs: vec![r.to_string()],
        },
        Source::Dir {
            path,
            airflow_version,
        } => Source::Dir {
            path: path.clone(),
            airflow_version: airflow_version.clone(),
        },
        Source::Pypi {
            package, index_url, ..
        } => Source::Pypi {
            package: package.clone(),
            versions: vec![r.to_string()],
            index_url: index_url.clone(),
        },
    }
}

fn source_key(src: &Source) -> String {
    match src {
        Source::Github { repo, .. } => format!("github:{repo}"),
        Source::Git { path, .. } => format!("git:{path}"),
        Source::Dir { path, .. } => format!("dir:{path}"),
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

    #[tokio::test]
    async fn a_spec_reads_only_its_own_uploads_unless_the_operator_allows_more() {
        let store = ArtifactStore::open(&dagfleet_runtime::StoreConfig {
            url: "memory://".into(),
            ..Default::default()
        })
        .unwrap();
        for run in ["r1", "other"] {
            store
                .put_overwrite(
                    &format!("runs/{run}/inputs/prompts.jsonl"),
                    bytes::Bytes::from_static(b"{\"id\": \"1\"}\n"),
                )
                .await
                .unwrap();
        }
        let spec = |key: &str| {
            state(&format!(
                "name = \"n\"\nstages = [\"infer\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m\"\n[infer]\nprompts = \"store:{key}\""
            ))
        };
        let hints = FleetHints::default();
        let mut caps = Caps::default();
        let own = spec("runs/r1/inputs/prompts.jsonl");
        let p = plan_stage(&own, Stage::Infer, 1, &store, &hints, &caps).await;
        assert_eq!(p.unwrap().jobs, 1);
        for key in [
            "runs/other/inputs/prompts.jsonl",
            "runs/r1/../other/inputs/prompts.jsonl",
            "runs/r10/inputs/prompts.jsonl",
        ] {
            let e = match plan_stage(&spec(key), Stage::Infer, 1, &store, &hints, &caps).await {
                Ok(_) => panic!("{key} was planned"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("caps.store_refs_across_runs"), "{e}");
            assert!(e.contains("infer.prompts"), "{e}");
        }
        caps.store_refs_across_runs = true;
        let other = spec("runs/other/inputs/prompts.jsonl");
        let p = plan_stage(&other, Stage::Infer, 1, &store, &hints, &caps).await;
        assert_eq!(p.unwrap().jobs, 1);
        // The client refuses a `store:` input at once: a new run has no objects yet.
        let text = "name = \"n\"\nstages = [\"infer\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m\"\n[infer]\nprompts = \"store:runs/other/inputs/prompts.jsonl\"";
        let e = crate::check_spec(text, &Caps::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("infer.prompts") && e.contains("caps.store_refs_across_runs"),
            "{e}"
        );
        assert!(crate::check_spec(text, &caps).is_ok());
    }

    #[test]
    fn planning_is_deterministic() {
        let s = state("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 3\nfatal_jobs = [1]");
        let caps = Caps::default();
        let a: Vec<_> = plan(&s, Stage::Noop, 1, &caps).unwrap().collect();
        let b: Vec<_> = plan(&s, Stage::Noop, 2, &caps).unwrap().collect();
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
        let p = plan(&s, Stage::Mine, 0, &Caps::default()).unwrap();
        assert_eq!(p.jobs, 3);
        assert_eq!(p.count(), 3);
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
        s.spec.limits.max_jobs_per_stage = Some(2);
        assert!(matches!(
            plan(&s, Stage::Noop, 0, &Caps::default()),
            Err(PlanError::TooManyJobs { .. })
        ));
        // The operator's cap wins over a spec that asks for more.
        s.spec.limits.max_jobs_per_stage = Some(u32::MAX);
        let caps = Caps {
            max_jobs_per_stage: 2,
            ..Caps::default()
        };
        assert!(matches!(
            plan(&s, Stage::Noop, 0, &caps),
            Err(PlanError::TooManyJobs {
                jobs: 3,
                limit: 2,
                ..
            })
        ));
    }

    #[test]
    fn a_huge_stage_is_made_page_by_page() {
        let s = state("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 100000");
        let mut p = plan(&s, Stage::Noop, 0, &Caps::default()).unwrap();
        assert_eq!(p.jobs, 100_000);
        let mut seen = 0;
        loop {
            let page = p.next_page(10_000);
            if page.is_empty() {
                break;
            }
            assert_eq!(page[0].index, seen);
            seen += page.len() as u32;
        }
        assert_eq!(seen, 100_000);
    }
}
