//! Real data: the miner on apache-airflow releases from PyPI finds exactly the DAG files
//! Airflow's own DagBag loads from the same files (labels in tests/data/dagbag), apart
//! from the files whose DAGs sit behind an environment check, listed here with the reason.
//! Needs network access to the package index (pypi.org), as CI has; where it cannot be
//! reached, each test says so and skips, unless `DAGFLEET_REQUIRE_NETWORK=1` makes that a
//! failure.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

/// DAGs defined only when the environment allows; DagBag in a plain install loads none.
const ENVIRONMENT_DEPENDENT_2_6_3: &[(&str, &str)] = &[
    (
        "airflow/example_dags/example_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/example_local_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/example_setup_teardown.py",
        "`if _ENABLE_AIP_52:` (feature flag, off by default)",
    ),
    (
        "airflow/example_dags/example_setup_teardown_taskflow.py",
        "`if _ENABLE_AIP_52:` (feature flag, off by default)",
    ),
    (
        "airflow/example_dags/tutorial_taskflow_api_virtualenv.py",
        "`if not shutil.which(\"virtualenv\"): ... else:`",
    ),
];

/// The same for 2.0.2.
const ENVIRONMENT_DEPENDENT_2_0_2: &[(&str, &str)] = &[(
    "airflow/example_dags/example_kubernetes_executor_config.py",
    "DAG inside `try: from kubernetes.client import models` ... `except ImportError`",
)];

/// DAG files DagBag loads that the miner drops on purpose, with the filter that drops them.
const DROPPED_ON_PURPOSE: &[(&str, &str)] = &[(
    "airflow/example_dags/test_utils.py",
    "\"Used for unit tests\": a test file (test_*.py), never training data",
)];

/// The same for 2.10.5.
const ENVIRONMENT_DEPENDENT_2_10_5: &[(&str, &str)] = &[
    (
        "airflow/example_dags/example_branch_operator.py",
        "`if is_venv_installed():`",
    ),
    (
        "airflow/example_dags/example_branch_operator_decorator.py",
        "`if is_venv_installed():`",
    ),
    (
        "airflow/example_dags/example_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/example_local_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/tutorial_taskflow_api_virtualenv.py",
        "`if not is_venv_installed(): ... else:`",
    ),
    (
        "airflow/example_dags/tutorial_objectstorage.py",
        "needs an s3 filesystem (s3fs) at import",
    ),
];

#[tokio::test]
async fn apache_airflow_2_10_5_matches_dagbag() {
    check(
        "2.10.5",
        include_str!("../../../tests/data/dagbag/apache-airflow-2.10.5.json"),
        ENVIRONMENT_DEPENDENT_2_10_5,
    )
    .await;
}

#[tokio::test]
async fn apache_airflow_2_0_2_matches_dagbag() {
    check(
        "2.0.2",
        include_str!("../../../tests/data/dagbag/apache-airflow-2.0.2.json"),
        ENVIRONMENT_DEPENDENT_2_0_2,
    )
    .await;
}

#[tokio::test]
async fn apache_airflow_2_6_3_matches_dagbag() {
    check(
        "2.6.3",
        include_str!("../../../tests/data/dagbag/apache-airflow-2.6.3.json"),
        ENVIRONMENT_DEPENDENT_2_6_3,
    )
    .await;
}

/// The same for Airflow 3.0.6, whose example DAGs come from apache-airflow-core and the
/// providers installed with it.
const ENVIRONMENT_DEPENDENT_3_0_6: &[(&str, &str)] = &[
    (
        "airflow/example_dags/example_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/example_local_kubernetes_executor.py",
        "`if k8s:` (kubernetes importable)",
    ),
    (
        "airflow/example_dags/tutorial_objectstorage.py",
        "needs an s3 filesystem (s3fs) at import",
    ),
    (
        "airflow/example_dags/example_custom_weight.py",
        "needs its priority-weight plugin registered",
    ),
    (
        "airflow/providers/standard/example_dags/example_bash_decorator.py",
        "providers-standard 1.21.0 imports a name task-sdk 1.0.6 lacks",
    ),
    (
        "airflow/providers/standard/example_dags/example_hitl_operator.py",
        "needs Airflow 3.1+ (checked at import)",
    ),
];

