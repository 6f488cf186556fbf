//! The synthesize and dataset jobs.

use bytes::Bytes;
use dagfleet_analysis::Options;
use dagfleet_protocol::jobs::{DatasetBuild, SynthChunk};
use dagfleet_protocol::spec::SynthMode;
use dagfleet_protocol::{Envelope, Job, Role};
use dagfleet_providers::{
    BatchState, ChatReply, ChatRequest, Outcome, Provider, ProviderConfig, ProviderError,
    ProviderKind, ResponseCache,
};
use dagfleet_runtime::{now_ms, Handler, JobContext, JobError, JobOutput};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

use crate::dataset::{self, Pair};
use crate::{filters, inject, parse};

/// Handler of the `synthesizer` role.
#[derive(Clone, Default)]
pub struct SynthHandler {
    configs: Arc<BTreeMap<String, ProviderConfig>>,
    built: Arc<Mutex<HashMap<String, Provider>>>,
}

impl std::fmt::Debug for SynthHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthHandler")
            .field("providers", &self.configs.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One mined DAG as the synthesize stage reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct TeacherRow {
    /// The code.
    pub content: String,
    /// Hash of the code.
    pub sha256: String,
    /// Path inside its source.
    #[serde(default)]
    pub path: String,
    /// Source, e.g. `pypi:apache-airflow`.
    #[serde(default)]
    pub source: String,
    /// Ref or version.
    #[serde(default, rename = "ref")]
    pub reference: String,
}

impl TeacherRow {
    /// The Airflow version this DAG was written for: the release it came from for
    /// `apache-airflow` and `apache-airflow-core`, the version a `dir` source declares, else
    /// the major version its imports imply.
    pub fn airflow_version(&self) -> String {
        let pkg = self.source.rsplit(':').next().unwrap_or("");
        if (pkg == "apache-airflow"
            || pkg == "apache-airflow-core"
            || self.source.starts_with("dir:"))
            && self
                .reference
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        {
            return self.reference.clone();
        }
        if self.content.contains("airflow.sdk") {
            "3".into()
        } else {
            "2".into()
        }
    }
}

/// The record of a submitted provider batch, stored before the job polls it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BatchRecord {
    id: String,
    provider: String,
    model: String,
    requests: usize,
    created_at_ms: i64,
}

fn provider_err(e: ProviderError) -> JobError {
    match e {
        ProviderError::Exhausted { .. } => JobError::retry(e.to_string()),
        other => JobError::fatal(other.to_string()),
    }
}

fn subst(t: &str, vars: &[(&str, &str)]) -> String {
    let mut s = t.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Token estimate for prompt budgeting: code runs at about 3 characters per token.
fn est_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(3)
}

#[derive(Default)]
struct Tally {
    requests: u64,
    cached: u64,
    calls: u64,
    batches: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    cost_unknown: u64,
    resubmitted: u64,
    failed: u64,
}

impl SynthHandler {
    /// A handler with the `[providers.*]` settings of the worker config.
    pub fn new(providers: BTreeMap<String, ProviderConfig>) -> Self {
        Self {
            configs: Arc::new(providers),
            built: Arc::default(),
        }
    }

