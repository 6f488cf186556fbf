//! The synthesize stage: for each mined DAG of a chunk, teacher prompts for N instruction
//! variants (and the run's extra task kinds), answered from the cache, online or through
//! provider batches ([`crate::batches`]); replies parsed and filtered, and troubleshooting
//! pairs added by failure injection.

use bytes::Bytes;
use dagfleet_analysis::Options;
use dagfleet_protocol::jobs::SynthChunk;
use dagfleet_protocol::spec::SynthMode;
use dagfleet_protocol::Envelope;
use dagfleet_providers::{ChatReply, ChatRequest, Provider, ResponseCache};
use dagfleet_runtime::{JobContext, JobError, JobOutput};
use futures::StreamExt;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

use crate::batches::provider_err;
use crate::dataset::Pair;
use crate::{filters, inject, parse, SynthHandler};

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

pub(crate) fn subst(t: &str, vars: &[(&str, &str)]) -> String {
    let mut s = t.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Token estimate for prompt budgeting: code runs at about 3 characters per token.
pub(crate) fn est_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(3)
}

/// What a synthesize job asked and paid for.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) requests: u64,
    pub(crate) cached: u64,
    pub(crate) calls: u64,
    pub(crate) batches: u64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) cost_usd: f64,
    pub(crate) cost_unknown: u64,
    pub(crate) resubmitted: u64,
    pub(crate) failed: u64,
}

impl SynthHandler {
    pub(crate) async fn synthesize(
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
        let cache = ResponseCache::new(ctx.shared_cache().clone());
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

    pub(crate) fn account(
        &self,
        p: &Provider,
        model: &str,
        rep: &ChatReply,
        batch: bool,
        t: &mut Tally,
    ) {
        t.input_tokens += rep.usage.input_tokens;
        t.output_tokens += rep.usage.output_tokens;
        match p.cost(model, rep.usage, batch) {
            Some(c) => t.cost_usd += c,
            None => t.cost_unknown += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_online(
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
}
