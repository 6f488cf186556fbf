//! Typed settings of the job layer. Every struct denies unknown fields, so a misspelt key is
//! an error that names it instead of a silently ignored line.

use dagfleet_protocol::{Role, Stage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A value that must never reach logs, events or artifacts. `Debug`, `Display` and
/// `Serialize` all print `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    /// A string, or a number taken as its digits: `DAGFLEET_NATS__PASSWORD=987654321` is a
    /// password, not an integer to refuse (and echo) in an error.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// How to reach NATS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<Secret>,
    /// Authentication token.
    pub token: Option<Secret>,
    /// Path to a `.creds` file (JWT + NKey).
    pub creds_file: Option<String>,
    /// PEM file of the CA that signed the server's certificate (private CAs).
    pub tls_ca: Option<String>,
    /// PEM client certificate, for servers that verify clients (with `tls_key`).
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<String>,
    /// Refuse to connect without TLS (implied by `tls://` URLs and by `tls_cert`).
    pub tls_required: bool,
    /// How long to wait for the first connection before giving up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Where artifacts go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `file:///abs/dir`, a plain directory path, `s3://bucket/prefix` or `memory://`.
    pub url: String,
    /// S3 endpoint for MinIO, Ceph, R2 and other S3-compatible servers; AWS when absent.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 access key id; taken from `AWS_ACCESS_KEY_ID` when absent.
    pub access_key_id: Option<Secret>,
    /// S3 secret key; taken from `AWS_SECRET_ACCESS_KEY` when absent.
    pub secret_access_key: Option<Secret>,
    /// Allow plain-HTTP endpoints (local MinIO).
    pub allow_http: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: ".dagfleet/artifacts".into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
        }
    }
}

/// Redelivery settings of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageQueue {
    /// How long a delivered job may go without an ack or an in-progress ack before JetStream
    /// redelivers it. Workers send in-progress acks every third of this while a job runs.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a job is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the n-th retry of a failed job; the last entry repeats.
    #[serde(with = "duration_list")]
    pub backoff: Vec<Duration>,
}

impl Default for StageQueue {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_attempts: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
        }
    }
}

impl StageQueue {
    /// Delay before redelivering after failed delivery number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) - 1) as usize;
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

mod duration_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime_serde::Serde::from(*d)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(d)?;
        Ok(v.into_iter().map(|x| x.into_inner()).collect())
    }
}

/// Queue settings for every stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Per-stage overrides; stages not listed use [`StageQueue::default`], except `train`
    /// whose default ack wait is 5 minutes.
    pub stages: BTreeMap<Stage, StageQueue>,
    /// JetStream deduplication window of the jobs and events streams.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Largest job message a worker accepts; larger ones are dead-lettered.
    pub max_job_bytes: usize,
    /// How long events are kept.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// Copies of every stream and KV bucket in a clustered JetStream (1 on one server; 3
    /// in a three-node cluster survives the loss of any one node). Consumers follow their
    /// stream. An existing stream with another count is moved to this one.
    pub replicas: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            stages: BTreeMap::new(),
            dedup_window: Duration::from_secs(3600),
            max_job_bytes: 512 * 1024,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

impl QueueConfig {
    /// Settings of `stage`.
    pub fn stage(&self, stage: Stage) -> StageQueue {
        self.stages.get(&stage).cloned().unwrap_or_else(|| {
            let mut q = StageQueue::default();
            if stage == Stage::Train {
                q.ack_wait = Duration::from_secs(300);
                q.max_attempts = 10;
            }
            q
        })
    }

    /// Settings of `role`'s consumer: the longest ack wait and the most attempts of its stages.
    pub fn role(&self, role: Role) -> StageQueue {
        let mut out = StageQueue {
            ack_wait: Duration::ZERO,
            max_attempts: 0,
            backoff: Vec::new(),
        };
        for st in role.stages() {
            let q = self.stage(st);
            out.ack_wait = out.ack_wait.max(q.ack_wait);
            out.max_attempts = out.max_attempts.max(q.max_attempts);
            if q.backoff.len() > out.backoff.len() {
                out.backoff = q.backoff;
            }
        }
        out
    }

