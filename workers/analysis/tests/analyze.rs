//! The analysis on DAG files of every style and every failure category.

#![allow(clippy::unwrap_used)]

use dagfleet_analysis::{analyze, Category, DagStyle, Options, Report, Severity};

fn run(src: &str) -> Report {
    analyze(src, &Options::default())
}

fn cats(r: &Report) -> Vec<Category> {
    r.findings.iter().map(|f| f.category).collect()
}

fn ids(r: &Report) -> Vec<&str> {
    r.tasks.iter().map(|t| t.task_id.as_str()).collect()
}

fn has_edge(r: &Report, a: &str, b: &str) -> bool {
    r.edges.iter().any(|(u, d)| u == a && d == b)
}

const CLASSIC: &str = r#"
from datetime import datetime
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.empty import EmptyOperator

dag = DAG("classic", start_date=datetime(2024, 1, 1), schedule="@daily")
start = EmptyOperator(task_id="start", dag=dag)
a = BashOperator(task_id="a", bash_command="echo a", dag=dag)
b = BashOperator(task_id="b", bash_command="echo b", dag=dag)
end = EmptyOperator(task_id="end", dag=dag)
start >> [a, b] >> end
"#;

#[test]
fn classic_constructor_style() {
    let r = run(CLASSIC);
    assert!(r.is_valid(), "{:?}", r.findings);
    assert_eq!(r.dags.len(), 1);
    assert_eq!(r.dags[0].dag_id.as_deref(), Some("classic"));
    assert_eq!(r.dags[0].style, DagStyle::Constructor);
    assert_eq!(r.dags[0].schedule.as_deref(), Some("\"@daily\""));
    assert_eq!(ids(&r), ["start", "a", "b", "end"]);
    assert!(r.tasks.iter().all(|t| t.dag == Some(0)));
    for (u, d) in [("start", "a"), ("start", "b"), ("a", "end"), ("b", "end")] {
        assert!(has_edge(&r, u, d), "{u} >> {d}: {:?}", r.edges);
    }
    assert_eq!(r.metadata.depth, 3);
    assert_eq!(r.metadata.operators, ["BashOperator", "EmptyOperator"]);
    assert!(r.metadata.classic && !r.metadata.taskflow);
}

