//! The dataset builder: (instruction, response) pairs into ChatML train/valid/test splits.
//!
//! 1. exact duplicates (normalised instruction and response) are dropped;
//! 2. near-duplicates are dropped: MinHash with banded LSH over instruction shingles finds
//!    candidates, and a pair is a near-duplicate when both its instruction and its response
//!    reach the Jaccard threshold;
//! 3. rows are grouped by source DAG, and DAGs with identical code join one group, so no
//!    DAG's variants cross splits; groups go to splits by a seeded hash;
//! 4. a leak check fails the stage if any source, instruction or response is in two splits.

use dagfleet_protocol::spec::DatasetSpec;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::filters::{jaccard, shingles};

/// One synthesized training pair, as the synthesize stage writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Unique id: `<source_id>-<kind>-<n>`.
    pub id: String,
    /// SHA-256 of the source DAG.
    pub source_id: String,
    /// `instruction`, `troubleshoot`, or a task template's name.
    pub kind: String,
    /// Variant number within the kind, from 1.
    pub variant: u32,
    /// The variant's angle, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect: Option<String>,
    /// The user turn.
    pub instruction: String,
    /// The assistant turn.
    pub response: String,
    /// `code` (a DAG file, fenced in the assistant turn) or `text`.
    pub response_format: String,
    /// Airflow version the DAG was written for.
    pub airflow_version: String,
    /// `provider/model` of the teacher, or `dagfleet/failure-injection`.
    pub instruction_source: String,
    /// Where the DAG came from.
    pub origin: String,
}

/// What the builder did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Pairs read.
    pub input_rows: usize,
    /// Rows dropped as exact duplicates.
    pub exact_duplicates: usize,
    /// Rows dropped as near-duplicates.
    pub near_duplicates: usize,
    /// Rows per split: train, valid, test.
    pub rows: [usize; 3],
    /// Source DAGs per split.
    pub sources: [usize; 3],
    /// Rows per kind.
    pub kinds: BTreeMap<String, usize>,
    /// Decontamination against held-out rows.
    #[serde(default)]
    pub held_out: HeldOutStats,
}

/// What decontamination removed (the pairs are listed in `held_out_removed.jsonl`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutStats {
    /// Held-out rows compared against.
    pub rows: usize,
    /// Held-out lines that were neither prompts nor DAGs.
    pub unreadable_rows: usize,
    /// Pairs removed.
    pub removed_pairs: usize,
    /// Source DAGs whose pairs were removed.
    pub removed_sources: usize,
    /// The similarity threshold used.
    pub threshold: f64,
}

/// The built splits.
#[derive(Clone, Debug, Default)]
pub struct Built {
    /// Train, valid and test pairs.
    pub splits: [Vec<Pair>; 3],
    /// Counts.
    pub stats: DatasetStats,
}

/// Split names, in order.
pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

