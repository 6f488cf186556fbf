//! Syntax: tree-sitter's ERROR and MISSING nodes, plus the grammar rules CPython enforces
//! that tree-sitter lets through (an unindented block, `try` without a handler, a positional
//! argument after a keyword argument, `return` outside a function, ...).
//!
//! An error whose node reaches the end of the text is reported as [`Category::Truncated`]:
//! the generator ran out of tokens, which is not the same failure as bad code.

use crate::tree::Node;

use crate::report::{Category, Finding, Severity};

/// Appends syntax findings for the tree under `root`. Only the first error is reported, as
/// CPython does; later ones are usually consequences of it.
pub(crate) fn check(root: Node<'_>, src: &str, out: &mut Vec<Finding>) {
    let end = src.trim_end().len();
    let mut first: Option<(usize, Finding)> = None;
    let mut keep = |byte: usize, f: Finding| {
        if first.as_ref().is_none_or(|(b, _)| byte < *b) {
            first = Some((byte, f));
        }
    };
    let mut cursor = root.walk();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if let Some((msg, at, incomplete)) = problem(node, src) {
            // An unfinished construct that runs to the end of the text is a cut-off output;
            // so is a string opened and never closed.
            let truncated = incomplete && (node.end_byte() >= end || unclosed_string(node, src));
            let pos = at.start_position();
            keep(
                at.start_byte(),
                Finding {
                    category: if truncated {
                        Category::Truncated
                    } else {
                        Category::SyntaxError
                    },
                    severity: Severity::Error,
                    line: pos.row + 1,
                    column: pos.column + 1,
                    message: if truncated {
                        format!("the code ends inside an unfinished construct ({msg}); the output was probably cut off")
                    } else {
                        msg
                    },
                },
            );
            if node.is_error() {
                continue;
            }
        }
        if node.has_error() || node.child_count() > 0 {
            for child in node.children(&mut cursor) {
                stack.push(child);
            }
        }
    }
    if let Some((_, f)) = first {
        out.push(f);
    }
}

fn text<'a>(n: Node<'_>, src: &'a str) -> &'a str {
    src.get(n.byte_range()).unwrap_or("")
}

/// What CPython would say about `node`, where, and whether it is an unfinished construct
/// (which, at the end of the text, means truncation).
fn problem<'t>(node: Node<'t>, src: &str) -> Option<(String, Node<'t>, bool)> {
    if node.is_missing() {
        return Some((format!("expected `{}`", node.kind()), node, true));
    }
    if node.is_error() {
        let snippet: String = text(node, src).chars().take(40).collect();
        return Some((
            format!("invalid syntax near `{}`", snippet.trim()),
            node,
            true,
        ));
    }
    let (msg, at) = rule(node, src)?;
    let incomplete = matches!(node.kind(), "block" | "try_statement");
    Some((msg, at, incomplete))
}

