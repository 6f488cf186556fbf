//! DAGs, tasks, dependencies, imports and names.
//!
//! Two walks over one parse tree: [`Scan`] collects what the file defines (imports, string
//! constants, TaskFlow functions, `@dag` and `@task_group` functions, every bound name), then
//! [`Walker`] follows the code Airflow runs when it imports the file: module level, `with
//! DAG(...)` bodies, and the bodies of `@dag` / `@task_group` functions at their call sites.
//! `@task` function bodies run only when the task runs, so they are not followed.

use crate::tree::Node;
use std::collections::{HashMap, HashSet};

use crate::report::{Category, Dag, DagStyle, Finding, Import, Severity, Task};

pub(crate) fn text<'a>(n: Node<'_>, src: &'a str) -> &'a str {
    src.get(n.byte_range()).unwrap_or("")
}

fn line(n: Node<'_>) -> usize {
    n.start_position().row + 1
}

/// The value of a plain string literal (no f-string interpolation).
pub(crate) fn string_value(n: Node<'_>, src: &str) -> Option<String> {
    match n.kind() {
        "string" => {
            let mut c = n.walk();
            let mut out = String::new();
            for ch in n.named_children(&mut c) {
                match ch.kind() {
                    "string_start" | "string_end" => {}
                    "string_content" => out.push_str(text(ch, src)),
                    _ => return None,
                }
            }
            Some(out)
        }
        "concatenated_string" => {
            let mut c = n.walk();
            let parts: Option<Vec<String>> = n
                .named_children(&mut c)
                .map(|p| string_value(p, src))
                .collect();
            parts.map(|p| p.concat())
        }
        _ => None,
    }
}

/// The last segment of a called name: `BashOperator` for `airflow.operators.bash.BashOperator`.
fn last_segment(s: &str) -> &str {
    s.rsplit('.').next().unwrap_or(s)
}

/// Whether a class name reads as an Airflow operator or sensor.
pub(crate) fn is_operator_name(name: &str) -> bool {
    let n = last_segment(name);
    n.ends_with("Operator") || n.ends_with("Sensor")
}

/// What [`Scan`] collects before the walk.
#[derive(Default)]
pub(crate) struct Scan<'t> {
    pub imports: Vec<Import>,
    pub consts: HashMap<String, String>,
    /// TaskFlow function name → (task_id from the decorator, decorator text).
    pub taskflow: HashMap<String, (Option<String>, String)>,
    pub dag_fns: HashMap<String, Node<'t>>,
    pub group_fns: HashMap<String, Node<'t>>,
    pub bound: HashSet<String>,
    /// Names called as functions anywhere (`name(...)`).
    pub called: HashSet<String>,
    pub star_import: bool,
}

fn decorator_name(d: Node<'_>, src: &str) -> String {
    // `@task`, `@task.branch`, `@task(...)`, `@task.docker(...)`
    let expr = d.named_child(0);
    let Some(expr) = expr else {
        return String::new();
    };
    let f = if expr.kind() == "call" {
        expr.child_by_field_name("function").unwrap_or(expr)
    } else {
        expr
    };
    text(f, src).to_string()
}

fn kwarg<'t>(call: Node<'t>, name: &str, src: &str) -> Option<Node<'t>> {
    let args = call.child_by_field_name("arguments")?;
    let mut c = args.walk();
    let found = args.named_children(&mut c).find(|a| {
        a.kind() == "keyword_argument"
            && a.child_by_field_name("name")
                .is_some_and(|n| text(n, src) == name)
    });
    found.and_then(|a| a.child_by_field_name("value"))
}

fn positional<'t>(call: Node<'t>, i: usize) -> Option<Node<'t>> {
    let args = call.child_by_field_name("arguments")?;
    let mut c = args.walk();
    let found = args
        .named_children(&mut c)
        .filter(|a| {
            !matches!(
                a.kind(),
                "keyword_argument" | "comment" | "list_splat" | "dictionary_splat"
            )
        })
        .nth(i);
    found
}

impl<'t> Scan<'t> {
    pub(crate) fn run(root: Node<'t>, src: &str) -> Self {
        let mut s = Scan::default();
        let mut cursor = root.walk();
        let mut stack = vec![root];
        while let Some(n) = stack.pop() {
            s.visit(n, src);
            for ch in n.children(&mut cursor) {
                stack.push(ch);
            }
        }
        s
    }

