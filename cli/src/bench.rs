//! `dagfleet bench queue`: job-layer throughput and latency, beside a bare async-nats loop
//! measured in the same run on the same server.
//!
//! - **throughput**: a noop run of `--jobs` jobs submitted through the coordinator with 1, 2
//!   and 4 workers; jobs/s from submit to run done (dispatch, pull, handler, `jobs_done` event,
//!   ack, event applied to run state).
//! - **latency**: jobs published at half the measured throughput; latency is from publishing a
//!   job to receiving its `jobs_done` event, which a worker stores right before it acks.
//! - **peer**: a loop that publishes with `Nats-Msg-Id`, pulls and acks the same number of
//!   messages, and the same paced latency measurement.

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::Subcommand;
use dagfleet_coordinator::Coordinator;
use dagfleet_protocol::jobs::NoopJob;
use dagfleet_protocol::{Envelope, Job, RunId, Stage};
use dagfleet_runtime::{ArtifactStore, Bus, NatsConfig, Worker};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// No-op jobs through coordinator and workers, beside a bare async-nats loop.
    Queue(QueueArgs),
    /// The judge's analysis on one core over a corpus of mined DAGs (`dagfleet mine` JSONL),
    /// beside Python's `ast.parse` on the same files, and the miner's files/s from a local
    /// directory.
    #[cfg(all(feature = "judge", feature = "miner"))]
    Judge {
        /// JSONL with a `content` field per line, e.g. from `dagfleet mine`.
        corpus: std::path::PathBuf,
        /// Passes over the corpus.
        #[arg(long, default_value_t = 20)]
        passes: u32,
        /// Python interpreter for the `ast.parse` peer.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Generation throughput and latency of the inference engine over a concurrency sweep.
    #[cfg(feature = "inference")]
    Infer(crate::bench_infer::InferArgs),
    /// LoRA training throughput (tokens/s) and peak device memory on one micro-batch shape,
    /// random weights of a real model's shape (or real weights).
    #[cfg(feature = "trainer")]
    Train(crate::train::TrainArgs),
    /// Writes the last-position logits of a token sequence as a little-endian f32 file, to
    /// compare a backend with a reference (e.g. CUDA against HF transformers).
    #[cfg(feature = "inference")]
    Logits {
        /// A `.gguf` file or a safetensors model directory.
        #[arg(long)]
        model: String,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<u32>,
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// The decode attention over the paged KV cache against the reference path (gather and
    /// masked softmax) on the same sequences: logits, greedy tokens and step time.
    #[cfg(feature = "inference")]
    Paged(crate::bench_infer::PagedArgs),
}

/// Settings of `dagfleet bench queue`.
#[derive(clap::Args, Debug)]
pub struct QueueArgs {
    /// Jobs per measurement.
    #[arg(long, default_value_t = 20_000)]
    jobs: u32,
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Concurrency of each worker.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds of paced load for each latency measurement.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Paced rate (jobs/s) of the latency measurements; half of dagfleet's one-worker
    /// throughput when absent. The peer is measured at the same rate.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Use the configured NATS server instead of starting a fresh one.
    #[arg(long)]
    external_nats: bool,
}

struct Server {
    _child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
    url: String,
}

async fn start_server(cfg: &Config, external: bool) -> Result<Server> {
    if external {
        return Ok(Server {
            _child: None,
            _dir: None,
            url: cfg.nats.url.clone(),
        });
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = tokio::process::Command::new(&cfg.up.nats_server)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting nats-server for the benchmark")?;
    let url = format!("nats://127.0.0.1:{port}");
    for _ in 0..50 {
        if async_nats::connect(&url).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Server {
        _child: Some(child),
        _dir: Some(dir),
        url,
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summarize(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if std::env::var_os("DAGFLEET_BENCH_DEBUG").is_some() {
        eprintln!(
            "p90 {:.2} p99.9 {:.2} max {:.2} n {}",
            pct(&v, 0.9),
            pct(&v, 0.999),
            pct(&v, 1.0),
            v.len()
        );
    }
    (pct(&v, 0.5), pct(&v, 0.99))
}

/// Runs a benchmark and prints Markdown tables.
pub async fn run(cmd: BenchCmd, cfg: &Config) -> Result<()> {
    let a = match cmd {
        BenchCmd::Queue(a) => a,
        #[cfg(all(feature = "judge", feature = "miner"))]
        BenchCmd::Judge {
            corpus,
            passes,
            python,
        } => return bench_judge(&corpus, passes, &python),
        #[cfg(feature = "inference")]
        BenchCmd::Infer(a) => return crate::bench_infer::run(a, cfg).await,
        #[cfg(feature = "trainer")]
        BenchCmd::Train(a) => return crate::train::bench(a, cfg),
        #[cfg(feature = "inference")]
        BenchCmd::Logits { model, tokens, out } => {
            return crate::bench_infer::logits(&model, &tokens, &out, cfg)
        }
        #[cfg(feature = "inference")]
        BenchCmd::Paged(a) => return crate::bench_infer::paged(a, cfg),
    };
    let QueueArgs {
        jobs,
        workers,
        concurrency,
        latency_secs,
        latency_rate,
        external_nats,
    } = a;
    // Every measurement gets a fresh server (unless --external-nats), so the clean-up of one
    // measurement's deleted messages does not disturb the next.
    let fresh = || async {
        let server = start_server(cfg, external_nats).await?;
        let nats = NatsConfig {
            url: server.url.clone(),
            ..cfg.nats.clone()
        };
        anyhow::Ok((server, nats))
    };
    println!(
        "bench queue: {jobs} jobs, worker concurrency {concurrency}, nats-server file storage, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!("Throughput (dispatch to ack of every job):");
    println!();
    println!("| system | workers | jobs/s | vs peer |");
    println!("|---|---|---|---|");
    let (server, nats) = fresh().await?;
    let peer = peer_throughput(&nats, jobs as usize).await?;
    drop(server);
    println!("| bare async-nats loop | 1 | {peer:.0} | 100% |");
    let mut first = None;
    for &w in &workers {
        let (server, nats) = fresh().await?;
        let stack = DagStack::start(cfg, &nats, w, concurrency).await?;
        let tput = stack.throughput(jobs).await?;
        stack.stop().await;
        drop(server);
        first.get_or_insert(tput);
        println!(
            "| dagfleet (1 coordinator) | {w} | {tput:.0} | {:.0}% |",
            100.0 * tput / peer
        );
    }
    let rate = latency_rate.unwrap_or(first.unwrap_or(peer) / 2.0);
    println!();
    println!("Latency at a paced {rate:.0} jobs/s for {latency_secs} s (publish to done):");
    println!();
    println!("| system | workers | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    let (server, nats) = fresh().await?;
    peer_setup(&nats).await?;
    let (p50, p99) = peer_latency(&nats, rate, latency_secs).await?;
    drop(server);
    println!("| bare async-nats loop | 1 | {p50:.2} | {p99:.2} |");
    for &w in &workers {
        let (server, nats) = fresh().await?;
        let stack = DagStack::start(cfg, &nats, w, concurrency).await?;
        let (p50, p99) = stack.latency(rate, latency_secs).await?;
        stack.stop().await;
        drop(server);
        println!("| dagfleet (1 coordinator) | {w} | {p50:.2} | {p99:.2} |");
    }
    Ok(())
}

/// The peer's work-queue stream and durable pull consumer.
async fn peer_setup(nats: &NatsConfig) -> Result<consumer::PullConsumer> {
    let client = dagfleet_runtime::bus::connect(nats, "bench-peer").await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream("BENCH_PEER").await;
    let st = js
        .create_stream(stream::Config {
            name: "BENCH_PEER".into(),
            subjects: vec!["bench.peer".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let cons: consumer::PullConsumer = st
        .create_consumer(consumer::pull::Config {
            durable_name: Some("peer".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    Ok(cons)
}

async fn peer_throughput(nats: &NatsConfig, n: usize) -> Result<f64> {
    let cons = peer_setup(nats).await?;
    let client = dagfleet_runtime::bus::connect(nats, "bench-peer").await?;
    let js = jetstream::new(client);
    let t0 = Instant::now();
    let pubjs = js.clone();
    let publisher = tokio::spawn(async move {
        let mut acks = Vec::with_capacity(512);
        for i in 0..n {
            let m = jetstream::message::PublishMessage::build()
                .payload(Bytes::from_static(b"x"))
                .message_id(format!("peer-{i}"));
            acks.push(pubjs.send_publish("bench.peer", m).await?);
            if acks.len() >= 512 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks.drain(..) {
            a.await?;
        }
        anyhow::Ok(())
    });
    let mut got = 0;
    let mut msgs = cons
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    while got < n {
        let Some(m) = msgs.next().await else { break };
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        got += 1;
    }
    publisher.await??;
    let secs = t0.elapsed().as_secs_f64();
    Ok(n as f64 / secs)
}

async fn peer_latency(nats: &NatsConfig, rate: f64, secs: u64) -> Result<(f64, f64)> {
    let client = dagfleet_runtime::bus::connect(nats, "bench-peer").await?;
    let js = jetstream::new(client);
    let st = js.get_stream("BENCH_PEER").await?;
    let cons: consumer::PullConsumer = st
        .get_consumer("peer")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let n = (rate * secs as f64) as u64;
    let s2 = sent.clone();
    let pubjs = js.clone();
    let publisher = tokio::spawn(async move {
        let t0 = Instant::now();
        for i in 0..n {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            crate::bench::lock(&s2).insert(i, Instant::now());
            let m = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(i.to_le_bytes().to_vec()))
                .message_id(format!("peer-lat-{i}"));
            let ack = pubjs.send_publish("bench.peer", m).await?;
            tokio::spawn(async move { ack.await });
        }
        anyhow::Ok(())
    });
    let mut lat = Vec::with_capacity(n as usize);
    let mut msgs = cons
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    while (lat.len() as u64) < n {
        let Some(m) = msgs.next().await else { break };
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
        if let Some(t) = lock(&sent).remove(&i) {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    publisher.await??;
    Ok(summarize(lat))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A coordinator and `workers` noop workers in this process, each on its own connection.
struct DagStack {
    bus: Bus,
    store: ArtifactStore,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    workers: usize,
    caps: dagfleet_protocol::Caps,
}

impl DagStack {
    async fn start(
        cfg: &Config,
        nats: &NatsConfig,
        workers: usize,
        concurrency: usize,
    ) -> Result<Self> {
        let store = ArtifactStore::open(&dagfleet_runtime::StoreConfig {
            url: "memory://".into(),
            ..Default::default()
        })?;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let bus = Bus::connect(nats, cfg.queues.clone(), "bench-coordinator").await?;
        let c = Coordinator::new(
            bus.clone(),
            store.clone(),
            crate::up::coordinator_config(cfg),
        );
        let s = stop.clone();
        tasks.spawn(async move {
            let _ = c.run(s).await;
        });
        for i in 0..workers {
            let wbus = Bus::connect(nats, cfg.queues.clone(), &format!("bench-worker-{i}")).await?;
            let mut wc = crate::roles::worker_config(dagfleet_protocol::Role::Noop, cfg);
            wc.concurrency = concurrency;
            let w = Worker::new(
                wbus,
                store.clone(),
                dagfleet_noop::NoopHandler::new(cfg.caps.clone()),
                wc,
            );
            let s = stop.clone();
            tasks.spawn(async move {
                let _ = w.run(s).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Self {
            bus,
            store,
            stop,
            tasks,
            workers,
            caps: cfg.caps.clone(),
        })
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// A whole noop run through the coordinator: jobs/s from submit to run done.
    async fn throughput(&self, jobs: u32) -> Result<f64> {
        let spec = format!(
            "name = \"bench-w{}\"\nstages = [\"noop\"]\n[noop]\njobs = {jobs}\n[limits]\nmax_jobs_per_stage = {jobs}\n",
            self.workers
        );
        let t0 = Instant::now();
        let run = dagfleet_coordinator::submit(&self.bus, &self.store, &spec, &self.caps).await?;
        loop {
            let (st, _) = dagfleet_coordinator::load_run(&self.bus, &run)
                .await?
                .context("bench run vanished")?;
            match st.status {
                dagfleet_protocol::RunStatus::Done => break,
                dagfleet_protocol::RunStatus::Failed | dagfleet_protocol::RunStatus::Cancelled => {
                    anyhow::bail!("bench run ended early: {:?}", st.error)
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        Ok(jobs as f64 / t0.elapsed().as_secs_f64())
    }

    /// Jobs published at `rate`; latency from publishing a job to receiving the `jobs_done`
    /// event that carries it, which a worker stores right before it acks.
    async fn latency(&self, rate: f64, secs: u64) -> Result<(f64, f64)> {
        let run = RunId::new(format!(
            "bench-lat-w{}-{}-{:04x}",
            self.workers,
            std::process::id(),
            rand::random::<u16>()
        ))?;
        let n = (rate * secs as f64) as u32;
        // The bench plays the coordinator's dispatch: the run exists, its stage already
        // dispatched with `n` jobs (workers refuse jobs for runs that do not exist).
        let spec = dagfleet_protocol::RunSpec::from_toml(&format!(
            "name = \"bench-lat\"\nstages = [\"noop\"]\n[noop]\njobs = {}\n[limits]\nmax_jobs_per_stage = {}",
            n.max(1),
            n.max(1)
        ))?;
        let mut state =
            dagfleet_protocol::RunState::new(run.clone(), spec, dagfleet_runtime::now_ms());
        state.stages[0].status = dagfleet_protocol::StageStatus::Dispatched;
        state.stages[0].jobs = n;
        state.stages[0].started_at_ms = dagfleet_runtime::now_ms();
        self.bus
            .runs()
            .create(
                run.as_str(),
                bytes::Bytes::from(dagfleet_protocol::encode(&state)?),
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating the bench run: {e}"))?;
        let sent: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
        let mut sub = self
            .bus
            .client()
            .subscribe(dagfleet_protocol::subjects::event(&run, "jobs_done"))
            .await?;
        let (pbus, prun, s2) = (self.bus.clone(), run.clone(), sent.clone());
        let publisher = tokio::spawn(async move {
            let t0 = Instant::now();
            for i in 0..n {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let env = Envelope::new(
                    prun.clone(),
                    Stage::Noop,
                    i,
                    &i.to_string(),
                    dagfleet_runtime::now_ms(),
                    Job::Noop(NoopJob::default()),
                );
                lock(&s2).insert(i, Instant::now());
                let b = pbus.clone();
                tokio::spawn(async move { b.publish_jobs(&[env]).await });
            }
        });
        let mut lat = Vec::with_capacity(n as usize);
        while (lat.len() as u32) < n {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await
            else {
                break;
            };
            if let Ok(ev) = dagfleet_protocol::decode_event(&m.payload) {
                if let dagfleet_protocol::EventKind::JobsDone { records } = ev.kind {
                    for rec in records {
                        if let Some(t) = lock(&sent).remove(&rec.index) {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
            }
        }
        publisher.await?;
        if (lat.len() as u32) < n {
            anyhow::bail!("latency run lost track of {} jobs", n - lat.len() as u32);
        }
        Ok(summarize(lat))
    }
}

/// `dagfleet bench judge`.
#[cfg(all(feature = "judge", feature = "miner"))]
fn bench_judge(corpus: &std::path::Path, passes: u32, python: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(corpus).with_context(|| format!("reading {}", corpus.display()))?;
    let sources: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["content"].as_str().unwrap_or("").to_string())
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        !sources.is_empty(),
        "{} has no rows with `content`",
        corpus.display()
    );
    let bytes: usize = sources.iter().map(|s| s.len()).sum();
    println!(
        "bench judge: {} files ({} KiB), {passes} passes, one core",
        sources.len(),
        bytes / 1024
    );
    let opts = dagfleet_analysis::Options::default();
    let t0 = Instant::now();
    let mut valid = 0usize;
    for _ in 0..passes {
        for s in &sources {
            valid += dagfleet_judge::judge_source(s, &opts).valid as usize;
        }
    }
    let judge_rate = (sources.len() * passes as usize) as f64 / t0.elapsed().as_secs_f64();
    // The tree-sitter parse alone: the part of the judge no analysis can remove.
    let t2 = Instant::now();
    let mut parsed = 0usize;
    for _ in 0..passes {
        for s in &sources {
            parsed += dagfleet_analysis::parses_cleanly(s) as usize;
        }
    }
    let parse_rate = (sources.len() * passes as usize) as f64 / t2.elapsed().as_secs_f64();

    // The miner over the same files laid out as a local directory.
    let dir = tempfile::tempdir()?;
    let ex = dir.path().join("example_dags");
    std::fs::create_dir_all(&ex)?;
    for (i, s) in sources.iter().enumerate() {
        std::fs::write(ex.join(format!("example_{i}.py")), s)?;
    }
    let globs = dagfleet_miner::globset(&["**/example_*.py".to_string()])
        .map_err(|e| anyhow::anyhow!(e))?;
    let src = dagfleet_protocol::jobs::Source::Dir {
        path: dir.path().to_string_lossy().into_owned(),
        airflow_version: None,
    };
    let rt = tokio::runtime::Handle::current();
    let t1 = Instant::now();
    let mut kept = 0;
    for _ in 0..passes {
        let files = tokio::task::block_in_place(|| {
            rt.block_on(dagfleet_miner::sources::read(&src, "", &globs))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        kept += dagfleet_miner::mine_files("dir", "", files, &globs).0.len();
    }
    let miner_rate = (sources.len() * passes as usize) as f64 / t1.elapsed().as_secs_f64();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/ast_parse.py");
    let peer = std::process::Command::new(python)
        .arg(&script)
        .arg(corpus)
        .arg(passes.to_string())
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    anyhow::ensure!(
        peer.status.success(),
        "ast.parse peer failed: {}",
        String::from_utf8_lossy(&peer.stderr)
    );
    let pv: serde_json::Value = serde_json::from_slice(&peer.stdout)?;
    let ast_rate = pv["files_per_s"].as_f64().unwrap_or(f64::NAN);
    println!();
    println!("| what | files/s (one core) | vs ast.parse |");
    println!("|---|---|---|");
    println!(
        "| Python {} `ast.parse` only (peer) | {ast_rate:.0} | 100% |",
        pv["python"].as_str().unwrap_or("?")
    );
    println!(
        "| tree-sitter-python parse only | {parse_rate:.0} | {:.0}% |",
        100.0 * parse_rate / ast_rate
    );
    println!(
        "| dagfleet judge: full analysis | {judge_rate:.0} | {:.0}% |",
        100.0 * judge_rate / ast_rate
    );
    println!(
        "| dagfleet miner: read dir + filter + analyse | {miner_rate:.0} | {:.0}% |",
        100.0 * miner_rate / ast_rate
    );
    println!();
    println!("({valid} valid verdicts, {parsed} clean tree-sitter parses, {kept} files kept by the miner over all passes)");
    Ok(())
}