fn norm(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn h(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

const PERMS: usize = 64;
const BANDS: usize = 16;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn minhash(sh: &HashSet<u64>) -> [u64; PERMS] {
    let mut sig = [u64::MAX; PERMS];
    for &x in sh {
        for (i, s) in sig.iter_mut().enumerate() {
            let v = mix(x ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            if v < *s {
                *s = v;
            }
        }
    }
    sig
}

/// Builds the splits.
pub fn build(pairs: Vec<Pair>, spec: &DatasetSpec) -> Result<Built, String> {
    let mut stats = DatasetStats {
        input_rows: pairs.len(),
        ..Default::default()
    };
    // 1. exact duplicates
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    for p in pairs {
        if seen.insert(h(&format!(
            "{}\u{0}{}",
            norm(&p.instruction),
            norm(&p.response)
        ))) {
            rows.push(p);
        } else {
            stats.exact_duplicates += 1;
        }
    }
    // 2. near-duplicates
    let ish: Vec<HashSet<u64>> = rows.iter().map(|p| shingles(&p.instruction)).collect();
    let rsh: Vec<HashSet<u64>> = rows.iter().map(|p| shingles(&p.response)).collect();
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    let mut drop = vec![false; rows.len()];
    let per = PERMS / BANDS;
    for i in 0..rows.len() {
        let sig = minhash(&ish[i]);
        let mut cands = HashSet::new();
        for b in 0..BANDS {
            let mut acc = b as u64;
            for v in &sig[b * per..(b + 1) * per] {
                acc = mix(acc ^ v);
            }
            let e = buckets.entry((b, acc)).or_default();
            cands.extend(e.iter().copied());
            e.push(i);
        }
        if cands.into_iter().any(|j| {
            !drop[j]
                && jaccard(&ish[i], &ish[j]) >= spec.near_duplicate
                && jaccard(&rsh[i], &rsh[j]) >= spec.near_duplicate
        }) {
            drop[i] = true;
            stats.near_duplicates += 1;
        }
    }
    let rows: Vec<Pair> = rows
        .into_iter()
        .zip(drop)
        .filter(|(_, d)| !d)
        .map(|(p, _)| p)
        .collect();
    // 3. groups: union of rows sharing a source or a response
    let mut parent: Vec<usize> = (0..rows.len()).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    let mut first: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, p) in rows.iter().enumerate() {
        for key in [
            h(&format!("s:{}", p.source_id)),
            h(&format!("r:{}", norm(&p.response))),
        ] {
            match first.get(&key) {
                Some(&j) => {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                    if a != b {
                        parent[a] = b;
                    }
                }
                None => {
                    first.insert(key, i);
                }
            }
        }
    }
    // A group's key is its smallest source id, so the assignment does not depend on order.
    let mut group_key: HashMap<usize, String> = HashMap::new();
    for (i, p) in rows.iter().enumerate() {
        let g = find(&mut parent, i);
        let k = group_key.entry(g).or_insert_with(|| p.source_id.clone());
        if p.source_id < *k {
            *k = p.source_id.clone();
        }
    }
    let mut out: [Vec<Pair>; 3] = Default::default();
    for (i, p) in rows.into_iter().enumerate() {
        let g = find(&mut parent, i);
        let d = h(&format!("{}:{}", spec.seed, group_key[&g]));
        let x = u64::from_be_bytes(d[..8].try_into().unwrap_or_default()) as f64 / u64::MAX as f64;
        let split = if x < spec.splits[0] {
            0
        } else if x < spec.splits[0] + spec.splits[1] {
            1
        } else {
            2
        };
        *stats.kinds.entry(p.kind.clone()).or_default() += 1;
        out[split].push(p);
    }
    for (s, rows) in out.iter_mut().enumerate() {
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        stats.rows[s] = rows.len();
        stats.sources[s] = rows
            .iter()
            .map(|p| &p.source_id)
            .collect::<HashSet<_>>()
            .len();
    }
    leak_check(&out)?;
    Ok(Built { splits: out, stats })
}

/// Fails when a source DAG, an instruction or a response appears in two splits.
pub fn leak_check(splits: &[Vec<Pair>; 3]) -> Result<(), String> {
    let mut owner: HashMap<(u8, [u8; 32]), (usize, &str)> = HashMap::new();
    for (s, rows) in splits.iter().enumerate() {
        for p in rows {
            for (tag, key) in [
                (0u8, h(&p.source_id)),
                (1, h(&norm(&p.instruction))),
                (2, h(&norm(&p.response))),
            ] {
                match owner.get(&(tag, key)) {
                    Some(&(other, id)) if other != s => {
                        let what = ["source DAG", "instruction", "response"][tag as usize];
                        return Err(format!(
                            "leak between splits: the {what} of row `{}` ({}) is also in row `{id}` ({})",
                            p.id, SPLITS[s], SPLITS[other]
                        ));
                    }
                    Some(_) => {}
                    None => {
                        owner.insert((tag, key), (s, &p.id));
                    }
                }
            }
        }
    }
    Ok(())
}

/// One ChatML row. With `version_line`, an instruction that does not name its Airflow
/// version gets `Airflow Version: X` appended, as evaluation prompts carry it, when the
/// pair's DAG targets a known release (`2.10.5`, not just a major version).
pub fn chatml(p: &Pair, system: &str, version_line: bool) -> serde_json::Value {
    let answer = if p.response_format == "code" {
        format!("```python\n{}\n```", p.response.trim_end())
    } else {
        p.response.clone()
    };
    let mut user = p.instruction.clone();
    if version_line
        && p.airflow_version.contains('.')
        && !user.to_lowercase().contains("airflow version")
    {
        user = format!(
            "{}\n\nAirflow Version: {}",
            user.trim_end(),
            p.airflow_version
        );
    }
    json!({
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "meta": {
            "id": p.id,
            "source_id": p.source_id,
            "kind": p.kind,
            "variant": p.variant,
            "airflow_version": p.airflow_version,
            "instruction_source": p.instruction_source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(src: &str, n: u32, instr: &str, resp: &str) -> Pair {
        Pair {
            id: format!("{src}-instruction-{n}"),
            source_id: src.into(),
            kind: "instruction".into(),
            variant: n,
            aspect: None,
            instruction: instr.into(),
            response: resp.into(),
            response_format: "code".into(),
            airflow_version: "2.10".into(),
            instruction_source: "t/m".into(),
            origin: "x".into(),
        }
    }

    fn corpus() -> Vec<Pair> {
        let mut v = Vec::new();
        for d in 0..60 {
            for n in 1..=3 {
                v.push(pair(
                    &format!("dag{d:02}"),
                    n,
                    &format!(
                        "Request number {n} for pipeline {d}: angle {} with words {}",
                        n * 7,
                        d * 13
                    ),
                    &format!("code of dag {d}\nwith DAG('d{d}') as dag: pass"),
                ));
            }
        }
        v
    }

    #[test]
    fn variants_stay_together_and_splits_are_seeded() {
        let spec = DatasetSpec::default();
        let a = build(corpus(), &spec).unwrap();
        let b = build(corpus().into_iter().rev().collect(), &spec).unwrap();
        assert_eq!(a.stats.rows.iter().sum::<usize>(), 180);
        assert_eq!(a.stats, b.stats, "order does not matter");
        assert!(a.stats.rows[0] > a.stats.rows[1] && a.stats.rows[0] > a.stats.rows[2]);
        assert!(a.stats.rows[1] > 0 && a.stats.rows[2] > 0, "{:?}", a.stats);
        let other = build(
            corpus(),
            &DatasetSpec {
                seed: 7,
                ..spec.clone()
            },
        )
        .unwrap();
        assert_ne!(
            a.splits[1].iter().map(|p| &p.id).collect::<Vec<_>>(),
            other.splits[1].iter().map(|p| &p.id).collect::<Vec<_>>()
        );
    }

    #[test]
    fn duplicates_are_dropped_and_shared_code_is_grouped() {
        let mut c = corpus();
        c.push(pair(
            "dag00",
            9,
            "request NUMBER 1 for pipeline 0: angle 7 with words 0",
            "code of dag 0\nwith DAG('d0') as dag: pass",
        ));
        c.push(pair(
            "dag00",
            10,
            "Request number 1 for pipeline 0: angle 7 with words 0 please",
            "code of dag 0\nwith DAG('d0') as dag: pass",
        ));
        // Another source with the very same code as dag05 must land in dag05's split.
        c.push(pair(
            "copy05",
            1,
            "Something entirely different to build here",
            "code of dag 5\nwith DAG('d5') as dag: pass",
        ));
        let b = build(c, &DatasetSpec::default()).unwrap();
        assert_eq!(b.stats.exact_duplicates, 1);
        assert_eq!(b.stats.near_duplicates, 1);
        let split_of = |src: &str| {
            b.splits
                .iter()
                .position(|s| s.iter().any(|p| p.source_id == src))
        };
        assert_eq!(split_of("copy05"), split_of("dag05"));
    }

    #[test]
    fn the_leak_check_fires() {
        let mut s: [Vec<Pair>; 3] = Default::default();
        s[0].push(pair("a", 1, "one instruction here", "code a"));
        s[2].push(pair("b", 1, "another instruction", "code a"));
        let e = leak_check(&s).unwrap_err();
        assert!(e.contains("response") && e.contains("test"), "{e}");
        s[2][0].response = "code b".into();
        assert!(leak_check(&s).is_ok());
    }
}
