//! The worker runtime: one [`Handler`] per role, one [`Worker`] loop for all of them.
//!
//! # What the runtime owns
//! - **Pull loop** with bounded concurrency: it asks JetStream for as many jobs as it has free
//!   slots, so no job waits in a local buffer while its ack wait runs out.
//! - **In-progress acks** every third of the stage's ack wait while a handler runs, so a live
//!   job (training can take hours) is never redelivered.
//! - **Heartbeats** in the `dagfleet_workers` KV bucket (role, in-flight jobs, capacity).
//! - **Retries and dead letters**: [`JobError::Retry`] naks with the stage's backoff until
//!   `max_attempts`, then dead-letters; [`JobError::Fatal`], undecodable bytes, unknown schema
//!   versions and oversized messages are dead-lettered at once with the reason.
//! - **Effectively-once artifacts**: artifacts are written put-if-absent under keys derived from
//!   the job id, and a job record marks the job done; a redelivered job whose record exists is
//!   acked without running again.
//! - **Graceful shutdown**: on cancel, stop pulling, let in-flight jobs finish within the grace
//!   period, then hand the rest back to the queue with a nak.

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use dagfleet_protocol::{
    decode_envelope, ArtifactRef, Envelope, Event, EventKind, Job, JobRecord, Role, RunState,
    RunStatus, SCHEMA_VERSION,
};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::error::{BusError, JobError};
use crate::store::{artifact_key, ArtifactStore};
use crate::{now_ms, Bus};

/// What a role implements.
pub trait Handler: Send + Sync + 'static {
    /// The role this handler serves.
    fn role(&self) -> Role;

    /// Whether this job writes artifacts. When it does, the runtime checks for an existing
    /// job record before running it; a job without outputs has nothing to deduplicate, so
    /// that read is skipped. Every finished job's record is written either way: the
    /// coordinator counts a completion only when its record is in the store.
    fn writes_artifacts(&self, _job: &Job) -> bool {
        true
    }

    /// What this worker can take, advertised in its heartbeats so the coordinator can size
    /// jobs (e.g. an inference worker's loaded model, batch size and KV budget).
    fn capacity(&self) -> Option<serde_json::Value> {
        None
    }

    /// Lanes of the role's queue this worker also serves (see
    /// [`dagfleet_protocol::Job::lane`]), e.g. a judge with Airflow 2.10 installed serves
    /// `airflow-2_10`. Every worker serves the role's main queue as well.
    fn lanes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs one job. Artifacts are written through `ctx`; the runtime records them.
    fn handle(
        &self,
        job: &Envelope,
        ctx: &JobContext,
    ) -> impl Future<Output = Result<JobOutput, JobError>> + Send;
}

/// What a handler returns besides its artifacts.
#[derive(Clone, Debug, Default)]
pub struct JobOutput {
    /// Numbers recorded in the job record and the run manifest.
    pub metrics: BTreeMap<String, f64>,
}

impl JobOutput {
    /// Adds a metric.
    pub fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }
}

/// The handle a [`Handler`] gets for one job: artifact I/O, progress and cancellation.
pub struct JobContext {
    store: ArtifactStore,
    bus: Bus,
    env: Envelope,
    attempt: u32,
    inputs: Mutex<Vec<ArtifactRef>>,
    outputs: Mutex<Vec<ArtifactRef>>,
    cancel: CancellationToken,
    stopping: CancellationToken,
}

impl JobContext {
    /// Writes an artifact of this job named `name`. Idempotent: if an earlier attempt (or a
    /// racing worker) already wrote it, its content is kept and its reference returned.
    pub async fn put(&self, name: &str, data: Bytes) -> Result<ArtifactRef, JobError> {
        if name.is_empty() || name.contains("..") || name.starts_with('/') {
            return Err(JobError::fatal(format!(
                "artifact name `{name}` must be a relative path without `..`"
            )));
        }
        let key = artifact_key(&self.env.run_id, self.env.stage, &self.env.job_id, name);
        let r = self.store.put_if_absent(&key, data).await?;
        lock(&self.outputs).push(r.clone());
        Ok(r)
    }

    /// Reads an input artifact, checking its hash, and records it as an input of this job.
    pub async fn read(&self, r: &ArtifactRef) -> Result<Bytes, JobError> {
        let data = self.store.get(r).await?;
        self.note_input(r.clone());
        Ok(data)
    }

