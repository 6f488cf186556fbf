//! Progress display for `dagfleet run` and `dagfleet status`.

use anyhow::Result;
use dagfleet_coordinator::{list_runs, load_run};
use dagfleet_protocol::{RunId, RunState, RunStatus, Stage, StageStatus};
use dagfleet_runtime::Bus;
use futures::{FutureExt, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows, tokens and cost of a stage's finished jobs, e.g. `, 120 rows, 3 cached, $0.0421`.
/// A cost with requests that had no price is shown as unknown, never as zero.
fn stage_extra(s: &dagfleet_protocol::StageState) -> String {
    let m = &s.metrics;
    let mut out = String::new();
    if let Some(r) = m.get("rows") {
        out.push_str(&format!(", {r} rows"));
    }
    if let Some(c) = m.get("cached").filter(|c| **c > 0.0) {
        out.push_str(&format!(", {c} cached replies"));
    }
    let tokens = m.get("input_tokens").copied().unwrap_or(0.0)
        + m.get("output_tokens").copied().unwrap_or(0.0);
    if tokens > 0.0 {
        out.push_str(&format!(", {tokens} tokens"));
    }
    match (m.get("cost_usd"), m.get("cost_unknown_requests")) {
        (_, Some(u)) if *u > 0.0 => out.push_str(&format!(
            ", cost unknown ({u} requests without a price; known part ${:.4})",
            m.get("cost_usd").copied().unwrap_or(0.0)
        )),
        (Some(c), _) => out.push_str(&format!(", cost ${c:.4}")),
        _ => {}
    }
    out
}

/// The latest optimizer step of a run's train job, from its `train_step` events.
#[derive(Default)]
struct TrainProgress {
    step: u64,
    total: u64,
    loss: f64,
    valid: Option<f64>,
    lr: f64,
    tokens_per_s: f64,
    mem: Option<u64>,
    /// The step was a validation step (or the last one): always worth a log line.
    notable: bool,
}

impl TrainProgress {
    /// Folds in one event; false when it is not a train step.
    fn note(&mut self, ev: &dagfleet_protocol::EventKind) -> bool {
        let dagfleet_protocol::EventKind::TrainStep {
            step,
            total_steps,
            loss,
            lr,
            tokens_per_s,
            gpu_mem_bytes,
            valid_loss,
            ..
        } = ev
        else {
            return false;
        };
        self.notable = valid_loss.is_some() || step == total_steps || self.step == 0;
        (self.step, self.total, self.loss, self.lr) = (*step, *total_steps, *loss, *lr);
        self.tokens_per_s = *tokens_per_s;
        self.mem = gpu_mem_bytes.or(self.mem);
        self.valid = valid_loss.or(self.valid);
        true
    }

    /// e.g. `step 40/400 loss 1.2345 valid 1.3001 lr 2.0e-4 5210 tok/s 6.2 GiB`.
    fn line(&self) -> String {
        let mut out = format!("step {}/{} loss {:.4}", self.step, self.total, self.loss);
        if let Some(v) = self.valid {
            out.push_str(&format!(" valid {v:.4}"));
        }
        out.push_str(&format!(
            " lr {:.1e} {:.0} tok/s",
            self.lr, self.tokens_per_s
        ));
        if let Some(m) = self.mem {
            out.push_str(&format!(" {:.1} GiB", m as f64 / (1u64 << 30) as f64));
        }
        out
    }
}

fn stage_line(s: &dagfleet_protocol::StageState) -> String {
    let status = format!("{:?}", s.status).to_lowercase();
    if s.jobs == 0 {
        format!("{:<10} {status}", s.stage.as_str())
    } else {
        format!(
            "{:<10} {status:<10} {}/{} jobs{}{}",
            s.stage.as_str(),
            s.done.len(),
            s.jobs,
            if s.failed.is_empty() {
                String::new()
            } else {
                format!(", {} dead-lettered", s.failed.len())
            },
            stage_extra(s)
        )
    }
}

/// Prints a run's state once.
pub async fn print_once(bus: &Bus, run: &RunId) -> Result<()> {
    let Some((st, _)) = load_run(bus, run).await? else {
        anyhow::bail!("no run `{run}`; `dagfleet status` lists runs");
    };
    print_state(&st);
    Ok(())
}

fn print_state(st: &RunState) {
    println!("run {}: {:?}", st.run_id, st.status);
    for s in &st.stages {
        println!("  {}", stage_line(s));
    }
    if let Some(e) = &st.error {
        println!("  error: {e}");
    }
    if let Some(w) = st
        .waiting
        .as_ref()
        .filter(|_| st.status == RunStatus::Running)
    {
        println!("  {w}");
    }
}

/// Lists live workers (from their heartbeats), then runs, newest first.
pub async fn list(bus: &Bus) -> Result<()> {
    let mut workers = Vec::new();
    if let Ok(mut keys) = bus.workers().keys().await {
        while let Some(Ok(k)) = keys.next().await {
            if let Ok(Some(v)) = bus.workers().get(&k).await {
                if let Ok(hb) = serde_json::from_slice::<serde_json::Value>(&v) {
                    workers.push(hb);
                }
            }
        }
    }
    if workers.is_empty() {
        println!("no live workers");
    } else {
        println!(
            "{:<12} {:<44} {:>9} {:>11} {:>10}",
            "ROLE", "WORKER", "IN FLIGHT", "CONCURRENCY", "DONE"
        );
        for hb in &workers {
            println!(
                "{:<12} {:<44} {:>9} {:>11} {:>10}",
                hb["role"].as_str().unwrap_or("?"),
                hb["worker"].as_str().unwrap_or("?"),
                hb["in_flight"],
                hb["concurrency"],
                hb["done"]
            );
        }
    }
    println!();
    let runs = list_runs(bus).await?;
    if runs.is_empty() {
        println!("no runs yet; submit one with `dagfleet run SPEC.toml`");
    }
    for st in runs {
        let cur = st
            .current()
            .map(stage_line)
            .unwrap_or_else(|| "all stages done".into());
        println!(
            "{:<40} {:<8} {cur}",
            st.run_id.as_str(),
            format!("{:?}", st.status).to_lowercase()
        );
    }
    Ok(())
}

/// Warns about stages of `run` whose role has no live worker: their jobs would wait.
pub async fn warn_missing_workers(bus: &Bus, run: &RunId) {
    let Ok(Some((st, _))) = load_run(bus, run).await else {
        return;
    };
    let mut live = Vec::new();
    if let Ok(mut keys) = bus.workers().keys().await {
        while let Some(Ok(k)) = keys.next().await {
            live.push(k);
        }
    }
    for s in &st.stages {
        let role = s.stage.role();
        if !live.iter().any(|k| k.starts_with(&format!("{role}."))) {
            eprintln!(
                "note: no live `{role}` worker; `{}` jobs will wait until one starts (`dagfleet worker --role {role}`)",
                s.stage
            );
        }
    }
}

/// Prints where a finished run's report and fine-tune are, and the report's verdict.
pub async fn print_outputs(store: &dagfleet_runtime::ArtifactStore, run: &RunId) {
    let keys = store
        .list(&format!("runs/{run}/"))
        .await
        .unwrap_or_default();
    for k in &keys {
        if k.contains("/report/") && k.ends_with("/report.json") {
            if let Ok(Some(b)) = store.get_opt(k).await {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if let Some(t) = v["verdict"].as_str() {
                    println!("{t}");
                }
            }
        }
    }
    for k in keys.iter().filter(|k| {
        (k.contains("/report/") && k.ends_with("/report.md"))
            || (k.contains("/train/") && k.ends_with("/report.md"))
    }) {
        println!("report: {}/{k}", store.url());
    }
}

/// Follows a run until it ends (or `stop`), with bars on a terminal and lines elsewhere.
/// Exit status 0 when the run is done, 1 when it failed.
pub async fn follow(
    bus: &Bus,
    run: &RunId,
    stop: &CancellationToken,
) -> Result<std::process::ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut last_lines: BTreeMap<String, String> = BTreeMap::new();
    let mut last_print = std::time::Instant::now() - Duration::from_secs(60);
    // Train jobs report every optimizer step as an event: the train bar counts steps.
    let mut steps = bus
        .client()
        .subscribe(dagfleet_protocol::subjects::event(run, "train_step"))
        .await
        .ok();
    let mut train = TrainProgress::default();
    let mut last_train_print = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let mut stepped = false;
        while let Some(Some(m)) = steps.as_mut().and_then(|s| s.next().now_or_never()) {
            if let Ok(ev) = dagfleet_protocol::decode_event(&m.payload) {
                if train.note(&ev.kind) {
                    stepped = true;
                    if !tty
                        && (train.notable || last_train_print.elapsed() > Duration::from_secs(10))
                    {
                        eprintln!("  {:<10} {}", Stage::Train.as_str(), train.line());
                        last_train_print = std::time::Instant::now();
                    }
                }
            }
        }
        let Some((st, _)) = load_run(bus, run).await? else {
            anyhow::bail!("no run `{run}`; `dagfleet status` lists runs");
        };
        for s in &st.stages {
            let key = s.stage.to_string();
            if tty {
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(0));
                    b.set_style(style.clone());
                    b.set_prefix(key.clone());
                    b
                });
                // While a train job runs, its bar counts optimizer steps.
                if s.stage == Stage::Train && train.total > 0 && s.status == StageStatus::Dispatched
                {
                    if stepped {
                        bar.set_length(train.total);
                        bar.set_position(train.step);
                        bar.set_message(train.line());
                    }
                    continue;
                }
                bar.set_length(u64::from(s.jobs.max(1)));
                bar.set_position(u64::from(s.settled()));
                let mut msg = format!("{:?}", s.status).to_lowercase();
                if !s.failed.is_empty() {
                    msg.push_str(&format!(" ({} dead-lettered)", s.failed.len()));
                }
                msg.push_str(&stage_extra(s));
                bar.set_message(msg);
                if matches!(s.status, StageStatus::Done | StageStatus::Failed) && !bar.is_finished()
                {
                    bar.finish();
                }
            } else {
                let line = stage_line(s);
                let changed = last_lines.get(&key) != Some(&line);
                let status_changed = last_lines
                    .get(&key)
                    .is_none_or(|l| l.split_whitespace().nth(1) != line.split_whitespace().nth(1));
                if changed && (status_changed || last_print.elapsed() > Duration::from_secs(2)) {
                    eprintln!("  {line}");
                    last_lines.insert(key, line);
                    last_print = std::time::Instant::now();
                }
            }
        }
        if let Some(w) = st
            .waiting
            .as_ref()
            .filter(|_| st.status == RunStatus::Running)
        {
            if last_lines.get("waiting") != Some(w) {
                eprintln!("  {w}");
                last_lines.insert("waiting".into(), w.clone());
            }
        }
        match st.status {
            RunStatus::Running => {}
            RunStatus::Done => {
                for b in bars.values() {
                    b.finish();
                }
                println!("run {run} done");
                for s in &st.stages {
                    println!("  {}", stage_line(s));
                }
                return Ok(std::process::ExitCode::SUCCESS);
            }
            RunStatus::Failed | RunStatus::Cancelled => {
                for b in bars.values() {
                    b.abandon();
                }
                let what = if st.status == RunStatus::Failed {
                    "failed"
                } else {
                    "was cancelled"
                };
                println!(
                    "run {run} {what}: {}",
                    st.error.as_deref().unwrap_or("no reason recorded")
                );
                return Ok(std::process::ExitCode::from(1));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stop.cancelled() => {
                println!("stopped following run {run}; it goes on (`dagfleet status {run}`)");
                return Ok(std::process::ExitCode::SUCCESS);
            }
        }
    }
}
