//! parse: reads the gir text form (see `print`) back into a graph with the same node ids, so pass
//! tests can start from IR text. Errors name the line.

use std::collections::BTreeMap;

use super::{Attr, Dim, FusedBody, Graph, Mode, NodeId, Op, TensorType, Value};

/// Parses one graph (`gir @name [mode=M] { ... }`).
pub fn parse(text: &str) -> Result<Graph, String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, strip_comment(l).trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut pos = 0;
    let Some((ln, header)) = lines.first().copied() else { return Err("empty gir text".to_string()) };
    let rest = header.strip_prefix("gir @").ok_or_else(|| format!("line {ln}: expected `gir @name {{`"))?;
    let rest = rest.strip_suffix('{').ok_or_else(|| format!("line {ln}: expected `{{` at the end"))?.trim();
    let mut words = rest.split_whitespace();
    let name = words.next().ok_or_else(|| format!("line {ln}: missing graph name"))?.to_string();
    let mut g = Graph::new(name);
    for w in words {
        let m = w.strip_prefix("mode=").ok_or_else(|| format!("line {ln}: unexpected `{w}`"))?;
        g.mode = Some(Mode::parse(m).ok_or_else(|| format!("line {ln}: unknown mode `{m}`"))?);
    }
    pos += 1;
    parse_body(&lines, &mut pos, &mut g)?;
    if pos != lines.len() {
        return Err(format!("line {}: text after the end of the graph", lines[pos].0));
    }
    Ok(g)
}

/// Drops a `//` comment (outside strings).
fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

/// A node as read, before it is added (ids are placed after the whole body is read).
struct Pending {
    line: usize,
    id: u32,
    op: Op,
    operands: Vec<Value>,
    types: Vec<TensorType>,
    origin: Option<u32>,
}

fn parse_body(lines: &[(usize, &str)], pos: &mut usize, g: &mut Graph) -> Result<(), String> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut outputs: Vec<(String, String, usize)> = Vec::new();
    loop {
        let Some((ln, line)) = lines.get(*pos).copied() else { return Err("missing `}` at the end".to_string()) };
        *pos += 1;
        if line == "}" {
            break;
        }
        if let Some(rest) = line.strip_prefix("output ") {
            let (name, rest) = parse_string(rest).map_err(|e| format!("line {ln}: {e}"))?;
            let v = rest.trim().strip_prefix('=').ok_or_else(|| format!("line {ln}: expected `=`"))?.trim();
            outputs.push((name, v.to_string(), ln));
            continue;
        }
        let p = parse_node(ln, line, lines, pos)
            .map_err(|e| if e.starts_with("line ") { e } else { format!("line {ln}: {e}") })?;
        pending.push(p);
    }
    // Add nodes under their ids, in text order (operands are defined before use).
    let mut types_of: BTreeMap<u32, usize> = BTreeMap::new();
    for p in &pending {
        for v in &p.operands {
            let ok = types_of.get(&v.node.0).is_some_and(|n| (v.result as usize) < *n);
            if !ok {
                return Err(format!("line {}: %{} uses {v}, which is not defined above it", p.line, p.id));
            }
        }
        if types_of.insert(p.id, p.types.len()).is_some() {
            return Err(format!("line {}: %{} is defined twice", p.line, p.id));
        }
    }
    for p in pending {
        let id = NodeId(p.id);
        g.insert(id, p.op, p.types, &p.operands);
        if let Some(o) = p.origin {
            g.origin.insert(id, o);
        }
    }
    for (name, v, ln) in outputs {
        let v = parse_value(&v).map_err(|e| format!("line {ln}: {e}"))?;
        if g.ty(v).is_err() {
            return Err(format!("line {ln}: output {name:?} names {v}, which is not defined"));
        }
        if g.outputs().iter().any(|(n, _)| *n == name) {
            return Err(format!("line {ln}: output {name:?} is defined twice"));
        }
        g.set_output(name, v);
    }
    Ok(())
}

fn parse_node(ln: usize, line: &str, lines: &[(usize, &str)], pos: &mut usize) -> Result<Pending, String> {
    let (lhs, rhs) = line.split_once(" = ").ok_or("expected `%N = op...`")?;
    let id: u32 =
        lhs.trim().strip_prefix('%').and_then(|x| x.parse().ok()).ok_or_else(|| format!("bad node id `{lhs}`"))?;
    let name_end = rhs.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rhs.len());
    let name = &rhs[..name_end];
    let mut rest = &rhs[name_end..];
    let mut attrs = Vec::new();
    if rest.starts_with('[') {
        let end = matching(rest, 0).ok_or("unclosed `[`")?;
        for part in split_top(&rest[1..end]) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("expected `key=value`, found `{part}`"))?;
            attrs.push((k.trim().to_string(), parse_attr(v.trim())?));
        }
        rest = &rest[end + 1..];
    }
    let mut op = Op::from_parts(name, &attrs)?;
    let mut operands = Vec::new();
    if rest.starts_with('(') {
        let end = matching(rest, 0).ok_or("unclosed `(`")?;
        for part in split_top(&rest[1..end]) {
            operands.push(parse_value(part.trim())?);
        }
        rest = &rest[end + 1..];
    }
    let rest = rest.trim().strip_prefix(':').ok_or("expected `: type`")?.trim();
    let (types_text, mut tail) = if rest.starts_with('(') {
        let end = matching(rest, 0).ok_or("unclosed `(` in types")?;
        (&rest[1..end], rest[end + 1..].trim())
    } else {
        let end = rest.find(']').ok_or("expected a type such as `bf16[B, T]`")? + 1;
        (&rest[..end], rest[end..].trim())
    };
    let types = split_top(types_text).iter().map(|t| TensorType::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let opens_body = tail.ends_with('{');
    if opens_body {
        tail = tail[..tail.len() - 1].trim();
    }
    let origin = match tail.strip_prefix('#') {
        Some(n) => Some(n.trim().parse().map_err(|_| format!("bad layer `#{n}`"))?),
        None if tail.is_empty() => None,
        None => return Err(format!("unexpected `{tail}`")),
    };
    match (&mut op, opens_body) {
        (Op::Fused(body), true) => {
            let mut sub = Graph::new(body.name.clone());
            parse_body(lines, pos, &mut sub)?;
            **body = FusedBody { name: body.name.clone(), graph: sub };
        }
        (Op::Fused(_), false) => return Err("a fused node needs a `{ ... }` body".to_string()),
        (_, true) => return Err(format!("`{name}` has no body")),
        _ => {}
    }
    let _ = ln;
    Ok(Pending { line: ln, id, op, operands, types, origin })
}

