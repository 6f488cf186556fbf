//! The rmp-serde codec. Structs are written as maps with named fields so that adding an
//! optional field stays readable by older workers.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Envelope, Event, SCHEMA_VERSION};

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes are not a valid MessagePack encoding of the expected type.
    #[error("undecodable {what} ({bytes} bytes): {reason}")]
    Undecodable {
        /// The expected type.
        what: &'static str,
        /// Size of the input.
        bytes: usize,
        /// The decoder's message.
        reason: String,
    },
    /// The message was written with a schema version this build does not read.
    #[error("{what} has schema version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        /// The type.
        what: &'static str,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The value could not be encoded.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The type.
        what: &'static str,
        /// The encoder's message.
        reason: String,
    },
}

#[derive(Deserialize)]
struct VersionProbe {
    schema_version: u16,
}

/// Encodes `value` as MessagePack with named fields.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode {
        what: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// Decodes a value that carries no schema version of its own (run state, records).
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Undecodable {
        what,
        bytes: bytes.len(),
        reason: e.to_string(),
    })
}

/// Something with a schema version of its own.
trait Versioned {
    fn schema_version(&self) -> u16;
}

impl Versioned for Envelope {
    fn schema_version(&self) -> u16 {
        self.schema_version
    }
}

impl Versioned for Event {
    fn schema_version(&self) -> u16 {
        self.schema_version
    }
}

fn decode_versioned<T: DeserializeOwned + Versioned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, CodecError> {
    let unsupported = |found| CodecError::UnsupportedVersion {
        what,
        found,
        supported: SCHEMA_VERSION,
    };
    // One decode on the common path; the version probe runs only to explain a failure, so a
    // message from another schema is reported as such rather than as garbage.
    match decode::<T>(what, bytes) {
        Ok(v) if v.schema_version() == SCHEMA_VERSION => Ok(v),
        Ok(v) => Err(unsupported(v.schema_version())),
        Err(e) => match decode::<VersionProbe>(what, bytes) {
            Ok(p) if p.schema_version != SCHEMA_VERSION => Err(unsupported(p.schema_version)),
            _ => Err(e),
        },
    }
}

/// Decodes a job envelope and checks its schema version.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, CodecError> {
    decode_versioned("job envelope", bytes)
}

