//! The run report (the `report` stage, run by the judge role): what the dataset held, how
//! training went (with its loss curve), how each model's generations were judged, and
//! whether the fine-tune beat its base.
//!
//! Writes `report.md`, `report.json` and, when the run trained, a copy of `loss.png` beside
//! them so the Markdown shows the curve.

use bytes::Bytes;
use dagfleet_protocol::jobs::ReportJob;
use dagfleet_runtime::{JobContext, JobError, JobOutput};
use serde_json::{json, Value};

use crate::Summary;

/// The tag the infer stage puts on a fine-tune's rows (`<base> + LoRA (<format>)`).
pub const FINE_TUNE_TAG: &str = " + LoRA";

/// The tag the infer stage puts on the repair loop's rows (`<model> + repair (<turns>)`).
pub const REPAIR_TAG: &str = " + repair (";

/// Most base/fine-tune pairs the LLM judge compares in one report.
const MAX_PAIRS: usize = 500;

/// `(rate, passing, rows)` of two models by one measure, and what passing means: Airflow's
/// own DagBag where it judged both, else the static judge.
type Rate = (f64, usize, usize);
fn rates(a: &crate::ModelSummary, b: &crate::ModelSummary) -> (&'static str, Rate, Rate) {
    match (&a.dagbag, &b.dagbag) {
        (Some(da), Some(db)) => (
            "load cleanly in Airflow's DagBag",
            (da.clean_rate, da.clean, da.rows),
            (db.clean_rate, db.clean, db.rows),
        ),
        _ => (
            "are valid",
            (a.validity_rate, a.valid, a.rows),
            (b.validity_rate, b.valid, b.rows),
        ),
    }
}

/// For each model the repair loop ran on: the single-shot model, the repaired one, and a
/// sentence with both rates (DagBag's where it judged both, else the static judge's).
pub fn repair_lines(s: &Summary) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (rep, r) in s.models.iter().filter(|(m, _)| m.contains(REPAIR_TAG)) {
        let single = rep.split(REPAIR_TAG).next().unwrap_or_default();
        let turns = rep
            .split(REPAIR_TAG)
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches(')');
        let Some(b) = s.models.get(single) else {
            continue;
        };
        let (what, (rr, rn, rrows), (br, bn, brows)) = rates(r, b);
        out.push((
            single.to_string(),
            rep.clone(),
            format!(
                "With up to {turns} repair turns, {:.1}% of {single}'s DAGs {what} ({rn} of {rrows}) against {:.1}% single-shot ({bn} of {brows}), {:+.1} points.",
                100.0 * rr,
                100.0 * br,
                100.0 * (rr - br)
            ),
        ));
    }
    out
}

/// Which model of `s` is the base and which the fine-tune, with the verdict.
pub fn verdict(s: &Summary) -> Option<(String, String, f64, String)> {
    let tuned = s
        .models
        .keys()
        .find(|m| m.contains(FINE_TUNE_TAG) && !m.contains(REPAIR_TAG))?;
    let base_name = tuned.split(FINE_TUNE_TAG).next().unwrap_or_default();
    let base = s.models.keys().find(|m| {
        !m.contains(FINE_TUNE_TAG)
            && (m.as_str() == base_name || m.ends_with(&format!("/{base_name}")))
    })?;
    let (b, t) = (&s.models[base], &s.models[tuned]);
    let (what, (tr, tn, trows), (br, bn, brows)) = rates(t, b);
    let delta = 100.0 * (tr - br);
    let text = format!(
        "The fine-tune {} its base: {:.1}% of its DAGs {what} ({} of {}) against {:.1}% ({} of {}), {:+.1} points.",
        if delta > 0.0 {
            "beat"
        } else if delta == 0.0 {
            "tied with"
        } else {
            "did not beat"
        },
        100.0 * tr,
        tn,
        trows,
        100.0 * br,
        bn,
        brows,
        delta
    );
    Some((base.clone(), tuned.clone(), delta, text))
}

