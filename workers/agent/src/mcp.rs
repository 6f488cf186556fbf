//! `dagfleet mcp`: the agent and the judges as a Model Context Protocol server (the official
//! Rust SDK, `rmcp`), over stdio or streamable HTTP.
//!
//! Tools: `generate_dag` (the repair loop of [`crate::run`] against the configured model
//! server), `validate_dag` (the static judge, and Airflow's DagBag where an environment is
//! installed), `explain_findings` (what each finding means and how to fix it) and
//! `list_models`. Resources: the knowledge base of what Airflow releases ship
//! (`airflow-kb://wheels`, and `airflow-kb://module/{dotted.path}` for any module).

use dagfleet_analysis::kb::Kb;
use dagfleet_analysis::{Category, Options, Severity};
use dagfleet_judge::dagbag::Dagbag;
use dagfleet_judge::{extract_code, judge_source, parse_airflow_version};
use dagfleet_providers::{Provider, ProviderConfig, ProviderKind};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    Implementation, ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{AgentConfig, ProviderGenerator};

/// Starts a DagBag pool for an Airflow `MAJOR.MINOR`, or says why it cannot.
pub type DagbagFactory = Arc<dyn Fn(&str) -> Result<Dagbag, String> + Send + Sync>;

/// What the server needs to know.
#[derive(Clone)]
pub struct McpSettings {
    /// The OpenAI-compatible model server `generate_dag` and `list_models` use.
    pub url: String,
    /// The model name; the server's first when absent.
    pub model: Option<String>,
    /// The Airflow version when a call names none.
    pub airflow_version: String,
    /// The model server's API key, sent as the bearer token.
    pub api_key: Option<dagfleet_providers::Secret>,
    /// DagBag pools, started on first use per version; `None`: DagBag is not offered.
    pub dagbag: Option<DagbagFactory>,
}

/// The MCP server.
#[derive(Clone)]
pub struct DagMcp {
    tool_router: ToolRouter<Self>,
    settings: McpSettings,
    pools: Arc<Mutex<HashMap<String, Arc<Dagbag>>>>,
}

/// `validate_dag`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ValidateArgs {
    /// The DAG file's Python source (a fenced ```python block is unwrapped).
    pub code: String,
    /// Target Airflow version, e.g. "2.10" or "3.0" (default: the server's).
    #[serde(default)]
    pub airflow_version: Option<String>,
    /// Also load the file with Airflow's own DagBag (needs an installed environment).
    #[serde(default)]
    pub dagbag: bool,
}

/// `generate_dag`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct GenerateArgs {
    /// What the DAG should do, in prose.
    pub instruction: String,
    /// Target Airflow version (default: the server's).
    #[serde(default)]
    pub airflow_version: Option<String>,
    /// Attempts in all, 1 to 5 (default 3): the first generation and repair turns.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// New tokens per attempt, 1 to 8192 (default 2048).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Judge each attempt with DagBag too.
    #[serde(default)]
    pub dagbag: bool,
}

/// `explain_findings`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExplainArgs {
    /// A DAG file to judge and explain.
    #[serde(default)]
    pub code: Option<String>,
    /// Finding categories to explain, e.g. ["HALLUCINATED_MODULE"].
    #[serde(default)]
    pub categories: Vec<String>,
    /// Target Airflow version (default: the server's).
    #[serde(default)]
    pub airflow_version: Option<String>,
}

/// What a finding category means and how to fix it.
pub fn explain(c: Category) -> (&'static str, &'static str) {
    use Category::*;
    match c {
        SyntaxError => ("Python cannot compile the file.", "Fix the syntax at the line given; a file cut off mid-statement was usually truncated by the token limit."),
        CircularDependency => ("The tasks depend on each other in a cycle; Airflow refuses the DAG.", "Remove one of the `>>`/`set_downstream` edges so the dependencies form a DAG."),
        DuplicateTaskId => ("Two tasks of one DAG share a task_id; Airflow refuses the DAG.", "Give every task a unique task_id."),
        InvalidTaskId => ("A task_id has characters or a length Airflow rejects.", "Use letters, digits, `_`, `-` and `.` only, at most 250 characters."),
        MultipleDags => ("The file defines more than one DAG (allowed, but often unintended).", "Keep one DAG per file unless you mean to define several."),
        EmptyDag => ("A DAG has no tasks.", "Add the tasks inside the DAG context or pass `dag=`."),
        Truncated => ("The file ends inside a construct: the generator hit its token limit.", "Generate again with more tokens, or ask for a shorter DAG."),
        NoDag => ("No DAG is defined; Airflow would find nothing to schedule.", "Create a `DAG(...)` (constructor, `with` block or `@dag` function that is called)."),
        UndefinedName => ("A name is used but never defined or imported; the import fails with NameError.", "Import or define the name before use."),
        MissingImport => ("An Airflow class is used but never imported.", "Add the import from the module that defines it in this Airflow version."),
        DeprecatedImport => ("An import deprecated or removed in the target Airflow version.", "Import from the module the finding names instead."),
        InternalTestImport => ("An import of Airflow's own test code, which installed Airflow does not ship.", "Remove the test harness (`tests`, `tests_common`, `get_test_run`, `watcher()`)."),
        HallucinatedModule => ("The module does not exist in any Airflow or provider release.", "Use a real module: see the knowledge-base resource airflow-kb://module/{path} for what exists."),
        HallucinatedName => ("The module exists but does not define the imported name.", "Import a name the module really defines (airflow-kb://module/{path} lists them)."),
        MissingProvider => ("The import needs a provider package the knowledge base does not cover; it loads only where that provider is installed.", "Install the provider (apache-airflow-providers-...) or use an operator from an installed one."),
        WrongArgument => ("An operator or DAG gets an argument no class in its chain accepts, or lacks a required one.", "Use the constructor's real parameters (the finding names them)."),
        UnknownAttribute => ("An attribute the Airflow class does not have.", "Use an attribute or method the class defines."),
        _ => ("A problem the judge found.", "See the finding's message."),
    }
}

