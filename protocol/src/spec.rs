//! The run spec: what a user asks for in `dagfleet run SPEC.toml`.
//!
//! ```toml
//! name = "airflow"
//! stages = ["mine", "synthesize", "dataset"]
//!
//! [[sources]]
//! kind = "pypi"
//! package = "apache-airflow"
//! versions = ["2.10.5"]
//!
//! [limits]
//! max_jobs_per_stage = 10000
//! ```

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::jobs::{ModelRef, Source};
use crate::Stage;

/// A run spec that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecError {
    /// The TOML does not parse or does not match the schema.
    #[error("run spec is not valid TOML for dagfleet: {0}")]
    Parse(String),
    /// A key holds a value that is not allowed.
    #[error("run spec key `{key}`: {message}")]
    Invalid {
        /// The offending key, dotted.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A key asks for more than the operator's `[caps]` allow.
    #[error("run spec key `{key}` is {value}, over {cap}")]
    OverCap {
        /// The offending key, dotted.
        key: String,
        /// The value asked for.
        value: String,
        /// The cap, named by its config key.
        cap: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key: key.into(),
        message: clip_lines(&message.into()),
    }
}

/// Longest stretch of a user's value an error message repeats.
const ECHO_CHARS: usize = 160;

/// `s` cut to [`ECHO_CHARS`] characters, saying how long it was: an error must name the
/// bad value without repeating all of it.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        None => s.to_string(),
        Some((at, _)) => format!("{}… ({} bytes in all)", &s[..at], s.len()),
    }
}

/// Every line of `s` clipped, and at most a few lines kept.
fn clip_lines(s: &str) -> String {
    let lines: Vec<String> = s.lines().take(12).map(clip).collect();
    lines.join("\n")
}

/// A pipeline run, as written by the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Name of the run; the run id is derived from it.
    pub name: String,
    /// Stages to run, in pipeline order: any prefix or subset of
    /// mine, synthesize, dataset, train, infer, judge, report; or `noop` alone.
    pub stages: Vec<Stage>,
    /// Where the miner looks for DAG files.
    #[serde(default)]
    pub sources: Vec<Source>,
    /// Mining options.
    #[serde(default)]
    pub mine: MineSpec,
    /// Models used by the run.
    #[serde(default)]
    pub models: ModelsSpec,
    /// Limits that protect the fleet and the budget.
    #[serde(default)]
    pub limits: Limits,
    /// The `noop` stage: synthetic jobs for tests and benchmarks.
    #[serde(default)]
    pub noop: NoopSpec,
    /// The `judge` stage.
    #[serde(default)]
    pub judge: JudgeSpec,
    /// The `synthesize` stage.
    #[serde(default)]
    pub synthesize: SynthSpec,
    /// The `dataset` stage.
    #[serde(default)]
    pub dataset: DatasetSpec,
    /// The `infer` stage.
    #[serde(default)]
    pub infer: InferSpec,
    /// The `train` stage.
    #[serde(default)]
    pub train: TrainSpec,
}

/// How the trainer treats a row longer than `max_seq_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongRows {
    /// Keep the first `max_seq_len` tokens (counted as `truncated_rows`).
    #[default]
    Truncate,
    /// Leave the row out (counted as `dropped_rows`).
    Drop,
}

/// How rows are put together into micro-batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Several rows share one `max_seq_len` sequence; attention never crosses from one row
    /// to another and positions restart at each row.
    #[default]
    Pack,
    /// One row per sequence; rows of similar length are batched together and padded.
    Bucket,
}

/// The learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
    /// The peak rate throughout.
    Constant,
}

