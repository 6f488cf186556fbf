//! Source bytes to text, as CPython reads a module: UTF-8 unless a PEP 263 coding line on
//! the first or second line says otherwise, with a UTF-8 byte-order mark allowed.
//!
//! Bytes that are not valid in the declared encoding become [`UNDECODABLE`]; the token
//! pass reports it where CPython does (outside comments: CPython 3.11 does not decode
//! comments' bytes).

use std::borrow::Cow;

use crate::report::{Category, Finding, Severity};

/// Stands for a byte that does not decode. A noncharacter, so real source never holds it.
pub const UNDECODABLE: char = '\u{10FFFE}';

/// Largest source the analysis reads.
pub const MAX_SOURCE_BYTES: usize = 4 << 20;

/// The coding a PEP 263 line declares, if one of the first two lines has one.
fn declared(bytes: &[u8]) -> Option<String> {
    for line in bytes.split(|b| *b == b'\n').take(2) {
        let line = String::from_utf8_lossy(line);
        let t = line.trim_start_matches([' ', '\t', '\x0c']);
        if !t.starts_with('#') {
            // Only a comment line may declare, and the second only after a comment or blank
            // first line; a code line ends the search.
            if t.trim().is_empty() {
                continue;
            }
            return None;
        }
        if let Some(i) = t.find("coding") {
            let rest = &t[i + 6..];
            if let Some(rest) = rest.strip_prefix([':', '=']) {
                let name: String = rest
                    .trim_start_matches([' ', '\t'])
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    .collect();
                if !name.is_empty() {
                    return Some(name.to_ascii_lowercase().replace('_', "-"));
                }
            }
        }
    }
    None
}

/// Decodes a module's bytes. An unknown coding is refused as CPython refuses it; bytes that
/// do not decode are kept as [`UNDECODABLE`].
pub fn decode_source(bytes: &[u8]) -> Result<Cow<'_, str>, Finding> {
    let refuse = |message: String| Finding {
        category: Category::SyntaxError,
        severity: Severity::Error,
        line: 1,
        column: 1,
        message,
    };
    if bytes.len() > MAX_SOURCE_BYTES {
        return Err(refuse(format!(
            "source is {} bytes; the analysis reads at most {MAX_SOURCE_BYTES}",
            bytes.len()
        )));
    }
    if bytes.contains(&0) {
        return Err(refuse("source code cannot contain null bytes".into()));
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    match declared(bytes).as_deref() {
        None | Some("utf-8" | "utf8" | "utf-8-sig") => match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Cow::Borrowed(s)),
            Err(_) => Ok(Cow::Owned(lossy_utf8(bytes))),
        },
        Some(
            "latin-1" | "latin1" | "iso-8859-1" | "iso8859-1" | "l1" | "iso-latin-1" | "cp819",
        ) => Ok(Cow::Owned(bytes.iter().map(|&b| b as char).collect())),
        Some("ascii" | "us-ascii") => Ok(Cow::Owned(
            bytes
                .iter()
                .map(|&b| if b.is_ascii() { b as char } else { UNDECODABLE })
                .collect(),
        )),
        // A real codec this reader does not implement: read what is ASCII, keep the rest.
        Some(name) if KNOWN_CODECS.contains(&name) => Ok(Cow::Owned(lossy_utf8(bytes))),
        Some(name) => Err(refuse(format!("unknown encoding: {name}"))),
    }
}

/// Codec names CPython knows that the reader decodes only approximately.
const KNOWN_CODECS: &[&str] = &[
    "cp1252",
    "windows-1252",
    "iso-8859-15",
    "latin-9",
    "cp1251",
    "koi8-r",
    "euc-jp",
    "shift-jis",
    "gbk",
    "gb2312",
    "big5",
    "utf-16",
    "cp437",
    "mac-roman",
];

fn lossy_utf8(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, rest) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                out.push(UNDECODABLE);
                let skip = e.error_len().unwrap_or(rest.len()).max(1);
                bytes = &rest[skip.min(rest.len())..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coding_lines_and_bad_bytes() {
        assert_eq!(decode_source(b"x = 1\n").unwrap(), "x = 1\n");
        assert_eq!(
            decode_source(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n").unwrap(),
            "# -*- coding: latin-1 -*-\nx = '\u{e9}'\n"
        );
        assert!(decode_source(b"x = '\xe9'\n")
            .unwrap()
            .contains(UNDECODABLE));
        assert!(decode_source(b"# coding: klingon\n").is_err());
        assert!(decode_source(b"x = 1\0").is_err());
        assert_eq!(decode_source(b"\xef\xbb\xbfx = 1").unwrap(), "x = 1");
    }
}