fn category_named(name: &str) -> Option<Category> {
    serde_json::from_value(json!(name.to_uppercase())).ok()
}

fn as_json(v: serde_json::Value) -> String {
    serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

impl DagMcp {
    /// A server with `settings`.
    pub fn new(settings: McpSettings) -> Self {
        Self {
            tool_router: Self::tool_router(),
            settings,
            pools: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn version(&self, v: &Option<String>) -> Result<(u32, u32), String> {
        parse_airflow_version(v.as_deref().unwrap_or(&self.settings.airflow_version))
            .map_err(|e| format!("airflow_version {e}"))
    }

    fn pool(&self, version: (u32, u32)) -> Result<Arc<Dagbag>, String> {
        let key = format!("{}.{}", version.0, version.1);
        let Some(factory) = &self.settings.dagbag else {
            return Err("DagBag is not available on this server (no Airflow environment; see `bash tests/airflow-env.sh`)".into());
        };
        if let Some(p) = self.pools.lock().map_err(|e| e.to_string())?.get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(factory(&key)?);
        self.pools
            .lock()
            .map_err(|e| e.to_string())?
            .insert(key, p.clone());
        Ok(p)
    }
}

#[tool_router(router = tool_router)]
impl DagMcp {
    /// Judges a DAG file: valid or not, and why.
    #[tool(
        name = "validate_dag",
        description = "Judge an Airflow DAG file: the static judge (syntax, imports against the real Airflow and provider releases, operator arguments, cycles, task ids) and, with dagbag=true, Airflow's own DagBag. Returns valid, the findings with line numbers, dag ids and task count."
    )]
    async fn validate_dag(
        &self,
        Parameters(a): Parameters<ValidateArgs>,
    ) -> Result<String, String> {
        let version = self.version(&a.airflow_version)?;
        let code = extract_code(&a.code).code;
        if code.trim().is_empty() {
            return Err("code is empty".into());
        }
        let pool = if a.dagbag {
            Some(self.pool(version)?)
        } else {
            None
        };
        let (verdict, dagbag) = crate::judge(&code, version, pool.as_ref()).await;
        let valid = verdict.valid && dagbag.as_ref().is_none_or(|d| d.clean);
        Ok(as_json(json!({
            "valid": valid,
            "airflow_version": format!("{}.{}", version.0, version.1),
            "static": verdict,
            "dagbag": dagbag,
        })))
    }

    /// Generates a DAG with the repair loop.
    #[tool(
        name = "generate_dag",
        description = "Generate an Airflow DAG from an instruction with the served model, judge it, and repair it with the judges' findings until it passes or the attempts run out. Returns the best DAG, whether it is valid, and every attempt with its findings, tokens and seconds."
    )]
    async fn generate_dag(
        &self,
        Parameters(a): Parameters<GenerateArgs>,
    ) -> Result<String, String> {
        let version = self.version(&a.airflow_version)?;
        let attempts = a.max_attempts.unwrap_or(3);
        if !(1..=5).contains(&attempts) {
            return Err(format!("max_attempts is {attempts}; it must be 1 to 5"));
        }
        let max_tokens = a.max_tokens.unwrap_or(2048);
        if !(1..=8192).contains(&max_tokens) {
            return Err(format!("max_tokens is {max_tokens}; it must be 1 to 8192"));
        }
        let pool = if a.dagbag {
            Some(self.pool(version)?)
        } else {
            None
        };
        let model = match &self.settings.model {
            Some(m) => m.clone(),
            None => crate::served_model(
                &self.settings.url,
                self.settings.api_key.as_ref().map(|k| k.expose()),
            )
            .await
            .map_err(|e| e.to_string())?,
        };
        let provider = Provider::new(
            "mcp",
            ProviderConfig {
                max_retries: 1,
                api_key: self.settings.api_key.clone(),
                ..ProviderConfig::new(ProviderKind::Openai, Some(self.settings.url.clone()))
            },
        )
        .map_err(|e| e.to_string())?;
        let g = ProviderGenerator {
            provider,
            model,
            temperature: 0.0,
        };
        let cfg = AgentConfig {
            max_attempts: attempts,
            max_tokens,
            airflow_version: version,
            ..Default::default()
        };
        let r = crate::run(&g, &a.instruction, &cfg, pool.as_ref(), |_| {})
            .await
            .map_err(|e| e.to_string())?;
        Ok(as_json(json!(r)))
    }

    /// Explains findings.
    #[tool(
        name = "explain_findings",
        description = "Explain judge findings: for a DAG file (code) every error and warning with what it means and how to fix it, or for finding categories (e.g. HALLUCINATED_MODULE) their meaning."
    )]
    async fn explain_findings(
        &self,
        Parameters(a): Parameters<ExplainArgs>,
    ) -> Result<String, String> {
        if a.code.is_none() && a.categories.is_empty() {
            return Err("give code, categories, or both".into());
        }
        let mut out = Vec::new();
        if let Some(code) = &a.code {
            let version = self.version(&a.airflow_version)?;
            let v = judge_source(
                &extract_code(code).code,
                &Options {
                    airflow_version: version,
                },
            );
            for f in &v.findings {
                let (meaning, fix) = explain(f.category);
                out.push(json!({
                    "category": f.category, "severity": f.severity, "line": f.line,
                    "message": f.message, "meaning": meaning, "fix": fix,
                    "blocks_loading": f.severity == Severity::Error,
                }));
            }
        }
        for name in &a.categories {
            let c =
                category_named(name).ok_or_else(|| format!("unknown finding category `{name}`"))?;
            let (meaning, fix) = explain(c);
            out.push(json!({"category": c, "meaning": meaning, "fix": fix}));
        }
        Ok(as_json(json!({ "explanations": out })))
    }

    /// Lists the models of the model server.
    #[tool(
        name = "list_models",
        description = "List the models the configured model server serves (GET /v1/models)."
    )]
    async fn list_models(&self) -> Result<String, String> {
        let url = format!("{}/v1/models", self.settings.url.trim_end_matches('/'));
        let v: serde_json::Value = reqwest::Client::new()
            .get(&url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                format!(
                    "the model server at {} is not answering: {e}",
                    self.settings.url
                )
            })?
            .json()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let ids: Vec<&str> = v["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        Ok(as_json(
            json!({ "server": self.settings.url, "models": ids }),
        ))
    }
}

