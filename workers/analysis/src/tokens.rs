//! The checks CPython's tokenizer makes, which tree-sitter's error recovery hides:
//! indentation (unexpected indent, an unindent that matches no outer level, tabs and spaces
//! mixed inconsistently), brackets (never closed, closed by the wrong kind, closed without
//! being opened), characters that are not Python (curly quotes, non-breaking spaces, `$`,
//! backticks, bytes that do not decode), number literals (leading zeros, bad digits,
//! misplaced underscores, `10L`), string literals (unterminated, invalid prefixes like `ur`,
//! short `\x`/`\u` escapes, non-ASCII bytes) and f-strings (empty expressions, bad
//! conversions, a single `}`, an unclosed `{`).
//!
//! One pass over the text; only the first error is reported, as CPython does. Errors that
//! run into the end of the text (an unclosed bracket, string or block at the end) are
//! [`Category::Truncated`].

use crate::encoding::UNDECODABLE;
use crate::report::{Category, Finding, Severity};

/// A problem at a byte offset.
struct Problem {
    byte: usize,
    message: String,
    truncated: bool,
}

/// The first tokenizer-level error in `src`, if there is one.
pub(crate) fn check(src: &str) -> Option<Finding> {
    let p = Lexer::new(src).run().err()?;
    let (line, column) = position(src, p.byte);
    Some(Finding {
        category: if p.truncated {
            Category::Truncated
        } else {
            Category::SyntaxError
        },
        severity: Severity::Error,
        line,
        column,
        message: if p.truncated {
            format!(
                "the code ends inside an unfinished construct ({}); the output was probably cut off",
                p.message
            )
        } else {
            p.message
        },
    })
}

/// 1-based line and column of byte `at`.
fn position(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count());
    (line, col + 1)
}

struct Lexer<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
    brackets: Vec<(u8, usize)>,
    /// (columns with tabs to multiples of 8, columns with tabs as 1), as CPython compares.
    indents: Vec<(usize, usize)>,
    /// The last logical line ended with `:` outside brackets.
    block_open: Option<usize>,
    last_colon: Option<usize>,
    line_has_tokens: bool,
}

fn err<T>(byte: usize, message: impl Into<String>) -> Result<T, Problem> {
    Err(Problem {
        byte,
        message: message.into(),
        truncated: false,
    })
}

fn cut<T>(byte: usize, message: impl Into<String>) -> Result<T, Problem> {
    Err(Problem {
        byte,
        message: message.into(),
        truncated: true,
    })
}

fn ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric() || matches!(c, '\u{300}'..='\u{36f}')
}

