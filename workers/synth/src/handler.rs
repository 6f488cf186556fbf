//! The synthesizer role's handler: provider clients built once per worker, and the
//! dispatch of its two stages ([`crate::synthesize`] and [`crate::dataset_stage`]).

use dagfleet_protocol::{Envelope, Job, Role};
use dagfleet_providers::{Provider, ProviderConfig, ProviderKind};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Handler of the `synthesizer` role.
#[derive(Clone, Default)]
pub struct SynthHandler {
    configs: Arc<BTreeMap<String, ProviderConfig>>,
    built: Arc<Mutex<HashMap<String, Provider>>>,
}

impl std::fmt::Debug for SynthHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthHandler")
            .field("providers", &self.configs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SynthHandler {
    /// A handler with the `[providers.*]` settings of the worker config.
    pub fn new(providers: BTreeMap<String, ProviderConfig>) -> Self {
        Self {
            configs: Arc::new(providers),
            built: Arc::default(),
        }
    }

    pub(crate) fn provider(&self, name: &str) -> Result<Provider, JobError> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = built.get(name) {
            return Ok(p.clone());
        }
        let cfg = match (self.configs.get(name), name) {
            (Some(c), _) => c.clone(),
            (None, "anthropic") => ProviderConfig::new(ProviderKind::Anthropic, None),
            (None, "openai") => ProviderConfig::new(ProviderKind::Openai, None),
            (None, other) => {
                return Err(JobError::fatal(format!(
                    "teacher provider `{other}` is not configured on this worker; add [providers.{other}] with `kind` and `base_url` to its config (configured: {})",
                    self.configs.keys().cloned().collect::<Vec<_>>().join(", ")
                )))
            }
        };
        let p = Provider::new(name, cfg).map_err(|e| JobError::fatal(e.to_string()))?;
        built.insert(name.to_string(), p.clone());
        Ok(p)
    }
}

impl Handler for SynthHandler {
    fn role(&self) -> Role {
        Role::Synthesizer
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        match &env.job {
            Job::Synthesize(job) => self.synthesize(env, job, ctx).await,
            Job::Dataset(job) => self.dataset(job, ctx).await,
            other => Err(JobError::fatal(format!(
                "the synthesizer role got a `{}` job, which it does not run",
                other.stage()
            ))),
        }
    }
}