/// Runs a report job.
pub async fn run(
    job: &ReportJob,
    ctx: &JobContext,
    llm: Option<&crate::llm::LlmJudge>,
) -> Result<JobOutput, JobError> {
    let mut evals: Vec<crate::EvalRow> = Vec::new();
    let mut summary = Summary::default();
    let mut judged = false;
    let mut train: Option<Value> = None;
    let mut dataset: Option<Value> = None;
    let mut png: Option<Bytes> = None;
    for r in &job.inputs {
        let name = r.key.rsplit('/').next().unwrap_or_default();
        let data = ctx.read(r).await?;
        let json = || -> Result<Value, JobError> {
            serde_json::from_slice(&data)
                .map_err(|e| JobError::fatal(format!("{} is not JSON: {e}", r.key)))
        };
        match name {
            "summary.json" => {
                let s: Summary = serde_json::from_slice(&data)
                    .map_err(|e| JobError::fatal(format!("{}: {e}", r.key)))?;
                summary.merge(&s);
                judged = true;
            }
            "train.json" => train = Some(json()?),
            "stats.json" => dataset = Some(json()?),
            "loss.png" => png = Some(data.clone()),
            "eval.jsonl" if llm.is_some() => {
                for l in String::from_utf8_lossy(&data)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                {
                    let r: crate::EvalRow = serde_json::from_str(l)
                        .map_err(|e| JobError::fatal(format!("{}: {e}", r.key)))?;
                    evals.push(r);
                }
            }
            _ => {}
        }
    }
    let v = verdict(&summary);
    let repairs = repair_lines(&summary);
    let mut md = String::from("# Run report\n\n");
    if let Some((_, _, _, text)) = &v {
        md.push_str(&format!("**{text}**\n\n"));
    }
    for (_, _, text) in &repairs {
        md.push_str(&format!("{text}\n\n"));
    }
    // Pairwise, fine-tune against base, each pair in both orders (a win only when both agree).
    let mut pairwise = None;
    let mut out_metrics = Vec::new();
    if let (Some(judge), Some((base, tuned, _, _))) = (llm, &v) {
        let of = |m: &str| -> Vec<crate::EvalRow> {
            evals.iter().filter(|r| r.row.model == m).cloned().collect()
        };
        let (p, t) = judge
            .compare(&of(tuned), &of(base), MAX_PAIRS)
            .await
            .map_err(|e| {
                let m = format!("LLM judge, pairwise: {e}");
                if e.refused {
                    JobError::fatal(m)
                } else {
                    JobError::retry(m)
                }
            })?;
        md.push_str(&format!(
            "Pairwise, by the LLM judge in both orders (a win counts only when both agree): the fine-tune won {} of {} pairs, the base {}, and {} were ties or depended on the order. Mean length: fine-tune {:.0} characters, base {:.0}.\n\n",
            p.first_wins, p.pairs, p.second_wins, p.neither, p.first_mean_chars, p.second_mean_chars
        ));
        out_metrics.push(("pairwise_fine_tune_wins", p.first_wins as f64));
        out_metrics.push(("pairwise_base_wins", p.second_wins as f64));
        out_metrics.push(("llm_requests", t.requests as f64));
        out_metrics.push(("llm_cost_usd", t.cost_usd));
        pairwise = Some(p);
    }
    if let Some(d) = &dataset {
        let rows = d["rows"].as_array();
        md.push_str("## Dataset\n\n");
        if let Some(r) = rows {
            md.push_str(&format!(
                "{} train, {} valid and {} test rows",
                r.first().unwrap_or(&json!(0)),
                r.get(1).unwrap_or(&json!(0)),
                r.get(2).unwrap_or(&json!(0))
            ));
        }
        md.push_str(&format!(
            "; {} exact and {} near duplicates removed.\n\n",
            d["exact_duplicates"], d["near_duplicates"]
        ));
    }
    if let Some(t) = &train {
        md.push_str("## Training\n\n");
        if png.is_some() {
            md.push_str("![loss curve](loss.png)\n\n");
        }
        let f = |v: &Value| {
            v.as_f64()
                .map(|x| format!("{x:.4}"))
                .unwrap_or("n/a".into())
        };
        md.push_str(&format!(
            "LoRA fine-tune of {} on {} rows: {} steps, final training loss {}, best validation loss {}, {:.0} tokens/s on {}.\n\n",
            t["base"]["model"].as_str().unwrap_or("?"),
            t["train_rows"]["kept"],
            t["steps"],
            f(&t["final_loss"]),
            f(&t["best_valid_loss"]),
            t["tokens_per_s"].as_f64().unwrap_or(0.0),
            t["device"].as_str().unwrap_or("?"),
        ));
    }
    if judged {
        md.push_str("## Generations, judged\n\n");
        md.push_str(&summary.markdown());
        md.push('\n');
    }
    let report = json!({
        "verdict": v.as_ref().map(|x| x.3.clone()),
        "base": v.as_ref().map(|x| x.0.clone()),
        "fine_tune": v.as_ref().map(|x| x.1.clone()),
        "validity_delta_points": v.as_ref().map(|x| x.2),
        "pairwise": pairwise,
        "repair": repairs.iter().map(|r| json!({"single_shot": r.0, "with_repair": r.1, "text": r.2})).collect::<Vec<_>>(),
        "models": summary.models,
        "training": train,
        "dataset": dataset,
    });
    ctx.put("report.md", Bytes::from(md)).await?;
    ctx.put(
        "report.json",
        Bytes::from(serde_json::to_vec_pretty(&report).unwrap_or_default()),
    )
    .await?;
    if let Some(p) = png {
        ctx.put("loss.png", p).await?;
    }
    let mut out = JobOutput::default();
    if let Some((_, _, d, _)) = v {
        out = out.metric("validity_delta_points", d);
    }
    for (k, x) in out_metrics {
        out = out.metric(k, x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelSummary;

    #[test]
    fn the_verdict_compares_the_fine_tune_with_its_base() {
        let mut s = Summary::default();
        let m = |rows, valid| ModelSummary {
            rows,
            valid,
            validity_rate: valid as f64 / rows as f64,
            ..Default::default()
        };
        s.models.insert("/models/q.gguf".into(), m(10, 4));
        s.models.insert("q.gguf + LoRA (q4_k_m)".into(), m(10, 7));
        let (base, tuned, d, text) = verdict(&s).unwrap();
        assert_eq!(base, "/models/q.gguf");
        assert_eq!(tuned, "q.gguf + LoRA (q4_k_m)");
        assert!((d - 30.0).abs() < 1e-9);
        assert!(
            text.starts_with("The fine-tune beat its base: 70.0%"),
            "{text}"
        );
        s.models.insert("q.gguf + LoRA (q4_k_m)".into(), m(10, 2));
        assert!(verdict(&s).unwrap().3.contains("did not beat"));
        // Where DagBag judged both, its clean rate decides.
        let with_dagbag = |clean: usize| crate::DagbagSummary {
            rows: 10,
            clean,
            clean_rate: clean as f64 / 10.0,
            ..Default::default()
        };
        s.models.get_mut("q.gguf + LoRA (q4_k_m)").unwrap().dagbag = Some(with_dagbag(3));
        s.models.get_mut("/models/q.gguf").unwrap().dagbag = Some(with_dagbag(1));
        let text = verdict(&s).unwrap().3;
        assert!(
            text.starts_with("The fine-tune beat its base: 30.0% of its DAGs load cleanly in Airflow's DagBag (3 of 10) against 10.0%"),
            "{text}"
        );
        s.models.remove("/models/q.gguf");
        assert!(verdict(&s).is_none());
    }

    #[test]
    fn repaired_rows_are_compared_with_their_single_shot_rows_not_taken_for_the_fine_tune() {
        let mut s = Summary::default();
        let m = |rows, valid| ModelSummary {
            rows,
            valid,
            validity_rate: valid as f64 / rows as f64,
            ..Default::default()
        };
        s.models.insert("/models/q.gguf".into(), m(10, 2));
        s.models
            .insert("/models/q.gguf + repair (2)".into(), m(10, 5));
        s.models
            .insert("q.gguf + LoRA (adapter) + repair (2)".into(), m(10, 9));
        s.models.insert("q.gguf + LoRA (adapter)".into(), m(10, 3));
        let (base, tuned, ..) = verdict(&s).unwrap();
        assert_eq!(
            (base.as_str(), tuned.as_str()),
            ("/models/q.gguf", "q.gguf + LoRA (adapter)")
        );
        let lines = repair_lines(&s);
        assert_eq!(lines.len(), 2);
        let base_line = lines.iter().find(|l| l.0 == "/models/q.gguf").unwrap();
        assert_eq!(
            base_line.2,
            "With up to 2 repair turns, 50.0% of /models/q.gguf's DAGs are valid (5 of 10) against 20.0% single-shot (2 of 10), +30.0 points."
        );
        assert!(
            lines
                .iter()
                .any(|l| l.1 == "q.gguf + LoRA (adapter) + repair (2)"
                    && l.2.contains("+60.0 points"))
        );
    }
}
