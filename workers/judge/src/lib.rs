//! The judge: decides whether generated Airflow DAG code is valid, and why not.
//!
//! # Overview
//! - [`extract_code`] takes the code out of a model's answer (a fenced block, or the bare
//!   text), noting an unclosed fence as a sign of truncation.
//! - [`judge_source`] runs [`dagfleet_analysis::analyze`] and turns the report into a
//!   [`Verdict`].
//! - [`judge_file`] does the same for a file on disk, refusing what is not UTF-8 Python text
//!   of a sane size, for `dagfleet judge PATH...`.
//! - [`GenRow`] → [`EvalRow`] is the evaluation-dataset row: model, prompts, reference, output,
//!   verdict and findings, with a slot for LLM-judge scores.
//! - [`Summary`] is the per-model validity rate and counts per category, as JSON and Markdown.

pub mod dagbag;
pub mod llm;
pub mod report;
pub mod role;

pub use role::JudgeHandler;

use dagfleet_analysis::{analyze, Category, Finding, Options, Severity};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Airflow major versions the knowledge base covers.
const MAJORS: std::ops::RangeInclusive<u32> = 2..=3;

/// Parses an Airflow version, `2.10` or `2.10.5`, into `(2, 10)`; only versions of Airflow
/// that exist are accepted. The error quotes the value and says what is expected.
pub fn parse_airflow_version(v: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{v}`: expected MAJOR.MINOR of Airflow 2 or 3, e.g. 2.10 or 3.0");
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    let b = b.split('.').next().unwrap_or("0");
    let (major, minor): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if !MAJORS.contains(&major) || minor > 30 {
        return Err(bad());
    }
    Ok((major, minor))
}

/// Largest source the judge reads.
pub const MAX_SOURCE_BYTES: usize = 1024 * 1024;

/// The code in a model's answer, and whether the answer looks cut off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extracted {
    /// The code.
    pub code: String,
    /// A fence was opened and never closed.
    pub unclosed_fence: bool,
}

/// Takes the code out of a model's answer: the first fenced block tagged `python` (or `py`),
/// else the longest fenced block, else the whole text.
pub fn extract_code(answer: &str) -> Extracted {
    let mut blocks: Vec<(String, String, bool)> = Vec::new(); // (tag, body, closed)
    let mut lines = answer.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(tag) = t.strip_prefix("```") {
            let tag = tag.trim().to_lowercase();
            let mut body = Vec::new();
            let mut closed = false;
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    closed = true;
                    break;
                }
                body.push(l);
            }
            let mut b = body.join("\n");
            b.push('\n');
            blocks.push((tag, b, closed));
        }
    }
    if blocks.is_empty() {
        return Extracted {
            code: answer.to_string(),
            unclosed_fence: false,
        };
    }
    let pick = blocks
        .iter()
        .find(|(tag, _, _)| tag == "python" || tag == "py" || tag == "python3")
        .or_else(|| blocks.iter().max_by_key(|(_, b, _)| b.len()))
        .cloned()
        .unwrap_or_default();
    Extracted {
        code: pick.1,
        unclosed_fence: !pick.2,
    }
}

/// The judge's decision about one piece of code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether Airflow would load it: no error findings.
    pub valid: bool,
    /// What is wrong (errors) or worth knowing (warnings).
    pub findings: Vec<Finding>,
    /// dag_ids found.
    pub dag_ids: Vec<Option<String>>,
    /// Number of tasks.
    pub tasks: usize,
    /// Heuristic complexity.
    pub complexity: f64,
}

fn unreadable(message: String) -> Verdict {
    Verdict {
        valid: false,
        findings: vec![Finding {
            category: Category::SyntaxError,
            severity: Severity::Error,
            line: 1,
            column: 1,
            message,
        }],
        dag_ids: Vec::new(),
        tasks: 0,
        complexity: 0.0,
    }
}

/// Judges Python source.
pub fn judge_source(code: &str, opts: &Options) -> Verdict {
    if code.len() > MAX_SOURCE_BYTES {
        return unreadable(format!(
            "source is {} bytes; the judge reads at most {MAX_SOURCE_BYTES}",
            code.len()
        ));
    }
    let r = analyze(code, opts);
    Verdict {
        valid: r.is_valid(),
        dag_ids: r.dags.iter().map(|d| d.dag_id.clone()).collect(),
        tasks: r.tasks.len(),
        complexity: r.metadata.complexity,
        findings: r.findings,
    }
}

