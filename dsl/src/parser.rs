//! parser: `.arch` text → ast, with syntax errors in human words.
//!
//! This is the only module that names pest's `Rule`. Before pest runs, the input is checked for size
//! and bracket depth so no input can exhaust the stack; after it, the parse tree is turned into the
//! `ast` (iteratively along operator chains, with a depth limit on the result).

use std::collections::BTreeSet;
use std::num::NonZeroUsize;

use pest::Parser as _;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;

use crate::ast::{Arg, BinOp, Expr, ExprKind, File, Ident, Item, ItemKind, Model};
use crate::diag::{Code, Diagnostic, Span};

#[derive(pest_derive::Parser)]
#[grammar = "arch.pest"]
struct ArchParser;

/// Largest accepted source, in bytes.
pub const MAX_SOURCE_BYTES: usize = 4 << 20;
/// Deepest accepted nesting of brackets, and of operators within one expression.
pub const MAX_DEPTH: usize = 32;
/// Longest accepted operator chain in one expression (`a + b + c ...`).
pub const MAX_CHAIN: usize = 512;
/// Deepest accepted expression tree (operator chains nest one level per operator).
pub const MAX_EXPR_DEPTH: usize = 640;

/// Parses raw bytes: checks size and UTF-8 first.
pub fn parse_bytes(bytes: &[u8]) -> Result<File, Vec<Diagnostic>> {
    if bytes.len() > MAX_SOURCE_BYTES {
        return Err(vec![too_large(bytes.len())]);
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(text),
        Err(e) => {
            let at = e.valid_up_to();
            Err(vec![
                Diagnostic::error(Code::NotUtf8, Span::new(at, at), "the file is not valid UTF-8")
                    .with_note(format!("the first invalid byte is at offset {at}")),
            ])
        }
    }
}

/// Parses `.arch` source text into an ast.
pub fn parse(source: &str) -> Result<File, Vec<Diagnostic>> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(vec![too_large(source.len())]);
    }
    check_depth(source)?;
    pest::set_call_limit(NonZeroUsize::new(50_000_000));
    pest::set_error_detail(true);
    let mut pairs = ArchParser::parse(Rule::file, source).map_err(|e| {
        // pest stops with a custom error when its call budget runs out: the input is too complex to
        // parse, not wrong at the place pest stopped.
        if let ErrorVariant::CustomError { message } = &e.variant
            && message.contains("call limit")
        {
            return vec![
                Diagnostic::global(Code::TooDeep, "the file is too complex to parse")
                    .with_note("shorten very long expressions or split them into `let` bindings"),
            ];
        }
        vec![syntax_error(source, &e)]
    })?;
    let Some(file) = pairs.next() else {
        return Ok(File { models: Vec::new() });
    };
    let mut models = Vec::new();
    for pair in file.into_inner() {
        if pair.as_rule() == Rule::model {
            models.push(build_model(pair)?);
        }
    }
    Ok(File { models })
}

fn too_large(len: usize) -> Diagnostic {
    Diagnostic::global(Code::TooLarge, format!("the file is too large ({len} bytes)"))
        .with_note(format!("flashc reads model files of at most {MAX_SOURCE_BYTES} bytes"))
}

