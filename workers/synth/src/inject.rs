//! Failure injection: turn a correct DAG into a broken one the judge can name, for the
//! troubleshooting set ("this DAG fails with … — fix it", answered by the correct DAG).
//!
//! Every mutation is checked with the same analysis the judge runs: a broken variant is kept
//! only when the judge reports the intended category and the original did not have it.

use dagfleet_analysis::{analyze, Category, Options, Report};

/// One broken variant of a DAG.
#[derive(Clone, Debug, PartialEq)]
pub struct Injected {
    /// The category the judge reports for it.
    pub category: Category,
    /// The broken code.
    pub broken: String,
    /// The judge's finding, `line N: message`.
    pub finding: String,
}

/// The kinds of mutation, in the order they are tried (rotated per DAG by `seed`).
pub const KINDS: [Category; 6] = [
    Category::CircularDependency,
    Category::MissingImport,
    Category::DeprecatedImport,
    Category::DuplicateTaskId,
    Category::UndefinedName,
    Category::SyntaxError,
];

/// Up to `max` broken variants of `src`, each of a different kind.
pub fn inject(src: &str, opts: &Options, max: usize, seed: u64) -> Vec<Injected> {
    if max == 0 {
        return Vec::new();
    }
    let base = analyze(src, opts);
    if !base.is_valid() || base.dags.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let n = KINDS.len();
    for i in 0..n {
        let kind = KINDS[(i + seed as usize % n) % n];
        if base.has(kind) {
            continue;
        }
        let Some(broken) = mutate(src, &base, kind) else {
            continue;
        };
        let rep = analyze(&broken, opts);
        let hit = rep.findings.iter().find(|f| {
            f.category == kind
                || (kind == Category::MissingImport && f.category == Category::UndefinedName)
        });
        if let Some(f) = hit {
            out.push(Injected {
                category: f.category,
                finding: format!("line {}: {}", f.line, f.message),
                broken,
            });
            if out.len() >= max {
                break;
            }
        }
    }
    out
}

/// The user turn of a troubleshooting row.
pub fn instruction(i: &Injected) -> String {
    let cat = serde_json::to_value(i.category)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!(
        "This Airflow DAG fails with {cat} ({}). Fix it and return the whole corrected DAG file.\n\n```python\n{}\n```",
        i.finding,
        i.broken.trim_end()
    )
}

fn mutate(src: &str, rep: &Report, kind: Category) -> Option<String> {
    match kind {
        Category::CircularDependency => cycle(src),
        Category::MissingImport => drop_import(src, rep),
        Category::DeprecatedImport => deprecate(src),
        Category::DuplicateTaskId => duplicate_task_id(src),
        Category::UndefinedName => undefined_callable(src),
        Category::SyntaxError => drop_colon(src),
        _ => None,
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_alphanumeric() || ch == '_')
}

fn lines(src: &str) -> Vec<&str> {
    src.split('\n').collect()
}

/// `a >> b >> c` gains a following `c >> a`.
fn cycle(src: &str) -> Option<String> {
    let ls = lines(src);
    for (i, l) in ls.iter().enumerate() {
        let t = l.trim();
        if !t.contains(">>") {
            continue;
        }
        let parts: Vec<&str> = t.split(">>").map(str::trim).collect();
        if parts.len() >= 2 && parts.iter().all(|p| is_ident(p)) {
            let indent = &l[..l.len() - l.trim_start().len()];
            let (first, last) = (parts[0], parts[parts.len() - 1]);
            let mut out: Vec<String> = ls.iter().map(|s| s.to_string()).collect();
            out.insert(i + 1, format!("{indent}{last} >> {first}"));
            return Some(out.join("\n"));
        }
    }
    None
}

/// Removes the import of a name the DAG uses to build tasks (or `DAG` itself).
fn drop_import(src: &str, rep: &Report) -> Option<String> {
    let used: Vec<&str> = rep.tasks.iter().map(|t| t.operator.as_str()).collect();
    let ls = lines(src);
    for imp in &rep.imports {
        let Some(name) = &imp.name else { continue };
        if !(used.contains(&imp.bound.as_str()) || imp.bound == "DAG") || imp.line == 0 {
            continue;
        }
        let idx = imp.line - 1;
        let line = *ls.get(idx)?;
        let t = line.trim();
        let Some(rest) = t.strip_prefix("from ") else {
            continue;
        };
        let Some((_, names)) = rest.split_once(" import ") else {
            continue;
        };
        if names.contains('(') || names.contains('\\') {
            continue;
        }
        let list: Vec<&str> = names.split(',').map(str::trim).collect();
        let keep: Vec<&str> = list
            .iter()
            .copied()
            .filter(|n| {
                let bound = n.rsplit(" as ").next().unwrap_or(n).trim();
                bound != imp.bound && *n != name.as_str()
            })
            .collect();
        let mut out: Vec<String> = ls.iter().map(|s| s.to_string()).collect();
        if keep.is_empty() {
            out.remove(idx);
        } else {
            let head = &line[..line.find(" import ")?];
            out[idx] = format!("{head} import {}", keep.join(", "));
        }
        return Some(out.join("\n"));
    }
    None
}

