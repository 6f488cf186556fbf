//! Names at import time, in Python's execution order.
//!
//! Airflow imports a DAG file, so what runs is the module's top level, top to bottom, and
//! the bodies of the functions it calls while doing so (a `@dag` function called at the end,
//! a helper that builds tasks). A name read there must be bound by then:
//!
//! - at module level, before the read (a function called above its `def` is a NameError);
//! - not only as a parameter or local of some other function (module code cannot see it);
//! - inside a function the top level calls: bound in that function, or at module level.
//!
//! Bodies that do not run at import (functions nobody calls there, `@task` bodies, lambdas)
//! are not checked. A `*` import turns the check off.

use crate::tree::Node;
use std::collections::{HashMap, HashSet};

use crate::analyze::{is_load, is_operator_name, text, Scan, BUILTINS};
use crate::report::{Category, Finding, Severity};

/// Where module-level names are bound: name → the earliest byte after which it is bound.
struct Module<'t> {
    bound_at: HashMap<String, usize>,
    /// Module-level functions by name.
    functions: HashMap<String, Node<'t>>,
}

fn collect_targets(n: Node<'_>, src: &str, at: usize, out: &mut Vec<(String, usize)>) {
    match n.kind() {
        "identifier" => out.push((text(n, src).to_string(), at)),
        "attribute" | "subscript" => {}
        _ => {
            let mut c = n.walk();
            for ch in n.named_children(&mut c) {
                collect_targets(ch, src, at, out);
            }
        }
    }
}

impl<'t> Module<'t> {
    fn new(root: Node<'t>, src: &str) -> Self {
        let mut m = Module {
            bound_at: HashMap::new(),
            functions: HashMap::new(),
        };
        let mut binds = Vec::new();
        m.block(root, src, &mut binds);
        for (name, at) in binds {
            let e = m.bound_at.entry(name).or_insert(at);
            *e = (*e).min(at);
        }
        m
    }

    /// Bindings made by the statements of a module-level block (and the blocks of its
    /// compound statements, which run at import too).
    fn block(&mut self, block: Node<'t>, src: &str, out: &mut Vec<(String, usize)>) {
        let mut c = block.walk();
        let stmts: Vec<Node<'t>> = block.named_children(&mut c).collect();
        for s in stmts {
            self.stmt(s, src, out);
        }
    }