/// LoRA fine-tuning options (`[train]`). The defaults are the original research's recipe:
/// r = 16, alpha = 16 on every linear layer, lr 2e-4, micro-batch 2, gradient accumulation
/// 4, 4096-token context, one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Training rows: a local ChatML JSONL file, uploaded into the run when it is submitted.
    /// When absent, the `dataset` stage's `train.jsonl`.
    pub dataset: Option<String>,
    /// Validation rows, uploaded likewise; when absent, the `dataset` stage's `valid.jsonl`
    /// (none when `dataset` is set and this is not).
    pub valid: Option<String>,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha; the update is scaled by alpha / r.
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f64,
    /// Linear layers that get adapters (Hugging Face names).
    pub target_modules: Vec<String>,
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// Optimizer steps of linear warm-up.
    pub warmup_steps: u64,
    /// AdamW weight decay (decoupled).
    pub weight_decay: f64,
    /// AdamW beta1, beta2.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Global gradient-norm clip; 0 turns it off.
    pub max_grad_norm: f64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest sequence in tokens.
    pub max_seq_len: usize,
    /// What to do with longer rows.
    pub long_rows: LongRows,
    /// Packing or length-bucketed padding.
    pub batching: Batching,
    /// Passes over the training rows.
    pub epochs: u32,
    /// Stop after this many optimizer steps; 0 runs every epoch.
    pub max_steps: u64,
    /// Seed of the adapter initialisation, data order and dropout.
    pub seed: u64,
    /// Validation loss every this many optimizer steps (and at the end); 0 only at the end.
    pub eval_every: u64,
    /// Most validation rows scored each time.
    pub eval_rows: usize,
    /// Stop when the validation loss has not improved for this many evaluations; 0 never.
    pub early_stopping_patience: u32,
    /// Checkpoint every this many optimizer steps (and when the worker is asked to stop).
    pub checkpoint_every: u64,
    /// Checkpoints kept in the store; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Recompute each layer's activations in the backward pass instead of keeping them:
    /// much less memory, about a third more compute.
    pub activation_checkpointing: bool,
    /// Token positions per cross-entropy chunk: the logits of this many positions over the
    /// whole vocabulary exist at once, never the full `[tokens, vocab]` matrix.
    pub loss_chunk: usize,
    /// What to export: `peft` (the adapter), `merged` (HF safetensors), `q8_0` and `q4_k_m`
    /// (GGUF), `modelfile` (Ollama, with the q4_k_m GGUF).
    pub export: Vec<String>,
}

/// LoRA target modules of the Llama and Qwen2 families.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Exports `[train] export` may name.
pub const EXPORTS: [&str; 6] = ["peft", "gguf_lora", "merged", "q8_0", "q4_k_m", "modelfile"];

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            dataset: None,
            valid: None,
            r: 16,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 5,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            micro_batch: 2,
            grad_accum: 4,
            max_seq_len: 4096,
            long_rows: LongRows::Truncate,
            batching: Batching::Pack,
            epochs: 1,
            max_steps: 0,
            seed: 3407,
            eval_every: 50,
            eval_rows: 256,
            early_stopping_patience: 0,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            activation_checkpointing: true,
            loss_chunk: 1024,
            export: EXPORTS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl TrainSpec {
    /// Checks the values; errors name the key under `prefix` (e.g. `train`).
    pub fn validate(&self, prefix: &str) -> Result<(), SpecError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let range = |k: &str, ok: bool, msg: &str| -> Result<(), SpecError> {
            if ok {
                Ok(())
            } else {
                Err(invalid(&key(k), msg))
            }
        };
        range("r", (1..=1024).contains(&self.r), "must be 1 to 1024")?;
        range(
            "alpha",
            self.alpha.is_finite() && self.alpha > 0.0,
            "must be above 0",
        )?;
        range(
            "dropout",
            (0.0..1.0).contains(&self.dropout),
            "must be at least 0 and below 1",
        )?;
        if self.target_modules.is_empty() {
            return Err(invalid(
                &key("target_modules"),
                "must name at least one module",
            ));
        }
        if let Some(m) = self
            .target_modules
            .iter()
            .find(|m| !ALL_LINEAR.contains(&m.as_str()))
        {
            return Err(invalid(
                &key("target_modules"),
                format!("`{m}` is not one of {}", ALL_LINEAR.join(", ")),
            ));
        }
        range(
            "lr",
            self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0,
            "must be above 0 and below 1",
        )?;
        range(
            "weight_decay",
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "must be at least 0",
        )?;
        range(
            "betas",
            self.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "must be two numbers at least 0 and below 1",
        )?;
        range(
            "adam_eps",
            self.adam_eps.is_finite() && self.adam_eps > 0.0,
            "must be above 0",
        )?;
        range(
            "max_grad_norm",
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "must be at least 0 (0 turns clipping off)",
        )?;
        range(
            "micro_batch",
            (1..=1024).contains(&self.micro_batch),
            "must be 1 to 1024",
        )?;
        range(
            "grad_accum",
            (1..=4096).contains(&self.grad_accum),
            "must be 1 to 4096",
        )?;
        range(
            "max_seq_len",
            (16..=131_072).contains(&self.max_seq_len),
            "must be 16 to 131072 tokens",
        )?;
        range("epochs", self.epochs >= 1, "must be at least 1")?;
        range(
            "checkpoint_every",
            self.checkpoint_every >= 1,
            "must be at least 1 step",
        )?;
        range(
            "keep_checkpoints",
            self.keep_checkpoints >= 1,
            "must be at least 1",
        )?;
        range("loss_chunk", self.loss_chunk >= 1, "must be at least 1")?;
        if let Some(e) = self.export.iter().find(|e| !EXPORTS.contains(&e.as_str())) {
            return Err(invalid(
                &key("export"),
                format!("`{e}` is not one of {}", EXPORTS.join(", ")),
            ));
        }
        if self.export.iter().any(|e| e == "modelfile")
            && !self.export.iter().any(|e| e == "q4_k_m")
        {
            return Err(invalid(
                &key("export"),
                "`modelfile` points Ollama at the q4_k_m GGUF: list `q4_k_m` too",
            ));
        }
        Ok(())
    }
}

