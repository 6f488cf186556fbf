//! The JetStream topology and the [`Bus`] over it.
//!
//! # Topology
//! - `DAGFLEET_JOBS`: work-queue retention, file storage, deduplication by `Nats-Msg-Id` (the
//!   job id) over `queues.dedup_window`. One durable pull consumer per role
//!   (`dagfleet-<role>`), shared by every worker of that role, with the role's ack wait and
//!   `max_attempts + 1` deliveries: the extra delivery lets a worker dead-letter a job whose
//!   earlier holders all died, instead of leaving it stuck in the queue.
//! - `DAGFLEET_EVENTS`: limits retention; progress, results and failures.
//! - `DAGFLEET_DLQ`: dead letters with the original bytes and a `Dagfleet-Reason` header.
//! - KV `dagfleet_runs` (run state) and `dagfleet_workers` (heartbeats, short TTL).
//!
//! All names come from [`dagfleet_protocol::subjects`].

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use dagfleet_protocol::subjects as subj;
use dagfleet_protocol::{encode, Envelope, Event, JobId, Role, Stage, SCHEMA_VERSION};
use std::time::Duration;

use crate::config::{NatsConfig, QueueConfig};
use crate::error::BusError;

/// A connection to NATS with the dagfleet topology in place. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    queues: QueueConfig,
    runs: kv::Store,
    workers: kv::Store,
}

/// Whether NATS subject `subject` matches `filter` (`*` one token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// The URL with any `user:password@` removed, for messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}<redacted>@{}", &u[..s + 3], &u[at + 1..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn topo(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Topology(format!("{what}: {e}"))
}

impl Bus {
    /// Connects, then creates or updates the streams, consumers and buckets.
    pub async fn connect(
        nats: &NatsConfig,
        queues: QueueConfig,
        name: &str,
    ) -> Result<Self, BusError> {
        let client = connect(nats, name).await?;
        Self::with_client(client, queues).await
    }

