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
    /// The server asks us to wait this long.
    #[error("rate limited: {1}")]
    RateLimited(std::time::Duration, String),
}

/// A short name for records: `pypi:apache-airflow`, `dir:/path`, ...
pub fn source_name(s: &Source) -> String {
    match s {
        Source::Github { repo, .. } => format!("github:{repo}"),
        Source::Git { path, .. } => format!("git:{path}"),
        Source::Dir { path, .. } => format!("dir:{path}"),
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
        Source::Dir { path, .. } => {
            let root = Path::new(path).to_path_buf();
            let globs = globs.clone();
            tokio::task::spawn_blocking(move || read_dir(&root, &globs))
                .await
                .map_err(|e| SourceError::Transient(e.to_string()))?
        }
        Source::Git { path, .. } => read_git(path, reference, globs).await,
        Source::Pypi {
            package, index_url, ..
        } => {
            read_pypi(
                index_url.as_deref().unwrap_or("https://pypi.org"),
                package,
                reference,
                globs,
            )
            .await
        }
        Source::Github { repo, api_url, .. } => {
            crate::github::read(
                api_url.as_deref().unwrap_or("https://api.github.com"),
                repo,
                reference,
                globs,
            )
            .await
        }
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
    // The simple repository API (PEP 503/691) is what every PyPI-compatible index serves.
    let url = format!(
        "{}/simple/{}/",
        index.trim_end_matches('/'),
        normalize(package)
    );
    let resp = client
        .get(&url)
        .header(
            "Accept",
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        )
        .send()
        .await
        .map_err(|e| SourceError::Transient(format!("{url}: {e}")))?;
    match resp.status().as_u16() {
        200 => {}
        404 => {
            return Err(SourceError::Missing(format!(
                "package {package} is not on {index}"
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
    let is_json = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let body = resp
        .text()
        .await
        .map_err(|e| SourceError::Transient(format!("{url}: {e}")))?;
    let files = if is_json {
        files_from_json(&body)
    } else {
        files_from_html(&body, &url)
    };
    let wheel_prefix = format!("{}-{version}-", normalize(package).replace('-', "_"));
    let pick = files
        .iter()
        .find(|f| f.filename.starts_with(&wheel_prefix) && f.filename.ends_with("-none-any.whl"))
        .or_else(|| {
            files.iter().find(|f| {
                let stem = f.filename.trim_end_matches(".tar.gz");
                f.filename.ends_with(".tar.gz")
                    && normalize(stem) == format!("{}-{}", normalize(package), normalize(version))
            })
        })
        .cloned()
        .ok_or_else(|| {
            SourceError::Missing(format!(
                "{package} {version} is not on {index} (no pure wheel or sdist of that version)"
            ))
        })?;
    let (file_url, filename, expected) = (pick.url, pick.filename, pick.sha256);
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

/// PEP 503 name normalisation.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[derive(Clone, Debug)]
struct IndexFile {
    filename: String,
    url: String,
    sha256: String,
}

fn files_from_json(body: &str) -> Vec<IndexFile> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["files"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| f["yanked"] != true)
                .map(|f| IndexFile {
                    filename: f["filename"].as_str().unwrap_or("").to_string(),
                    url: f["url"].as_str().unwrap_or("").to_string(),
                    sha256: f["hashes"]["sha256"].as_str().unwrap_or("").to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Anchors of a PEP 503 HTML page: `<a href="URL#sha256=HEX">FILENAME</a>`.
fn files_from_html(body: &str, base: &str) -> Vec<IndexFile> {
    let mut out = Vec::new();
    for part in body.split("<a ").skip(1) {
        let Some(h) = part
            .split("href=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let Some(name) = part.split('>').nth(1).and_then(|r| r.split('<').next()) else {
            continue;
        };
        let (url, frag) = h.split_once('#').unwrap_or((h, ""));
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!(
                "{}/{}",
                base.trim_end_matches('/'),
                url.trim_start_matches('/')
            )
        };
        out.push(IndexFile {
            filename: name.trim().to_string(),
            url: url.replace("&amp;", "&"),
            sha256: frag.strip_prefix("sha256=").unwrap_or("").to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_index_pages() {
        assert_eq!(
            normalize("Apache_Airflow.Providers"),
            "apache-airflow-providers"
        );
        let html = r#"<a href="https://x/apache_airflow-2.10.5-py3-none-any.whl#sha256=ab" data-requires-python="&gt;=3.8">apache_airflow-2.10.5-py3-none-any.whl</a><br/>"#;
        let f = files_from_html(html, "https://pypi.org/simple/apache-airflow/");
        assert_eq!(f[0].filename, "apache_airflow-2.10.5-py3-none-any.whl");
        assert_eq!(f[0].sha256, "ab");
    }
}