/// Infer options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferSpec {
    /// Prompts to generate for: a local JSONL file (uploaded into the run when it is
    /// submitted) of `{"id", "messages": [...]}` rows or ChatML dataset rows. When absent,
    /// the `dataset` stage's `test.jsonl`.
    pub prompts: Option<String>,
    /// Rows per inference batch job; 0 sizes batches from what the live inference workers
    /// advertise (twice the largest batch).
    pub batch_rows: u64,
    /// Token limit per generation.
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Repair turns after the first answer (the DAG agent, batched in the inference
    /// workers): a prompt whose DAG the static judge refuses is asked again with the
    /// findings, up to this many times. Each model then has a second set of rows,
    /// `<model> + repair (N)`, beside its single-shot rows, so the report shows both.
    /// 0 (the default): single shot only. At most [`MAX_REPAIR_TURNS`].
    pub repair: u32,
}

/// Most repair turns `infer.repair` may ask for.
pub const MAX_REPAIR_TURNS: u32 = 9;

impl Default for InferSpec {
    fn default() -> Self {
        Self {
            prompts: None,
            batch_rows: 0,
            max_tokens: 1024,
            temperature: 0.0,
            seed: 0,
            repair: 0,
        }
    }
}

/// How the synthesize stage talks to its teacher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthMode {
    /// The provider's batch API where it has one (Anthropic, OpenAI), else online requests.
    #[default]
    Auto,
    /// Always the batch API: half the price, results within hours.
    Batch,
    /// Always one request per prompt, bounded by the provider's concurrency.
    Online,
}

/// An extra kind of training example the teacher writes, e.g. "explain this DAG".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// Name recorded in each row's `kind`, e.g. `explain`.
    pub name: String,
    /// What the teacher is asked; `{dag}` is replaced by the DAG's code.
    pub prompt: String,
    /// The user turn of the training row; `{dag}` and `{reply}` (the teacher's reply) are
    /// replaced.
    pub instruction: String,
    /// The assistant turn: `reply` (the teacher's reply) or `dag` (the original code).
    #[serde(default = "default_answer")]
    pub answer: String,
}

fn default_answer() -> String {
    "reply".into()
}