/// Decodes an event and checks its schema version.
pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    decode_versioned("event", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::*;
    use crate::{EventKind, JobId, RunId, Stage};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn run() -> RunId {
        RunId::new("r-test").unwrap()
    }

    fn art(n: u8) -> ArtifactRef {
        ArtifactRef {
            key: format!("runs/r/x/{n}"),
            sha256: "ab".repeat(32),
            bytes: n as u64,
        }
    }

    fn every_job() -> Vec<Job> {
        let model = ModelRef {
            provider: "openai".into(),
            model: "qwen".into(),
        };
        vec![
            Job::Mine(MineShard {
                source: Source::Pypi {
                    package: "apache-airflow".into(),
                    versions: vec!["2.10.5".into()],
                    index_url: None,
                },
                reference: "2.10.5".into(),
                globs: vec!["example_*.py".into()],
            }),
            Job::Synthesize(SynthChunk {
                inputs: vec![art(1)],
                rows: (0, 10),
                teacher: model.clone(),
                spec: crate::spec::SynthSpec::default(),
            }),
            Job::Dataset(DatasetBuild {
                inputs: vec![art(2)],
                spec: crate::spec::DatasetSpec::default(),
                held_out: vec![art(10)],
            }),
            Job::Train(TrainJob {
                base: model.clone(),
                train: art(3),
                valid: Some(art(8)),
                spec: crate::spec::TrainSpec::default(),
            }),
            Job::Infer(InferBatch {
                model,
                adapter: Some(art(4)),
                weights: Some(art(9)),
                input: art(5),
                rows: (0, 64),
                spec: crate::spec::InferSpec::default(),
            }),
            Job::Judge(JudgeBatch {
                input: art(6),
                rows: (0, 100),
                airflow_version: Some("2.10.5".into()),
                dagbag: Some("2.10".into()),
                llm: Some(crate::jobs::LlmJudging {
                    model: crate::jobs::ModelRef {
                        provider: "local".into(),
                        model: "judge".into(),
                    },
                    cap: 2.0,
                    max_tokens: 512,
                }),
            }),
            Job::Report(ReportJob {
                inputs: vec![art(7)],
                llm: None,
            }),
            Job::Noop(NoopJob {
                work_ms: 5,
                output_bytes: 10,
                fail_attempts: 1,
                fatal: false,
            }),
        ]
    }

    #[test]
    fn every_stage_round_trips() {
        for (i, job) in every_job().into_iter().enumerate() {
            let env = Envelope::new(
                run(),
                job.stage(),
                i as u32,
                &i.to_string(),
                1_700_000_000_000,
                job,
            );
            let bytes = encode(&env).unwrap();
            assert_eq!(decode_envelope(&bytes).unwrap(), env);
        }
    }

    #[test]
    fn fields_are_named_on_the_wire() {
        let env = Envelope::new(run(), Stage::Noop, 0, "k", 0, Job::Noop(NoopJob::default()));
        let bytes = encode(&env).unwrap();
        let needle = b"schema_version";
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn unknown_version_is_a_typed_error() {
        let mut env = Envelope::new(run(), Stage::Noop, 0, "k", 0, Job::Noop(NoopJob::default()));
        env.schema_version = 99;
        let bytes = encode(&env).unwrap();
        assert_eq!(
            decode_envelope(&bytes).unwrap_err(),
            CodecError::UnsupportedVersion {
                what: "job envelope",
                found: 99,
                supported: SCHEMA_VERSION
            }
        );
    }

    #[test]
    fn a_future_shape_reports_its_version() {
        #[derive(serde::Serialize)]
        struct Future {
            schema_version: u16,
            something_else: Vec<u8>,
        }
        let bytes = encode(&Future {
            schema_version: 2,
            something_else: vec![1, 2],
        })
        .unwrap();
        assert!(matches!(
            decode_envelope(&bytes),
            Err(CodecError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for bytes in [&b""[..], b"\xc1", b"hello world", &[0x81, 0xa1, b'x', 0x01]] {
            assert!(matches!(
                decode_envelope(bytes),
                Err(CodecError::Undecodable { .. })
            ));
        }
    }

    #[test]
    fn events_round_trip() {
        let ev = Event {
            schema_version: SCHEMA_VERSION,
            run_id: run(),
            at_ms: 5,
            kind: EventKind::JobsDone {
                records: vec![JobRecord {
                    job_id: JobId::derive(&run(), Stage::Noop, "0"),
                    run_id: run(),
                    stage: Stage::Noop,
                    index: 0,
                    inputs: vec![],
                    outputs: vec![art(1)],
                    metrics: BTreeMap::from([("rows".into(), 3.0)]),
                    worker: "w1".into(),
                    attempt: 2,
                    duration_ms: 4,
                    finished_at_ms: 9,
                }],
            },
        };
        assert_eq!(decode_event(&encode(&ev).unwrap()).unwrap(), ev);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes);
            let _ = decode_event(&bytes);
        }

        #[test]
        fn noop_envelopes_round_trip(
            run_id in "[A-Za-z0-9_-]{1,64}",
            index in any::<u32>(),
            key in ".*",
            at in any::<i64>(),
            work_ms in any::<u64>(),
            output_bytes in any::<u32>(),
            fail_attempts in any::<u32>(),
            fatal in any::<bool>(),
        ) {
            let job = Job::Noop(NoopJob { work_ms, output_bytes, fail_attempts, fatal });
            let env = Envelope::new(RunId::new(run_id).unwrap(), Stage::Noop, index, &key, at, job);
            let bytes = encode(&env).unwrap();
            prop_assert_eq!(decode_envelope(&bytes).unwrap(), env);
        }

        #[test]
        fn truncated_envelopes_are_errors(cut in 0usize..200) {
            let env = Envelope::new(run(), Stage::Noop, 3, "k", 0, Job::Noop(NoopJob::default()));
            let bytes = encode(&env).unwrap();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(decode_envelope(&bytes[..cut]).is_err());
        }
    }
}
