//! The synthesizer role. It runs two stages:
//!
//! - **synthesize**: one job per chunk of mined DAGs. For each DAG it asks the teacher for
//!   N instruction variants (and for any extra task kinds of the run spec), through the
//!   provider's batch API or online requests, with every reply cached in the artifact store;
//!   it parses and filters the replies and adds troubleshooting pairs made by failure
//!   injection. Output: `pairs.jsonl`, `rejected.jsonl`, `summary.json`.
//! - **dataset**: one job over all pairs: ChatML `train.jsonl`, `valid.jsonl`, `test.jsonl`
//!   and `stats.json` ([`dataset`]), after removing every pair that comes near a held-out
//!   evaluation prompt or test DAG ([`decontam`]).
//!
//! A job that submits a provider batch writes the batch id to the store before it polls
//! (`runs/<run>/synthesize/<job>/provider-batches/<round>-<n>.json`); a redelivered or
//! restarted job finds the record and re-attaches to the batch instead of paying twice.

mod batches;
pub mod dataset;
mod dataset_stage;
pub mod decontam;
pub mod filters;
mod handler;
pub mod inject;
pub mod parse;
mod synthesize;

pub use handler::SynthHandler;
pub use synthesize::TeacherRow;
