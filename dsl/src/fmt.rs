//! fmt: the canonical layout of `.arch` source, behind `flashc fmt`.
//!
//! `format_source` parses the text and prints the ast in one layout: `model NAME {`, items two spaces
//! deeper per level, one item per line, spaces around `=` and binary operators, `f(a = 1, b = 2)`,
//! `[a, b]`; literals and names exactly as written and parentheses exactly where the author put them
//! (the ast keeps both). An item whose one-line form is wider than `MAX_WIDTH` and whose value is a
//! call or a list is broken one argument or element per line, with a trailing comma.
//!
//! Comments are not in the ast (pest drops them), so they are found by scanning the source and put
//! back by position: a comment that starts on the line where an item (or a `{`, or a comment trailing
//! it) ends trails it, two spaces after it; any other comment gets a line of its own before the next
//! item (or before the `}`). An item with a comment inside it is printed as written, its continuation
//! lines stripped of their common indentation and re-indented at the item's (for a model or section,
//! only the header up to `{` is), so no comment is ever lost or moved. Where the author left one or
//! more blank lines between items or comments, one blank line is kept; models are always one blank
//! line apart.
//!
//! Invariants:
//! - formatting is idempotent: `format(format(x)) == format(x)`;
//! - the output parses to the same ast as the input, spans aside; `format_source` checks this before
//!   returning, so a bug here shows up as an error, never as a changed model;
//! - no input makes it panic: text that does not parse gives the parser's diagnostics.

use crate::ast::{Arg, Expr, ExprKind, File, Item, ItemKind, Model};
use crate::diag::{Code, Diagnostic, Span};
use crate::parser;

/// Widest line the formatter produces by choice (in characters, indentation included). Only items
/// whose value is a call or a list are broken to fit; other long items stay on one line.
pub const MAX_WIDTH: usize = 100;

/// Spaces per nesting level.
const INDENT: usize = 2;

/// Formats `.arch` source text into its canonical layout, comments kept.
///
/// Returns the parser's diagnostics when `source` does not parse.
pub fn format_source(source: &str) -> Result<String, Vec<Diagnostic>> {
    let file = parser::parse(source)?;
    let text = Printer::new(source).file(&file);
    if text.len() > parser::MAX_SOURCE_BYTES {
        return Err(vec![
            Diagnostic::error(
                Code::TooLarge,
                Span::default(),
                format!("the formatted file would be too large ({} bytes)", text.len()),
            )
            .with_note(format!("flashc reads model files of at most {} bytes", parser::MAX_SOURCE_BYTES)),
        ]);
    }
    match parser::parse(&text) {
        Ok(again) if same_ast(&file, &again) => Ok(text),
        _ => Err(vec![
            Diagnostic::error(
                Code::Syntax,
                Span::default(),
                "internal error: the formatted text would not mean the same as the original",
            )
            .with_note("this is a bug in `flashc fmt`; the file was left as it was"),
        ]),
    }
}

/// Whether two asts are the same model text, spans aside: same items, names, literals as written,
/// operators and parentheses.
pub fn same_ast(a: &File, b: &File) -> bool {
    a.models.len() == b.models.len() && a.models.iter().zip(&b.models).all(|(x, y)| same_model(x, y))
}

fn same_model(a: &Model, b: &Model) -> bool {
    a.name.name == b.name.name && same_items(&a.items, &b.items)
}

fn same_items(a: &[Item], b: &[Item]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_item(x, y))
}

fn same_item(a: &Item, b: &Item) -> bool {
    use ItemKind::*;
    match (&a.kind, &b.kind) {
        (Let { name: n1, value: v1 }, Let { name: n2, value: v2 })
        | (Op { name: n1, value: v1 }, Op { name: n2, value: v2 })
        | (Block { name: n1, value: v1 }, Block { name: n2, value: v2 })
        | (Setting { key: n1, value: v1 }, Setting { key: n2, value: v2 }) => n1.name == n2.name && same_expr(v1, v2),
        (Section { name: n1, items: i1 }, Section { name: n2, items: i2 }) => n1.name == n2.name && same_items(i1, i2),
        _ => false,
    }
}