/// Synthesize options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthSpec {
    /// Instructions asked per DAG.
    pub variants: u32,
    /// The angle of each variant, in order; cycled when `variants` is larger.
    pub aspects: Vec<String>,
    /// The teacher's system prompt.
    pub system: String,
    /// The prompt template; `{dag}`, `{variants}`, `{aspects}` and `{airflow_version}` are
    /// replaced.
    pub prompt: String,
    /// Token limit of each teacher reply.
    pub max_tokens: u32,
    /// Sampling temperature; the provider's default when absent.
    pub temperature: Option<f32>,
    /// Batch or online requests.
    pub mode: SynthMode,
    /// DAGs per synthesize job (and per provider batch).
    pub chunk_rows: u64,
    /// The teacher's context window in tokens; longer DAGs are skipped with the reason.
    pub context_tokens: u64,
    /// Instructions shorter than this many characters are dropped.
    pub min_chars: usize,
    /// Instructions longer than this many characters are dropped.
    pub max_chars: usize,
    /// Word-shingle Jaccard similarity at or above which two instructions for one DAG count
    /// as near-duplicates.
    pub near_duplicate: f64,
    /// Broken variants made per DAG for the troubleshooting set; 0 turns it off.
    pub failures_per_dag: u32,
    /// Extra teacher-written task kinds.
    pub tasks: Vec<TaskTemplate>,
    /// How long a provider batch may run before it is cancelled.
    #[serde(with = "humantime_serde")]
    pub batch_deadline: Duration,
    /// How often a running batch is polled.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Times errored or expired requests are resubmitted.
    pub max_resubmits: u32,
}

/// The default teacher prompt.
pub const DEFAULT_SYNTH_PROMPT: &str = "Here is an Apache Airflow DAG file (Airflow {airflow_version}):\n\n```python\n{dag}\n```\n\nWrite {variants} different instructions a data engineer could have given to get exactly this DAG written. Write them as requests, without code. One per angle, in this order: {aspects}.\n\nAnswer with a JSON array of {variants} strings and nothing else.";

impl Default for SynthSpec {
    fn default() -> Self {
        Self {
            variants: 3,
            aspects: vec![
                "the business purpose".into(),
                "the technical workflow structure".into(),
                "the data-processing view".into(),
            ],
            system: "You write concise, realistic requests that data engineers make to a coding assistant.".into(),
            prompt: DEFAULT_SYNTH_PROMPT.into(),
            max_tokens: 1024,
            temperature: None,
            mode: SynthMode::Auto,
            chunk_rows: 500,
            context_tokens: 32_000,
            min_chars: 20,
            max_chars: 2_000,
            near_duplicate: 0.8,
            failures_per_dag: 1,
            tasks: Vec::new(),
            batch_deadline: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(30),
            max_resubmits: 2,
        }
    }
}

/// Dataset options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetSpec {
    /// Seed of the split assignment.
    pub seed: u64,
    /// Train, valid and test fractions; they must sum to 1.
    pub splits: [f64; 3],
    /// The system prompt of every ChatML row.
    pub system_prompt: String,
    /// MinHash Jaccard estimate at or above which two rows count as near-duplicates.
    pub near_duplicate: f64,
    /// Held-out rows training must never come near: a local JSONL file (uploaded with the
    /// run) of evaluation prompts (`messages`) and/or test DAGs (`content`). The infer
    /// stage's `infer.prompts` is always held out as well.
    pub held_out: Option<String>,
    /// Word 3-shingle Jaccard similarity at or above which a pair's response or instruction
    /// counts as a copy of a held-out row; every pair of its source DAG is then removed.
    pub leak_threshold: f64,
    /// Append `Airflow Version: X` to instructions that do not name their version, for DAGs
    /// that target a known release (the form evaluation prompts take).
    pub version_line: bool,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        Self {
            seed: 42,
            splits: [0.8, 0.1, 0.1],
            system_prompt: "You are an expert Apache Airflow engineer. Write complete, correct Airflow DAG files.".into(),
            near_duplicate: 0.9,
            held_out: None,
            leak_threshold: 0.5,
            version_line: true,
        }
    }
}

/// Judge options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSpec {
    /// Rows per judge batch job.
    pub batch_rows: u64,
    /// Target Airflow version for deprecation findings, e.g. `2.10`.
    pub airflow_version: Option<String>,
    /// Also load every file with Airflow's own DagBag (ground truth), on a judge worker that
    /// has that Airflow version installed (`judge.airflow_version`, default 2.10).
    pub dagbag: bool,
    /// Also score every row with the LLM judge `models.judge` (a rubric, ungrounded and
    /// grounded in the static and DagBag findings).
    pub llm: bool,
    /// Highest grounded correctness (1-5) the LLM judge may give a DAG that does not load.
    pub llm_cap: f64,
    /// Token limit of one LLM-judge reply.
    pub llm_max_tokens: u32,
}

impl Default for JudgeSpec {
    fn default() -> Self {
        Self {
            batch_rows: 500,
            airflow_version: None,
            dagbag: false,
            llm: false,
            llm_cap: 2.0,
            llm_max_tokens: 512,
        }
    }
}

