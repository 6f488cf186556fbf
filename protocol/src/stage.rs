//! Pipeline stages and the worker roles that run them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One step of a pipeline run. The canonical order is [`Stage::PIPELINE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Find DAG files in repositories and releases: one job per (source, ref) shard.
    Mine,
    /// Ask a teacher LLM for instructions: one job per batch chunk.
    Synthesize,
    /// Turn (instruction, DAG) pairs into train/valid/test splits.
    Dataset,
    /// LoRA fine-tuning.
    Train,
    /// Generation over prompt sets: one job per inference batch.
    Infer,
    /// Static and LLM judgement of generated DAGs: one job per judge batch.
    Judge,
    /// The run report.
    Report,
    /// Does nothing useful; exercises the job layer in tests and benchmarks.
    Noop,
}

impl Stage {
    /// The stages of a full pipeline in the order they run. `noop` is not part of it; a run
    /// spec may list it on its own.
    pub const PIPELINE: [Stage; 7] = [
        Stage::Mine,
        Stage::Synthesize,
        Stage::Dataset,
        Stage::Train,
        Stage::Infer,
        Stage::Judge,
        Stage::Report,
    ];

    /// Every stage, including `noop`.
    pub const ALL: [Stage; 8] = [
        Stage::Mine,
        Stage::Synthesize,
        Stage::Dataset,
        Stage::Train,
        Stage::Infer,
        Stage::Judge,
        Stage::Report,
        Stage::Noop,
    ];

    /// The role whose workers run jobs of this stage.
    pub fn role(self) -> Role {
        match self {
            Stage::Mine => Role::Miner,
            Stage::Synthesize | Stage::Dataset => Role::Synthesizer,
            Stage::Train => Role::Trainer,
            Stage::Infer => Role::Inference,
            Stage::Judge | Stage::Report => Role::Judge,
            Stage::Noop => Role::Noop,
        }
    }

    /// Lower-case name, as used in subjects, keys and specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Mine => "mine",
            Stage::Synthesize => "synthesize",
            Stage::Dataset => "dataset",
            Stage::Train => "train",
            Stage::Infer => "infer",
            Stage::Judge => "judge",
            Stage::Report => "report",
            Stage::Noop => "noop",
        }
    }

    /// Position in the canonical order; `noop` sorts last.
    pub fn order(self) -> usize {
        Self::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_named(s, "stage", &Stage::ALL, |x| x.as_str())
    }
}

/// Finds the member of `all` named `s`, or says which names exist.
fn parse_named<T: Copy>(
    s: &str,
    what: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, String> {
    all.iter().copied().find(|x| name(*x) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|x| name(*x)).collect();
        format!(
            "unknown {what} `{s}`; expected one of: {}",
            names.join(", ")
        )
    })
}

/// A kind of worker. All workers of one role share one durable JetStream consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs `mine` jobs.
    Miner,
    /// Runs `synthesize` and `dataset` jobs.
    Synthesizer,
    /// Runs `train` jobs.
    Trainer,
    /// Runs `infer` jobs.
    Inference,
    /// Runs `judge` and `report` jobs.
    Judge,
    /// Runs `noop` jobs.
    Noop,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Miner,
        Role::Synthesizer,
        Role::Trainer,
        Role::Inference,
        Role::Judge,
        Role::Noop,
    ];

    /// Lower-case name, as used in subjects, consumer names and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Miner => "miner",
            Role::Synthesizer => "synthesizer",
            Role::Trainer => "trainer",
            Role::Inference => "inference",
            Role::Judge => "judge",
            Role::Noop => "noop",
        }
    }

    /// The stages this role runs.
    pub fn stages(self) -> Vec<Stage> {
        Stage::ALL
            .into_iter()
            .filter(|s| s.role() == self)
            .collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_named(s, "role", &Role::ALL, |x| x.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(s.as_str().parse::<Stage>().unwrap(), s);
            assert!(s.role().stages().contains(&s));
        }
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("trian"
            .parse::<Stage>()
            .unwrap_err()
            .contains("unknown stage `trian`"));
    }
}
