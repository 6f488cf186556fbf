//! The DAG agent: generate → judge → repair.
//!
//! [`run`] asks a model (anything that implements [`Generator`]: an OpenAI-compatible server
//! through [`ProviderGenerator`], e.g. `dagfleet serve`) for a DAG, judges the code with the
//! static judge and, where an Airflow environment is installed, with Airflow's own DagBag,
//! and when it fails sends the findings back as a repair turn, up to
//! [`AgentConfig::max_attempts`] attempts. It returns the best attempt (the first that
//! passes every check that ran, else the one with the fewest errors) with the history of
//! all of them, their tokens and seconds.

#[cfg(feature = "http")]
pub mod auth;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "mcp")]
pub mod mcp;

use dagfleet_analysis::{Options, Severity};
use dagfleet_judge::dagbag::{Dagbag, DagbagVerdict};
use dagfleet_judge::{extract_code, judge_source, Verdict};
use dagfleet_providers::{ChatRequest, Message, Provider};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// The system prompt of the original project's evaluation, which the fine-tunes learn.
pub const DEFAULT_SYSTEM: &str =
    "You are an expert Apache Airflow developer. Generate complete, valid Airflow DAGs based on given requirements.";

/// Most findings quoted back in one repair turn.
const MAX_FINDINGS_QUOTED: usize = 12;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The model could not be reached or answered with an error.
    #[error("generation failed on attempt {attempt}: {reason}")]
    Generate {
        /// The attempt, from 1.
        attempt: u32,
        /// The model's or the transport's error.
        #[source]
        reason: GenerateError,
    },
    /// The settings cannot work.
    #[error("{0}")]
    Config(String),
}

/// One answer of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The text.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Why a [`Generator`] could not answer: the model's or the transport's error, kept whole.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct GenerateError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl GenerateError {
    /// Wraps `e`.
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        GenerateError(e.into())
    }
}

/// Something that answers a conversation.
pub trait Generator: Send + Sync {
    /// Answers `messages` (after `system`) with at most `max_tokens` new tokens.
    fn generate(
        &self,
        system: &str,
        messages: &[Message],
        max_tokens: u32,
    ) -> impl Future<Output = Result<Generated, GenerateError>> + Send;
}

/// A [`Generator`] over a teacher provider (OpenAI-compatible servers such as
/// `dagfleet serve`, vLLM or llama.cpp's server; Anthropic).
pub struct ProviderGenerator {
    /// The provider.
    pub provider: Provider,
    /// The model name sent with each request.
    pub model: String,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
}

impl Generator for ProviderGenerator {
    async fn generate(
        &self,
        system: &str,
        messages: &[Message],
        max_tokens: u32,
    ) -> Result<Generated, GenerateError> {
        let req = ChatRequest {
            custom_id: "agent".into(),
            system: Some(system.to_string()),
            messages: messages.to_vec(),
            max_tokens,
            temperature: Some(self.temperature),
        };
        let r = self
            .provider
            .chat(&self.model, &req)
            .await
            .map_err(GenerateError::new)?;
        Ok(Generated {
            text: r.text,
            prompt_tokens: r.usage.input_tokens,
            completion_tokens: r.usage.output_tokens,
            finish_reason: r.finish_reason,
        })
    }
}

/// The first model an OpenAI-compatible server at `base_url` lists (`GET /v1/models`), for
/// when the user names none; `api_key` goes as the bearer token where the server asks one.
pub async fn served_model(base_url: &str, api_key: Option<&str>) -> Result<String, AgentError> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let down = |e: String| {
        AgentError::Config(format!("no model server at {base_url}: {e} (start one with `dagfleet serve MODEL`, or give --url)"))
    };
    let mut req = reqwest::Client::new()
        .get(&url)
        .timeout(std::time::Duration::from_secs(10));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let v: serde_json::Value = req
        .send()
        .await
        .map_err(|e| down(e.to_string()))?
        .error_for_status()
        .map_err(|e| down(e.to_string()))?
        .json()
        .await
        .map_err(|e| down(e.to_string()))?;
    v["data"][0]["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| down(format!("{url} lists no model")))
}

/// How the agent works.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Attempts in all: the first generation and up to `max_attempts - 1` repairs.
    pub max_attempts: u32,
    /// New tokens per attempt.
    pub max_tokens: u32,
    /// The target Airflow version, `(major, minor)`.
    pub airflow_version: (u32, u32),
    /// The system prompt.
    pub system: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            max_tokens: 2048,
            airflow_version: (2, 10),
            system: DEFAULT_SYSTEM.into(),
        }
    }
}