/// Grammar rules CPython enforces and tree-sitter does not.
fn rule<'t>(node: Node<'t>, src: &str) -> Option<(String, Node<'t>)> {
    match node.kind() {
        "block" if node.named_child_count() == 0 || only_comments(node) => {
            let header = node.parent()?;
            Some((
                format!(
                    "expected an indented block after the `{}` on line {}",
                    header
                        .kind()
                        .trim_end_matches("_statement")
                        .trim_end_matches("_definition")
                        .trim_end_matches("_clause"),
                    header.start_position().row + 1
                ),
                node,
            ))
        }
        "try_statement" => {
            let mut c = node.walk();
            let handled = node.children(&mut c).any(|ch| {
                matches!(
                    ch.kind(),
                    "except_clause" | "except_group_clause" | "finally_clause"
                )
            });
            (!handled).then(|| ("expected `except` or `finally` block".to_string(), node))
        }
        "argument_list" => {
            let mut c = node.walk();
            let mut seen_keyword = false;
            let mut seen_dict_splat = false;
            let args = node
                .named_children(&mut c)
                .filter(|a| a.kind() != "comment")
                .count();
            let mut c = node.walk();
            for arg in node.named_children(&mut c) {
                match arg.kind() {
                    "dictionary_splat" => seen_dict_splat = true,
                    "list_splat" if seen_dict_splat => {
                        return Some((
                            "iterable argument unpacking follows keyword argument unpacking".into(),
                            arg,
                        ))
                    }
                    "generator_expression" if args > 1 => {
                        return Some(("Generator expression must be parenthesized".into(), arg))
                    }
                    _ => {}
                }
            }
            let mut c = node.walk();
            let mut names: Vec<&str> = Vec::new();
            for arg in node.named_children(&mut c) {
                match arg.kind() {
                    "keyword_argument" => {
                        seen_keyword = true;
                        if let Some(n) = arg.child_by_field_name("name") {
                            let name = text(n, src);
                            if names.contains(&name) {
                                return Some((format!("keyword argument repeated: {name}"), arg));
                            }
                            names.push(name);
                        }
                    }
                    "dictionary_splat" => seen_keyword = true,
                    "list_splat" | "comment" => {}
                    _ if seen_keyword => {
                        return Some(("positional argument follows keyword argument".into(), arg))
                    }
                    _ => {}
                }
            }
            None
        }
        "parameters" | "lambda_parameters" => parameters(node, src),
        "return_statement" if !inside(node, &["function_definition", "lambda"]) => {
            Some(("'return' outside function".into(), node))
        }
        "return_statement" if node.named_child_count() > 0 => {
            let f = enclosing_function(node)?;
            (is_async(f) && f.child_by_field_name("body").is_some_and(contains_yield))
                .then(|| ("'return' with value in async generator".into(), node))
        }
        "yield" if !inside(node, &["function_definition", "lambda"]) => {
            Some(("'yield' outside function".into(), node))
        }
        "await" => match enclosing_function(node) {
            None if !inside(node, &["lambda"]) => Some(("'await' outside function".into(), node)),
            Some(f) if !is_async(f) => Some(("'await' outside async function".into(), node)),
            _ => None,
        },
        "for_statement" | "with_statement" if is_async(node) => {
            let word = node.kind().trim_end_matches("_statement");
            match enclosing_function(node) {
                Some(f) if is_async(f) => None,
                _ => Some((format!("'async {word}' outside async function"), node)),
            }
        }
        "print_statement" | "exec_statement" => {
            let word = node.kind().trim_end_matches("_statement");
            Some((
                format!("Missing parentheses in call to '{word}'. Did you mean {word}(...)? (Python 2 syntax)"),
                node,
            ))
        }
        "comparison_operator" => {
            let mut c = node.walk();
            let ne = node.children(&mut c).find(|ch| text(*ch, src) == "<>");
            ne.map(|n| ("invalid syntax: `<>` is Python 2; use `!=`".to_string(), n))
        }
        "except_clause" => {
            let mut c = node.walk();
            let comma = node.children(&mut c).find(|ch| ch.kind() == ",");
            comma.map(|n| {
                (
                    "multiple exception types must be parenthesized (`except X, e` is Python 2; write `except X as e`)".to_string(),
                    n,
                )
            })
        }
        "raise_statement" => {
            let mut c = node.walk();
            let list = node
                .named_children(&mut c)
                .find(|ch| ch.kind() == "expression_list");
            list.map(|n| {
                (
                    "invalid syntax: `raise X, message` is Python 2; write `raise X(message)`"
                        .to_string(),
                    n,
                )
            })
        }
        "expression_statement" => {
            let first = node.named_child(0)?;
            (first.kind() == "named_expression").then(|| {
                (
                    "invalid syntax: an assignment expression `:=` needs parentheses as a statement".to_string(),
                    first,
                )
            })
        }
        "assignment" => {
            let left = node.child_by_field_name("left")?;
            if node.child_by_field_name("type").is_some()
                && !matches!(left.kind(), "identifier" | "attribute" | "subscript")
            {
                return Some((
                    "only single target (not tuple) can be annotated".into(),
                    left,
                ));
            }
            if left.kind() == "list_splat_pattern" {
                return Some((
                    "starred assignment target must be in a list or tuple".into(),
                    left,
                ));
            }
            target(left, src, "assign to")
        }
        "augmented_assignment" => {
            let left = node.child_by_field_name("left")?;
            (!matches!(left.kind(), "identifier" | "attribute" | "subscript")).then(|| {
                (
                    format!(
                        "'{}' is an illegal expression for augmented assignment",
                        if left.kind().contains("list") {
                            "tuple"
                        } else {
                            left.kind()
                        }
                    ),
                    left,
                )
            })
        }
        "delete_statement" => {
            let mut c = node.walk();
            let bad = node.named_children(&mut c).find_map(|t| deletable(t, src));
            bad
        }
        "as_pattern_target" => target(node.named_child(0)?, src, "assign to"),
        "for_statement" | "for_in_clause" => {
            let left = node.child_by_field_name("left")?;
            if node.kind() == "for_in_clause" {
                let mut c = node.walk();
                if node.children_by_field_name("right", &mut c).count() > 1 {
                    return Some(("Generator expression must be parenthesized".into(), node));
                }
            }
            target(left, src, "assign to")
        }
        "future_import_statement" => future(node, src),
        "nonlocal_statement" => {
            let Some(f) = enclosing_function(node) else {
                return Some((
                    "nonlocal declaration not allowed at module level".into(),
                    node,
                ));
            };
            let mut c = node.walk();
            for name in node
                .named_children(&mut c)
                .filter(|n| n.kind() == "identifier")
            {
                let n = text(name, src);
                let mut outer = enclosing_function(f);
                let mut found = false;
                while let Some(g) = outer {
                    if binds(g, n, src) {
                        found = true;
                        break;
                    }
                    outer = enclosing_function(g);
                }
                if !found {
                    return Some((format!("no binding for nonlocal '{n}' found"), name));
                }
            }
            None
        }
        "global_statement" => {
            let f = enclosing_function(node)?;
            let mut c = node.walk();
            for name in node
                .named_children(&mut c)
                .filter(|n| n.kind() == "identifier")
            {
                let n = text(name, src);
                if param_names(f, src).contains(&n) {
                    return Some((format!("name '{n}' is parameter and global"), name));
                }
                if let Some(assigned) = used_before(f, n, node.start_byte(), src) {
                    let how = if assigned {
                        "assigned to before"
                    } else {
                        "used prior to"
                    };
                    return Some((format!("name '{n}' is {how} global declaration"), name));
                }
            }
            None
        }
        "import_from_statement" => {
            let mut c = node.walk();
            let star = node
                .children(&mut c)
                .any(|ch| ch.kind() == "wildcard_import");
            (star && enclosing_function(node).is_some())
                .then(|| ("import * only allowed at module level".into(), node))
        }
        "break_statement" | "continue_statement" if !in_loop(node) => {
            let word = node.kind().trim_end_matches("_statement");
            Some((format!("'{word}' outside loop"), node))
        }
        _ => None,
    }
}