    /// Records an input that is not in the store, e.g. a model file on the worker, with its
    /// hash, so the manifest names everything the job's outputs depend on.
    pub fn note_input(&self, r: ArtifactRef) {
        let mut inputs = lock(&self.inputs);
        if !inputs.iter().any(|i| i.key == r.key) {
            inputs.push(r);
        }
    }

    /// The job's envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.env
    }

    /// Publishes an event about this job's run (best effort, like [`JobContext::progress`]).
    pub async fn event(&self, kind: EventKind) {
        let ev = Event {
            schema_version: SCHEMA_VERSION,
            run_id: self.env.run_id.clone(),
            at_ms: now_ms(),
            kind,
        };
        if let Err(e) = self.bus.publish_event(&ev, None).await {
            debug!(error = %e, "event lost");
        }
    }

    /// The job's overwritable state (training checkpoints, provider batch ids): objects in
    /// the job's folder that a later attempt reads back and may replace or delete. Unlike
    /// [`JobContext::put`] they are not outputs of the job and are not in its record.
    pub fn state(&self) -> JobState<'_> {
        JobState {
            store: &self.store,
            prefix: artifact_key(&self.env.run_id, self.env.stage, &self.env.job_id, ""),
        }
    }

    /// Reads the object `name` in the same folder as the artifact `beside` (the config
    /// written next to an adapter), recording it as an input; `None` when there is none.
    pub async fn read_beside(
        &self,
        beside: &ArtifactRef,
        name: &str,
    ) -> Result<Option<(ArtifactRef, Bytes)>, JobError> {
        let dir = beside.key.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let key = format!("{dir}/{name}");
        let Some(data) = self.store.get_opt(&key).await? else {
            return Ok(None);
        };
        let r = ArtifactRef {
            key,
            sha256: crate::store::sha256_hex(&data),
            bytes: data.len() as u64,
        };
        self.note_input(r.clone());
        Ok(Some((r, data)))
    }

    /// Input artifacts as local files, for code that needs a path (model weights): `files`
    /// (reference, file name) go to a folder under `root` named by the first one's hash,
    /// kept across jobs, so a worker downloads each only once. Every file is recorded as an
    /// input; partial downloads never take a final name.
    pub async fn local_files(
        &self,
        root: &Path,
        files: &[(&ArtifactRef, &str)],
    ) -> Result<PathBuf, JobError> {
        let first = files
            .first()
            .map(|(r, _)| r.sha256.as_str())
            .unwrap_or("none");
        let dir = root.join(&first[..first.len().min(16)]);
        for (r, name) in files {
            let p = dir.join(name);
            if p.exists() {
                self.note_input((*r).clone());
                continue;
            }
            let data = self.read(r).await?;
            let io = |e: std::io::Error| JobError::retry(format!("caching {}: {e}", p.display()));
            tokio::fs::create_dir_all(&dir).await.map_err(io)?;
            let tmp = dir.join(format!(".{name}.part"));
            tokio::fs::write(&tmp, &data).await.map_err(io)?;
            tokio::fs::rename(&tmp, &p).await.map_err(io)?;
        }
        Ok(dir)
    }

    /// The store, for content-addressed caches shared between jobs and runs (teacher and
    /// judge replies keyed by the hash of their request). Artifacts go through
    /// [`JobContext::put`], state through [`JobContext::state`].
    pub fn shared_cache(&self) -> &ArtifactStore {
        &self.store
    }

    /// Reports progress on the events stream (best effort: a lost progress event is harmless).
    pub async fn progress(&self, done: u64, total: u64, message: &str) {
        self.event(EventKind::JobProgress {
            job_id: self.env.job_id.clone(),
            stage: self.env.stage,
            done,
            total,
            message: message.to_string(),
        })
        .await
    }

    /// The delivery attempt, 1-based, from JetStream's counter.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Cancelled when the worker must stop now (the grace period is over); long handlers
    /// should check it and return [`JobError::Retry`] so the job goes back to the queue.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Cancelled as soon as the worker starts shutting down (SIGTERM, a pre-emption
    /// notice), while the job may still finish within `worker.shutdown_grace`: a job that
    /// can save its progress (a training checkpoint) does so now and returns
    /// [`JobError::Retry`], so the next worker continues from it.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }
}