/// Keywords that may follow a number directly (`1if x else 2`).
const NUMBER_FOLLOWERS: &[&str] = &["and", "else", "for", "if", "in", "is", "not", "or"];

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            src,
            b: src.as_bytes(),
            i: 0,
            brackets: Vec::new(),
            indents: vec![(0, 0)],
            block_open: None,
            last_colon: None,
            line_has_tokens: false,
        }
    }

    fn peek(&self, k: usize) -> u8 {
        self.b.get(self.i + k).copied().unwrap_or(0)
    }

    fn ch(&self) -> Option<char> {
        self.src[self.i..].chars().next()
    }

    fn run(mut self) -> Result<(), Problem> {
        let mut line_start = true;
        while self.i < self.b.len() {
            if line_start {
                line_start = false;
                if self.brackets.is_empty() {
                    self.indentation()?;
                    continue;
                }
            }
            let c = self.b[self.i];
            match c {
                b'\n' | b'\r' => {
                    self.i += if c == b'\r' && self.peek(1) == b'\n' {
                        2
                    } else {
                        1
                    };
                    if self.brackets.is_empty() {
                        if self.line_has_tokens {
                            self.block_open = self.last_colon;
                        }
                        self.line_has_tokens = false;
                        self.last_colon = None;
                        line_start = true;
                    }
                }
                b' ' | b'\t' | b'\x0c' => self.i += 1,
                b'#' => self.comment(),
                b'\\' => {
                    let at = self.i;
                    self.i += 1;
                    match self.peek(0) {
                        b'\n' => self.i += 1,
                        b'\r' => self.i += if self.peek(1) == b'\n' { 2 } else { 1 },
                        0 => return cut(at, "unexpected end of file after `\\`"),
                        _ => {
                            return err(
                                at,
                                "unexpected character after line continuation character",
                            )
                        }
                    }
                }
                b'"' | b'\'' => {
                    self.token(false);
                    self.string(self.i, "")?;
                }
                b'0'..=b'9' => {
                    self.token(false);
                    self.number()?;
                }
                b'.' if self.peek(1).is_ascii_digit() => {
                    self.token(false);
                    self.number()?;
                }
                b'(' | b'[' | b'{' => {
                    self.token(false);
                    self.brackets.push((c, self.i));
                    self.i += 1;
                }
                b')' | b']' | b'}' => {
                    self.token(false);
                    let open = match c {
                        b')' => b'(',
                        b']' => b'[',
                        _ => b'{',
                    };
                    match self.brackets.pop() {
                        Some((o, _)) if o == open => {}
                        Some((o, at)) => {
                            let (l, _) = position(self.src, at);
                            let (ol, cl) = (o as char, c as char);
                            let tail = if position(self.src, self.i).0 == l {
                                String::new()
                            } else {
                                format!(" on line {l}")
                            };
                            return err(
                                self.i,
                                format!("closing parenthesis '{cl}' does not match opening parenthesis '{ol}'{tail}"),
                            );
                        }
                        None => return err(self.i, format!("unmatched '{}'", c as char)),
                    }
                    self.i += 1;
                }
                b':' => {
                    let at = self.i;
                    self.token(false);
                    self.i += 1;
                    if self.peek(0) == b'=' {
                        self.i += 1;
                    } else if self.brackets.is_empty() {
                        self.last_colon = Some(at);
                    }
                }
                b'!' => {
                    if self.peek(1) != b'=' {
                        return err(self.i, "invalid syntax: `!` is only part of `!=`");
                    }
                    self.token(false);
                    self.i += 2;
                }
                b'$' | b'?' | b'`' => {
                    return err(
                        self.i,
                        format!("invalid syntax: `{}` is not Python", c as char),
                    )
                }
                b'+' | b'-' | b'*' | b'/' | b'%' | b'@' | b'&' | b'|' | b'^' | b'~' | b'<'
                | b'>' | b'=' | b'.' | b',' | b';' => {
                    self.token(false);
                    self.i += 1;
                }
                _ => {
                    let Some(ch) = self.ch() else { break };
                    if ident_start(ch) {
                        self.token(false);
                        self.identifier()?;
                    } else if ch == UNDECODABLE {
                        return err(
                            self.i,
                            "(unicode error) 'utf-8' codec can't decode the source: bytes that are not UTF-8 outside a comment, and no coding line",
                        );
                    } else if ch.is_whitespace() || ch.is_control() {
                        return err(
                            self.i,
                            format!("invalid non-printable character U+{:04X}", ch as u32),
                        );
                    } else {
                        return err(
                            self.i,
                            format!("invalid character '{ch}' (U+{:04X})", ch as u32),
                        );
                    }
                }
            }
        }
        if let Some(&(o, at)) = self.brackets.last() {
            return self.unclosed(o, at);
        }
        if self.line_has_tokens {
            self.block_open = self.last_colon;
        }
        if let Some(at) = self.block_open {
            return cut(at, "expected an indented block after this `:`");
        }
        Ok(())
    }

    /// A bracket left open at the end: a cut-off output when nothing after it starts a new
    /// statement further left, else a plain syntax error.
    fn unclosed(&self, o: u8, at: usize) -> Result<(), Problem> {
        let line_start = self.src[..at].rfind('\n').map_or(0, |i| i + 1);
        let indent = self.src[line_start..at]
            .chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .count();
        let rest = &self.src[at..];
        let restarts = rest.lines().skip(1).any(|l| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#') && l.len() - t.len() <= indent
        });
        let msg = format!("'{}' was never closed", o as char);
        if restarts {
            err(at, msg)
        } else {
            cut(at, msg)
        }
    }

    fn token(&mut self, _colon: bool) {
        self.line_has_tokens = true;
        self.last_colon = None;
    }

    fn comment(&mut self) {
        while self.i < self.b.len() && !matches!(self.b[self.i], b'\n' | b'\r') {
            self.i += 1;
        }
    }

    /// Measures a logical line's indentation and checks it against the stack.
    fn indentation(&mut self) -> Result<(), Problem> {
        let (mut col, mut alt) = (0usize, 0usize);
        let start = self.i;
        while self.i < self.b.len() {
            match self.b[self.i] {
                b' ' => {
                    col += 1;
                    alt += 1;
                }
                b'\t' => {
                    col = (col / 8 + 1) * 8;
                    alt += 1;
                }
                b'\x0c' => {
                    col = 0;
                    alt = 0;
                }
                _ => break,
            }
            self.i += 1;
        }
        // Blank and comment-only lines do not count.
        if matches!(self.peek(0), b'\n' | b'\r' | b'#' | 0) || self.b[self.i..].starts_with(b"\\\n")
        {
            return Ok(());
        }
        let (top, top_alt) = *self.indents.last().unwrap_or(&(0, 0));
        let tab_error = || {
            err(
                start,
                "inconsistent use of tabs and spaces in indentation (TabError)",
            )
        };
        if col == top {
            if alt != top_alt {
                return tab_error();
            }
            if let Some(at) = self.block_open.take() {
                return self.missing_block(at);
            }
        } else if col > top {
            if alt <= top_alt {
                return tab_error();
            }
            if self.block_open.take().is_none() {
                return err(self.i, "unexpected indent (IndentationError)");
            }
            self.indents.push((col, alt));
        } else {
            while self.indents.len() > 1 && col < self.indents.last().map_or(0, |t| t.0) {
                self.indents.pop();
            }
            let (t, ta) = *self.indents.last().unwrap_or(&(0, 0));
            if col != t {
                return err(
                    self.i,
                    "unindent does not match any outer indentation level (IndentationError)",
                );
            }
            if alt != ta {
                return tab_error();
            }
            if let Some(at) = self.block_open.take() {
                return self.missing_block(at);
            }
        }
        Ok(())
    }

    /// A line at or left of the block opened by the `:` at byte `at`.
    fn missing_block(&self, at: usize) -> Result<(), Problem> {
        let (l, _) = position(self.src, at);
        err(
            self.i,
            format!("expected an indented block after the `:` on line {l} (IndentationError)"),
        )
    }

    fn identifier(&mut self) -> Result<(), Problem> {
        let start = self.i;
        while let Some(c) = self.ch() {
            if !ident_continue(c) {
                break;
            }
            self.i += c.len_utf8();
        }
        if matches!(self.peek(0), b'"' | b'\'') {
            let prefix = &self.src[start..self.i];
            let lower = prefix.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "r" | "u" | "b" | "br" | "rb" | "f" | "fr" | "rf"
            ) {
                return self.string(start, &lower);
            }
            return err(
                start,
                format!("invalid syntax: `{prefix}` is not a string prefix"),
            );
        }
        Ok(())
    }

    /// A string literal whose quote is at `self.i`; `prefix` is lower-case.
    fn string(&mut self, start: usize, prefix: &str) -> Result<(), Problem> {
        let q = self.b[self.i];
        let triple = self.peek(1) == q && self.peek(2) == q;
        self.i += if triple { 3 } else { 1 };
        let body_start = self.i;
        let raw = prefix.contains('r');
        let bytes = prefix.contains('b');
        loop {
            let Some(c) = self.ch() else {
                return if triple {
                    cut(start, "unterminated triple-quoted string literal")
                } else {
                    cut(start, "unterminated string literal")
                };
            };
            let at = self.i;
            self.i += c.len_utf8();
            match c {
                '\\' => {
                    let Some(n) = self.ch() else { continue };
                    self.i += n.len_utf8();
                    if n == '\r' && self.peek(0) == b'\n' {
                        self.i += 1;
                    }
                    if raw {
                        continue;
                    }
                    let need = match n {
                        'x' => 2,
                        'u' if !bytes => 4,
                        'U' if !bytes => 8,
                        _ => 0,
                    };
                    if need > 0 {
                        let hex = self.b[self.i..]
                            .iter()
                            .take(need)
                            .take_while(|b| b.is_ascii_hexdigit())
                            .count();
                        if hex < need {
                            return err(
                                at,
                                format!("(unicode error) truncated \\{n} escape: it needs {need} hex digits"),
                            );
                        }
                        if n == 'U' {
                            let v = u32::from_str_radix(&self.src[self.i..self.i + 8], 16)
                                .unwrap_or(u32::MAX);
                            if v > 0x10FFFF {
                                return err(at, "(unicode error) illegal Unicode character");
                            }
                        }
                        self.i += need;
                    } else if n == 'N' && !bytes {
                        let rest = &self.src[self.i..];
                        let end = rest.find('}').filter(|_| rest.starts_with('{'));
                        match end {
                            Some(e) if e > 1 && !rest[1..e].contains(['\n', q as char]) => {
                                let name = rest[1..e].to_ascii_uppercase();
                                if unicode_names2::character(&name).is_none() {
                                    return err(
                                        at,
                                        format!(
                                            "(unicode error) unknown Unicode character name `{}`",
                                            rest[1..e].chars().take(60).collect::<String>()
                                        ),
                                    );
                                }
                                self.i += e + 1
                            }
                            _ => return err(at, "(unicode error) malformed \\N character escape"),
                        }
                    }
                }
                '\n' | '\r' if !triple => {
                    let (l, _) = position(self.src, start);
                    return err(
                        start,
                        format!("unterminated string literal (detected at line {l})"),
                    );
                }
                _ if c as u32 == u32::from(q) => {
                    if !triple {
                        break;
                    }
                    if self.peek(0) == q && self.peek(1) == q {
                        self.i += 2;
                        break;
                    }
                }
                _ if bytes && !c.is_ascii() => {
                    return err(at, "bytes can only contain ASCII literal characters");
                }
                _ if c == UNDECODABLE => {
                    return err(
                        at,
                        "(unicode error) 'utf-8' codec can't decode a byte of this string, and the file has no coding line",
                    );
                }
                _ => {}
            }
        }
        let body_end = self.i - if triple { 3 } else { 1 };
        if prefix.contains('f') {
            fstring(&self.src[body_start..body_end], body_start, raw)?;
        }
        Ok(())
    }

    fn number(&mut self) -> Result<(), Problem> {
        let start = self.i;
        let digits =
            |l: &mut Self, ok: &dyn Fn(u8) -> bool, kind: &str| -> Result<usize, Problem> {
                let mut n = 0;
                loop {
                    let c = l.peek(0);
                    if ok(c) {
                        l.i += 1;
                        n += 1;
                    } else if c == b'_' && n > 0 && ok(l.peek(1)) {
                        l.i += 1;
                    } else if c == b'_' {
                        return err(l.i, format!("invalid {kind} literal"));
                    } else {
                        return Ok(n);
                    }
                }
            };
        let dec = |c: u8| c.is_ascii_digit();
        if self.peek(0) == b'0' && matches!(self.peek(1), b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
            let (kind, ok): (&str, &dyn Fn(u8) -> bool) = match self.peek(1) {
                b'x' | b'X' => ("hexadecimal", &|c: u8| c.is_ascii_hexdigit()),
                b'o' | b'O' => ("octal", &|c: u8| (b'0'..=b'7').contains(&c)),
                _ => ("binary", &|c: u8| c == b'0' || c == b'1'),
            };
            self.i += 2;
            if self.peek(0) == b'_' {
                self.i += 1;
            }
            let n = digits(self, ok, kind)?;
            let next = self.peek(0);
            if next.is_ascii_digit() {
                return err(
                    self.i,
                    format!("invalid digit '{}' in {kind} literal", next as char),
                );
            }
            if n == 0 || self.ident_follows() {
                return err(start, format!("invalid {kind} literal"));
            }
            return Ok(());
        }
        let int_start = self.i;
        let n = digits(self, &dec, "decimal")?;
        let int_part = &self.src[int_start..self.i];
        let mut float = false;
        if self.peek(0) == b'.'
            && (n == 0
                || !self.peek(1).is_ascii_alphabetic()
                || matches!(self.peek(1), b'e' | b'E' | b'j' | b'J'))
        {
            self.i += 1;
            float = true;
            if self.peek(0).is_ascii_digit() {
                digits(self, &dec, "decimal")?;
            }
        }
        if matches!(self.peek(0), b'e' | b'E')
            && (self.peek(1).is_ascii_digit()
                || (matches!(self.peek(1), b'+' | b'-') && self.peek(2).is_ascii_digit()))
        {
            self.i += if self.peek(1).is_ascii_digit() { 1 } else { 2 };
            digits(self, &dec, "decimal")?;
            float = true;
        }
        let imaginary = matches!(self.peek(0), b'j' | b'J');
        if imaginary {
            self.i += 1;
        }
        if !float
            && !imaginary
            && int_part.len() > 1
            && int_part.starts_with('0')
            && int_part.bytes().any(|b| b != b'0' && b != b'_')
        {
            return err(
                start,
                "leading zeros in decimal integer literals are not permitted; use an 0o prefix for octal integers",
            );
        }
        if self.ident_follows() {
            return err(start, "invalid decimal literal");
        }
        Ok(())
    }

    /// Whether an identifier starts right after a number (other than the keywords that may).
    fn ident_follows(&self) -> bool {
        let rest = &self.src[self.i..];
        let Some(c) = rest.chars().next() else {
            return false;
        };
        if !ident_start(c) {
            return false;
        }
        let word: String = rest.chars().take_while(|c| ident_continue(*c)).collect();
        !NUMBER_FOLLOWERS.contains(&word.as_str())
    }
}

