//! `dagfleet judge PATH...`: the judge on local files, for data engineers' pre-commit checks.

use anyhow::{Context, Result};
use dagfleet_analysis::Options;
use dagfleet_judge::dagbag::{Dagbag, DagbagVerdict};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Parses `2.10` into `(2, 10)`; only versions of Airflow that exist are accepted.
pub fn parse_version(v: &str) -> Result<(u32, u32)> {
    dagfleet_judge::parse_airflow_version(v).map_err(|e| anyhow::anyhow!("--airflow-version {e}"))
}

/// A path given on the command line, as files to judge or a reason it cannot be judged.
enum Item {
    File(PathBuf),
    Error(PathBuf, String),
}

fn collect(path: &Path, top: bool, out: &mut Vec<Item>) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            out.push(Item::Error(path.to_path_buf(), e.to_string()));
            return;
        }
    };
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(r) => r.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                out.push(Item::Error(path.to_path_buf(), e.to_string()));
                return;
            }
        };
        entries.sort();
        let before = out.len();
        for e in entries {
            let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&e) else {
                continue;
            };
            if m.is_dir() || e.extension().is_some_and(|x| x == "py") {
                collect(&e, false, out);
            }
        }
        if top && out.len() == before {
            out.push(Item::Error(
                path.to_path_buf(),
                "no .py files in this directory".into(),
            ));
        }
    } else if !meta.is_file() {
        // A FIFO, a device (`/dev/zero`), a socket: never read.
        out.push(Item::Error(path.to_path_buf(), "not a regular file".into()));
    } else {
        out.push(Item::File(path.to_path_buf()));
    }
}

/// The DagBag helpers for `version` (its `MAJOR.MINOR`), from the `[judge]` settings.
pub fn dagbag_pool(
    settings: &dagfleet_runtime::config::JudgeSettings,
    version: &str,
) -> Result<Dagbag> {
    let (major, minor) = parse_version(version)?;
    let v = format!("{major}.{minor}");
    let (root, envs) = dagfleet_judge::dagbag::configured(settings);
    let Some(env) = envs.iter().find(|e| e.version == v) else {
        anyhow::bail!(
            "--dagbag: no Airflow {v} environment under {} (found: {}); install one with `bash tests/airflow-env.sh {v}`",
            root.as_deref().map_or("(no directory)".into(), |r| r.display().to_string()),
            if envs.is_empty() {
                "none".to_string()
            } else {
                envs.iter().map(|e| e.version.as_str()).collect::<Vec<_>>().join(", ")
            }
        );
    };
    Dagbag::start(
        env,
        dagfleet_judge::dagbag::procs(settings),
        settings.dagbag_timeout,
    )
    .map_err(anyhow::Error::msg)
}

