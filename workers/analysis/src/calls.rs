//! Constructor arguments and attributes of Airflow classes, checked against the signatures
//! in the knowledge base (`kb/build.py` reads each class's `__init__` from the released
//! wheels).
//!
//! - `BashOperator(task_id="a", shell="zsh")`: Airflow's `BaseOperator` refuses arguments no
//!   class in the chain takes ("Invalid arguments were passed"); a parameter without a
//!   default that is not given (and not in the DAG's `default_args`) is "missing keyword
//!   argument". Checked only when the whole chain up to `BaseOperator` (or a constructor
//!   without `**kwargs`) is known, the call has no `*`/`**` unpacking, and it runs at import.
//! - `dag.create_task_group(...)`: an attribute that no class in the chain defines (as a
//!   method, a class-level name or a `self.x` assignment), on a name bound once to an
//!   instance (`x = DAG(...)`, `with TaskGroup(...) as g`).

use crate::tree::Node;
use std::collections::{HashMap, HashSet};

use crate::analyze::{text, Scan};
use crate::kb::Kb;
use crate::report::{Category, Finding, Severity};

/// Findings for the code that runs at import: `executed` are statements (and function
/// bodies) that run.
pub(crate) fn check<'t>(
    executed: &[Node<'t>],
    root: Node<'t>,
    src: &str,
    scan: &Scan<'t>,
) -> Vec<Finding> {
    let kb = Kb::get();
    if scan.star_import {
        return Vec::new();
    }
    // Local name -> (module, name) of `from module import name`.
    let imported: HashMap<&str, (&str, &str)> = scan
        .imports
        .iter()
        .filter_map(|i| Some((i.bound.as_str(), (i.module.as_str(), i.name.as_deref()?))))
        .collect();
    let class_of = |f: Node<'_>| -> Option<(&'static str, &'static crate::kb::Class)> {
        if f.kind() != "identifier" {
            return None;
        }
        let (m, n) = imported.get(text(f, src))?;
        kb.class(m, n)
    };
    // Whole-file facts, computed only when a check needs them.
    let mut defaults: Option<(HashSet<String>, bool)> = None;
    let mut bindings: Option<HashMap<&str, usize>> = None;

    let mut out = Vec::new();
    let mut typed: HashMap<String, &'static str> = HashMap::new();
    let mut calls = Vec::new();
    let mut attrs = Vec::new();
    for &n in executed {
        let mut stack = vec![n];
        let mut c = n.walk();
        while let Some(x) = stack.pop() {
            match x.kind() {
                "function_definition" | "class_definition" | "lambda" | "decorated_definition"
                    if x.id() != n.id() =>
                {
                    continue
                }
                "call" => calls.push(x),
                "attribute" => attrs.push(x),
                "assignment" => {
                    if let (Some(l), Some(r)) = (
                        x.child_by_field_name("left"),
                        x.child_by_field_name("right"),
                    ) {
                        if l.kind() == "identifier" && r.kind() == "call" {
                            if let Some((path, _)) =
                                r.child_by_field_name("function").and_then(class_of)
                            {
                                typed.insert(text(l, src).to_string(), path);
                            }
                        }
                    }
                }
                "with_item" => {
                    if let Some(v) = x
                        .child_by_field_name("value")
                        .filter(|v| v.kind() == "as_pattern")
                    {
                        let call = v.named_child(0).filter(|c| c.kind() == "call");
                        let alias = v
                            .child_by_field_name("alias")
                            .and_then(|a| a.named_child(0))
                            .filter(|a| a.kind() == "identifier");
                        if let (Some(call), Some(alias)) = (call, alias) {
                            if let Some((path, _)) =
                                call.child_by_field_name("function").and_then(class_of)
                            {
                                typed.insert(text(alias, src).to_string(), path);
                            }
                        }
                    }
                }
                _ => {}
            }
            for ch in x.children(&mut c) {
                stack.push(ch);
            }
        }
    }
    let mut seen = HashSet::new();
    for call in calls {
        let Some(f) = call.child_by_field_name("function") else {
            continue;
        };
        let Some((path, _)) = class_of(f) else {
            continue;
        };
        let Some(sig) = kb.signature(path) else {
            continue;
        };
        let Some(args) = call
            .child_by_field_name("arguments")
            .filter(|a| a.kind() == "argument_list")
        else {
            continue;
        };
        let mut c = args.walk();
        let mut given = HashSet::new();
        let mut positional = 0;
        let mut unpacked = false;
        for a in args.named_children(&mut c) {
            match a.kind() {
                "keyword_argument" => {
                    if let Some(k) = a.child_by_field_name("name") {
                        given.insert((text(k, src), k));
                    }
                }
                "list_splat" | "dictionary_splat" => unpacked = true,
                "comment" => {}
                _ => positional += 1,
            }
        }
        if unpacked {
            continue;
        }
        let class = path.rsplit('.').next().unwrap_or(path);
        for (k, node) in &given {
            if !sig.accepted.contains(*k) && seen.insert((call.id(), k.to_string())) {
                out.push(error_at(*node, Category::WrongArgument, format!(
                        "Invalid arguments were passed to {class}: `{k}` is not a parameter of {class} or of the classes it derives from"
                    )));
            }
        }
        let (default_keys, defaults_known) =
            defaults.get_or_insert_with(|| default_args(root, src));
        if positional == 0 && *defaults_known {
            let names: HashSet<&str> = given.iter().map(|(k, _)| *k).collect();
            let mut missing: Vec<&String> = sig
                .required
                .iter()
                .filter(|r| !names.contains(r.as_str()) && !default_keys.contains(r.as_str()))
                .collect();
            missing.sort();
            if let Some(r) = missing.first() {
                out.push(error_at(
                    call,
                    Category::WrongArgument,
                    format!("missing keyword argument '{r}' for {class}"),
                ));
            }
        }
    }
    for a in attrs {
        let (Some(obj), Some(attr)) = (
            a.child_by_field_name("object"),
            a.child_by_field_name("attribute"),
        ) else {
            continue;
        };
        if obj.kind() != "identifier" {
            continue;
        }
        let name = text(obj, src);
        let Some(path) = typed.get(name) else {
            continue;
        };
        let bindings = bindings.get_or_insert_with(|| binding_counts(root, src));
        if bindings.get(name).copied().unwrap_or(0) != 1 {
            continue;
        }
        let attr = text(attr, src);
        if attr.starts_with("__") {
            continue;
        }
        if kb.has_attr(path, attr) == Some(false) && seen.insert((a.id(), attr.to_string())) {
            let class = path.rsplit('.').next().unwrap_or(path);
            out.push(error_at(
                a,
                Category::UnknownAttribute,
                format!("'{class}' object has no attribute '{attr}'"),
            ));
        }
    }
    out
}