    /// Sets up the topology over an existing client.
    pub async fn with_client(
        client: async_nats::Client,
        queues: QueueConfig,
    ) -> Result<Self, BusError> {
        let js = jetstream::new(client.clone());
        ensure_stream(
            &js,
            stream::Config {
                name: subj::JOBS_STREAM.into(),
                subjects: vec![subj::JOBS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: queues.dedup_window,
                max_message_size: (queues.max_job_bytes as i32).saturating_mul(4),
                num_replicas: queues.replicas,
                ..Default::default()
            },
        )
        .await?;
        ensure_stream(
            &js,
            stream::Config {
                name: subj::EVENTS_STREAM.into(),
                subjects: vec![subj::EVENTS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: queues.dedup_window.min(queues.events_max_age),
                max_age: queues.events_max_age,
                num_replicas: queues.replicas,
                ..Default::default()
            },
        )
        .await?;
        ensure_stream(
            &js,
            stream::Config {
                name: subj::DLQ_STREAM.into(),
                subjects: vec![subj::DLQ_SUBJECTS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(30 * 24 * 3600),
                num_replicas: queues.replicas,
                ..Default::default()
            },
        )
        .await?;
        // Run state is read back for compare-and-set: reads go to the stream's leader. A
        // follower that is catching up (a restarted node) could otherwise answer with a state
        // too old to count a completion in, and the completion would be dropped unnoticed.
        let runs = ensure_kv(
            &js,
            false,
            kv::Config {
                bucket: subj::RUNS_BUCKET.into(),
                history: 5,
                storage: stream::StorageType::File,
                num_replicas: queues.replicas,
                ..Default::default()
            },
        )
        .await?;
        // Heartbeats may be read from any replica: a stale one only delays a view.
        let workers = ensure_kv(
            &js,
            true,
            kv::Config {
                bucket: subj::WORKERS_BUCKET.into(),
                history: 1,
                max_age: Duration::from_secs(30),
                storage: stream::StorageType::Memory,
                num_replicas: queues.replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            client,
            js,
            queues,
            runs,
            workers,
        })
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Queue settings.
    pub fn queues(&self) -> &QueueConfig {
        &self.queues
    }

    /// The run-state bucket.
    pub fn runs(&self) -> &kv::Store {
        &self.runs
    }

    /// The worker-heartbeat bucket.
    pub fn workers(&self) -> &kv::Store {
        &self.workers
    }

    /// The durable pull consumer shared by all workers of `role`, created or updated to the
    /// current queue settings.
    pub async fn role_consumer(&self, role: Role) -> Result<consumer::PullConsumer, BusError> {
        self.jobs_consumer(role, subj::role_consumer(role), subj::role_filter(role))
            .await
    }

    /// The durable pull consumer shared by the workers of `role` that serve `lane` (see
    /// [`dagfleet_protocol::Job::lane`]).
    pub async fn lane_consumer(
        &self,
        role: Role,
        lane: &str,
    ) -> Result<consumer::PullConsumer, BusError> {
        self.jobs_consumer(
            role,
            subj::lane_consumer(role, lane),
            subj::lane_filter(role, lane),
        )
        .await
    }

    async fn jobs_consumer(
        &self,
        role: Role,
        name: String,
        filter: String,
    ) -> Result<consumer::PullConsumer, BusError> {
        let q = self.queues.role(role);
        let stream = self
            .js
            .get_stream(subj::JOBS_STREAM)
            .await
            .map_err(|e| topo("jobs stream", e))?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: filter,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: q.ack_wait,
                max_deliver: (q.max_attempts + 1) as i64,
                max_ack_pending: 20_000,
                ..Default::default()
            })
            .await
            .map_err(|e| topo(&format!("consumer {name}"), e))
    }

    /// Deletes the messages the jobs stream still holds although the consumer they belong to
    /// has acknowledged them. Work-queue retention removes a message on its ack; nats-server
    /// 2.9 keeps some after a restart or a leader change, in three ways seen in the fault and
    /// cluster tests:
    /// - messages at or below their consumer's ack floor (the ack reached the consumer's
    ///   state, not the stream);
    /// - messages below what the consumer has delivered while it has nothing awaiting an ack
    ///   (its ack floor stayed behind after the restart): delivered, not pending, so acked
    ///   (or out of deliveries, which the workers dead-letter on the last one);
    /// - a message count with no message behind it (the count is reset by purging the range
    ///   the scan found empty, which holds nothing a later publish can land in).
    ///
    /// They hold storage only (a redelivery would be found done), so this is clean-up; the
    /// coordinators run it every `coordinator.sweep_every`. Returns how many it deleted.
    pub async fn sweep_acked_jobs(&self) -> Result<u64, BusError> {
        use futures::TryStreamExt;
        let mut stream = self
            .js
            .get_stream(subj::JOBS_STREAM)
            .await
            .map_err(|e| topo("jobs stream", e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| topo("jobs stream info", e))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(0);
        }
        let infos: Vec<consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| topo("jobs stream consumers", e))?;
        // Each consumer's filters, and the sequence at or below which every message of
        // theirs is acknowledged.
        let mut floors: Vec<(String, u64)> = Vec::new();
        for info in infos {
            let mut floor = info.ack_floor.stream_sequence;
            if info.num_ack_pending == 0 {
                floor = floor.max(info.delivered.stream_sequence);
            }
            let filters = if !info.config.filter_subjects.is_empty() {
                info.config.filter_subjects.clone()
            } else if !info.config.filter_subject.is_empty() {
                vec![info.config.filter_subject.clone()]
            } else {
                vec![">".to_string()]
            };
            floors.extend(filters.into_iter().map(|f| (f, floor)));
        }
        let top = floors.iter().map(|f| f.1).max().unwrap_or(0);
        let mut deleted = 0;
        let mut seen = false;
        let mut seq = 1;
        while seq <= state.last_sequence {
            // The next message at or after `seq`, whatever its subject: a subject filter
            // would go through the server's per-subject index, which is what loses track of
            // these messages (a kept message is found by sequence but not by subject).
            let next = stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(">")
                .send()
                .await;
            let m = match next {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(topo(&format!("reading the jobs stream at {seq}"), e)),
            };
            if m.sequence > state.last_sequence {
                break;
            }
            seen = true;
            if m.sequence > top {
                break;
            }
            let acked = floors
                .iter()
                .find(|(f, _)| subject_matches(f, &m.subject))
                .is_some_and(|(_, floor)| m.sequence <= *floor);
            if acked {
                match stream.delete_message(m.sequence).await {
                    Ok(_) => deleted += 1,
                    // Gone meanwhile (another coordinator's sweep, or the server's own).
                    Err(e) => {
                        tracing::debug!(seq = m.sequence, error = %e, "acked job message not deleted")
                    }
                }
            }
            seq = m.sequence + 1;
        }
        if !seen {
            // Counted but not there: nothing lies at or below the last sequence the count
            // was taken at, and a new job gets a higher one.
            let r = stream
                .purge()
                .sequence(state.last_sequence + 1)
                .await
                .map_err(|e| topo("resetting the jobs stream's message count", e))?;
            tracing::info!(
                counted = state.messages,
                purged = r.purged,
                "the jobs stream counted messages it did not hold; its count was reset"
            );
            deleted += state.messages;
        }
        Ok(deleted)
    }

    /// The durable pull consumer on the events stream shared by all coordinators.
    pub async fn coordinator_consumer(&self) -> Result<consumer::PullConsumer, BusError> {
        let stream = self
            .js
            .get_stream(subj::EVENTS_STREAM)
            .await
            .map_err(|e| topo("events stream", e))?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(subj::COORDINATOR_CONSUMER.into()),
                filter_subject: subj::EVENTS_SUBJECTS.into(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 50_000,
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| topo("coordinator consumer", e))
    }

    /// Publishes jobs with `Nats-Msg-Id` = job id, pipelining the acks. Re-publishing a job
    /// within the dedup window is a no-op on the server.
    pub async fn publish_jobs(&self, jobs: &[Envelope]) -> Result<usize, BusError> {
        let mut pending = Vec::with_capacity(jobs.len());
        let mut fresh = 0;
        for env in jobs {
            let subject = subj::job_on(env.stage, env.job.lane().as_deref());
            let payload = Bytes::from(encode(env)?);
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(env.job_id.as_str())
                .header(subj::HDR_SCHEMA, SCHEMA_VERSION.to_string().as_str())
                .header(subj::HDR_TRACEPARENT, env.trace.traceparent.as_str());
            let fut = self
                .js
                .send_publish(subject.clone(), msg)
                .await
                .map_err(|e| BusError::Publish {
                    subject: subject.clone(),
                    reason: e.to_string(),
                })?;
            pending.push((subject, fut));
            if pending.len() >= 512 {
                fresh += drain(&mut pending).await?;
            }
        }
        fresh += drain(&mut pending).await?;
        Ok(fresh)
    }

    /// Publishes an event and waits for JetStream to store it. `dedup` makes republishing the
    /// same event (after a crash) a no-op.
    pub async fn publish_event(&self, ev: &Event, dedup: Option<&str>) -> Result<(), BusError> {
        let subject = subj::event(&ev.run_id, ev.kind.name());
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(encode(ev)?))
            .header(subj::HDR_SCHEMA, SCHEMA_VERSION.to_string().as_str());
        if let Some(id) = dedup {
            msg = msg.message_id(id);
        }
        self.publish_stored(subject, msg).await
    }

