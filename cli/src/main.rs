//! `dagfleet`: the one user-facing binary.
//!
//! # Layout
//! - [`config`]: layered configuration.
//! - [`roles`]: the worker roles built into this binary (one cargo feature each).
//! - [`up`]: the one-machine stack (`dagfleet up`), including a `nats-server` child.
//! - [`progress`]: progress bars for `run` and `status`.
//! - [`bench`]: `dagfleet bench queue`.
//!
//! A job's path: `dagfleet run` → [`dagfleet_coordinator::submit`] (run state in KV) →
//! [`dagfleet_coordinator::Coordinator`] plans and publishes jobs → a
//! [`dagfleet_runtime::Worker`] pulls one and calls its role's
//! [`dagfleet_runtime::Handler`] → artifacts via [`dagfleet_runtime::JobContext::put`] →
//! job record and `jobs_done` event → the coordinator advances the run and writes
//! `runs/<run>/manifest.json`.

mod bench;
#[cfg(feature = "inference")]
mod bench_infer;
mod config;
#[cfg(feature = "agent")]
mod generate;
#[cfg(feature = "judge")]
mod judge;
mod progress;
mod roles;
#[cfg(feature = "trainer")]
mod train;
mod up;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dagfleet_protocol::{Role, RunId};
use dagfleet_runtime::Bus;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// dagfleet: build small, domain-specialised code models at fleet scale.
#[derive(Parser, Debug)]
#[command(name = "dagfleet", version, about, long_about = None)]
struct Cli {
    /// TOML config file.
    #[arg(long, short = 'c', env = "DAGFLEET_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// NATS URL (overrides nats.url).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Artifact store URL: a directory, file://, s3://bucket/prefix (overrides store.url).
    #[arg(long, global = true)]
    store_url: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a one-machine stack: nats-server (if none is reachable), coordinator and one
    /// worker of every built-in role.
    Up {
        /// Submit this run spec once the stack is up, follow it, and stop when it ends.
        #[arg(long)]
        run: Option<PathBuf>,
    },
    /// Submit a run spec and follow its progress.
    Run {
        /// The run spec (TOML).
        spec: PathBuf,
        /// Return after submitting instead of following the run.
        #[arg(long)]
        detach: bool,
    },
    /// Show runs; with RUN, follow that run with progress bars while it is live.
    Status {
        /// The run id.
        run: Option<String>,
        /// Print once and return, even while the run is live.
        #[arg(long)]
        once: bool,
    },
    /// Cancel a running run: nothing more is dispatched, workers drop its queued jobs and
    /// stop its running ones, and its manifest says `cancelled`.
    Cancel {
        /// The run id.
        run: String,
        /// Why, recorded in the run's state and manifest.
        #[arg(long, default_value = "by `dagfleet cancel`")]
        reason: String,
    },
    /// Run a worker of one role.
    Worker {
        /// The role.
        #[arg(long)]
        role: Role,
        /// Jobs run at once (overrides worker.concurrency).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Run a coordinator.
    Coordinator,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
    /// Print the effective configuration (secrets redacted).
    Config,
    /// Run the mine stage of a spec on this machine, without a cluster: one JSONL record per
    /// DAG file, and a summary per (source, ref) on stderr.
    #[cfg(feature = "miner")]
    Mine {
        /// The run spec (its `sources` and `mine.globs`).
        spec: PathBuf,
        /// Write the JSONL here instead of stdout.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Judge Airflow DAG files locally (a pre-commit check): a verdict per file, exit
    /// status 1 when any file is invalid.
    #[cfg(feature = "judge")]
    Judge {
        /// Files or directories (searched for *.py).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object per line: path, valid, findings.
        #[arg(long)]
        json: bool,
        /// Target Airflow version for deprecation findings, e.g. 2.10 or 3.0.
        #[arg(long, default_value = "2.10")]
        airflow_version: String,
        /// Also load every file with Airflow's own DagBag, in the environment for
        /// --airflow-version that `tests/airflow-env.sh` installed (see `[judge]`).
        #[arg(long)]
        dagbag: bool,
        /// The paths are JSONL files of generated rows (`output`) or mined records
        /// (`content`): write one evaluation row per line to stdout and a summary per model
        /// (Markdown, with DagBag agreement under --dagbag) to stderr.
        #[arg(long)]
        rows: bool,
    },
    /// Generate an Airflow DAG with a served model, judge it, and repair it with the
    /// judges' findings until it passes (or the attempts run out). The DAG goes to stdout
    /// (or --out); progress to stderr. Exit 1 when no attempt passed.
    #[cfg(feature = "agent")]
    Generate {
        /// What the DAG should do.
        instruction: String,
        /// Target Airflow version, e.g. 2.10 or 3.0.
        #[arg(long, default_value = "2.10")]
        airflow_version: String,
        /// An OpenAI-compatible server (`dagfleet serve` listens here by default).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Use `[providers.NAME]` of the config instead of --url.
        #[arg(long)]
        provider: Option<String>,
        /// The model name; default: the first the server lists.
        #[arg(long)]
        model: Option<String>,
        /// Attempts in all (1: no repair turns).
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// New tokens per attempt.
        #[arg(long, default_value_t = 2048)]
        max_tokens: u32,
        /// Sampling temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Also load each attempt with Airflow's DagBag (the environment of
        /// `tests/airflow-env.sh` for --airflow-version).
        #[arg(long)]
        dagbag: bool,
        /// Write the best DAG to this file.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Print the result (best DAG, verdicts, every attempt) as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A Model Context Protocol server over stdio (default) or streamable HTTP (--http):
    /// tools generate_dag, validate_dag, explain_findings and list_models, and the Airflow
    /// knowledge base as resources.
    #[cfg(feature = "agent")]
    Mcp {
        /// Serve streamable HTTP at http://ADDR/mcp instead of stdio.
        #[arg(long)]
        http: Option<String>,
        /// The OpenAI-compatible model server generate_dag uses.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The model name; default: the first the server lists.
        #[arg(long)]
        model: Option<String>,
        /// The Airflow version when a call names none.
        #[arg(long, default_value = "2.10")]
        airflow_version: String,
        /// Listen beyond loopback without an API key (`http.api_key`).
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// Run the train stage of a spec on this machine, without a cluster: LoRA fine-tuning of
    /// `models.base` on `train.dataset`, with every export and the report written under
    /// `--out`. Run it again after an interruption (Ctrl-C checkpoints) to continue.
    #[cfg(feature = "trainer")]
    Train {
        /// The run spec (its `models.base` and `[train]`).
        spec: PathBuf,
        /// Output directory (default `.dagfleet/train/<name>`).
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (`/v1/chat/completions` with
    /// streaming, `/v1/completions`, `/v1/models`, `/health`, `/metrics`).
    #[cfg(feature = "inference")]
    Serve {
        /// A `.gguf` file or a safetensors model directory (names are looked up in
        /// `inference.models_dir`).
        model: String,
        /// Address to listen on; beyond loopback only with an API key (`http.api_key`, e.g.
        /// DAGFLEET_HTTP__API_KEY), which every route but /health then takes as
        /// `Authorization: Bearer <key>`.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Listen beyond loopback without an API key.
        #[arg(long)]
        insecure_no_auth: bool,
        /// The agent (`POST /v1/dags`, model `dagfleet-agent`) also loads each attempt with
        /// Airflow's DagBag (an environment from `tests/airflow-env.sh`).
        #[cfg(feature = "agent")]
        #[arg(long)]
        dagbag: bool,
        /// The Airflow version the agent targets when a request names none.
        #[cfg(feature = "agent")]
        #[arg(long, default_value = "2.10")]
        airflow_version: String,
    },
}

fn init_tracing(cfg: &Config, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet {
        "warn"
    } else {
        cfg.log.level.as_str()
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Reads a run spec file and checks it (schema, values, the operator's caps, the files it
/// uploads) before anything connects or is stored.
pub(crate) fn read_spec(path: &std::path::Path, cfg: &Config) -> Result<String> {
    use std::io::Read;
    let cap = cfg.caps.max_spec_bytes;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(cap + 1).read_to_string(&mut text))
        .with_context(|| format!("reading run spec {}", path.display()))?;
    if text.len() as u64 > cap {
        anyhow::bail!(
            "run spec {} is over caps.max_spec_bytes = {cap} bytes",
            path.display()
        );
    }
    dagfleet_coordinator::check_spec(&text, &cfg.caps)
        .with_context(|| format!("run spec {}", path.display()))?;
    Ok(text)
}

pub(crate) async fn connect(cfg: &Config, name: &str) -> Result<Bus> {
    Bus::connect(&cfg.nats, cfg.queues.clone(), name)
        .await
        .context("connecting to NATS (is nats-server running? `dagfleet up` starts one)")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `dagfleet status | head`: a closed stdout ends the process quietly, as it ends other
    // command-line tools (exit status 141, as for SIGPIPE), instead of panicking.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    match real_main().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn real_main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let mut flags = Vec::new();
    if let Some(u) = &cli.nats_url {
        flags.push(("nats.url", u.clone()));
    }
    if let Some(u) = &cli.store_url {
        flags.push(("store.url", u.clone()));
    }
    let mut cfg = Config::load(cli.config.as_deref(), &flags)?;
    // Commands that draw progress keep logs to warnings unless RUST_LOG asks for more.
    let quiet = match &cli.cmd {
        Cmd::Run { .. }
        | Cmd::Status { .. }
        | Cmd::Cancel { .. }
        | Cmd::Config
        | Cmd::Up { run: Some(_) } => true,
        #[cfg(feature = "judge")]
        Cmd::Judge { .. } => true,
        #[cfg(feature = "miner")]
        Cmd::Mine { .. } => true,
        #[cfg(feature = "agent")]
        Cmd::Generate { .. } | Cmd::Mcp { .. } => true,
        #[cfg(feature = "trainer")]
        Cmd::Train { .. } => true,
        _ => false,
    };
    init_tracing(&cfg, quiet);

    match cli.cmd {
        Cmd::Config => {
            println!("{}", toml::to_string_pretty(&cfg)?);
        }
        Cmd::Up { run } => return up::up(cfg, run).await,
        Cmd::Run { spec, detach } => {
            let text = read_spec(&spec, &cfg)?;
            let bus = connect(&cfg, "dagfleet-cli").await?;
            let store = cfg.open_store()?;
            let run = dagfleet_coordinator::submit(&bus, &store, &text, &cfg.caps).await?;
            println!("submitted run {run}");
            progress::warn_missing_workers(&bus, &run).await;
            if detach {
                return Ok(std::process::ExitCode::SUCCESS);
            }
            let code = progress::follow(&bus, &run, &shutdown_signal()).await?;
            progress::print_outputs(&store, &run).await;
            return Ok(code);
        }
        Cmd::Status { run, once } => {
            let bus = connect(&cfg, "dagfleet-cli").await?;
            match run {
                None => progress::list(&bus).await?,
                Some(r) => {
                    let run = RunId::new(r)?;
                    if once {
                        progress::print_once(&bus, &run).await?;
                    } else {
                        return progress::follow(&bus, &run, &shutdown_signal()).await;
                    }
                }
            }
        }
        Cmd::Cancel { run, reason } => {
            let run = RunId::new(run)?;
            let bus = connect(&cfg, "dagfleet-cli").await?;
            let store = cfg.open_store()?;
            match dagfleet_coordinator::cancel(&bus, &store, &run, &reason).await? {
                None => anyhow::bail!("no run `{run}` (see `dagfleet status`)"),
                Some(dagfleet_coordinator::Cancelled::Now(st)) => {
                    let done: u32 = st.stages.iter().map(|s| s.done.len()).sum();
                    println!(
                        "run {run} cancelled ({done} jobs had finished; the manifest lists them)"
                    );
                }
                Some(dagfleet_coordinator::Cancelled::AlreadyEnded(st)) => {
                    let status = format!("{:?}", st.status).to_lowercase();
                    eprintln!("run {run} had already ended ({status}); nothing cancelled");
                    return Ok(std::process::ExitCode::from(1));
                }
            }
        }
        Cmd::Worker { role, concurrency } => {
            if let Some(c) = concurrency {
                anyhow::ensure!(c >= 1, "--concurrency must be at least 1");
                cfg.worker.concurrency = c;
            }
            // A bad store URL is refused before anything connects.
            let store = cfg.open_store()?;
            let bus = connect(&cfg, &format!("dagfleet-worker-{role}")).await?;
            roles::run_worker(role, &cfg, bus, store, shutdown_signal()).await?;
        }
        Cmd::Coordinator => {
            let store = cfg.open_store()?;
            let bus = connect(&cfg, "dagfleet-coordinator").await?;
            let c =
                dagfleet_coordinator::Coordinator::new(bus, store, up::coordinator_config(&cfg));
            c.run(shutdown_signal()).await?;
        }
        Cmd::Bench { what } => bench::run(what, &cfg).await?,
        #[cfg(feature = "trainer")]
        Cmd::Train { spec, out } => return train::train_local(&spec, out, &cfg).await,
        #[cfg(feature = "miner")]
        Cmd::Mine { spec, out } => return mine_local(&spec, out.as_deref()).await,
        #[cfg(feature = "agent")]
        Cmd::Generate {
            instruction,
            airflow_version,
            url,
            provider,
            model,
            attempts,
            max_tokens,
            temperature,
            dagbag,
            out,
            json,
        } => {
            return generate::run(
                &cfg,
                generate::Args {
                    instruction,
                    airflow_version,
                    url,
                    provider,
                    model,
                    attempts,
                    max_tokens,
                    temperature,
                    dagbag,
                    out,
                    json,
                },
            )
            .await;
        }
        #[cfg(feature = "agent")]
        Cmd::Mcp {
            http,
            url,
            model,
            airflow_version,
            insecure_no_auth,
        } => {
            generate::mcp(&cfg, http, insecure_no_auth, url, model, airflow_version).await?;
        }
        #[cfg(feature = "judge")]
        Cmd::Judge {
            paths,
            json,
            airflow_version,
            dagbag,
            rows,
        } => {
            let dagbag = match dagbag {
                true => Some(judge::dagbag_pool(&cfg.judge, &airflow_version)?),
                false => None,
            };
            if rows {
                return judge::run_rows(&paths, &airflow_version, dagbag.as_ref());
            }
            return judge::run(&paths, json, &airflow_version, dagbag.as_ref());
        }
        #[cfg(feature = "inference")]
        Cmd::Serve {
            model,
            addr,
            insecure_no_auth,
            #[cfg(feature = "agent")]
            dagbag,
            #[cfg(feature = "agent")]
            airflow_version,
        } => {
            let access = dagfleet_inference::server::Access {
                api_key: cfg.http.api_key.as_ref().map(|k| k.expose().to_string()),
                insecure_no_auth,
            };
            dagfleet_inference::server::run(
                &cfg.inference,
                &model,
                &addr,
                &access,
                |app, _engine| {
                    #[cfg(feature = "agent")]
                    let app = {
                        let svc = generate::agent_service(&cfg, _engine, dagbag, &airflow_version)?;
                        dagfleet_agent::http::with_agent(app, std::sync::Arc::new(svc))
                    };
                    Ok(app)
                },
            )
            .await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `dagfleet mine SPEC`: the mine stage on this machine.
#[cfg(feature = "miner")]
async fn mine_local(
    spec: &std::path::Path,
    out: Option<&std::path::Path>,
) -> Result<std::process::ExitCode> {
    let text = std::fs::read_to_string(spec)
        .with_context(|| format!("reading run spec {}", spec.display()))?;
    let spec: dagfleet_protocol::RunSpec = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("run spec is not valid TOML for dagfleet: {e}"))?;
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let n = dagfleet_miner::local::mine_spec(&spec, &mut sink, &mut |l| eprintln!("{l}")).await?;
    eprintln!(
        "{} DAG files, {} after merging identical files across versions",
        n.found, n.written
    );
    Ok(std::process::ExitCode::SUCCESS)
}
