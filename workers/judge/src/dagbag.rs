//! DagBag, Airflow's own loader, as a judge backend: the ground truth for "Airflow accepts
//! this file".
//!
//! A [`Dagbag`] keeps a few long-lived Python helpers (`dagbag.py`, embedded here), each with
//! Airflow imported once, a private `AIRFLOW_HOME` and its own sqlite database. Every file is
//! loaded in a child the helper forks for it, with no network, a memory and CPU limit and a
//! timeout, so one file that hangs, prints or crashes costs only its own verdict. The
//! helpers run with a cleared environment: no credential the worker holds is visible to the
//! code being judged.
//!
//! Environments come from `tests/airflow-env.sh` (one virtualenv per Airflow `MAJOR.MINOR`
//! under `~/.cache/dagfleet-airflow`, or `$DAGFLEET_AIRFLOW_ENVS`); [`discover`] finds them
//! and a worker advertises the versions it found.

use dagfleet_analysis::kb::{Kb, Lookup};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const HELPER: &str = include_str!("dagbag.py");

/// Longest import-error text an evaluation row keeps.
const MAX_ERROR_CHARS: usize = 4000;

/// An Airflow installation the judge can load files with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AirflowEnv {
    /// `MAJOR.MINOR`, e.g. `2.10`.
    pub version: String,
    /// Its Python interpreter.
    pub python: PathBuf,
}

/// Where `tests/airflow-env.sh` installs environments unless told otherwise.
pub fn default_root() -> Option<PathBuf> {
    if let Some(r) = std::env::var_os("DAGFLEET_AIRFLOW_ENVS") {
        return Some(PathBuf::from(r));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/dagfleet-airflow"))
}

/// The environments `settings` point at: `judge.airflow_envs` (`""` for none), else
/// [`default_root`].
pub fn configured(
    settings: &dagfleet_runtime::config::JudgeSettings,
) -> (Option<PathBuf>, Vec<AirflowEnv>) {
    let root = match settings.airflow_envs.as_deref() {
        Some("") => None,
        Some(d) => Some(PathBuf::from(d)),
        None => default_root(),
    };
    let envs = root.as_deref().map(discover).unwrap_or_default();
    (root, envs)
}

/// Helper processes per pool: `judge.dagbag_procs`, or one per core when it is 0.
pub fn procs(settings: &dagfleet_runtime::config::JudgeSettings) -> usize {
    match settings.dagbag_procs {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The environments under `root`: every `<MAJOR.MINOR>/bin/python` there, in version order.
pub fn discover(root: &Path) -> Vec<AirflowEnv> {
    let mut out: Vec<AirflowEnv> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let (a, b) = name.split_once('.')?;
            let key: (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
            let python = e.path().join("bin/python");
            python.is_file().then_some((
                key,
                AirflowEnv {
                    version: name,
                    python,
                },
            ))
        })
        .map(|(_, e)| e)
        .collect();
    out.sort_by_key(|e| version_key(&e.version));
    out
}

/// `2.10` → `(2, 10)`, for ordering; unparsable versions sort first.
pub fn version_key(v: &str) -> (u32, u32) {
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    (
        a.parse().unwrap_or(0),
        b.split('.')
            .next()
            .and_then(|b| b.parse().ok())
            .unwrap_or(0),
    )
}

/// What DagBag made of one file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DagbagVerdict {
    /// The Airflow version that loaded it, e.g. `2.10.5`.
    pub airflow: String,
    /// At least one DAG and no import error.
    pub clean: bool,
    /// `loaded`, `timeout` (the file did not finish loading in time) or `crashed`.
    pub status: String,
    /// DAG ids it defined.
    pub dag_ids: Vec<String>,
    /// Tasks over all its DAGs.
    pub tasks: usize,
    /// Why it is not clean: the exception class of the import error (`SyntaxError`,
    /// `ModuleNotFoundError`, `NameError`, ...), or `NoDag`, `Timeout`, `Crashed`.
    pub error_class: Option<String>,
    /// The import error's last line.
    pub error: Option<String>,
    /// For `ModuleNotFoundError`: the module.
    pub module: Option<String>,
    /// For `ModuleNotFoundError`: `missing_provider` (a provider package that exists but is
    /// not installed), `unknown_provider` (an `airflow.providers.*` package dagfleet does not
    /// know), `no_such_module` (no Airflow release has it) or `not_installed` (a non-Airflow
    /// package).
    pub cause: Option<String>,
    /// Wall time of the load.
    pub seconds: f64,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    dag_ids: Vec<String>,
    #[serde(default)]
    tasks: std::collections::BTreeMap<String, usize>,
    #[serde(default)]
    import_error: Option<String>,
    #[serde(default)]
    status: String,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    error: Option<String>,
}

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_ERROR_CHARS {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX_ERROR_CHARS).collect();
    t.push('…');
    t
}

