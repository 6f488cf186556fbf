//! The dataset stage: every synthesize output's pairs, decontaminated against the held-out
//! evaluation prompts and test DAGs, built into ChatML splits by [`crate::dataset`].

use bytes::Bytes;
use dagfleet_protocol::jobs::DatasetBuild;
use dagfleet_runtime::{JobContext, JobError, JobOutput};

use crate::dataset::{self, Pair};
use crate::SynthHandler;

impl SynthHandler {
    pub(crate) async fn dataset(
        &self,
        job: &DatasetBuild,
        ctx: &JobContext,
    ) -> Result<JobOutput, JobError> {
        let mut pairs = Vec::new();
        let mut unreadable = 0u64;
        for input in &job.inputs {
            let data = ctx.read(input).await?;
            for line in String::from_utf8_lossy(&data).lines() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Pair>(line) {
                    Ok(p) => pairs.push(p),
                    Err(_) => unreadable += 1,
                }
            }
        }
        if pairs.is_empty() {
            return Err(JobError::fatal(format!(
                "the dataset stage got no pairs from {} synthesize output(s); nothing to build",
                job.inputs.len()
            )));
        }
        // Decontamination first: nothing near a held-out row reaches any split.
        let mut held = Vec::new();
        let mut held_unreadable = 0;
        for h in &job.held_out {
            let data = ctx.read(h).await?;
            let name = h.key.rsplit('/').next().unwrap_or(&h.key);
            let (rows, bad) = crate::decontam::parse(&String::from_utf8_lossy(&data), name);
            held.extend(rows);
            held_unreadable += bad;
        }
        let input_rows = pairs.len();
        let (pairs, removed) =
            crate::decontam::decontaminate(pairs, &held, job.spec.leak_threshold);
        if pairs.is_empty() {
            return Err(JobError::fatal(format!(
                "all {input_rows} pairs come near the {} held-out rows (dataset.leak_threshold = {}); nothing is left to build a dataset from",
                held.len(),
                job.spec.leak_threshold
            )));
        }
        ctx.put(
            "held_out_removed.jsonl",
            Bytes::from(
                removed
                    .iter()
                    .map(|r| serde_json::to_string(r).unwrap_or_default() + "\n")
                    .collect::<String>(),
            ),
        )
        .await?;
        let mut built = dataset::build(pairs, &job.spec).map_err(JobError::fatal)?;
        built.stats.input_rows = input_rows;
        built.stats.held_out = dataset::HeldOutStats {
            rows: held.len(),
            unreadable_rows: held_unreadable,
            removed_pairs: removed.len(),
            removed_sources: removed
                .iter()
                .map(|r| r.source_id.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len(),
            threshold: job.spec.leak_threshold,
        };
        for (s, rows) in built.splits.iter().enumerate() {
            let mut out = Vec::new();
            for p in rows {
                out.extend_from_slice(
                    dataset::chatml(p, &job.spec.system_prompt, job.spec.version_line)
                        .to_string()
                        .as_bytes(),
                );
                out.push(b'\n');
            }
            ctx.put(&format!("{}.jsonl", dataset::SPLITS[s]), Bytes::from(out))
                .await?;
        }
        ctx.put(
            "stats.json",
            Bytes::from(serde_json::to_vec_pretty(&built.stats).unwrap_or_default()),
        )
        .await?;
        let st = &built.stats;
        Ok(JobOutput::default()
            .metric("rows", st.rows.iter().sum::<usize>() as f64)
            .metric("train_rows", st.rows[0] as f64)
            .metric("valid_rows", st.rows[1] as f64)
            .metric("test_rows", st.rows[2] as f64)
            .metric("exact_duplicates", st.exact_duplicates as f64)
            .metric("near_duplicates", st.near_duplicates as f64)
            .metric("held_out_removed", st.held_out.removed_pairs as f64)
            .metric("unreadable_rows", unreadable as f64))
    }
}