/// Judges a file, read as CPython reads a module (PEP 263 coding lines, UTF-8 otherwise);
/// binary and oversized files are refused with a finding that says so.
pub fn judge_file(path: &Path, opts: &Options) -> Verdict {
    use std::io::Read;
    let cannot = |e: std::io::Error| unreadable(format!("cannot read {}: {e}", path.display()));
    // Regular files only, and never more than the limit: `/dev/zero` or a FIFO named as a
    // DAG file must not hang or exhaust the judge.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return cannot(e),
    };
    if !meta.is_file() {
        return unreadable(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_SOURCE_BYTES as u64 {
        return unreadable(format!(
            "file is {} bytes; the judge reads at most {MAX_SOURCE_BYTES}",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    if let Err(e) = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SOURCE_BYTES as u64 + 1).read_to_end(&mut bytes))
    {
        return cannot(e);
    }
    if bytes.len() > MAX_SOURCE_BYTES {
        return unreadable(format!(
            "file grew past {MAX_SOURCE_BYTES} bytes while it was read"
        ));
    }
    // As CPython reads a module: UTF-8 unless a coding line says otherwise.
    match dagfleet_analysis::decode_source(&bytes) {
        Ok(s) => judge_source(&s, opts),
        Err(f) => unreadable(f.message),
    }
}

/// One generated output to judge (a row of an inference output JSONL).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenRow {
    /// Row id.
    pub id: String,
    /// Model that generated it.
    pub model: String,
    /// System prompt.
    pub system_prompt: String,
    /// The instruction.
    pub instruction: String,
    /// Reference (original) code, if any.
    pub reference: Option<String>,
    /// The model's answer.
    pub output: String,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
}

/// One row of the evaluation dataset: the generated row as it came (model, prompts,
/// reference, output, finish reason), the code that was judged, the verdict, and a slot for
/// LLM-judge scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// The row that was judged.
    #[serde(flatten)]
    pub row: GenRow,
    /// The extracted code that was judged.
    pub code: String,
    /// The verdict.
    pub verdict: Verdict,
    /// LLM-judge scores, filled when an LLM judge runs.
    pub llm_scores: Option<BTreeMap<String, f64>>,
    /// What Airflow's own DagBag made of the code, when the judge ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dagbag: Option<dagbag::DagbagVerdict>,
}

/// Judges one generated output. A `length` finish whose code fails to parse at its end, or
/// an unclosed fence, is reported as truncation.
pub fn judge_row(row: &GenRow, opts: &Options) -> EvalRow {
    let ex = extract_code(&row.output);
    let mut verdict = judge_source(&ex.code, opts);
    let cut = row.finish_reason.as_deref() == Some("length") || ex.unclosed_fence;
    if cut {
        for f in &mut verdict.findings {
            if f.category == Category::SyntaxError {
                f.category = Category::Truncated;
                f.message = format!(
                    "output was cut off (finish_reason length or unclosed fence): {}",
                    f.message
                );
            }
        }
    }
    EvalRow {
        row: row.clone(),
        code: ex.code,
        verdict,
        llm_scores: None,
        dagbag: None,
    }
}

/// Per-model results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Rows judged.
    pub rows: usize,
    /// Valid rows.
    pub valid: usize,
    /// valid / rows.
    pub validity_rate: f64,
    /// Rows with at least one error finding of each category.
    pub by_category: BTreeMap<String, usize>,
    /// DagBag figures, for the rows DagBag loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dagbag: Option<DagbagSummary>,
    /// Rows the LLM judge scored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub llm_rows: usize,
    /// Sums of the LLM judge's scores over those rows, per key of `llm_scores` (means are
    /// `llm_sums[k] / llm_rows`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub llm_sums: BTreeMap<String, f64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ModelSummary {
    /// The mean LLM-judge score of `key`, where the judge scored rows.
    pub fn llm_mean(&self, key: &str) -> Option<f64> {
        (self.llm_rows > 0)
            .then(|| self.llm_sums.get(key).map(|s| s / self.llm_rows as f64))
            .flatten()
    }
}

/// DagBag's verdicts for one model, and how far the static judge agrees with them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DagbagSummary {
    /// Airflow version(s) that loaded the rows.
    pub airflow: Vec<String>,
    /// Rows DagBag loaded.
    pub rows: usize,
    /// Rows with at least one DAG and no import error.
    pub clean: usize,
    /// clean / rows.
    pub clean_rate: f64,
    /// Unclean rows by error class (`ModuleNotFoundError:missing_provider`, `NameError`, ...).
    pub by_class: BTreeMap<String, usize>,
    /// Confusion matrix of the static judge against DagBag.
    pub agreement: Agreement,
}

/// The static judge's valid/invalid calls against DagBag's clean/unclean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Static valid, DagBag clean.
    pub both_valid: usize,
    /// Static valid, DagBag not clean: files the judge let through.
    pub static_only_valid: usize,
    /// Static invalid, DagBag clean: files the judge wrongly rejected.
    pub dagbag_only_valid: usize,
    /// Both reject.
    pub both_invalid: usize,
}