/// A job's overwritable state: objects in the job's folder of the store, named relative
/// to it (`checkpoints/step-00000100/state.json`), that attempts of the job write, read
/// back, replace and delete. See [`JobContext::state`].
pub struct JobState<'a> {
    store: &'a ArtifactStore,
    prefix: String,
}

impl JobState<'_> {
    /// The object `name`, if an attempt wrote it.
    pub async fn get(&self, name: &str) -> Result<Option<Bytes>, JobError> {
        Ok(self.store.get_opt(&self.key(name)?).await?)
    }

    /// Writes `name`, replacing what is there.
    pub async fn set(&self, name: &str, data: Bytes) -> Result<(), JobError> {
        self.store.put_overwrite(&self.key(name)?, data).await?;
        Ok(())
    }

    /// Writes `name` unless an attempt already did, and returns what is stored: when two
    /// attempts race, both get the first one's content.
    pub async fn set_first(&self, name: &str, data: Bytes) -> Result<Bytes, JobError> {
        let key = self.key(name)?;
        let stored = self.store.put_if_absent(&key, data.clone()).await?;
        Ok(self.store.get_opt(&stored.key).await?.unwrap_or(data))
    }

    /// Deletes `name` (nothing happens if it is not there).
    pub async fn delete(&self, name: &str) -> Result<(), JobError> {
        Ok(self.store.delete(&self.key(name)?).await?)
    }

    /// The names under `prefix` (itself relative to the job's folder), relative to the
    /// job's folder.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, JobError> {
        let keys = self.store.list(&self.key(prefix)?).await?;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string))
            .collect())
    }

    fn key(&self, name: &str) -> Result<String, JobError> {
        if name.contains("..") || name.starts_with('/') {
            return Err(JobError::fatal(format!(
                "job state name `{name}` must be a relative path without `..`"
            )));
        }
        Ok(format!("{}{name}", self.prefix))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settings of one worker process.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique name of this worker, e.g. `host-1234-ab12`.
    pub worker_id: String,
    /// Jobs run at once.
    pub concurrency: usize,
    /// How long in-flight jobs may run after shutdown starts before they are handed back.
    pub shutdown_grace: Duration,
    /// Interval of heartbeats in the workers bucket.
    pub heartbeat_every: Duration,
    /// How long one pull request waits for jobs.
    pub pull_expires: Duration,
}

impl WorkerConfig {
    /// Defaults with a generated worker id.
    pub fn new(role: Role) -> Self {
        Self {
            worker_id: default_worker_id(role),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(5),
            pull_expires: Duration::from_secs(2),
        }
    }
}

/// `<role>-<host>-<pid>-<random>`.
pub fn default_worker_id(role: Role) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{role}-{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Counters of one worker, shared with whoever started it.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs completed by this worker.
    pub done: AtomicU64,
    /// Redelivered jobs found already done and acked without running.
    pub already_done: AtomicU64,
    /// Jobs handed back for a retry.
    pub retried: AtomicU64,
    /// Jobs dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Jobs running now.
    pub in_flight: AtomicU64,
    /// Jobs of cancelled or failed runs, acked without running or stopped mid-way.
    pub dropped: AtomicU64,
}

#[derive(Serialize)]
struct Heartbeat<'a> {
    role: Role,
    worker: &'a str,
    pid: u32,
    concurrency: usize,
    in_flight: u64,
    done: u64,
    started_at_ms: i64,
    at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    lanes: Vec<String>,
}

/// Runs a [`Handler`] against its role's queue.
pub struct Worker<H: Handler> {
    shared: Arc<Shared<H>>,
}

struct Shared<H> {
    bus: Bus,
    store: ArtifactStore,
    handler: H,
    cfg: WorkerConfig,
    stats: Arc<WorkerStats>,
    completions: mpsc::Sender<Completion>,
    completions_rx: Mutex<Option<mpsc::Receiver<Completion>>>,
    keepalive: Mutex<HashMap<u64, Keepalive>>,
    next_id: AtomicU64,
    /// Cancelled when shutdown starts, before the grace period.
    stopping: CancellationToken,
    /// Runs seen running in the run-state bucket, and when: each is looked up again after
    /// [`RUN_RECHECK`], so a worker that missed a cancellation still stops taking its jobs.
    known_runs: Mutex<HashMap<String, Instant>>,
    /// Runs that ended (cancelled, failed, done): their jobs are dropped.
    ended_runs: Mutex<HashMap<String, RunStatus>>,
    /// One token per run with jobs in flight here, cancelled by the run's `run_cancelled`
    /// event; the count is of its jobs in flight.
    run_tokens: Mutex<HashMap<String, (CancellationToken, usize)>>,
}

