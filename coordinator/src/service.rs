//! The coordinator process: the event loop, the reconciler and stage dispatch.
//!
//! Everything a coordinator reads from the queue or the KV bucket may come from another
//! version or from someone else entirely, so each input is checked where it is used:
//! events only count for jobs a stage was planned with, a spec is validated and checked
//! against this coordinator's own [`Caps`] before it is planned, an unreadable run-state
//! entry is skipped (and its events acked, since there is nothing to apply them to), and an
//! error or panic while moving one run forward never ends the process.

use dagfleet_protocol::{
    decode_event, Caps, Event, EventKind, JobRecord, RunId, RunState, RunStatus, Stage,
    StageStatus, SCHEMA_VERSION,
};
use dagfleet_runtime::{now_ms, ArtifactStore, Bus};
use futures::{FutureExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::client::{list_runs, load_run, update_run};
use crate::{manifest, plan, CoordinatorError};

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
    /// The operator's limits; a run asking for more fails.
    pub caps: Caps,
    /// Jobs made and published at a time while dispatching a stage.
    pub dispatch_page: usize,
    /// Times a stage's dispatch may be taken over from a holder whose lease ran out (it
    /// died or stalled while planning) before the run fails.
    pub max_dispatch_takeovers: u32,
    /// Panics while moving one run forward before that run fails.
    pub max_run_panics: u32,
    /// How long a stage whose jobs need a lane (e.g. DagBag judging with one Airflow
    /// version) waits for a live worker serving it before its run fails.
    pub lane_wait: Duration,
    /// How long a dispatched stage may show no progress before the coordinator counts its
    /// completions again from the job records in the store (the ground truth: a worker
    /// writes a job's record before it announces the job), in case a completion event was
    /// lost on the way into the run state.
    pub resync_after: Duration,
    /// How often the jobs stream is swept of messages their consumer has acknowledged but
    /// the stream kept ([`dagfleet_runtime::Bus::sweep_acked_jobs`]); zero turns it off.
    pub sweep_every: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            id: format!("coordinator-{}-{:04x}", std::process::id(), rand_u16()),
            reconcile_every: Duration::from_secs(2),
            dispatch_lease: Duration::from_secs(30),
            event_batch: 2_000,
            caps: Caps::default(),
            dispatch_page: 10_000,
            max_dispatch_takeovers: 3,
            max_run_panics: 3,
            lane_wait: Duration::from_secs(30),
            resync_after: Duration::from_secs(30),
            sweep_every: Duration::from_secs(60),
        }
    }
}

fn rand_u16() -> u16 {
    (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16
}

/// Most metric names one job record may add to a stage's sums.
const MAX_RECORD_METRICS: usize = 64;

/// Records one event in a run's state; returns whether it changed anything. Only jobs the
/// stage was planned with count: a completion for another run, a stage that was never
/// dispatched, or an index beyond the stage's job count is ignored. (While a stage is
/// being dispatched by a coordinator that did not store its count first, the bound is the
/// jobs-per-stage limit in force.)
fn apply_event(state: &mut RunState, caps: &Caps, kind: &EventKind) -> bool {
    let run = state.run_id.clone();
    let limit = state.spec.max_jobs_per_stage(caps);
    let counted = |s: &dagfleet_protocol::StageState, index: u32| match s.status {
        StageStatus::Dispatched => index < s.jobs,
        StageStatus::Dispatching if s.jobs > 0 => index < s.jobs,
        StageStatus::Dispatching => index < limit,
        _ => false,
    };
    match kind {
        EventKind::JobsDone { records } => {
            let mut changed = false;
            for rec in records.iter().filter(|r| r.run_id == run) {
                let Some(s) = state.stage_mut(rec.stage) else {
                    continue;
                };
                if !counted(s, rec.index) || !s.done.insert(rec.index) {
                    continue;
                }
                changed = true;
                let metrics = rec
                    .metrics
                    .iter()
                    .filter(|(k, v)| k.len() <= 64 && v.is_finite())
                    .take(MAX_RECORD_METRICS);
                for (k, v) in metrics {
                    *s.metrics.entry(k.clone()).or_default() += v;
                }
            }
            changed
        }
        EventKind::JobDeadLettered { stage, index, .. } => {
            state.stage_mut(*stage).is_some_and(|s| {
                counted(s, *index) && !s.done.contains(*index) && s.failed.insert(*index)
            })
        }
        _ => false,
    }
}

/// Whether any stage of the run has started.
fn started(s: &RunState) -> bool {
    s.stages
        .iter()
        .any(|st| st.started_at_ms > 0 || st.status != StageStatus::Pending)
}

/// What taking a stage's dispatch lease came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    /// Someone else holds it, or the stage moved on.
    Busy,
    /// This coordinator holds it now.
    Won,
    /// The stage's planners died this many times: the run should fail.
    Exhausted(u32),
}