fn parse_value(s: &str) -> Result<Value, String> {
    let body = s.strip_prefix('%').ok_or_else(|| format!("expected a value `%N`, found `{s}`"))?;
    let (n, r) = match body.split_once('.') {
        Some((n, r)) => (n, r.parse::<u16>().map_err(|_| format!("bad value `{s}`"))?),
        None => (body, 0),
    };
    let n: u32 = n.parse().map_err(|_| format!("bad value `{s}`"))?;
    Ok(Value::new(NodeId(n), r))
}

/// The index of the bracket closing the one at `open`.
fn matching(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_str = false;
    let b = s.as_bytes();
    let mut i = open;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'<' | b'{' => depth += 1,
                b')' | b']' | b'>' | b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Splits at commas that are not inside brackets or strings.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut start = 0;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'<' | b'{' => depth += 1,
                b')' | b']' | b'>' | b'}' => depth -= 1,
                b',' if depth == 0 => {
                    parts.push(s[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    let last = s[start..].trim();
    if !last.is_empty() || !parts.is_empty() {
        parts.push(last);
    }
    parts
}

/// Reads a quoted string; returns it and the rest of the text.
fn parse_string(s: &str) -> Result<(String, &str), String> {
    let s = s.trim_start();
    let mut chars = s.char_indices();
    if chars.next().map(|(_, c)| c) != Some('"') {
        return Err(format!("expected a string, found `{s}`"));
    }
    let mut out = String::new();
    let mut escaped = false;
    for (i, c) in chars {
        if escaped {
            out.push(match c {
                'n' => '\n',
                't' => '\t',
                other => other,
            });
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return Ok((out, &s[i + 1..]));
        } else {
            out.push(c);
        }
    }
    Err("unclosed string".to_string())
}

fn parse_attr(v: &str) -> Result<Attr, String> {
    if v.starts_with('"') {
        let (s, rest) = parse_string(v)?;
        if !rest.trim().is_empty() {
            return Err(format!("unexpected `{rest}` after a string"));
        }
        return Ok(Attr::Str(s));
    }
    if let Some(inner) = v.strip_prefix('<').and_then(|x| x.strip_suffix('>')) {
        return Ok(Attr::Dim(Dim::parse(inner)?));
    }
    if let Some(inner) = v.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return Ok(Attr::Dims(split_top(inner).into_iter().map(Dim::parse).collect::<Result<_, _>>()?));
    }
    match v {
        "true" => return Ok(Attr::Bool(true)),
        "false" => return Ok(Attr::Bool(false)),
        "none" => return Ok(Attr::None),
        _ => {}
    }
    let float_like = v.contains(['.', 'e', 'E']) || v.contains("inf") || v.contains("NaN");
    if float_like {
        return v.parse::<f64>().map(Attr::Float).map_err(|_| format!("bad number `{v}`"));
    }
    v.parse::<i64>().map(Attr::Int).map_err(|_| format!("bad attribute value `{v}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_gaps_and_fused_bodies() {
        let text = "gir @t mode=decode {\n  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 4]\n  \
                    %2 = scale[factor=0.5](%0) : f32[B, 4]  #3\n  \
                    %5 = fused[name=\"k\"](%2) : (f32[B, 4], f32[B, 4]) {\n    \
                    %0 = input[name=\"p0\", role=\"param\", index=0] : f32[B, 4]\n    \
                    %1 = silu(%0) : f32[B, 4]\n    output \"0\" = %1\n    output \"1\" = %0\n  }\n  \
                    output \"y\" = %5.1\n}\n";
        let g = parse(text).unwrap();
        assert_eq!(g.to_string(), text);
        assert_eq!(g.node_ids(), vec![NodeId(0), NodeId(2), NodeId(5)]);
        assert!(parse("gir @t {\n  %0 = nope : f32[1]\n}\n").unwrap_err().contains("unknown op"));
        assert!(parse("gir @t {\n  %1 = silu(%0) : f32[1]\n}\n").unwrap_err().contains("not defined"));
    }
}
