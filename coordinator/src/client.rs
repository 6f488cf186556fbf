//! The client side of the coordinator: what `dagfleet run` and `dagfleet status` call.
//!
//! [`submit`] checks a spec against the operator's [`Caps`] ([`check_spec`]), uploads the
//! local files it names, stores the spec and creates the run state; nothing is stored when
//! any check fails. [`load_run`] and [`list_runs`] read run state back.

use async_nats::jetstream::kv;
use bytes::Bytes;
use dagfleet_protocol::caps::check_spec_size;
use dagfleet_protocol::codec::decode;
use dagfleet_protocol::{
    encode, Caps, Event, EventKind, RunId, RunSpec, RunState, SpecError, SCHEMA_VERSION,
};
use dagfleet_runtime::{now_ms, ArtifactStore, Bus, BusError};
use futures::StreamExt;
use std::io::Read;
use tracing::{debug, info, warn};

use crate::{state_err, CoordinatorError};

/// The local files a spec uploads with the run: (key, the spec field, the stored name).
fn uploads(spec: &mut RunSpec) -> [(&'static str, &mut Option<String>, &'static str); 4] {
    [
        ("infer.prompts", &mut spec.infer.prompts, "prompts.jsonl"),
        (
            "dataset.held_out",
            &mut spec.dataset.held_out,
            "held_out.jsonl",
        ),
        ("train.dataset", &mut spec.train.dataset, "train.jsonl"),
        ("train.valid", &mut spec.train.valid, "valid.jsonl"),
    ]
}

/// Parses and validates `spec_text` and checks it against `caps`, including the size of
/// every local file it would upload. Reads nothing but file metadata.
pub fn check_spec(spec_text: &str, caps: &Caps) -> Result<RunSpec, CoordinatorError> {
    check_spec_size(spec_text, caps)?;
    let mut spec = RunSpec::from_toml(spec_text)?;
    spec.check_caps(caps)?;
    for (key, field, _) in uploads(&mut spec) {
        let Some(p) = field.as_deref() else {
            continue;
        };
        if p.starts_with("store:") {
            // A new run has no objects yet: a `store:` input is another run's.
            if !caps.store_refs_across_runs {
                return Err(SpecError::Invalid {
                    key: key.into(),
                    message: dagfleet_protocol::spec::clip(&format!(
                        "`{p}` names another run's object; give a local file, or ask the operator for caps.store_refs_across_runs = true"
                    )),
                }
                .into());
            }
            continue;
        }
        upload_size(key, p, caps)?;
    }
    Ok(spec)
}

/// The size of the local file `path` named by spec key `key`, refused when it is not a
/// regular file or is over `caps.max_upload_bytes`.
fn upload_size(key: &str, path: &str, caps: &Caps) -> Result<u64, SpecError> {
    let invalid = |message: String| SpecError::Invalid {
        key: key.into(),
        message: dagfleet_protocol::spec::clip(&message),
    };
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(format!("cannot read `{path}`: {e}")))?;
    if !meta.is_file() {
        return Err(invalid(format!("`{path}` is not a regular file")));
    }
    if meta.len() > caps.max_upload_bytes {
        return Err(SpecError::OverCap {
            key: key.into(),
            value: format!(
                "`{}` of {} bytes",
                dagfleet_protocol::spec::clip(path),
                meta.len()
            ),
            cap: format!("caps.max_upload_bytes = {}", caps.max_upload_bytes),
        });
    }
    Ok(meta.len())
}

/// Submits a run: checks the spec against `caps`, uploads its local files, stores the spec,
/// creates the run state, and tells coordinators.
pub async fn submit(
    bus: &Bus,
    store: &ArtifactStore,
    spec_text: &str,
    caps: &Caps,
) -> Result<RunId, CoordinatorError> {
    let mut spec = check_spec(spec_text, caps)?;
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let run_id =
        RunId::new(format!("{}-{}", spec.name, &suffix[suffix.len() - 8..])).map_err(|e| {
            CoordinatorError::State {
                run: spec.name.clone(),
                reason: e.to_string(),
            }
        })?;
    // Read every upload before anything is stored, so a file that went bad since the check
    // leaves nothing behind.
    let mut files = Vec::new();
    for (key, field, name) in uploads(&mut spec) {
        let Some(p) = field.clone().filter(|p| !p.starts_with("store:")) else {
            continue;
        };
        upload_size(key, &p, caps)?;
        let mut data = Vec::new();
        std::fs::File::open(&p)
            .and_then(|f| f.take(caps.max_upload_bytes + 1).read_to_end(&mut data))
            .map_err(|e| SpecError::Invalid {
                key: key.into(),
                message: dagfleet_protocol::spec::clip(&format!("cannot read `{p}`: {e}")),
            })?;
        if data.len() as u64 > caps.max_upload_bytes {
            return Err(SpecError::OverCap {
                key: key.into(),
                value: format!(
                    "`{}` of more than {} bytes",
                    dagfleet_protocol::spec::clip(&p),
                    caps.max_upload_bytes
                ),
                cap: format!("caps.max_upload_bytes = {}", caps.max_upload_bytes),
            }
            .into());
        }
        let stored = format!("runs/{run_id}/inputs/{name}");
        *field = Some(format!("store:{stored}"));
        files.push((stored, data));
    }
    for (key, data) in files {
        store.put_overwrite(&key, Bytes::from(data)).await?;
    }
    store
        .put_overwrite(
            &format!("runs/{run_id}/spec.toml"),
            Bytes::from(spec_text.to_string()),
        )
        .await?;
    let state = RunState::new(run_id.clone(), spec, now_ms());
    bus.runs()
        .create(
            run_id.as_str(),
            Bytes::from(encode(&state).map_err(BusError::from)?),
        )
        .await
        .map_err(|e| state_err(&run_id, e))?;
    let ev = Event {
        schema_version: SCHEMA_VERSION,
        run_id: run_id.clone(),
        at_ms: now_ms(),
        kind: EventKind::RunSubmitted,
    };
    bus.publish_event(&ev, None).await?;
    info!(run = %run_id, "run submitted");
    Ok(run_id)
}

