//! The parse tree, flattened once per file into an arena of nodes.
//!
//! tree-sitter's own nodes are cheap to hold but not to move between: `parent()` walks down
//! from the root, `child_by_field_name` and `children` run a cursor over the children each
//! time, and `kind()` measures a C string. The checks move between nodes a great deal (the
//! syntax rules, the scan, the DAG walk, the import-time names and the call checks), so one
//! cursor pass copies the tree into a flat vector with parent, first-child and sibling links,
//! kind and field ids, positions and flags; every later step is an index lookup. The vector
//! is kept per thread and reused across files.
//!
//! [`Node`] keeps the subset of tree-sitter's `Node` API the checks use, with the same
//! meaning (visible nodes only; `children` includes anonymous tokens, `named_children`
//! excludes them), so the checks read as tree-sitter code.

use std::sync::OnceLock;

pub(crate) use tree_sitter::Point;

const NONE: u32 = u32::MAX;

const NAMED: u8 = 1;
const ERROR: u8 = 2;
const MISSING: u8 = 4;
const HAS_ERROR: u8 = 8;

#[derive(Clone, Copy, Debug)]
struct Raw {
    kind: u16,
    field: u16,
    flags: u8,
    start: u32,
    end: u32,
    row: u32,
    col: u32,
    parent: u32,
    first_child: u32,
    next: u32,
    prev: u32,
}

/// A flattened tree; [`Tree::root`] is its first node.
#[derive(Default)]
pub(crate) struct Tree {
    nodes: Vec<Raw>,
}

fn language() -> &'static tree_sitter::Language {
    static LANG: OnceLock<tree_sitter::Language> = OnceLock::new();
    LANG.get_or_init(|| tree_sitter_python::LANGUAGE.into())
}

/// Node kind names by id.
fn kinds() -> &'static [&'static str] {
    static KINDS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KINDS.get_or_init(|| {
        let l = language();
        (0..l.node_kind_count() as u16)
            .map(|i| l.node_kind_for_id(i).unwrap_or(""))
            .collect()
    })
}

/// The id of field `name` (0 when the grammar has no such field).
fn field_id(name: &str) -> u16 {
    static FIELDS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let f = FIELDS.get_or_init(|| {
        let l = language();
        (0..=l.field_count() as u16)
            .map(|i| l.field_name_for_id(i).unwrap_or(""))
            .collect()
    });
    f.iter()
        .skip(1)
        .position(|&n| n == name)
        .map_or(0, |i| i as u16 + 1)
}

impl Tree {
    /// Copies `t` into this arena (its earlier contents are dropped, its memory kept).
    pub(crate) fn fill(&mut self, t: &tree_sitter::Tree) {
        self.nodes.clear();
        let mut c = t.walk();
        let raw = |c: &tree_sitter::TreeCursor<'_>, parent: u32, prev: u32| {
            let n = c.node();
            let p = n.start_position();
            let bit = |on: bool, b: u8| if on { b } else { 0 };
            let flags = bit(n.is_named(), NAMED)
                | bit(n.is_error(), ERROR)
                | bit(n.is_missing(), MISSING)
                | bit(n.has_error(), HAS_ERROR);
            Raw {
                kind: n.kind_id(),
                field: c.field_id().map_or(0, |f| f.get()),
                flags,
                start: n.start_byte() as u32,
                end: n.end_byte() as u32,
                row: p.row as u32,
                col: p.column as u32,
                parent,
                first_child: NONE,
                next: NONE,
                prev,
            }
        };
        self.nodes.push(raw(&c, NONE, NONE));
        let mut cur = 0u32;
        loop {
            if c.goto_first_child() {
                let i = self.nodes.len() as u32;
                self.nodes.push(raw(&c, cur, NONE));
                self.nodes[cur as usize].first_child = i;
                cur = i;
                continue;
            }
            loop {
                if c.goto_next_sibling() {
                    let i = self.nodes.len() as u32;
                    let parent = self.nodes[cur as usize].parent;
                    self.nodes.push(raw(&c, parent, cur));
                    self.nodes[cur as usize].next = i;
                    cur = i;
                    break;
                }
                if !c.goto_parent() {
                    return;
                }
                cur = self.nodes[cur as usize].parent;
            }
        }
    }

    /// The module node.
    pub(crate) fn root(&self) -> Node<'_> {
        Node { t: self, i: 0 }
    }
}

/// A node of a [`Tree`].
#[derive(Clone, Copy)]
pub(crate) struct Node<'t> {
    t: &'t Tree,
    i: u32,
}

impl std::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.raw();
        write!(f, "{} [{}, {}]", self.kind(), r.row, r.col)
    }
}

impl PartialEq for Node<'_> {
    fn eq(&self, o: &Self) -> bool {
        std::ptr::eq(self.t, o.t) && self.i == o.i
    }
}

impl Eq for Node<'_> {}

impl std::hash::Hash for Node<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.i.hash(h)
    }
}

/// Stands in for tree-sitter's cursor at call sites (`let mut c = n.walk()`): the flat tree
/// needs none.
pub(crate) struct Cursor;

