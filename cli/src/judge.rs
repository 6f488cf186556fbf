//! `dagfleet judge PATH...`: the judge on local files, for data engineers' pre-commit checks.

use anyhow::{Context, Result};
use dagfleet_analysis::Options;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Parses `2.10` into `(2, 10)`.
pub fn parse_version(v: &str) -> Result<(u32, u32)> {
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    let b = b.split('.').next().unwrap_or("0");
    Ok((
        a.parse()
            .with_context(|| format!("--airflow-version `{v}`: expected MAJOR.MINOR, e.g. 2.10"))?,
        b.parse()
            .with_context(|| format!("--airflow-version `{v}`: expected MAJOR.MINOR, e.g. 2.10"))?,
    ))
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            let m = std::fs::symlink_metadata(&e)?;
            if m.is_dir() || e.extension().is_some_and(|x| x == "py") {
                collect(&e, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Judges every file and prints verdicts; exit 1 when any file is invalid.
pub fn run(paths: &[PathBuf], json: bool, version: &str) -> Result<ExitCode> {
    let opts = Options {
        airflow_version: parse_version(version)?,
    };
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut invalid = 0;
    for f in &files {
        let v = dagfleet_judge::judge_file(f, &opts);
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
            println!("{line}");
        } else {
            println!(
                "{}: {}",
                f.display(),
                if v.valid { "valid" } else { "INVALID" }
            );
            for x in &v.findings {
                let sev = format!("{:?}", x.severity).to_lowercase();
                let cat = serde_json::to_value(x.category)
                    .ok()
                    .and_then(|c| c.as_str().map(String::from))
                    .unwrap_or_default();
                println!(
                    "  {}:{}:{} {sev} {cat}: {}",
                    f.display(),
                    x.line,
                    x.column,
                    x.message
                );
            }
        }
    }
    if !json {
        eprintln!("{} files, {} invalid", files.len(), invalid);
    }
    Ok(if invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
