//! The configuration of the `dagfleet` binary, layered as
//! defaults → TOML file (`--config`, `DAGFLEET_CONFIG`) → `DAGFLEET_*` environment (`__`
//! nests: `DAGFLEET_NATS__URL`) → flags.

use anyhow::{Context, Result};
use dagfleet_protocol::{Caps, Role};
use dagfleet_providers::{ProviderConfig, ProviderKind};
use dagfleet_runtime::config::{InferenceSettings, JudgeSettings, TrainerSettings};
use dagfleet_runtime::{NatsConfig, QueueConfig, StoreConfig};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Everything the binary can be configured with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Artifact store.
    pub store: StoreConfig,
    /// Streams, consumers and per-stage redelivery settings.
    pub queues: QueueConfig,
    /// Worker processes.
    pub worker: WorkerSettings,
    /// Coordinator processes.
    pub coordinator: CoordinatorSettings,
    /// `dagfleet up`.
    pub up: UpSettings,
    /// Logging.
    pub log: LogSettings,
    /// Teacher LLM providers by name, as run specs name them in `models.teacher.provider`.
    /// `anthropic` and `openai` are predefined for the vendors' APIs, so
    /// `DAGFLEET_PROVIDERS__ANTHROPIC__API_KEY` (or `ANTHROPIC_API_KEY`) is all they need.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Inference workers and `dagfleet serve`.
    pub inference: InferenceSettings,
    /// Trainer workers.
    pub trainer: TrainerSettings,
    /// Judge workers (DagBag environments).
    pub judge: JudgeSettings,
    /// The operator's limits on run specs: a spec may ask for less, never more.
    pub caps: Caps,
    /// dagfleet's HTTP servers (`dagfleet serve`, `dagfleet mcp --http`).
    pub http: HttpSettings,
}

/// Settings of dagfleet's HTTP servers, and of the commands that talk to them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// The API key clients send as `Authorization: Bearer <key>`. Needed to listen beyond
    /// loopback; `dagfleet generate` and `dagfleet mcp` send it to the model server too.
    pub api_key: Option<dagfleet_runtime::config::Secret>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: Default::default(),
            store: Default::default(),
            queues: Default::default(),
            worker: Default::default(),
            coordinator: Default::default(),
            up: Default::default(),
            log: Default::default(),
            inference: Default::default(),
            trainer: Default::default(),
            judge: Default::default(),
            caps: Default::default(),
            http: Default::default(),
            providers: BTreeMap::from([
                (
                    "anthropic".to_string(),
                    ProviderConfig::new(ProviderKind::Anthropic, None),
                ),
                (
                    "openai".to_string(),
                    ProviderConfig::new(ProviderKind::Openai, None),
                ),
            ]),
        }
    }
}

/// Worker settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Jobs one worker runs at once.
    pub concurrency: usize,
    /// Time in-flight jobs get to finish after SIGTERM before they are handed back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Interval of worker heartbeats.
    #[serde(with = "humantime_serde")]
    pub heartbeat_every: Duration,
    /// Worker id; generated from host, pid and a random suffix when absent.
    pub id: Option<String>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            shutdown_grace: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(5),
            id: None,
        }
    }
}

/// Coordinator settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// Interval at which every running run is looked at, besides events.
    #[serde(with = "humantime_serde")]
    pub reconcile_every: Duration,
    /// How long a stage-dispatch lease lasts before another coordinator may take over.
    #[serde(with = "humantime_serde")]
    pub dispatch_lease: Duration,
    /// How long a stage whose jobs need a capability only some workers have (DagBag judging
    /// with one Airflow version) waits for such a worker before its run fails.
    #[serde(with = "humantime_serde")]
    pub lane_wait: Duration,
    /// How long a dispatched stage may make no progress before its completions are counted
    /// again from the job records in the store.
    #[serde(with = "humantime_serde")]
    pub resync_after: Duration,
    /// How often the jobs stream is swept of acknowledged messages it kept (a clustered
    /// nats-server may keep some after a leader change); 0s turns it off.
    #[serde(with = "humantime_serde")]
    pub sweep_every: Duration,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            reconcile_every: Duration::from_secs(2),
            dispatch_lease: Duration::from_secs(30),
            lane_wait: Duration::from_secs(30),
            resync_after: Duration::from_secs(30),
            sweep_every: Duration::from_secs(60),
        }
    }
}

/// `dagfleet up` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpSettings {
    /// Directory for the NATS store (when `up` starts its own server) and local artifacts.
    pub data_dir: String,
    /// The nats-server executable started when no server is reachable.
    pub nats_server: String,
    /// Roles to start one worker of; all roles built into this binary when empty.
    pub roles: Vec<Role>,
}

impl Default for UpSettings {
    fn default() -> Self {
        Self {
            data_dir: ".dagfleet".into(),
            nats_server: "nats-server".into(),
            roles: Vec::new(),
        }
    }
}

/// Logging settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `tracing` filter, e.g. `info` or `dagfleet_runtime=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info,async_nats=warn".into(),
            format: "text".into(),
        }
    }
}

