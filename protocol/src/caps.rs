//! Operator caps: the limits a run spec may ask below but never above.
//!
//! # Overview
//! A run spec comes from anyone allowed to submit a run; [`Caps`] come from the operator's
//! config (`[caps]` in `dagfleet.toml`). [`RunSpec::check_caps`] refuses a spec that asks
//! for more than a cap, naming the field, the value and the cap. The client checks before
//! anything is stored, and every coordinator checks again before it plans a stage, with its
//! own caps, so a spec that reached the run-state bucket some other way (an older client, a
//! hand-written KV entry) fails its run instead of taking the coordinator down.
//!
//! Counts that depend on data (rows of a prompt file, the outputs of an earlier stage) are
//! checked when the stage is planned: a stage that would need more jobs than
//! [`RunSpec::max_jobs_per_stage`] fails its run with that reason.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::{RunSpec, SpecError, Stage};

/// The operator's limits on what one run may ask for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Caps {
    /// Most jobs one stage may be split into (`limits.max_jobs_per_stage` may ask for fewer).
    pub max_jobs_per_stage: u32,
    /// Most rows one job may carry (`infer.batch_rows`, `judge.batch_rows`,
    /// `synthesize.chunk_rows`).
    pub max_rows_per_job: u64,
    /// Largest run spec, in bytes of TOML.
    pub max_spec_bytes: u64,
    /// Largest file uploaded with a run (`infer.prompts`, `train.dataset`, `train.valid`).
    pub max_upload_bytes: u64,
    /// Largest artifact a job may be asked to write (`noop.output_bytes`).
    pub max_artifact_bytes: u64,
    /// Longest time a job may be asked to work (`noop.work_ms`).
    #[serde(with = "humantime_serde")]
    pub max_job_time: Duration,
    /// Most new tokens one generation may ask for (`infer.max_tokens`,
    /// `synthesize.max_tokens`).
    pub max_new_tokens: u32,
    /// Longest a provider batch may run (`synthesize.batch_deadline`).
    #[serde(with = "humantime_serde")]
    pub max_batch_deadline: Duration,
    /// Longest wall-clock limit of a run (`limits.deadline`).
    #[serde(with = "humantime_serde")]
    pub max_run_deadline: Duration,
    /// Runs the coordinators work on at once; later runs wait until one ends.
    pub max_active_runs: u32,
    /// Whether a spec may name objects of other runs as its inputs (`store:runs/<other
    /// run>/...` in `infer.prompts`, `train.dataset`, ...). Off: a spec reads only the files
    /// uploaded with it, so one user's spec cannot read another's outputs.
    pub store_refs_across_runs: bool,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_jobs_per_stage: 100_000,
            max_rows_per_job: 100_000,
            max_spec_bytes: 256 * 1024,
            max_upload_bytes: 512 * 1024 * 1024,
            max_artifact_bytes: 64 * 1024 * 1024,
            max_job_time: Duration::from_secs(3600),
            max_new_tokens: 32_768,
            max_batch_deadline: Duration::from_secs(48 * 3600),
            max_run_deadline: Duration::from_secs(30 * 24 * 3600),
            max_active_runs: 64,
            store_refs_across_runs: false,
        }
    }
}

impl Caps {
    /// Checks the caps themselves; errors name the `caps.*` key.
    pub fn validate(&self) -> Result<(), SpecError> {
        let nonzero = [
            (
                "caps.max_jobs_per_stage",
                u64::from(self.max_jobs_per_stage),
            ),
            ("caps.max_rows_per_job", self.max_rows_per_job),
            ("caps.max_spec_bytes", self.max_spec_bytes),
            ("caps.max_upload_bytes", self.max_upload_bytes),
            ("caps.max_new_tokens", u64::from(self.max_new_tokens)),
            ("caps.max_active_runs", u64::from(self.max_active_runs)),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                return Err(SpecError::Invalid {
                    key: key.into(),
                    message: "must be at least 1".into(),
                });
            }
        }
        // The coordinators keep one bit per job in the run state; a cap above this would let
        // one stage's state outgrow a KV entry.
        if self.max_jobs_per_stage > MAX_JOBS_PER_STAGE {
            return Err(SpecError::Invalid {
                key: "caps.max_jobs_per_stage".into(),
                message: format!(
                    "{} is above {MAX_JOBS_PER_STAGE}, the most one stage's run state can track",
                    self.max_jobs_per_stage
                ),
            });
        }
        Ok(())
    }
}