/// Classifies a `No module named 'x'` by what dagfleet's knowledge base knows of `x`.
pub fn module_cause(module: &str) -> &'static str {
    let kb = Kb::get();
    // Python names the first missing component: a provider that is not installed shows as
    // its root package, which the index knows; a module the provider never had does not.
    if module.starts_with("airflow.providers.") {
        return match kb.lookup(module, None) {
            Lookup::Exists => "missing_provider",
            Lookup::OtherProvider(_) | Lookup::Unknown => "unknown_provider",
            Lookup::NoModule | Lookup::NoName => "no_such_module",
        };
    }
    if module == "airflow" || module.starts_with("airflow.") {
        return match kb.lookup(module, None) {
            Lookup::Exists => "missing_provider",
            _ => "no_such_module",
        };
    }
    "not_installed"
}

impl DagbagVerdict {
    fn from_answer(a: Answer, airflow: &str) -> Self {
        let mut v = DagbagVerdict {
            airflow: airflow.to_string(),
            status: a.status.clone(),
            tasks: a.tasks.values().sum(),
            dag_ids: a.dag_ids,
            seconds: a.seconds,
            ..Default::default()
        };
        match (a.status.as_str(), a.import_error) {
            ("timeout", _) => {
                v.error_class = Some("Timeout".into());
                v.error = Some(format!(
                    "the file did not finish loading within the timeout ({:.0} s)",
                    a.seconds
                ));
            }
            ("loaded", Some(err)) => {
                let last = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let class = last
                    .split_once(':')
                    .map(|(c, _)| c)
                    .unwrap_or(&last)
                    .rsplit('.')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let class = if !class.is_empty()
                    && class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    class
                } else {
                    "ImportError".into()
                };
                if class == "ModuleNotFoundError" {
                    if let Some(m) = last.split('\'').nth(1) {
                        v.cause = Some(module_cause(m).into());
                        v.module = Some(m.to_string());
                    }
                }
                v.error_class = Some(class);
                v.error = Some(clip(&last));
            }
            ("loaded", None) if v.dag_ids.is_empty() => {
                v.error_class = Some("NoDag".into());
                v.error = Some("DagBag found no DAG in the file".into());
            }
            ("loaded", None) => v.clean = true,
            (_, _) => {
                v.error_class = Some("Crashed".into());
                v.error = Some(match (a.signal, a.error) {
                    (_, Some(e)) => clip(&e),
                    (Some(s), _) => format!("the process loading the file died of signal {s}"),
                    _ => "the process loading the file died without an answer".into(),
                });
            }
        }
        v
    }
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
    next: u64,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why DagBag cannot judge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DagbagError {
    /// A file or folder of a helper cannot be made.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Airflow environment's interpreter cannot be started.
    #[error("cannot start the Airflow {version} interpreter {}: {source}", python.display())]
    Spawn {
        /// The Airflow version.
        version: String,
        /// The interpreter.
        python: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A helper stopped; the message holds the last lines it wrote to stderr.
    #[error("{0}")]
    Exited(String),
    /// Writing to or reading from a helper failed.
    #[error("the DagBag helper's pipe: {0}")]
    Pipe(#[source] std::io::Error),
    /// A helper's answer does not have the expected shape.
    #[error("the DagBag helper's answer: {0}")]
    Answer(#[source] serde_json::Error),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DagbagError + 'a {
    move |source| DagbagError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn stderr_tail(dir: &Path) -> String {
    let s = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(6).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

impl Helper {
    /// Starts one helper in `dir` and waits for it to say it is ready.
    fn start(
        env: &AirflowEnv,
        dir: &Path,
        timeout: Duration,
    ) -> Result<(Self, String), DagbagError> {
        std::fs::create_dir_all(dir.join("dags")).map_err(io_err("create", dir))?;
        let script = dir.join("dagbag.py");
        std::fs::write(&script, HELPER).map_err(io_err("write", &script))?;
        let log = std::fs::File::create(dir.join("stderr.log")).map_err(io_err("create", dir))?;
        // A cleared environment: the code being judged sees no credential of the worker's.
        let mut cmd = Command::new(&env.python);
        cmd.arg(&script)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir)
            .env("AIRFLOW_HOME", dir)
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env(
                "DAGFLEET_DAGBAG_TIMEOUT",
                timeout.as_secs().max(1).to_string(),
            )
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().map_err(|source| DagbagError::Spawn {
            version: env.version.to_string(),
            python: env.python.clone(),
            source,
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(DagbagError::Exited("the DagBag helper has no pipes".into()));
        };
        let mut h = Helper {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            dir: dir.to_path_buf(),
            next: 0,
        };
        let mut line = String::new();
        loop {
            line.clear();
            match h.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    return Err(DagbagError::Exited(format!(
                        "the DagBag helper for Airflow {} ({}) exited before it was ready: {}",
                        env.version,
                        env.python.display(),
                        stderr_tail(dir)
                    )))
                }
                Ok(_) => {}
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["ready"] == true {
                    let airflow = v["airflow"].as_str().unwrap_or("").to_string();
                    return Ok((h, airflow));
                }
            }
        }
    }

    fn ask(&mut self, code: &str, timeout: Duration) -> Result<Answer, DagbagError> {
        self.next += 1;
        let id = self.next;
        // The file name keeps DagBag's safe-mode heuristic and import paths simple.
        let path = self.dir.join("dags").join(format!("dag_{id}.py"));
        std::fs::write(&path, code).map_err(io_err("write", &path))?;
        let req = serde_json::json!({"id": id, "path": path, "timeout": timeout.as_secs_f64()});
        let res = (|| {
            writeln!(self.stdin, "{req}").map_err(DagbagError::Pipe)?;
            self.stdin.flush().map_err(DagbagError::Pipe)?;
            let mut line = String::new();
            loop {
                line.clear();
                if self
                    .stdout
                    .read_line(&mut line)
                    .map_err(DagbagError::Pipe)?
                    == 0
                {
                    return Err(DagbagError::Exited(format!(
                        "the helper exited: {}",
                        stderr_tail(&self.dir)
                    )));
                }
                let v: serde_json::Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if v["id"] == id {
                    return serde_json::from_value(v).map_err(DagbagError::Answer);
                }
            }
        })();
        let _ = std::fs::remove_file(&path);
        res
    }
}

/// A pool of DagBag helpers for one Airflow version.
pub struct Dagbag {
    env: AirflowEnv,
    airflow: String,
    timeout: Duration,
    home: tempfile::TempDir,
    free: Mutex<Vec<Helper>>,
    ready: Condvar,
    started: Mutex<usize>,
}

impl std::fmt::Debug for Dagbag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dagbag")
            .field("version", &self.env.version)
            .field("airflow", &self.airflow)
            .finish()
    }
}

impl Dagbag {
    /// Starts `procs` helpers for `env` (in parallel: each initialises its own database).
    /// Each file gets at most `timeout` to load.
    pub fn start(env: &AirflowEnv, procs: usize, timeout: Duration) -> Result<Self, DagbagError> {
        let home = tempfile::Builder::new()
            .prefix("dagfleet-dagbag-")
            .tempdir()
            .map_err(io_err(
                "create a private AIRFLOW_HOME in",
                &std::env::temp_dir(),
            ))?;
        let procs = procs.max(1);
        let started: Vec<Result<(Helper, String), DagbagError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..procs)
                .map(|i| {
                    let dir = home.path().join(format!("h{i}"));
                    s.spawn(move || Helper::start(env, &dir, timeout))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(DagbagError::Exited("helper thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut helpers = Vec::new();
        let mut airflow = String::new();
        for r in started {
            let (h, v) = r?;
            airflow = v;
            helpers.push(h);
        }
        let n = helpers.len();
        Ok(Self {
            env: env.clone(),
            airflow,
            timeout,
            home,
            free: Mutex::new(helpers),
            ready: Condvar::new(),
            started: Mutex::new(n),
        })
    }

    /// `MAJOR.MINOR` this pool serves.
    pub fn version(&self) -> &str {
        &self.env.version
    }

    /// The full Airflow version its helpers imported, e.g. `2.10.5`.
    pub fn airflow(&self) -> &str {
        &self.airflow
    }

    /// Loads `code` with DagBag. Blocks until a helper is free; a helper that dies is
    /// replaced, and the file that killed it gets a `Crashed` verdict.
    pub fn check(&self, code: &str) -> DagbagVerdict {
        let mut helper = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(h) = free.pop() {
                    break h;
                }
                free = self.ready.wait(free).unwrap_or_else(|p| p.into_inner());
            }
        };
        let answer = helper.ask(code, self.timeout);
        let verdict = match answer {
            Ok(a) => DagbagVerdict::from_answer(a, &self.airflow),
            Err(e) => {
                // Replace the helper; the file gets the failure as its verdict.
                let dir = helper.dir.clone();
                drop(helper);
                let _ = std::fs::remove_dir_all(&dir);
                let n = {
                    let mut s = self.started.lock().unwrap_or_else(|p| p.into_inner());
                    *s += 1;
                    *s
                };
                let fresh = self.home.path().join(format!("h{n}"));
                helper = match Helper::start(&self.env, &fresh, self.timeout) {
                    Ok((h, _)) => h,
                    Err(start) => {
                        return DagbagVerdict {
                            airflow: self.airflow.clone(),
                            status: "crashed".into(),
                            error_class: Some("Crashed".into()),
                            error: Some(clip(&format!(
                                "{e}; restarting the helper failed: {start}"
                            ))),
                            ..Default::default()
                        };
                    }
                };
                DagbagVerdict {
                    airflow: self.airflow.clone(),
                    status: "crashed".into(),
                    error_class: Some("Crashed".into()),
                    error: Some(clip(&e.to_string())),
                    ..Default::default()
                }
            }
        };
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(helper);
        self.ready.notify_one();
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(err: Option<&str>, dags: &[&str]) -> Answer {
        Answer {
            dag_ids: dags.iter().map(|s| s.to_string()).collect(),
            tasks: dags.iter().map(|d| (d.to_string(), 2)).collect(),
            import_error: err.map(String::from),
            status: "loaded".into(),
            signal: None,
            seconds: 0.1,
            error: None,
        }
    }

    #[test]
    fn import_errors_are_classified() {
        let v = DagbagVerdict::from_answer(answer(None, &["a"]), "2.10.5");
        assert!(v.clean);
        assert_eq!(v.tasks, 2);
        let v = DagbagVerdict::from_answer(answer(None, &[]), "2.10.5");
        assert_eq!(v.error_class.as_deref(), Some("NoDag"));
        let tb = "Traceback (most recent call last):\n  File \"x.py\", line 3\nModuleNotFoundError: No module named 'airflow.providers.google'\n";
        let v = DagbagVerdict::from_answer(answer(Some(tb), &[]), "2.10.5");
        assert_eq!(v.error_class.as_deref(), Some("ModuleNotFoundError"));
        assert_eq!(v.module.as_deref(), Some("airflow.providers.google"));
        let v = DagbagVerdict::from_answer(
            answer(
                Some("airflow.exceptions.AirflowDagCycleException: Cycle detected in DAG: d"),
                &[],
            ),
            "2.10.5",
        );
        assert_eq!(v.error_class.as_deref(), Some("AirflowDagCycleException"));
        let v = DagbagVerdict::from_answer(
            answer(Some("ModuleNotFoundError: No module named 'pandasx'"), &[]),
            "2.10.5",
        );
        assert_eq!(v.cause.as_deref(), Some("not_installed"));
        let v = DagbagVerdict::from_answer(
            answer(
                Some("ModuleNotFoundError: No module named 'airflow.operators.magic'"),
                &[],
            ),
            "2.10.5",
        );
        assert_eq!(v.cause.as_deref(), Some("no_such_module"));
    }

    #[test]
    fn environments_are_found_in_version_order() {
        let d = tempfile::tempdir().unwrap();
        for v in ["3.0", "2.10", "2.9", "notaversion"] {
            std::fs::create_dir_all(d.path().join(v).join("bin")).unwrap();
            std::fs::write(d.path().join(v).join("bin/python"), "").unwrap();
        }
        std::fs::create_dir_all(d.path().join("2.8")).unwrap(); // no interpreter
        let found: Vec<String> = discover(d.path()).into_iter().map(|e| e.version).collect();
        assert_eq!(found, ["2.9", "2.10", "3.0"]);
    }
}