    /// Checks values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        for (stage, q) in &self.stages {
            if q.max_attempts == 0 {
                return Err(format!(
                    "queues.stages.{stage}.max_attempts must be at least 1"
                ));
            }
            if q.ack_wait < Duration::from_secs(1) {
                return Err(format!(
                    "queues.stages.{stage}.ack_wait must be at least 1s"
                ));
            }
        }
        if self.max_job_bytes == 0 {
            return Err("queues.max_job_bytes must be at least 1".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!(
                "queues.replicas must be 1 to 5 (JetStream's limit), not {}",
                self.replicas
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let c = NatsConfig {
            password: Some(Secret::new("hunter2")),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
    }

    #[test]
    fn role_takes_the_longest_wait() {
        let mut q = QueueConfig::default();
        q.stages.insert(
            Stage::Dataset,
            StageQueue {
                ack_wait: Duration::from_secs(90),
                ..Default::default()
            },
        );
        assert_eq!(q.role(Role::Synthesizer).ack_wait, Duration::from_secs(90));
        assert_eq!(q.role(Role::Trainer).ack_wait, Duration::from_secs(300));
        assert_eq!(q.stage(Stage::Noop).delay(1), Duration::from_secs(1));
        assert_eq!(q.stage(Stage::Noop).delay(9), Duration::from_secs(30));
    }
}

/// Limits of an inference engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// KV cache size in tokens, all running sequences together (16-token blocks; allocated
    /// at once on CUDA, grown up to it elsewhere). A request needing more than this
    /// (prompt + max_tokens) is refused; others wait for free blocks, and running ones are
    /// preempted and recomputed when the cache runs out.
    pub kv_budget_tokens: usize,
    /// Most requests waiting; more are refused as overload.
    pub max_queue: usize,
    /// Most prompt tokens prefilled per scheduler step. A longer prompt is prefilled a
    /// chunk at a time between the decode steps of the running sequences, so it never
    /// stalls them, and its client can leave between chunks.
    pub prefill_chunk: usize,
    /// Longest a request may take from submission to its last token; past it the request
    /// ends with a deadline error and its slot is freed. `0s`: no deadline.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// `/health` reports the engine stalled (503) when it has work and no step has
    /// finished for this long.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            kv_budget_tokens: 262_144,
            max_queue: 1024,
            prefill_chunk: 512,
            deadline: Duration::from_secs(30 * 60),
            stall_after: Duration::from_secs(120),
        }
    }
}

/// Settings of inference workers and servers (`[inference]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSettings {
    /// Where model names that are not absolute paths are looked up.
    pub models_dir: String,
    /// `auto` (CUDA or Metal when built in and present, else CPU), `cpu`, `cuda` or `metal`.
    pub device: String,
    /// Batch size, KV budget and queue bound of the engine.
    pub engine: EngineConfig,
    /// A model to load at start, so the worker advertises it before its first job.
    pub preload: Option<String>,
    /// Quantize safetensors models' matmul weights on load: `q4k`, `q6k`, `q8_0`, `q4_0`.
    pub quantize: Option<String>,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        Self {
            models_dir: ".dagfleet/models".into(),
            device: "auto".into(),
            engine: EngineConfig::default(),
            preload: None,
            quantize: None,
        }
    }
}

/// Settings of trainer workers (`[trainer]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSettings {
    /// Where base-model names that are not absolute paths are looked up; when absent,
    /// `inference.models_dir`.
    pub models_dir: Option<String>,
    /// `auto` (CUDA or Metal when built in and present, else CPU), `cpu`, `cuda` or `metal`;
    /// when absent, `inference.device`.
    pub device: Option<String>,
}

/// Settings of judge workers (`[judge]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSettings {
    /// Where Airflow environments for DagBag judging live, one per `MAJOR.MINOR`
    /// (`<dir>/2.10/bin/python`), as `tests/airflow-env.sh` installs them; when absent,
    /// `$DAGFLEET_AIRFLOW_ENVS` or `~/.cache/dagfleet-airflow`. Set to `""` for none.
    pub airflow_envs: Option<String>,
    /// DagBag helper processes per Airflow version; 0 is one per core.
    pub dagbag_procs: usize,
    /// The longest one file may take to load under DagBag.
    #[serde(with = "humantime_serde")]
    pub dagbag_timeout: std::time::Duration,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        Self {
            airflow_envs: None,
            dagbag_procs: 0,
            dagbag_timeout: std::time::Duration::from_secs(30),
        }
    }
}