/// How long a run seen running is trusted before its state is read again.
const RUN_RECHECK: Duration = Duration::from_secs(10);

/// A running job whose message needs in-progress acks.
struct Keepalive {
    msg: jetstream::Message,
    every: Duration,
    due: Instant,
}

/// How often the keep-alive task looks for jobs due an in-progress ack.
const KEEPALIVE_TICK: Duration = Duration::from_millis(250);

/// Sends in-progress acks for every running job, each every third of its stage's ack wait.
/// One task per worker instead of a timer per job: a job only registers and unregisters.
async fn keepalive_loop<H: Handler>(sh: Arc<Shared<H>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEEPALIVE_TICK) => {}
            _ = stop.cancelled() => return,
        }
        let now = Instant::now();
        let due: Vec<jetstream::Message> = {
            let mut map = lock(&sh.keepalive);
            map.values_mut()
                .filter(|k| k.due <= now)
                .map(|k| {
                    k.due = now + k.every;
                    k.msg.clone()
                })
                .collect()
        };
        for msg in due {
            if msg.ack_with(AckKind::Progress).await.is_err() {
                debug!("in-progress ack failed");
            }
        }
    }
}

/// A finished job waiting for its `jobs_done` event to be stored before its ack.
struct Completion {
    rec: JobRecord,
    msg: jetstream::Message,
    stored: oneshot::Sender<bool>,
}

/// Most records in one `jobs_done` event.
const MAX_EVENT_RECORDS: usize = 256;

/// Publishes completions in batches: takes every completion that is ready, stores one
/// `jobs_done` event per run, then acks those jobs (or naks them if the event could not be
/// stored). Under light load a batch is one job and adds no wait; under heavy load batches
/// grow while the previous event's ack is awaited.
async fn completion_loop(bus: Bus, mut rx: mpsc::Receiver<Completion>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_EVENT_RECORDS {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut by_run: BTreeMap<dagfleet_protocol::RunId, Vec<Completion>> = BTreeMap::new();
        for c in batch {
            by_run.entry(c.rec.run_id.clone()).or_default().push(c);
        }
        let publishes = by_run.into_iter().map(|(run_id, cs)| {
            let bus = bus.clone();
            async move {
                let ev = Event {
                    schema_version: SCHEMA_VERSION,
                    run_id,
                    at_ms: now_ms(),
                    kind: EventKind::JobsDone {
                        records: cs.iter().map(|c| c.rec.clone()).collect(),
                    },
                };
                let ok = match bus.publish_event(&ev, None).await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(error = %e, jobs = cs.len(), "jobs_done event not stored; handing the jobs back");
                        false
                    }
                };
                for c in cs {
                    if ok {
                        if let Err(e) = c.msg.ack().await {
                            debug!(error = %e, "ack not sent; the job will be redelivered and found done");
                        }
                    } else {
                        let _ = c.msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                    let _ = c.stored.send(ok);
                }
            }
        });
        futures::future::join_all(publishes).await;
    }
}

