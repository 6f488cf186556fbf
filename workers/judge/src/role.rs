//! The judge as a worker role: one judge batch job reads a row range of a JSONL artifact and
//! writes `eval.jsonl` (one [`crate::EvalRow`] per input row), `summary.json` and
//! `summary.md` (per model: validity rate and counts per category).
//!
//! Input rows are either generated outputs ([`GenRow`], with `output`) or mined DAG records
//! (with `content`), which are judged as references so a mined corpus can be checked too.

use bytes::Bytes;
use dagfleet_analysis::Options;
use dagfleet_protocol::{Envelope, Job, Role};
use dagfleet_runtime::config::JudgeSettings;
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use crate::dagbag::{AirflowEnv, Dagbag};
use crate::{judge_row, GenRow, Summary};

/// One Airflow version this worker can run DagBag with; its helpers start on first use.
#[derive(Debug)]
struct Env {
    env: AirflowEnv,
    pool: OnceLock<Result<Arc<Dagbag>, String>>,
}

/// Handler of the `judge` role.
#[derive(Clone, Debug, Default)]
pub struct JudgeHandler {
    envs: Arc<BTreeMap<String, Env>>,
    procs: usize,
    timeout: std::time::Duration,
    providers: Arc<BTreeMap<String, dagfleet_providers::ProviderConfig>>,
}

impl JudgeHandler {
    /// A judge that runs DagBag with the Airflow environments `settings` point at (see
    /// [`crate::dagbag::discover`]); with none, it judges statically only.
    pub fn new(settings: &JudgeSettings) -> Self {
        let envs = crate::dagbag::configured(settings)
            .1
            .into_iter()
            .map(|env| {
                (
                    env.version.clone(),
                    Env {
                        env,
                        pool: OnceLock::new(),
                    },
                )
            })
            .collect();
        Self {
            envs: Arc::new(envs),
            procs: crate::dagbag::procs(settings),
            timeout: settings.dagbag_timeout,
            providers: Arc::default(),
        }
    }

    /// The `[providers.*]` the LLM judge (`judge.llm`) may ask.
    pub fn with_providers(
        mut self,
        providers: BTreeMap<String, dagfleet_providers::ProviderConfig>,
    ) -> Self {
        self.providers = Arc::new(providers);
        self
    }