fn same_expr(a: &Expr, b: &Expr) -> bool {
    use ExprKind::*;
    match (&a.kind, &b.kind) {
        (Number(x), Number(y)) | (Str(x), Str(y)) => x == y,
        (Bool(x), Bool(y)) => x == y,
        (Name(x), Name(y)) => x.name == y.name,
        (Call { callee: c1, args: a1 }, Call { callee: c2, args: a2 }) => {
            c1.name == c2.name && a1.len() == a2.len() && a1.iter().zip(a2).all(|(x, y)| same_arg(x, y))
        }
        (List(x), List(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_expr(p, q)),
        (Binary { op: o1, lhs: l1, rhs: r1 }, Binary { op: o2, lhs: l2, rhs: r2 }) => {
            o1 == o2 && same_expr(l1, l2) && same_expr(r1, r2)
        }
        (Neg(x), Neg(y)) | (Paren(x), Paren(y)) => same_expr(x, y),
        _ => false,
    }
}

fn same_arg(a: &Arg, b: &Arg) -> bool {
    a.name.as_ref().map(|n| &n.name) == b.name.as_ref().map(|n| &n.name) && same_expr(&a.value, &b.value)
}

/// A `//` or `/* */` comment: its bytes in the source (a line comment without its trailing
/// whitespace and newline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Comment {
    start: usize,
    end: usize,
}

/// Every comment of `source`, in order, skipping string literals. On text that parses, this finds
/// exactly the comments pest skipped: strings cannot span lines and hold no escapes.
fn scan_comments(source: &str) -> Vec<Comment> {
    let bytes = source.as_bytes();
    let mut comments = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
                i += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                let start = i;
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                let text = source.get(start..i).unwrap_or("");
                comments.push(Comment { start, end: start + text.trim_end().len() });
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let start = i;
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                comments.push(Comment { start, end: i });
            }
            _ => i += 1,
        }
    }
    comments
}

/// The nodes of one sequence: the models of a file, or the items of a model or section body.
#[derive(Clone, Copy)]
enum Nodes<'a> {
    Models(&'a [Model]),
    Items(&'a [Item]),
}

impl Nodes<'_> {
    fn spans(self) -> Vec<Span> {
        match self {
            Nodes::Models(models) => models.iter().map(|m| m.span).collect(),
            Nodes::Items(items) => items.iter().map(item_span).collect(),
        }
    }
}

/// The span of an item from its first token to its last. The parser's item span also covers the
/// whitespace and comments after a `let`, `op`, `block` or setting (pest keeps the implicit skip in
/// front of the empty operator repetition that ends `expr`); the value's span does not.
fn item_span(item: &Item) -> Span {
    match &item.kind {
        ItemKind::Let { value, .. }
        | ItemKind::Op { value, .. }
        | ItemKind::Block { value, .. }
        | ItemKind::Setting { value, .. } => Span::new(item.span.start, value.span.end.max(item.span.start)),
        ItemKind::Section { .. } => item.span,
    }
}

/// One line-level element of a sequence: a node with the comments that trail it on its last line, or
/// a comment on its own.
enum Entry {
    Node { index: usize, trailing: Vec<Comment> },
    Comment(Comment),
}

impl Entry {
    fn start(&self, spans: &[Span]) -> usize {
        match self {
            Entry::Node { index, .. } => spans.get(*index).map_or(0, |s| s.start),
            Entry::Comment(c) => c.start,
        }
    }

    fn end(&self, spans: &[Span]) -> usize {
        match self {
            Entry::Node { index, trailing } => {
                trailing.last().map_or_else(|| spans.get(*index).map_or(0, |s| s.end), |c| c.end)
            }
            Entry::Comment(c) => c.end,
        }
    }
}

struct Printer<'s> {
    src: &'s str,
    comments: Vec<Comment>,
    /// Byte offset at which each line starts.
    line_starts: Vec<usize>,
    out: String,
}

impl<'s> Printer<'s> {
    fn new(src: &'s str) -> Printer<'s> {
        let mut line_starts = vec![0];
        line_starts.extend(src.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i + 1));
        Printer { src, comments: scan_comments(src), line_starts, out: String::new() }
    }