const WHEELS: &str = "airflow-kb://wheels";
const MODULE: &str = "airflow-kb://module/";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for DagMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("dagfleet", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Generate Airflow DAGs that Airflow accepts: generate_dag (generate, judge, repair), validate_dag (static judge and DagBag), explain_findings, list_models. Resources describe which Airflow and provider modules really exist.",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(WHEELS, "Airflow releases known")
                .with_description(
                    "The Airflow, task-SDK and provider wheels the knowledge base was built from",
                )
                .with_mime_type("application/json"),
            Resource::new(
                format!("{MODULE}airflow.operators.bash"),
                "airflow.operators.bash",
            )
            .with_description(
                "An example module entry: its public names and the releases that ship it",
            )
            .with_mime_type("application/json"),
        ]))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(format!("{MODULE}{{path}}"), "Airflow module")
                .with_description("Whether a dotted module path exists in any Airflow or provider release, with its public names and distributions")
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri;
        let kb = Kb::get();
        let body = if uri == WHEELS {
            json!({ "wheels": kb.wheels })
        } else if let Some(path) = uri.strip_prefix(MODULE) {
            match kb.module(path) {
                Some(m) => {
                    let mut names: Vec<&String> = m.names.iter().collect();
                    names.sort();
                    json!({
                        "module": path, "exists": true, "names": names,
                        "resolves_any_name": m.open, "distributions": m.dists,
                        "deprecated": m.deprecated,
                    })
                }
                None => {
                    return Err(ErrorData::resource_not_found(
                        format!("no Airflow or provider release ships module `{path}`"),
                        None,
                    ))
                }
            }
        } else {
            return Err(ErrorData::resource_not_found(
                format!("unknown resource `{uri}`; try {WHEELS} or {MODULE}<dotted.path>"),
                None,
            ));
        };
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(as_json(body), uri).with_mime_type("application/json")
        ])
        .into())
    }
}

/// Serves over stdin/stdout until the client closes them.
pub async fn serve_stdio(server: DagMcp) -> Result<(), String> {
    use rmcp::ServiceExt;
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| e.to_string())?;
    running.waiting().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Serves streamable HTTP at `/mcp` on `listener` until `shutdown`.
pub async fn serve_http(
    server: DagMcp,
    listener: tokio::net::TcpListener,
    access: &crate::auth::Access,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let cfg = StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token());
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        LocalSessionManager::default().into(),
        cfg,
    );
    let app = access.layer(axum::Router::new().nest_service("/mcp", service));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