/// Rejects inputs nested deeper than `MAX_DEPTH` before the recursive-descent parser sees them.
fn check_depth(source: &str) -> Result<(), Vec<Diagnostic>> {
    let bytes = source.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(vec![
                        Diagnostic::error(Code::TooDeep, Span::new(i, i + 1), "brackets are nested too deeply")
                            .with_label(format!("this is nesting level {depth}"))
                            .with_note(format!("flashc accepts at most {MAX_DEPTH} levels of nesting")),
                    ]);
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn span_of(pair: &Pair<'_, Rule>) -> Span {
    let s = pair.as_span();
    Span::new(s.start(), s.end())
}

fn ident(pair: Pair<'_, Rule>) -> Ident {
    Ident { name: pair.as_str().to_string(), span: span_of(&pair) }
}

/// An internal inconsistency between the grammar and this builder: reported, never a panic.
fn grammar_bug(pair: &Pair<'_, Rule>) -> Vec<Diagnostic> {
    vec![Diagnostic::error(
        Code::Syntax,
        span_of(pair),
        format!("internal error: unexpected {:?} in the parse tree", pair.as_rule()),
    )]
}

fn build_model(pair: Pair<'_, Rule>) -> Result<Model, Vec<Diagnostic>> {
    let span = span_of(&pair);
    let mut inner = pair.into_inner();
    let _kw = inner.next();
    let name = match inner.next() {
        Some(p) => ident(p),
        None => return Err(vec![Diagnostic::error(Code::Syntax, span, "internal error: model without a name")]),
    };
    let items = inner.map(build_item).collect::<Result<Vec<_>, _>>()?;
    Ok(Model { name, items, span })
}

fn build_item(pair: Pair<'_, Rule>) -> Result<Item, Vec<Diagnostic>> {
    let span = span_of(&pair);
    let rule = pair.as_rule();
    let mut parts: Vec<Pair<'_, Rule>> = pair
        .clone()
        .into_inner()
        .filter(|p| !matches!(p.as_rule(), Rule::kw_let | Rule::kw_op | Rule::kw_block))
        .collect();
    if parts.is_empty() {
        return Err(grammar_bug(&pair));
    }
    let name = ident(parts.remove(0));
    let mut span = span;
    let kind = if rule == Rule::section {
        let items = parts.into_iter().map(build_item).collect::<Result<Vec<_>, _>>()?;
        ItemKind::Section { name, items }
    } else {
        let Some(value) = parts.pop() else { return Err(grammar_bug(&pair)) };
        let value = build_expr(value)?;
        // pest's implicit whitespace after the value belongs to no item: end the item at its value.
        span = Span::new(span.start, value.span.end);
        match rule {
            Rule::let_item => ItemKind::Let { name, value },
            Rule::op_item => ItemKind::Op { name, value },
            Rule::block_item => ItemKind::Block { name, value },
            Rule::setting => ItemKind::Setting { key: name, value },
            _ => return Err(grammar_bug(&pair)),
        }
    };
    Ok(Item { kind, span })
}

/// Depth of an expression tree (for the `MAX_DEPTH` limit on operator nesting).
fn depth(e: &Expr) -> usize {
    match &e.kind {
        ExprKind::Number(_) | ExprKind::Bool(_) | ExprKind::Str(_) | ExprKind::Name(_) => 1,
        ExprKind::Call { args, .. } => 1 + args.iter().map(|a| depth(&a.value)).max().unwrap_or(0),
        ExprKind::List(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        ExprKind::Binary { lhs, rhs, .. } => 1 + depth(lhs).max(depth(rhs)),
        ExprKind::Neg(x) | ExprKind::Paren(x) => 1 + depth(x),
    }
}

fn build_expr(pair: Pair<'_, Rule>) -> Result<Expr, Vec<Diagnostic>> {
    let e = build_node(pair)?;
    if depth(&e) > MAX_EXPR_DEPTH {
        return Err(vec![
            Diagnostic::error(Code::TooDeep, e.span, "this expression is nested too deeply")
                .with_note(format!("flashc accepts expressions at most {MAX_EXPR_DEPTH} levels deep")),
        ]);
    }
    Ok(e)
}

fn build_node(pair: Pair<'_, Rule>) -> Result<Expr, Vec<Diagnostic>> {
    let span = span_of(&pair);
    let kind = match pair.as_rule() {
        Rule::expr | Rule::sum | Rule::product => return build_chain(pair),
        Rule::unary => {
            let mut negs = Vec::new();
            let mut atom = None;
            for p in pair.clone().into_inner() {
                if p.as_rule() == Rule::neg {
                    negs.push(span_of(&p));
                } else {
                    atom = Some(build_node(p)?);
                }
            }
            let Some(mut e) = atom else { return Err(grammar_bug(&pair)) };
            if negs.len() > MAX_DEPTH {
                return Err(vec![Diagnostic::error(Code::TooDeep, span, "too many `-` signs in a row")]);
            }
            for neg in negs.into_iter().rev() {
                let s = neg.to(e.span);
                e = Expr { kind: ExprKind::Neg(Box::new(e)), span: s };
            }
            return Ok(e);
        }
        Rule::number => ExprKind::Number(pair.as_str().to_string()),
        Rule::boolean => ExprKind::Bool(pair.as_str() == "true"),
        Rule::string => {
            let s = pair.as_str();
            ExprKind::Str(s[1..s.len() - 1].to_string())
        }
        Rule::name => ExprKind::Name(ident(pair)),
        Rule::paren => {
            let Some(inner) = pair.clone().into_inner().next() else { return Err(grammar_bug(&pair)) };
            ExprKind::Paren(Box::new(build_node(inner)?))
        }
        Rule::list => {
            let items = pair.into_inner().map(build_node).collect::<Result<Vec<_>, _>>()?;
            ExprKind::List(items)
        }
        Rule::call => {
            let mut inner = pair.clone().into_inner();
            let Some(callee) = inner.next() else { return Err(grammar_bug(&pair)) };
            let mut args = Vec::new();
            for arg in inner {
                let mut parts: Vec<Pair<'_, Rule>> = arg.clone().into_inner().collect();
                let Some(value) = parts.pop() else { return Err(grammar_bug(&arg)) };
                let name = parts.pop().map(ident);
                args.push(Arg { name, value: build_node(value)? });
            }
            ExprKind::Call { callee: ident(callee), args }
        }
        _ => return Err(grammar_bug(&pair)),
    };
    Ok(Expr { kind, span })
}

/// Builds a left-associative chain `a op b op c` without recursion along the chain.
fn build_chain(pair: Pair<'_, Rule>) -> Result<Expr, Vec<Diagnostic>> {
    let span = span_of(&pair);
    let mut inner = pair.clone().into_inner();
    let Some(first) = inner.next() else { return Err(grammar_bug(&pair)) };
    let mut acc = build_node(first)?;
    let mut count = 0usize;
    while let Some(op) = inner.next() {
        count += 1;
        if count > MAX_CHAIN {
            return Err(vec![
                Diagnostic::error(Code::TooDeep, span, "this expression is too long")
                    .with_note(format!("flashc accepts at most {MAX_CHAIN} operators in a row")),
            ]);
        }
        let op = match op.as_str().trim() {
            "++" => BinOp::Concat,
            "+" => BinOp::Add,
            "-" => BinOp::Sub,
            "*" => BinOp::Mul,
            "/" => BinOp::Div,
            _ => return Err(grammar_bug(&op)),
        };
        let Some(rhs) = inner.next() else { return Err(grammar_bug(&pair)) };
        let rhs = build_node(rhs)?;
        let s = acc.span.to(rhs.span);
        acc = Expr { kind: ExprKind::Binary { op, lhs: Box::new(acc), rhs: Box::new(rhs) }, span: s };
    }
    Ok(acc)
}

const ITEM_WORDS: &str = "a setting, `let`, `op` or `block`";

/// The grammar's keywords (see `keyword` in `arch.pest`).
const KEYWORDS: &[&str] = &["model", "let", "op", "block", "true", "false"];

/// What a grammar rule means to a user, or `None` for rules that should not be mentioned.
fn rule_words(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "end of file",
        Rule::model | Rule::kw_model => "`model`",
        Rule::name => "a name",
        Rule::let_item
        | Rule::op_item
        | Rule::block_item
        | Rule::section
        | Rule::setting
        | Rule::kw_let
        | Rule::kw_op
        | Rule::kw_block => "a setting, `let`, `op` or `block`",
        Rule::expr
        | Rule::sum
        | Rule::product
        | Rule::unary
        | Rule::neg
        | Rule::number
        | Rule::boolean
        | Rule::string
        | Rule::call
        | Rule::list
        | Rule::paren => "a value",
        Rule::arg => "an argument",
        Rule::concat_op | Rule::add_op | Rule::mul_op => return None,
        _ => return None,
    })
}