#[tokio::test]
async fn apache_airflow_core_3_0_6_and_providers_match_dagbag() {
    check_packages(
        &[
            ("apache-airflow-core", "3.0.6"),
            ("apache-airflow-providers-standard", "1.21.0"),
            ("apache-airflow-providers-common-sql", "2.4.0"),
        ],
        "3.0.6",
        include_str!("../../../tests/data/dagbag/apache-airflow-3.0.6.json"),
        ENVIRONMENT_DEPENDENT_3_0_6,
    )
    .await;
}

async fn check(version: &str, labels: &str, environment_dependent: &[(&str, &str)]) {
    check_packages(
        &[("apache-airflow", version)],
        version,
        labels,
        environment_dependent,
    )
    .await;
}

/// Whether pypi.org answers on its HTTPS port within 10 s; `Err` says why not.
async fn pypi_reachable() -> Result<(), String> {
    let connect = tokio::net::TcpStream::connect("pypi.org:443");
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

async fn check_packages(
    packages: &[(&str, &str)],
    version: &str,
    labels: &str,
    environment_dependent: &[(&str, &str)],
) {
    if let Err(why) = pypi_reachable().await {
        let msg = format!(
            "SKIPPED: the package index (pypi.org) cannot be reached ({why}); this test mines real apache-airflow releases from it"
        );
        assert!(
            std::env::var("DAGFLEET_REQUIRE_NETWORK").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("{msg}");
        return;
    }
    let labels: serde_json::Value = serde_json::from_str(labels).unwrap();
    assert_eq!(labels["version"], version);
    let files = labels["files"].as_object().unwrap();
    let dagbag: BTreeSet<&str> = files
        .iter()
        .filter(|(_, v)| !v["dag_ids"].as_array().unwrap().is_empty())
        .map(|(k, _)| k.as_str())
        .collect();

    let globs =
        dagfleet_miner::globset(&["**/example_*.py".into(), "**/example_dags/**".into()]).unwrap();
    let mut mined = Vec::new();
    let mut summaries = Vec::new();
    for (package, v) in packages {
        let source = dagfleet_protocol::jobs::Source::Pypi {
            package: (*package).into(),
            versions: vec![(*v).into()],
            index_url: None,
        };
        let read = dagfleet_miner::sources::read(&source, v, &globs)
            .await
            .unwrap();
        let (m, summary) = dagfleet_miner::mine_files(package, v, read, &globs);
        mined.extend(m);
        summaries.push(summary);
    }
    let summary = summaries;
    let found: BTreeSet<&str> = mined.iter().map(|m| m.path.as_str()).collect();

    let env: BTreeSet<&str> = environment_dependent.iter().map(|(p, _)| *p).collect();
    let dropped: BTreeSet<&str> = DROPPED_ON_PURPOSE.iter().map(|(p, _)| *p).collect();
    let expected: BTreeSet<&str> = dagbag
        .union(&env)
        .copied()
        .filter(|p| !dropped.contains(p))
        .collect();
    assert_eq!(
        found.difference(&expected).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "mined, but DagBag loads no DAG from them"
    );
    assert_eq!(
        expected.difference(&found).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "DagBag loads DAGs from them, but the miner dropped them: {summary:?}"
    );
    // Where the miner can name a dag_id statically, DagBag loaded that dag_id.
    for m in &mined {
        if let Some(v) = files.get(&m.path) {
            let theirs: BTreeSet<&str> = v["dag_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            for id in m.dag_ids.iter().flatten() {
                assert!(
                    theirs.contains(id.as_str()) || env.contains(m.path.as_str()),
                    "{}: {id} not in {theirs:?}",
                    m.path
                );
            }
        }
    }
}