/// The Airflow version DagBag judging uses when the spec names none.
pub const DEFAULT_DAGBAG_AIRFLOW: &str = "2.10";

impl JudgeSpec {
    /// The `MAJOR.MINOR` DagBag should load files with, when `dagbag` is on.
    pub fn dagbag_version(&self) -> Option<String> {
        if !self.dagbag {
            return None;
        }
        let v = self
            .airflow_version
            .as_deref()
            .unwrap_or(DEFAULT_DAGBAG_AIRFLOW);
        let mut parts = v.split('.');
        Some(match (parts.next(), parts.next()) {
            (Some(a), Some(b)) => format!("{a}.{b}"),
            _ => format!("{v}.0"),
        })
    }
}

/// Mining options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MineSpec {
    /// Path globs a file must match.
    pub globs: Vec<String>,
}

impl Default for MineSpec {
    fn default() -> Self {
        Self {
            globs: vec!["**/example_*.py".into(), "**/example_dags/**".into()],
        }
    }
}

/// Models used by the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    /// The teacher LLM of the synthesize stage.
    #[serde(default)]
    pub teacher: Option<ModelRef>,
    /// The base model of the train and infer stages.
    #[serde(default)]
    pub base: Option<ModelRef>,
    /// The LLM judge of the judge stage (`judge.llm`): any provider, e.g. an API model or
    /// `dagfleet serve`.
    #[serde(default)]
    pub judge: Option<ModelRef>,
}

/// Limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most jobs one stage may be split into; the operator's `caps.max_jobs_per_stage` when
    /// absent, and never more than it.
    pub max_jobs_per_stage: Option<u32>,
    /// Jobs of one stage that may end dead-lettered before the run fails.
    pub max_failed_jobs: u32,
    /// Wall-clock limit of the whole run; none when absent.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
}

/// Synthetic jobs of the `noop` stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoopSpec {
    /// Number of jobs.
    pub jobs: u32,
    /// Time each job "works", milliseconds.
    pub work_ms: u64,
    /// Artifact size per job; 0 writes none.
    pub output_bytes: u32,
    /// Every job fails retryably on its first this-many deliveries.
    pub fail_attempts: u32,
    /// Job indices that fail fatally and are dead-lettered.
    pub fatal_jobs: Vec<u32>,
}

