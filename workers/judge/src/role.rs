//! The judge as a worker role: one judge batch job reads a row range of a JSONL artifact and
//! writes `eval.jsonl` (one [`crate::EvalRow`] per input row), `summary.json` and
//! `summary.md` (per model: validity rate and counts per category).
//!
//! Input rows are either generated outputs ([`GenRow`], with `output`) or mined DAG records
//! (with `content`), which are judged as references so a mined corpus can be checked too.

use bytes::Bytes;
use dagfleet_analysis::Options;
use dagfleet_protocol::{Envelope, Job, Role};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};

use crate::{judge_row, GenRow, Summary};

/// Handler of the `judge` role.
#[derive(Clone, Debug, Default)]
pub struct JudgeHandler;

/// Reads one JSONL row as something to judge.
pub fn row_to_gen(line: &str, n: u64) -> Result<GenRow, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("row {n} is not JSON: {e}"))?;
    if v.get("output").is_some() {
        return serde_json::from_value(v).map_err(|e| format!("row {n}: {e}"));
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
    Err(format!("row {n} has neither `output` nor `content`"))
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

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let job = match &env.job {
            Job::Judge(job) => job,
            Job::Report(job) => return crate::report::run(job, ctx).await,
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
        // Rows are judged on all cores, and written in their order.
        let judged: Vec<_> = {
            use rayon::prelude::*;
            rows.par_iter()
                .map(|(n, row)| (*n, judge_row(row, &opts)))
                .collect()
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
        ctx.put("eval.jsonl", Bytes::from(eval)).await?;
        let s = serde_json::to_vec_pretty(&summary)
            .map_err(|e| JobError::fatal(format!("cannot encode summary: {e}")))?;
        ctx.put("summary.json", Bytes::from(s)).await?;
        ctx.put("summary.md", Bytes::from(summary.markdown()))
            .await?;
        Ok(JobOutput::default()
            .metric("rows", rows as f64)
            .metric("valid", valid as f64)
            .metric("unreadable_rows", bad_rows as f64))
    }
}
