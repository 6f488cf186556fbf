//! Helpers for dagfleet's integration tests: real servers on loopback, killed on drop.
//!
//! - [`NatsServer`]: `nats-server -js` on a random port with its own store directory; it can
//!   be killed and restarted on the same port and store.
//! - [`S3Server`]: an S3-compatible server (s3s-fs) on a random loopback port, inside the
//!   test process, with access-key authentication.
//! - [`Stack`]: coordinators and noop workers in-process.
//! - [`Proc`]: a `dagfleet` child process (worker or coordinator) for kill -9 tests.

pub mod teacher;

use dagfleet_coordinator::{Coordinator, CoordinatorConfig};
use dagfleet_protocol::{RunId, RunState, RunStatus};
use dagfleet_runtime::config::Secret;
use dagfleet_runtime::{
    ArtifactStore, Bus, NatsConfig, QueueConfig, StoreConfig, Worker, WorkerConfig,
};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A real `nats-server -js`.
pub struct NatsServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its store directory.
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a random port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra arguments (e.g. `--user`, `--pass`).
    pub fn start_with(args: &[&str]) -> Self {
        let mut s = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (apt-get install nats-server)");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Connection settings for this server.
    pub fn config(&self) -> NatsConfig {
        NatsConfig {
            url: self.url(),
            ..Default::default()
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three `nats-server -js` processes on loopback, routed into one JetStream cluster
/// (`server_name` n0, n1, n2, each with its own store); any one can be killed and restarted
/// on its ports and store.
pub struct NatsCluster {
    /// The nodes, by index; `None` while killed.
    nodes: Vec<Option<Child>>,
    /// Client ports.
    pub ports: Vec<u16>,
    confs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers on each.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_urls: Vec<String> = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let confs: Vec<PathBuf> = (0..3)
            .map(|i| {
                let store = dir.path().join(format!("n{i}"));
                let conf = dir.path().join(format!("n{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\ncluster {{\n  name: dagfleet\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                        ports[i],
                        store.display(),
                        routes[i],
                        route_urls.join(", ")
                    ),
                )
                .expect("writing a nats-server config");
                conf
            })
            .collect();
        let mut c = Self {
            nodes: (0..3).map(|_| None).collect(),
            ports,
            confs,
            _dir: dir,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30)).await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.confs[i])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (apt-get install nats-server)");
        self.nodes[i] = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.ports[i])).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "node n{i} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a JetStream request through every live node succeeds (the meta leader is
    /// elected and reachable).
    pub async fn wait_ready(&self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let mut ok = true;
            for (i, n) in self.nodes.iter().enumerate() {
                if n.is_none() {
                    continue;
                }
                let url = format!("nats://127.0.0.1:{}", self.ports[i]);
                ok &= match async_nats::connect(&url).await {
                    // $JS.API.INFO answers with an error until the meta leader is known.
                    Ok(c) => match c.request("$JS.API.INFO", "".into()).await {
                        Ok(m) => serde_json::from_slice::<serde_json::Value>(&m.payload)
                            .is_ok_and(|v| v.get("error").is_none()),
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
            }
            if ok {
                return;
            }
            assert!(t0.elapsed() < limit, "the JetStream cluster did not form");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every node's URL, comma-separated, as `nats.url` takes them.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connection settings for the cluster.
    pub fn config(&self) -> NatsConfig {
        NatsConfig {
            url: self.url(),
            ..Default::default()
        }
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// The index of the node named `server_name` (n0, n1, n2).
    pub fn index_of(name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// An S3-compatible server (s3s-fs) in this process.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Files behind it.
    pub dir: tempfile::TempDir,
    /// Bucket created at start.
    pub bucket: String,
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    stop: CancellationToken,
}

impl S3Server {
    /// Starts a server with one bucket and access-key authentication.
    pub async fn start(bucket: &str, access_key: &str, secret_key: &str) -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto::Builder as ConnBuilder;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(bucket)).expect("bucket dir");
        let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs");
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(access_key, secret_key));
        let service = b.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (sock, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                let conn = http
                    .serve_connection(TokioIo::new(sock), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Self {
            endpoint: format!("http://{addr}"),
            dir,
            bucket: bucket.into(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            stop,
        }
    }

    /// Store settings for `s3://<bucket>/<prefix>` on this server.
    pub fn store_config(&self, prefix: &str) -> StoreConfig {
        StoreConfig {
            url: format!("s3://{}/{prefix}", self.bucket),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(Secret::new(self.access_key.clone())),
            secret_access_key: Some(Secret::new(self.secret_key.clone())),
            allow_http: true,
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Queue settings that make tests fast: short ack waits and backoffs.
pub fn fast_queues() -> QueueConfig {
    let mut q = QueueConfig::default();
    q.stages.insert(
        dagfleet_protocol::Stage::Noop,
        dagfleet_runtime::StageQueue {
            ack_wait: Duration::from_secs(2),
            max_attempts: 5,
            backoff: vec![Duration::from_millis(50)],
        },
    );
    // A killed trainer's job comes back within seconds; a live one keeps it with
    // in-progress acks every second.
    q.stages.insert(
        dagfleet_protocol::Stage::Train,
        dagfleet_runtime::StageQueue {
            ack_wait: Duration::from_secs(3),
            max_attempts: 5,
            backoff: vec![Duration::from_millis(200)],
        },
    );
    q
}

/// Coordinator settings that make tests fast.
pub fn fast_coordinator(id: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        id: id.into(),
        reconcile_every: Duration::from_millis(300),
        dispatch_lease: Duration::from_secs(3),
        event_batch: 1000,
        resync_after: Duration::from_secs(5),
        sweep_every: Duration::from_secs(2),
        ..Default::default()
    }
}

/// Coordinators and noop workers running in this process.
pub struct Stack {
    /// A bus for the test itself.
    pub bus: Bus,
    /// The artifact store.
    pub store: ArtifactStore,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Stack {
    /// Starts `coordinators` coordinators and `workers` noop workers against `nats`.
    pub async fn start(
        nats: &NatsConfig,
        store: ArtifactStore,
        coordinators: usize,
        workers: usize,
    ) -> Self {
        Self::start_with(nats, fast_queues(), store, coordinators, workers).await
    }

    /// [`Stack::start`] with these queue settings (e.g. `replicas` for a cluster).
    pub async fn start_with(
        nats: &NatsConfig,
        queues: QueueConfig,
        store: ArtifactStore,
        coordinators: usize,
        workers: usize,
    ) -> Self {
        let bus = Bus::connect(nats, queues.clone(), "test")
            .await
            .expect("bus");
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..coordinators {
            let b = Bus::connect(nats, queues.clone(), "test-coord")
                .await
                .expect("bus");
            let c = Coordinator::new(b, store.clone(), fast_coordinator(&format!("c{i}")));
            let s = stop.clone();
            tasks.spawn(async move {
                c.run(s).await.expect("coordinator");
            });
        }
        for i in 0..workers {
            let b = Bus::connect(nats, queues.clone(), "test-worker")
                .await
                .expect("bus");
            let mut wc = WorkerConfig::new(dagfleet_protocol::Role::Noop);
            wc.worker_id = format!("w{i}");
            wc.concurrency = 8;
            wc.shutdown_grace = Duration::from_secs(5);
            let w = Worker::new(b, store.clone(), dagfleet_noop::NoopHandler::default(), wc);
            let s = stop.clone();
            tasks.spawn(async move {
                w.run(s).await.expect("worker");
            });
        }
        Self {
            bus,
            store,
            stop,
            tasks,
        }
    }

    /// Submits a run spec.
    pub async fn submit(&self, spec: &str) -> RunId {
        dagfleet_coordinator::submit(&self.bus, &self.store, spec, &Default::default())
            .await
            .expect("submit")
    }

    /// Stops everything and waits.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Every job record of `run` in `store`.
pub async fn job_records(store: &ArtifactStore, run: &RunId) -> Vec<dagfleet_protocol::JobRecord> {
    let mut out = Vec::new();
    for k in store
        .list(&dagfleet_runtime::store::records_prefix(run))
        .await
        .expect("listing job records")
    {
        let b = store.get_opt(&k).await.expect("reading a job record");
        if let Some(b) = b {
            out.push(serde_json::from_slice(&b).expect("a job record"));
        }
    }
    out
}

/// Waits until the jobs stream holds no message (every job acked and gone: the work queue
/// removes a message on its ack, and the coordinators' sweep deletes acked ones a server
/// kept); panics after `limit`. Returns how many it held at first.
pub async fn wait_jobs_stream_empty(bus: &Bus, limit: Duration) -> u64 {
    let t0 = Instant::now();
    let mut first = None;
    loop {
        let mut s = bus
            .jetstream()
            .get_stream(dagfleet_protocol::subjects::JOBS_STREAM)
            .await
            .expect("jobs stream");
        let n = s.info().await.expect("jobs stream info").state.messages;
        let first = *first.get_or_insert(n);
        if n == 0 {
            return first;
        }
        if t0.elapsed() >= limit {
            use futures::TryStreamExt;
            let st = s.info().await.expect("jobs stream info").state.clone();
            let m = s.get_raw_message(st.first_sequence).await;
            let consumers: Vec<String> = s
                .consumers()
                .try_collect::<Vec<_>>()
                .await
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    format!(
                        "{} filter {} ack floor {} delivered {} pending {} ack pending {} redelivered {}",
                        c.name,
                        c.config.filter_subject,
                        c.ack_floor.stream_sequence,
                        c.delivered.stream_sequence,
                        c.num_pending,
                        c.num_ack_pending,
                        c.num_redelivered
                    )
                })
                .collect();
            let sweep = bus.sweep_acked_jobs().await;
            panic!(
                "{n} job messages still in the jobs stream after {limit:?} (first {first}); stream {}..{}, first message {:?}; consumers: {consumers:#?}; a sweep now: {sweep:?}",
                st.first_sequence,
                st.last_sequence,
                m.map(|m| (m.sequence, m.subject.to_string()))
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `run` is done or failed; panics after `limit`.
pub async fn wait_run(bus: &Bus, run: &RunId, limit: Duration) -> RunState {
    let t0 = Instant::now();
    loop {
        if let Ok(Some((st, _))) = dagfleet_coordinator::load_run(bus, run).await {
            if st.status != RunStatus::Running {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "run {run} still running after {limit:?}: {:?}",
                st.stages
                    .iter()
                    .map(|s| (s.stage, s.status, s.done.len(), s.failed.len(), s.jobs))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of the `dagfleet` binary. Tests that spawn it are test targets of the `dagfleet`
/// package, so cargo builds it first and tells them where it is through
/// `CARGO_BIN_EXE_dagfleet`; they record it with [`set_dagfleet_bin`].
pub fn dagfleet_bin() -> PathBuf {
    let bin = std::env::var_os("DAGFLEET_TEST_BIN")
        .map(PathBuf::from)
        .expect("DAGFLEET_TEST_BIN is not set: call set_dagfleet_bin(env!(\"CARGO_BIN_EXE_dagfleet\")) first");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// Records where the `dagfleet` binary is, for [`dagfleet_bin`] and [`Proc`].
pub fn set_dagfleet_bin(path: &str) {
    // Set once per test process, before any child is spawned; every test sets the same value.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY-free: edition 2021 `set_var` is safe; the value is the same for every caller.
        std::env::set_var("DAGFLEET_TEST_BIN", path);
    });
}

/// A `dagfleet` child process, killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
}

impl Proc {
    /// Starts `dagfleet ARGS` with `env`, logging to `log` if given.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], log: Option<&std::path::Path>) -> Self {
        Self::spawn_bin(&dagfleet_bin().to_string_lossy(), args, env, log)
    }

    /// Starts `BIN ARGS` with `env`, logging to `log` if given.
    pub fn spawn_bin(
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        match log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .expect("log file");
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        Self {
            child: cmd.spawn().expect("spawn dagfleet"),
        }
    }

    /// Sends SIGKILL and reaps.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `dagfleet up --run SPEC` in `dir` (its own nats-server on a free port, artifacts in
/// `dir/.dagfleet/artifacts`), asserts that the run succeeded, and returns its stdout, its
/// stderr (the progress lines) and the run's artifact directory.
pub fn up_run(dir: &std::path::Path, spec: &std::path::Path) -> (String, String, PathBuf) {
    let out = Command::new(dagfleet_bin())
        .current_dir(dir)
        .args([
            "--nats-url",
            &format!("nats://127.0.0.1:{}", free_port()),
            "up",
            "--run",
        ])
        .arg(spec)
        .output()
        .expect("dagfleet up --run");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let run = std::fs::read_dir(dir.join(".dagfleet/artifacts/runs"))
        .expect("runs directory")
        .flatten()
        .next()
        .expect("a run")
        .path();
    (stdout, stderr, run)
}

/// A local-directory artifact store in a temp dir.
pub fn temp_store() -> (tempfile::TempDir, ArtifactStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ArtifactStore::open(&StoreConfig {
        url: dir.path().to_string_lossy().into_owned(),
        ..Default::default()
    })
    .expect("store");
    (dir, store)
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF the CPU inference tests run: `DAGFLEET_SMOLLM2`, or
/// where `tests/fetch-models.sh` puts it. Panics with the fix when it is missing.
pub fn smollm2() -> PathBuf {
    let p = std::env::var("DAGFLEET_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/dagfleet-models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/fetch-models.sh` (tests/run.sh does) or set DAGFLEET_SMOLLM2",
        p.display()
    );
    p
}

/// `dagfleet serve` over SmolLM2 on CPU on a free loopback port, once it accepts
/// connections: the process (stopped on drop) and its base URL. Needs
/// [`set_dagfleet_bin`] first.
pub fn serve_smollm2() -> (Proc, String) {
    let port = free_port();
    let serve = Proc::spawn(
        &[
            "serve",
            smollm2().to_str().unwrap_or_default(),
            "--addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[("DAGFLEET_INFERENCE__DEVICE", "cpu")],
        None,
    );
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed().as_secs() < 60, "dagfleet serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (serve, format!("http://127.0.0.1:{port}"))
}
