//! Decontamination: no training row may come from what the model is evaluated on.
//!
//! Held-out rows are evaluation prompts (ChatML `messages`, as the infer stage reads them)
//! and the DAG files those prompts were written from (`content`, as mined records carry
//! it). A pair is contaminated when its response code or its instruction is a near-duplicate
//! of a held-out DAG or instruction: word 3-shingle Jaccard at or above the threshold,
//! screened by 64-permutation MinHash estimates and confirmed exactly. Every pair of a
//! contaminated source DAG goes, so no variant of it is left behind, and each removal is
//! reported with the held-out row it matched.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

use crate::dataset::Pair;
use crate::filters::{jaccard, shingles};

/// One held-out row: its id and the texts training must stay away from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldOut {
    /// `<file>:<row id or line number>`.
    pub id: String,
    /// A DAG (the row's `content`, or the code of its assistant turn).
    pub code: Option<String>,
    /// An instruction (the row's user turn).
    pub instruction: Option<String>,
}

/// The code of a (possibly fenced) answer.
fn code_of(text: &str) -> String {
    match text.split_once("```") {
        Some((_, rest)) => {
            let rest = rest.split_once('\n').map_or(rest, |(_, r)| r);
            rest.split("```").next().unwrap_or(rest).to_string()
        }
        None => text.to_string(),
    }
}

/// Reads held-out rows from JSONL: `content` (a DAG), `messages` (user and assistant
/// turns), or `instruction`/`response` fields. Lines that are none of these are counted.
pub fn parse(text: &str, name: &str) -> (Vec<HeldOut>, usize) {
    let mut out = Vec::new();
    let mut unreadable = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            unreadable += 1;
            continue;
        };
        let id = v
            .get("id")
            .map(|x| x.as_str().map_or_else(|| x.to_string(), String::from))
            .unwrap_or_else(|| (i + 1).to_string());
        let mut h = HeldOut {
            id: format!("{name}:{id}"),
            ..Default::default()
        };
        if let Some(c) = v.get("content").and_then(|c| c.as_str()) {
            h.code = Some(c.to_string());
        }
        if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            for m in msgs {
                let text = m["content"].as_str().unwrap_or_default();
                match m["role"].as_str() {
                    Some("user") => h.instruction = Some(text.to_string()),
                    Some("assistant") => h.code = Some(code_of(text)),
                    _ => {}
                }
            }
        }
        if let Some(t) = v.get("instruction").and_then(|c| c.as_str()) {
            h.instruction = Some(t.to_string());
        }
        if let Some(t) = v.get("response").and_then(|c| c.as_str()) {
            h.code = Some(code_of(t));
        }
        if h.code.is_none() && h.instruction.is_none() {
            unreadable += 1;
            continue;
        }
        out.push(h);
    }
    (out, unreadable)
}

/// One pair removed, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    /// The pair.
    pub pair: String,
    /// Its source DAG.
    pub source_id: String,
    /// The held-out row it matched (or `source of <pair>` when a sibling matched).
    pub held_out: String,
    /// `response` or `instruction`.
    pub field: String,
    /// Word 3-shingle Jaccard similarity.
    pub similarity: f64,
}

const PERMS: usize = 64;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Sig {
    set: HashSet<u64>,
    min: [u64; PERMS],
}

