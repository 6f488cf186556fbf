//! Job payloads for every stage, and the record of what a job produced.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::{JobId, RunId, Stage};

/// A pointer to an object in the artifact store, with the hash of its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Object key relative to the store root, e.g. `runs/r1/mine/<job>/dags.jsonl`.
    pub key: String,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Where a miner looks for DAG files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A GitHub repository, read at version tags.
    Github {
        /// `owner/name`.
        repo: String,
        /// Tags or branches to read.
        #[serde(default)]
        refs: Vec<String>,
        /// API base URL; `https://api.github.com` when absent (set it for GitHub Enterprise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_url: Option<String>,
    },
    /// A local git repository.
    Git {
        /// Path to the repository.
        path: String,
        /// Refs to read.
        #[serde(default)]
        refs: Vec<String>,
    },
    /// A local directory.
    Dir {
        /// Path to the directory.
        path: String,
        /// The Airflow release its files target (e.g. `2.10.5`, when they were checked to load
        /// with it), recorded as their ref so instructions name it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        airflow_version: Option<String>,
    },
    /// Release archives of a package from a PyPI-compatible index.
    Pypi {
        /// Package name, e.g. `apache-airflow`.
        package: String,
        /// Versions to read.
        versions: Vec<String>,
        /// Index URL; pypi.org when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index_url: Option<String>,
    },
}

/// One (source, ref) shard for the miner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MineShard {
    /// The source to read.
    pub source: Source,
    /// The ref or version of the source this shard covers; empty for a directory.
    pub reference: String,
    /// Path globs a file must match.
    pub globs: Vec<String>,
}

/// Which teacher model to ask, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Provider name from the run spec (`anthropic`, `openai`, `local`, ...), or `file` for
    /// weights in the artifact store.
    pub provider: String,
    /// Model name or artifact key.
    pub model: String,
}

/// One batch chunk of instruction synthesis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SynthChunk {
    /// Mined-DAG JSONL artifacts to read.
    pub inputs: Vec<ArtifactRef>,
    /// Row range `[start, end)` across `inputs`, in order.
    pub rows: (u64, u64),
    /// The teacher.
    pub teacher: ModelRef,
    /// What to ask and how.
    pub spec: crate::spec::SynthSpec,
}

/// Build train/valid/test splits from synthesized pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetBuild {
    /// Synthesized-pair artifacts.
    pub inputs: Vec<ArtifactRef>,
    /// Seed, splits, system prompt, near-duplicate threshold.
    pub spec: crate::spec::DatasetSpec,
    /// Held-out rows (evaluation prompts, test DAGs) no pair may come near.
    #[serde(default)]
    pub held_out: Vec<ArtifactRef>,
}

/// LoRA fine-tuning of a base model on a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// The frozen base model.
    pub base: ModelRef,
    /// ChatML JSONL training rows.
    pub train: ArtifactRef,
    /// ChatML JSONL validation rows, if any.
    pub valid: Option<ArtifactRef>,
    /// Hyper-parameters.
    pub spec: crate::spec::TrainSpec,
}

/// One batch of generation requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferBatch {
    /// Model to generate with; with `weights`, `model.model` is only the name its rows carry.
    pub model: ModelRef,
    /// A PEFT adapter (`adapter_model.safetensors`, its `adapter_config.json` beside it in
    /// the store) applied to `model` on load.
    pub adapter: Option<ArtifactRef>,
    /// Model weights in the store (a fine-tune's GGUF export) to generate with instead of
    /// looking `model.model` up on the worker.
    #[serde(default)]
    pub weights: Option<ArtifactRef>,
    /// JSONL of chat requests.
    pub input: ArtifactRef,
    /// Row range `[start, end)` of `input`.
    pub rows: (u64, u64),
    /// Token limit, temperature, seed.
    pub spec: crate::spec::InferSpec,
}