/// An error finding at `node`.
fn error_at(node: Node<'_>, category: Category, message: String) -> Finding {
    let pos = node.start_position();
    Finding {
        category,
        severity: Severity::Error,
        line: pos.row + 1,
        column: pos.column + 1,
        message,
    }
}

/// Keys of every `default_args` dict in the file, and whether all of them are literals
/// (directly or through a name bound to one): otherwise a missing argument may come from
/// them, and is not reported.
fn default_args(root: Node<'_>, src: &str) -> (HashSet<String>, bool) {
    let mut dicts: HashMap<&str, Node<'_>> = HashMap::new();
    let mut uses = Vec::new();
    let mut stack = vec![root];
    let mut c = root.walk();
    while let Some(n) = stack.pop() {
        match n.kind() {
            "assignment" => {
                if let (Some(l), Some(r)) = (
                    n.child_by_field_name("left"),
                    n.child_by_field_name("right"),
                ) {
                    if l.kind() == "identifier" && r.kind() == "dictionary" {
                        dicts.insert(text(l, src), r);
                    }
                }
            }
            "keyword_argument"
                if n.child_by_field_name("name")
                    .is_some_and(|k| text(k, src) == "default_args") =>
            {
                if let Some(v) = n.child_by_field_name("value") {
                    uses.push(v);
                }
            }
            _ => {}
        }
        for ch in n.children(&mut c) {
            stack.push(ch);
        }
    }
    let mut keys = HashSet::new();
    for v in uses {
        let d = match v.kind() {
            "dictionary" => Some(v),
            "identifier" => dicts.get(text(v, src)).copied(),
            _ => None,
        };
        let Some(d) = d else {
            return (keys, false);
        };
        let mut c2 = d.walk();
        for pair in d.named_children(&mut c2) {
            if pair.kind() != "pair" {
                return (keys, false);
            }
            match pair
                .child_by_field_name("key")
                .and_then(|k| crate::analyze::string_value(k, src))
            {
                Some(k) => {
                    keys.insert(k);
                }
                None => return (keys, false),
            }
        }
    }
    (keys, true)
}

/// How many times each name is bound in the file (assignments, `with ... as`, `for`, imports,
/// definitions, parameters): an instance's type is trusted only for a name bound once.
fn binding_counts<'a>(root: Node<'_>, src: &'a str) -> HashMap<&'a str, usize> {
    let mut out: HashMap<&str, usize> = HashMap::new();
    let mut stack = vec![(root, None)];
    let mut c = root.walk();
    while let Some((n, parent)) = stack.pop() {
        if n.kind() == "identifier" {
            if let Some(p) = parent {
                if !crate::analyze::is_load(n, p)
                    && p.kind() != "attribute"
                    && p.kind() != "keyword_argument"
                {
                    *out.entry(text(n, src)).or_default() += 1;
                }
            }
        }
        for ch in n.children(&mut c) {
            stack.push((ch, Some(n)));
        }
    }
    out
}