    fn text(&self, start: usize, end: usize) -> &'s str {
        self.src.get(start..end).unwrap_or("")
    }

    fn line(&self, pos: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= pos).saturating_sub(1)
    }

    /// Column of `pos` in the source, in characters.
    fn column(&self, pos: usize) -> usize {
        let start = self.line_starts.get(self.line(pos)).copied().unwrap_or(0);
        self.text(start, pos).chars().count()
    }

    /// Column at which the next character of the output goes, in characters.
    fn out_column(&self) -> usize {
        let start = self.out.rfind('\n').map_or(0, |i| i + 1);
        self.out[start..].chars().count()
    }

    /// The comments that start in `start..end`.
    fn comments_in(&self, start: usize, end: usize) -> Vec<Comment> {
        let lo = self.comments.partition_point(|c| c.start < start);
        let hi = self.comments.partition_point(|c| c.start < end);
        self.comments.get(lo..hi).map(<[Comment]>::to_vec).unwrap_or_default()
    }

    fn has_comments(&self, start: usize, end: usize) -> bool {
        let lo = self.comments.partition_point(|c| c.start < start);
        self.comments.get(lo).is_some_and(|c| c.start < end)
    }

    /// Whether the author left a blank line between `end` and `start` (only whitespace lies there).
    fn blank_between(&self, end: usize, start: usize) -> bool {
        end < start && self.text(end, start).bytes().filter(|&b| b == b'\n').count() >= 2
    }

    fn spaces(&mut self, n: usize) {
        self.out.extend(std::iter::repeat_n(' ', n));
    }

    /// The position of the `{` that opens a body, searching from `from` (after the name) past
    /// whitespace and comments.
    fn find_open(&self, from: usize, end: usize) -> Option<usize> {
        let bytes = self.src.as_bytes();
        let mut i = from;
        while i < end {
            match bytes.get(i)? {
                b'{' => return Some(i),
                b' ' | b'\t' | b'\r' | b'\n' => i += 1,
                b'/' => i = self.comments.iter().find(|c| c.start == i)?.end,
                _ => return None,
            }
        }
        None
    }

    fn file(mut self, file: &File) -> String {
        let comments = self.comments.clone();
        self.sequence(Nodes::Models(&file.models), &comments, 0);
        self.out
    }

    /// Prints nodes and the loose comments among them, one entry per line, at `indent`.
    fn sequence(&mut self, nodes: Nodes<'_>, comments: &[Comment], indent: usize) {
        let spans = nodes.spans();
        let entries = self.entries(&spans, comments);
        let mut prev: Option<(usize, bool)> = None;
        for entry in &entries {
            let is_node = matches!(entry, Entry::Node { .. });
            if let Some((end, prev_node)) = prev {
                let models_apart = prev_node && is_node && matches!(nodes, Nodes::Models(_));
                if models_apart || self.blank_between(end, entry.start(&spans)) {
                    self.out.push('\n');
                }
            }
            self.spaces(indent);
            match entry {
                Entry::Node { index, trailing } => {
                    match nodes {
                        Nodes::Models(models) => {
                            if let Some(m) = models.get(*index) {
                                self.model(m, indent);
                            }
                        }
                        Nodes::Items(items) => {
                            if let Some(item) = items.get(*index) {
                                self.item(item, indent);
                            }
                        }
                    }
                    for c in trailing {
                        self.out.push_str("  ");
                        self.comment(*c);
                    }
                }
                Entry::Comment(c) => self.comment(*c),
            }
            self.out.push('\n');
            prev = Some((entry.end(&spans), is_node));
        }
    }

    /// Splits a sequence into entries. Comments inside a node belong to the node and are skipped;
    /// a comment that starts on the line where the previous node (or a comment trailing it) ends
    /// trails that node.
    fn entries(&self, spans: &[Span], comments: &[Comment]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut next = 0;
        for (index, span) in spans.iter().enumerate() {
            while let Some(c) = comments.get(next).filter(|c| c.start < span.start) {
                self.loose(&mut entries, spans, *c);
                next += 1;
            }
            entries.push(Entry::Node { index, trailing: Vec::new() });
            while comments.get(next).is_some_and(|c| c.start < span.end) {
                next += 1;
            }
        }
        for c in comments.get(next..).unwrap_or(&[]) {
            self.loose(&mut entries, spans, *c);
        }
        entries
    }

    fn loose(&self, entries: &mut Vec<Entry>, spans: &[Span], c: Comment) {
        if let Some(last @ Entry::Node { .. }) = entries.last_mut() {
            let end = last.end(spans).saturating_sub(1);
            if self.line(c.start) == self.line(end)
                && let Entry::Node { trailing, .. } = last
            {
                trailing.push(c);
                return;
            }
        }
        entries.push(Entry::Comment(c));
    }

    /// Prints a comment where the output stands. Its continuation lines (of a `/* */` comment) move
    /// by as many columns as its first line moved, so their alignment with it is kept.
    fn comment(&mut self, c: Comment) {
        let text = self.text(c.start, c.end);
        let shift = self.out_column() as isize - self.column(c.start) as isize;
        for (i, line) in text.split('\n').enumerate() {
            let line = line.trim_end();
            if i > 0 {
                self.out.push('\n');
                if line.is_empty() {
                    continue;
                }
                let lead = leading_whitespace(line);
                self.spaces((lead as isize + shift).max(0) as usize);
                self.out.push_str(&line[lead..]);
            } else {
                self.out.push_str(line);
            }
        }
    }

    /// Prints source text as written: the first line where the output stands, the continuation lines
    /// without their common indentation, at `indent`. Trailing whitespace is dropped (it is never
    /// inside a string: strings do not span lines).
    fn verbatim(&mut self, start: usize, end: usize, indent: usize) {
        let text = self.text(start, end);
        let common = text.split('\n').skip(1).filter(|l| !l.trim().is_empty()).map(leading_whitespace).min();
        let common = common.unwrap_or(0);
        for (i, line) in text.split('\n').enumerate() {
            let line = line.trim_end();
            if i > 0 {
                self.out.push('\n');
                if line.is_empty() {
                    continue;
                }
                self.spaces(indent);
                self.out.push_str(line.get(common..).unwrap_or(line));
            } else {
                self.out.push_str(line);
            }
        }
    }

    fn model(&mut self, m: &Model, indent: usize) {
        let close = m.span.end.saturating_sub(1);
        let Some(open) = self.find_open(m.name.span.end, close).filter(|_| self.text(close, m.span.end) == "}") else {
            self.verbatim(m.span.start, m.span.end, indent);
            return;
        };
        if self.has_comments(m.span.start, open) {
            self.verbatim(m.span.start, open + 1, indent);
        } else {
            self.out.push_str("model ");
            self.out.push_str(&m.name.name);
            self.out.push_str(" {");
        }
        self.body(&m.items, open, close, indent);
    }

    /// Prints a body after its `{` (already printed), through its `}`.
    fn body(&mut self, items: &[Item], open: usize, close: usize, indent: usize) {
        let comments = self.comments_in(open + 1, close);
        let first = items.first().map_or(close, |i| i.span.start);
        let mut line = self.line(open);
        let head = comments
            .iter()
            .take_while(|c| {
                let trails = c.start < first && self.line(c.start) == line;
                line = self.line(c.end.saturating_sub(1));
                trails
            })
            .count();
        let (head, rest) = comments.split_at(head);
        for c in head {
            self.out.push_str("  ");
            self.comment(*c);
        }
        if items.is_empty() && rest.is_empty() && head.is_empty() {
            self.out.push('}');
            return;
        }
        self.out.push('\n');
        self.sequence(Nodes::Items(items), rest, indent + INDENT);
        self.spaces(indent);
        self.out.push('}');
    }

    fn item(&mut self, item: &Item, indent: usize) {
        let span = item_span(item);
        let (prefix, value) = match &item.kind {
            ItemKind::Section { name, items } => {
                let close = span.end.saturating_sub(1);
                let open = self.find_open(name.span.end, close).filter(|_| self.text(close, span.end) == "}");
                let Some(open) = open else {
                    self.verbatim(span.start, span.end, indent);
                    return;
                };
                if self.has_comments(span.start, open) {
                    self.verbatim(span.start, open + 1, indent);
                } else {
                    self.out.push_str(&name.name);
                    self.out.push_str(" {");
                }
                self.body(items, open, close, indent);
                return;
            }
            ItemKind::Let { name, value } => (format!("let {} = ", name.name), value),
            ItemKind::Op { name, value } => (format!("op {} = ", name.name), value),
            ItemKind::Block { name, value } => (format!("block {} = ", name.name), value),
            ItemKind::Setting { key, value } => (format!("{} = ", key.name), value),
        };
        if self.has_comments(span.start, span.end) {
            self.verbatim(span.start, span.end, indent);
            return;
        }
        let mut line = prefix.clone();
        expr(value, &mut line);
        if indent + line.chars().count() > MAX_WIDTH
            && let Some(broken) = broken(&prefix, value, indent)
        {
            self.out.push_str(&broken);
        } else {
            self.out.push_str(&line);
        }
    }
}