    fn bind_target(&mut self, n: Node<'_>, src: &str) {
        // Every identifier in a binding position is defined (flow- and scope-insensitive, so
        // a name is never reported undefined when Python could find it).
        if n.kind() == "identifier" {
            self.bound.insert(text(n, src).to_string());
            return;
        }
        if matches!(n.kind(), "attribute" | "subscript") {
            return;
        }
        let mut c = n.walk();
        for ch in n.named_children(&mut c) {
            self.bind_target(ch, src);
        }
    }

    fn visit(&mut self, n: Node<'t>, src: &str) {
        match n.kind() {
            "call" => {
                if let Some(f) = n
                    .child_by_field_name("function")
                    .filter(|f| f.kind() == "identifier")
                {
                    self.called.insert(text(f, src).to_string());
                }
            }
            "import_statement" => {
                let mut c = n.walk();
                for name in n.named_children(&mut c) {
                    let (module, bound) = match name.kind() {
                        "aliased_import" => (
                            name.child_by_field_name("name")
                                .map(|x| text(x, src))
                                .unwrap_or(""),
                            name.child_by_field_name("alias")
                                .map(|x| text(x, src))
                                .unwrap_or(""),
                        ),
                        _ => {
                            let m = text(name, src);
                            (m, m.split('.').next().unwrap_or(m))
                        }
                    };
                    self.bound.insert(bound.to_string());
                    self.imports.push(Import {
                        module: module.to_string(),
                        name: None,
                        bound: bound.to_string(),
                        line: line(n),
                    });
                }
            }
            "import_from_statement" => {
                let module = n
                    .child_by_field_name("module_name")
                    .map(|m| text(m, src).to_string())
                    .unwrap_or_default();
                let mut c = n.walk();
                for ch in n.children_by_field_name("name", &mut c) {
                    let (name, bound) = match ch.kind() {
                        "aliased_import" => (
                            ch.child_by_field_name("name")
                                .map(|x| text(x, src))
                                .unwrap_or(""),
                            ch.child_by_field_name("alias")
                                .map(|x| text(x, src))
                                .unwrap_or(""),
                        ),
                        _ => (text(ch, src), text(ch, src)),
                    };
                    self.bound.insert(bound.to_string());
                    self.imports.push(Import {
                        module: module.clone(),
                        name: Some(name.to_string()),
                        bound: bound.to_string(),
                        line: line(n),
                    });
                }
                let mut c = n.walk();
                if n.children(&mut c).any(|ch| ch.kind() == "wildcard_import") {
                    self.star_import = true;
                }
            }
            "assignment" | "augmented_assignment" => {
                if let Some(left) = n.child_by_field_name("left") {
                    self.bind_target(left, src);
                    // Module-level string constants name dag_ids and task_ids.
                    let top = n
                        .parent()
                        .and_then(|p| p.parent())
                        .is_some_and(|g| g.kind() == "module");
                    if top && left.kind() == "identifier" {
                        if let Some(v) = n
                            .child_by_field_name("right")
                            .and_then(|r| string_value(r, src))
                        {
                            self.consts.insert(text(left, src).to_string(), v);
                        }
                    }
                }
            }
            "named_expression" => {
                if let Some(nm) = n.child_by_field_name("name") {
                    self.bind_target(nm, src);
                }
            }
            "for_statement" | "for_in_clause" => {
                if let Some(left) = n.child_by_field_name("left") {
                    self.bind_target(left, src);
                }
            }
            "as_pattern_target" | "pattern_list" => self.bind_target(n, src),
            "except_clause" => {
                let mut c = n.walk();
                let kids: Vec<Node<'_>> = n.named_children(&mut c).collect();
                // `except E as name:`
                for w in kids.windows(2) {
                    if w[1].kind() == "identifier" && text(n, src).contains(" as ") {
                        self.bound.insert(text(w[1], src).to_string());
                    }
                }
                for k in kids {
                    if k.kind() == "as_pattern" {
                        if let Some(a) = k.child_by_field_name("alias") {
                            self.bind_target(a, src);
                        }
                    }
                }
            }
            "global_statement" | "nonlocal_statement" => self.bind_target(n, src),
            "parameters" | "lambda_parameters" => {
                let mut c = n.walk();
                for p in n.named_children(&mut c) {
                    let name = match p.kind() {
                        "identifier" => Some(p),
                        "default_parameter" | "typed_default_parameter" => {
                            p.child_by_field_name("name")
                        }
                        "typed_parameter" | "list_splat_pattern" | "dictionary_splat_pattern" => {
                            p.named_child(0)
                        }
                        _ => None,
                    };
                    if let Some(nm) = name {
                        self.bind_target(nm, src);
                    }
                }
            }
            "class_definition" => {
                if let Some(nm) = n.child_by_field_name("name") {
                    self.bound.insert(text(nm, src).to_string());
                }
            }
            "function_definition" => {
                let Some(nm) = n.child_by_field_name("name") else {
                    return;
                };
                let name = text(nm, src).to_string();
                self.bound.insert(name.clone());
                let Some(dd) = n.parent().filter(|p| p.kind() == "decorated_definition") else {
                    return;
                };
                let mut c = dd.walk();
                for d in dd.children(&mut c).filter(|d| d.kind() == "decorator") {
                    let dn = decorator_name(d, src);
                    let dn_last = dn.split('.').next().unwrap_or("");
                    let call = d.named_child(0).filter(|e| e.kind() == "call");
                    match dn_last {
                        "task" => {
                            let tid = call
                                .and_then(|c| kwarg(c, "task_id", src))
                                .and_then(|v| string_value(v, src));
                            self.taskflow.insert(name.clone(), (tid, dn.clone()));
                        }
                        "dag" => {
                            self.dag_fns.insert(name.clone(), dd);
                        }
                        "task_group" => {
                            self.group_fns.insert(name.clone(), dd);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// What a name is bound to during the walk.
#[derive(Clone, Debug)]
enum Binding {
    Dag(usize),
    Tasks(Vec<usize>),
}

/// Where the walk is.
#[derive(Clone, Default)]
struct Ctx {
    dag: Option<usize>,
    prefix: Vec<String>,
    /// The code runs more than once (a loop or comprehension over two or more items), so a
    /// constant task_id in it repeats.
    repeats: bool,
}

/// How many times a `for` over `iter` runs, when the source says: `range(n)`, `range(a, b)`,
/// a list, tuple or set literal, `enumerate`/`zip` of one.
fn iterations(iter: Node<'_>, src: &str) -> Option<i64> {
    match iter.kind() {
        "list" | "tuple" | "set" => {
            let mut c = iter.walk();
            let n = iter
                .named_children(&mut c)
                .filter(|k| k.kind() != "comment")
                .count();
            Some(n as i64)
        }
        "parenthesized_expression" => iterations(iter.named_child(0)?, src),
        "call" => {
            let f = text(iter.child_by_field_name("function")?, src);
            let args = iter.child_by_field_name("arguments")?;
            let mut c = args.walk();
            let a: Vec<Node<'_>> = args.named_children(&mut c).collect();
            let int = |n: &Node<'_>| text(*n, src).replace('_', "").parse::<i64>().ok();
            match (f, a.as_slice()) {
                ("range", [n]) => int(n),
                ("range", [lo, hi]) => Some(int(hi)? - int(lo)?),
                ("enumerate" | "reversed" | "sorted" | "list" | "tuple", [x, ..]) => {
                    iterations(*x, src)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

pub(crate) struct Walker<'s, 't> {
    src: &'s str,
    scan: &'s Scan<'t>,
    pub dags: Vec<Dag>,
    pub tasks: Vec<Task>,
    pub edges: Vec<(usize, usize)>,
    pub findings: Vec<Finding>,
    pub task_groups: bool,
    vars: HashMap<String, Binding>,
    /// Calls per (dag, TaskFlow task_id), for Airflow's `x`, `x__1`, ... naming.
    taskflow_calls: HashMap<(Option<usize>, String), usize>,
    active: HashSet<usize>,
    /// Nodes that run at import time, for the undefined-name check.
    pub import_time: Vec<Node<'t>>,
}

impl<'s, 't> Walker<'s, 't> {
    pub(crate) fn new(src: &'s str, scan: &'s Scan<'t>) -> Self {
        Self {
            src,
            scan,
            dags: Vec::new(),
            tasks: Vec::new(),
            edges: Vec::new(),
            findings: Vec::new(),
            task_groups: false,
            vars: HashMap::new(),
            taskflow_calls: HashMap::new(),
            active: HashSet::new(),
            import_time: Vec::new(),
        }
    }

    fn t(&self, n: Node<'_>) -> &'s str {
        text(n, self.src)
    }

    fn resolve_str(&self, n: Node<'_>) -> Option<String> {
        string_value(n, self.src).or_else(|| match n.kind() {
            "identifier" => self.scan.consts.get(self.t(n)).cloned(),
            _ => None,
        })
    }

    fn walk_block(&mut self, block: Node<'t>, ctx: &Ctx) {
        let mut c = block.walk();
        let stmts: Vec<Node<'t>> = block.named_children(&mut c).collect();
        for s in stmts {
            self.stmt(s, ctx);
        }
    }

    pub(crate) fn walk_module(&mut self, root: Node<'t>) {
        self.walk_block(root, &Ctx::default());
    }

    fn stmt(&mut self, n: Node<'t>, ctx: &Ctx) {
        match n.kind() {
            "expression_statement" => {
                self.import_time.push(n);
                let mut c = n.walk();
                let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
                for e in kids {
                    if matches!(e.kind(), "assignment" | "augmented_assignment") {
                        self.assignment(e, ctx);
                    } else {
                        self.expr(e, ctx);
                    }
                }
            }
            "with_statement" => self.with(n, ctx),
            "decorated_definition" => {
                self.import_time.push(n);
                // Decorator expressions run at import; bodies of @task functions do not, and
                // @dag/@task_group bodies run where they are called.
            }
            "function_definition" | "class_definition" => {
                // Factories and helpers: follow the bodies of functions the file calls (a DAG
                // built in a function nobody calls is never loaded); names inside are not
                // checked, as they may never run.
                let name = n
                    .child_by_field_name("name")
                    .map(|x| self.t(x))
                    .unwrap_or("");
                if n.kind() == "function_definition" && !self.scan.called.contains(name) {
                    return;
                }
                if let Some(body) = n.child_by_field_name("body") {
                    let mut saved = std::mem::take(&mut self.import_time);
                    self.walk_block(body, ctx);
                    std::mem::swap(&mut self.import_time, &mut saved);
                }
            }
            "if_statement" | "for_statement" | "while_statement" | "try_statement" => {
                // Headers run at import; walk every branch.
                let mut c = n.walk();
                let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
                let body = n.child_by_field_name("body").map(|b| b.id());
                let repeats = n.kind() == "for_statement"
                    && n.child_by_field_name("right")
                        .and_then(|r| iterations(r, self.src))
                        .is_some_and(|k| k >= 2);
                for k in kids {
                    match k.kind() {
                        "block" if repeats && Some(k.id()) == body => {
                            let mut inner = ctx.clone();
                            inner.repeats = true;
                            self.walk_block(k, &inner)
                        }
                        "block" => self.walk_block(k, ctx),
                        "elif_clause" | "else_clause" | "except_clause" | "finally_clause" => {
                            let mut c2 = k.walk();
                            let blocks: Vec<Node<'t>> = k
                                .named_children(&mut c2)
                                .filter(|b| b.kind() == "block")
                                .collect();
                            for b in blocks {
                                self.walk_block(b, ctx);
                            }
                        }
                        _ => self.import_time.push(k),
                    }
                }
            }
            "import_statement" | "import_from_statement" | "pass_statement" | "comment" => {}
            _ => self.import_time.push(n),
        }
    }

    fn with(&mut self, n: Node<'t>, ctx: &Ctx) {
        let mut inner = ctx.clone();
        let mut c = n.walk();
        let clause = n.named_children(&mut c).find(|k| k.kind() == "with_clause");
        if let Some(clause) = clause {
            let mut c2 = clause.walk();
            let items: Vec<Node<'t>> = clause.named_children(&mut c2).collect();
            for item in items {
                self.import_time.push(item);
                let Some(v) = item.child_by_field_name("value") else {
                    continue;
                };
                let (call, alias) = if v.kind() == "as_pattern" {
                    (
                        v.named_child(0),
                        v.child_by_field_name("alias")
                            .and_then(|a| a.named_child(0)),
                    )
                } else {
                    (Some(v), None)
                };
                let Some(call) = call.filter(|c| c.kind() == "call") else {
                    continue;
                };
                let fname = call
                    .child_by_field_name("function")
                    .map(|f| self.t(f))
                    .unwrap_or("");
                match last_segment(fname) {
                    "DAG" => {
                        let d = self.new_dag(call, DagStyle::Context, None);
                        inner.dag = Some(d);
                        inner.prefix.clear();
                        if let Some(a) = alias {
                            self.vars.insert(self.t(a).to_string(), Binding::Dag(d));
                        }
                    }
                    "TaskGroup" => {
                        self.task_groups = true;
                        let gid = kwarg(call, "group_id", self.src)
                            .or_else(|| positional(call, 0))
                            .and_then(|g| self.resolve_str(g))
                            .unwrap_or_else(|| "group".into());
                        inner.prefix.push(gid);
                    }
                    _ => {
                        self.expr(call, ctx);
                    }
                }
            }
        }
        if let Some(body) = n.child_by_field_name("body") {
            self.walk_block(body, &inner);
        }
    }

    fn new_dag(&mut self, call: Node<'_>, style: DagStyle, fallback_id: Option<String>) -> usize {
        let id = kwarg(call, "dag_id", self.src)
            .or_else(|| positional(call, 0))
            .and_then(|v| self.resolve_str(v))
            .or(fallback_id);
        let schedule = kwarg(call, "schedule", self.src)
            .or_else(|| kwarg(call, "schedule_interval", self.src))
            .map(|s| self.t(s).to_string());
        let splat = call.child_by_field_name("arguments").is_some_and(|a| {
            let mut c = a.walk();
            let found = a
                .named_children(&mut c)
                .any(|x| x.kind() == "dictionary_splat");
            found
        });
        let may_have_start_date = splat
            || kwarg(call, "start_date", self.src).is_some()
            || kwarg(call, "default_args", self.src).is_some();
        self.dags.push(Dag {
            dag_id: id,
            style,
            line: line(call),
            schedule,
            may_have_start_date,
        });
        self.dags.len() - 1
    }

    fn assignment(&mut self, n: Node<'t>, ctx: &Ctx) {
        let Some(right) = n.child_by_field_name("right") else {
            return;
        };
        let value = self.expr_value(right, ctx);
        if let Some(left) = n.child_by_field_name("left") {
            if left.kind() == "identifier" {
                if let Some(b) = value {
                    self.vars.insert(self.t(left).to_string(), b);
                }
            }
        }
    }

    fn expr(&mut self, n: Node<'t>, ctx: &Ctx) -> Vec<usize> {
        match self.expr_value(n, ctx) {
            Some(Binding::Tasks(t)) => t,
            _ => Vec::new(),
        }
    }

    fn add_edges(&mut self, up: &[usize], down: &[usize]) {
        for &u in up {
            for &d in down {
                self.edges.push((u, d));
            }
        }
    }

    /// Follows an expression; returns what its value is, as far as DAGs and tasks go.
    fn expr_value(&mut self, n: Node<'t>, ctx: &Ctx) -> Option<Binding> {
        match n.kind() {
            "identifier" => self.vars.get(self.t(n)).cloned(),
            "parenthesized_expression" => n.named_child(0).and_then(|e| self.expr_value(e, ctx)),
            "list" | "tuple" | "expression_list" => {
                let mut c = n.walk();
                let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
                let mut all = Vec::new();
                for k in kids {
                    all.extend(self.expr(k, ctx));
                }
                Some(Binding::Tasks(all))
            }
            "binary_operator" => {
                let op = n
                    .child_by_field_name("operator")
                    .map(|o| self.t(o))
                    .unwrap_or("");
                let left = n
                    .child_by_field_name("left")
                    .map(|l| self.expr(l, ctx))
                    .unwrap_or_default();
                let right = n
                    .child_by_field_name("right")
                    .map(|r| self.expr(r, ctx))
                    .unwrap_or_default();
                match op {
                    ">>" => self.add_edges(&left, &right),
                    "<<" => self.add_edges(&right, &left),
                    _ => {}
                }
                Some(Binding::Tasks(right))
            }
            "call" => self.call(n, ctx),
            "list_comprehension"
            | "generator_expression"
            | "set_comprehension"
            | "dictionary_comprehension" => {
                let mut c = n.walk();
                let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
                let repeats = kids.iter().any(|k| {
                    k.kind() == "for_in_clause"
                        && k.child_by_field_name("right")
                            .and_then(|r| iterations(r, self.src))
                            .is_some_and(|i| i >= 2)
                });
                let mut inner = ctx.clone();
                inner.repeats |= repeats;
                let mut all = Vec::new();
                for k in kids {
                    all.extend(self.expr(k, &inner));
                }
                Some(Binding::Tasks(all))
            }
            _ => {
                // Look inside for calls (e.g. a task built inside a dict or a lambda-free expr).
                let mut c = n.walk();
                let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
                for k in kids {
                    self.expr_value(k, ctx);
                }
                None
            }
        }
    }

    fn args(&mut self, call: Node<'t>, ctx: &Ctx) -> Vec<usize> {
        let mut out = Vec::new();
        if let Some(args) = call.child_by_field_name("arguments") {
            let mut c = args.walk();
            let kids: Vec<Node<'t>> = args.named_children(&mut c).collect();
            for a in kids {
                let v = if a.kind() == "keyword_argument" {
                    a.child_by_field_name("value")
                } else {
                    Some(a)
                };
                if let Some(v) = v {
                    out.extend(self.expr(v, ctx));
                }
            }
        }
        out
    }

    fn call(&mut self, n: Node<'t>, ctx: &Ctx) -> Option<Binding> {
        let f = n.child_by_field_name("function")?;
        let fname = self.t(f);
        let last = last_segment(fname);

        // `x.expand(...)`, `x.partial(...).expand(...)`, `x.override(...)(...)`
        if f.kind() == "attribute" {
            let obj = f.child_by_field_name("object")?;
            let attr = f
                .child_by_field_name("attribute")
                .map(|a| self.t(a))
                .unwrap_or("");
            match attr {
                "expand" | "expand_kwargs" => {
                    let base = self.t(obj);
                    if obj.kind() == "identifier" && self.scan.taskflow.contains_key(base) {
                        // `fn.expand(x=...)`: the expand arguments feed the mapped task.
                        let t = self.taskflow_task(n, base, None, ctx);
                        self.tasks[t].mapped = true;
                        return Some(Binding::Tasks(vec![t]));
                    }
                    let tasks = self.expr(obj, ctx);
                    for &t in &tasks {
                        self.tasks[t].mapped = true;
                    }
                    self.args(n, ctx);
                    return Some(Binding::Tasks(tasks));
                }
                "partial" => {
                    let base = self.t(obj);
                    if is_operator_name(base) {
                        return Some(Binding::Tasks(vec![self.operator_task(n, base, ctx)]));
                    }
                    if self.scan.taskflow.contains_key(base) {
                        return Some(Binding::Tasks(vec![self.taskflow_task(n, base, None, ctx)]));
                    }
                }
                "set_downstream" | "set_upstream" => {
                    let me = self.expr(obj, ctx);
                    let other = self.args(n, ctx);
                    if attr == "set_downstream" {
                        self.add_edges(&me, &other);
                    } else {
                        self.add_edges(&other, &me);
                    }
                    return None;
                }
                _ => {}
            }
        }
        // `fn.override(task_id=...)(args)`
        if f.kind() == "call" {
            let inner_f = f.child_by_field_name("function");
            if let Some(inner_f) = inner_f.filter(|x| x.kind() == "attribute") {
                let obj = inner_f
                    .child_by_field_name("object")
                    .map(|o| self.t(o))
                    .unwrap_or("");
                let attr = inner_f
                    .child_by_field_name("attribute")
                    .map(|a| self.t(a))
                    .unwrap_or("");
                if attr == "override" && self.scan.taskflow.contains_key(obj) {
                    let tid = kwarg(f, "task_id", self.src).and_then(|v| self.resolve_str(v));
                    return Some(Binding::Tasks(vec![self.taskflow_task(n, obj, tid, ctx)]));
                }
            }
        }
        match last {
            "DAG" if f.kind() == "identifier" || fname.ends_with(".DAG") => {
                let d = self.new_dag(n, DagStyle::Constructor, None);
                return Some(Binding::Dag(d));
            }
            "chain" => {
                let mut prev: Vec<usize> = Vec::new();
                if let Some(args) = n.child_by_field_name("arguments") {
                    let mut c = args.walk();
                    let kids: Vec<Node<'t>> = args.named_children(&mut c).collect();
                    for a in kids {
                        let cur = self.expr(a, ctx);
                        // chain([a, b], [c, d]) pairs lists element-wise; otherwise fan out.
                        if prev.len() == cur.len() && prev.len() > 1 {
                            for (u, d) in prev.clone().into_iter().zip(cur.clone()) {
                                self.edges.push((u, d));
                            }
                        } else {
                            self.add_edges(&prev, &cur);
                        }
                        prev = cur;
                    }
                }
                return None;
            }
            "cross_downstream" => {
                let up = positional(n, 0)
                    .map(|a| self.expr(a, ctx))
                    .unwrap_or_default();
                let down = positional(n, 1)
                    .map(|a| self.expr(a, ctx))
                    .unwrap_or_default();
                self.add_edges(&up, &down);
                return None;
            }
            _ => {}
        }
        if f.kind() == "identifier" {
            if let Some(&dd) = self.scan.dag_fns.get(fname) {
                return self.call_dag_fn(n, dd, fname);
            }
            if let Some(&gd) = self.scan.group_fns.get(fname) {
                return self.call_group_fn(n, gd, fname, ctx);
            }
            if self.scan.taskflow.contains_key(fname) {
                return Some(Binding::Tasks(
                    vec![self.taskflow_task(n, fname, None, ctx)],
                ));
            }
        }
        if is_operator_name(fname) {
            return Some(Binding::Tasks(vec![self.operator_task(n, fname, ctx)]));
        }
        self.args(n, ctx);
        None
    }

    fn full_id(&self, ctx: &Ctx, id: &str) -> String {
        if ctx.prefix.is_empty() {
            id.to_string()
        } else {
            format!("{}.{id}", ctx.prefix.join("."))
        }
    }

    fn operator_task(&mut self, call: Node<'t>, class: &str, ctx: &Ctx) -> usize {
        let tid = kwarg(call, "task_id", self.src)
            .map(|v| {
                self.resolve_str(v)
                    .unwrap_or_else(|| format!("<{}>", self.t(v)))
            })
            .unwrap_or_else(|| "<missing task_id>".into());
        let dag = kwarg(call, "dag", self.src)
            .and_then(|d| match self.vars.get(self.t(d)) {
                Some(Binding::Dag(i)) => Some(*i),
                _ => None,
            })
            .or(ctx.dag);
        // Arguments may hold other tasks (rare) or task-building calls.
        self.args(call, ctx);
        if ctx.repeats && !tid.contains('<') {
            self.findings.push(Finding {
                category: Category::DuplicateTaskId,
                severity: Severity::Error,
                line: line(call),
                column: 1,
                message: format!(
                    "task_id `{tid}` is a constant inside a loop that runs more than once: every iteration after the first adds a task with the same id"
                ),
            });
        }
        self.tasks.push(Task {
            task_id: self.full_id(ctx, &tid),
            operator: last_segment(class).to_string(),
            taskflow: false,
            mapped: false,
            dag,
            line: line(call),
        });
        self.tasks.len() - 1
    }

    fn taskflow_task(
        &mut self,
        call: Node<'t>,
        fname: &str,
        override_id: Option<String>,
        ctx: &Ctx,
    ) -> usize {
        let (deco_id, _) = self
            .scan
            .taskflow
            .get(fname)
            .cloned()
            .unwrap_or((None, String::new()));
        let base = override_id.or(deco_id).unwrap_or_else(|| fname.to_string());
        let full = self.full_id(ctx, &base);
        let n = self
            .taskflow_calls
            .entry((ctx.dag, full.clone()))
            .or_insert(0);
        let id = if *n == 0 {
            full
        } else {
            format!("{full}__{n}")
        };
        *n += 1;
        // Data flow: tasks passed in as arguments run upstream.
        let upstream = self.args(call, ctx);
        self.tasks.push(Task {
            task_id: id,
            operator: fname.to_string(),
            taskflow: true,
            mapped: false,
            dag: ctx.dag,
            line: line(call),
        });
        let me = self.tasks.len() - 1;
        self.add_edges(&upstream, &[me]);
        me
    }

    fn call_dag_fn(&mut self, call: Node<'t>, dd: Node<'t>, fname: &str) -> Option<Binding> {
        if !self.active.insert(dd.id()) {
            return None;
        }
        let mut c = dd.walk();
        let deco = dd
            .children(&mut c)
            .find(|d| d.kind() == "decorator" && decorator_name(*d, self.src) == "dag")
            .and_then(|d| d.named_child(0));
        let d = match deco.filter(|e| e.kind() == "call") {
            Some(dc) => self.new_dag(dc, DagStyle::Decorator, Some(fname.to_string())),
            None => {
                self.dags.push(Dag {
                    dag_id: Some(fname.to_string()),
                    style: DagStyle::Decorator,
                    line: line(call),
                    schedule: None,
                    may_have_start_date: false,
                });
                self.dags.len() - 1
            }
        };
        self.dags[d].line = line(dd);
        let ctx = Ctx {
            dag: Some(d),
            prefix: Vec::new(),
            repeats: false,
        };
        let body = dd
            .child_by_field_name("definition")
            .and_then(|f| f.child_by_field_name("body"));
        if let Some(body) = body {
            self.walk_block(body, &ctx);
        }
        self.active.remove(&dd.id());
        Some(Binding::Dag(d))
    }

    fn call_group_fn(
        &mut self,
        call: Node<'t>,
        gd: Node<'t>,
        fname: &str,
        ctx: &Ctx,
    ) -> Option<Binding> {
        if !self.active.insert(gd.id()) {
            return None;
        }
        self.task_groups = true;
        let mut c = gd.walk();
        let gid = gd
            .children(&mut c)
            .find(|d| d.kind() == "decorator")
            .and_then(|d| d.named_child(0))
            .filter(|e| e.kind() == "call")
            .and_then(|dc| kwarg(dc, "group_id", self.src).or_else(|| positional(dc, 0)))
            .and_then(|g| self.resolve_str(g))
            .unwrap_or_else(|| fname.to_string());
        let upstream = self.args(call, ctx);
        let mut inner = ctx.clone();
        inner.prefix.push(gid);
        let before = self.tasks.len();
        let body = gd
            .child_by_field_name("definition")
            .and_then(|f| f.child_by_field_name("body"));
        if let Some(body) = body {
            self.walk_block(body, &inner);
        }
        self.active.remove(&gd.id());
        let members: Vec<usize> = (before..self.tasks.len()).collect();
        self.add_edges(&upstream, &members);
        Some(Binding::Tasks(members))
    }
}

/// Python's builtins, which need no import.
pub(crate) const BUILTINS: &[&str] = &[
    "abs",
    "aiter",
    "all",
    "anext",
    "any",
    "ascii",
    "bin",
    "bool",
    "breakpoint",
    "bytearray",
    "bytes",
    "callable",
    "chr",
    "classmethod",
    "compile",
    "complex",
    "copyright",
    "credits",
    "delattr",
    "dict",
    "dir",
    "divmod",
    "enumerate",
    "eval",
    "exec",
    "exit",
    "filter",
    "float",
    "format",
    "frozenset",
    "getattr",
    "globals",
    "hasattr",
    "hash",
    "help",
    "hex",
    "id",
    "input",
    "int",
    "isinstance",
    "issubclass",
    "iter",
    "len",
    "license",
    "list",
    "locals",
    "map",
    "max",
    "memoryview",
    "min",
    "next",
    "object",
    "oct",
    "open",
    "ord",
    "pow",
    "print",
    "property",
    "quit",
    "range",
    "repr",
    "reversed",
    "round",
    "set",
    "setattr",
    "slice",
    "sorted",
    "staticmethod",
    "str",
    "sum",
    "super",
    "tuple",
    "type",
    "vars",
    "zip",
    "__import__",
    "__name__",
    "__file__",
    "__doc__",
    "__spec__",
    "__loader__",
    "__package__",
    "__builtins__",
    "__debug__",
    "__annotations__",
    "__dict__",
    "NotImplemented",
    "Ellipsis",
    "True",
    "False",
    "None",
    "BaseException",
    "BaseExceptionGroup",
    "Exception",
    "ExceptionGroup",
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BlockingIOError",
    "BrokenPipeError",
    "BufferError",
    "ChildProcessError",
    "ConnectionAbortedError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "EOFError",
    "EnvironmentError",
    "FileExistsError",
    "FileNotFoundError",
    "FloatingPointError",
    "GeneratorExit",
    "IOError",
    "ImportError",
    "IndentationError",
    "IndexError",
    "InterruptedError",
    "IsADirectoryError",
    "KeyError",
    "KeyboardInterrupt",
    "LookupError",
    "MemoryError",
    "ModuleNotFoundError",
    "NameError",
    "NotADirectoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "ProcessLookupError",
    "RecursionError",
    "ReferenceError",
    "RuntimeError",
    "StopAsyncIteration",
    "StopIteration",
    "SyntaxError",
    "SystemError",
    "SystemExit",
    "TabError",
    "TimeoutError",
    "TypeError",
    "UnboundLocalError",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "UnicodeError",
    "UnicodeTranslateError",
    "ValueError",
    "ZeroDivisionError",
    "Warning",
    "UserWarning",
    "DeprecationWarning",
    "PendingDeprecationWarning",
    "SyntaxWarning",
    "RuntimeWarning",
    "FutureWarning",
    "ImportWarning",
    "UnicodeWarning",
    "BytesWarning",
    "ResourceWarning",
    "EncodingWarning",
];

/// Whether an identifier is read (not bound, not an attribute or keyword name).
pub(crate) fn is_load(n: Node<'_>, p: Node<'_>) -> bool {
    let field_is = |name: &str| {
        p.child_by_field_name(name)
            .is_some_and(|c| c.id() == n.id())
    };
    match p.kind() {
        "attribute" => !field_is("attribute"),
        "keyword_argument" => !field_is("name"),
        "assignment" | "augmented_assignment" => !field_is("left"),
        "for_statement" | "for_in_clause" => !field_is("left"),
        "named_expression" => !field_is("name"),
        "as_pattern_target" | "pattern_list" | "tuple_pattern" | "list_pattern" => false,
        "function_definition" | "class_definition" => !field_is("name"),
        "parameters"
        | "lambda_parameters"
        | "default_parameter"
        | "typed_parameter"
        | "typed_default_parameter" => field_is("value"),
        "global_statement" | "nonlocal_statement" | "dotted_name" | "aliased_import" => false,
        "keyword_pattern" | "import_prefix" => false,
        _ => true,
    }
}
