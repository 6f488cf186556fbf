//! Where candidate files come from: a local directory, a local git repository at a ref, or a
//! release archive on a PyPI-compatible index.

use dagfleet_protocol::jobs::Source;
use std::path::Path;
use std::time::Duration;

use crate::archive::{self, Limits};

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The ref or version does not exist: recorded in the summary; the run goes on.
    #[error("missing: {0}")]
    Missing(String),
    /// A network or server hiccup: retry the job later.
    #[error("transient: {0}")]
    Transient(String),
    /// Unsafe or unusable input: dead-letter the job.
    #[error("refused: {0}")]
    Refused(String),
}

/// A short name for records: `pypi:apache-airflow`, `dir:/path`, ...
pub fn source_name(s: &Source) -> String {
    match s {
        Source::Github { repo, .. } => format!("github:{repo}"),
        Source::Git { path, .. } => format!("git:{path}"),
        Source::Dir { path } => format!("dir:{path}"),
        Source::Pypi { package, .. } => format!("pypi:{package}"),
    }
}

/// Reads the candidate files of `source` at `reference` whose paths match `globs`.
pub async fn read(
    source: &Source,
    reference: &str,
    globs: &globset::GlobSet,
) -> Result<Vec<(String, Vec<u8>)>, SourceError> {
    match source {
        Source::Dir { path } => {
            let root = Path::new(path).to_path_buf();
            let globs = globs.clone();
            tokio::task::spawn_blocking(move || read_dir(&root, &globs))
                .await
                .map_err(|e| SourceError::Transient(e.to_string()))?
        }
        Source::Git { path, .. } => read_git(path, reference, globs).await,
        Source::Pypi {
            package, index_url, ..
        } => read_pypi(index_url.as_deref().unwrap_or("https://pypi.org"), package, reference, globs).await,
        Source::Github { .. } => Err(SourceError::Refused(
            "GitHub sources are not supported by this miner yet; use a git clone (kind = \"git\") or PyPI releases".into(),
        )),
    }
}

fn read_dir(root: &Path, globs: &globset::GlobSet) -> Result<Vec<(String, Vec<u8>)>, SourceError> {
    if !root.is_dir() {
        return Err(SourceError::Missing(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| SourceError::Missing(format!("{}: {e}", dir.display())))?;
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue; // never follow links out of the tree
            }
            if meta.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            if rel.ends_with(".py")
                && globs.is_match(&rel)
                && meta.len() <= Limits::default().max_file_bytes
            {
                if let Ok(d) = std::fs::read(&p) {
                    out.push((rel, d));
                }
            }
        }
    }
    Ok(out)
}

async fn git(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = tokio::process::Command::new("git")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(out.stdout)
}

async fn read_git(
    repo: &str,
    reference: &str,
    globs: &globset::GlobSet,
) -> Result<Vec<(String, Vec<u8>)>, SourceError> {
    let commit = format!("{reference}^{{commit}}");
    if let Err(e) = git(&["-C", repo, "rev-parse", "--verify", "--quiet", &commit]).await {
        return Err(SourceError::Missing(format!(
            "ref `{reference}` not found in {repo} {e}"
        )));
    }
    let list = git(&["-C", repo, "ls-tree", "-r", "-z", "--name-only", reference])
        .await
        .map_err(SourceError::Missing)?;
    let mut out = Vec::new();
    for name in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).to_string();
        if !name.ends_with(".py") || !globs.is_match(&name) {
            continue;
        }
        let spec = format!("{reference}:{name}");
        if let Ok(d) = git(&["-C", repo, "show", &spec]).await {
            if d.len() as u64 <= Limits::default().max_file_bytes {
                out.push((name, d));
            }
        }
    }
    Ok(out)
}

async fn read_pypi(
    index: &str,
    package: &str,
    version: &str,
    globs: &globset::GlobSet,
) -> Result<Vec<(String, Vec<u8>)>, SourceError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .user_agent("dagfleet-miner")
        .build()
        .map_err(|e| SourceError::Transient(e.to_string()))?;
    let url = format!(
        "{}/pypi/{package}/{version}/json",
        index.trim_end_matches('/')
    );
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| SourceError::Transient(format!("{url}: {e}")))?;
    match resp.status().as_u16() {
        200 => {}
        404 => {
            return Err(SourceError::Missing(format!(
                "{package} {version} is not on {index}"
            )))
        }
        429 | 500..=599 => {
            return Err(SourceError::Transient(format!(
                "{url}: HTTP {}",
                resp.status()
            )))
        }
        s => return Err(SourceError::Refused(format!("{url}: HTTP {s}"))),
    }
    let meta: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| SourceError::Transient(format!("{url}: {e}")))?;
    let files = meta["urls"].as_array().cloned().unwrap_or_default();
    let pick = files
        .iter()
        .find(|f| {
            f["packagetype"] == "bdist_wheel"
                && f["filename"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-none-any.whl"))
        })
        .or_else(|| files.iter().find(|f| f["packagetype"] == "sdist"))
        .cloned()
        .ok_or_else(|| {
            SourceError::Missing(format!("{package} {version} has no pure wheel or sdist"))
        })?;
    let file_url = pick["url"].as_str().unwrap_or("").to_string();
    let filename = pick["filename"].as_str().unwrap_or("").to_string();
    let expected = pick["digests"]["sha256"].as_str().unwrap_or("").to_string();
    let data = client
        .get(&file_url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| SourceError::Transient(format!("{filename}: {e}")))?
        .bytes()
        .await
        .map_err(|e| SourceError::Transient(format!("{filename}: {e}")))?;
    let found = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&data))
    };
    if !expected.is_empty() && found != expected {
        return Err(SourceError::Transient(format!(
            "{filename}: sha256 {found}, index says {expected}"
        )));
    }
    let globs = globs.clone();
    let is_wheel = filename.ends_with(".whl");
    tokio::task::spawn_blocking(move || {
        let want = |p: &str| p.ends_with(".py") && globs.is_match(p);
        let r = if is_wheel {
            archive::read_zip(&data, Limits::default(), &want)
        } else {
            archive::read_tar_gz(&data, Limits::default(), &want)
        };
        r.map(|(entries, _)| entries.into_iter().map(|e| (e.path, e.data)).collect())
            .map_err(|e| SourceError::Refused(format!("{filename}: {e}")))
    })
    .await
    .map_err(|e| SourceError::Transient(e.to_string()))?
}