fn sig(text: &str) -> Sig {
    let set = shingles(text);
    let mut min = [u64::MAX; PERMS];
    for &x in &set {
        for (i, s) in min.iter_mut().enumerate() {
            let v = mix(x ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            if v < *s {
                *s = v;
            }
        }
    }
    Sig { set, min }
}

/// The best match of `s` among `pool` at or above `threshold`.
fn best(s: &Sig, pool: &[(usize, Sig)], threshold: f64) -> Option<(usize, f64)> {
    if s.set.is_empty() {
        return None;
    }
    // The MinHash estimate screens; the exact Jaccard decides. The screen's margin keeps
    // its misses (estimates below the truth) negligible at 64 permutations.
    let screen = (threshold - 0.25).max(0.0);
    let mut top: Option<(usize, f64)> = None;
    for (i, h) in pool {
        let same = s.min.iter().zip(&h.min).filter(|(a, b)| a == b).count();
        if (same as f64 / PERMS as f64) < screen {
            continue;
        }
        let j = jaccard(&s.set, &h.set);
        if j >= threshold && top.is_none_or(|(_, t)| j > t) {
            top = Some((*i, j));
        }
    }
    top
}

/// Removes every pair whose response or instruction is a near-duplicate of a held-out row,
/// with every other pair of the same source DAG. Returns the kept pairs and the removals.
pub fn decontaminate(
    pairs: Vec<Pair>,
    held: &[HeldOut],
    threshold: f64,
) -> (Vec<Pair>, Vec<Removal>) {
    if held.is_empty() {
        return (pairs, Vec::new());
    }
    let codes: Vec<(usize, Sig)> = held
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.code.as_deref().map(|c| (i, sig(c))))
        .collect();
    let instrs: Vec<(usize, Sig)> = held
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.instruction.as_deref().map(|c| (i, sig(c))))
        .collect();
    // Source DAGs are compared once each; instructions once per pair.
    let mut by_source: HashMap<&str, Option<(usize, f64)>> = HashMap::new();
    let mut hits: Vec<Removal> = Vec::new();
    for p in &pairs {
        let code_hit = *by_source.entry(p.source_id.as_str()).or_insert_with(|| {
            (p.response_format == "code")
                .then(|| best(&sig(&code_of(&p.response)), &codes, threshold))
                .flatten()
        });
        if let Some((i, j)) = code_hit {
            hits.push(Removal {
                pair: p.id.clone(),
                source_id: p.source_id.clone(),
                held_out: held[i].id.clone(),
                field: "response".into(),
                similarity: (j * 1000.0).round() / 1000.0,
            });
            continue;
        }
        if let Some((i, j)) = best(&sig(&p.instruction), &instrs, threshold) {
            hits.push(Removal {
                pair: p.id.clone(),
                source_id: p.source_id.clone(),
                held_out: held[i].id.clone(),
                field: "instruction".into(),
                similarity: (j * 1000.0).round() / 1000.0,
            });
        }
    }
    let bad: HashMap<String, String> = hits
        .iter()
        .map(|r| (r.source_id.clone(), r.pair.clone()))
        .collect();
    let matched: HashSet<String> = hits.iter().map(|r| r.pair.clone()).collect();
    let mut kept = Vec::new();
    for p in pairs {
        match bad.get(&p.source_id) {
            None => kept.push(p),
            Some(first) if !matched.contains(&p.id) => hits.push(Removal {
                pair: p.id.clone(),
                source_id: p.source_id.clone(),
                held_out: format!("source of {first}"),
                field: "source".into(),
                similarity: 1.0,
            }),
            Some(_) => {}
        }
    }
    (kept, hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAG: &str = "from airflow import DAG\nfrom airflow.operators.bash import BashOperator\nimport pendulum\nwith DAG(dag_id='example_bash_operator', schedule='0 0 * * *', start_date=pendulum.datetime(2021, 1, 1, tz='UTC'), catchup=False) as dag:\n    run_this = BashOperator(task_id='run_after_loop', bash_command='echo 1')\n    also = BashOperator(task_id='also_run_this', bash_command='echo \"ti_key={{ task_instance_key_str }}\"')\n    run_this >> also\n";

    fn pair(id: &str, src: &str, instr: &str, resp: &str) -> Pair {
        Pair {
            id: id.into(),
            source_id: src.into(),
            kind: "instruction".into(),
            variant: 1,
            aspect: None,
            instruction: instr.into(),
            response: resp.into(),
            response_format: "code".into(),
            airflow_version: "2.10.5".into(),
            instruction_source: "t".into(),
            origin: "o".into(),
        }
    }

    #[test]
    fn near_copies_of_held_out_dags_and_prompts_go_with_their_siblings() {
        let held_text = format!(
            "{}\n{}\nnot json\n",
            serde_json::json!({"content": DAG}),
            serde_json::json!({"id": "p7", "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "Build a pipeline that loads twelve product rows into Snowflake and then checks the row count matches. Airflow Version: 3.0.1"}
            ]})
        );
        let (held, bad) = parse(&held_text, "eval.jsonl");
        assert_eq!((held.len(), bad), (2, 1));
        assert_eq!(held[1].id, "eval.jsonl:p7");
        // The same DAG at another version: renamed id, one task changed.
        let variant = DAG
            .replace("example_bash_operator", "example_bash")
            .replace("echo 1", "echo 2");
        let other = "from airflow.decorators import dag, task\n@dag(schedule=None)\ndef etl():\n    @task\n    def extract():\n        return {'a': 1}\n    @task\n    def load(x):\n        print(x)\n    load(extract())\netl()\n";
        let pairs = vec![
            pair("a-1", "a", "Run two bash commands daily.", &format!("```python\n{variant}```")),
            pair("a-2", "a", "Something else entirely about shells.", &format!("```python\n{variant}```")),
            pair("b-1", "b", "Write an ETL with the TaskFlow API.", &format!("```python\n{other}```")),
            pair("c-1", "c", "Build a pipeline that loads twelve product rows into Snowflake and then checks that the row count matches. Airflow Version: 2.10", &format!("```python\n{other}x = 1\n```")),
        ];
        let (kept, removed) = decontaminate(pairs, &held, 0.5);
        let kept: Vec<&str> = kept.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(kept, ["b-1"]);
        let by: HashMap<&str, &Removal> = removed.iter().map(|r| (r.pair.as_str(), r)).collect();
        assert_eq!(by["a-1"].field, "response");
        assert_eq!(by["a-1"].held_out, "eval.jsonl:1");
        assert!(by["a-1"].similarity >= 0.5 && by["a-1"].similarity < 1.0);
        assert_eq!(
            by["a-2"].field, "response",
            "siblings share the source's code"
        );
        assert_eq!(by["c-1"].field, "instruction");
        assert_eq!(by["c-1"].held_out, "eval.jsonl:p7");
        // Nothing held out: nothing removed.
        let (k, r) = decontaminate(vec![pair("x", "x", "i", DAG)], &[], 0.5);
        assert_eq!((k.len(), r.len()), (1, 0));
    }
}
