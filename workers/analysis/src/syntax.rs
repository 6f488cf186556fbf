//! Syntax: tree-sitter's ERROR and MISSING nodes, plus the grammar rules CPython enforces
//! that tree-sitter lets through (an unindented block, `try` without a handler, a positional
//! argument after a keyword argument, `return` outside a function, ...).
//!
//! An error whose node reaches the end of the text is reported as [`Category::Truncated`]:
//! the generator ran out of tokens, which is not the same failure as bad code.

use tree_sitter::Node;

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
        "parameters" => {
            let mut c = node.walk();
            let mut seen_default = false;
            for p in node.named_children(&mut c) {
                match p.kind() {
                    "default_parameter" | "typed_default_parameter" => seen_default = true,
                    "identifier" | "typed_parameter" if seen_default => {
                        return Some((
                            "parameter without a default follows parameter with a default".into(),
                            p,
                        ))
                    }
                    "list_splat_pattern" | "keyword_separator" | "dictionary_splat_pattern" => {
                        return None
                    }
                    _ => {}
                }
            }
            None
        }
        "return_statement" if !inside(node, &["function_definition", "lambda"]) => {
            Some(("'return' outside function".into(), node))
        }
        "break_statement" | "continue_statement" if !in_loop(node) => {
            let word = node.kind().trim_end_matches("_statement");
            Some((format!("'{word}' outside loop"), node))
        }
        _ => None,
    }
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
