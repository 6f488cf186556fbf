//! The miner: finds real Airflow DAG files to learn from.
//!
//! # Overview
//! One mine job is one (source, ref) shard ([`dagfleet_protocol::jobs::MineShard`]):
//! - [`sources`] reads candidate files from a local directory, a local git repository at a
//!   ref, or a release archive (wheel, else sdist) of a package version on a PyPI-compatible
//!   index;
//! - [`mine_files`] keeps files that match the globs, are UTF-8 Python, define a DAG (per
//!   [`dagfleet_analysis`]), are not tests and do not import internal test code, strips the
//!   licence header, and records the analysis metadata;
//! - the [`MinerHandler`] writes `dags.jsonl` (one [`MinedDag`] per line) and `summary.json`
//!   ([`ShardSummary`]: kept, dropped by reason, length distribution, missing refs).

pub mod archive;
pub mod github;
pub mod local;
pub mod sources;

use bytes::Bytes;
use dagfleet_analysis::{analyze, clean::strip_license_header, Category, Options};
use dagfleet_protocol::{jobs::MineShard, Envelope, Job, Role};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One mined DAG file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinedDag {
    /// Source, e.g. `pypi:apache-airflow`.
    pub source: String,
    /// Ref or version.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Path inside the source.
    pub path: String,
    /// SHA-256 of the cleaned content.
    pub sha256: String,
    /// Content without the licence header.
    pub content: String,
    /// dag_ids found.
    pub dag_ids: Vec<Option<String>>,
    /// Number of tasks.
    pub tasks: usize,
    /// Operators used.
    pub operators: Vec<String>,
    /// Uses TaskFlow.
    pub taskflow: bool,
    /// Heuristic complexity.
    pub complexity: f64,
    /// Lines of cleaned content.
    pub lines: usize,
    /// `short` (< 50 lines), `medium` (< 150) or `long`.
    pub length: String,
    /// Every ref in which the same (normalised) file appears, after [`merge_versions`].
    #[serde(default)]
    pub versions: Vec<String>,
}

/// Content with trailing whitespace and blank lines removed: files that differ only in
/// layout count as one.
pub fn normalized_hash(content: &str) -> String {
    let mut h = Sha256::new();
    for line in content.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Merges the same file found in several refs into one record that lists them all, keeping
/// the first record of each (pass the newest ref first to keep the newest text).
pub fn merge_versions(records: Vec<MinedDag>) -> Vec<MinedDag> {
    let mut out: Vec<MinedDag> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for mut r in records {
        let key = normalized_hash(&r.content);
        match index.get(&key) {
            Some(&i) => {
                if !out[i].versions.contains(&r.reference) {
                    out[i].versions.push(r.reference);
                }
            }
            None => {
                if r.versions.is_empty() {
                    r.versions.push(r.reference.clone());
                }
                index.insert(key, out.len());
                out.push(r);
            }
        }
    }
    out
}

/// What one shard found and dropped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardSummary {
    /// Source.
    pub source: String,
    /// Ref.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Files kept.
    pub kept: usize,
    /// Files dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Kept files by length bucket.
    pub lengths: BTreeMap<String, usize>,
    /// Why the ref could not be read, if it could not.
    pub missing: Option<String>,
}

/// A `mine.globs` pattern that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("mine.globs `{glob}`: {source}")]
pub struct GlobError {
    /// The pattern (empty when the set as a whole failed to build).
    pub glob: String,
    /// The cause.
    #[source]
    pub source: globset::Error,
}

/// Globs a path must match.
pub fn globset(globs: &[String]) -> Result<globset::GlobSet, GlobError> {
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        b.add(globset::Glob::new(g).map_err(|source| GlobError {
            glob: g.clone(),
            source,
        })?);
    }
    b.build().map_err(|source| GlobError {
        glob: globs.join(", "),
        source,
    })
}

fn is_test_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let file = parts.last().copied().unwrap_or("");
    parts[..parts.len().saturating_sub(1)]
        .iter()
        .any(|d| *d == "tests" || *d == "test" || *d == "tests_common")
        || file.starts_with("test_")
        || file.ends_with("_test.py")
        || file == "conftest.py"
}