fn leading_whitespace(line: &str) -> usize {
    line.bytes().take_while(|&b| b == b' ' || b == b'\t').count()
}

/// An item whose value is a non-empty call or list, one argument or element per line.
fn broken(prefix: &str, value: &Expr, indent: usize) -> Option<String> {
    let mut parts = Vec::new();
    let (open, close) = match &value.kind {
        ExprKind::Call { callee, args } if !args.is_empty() => {
            for a in args {
                let mut s = String::new();
                arg(a, &mut s);
                parts.push(s);
            }
            (format!("{}(", callee.name), ")")
        }
        ExprKind::List(elems) if !elems.is_empty() => {
            for e in elems {
                let mut s = String::new();
                expr(e, &mut s);
                parts.push(s);
            }
            ("[".to_string(), "]")
        }
        _ => return None,
    };
    let pad = " ".repeat(indent + INDENT);
    let mut s = format!("{prefix}{open}\n");
    for p in parts {
        s.push_str(&pad);
        s.push_str(&p);
        s.push_str(",\n");
    }
    s.push_str(&" ".repeat(indent));
    s.push_str(close);
    Some(s)
}

/// Prints an expression on one line.
fn expr(e: &Expr, out: &mut String) {
    match &e.kind {
        ExprKind::Number(n) => out.push_str(n),
        ExprKind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        ExprKind::Str(s) => {
            out.push('"');
            out.push_str(s);
            out.push('"');
        }
        ExprKind::Name(n) => out.push_str(&n.name),
        ExprKind::Call { callee, args } => {
            out.push_str(&callee.name);
            out.push('(');
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                arg(a, out);
            }
            out.push(')');
        }
        ExprKind::List(elems) => {
            out.push('[');
            for (i, x) in elems.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                expr(x, out);
            }
            out.push(']');
        }
        ExprKind::Binary { op, lhs, rhs } => {
            expr(lhs, out);
            out.push(' ');
            out.push_str(op.symbol());
            out.push(' ');
            expr(rhs, out);
        }
        ExprKind::Neg(x) => {
            out.push('-');
            if matches!(x.kind, ExprKind::Neg(_)) {
                // `- -x`, not `--x`.
                out.push(' ');
            }
            expr(x, out);
        }
        ExprKind::Paren(x) => {
            out.push('(');
            expr(x, out);
            out.push(')');
        }
    }
}