/// Parameter-list rules: duplicate names, defaults in order, a bare `*` followed by a named
/// parameter, nothing after `**kwargs`.
fn parameters<'t>(node: Node<'t>, src: &str) -> Option<(String, Node<'t>)> {
    let mut c = node.walk();
    let params: Vec<Node<'t>> = node
        .named_children(&mut c)
        .filter(|p| p.kind() != "comment")
        .collect();
    let splat = |p: Node<'_>, kind: &str| {
        p.kind() == kind
            || (p.kind() == "typed_parameter" && p.named_child(0).is_some_and(|c| c.kind() == kind))
    };
    let mut names: Vec<&str> = Vec::new();
    let mut seen_default = false;
    let mut after_star = false;
    for (i, p) in params.iter().enumerate() {
        let p = *p;
        if i > 0 && splat(params[i - 1], "dictionary_splat_pattern") {
            return Some(("arguments cannot follow var-keyword argument".into(), p));
        }
        if let Some(n) = param_name(p, src) {
            if names.contains(&n) {
                return Some((
                    format!("duplicate argument '{n}' in function definition"),
                    p,
                ));
            }
            names.push(n);
        }
        if p.kind() == "keyword_separator" {
            let next = params.get(i + 1);
            if next.is_none_or(|n| splat(*n, "dictionary_splat_pattern")) {
                return Some(("named arguments must follow bare *".into(), p));
            }
        }
        if splat(p, "list_splat_pattern") || p.kind() == "keyword_separator" {
            after_star = true;
            continue;
        }
        match p.kind() {
            "default_parameter" | "typed_default_parameter" => seen_default = true,
            "identifier" | "typed_parameter"
                if seen_default && !after_star && !splat(p, "dictionary_splat_pattern") =>
            {
                return Some(("non-default argument follows default argument".into(), p))
            }
            _ => {}
        }
    }
    None
}