impl<H: Handler> Worker<H> {
    /// A worker for `handler` over `bus` and `store`.
    pub fn new(bus: Bus, store: ArtifactStore, handler: H, cfg: WorkerConfig) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_EVENT_RECORDS);
        Self {
            shared: Arc::new(Shared {
                bus,
                store,
                handler,
                cfg,
                stats: Arc::new(WorkerStats::default()),
                completions: tx,
                completions_rx: Mutex::new(Some(rx)),
                keepalive: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                stopping: CancellationToken::new(),
                known_runs: Mutex::new(Default::default()),
                ended_runs: Mutex::new(Default::default()),
                run_tokens: Mutex::new(Default::default()),
            }),
        }
    }

    /// Counters, live while the worker runs.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.shared.stats.clone()
    }

    /// Pulls and runs jobs until `shutdown` is cancelled, then drains as described in the
    /// module docs.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let sh = self.shared;
        let role = sh.handler.role();
        let mut consumers = vec![sh.bus.role_consumer(role).await?];
        for lane in sh.handler.lanes() {
            consumers.push(sh.bus.lane_consumer(role, &lane).await?);
        }
        let sem = Arc::new(Semaphore::new(sh.cfg.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let started = now_ms();
        info!(role = %role, worker = %sh.cfg.worker_id, concurrency = sh.cfg.concurrency, "worker started");

        let hb = tokio::spawn(heartbeat_loop(sh.clone(), started, shutdown.clone()));
        let cancels = tokio::spawn(cancel_loop(sh.clone()));
        let keep_stop = CancellationToken::new();
        let keeper = tokio::spawn(keepalive_loop(sh.clone(), keep_stop.clone()));
        let completer = lock(&sh.completions_rx)
            .take()
            .map(|rx| tokio::spawn(completion_loop(sh.bus.clone(), rx)));

        let loops = consumers.into_iter().map(|c| {
            pull_loop(
                sh.clone(),
                c,
                sem.clone(),
                tracker.clone(),
                hard_stop.clone(),
                shutdown.clone(),
            )
        });
        futures::future::join_all(loops).await;

        tracker.close();
        sh.stopping.cancel();
        let in_flight = sh.stats.in_flight.load(Ordering::Relaxed);
        if in_flight > 0 {
            info!(in_flight, grace = ?sh.cfg.shutdown_grace, "draining in-flight jobs");
        }
        if tokio::time::timeout(sh.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!("grace period over; handing in-flight jobs back to the queue");
            hard_stop.cancel();
            tracker.wait().await;
        }
        hb.abort();
        cancels.abort();
        keep_stop.cancel();
        let _ = keeper.await;
        // Every job task waits for its completion to be stored and acked before it ends, so
        // after `tracker.wait()` the completer has nothing left to do.
        if let Some(c) = completer {
            c.abort();
        }
        let _ = sh
            .bus
            .workers()
            .delete(dagfleet_protocol::subjects::worker_key(
                role,
                &sh.cfg.worker_id,
            ))
            .await;
        info!(role = %role, worker = %sh.cfg.worker_id, "worker stopped");
        Ok(())
    }
}