impl Agreement {
    /// Rows compared.
    pub fn rows(&self) -> usize {
        self.both_valid + self.static_only_valid + self.dagbag_only_valid + self.both_invalid
    }

    /// Share of rows where the two agree.
    pub fn rate(&self) -> f64 {
        match self.rows() {
            0 => 0.0,
            n => (self.both_valid + self.both_invalid) as f64 / n as f64,
        }
    }

    /// Of the rows the judge called valid, the share DagBag loads (precision of "valid").
    pub fn precision(&self) -> f64 {
        ratio(self.both_valid, self.both_valid + self.static_only_valid)
    }

    /// Of the rows DagBag loads, the share the judge called valid (recall of "valid").
    pub fn recall(&self) -> f64 {
        ratio(self.both_valid, self.both_valid + self.dagbag_only_valid)
    }

    fn add(&mut self, o: &Agreement) {
        self.both_valid += o.both_valid;
        self.static_only_valid += o.static_only_valid;
        self.dagbag_only_valid += o.dagbag_only_valid;
        self.both_invalid += o.both_invalid;
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The class a DagBag verdict is counted under.
pub fn dagbag_class(v: &dagbag::DagbagVerdict) -> Option<String> {
    let c = v.error_class.clone()?;
    Some(match &v.cause {
        Some(cause) => format!("{c}:{cause}"),
        None => c,
    })
}

impl DagbagSummary {
    fn add(&mut self, static_valid: bool, v: &dagbag::DagbagVerdict) {
        self.rows += 1;
        if !self.airflow.contains(&v.airflow) {
            self.airflow.push(v.airflow.clone());
            self.airflow.sort();
        }
        if v.clean {
            self.clean += 1;
        } else if let Some(c) = dagbag_class(v) {
            *self.by_class.entry(c).or_default() += 1;
        }
        let a = &mut self.agreement;
        match (static_valid, v.clean) {
            (true, true) => a.both_valid += 1,
            (true, false) => a.static_only_valid += 1,
            (false, true) => a.dagbag_only_valid += 1,
            (false, false) => a.both_invalid += 1,
        }
        self.clean_rate = self.clean as f64 / self.rows as f64;
    }

    fn merge(&mut self, o: &DagbagSummary) {
        self.rows += o.rows;
        self.clean += o.clean;
        for v in &o.airflow {
            if !self.airflow.contains(v) {
                self.airflow.push(v.clone());
            }
        }
        self.airflow.sort();
        for (c, n) in &o.by_class {
            *self.by_class.entry(c.clone()).or_default() += n;
        }
        self.agreement.add(&o.agreement);
        self.clean_rate = if self.rows == 0 {
            0.0
        } else {
            self.clean as f64 / self.rows as f64
        };
    }
}

/// Results per model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Model → results.
    pub models: BTreeMap<String, ModelSummary>,
}

impl Summary {
    /// Adds one row.
    pub fn add(&mut self, row: &EvalRow) {
        let m = self.models.entry(row.row.model.clone()).or_default();
        m.rows += 1;
        if row.verdict.valid {
            m.valid += 1;
        }
        let mut cats: Vec<String> = row
            .verdict
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| {
                serde_json::to_value(f.category)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .collect();
        cats.sort();
        cats.dedup();
        for c in cats {
            *m.by_category.entry(c).or_default() += 1;
        }
        m.validity_rate = m.valid as f64 / m.rows as f64;
        if let Some(s) = &row.llm_scores {
            m.llm_rows += 1;
            for (k, v) in s {
                *m.llm_sums.entry(k.clone()).or_default() += v;
            }
        }
        if let Some(d) = &row.dagbag {
            m.dagbag
                .get_or_insert_with(Default::default)
                .add(row.verdict.valid, d);
        }
    }

    /// Merges another summary (from another judge batch).
    pub fn merge(&mut self, other: &Summary) {
        for (model, o) in &other.models {
            let m = self.models.entry(model.clone()).or_default();
            m.rows += o.rows;
            m.valid += o.valid;
            for (c, n) in &o.by_category {
                *m.by_category.entry(c.clone()).or_default() += n;
            }
            if let Some(d) = &o.dagbag {
                m.dagbag.get_or_insert_with(Default::default).merge(d);
            }
            m.llm_rows += o.llm_rows;
            for (k, v) in &o.llm_sums {
                *m.llm_sums.entry(k.clone()).or_default() += v;
            }
            m.validity_rate = if m.rows == 0 {
                0.0
            } else {
                m.valid as f64 / m.rows as f64
            };
        }
    }

    /// A Markdown report: validity per model, and, where DagBag ran, its clean rate, its
    /// failure classes and the static judge's agreement with it.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| model | rows | valid | validity | top failures |\n|---|---|---|---|---|\n",
        );
        for (model, m) in &self.models {
            out.push_str(&format!(
                "| {model} | {} | {} | {:.1}% | {} |\n",
                m.rows,
                m.valid,
                100.0 * m.validity_rate,
                top(&m.by_category)
            ));
        }
        if self.models.values().any(|m| m.dagbag.is_some()) {
            out.push_str(
                "\n**Airflow DagBag** (ground truth: at least one DAG, no import error)\n\n\
                 | model | Airflow | loaded | clean | clean rate | top import errors |\n|---|---|---|---|---|---|\n",
            );
            for (model, m) in &self.models {
                if let Some(d) = &m.dagbag {
                    out.push_str(&format!(
                        "| {model} | {} | {} | {} | {:.1}% | {} |\n",
                        d.airflow.join(", "),
                        d.rows,
                        d.clean,
                        100.0 * d.clean_rate,
                        top(&d.by_class)
                    ));
                }
            }
            out.push_str(
                "\n**Static judge vs DagBag**\n\n\
                 | model | agree | precision of valid | recall of valid | both valid | judge valid, DagBag not | DagBag clean, judge not | both invalid |\n|---|---|---|---|---|---|---|---|\n",
            );
            for (model, m) in &self.models {
                if let Some(d) = &m.dagbag {
                    let a = &d.agreement;
                    out.push_str(&format!(
                        "| {model} | {:.1}% | {:.1}% | {:.1}% | {} | {} | {} | {} |\n",
                        100.0 * a.rate(),
                        100.0 * a.precision(),
                        100.0 * a.recall(),
                        a.both_valid,
                        a.static_only_valid,
                        a.dagbag_only_valid,
                        a.both_invalid
                    ));
                }
            }
        }
        if self.models.values().any(|m| m.llm_rows > 0) {
            out.push_str(
                "\n**LLM judge** (means, 1-5; grounded: the judge saw the static and DagBag findings, and a DAG that does not load is capped on correctness; ungrounded: code and instruction only)\n\n\
                 | model | scored | correctness | ungrounded | completeness | ungrounded | best practices | ungrounded | does what was asked | ungrounded | mean length (chars) |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            );
            let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
            for (model, m) in &self.models {
                if m.llm_rows == 0 {
                    continue;
                }
                let mut row = format!("| {model} | {} |", m.llm_rows);
                for c in crate::llm::CRITERIA {
                    row.push_str(&format!(
                        " {} | {} |",
                        f(m.llm_mean(c)),
                        f(m.llm_mean(&format!("{}{c}", crate::llm::UNGROUNDED)))
                    ));
                }
                row.push_str(&format!(
                    " {} |\n",
                    f(m.llm_mean("length_chars")).trim_end_matches(".00")
                ));
                out.push_str(&row);
            }
        }
        out
    }
}

/// The four largest counts, as `name n, ...`.
fn top(counts: &BTreeMap<String, usize>) -> String {
    let mut top: Vec<(&String, &usize)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    top.iter()
        .take(4)
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "from datetime import datetime\nfrom airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG('d', start_date=datetime(2024, 1, 1)) as dag:\n    EmptyOperator(task_id='a')\n";

    #[test]
    fn fenced_and_bare_code() {
        let ans = format!("Here is the DAG:\n```python\n{GOOD}```\nIt runs daily.");
        let ex = extract_code(&ans);
        assert_eq!(ex.code, GOOD);
        assert!(!ex.unclosed_fence);
        assert_eq!(extract_code(GOOD).code, GOOD);
        let cut = extract_code("```python\nfrom airflow import DAG\nwith DAG(");
        assert!(cut.unclosed_fence);
    }

    #[test]
    fn rows_and_summaries() {
        let opts = Options::default();
        let good = judge_row(
            &GenRow {
                id: "1".into(),
                model: "m".into(),
                output: format!("```py\n{GOOD}```"),
                ..Default::default()
            },
            &opts,
        );
        assert!(good.verdict.valid, "{:?}", good.verdict.findings);
        let cut = judge_row(
            &GenRow {
                id: "2".into(),
                model: "m".into(),
                output: "```python\nfrom airflow import DAG\nx = f(1,\n".into(),
                finish_reason: Some("length".into()),
                ..Default::default()
            },
            &opts,
        );
        assert!(!cut.verdict.valid);
        assert!(cut
            .verdict
            .findings
            .iter()
            .any(|f| f.category == Category::Truncated));
        let mut s = Summary::default();
        s.add(&good);
        s.add(&cut);
        assert_eq!(s.models["m"].rows, 2);
        assert_eq!(s.models["m"].valid, 1);
        assert_eq!(s.models["m"].by_category["TRUNCATED"], 1);
        assert!(s.markdown().contains("| m | 2 | 1 | 50.0% | TRUNCATED 1"));
    }
}