    fn provider(&self, name: &str) -> Result<Provider, JobError> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = built.get(name) {
            return Ok(p.clone());
        }
        let cfg = match (self.configs.get(name), name) {
            (Some(c), _) => c.clone(),
            (None, "anthropic") => ProviderConfig::new(ProviderKind::Anthropic, None),
            (None, "openai") => ProviderConfig::new(ProviderKind::Openai, None),
            (None, other) => {
                return Err(JobError::fatal(format!(
                    "teacher provider `{other}` is not configured on this worker; add [providers.{other}] with `kind` and `base_url` to its config (configured: {})",
                    self.configs.keys().cloned().collect::<Vec<_>>().join(", ")
                )))
            }
        };
        let p = Provider::new(name, cfg).map_err(|e| JobError::fatal(e.to_string()))?;
        built.insert(name.to_string(), p.clone());
        Ok(p)
    }

    async fn synthesize(
        &self,
        env: &Envelope,
        job: &SynthChunk,
        ctx: &JobContext,
    ) -> Result<JobOutput, JobError> {
        let spec = &job.spec;
        let provider = self.provider(&job.teacher.provider)?;
        let model = job.teacher.model.as_str();
        let teacher = format!("{}/{model}", job.teacher.provider);
        let opts = Options::default();

        // Rows of the chunk.
        let mut dags: Vec<(u64, TeacherRow)> = Vec::new();
        let mut unreadable = 0u64;
        let mut offset = 0u64;
        for input in &job.inputs {
            let data = ctx.read(input).await?;
            let text = String::from_utf8_lossy(&data);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let n = offset;
                offset += 1;
                if n < job.rows.0 || n >= job.rows.1 {
                    continue;
                }
                match serde_json::from_str::<TeacherRow>(line) {
                    Ok(r) => dags.push((n, r)),
                    Err(_) => unreadable += 1,
                }
            }
        }

        // Requests.
        let aspects: Vec<String> = (0..spec.variants as usize)
            .map(|i| spec.aspects[i % spec.aspects.len()].clone())
            .collect();
        let aspect_list = aspects
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}. {a}", i + 1))
            .collect::<Vec<_>>()
            .join("; ");
        let mut requests: Vec<ChatRequest> = Vec::new();
        let mut rejected: Vec<serde_json::Value> = Vec::new();
        let mut skipped_long = 0u64;
        let budget = spec.context_tokens.saturating_sub(spec.max_tokens as u64);
        for (n, d) in &dags {
            let av = d.airflow_version();
            let variants = spec.variants.to_string();
            let mut prompts = vec![(
                format!("r{n}-i"),
                subst(
                    &spec.prompt,
                    &[
                        ("dag", d.content.trim_end()),
                        ("variants", &variants),
                        ("aspects", &aspect_list),
                        ("airflow_version", &av),
                    ],
                ),
            )];
            for (k, t) in spec.tasks.iter().enumerate() {
                prompts.push((
                    format!("r{n}-t{k}"),
                    subst(
                        &t.prompt,
                        &[("dag", d.content.trim_end()), ("airflow_version", &av)],
                    ),
                ));
            }
            let longest = prompts
                .iter()
                .map(|(_, p)| est_tokens(p))
                .max()
                .unwrap_or(0)
                + est_tokens(&spec.system);
            if longest > budget {
                skipped_long += 1;
                rejected.push(serde_json::json!({
                    "source_id": d.sha256, "origin": format!("{}@{}:{}", d.source, d.reference, d.path),
                    "reason": "too_long",
                    "message": format!("the prompt needs about {longest} tokens; the teacher's context is {} tokens with {} kept for the reply", spec.context_tokens, spec.max_tokens),
                }));
                continue;
            }
            for (id, text) in prompts {
                requests.push(ChatRequest {
                    custom_id: id,
                    system: Some(spec.system.clone()),
                    messages: vec![dagfleet_providers::Message {
                        role: "user".into(),
                        content: text,
                    }],
                    max_tokens: spec.max_tokens,
                    temperature: spec.temperature,
                });
            }
        }

        // Replies: cache first, then the provider.
        let cache = ResponseCache::new(ctx.store().clone());
        let mut tally = Tally {
            requests: requests.len() as u64,
            ..Default::default()
        };
        let mut replies: HashMap<String, ChatReply> = HashMap::new();
        let mut pending: Vec<ChatRequest> = Vec::new();
        for r in &requests {
            let key = ResponseCache::key(&provider, model, r);
            match cache.get(&key).await? {
                Some(rep) => {
                    tally.cached += 1;
                    replies.insert(r.custom_id.clone(), rep);
                }
                None => pending.push(r.clone()),
            }
        }
        let batch = match spec.mode {
            SynthMode::Online => false,
            SynthMode::Batch => {
                if !provider.supports_batch() {
                    return Err(JobError::fatal(format!(
                        "synthesize.mode = \"batch\" but provider `{}` has no batch API (set `batch = true` in its config if it does)",
                        provider.name()
                    )));
                }
                true
            }
            SynthMode::Auto => provider.supports_batch(),
        };
        let mut failures: Vec<(String, String)> = Vec::new();
        if !pending.is_empty() {
            if batch {
                self.run_batches(
                    env,
                    ctx,
                    &provider,
                    model,
                    spec,
                    pending,
                    &cache,
                    &mut replies,
                    &mut tally,
                    &mut failures,
                )
                .await?;
            } else {
                self.run_online(
                    ctx,
                    &provider,
                    model,
                    pending,
                    &cache,
                    &mut replies,
                    &mut tally,
                )
                .await?;
            }
        }
        for (id, why) in failures {
            rejected.push(
                serde_json::json!({"custom_id": id, "reason": "request_failed", "message": why}),
            );
        }

        // Pairs.
        let mut pairs: Vec<Pair> = Vec::new();
        let mut unparseable = 0u64;
        let mut filtered: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut troubleshoot = 0u64;
        for (n, d) in &dags {
            let av = d.airflow_version();
            let origin = format!("{}@{}:{}", d.source, d.reference, d.path);
            if let Some(rep) = replies.get(&format!("r{n}-i")) {
                match parse::instructions(&rep.text) {
                    Err(why) => {
                        unparseable += 1;
                        rejected.push(serde_json::json!({
                            "source_id": d.sha256, "origin": origin, "custom_id": format!("r{n}-i"),
                            "reason": "unparseable", "message": why, "reply": rep.text,
                            "finish_reason": rep.finish_reason,
                        }));
                    }
                    Ok(items) => {
                        let items: Vec<String> =
                            items.into_iter().take(spec.variants as usize).collect();
                        let (kept, dropped) = filters::filter(
                            items.clone(),
                            spec.min_chars,
                            spec.max_chars,
                            spec.near_duplicate,
                        );
                        for (s, why) in dropped {
                            *filtered.entry(why.as_str()).or_default() += 1;
                            rejected.push(serde_json::json!({
                                "source_id": d.sha256, "origin": origin, "reason": why.as_str(), "instruction": s,
                            }));
                        }
                        for s in kept {
                            let idx = items.iter().position(|x| *x == s).unwrap_or(0);
                            pairs.push(Pair {
                                id: format!("{}-instruction-{}", d.sha256, idx + 1),
                                source_id: d.sha256.clone(),
                                kind: "instruction".into(),
                                variant: idx as u32 + 1,
                                aspect: aspects.get(idx).cloned(),
                                instruction: s,
                                response: d.content.clone(),
                                response_format: "code".into(),
                                airflow_version: av.clone(),
                                instruction_source: teacher.clone(),
                                origin: origin.clone(),
                            });
                        }
                    }
                }
            }
            for (k, t) in spec.tasks.iter().enumerate() {
                let Some(rep) = replies.get(&format!("r{n}-t{k}")) else {
                    continue;
                };
                let text = rep.text.trim();
                if text.is_empty() {
                    unparseable += 1;
                    rejected.push(serde_json::json!({"source_id": d.sha256, "origin": origin, "custom_id": format!("r{n}-t{k}"), "reason": "empty_reply"}));
                    continue;
                }
                let instruction = subst(
                    &t.instruction,
                    &[("dag", d.content.trim_end()), ("reply", text)],
                );
                let (response, format) = if t.answer == "dag" {
                    (d.content.clone(), "code")
                } else {
                    (text.to_string(), "text")
                };
                pairs.push(Pair {
                    id: format!("{}-{}-1", d.sha256, t.name),
                    source_id: d.sha256.clone(),
                    kind: t.name.clone(),
                    variant: 1,
                    aspect: None,
                    instruction,
                    response,
                    response_format: format.into(),
                    airflow_version: av.clone(),
                    instruction_source: teacher.clone(),
                    origin: origin.clone(),
                });
            }
            let seed = u64::from_str_radix(d.sha256.get(..8).unwrap_or("0"), 16).unwrap_or(0);
            for (k, inj) in inject::inject(&d.content, &opts, spec.failures_per_dag as usize, seed)
                .into_iter()
                .enumerate()
            {
                troubleshoot += 1;
                pairs.push(Pair {
                    id: format!("{}-troubleshoot-{}", d.sha256, k + 1),
                    source_id: d.sha256.clone(),
                    kind: "troubleshoot".into(),
                    variant: k as u32 + 1,
                    aspect: serde_json::to_value(inj.category)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string)),
                    instruction: inject::instruction(&inj),
                    response: d.content.clone(),
                    response_format: "code".into(),
                    airflow_version: av.clone(),
                    instruction_source: "dagfleet/failure-injection".into(),
                    origin: origin.clone(),
                });
            }
        }

        let mut out = Vec::new();
        for p in &pairs {
            out.extend_from_slice(
                &serde_json::to_vec(p).map_err(|e| JobError::fatal(e.to_string()))?,
            );
            out.push(b'\n');
        }
        ctx.put("pairs.jsonl", Bytes::from(out)).await?;
        let mut rej = Vec::new();
        for r in &rejected {
            rej.extend_from_slice(r.to_string().as_bytes());
            rej.push(b'\n');
        }
        ctx.put("rejected.jsonl", Bytes::from(rej)).await?;
        let mut o = JobOutput::default()
            .metric("rows", pairs.len() as f64)
            .metric("dags", dags.len() as f64)
            .metric("unreadable_rows", unreadable as f64)
            .metric("skipped_too_long", skipped_long as f64)
            .metric("unparseable", unparseable as f64)
            .metric("troubleshoot", troubleshoot as f64)
            .metric("requests", tally.requests as f64)
            .metric("cached", tally.cached as f64)
            .metric("provider_calls", tally.calls as f64)
            .metric("batches", tally.batches as f64)
            .metric("resubmitted", tally.resubmitted as f64)
            .metric("failed_requests", tally.failed as f64)
            .metric("input_tokens", tally.input_tokens as f64)
            .metric("output_tokens", tally.output_tokens as f64)
            .metric("cost_usd", tally.cost_usd);
        if tally.cost_unknown > 0 {
            o = o.metric("cost_unknown_requests", tally.cost_unknown as f64);
        }
        for (k, v) in &filtered {
            o = o.metric(format!("filtered_{k}"), *v as f64);
        }
        let summary = serde_json::json!({
            "teacher": teacher,
            "mode": if batch { "batch" } else { "online" },
            "metrics": o.metrics,
            "cost": if tally.cost_unknown > 0 {
                serde_json::json!({"known_usd": tally.cost_usd, "unknown_requests": tally.cost_unknown, "note": format!("no price for model `{model}` in [providers.{}.prices]", provider.name())})
            } else {
                serde_json::json!({"usd": tally.cost_usd})
            },
        });
        ctx.put(
            "summary.json",
            Bytes::from(serde_json::to_vec_pretty(&summary).unwrap_or_default()),
        )
        .await?;
        Ok(o)
    }

    fn account(&self, p: &Provider, model: &str, rep: &ChatReply, batch: bool, t: &mut Tally) {
        t.input_tokens += rep.usage.input_tokens;
        t.output_tokens += rep.usage.output_tokens;
        match p.cost(model, rep.usage, batch) {
            Some(c) => t.cost_usd += c,
            None => t.cost_unknown += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_online(
        &self,
        ctx: &JobContext,
        p: &Provider,
        model: &str,
        pending: Vec<ChatRequest>,
        cache: &ResponseCache,
        replies: &mut HashMap<String, ChatReply>,
        t: &mut Tally,
    ) -> Result<(), JobError> {
        let total = pending.len() as u64;
        let mut stream = futures::stream::iter(pending.into_iter().map(|r| {
            let p = p.clone();
            async move {
                let res = p.chat(model, &r).await;
                (r, res)
            }
        }))
        .buffer_unordered(64);
        let mut done = 0u64;
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = ctx.cancelled().cancelled() => {
                    return Err(JobError::retry("worker stopping; finished replies are cached and will not be asked again"));
                }
            };
            let Some((r, res)) = next else { break };
            let rep = res.map_err(provider_err)?;
            t.calls += 1;
            self.account(p, model, &rep, false, t);
            cache.put(&ResponseCache::key(p, model, &r), &rep).await?;
            replies.insert(r.custom_id, rep);
            done += 1;
            if done.is_multiple_of(50) || done == total {
                ctx.progress(done, total, &format!("{done}/{total} teacher replies"))
                    .await;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_batches(
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
        let store = ctx.store();
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
                let key = dagfleet_runtime::store::artifact_key(
                    &env.run_id,
                    env.stage,
                    &env.job_id,
                    &format!("provider-batches/{round}-{j}.json"),
                );
                let rec: BatchRecord = match store.get_opt(&key).await? {
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
                        let stored = store.put_if_absent(&key, Bytes::from(data)).await?;
                        let winner: BatchRecord = serde_json::from_slice(
                            &store.get_opt(&stored.key).await?.unwrap_or_default(),
                        )
                        .unwrap_or(rec.clone());
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

    async fn dataset(&self, job: &DatasetBuild, ctx: &JobContext) -> Result<JobOutput, JobError> {
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

impl Handler for SynthHandler {
    fn role(&self) -> Role {
        Role::Synthesizer
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        match &env.job {
            Job::Synthesize(job) => self.synthesize(env, job, ctx).await,
            Job::Dataset(job) => self.dataset(job, ctx).await,
            other => Err(JobError::fatal(format!(
                "the synthesizer role got a `{}` job, which it does not run",
                other.stage()
            ))),
        }
    }
}