/// Pulls batches from one consumer (the role's queue or one of its lanes) while permits
/// allow, and runs each message as a task on `tracker`, until `shutdown`.
async fn pull_loop<H: Handler>(
    sh: Arc<Shared<H>>,
    consumer: jetstream::consumer::PullConsumer,
    sem: Arc<Semaphore>,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    'pull: while !shutdown.is_cancelled() {
        let first = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = sem.clone().try_acquire_owned() {
            permits.push(p);
        }
        let batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(sh.cfg.pull_expires)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => {
                failures = 0;
                b
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "pull failed; retrying");
                let wait = Duration::from_millis((100 * u64::from(failures)).min(2_000));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue 'pull,
                    _ = shutdown.cancelled() => break 'pull,
                }
            }
        };
        // Read the whole batch even after shutdown starts: messages the server already
        // delivered are handed back at once instead of waiting out their ack wait.
        while let Some(item) = batch.next().await {
            let msg = match item {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "batch ended with an error");
                    break;
                }
            };
            if shutdown.is_cancelled() {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            let Some(permit) = permits.pop() else {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            };
            let sh = sh.clone();
            let hard = hard_stop.clone();
            tracker.spawn(async move {
                sh.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                process(&sh, msg, hard).await;
                sh.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
}

async fn heartbeat_loop<H: Handler>(sh: Arc<Shared<H>>, started: i64, stop: CancellationToken) {
    let key = dagfleet_protocol::subjects::worker_key(sh.handler.role(), &sh.cfg.worker_id);
    loop {
        let hb = Heartbeat {
            role: sh.handler.role(),
            worker: &sh.cfg.worker_id,
            pid: std::process::id(),
            concurrency: sh.cfg.concurrency,
            in_flight: sh.stats.in_flight.load(Ordering::Relaxed),
            done: sh.stats.done.load(Ordering::Relaxed),
            started_at_ms: started,
            at_ms: now_ms(),
            capacity: sh.handler.capacity(),
            lanes: sh.handler.lanes(),
        };
        if let Ok(body) = serde_json::to_vec(&hb) {
            if let Err(e) = sh.bus.workers().put(&key, body.into()).await {
                debug!(error = %e, "heartbeat not stored");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(sh.cfg.heartbeat_every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How a message was finished, for logs.
enum Outcome {
    Done,
    AlreadyDone,
    Retry(Duration),
    DeadLetter(String),
    HandedBack,
    Dropped(String),
}

async fn process<H: Handler>(sh: &Shared<H>, msg: jetstream::Message, hard: CancellationToken) {
    let role = sh.handler.role();
    let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
    let origin = msg.subject.to_string();
    let limit = sh.bus.queues().max_job_bytes;

    if msg.payload.len() > limit {
        let reason = format!(
            "job message is {} bytes; the limit queues.max_job_bytes is {limit}",
            msg.payload.len()
        );
        dead_letter(sh, &msg, None, &origin, reason).await;
        return;
    }
    let env = match decode_envelope(&msg.payload) {
        Ok(env) => env,
        Err(e) => {
            dead_letter(sh, &msg, None, &origin, e.to_string()).await;
            return;
        }
    };
    if env.stage.role() != role {
        let reason = format!(
            "stage `{}` belongs to role `{}`, but arrived at role `{role}`",
            env.stage,
            env.stage.role()
        );
        dead_letter(sh, &msg, Some(&env), &origin, reason).await;
        return;
    }
    // A job for a run nobody submitted (a hand-published envelope) must not write under
    // that run's prefix; a job of a run that was cancelled or failed is dropped.
    match run_check(sh, &env).await {
        RunCheck::Missing => {
            let reason = format!(
                "the job names run `{}`, which does not exist (no entry in the run-state bucket): refused, nothing written",
                env.run_id
            );
            dead_letter(sh, &msg, Some(&env), &origin, reason).await;
            return;
        }
        RunCheck::Ended(status) => {
            let _ = msg.ack().await;
            sh.stats.dropped.fetch_add(1, Ordering::Relaxed);
            info!(run = %env.run_id, stage = %env.stage, job = %env.job_id, ?status, "job of an ended run dropped without running");
            return;
        }
        RunCheck::Running => {}
    }
    let q = sh.bus.queues().stage(env.stage);
    if delivered > q.max_attempts {
        let reason = format!(
            "delivered {delivered} times, more than queues.stages.{}.max_attempts = {}: every earlier attempt timed out or its worker died",
            env.stage, q.max_attempts
        );
        dead_letter(sh, &msg, Some(&env), &origin, reason).await;
        return;
    }

    let span = tracing::info_span!("job", run = %env.run_id, stage = %env.stage, job = %env.job_id, attempt = delivered, traceparent = %env.trace.traceparent);
    let outcome = async {
        // Keep the job alive while it runs.
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let every = (q.ack_wait / 3).max(KEEPALIVE_TICK);
        lock(&sh.keepalive).insert(
            id,
            Keepalive {
                msg: msg.clone(),
                every,
                due: Instant::now() + every,
            },
        );
        let outcome = run_job(sh, &msg, &env, delivered, &q, &origin, hard).await;
        lock(&sh.keepalive).remove(&id);
        outcome
    }
    .instrument(span.clone())
    .await;
    let _g = span.enter();
    match outcome {
        Outcome::Done => debug!("done"),
        Outcome::AlreadyDone => info!("already done; acked without running"),
        Outcome::Retry(d) => info!(delay = ?d, "handed back for retry"),
        Outcome::DeadLetter(r) => warn!(reason = %r, "dead-lettered"),
        Outcome::HandedBack => info!("handed back at shutdown"),
        Outcome::Dropped(r) => info!(reason = %r, "dropped"),
    }
}

async fn run_job<H: Handler>(
    sh: &Shared<H>,
    msg: &jetstream::Message,
    env: &Envelope,
    delivered: u32,
    q: &crate::StageQueue,
    origin: &str,
    hard: CancellationToken,
) -> Outcome {
    let records = sh.handler.writes_artifacts(&env.job);
    if records {
        match sh
            .store
            .job_record(&env.run_id, env.stage, &env.job_id)
            .await
        {
            Ok(Some(rec)) => {
                return match finish_done(sh, msg, rec).await {
                    Ok(()) => {
                        sh.stats.already_done.fetch_add(1, Ordering::Relaxed);
                        Outcome::AlreadyDone
                    }
                    Err(d) => d,
                };
            }
            Ok(None) => {}
            Err(e) => return nak(sh, msg, Duration::from_secs(2), &e.to_string()).await,
        }
    }

    let ctx = JobContext {
        store: sh.store.clone(),
        bus: sh.bus.clone(),
        env: env.clone(),
        attempt: delivered,
        inputs: Mutex::new(Vec::new()),
        outputs: Mutex::new(Vec::new()),
        cancel: hard.clone(),
        stopping: sh.stopping.clone(),
    };
    let t0 = Instant::now();
    let run_stop = run_token(sh, env.run_id.as_str());
    let result = tokio::select! {
        r = sh.handler.handle(env, &ctx) => r,
        _ = hard.cancelled() => {
            release_run_token(sh, env.run_id.as_str());
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return Outcome::HandedBack;
        }
        _ = run_stop.cancelled() => {
            release_run_token(sh, env.run_id.as_str());
            // The handler's future is dropped here: its work stops at its next await.
            let _ = msg.ack().await;
            sh.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Outcome::Dropped(format!("run `{}` was cancelled while the job ran", env.run_id));
        }
    };
    release_run_token(sh, env.run_id.as_str());
    match result {
        Ok(out) => {
            let rec = JobRecord {
                job_id: env.job_id.clone(),
                run_id: env.run_id.clone(),
                stage: env.stage,
                index: env.index,
                inputs: std::mem::take(&mut *lock(&ctx.inputs)),
                outputs: std::mem::take(&mut *lock(&ctx.outputs)),
                metrics: out.metrics,
                worker: sh.cfg.worker_id.clone(),
                attempt: delivered,
                duration_ms: t0.elapsed().as_millis() as u64,
                finished_at_ms: now_ms(),
            };
            // Every finished job has its record in the store before it is announced: the
            // coordinator counts only completions it can find there.
            let rec = match sh.store.write_job_record(&rec).await {
                Ok(r) => r,
                Err(e) => return nak(sh, msg, Duration::from_secs(2), &e.to_string()).await,
            };
            match finish_done(sh, msg, rec).await {
                Ok(()) => {
                    sh.stats.done.fetch_add(1, Ordering::Relaxed);
                    Outcome::Done
                }
                Err(o) => o,
            }
        }
        Err(JobError::Retry { reason, after }) => {
            if delivered >= q.max_attempts {
                let reason = format!(
                    "gave up after {delivered} attempts (queues.stages.{}.max_attempts): {reason}",
                    env.stage
                );
                dead_letter(sh, msg, Some(env), origin, reason.clone()).await;
                return Outcome::DeadLetter(reason);
            }
            let delay = after.unwrap_or_else(|| q.delay(delivered));
            let ev = Event {
                schema_version: SCHEMA_VERSION,
                run_id: env.run_id.clone(),
                at_ms: now_ms(),
                kind: EventKind::JobRetrying {
                    job_id: env.job_id.clone(),
                    stage: env.stage,
                    index: env.index,
                    attempt: delivered,
                    reason: reason.clone(),
                    delay_ms: delay.as_millis() as u64,
                },
            };
            let _ = sh.bus.publish_event(&ev, None).await;
            nak(sh, msg, delay, &reason).await
        }
        Err(JobError::Fatal { reason }) => {
            dead_letter(sh, msg, Some(env), origin, reason.clone()).await;
            Outcome::DeadLetter(reason)
        }
    }
}

async fn finish_done<H: Handler>(
    sh: &Shared<H>,
    msg: &jetstream::Message,
    rec: JobRecord,
) -> Result<(), Outcome> {
    // The event must be stored before the job is acked, or a crash in between would lose
    // the completion; the completer does both, in that order.
    let (tx, rx) = oneshot::channel();
    let c = Completion {
        rec,
        msg: msg.clone(),
        stored: tx,
    };
    if sh.completions.send(c).await.is_err() {
        return Err(nak(sh, msg, Duration::from_secs(1), "worker stopping").await);
    }
    match rx.await {
        Ok(true) => Ok(()),
        _ => Err(Outcome::Retry(Duration::from_secs(1))),
    }
}

async fn nak<H: Handler>(
    sh: &Shared<H>,
    msg: &jetstream::Message,
    delay: Duration,
    reason: &str,
) -> Outcome {
    sh.stats.retried.fetch_add(1, Ordering::Relaxed);
    debug!(reason, ?delay, "nak");
    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
    Outcome::Retry(delay)
}

enum RunCheck {
    Running,
    Ended(RunStatus),
    Missing,
}

/// Whether `env`'s run exists and is still running, from the run-state bucket (a run seen
/// running is trusted for [`RUN_RECHECK`]). A bucket that cannot be read or an entry that
/// does not decode does not stop work: the job goes on, as it would have before the check.
async fn run_check<H: Handler>(sh: &Shared<H>, env: &Envelope) -> RunCheck {
    let run = env.run_id.as_str();
    if let Some(status) = lock(&sh.ended_runs).get(run) {
        return RunCheck::Ended(*status);
    }
    if lock(&sh.known_runs)
        .get(run)
        .is_some_and(|t| t.elapsed() < RUN_RECHECK)
    {
        return RunCheck::Running;
    }
    match sh.bus.runs().entry(run).await {
        Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            let status = dagfleet_protocol::codec::decode::<RunState>("run state", &e.value)
                .map(|s| s.status)
                .unwrap_or(RunStatus::Running);
            if status != RunStatus::Running {
                let mut ended = lock(&sh.ended_runs);
                if ended.len() > 10_000 {
                    ended.clear();
                }
                ended.insert(run.to_string(), status);
                return RunCheck::Ended(status);
            }
            let mut known = lock(&sh.known_runs);
            if known.len() > 10_000 {
                known.clear();
            }
            known.insert(run.to_string(), Instant::now());
            RunCheck::Running
        }
        Ok(_) => RunCheck::Missing,
        Err(e) => {
            tracing::warn!(run, error = %e, "run-state bucket unreadable; running the job anyway");
            RunCheck::Running
        }
    }
}

/// The token that stops `run`'s jobs on this worker; one per run with jobs in flight.
fn run_token<H: Handler>(sh: &Shared<H>, run: &str) -> CancellationToken {
    let mut map = lock(&sh.run_tokens);
    let e = map
        .entry(run.to_string())
        .or_insert_with(|| (CancellationToken::new(), 0));
    e.1 += 1;
    e.0.clone()
}

fn release_run_token<H: Handler>(sh: &Shared<H>, run: &str) {
    let mut map = lock(&sh.run_tokens);
    if let Some(e) = map.get_mut(run) {
        e.1 = e.1.saturating_sub(1);
        if e.1 == 0 {
            map.remove(run);
        }
    }
}

/// Follows `run_cancelled` events (core NATS, so every worker sees each one): the run's
/// queued jobs are dropped when pulled, its running ones here are stopped.
async fn cancel_loop<H: Handler>(sh: Arc<Shared<H>>) {
    let mut sub = match sh
        .bus
        .client()
        .subscribe(dagfleet_protocol::subjects::RUN_CANCELLED)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot follow run cancellations; cancelled runs' jobs are dropped only when their state is read");
            return;
        }
    };
    while let Some(m) = sub.next().await {
        // dagfleet.events.<run>.run_cancelled
        let Some(run) = m.subject.as_str().split('.').nth(2) else {
            continue;
        };
        info!(run, "run cancelled; dropping its jobs");
        lock(&sh.known_runs).remove(run);
        lock(&sh.ended_runs).insert(run.to_string(), RunStatus::Cancelled);
        if let Some((t, _)) = lock(&sh.run_tokens).get(run) {
            t.cancel();
        }
    }
}

async fn dead_letter<H: Handler>(
    sh: &Shared<H>,
    msg: &jetstream::Message,
    env: Option<&Envelope>,
    origin: &str,
    reason: String,
) {
    let role = sh.handler.role();
    let stage = env.map(|e| e.stage);
    let job_id = env.map(|e| &e.job_id);
    if let Err(e) = sh
        .bus
        .dead_letter(role, stage, job_id, origin, msg.payload.clone(), &reason)
        .await
    {
        // Never drop a message we could not park: hand it back and try again later.
        warn!(error = %e, "dead-letter publish failed; handing the message back");
        let _ = msg
            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
            .await;
        return;
    }
    sh.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    if let Some(env) = env {
        let ev = Event {
            schema_version: SCHEMA_VERSION,
            run_id: env.run_id.clone(),
            at_ms: now_ms(),
            kind: EventKind::JobDeadLettered {
                job_id: env.job_id.clone(),
                stage: env.stage,
                index: env.index,
                reason: reason.clone(),
            },
        };
        let dedup = format!("dlq-{}", env.job_id);
        if let Err(e) = sh.bus.publish_event(&ev, Some(&dedup)).await {
            warn!(error = %e, "dead-letter event not stored; handing the message back");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
            return;
        }
    } else {
        warn!(origin, reason = %reason, "undecodable message dead-lettered");
    }
    let _ = msg.ack_with(AckKind::Term).await;
}