    fn stmt(&mut self, n: Node<'t>, src: &str, out: &mut Vec<(String, usize)>) {
        let end = n.end_byte();
        match n.kind() {
            "function_definition" | "class_definition" => {
                if let Some(name) = n.child_by_field_name("name") {
                    let name = text(name, src).to_string();
                    if n.kind() == "function_definition" {
                        self.functions.insert(name.clone(), n);
                    }
                    out.push((name, end));
                }
                // `global x` in a function binds x at module level when it runs: treat it
                // as bound from the start, as the call may come anywhere.
                globals(n, src, out);
            }
            "decorated_definition" => {
                if let Some(def) = n.child_by_field_name("definition") {
                    if let Some(name) = def.child_by_field_name("name") {
                        let name = text(name, src).to_string();
                        if def.kind() == "function_definition" {
                            self.functions.insert(name.clone(), def);
                        }
                        out.push((name, end));
                    }
                    globals(def, src, out);
                }
            }
            "import_statement" | "import_from_statement" | "future_import_statement" => {
                let mut c = n.walk();
                for name in n.named_children(&mut c) {
                    let bound = match name.kind() {
                        "aliased_import" => name.child_by_field_name("alias"),
                        "dotted_name" if n.kind() == "import_statement" => name.named_child(0),
                        "dotted_name" => {
                            // `from m import a`: the module is the first dotted name.
                            if n.child_by_field_name("module_name").map(|m| m.id())
                                == Some(name.id())
                            {
                                None
                            } else {
                                name.named_child(name.named_child_count().saturating_sub(1))
                            }
                        }
                        _ => None,
                    };
                    if let Some(b) = bound {
                        out.push((text(b, src).to_string(), end));
                    }
                }
            }
            "expression_statement" => {
                let mut stack = vec![n];
                let mut c = n.walk();
                while let Some(e) = stack.pop() {
                    match e.kind() {
                        "assignment" | "augmented_assignment" => {
                            if let Some(l) = e.child_by_field_name("left") {
                                collect_targets(l, src, e.end_byte(), out);
                            }
                        }
                        "named_expression" => {
                            if let Some(l) = e.child_by_field_name("name") {
                                collect_targets(l, src, e.end_byte(), out);
                            }
                        }
                        "lambda"
                        | "list_comprehension"
                        | "set_comprehension"
                        | "dictionary_comprehension"
                        | "generator_expression" => continue,
                        _ => {}
                    }
                    for ch in e.children(&mut c) {
                        stack.push(ch);
                    }
                }
            }
            "for_statement" => {
                if let Some(l) = n.child_by_field_name("left") {
                    collect_targets(l, src, l.end_byte(), out);
                }
                self.children_blocks(n, src, out);
            }
            "with_statement" => {
                let mut stack = vec![n];
                let mut c = n.walk();
                while let Some(e) = stack.pop() {
                    if e.kind() == "as_pattern_target" {
                        collect_targets(e, src, e.end_byte(), out);
                    }
                    if e.kind() == "block" {
                        continue;
                    }
                    for ch in e.children(&mut c) {
                        stack.push(ch);
                    }
                }
                self.children_blocks(n, src, out);
            }
            "if_statement" | "while_statement" | "try_statement" | "match_statement" => {
                // Names bound in any branch count (the branch that runs is not known), and
                // `except ... as e` / `case` captures too, from the start of the statement.
                let mut stack = vec![n];
                let mut c = n.walk();
                while let Some(e) = stack.pop() {
                    match e.kind() {
                        "as_pattern_target" => collect_targets(e, src, n.start_byte(), out),
                        "case_pattern" => collect_targets(e, src, n.start_byte(), out),
                        "block" | "function_definition" | "class_definition" | "lambda" => continue,
                        _ => {}
                    }
                    for ch in e.children(&mut c) {
                        stack.push(ch);
                    }
                }
                self.children_blocks(n, src, out);
            }
            _ => {}
        }
    }

