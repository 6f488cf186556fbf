//! `dagfleet generate "instruction"`: the DAG agent on this machine against a served model
//! (`dagfleet serve`, any OpenAI-compatible server, or a `[providers.NAME]` entry).

use anyhow::{Context, Result};
use dagfleet_agent::{AgentConfig, ProviderGenerator};
use dagfleet_providers::{Provider, ProviderConfig, ProviderKind};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// What `dagfleet generate` was asked.
pub struct Args {
    pub instruction: String,
    pub airflow_version: String,
    pub url: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: u32,
    pub max_tokens: u32,
    pub temperature: f32,
    pub dagbag: bool,
    pub out: Option<PathBuf>,
    pub json: bool,
}

/// Runs the agent; exit 0 with a valid DAG, 1 when no attempt passed, errors otherwise.
pub async fn run(cfg: &crate::config::Config, a: Args) -> Result<ExitCode> {
    anyhow::ensure!(
        a.attempts >= 1,
        "--attempts must be at least 1 (1: no repair turns)"
    );
    anyhow::ensure!(a.max_tokens >= 1, "--max-tokens must be at least 1");
    let version = crate::judge::parse_version(&a.airflow_version)?;
    let (name, pcfg) = match &a.provider {
        Some(p) => (
            p.clone(),
            cfg.providers
                .get(p)
                .cloned()
                .with_context(|| format!("--provider `{p}`: no [providers.{p}] in the config"))?,
        ),
        None => (
            "local".to_string(),
            ProviderConfig {
                max_retries: 1,
                api_key: cfg.http.api_key.clone(),
                ..ProviderConfig::new(ProviderKind::Openai, Some(a.url.clone()))
            },
        ),
    };
    let base = pcfg.base_url.clone().unwrap_or_else(|| a.url.clone());
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let key = pcfg.api_key.as_ref().map(|k| k.expose().to_string());
            dagfleet_agent::served_model(&base, key.as_deref()).await?
        }
    };
    let provider = Provider::new(&name, pcfg)?;
    let dagbag = match a.dagbag {
        true => Some(Arc::new(crate::judge::dagbag_pool(
            &cfg.judge,
            &a.airflow_version,
        )?)),
        false => None,
    };
    let gen = ProviderGenerator {
        provider,
        model: model.clone(),
        temperature: a.temperature,
    };
    let acfg = AgentConfig {
        max_attempts: a.attempts,
        max_tokens: a.max_tokens,
        airflow_version: version,
        ..Default::default()
    };
    eprintln!(
        "generating with `{model}` at {base} (Airflow {}.{}, up to {} attempts{})",
        version.0,
        version.1,
        a.attempts,
        if dagbag.is_some() { ", DagBag on" } else { "" }
    );
    let r = dagfleet_agent::run(&gen, &a.instruction, &acfg, dagbag.as_ref(), |at| {
        let errors: Vec<String> = at
            .verdict
            .findings
            .iter()
            .filter(|f| f.severity == dagfleet_analysis::Severity::Error)
            .take(3)
            .map(|f| format!("line {}: {:?}", f.line, f.category))
            .collect();
        let db = match &at.dagbag {
            Some(d) if d.clean => ", DagBag clean".to_string(),
            Some(d) => format!(
                ", DagBag {}",
                d.error_class.as_deref().unwrap_or("not clean")
            ),
            None => String::new(),
        };
        eprintln!(
            "  attempt {}: {}{}{db} ({} tokens, {:.1} s){}",
            at.attempt,
            if at.valid { "valid" } else { "invalid" },
            if errors.is_empty() {
                String::new()
            } else {
                format!(" [{}]", errors.join("; "))
            },
            at.prompt_tokens + at.completion_tokens,
            at.generate_seconds + at.judge_seconds,
            if at.truncated { ", cut off" } else { "" },
        );
    })
    .await?;
    eprintln!(
        "{} after {} attempt(s): best is attempt {}, {} tokens, {:.1} s",
        if r.valid { "valid DAG" } else { "no valid DAG" },
        r.attempts.len(),
        r.best,
        r.total_tokens,
        r.seconds
    );
    if let Some(p) = &a.out {
        std::fs::write(p, &r.dag).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    let mut stdout = std::io::stdout().lock();
    if a.json {
        writeln!(stdout, "{}", serde_json::to_string(&r)?)?;
    } else if a.out.is_none() {
        write!(stdout, "{}", r.dag)?;
    }
    Ok(if r.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Who may use this process's HTTP server: `http.api_key`, or anyone with
/// `--insecure-no-auth`.
pub fn access(cfg: &crate::config::Config, insecure_no_auth: bool) -> dagfleet_agent::auth::Access {
    dagfleet_agent::auth::Access {
        api_key: cfg.http.api_key.as_ref().map(|k| k.expose().to_string()),
        insecure_no_auth,
    }
}

/// `dagfleet mcp`: the MCP server on stdio, or streamable HTTP at `http`.
pub async fn mcp(
    cfg: &crate::config::Config,
    http: Option<String>,
    insecure_no_auth: bool,
    url: String,
    model: Option<String>,
    airflow_version: String,
) -> Result<()> {
    crate::judge::parse_version(&airflow_version)?;
    let (_, envs) = dagfleet_judge::dagbag::configured(&cfg.judge);
    let dagbag: Option<dagfleet_agent::mcp::DagbagFactory> = (!envs.is_empty()).then(|| {
        let judge = cfg.judge.clone();
        let f: dagfleet_agent::mcp::DagbagFactory = Arc::new(move |v: &str| {
            crate::judge::dagbag_pool(&judge, v).map_err(|e| e.to_string())
        });
        f
    });
    let server = dagfleet_agent::mcp::DagMcp::new(dagfleet_agent::mcp::McpSettings {
        url,
        model,
        airflow_version,
        api_key: cfg.http.api_key.clone(),
        dagbag,
    });
    let access = access(cfg, insecure_no_auth);
    match http {
        None => dagfleet_agent::mcp::serve_stdio(server)
            .await
            .map_err(anyhow::Error::msg),
        Some(addr) => {
            access.check_listen(&addr).map_err(anyhow::Error::msg)?;
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("MCP over streamable HTTP at http://{}/mcp", l.local_addr()?);
            let stop = tokio_util::sync::CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                s.cancel();
            });
            dagfleet_agent::mcp::serve_http(server, l, &access, stop).await?;
            Ok(())
        }
    }
}

/// The agent `dagfleet serve` runs over its engine (greedy, so a repair turn is the model's
/// best answer to the findings); `dagbag` adds Airflow's own check for `airflow_version`.
#[cfg(feature = "inference")]
pub fn agent_service(
    cfg: &crate::config::Config,
    engine: dagfleet_inference::Engine,
    dagbag: bool,
    airflow_version: &str,
) -> Result<dagfleet_agent::http::AgentService<dagfleet_inference::agent::EngineGenerator>> {
    let version = crate::judge::parse_version(airflow_version)?;
    let dagbag = match dagbag {
        true => Some(Arc::new(crate::judge::dagbag_pool(
            &cfg.judge,
            airflow_version,
        )?)),
        false => None,
    };
    Ok(dagfleet_agent::http::AgentService {
        generator: dagfleet_inference::agent::EngineGenerator {
            engine,
            temperature: 0.0,
            seed: None,
        },
        config: AgentConfig {
            airflow_version: version,
            ..Default::default()
        },
        dagbag,
    })
}