/// Filters and analyses candidate files of one shard.
pub fn mine_files(
    source: &str,
    reference: &str,
    files: Vec<(String, Vec<u8>)>,
    globs: &globset::GlobSet,
) -> (Vec<MinedDag>, ShardSummary) {
    let mut summary = ShardSummary {
        source: source.into(),
        reference: reference.into(),
        ..Default::default()
    };
    let drop = |why: &str, s: &mut ShardSummary| *s.dropped.entry(why.into()).or_default() += 1;
    let mut out = Vec::new();
    let opts = Options::default();
    for (path, data) in files {
        if !path.ends_with(".py") || !globs.is_match(&path) {
            continue;
        }
        if is_test_path(&path) {
            drop("test file", &mut summary);
            continue;
        }
        let Ok(text) = String::from_utf8(data) else {
            drop("not UTF-8", &mut summary);
            continue;
        };
        let report = analyze(&text, &opts);
        if report.dags.is_empty() {
            drop("defines no DAG", &mut summary);
            continue;
        }
        if report.has(Category::InternalTestImport) {
            drop("imports internal test code", &mut summary);
            continue;
        }
        if report.has(Category::SyntaxError) || report.has(Category::Truncated) {
            drop("syntax error", &mut summary);
            continue;
        }
        let content = strip_license_header(&text);
        let lines = content.lines().count();
        let length = match lines {
            0..50 => "short",
            50..150 => "medium",
            _ => "long",
        }
        .to_string();
        *summary.lengths.entry(length.clone()).or_default() += 1;
        out.push(MinedDag {
            source: source.into(),
            reference: reference.into(),
            sha256: hex::encode(Sha256::digest(content.as_bytes())),
            path,
            dag_ids: report.dags.iter().map(|d| d.dag_id.clone()).collect(),
            tasks: report.tasks.len(),
            operators: report.metadata.operators.clone(),
            taskflow: report.metadata.taskflow,
            complexity: report.metadata.complexity,
            lines,
            length,
            versions: vec![reference.to_string()],
            content,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    summary.kept = out.len();
    (out, summary)
}

/// Handler of the `miner` role.
#[derive(Clone, Debug, Default)]
pub struct MinerHandler;

impl Handler for MinerHandler {
    fn role(&self) -> Role {
        Role::Miner
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let Job::Mine(MineShard {
            source,
            reference,
            globs,
        }) = &env.job
        else {
            return Err(JobError::fatal(format!(
                "the miner got a `{}` job",
                env.job.stage()
            )));
        };
        let set = globset(globs).map_err(|e| JobError::fatal(e.to_string()))?;
        let name = sources::source_name(source);
        let (mined, summary) = match sources::read(source, reference, &set).await {
            Ok(files) => mine_files(&name, reference, files, &set),
            Err(sources::SourceError::Missing(why)) => (
                Vec::new(),
                ShardSummary {
                    source: name.clone(),
                    reference: reference.clone(),
                    missing: Some(why),
                    ..Default::default()
                },
            ),
            Err(sources::SourceError::Transient(why)) => return Err(JobError::retry(why)),
            Err(sources::SourceError::RateLimited(after, why)) => {
                return Err(JobError::Retry {
                    reason: why,
                    after: Some(after),
                })
            }
            Err(sources::SourceError::Refused(why)) => return Err(JobError::fatal(why)),
        };
        let mut body = Vec::new();
        for m in &mined {
            serde_json::to_writer(&mut body, m).map_err(|e| JobError::fatal(e.to_string()))?;
            body.push(b'\n');
        }
        ctx.put("dags.jsonl", Bytes::from(body)).await?;
        let s = serde_json::to_vec_pretty(&summary).map_err(|e| JobError::fatal(e.to_string()))?;
        ctx.put("summary.json", Bytes::from(s)).await?;
        Ok(JobOutput::default()
            .metric("rows", mined.len() as f64)
            .metric("dropped", summary.dropped.values().sum::<usize>() as f64)
            .metric("missing", summary.missing.is_some() as u8 as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_across_versions_is_one_record() {
        let dag = "from airflow import DAG\nwith DAG('d') as dag:\n    pass\n";
        let set = globset(&["**/example_*.py".into()]).unwrap();
        let (a, _) = mine_files(
            "s",
            "2.10.5",
            vec![("x/example_a.py".into(), dag.as_bytes().to_vec())],
            &set,
        );
        let relaid = dag.replace("pass\n", "pass   \n\n\n");
        let (b, _) = mine_files(
            "s",
            "2.6.3",
            vec![("x/example_a.py".into(), relaid.into_bytes())],
            &set,
        );
        let (c, _) = mine_files(
            "s",
            "2.6.3",
            vec![(
                "x/example_b.py".into(),
                b"from airflow import DAG\nwith DAG('other') as dag:\n    pass\n".to_vec(),
            )],
            &set,
        );
        let merged = merge_versions(a.into_iter().chain(b).chain(c).collect());
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].versions, ["2.10.5", "2.6.3"]);
        assert_eq!(merged[1].versions, ["2.6.3"]);
    }

    #[test]
    fn filters_keep_real_dags_only() {
        let dag = "# Licensed to the Apache Software Foundation\n\nfrom airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\nwith DAG('d') as dag:\n    EmptyOperator(task_id='a')\n";
        let files = vec![
            (
                "airflow/example_dags/example_a.py".to_string(),
                dag.as_bytes().to_vec(),
            ),
            (
                "airflow/example_dags/helper.py".to_string(),
                b"x = 1\n".to_vec(),
            ),
            (
                "tests/example_dags/example_b.py".to_string(),
                dag.as_bytes().to_vec(),
            ),
            (
                "airflow/example_dags/example_c.py".to_string(),
                format!("{dag}from tests.system.utils import get_test_run\n").into_bytes(),
            ),
            ("airflow/models/dag.py".to_string(), dag.as_bytes().to_vec()),
            (
                "airflow/example_dags/example_bin.py".to_string(),
                vec![0xff, 0xfe],
            ),
        ];
        let set = globset(&["**/example_*.py".into(), "**/example_dags/**".into()]).unwrap();
        let (kept, s) = mine_files("dir:x", "", files, &set);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path, "airflow/example_dags/example_a.py");
        assert!(!kept[0].content.contains("Licensed"));
        assert_eq!(kept[0].dag_ids, vec![Some("d".to_string())]);
        assert_eq!(s.dropped["defines no DAG"], 1);
        assert_eq!(s.dropped["test file"], 1);
        assert_eq!(s.dropped["imports internal test code"], 1);
        assert_eq!(s.dropped["not UTF-8"], 1);
        assert_eq!(s.lengths["short"], 1);
    }
}
