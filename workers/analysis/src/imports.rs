//! Import rules: modules deprecated or removed by Airflow version, and internal test code.

use crate::report::{Category, Finding, Import, Severity};

/// One deprecated import path.
struct Deprecation {
    /// Module path, or `module:name` for one name.
    path: &'static str,
    /// Deprecated from this version.
    since: (u32, u32),
    /// Removed in this version.
    removed: Option<(u32, u32)>,
    /// What to use instead.
    instead: &'static str,
}

const TABLE: &[Deprecation] = &[
    Deprecation {
        path: "airflow.operators.bash_operator",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.operators.bash",
    },
    Deprecation {
        path: "airflow.operators.python_operator",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.operators.python",
    },
    Deprecation {
        path: "airflow.operators.dummy_operator",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.operators.empty",
    },
    Deprecation {
        path: "airflow.operators.email_operator",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.operators.email",
    },
    Deprecation {
        path: "airflow.operators.subdag_operator",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "task groups",
    },
    Deprecation {
        path: "airflow.operators.subdag",
        since: (2, 2),
        removed: Some((3, 0)),
        instead: "task groups",
    },
    Deprecation {
        path: "airflow.sensors.external_task_sensor",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.sensors.external_task",
    },
    Deprecation {
        path: "airflow.sensors.time_delta_sensor",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "airflow.sensors.time_delta",
    },
    Deprecation {
        path: "airflow.contrib",
        since: (2, 0),
        removed: Some((3, 0)),
        instead: "the provider packages (airflow.providers.*)",
    },
    Deprecation {
        path: "airflow.operators.dummy",
        since: (2, 4),
        removed: Some((3, 0)),
        instead: "airflow.operators.empty.EmptyOperator",
    },
    Deprecation {
        path: "airflow.utils.dates:days_ago",
        since: (2, 3),
        removed: Some((3, 0)),
        instead: "pendulum.today('UTC').add(days=-N) or a fixed datetime",
    },
    Deprecation {
        path: "airflow.operators.bash",
        since: (3, 0),
        removed: None,
        instead: "airflow.providers.standard.operators.bash",
    },
    Deprecation {
        path: "airflow.operators.python",
        since: (3, 0),
        removed: None,
        instead: "airflow.providers.standard.operators.python",
    },
    Deprecation {
        path: "airflow.operators.empty",
        since: (3, 0),
        removed: None,
        instead: "airflow.providers.standard.operators.empty",
    },
];

/// Top-level modules of Airflow's own test code, which generated DAGs must never import.
const TEST_MODULES: &[&str] = &["tests", "tests_common", "dev", "unit", "system"];
/// Names that only exist in Airflow's test harness.
const TEST_NAMES: &[&str] = &["get_test_run", "get_test_env_id", "watcher"];

fn matches(path: &str, imp: &Import) -> bool {
    match path.split_once(':') {
        Some((module, name)) => imp.module == module && imp.name.as_deref() == Some(name),
        None => imp
            .module
            .strip_prefix(path)
            .is_some_and(|t| t.is_empty() || t.starts_with('.')),
    }
}

/// Findings for `imports` with `target` as the Airflow version.
pub fn check(imports: &[Import], target: (u32, u32)) -> Vec<Finding> {
    let mut out = Vec::new();
    for imp in imports {
        let top = imp.module.split('.').next().unwrap_or("");
        let test_module = TEST_MODULES.contains(&top) && !imp.module.is_empty();
        let test_name = imp.name.as_deref().is_some_and(|n| TEST_NAMES.contains(&n));
        if test_module || test_name {
            out.push(Finding {
                category: Category::InternalTestImport,
                severity: Severity::Error,
                line: imp.line,
                column: 1,
                message: format!(
                    "imports internal test code `{}{}`, which is not installed with Airflow",
                    imp.module,
                    imp.name
                        .as_deref()
                        .map(|n| format!(".{n}"))
                        .unwrap_or_default()
                ),
            });
            continue;
        }
        match crate::kb::Kb::get().lookup(&imp.module, imp.name.as_deref()) {
            crate::kb::Lookup::NoModule => {
                out.push(Finding {
                    category: Category::HallucinatedModule,
                    severity: Severity::Error,
                    line: imp.line,
                    column: 1,
                    message: format!(
                        "module `{}` does not exist in any Airflow or provider release dagfleet knows",
                        imp.module
                    ),
                });
                continue;
            }
            crate::kb::Lookup::OtherProvider(p) => {
                out.push(Finding {
                    category: Category::MissingProvider,
                    severity: Severity::Error,
                    line: imp.line,
                    column: 1,
                    message: format!(
                        "`{}` needs the provider package `apache-airflow-providers-{p}`, which dagfleet's knowledge base does not cover: the DAG loads only where it is installed, if it exists",
                        imp.module
                    ),
                });
                continue;
            }
            crate::kb::Lookup::Exists if !crate::kb::Kb::get().in_major(&imp.module, target.0) => {
                out.push(Finding {
                    category: Category::HallucinatedModule,
                    severity: Severity::Error,
                    line: imp.line,
                    column: 1,
                    message: format!(
                        "module `{}` does not exist in Airflow {}.{} (it ships with Airflow {})",
                        imp.module,
                        target.0,
                        target.1,
                        if target.0 >= 3 { "2" } else { "3" }
                    ),
                });
                continue;
            }
            crate::kb::Lookup::NoName => {
                out.push(Finding {
                    category: Category::HallucinatedName,
                    severity: Severity::Error,
                    line: imp.line,
                    column: 1,
                    message: format!(
                        "`{}` is not defined in `{}`",
                        imp.name.as_deref().unwrap_or(""),
                        imp.module
                    ),
                });
                continue;
            }
            _ => {}
        }
        for d in TABLE {
            if !matches(d.path, imp) || target < d.since {
                continue;
            }
            let removed = d.removed.is_some_and(|r| target >= r);
            out.push(Finding {
                category: Category::DeprecatedImport,
                severity: if removed {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                line: imp.line,
                column: 1,
                message: format!(
                    "`{}` is {} in Airflow {}.{}; use {}",
                    d.path.replace(':', "."),
                    if removed { "removed" } else { "deprecated" },
                    target.0,
                    target.1,
                    d.instead
                ),
            });
            break;
        }
    }
    out
}