/// `--rows`: judges JSONL rows (generations or mined records) and writes evaluation rows to
/// stdout, the per-model summary to stderr.
pub fn run_rows(paths: &[PathBuf], version: &str, dagbag: Option<&Dagbag>) -> Result<ExitCode> {
    use rayon::prelude::*;
    let opts = Options {
        airflow_version: parse_version(version)?,
    };
    let mut summary = dagfleet_judge::Summary::default();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut bad = 0usize;
    for p in paths {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let rows: Vec<(usize, dagfleet_judge::GenRow)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .filter_map(
                |(i, l)| match dagfleet_judge::role::row_to_gen(l, i as u64) {
                    Ok(r) => Some((i, r)),
                    Err(e) => {
                        eprintln!("{}: {e}", p.display());
                        bad += 1;
                        None
                    }
                },
            )
            .collect();
        let judged: Vec<dagfleet_judge::EvalRow> = rows
            .par_iter()
            .map(|(_, r)| {
                let mut e = dagfleet_judge::judge_row(r, &opts);
                if let Some(d) = dagbag {
                    e.dagbag = Some(d.check(&e.code));
                }
                e
            })
            .collect();
        for e in judged {
            summary.add(&e);
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        }
    }
    out.flush()?;
    eprint!("{}", summary.markdown());
    Ok(if bad > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Judges every file, on all cores, and prints the verdicts in order. Exit 0 when all are
/// valid, 1 when any is invalid (statically, or to DagBag when it runs), 2 when a path
/// could not be judged (after every verdict).
pub fn run(
    paths: &[PathBuf],
    json: bool,
    version: &str,
    dagbag: Option<&Dagbag>,
) -> Result<ExitCode> {
    use rayon::prelude::*;
    let opts = Options {
        airflow_version: parse_version(version)?,
    };
    let mut items = Vec::new();
    for p in paths {
        collect(p, true, &mut items);
    }
    type Judged = (dagfleet_judge::Verdict, Option<DagbagVerdict>);
    let verdicts: Vec<Option<Judged>> = items
        .par_iter()
        .map(|i| match i {
            Item::File(f) => {
                let v = dagfleet_judge::judge_file(f, &opts);
                // DagBag reads the file itself, as Airflow would.
                let d = dagbag.map(|d| match std::fs::read(f) {
                    Ok(b) if b.len() <= dagfleet_judge::MAX_SOURCE_BYTES => {
                        d.check(&String::from_utf8_lossy(&b))
                    }
                    _ => DagbagVerdict {
                        status: "unread".into(),
                        error_class: Some("Unreadable".into()),
                        ..Default::default()
                    },
                });
                Some((v, d))
            }
            Item::Error(..) => None,
        })
        .collect();
    let (mut invalid, mut errors, mut judged) = (0, 0, 0);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (item, v) in items.iter().zip(verdicts) {
        let (f, v, d) = match (item, v) {
            (Item::File(f), Some((v, d))) => (f, v, d),
            (Item::Error(p, reason), _) => {
                errors += 1;
                if json {
                    let line = serde_json::json!({
                        "path": p.display().to_string(),
                        "error": reason,
                    });
                    writeln!(out, "{line}").ok();
                } else {
                    writeln!(out, "{}: ERROR {reason}", p.display()).ok();
                }
                continue;
            }
            (Item::File(_), None) => continue,
        };
        judged += 1;
        if !v.valid || d.as_ref().is_some_and(|d| !d.clean) {
            invalid += 1;
        }
        if json {
            let mut line = serde_json::json!({
                "path": f.display().to_string(),
                "valid": v.valid,
                "dag_ids": v.dag_ids,
                "tasks": v.tasks,
                "findings": v.findings,
            });
            if let Some(d) = &d {
                line["dagbag"] = serde_json::to_value(d)?;
            }
            writeln!(out, "{line}").ok();
        } else {
            let dag = match &d {
                None => String::new(),
                Some(d) if d.clean => format!(" (DagBag {}: clean)", d.airflow),
                Some(d) => format!(
                    " (DagBag {}: {})",
                    d.airflow,
                    d.error
                        .as_deref()
                        .or(d.error_class.as_deref())
                        .unwrap_or("not clean")
                ),
            };
            writeln!(
                out,
                "{}: {}{dag}",
                f.display(),
                if v.valid { "valid" } else { "INVALID" }
            )
            .ok();
            for x in &v.findings {
                let sev = format!("{:?}", x.severity).to_lowercase();
                let cat = serde_json::to_value(x.category)
                    .ok()
                    .and_then(|c| c.as_str().map(String::from))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "  {}:{}:{} {sev} {cat}: {}",
                    f.display(),
                    x.line,
                    x.column,
                    x.message
                )
                .ok();
            }
        }
    }
    out.flush().ok();
    drop(out);
    if !json {
        eprintln!(
            "{judged} files, {invalid} invalid{}",
            if errors > 0 {
                format!(", {errors} paths could not be judged")
            } else {
                String::new()
            }
        );
    }
    Ok(if errors > 0 {
        ExitCode::from(2)
    } else if invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
