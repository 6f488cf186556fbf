//! What an analysis returns.

use serde::{Deserialize, Serialize};

/// Kinds of findings. The first six are those of the original research's validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Category {
    /// Python would not compile the file.
    SyntaxError,
    /// The tasks of a DAG depend on each other in a cycle.
    CircularDependency,
    /// Two tasks of one DAG share a task_id.
    DuplicateTaskId,
    /// A task_id Airflow rejects (characters or length).
    InvalidTaskId,
    /// More than one DAG in a file (allowed by Airflow; reported as a warning).
    MultipleDags,
    /// A DAG without tasks.
    EmptyDag,
    /// The text ends inside a construct: the generator hit its token limit.
    Truncated,
    /// No DAG is defined.
    NoDag,
    /// A name is used but never defined or imported.
    UndefinedName,
    /// An Airflow class is used but never imported.
    MissingImport,
    /// An import deprecated or removed in the target Airflow version.
    DeprecatedImport,
    /// An import of internal test code (`tests`, `tests_common`, `get_test_run`, ...).
    InternalTestImport,
    /// An import of an `airflow.` module that no Airflow or provider release ships.
    HallucinatedModule,
    /// An import of a name that the (real) module does not define.
    HallucinatedName,
    /// An import from a provider package the knowledge base does not cover: it loads only
    /// where that provider is installed, if the provider exists at all (environment-
    /// dependent, reported apart from hallucinated modules).
    MissingProvider,
    /// An operator or DAG constructed with an argument no class in its chain takes, or
    /// without one it requires.
    WrongArgument,
    /// An attribute that the Airflow class of an object does not have.
    UnknownAttribute,
}

/// How bad a finding is. Errors make a file invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; Airflow still loads the file.
    Warning,
    /// Airflow would fail to load the file or the DAG.
    Error,
}

/// One problem found in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Kind.
    pub category: Category,
    /// Severity.
    pub severity: Severity,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, for a person.
    pub message: String,
}

/// How a DAG is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DagStyle {
    /// `dag = DAG(...)`.
    Constructor,
    /// `with DAG(...) as dag:`.
    Context,
    /// A `@dag`-decorated function that is called.
    Decorator,
}

/// One DAG defined in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dag {
    /// Its dag_id, when it can be known statically.
    pub dag_id: Option<String>,
    /// How it is defined.
    pub style: DagStyle,
    /// 1-based line of the definition.
    pub line: usize,
    /// The `schedule` / `schedule_interval` argument as written.
    pub schedule: Option<String>,
    /// Its definition may give a start date: a `start_date=` or `default_args=` argument, or
    /// `**` keyword splats. Airflow 2 refuses a DAG with a time-based schedule without one.
    #[serde(default)]
    pub may_have_start_date: bool,
}

/// One task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Full task_id, with task-group prefixes.
    pub task_id: String,
    /// Operator or sensor class, or the TaskFlow function name.
    pub operator: String,
    /// Whether it is a TaskFlow (`@task`) task.
    pub taskflow: bool,
    /// Whether it is dynamically mapped (`.expand(...)`).
    pub mapped: bool,
    /// Index into [`Report::dags`] of its DAG, when known.
    pub dag: Option<usize>,
    /// 1-based line.
    pub line: usize,
}

/// One import binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// Module imported from (`airflow.operators.bash`), or the module itself.
    pub module: String,
    /// Imported name for `from m import name`.
    pub name: Option<String>,
    /// The local name it is bound to.
    pub bound: String,
    /// 1-based line.
    pub line: usize,
}

/// Numbers for analysing models by complexity and style.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Operator and sensor classes used, sorted, once each.
    pub operators: Vec<String>,
    /// Uses TaskFlow tasks.
    pub taskflow: bool,
    /// Uses classic operators.
    pub classic: bool,
    /// Number of tasks.
    pub tasks: usize,
    /// Number of dependency edges.
    pub edges: usize,
    /// Longest path, in tasks.
    pub depth: usize,
    /// Uses branching operators or `@task.branch`.
    pub branching: bool,
    /// Uses dynamic task mapping.
    pub mapping: bool,
    /// Uses task groups.
    pub task_groups: bool,
    /// Heuristic complexity score (see [`crate::complexity`]).
    pub complexity: f64,
    /// Provider distributions the imports need.
    pub providers: Vec<String>,
}

/// The analysis of one Python source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// DAGs defined.
    pub dags: Vec<Dag>,
    /// Tasks defined.
    pub tasks: Vec<Task>,
    /// Dependency edges, upstream task_id → downstream task_id.
    pub edges: Vec<(String, String)>,
    /// Imports.
    pub imports: Vec<Import>,
    /// Problems.
    pub findings: Vec<Finding>,
    /// Style and complexity numbers.
    pub metadata: Metadata,
}

impl Report {
    /// Whether Airflow would load the file: no error findings.
    pub fn is_valid(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// Whether a finding of `category` is present.
    pub fn has(&self, category: Category) -> bool {
        self.findings.iter().any(|f| f.category == category)
    }
}