/// The name a parameter binds.
fn param_name<'a>(p: Node<'_>, src: &'a str) -> Option<&'a str> {
    let n = match p.kind() {
        "identifier" => p,
        "default_parameter" | "typed_default_parameter" => p.child_by_field_name("name")?,
        "typed_parameter" | "list_splat_pattern" | "dictionary_splat_pattern" => {
            let c = p.named_child(0)?;
            if c.kind() == "identifier" {
                c
            } else {
                c.named_child(0)?
            }
        }
        _ => return None,
    };
    (n.kind() == "identifier").then(|| text(n, src))
}

fn param_names<'a>(f: Node<'_>, src: &'a str) -> Vec<&'a str> {
    let Some(ps) = f.child_by_field_name("parameters") else {
        return Vec::new();
    };
    let mut c = ps.walk();
    let names: Vec<&str> = ps
        .named_children(&mut c)
        .filter_map(|p| param_name(p, src))
        .collect();
    names
}

/// What an assignment, `for` or `with ... as` target may not be.
fn target<'t>(t: Node<'t>, src: &str, verb: &str) -> Option<(String, Node<'t>)> {
    match t.kind() {
        "identifier" => {
            let n = text(t, src);
            (n == "__debug__").then(|| (format!("cannot {verb} __debug__"), t))
        }
        "attribute" | "subscript" => None,
        "pattern_list" | "tuple_pattern" | "list_pattern" | "tuple" | "list"
        | "expression_list" => {
            let mut c = t.walk();
            let kids: Vec<Node<'t>> = t
                .named_children(&mut c)
                .filter(|k| k.kind() != "comment")
                .collect();
            let stars = kids
                .iter()
                .filter(|k| matches!(k.kind(), "list_splat_pattern" | "list_splat"))
                .count();
            if stars > 1 {
                return Some(("multiple starred expressions in assignment".into(), t));
            }
            kids.into_iter().find_map(|k| target(k, src, verb))
        }
        "list_splat_pattern" | "list_splat" | "parenthesized_expression" => {
            target(t.named_child(0)?, src, verb)
        }
        "integer" | "float" | "string" | "concatenated_string" | "true" | "false" | "none" => {
            let what = match t.kind() {
                "true" => "True".to_string(),
                "false" => "False".to_string(),
                "none" => "None".to_string(),
                _ => "literal".to_string(),
            };
            Some((format!("cannot {verb} {what}"), t))
        }
        "call" => Some((format!("cannot {verb} function call"), t)),
        "ERROR" => None,
        _ => Some((format!("cannot {verb} expression"), t)),
    }
}