#[test]
fn dag_id_through_a_module_constant_is_found() {
    // The original validator's blind spot: it called this file "no DAG".
    let r = run(r#"
import pendulum
from airflow.models.dag import DAG
from airflow.operators.empty import EmptyOperator

DAG_ID = "example_constant_id"

with DAG(dag_id=DAG_ID, start_date=pendulum.datetime(2021, 1, 1, tz="UTC"), schedule=None) as dag:
    EmptyOperator(task_id="only")
"#);
    assert!(r.is_valid(), "{:?}", r.findings);
    assert_eq!(r.dags[0].dag_id.as_deref(), Some("example_constant_id"));
    assert_eq!(r.dags[0].style, DagStyle::Context);
    assert_eq!(r.tasks[0].dag, Some(0));
}

#[test]
fn taskflow_with_data_flow_repeats_override_and_mapping() {
    let r = run(r#"
import pendulum
from airflow.decorators import dag, task

@dag(schedule=None, start_date=pendulum.datetime(2021, 1, 1, tz="UTC"), catchup=False)
def etl():
    @task
    def extract():
        return [1, 2, 3]

    @task(task_id="shout")
    def transform(values):
        return [v * 2 for v in values]

    @task
    def load(x):
        print(undefined_at_run_time)

    data = extract()
    load(transform(data))
    load.override(task_id="load_again")(data)
    load(data)
    load.expand(x=extract())

etl()
"#);
    assert!(r.is_valid(), "{:?}", r.findings);
    assert_eq!(r.dags.len(), 1);
    assert_eq!(r.dags[0].dag_id.as_deref(), Some("etl"));
    assert_eq!(r.dags[0].style, DagStyle::Decorator);
    assert_eq!(
        ids(&r),
        [
            "extract",
            "shout",
            "load",
            "load_again",
            "load__1",
            "extract__1",
            "load__2"
        ]
    );
    assert!(has_edge(&r, "extract", "shout"));
    assert!(has_edge(&r, "shout", "load"));
    assert!(has_edge(&r, "extract", "load_again"));
    assert!(has_edge(&r, "extract__1", "load__2"));
    assert!(
        r.tasks
            .iter()
            .find(|t| t.task_id == "load__2")
            .unwrap()
            .mapped
    );
    assert!(r.metadata.taskflow && r.metadata.mapping);
}

#[test]
fn a_dag_function_that_is_never_called_defines_no_dag() {
    let r = run("from airflow.decorators import dag\n\n@dag()\ndef never():\n    pass\n");
    assert!(r.dags.is_empty());
    assert!(cats(&r).contains(&Category::NoDag));
}

#[test]
fn dag_in_strings_and_comments_is_not_a_dag() {
    let r = run("# with DAG('x') as dag:\ns = \"DAG('y')\"\n");
    assert!(r.dags.is_empty());
    assert_eq!(cats(&r), [Category::NoDag]);
}

#[test]
fn task_groups_prefix_task_ids_and_chain_links() {
    let r = run(r#"
from datetime import datetime
from airflow import DAG
from airflow.models.baseoperator import chain, cross_downstream
from airflow.operators.empty import EmptyOperator
from airflow.utils.task_group import TaskGroup

with DAG("groups", start_date=datetime(2024, 1, 1)) as dag:
    s = EmptyOperator(task_id="s")
    with TaskGroup("section") as tg:
        x = EmptyOperator(task_id="x")
        y = EmptyOperator(task_id="y")
    e1 = EmptyOperator(task_id="e1")
    e2 = EmptyOperator(task_id="e2")
    chain(s, [x, y], e1)
    cross_downstream([x, y], [e2])
    e2.set_upstream(s)
"#);
    assert!(r.is_valid(), "{:?}", r.findings);
    assert_eq!(ids(&r), ["s", "section.x", "section.y", "e1", "e2"]);
    assert!(has_edge(&r, "s", "section.x") && has_edge(&r, "section.y", "e1"));
    assert!(has_edge(&r, "section.x", "e2") && has_edge(&r, "section.y", "e2"));
    assert!(has_edge(&r, "s", "e2"));
    assert!(r.metadata.task_groups);
}

#[test]
fn what_cpython_rejects_is_a_syntax_error() {
    for (src, want) in [
        ("if x:\npass\n", "expected an indented block"),
        ("try:\n    x = 1\ny = 2\n", "expected `except` or `finally`"),
        (
            "f(a=1, 2)\n",
            "positional argument follows keyword argument",
        ),
        ("f(a=1, a=2)\n", "keyword argument repeated"),
        ("return 1\n", "'return' outside function"),
        ("break\n", "'break' outside loop"),
        (
            "def f(a=1, b):\n    pass\n",
            "non-default argument follows default argument",
        ),
        ("x = = 1\nprint(x)\n", "invalid syntax"),
    ] {
        let r = run(src);
        let f = r
            .findings
            .iter()
            .find(|f| f.category == Category::SyntaxError);
        assert!(
            f.is_some_and(|f| f.message.contains(want)),
            "{src:?}: {:?}",
            r.findings
        );
    }
}

#[test]
fn cut_off_output_is_truncated_not_a_syntax_error() {
    for src in [
        "from airflow import DAG\nwith DAG('x') as dag:\n    t = BashOperator(task_id='a',\n",
        "x = '''unterminated",
        "def f():\n",
    ] {
        let r = run(src);
        assert!(
            cats(&r).contains(&Category::Truncated),
            "{src:?}: {:?}",
            r.findings
        );
        assert!(
            !cats(&r).contains(&Category::SyntaxError),
            "{src:?}: {:?}",
            r.findings
        );
    }
}

#[test]
fn cycles_duplicates_and_invalid_ids() {
    let r = run(r#"
from airflow import DAG
from airflow.operators.empty import EmptyOperator
with DAG("bad") as dag:
    a = EmptyOperator(task_id="a")
    b = EmptyOperator(task_id="b")
    c = EmptyOperator(task_id="a")
    d = EmptyOperator(task_id="has space")
    a >> b >> a
"#);
    let c = cats(&r);
    assert!(
        c.contains(&Category::CircularDependency),
        "{:?}",
        r.findings
    );
    assert!(c.contains(&Category::DuplicateTaskId));
    assert!(c.contains(&Category::InvalidTaskId));
    assert!(!r.is_valid());
}

#[test]
fn missing_imports_and_undefined_names_at_import_time_only() {
    let r = run(r#"
from airflow import DAG
with DAG("names") as dag:
    t = BashOperator(task_id="t", bash_command=COMMAND)
    def later():
        return not_checked_here
"#);
    let c = cats(&r);
    assert!(c.contains(&Category::MissingImport), "{:?}", r.findings);
    assert!(c.contains(&Category::UndefinedName));
    assert!(!r
        .findings
        .iter()
        .any(|f| f.message.contains("not_checked_here")));
    // Names defined anywhere, including later or in a loop, are never reported.
    let ok = run("from airflow import DAG\nfor i in range(3):\n    pass\nwith DAG(f'd{i}') as dag:\n    pass\n");
    assert!(
        !cats(&ok).contains(&Category::UndefinedName),
        "{:?}",
        ok.findings
    );
}

#[test]
fn deprecated_imports_depend_on_the_target_version() {
    let src = "from airflow import DAG\nfrom airflow.operators.dummy import DummyOperator\nfrom airflow.utils.dates import days_ago\nwith DAG('d', start_date=days_ago(1)) as dag:\n    DummyOperator(task_id='x')\n";
    let old = analyze(
        src,
        &Options {
            airflow_version: (2, 2),
        },
    );
    assert!(
        !cats(&old).contains(&Category::DeprecatedImport),
        "{:?}",
        old.findings
    );
    let mid = analyze(
        src,
        &Options {
            airflow_version: (2, 10),
        },
    );
    assert_eq!(
        mid.findings
            .iter()
            .filter(|f| f.category == Category::DeprecatedImport)
            .count(),
        2
    );
    assert!(
        mid.is_valid(),
        "deprecated but still importable: {:?}",
        mid.findings
    );
    let new = analyze(
        src,
        &Options {
            airflow_version: (3, 0),
        },
    );
    assert!(!new.is_valid(), "removed in 3.0: {:?}", new.findings);
}

#[test]
fn internal_test_code_is_flagged() {
    let r = run("from airflow import DAG\nfrom tests.system.utils import get_test_run\nwith DAG('d') as dag:\n    pass\ntest_run = get_test_run(dag)\n");
    assert!(
        cats(&r).contains(&Category::InternalTestImport),
        "{:?}",
        r.findings
    );
}

#[test]
fn a_factory_counts_only_when_it_is_called() {
    let factory = "from airflow import DAG\nfrom airflow.operators.empty import EmptyOperator\ndef make(name):\n    with DAG(name) as dag:\n        EmptyOperator(task_id='t')\n    return dag\n";
    let r = run(factory);
    assert!(
        r.dags.is_empty(),
        "never called, never loaded: {:?}",
        r.dags
    );
    let r = run(&format!(
        "{factory}for n in ['a', 'b']:\n    globals()[n] = make(n)\n"
    ));
    assert_eq!(r.dags.len(), 1, "one DAG constructor, called");
    assert_eq!(r.tasks.len(), 1);
}

#[test]
fn hallucinated_modules_and_names_are_caught_real_ones_pass() {
    let r = run("from airflow import DAG\nfrom airflow.operators.snowflake_magic import SnowOperator\nfrom airflow.operators.bash import BashOperater\nfrom airflow.providers.amazon.aws.operators.s3 import S3CreateBucketOperator\nwith DAG('d') as dag:\n    S3CreateBucketOperator(task_id='b', bucket_name='x')\n");
    let c = cats(&r);
    assert!(
        c.contains(&Category::HallucinatedModule),
        "{:?}",
        r.findings
    );
    assert!(c.contains(&Category::HallucinatedName), "{:?}", r.findings);
    assert_eq!(r.metadata.providers, ["apache-airflow-providers-amazon"]);
    let ok = run(CLASSIC);
    assert!(
        !cats(&ok).contains(&Category::HallucinatedModule)
            && !cats(&ok).contains(&Category::HallucinatedName)
    );
}

#[test]
fn a_truncated_file_reports_truncation_only() {
    for src in [
        "x = (",
        "from airflow import DAG\nwith DAG(\"d\") as dag:\n    x = foo(\n",
    ] {
        let r = run(src);
        assert!(
            r.findings.iter().all(|f| f.category == Category::Truncated),
            "{src:?}: {:?}",
            r.findings
        );
        assert!(!r.findings.is_empty());
    }
}

#[test]
fn names_bound_by_splat_parameters_and_taskflow_bodies_are_not_import_time() {
    let r = run(r#"
import pendulum
from airflow import DAG
from airflow.decorators import task


def helper(*args, **kwargs):
    return kwargs.get("x"), args


helper(1, x=2)

with DAG("d", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:

    @task
    def get_names(**kwargs):
        return kwargs["ti"].xcom_pull(task_ids=LATER)

    get_names()
"#);
    assert!(
        !r.findings
            .iter()
            .any(|f| f.category == Category::UndefinedName),
        "{:?}",
        r.findings
    );
}

#[test]
fn a_timed_schedule_without_start_date_is_refused_on_airflow_2_only() {
    // What Airflow 2.10.5's DagBag does with each (measured): refuses the first three.
    let src = "from airflow import DAG\nfrom airflow.operators.bash import BashOperator\ndag = DAG('d', schedule='@daily')\nt = BashOperator(task_id='t', bash_command='echo', dag=dag)\n";
    for bad in [
        src.to_string(),
        src.replace("schedule='@daily'", "schedule_interval='0 0 * * *'"),
        src.replace("schedule='@daily'", "schedule=timedelta(days=1)"),
    ] {
        let r = run(&bad);
        let f: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.message.contains("no start_date"))
            .collect();
        assert_eq!(f.len(), 1, "{bad}: {:?}", r.findings);
        assert_eq!(
            (f[0].category, f[0].severity),
            (Category::WrongArgument, Severity::Error)
        );
    }
    let on3 = analyze(
        src,
        &Options {
            airflow_version: (3, 0),
        },
    );
    assert!(!on3
        .findings
        .iter()
        .any(|f| f.message.contains("no start_date")));
    // A start date anywhere (the DAG's, default_args, a task's own), ** splats, no schedule,
    // None, a dataset list or a schedule held in a variable: no finding.
    for ok in [
        src.replace(
            "schedule='@daily'",
            "schedule='@daily', start_date=datetime(2024, 1, 1)",
        ),
        src.replace("schedule='@daily'", "schedule='@daily', default_args=args"),
        src.replace("schedule='@daily'", "schedule='@daily', **common"),
        src.replace("bash_command='echo'", "bash_command='echo', start_date=x"),
        src.replace("schedule='@daily'", "schedule=None"),
        src.replace(", schedule='@daily'", ""),
        src.replace("schedule='@daily'", "schedule=[ds]"),
        src.replace("schedule='@daily'", "schedule=SCHEDULE"),
    ] {
        let r = run(&ok);
        assert!(
            !r.findings
                .iter()
                .any(|f| f.message.contains("no start_date")),
            "{ok}: {:?}",
            r.findings
        );
    }
}
