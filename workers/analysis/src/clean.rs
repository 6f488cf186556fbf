//! Cleaning mined files: the licence header goes, functional comments stay.

/// Removes a leading comment block that is a licence header (it mentions a licence), and
/// the blank lines after it. A shebang or encoding line before it is kept.
pub fn strip_license_header(src: &str) -> String {
    let mut lines: Vec<&str> = src.lines().collect();
    let mut start = 0;
    while start < lines.len()
        && (lines[start].starts_with("#!")
            || lines[start].contains("coding:") && lines[start].starts_with('#'))
    {
        start += 1;
    }
    let mut end = start;
    while end < lines.len() && lines[end].trim_start().starts_with('#') {
        end += 1;
    }
    let block = lines[start..end].join("\n").to_lowercase();
    if end == start || !(block.contains("licen") || block.contains("spdx")) {
        return src.to_string();
    }
    while end < lines.len() && lines[end].trim().is_empty() {
        end += 1;
    }
    lines.drain(start..end);
    let mut out = lines.join("\n");
    if src.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asf_header_goes_and_code_comments_stay() {
        let src = "#\n# Licensed to the Apache Software Foundation (ASF) under one\n# or more contributor license agreements.\n#\n\n\"\"\"Example DAG.\"\"\"\n# a functional comment\nx = 1\n";
        assert_eq!(
            strip_license_header(src),
            "\"\"\"Example DAG.\"\"\"\n# a functional comment\nx = 1\n"
        );
        let plain = "# build the DAG\nx = 1\n";
        assert_eq!(strip_license_header(plain), plain);
    }
}