/// One batch of generated outputs to judge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeBatch {
    /// Generation JSONL artifact.
    pub input: ArtifactRef,
    /// Row range `[start, end)` of `input`.
    pub rows: (u64, u64),
    /// Target Airflow version for deprecation checks.
    pub airflow_version: Option<String>,
    /// Load each file with this Airflow version's DagBag too (`MAJOR.MINOR`); such jobs
    /// travel on that version's lane, to workers that have it installed.
    #[serde(default)]
    pub dagbag: Option<String>,
    /// Score each row with this LLM judge too.
    #[serde(default)]
    pub llm: Option<LlmJudging>,
}

/// The LLM judge of a judge batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlmJudging {
    /// The judge model.
    pub model: ModelRef,
    /// Highest grounded correctness of a DAG that does not load.
    pub cap: f64,
    /// Token limit of one reply.
    pub max_tokens: u32,
}

/// Assemble the run report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportJob {
    /// Artifacts the report summarises.
    pub inputs: Vec<ArtifactRef>,
    /// The LLM judge that compares the fine-tune with its base pairwise (`judge.llm`); the
    /// judge stage's `eval.jsonl` are then among `inputs`.
    #[serde(default)]
    pub llm: Option<LlmJudging>,
}

/// A job that exercises the job layer and nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoopJob {
    /// Time to spend "working", in milliseconds.
    pub work_ms: u64,
    /// Size of the artifact to write; 0 writes none.
    pub output_bytes: u32,
    /// Fail with a retryable error on the first this-many deliveries.
    pub fail_attempts: u32,
    /// Fail with a fatal error (the job is dead-lettered).
    pub fatal: bool,
}

/// The stage-specific payload of an [`crate::Envelope`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// See [`MineShard`].
    Mine(MineShard),
    /// See [`SynthChunk`].
    Synthesize(SynthChunk),
    /// See [`DatasetBuild`].
    Dataset(DatasetBuild),
    /// See [`TrainJob`].
    Train(TrainJob),
    /// See [`InferBatch`].
    Infer(InferBatch),
    /// See [`JudgeBatch`].
    Judge(JudgeBatch),
    /// See [`ReportJob`].
    Report(ReportJob),
    /// See [`NoopJob`].
    Noop(NoopJob),
}

impl Job {
    /// The stage this payload belongs to.
    pub fn stage(&self) -> Stage {
        match self {
            Job::Mine(_) => Stage::Mine,
            Job::Synthesize(_) => Stage::Synthesize,
            Job::Dataset(_) => Stage::Dataset,
            Job::Train(_) => Stage::Train,
            Job::Infer(_) => Stage::Infer,
            Job::Judge(_) => Stage::Judge,
            Job::Report(_) => Stage::Report,
            Job::Noop(_) => Stage::Noop,
        }
    }

    /// The lane this job travels on within its role's queue, when it needs a capability
    /// only some workers of the role have: a DagBag judge batch goes to workers that have
    /// its Airflow version installed (`airflow-2_10`).
    pub fn lane(&self) -> Option<String> {
        match self {
            Job::Judge(j) => j.dagbag.as_deref().map(airflow_lane),
            _ => None,
        }
    }
}

/// The lane of judge workers that can load files with Airflow `version` (`2.10` →
/// `airflow-2_10`: subject tokens cannot hold dots).
pub fn airflow_lane(version: &str) -> String {
    let v: String = version
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("airflow-{v}")
}

/// What one finished job produced. Sent in a `jobs_done` event and stored as the job's
/// manifest entry; its presence in the store marks the job as done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job.
    pub job_id: JobId,
    /// Its run.
    pub run_id: RunId,
    /// Its stage.
    pub stage: Stage,
    /// Its index within the stage.
    pub index: u32,
    /// Artifacts the job read.
    pub inputs: Vec<ArtifactRef>,
    /// Artifacts the job wrote.
    pub outputs: Vec<ArtifactRef>,
    /// Numbers worth keeping (rows, tokens, cost, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Worker that produced the outputs.
    pub worker: String,
    /// Delivery attempt that produced the outputs.
    pub attempt: u32,
    /// Wall time of the handler, milliseconds.
    pub duration_ms: u64,
    /// Completion time, milliseconds since the Unix epoch.
    pub finished_at_ms: i64,
}
