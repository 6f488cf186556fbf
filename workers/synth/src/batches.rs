//! Provider batches of the synthesize stage: the batch id is stored before the job polls,
//! so a redelivered or restarted job re-attaches instead of paying twice; errored and
//! expired rows are resubmitted.

use bytes::Bytes;
use dagfleet_protocol::Envelope;
use dagfleet_providers::{
    BatchState, ChatReply, ChatRequest, Outcome, Provider, ProviderError, ResponseCache,
};
use dagfleet_runtime::{now_ms, JobContext, JobError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;
use tracing::{info, warn};

use crate::synthesize::Tally;
use crate::SynthHandler;

/// The record of a submitted provider batch, stored before the job polls it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    id: String,
    provider: String,
    model: String,
    requests: usize,
    created_at_ms: i64,
}

pub(crate) fn provider_err(e: ProviderError) -> JobError {
    match e {
        ProviderError::Exhausted { .. } => JobError::retry(e.to_string()),
        other => JobError::fatal(other.to_string()),
    }
}

impl SynthHandler {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_batches(
        &self,
        env: &Envelope,
        ctx: &JobContext,
        p: &Provider,
        model: &str,
        spec: &dagfleet_protocol::spec::SynthSpec,
        mut pending: Vec<ChatRequest>,
        cache: &ResponseCache,
        replies: &mut HashMap<String, ChatReply>,
        t: &mut Tally,
        failures: &mut Vec<(String, String)>,
    ) -> Result<(), JobError> {
        let state = ctx.state();
        for round in 0..=spec.max_resubmits {
            if pending.is_empty() {
                break;
            }
            if round > 0 {
                t.resubmitted += pending.len() as u64;
            }
            let by_id: HashMap<String, ChatRequest> = pending
                .iter()
                .map(|r| (r.custom_id.clone(), r.clone()))
                .collect();
            let mut again: Vec<ChatRequest> = Vec::new();
            let mut last_err: HashMap<String, String> = HashMap::new();
            let ranges = p.batch_ranges(model, &pending);
            for (j, range) in ranges.into_iter().enumerate() {
                let key = format!("provider-batches/{round}-{j}.json");
                let rec: BatchRecord = match state.get(&key).await? {
                    Some(b) => {
                        let rec: BatchRecord = serde_json::from_slice(&b).map_err(|e| {
                            JobError::fatal(format!("batch record {key} is unreadable: {e}"))
                        })?;
                        info!(batch = %rec.id, "re-attaching to a provider batch submitted by an earlier attempt");
                        rec
                    }
                    None => {
                        let reqs = &pending[range.clone()];
                        let tag = format!("{}/{round}-{j}", env.job_id);
                        // A batch this job created just before it died, where the provider
                        // keeps metadata (OpenAI); a failed lookup only means creating one.
                        let found = match p.find_batch(&tag).await {
                            Ok(f) => f,
                            Err(e) => {
                                warn!(error = %e, "could not look for an earlier batch of this job");
                                None
                            }
                        };
                        let id = match found {
                            Some(id) => {
                                info!(batch = %id, "adopting a batch an earlier attempt created but did not record");
                                id
                            }
                            None => {
                                t.batches += 1;
                                p.create_batch(model, reqs, &tag)
                                    .await
                                    .map_err(provider_err)?
                            }
                        };
                        let rec = BatchRecord {
                            id,
                            provider: p.name().into(),
                            model: model.into(),
                            requests: reqs.len(),
                            created_at_ms: now_ms(),
                        };
                        let data = serde_json::to_vec(&rec).unwrap_or_default();
                        let stored = state.set_first(&key, Bytes::from(data)).await?;
                        let winner: BatchRecord =
                            serde_json::from_slice(&stored).unwrap_or(rec.clone());
                        if winner.id != rec.id {
                            warn!(ours = %rec.id, kept = %winner.id, "another attempt recorded a batch first; cancelling ours");
                            let _ = p.cancel_batch(&rec.id).await;
                        }
                        ctx.progress(
                            0,
                            reqs.len() as u64,
                            &format!("submitted batch {}", winner.id),
                        )
                        .await;
                        winner
                    }
                };
                // Poll until it ends, the deadline passes, or the worker stops.
                loop {
                    let st = p.batch_status(&rec.id).await.map_err(provider_err)?;
                    match st.state {
                        BatchState::Ended => break,
                        BatchState::Failed(why) => {
                            return Err(JobError::fatal(format!(
                                "provider batch {} failed: {why}",
                                rec.id
                            )))
                        }
                        BatchState::InProgress => {}
                    }
                    let age = Duration::from_millis((now_ms() - rec.created_at_ms).max(0) as u64);
                    if age > spec.batch_deadline {
                        let cancel = p.cancel_batch(&rec.id).await;
                        return Err(JobError::fatal(format!(
                            "provider batch {} did not end within synthesize.batch_deadline = {}s ({}/{} requests done); it was cancelled{}",
                            rec.id,
                            spec.batch_deadline.as_secs(),
                            st.done,
                            st.total,
                            match cancel {
                                Ok(()) => String::new(),
                                Err(e) => format!(" (the cancel failed: {e})"),
                            }
                        )));
                    }
                    ctx.progress(st.done, st.total, &format!("batch {} in progress", rec.id))
                        .await;
                    tokio::select! {
                        _ = tokio::time::sleep(spec.poll_interval) => {}
                        _ = ctx.cancelled().cancelled() => {
                            return Err(JobError::retry(format!(
                                "worker stopping; provider batch {} keeps running and the next attempt re-attaches to it",
                                rec.id
                            )));
                        }
                    }
                }
                let results = p.batch_results(&rec.id).await.map_err(provider_err)?;
                t.calls += 1;
                let mut seen = std::collections::HashSet::new();
                for (cid, outcome) in results {
                    let Some(req) = by_id.get(&cid) else { continue };
                    seen.insert(cid.clone());
                    match outcome {
                        Outcome::Ok(rep) => {
                            self.account(p, model, &rep, true, t);
                            cache.put(&ResponseCache::key(p, model, req), &rep).await?;
                            replies.insert(cid, rep);
                        }
                        Outcome::Errored(m) => {
                            last_err.insert(cid, format!("errored: {m}"));
                            again.push(req.clone());
                        }
                        Outcome::Expired => {
                            last_err.insert(cid, "expired".into());
                            again.push(req.clone());
                        }
                        Outcome::Canceled => {
                            last_err.insert(cid, "canceled".into());
                            again.push(req.clone());
                        }
                    }
                }
                // Requests of this range the batch did not answer (e.g. a re-attached batch
                // from an attempt that asked for fewer) go to the next round.
                for r in &pending[range] {
                    if !seen.contains(&r.custom_id) && !replies.contains_key(&r.custom_id) {
                        last_err
                            .insert(r.custom_id.clone(), "missing from the batch results".into());
                        again.push(r.clone());
                    }
                }
            }
            if round == spec.max_resubmits {
                for r in &again {
                    t.failed += 1;
                    failures.push((
                        r.custom_id.clone(),
                        format!(
                            "{} after {} resubmission(s)",
                            last_err.get(&r.custom_id).cloned().unwrap_or_default(),
                            spec.max_resubmits
                        ),
                    ));
                }
            }
            pending = again;
        }
        Ok(())
    }
}