/// Why `del` cannot delete `t`, if it cannot.
fn deletable<'t>(t: Node<'t>, src: &str) -> Option<(String, Node<'t>)> {
    match t.kind() {
        "identifier" | "attribute" | "subscript" | "comment" => None,
        "expression_list" | "tuple" | "list" | "parenthesized_expression" => {
            let mut c = t.walk();
            let bad = t.named_children(&mut c).find_map(|k| deletable(k, src));
            bad
        }
        _ => target(t, src, "delete").or(Some(("cannot delete expression".into(), t))),
    }
}

/// `from __future__` rules: a known feature, and only at the top of the module.
fn future<'t>(node: Node<'t>, src: &str) -> Option<(String, Node<'t>)> {
    const FEATURES: &[&str] = &[
        "nested_scopes",
        "generators",
        "division",
        "absolute_import",
        "with_statement",
        "print_function",
        "unicode_literals",
        "barry_as_FLUFL",
        "generator_stop",
        "annotations",
    ];
    let mut c = node.walk();
    for name in node.children_by_field_name("name", &mut c) {
        let n = text(name, src);
        let n = n.split_whitespace().next().unwrap_or(n);
        if n == "braces" {
            return Some(("not a chance".into(), name));
        }
        if !FEATURES.contains(&n) {
            return Some((format!("future feature {n} is not defined"), name));
        }
    }
    let first = node.parent().is_some_and(|p| p.kind() == "module") && {
        let mut prev = node.prev_named_sibling();
        let mut ok = true;
        let mut docstring_seen = false;
        while let Some(p) = prev {
            match p.kind() {
                "comment" | "future_import_statement" => {}
                "expression_statement"
                    if !docstring_seen
                        && p.named_child(0).is_some_and(|s| s.kind() == "string")
                        && p.prev_named_sibling().is_none_or(|q| q.kind() == "comment") =>
                {
                    docstring_seen = true
                }
                _ => {
                    ok = false;
                    break;
                }
            }
            prev = p.prev_named_sibling();
        }
        ok
    };
    (!first).then(|| {
        (
            "from __future__ imports must occur at the beginning of the file".into(),
            node,
        )
    })
}