impl RunSpec {
    /// Parses and validates a TOML spec.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: RunSpec =
            toml::from_str(text).map_err(|e| SpecError::Parse(clip_lines(&e.to_string())))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what serde cannot; every error names its key.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.is_empty()
            || self.name.len() > 40
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "name",
                format!(
                    "`{}` must be 1 to 40 characters of ASCII letters, digits, `-` and `_`",
                    self.name
                ),
            ));
        }
        if self.stages.is_empty() {
            return Err(invalid("stages", "must list at least one stage"));
        }
        let noop = self.stages.contains(&Stage::Noop);
        if noop && self.stages.len() > 1 {
            return Err(invalid("stages", "`noop` runs alone"));
        }
        for w in self.stages.windows(2) {
            if w[0].order() >= w[1].order() {
                return Err(invalid(
                    "stages",
                    format!(
                        "`{}` after `{}`: stages must be listed once each, in pipeline order (mine, synthesize, dataset, train, infer, judge, report)",
                        w[1], w[0]
                    ),
                ));
            }
        }
        if self.limits.max_jobs_per_stage == Some(0) {
            return Err(invalid("limits.max_jobs_per_stage", "must be at least 1"));
        }
        // Lists copied into every job of a stage stay short.
        for (key, n, max) in [
            ("mine.globs", self.mine.globs.len(), 100),
            ("synthesize.aspects", self.synthesize.aspects.len(), 100),
            ("synthesize.tasks", self.synthesize.tasks.len(), 50),
            ("train.export", self.train.export.len(), 20),
            ("train.target_modules", self.train.target_modules.len(), 20),
        ] {
            if n > max {
                return Err(invalid(key, format!("lists {n} entries; at most {max}")));
            }
        }
        if let Some(g) = self.mine.globs.iter().find(|g| g.len() > 1_000) {
            return Err(invalid(
                "mine.globs",
                format!("a glob of {} characters; at most 1000", g.len()),
            ));
        }
        if self.stages.contains(&Stage::Mine) && self.sources.is_empty() {
            return Err(invalid(
                "sources",
                "the `mine` stage needs at least one source",
            ));
        }
        if self.stages.contains(&Stage::Synthesize) && self.models.teacher.is_none() {
            return Err(invalid(
                "models.teacher",
                "the `synthesize` stage needs a teacher model",
            ));
        }
        if self.stages.contains(&Stage::Judge) && self.judge.llm {
            if self.models.judge.is_none() {
                return Err(invalid(
                    "models.judge",
                    "judge.llm needs a judge model: [models.judge] with provider and model",
                ));
            }
            if !(1.0..=5.0).contains(&self.judge.llm_cap) {
                return Err(invalid("judge.llm_cap", "must be between 1 and 5"));
            }
            if self.judge.llm_max_tokens == 0 {
                return Err(invalid("judge.llm_max_tokens", "must be at least 1"));
            }
        }
        for st in [Stage::Train, Stage::Infer] {
            if self.stages.contains(&st) && self.models.base.is_none() {
                return Err(invalid(
                    "models.base",
                    format!("the `{st}` stage needs a base model"),
                ));
            }
        }
        if self.stages.contains(&Stage::Synthesize) {
            let sy = &self.synthesize;
            if !self.stages.contains(&Stage::Mine) {
                return Err(invalid(
                    "stages",
                    "the `synthesize` stage needs the `mine` stage before it",
                ));
            }
            if sy.variants == 0 || sy.variants > 20 {
                return Err(invalid("synthesize.variants", "must be 1 to 20"));
            }
            if sy.aspects.is_empty() {
                return Err(invalid(
                    "synthesize.aspects",
                    "must list at least one aspect",
                ));
            }
            if !sy.prompt.contains("{dag}") {
                return Err(invalid("synthesize.prompt", "must contain `{dag}`"));
            }
            if sy.chunk_rows == 0 {
                return Err(invalid("synthesize.chunk_rows", "must be at least 1"));
            }
            if sy.min_chars >= sy.max_chars {
                return Err(invalid(
                    "synthesize.min_chars",
                    format!(
                        "{} must be below max_chars = {}",
                        sy.min_chars, sy.max_chars
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&sy.near_duplicate) {
                return Err(invalid(
                    "synthesize.near_duplicate",
                    "must be within 0 to 1",
                ));
            }
            if sy.poll_interval.is_zero() {
                return Err(invalid("synthesize.poll_interval", "must be above 0"));
            }
            for (i, t) in sy.tasks.iter().enumerate() {
                if t.name.is_empty() || !t.prompt.contains("{dag}") {
                    return Err(invalid(
                        &format!("synthesize.tasks[{i}]"),
                        "needs a `name` and a `prompt` containing `{dag}`",
                    ));
                }
                if t.answer != "reply" && t.answer != "dag" {
                    return Err(invalid(
                        &format!("synthesize.tasks[{i}].answer"),
                        format!("`{}` must be `reply` or `dag`", t.answer),
                    ));
                }
            }
        }
        if self.stages.contains(&Stage::Dataset) {
            if !self.stages.contains(&Stage::Synthesize) {
                return Err(invalid(
                    "stages",
                    "the `dataset` stage needs the `synthesize` stage before it",
                ));
            }
            let d = &self.dataset;
            if d.splits.iter().any(|f| !(0.0..=1.0).contains(f))
                || (d.splits.iter().sum::<f64>() - 1.0).abs() > 1e-6
                || d.splits[0] == 0.0
            {
                return Err(invalid(
                    "dataset.splits",
                    format!(
                        "{:?} must be three fractions (train, valid, test) that sum to 1, with train above 0",
                        d.splits
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&d.near_duplicate) {
                return Err(invalid("dataset.near_duplicate", "must be within 0 to 1"));
            }
            if !(d.leak_threshold > 0.0 && d.leak_threshold <= 1.0) {
                return Err(invalid(
                    "dataset.leak_threshold",
                    "must be above 0 and at most 1",
                ));
            }
        }
        if self.stages.contains(&Stage::Train) {
            self.train.validate("train")?;
            if self.train.dataset.is_none() && !self.stages.contains(&Stage::Dataset) {
                return Err(invalid(
                    "train.dataset",
                    "the `train` stage needs rows: set train.dataset to a ChatML JSONL file, or run the `dataset` stage before it",
                ));
            }
        }
        if self.stages.contains(&Stage::Infer)
            && self.infer.prompts.is_none()
            && !self.stages.contains(&Stage::Dataset)
        {
            return Err(invalid(
                "infer.prompts",
                "the `infer` stage needs prompts: set infer.prompts to a JSONL file, or run the `dataset` stage before it",
            ));
        }
        if self.stages.contains(&Stage::Judge) {
            if !self
                .stages
                .iter()
                .any(|s| matches!(s, Stage::Mine | Stage::Infer))
            {
                return Err(invalid(
                    "stages",
                    "the `judge` stage needs an earlier stage that produces rows to judge: `mine` or `infer`",
                ));
            }
            if self.judge.batch_rows == 0 {
                return Err(invalid("judge.batch_rows", "must be at least 1"));
            }
            if let Some(v) = &self.judge.airflow_version {
                let parts: Vec<&str> = v.split('.').collect();
                let ok = (2..=3).contains(&parts.len())
                    && parts.iter().all(|p| {
                        !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())
                    });
                if !ok {
                    return Err(invalid(
                        "judge.airflow_version",
                        format!(
                            "`{}` is not an Airflow version: expected MAJOR.MINOR, e.g. 2.10 or 3.0",
                            clip(v)
                        ),
                    ));
                }
            }
        }
        if self.stages.contains(&Stage::Report)
            && !self
                .stages
                .iter()
                .any(|s| matches!(s, Stage::Judge | Stage::Train | Stage::Dataset))
        {
            return Err(invalid(
                "stages",
                "the `report` stage needs an earlier stage to report on: `dataset`, `train` or `judge`",
            ));
        }
        if noop {
            if self.noop.jobs == 0 {
                return Err(invalid(
                    "noop.jobs",
                    "the `noop` stage needs at least 1 job",
                ));
            }
            if let Some(max) = self
                .limits
                .max_jobs_per_stage
                .filter(|m| self.noop.jobs > *m)
            {
                return Err(invalid(
                    "noop.jobs",
                    format!(
                        "{} jobs exceed limits.max_jobs_per_stage = {max}",
                        self.noop.jobs
                    ),
                ));
            }
            if let Some(bad) = self.noop.fatal_jobs.iter().find(|i| **i >= self.noop.jobs) {
                return Err(invalid(
                    "noop.fatal_jobs",
                    format!("job index {bad} is out of range 0..{}", self.noop.jobs),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let spec = RunSpec::from_toml(
            r#"
            name = "airflow"
            stages = ["mine", "judge"]
            [[sources]]
            kind = "pypi"
            package = "apache-airflow"
            versions = ["2.10.5"]
            [limits]
            deadline = "2h"
            "#,
        )
        .unwrap();
        assert_eq!(spec.stages, vec![Stage::Mine, Stage::Judge]);
        assert_eq!(spec.limits.deadline, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn errors_never_repeat_a_whole_long_value() {
        let long = "x".repeat(100_000);
        let err = RunSpec::from_toml(&format!("name = \"{long}\"\nstages = [\"noop\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400 && err.contains("bytes in all)"), "{err}");
        let err = RunSpec::from_toml(&format!("name = \"n\"\nstages = [\"{long}\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 2_000, "{} bytes", err.len());
    }

    #[test]
    fn errors_name_the_key() {
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"judge\", \"mine\"]").unwrap_err();
        assert!(
            matches!(err, SpecError::Invalid { ref key, .. } if key == "stages"),
            "{err}"
        );
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"mine\"]").unwrap_err();
        assert!(err.to_string().contains("`sources`"), "{err}");
        let err =
            RunSpec::from_toml("name = \"x\"\nstages = [\"noop\"]\n[noop]\njobs = 0").unwrap_err();
        assert!(err.to_string().contains("noop.jobs"), "{err}");
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"noop\"]\nbogus = 1").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = RunSpec::from_toml("name = \"x y\"\nstages = [\"noop\"]").unwrap_err();
        assert!(err.to_string().contains("`name`"), "{err}");
    }
}
