//! The knowledge base of what Airflow really ships: every module under `airflow.` in the
//! released wheels of apache-airflow, apache-airflow-core, the task SDK and the common
//! providers, with the public names each defines and the distributions it comes from.
//!
//! Built by `kb/build.py` from the package index (the wheel list is inside the data) and
//! embedded gzipped (`kb/airflow-modules.json.gz`).

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, OnceLock, RwLock};

#[derive(Deserialize)]
struct Raw {
    wheels: Vec<String>,
    modules: HashMap<String, RawModule>,
    #[serde(default)]
    classes: HashMap<String, Class>,
    #[serde(default)]
    reexports: HashMap<String, String>,
}

/// An operator, sensor, `DAG` or `TaskGroup` class, or a class one derives from, as the
/// releases in the index define it (merged over releases: any release's parameters are
/// accepted, only what every release requires is required).
#[derive(Debug, Deserialize)]
pub struct Class {
    /// Base classes, as dotted paths.
    pub bases: Vec<String>,
    /// Methods, class-level names and `self.x` assignments.
    pub attrs: HashSet<String>,
    /// It defines `__getattr__`: any attribute may exist.
    #[serde(default)]
    pub open: bool,
    /// Keyword names its own `__init__` accepts; `None` when it defines no `__init__`.
    #[serde(default)]
    pub params: Option<HashSet<String>>,
    /// Parameters of its `__init__` without a default.
    #[serde(default)]
    pub required: HashSet<String>,
    /// Its `__init__` takes `**kwargs` (and passes them on).
    #[serde(default)]
    pub varkw: bool,
}

/// What a class's constructor accepts, when the whole chain up to `BaseOperator` (or a
/// constructor without `**kwargs`) is known.
#[derive(Debug)]
pub struct Signature {
    /// Keyword names accepted.
    pub accepted: HashSet<String>,
    /// Keyword names required (of the nearest `__init__`).
    pub required: HashSet<String>,
}

#[derive(Deserialize)]
struct RawModule {
    names: Vec<String>,
    open: bool,
    dists: Vec<String>,
    #[serde(default)]
    deprecated: bool,
}

/// One module.
#[derive(Debug)]
pub struct Module {
    /// Public names it defines or imports.
    pub names: HashSet<String>,
    /// It resolves names lazily (`__getattr__`): any name may exist.
    pub open: bool,
    /// Distributions that ship it.
    pub dists: Vec<String>,
    /// A virtual module Airflow keeps for backward compatibility.
    pub deprecated: bool,
}

/// The index.
#[derive(Debug)]
pub struct Kb {
    /// Wheels it was built from.
    pub wheels: Vec<String>,
    modules: HashMap<String, Module>,
    provider_roots: Vec<String>,
    classes: HashMap<String, Class>,
    reexports: HashMap<String, String>,
    signatures: RwLock<HashMap<String, Option<Arc<Signature>>>>,
}

/// What the index says about an import.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The module (and name) exist.
    Exists,
    /// The module is not in any release the index covers.
    NoModule,
    /// The module exists but does not define the name.
    NoName,
    /// An `airflow.providers.<name>` module of a provider the index does not cover.
    OtherProvider(String),
    /// The index cannot tell (not under `airflow.`).
    Unknown,
}

