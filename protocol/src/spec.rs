//! The run spec: what a user asks for in `dagfleet run SPEC.toml`.
//!
//! ```toml
//! name = "airflow"
//! stages = ["mine", "synthesize", "dataset"]
//!
//! [[sources]]
//! kind = "pypi"
//! package = "apache-airflow"
//! versions = ["2.10.5"]
//!
//! [limits]
//! max_jobs_per_stage = 10000
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::jobs::{ModelRef, Source};
use crate::Stage;

/// A run spec that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecError {
    /// The TOML does not parse or does not match the schema.
    #[error("run spec is not valid TOML for dagfleet: {0}")]
    Parse(String),
    /// A key holds a value that is not allowed.
    #[error("run spec key `{key}`: {message}")]
    Invalid {
        /// The offending key, dotted.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A pipeline run, as written by the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Name of the run; the run id is derived from it.
    pub name: String,
    /// Stages to run, in pipeline order: any prefix or subset of
    /// mine, synthesize, dataset, train, infer, judge, report; or `noop` alone.
    pub stages: Vec<Stage>,
    /// Where the miner looks for DAG files.
    #[serde(default)]
    pub sources: Vec<Source>,
    /// Mining options.
    #[serde(default)]
    pub mine: MineSpec,
    /// Models used by the run.
    #[serde(default)]
    pub models: ModelsSpec,
    /// Limits that protect the fleet and the budget.
    #[serde(default)]
    pub limits: Limits,
    /// The `noop` stage: synthetic jobs for tests and benchmarks.
    #[serde(default)]
    pub noop: NoopSpec,
    /// The `judge` stage.
    #[serde(default)]
    pub judge: JudgeSpec,
}

/// Judge options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSpec {
    /// Rows per judge batch job.
    pub batch_rows: u64,
    /// Target Airflow version for deprecation findings, e.g. `2.10`.
    pub airflow_version: Option<String>,
}

impl Default for JudgeSpec {
    fn default() -> Self {
        Self {
            batch_rows: 500,
            airflow_version: None,
        }
    }
}

/// Mining options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MineSpec {
    /// Path globs a file must match.
    pub globs: Vec<String>,
}

impl Default for MineSpec {
    fn default() -> Self {
        Self {
            globs: vec!["**/example_*.py".into(), "**/example_dags/**".into()],
        }
    }
}

/// Models used by the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    /// The teacher LLM of the synthesize stage.
    #[serde(default)]
    pub teacher: Option<ModelRef>,
    /// The base model of the train and infer stages.
    #[serde(default)]
    pub base: Option<ModelRef>,
    /// Training hyper-parameters, passed through to the trainer.
    #[serde(default)]
    pub train: BTreeMap<String, String>,
}

/// Limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most jobs one stage may be split into.
    pub max_jobs_per_stage: u32,
    /// Jobs of one stage that may end dead-lettered before the run fails.
    pub max_failed_jobs: u32,
    /// Wall-clock limit of the whole run; none when absent.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_jobs_per_stage: 10_000,
            max_failed_jobs: 0,
            deadline: None,
        }
    }
}

/// Synthetic jobs of the `noop` stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoopSpec {
    /// Number of jobs.
    pub jobs: u32,
    /// Time each job "works", milliseconds.
    pub work_ms: u64,
    /// Artifact size per job; 0 writes none.
    pub output_bytes: u32,
    /// Every job fails retryably on its first this-many deliveries.
    pub fail_attempts: u32,
    /// Job indices that fail fatally and are dead-lettered.
    pub fatal_jobs: Vec<u32>,
}