/// Reads a run's state; `None` when unknown.
pub async fn load_run(bus: &Bus, run: &RunId) -> Result<Option<(RunState, u64)>, CoordinatorError> {
    let Some(entry) = bus
        .runs()
        .entry(run.as_str())
        .await
        .map_err(|e| state_err(run, e))?
    else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let state: RunState =
        decode("run state", &entry.value).map_err(|e| CoordinatorError::Unreadable {
            run: run.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Some((state, entry.revision)))
}

/// Every readable run in the bucket, newest first. An entry that does not decode is left
/// out with a warning: one bad entry must not hide the others.
pub async fn list_runs(bus: &Bus) -> Result<Vec<RunState>, CoordinatorError> {
    let mut keys = bus
        .runs()
        .keys()
        .await
        .map_err(|e| CoordinatorError::State {
            run: "*".into(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        let Ok(id) = RunId::new(k) else { continue };
        match load_run(bus, &id).await {
            Ok(Some((s, _))) => out.push(s),
            Ok(None) => {}
            Err(e @ CoordinatorError::Unreadable { .. }) => debug!(error = %e, "run skipped"),
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
    Ok(out)
}

/// What [`cancel`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// The run was running and is now cancelled.
    Now(RunState),
    /// The run had already ended (done, failed or cancelled); nothing changed.
    AlreadyEnded(RunState),
}

/// Cancels a running run: its state becomes `cancelled` (so no coordinator dispatches more
/// of it), its manifest is written with what finished so far, and a `run_cancelled` event
/// tells workers to drop its queued jobs and stop its running ones. `None` when no such
/// run exists.
pub async fn cancel(
    bus: &Bus,
    store: &ArtifactStore,
    run: &RunId,
    reason: &str,
) -> Result<Option<Cancelled>, CoordinatorError> {
    let why = format!("cancelled: {reason}");
    let mut changed = false;
    let Some(state) = update_run(bus, run, |st| {
        changed = false;
        if st.status != dagfleet_protocol::RunStatus::Running {
            return false;
        }
        st.status = dagfleet_protocol::RunStatus::Cancelled;
        st.error = Some(why.clone());
        changed = true;
        true
    })
    .await?
    else {
        return Ok(None);
    };
    if !changed {
        return Ok(Some(Cancelled::AlreadyEnded(state)));
    }
    // The event first: workers stop at once; the manifest only reads the store.
    let ev = Event {
        schema_version: SCHEMA_VERSION,
        run_id: run.clone(),
        at_ms: now_ms(),
        kind: EventKind::RunCancelled {
            reason: reason.to_string(),
        },
    };
    bus.publish_event(&ev, Some(&format!("run-cancelled-{run}")))
        .await?;
    crate::manifest::write(store, &state).await?;
    info!(run = %run, reason, "run cancelled");
    Ok(Some(Cancelled::Now(state)))
}

/// Applies `f` to a run's state with compare-and-set, retrying on conflicts. `f` returns
/// whether it changed anything; nothing is written when it did not.
pub(crate) async fn update_run<F>(
    bus: &Bus,
    run: &RunId,
    mut f: F,
) -> Result<Option<RunState>, CoordinatorError>
where
    F: FnMut(&mut RunState) -> bool,
{
    loop {
        let Some((mut state, rev)) = load_run(bus, run).await? else {
            return Ok(None);
        };
        if !f(&mut state) {
            return Ok(Some(state));
        }
        let bytes = Bytes::from(encode(&state).map_err(BusError::from)?);
        match bus.runs().update(run.as_str(), bytes, rev).await {
            Ok(_) => return Ok(Some(state)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                debug!(run = %run, "run state changed under us; retrying");
                continue;
            }
            Err(e) => {
                warn!(run = %run, error = %e, "run state not stored");
                return Err(state_err(run, e));
            }
        }
    }
}