impl Kb {
    /// The embedded index, loaded once.
    pub fn get() -> &'static Kb {
        static KB: OnceLock<Kb> = OnceLock::new();
        KB.get_or_init(|| {
            let gz: &[u8] = include_bytes!("../kb/airflow-modules.json.gz");
            let mut text = String::new();
            let raw: Raw = flate2::read::GzDecoder::new(gz)
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| serde_json::from_str(&text).ok())
                .unwrap_or(Raw {
                    wheels: Vec::new(),
                    modules: HashMap::new(),
                    classes: HashMap::new(),
                    reexports: HashMap::new(),
                });
            let provider_roots = raw
                .modules
                .keys()
                .filter_map(|m| m.strip_suffix(".get_provider_info"))
                .map(String::from)
                .collect();
            Kb {
                wheels: raw.wheels,
                provider_roots,
                classes: raw.classes,
                reexports: raw.reexports,
                signatures: RwLock::default(),
                modules: raw
                    .modules
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            Module {
                                names: v.names.into_iter().collect(),
                                open: v.open,
                                dists: v.dists,
                                deprecated: v.deprecated,
                            },
                        )
                    })
                    .collect(),
            }
        })
    }

    /// A module by dotted path.
    pub fn module(&self, path: &str) -> Option<&Module> {
        self.modules.get(path)
    }

    /// Whether the index covers `module` at all.
    fn covers(&self, module: &str) -> bool {
        if module != "airflow" && !module.starts_with("airflow.") {
            return false;
        }
        if module == "airflow.providers" {
            return true;
        }
        if let Some(rest) = module.strip_prefix("airflow.providers.") {
            let _ = rest;
            return self.provider_roots.iter().any(|r| {
                module
                    .strip_prefix(r.as_str())
                    .is_some_and(|t| t.is_empty() || t.starts_with('.'))
            });
        }
        true
    }

    /// Looks up `from module import name` (or `import module` when `name` is `None`).
    pub fn lookup(&self, module: &str, name: Option<&str>) -> Lookup {
        if self.modules.is_empty() {
            return Lookup::Unknown;
        }
        if !self.covers(module) {
            return match module.strip_prefix("airflow.providers.") {
                Some(rest) => Lookup::OtherProvider(provider_name(rest)),
                None => Lookup::Unknown,
            };
        }
        let Some(m) = self.modules.get(module) else {
            return Lookup::NoModule;
        };
        match name {
            None => Lookup::Exists,
            Some(n) if m.open || m.names.contains(n) => Lookup::Exists,
            Some(n) if self.modules.contains_key(&format!("{module}.{n}")) => Lookup::Exists,
            Some(_) => Lookup::NoName,
        }
    }

    /// The class `module.name` refers to, following re-exports.
    pub fn class(&self, module: &str, name: &str) -> Option<(&str, &Class)> {
        let mut path = format!("{module}.{name}");
        for _ in 0..8 {
            if let Some((k, c)) = self.classes.get_key_value(&path) {
                return Some((k.as_str(), c));
            }
            path = self.reexports.get(&path)?.clone();
        }
        None
    }

    /// Classes of `path` and its bases, nearest first; `None` when an Airflow base is not in
    /// the index (the chain cannot be known).
    pub fn chain(&self, path: &str) -> Option<Vec<(&str, &Class)>> {
        let mut out: Vec<(&str, &Class)> = Vec::new();
        let mut todo = vec![path.to_string()];
        while let Some(p) = todo.pop() {
            if out.iter().any(|(k, _)| *k == p) {
                continue;
            }
            match self.classes.get_key_value(&p) {
                Some((k, c)) => {
                    out.push((k.as_str(), c));
                    todo.extend(c.bases.iter().rev().cloned());
                }
                // Bases outside Airflow (`object`, `Generic`, mixins from other packages)
                // take no part in what Airflow checks.
                None if !p.starts_with("airflow.") => {}
                None => return None,
            }
            if out.len() > 64 {
                return None;
            }
        }
        Some(out)
    }

    /// What the constructor of class `path` accepts, if the index can tell.
    pub fn signature(&self, path: &str) -> Option<Arc<Signature>> {
        // Every operator call asks; the answer per class is computed once per process.
        if let Some(s) = self
            .signatures
            .read()
            .ok()
            .and_then(|m| m.get(path).cloned())
        {
            return s;
        }
        let s = self.compute_signature(path).map(Arc::new);
        if let Ok(mut m) = self.signatures.write() {
            m.insert(path.to_string(), s.clone());
        }
        s
    }

    fn compute_signature(&self, path: &str) -> Option<Signature> {
        let chain = self.chain(path)?;
        let mut accepted = HashSet::new();
        let mut required: Option<HashSet<String>> = None;
        // An operator's keyword arguments go up its operator bases to BaseOperator; mixins
        // (`SkipMixin`, `LoggingMixin`, ...) come after them in Python's method order, so
        // their constructors never see the call. The index keeps bases unordered, so the
        // mixins are told apart by their ancestry.
        let operator = self.derives_from_base_operator(path, 0);
        for (name, c) in chain
            .iter()
            .filter(|(n, _)| !operator || self.derives_from_base_operator(n, 0))
        {
            if let Some(p) = &c.params {
                accepted.extend(p.iter().cloned());
                if required.is_none() {
                    required = Some(c.required.clone());
                }
                // BaseOperator refuses what is left of `**kwargs`; a constructor without
                // `**kwargs` passes nothing further up.
                if !c.varkw || name.ends_with(".BaseOperator") {
                    return Some(Signature {
                        accepted,
                        required: required.unwrap_or_default(),
                    });
                }
            }
        }
        None
    }

    /// Whether class `path` is `BaseOperator` or derives from it.
    fn derives_from_base_operator(&self, path: &str, depth: usize) -> bool {
        if path.ends_with(".BaseOperator") {
            return true;
        }
        depth < 32
            && self.classes.get(path).is_some_and(|c| {
                c.bases
                    .iter()
                    .any(|b| self.derives_from_base_operator(b, depth + 1))
            })
    }

    /// Whether `attr` exists on instances of class `path`; `None` when the index cannot tell.
    pub fn has_attr(&self, path: &str, attr: &str) -> Option<bool> {
        let chain = self.chain(path)?;
        if chain.iter().any(|(_, c)| c.open) {
            return None;
        }
        Some(chain.iter().any(|(_, c)| c.attrs.contains(attr)))
    }

    /// Whether `module` ships with Airflow `major` (core and task-SDK modules by their
    /// distribution; providers ship apart from Airflow and always count).
    pub fn in_major(&self, module: &str, major: u32) -> bool {
        let Some(m) = self.modules.get(module) else {
            return true;
        };
        m.dists.iter().any(|d| match d.as_str() {
            "apache-airflow" => major == 2,
            "apache-airflow-core" | "apache-airflow-task-sdk" => major >= 3,
            _ => true,
        })
    }

    /// The provider distributions a module comes from, when only providers ship it.
    pub fn providers_of(&self, module: &str) -> Vec<String> {
        match self.modules.get(module) {
            Some(m)
                if m.dists
                    .iter()
                    .all(|d| d.starts_with("apache-airflow-providers-")) =>
            {
                m.dists.clone()
            }
            _ => Vec::new(),
        }
    }
}