    fn llm_judge(
        &self,
        l: &dagfleet_protocol::jobs::LlmJudging,
        ctx: &JobContext,
    ) -> Result<crate::llm::LlmJudge, JobError> {
        let name = &l.model.provider;
        let cfg = self.providers.get(name).cloned().ok_or_else(|| {
            JobError::fatal(format!(
                "LLM-judge provider `{name}` is not configured on this worker; add [providers.{name}] with `kind` and `base_url` to its config (configured: {})",
                if self.providers.is_empty() {
                    "none".to_string()
                } else {
                    self.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        })?;
        let provider = dagfleet_providers::Provider::new(name, cfg)
            .map_err(|e| JobError::fatal(e.to_string()))?;
        Ok(crate::llm::LlmJudge {
            provider,
            settings: crate::llm::LlmSettings {
                model: l.model.model.clone(),
                cap: l.cap,
                max_tokens: l.max_tokens,
            },
            cache: Some(dagfleet_providers::ResponseCache::new(
                ctx.shared_cache().clone(),
            )),
        })
    }

    /// Airflow versions (`MAJOR.MINOR`) this judge can load files with.
    pub fn airflow_versions(&self) -> Vec<String> {
        self.envs.keys().cloned().collect()
    }

    /// The DagBag pool for `version`, started on first use (blocking).
    fn pool(&self, version: &str) -> Result<Arc<Dagbag>, String> {
        let Some(e) = self.envs.get(version) else {
            return Err(format!(
                "this judge cannot load files with Airflow {version}: it has {}",
                if self.envs.is_empty() {
                    "no Airflow environment (install one with `bash tests/airflow-env.sh`)"
                        .to_string()
                } else {
                    self.airflow_versions().join(", ")
                }
            ));
        };
        e.pool
            .get_or_init(|| {
                Dagbag::start(&e.env, self.procs, self.timeout)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// Why a JSONL row cannot be judged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// The line is not JSON, or not a generation row.
    #[error("row {row}{}: {source}", if *.not_json { " is not JSON" } else { "" })]
    Json {
        /// The row, from 1.
        row: u64,
        /// Whether the line is not JSON at all.
        not_json: bool,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The row holds nothing to judge.
    #[error("row {0} has neither `output` nor `content`")]
    Empty(u64),
}

/// Reads one JSONL row as something to judge.
pub fn row_to_gen(line: &str, n: u64) -> Result<GenRow, RowError> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|source| RowError::Json {
        row: n,
        not_json: true,
        source,
    })?;
    if v.get("output").is_some() {
        return serde_json::from_value(v).map_err(|source| RowError::Json {
            row: n,
            not_json: false,
            source,
        });
    }
    if let Some(content) = v.get("content").and_then(|c| c.as_str()) {
        let id = v
            .get("sha256")
            .or_else(|| v.get("path"))
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let source = v.get("source").and_then(|x| x.as_str()).unwrap_or("mined");
        let reference = v.get("ref").and_then(|x| x.as_str()).unwrap_or("");
        return Ok(GenRow {
            id,
            model: format!("mined:{source}@{reference}"),
            output: content.to_string(),
            finish_reason: Some("stop".into()),
            ..Default::default()
        });
    }
    Err(RowError::Empty(n))
}

/// Parses `2.10` into `(2, 10)`; `None` keeps the default.
fn version(v: Option<&str>) -> Option<(u32, u32)> {
    let v = v?;
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    Some((a.parse().ok()?, b.split('.').next()?.parse().ok()?))
}

impl Handler for JudgeHandler {
    fn role(&self) -> Role {
        Role::Judge
    }

    fn lanes(&self) -> Vec<String> {
        self.envs
            .keys()
            .map(|v| dagfleet_protocol::jobs::airflow_lane(v))
            .collect()
    }

    fn capacity(&self) -> Option<serde_json::Value> {
        (!self.envs.is_empty()).then(|| serde_json::json!({ "airflow": self.airflow_versions() }))
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let job = match &env.job {
            Job::Judge(job) => job,
            Job::Report(job) => {
                let judge = match &job.llm {
                    Some(l) => Some(self.llm_judge(l, ctx)?),
                    None => None,
                };
                return crate::report::run(job, ctx, judge.as_ref()).await;
            }
            other => {
                return Err(JobError::fatal(format!(
                    "the judge role got a `{}` job, which it does not run",
                    other.stage()
                )))
            }
        };
        let mut opts = Options::default();
        if let Some(v) = version(job.airflow_version.as_deref()) {
            opts.airflow_version = v;
        }
        let data = ctx.read(&job.input).await?;
        let text = std::str::from_utf8(&data)
            .map_err(|e| JobError::fatal(format!("{} is not UTF-8: {e}", job.input.key)))?;
        let (start, end) = job.rows;
        let mut eval = Vec::new();
        let mut summary = Summary::default();
        let mut bad_rows = 0u64;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i as u64;
            if n < start || n >= end || line.trim().is_empty() {
                continue;
            }
            match row_to_gen(line, n) {
                Ok(row) => rows.push((n, row)),
                Err(_) => bad_rows += 1,
            }
        }
        let pool = match &job.dagbag {
            Some(v) => {
                let (me, v) = (self.clone(), v.clone());
                let pool = tokio::task::spawn_blocking(move || me.pool(&v))
                    .await
                    .map_err(|e| JobError::retry(format!("DagBag start-up failed: {e}")))?;
                Some(pool.map_err(JobError::fatal)?)
            }
            None => None,
        };
        // Rows are judged on all cores (DagBag on its helper processes), off the async
        // threads, and written in their order.
        let judged: Vec<_> = tokio::task::spawn_blocking(move || {
            use rayon::prelude::*;
            rows.into_par_iter()
                .map(|(n, row)| {
                    let mut r = judge_row(&row, &opts);
                    if let Some(p) = &pool {
                        r.dagbag = Some(p.check(&r.code));
                    }
                    (n, r)
                })
                .collect()
        })
        .await
        .map_err(|e| JobError::retry(format!("judging failed: {e}")))?;
        // The LLM judge, where the spec asks for it: every row, a bounded number at a time;
        // replies are cached, so a retried batch asks only what it had not asked.
        let mut tally = crate::llm::Tally::default();
        let judged = match &job.llm {
            None => judged,
            Some(l) => {
                use futures::StreamExt;
                let judge = Arc::new(self.llm_judge(l, ctx)?);
                let total = judged.len() as u64;
                let mut scored = Vec::with_capacity(judged.len());
                let mut stream = futures::stream::iter(judged.into_iter().map(|(n, mut r)| {
                    let judge = judge.clone();
                    async move {
                        let t = judge.score(&mut r).await;
                        (n, r, t)
                    }
                }))
                .buffer_unordered(16);
                while let Some((n, r, t)) = stream.next().await {
                    let t = t.map_err(|e| {
                        let m = format!("LLM judge `{}`: {e}", l.model.model);
                        if e.refused {
                            JobError::fatal(m)
                        } else {
                            JobError::retry(m)
                        }
                    })?;
                    tally.add(&t);
                    scored.push((n, r));
                    if scored.len() % 16 == 0 || scored.len() as u64 == total {
                        ctx.progress(scored.len() as u64, total, "LLM-judged rows")
                            .await;
                    }
                }
                scored.sort_by_key(|(n, _)| *n);
                scored
            }
        };
        for (n, r) in judged {
            summary.add(&r);
            let mut l = serde_json::to_vec(&r)
                .map_err(|e| JobError::fatal(format!("cannot encode row {n}: {e}")))?;
            l.push(b'\n');
            eval.extend_from_slice(&l);
        }
        let rows = summary.models.values().map(|m| m.rows).sum::<usize>();
        let valid = summary.models.values().map(|m| m.valid).sum::<usize>();
        let clean: Option<usize> = summary
            .models
            .values()
            .map(|m| m.dagbag.as_ref().map(|d| d.clean))
            .sum();
        ctx.put("eval.jsonl", Bytes::from(eval)).await?;
        let s = serde_json::to_vec_pretty(&summary)
            .map_err(|e| JobError::fatal(format!("cannot encode summary: {e}")))?;
        ctx.put("summary.json", Bytes::from(s)).await?;
        ctx.put("summary.md", Bytes::from(summary.markdown()))
            .await?;
        let mut out = JobOutput::default()
            .metric("rows", rows as f64)
            .metric("valid", valid as f64)
            .metric("unreadable_rows", bad_rows as f64);
        if job.llm.is_some() {
            out = out
                .metric("llm_requests", tally.requests as f64)
                .metric("llm_cached", tally.cached as f64)
                .metric("llm_unreadable", tally.unreadable as f64)
                .metric("llm_input_tokens", tally.usage.input_tokens as f64)
                .metric("llm_output_tokens", tally.usage.output_tokens as f64)
                .metric("llm_cost_usd", tally.cost_usd);
        }
        Ok(match clean {
            Some(c) => out.metric("dagbag_clean", c as f64),
            None => out,
        })
    }
}