/// What the judges said about one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// From 1.
    pub attempt: u32,
    /// The code taken from the answer.
    pub code: String,
    /// The static judge's verdict.
    pub verdict: Verdict,
    /// Airflow's DagBag, where an environment was given.
    pub dagbag: Option<DagbagVerdict>,
    /// Passes every check that ran.
    pub valid: bool,
    /// The answer was cut off by the token limit.
    pub truncated: bool,
    /// Prompt tokens of this attempt.
    pub prompt_tokens: u64,
    /// Generated tokens of this attempt.
    pub completion_tokens: u64,
    /// Seconds spent generating.
    pub generate_seconds: f64,
    /// Seconds spent judging.
    pub judge_seconds: f64,
    /// The model's whole answer (the code in its fence, with any prose around it); not in
    /// the result's JSON, which carries `code`.
    #[serde(skip)]
    pub answer: String,
}

impl Attempt {
    /// Error findings of the static judge, plus one when DagBag refused the file.
    pub fn errors(&self) -> usize {
        self.verdict
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
            + usize::from(self.dagbag.as_ref().is_some_and(|d| !d.clean))
    }
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentResult {
    /// The instruction.
    pub instruction: String,
    /// The best attempt's code.
    pub dag: String,
    /// Whether it passes every check that ran.
    pub valid: bool,
    /// Which attempt it is, from 1.
    pub best: u32,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Tokens over all attempts (prompt + generated).
    pub total_tokens: u64,
    /// Wall seconds over all attempts.
    pub seconds: f64,
}

/// The user turn of a first attempt: the instruction and the Airflow version it targets,
/// in the style of the evaluation prompts.
pub fn first_turn(instruction: &str, version: (u32, u32)) -> String {
    if instruction.contains("Airflow Version") {
        instruction.to_string()
    } else {
        format!(
            "{instruction}\n\nAirflow Version: {}.{}",
            version.0, version.1
        )
    }
}

/// The Airflow version a prompt names on an `Airflow Version: X.Y[.Z]` line (the style of
/// the evaluation prompts and of the synthesized instructions).
pub fn airflow_version_in(text: &str) -> Option<(u32, u32)> {
    let i = text.find("Airflow Version:")?;
    let v: String = text[i + "Airflow Version:".len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    dagfleet_judge::parse_airflow_version(&v).ok()
}

/// The repair turn: what the judges found, and the ask for the whole corrected file.
pub fn repair_turn(a: &Attempt, version: (u32, u32)) -> String {
    let mut s = format!(
        "The DAG file you wrote does not load in Airflow {}.{}. Problems found:\n",
        version.0, version.1
    );
    let errors: Vec<_> = a
        .verdict
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    for f in errors.iter().take(MAX_FINDINGS_QUOTED) {
        s.push_str(&format!(
            "- line {}: {:?}: {}\n",
            f.line, f.category, f.message
        ));
    }
    if errors.len() > MAX_FINDINGS_QUOTED {
        s.push_str(&format!(
            "- and {} more\n",
            errors.len() - MAX_FINDINGS_QUOTED
        ));
    }
    if let Some(d) = a.dagbag.as_ref().filter(|d| !d.clean) {
        let class = d.error_class.as_deref().unwrap_or("ImportError");
        let msg: String = d
            .error
            .as_deref()
            .unwrap_or("the file defines no DAG")
            .chars()
            .take(600)
            .collect();
        s.push_str(&format!("- Airflow's DagBag: {class}: {msg}\n"));
    }
    if a.truncated {
        s.push_str("- the answer was cut off before the end: write a shorter file\n");
    }
    s.push_str(
        "Fix every problem and answer with the complete corrected DAG file in one ```python block. Use only operators and modules that exist in this Airflow version and its provider packages.",
    );
    s
}

/// Judges `code` statically and, with `dagbag`, by loading it in Airflow.
pub async fn judge(
    code: &str,
    version: (u32, u32),
    dagbag: Option<&Arc<Dagbag>>,
) -> (Verdict, Option<DagbagVerdict>) {
    let opts = Options {
        airflow_version: version,
    };
    let code = code.to_string();
    let dagbag = dagbag.cloned();
    let r = tokio::task::spawn_blocking(move || {
        let v = judge_source(
            &code,
            &Options {
                airflow_version: version,
            },
        );
        let d = dagbag.map(|d| d.check(&code));
        (v, d)
    })
    .await;
    match r {
        Ok(x) => x,
        Err(e) => (
            judge_source("", &opts),
            Some(DagbagVerdict {
                status: "crashed".into(),
                error_class: Some("Crashed".into()),
                error: Some(e.to_string()),
                ..Default::default()
            }),
        ),
    }
}

/// Generates a DAG for `instruction`, judging and repairing it; `progress` sees each
/// attempt as it is judged.
pub async fn run<G: Generator>(
    generator: &G,
    instruction: &str,
    cfg: &AgentConfig,
    dagbag: Option<&Arc<Dagbag>>,
    progress: impl FnMut(&Attempt),
) -> Result<AgentResult, AgentError> {
    let messages = vec![Message {
        role: "user".into(),
        content: first_turn(instruction, cfg.airflow_version),
    }];
    run_turns(
        generator,
        instruction,
        messages,
        None,
        cfg,
        dagbag,
        progress,
    )
    .await
}

/// The loop over a conversation that is already written (`messages`, ending with the
/// user's turn; the system prompt is `cfg.system`). With `first`, the model's answer to it
/// is already known (the infer stage's single-shot generation) and attempt 1 only judges it.
pub async fn run_turns<G: Generator>(
    generator: &G,
    instruction: &str,
    mut messages: Vec<Message>,
    mut first: Option<Generated>,
    cfg: &AgentConfig,
    dagbag: Option<&Arc<Dagbag>>,
    mut progress: impl FnMut(&Attempt),
) -> Result<AgentResult, AgentError> {
    if cfg.max_attempts == 0 {
        return Err(AgentError::Config("max_attempts must be at least 1".into()));
    }
    if instruction.trim().is_empty() {
        return Err(AgentError::Config("the instruction is empty".into()));
    }
    let t0 = Instant::now();
    let mut attempts: Vec<Attempt> = Vec::new();
    for n in 1..=cfg.max_attempts {
        let g0 = Instant::now();
        let out = match first.take() {
            Some(g) => g,
            None => generator
                .generate(&cfg.system, &messages, cfg.max_tokens)
                .await
                .map_err(|reason| AgentError::Generate { attempt: n, reason })?,
        };
        let generate_seconds = g0.elapsed().as_secs_f64();
        let ex = extract_code(&out.text);
        let j0 = Instant::now();
        let (verdict, dagbag_verdict) = judge(&ex.code, cfg.airflow_version, dagbag).await;
        let valid = verdict.valid && dagbag_verdict.as_ref().is_none_or(|d| d.clean);
        let a = Attempt {
            attempt: n,
            code: ex.code,
            verdict,
            dagbag: dagbag_verdict,
            valid,
            truncated: ex.unclosed_fence || out.finish_reason == "length",
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            generate_seconds,
            judge_seconds: j0.elapsed().as_secs_f64(),
            answer: out.text.clone(),
        };
        progress(&a);
        let done = a.valid;
        if !done && n < cfg.max_attempts {
            messages.push(Message {
                role: "assistant".into(),
                content: out.text,
            });
            messages.push(Message {
                role: "user".into(),
                content: repair_turn(&a, cfg.airflow_version),
            });
        }
        attempts.push(a);
        if done {
            break;
        }
    }
    let best = attempts
        .iter()
        .position(|a| a.valid)
        .or_else(|| {
            attempts
                .iter()
                .enumerate()
                .min_by_key(|(i, a)| (a.errors(), *i))
                .map(|(i, _)| i)
        })
        .unwrap_or(0);
    Ok(AgentResult {
        instruction: instruction.to_string(),
        dag: attempts[best].code.clone(),
        valid: attempts[best].valid,
        best: attempts[best].attempt,
        total_tokens: attempts
            .iter()
            .map(|a| a.prompt_tokens + a.completion_tokens)
            .sum(),
        seconds: t0.elapsed().as_secs_f64(),
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a script, recording what it was asked: the loop's logic, apart from any
    /// model (the real-model test is tests/process/agent.rs).
    struct Scripted {
        answers: Mutex<Vec<String>>,
        seen: Mutex<Vec<Vec<Message>>>,
    }

    impl Generator for Scripted {
        async fn generate(
            &self,
            _system: &str,
            messages: &[Message],
            _max_tokens: u32,
        ) -> Result<Generated, GenerateError> {
            self.seen.lock().unwrap().push(messages.to_vec());
            let mut a = self.answers.lock().unwrap();
            if a.is_empty() {
                return Err(GenerateError::new("no more answers"));
            }
            Ok(Generated {
                text: a.remove(0),
                prompt_tokens: 10,
                completion_tokens: 20,
                finish_reason: "stop".into(),
            })
        }
    }

    const BROKEN: &str = "```python\nfrom airflow import DAG\nfrom airflow.operators.magic import MagicOperator\nwith DAG('d') as dag:\n    MagicOperator(task_id='t')\n```";
    const FIXED: &str = "```python\nfrom datetime import datetime\nfrom airflow import DAG\nfrom airflow.operators.bash import BashOperator\nwith DAG('d', start_date=datetime(2024, 1, 1), schedule=None) as dag:\n    BashOperator(task_id='t', bash_command='echo hi')\n```";

    #[tokio::test]
    async fn a_broken_dag_is_repaired_with_its_findings_quoted_back() {
        let g = Scripted {
            answers: Mutex::new(vec![BROKEN.into(), FIXED.into()]),
            seen: Mutex::new(Vec::new()),
        };
        let mut seen = Vec::new();
        let r = run(
            &g,
            "Write a DAG d with one bash task.",
            &AgentConfig::default(),
            None,
            |a| seen.push(a.valid),
        )
        .await
        .unwrap();
        assert_eq!(seen, vec![false, true]);
        assert!(r.valid);
        assert_eq!(r.best, 2);
        assert!(r.dag.contains("BashOperator"));
        assert_eq!(r.total_tokens, 60);
        let asked = g.seen.lock().unwrap();
        assert!(asked[0][0].content.ends_with("Airflow Version: 2.10"));
        // The repair turn names the hallucinated module and keeps the conversation.
        let repair = &asked[1];
        assert_eq!(repair.len(), 3);
        assert_eq!(repair[1].role, "assistant");
        assert!(
            repair[2].content.contains("airflow.operators.magic"),
            "{}",
            repair[2].content
        );
    }

    #[test]
    fn the_airflow_version_is_read_from_the_prompt() {
        assert_eq!(
            airflow_version_in("Do x.\nAirflow Version: 2.7.3\n"),
            Some((2, 7))
        );
        assert_eq!(airflow_version_in("Airflow Version: 3.0"), Some((3, 0)));
        assert_eq!(airflow_version_in("Airflow Version: soon"), None);
        assert_eq!(airflow_version_in("no version"), None);
    }

    #[tokio::test]
    async fn a_known_first_answer_is_judged_and_only_the_repairs_are_generated() {
        let g = Scripted {
            answers: Mutex::new(vec![FIXED.into()]),
            seen: Mutex::new(Vec::new()),
        };
        let first = Generated {
            text: BROKEN.into(),
            prompt_tokens: 5,
            completion_tokens: 7,
            finish_reason: "stop".into(),
        };
        let msgs = vec![Message {
            role: "user".into(),
            content: "Write a DAG d.".into(),
        }];
        let r = run_turns(
            &g,
            "Write a DAG d.",
            msgs,
            Some(first),
            &AgentConfig::default(),
            None,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(r.attempts.len(), 2);
        assert!(!r.attempts[0].valid && r.valid);
        assert_eq!(r.attempts[0].answer, BROKEN);
        assert_eq!(
            g.seen.lock().unwrap().len(),
            1,
            "attempt 1 was not generated again"
        );
    }

    #[tokio::test]
    async fn the_best_of_failed_attempts_is_the_one_with_fewest_errors() {
        let two_errors = "```python\nfrom airflow.operators.magic import A\nfrom airflow.operators.wizard import B\n```";
        let g = Scripted {
            answers: Mutex::new(vec![two_errors.into(), BROKEN.into(), two_errors.into()]),
            seen: Mutex::new(Vec::new()),
        };
        let r = run(&g, "x", &AgentConfig::default(), None, |_| {})
            .await
            .unwrap();
        assert!(!r.valid);
        assert_eq!(r.attempts.len(), 3);
        assert_eq!(r.best, 2);
        // A model that stops answering is an error that names the attempt.
        let g = Scripted {
            answers: Mutex::new(vec![BROKEN.into()]),
            seen: Mutex::new(Vec::new()),
        };
        let e = run(&g, "x", &AgentConfig::default(), None, |_| {})
            .await
            .unwrap_err();
        assert!(e.to_string().contains("attempt 2"), "{e}");
        let cfg = AgentConfig {
            max_attempts: 0,
            ..Default::default()
        };
        assert!(run(&g, "x", &cfg, None, |_| {}).await.is_err());
    }
}
