//! The dagfleet coordinator.
//!
//! # Overview
//! The coordinator turns a submitted [`RunSpec`] into jobs, one stage at a time, and follows
//! the events stream until the run is done. It keeps nothing in memory that matters: all run
//! state is a [`RunState`] in the `dagfleet_runs` KV bucket, changed only by compare-and-set
//! on the entry's revision. So a restarted coordinator resumes where the run was, and any
//! number of coordinators can run side by side:
//!
//! - **events** are pulled from one durable consumer shared by all coordinators, applied in
//!   batches (one CAS per run per batch), and acked after the state is stored. Applying an
//!   event twice is harmless: completions are bits in a set.
//! - **dispatch** of a stage starts by taking a lease in the run state (CAS from `pending` to
//!   `dispatching`, naming the holder); only the holder publishes. If it dies, the lease
//!   expires and another coordinator republishes: jobs carry deterministic ids used as
//!   `Nats-Msg-Id`, so JetStream drops the duplicates.
//! - a **reconcile tick** looks at every running run, so a run submitted while no coordinator
//!   was up, or a lease left by a dead coordinator, is picked up.
//!
//! # Layout
//! - [`plan`]: splitting a stage into jobs.
//! - [`Coordinator`]: the event loop and the reconciler.
//! - [`submit`]: what `dagfleet run` calls.
//! - [`manifest`]: the run manifest written when a run ends.

pub mod manifest;
pub mod plan;

use async_nats::jetstream::kv;
use bytes::Bytes;
use dagfleet_protocol::codec::decode;
use dagfleet_protocol::{
    decode_event, encode, Event, EventKind, RunId, RunSpec, RunState, RunStatus, Stage,
    StageStatus, SCHEMA_VERSION,
};
use dagfleet_runtime::{now_ms, ArtifactStore, Bus, BusError, StoreError};
use futures::{FutureExt, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// NATS failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The artifact store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run spec cannot be run.
    #[error(transparent)]
    Spec(#[from] dagfleet_protocol::SpecError),
    /// The run spec asks for a stage this build cannot plan.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// A KV operation failed.
    #[error("run state `{run}`: {reason}")]
    State {
        /// The run.
        run: String,
        /// Why.
        reason: String,
    },
}

fn state_err(run: &RunId, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::State {
        run: run.to_string(),
        reason: e.to_string(),
    }
}

/// Settings of a coordinator process.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Name of this coordinator, recorded as the dispatch lease holder.
    pub id: String,
    /// Interval of the reconcile tick.
    pub reconcile_every: Duration,
    /// How long a dispatch lease lasts before another coordinator may take over.
    pub dispatch_lease: Duration,
    /// Most events applied in one batch.
    pub event_batch: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            id: format!("coordinator-{}-{:04x}", std::process::id(), rand_u16()),
            reconcile_every: Duration::from_secs(2),
            dispatch_lease: Duration::from_secs(30),
            event_batch: 2_000,
        }
    }
}

