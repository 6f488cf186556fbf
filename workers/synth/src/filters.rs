//! Quality filters for teacher-written instructions, and the text similarity measures the
//! filters and the dataset builder share.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// Why an instruction was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    /// Shorter than `min_chars`.
    TooShort,
    /// Longer than `max_chars`.
    TooLong,
    /// Nearly the same as an earlier instruction for the same DAG.
    NearDuplicate,
    /// It contains code, so the model would learn to copy rather than to write.
    LeaksCode,
    /// It talks about test harness code (`tests_common`, `get_test_run`, pytest, ...).
    TestHarness,
}

impl Reject {
    /// Name used in counts and in `rejected.jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooShort => "too_short",
            Reject::TooLong => "too_long",
            Reject::NearDuplicate => "near_duplicate",
            Reject::LeaksCode => "leaks_code",
            Reject::TestHarness => "test_harness",
        }
    }
}

/// Lower-cased words of `text`.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Hashes of the word 3-shingles of `text` (single words for shorter texts).
pub fn shingles(text: &str) -> HashSet<u64> {
    let w = words(text);
    let n = if w.len() >= 3 { 3 } else { 1 };
    w.windows(n.min(w.len().max(1)))
        .map(|win| {
            let mut h = DefaultHasher::new();
            win.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// Jaccard similarity of two shingle sets.
pub fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let inter = a.intersection(b).count();
    inter as f64 / (a.len() + b.len() - inter) as f64
}

/// Whether an instruction contains code.
pub fn leaks_code(text: &str) -> bool {
    if text.contains("```") {
        return true;
    }
    let code_lines = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("from airflow")
                || l.starts_with("import ")
                || l.starts_with("def ")
                || l.starts_with("with DAG(")
                || l.starts_with("@dag")
                || l.starts_with("@task")
                || (l.contains(" = ") && l.contains("Operator("))
                || (l.contains(">>") && l.split(">>").all(|p| is_identifier(p.trim())))
        })
        .count();
    code_lines > 0
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_alphanumeric() || ch == '_')
}

/// Whether an instruction mentions test harness code.
pub fn mentions_test_harness(text: &str) -> bool {
    let l = text.to_lowercase();
    [
        "tests_common",
        "get_test_run",
        "test harness",
        "pytest",
        "watcher()",
        "system test",
        "unit test",
        "test_run",
    ]
    .iter()
    .any(|k| l.contains(k))
}

/// Applies the filters to the instructions written for one DAG, in order; returns the kept
/// ones and the dropped ones with their reason.
pub fn filter(
    items: Vec<String>,
    min_chars: usize,
    max_chars: usize,
    near_duplicate: f64,
) -> (Vec<String>, Vec<(String, Reject)>) {
    let mut kept: Vec<(String, HashSet<u64>)> = Vec::new();
    let mut dropped = Vec::new();
    for s in items {
        let n = s.chars().count();
        let reason = if n < min_chars {
            Some(Reject::TooShort)
        } else if n > max_chars {
            Some(Reject::TooLong)
        } else if leaks_code(&s) {
            Some(Reject::LeaksCode)
        } else if mentions_test_harness(&s) {
            Some(Reject::TestHarness)
        } else {
            let sh = shingles(&s);
            if kept.iter().any(|(_, k)| jaccard(k, &sh) >= near_duplicate) {
                Some(Reject::NearDuplicate)
            } else {
                kept.push((s.clone(), sh));
                None
            }
        };
        if let Some(r) = reason {
            dropped.push((s, r));
        }
    }
    (kept.into_iter().map(|(s, _)| s).collect(), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_filter_names_its_reason() {
        let items = vec![
            "Build a DAG that loads daily sales from S3 into Redshift and emails a report.".into(),
            "Build a DAG that loads daily sales from S3 into Redshift and emails a report!".into(),
            "short".into(),
            "Write this:\n```python\nfrom airflow import DAG\n```".into(),
            "Create a DAG with\nfrom airflow.operators.bash import BashOperator\nin it".into(),
            "Create a DAG like the system test that calls get_test_run at the end.".into(),
            "x".repeat(300),
            "Orchestrate three extract tasks that fan in to one transform step, hourly.".into(),
        ];
        let (kept, dropped) = filter(items, 20, 200, 0.8);
        assert_eq!(kept.len(), 2, "{kept:?}");
        let reasons: Vec<Reject> = dropped.iter().map(|d| d.1).collect();
        assert_eq!(
            reasons,
            vec![
                Reject::NearDuplicate,
                Reject::TooShort,
                Reject::LeaksCode,
                Reject::LeaksCode,
                Reject::TestHarness,
                Reject::TooLong
            ]
        );
    }

    #[test]
    fn prose_with_arrows_is_not_code() {
        assert!(!leaks_code(
            "Run extract, then transform >> load order matters."
        ));
        assert!(leaks_code("extract >> transform >> load"));
    }
}