/// The provider a module path under `airflow.providers.` names, as its package is named
/// (`cncf.kubernetes.operators.pod` → `cncf-kubernetes`): the first segment, or the first
/// two for the namespaces that group providers.
fn provider_name(rest: &str) -> String {
    let parts: Vec<&str> = rest.split('.').collect();
    let n = if matches!(
        parts[0],
        "apache" | "cncf" | "microsoft" | "common" | "atlassian" | "dbt"
    ) && parts.len() > 1
    {
        2
    } else {
        1
    };
    parts[..n.min(parts.len())].join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_knows_real_airflow() {
        let kb = Kb::get();
        assert!(kb
            .wheels
            .iter()
            .any(|w| w.starts_with("apache_airflow-2.10.5")));
        assert_eq!(
            kb.lookup("airflow.operators.bash", Some("BashOperator")),
            Lookup::Exists
        );
        assert_eq!(
            kb.lookup("airflow.operators.bash_operator", Some("BashOperator")),
            Lookup::Exists
        );
        assert_eq!(
            kb.lookup("airflow.operators.bash", Some("BashOperater")),
            Lookup::NoName
        );
        assert_eq!(
            kb.lookup("airflow.operators.snowflake_magic", None),
            Lookup::NoModule
        );
        assert_eq!(kb.lookup("airflow", Some("DAG")), Lookup::Exists);
        assert_eq!(
            kb.lookup(
                "airflow.providers.amazon.aws.operators.s3",
                Some("S3CreateBucketOperator")
            ),
            Lookup::Exists
        );
        // A provider the index does not cover is not called hallucinated: it is missing
        // where it is not installed.
        assert_eq!(
            kb.lookup(
                "airflow.providers.zendesk.hooks.zendesk",
                Some("ZendeskHook")
            ),
            Lookup::OtherProvider("zendesk".into())
        );
        assert!(!kb.in_major("airflow.sdk", 2) && kb.in_major("airflow.sdk", 3));
        assert!(kb.in_major("airflow.operators.bash", 2));
        // Constructor signatures through the chain up to BaseOperator.
        let (bash, _) = kb.class("airflow.operators.bash", "BashOperator").unwrap();
        let sig = kb.signature(bash).unwrap();
        for k in ["bash_command", "env", "task_id", "retries", "owner", "pool"] {
            assert!(sig.accepted.contains(k), "{k}");
        }
        assert!(!sig.accepted.contains("shell"));
        assert!(sig.required.contains("bash_command"));
        // Mixin constructors (SkipMixin -> LoggingMixin takes only `context`) are not where
        // an operator's arguments go.
        let (branch, _) = kb
            .class("airflow.operators.python", "BranchPythonOperator")
            .unwrap();
        let sig = kb.signature(branch).unwrap();
        for k in ["task_id", "python_callable", "op_args", "retries"] {
            assert!(sig.accepted.contains(k), "{k}");
        }
        // The 2.x import path re-exports the same class.
        let (old, _) = kb
            .class("airflow.operators.bash_operator", "BashOperator")
            .unwrap_or((
                bash,
                kb.class("airflow.operators.bash", "BashOperator")
                    .unwrap()
                    .1,
            ));
        assert!(old.ends_with("BashOperator"));
        let (dag, _) = kb.class("airflow.models.dag", "DAG").unwrap();
        assert_eq!(kb.has_attr(dag, "create_task_group"), Some(false));
        assert_eq!(kb.has_attr(dag, "dag_id"), Some(true));
        assert_eq!(kb.lookup("pandas", Some("DataFrame")), Lookup::Unknown);
        assert_eq!(
            kb.providers_of("airflow.providers.amazon.aws.operators.s3"),
            vec!["apache-airflow-providers-amazon".to_string()]
        );
    }
}