fn syntax_error(source: &str, err: &pest::error::Error<Rule>) -> Diagnostic {
    let mut pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let add_rule = |set: &mut BTreeSet<String>, r: Rule| {
        if let Some(w) = rule_words(r) {
            set.insert(w.to_string());
        }
    };
    // The deepest position any rule reached is where the text stopped making sense; pest's own
    // location is often the start of the enclosing item.
    match err.parse_attempts() {
        Some(attempts) if attempts.max_position >= pos => {
            pos = attempts.max_position;
            for stack in attempts.call_stacks() {
                // A failed token is listed from `expected_tokens`; its parent rule would add noise.
                if let Some(r) = stack.deepest.get_rule() {
                    add_rule(&mut expected, *r);
                }
            }
            for tok in attempts.expected_tokens() {
                // Literal tokens display as themselves. Keywords, character ranges and built-in rules
                // are covered by the rule words, so only punctuation is listed.
                let text = tok.to_string();
                let t = text.trim();
                let punctuation = t.chars().all(|c| c.is_ascii_punctuation()) && !t.contains("..");
                if !t.is_empty() && punctuation {
                    expected.insert(format!("`{t}`"));
                }
            }
        }
        _ => {
            if let ErrorVariant::ParsingError { positives, .. } = &err.variant {
                for r in positives {
                    add_rule(&mut expected, *r);
                }
            }
        }
    }
    // Comments, the insides of names and numbers, and operators that could continue a complete value
    // are always possible; listing them only hides what is actually missing.
    for noise in ["`//`", "`/*`", "`_`", "`.`"] {
        expected.remove(noise);
    }
    let operators = ["`+`", "`-`", "`*`", "`/`", "`++`"];
    if expected.iter().any(|e| !operators.contains(&e.as_str())) {
        for op in operators {
            expected.remove(op);
        }
    }
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let prev = source.get(..pos).and_then(|b| b.chars().next_back());
    if expected.contains(ITEM_WORDS) || prev.is_some_and(is_word) {
        // Right after a name or number, "a name" or "a value" only means the word could be longer.
        expected.remove("a name");
    }
    if prev.is_some_and(is_word) && expected.len() > 1 {
        expected.remove("a value");
    }
    if expected.contains("`}`") {
        // Inside a model another `model` cannot start.
        expected.remove("`model`");
    }
    // An error inside a word (`12ab`) is reported at the start of the word.
    if prev.is_some_and(is_word) && source.get(pos..).and_then(|r| r.chars().next()).is_some_and(is_word) {
        while let Some(c) = source.get(..pos).and_then(|b| b.chars().next_back()) {
            if !is_word(c) {
                break;
            }
            pos -= c.len_utf8();
        }
    }
    // A string that runs to the end of its line: point at its opening quote.
    let line_start = source.get(..pos).and_then(|b| b.rfind('\n')).map(|i| i + 1).unwrap_or(0);
    let line = source.get(line_start..pos).unwrap_or("");
    if line.matches('"').count() % 2 == 1
        && let Some(q) = line.rfind('"')
    {
        let at = line_start + q;
        return Diagnostic::error(Code::Syntax, Span::new(at, at + 1), "this string is not closed")
            .with_label("the string starts here")
            .with_help("a string ends with `\"` on the same line");
    }
    // A keyword where a name was expected: pest's lookahead leaves nothing to list.
    let before = source.get(..pos).unwrap_or("").trim_end();
    let kw_end = before.len();
    let kw_start = before.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_').len();
    let keyword = &before[kw_start..kw_end];
    if expected.is_empty() && KEYWORDS.contains(&keyword) {
        return Diagnostic::error(
            Code::Syntax,
            Span::new(kw_start, kw_end),
            format!("expected a name, found the keyword `{keyword}`"),
        )
        .with_label("a keyword cannot be a name")
        .with_help(format!("`{keyword}` is reserved; choose another name"));
    }
    let found = found_token(source, pos);
    let list: Vec<String> = expected.into_iter().collect();
    let message = match list.len() {
        0 => format!("unexpected {found}"),
        1 => format!("expected {}, found {found}", list[0]),
        n => format!("expected {} or {}, found {found}", list[..n - 1].join(", "), list[n - 1]),
    };
    let end = (pos + token_len(source, pos)).min(source.len());
    let mut d = Diagnostic::error(Code::Syntax, Span::new(pos, end), message).with_label("unexpected here");
    if let Some(h) = syntax_help(source, pos, &list) {
        d = d.with_help(h);
    }
    d
}