    /// Walks the blocks of a compound statement (bodies, `elif`/`else`/`except`/`finally`).
    fn children_blocks(&mut self, n: Node<'t>, src: &str, out: &mut Vec<(String, usize)>) {
        let mut c = n.walk();
        let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
        for k in kids {
            match k.kind() {
                "block" => self.block(k, src, out),
                "elif_clause"
                | "else_clause"
                | "except_clause"
                | "finally_clause"
                | "except_group_clause"
                | "case_clause" => {
                    let mut c2 = k.walk();
                    let blocks: Vec<Node<'t>> = k
                        .named_children(&mut c2)
                        .filter(|b| b.kind() == "block")
                        .collect();
                    for b in blocks {
                        self.block(b, src, out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Names a function declares `global`.
fn globals(f: Node<'_>, src: &str, out: &mut Vec<(String, usize)>) {
    let mut stack = vec![f];
    let mut c = f.walk();
    while let Some(n) = stack.pop() {
        if n.kind() == "global_statement" {
            let mut c2 = n.walk();
            for id in n
                .named_children(&mut c2)
                .filter(|i| i.kind() == "identifier")
            {
                out.push((text(id, src).to_string(), 0));
            }
        }
        for ch in n.children(&mut c) {
            stack.push(ch);
        }
    }
}

/// Every name bound anywhere inside function `f` (its parameters, locals, nested scopes):
/// conservative, so a name Python could find is never reported.
fn function_bound(f: Node<'_>, src: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    // Parents travel with the nodes: `Node::parent` walks down from the root each time.
    let mut stack = vec![(f, f.parent())];
    let mut c = f.walk();
    while let Some((n, parent)) = stack.pop() {
        if n.kind() == "identifier" {
            if let Some(p) = parent {
                let splat = matches!(p.kind(), "list_splat_pattern" | "dictionary_splat_pattern");
                if splat
                    || (!is_load(n, p) && p.kind() != "attribute" && p.kind() != "keyword_argument")
                {
                    out.insert(text(n, src).to_string());
                }
            }
        }
        for ch in n.children(&mut c) {
            stack.push((ch, Some(n)));
        }
    }
    out
}

/// The innermost function `n` is in, if any (through any number of nested blocks).
fn enclosing_function(n: Node<'_>) -> Option<Node<'_>> {
    let mut p = n.parent();
    while let Some(x) = p {
        if x.kind() == "function_definition" {
            return Some(x);
        }
        p = x.parent();
    }
    None
}

/// Names bound by the comprehensions and lambdas around a read, collected on the way down.
fn scope_names(n: Node<'_>, src: &str, out: &mut Vec<String>) {
    match n.kind() {
        "list_comprehension"
        | "set_comprehension"
        | "dictionary_comprehension"
        | "generator_expression" => {
            let mut c = n.walk();
            for clause in n
                .named_children(&mut c)
                .filter(|k| k.kind() == "for_in_clause")
            {
                if let Some(l) = clause.child_by_field_name("left") {
                    let mut v = Vec::new();
                    collect_targets(l, src, 0, &mut v);
                    out.extend(v.into_iter().map(|(n, _)| n));
                }
            }
        }
        _ => {}
    }
}

struct Checker<'a, 't> {
    src: &'a str,
    scan: &'a Scan<'t>,
    module: Module<'t>,
    seen: HashSet<String>,
    out: Vec<Finding>,
    /// Functions whose bodies run at import, to check once each.
    called: Vec<Node<'t>>,
    checked: HashSet<usize>,
}

impl<'t> Checker<'_, 't> {
    /// Reads in `n` (code that runs at import), with `local` the names bound in the
    /// function being run (none at module level).
    fn reads(&mut self, n: Node<'t>, local: Option<&HashSet<String>>) {
        let mut stack: Vec<(Node<'t>, Option<Node<'t>>, usize)> = vec![(n, n.parent(), 0)];
        let mut scoped: Vec<String> = Vec::new();
        let mut cursor = n.walk();
        while let Some((node, parent, depth)) = stack.pop() {
            scoped.truncate(depth);
            match node.kind() {
                "function_definition" | "lambda" | "class_definition" => continue,
                "decorated_definition" => {
                    let mut c = node.walk();
                    for d in node.children(&mut c).filter(|d| d.kind() == "decorator") {
                        stack.push((d, Some(node), scoped.len()));
                    }
                    continue;
                }
                "call" => {
                    if let Some(f) = node
                        .child_by_field_name("function")
                        .filter(|f| f.kind() == "identifier")
                    {
                        let name = text(f, self.src);
                        // Calling a TaskFlow function makes a task; its body runs later.
                        let shadowed = local.is_some_and(|l| l.contains(name))
                            || self.scan.taskflow.contains_key(name);
                        if let (false, Some(def)) = (shadowed, self.module.functions.get(name)) {
                            self.called.push(*def);
                        }
                    }
                }
                "identifier" => {
                    let name = text(node, self.src);
                    if parent.is_some_and(|p| is_load(node, p))
                        && !scoped.iter().any(|s| s == name)
                        && !local.is_some_and(|l| l.contains(name))
                    {
                        self.read(node, name, local.is_some());
                    }
                    continue;
                }
                _ => {}
            }
            scope_names(node, self.src, &mut scoped);
            let depth = scoped.len();
            for ch in node.children(&mut cursor) {
                stack.push((ch, Some(node), depth));
            }
        }
    }

    fn read(&mut self, id: Node<'_>, name: &str, in_function: bool) {
        if BUILTINS.contains(&name) || name == "__file__" || name == "__name__" {
            return;
        }
        let at = id.start_byte();
        let message = match self.module.bound_at.get(name) {
            // A function body runs when it is called, after the module has bound more names.
            Some(_) if in_function => return,
            Some(&b) if b <= at => return,
            Some(&b) => {
                let line = self.src[..b.min(self.src.len())].matches('\n').count() + 1;
                format!("name `{name}` is used before it is defined (on line {line}): Python runs the file top to bottom")
            }
            None if self.scan.bound.contains(name) => format!(
                "name `{name}` is not defined at import time: it is bound only inside a function"
            ),
            None => {
                let airflow_like = is_operator_name(name)
                    || matches!(
                        name,
                        "DAG"
                            | "TaskGroup"
                            | "Variable"
                            | "Param"
                            | "chain"
                            | "cross_downstream"
                            | "task"
                            | "dag"
                            | "task_group"
                            | "Dataset"
                            | "Asset"
                            | "XComArg"
                            | "Label"
                    );
                if airflow_like {
                    self.push(
                        id,
                        name,
                        Category::MissingImport,
                        format!("`{name}` is used but never imported"),
                    );
                    return;
                }
                format!("name `{name}` is not defined")
            }
        };
        self.push(id, name, Category::UndefinedName, message);
    }

    fn push(&mut self, id: Node<'_>, name: &str, category: Category, message: String) {
        if !self.seen.insert(name.to_string()) {
            return;
        }
        let pos = id.start_position();
        self.out.push(Finding {
            category,
            severity: Severity::Error,
            line: pos.row + 1,
            column: pos.column + 1,
            message,
        });
    }
}

/// Names read at import time (`import_time`: the module-level code the walker found to run)
/// that are not bound when they are read; and every statement that runs at import (the
/// module-level code and the bodies of the functions it calls), for the other checks of
/// executed code.
pub(crate) fn undefined_names<'t>(
    import_time: &[Node<'t>],
    root: Node<'t>,
    src: &str,
    scan: &Scan<'t>,
) -> (Vec<Finding>, Vec<Node<'t>>) {
    let mut executed: Vec<Node<'t>> = import_time.to_vec();
    let mut ck = Checker {
        src,
        scan,
        module: Module::new(root, src),
        seen: HashSet::new(),
        out: Vec::new(),
        called: Vec::new(),
        checked: HashSet::new(),
    };
    // The walker also lists the statements of `@dag` and task-group functions it followed
    // into: those read their function's names too.
    let mut locals: HashMap<usize, HashSet<String>> = HashMap::new();
    for n in import_time {
        if scan.star_import {
            break;
        }
        match enclosing_function(*n) {
            None => ck.reads(*n, None),
            Some(f) => {
                let local = locals
                    .entry(f.id())
                    .or_insert_with(|| function_bound(f, src))
                    .clone();
                ck.checked.insert(f.id());
                ck.reads(*n, Some(&local));
            }
        }
    }
    // Bodies of the module's functions that import-time code calls, and of those they call.
    while let Some(f) = ck.called.pop() {
        if !ck.checked.insert(f.id()) || ck.checked.len() > 256 {
            continue;
        }
        let local = function_bound(f, src);
        if let Some(body) = f.child_by_field_name("body") {
            let mut c = body.walk();
            let stmts: Vec<Node<'t>> = body.named_children(&mut c).collect();
            for s in stmts {
                if !scan.star_import {
                    ck.reads(s, Some(&local));
                }
                executed.push(s);
            }
        }
        // Default values and decorators were read when the `def` ran, at module level.
    }
    ck.out.sort_by_key(|f| (f.line, f.column));
    (ck.out, executed)
}