fn rand_u16() -> u16 {
    (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16
}

/// Submits a run: stores the spec, creates the run state, and tells coordinators.
pub async fn submit(
    bus: &Bus,
    store: &ArtifactStore,
    spec_text: &str,
) -> Result<RunId, CoordinatorError> {
    let mut spec = RunSpec::from_toml(spec_text)?;
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let run_id =
        RunId::new(format!("{}-{}", spec.name, &suffix[suffix.len() - 8..])).map_err(|e| {
            CoordinatorError::State {
                run: spec.name.clone(),
                reason: e.to_string(),
            }
        })?;
    // Local input files travel with the run: the coordinator and workers may be elsewhere.
    let uploads: [(&str, &mut Option<String>, &str); 3] = [
        ("infer.prompts", &mut spec.infer.prompts, "prompts.jsonl"),
        ("train.dataset", &mut spec.train.dataset, "train.jsonl"),
        ("train.valid", &mut spec.train.valid, "valid.jsonl"),
    ];
    for (key_name, field, file) in uploads {
        let Some(p) = field.clone().filter(|p| !p.starts_with("store:")) else {
            continue;
        };
        let data = std::fs::read(&p).map_err(|e| {
            CoordinatorError::Spec(dagfleet_protocol::SpecError::Invalid {
                key: key_name.into(),
                message: format!("cannot read `{p}`: {e}"),
            })
        })?;
        let key = format!("runs/{run_id}/inputs/{file}");
        store.put_overwrite(&key, Bytes::from(data)).await?;
        *field = Some(format!("store:{key}"));
    }
    store
        .put_overwrite(
            &format!("runs/{run_id}/spec.toml"),
            Bytes::from(spec_text.to_string()),
        )
        .await?;
    let state = RunState::new(run_id.clone(), spec, now_ms());
    bus.runs()
        .create(
            run_id.as_str(),
            Bytes::from(encode(&state).map_err(BusError::from)?),
        )
        .await
        .map_err(|e| state_err(&run_id, e))?;
    let ev = Event {
        schema_version: SCHEMA_VERSION,
        run_id: run_id.clone(),
        at_ms: now_ms(),
        kind: EventKind::RunSubmitted,
    };
    bus.publish_event(&ev, None).await?;
    info!(run = %run_id, "run submitted");
    Ok(run_id)
}

/// Reads a run's state; `None` when unknown.
pub async fn load_run(bus: &Bus, run: &RunId) -> Result<Option<(RunState, u64)>, CoordinatorError> {
    let Some(entry) = bus
        .runs()
        .entry(run.as_str())
        .await
        .map_err(|e| state_err(run, e))?
    else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let state: RunState = decode("run state", &entry.value).map_err(|e| state_err(run, e))?;
    Ok(Some((state, entry.revision)))
}

/// Every run in the bucket, newest first.
pub async fn list_runs(bus: &Bus) -> Result<Vec<RunState>, CoordinatorError> {
    let mut keys = bus
        .runs()
        .keys()
        .await
        .map_err(|e| CoordinatorError::State {
            run: "*".into(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        let Ok(id) = RunId::new(k) else { continue };
        if let Some((s, _)) = load_run(bus, &id).await? {
            out.push(s);
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
    Ok(out)
}

/// Applies `f` to a run's state with compare-and-set, retrying on conflicts. `f` returns
/// whether it changed anything; nothing is written when it did not.
async fn update_run<F>(
    bus: &Bus,
    run: &RunId,
    mut f: F,
) -> Result<Option<RunState>, CoordinatorError>
where
    F: FnMut(&mut RunState) -> bool,
{
    loop {
        let Some((mut state, rev)) = load_run(bus, run).await? else {
            return Ok(None);
        };
        if !f(&mut state) {
            return Ok(Some(state));
        }
        let bytes = Bytes::from(encode(&state).map_err(BusError::from)?);
        match bus.runs().update(run.as_str(), bytes, rev).await {
            Ok(_) => return Ok(Some(state)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                debug!(run = %run, "run state changed under us; retrying");
                continue;
            }
            Err(e) => return Err(state_err(run, e)),
        }
    }
}

/// Records one event in a run's state; returns whether it changed anything.
fn apply_event(state: &mut RunState, kind: &EventKind) -> bool {
    match kind {
        EventKind::JobsDone { records } => {
            let mut changed = false;
            for rec in records {
                if let Some(s) = state.stage_mut(rec.stage) {
                    if s.done.insert(rec.index) {
                        changed = true;
                        for (k, v) in &rec.metrics {
                            *s.metrics.entry(k.clone()).or_default() += v;
                        }
                    }
                }
            }
            changed
        }
        EventKind::JobDeadLettered { stage, index, .. } => state
            .stage_mut(*stage)
            .is_some_and(|s| !s.done.contains(*index) && s.failed.insert(*index)),
        _ => false,
    }
}

/// A coordinator process.
pub struct Coordinator {
    bus: Bus,
    store: ArtifactStore,
    cfg: CoordinatorConfig,
}

impl Coordinator {
    /// A coordinator over `bus` and `store`.
    pub fn new(bus: Bus, store: ArtifactStore, cfg: CoordinatorConfig) -> Self {
        Self { bus, store, cfg }
    }

    /// Follows events and reconciles runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
        let consumer = self.bus.coordinator_consumer().await?;
        info!(id = %self.cfg.id, "coordinator started");
        let mut tick = tokio::time::interval(self.cfg.reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        'outer: while !shutdown.is_cancelled() {
            let mut events = match consumer
                .stream()
                .max_messages_per_batch(self.cfg.event_batch)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(s) => {
                    failures = 0;
                    s
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "event stream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(
                        (100 * u64::from(failures)).min(2_000),
                    ))
                    .await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tick.tick() => {
                        if let Err(e) = self.reconcile_all().await {
                            warn!(error = %e, "reconcile failed");
                        }
                    }
                    first = events.next() => {
                        let first = match first {
                            Some(Ok(m)) => m,
                            Some(Err(e)) => {
                                warn!(error = %e, "event stream error; reopening");
                                continue 'outer;
                            }
                            None => continue 'outer,
                        };
                        // Take whatever else is already here, so one state update covers
                        // many events without waiting for more.
                        let mut msgs = vec![first];
                        while msgs.len() < self.cfg.event_batch {
                            match events.next().now_or_never() {
                                Some(Some(Ok(m))) => msgs.push(m),
                                _ => break,
                            }
                        }
                        if let Err(e) = self.handle_events(msgs).await {
                            warn!(error = %e, "event batch failed; it will be redelivered");
                        }
                    }
                }
            }
        }
        info!(id = %self.cfg.id, "coordinator stopped");
        Ok(())
    }

    async fn handle_events(
        &self,
        msgs: Vec<async_nats::jetstream::Message>,
    ) -> Result<(), CoordinatorError> {
        let mut by_run: BTreeMap<RunId, Vec<EventKind>> = BTreeMap::new();
        for m in &msgs {
            match decode_event(&m.payload) {
                Ok(ev) => by_run.entry(ev.run_id).or_default().push(ev.kind),
                Err(e) => warn!(subject = %m.subject, error = %e, "unreadable event skipped"),
            }
        }
        for (run, kinds) in &by_run {
            let touched = kinds.iter().any(|k| {
                matches!(
                    k,
                    EventKind::JobsDone { .. }
                        | EventKind::JobDeadLettered { .. }
                        | EventKind::RunSubmitted
                )
            });
            if !touched {
                continue;
            }
            update_run(&self.bus, run, |st| {
                let mut changed = false;
                for k in kinds {
                    changed |= apply_event(st, k);
                }
                changed
            })
            .await?;
            self.reconcile(run).await?;
        }
        // Acks go out only after the state is stored.
        for m in &msgs {
            let _ = m.ack().await;
        }
        Ok(())
    }

    async fn reconcile_all(&self) -> Result<(), CoordinatorError> {
        for st in list_runs(&self.bus).await? {
            if st.status == RunStatus::Running {
                self.reconcile(&st.run_id).await?;
            }
        }
        Ok(())
    }

    /// Moves a run forward as far as it can go now.
    pub async fn reconcile(&self, run: &RunId) -> Result<(), CoordinatorError> {
        loop {
            let Some((state, _)) = load_run(&self.bus, run).await? else {
                return Ok(());
            };
            if state.status != RunStatus::Running {
                return Ok(());
            }
            let now = now_ms();
            if let Some(limit) = state.spec.limits.deadline {
                if now - state.created_at_ms > limit.as_millis() as i64 {
                    let reason = format!("limits.deadline of {} passed", humanize(limit));
                    return self.fail_run(run, reason).await;
                }
            }
            let Some(cur) = state.current().cloned() else {
                return self.finish_run(run).await;
            };
            match cur.status {
                StageStatus::Pending | StageStatus::Dispatching => {
                    let mine = cur.lease_holder.as_deref() == Some(self.cfg.id.as_str());
                    if cur.status == StageStatus::Dispatching && !mine && cur.lease_until_ms > now {
                        return Ok(()); // someone else is dispatching
                    }
                    self.dispatch(run, cur.stage).await?;
                }
                StageStatus::Dispatched => {
                    if cur.settled() < cur.jobs {
                        return Ok(());
                    }
                    let limit = state.spec.limits.max_failed_jobs;
                    let failed = cur.failed.len();
                    let stage = cur.stage;
                    update_run(&self.bus, run, |st| match st.stage_mut(stage) {
                        Some(s) if s.status == StageStatus::Dispatched => {
                            s.status = if failed > limit {
                                StageStatus::Failed
                            } else {
                                StageStatus::Done
                            };
                            s.finished_at_ms = now;
                            true
                        }
                        _ => false,
                    })
                    .await?;
                    if failed > limit {
                        let reason = format!(
                            "stage `{stage}`: {failed} jobs dead-lettered, more than limits.max_failed_jobs = {limit}; see the DAGFLEET_DLQ stream"
                        );
                        return self.fail_run(run, reason).await;
                    }
                    self.emit(
                        run,
                        EventKind::StageDone { stage, failed },
                        Some(format!("stage-done-{run}-{stage}")),
                    )
                    .await;
                    info!(run = %run, stage = %stage, failed, "stage done");
                }
                StageStatus::Failed => {
                    return self
                        .fail_run(run, format!("stage `{}` failed", cur.stage))
                        .await
                }
                // `current()` never returns a done stage.
                StageStatus::Done => return Ok(()),
            }
        }
    }

    async fn dispatch(&self, run: &RunId, stage: Stage) -> Result<(), CoordinatorError> {
        let now = now_ms();
        let lease_until = now + self.cfg.dispatch_lease.as_millis() as i64;
        let me = self.cfg.id.clone();
        let mut won = false;
        let state = update_run(&self.bus, run, |st| {
            won = false;
            let Some(s) = st.stage_mut(stage) else {
                return false;
            };
            let free = s.status == StageStatus::Pending
                || (s.status == StageStatus::Dispatching
                    && (s.lease_holder.as_deref() == Some(me.as_str()) || s.lease_until_ms <= now));
            if !free {
                return false;
            }
            s.status = StageStatus::Dispatching;
            s.lease_holder = Some(me.clone());
            s.lease_until_ms = lease_until;
            if s.started_at_ms == 0 {
                s.started_at_ms = now;
            }
            won = true;
            true
        })
        .await?;
        let Some(state) = state else { return Ok(()) };
        if !won {
            return Ok(());
        }
        let hints = self.fleet_hints(stage).await;
        let jobs = match plan::plan_stage(&state, stage, now, &self.store, &hints).await {
            Ok(j) => j,
            Err(e) => return self.fail_run(run, e.to_string()).await,
        };
        let n = jobs.len() as u32;
        let fresh = self.bus.publish_jobs(&jobs).await?;
        info!(run = %run, stage = %stage, jobs = n, fresh, "stage dispatched");
        update_run(&self.bus, run, |st| match st.stage_mut(stage) {
            Some(s)
                if s.status == StageStatus::Dispatching
                    && s.lease_holder.as_deref() == Some(me.as_str()) =>
            {
                s.status = StageStatus::Dispatched;
                s.jobs = n;
                true
            }
            _ => false,
        })
        .await?;
        self.emit(run, EventKind::StageDispatched { stage, jobs: n }, None)
            .await;
        Ok(())
    }

    /// What live workers advertise in their heartbeats, for stages sized to the fleet.
    async fn fleet_hints(&self, stage: Stage) -> plan::FleetHints {
        let mut hints = plan::FleetHints::default();
        if stage != Stage::Infer {
            return hints;
        }
        let prefix = format!("{}.", dagfleet_protocol::Role::Inference);
        if let Ok(mut keys) = self.bus.workers().keys().await {
            while let Some(Ok(k)) = futures::StreamExt::next(&mut keys).await {
                if !k.starts_with(&prefix) {
                    continue;
                }
                if let Ok(Some(v)) = self.bus.workers().get(&k).await {
                    let b = serde_json::from_slice::<serde_json::Value>(&v)
                        .ok()
                        .and_then(|hb| hb["capacity"]["max_batch"].as_u64());
                    if let Some(b) = b {
                        hints.infer_max_batch = Some(hints.infer_max_batch.unwrap_or(0).max(b));
                    }
                }
            }
        }
        hints
    }

    async fn finish_run(&self, run: &RunId) -> Result<(), CoordinatorError> {
        let Some((state, _)) = load_run(&self.bus, run).await? else {
            return Ok(());
        };
        let mut done = state.clone();
        done.status = RunStatus::Done;
        manifest::write(&self.store, &done).await?;
        let updated = update_run(&self.bus, run, |st| {
            if st.status != RunStatus::Running {
                return false;
            }
            st.status = RunStatus::Done;
            true
        })
        .await?;
        if updated.is_some_and(|s| s.status == RunStatus::Done) {
            self.emit(run, EventKind::RunDone, Some(format!("run-done-{run}")))
                .await;
            info!(run = %run, "run done");
        }
        Ok(())
    }

    async fn fail_run(&self, run: &RunId, reason: String) -> Result<(), CoordinatorError> {
        let r = reason.clone();
        update_run(&self.bus, run, |st| {
            if st.status != RunStatus::Running {
                return false;
            }
            st.status = RunStatus::Failed;
            st.error = Some(r.clone());
            true
        })
        .await?;
        if let Some((state, _)) = load_run(&self.bus, run).await? {
            manifest::write(&self.store, &state).await?;
        }
        warn!(run = %run, reason = %reason, "run failed");
        self.emit(
            run,
            EventKind::RunFailed { reason },
            Some(format!("run-failed-{run}")),
        )
        .await;
        Ok(())
    }

    async fn emit(&self, run: &RunId, kind: EventKind, dedup: Option<String>) {
        let ev = Event {
            schema_version: SCHEMA_VERSION,
            run_id: run.clone(),
            at_ms: now_ms(),
            kind,
        };
        if let Err(e) = self.bus.publish_event(&ev, dedup.as_deref()).await {
            warn!(error = %e, "event not stored");
        }
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagfleet_protocol::{JobId, JobRecord};

    #[test]
    fn events_apply_once() {
        let spec =
            RunSpec::from_toml("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 2").unwrap();
        let run = RunId::new("r").unwrap();
        let mut st = RunState::new(run.clone(), spec, 0);
        let rec = JobRecord {
            job_id: JobId::derive(&run, Stage::Noop, "0"),
            run_id: run,
            stage: Stage::Noop,
            index: 1,
            inputs: vec![],
            outputs: vec![],
            metrics: Default::default(),
            worker: "w".into(),
            attempt: 1,
            duration_ms: 0,
            finished_at_ms: 0,
        };
        let done = EventKind::JobsDone {
            records: vec![rec.clone(), rec],
        };
        assert!(apply_event(&mut st, &done));
        assert!(!apply_event(&mut st, &done));
        let dl = EventKind::JobDeadLettered {
            job_id: JobId::derive(&st.run_id, Stage::Noop, "1"),
            stage: Stage::Noop,
            index: 1,
            reason: "x".into(),
        };
        assert!(!apply_event(&mut st, &dl), "a done job is not also failed");
        assert_eq!(st.stages[0].settled(), 1);
    }
}