fn token_len(source: &str, pos: usize) -> usize {
    let rest = source.get(pos..).unwrap_or("");
    let word: usize = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').map(char::len_utf8).sum();
    if word > 0 { word } else { rest.chars().next().map(char::len_utf8).unwrap_or(0) }
}

fn found_token(source: &str, pos: usize) -> String {
    let len = token_len(source, pos);
    match source.get(pos..pos + len) {
        None | Some("") => "end of file".to_string(),
        Some("\n") => "end of line".to_string(),
        Some(t) if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && len > 0 => format!("`{t}`"),
        Some(t) => format!("`{}`", t.escape_debug()),
    }
}

/// A hint for common slips, looking at the text around the error and at what was expected.
fn syntax_help(source: &str, pos: usize, expected: &[String]) -> Option<String> {
    let rest = source.get(pos..).unwrap_or("");
    let word: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    if rest.starts_with(':') {
        return Some("settings and parameters use `=`, as in `hidden = 2048`".to_string());
    }
    if rest.starts_with(';') {
        return Some("items need no `;`: put each on its own line".to_string());
    }
    if word.starts_with(|c: char| c.is_ascii_digit()) && word.contains(|c: char| c.is_ascii_alphabetic()) {
        return Some("a number cannot run into letters; put a space or an operator between them".to_string());
    }
    if rest.starts_with('"') && !rest.lines().next().unwrap_or("").get(1..).unwrap_or("").contains('"') {
        return Some("this string is not closed on its line".to_string());
    }
    if expected.iter().any(|e| e == "`,`") && !word.is_empty() {
        return Some(format!("separate arguments and list elements with `,`: add one before `{word}`"));
    }
    if rest.starts_with('}') && expected.iter().any(|e| e == "`model`") {
        return Some("this `}` has no matching `{`".to_string());
    }
    if rest.trim().is_empty() {
        let opens = source.matches('{').count();
        let closes = source.matches('}').count();
        if opens > closes {
            return Some("a `}` is missing at the end".to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_model() {
        let f = parse("model m { vocab = 10 let x = (1 + 2) * 3 op A = attention(heads = 2) layers = [A] * 2 ++ [A] }")
            .unwrap();
        assert_eq!(f.models.len(), 1);
        assert_eq!(f.models[0].items.len(), 4);
    }

    #[test]
    fn keywords_need_a_boundary() {
        let f = parse("model m { opx = 3 letter = 2 }").unwrap();
        assert!(matches!(f.models[0].items[0].kind, ItemKind::Setting { .. }));
        assert!(matches!(f.models[0].items[1].kind, ItemKind::Setting { .. }));
    }

    #[test]
    fn syntax_errors_are_in_words() {
        let e = parse("model m {\n  hidden: 2048\n}").unwrap_err();
        assert!(e[0].message.contains("found `:`"), "{}", e[0].message);
        assert!(e[0].help.as_deref().unwrap_or("").contains("use `=`"));
        assert!(!e[0].message.contains("name\n"));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let src = format!("model m {{ x = {}1{} }}", "(".repeat(10_000), ")".repeat(10_000));
        let e = parse(&src).unwrap_err();
        assert_eq!(e[0].code, Code::TooDeep);
        let src = format!("model m {{ x = 1{} }}", " + 1".repeat(100_000));
        let e = parse(&src).unwrap_err();
        assert_eq!(e[0].code, Code::TooDeep);
    }
}