fn arg(a: &Arg, out: &mut String) {
    if let Some(name) = &a.name {
        out.push_str(&name.name);
        out.push_str(" = ");
    }
    expr(&a.value, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats `src` and checks the invariants: the ast is kept, a second pass changes nothing, no
    /// comment is lost, no trailing whitespace, one final newline.
    fn check(src: &str) -> String {
        let out = match format_source(src) {
            Ok(out) => out,
            Err(e) => panic!("format failed: {e:?}\n--- input ---\n{src}"),
        };
        let before = parser::parse(src).unwrap();
        let after = parser::parse(&out).unwrap_or_else(|e| panic!("output does not parse: {e:?}\n{out}"));
        assert!(same_ast(&before, &after), "ast changed\n--- input ---\n{src}\n--- output ---\n{out}");
        let twice = format_source(&out).unwrap();
        assert_eq!(out, twice, "not idempotent\n--- input ---\n{src}");
        let squash = |s: &str| -> Vec<String> {
            scan_comments(s)
                .iter()
                .map(|c| s[c.start..c.end].chars().filter(|ch| !ch.is_whitespace()).collect())
                .collect()
        };
        assert_eq!(squash(src), squash(&out), "comments changed\n--- output ---\n{out}");
        for line in out.lines() {
            assert_eq!(line, line.trim_end(), "trailing whitespace in {line:?}");
        }
        assert!(out.is_empty() || (out.ends_with('\n') && !out.ends_with("\n\n")), "{out:?}");
        out
    }

    const MESSY: &str = "\
// Header comment.

model   tiny{
vocab=32000   // tokens
  hidden =   512
let heads=8


  // attention
op A=attention( heads=heads,kv_heads = 2 , head_dim=64,rope=rope( theta=10000 ) )
op F = ffn(inner=(hidden+hidden/2)*2, act=swiglu)
  op M2 = mamba2(state = 128, expand = 2, head_dim = 64, groups = 1, conv = 4, chunk = 256, norm = rmsnorm(eps = 1e-6))
block B=[A,F]  block C = [ M2 ,F ]
  let lr = -3e-4
layers = [
    B,   // first
    C
  ]*2++[B]
  train {  // training
     lr=   lr
     betas=[0.9,0.95]
     /* both */ warmup = 1_000   }
  /* end of body */

}
// after
";

    const MESSY_FORMATTED: &str = "\
// Header comment.

model tiny {
  vocab = 32000  // tokens
  hidden = 512
  let heads = 8

  // attention
  op A = attention(heads = heads, kv_heads = 2, head_dim = 64, rope = rope(theta = 10000))
  op F = ffn(inner = (hidden + hidden / 2) * 2, act = swiglu)
  op M2 = mamba2(
    state = 128,
    expand = 2,
    head_dim = 64,
    groups = 1,
    conv = 4,
    chunk = 256,
    norm = rmsnorm(eps = 1e-6),
  )
  block B = [A, F]
  block C = [M2, F]
  let lr = -3e-4
  layers = [
    B,   // first
    C
  ]*2++[B]
  train {  // training
    lr = lr
    betas = [0.9, 0.95]
    /* both */
    warmup = 1_000
  }
  /* end of body */
}
// after
";

    #[test]
    fn messy_input_gets_the_canonical_layout() {
        let out = check(MESSY);
        assert_eq!(out, MESSY_FORMATTED, "\n{out}");
        assert_eq!(check(MESSY_FORMATTED), MESSY_FORMATTED);
    }

    #[test]
    fn inputs_keep_their_meaning_and_settle() {
        let inputs = [
            "",
            "// only a comment\n",
            "/* a */ /* b */\n\n\n// c",
            "model m{}",
            "model m {\n}\n",
            "model m { // on the brace\n}",
            "model m {\n  // inside only\n\n}",
            "model m { /* x */ }",
            "model m { a = 1 } model n { b = 2 }",
            "model m { a = 1 }\n// between\nmodel n { b = 2 } // after n",
            "model /* odd */ m\n{ x = 1 }",
            "model m { x=1 y=2 z=3 }",
            "model m {\n\n\n  x = 1\n\n\n\n  y = 2\n\n\n}\n\n\n",
            "model m { x = (1 + 2) * 3 - -4 / (5) y = ((a)) z = - - 1 w = -(a + b) }",
            "model m { layers = [B1,B2]*2++[B1]++ ([B2] * 3) }",
            "model m { s = \"a // not a comment /* nor this */\" t = \"\" u = true v = false }",
            "model m { n = 1_000.5e+3 k = 0.000_1 e = 1E9 }",
            "model m { x = f() y = [] z = g(1, 2, a = [3,], ) }",
            "model m { train { lr = 1e-3 sched { kind = cosine } } }",
            "model m {\n  train // why\n  {\n    lr = 1\n  }\n}",
            "model m {\n  x = 1 /* a */ /* b */ // c\n  y = 2 /* long\n       comment */ // d\n}",
            "model m {\n    /*\n     * boxed\n     */\n    x = 1\n}",
            "model m {\n  layers = [ // first line\n    A,\n\n    B, /* two */ C,\n  ] ++ [D]\n}",
            "model m {\n\tlet   x =\t[1,\n\t\t2, // tab\n\t3]\n}",
            "model m { let x = 1 /* in the middle */ + 2 }",
            "model m {\r\n  x = 1 // crlf\r\n\r\n  y = 2\r\n}\r\n",
            "model m { op A = attention(heads = heads, kv_heads = 4, head_dim = 128, rope = rope(theta = 10000)) }",
            "model m { layers = [aaaaaaaaaaaa, bbbbbbbbbbbbbbbb, cccccccccccccccc, dddddddddddddddd, eeeeeeeeeeeeeeee, ffff] }",
            "model m { x = [aaaaaaaaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbbbbbbbbbbbb] ++ [cccccccccccccccccccccccccccccccccccccccc] }",
            "model m { s { t { u { v = f(aaaaaaaaaaaaaaaaaaaa = 1, bbbbbbbbbbbbbbbbbbbbbbbbbbb = 2, cccccccccccccccc = 3) } } } }",
            "model m { x = fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff() }",
            "model m { x = 1 } // after, same line\n\n\n// and at the end\n\n",
            "// before\n\n\n// before, again\nmodel m {\n  x = 1 // t\n  // end\n}",
        ];
        for src in inputs {
            check(src);
        }
    }

    #[test]
    fn long_items_are_broken_at_the_outermost_call_or_list() {
        let out = check(
            "model m {\n  train {\n    opt = adamw(lr = 0.001, betas = [0.9, 0.95], weight_decay = 0.1, eps = 1e-8, clip = 1.0, schedule = cosine)\n  }\n}",
        );
        let expected = "\
model m {
  train {
    opt = adamw(
      lr = 0.001,
      betas = [0.9, 0.95],
      weight_decay = 0.1,
      eps = 1e-8,
      clip = 1.0,
      schedule = cosine,
    )
  }
}
";
        assert_eq!(out, expected);
        let list = format!("model m {{ layers = [{}] // t\n}}", vec!["Block1"; 14].join(", "));
        let out = check(&list);
        assert!(out.contains("  layers = [\n    Block1,\n"), "{out}");
        assert!(out.contains("\n  ]  // t\n}"), "{out}");
        for line in out.lines() {
            assert!(line.chars().count() <= MAX_WIDTH, "{line}");
        }
        // A value that is not a call or a list stays on one line, however long.
        let out = check(&format!("model m {{ x = {} }}", vec!["a"; 40].join(" + ")));
        assert_eq!(out.lines().count(), 3);
    }

    #[test]
    fn comments_inside_an_item_keep_it_as_written() {
        let out = check("model m {\n      layers = [\n          A, // one\n          B\n      ]\n  x = 1\n}");
        assert_eq!(out, "model m {\n  layers = [\n      A, // one\n      B\n  ]\n  x = 1\n}\n");
    }

    #[test]
    fn comments_in_strings_are_not_comments() {
        let out = check("model m{s=\"//x\"   t=\"/*\"}");
        assert_eq!(out, "model m {\n  s = \"//x\"\n  t = \"/*\"\n}\n");
    }

    #[test]
    fn syntax_errors_are_the_parsers() {
        let src = "model m {\n  hidden: 2048\n}";
        let err = format_source(src).unwrap_err();
        assert_eq!(err, parser::parse(src).unwrap_err());
        assert!(format_source("model m { x = [1, 2 }").is_err());
        assert!(format_source("model m { x = 1 /* open }").is_err());
    }

    #[test]
    fn deep_input_is_fine() {
        let depth = parser::MAX_DEPTH - 2;
        let mut src = format!("model m {{ y = {}1{}", "(".repeat(depth), ")".repeat(depth));
        for i in 0..depth {
            src.push_str(&format!(" s{i} {{"));
        }
        src.push_str(&format!(" x = {}", vec!["1"; 200].join("+")));
        src.push_str(&" }".repeat(depth + 1));
        let out = check(&src);
        assert!(out.contains(&format!("\n{}x = 1 + 1 + ", " ".repeat(2 * (depth + 1)))), "{out}");
    }

    #[test]
    fn same_ast_ignores_only_spans() {
        let a = parser::parse("model m { x = (1 + 2) * 3 }").unwrap();
        let b = parser::parse("model m {\n  x = (1+2)*3\n}").unwrap();
        assert!(same_ast(&a, &b));
        for other in ["model m { x = 1 + 2 * 3 }", "model m { x = (1 + 2) * 3.0 }", "model n { x = (1 + 2) * 3 }"] {
            assert!(!same_ast(&a, &parser::parse(other).unwrap()), "{other}");
        }
    }

    /// Every whitespace run outside strings and comments, and the empty place after each bracket,
    /// comma and `=` not followed by whitespace: byte ranges, and whether the place ends a line comment
    /// (so must keep a newline).
    fn gaps(src: &str) -> Vec<(usize, usize, bool)> {
        let comments = scan_comments(src);
        let bytes = src.as_bytes();
        let mut gaps = Vec::new();
        let mut in_string = false;
        let mut i = 0;
        while i < bytes.len() {
            if let Some(c) = comments.iter().find(|c| c.start == i).filter(|_| !in_string) {
                i = c.end;
                continue;
            }
            match bytes[i] {
                b'"' => in_string = !in_string,
                b' ' | b'\t' | b'\n' | b'\r' if !in_string => {
                    let start = i;
                    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
                        i += 1;
                    }
                    let after_line_comment =
                        comments.iter().any(|c| c.end == start && src[c.start..].starts_with("//"));
                    gaps.push((start, i, after_line_comment));
                    continue;
                }
                b'(' | b')' | b'[' | b']' | b'{' | b'}' | b',' | b'='
                    if !in_string && !matches!(bytes.get(i + 1), Some(b' ' | b'\t' | b'\n' | b'\r')) =>
                {
                    gaps.push((i + 1, i + 1, false));
                }
                _ => {}
            }
            i += 1;
        }
        gaps
    }

    #[test]
    fn comments_and_spacing_anywhere_settle() {
        const FILLS: [&str; 10] = [
            " ",
            "\n",
            "\n\n\n",
            "\t ",
            " /* c */ ",
            "\n// line\n",
            " // trailing\n",
            "\n\n  /* two\n     lines */\n",
            "/*a*//*b*/",
            "\n   ",
        ];
        let sources = [
            MESSY,
            "model m { let x = -(1 + 2) * 3 op A = attention(heads = x, rope = rope(theta = 1e4)) \
             layers = [A, A] * 2 ++ [A] train { lr = 1e-3 betas = [0.9, 0.95] sched { k = \"a b\" } } }",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize
        };
        for src in sources {
            let gaps = gaps(src);
            for _ in 0..150 {
                let mut variant = String::new();
                let mut at = 0;
                for &(start, end, after_line_comment) in &gaps {
                    variant.push_str(&src[at..start]);
                    if after_line_comment {
                        variant.push('\n');
                    }
                    variant.push_str(FILLS[next() % FILLS.len()]);
                    at = end;
                }
                variant.push_str(&src[at..]);
                check(&variant);
            }
        }
    }

    fn arch_files(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                arch_files(&path, found);
            } else if path.extension().is_some_and(|e| e == "arch") {
                found.push(path);
            }
        }
    }

    #[test]
    fn every_example_formats_idempotently() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut files = Vec::new();
        arch_files(&dir, &mut files);
        files.sort();
        assert!(!files.is_empty(), "no .arch files under {}", dir.display());
        for path in files {
            let src = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = parser::parse(&src) {
                // An example of a syntax error: the formatter reports it and changes nothing.
                assert_eq!(format_source(&src).unwrap_err(), e, "{}", path.display());
                continue;
            }
            check(&src);
        }
    }
}