impl Config {
    /// Loads the layers. `flags` are `(dotted key, value)` pairs from the command line.
    pub fn load(file: Option<&Path>, flags: &[(&str, String)]) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                anyhow::bail!("config file {} does not exist", f.display());
            }
            fig = fig.merge(Toml::file(f));
        }
        // Config variables always name a section (`DAGFLEET_NATS__URL`); other DAGFLEET_*
        // variables (DAGFLEET_CONFIG, or ones scripts use for themselves) are not config.
        fig = fig.merge(
            Env::prefixed("DAGFLEET_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        for (k, v) in flags {
            fig = fig.merge(Serialized::default(k, v));
        }
        let cfg: Config = fig.extract().map_err(|e| {
            let msgs: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
            anyhow::anyhow!("invalid configuration:\n  {}", msgs.join("\n  "))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.queues
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        self.caps
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        if self.worker.concurrency == 0 {
            anyhow::bail!("invalid configuration: worker.concurrency must be at least 1");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            anyhow::bail!(
                "invalid configuration: log.format is `{}`; expected `text` or `json`",
                self.log.format
            );
        }
        if self.nats.url.trim().is_empty() {
            anyhow::bail!("invalid configuration: nats.url is empty");
        }
        if let Some(k) = &self.http.api_key {
            if k.expose().trim().len() < 8 {
                anyhow::bail!(
                    "invalid configuration: http.api_key must be at least 8 characters (it is shorter, or empty); unset it to serve on loopback only"
                );
            }
        }
        // Credentials in the URL would be printed and logged with it; they have their own,
        // redacted keys.
        if self.nats.url.split(',').any(|u| {
            u.split_once("://")
                .map_or(u, |(_, r)| r)
                .split('/')
                .next()
                .unwrap_or("")
                .contains('@')
        }) {
            anyhow::bail!(
                "invalid configuration: nats.url carries credentials (`user:password@`); set nats.user and nats.password (DAGFLEET_NATS__PASSWORD), nats.token or nats.creds_file instead"
            );
        }
        Ok(())
    }

    /// Opens the artifact store.
    pub fn open_store(&self) -> Result<dagfleet_runtime::ArtifactStore> {
        dagfleet_runtime::ArtifactStore::open(&self.store).context("opening the artifact store")
    }
}

/// Keys whose values are secrets: an error about one never repeats the value.
fn secret_key(path: &[String]) -> bool {
    path.last().is_some_and(|k| {
        let k = k.to_ascii_lowercase();
        ["password", "token", "secret", "api_key", "access_key"]
            .iter()
            .any(|s| k.contains(s))
    })
}

fn describe(e: &figment::Error) -> String {
    if secret_key(&e.path) {
        let src = e
            .metadata
            .as_ref()
            .map(|m| format!(" (from {})", m.name))
            .unwrap_or_default();
        return format!(
            "key `{}`: invalid value, not shown because it is a secret; expected a string{src}",
            e.path.join(".")
        );
    }
    let key = if e.path.is_empty() {
        String::new()
    } else {
        format!("key `{}`: ", e.path.join("."))
    };
    let src = e
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    format!("{key}{}{src}", e.kind)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's signature
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[nats]\nurl = \"nats://file:4222\"\n[worker]\nconcurrency = 7",
            )?;
            jail.set_env("DAGFLEET_WORKER__CONCURRENCY", "9");
            jail.set_env("DAGFLEET_PYTHON", "not config");
            let cfg = Config::load(Some(Path::new("c.toml")), &[]).map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats.url, "nats://file:4222");
            assert_eq!(cfg.worker.concurrency, 9);
            let cfg = Config::load(
                Some(Path::new("c.toml")),
                &[("nats.url", "nats://flag:1".into())],
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats.url, "nats://flag:1");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_never_echoed_and_url_credentials_refused() {
        figment::Jail::expect_with(|jail| {
            // A numeric password is a password.
            jail.set_env("DAGFLEET_NATS__PASSWORD", "987654321");
            let cfg = Config::load(None, &[]).map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats.password.unwrap().expose(), "987654321");
            // A secret of the wrong shape is refused without its value.
            jail.set_env("DAGFLEET_NATS__PASSWORD", "[987654321]");
            let e = Config::load(None, &[]).unwrap_err().to_string();
            assert!(
                !e.contains("987654321") && e.contains("nats.password"),
                "{e}"
            );
            jail.set_env("DAGFLEET_NATS__PASSWORD", "s");
            jail.set_env("DAGFLEET_NATS__URL", "nats://alice:hunter2@127.0.0.1:4222");
            let e = Config::load(None, &[]).unwrap_err().to_string();
            assert!(
                !e.contains("hunter2") && e.contains("carries credentials"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[nats]\nurll = \"x\"")?;
            let e = Config::load(Some(Path::new("c.toml")), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("urll"), "{e}");
            jail.create_file("d.toml", "[worker]\nconcurrency = 0")?;
            let e = Config::load(Some(Path::new("d.toml")), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("worker.concurrency"), "{e}");
            jail.set_env("DAGFLEET_QUEUES__STAGES__TRIAN__MAX_ATTEMPTS", "3");
            let e = Config::load(None, &[]).unwrap_err().to_string();
            assert!(e.contains("trian"), "{e}");
            Ok(())
        });
    }
}
