//! The engine as the agent's model: the repair loop of the infer stage (`infer.repair`) and
//! of `dagfleet serve`'s `POST /v1/dags` generate through it directly, so repair turns batch
//! with every other request the engine runs.

use dagfleet_agent::{GenerateError, Generated, Generator};
use dagfleet_providers::Message;

use crate::{ChatMessage, Engine, FinishReason, GenParams};

/// A [`Generator`] over a running [`Engine`].
#[derive(Clone)]
pub struct EngineGenerator {
    /// The engine.
    pub engine: Engine,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// Sampling seed.
    pub seed: Option<u64>,
}

impl Generator for EngineGenerator {
    async fn generate(
        &self,
        system: &str,
        messages: &[Message],
        max_tokens: u32,
    ) -> Result<Generated, GenerateError> {
        let chat: Vec<ChatMessage> = (!system.is_empty())
            .then(|| ChatMessage {
                role: "system".into(),
                content: system.into(),
            })
            .into_iter()
            .chain(messages.iter().map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            }))
            .collect();
        let params = GenParams {
            max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            ..Default::default()
        };
        let (text, st) = self
            .engine
            .generate(&chat, params)
            .await
            .map_err(GenerateError::new)?;
        Ok(Generated {
            text,
            prompt_tokens: st.prompt_tokens as u64,
            completion_tokens: st.generated_tokens as u64,
            finish_reason: match st.finish_reason {
                FinishReason::Stop => "stop".into(),
                FinishReason::Length => "length".into(),
            },
        })
    }
}