impl<'t> Node<'t> {
    fn raw(&self) -> &'t Raw {
        &self.t.nodes[self.i as usize]
    }

    fn at(&self, i: u32) -> Option<Node<'t>> {
        (i != NONE).then_some(Node { t: self.t, i })
    }

    /// The node's kind (`call`, `identifier`, `(`...).
    pub(crate) fn kind(&self) -> &'static str {
        let k = self.raw().kind;
        match kinds().get(k as usize) {
            Some(s) => s,
            // ERROR nodes carry the id u16::MAX, outside the grammar's table.
            None => language().node_kind_for_id(k).unwrap_or("ERROR"),
        }
    }

    /// A number unique to this node within its tree.
    pub(crate) fn id(&self) -> usize {
        self.i as usize
    }

    pub(crate) fn is_named(&self) -> bool {
        self.raw().flags & NAMED != 0
    }

    pub(crate) fn is_error(&self) -> bool {
        self.raw().flags & ERROR != 0
    }

    pub(crate) fn is_missing(&self) -> bool {
        self.raw().flags & MISSING != 0
    }

    pub(crate) fn has_error(&self) -> bool {
        self.raw().flags & HAS_ERROR != 0
    }

    pub(crate) fn start_byte(&self) -> usize {
        self.raw().start as usize
    }

    pub(crate) fn end_byte(&self) -> usize {
        self.raw().end as usize
    }

    pub(crate) fn byte_range(&self) -> std::ops::Range<usize> {
        self.start_byte()..self.end_byte()
    }

    pub(crate) fn start_position(&self) -> Point {
        let r = self.raw();
        Point {
            row: r.row as usize,
            column: r.col as usize,
        }
    }

    pub(crate) fn parent(&self) -> Option<Node<'t>> {
        self.at(self.raw().parent)
    }

    pub(crate) fn prev_named_sibling(&self) -> Option<Node<'t>> {
        let mut p = self.at(self.raw().prev);
        while let Some(n) = p {
            if n.is_named() {
                return Some(n);
            }
            p = n.at(n.raw().prev);
        }
        None
    }

    pub(crate) fn walk(&self) -> Cursor {
        Cursor
    }

    fn kids(&self) -> Children<'t> {
        Children {
            t: self.t,
            next: self.raw().first_child,
        }
    }

    /// Every child, anonymous tokens included.
    pub(crate) fn children(&self, _c: &mut Cursor) -> Children<'t> {
        self.kids()
    }

    /// The named children.
    pub(crate) fn named_children(
        &self,
        _c: &mut Cursor,
    ) -> impl Iterator<Item = Node<'t>> + use<'t> {
        self.kids().filter(|n| n.is_named())
    }

    pub(crate) fn child(&self, i: usize) -> Option<Node<'t>> {
        self.kids().nth(i)
    }

    pub(crate) fn child_count(&self) -> usize {
        self.kids().count()
    }

    pub(crate) fn named_child(&self, i: usize) -> Option<Node<'t>> {
        self.kids().filter(|n| n.is_named()).nth(i)
    }

    pub(crate) fn named_child_count(&self) -> usize {
        self.kids().filter(|n| n.is_named()).count()
    }

    /// The first child in field `name`.
    pub(crate) fn child_by_field_name(&self, name: &str) -> Option<Node<'t>> {
        let f = field_id(name);
        if f == 0 {
            return None;
        }
        self.kids().find(|n| n.raw().field == f)
    }

    /// Every child in field `name`.
    pub(crate) fn children_by_field_name(
        &self,
        name: &str,
        _c: &mut Cursor,
    ) -> impl Iterator<Item = Node<'t>> + use<'t> {
        let f = field_id(name);
        self.kids().filter(move |n| f != 0 && n.raw().field == f)
    }
}

/// The children of a node, in order.
pub(crate) struct Children<'t> {
    t: &'t Tree,
    next: u32,
}

impl<'t> Iterator for Children<'t> {
    type Item = Node<'t>;

    fn next(&mut self) -> Option<Node<'t>> {
        if self.next == NONE {
            return None;
        }
        let n = Node {
            t: self.t,
            i: self.next,
        };
        self.next = n.raw().next;
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node, link and field of the flat tree matches tree-sitter's own.
    #[test]
    fn matches_tree_sitter() {
        let src = "import x\n@dag(schedule=None)\ndef f(a, *, b=1):\n    # c\n    return g(a)[b] >> [h, i]\nx = (\n";
        let mut p = tree_sitter::Parser::new();
        p.set_language(language()).unwrap();
        let ts = p.parse(src, None).unwrap();
        let mut flat = Tree::default();
        flat.fill(&ts);
        fn check(a: tree_sitter::Node<'_>, b: Node<'_>) {
            assert_eq!(a.kind(), b.kind());
            assert_eq!(a.byte_range(), b.byte_range());
            assert_eq!(a.start_position(), b.start_position());
            assert_eq!(
                (a.is_named(), a.is_error(), a.is_missing(), a.has_error()),
                (b.is_named(), b.is_error(), b.is_missing(), b.has_error())
            );
            assert_eq!(a.child_count(), b.child_count());
            assert_eq!(a.named_child_count(), b.named_child_count());
            for f in [
                "name",
                "body",
                "left",
                "right",
                "function",
                "arguments",
                "value",
            ] {
                assert_eq!(
                    a.child_by_field_name(f).map(|n| n.byte_range()),
                    b.child_by_field_name(f).map(|n| n.byte_range()),
                    "field {f} of {}",
                    a.kind()
                );
            }
            assert_eq!(
                a.prev_named_sibling().map(|n| n.byte_range()),
                b.prev_named_sibling().map(|n| n.byte_range())
            );
            let mut c = a.walk();
            let kids: Vec<_> = a.children(&mut c).collect();
            let flat: Vec<_> = b.children(&mut Cursor).collect();
            assert_eq!(kids.len(), flat.len());
            for (x, y) in kids.into_iter().zip(flat) {
                assert_eq!(y.parent().map(|p| p.id()), Some(b.id()));
                check(x, y);
            }
        }
        check(ts.root_node(), flat.root());
        assert!(flat.root().parent().is_none());
    }
}