    /// Publishes `msg` and waits until JetStream has stored it.
    async fn publish_stored(
        &self,
        subject: String,
        msg: jetstream::message::PublishMessage,
    ) -> Result<(), BusError> {
        let err = |e: &dyn std::fmt::Display, subject: &str| BusError::Publish {
            subject: subject.to_string(),
            reason: e.to_string(),
        };
        let fut = self
            .js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|e| err(&e, &subject))?;
        fut.await.map_err(|e| err(&e, &subject))?;
        Ok(())
    }

    /// Moves a message to the dead-letter stream with `reason`, keeping its bytes.
    pub async fn dead_letter(
        &self,
        role: Role,
        stage: Option<Stage>,
        job_id: Option<&JobId>,
        origin: &str,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), BusError> {
        let subject = subj::dead_letter(role, stage);
        let mut headers = HeaderMap::new();
        // Header values cannot hold newlines; keep the reason on one line.
        let one_line: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(2000)
            .collect();
        headers.insert(subj::HDR_REASON, one_line.as_str());
        headers.insert(subj::HDR_ORIGIN, origin);
        if let Some(id) = job_id {
            headers.insert(subj::HDR_JOB_ID, id.as_str());
        }
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(headers);
        self.publish_stored(subject, msg).await
    }
}

async fn drain(
    pending: &mut Vec<(String, jetstream::context::PublishAckFuture)>,
) -> Result<usize, BusError> {
    let mut fresh = 0;
    for (subject, fut) in pending.drain(..) {
        let ack = fut.await.map_err(|e| BusError::Publish {
            subject,
            reason: e.to_string(),
        })?;
        if !ack.duplicate {
            fresh += 1;
        }
    }
    Ok(fresh)
}