/// Deliveries of an event for a run whose state is not found before it is dropped.
const MISSING_RUN_DELIVERIES: i64 = 5;

/// A coordinator process.
pub struct Coordinator {
    bus: Bus,
    store: ArtifactStore,
    cfg: CoordinatorConfig,
    /// Panics per run while moving it forward.
    panics: Mutex<HashMap<RunId, u32>>,
    /// Per dispatched stage: jobs settled when last seen, and since when.
    progress: Mutex<HashMap<(RunId, Stage), (u32, std::time::Instant)>>,
}

impl Coordinator {
    /// A coordinator over `bus` and `store`.
    pub fn new(bus: Bus, store: ArtifactStore, cfg: CoordinatorConfig) -> Self {
        Self {
            bus,
            store,
            cfg,
            panics: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        }
    }

    /// Follows events and reconciles runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
        let consumer = self.bus.coordinator_consumer().await?;
        info!(id = %self.cfg.id, "coordinator started");
        let mut tick = tokio::time::interval(self.cfg.reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sweep_every = if self.cfg.sweep_every.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            self.cfg.sweep_every
        };
        let mut sweep =
            tokio::time::interval_at(tokio::time::Instant::now() + sweep_every, sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    _ = sweep.tick(), if !self.cfg.sweep_every.is_zero() => {
                        match self.bus.sweep_acked_jobs().await {
                            Ok(0) => {}
                            Ok(n) => info!(deleted = n, "swept acknowledged job messages the stream had kept"),
                            Err(e) => warn!(error = %e, "sweeping the jobs stream failed"),
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
        let mut msg_runs: Vec<Option<RunId>> = Vec::with_capacity(msgs.len());
        for m in &msgs {
            match decode_event(&m.payload) {
                Ok(ev) => {
                    msg_runs.push(Some(ev.run_id.clone()));
                    by_run.entry(ev.run_id).or_default().push(ev.kind)
                }
                Err(e) => {
                    msg_runs.push(None);
                    warn!(subject = %m.subject, error = %e, "unreadable event skipped")
                }
            }
        }
        // Runs whose state was not found: a run that does not exist, or a KV leader that
        // has just taken over and cannot find the entry yet.
        let mut not_found = std::collections::BTreeSet::new();
        for (run, kinds) in &mut by_run {
            self.keep_recorded(run, kinds).await;
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
            let applied = update_run(&self.bus, run, |st| {
                let mut changed = false;
                for k in kinds {
                    changed |= apply_event(st, &self.cfg.caps, k);
                }
                changed
            })
            .await;
            match applied {
                Ok(None) => {
                    not_found.insert(run.clone());
                }
                Ok(Some(_)) => self.reconcile_guarded(run).await,
                // Nothing to apply these events to, now or later.
                Err(e @ CoordinatorError::Unreadable { .. }) => {
                    warn!(error = %e, "events for an unreadable run state dropped")
                }
                Err(e) => return Err(e),
            }
        }
        // Acks go out only after the state is stored. Completions for a run whose state was
        // not found come back a few times before they are dropped: in a cluster, a run-state
        // read right after a leader change can miss an entry that exists.
        for (m, run) in msgs.iter().zip(&msg_runs) {
            let retry = run.as_ref().is_some_and(|r| not_found.contains(r))
                && m.info().is_ok_and(|i| i.delivered < MISSING_RUN_DELIVERIES);
            if retry {
                let _ = m
                    .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                        Duration::from_secs(2),
                    )))
                    .await;
            } else {
                let _ = m.ack().await;
            }
        }
        Ok(())
    }

    /// Counts a stalled stage's completions again from its job records: when a dispatched
    /// stage has settled no new job for `resync_after`, every record in the store is applied
    /// as a completion (those already counted change nothing).
    async fn resync_if_stalled(
        &self,
        run: &RunId,
        cur: &dagfleet_protocol::StageState,
    ) -> Result<(), CoordinatorError> {
        use futures::stream::{self, StreamExt as _};
        let key = (run.clone(), cur.stage);
        let now = std::time::Instant::now();
        {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let e = p.entry(key.clone()).or_insert((cur.settled(), now));
            if e.0 != cur.settled() {
                *e = (cur.settled(), now);
                return Ok(());
            }
            if now.duration_since(e.1) < self.cfg.resync_after {
                return Ok(());
            }
            e.1 = now;
        }
        let prefix = format!(
            "{}/{}/",
            dagfleet_runtime::store::records_prefix(run),
            cur.stage
        );
        let keys = self.store.list(&prefix).await?;
        let records: Vec<JobRecord> = stream::iter(keys)
            .map(|k| async move { self.store.get_opt(&k).await })
            .buffer_unordered(32)
            .filter_map(|r| async move {
                r.ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice::<JobRecord>(&b).ok())
            })
            .collect()
            .await;
        let missing = records
            .iter()
            .filter(|r| r.run_id == *run && !cur.done.contains(r.index))
            .count();
        if missing == 0 {
            return Ok(());
        }
        let ev = EventKind::JobsDone { records };
        update_run(&self.bus, run, |st| apply_event(st, &self.cfg.caps, &ev)).await?;
        warn!(run = %run, stage = %cur.stage, missing, "completions counted again from job records after the stage stalled");
        Ok(())
    }

    /// Drops completions whose job record is not in the store: a worker writes the record
    /// before it announces the job, so a `jobs_done` without one was not sent by a worker
    /// that did the job (a hand-published event must not finish a run). When the store cannot
    /// be read the completion counts: dropping a real one would leave its run hanging.
    async fn keep_recorded(&self, run: &RunId, kinds: &mut [EventKind]) {
        use futures::stream::{self, StreamExt as _};
        for k in kinds.iter_mut() {
            let EventKind::JobsDone { records } = k else {
                continue;
            };
            let checks = stream::iter(records.iter().cloned())
                .map(|rec| async move {
                    let stored = self
                        .store
                        .job_record(&rec.run_id, rec.stage, &rec.job_id)
                        .await;
                    let ok = match &stored {
                        Ok(Some(s)) => {
                            s.run_id == rec.run_id && s.stage == rec.stage && s.index == rec.index
                        }
                        Ok(None) => false,
                        Err(_) => true,
                    };
                    (rec, ok)
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await;
            let before = records.len();
            *records = checks
                .into_iter()
                .filter_map(|(r, ok)| ok.then_some(r))
                .collect();
            if records.len() < before {
                warn!(
                    run = %run,
                    dropped = before - records.len(),
                    "completions without a job record in the store ignored"
                );
            }
        }
    }

    async fn reconcile_all(&self) -> Result<(), CoordinatorError> {
        let mut runs = list_runs(&self.bus).await?;
        runs.retain(|s| s.status == RunStatus::Running);
        // Oldest first, so runs waiting for a slot start in the order they came.
        runs.reverse();
        for st in runs {
            self.reconcile_guarded(&st.run_id).await;
        }
        Ok(())
    }

    /// [`reconcile`](Self::reconcile), with errors logged and panics caught and counted:
    /// one run never stops the coordinator, and a run that keeps panicking fails.
    async fn reconcile_guarded(&self, run: &RunId) {
        match AssertUnwindSafe(self.reconcile(run)).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(run = %run, error = %e, "reconcile failed; retried on the next tick")
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let n = {
                    let mut p = self.panics.lock().unwrap_or_else(|e| e.into_inner());
                    let n = p.entry(run.clone()).or_default();
                    *n += 1;
                    *n
                };
                error!(run = %run, panics = n, message = %msg, "panic while moving a run forward");
                if n >= self.cfg.max_run_panics {
                    let reason = format!(
                        "the coordinator panicked {n} times moving this run forward: {msg}"
                    );
                    if let Err(e) = self.fail_run(run, reason).await {
                        warn!(run = %run, error = %e, "could not mark the run failed");
                    }
                }
            }
        }
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
                let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
                if now.saturating_sub(state.created_at_ms) > limit_ms {
                    let reason = format!("limits.deadline of {} passed", humanize(limit));
                    return self.fail_run(run, reason).await;
                }
            }
            if !started(&state) {
                if let Err(reason) = self.check_new_run(&state) {
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
                    if !self.may_start(&state).await? {
                        return Ok(());
                    }
                    self.dispatch(run, cur.stage).await?;
                }
                StageStatus::Dispatched => {
                    if cur.settled() < cur.jobs {
                        return self.resync_if_stalled(run, &cur).await;
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

    /// Why a run that has not started must not: its spec is invalid or over this
    /// coordinator's caps, or its stages are not the spec's (the state was not made by
    /// `submit`).
    fn check_new_run(&self, state: &RunState) -> Result<(), String> {
        let spec = &state.spec;
        spec.validate()
            .and_then(|()| spec.check_caps(&self.cfg.caps))
            .map_err(|e| format!("run spec refused: {e}"))?;
        if !state
            .stages
            .iter()
            .map(|s| s.stage)
            .eq(spec.stages.iter().copied())
        {
            return Err("run state refused: its stages are not the stages of its spec".into());
        }
        Ok(())
    }

    /// Whether `state`'s run may start (or go on): a run that has started goes on; a new one
    /// waits while `caps.max_active_runs` others are under way, with the reason recorded
    /// in its state for `dagfleet status`.
    async fn may_start(&self, state: &RunState) -> Result<bool, CoordinatorError> {
        if started(state) {
            return Ok(true);
        }
        let cap = self.cfg.caps.max_active_runs;
        let active = list_runs(&self.bus)
            .await?
            .iter()
            .filter(|r| r.status == RunStatus::Running && r.run_id != state.run_id && started(r))
            .count();
        let waiting = (active >= cap as usize).then(|| {
            format!("waiting: {active} runs are under way (caps.max_active_runs = {cap})")
        });
        let open = waiting.is_none();
        update_run(&self.bus, &state.run_id, |st| {
            if st.waiting == waiting {
                return false;
            }
            st.waiting = waiting.clone();
            true
        })
        .await?;
        Ok(open)
    }

    /// Takes the dispatch lease of `stage`, counting a takeover from a holder whose lease
    /// ran out.
    async fn take_lease(&self, run: &RunId, stage: Stage) -> Result<Lease, CoordinatorError> {
        let now = now_ms();
        let lease_until = now.saturating_add(self.cfg.dispatch_lease.as_millis() as i64);
        let me = self.cfg.id.as_str();
        let max = self.cfg.max_dispatch_takeovers;
        let mut lease = Lease::Busy;
        update_run(&self.bus, run, |st| {
            lease = Lease::Busy;
            let Some(s) = st.stage_mut(stage) else {
                return false;
            };
            let mine = s.lease_holder.as_deref() == Some(me);
            let expired = s.status == StageStatus::Dispatching && !mine && s.lease_until_ms <= now;
            if !(s.status == StageStatus::Pending
                || (s.status == StageStatus::Dispatching && mine)
                || expired)
            {
                return false;
            }
            if expired {
                if s.dispatch_takeovers >= max {
                    lease = Lease::Exhausted(s.dispatch_takeovers + 1);
                    return false;
                }
                s.dispatch_takeovers += 1;
            }
            s.status = StageStatus::Dispatching;
            s.lease_holder = Some(me.to_string());
            s.lease_until_ms = lease_until;
            if s.started_at_ms == 0 {
                s.started_at_ms = now;
            }
            st.waiting = None;
            lease = Lease::Won;
            true
        })
        .await?;
        Ok(lease)
    }

    /// Runs `f` on the stage's state while this coordinator still holds its lease (and the
    /// lease is extended); returns whether it did.
    async fn while_holding(
        &self,
        run: &RunId,
        stage: Stage,
        f: impl Fn(&mut dagfleet_protocol::StageState),
    ) -> Result<bool, CoordinatorError> {
        let me = self.cfg.id.as_str();
        let until = now_ms().saturating_add(self.cfg.dispatch_lease.as_millis() as i64);
        let mut held = false;
        update_run(&self.bus, run, |st| {
            held = false;
            // A cancelled (or failed) run publishes nothing more.
            if st.status != RunStatus::Running {
                return false;
            }
            match st.stage_mut(stage) {
                Some(s)
                    if s.status == StageStatus::Dispatching
                        && s.lease_holder.as_deref() == Some(me) =>
                {
                    s.lease_until_ms = until;
                    f(s);
                    held = true;
                    true
                }
                _ => false,
            }
        })
        .await?;
        Ok(held)
    }

    async fn dispatch(&self, run: &RunId, stage: Stage) -> Result<(), CoordinatorError> {
        match self.take_lease(run, stage).await? {
            Lease::Busy => return Ok(()),
            Lease::Exhausted(n) => {
                let reason = format!(
                    "stage `{stage}`: dispatch was started {n} times and never finished (the coordinators planning it died or stalled); not trying again"
                );
                return self.fail_run(run, reason).await;
            }
            Lease::Won => {}
        }
        let Some((state, _)) = load_run(&self.bus, run).await? else {
            return Ok(());
        };
        // The spec in the bucket may not have come through `submit`: check it again, with
        // this coordinator's caps.
        if let Err(e) = state
            .spec
            .validate()
            .and_then(|()| state.spec.check_caps(&self.cfg.caps))
        {
            return self.fail_run(run, format!("run spec refused: {e}")).await;
        }
        let now = now_ms();
        let mut hints = self.fleet_hints(stage).await;
        if let Some(lane) = plan::needed_lane(&state, stage) {
            // A worker may still be starting: wait a while for one that serves the lane,
            // keeping the lease.
            let deadline = std::time::Instant::now() + self.cfg.lane_wait;
            while !hints.lanes.contains(&lane) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !self.while_holding(run, stage, |_| {}).await? {
                    return Ok(());
                }
                hints = self.fleet_hints(stage).await;
            }
        }
        let mut plan =
            match plan::plan_stage(&state, stage, now, &self.store, &hints, &self.cfg.caps).await {
                Ok(p) => p,
                Err(e) => return self.fail_run(run, e.to_string()).await,
            };
        let n = plan.jobs;
        // The job count is stored before any job is published, so every completion that can
        // arrive names an index below it.
        if !self.while_holding(run, stage, |s| s.jobs = n).await? {
            return Ok(());
        }
        let mut fresh = 0;
        loop {
            let page = plan.next_page(self.cfg.dispatch_page.max(1));
            if page.is_empty() {
                break;
            }
            fresh += self.bus.publish_jobs(&page).await?;
            drop(page);
            if !self.while_holding(run, stage, |_| {}).await? {
                info!(run = %run, stage = %stage, "dispatch lease lost; the new holder republishes");
                return Ok(());
            }
        }
        info!(run = %run, stage = %stage, jobs = n, fresh, "stage dispatched");
        self.while_holding(run, stage, |s| s.status = StageStatus::Dispatched)
            .await?;
        self.emit(run, EventKind::StageDispatched { stage, jobs: n }, None)
            .await;
        Ok(())
    }

    /// What live workers advertise in their heartbeats, for stages sized to the fleet or
    /// routed to lanes.
    async fn fleet_hints(&self, stage: Stage) -> plan::FleetHints {
        let mut hints = plan::FleetHints::default();
        if !matches!(stage, Stage::Infer | Stage::Judge) {
            return hints;
        }
        let prefix = format!("{}.", stage.role());
        if let Ok(mut keys) = self.bus.workers().keys().await {
            while let Some(Ok(k)) = futures::StreamExt::next(&mut keys).await {
                if !k.starts_with(&prefix) {
                    continue;
                }
                let Ok(Some(v)) = self.bus.workers().get(&k).await else {
                    continue;
                };
                let Ok(hb) = serde_json::from_slice::<serde_json::Value>(&v) else {
                    continue;
                };
                if let Some(b) = hb["capacity"]["max_batch"].as_u64() {
                    hints.infer_max_batch = Some(hints.infer_max_batch.unwrap_or(0).max(b));
                }
                if let Some(lanes) = hb["lanes"].as_array() {
                    hints
                        .lanes
                        .extend(lanes.iter().filter_map(|l| l.as_str()).map(String::from));
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
        let Some((state, _)) = load_run(&self.bus, run).await? else {
            return Ok(());
        };
        if state.status != RunStatus::Running {
            return Ok(());
        }
        // The manifest goes first, so whoever sees the run failed finds it.
        let mut failed = state.clone();
        failed.status = RunStatus::Failed;
        failed.error = Some(reason.clone());
        manifest::write(&self.store, &failed).await?;
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
    use dagfleet_protocol::{JobId, JobRecord, RunSpec};

    fn record(run: &RunId, index: u32) -> JobRecord {
        JobRecord {
            job_id: JobId::derive(run, Stage::Noop, "0"),
            run_id: run.clone(),
            stage: Stage::Noop,
            index,
            inputs: vec![],
            outputs: vec![],
            metrics: Default::default(),
            worker: "w".into(),
            attempt: 1,
            duration_ms: 0,
            finished_at_ms: 0,
        }
    }

    fn dispatched(jobs: u32) -> RunState {
        let spec =
            RunSpec::from_toml("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 2").unwrap();
        let mut st = RunState::new(RunId::new("r").unwrap(), spec, 0);
        st.stages[0].status = StageStatus::Dispatched;
        st.stages[0].jobs = jobs;
        st
    }

    const CAPS: &Caps = &Caps {
        max_jobs_per_stage: 100_000,
        max_rows_per_job: 1,
        max_spec_bytes: 1,
        max_upload_bytes: 1,
        max_artifact_bytes: 1,
        max_job_time: Duration::from_secs(1),
        max_new_tokens: 1,
        max_batch_deadline: Duration::from_secs(1),
        max_run_deadline: Duration::from_secs(1),
        max_active_runs: 1,
        store_refs_across_runs: false,
    };

    #[test]
    fn events_apply_once() {
        let mut st = dispatched(2);
        let rec = record(&st.run_id, 1);
        let done = EventKind::JobsDone {
            records: vec![rec.clone(), rec],
        };
        assert!(apply_event(&mut st, CAPS, &done));
        assert!(!apply_event(&mut st, CAPS, &done));
        let dl = EventKind::JobDeadLettered {
            job_id: JobId::derive(&st.run_id, Stage::Noop, "1"),
            stage: Stage::Noop,
            index: 1,
            reason: "x".into(),
        };
        assert!(
            !apply_event(&mut st, CAPS, &dl),
            "a done job is not also failed"
        );
        assert_eq!(st.stages[0].settled(), 1);
    }

    #[test]
    fn only_planned_jobs_count() {
        let mut st = dispatched(2);
        let other = RunId::new("other").unwrap();
        for rec in [
            record(&st.run_id, 2),
            record(&st.run_id, u32::MAX),
            record(&other, 0),
        ] {
            let ev = EventKind::JobsDone { records: vec![rec] };
            assert!(!apply_event(&mut st, CAPS, &ev));
        }
        let dl = EventKind::JobDeadLettered {
            job_id: JobId::derive(&st.run_id, Stage::Noop, "x"),
            stage: Stage::Noop,
            index: u32::MAX,
            reason: "x".into(),
        };
        assert!(!apply_event(&mut st, CAPS, &dl));
        // A dispatch whose count is not stored yet counts indices below the limit in force.
        st.stages[0].status = StageStatus::Dispatching;
        st.stages[0].jobs = 0;
        let ev = |i| EventKind::JobsDone {
            records: vec![record(&RunId::new("r").unwrap(), i)],
        };
        assert!(apply_event(&mut st, CAPS, &ev(5)));
        assert!(!apply_event(&mut st, CAPS, &ev(100_000)));
        st.stages[0].done = Default::default();
        // A stage that has not been dispatched counts nothing.
        st.stages[0].status = StageStatus::Pending;
        let ev = EventKind::JobsDone {
            records: vec![record(&st.run_id, 0)],
        };
        assert!(!apply_event(&mut st, CAPS, &ev));
        assert_eq!(st.stages[0].settled(), 0);
        let mut rec = record(&st.run_id, 0);
        st.stages[0].status = StageStatus::Dispatched;
        st.stages[0].jobs = 2;
        rec.metrics = (0..1000).map(|i| (format!("m{i}"), 1.0)).collect();
        rec.metrics.insert("nan".into(), f64::NAN);
        assert!(apply_event(
            &mut st,
            CAPS,
            &EventKind::JobsDone { records: vec![rec] }
        ));
        assert_eq!(st.stages[0].metrics.len(), MAX_RECORD_METRICS);
    }
}