/// The most jobs any stage can have, whatever the caps say: two bitsets of this many bits
/// (done, failed) are 500 KB of run state.
pub const MAX_JOBS_PER_STAGE: u32 = 2_000_000;

/// A spec field over its cap.
fn over(field: &str, value: impl std::fmt::Display, cap: impl std::fmt::Display) -> SpecError {
    SpecError::OverCap {
        key: field.into(),
        value: crate::spec::clip(&value.to_string()),
        cap: cap.to_string(),
    }
}

fn human(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

impl RunSpec {
    /// The jobs-per-stage limit in force: the spec's own ask, or the cap when it asks for
    /// none.
    pub fn max_jobs_per_stage(&self, caps: &Caps) -> u32 {
        self.limits
            .max_jobs_per_stage
            .unwrap_or(caps.max_jobs_per_stage)
            .min(caps.max_jobs_per_stage)
    }

    /// Refuses a spec that asks for more than the operator allows. Only the stages the spec
    /// runs are looked at.
    pub fn check_caps(&self, caps: &Caps) -> Result<(), SpecError> {
        let has = |s: Stage| self.stages.contains(&s);
        if let Some(n) = self.limits.max_jobs_per_stage {
            if n > caps.max_jobs_per_stage {
                return Err(over(
                    "limits.max_jobs_per_stage",
                    n,
                    format!("caps.max_jobs_per_stage = {}", caps.max_jobs_per_stage),
                ));
            }
        }
        if let Some(d) = self.limits.deadline {
            if d > caps.max_run_deadline {
                return Err(over(
                    "limits.deadline",
                    human(d),
                    format!("caps.max_run_deadline = {}", human(caps.max_run_deadline)),
                ));
            }
        }
        if has(Stage::Noop) {
            let n = &self.noop;
            let jobs = self.max_jobs_per_stage(caps);
            if n.jobs > jobs {
                let cap = match self.limits.max_jobs_per_stage {
                    Some(l) if l <= caps.max_jobs_per_stage => {
                        format!("limits.max_jobs_per_stage = {l}")
                    }
                    _ => format!("caps.max_jobs_per_stage = {}", caps.max_jobs_per_stage),
                };
                return Err(over("noop.jobs", n.jobs, cap));
            }
            if u64::from(n.output_bytes) > caps.max_artifact_bytes {
                return Err(over(
                    "noop.output_bytes",
                    n.output_bytes,
                    format!("caps.max_artifact_bytes = {}", caps.max_artifact_bytes),
                ));
            }
            if Duration::from_millis(n.work_ms) > caps.max_job_time {
                return Err(over(
                    "noop.work_ms",
                    n.work_ms,
                    format!(
                        "caps.max_job_time = {} ({} ms)",
                        human(caps.max_job_time),
                        caps.max_job_time.as_millis()
                    ),
                ));
            }
        }
        let rows = |key: &str, v: u64| {
            if v > caps.max_rows_per_job {
                Err(over(
                    key,
                    v,
                    format!("caps.max_rows_per_job = {}", caps.max_rows_per_job),
                ))
            } else {
                Ok(())
            }
        };
        let tokens = |key: &str, v: u32| {
            if v > caps.max_new_tokens {
                Err(over(
                    key,
                    v,
                    format!("caps.max_new_tokens = {}", caps.max_new_tokens),
                ))
            } else {
                Ok(())
            }
        };
        if has(Stage::Infer) {
            rows("infer.batch_rows", self.infer.batch_rows)?;
            tokens("infer.max_tokens", self.infer.max_tokens)?;
            if self.infer.repair > crate::spec::MAX_REPAIR_TURNS {
                return Err(over(
                    "infer.repair",
                    self.infer.repair,
                    format!("{} repair turns", crate::spec::MAX_REPAIR_TURNS),
                ));
            }
        }
        if has(Stage::Judge) {
            rows("judge.batch_rows", self.judge.batch_rows)?;
        }
        if has(Stage::Synthesize) {
            rows("synthesize.chunk_rows", self.synthesize.chunk_rows)?;
            tokens("synthesize.max_tokens", self.synthesize.max_tokens)?;
            if self.synthesize.batch_deadline > caps.max_batch_deadline {
                return Err(over(
                    "synthesize.batch_deadline",
                    human(self.synthesize.batch_deadline),
                    format!(
                        "caps.max_batch_deadline = {}",
                        human(caps.max_batch_deadline)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses spec text longer than `caps.max_spec_bytes`, before it is parsed.
pub fn check_spec_size(text: &str, caps: &Caps) -> Result<(), SpecError> {
    if text.len() as u64 > caps.max_spec_bytes {
        return Err(over(
            "spec",
            format!("{} bytes", text.len()),
            format!("caps.max_spec_bytes = {}", caps.max_spec_bytes),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: &str) -> RunSpec {
        RunSpec::from_toml(t).unwrap()
    }

    #[test]
    fn the_poison_spec_is_refused_naming_field_value_and_cap() {
        let s = spec(
            "name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 4000000000\n[limits]\nmax_jobs_per_stage = 4294967295",
        );
        let e = s.check_caps(&Caps::default()).unwrap_err().to_string();
        assert!(e.contains("limits.max_jobs_per_stage"), "{e}");
        assert!(e.contains("4294967295"), "{e}");
        assert!(e.contains("caps.max_jobs_per_stage = 100000"), "{e}");
        let s = spec("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 4000000000");
        let e = s.check_caps(&Caps::default()).unwrap_err().to_string();
        assert!(
            e.contains("noop.jobs") && e.contains("4000000000") && e.contains("100000"),
            "{e}"
        );
    }

    #[test]
    fn a_spec_may_ask_for_less() {
        let s = spec("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 10\n[limits]\nmax_jobs_per_stage = 20");
        s.check_caps(&Caps::default()).unwrap();
        assert_eq!(s.max_jobs_per_stage(&Caps::default()), 20);
        let e = RunSpec::from_toml("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 30\n[limits]\nmax_jobs_per_stage = 20").unwrap_err().to_string();
        assert!(e.contains("limits.max_jobs_per_stage = 20"), "{e}");
        let tight = Caps {
            max_jobs_per_stage: 5,
            ..Caps::default()
        };
        let s = spec("name = \"n\"\nstages = [\"noop\"]\n[noop]\njobs = 5");
        s.check_caps(&tight).unwrap();
        assert_eq!(s.max_jobs_per_stage(&tight), 5);
    }

    #[test]
    fn sizes_durations_and_rows_are_capped() {
        let c = Caps::default();
        for (t, key) in [
            (
                "[noop]\njobs = 1\noutput_bytes = 4294967295",
                "noop.output_bytes",
            ),
            (
                "[noop]\njobs = 1\nwork_ms = 18446744073709551615",
                "noop.work_ms",
            ),
        ] {
            let s = spec(&format!("name = \"n\"\nstages = [\"noop\"]\n{t}"));
            let e = s.check_caps(&c).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let s = spec("name = \"n\"\nstages = [\"infer\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m\"\n[infer]\nprompts = \"p.jsonl\"\nmax_tokens = 4000000000");
        let e = s.check_caps(&c).unwrap_err().to_string();
        assert!(e.contains("infer.max_tokens"), "{e}");
        let e = check_spec_size(&"#".repeat(300_000), &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("300000 bytes") && e.contains("max_spec_bytes"),
            "{e}"
        );
    }

    #[test]
    fn caps_validate() {
        Caps::default().validate().unwrap();
        let e = Caps {
            max_jobs_per_stage: u32::MAX,
            ..Caps::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("caps.max_jobs_per_stage"), "{e}");
    }
}