/// Connects to NATS with unlimited reconnects, failing with a clear error when no server
/// answers within `connect_timeout`.
pub async fn connect(nats: &NatsConfig, name: &str) -> Result<async_nats::Client, BusError> {
    // Ignored when a provider is already installed (by an earlier connect, or the host).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(nats.connect_timeout)
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 200).min(2_000))
        });
    if let (Some(u), Some(p)) = (&nats.user, &nats.password) {
        opts = opts.user_and_password(u.clone(), p.expose().to_string());
    }
    if let Some(t) = &nats.token {
        opts = opts.token(t.expose().to_string());
    }
    if let Some(c) = &nats.creds_file {
        opts = opts
            .credentials_file(c)
            .await
            .map_err(|e| BusError::Connect {
                url: redact_url(&nats.url),
                reason: format!("nats.creds_file `{c}`: {e}"),
            })?;
    }
    let tls_err = |key: &str, path: &str, why: &str| BusError::Connect {
        url: redact_url(&nats.url),
        reason: format!("nats.{key} `{path}`: {why}"),
    };
    if let Some(ca) = &nats.tls_ca {
        if !std::path::Path::new(ca).is_file() {
            return Err(tls_err("tls_ca", ca, "no such file"));
        }
        opts = opts.add_root_certificates(ca.into());
    }
    match (&nats.tls_cert, &nats.tls_key) {
        (Some(cert), Some(key)) => {
            for (k, p) in [("tls_cert", cert), ("tls_key", key)] {
                if !std::path::Path::new(p).is_file() {
                    return Err(tls_err(k, p, "no such file"));
                }
            }
            opts = opts.add_client_certificate(cert.into(), key.into());
        }
        (Some(cert), None) => return Err(tls_err("tls_cert", cert, "needs nats.tls_key")),
        (None, Some(key)) => return Err(tls_err("tls_key", key, "needs nats.tls_cert")),
        (None, None) => {}
    }
    let tls_url = nats.url.split(',').any(|u| u.trim().starts_with("tls://"));
    if nats.tls_required || tls_url || nats.tls_cert.is_some() {
        opts = opts.require_tls(true);
    }
    // Every node of a cluster, comma-separated; the client fails over between them.
    let addrs = nats
        .url
        .split(',')
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::Connect {
                    url: redact_url(&nats.url),
                    reason: format!("`{}` is not a NATS URL: {e}", redact_url(u)),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    opts.connect(addrs.as_slice())
        .await
        .map_err(|e| BusError::Connect {
            url: redact_url(&nats.url),
            reason: e.to_string(),
        })
}

