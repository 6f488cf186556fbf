//! `dagfleet judge PATH...`: the judge on local files, for data engineers' pre-commit checks.

use anyhow::{Context, Result};
use dagfleet_analysis::Options;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Airflow major versions the knowledge base covers.
const MAJORS: std::ops::RangeInclusive<u32> = 2..=3;

/// Parses `2.10` into `(2, 10)`; only versions of Airflow that exist are accepted.
pub fn parse_version(v: &str) -> Result<(u32, u32)> {
    let bad = || {
        format!("--airflow-version `{v}`: expected MAJOR.MINOR of Airflow 2 or 3, e.g. 2.10 or 3.0")
    };
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    let b = b.split('.').next().unwrap_or("0");
    let (major, minor): (u32, u32) = (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
    if !MAJORS.contains(&major) || minor > 30 {
        anyhow::bail!("{}", bad());
    }
    Ok((major, minor))
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

/// Judges every file, on all cores, and prints the verdicts in order. Exit 0 when all are
/// valid, 1 when any is invalid, 2 when a path could not be judged (after every verdict).
pub fn run(paths: &[PathBuf], json: bool, version: &str) -> Result<ExitCode> {
    use rayon::prelude::*;
    let opts = Options {
        airflow_version: parse_version(version)?,
    };
    let mut items = Vec::new();
    for p in paths {
        collect(p, true, &mut items);
    }
    let verdicts: Vec<Option<dagfleet_judge::Verdict>> = items
        .par_iter()
        .map(|i| match i {
            Item::File(f) => Some(dagfleet_judge::judge_file(f, &opts)),
            Item::Error(..) => None,
        })
        .collect();
    let (mut invalid, mut errors, mut judged) = (0, 0, 0);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (item, v) in items.iter().zip(verdicts) {
        let (f, v) = match (item, v) {
            (Item::File(f), Some(v)) => (f, v),
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
        if !v.valid {
            invalid += 1;
        }
        if json {
            let line = serde_json::json!({
                "path": f.display().to_string(),
                "valid": v.valid,
                "dag_ids": v.dag_ids,
                "tasks": v.tasks,
                "findings": v.findings,
            });
            writeln!(out, "{line}").ok();
        } else {
            writeln!(
                out,
                "{}: {}",
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
