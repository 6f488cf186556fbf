//! `dagfleet mine SPEC`: the mine stage of a run spec on this machine, without a queue.

use dagfleet_protocol::jobs::Source;
use dagfleet_protocol::RunSpec;
use std::io::Write;

use crate::{globset, merge_versions, mine_files, sources, GlobError};

/// Why a local mine could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalMineError {
    /// The spec names no sources.
    #[error("run spec key `sources`: mining needs at least one source")]
    NoSources,
    /// A glob does not parse.
    #[error(transparent)]
    Glob(#[from] GlobError),
    /// The output cannot be written.
    #[error("writing the mined records: {0}")]
    Write(#[from] std::io::Error),
    /// A record cannot be serialized.
    #[error("serializing a mined record: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a local mine found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMine {
    /// DAG files kept over every source and version.
    pub found: usize,
    /// Records written, after identical files across versions were merged.
    pub written: usize,
}

/// Mines every source and version of `spec`, writes one JSON record per line to `sink`
/// (identical files across versions merged into one record that lists them; listing newer
/// versions first in the spec keeps the newest text), and tells `log` each shard's summary
/// and each source that cannot be read (which does not stop the others).
pub async fn mine_spec(
    spec: &RunSpec,
    sink: &mut dyn Write,
    log: &mut dyn FnMut(String),
) -> Result<LocalMine, LocalMineError> {
    if spec.sources.is_empty() {
        return Err(LocalMineError::NoSources);
    }
    let globs = globset(&spec.mine.globs)?;
    let mut all = Vec::new();
    for src in &spec.sources {
        let refs = match src {
            Source::Github { refs, .. } | Source::Git { refs, .. } => refs.clone(),
            Source::Pypi { versions, .. } => versions.clone(),
            Source::Dir {
                airflow_version, ..
            } => vec![airflow_version.clone().unwrap_or_default()],
        };
        let name = sources::source_name(src);
        for r in refs {
            let (mined, summary) = match sources::read(src, &r, &globs).await {
                Ok(files) => mine_files(&name, &r, files, &globs),
                Err(e) => {
                    log(format!("{name}@{r}: {e}"));
                    continue;
                }
            };
            all.extend(mined);
            log(serde_json::to_string(&summary)?);
        }
    }
    let found = all.len();
    let merged = merge_versions(all);
    for m in &merged {
        serde_json::to_writer(&mut *sink, m)?;
        sink.write_all(b"\n")?;
    }
    sink.flush()?;
    Ok(LocalMine {
        found,
        written: merged.len(),
    })
}