async fn ensure_stream(js: &jetstream::Context, cfg: stream::Config) -> Result<(), BusError> {
    let name = cfg.name.clone();
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| topo(&name, e))?;
            let current = &info.config;
            if current.subjects != cfg.subjects
                || current.duplicate_window != cfg.duplicate_window
                || current.max_age != cfg.max_age
                || current.max_message_size != cfg.max_message_size
                || current.num_replicas != cfg.num_replicas
            {
                // A worker with per-role permissions may not update streams: it works with
                // the stream as the coordinators set it up.
                if let Err(e) = js.update_stream(&cfg).await {
                    tracing::warn!(stream = %name, error = %e, "stream settings differ from this process's and could not be updated; using the stream as it is");
                }
            }
            Ok(())
        }
        Err(_) => match js.create_stream(cfg.clone()).await {
            Ok(_) => Ok(()),
            // Another process created it between our get and create.
            Err(_) if js.get_stream(&name).await.is_ok() => Ok(()),
            Err(e) => Err(topo(&name, e)),
        },
    }
}

/// Creates a KV bucket's backing stream directly. `create_key_value` first asks for account
/// info in a shape nats-server 2.9 does not send, so the stream is made here with the same
/// settings the client would use.
async fn ensure_kv(
    js: &jetstream::Context,
    direct: bool,
    cfg: kv::Config,
) -> Result<kv::Store, BusError> {
    let bucket = cfg.bucket.clone();
    if let Ok(s) = js.get_key_value(&bucket).await {
        // A bucket made with another replica count or read mode is moved to this one (best
        // effort, as for streams: a worker may not have the right).
        if let Ok(mut st) = js.get_stream(format!("KV_{bucket}")).await {
            if let Ok(info) = st.info().await {
                let want = cfg.num_replicas.max(1);
                if info.config.num_replicas != want || info.config.allow_direct != direct {
                    let mut c = info.config.clone();
                    c.num_replicas = want;
                    c.allow_direct = direct;
                    match js.update_stream(&c).await {
                        // The store caches the read mode: open it again.
                        Ok(_) => {
                            return js
                                .get_key_value(&bucket)
                                .await
                                .map_err(|e| topo(&format!("KV {bucket}"), e))
                        }
                        Err(e) => {
                            tracing::warn!(bucket = %bucket, error = %e, "KV bucket settings differ from this process's and could not be updated; using the bucket as it is")
                        }
                    }
                }
            }
        }
        return Ok(s);
    }
    let stream = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: cfg.history.max(1),
        max_age: cfg.max_age,
        storage: cfg.storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: direct,
        discard: stream::DiscardPolicy::New,
        num_replicas: cfg.num_replicas.max(1),
        ..Default::default()
    };
    if let Err(e) = js.create_stream(stream).await {
        if js.get_key_value(&bucket).await.is_err() {
            return Err(topo(&format!("KV {bucket}"), e));
        }
    }
    js.get_key_value(&bucket)
        .await
        .map_err(|e| topo(&format!("KV {bucket}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("nats://bob:s3cret@host:4222,nats://h2:4222"),
            "nats://<redacted>@host:4222,nats://h2:4222"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn subjects_match_filters_token_by_token() {
        assert!(subject_matches(
            "dagfleet.jobs.noop.>",
            "dagfleet.jobs.noop.noop"
        ));
        assert!(subject_matches(
            "dagfleet.jobs.*.noop",
            "dagfleet.jobs.judge.noop"
        ));
        assert!(subject_matches(">", "a"));
        assert!(!subject_matches(
            "dagfleet.jobs.noop.>",
            "dagfleet.jobs.noop"
        ));
        assert!(!subject_matches(
            "dagfleet.jobs.noop.>",
            "dagfleet.jobs.noopx.a"
        ));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.*", "a"));
    }
}