/// The function whose scope `node` is in (stopping at a class body, which is its own scope).
fn enclosing_function(node: Node<'_>) -> Option<Node<'_>> {
    let mut n = node.parent();
    while let Some(p) = n {
        match p.kind() {
            "function_definition" => return Some(p),
            "class_definition" => return None,
            _ => {}
        }
        n = p.parent();
    }
    None
}

/// Whether a function definition or a `for`/`with` statement is `async`.
fn is_async(n: Node<'_>) -> bool {
    n.child(0).is_some_and(|c| c.kind() == "async")
}

/// Whether a function body yields (not counting nested functions and lambdas).
fn contains_yield(body: Node<'_>) -> bool {
    let mut stack = vec![body];
    let mut c = body.walk();
    while let Some(n) = stack.pop() {
        if n.kind() == "yield" {
            return true;
        }
        if matches!(
            n.kind(),
            "function_definition" | "lambda" | "class_definition"
        ) && n.id() != body.id()
        {
            continue;
        }
        for ch in n.children(&mut c) {
            stack.push(ch);
        }
    }
    false
}

/// Whether function `f` binds `name` in its own scope: a parameter, an assignment target, a
/// `for`/`with`/`import`/`def`/`class` name.
fn binds(f: Node<'_>, name: &str, src: &str) -> bool {
    if param_names(f, src).contains(&name) {
        return true;
    }
    let Some(body) = f.child_by_field_name("body") else {
        return false;
    };
    let mut stack = vec![body];
    let mut c = body.walk();
    while let Some(n) = stack.pop() {
        match n.kind() {
            "function_definition" | "class_definition" => {
                if n.child_by_field_name("name")
                    .is_some_and(|x| text(x, src) == name)
                {
                    return true;
                }
                continue;
            }
            "lambda" => continue,
            "identifier" if text(n, src) == name && is_binding(n) => return true,
            _ => {}
        }
        for ch in n.children(&mut c) {
            stack.push(ch);
        }
    }
    false
}

/// Whether an identifier is a binding occurrence (an assignment, `for`, `with`, `import`
/// or `except ... as` target).
fn is_binding(id: Node<'_>) -> bool {
    let mut child = id;
    let mut n = id.parent();
    while let Some(p) = n {
        match p.kind() {
            "pattern_list" | "tuple_pattern" | "list_pattern" | "list_splat_pattern" => {}
            "assignment" | "augmented_assignment" | "for_statement" | "for_in_clause" => {
                return p
                    .child_by_field_name("left")
                    .is_some_and(|l| l.id() == child.id())
            }
            "as_pattern_target" | "aliased_import" | "dotted_name" => {
                return p.parent().is_some_and(|q| {
                    matches!(
                        q.kind(),
                        "import_statement"
                            | "import_from_statement"
                            | "aliased_import"
                            | "as_pattern"
                            | "with_item"
                    )
                })
            }
            "global_statement" | "nonlocal_statement" => return false,
            _ => return false,
        }
        child = p;
        n = p.parent();
    }
    false
}

/// Whether `name` occurs in `f`'s own scope before byte `before`; `Some(true)` when one
/// occurrence is an assignment to it.
fn used_before(f: Node<'_>, name: &str, before: usize, src: &str) -> Option<bool> {
    let body = f.child_by_field_name("body")?;
    let mut stack = vec![body];
    let mut c = body.walk();
    let mut found: Option<bool> = None;
    while let Some(n) = stack.pop() {
        if n.start_byte() >= before {
            continue;
        }
        match n.kind() {
            "function_definition" | "class_definition" | "lambda" => continue,
            "identifier" if text(n, src) == name => {
                let assigned = is_binding(n);
                found = Some(found.unwrap_or(false) || assigned);
            }
            _ => {}
        }
        for ch in n.children(&mut c) {
            stack.push(ch);
        }
    }
    found
}

/// Whether `node` (an ERROR) opens a string whose closing quote never comes.
fn unclosed_string(node: Node<'_>, src: &str) -> bool {
    let t = text(node, src).trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let delim = ["\"\"\"", "\'\'\'", "\"", "\'"]
        .into_iter()
        .find(|d| t.starts_with(d));
    let Some(delim) = delim else { return false };
    let rest = &src[node.start_byte() + (text(node, src).len() - t.len()) + delim.len()..];
    if delim.len() == 3 {
        !rest.contains(delim)
    } else {
        !rest.contains('\n') && !rest.contains(delim)
    }
}

fn only_comments(block: Node<'_>) -> bool {
    let mut c = block.walk();
    let all = block.named_children(&mut c).all(|n| n.kind() == "comment");
    all
}

/// Whether an ancestor of `node` (before a class body) has one of `kinds`.
fn inside(node: Node<'_>, kinds: &[&str]) -> bool {
    let mut n = node.parent();
    while let Some(p) = n {
        if kinds.contains(&p.kind()) {
            return true;
        }
        if p.kind() == "class_definition" {
            return false;
        }
        n = p.parent();
    }
    false
}

fn in_loop(node: Node<'_>) -> bool {
    let mut n = node.parent();
    let mut child = node;
    while let Some(p) = n {
        match p.kind() {
            // The loop's `else` block does not count as inside the loop.
            "for_statement" | "while_statement" => {
                return p
                    .child_by_field_name("body")
                    .is_some_and(|b| b.id() == child.id());
            }
            "function_definition" | "class_definition" | "lambda" => return false,
            _ => {}
        }
        child = p;
        n = p.parent();
    }
    false
}