/// Moves a BashOperator or PythonOperator import to its deprecated Airflow 1 module, or an
/// EmptyOperator to DummyOperator.
fn deprecate(src: &str) -> Option<String> {
    let ls = lines(src);
    for (i, l) in ls.iter().enumerate() {
        let t = l.trim_start();
        if !t.starts_with("from ") || !t.contains(" import ") {
            continue;
        }
        let names = t.split_once(" import ")?.1.trim();
        let old = match names {
            "BashOperator" => "airflow.operators.bash_operator",
            "PythonOperator" => "airflow.operators.python_operator",
            "EmptyOperator" => {
                let mut s = src.replace("EmptyOperator", "DummyOperator");
                let ls2: Vec<String> = s.split('\n').map(str::to_string).collect();
                let mut out = ls2;
                out[i] = "from airflow.operators.dummy import DummyOperator".into();
                s = out.join("\n");
                return Some(s);
            }
            _ => continue,
        };
        let mut out: Vec<String> = ls.iter().map(|s| s.to_string()).collect();
        out[i] = format!("from {old} import {names}");
        return Some(out.join("\n"));
    }
    None
}

/// Gives the second literal task_id the value of the first.
fn duplicate_task_id(src: &str) -> Option<String> {
    let mut found: Vec<(usize, usize, String)> = Vec::new();
    let mut from = 0;
    while let Some(p) = src[from..].find("task_id") {
        let at = from + p;
        from = at + 7;
        let rest = &src[from..];
        let r = rest.trim_start();
        let Some(r2) = r.strip_prefix('=') else {
            continue;
        };
        let r3 = r2.trim_start();
        let q = match r3.chars().next() {
            Some(c @ ('"' | '\'')) => c,
            _ => continue,
        };
        let start = src.len() - r3.len() + 1;
        let Some(len) = src[start..].find(q) else {
            continue;
        };
        let val = &src[start..start + len];
        if val.contains('\n') || val.contains('{') {
            continue;
        }
        found.push((start, len, val.to_string()));
    }
    let first = found.first()?.clone();
    let second = found.iter().find(|f| f.2 != first.2)?;
    let mut out = String::with_capacity(src.len());
    out.push_str(&src[..second.0]);
    out.push_str(&first.2);
    out.push_str(&src[second.0 + second.1..]);
    Some(out)
}

/// Points `python_callable=` at a function that does not exist.
fn undefined_callable(src: &str) -> Option<String> {
    let at = src.find("python_callable")?;
    let rest = &src[at + "python_callable".len()..];
    let r = rest.trim_start().strip_prefix('=')?.trim_start();
    let name: String = r
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !is_ident(&name) {
        return None;
    }
    let start = src.len() - r.len();
    Some(format!(
        "{}{}_task{}",
        &src[..start],
        name,
        &src[start + name.len()..]
    ))
}

/// Drops the colon of the first one-line `def`.
fn drop_colon(src: &str) -> Option<String> {
    let ls = lines(src);
    for (i, l) in ls.iter().enumerate() {
        let t = l.trim();
        if t.starts_with("def ") && t.ends_with("):") {
            let mut out: Vec<String> = ls.iter().map(|s| s.to_string()).collect();
            out[i] = l.trim_end().trim_end_matches(':').to_string();
            return Some(out.join("\n"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAG: &str = r#"from datetime import datetime

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def transform():
    return 1


with DAG(dag_id="etl", start_date=datetime(2024, 1, 1), schedule="@daily") as dag:
    extract = BashOperator(task_id="extract", bash_command="echo extract")
    clean = PythonOperator(task_id="transform", python_callable=transform)
    load = BashOperator(task_id="load", bash_command="echo load")
    extract >> clean >> load
"#;

    #[test]
    fn every_kind_is_named_by_the_judge() {
        let opts = Options::default();
        assert!(analyze(DAG, &opts).is_valid());
        let got = inject(DAG, &opts, 10, 0);
        let cats: Vec<Category> = got.iter().map(|i| i.category).collect();
        for k in [
            Category::CircularDependency,
            Category::DeprecatedImport,
            Category::DuplicateTaskId,
            Category::UndefinedName,
            Category::SyntaxError,
        ] {
            assert!(cats.contains(&k), "{k:?} missing from {cats:?}");
        }
        assert!(
            cats.contains(&Category::MissingImport)
                || cats
                    .iter()
                    .filter(|c| **c == Category::UndefinedName)
                    .count()
                    == 2,
            "{cats:?}"
        );
        for i in &got {
            assert_ne!(i.broken, DAG);
            assert!(instruction(i).contains(&i.finding));
        }
    }

    #[test]
    fn seed_rotates_the_first_kind_and_max_is_kept() {
        let opts = Options::default();
        let a = inject(DAG, &opts, 1, 0);
        let b = inject(DAG, &opts, 1, 1);
        assert_eq!(a.len(), 1);
        assert_ne!(a[0].category, b[0].category);
    }

    #[test]
    fn broken_input_gives_nothing() {
        assert!(inject("def x(:\n", &Options::default(), 3, 0).is_empty());
    }
}