/// Checks the replacement fields of an f-string body (Python 3.11 rules).
fn fstring(body: &str, offset: usize, raw: bool) -> Result<(), Problem> {
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
            b'}' => return err(offset + i, "f-string: single '}' is not allowed"),
            b'{' => i = field(body, i, offset, 0)?,
            b'\\' if !raw => i += 2,
            _ => i += 1,
        }
    }
    Ok(())
}

/// One replacement field starting at `body[start] == '{'`; returns the index after its `}`.
fn field(body: &str, start: usize, offset: usize, depth: u8) -> Result<usize, Problem> {
    let b = body.as_bytes();
    if depth > 1 {
        return err(offset + start, "f-string: expressions nested too deeply");
    }
    let mut i = start + 1;
    let mut nest = 0i32;
    let mut quote: Option<u8> = None;
    // The expression part.
    let expr_end = loop {
        let Some(&c) = b.get(i) else {
            return err(offset + start, "f-string: expecting '}'");
        };
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'\'' | b'"' => quote = Some(c),
            b'\\' => {
                return err(
                    offset + i,
                    "f-string expression part cannot include a backslash",
                )
            }
            b'#' => return err(offset + i, "f-string expression part cannot include '#'"),
            b'(' | b'[' | b'{' => nest += 1,
            b')' | b']' => nest -= 1,
            b'}' if nest > 0 => nest -= 1,
            b'}' | b':' if nest == 0 => break i,
            b'!' if nest == 0 && b.get(i + 1) != Some(&b'=') => break i,
            // The `=` of a self-documenting expression, e.g. `{x=}`.
            b'=' if nest == 0
                && !matches!(b.get(i.wrapping_sub(1)), Some(b'=' | b'!' | b'<' | b'>'))
                && matches!(b.get(i + 1), Some(b'}' | b'!' | b':') | None) =>
            {
                i += 1;
                break i - 1;
            }
            _ => {}
        }
        i += 1;
    };
    let expr = &body[start + 1..expr_end];
    let expr = expr.strip_suffix('=').unwrap_or(expr);
    if expr.trim().is_empty() {
        return err(offset + start, "f-string: empty expression not allowed");
    }
    if i < b.len() && b[i] == b'=' {
        i += 1;
    }
    if b.get(i) == Some(&b'!') {
        match b.get(i + 1) {
            Some(b's' | b'r' | b'a') if matches!(b.get(i + 2), Some(b'}' | b':')) => i += 2,
            _ => {
                return err(
                    offset + i,
                    "f-string: invalid conversion character: expected 's', 'r', or 'a'",
                )
            }
        }
    }
    if b.get(i) == Some(&b':') {
        i += 1;
        // The format spec, which may hold nested fields.
        loop {
            match b.get(i) {
                None => return err(offset + start, "f-string: expecting '}'"),
                Some(b'{') => i = field(body, i, offset, depth + 1)?,
                Some(b'}') => break,
                Some(_) => i += 1,
            }
        }
    }
    match b.get(i) {
        Some(b'}') => Ok(i + 1),
        _ => err(offset + start, "f-string: expecting '}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(src: &str) -> String {
        check(src).map(|f| f.message).unwrap_or_default()
    }

    #[test]
    fn good_code_passes() {
        for src in [
            "x = 1\n",
            "def f():\n    if x:\n        return 1\n    return 2\n",
            "x = (1,\n  2)\ny = [\n]\n",
            "s = f'{x!r:>{w}} {y=} {{}} {d[\"k\"]}'\n",
            "n = 0 + 00 + 0.5 + 1e5 + 1_000 + 0x_ff + 0o17 + 0b1 + 3j + 1if x else 2\n",
            "class A: pass\n",
            "x = lambda: 1\n",
            "d = {'a': 1}\n",
            "if x:\n    pass\n# comment\n\n    # indented comment\nelse:\n    pass\n",
            "x = '''a\nb'''\n",
            "x = 1 + \\\n    2\n",
            "x = rb'\\d' + br'\\x' + b'\\x41'\n",
            "if (y := 2):\n    pass\n",
        ] {
            assert!(check(src).is_none(), "{src:?}: {:?}", check(src));
        }
    }

    #[test]
    fn tokenizer_errors() {
        assert!(bad("def f():\n    x = 1\n  y = 2\n").contains("unindent"));
        assert!(bad("x = 1\n    y = 2\n").contains("unexpected indent"));
        assert!(bad("def f():\n        x = 1\n\ty = 2\n").contains("TabError"));
        assert!(bad("x = (1]\n").contains("does not match"));
        assert!(bad("x = 1)\n").contains("unmatched"));
        assert!(bad("x = 0777\n").contains("leading zeros"));
        assert!(bad("x = 0b102\n").contains("binary"));
        assert!(bad("x = 10L\n").contains("decimal"));
        assert!(bad("x = ur'a'\n").contains("prefix"));
        assert!(bad("x = f'{}'\n").contains("empty expression"));
        assert!(bad("x = f'{y!z}'\n").contains("conversion"));
        assert!(bad("x = f'a}b'\n").contains("single '}'"));
        assert!(bad("x = '\\x4'\n").contains("escape"));
        assert!(bad("x = \u{2018}a\u{2019}\n").contains("U+2018"));
        assert!(bad("x =\u{a0}1\n").contains("U+00A0"));
        let f = check("x = (\n").unwrap();
        assert_eq!(f.category, Category::Truncated);
        let f = check("x = (1,\ny = 2\n").unwrap();
        assert_eq!(f.category, Category::SyntaxError, "{f:?}");
    }
}
