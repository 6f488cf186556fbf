//! Reading release archives (wheels are zip, sdists are tar.gz) safely: no path traversal,
//! no absolute paths, no links, and bounds on entries and on bytes, so a compression bomb
//! stops with an error instead of filling memory.

use std::io::Read;

/// Limits on one archive.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most entries read.
    pub max_entries: usize,
    /// Most bytes of one file kept (larger files are skipped, counted).
    pub max_file_bytes: u64,
    /// Most uncompressed bytes read in all.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_file_bytes: 1024 * 1024,
            max_total_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// An entry escapes the archive root or is a link.
    #[error("archive entry `{0}` is refused: {1}")]
    Unsafe(String, &'static str),
    /// The archive exceeds a limit.
    #[error("archive exceeds {0}")]
    TooBig(String),
    /// The archive cannot be read.
    #[error("unreadable archive: {0}")]
    Corrupt(String),
}

/// A file from an archive.
pub struct Entry {
    /// Path inside the archive, `/`-separated, without the top-level sdist directory.
    pub path: String,
    /// Content.
    pub data: Vec<u8>,
}

fn check_path(p: &str) -> Result<(), ArchiveError> {
    if p.starts_with('/')
        || p.starts_with('\\')
        || p.contains(':') && p.len() > 1 && p.as_bytes()[1] == b':'
    {
        return Err(ArchiveError::Unsafe(p.into(), "absolute path"));
    }
    if p.split(['/', '\\']).any(|c| c == "..") {
        return Err(ArchiveError::Unsafe(p.into(), "path traversal"));
    }
    Ok(())
}

/// Reads the files of a zip (wheel) whose path passes `want`.
pub fn read_zip(
    bytes: &[u8],
    limits: Limits,
    want: &dyn Fn(&str) -> bool,
) -> Result<(Vec<Entry>, usize), ArchiveError> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    if z.len() > limits.max_entries {
        return Err(ArchiveError::TooBig(format!(
            "{} entries (limit {})",
            z.len(),
            limits.max_entries
        )));
    }
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut skipped_large = 0;
    for i in 0..z.len() {
        let mut f = z
            .by_index(i)
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let name = f.name().to_string();
        check_path(&name)?;
        if f.is_symlink() {
            return Err(ArchiveError::Unsafe(name, "symbolic link"));
        }
        if f.is_dir() || !want(&name) {
            continue;
        }
        if f.size() > limits.max_file_bytes {
            skipped_large += 1;
            continue;
        }
        let mut data = Vec::new();
        (&mut f)
            .take(limits.max_file_bytes + 1)
            .read_to_end(&mut data)
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        total += data.len() as u64;
        if total > limits.max_total_bytes {
            return Err(ArchiveError::TooBig(format!(
                "{} uncompressed bytes",
                limits.max_total_bytes
            )));
        }
        if data.len() as u64 > limits.max_file_bytes {
            skipped_large += 1;
            continue;
        }
        out.push(Entry { path: name, data });
    }
    Ok((out, skipped_large))
}

/// Reads the files of a tar.gz (sdist) whose path (without the top directory) passes `want`.
pub fn read_tar_gz(
    bytes: &[u8],
    limits: Limits,
    want: &dyn Fn(&str) -> bool,
) -> Result<(Vec<Entry>, usize), ArchiveError> {
    let gz = flate2::read::GzDecoder::new(bytes);
    // Bound the decompressed stream as a whole: a bomb ends here.
    let mut a = tar::Archive::new(gz.take(limits.max_total_bytes + 1));
    let mut out = Vec::new();
    let mut n = 0;
    let mut skipped_large = 0;
    let entries = a
        .entries()
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    for e in entries {
        let mut e = e.map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        n += 1;
        if n > limits.max_entries {
            return Err(ArchiveError::TooBig(format!(
                "{} entries",
                limits.max_entries
            )));
        }
        let path = e
            .path()
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?
            .to_string_lossy()
            .replace('\\', "/");
        check_path(&path)?;
        let kind = e.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(ArchiveError::Unsafe(path, "link"));
        }
        if !kind.is_file() {
            continue;
        }
        // sdists have one top-level directory, `name-version/`.
        let inner = path
            .split_once('/')
            .map(|(_, r)| r.to_string())
            .unwrap_or(path);
        if !want(&inner) {
            continue;
        }
        if e.size() > limits.max_file_bytes {
            skipped_large += 1;
            continue;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data)
            .map_err(|err| ArchiveError::Corrupt(err.to_string()))?;
        out.push(Entry { path: inner, data });
    }
    Ok((out, skipped_large))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(names: &[(&str, &[u8])]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            for (n, d) in names {
                w.start_file(*n, zip::write::SimpleFileOptions::default())
                    .unwrap();
                w.write_all(d).unwrap();
            }
            w.finish().unwrap();
        }
        buf.into_inner()
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        let all = |_: &str| true;
        assert!(matches!(
            read_zip(&zip_with(&[("../evil.py", b"x")]), Limits::default(), &all),
            Err(ArchiveError::Unsafe(..))
        ));
        assert!(matches!(
            read_zip(&zip_with(&[("/etc/passwd", b"x")]), Limits::default(), &all),
            Err(ArchiveError::Unsafe(..))
        ));
        let (ok, _) = read_zip(&zip_with(&[("pkg/a.py", b"x")]), Limits::default(), &all).unwrap();
        assert_eq!(ok[0].path, "pkg/a.py");
    }

    #[test]
    fn a_compression_bomb_is_bounded() {
        // 64 MiB of zeros compresses to a few KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        {
            let mut t = tar::Builder::new(&mut gz);
            let data = vec![0u8; 64 * 1024 * 1024];
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, "pkg-1.0/big.py", &data[..]).unwrap();
            t.finish().unwrap();
        }
        let bytes = gz.finish().unwrap();
        assert!(bytes.len() < 1024 * 1024);
        let limits = Limits {
            max_total_bytes: 8 * 1024 * 1024,
            ..Default::default()
        };
        let r = read_tar_gz(&bytes, limits, &|_| true);
        assert!(r.is_err(), "the bomb stops at the byte limit");
    }
}