impl RunSpec {
    /// Parses and validates a TOML spec.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: RunSpec = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what serde cannot; every error names its key.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.is_empty()
            || self.name.len() > 40
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "name",
                format!(
                    "`{}` must be 1 to 40 characters of ASCII letters, digits, `-` and `_`",
                    self.name
                ),
            ));
        }
        if self.stages.is_empty() {
            return Err(invalid("stages", "must list at least one stage"));
        }
        let noop = self.stages.contains(&Stage::Noop);
        if noop && self.stages.len() > 1 {
            return Err(invalid("stages", "`noop` runs alone"));
        }
        for w in self.stages.windows(2) {
            if w[0].order() >= w[1].order() {
                return Err(invalid(
                    "stages",
                    format!(
                        "`{}` after `{}`: stages must be listed once each, in pipeline order (mine, synthesize, dataset, train, infer, judge, report)",
                        w[1], w[0]
                    ),
                ));
            }
        }
        if self.limits.max_jobs_per_stage == 0 {
            return Err(invalid("limits.max_jobs_per_stage", "must be at least 1"));
        }
        if self.stages.contains(&Stage::Mine) && self.sources.is_empty() {
            return Err(invalid(
                "sources",
                "the `mine` stage needs at least one source",
            ));
        }
        if self.stages.contains(&Stage::Synthesize) && self.models.teacher.is_none() {
            return Err(invalid(
                "models.teacher",
                "the `synthesize` stage needs a teacher model",
            ));
        }
        for st in [Stage::Train, Stage::Infer] {
            if self.stages.contains(&st) && self.models.base.is_none() {
                return Err(invalid(
                    "models.base",
                    format!("the `{st}` stage needs a base model"),
                ));
            }
        }
        if self.stages.contains(&Stage::Judge) {
            if !self
                .stages
                .iter()
                .any(|s| matches!(s, Stage::Mine | Stage::Infer))
            {
                return Err(invalid(
                    "stages",
                    "the `judge` stage needs an earlier stage that produces rows to judge: `mine` or `infer`",
                ));
            }
            if self.judge.batch_rows == 0 {
                return Err(invalid("judge.batch_rows", "must be at least 1"));
            }
        }
        if noop {
            if self.noop.jobs == 0 {
                return Err(invalid(
                    "noop.jobs",
                    "the `noop` stage needs at least 1 job",
                ));
            }
            if self.noop.jobs > self.limits.max_jobs_per_stage {
                return Err(invalid(
                    "noop.jobs",
                    format!(
                        "{} jobs exceed limits.max_jobs_per_stage = {}",
                        self.noop.jobs, self.limits.max_jobs_per_stage
                    ),
                ));
            }
            if let Some(bad) = self.noop.fatal_jobs.iter().find(|i| **i >= self.noop.jobs) {
                return Err(invalid(
                    "noop.fatal_jobs",
                    format!("job index {bad} is out of range 0..{}", self.noop.jobs),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let spec = RunSpec::from_toml(
            r#"
            name = "airflow"
            stages = ["mine", "judge"]
            [[sources]]
            kind = "pypi"
            package = "apache-airflow"
            versions = ["2.10.5"]
            [limits]
            deadline = "2h"
            "#,
        )
        .unwrap();
        assert_eq!(spec.stages, vec![Stage::Mine, Stage::Judge]);
        assert_eq!(spec.limits.deadline, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn errors_name_the_key() {
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"judge\", \"mine\"]").unwrap_err();
        assert!(
            matches!(err, SpecError::Invalid { ref key, .. } if key == "stages"),
            "{err}"
        );
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"mine\"]").unwrap_err();
        assert!(err.to_string().contains("`sources`"), "{err}");
        let err =
            RunSpec::from_toml("name = \"x\"\nstages = [\"noop\"]\n[noop]\njobs = 0").unwrap_err();
        assert!(err.to_string().contains("noop.jobs"), "{err}");
        let err = RunSpec::from_toml("name = \"x\"\nstages = [\"noop\"]\nbogus = 1").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = RunSpec::from_toml("name = \"x y\"\nstages = [\"noop\"]").unwrap_err();
        assert!(err.to_string().contains("`name`"), "{err}");
    }
}
