//! resolve: ast → spec. Evaluates bindings, checks every operator and setting, fills defaults, and
//! expands the layer stack into a flat list.
//!
//! Errors are collected, not returned at the first one: every definition is checked even when another
//! one failed, so a file with several mistakes reports them all (in source order).
//!
//! Evaluation is lazy and memoised per name, with a stack of names being evaluated to report cycles.
//! A bare word that names no binding evaluates to `Value::Word`; it is an error only where a number is
//! needed (undefined name) or where it is not one of the allowed words (bad enum value).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::ast::{BinOp, Expr, ExprKind, File, Ident, Item, ItemKind, Model};
use crate::diag::{Code, Diagnostic, Span, did_you_mean, has_errors};
use crate::spec::{
    Activation, Attention, DType, DeltaNet, Ffn, Layer, Logits, Mamba2, ModelSpec, Norm, Operator, Optimizer, Rope,
    RopeScaling, RopeStyle, Schedule, Train, WeightNorm,
};

/// Largest accepted size (width, head count, vocabulary, ...).
pub const MAX_SIZE: u64 = 1 << 32;

/// Deepest chain of bindings referring to bindings (or blocks containing blocks) that is followed.
pub const MAX_CHAIN_DEPTH: usize = 128;

/// Most layers a stack may expand to (and most elements of any list value, nested lists counted
/// element by element).
pub const MAX_LAYERS: usize = 65_536;

/// Model-level settings and whether each is required.
const MODEL_SETTINGS: &[(&str, bool)] = &[
    ("vocab", true),
    ("hidden", true),
    ("layers", true),
    ("tie_embeddings", false),
    ("meta_tokens", false),
    ("norm", false),
    ("logits", false),
    ("dtype", false),
    ("max_seq", false),
];

const TRAIN_SETTINGS: &[&str] =
    &["optimizer", "lr", "schedule", "weight_norm", "grad_clip", "batch", "seq_len", "steps", "seed"];

const OPERATOR_KINDS: &[&str] = &["attention", "deltanet", "mamba2", "ffn"];

const BUILTIN_FUNCTIONS: &[&str] = &["min", "max", "floor", "ceil"];

/// Words with a fixed meaning somewhere in the language; bindings may not use them as names.
const RESERVED_WORDS: &[&str] = &[
    "none",
    "rope",
    "ntk",
    "rmsnorm",
    "swiglu",
    "relu2",
    "gelu",
    "plain",
    "row_normalized",
    "bf16",
    "f16",
    "f32",
    "rotate_half",
    "interleaved",
    "paper",
    "adam",
    "adamw",
    "sgd",
    "constant",
    "linear",
    "cosine",
    "train",
];

/// Parses and resolves source text: the front end in one call. Warnings come back with the spec.
pub fn load(source: &str) -> Result<(ModelSpec, Vec<Diagnostic>), Vec<Diagnostic>> {
    let file = crate::parser::parse(source)?;
    resolve(&file)
}

/// Resolves a parsed file into a `ModelSpec`. On success, returns the spec and any warnings; on failure,
/// every error found (and the warnings), sorted by position.
pub fn resolve(file: &File) -> Result<(ModelSpec, Vec<Diagnostic>), Vec<Diagnostic>> {
    let model = match file.models.as_slice() {
        [m] => m,
        [] => {
            return Err(vec![
                Diagnostic::global(Code::NoModel, "this file defines no model")
                    .with_help("a model file starts with `model NAME { ... }`"),
            ]);
        }
        [first, second, ..] => {
            return Err(vec![
                Diagnostic::error(Code::NoModel, second.name.span, "a file may define only one model")
                    .with_label("second model")
                    .with_secondary(first.name.span, "first model here")
                    .with_help("put each model in a file of its own"),
            ]);
        }
    };
    let mut r = Resolver::new(model);
    let spec = r.run(model);
    let mut diags = r.diags;
    diags.sort_by_key(|d| (d.span().start, d.span().end));
    match spec {
        Some(spec) if !has_errors(&diags) => Ok((spec, diags)),
        _ => Err(diags),
    }
}

/// A value during evaluation.
#[derive(Clone, Debug)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A bare name that is not a binding: an enum word such as `swiglu`, or a mistake.
    Word(String),
    /// An option or operator call with evaluated arguments.
    Call(CallValue),
    List(Vec<Spanned>),
    /// A reference to `op NAME`.
    OpRef(String),
    /// A reference to `block NAME`.
    BlockRef(String),
}

#[derive(Clone, Debug)]
struct Spanned {
    value: Value,
    span: Span,
}

#[derive(Clone, Debug)]
struct CallValue {
    callee: Ident,
    args: Vec<ArgValue>,
    span: Span,
}

#[derive(Clone, Debug)]
struct ArgValue {
    name: Option<Ident>,
    value: Value,
    span: Span,
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(f) => format!("the number {f}"),
            Value::Bool(b) => format!("the boolean `{b}`"),
            Value::Str(s) => format!("the string \"{s}\""),
            Value::Word(w) => format!("`{w}`"),
            Value::Call(c) => format!("`{}(...)`", c.callee.name),
            Value::List(_) => "a list".to_string(),
            Value::OpRef(n) => format!("the op `{n}`"),
            Value::BlockRef(n) => format!("the block `{n}`"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DefKind {
    Setting,
    Let,
    Op,
    Block,
}

#[derive(Clone, Copy)]
struct Def<'a> {
    kind: DefKind,
    name: &'a Ident,
    value: &'a Expr,
}

/// Why a layer expansion failed; the error is already reported either way.
#[derive(Clone, Copy, Debug)]
enum Failed {
    Reported,
    /// The stack grew past `MAX_LAYERS`: stop expanding altogether.
    TooMany,
}

/// A layer before numbering: its name, the blocks it came from (outermost first), its operator.
#[derive(Clone, Debug)]
struct ProtoLayer {
    name: String,
    blocks: Vec<String>,
    op: Operator,
    span: Span,
}

struct Resolver<'a> {
    defs: BTreeMap<String, Def<'a>>,
    /// Definitions in source order (for deterministic checking and warnings).
    order: Vec<Def<'a>>,
    cache: BTreeMap<String, Option<Value>>,
    visiting: Vec<(String, Span)>,
    used: BTreeSet<String>,
    ops: BTreeMap<String, Option<Operator>>,
    diags: Vec<Diagnostic>,
    hidden: Option<u64>,
    /// Memoised block expansions (`None`: failed, already reported).
    expanded: BTreeMap<String, Option<Rc<Vec<ProtoLayer>>>>,
    /// Blocks being expanded, outermost first (for recursion reports).
    expanding: Vec<String>,
    /// Inline operators by source location.
    inline_ops: BTreeMap<Span, Option<Operator>>,
    /// Required settings that appear misspelled (reported once, as the typo).
    misspelled: BTreeSet<String>,
}

impl<'a> Resolver<'a> {
    fn new(model: &'a Model) -> Resolver<'a> {
        Resolver {
            defs: BTreeMap::new(),
            order: Vec::new(),
            cache: BTreeMap::new(),
            visiting: Vec::new(),
            used: BTreeSet::new(),
            ops: BTreeMap::new(),
            diags: Vec::new(),
            hidden: None,
            expanded: BTreeMap::new(),
            expanding: Vec::new(),
            inline_ops: BTreeMap::new(),
            misspelled: BTreeSet::new(),
        }
        .collect(model)
    }

    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// Gathers definitions and reports duplicates, reserved names, unknown settings and sections.
    fn collect(mut self, model: &'a Model) -> Resolver<'a> {
        for item in &model.items {
            let (kind, name, value) = match &item.kind {
                ItemKind::Let { name, value } => (DefKind::Let, name, value),
                ItemKind::Op { name, value } => (DefKind::Op, name, value),
                ItemKind::Block { name, value } => (DefKind::Block, name, value),
                ItemKind::Setting { key, value } => {
                    if !MODEL_SETTINGS.iter().any(|(k, _)| *k == key.name) {
                        let mut d = Diagnostic::error(
                            Code::UnknownSetting,
                            key.span,
                            format!("unknown model setting `{}`", key.name),
                        )
                        .with_label("not a model setting");
                        d = match did_you_mean(&key.name, MODEL_SETTINGS.iter().map(|(k, _)| *k)) {
                            Some(s) => {
                                self.misspelled.insert(s.to_string());
                                d.with_help(format!("did you mean `{s}`?"))
                            }
                            None => d.with_help(format!(
                                "to define a value of your own, write `let {} = ...`; model settings are {}",
                                key.name,
                                list_words(MODEL_SETTINGS.iter().map(|(k, _)| *k))
                            )),
                        };
                        self.err(d);
                        continue;
                    }
                    (DefKind::Setting, key, value)
                }
                ItemKind::Section { name, .. } => {
                    if name.name != "train" {
                        let mut d = Diagnostic::error(
                            Code::UnknownSection,
                            name.span,
                            format!("unknown section `{}`", name.name),
                        )
                        .with_label("not a section");
                        d = match did_you_mean(&name.name, ["train"]) {
                            Some(s) => d.with_help(format!("did you mean `{s}`?")),
                            None => d.with_help("the only section is `train { ... }`"),
                        };
                        self.err(d);
                    }
                    continue;
                }
            };
            if kind != DefKind::Setting && is_reserved(&name.name) {
                self.err(
                    Diagnostic::error(
                        Code::ReservedName,
                        name.span,
                        format!("`{}` is a reserved name and cannot be redefined", name.name),
                    )
                    .with_label("reserved")
                    .with_help("choose another name"),
                );
                continue;
            }
            if let Some(prev) = self.defs.get(&name.name) {
                let (code, what) = if kind == DefKind::Setting && prev.kind == DefKind::Setting {
                    (Code::DuplicateSetting, "setting")
                } else {
                    (Code::DuplicateDefinition, "name")
                };
                let prev_span = prev.name.span;
                self.err(
                    Diagnostic::error(code, name.span, format!("the {what} `{}` is defined twice", name.name))
                        .with_label("defined again here")
                        .with_secondary(prev_span, "first defined here"),
                );
                continue;
            }
            let def = Def { kind, name, value };
            self.defs.insert(name.name.clone(), def);
            self.order.push(def);
        }
        self
    }

    fn run(&mut self, model: &'a Model) -> Option<ModelSpec> {
        // Settings first: operators need `hidden` for their defaults.
        let vocab = self.setting_int("vocab", model, 1, None);
        let hidden = self.setting_int("hidden", model, 1, None);
        self.hidden = hidden;
        let tie_embeddings = self.setting_bool("tie_embeddings", false);
        let meta_tokens = self.setting_int("meta_tokens", model, 0, Some(0));
        let max_seq = self.setting_int("max_seq", model, 1, Some(4096));
        let norm = self.setting_norm();
        let logits = self.setting_word(
            "logits",
            &[("plain", Logits::Plain), ("row_normalized", Logits::RowNormalized)],
            Logits::Plain,
        );
        let dtype =
            self.setting_word("dtype", &[("bf16", DType::Bf16), ("f16", DType::F16), ("f32", DType::F32)], DType::Bf16);

        // Every op and block is checked, used or not, so all their errors are reported.
        let order = self.order.clone();
        for def in &order {
            match def.kind {
                DefKind::Op => {
                    self.op(&def.name.name);
                }
                DefKind::Let => {
                    self.eval_def(def.name);
                }
                DefKind::Block => {
                    let _ = self.expand_block(&def.name.name, def.name.span);
                }
                DefKind::Setting => {}
            }
        }

        let layers = self.layers(model);
        let train = self.train(model);

        // Unused definitions are only worth a warning once the file is otherwise correct.
        let clean = !has_errors(&self.diags);
        for def in order.iter().filter(|_| clean) {
            if def.kind != DefKind::Setting && !self.used.contains(&def.name.name) {
                let what = match def.kind {
                    DefKind::Let => "binding",
                    DefKind::Op => "op",
                    _ => "block",
                };
                self.err(
                    Diagnostic::warning(
                        Code::UnusedBinding,
                        def.name.span,
                        format!("the {what} `{}` is never used", def.name.name),
                    )
                    .with_label("defined here"),
                );
            }
        }

        Some(ModelSpec {
            name: model.name.name.clone(),
            vocab: vocab?,
            hidden: hidden?,
            tie_embeddings: tie_embeddings?,
            meta_tokens: meta_tokens?,
            norm: norm?,
            logits: logits?,
            dtype: dtype?,
            max_seq: max_seq?,
            layers: layers?,
            train: train?,
        })
    }

    // ---------------------------------------------------------------- evaluation

    /// The value of a named binding, evaluated once. `op` names evaluate to references, and `block`
    /// names to references after their body has been evaluated (and cached) once.
    fn eval_name(&mut self, name: &Ident) -> Option<Value> {
        self.used.insert(name.name.clone());
        self.eval_def(name)
    }

    /// Like `eval_name`, without counting as a use (for checking every definition).
    fn eval_def(&mut self, name: &Ident) -> Option<Value> {
        let Some(def) = self.defs.get(&name.name).copied() else {
            return Some(Value::Word(name.name.clone()));
        };
        let as_result = |def: Def<'_>, v: Option<Value>| match def.kind {
            DefKind::Op => Some(Value::OpRef(def.name.name.clone())),
            DefKind::Block => Some(Value::BlockRef(def.name.name.clone())),
            _ => v,
        };
        if def.kind == DefKind::Op {
            return as_result(def, None);
        }
        if let Some(v) = self.cache.get(&name.name) {
            return as_result(def, v.clone());
        }
        if let Some(pos) = self.visiting.iter().position(|(n, _)| *n == name.name) {
            let cycle: Vec<String> =
                self.visiting[pos..].iter().map(|(n, _)| n.clone()).chain([name.name.clone()]).collect();
            let mut d = Diagnostic::error(
                Code::CyclicBinding,
                def.name.span,
                format!("`{}` is defined in terms of itself", name.name),
            )
            .with_label("this definition depends on itself")
            .with_note(format!("the cycle is {}", cycle.join(" -> ")));
            for (n, span) in &self.visiting[pos + 1..] {
                d = d.with_secondary(*span, format!("`{n}` is part of the cycle"));
            }
            self.err(d);
            // Poison every name on the cycle so the cycle is reported once.
            let names: Vec<String> = self.visiting[pos..].iter().map(|(n, _)| n.clone()).collect();
            for n in names {
                self.cache.insert(n, None);
            }
            return None;
        }
        if self.visiting.len() >= MAX_CHAIN_DEPTH {
            self.err(
                Diagnostic::error(Code::TooDeep, def.name.span, "definitions refer to each other too deeply")
                    .with_label(format!("more than {MAX_CHAIN_DEPTH} definitions deep"))
                    .with_note("flashc follows chains of at most this many bindings"),
            );
            self.cache.insert(name.name.clone(), None);
            return None;
        }
        self.visiting.push((name.name.clone(), def.name.span));
        let v = self.eval(def.value);
        self.visiting.pop();
        // A cycle found below poisoned this name already: keep it poisoned.
        let v = if self.cache.contains_key(&name.name) { None } else { v };
        self.cache.insert(name.name.clone(), v.clone());
        as_result(def, v)
    }

    /// The evaluated body of a block.
    fn block_body(&mut self, name: &str) -> Option<Value> {
        let def = self.defs.get(name).copied()?;
        self.eval_def(def.name);
        self.cache.get(name).cloned().flatten()
    }

    fn eval(&mut self, e: &Expr) -> Option<Value> {
        match &e.kind {
            ExprKind::Number(text) => self.number(text, e.span),
            ExprKind::Bool(b) => Some(Value::Bool(*b)),
            ExprKind::Str(s) => Some(Value::Str(s.clone())),
            ExprKind::Name(id) => {
                // Inside a block or layer list, names of blocks stay references.
                if let Some(def) = self.defs.get(&id.name)
                    && def.kind == DefKind::Block
                {
                    self.used.insert(id.name.clone());
                    return Some(Value::BlockRef(id.name.clone()));
                }
                self.eval_name(id)
            }
            ExprKind::Paren(x) => self.eval(x),
            ExprKind::Neg(x) => match self.eval(x)? {
                Value::Int(i) => match i.checked_neg() {
                    Some(v) => Some(Value::Int(v)),
                    None => self.overflow(e.span),
                },
                Value::Float(f) => Some(Value::Float(-f)),
                other => {
                    let msg = format!("cannot negate {}", other.describe());
                    self.bad_operand(&other, x.span, msg)
                }
            },
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                let mut size = 0usize;
                for it in items {
                    match self.eval(it) {
                        Some(v) => {
                            size = size.saturating_add(flat_len(&v));
                            out.push(Spanned { value: v, span: it.span });
                        }
                        None => ok = false,
                    }
                }
                if size > MAX_LAYERS {
                    return self.too_many(e.span);
                }
                ok.then_some(Value::List(out))
            }
            ExprKind::Call { callee, args } => {
                let mut vals = Vec::with_capacity(args.len());
                let mut ok = true;
                for a in args {
                    match self.eval(&a.value) {
                        Some(v) => vals.push(ArgValue { name: a.name.clone(), value: v, span: a.value.span }),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                let call = CallValue { callee: callee.clone(), args: vals, span: e.span };
                if BUILTIN_FUNCTIONS.contains(&callee.name.as_str()) {
                    return self.builtin(&call);
                }
                Some(Value::Call(call))
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let l = self.eval(lhs);
                let r = self.eval(rhs);
                self.binary(*op, l?, lhs.span, r?, rhs.span, e.span)
            }
        }
    }

    fn number(&mut self, text: &str, span: Span) -> Option<Value> {
        let clean: String = text.chars().filter(|c| *c != '_').collect();
        if clean.contains(['.', 'e', 'E']) {
            match clean.parse::<f64>() {
                Ok(f) if f.is_finite() => Some(Value::Float(f)),
                _ => self.overflow(span),
            }
        } else {
            match clean.parse::<i64>() {
                Ok(i) => Some(Value::Int(i)),
                Err(_) => self.overflow(span),
            }
        }
    }

    fn overflow<T>(&mut self, span: Span) -> Option<T> {
        self.err(
            Diagnostic::error(Code::Overflow, span, "this value is too large")
                .with_label("out of range")
                .with_note("integers must fit in 64 bits and floats must be finite"),
        );
        None
    }

    /// Reports a bad operand; for an undefined name, reports the name instead.
    fn bad_operand<T>(&mut self, v: &Value, span: Span, msg: String) -> Option<T> {
        if let Value::Word(w) = v {
            self.undefined(w, span);
        } else {
            self.err(Diagnostic::error(Code::BadOperands, span, msg).with_label(format!("this is {}", v.describe())));
        }
        None
    }

    fn undefined(&mut self, name: &str, span: Span) {
        let names: Vec<String> = self.defs.keys().cloned().collect();
        let mut d = Diagnostic::error(Code::UndefinedName, span, format!("cannot find `{name}` in this model"))
            .with_label("not defined");
        d = match did_you_mean(name, names.iter().map(String::as_str)) {
            Some(s) => d.with_help(format!("did you mean `{s}`?")),
            None => d.with_help(format!("define it with `let {name} = ...`")),
        };
        self.err(d);
    }

    fn builtin(&mut self, call: &CallValue) -> Option<Value> {
        let name = call.callee.name.as_str();
        let mut nums = Vec::new();
        for a in &call.args {
            if let Some(n) = &a.name {
                self.err(
                    Diagnostic::error(Code::UnknownParam, n.span, format!("`{name}` takes positional arguments only"))
                        .with_help(format!("write `{name}(a, b)`")),
                );
                return None;
            }
            match &a.value {
                Value::Int(i) => nums.push(Num::Int(*i)),
                Value::Float(f) => nums.push(Num::Float(*f)),
                other => {
                    let msg = format!("`{name}` needs numbers, found {}", other.describe());
                    return self.bad_operand(other, a.span, msg);
                }
            }
        }
        let arity_ok = match name {
            "floor" | "ceil" => nums.len() == 1,
            _ => nums.len() >= 2,
        };
        if !arity_ok {
            let want = if matches!(name, "floor" | "ceil") { "one argument" } else { "at least two arguments" };
            self.err(
                Diagnostic::error(Code::WrongType, call.span, format!("`{name}` takes {want}"))
                    .with_label(format!("{} given", nums.len())),
            );
            return None;
        }
        let v = match name {
            "floor" | "ceil" => match nums[0] {
                Num::Int(i) => Value::Int(i),
                Num::Float(f) => {
                    let r = if name == "floor" { f.floor() } else { f.ceil() };
                    if r.abs() >= 9.0e18 {
                        return self.overflow(call.span);
                    }
                    Value::Int(r as i64)
                }
            },
            _ => {
                let pick_max = name == "max";
                let mut best = nums[0];
                for n in &nums[1..] {
                    let better = if pick_max { n.as_f64() > best.as_f64() } else { n.as_f64() < best.as_f64() };
                    if better {
                        best = *n;
                    }
                }
                best.into_value()
            }
        };
        Some(v)
    }

    fn binary(&mut self, op: BinOp, l: Value, ls: Span, r: Value, rs: Span, span: Span) -> Option<Value> {
        use Value::{Float, Int, List};
        match (op, l, r) {
            (BinOp::Concat, l, r) => {
                let l = self.as_list(l, ls)?;
                let r = self.as_list(r, rs)?;
                let size = |v: &[Spanned]| v.iter().map(|x| flat_len(&x.value)).fold(0usize, usize::saturating_add);
                if size(&l).saturating_add(size(&r)) > MAX_LAYERS {
                    return self.too_many(span);
                }
                Some(List(l.into_iter().chain(r).collect()))
            }
            (BinOp::Mul, List(items), Int(n)) | (BinOp::Mul, Int(n), List(items)) => {
                if n < 0 {
                    self.err(
                        Diagnostic::error(Code::OutOfRange, span, format!("cannot repeat a list {n} times"))
                            .with_label("negative repetition"),
                    );
                    return None;
                }
                let n = n as usize;
                let size = items.iter().map(|x| flat_len(&x.value)).fold(0usize, usize::saturating_add);
                if size.saturating_mul(n) > MAX_LAYERS {
                    return self.too_many(span);
                }
                let mut out = Vec::with_capacity(items.len() * n);
                for _ in 0..n {
                    out.extend(items.iter().cloned());
                }
                Some(List(out))
            }
            (_, Int(a), Int(b)) => {
                let v = match op {
                    BinOp::Add => a.checked_add(b),
                    BinOp::Sub => a.checked_sub(b),
                    BinOp::Mul => a.checked_mul(b),
                    BinOp::Div => {
                        if b == 0 {
                            return self.div_zero(rs);
                        }
                        match a.checked_rem(b) {
                            Some(0) => a.checked_div(b),
                            Some(_) => return Some(Float(a as f64 / b as f64)),
                            None => None,
                        }
                    }
                    BinOp::Concat => None,
                };
                match v {
                    Some(v) => Some(Int(v)),
                    None => self.overflow(span),
                }
            }
            (_, l @ (Int(_) | Float(_)), r @ (Int(_) | Float(_))) => {
                let (a, b) = (num(&l), num(&r));
                let v = match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => {
                        if b == 0.0 {
                            return self.div_zero(rs);
                        }
                        a / b
                    }
                    BinOp::Concat => f64::NAN,
                };
                if v.is_finite() { Some(Float(v)) } else { self.overflow(span) }
            }
            (_, l, r) => {
                let (bad, bad_span) = if matches!(l, Int(_) | Float(_)) { (r.clone(), rs) } else { (l.clone(), ls) };
                let msg = format!("cannot apply `{}` to {} and {}", op.symbol(), l.describe(), r.describe());
                let mut d_bad = bad;
                if let Value::Word(_) = d_bad {
                    return self.bad_operand(&d_bad, bad_span, msg);
                }
                // Prefer pointing at an undefined name on either side.
                for (v, s) in [(&l, ls), (&r, rs)] {
                    if let Value::Word(_) = v {
                        d_bad = v.clone();
                        return self.bad_operand(&d_bad, s, msg);
                    }
                }
                let mut d = Diagnostic::error(Code::BadOperands, span, msg).with_label("these values do not combine");
                if op == BinOp::Add && (matches!(l, List(_)) || matches!(r, List(_))) {
                    d = d.with_help("lists are joined with `++`");
                }
                self.err(d);
                None
            }
        }
    }

    fn as_list(&mut self, v: Value, span: Span) -> Option<Vec<Spanned>> {
        match v {
            Value::List(items) => Some(items),
            v @ (Value::OpRef(_) | Value::BlockRef(_) | Value::Call(_)) => Some(vec![Spanned { value: v, span }]),
            other => {
                let msg = format!("cannot join {} with `++`", other.describe());
                self.bad_operand(&other, span, msg)
            }
        }
    }

    fn div_zero<T>(&mut self, span: Span) -> Option<T> {
        self.err(Diagnostic::error(Code::DivisionByZero, span, "division by zero").with_label("this is zero"));
        None
    }

    fn too_many<T>(&mut self, span: Span) -> Option<T> {
        self.err(
            Diagnostic::error(Code::StackTooLarge, span, "this list is too long")
                .with_label(format!("more than {MAX_LAYERS} elements"))
                .with_note(format!("flashc builds models of at most {MAX_LAYERS} layers")),
        );
        None
    }

    // ---------------------------------------------------------------- typed access

    fn want_int(&mut self, v: &Value, span: Span, what: &str) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Some(*f as i64),
            Value::Float(f) => {
                self.err(
                    Diagnostic::error(Code::NotInteger, span, format!("{what} must be an integer, but this is {f}"))
                        .with_label("not a whole number")
                        .with_help("use `floor(...)` or `ceil(...)` to round"),
                );
                None
            }
            Value::Word(w) => {
                self.undefined(w, span);
                None
            }
            other => {
                self.err(
                    Diagnostic::error(
                        Code::WrongType,
                        span,
                        format!("{what} must be an integer, found {}", other.describe()),
                    )
                    .with_label("expected an integer"),
                );
                None
            }
        }
    }

    /// An integer no smaller than `min`.
    fn want_int_min(&mut self, v: &Value, span: Span, what: &str, min: i64) -> Option<u64> {
        let i = self.want_int(v, span, what)?;
        if i < min {
            let req = if min == 1 { "positive".to_string() } else { format!("at least {min}") };
            self.err(
                Diagnostic::error(Code::OutOfRange, span, format!("{what} must be {req}, but it is {i}"))
                    .with_label(format!("must be {req}")),
            );
            return None;
        }
        Some(i as u64)
    }

    /// A size (a width, a count of heads, tokens or layers): at least `min` and at most `MAX_SIZE`.
    fn want_size(&mut self, v: &Value, span: Span, what: &str, min: i64) -> Option<u64> {
        let n = self.want_int_min(v, span, what, min)?;
        if n > MAX_SIZE {
            self.err(
                Diagnostic::error(Code::OutOfRange, span, format!("{what} is too large ({n})"))
                    .with_label(format!("at most {MAX_SIZE}"))
                    .with_note("sizes are limited to 2^32 so every derived size fits in 64 bits"),
            );
            return None;
        }
        Some(n)
    }

    fn want_float(&mut self, v: &Value, span: Span, what: &str) -> Option<f64> {
        match v {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Word(w) => {
                self.undefined(w, span);
                None
            }
            other => {
                self.err(
                    Diagnostic::error(
                        Code::WrongType,
                        span,
                        format!("{what} must be a number, found {}", other.describe()),
                    )
                    .with_label("expected a number"),
                );
                None
            }
        }
    }

    fn want_pos_float(&mut self, v: &Value, span: Span, what: &str) -> Option<f64> {
        let f = self.want_float(v, span, what)?;
        if f <= 0.0 {
            self.err(
                Diagnostic::error(Code::OutOfRange, span, format!("{what} must be positive, but it is {f}"))
                    .with_label("must be positive"),
            );
            return None;
        }
        Some(f)
    }

    fn want_bool(&mut self, v: &Value, span: Span, what: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                let mut d = Diagnostic::error(
                    Code::WrongType,
                    span,
                    format!("{what} must be `true` or `false`, found {}", other.describe()),
                )
                .with_label("expected a boolean");
                if let Value::Int(0 | 1) = other {
                    d = d.with_help("write `true` or `false`");
                }
                self.err(d);
                None
            }
        }
    }

    /// One of a fixed set of words.
    fn want_word<T: Copy>(&mut self, v: &Value, span: Span, what: &str, choices: &[(&str, T)]) -> Option<T> {
        let words = || list_words(choices.iter().map(|(w, _)| *w));
        match v {
            Value::Word(w) => {
                if let Some((_, t)) = choices.iter().find(|(c, _)| c == w) {
                    return Some(*t);
                }
                let mut d =
                    Diagnostic::error(Code::BadEnumValue, span, format!("`{w}` is not a valid value for {what}"))
                        .with_label(format!("expected {}", words()));
                if let Some(s) = did_you_mean(w, choices.iter().map(|(c, _)| *c)) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                }
                self.err(d);
                None
            }
            other => {
                self.err(
                    Diagnostic::error(
                        Code::WrongType,
                        span,
                        format!("{what} must be one of {}, found {}", words(), other.describe()),
                    )
                    .with_label("expected a word"),
                );
                None
            }
        }
    }

    // ---------------------------------------------------------------- model settings

    fn setting(&mut self, key: &str) -> Option<(Value, Span, Span)> {
        let def = self.defs.get(key).copied().filter(|d| d.kind == DefKind::Setting)?;
        let v = self.eval_name(def.name)?;
        Some((v, def.value.span, def.name.span))
    }

    fn missing_setting(&mut self, key: &str, model: &Model) {
        if self.misspelled.contains(key) {
            return;
        }
        let example = match key {
            "layers" => "layers = [A, F] * 12",
            "vocab" => "vocab = 32000",
            _ => "hidden = 1024",
        };
        self.err(
            Diagnostic::error(Code::MissingSetting, model.name.span, format!("the model has no `{key}` setting"))
                .with_label(format!("`{key}` is required"))
                .with_help(format!("add a line such as `{example}`")),
        );
    }

    fn setting_int(&mut self, key: &str, model: &Model, min: i64, default: Option<u64>) -> Option<u64> {
        match self.setting(key) {
            Some((v, span, _)) => self.want_size(&v, span, &format!("`{key}`"), min),
            None if self.defs.contains_key(key) => None,
            None => {
                if default.is_none() {
                    self.missing_setting(key, model);
                }
                default
            }
        }
    }

    fn setting_bool(&mut self, key: &str, default: bool) -> Option<bool> {
        match self.setting(key) {
            Some((v, span, _)) => self.want_bool(&v, span, &format!("`{key}`")),
            None if self.defs.contains_key(key) => None,
            None => Some(default),
        }
    }

    fn setting_word<T: Copy>(&mut self, key: &str, choices: &[(&str, T)], default: T) -> Option<T> {
        match self.setting(key) {
            Some((v, span, _)) => self.want_word(&v, span, &format!("`{key}`"), choices),
            None if self.defs.contains_key(key) => None,
            None => Some(default),
        }
    }

    fn setting_norm(&mut self) -> Option<Norm> {
        let default_eps = 1e-6;
        match self.setting("norm") {
            None if self.defs.contains_key("norm") => None,
            None => Some(Norm::RmsNorm { eps: default_eps }),
            Some((Value::Word(w), _, _)) if w == "rmsnorm" => Some(Norm::RmsNorm { eps: default_eps }),
            Some((Value::Call(c), _, _)) if c.callee.name == "rmsnorm" => {
                let mut a = Args::new(self, &c, &["eps"])?;
                let eps = a.pos_float(self, "eps", Some(default_eps));
                a.finish(self);
                Some(Norm::RmsNorm { eps: eps? })
            }
            Some((v, span, _)) => {
                let v = call_as_word(v);
                self.want_word(&v, span, "`norm`", &[("rmsnorm", ())])?;
                None
            }
        }
    }

    // ---------------------------------------------------------------- operators

    /// The operator of `op NAME`, checked once.
    fn op(&mut self, name: &str) -> Option<Operator> {
        if let Some(o) = self.ops.get(name) {
            return o.clone();
        }
        let def = self.defs.get(name).copied()?;
        let v = self.eval(def.value);
        let o = v.and_then(|v| self.operator(&v, def.value.span));
        self.ops.insert(name.to_string(), o.clone());
        o
    }

    fn operator(&mut self, v: &Value, span: Span) -> Option<Operator> {
        let call = match v {
            Value::Call(c) => c.clone(),
            Value::Word(w) if OPERATOR_KINDS.contains(&w.as_str()) => {
                let kind = w.clone();
                // A bare kind: all defaults (reports the missing required parameters).
                CallValue { callee: Ident { name: kind, span }, args: Vec::new(), span }
            }
            Value::Word(w) => {
                let w = w.clone();
                self.unknown_operator(&w, span);
                return None;
            }
            other => {
                self.err(
                    Diagnostic::error(
                        Code::WrongType,
                        span,
                        format!("an op must be an operator such as `attention(...)`, found {}", other.describe()),
                    )
                    .with_label("not an operator")
                    .with_help(format!("operator kinds are {}", list_words(OPERATOR_KINDS.iter().copied()))),
                );
                return None;
            }
        };
        match call.callee.name.as_str() {
            "attention" => self.attention(&call).map(Operator::Attention),
            "deltanet" => self.deltanet(&call).map(Operator::DeltaNet),
            "mamba2" => self.mamba2(&call).map(Operator::Mamba2),
            "ffn" => self.ffn(&call).map(Operator::Ffn),
            other => {
                let other = other.to_string();
                self.unknown_operator(&other, call.callee.span);
                None
            }
        }
    }

    /// An operator written inline in a list, checked once per source location (a repeated list
    /// reports its errors once).
    fn inline_op(&mut self, v: &Value, span: Span) -> Option<Operator> {
        if let Some(o) = self.inline_ops.get(&span) {
            return o.clone();
        }
        let o = self.operator(v, span);
        self.inline_ops.insert(span, o.clone());
        o
    }

    fn unknown_operator(&mut self, kind: &str, span: Span) {
        let mut d = Diagnostic::error(Code::UnknownOperator, span, format!("unknown operator kind `{kind}`"))
            .with_label("not an operator kind");
        let hint = match kind {
            "mlp" | "swiglu" => Some("ffn"),
            "mamba" | "ssm" => Some("mamba2"),
            "gated_deltanet" | "gdn" => Some("deltanet"),
            "attn" | "mha" | "gqa" | "swa" => Some("attention"),
            _ => did_you_mean(kind, OPERATOR_KINDS.iter().copied()),
        };
        d = match hint {
            Some(h) if kind == "gated_deltanet" || kind == "gdn" => {
                d.with_help(format!("did you mean `{h}(..., gated = true)`?"))
            }
            Some(h) if kind == "swa" => d.with_help(format!("did you mean `{h}(..., window = N)`?")),
            Some(h) => d.with_help(format!("did you mean `{h}`?")),
            None => d.with_help(format!("operator kinds are {}", list_words(OPERATOR_KINDS.iter().copied()))),
        };
        self.err(d);
    }

    /// `hidden / heads`, the default head width, or an error if it does not divide.
    fn default_head_dim(&mut self, heads: u64, heads_span: Span, op: &str) -> Option<u64> {
        let hidden = self.hidden?;
        if hidden % heads != 0 {
            self.err(
                Diagnostic::error(
                    Code::ShapeMismatch,
                    heads_span,
                    format!(
                        "`hidden` ({hidden}) is not divisible by `heads` ({heads}), so {op} has no default `head_dim`"
                    ),
                )
                .with_label(format!("{hidden} / {heads} is not a whole number"))
                .with_help("give `head_dim` explicitly, or choose `heads` that divides `hidden`"),
            );
            return None;
        }
        Some(hidden / heads)
    }

    fn attention(&mut self, call: &CallValue) -> Option<Attention> {
        let mut a = Args::new(
            self,
            call,
            &["heads", "kv_heads", "head_dim", "rope", "window", "qk_norm", "qkv_bias", "out_bias"],
        )?;
        let heads = a.pos_int(self, "heads", None);
        let heads_span = a.span_of("heads").unwrap_or(call.span);
        let kv_heads = match a.take("kv_heads") {
            Some(v) => self.want_size(&v.value, v.span, "`kv_heads`", 1),
            None => heads,
        };
        let head_dim = match a.take("head_dim") {
            Some(v) => self.want_size(&v.value, v.span, "`head_dim`", 1),
            None => heads.and_then(|h| self.default_head_dim(h, heads_span, "attention")),
        };
        let rope = match a.take("rope") {
            None => Some(Some(Rope { theta: 10_000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::None })),
            Some(v) => self.rope(&v),
        };
        let window = match a.take("window") {
            None => Some(None),
            Some(ArgValue { value: Value::Word(w), .. }) if w == "none" => Some(None),
            Some(v) => match self.want_int(&v.value, v.span, "`window`") {
                Some(w) if w <= 0 => {
                    self.err(
                        Diagnostic::error(
                            Code::OutOfRange,
                            v.span,
                            format!("the attention window must be positive, but it is {w}"),
                        )
                        .with_label("must be at least 1")
                        .with_help("for full causal attention, leave `window` out"),
                    );
                    None
                }
                Some(w) => Some(Some(w as u64)),
                None => None,
            },
        };
        let qk_norm = a.bool(self, "qk_norm", false);
        let qkv_bias = a.bool(self, "qkv_bias", false);
        let out_bias = a.bool(self, "out_bias", false);
        a.finish(self);
        let (heads, kv_heads, head_dim, rope) = (heads?, kv_heads?, head_dim?, rope?);
        if heads % kv_heads != 0 {
            let help = if heads <= 4096 {
                let divisors: Vec<String> =
                    (1..=heads).filter(|d| heads.is_multiple_of(*d)).map(|d| d.to_string()).collect();
                format!("choose `kv_heads` among {}", divisors.join(", "))
            } else {
                "choose `kv_heads` that divides `heads`".to_string()
            };
            let kv_span = a.span_of("kv_heads").unwrap_or(call.span);
            self.err(
                Diagnostic::error(
                    Code::KvHeads,
                    kv_span,
                    format!("`kv_heads` ({kv_heads}) does not divide `heads` ({heads})"),
                )
                .with_label("every key/value head must serve the same number of query heads")
                .with_secondary(heads_span, format!("{heads} query heads"))
                .with_help(help),
            );
            return None;
        }
        if rope.is_some() && head_dim % 2 != 0 {
            self.err(
                Diagnostic::error(
                    Code::ShapeMismatch,
                    a.span_of("head_dim").unwrap_or(call.span),
                    format!("RoPE needs an even `head_dim`, but it is {head_dim}"),
                )
                .with_label("odd head width")
                .with_help("use an even `head_dim`, or `rope = none`"),
            );
            return None;
        }
        Some(Attention {
            heads,
            kv_heads,
            head_dim,
            rope,
            window: window?,
            qk_norm: qk_norm?,
            qkv_bias: qkv_bias?,
            out_bias: out_bias?,
        })
    }

    fn rope(&mut self, v: &ArgValue) -> Option<Option<Rope>> {
        let default = Rope { theta: 10_000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::None };
        match &v.value {
            Value::Word(w) if w == "none" => Some(None),
            Value::Word(w) if w == "rope" => Some(Some(default)),
            Value::Call(c) if c.callee.name == "rope" => {
                let mut a = Args::new(self, c, &["theta", "style", "scaling"])?;
                let theta = a.pos_float(self, "theta", Some(10_000.0));
                let style = a.word(
                    self,
                    "style",
                    &[("rotate_half", RopeStyle::RotateHalf), ("interleaved", RopeStyle::Interleaved)],
                    RopeStyle::RotateHalf,
                );
                let scaling = match a.take("scaling") {
                    None => Some(RopeScaling::None),
                    Some(ArgValue { value: Value::Word(w), .. }) if w == "none" => Some(RopeScaling::None),
                    Some(ArgValue { value: Value::Call(s), .. }) if s.callee.name == "ntk" => {
                        let mut n = Args::new(self, &s, &["factor", "original_max"])?;
                        let factor = n.pos_float(self, "factor", Some(2.0));
                        let original_max = n.pos_int(self, "original_max", None);
                        n.finish(self);
                        Some(RopeScaling::Ntk { factor: factor?, original_max: original_max? })
                    }
                    Some(other) => {
                        let w = call_as_word(other.value);
                        self.want_word(&w, other.span, "rope `scaling`", &[("none", ()), ("ntk", ())]);
                        None
                    }
                };
                a.finish(self);
                Some(Some(Rope { theta: theta?, style: style?, scaling: scaling? }))
            }
            other => {
                let w = call_as_word(other.clone());
                self.want_word(&w, v.span, "`rope`", &[("rope", ()), ("none", ())]);
                None
            }
        }
    }

    fn deltanet(&mut self, call: &CallValue) -> Option<DeltaNet> {
        let mut a = Args::new(
            self,
            call,
            &["heads", "head_dim", "v_head_dim", "conv", "conv_bias", "qk_l2norm", "norm_eps", "gated"],
        )?;
        let heads = a.pos_int(self, "heads", None);
        let heads_span = a.span_of("heads").unwrap_or(call.span);
        let head_dim = match a.take("head_dim") {
            Some(v) => self.want_size(&v.value, v.span, "`head_dim`", 1),
            None => heads.and_then(|h| self.default_head_dim(h, heads_span, "deltanet")),
        };
        let v_head_dim = match a.take("v_head_dim") {
            Some(v) => self.want_size(&v.value, v.span, "`v_head_dim`", 1),
            None => head_dim,
        };
        let conv = a.pos_int(self, "conv", Some(4));
        let conv_bias = a.bool(self, "conv_bias", false);
        let qk_l2norm = a.bool(self, "qk_l2norm", true);
        let norm_eps = a.pos_float(self, "norm_eps", Some(1e-5));
        let gated = a.bool(self, "gated", false);
        a.finish(self);
        Some(DeltaNet {
            heads: heads?,
            head_dim: head_dim?,
            v_head_dim: v_head_dim?,
            conv: conv?,
            conv_bias: conv_bias?,
            qk_l2norm: qk_l2norm?,
            norm_eps: norm_eps?,
            gated: gated?,
        })
    }

    fn mamba2(&mut self, call: &CallValue) -> Option<Mamba2> {
        let mut a = Args::new(
            self,
            call,
            &[
                "state",
                "expand",
                "inner",
                "head_dim",
                "groups",
                "conv",
                "chunk",
                "conv_bias",
                "proj_bias",
                "dt_min",
                "dt_max",
                "norm_eps",
            ],
        )?;
        let state = a.pos_int(self, "state", Some(128));
        let inner = match (a.take("expand"), a.take("inner")) {
            (Some(e), Some(i)) => {
                self.err(
                    Diagnostic::error(Code::ConflictingParams, i.span, "give either `expand` or `inner`, not both")
                        .with_label("`inner` given here")
                        .with_secondary(e.span, "`expand` given here")
                        .with_help("`inner = expand * hidden`; keep the one you mean"),
                );
                None
            }
            (None, Some(i)) => self.want_size(&i.value, i.span, "`inner`", 1),
            (e, None) => {
                let (ev, espan) = match e {
                    Some(e) => (e.value, e.span),
                    None => (Value::Int(2), call.span),
                };
                let expand = self.want_float(&ev, espan, "`expand`");
                match (expand, self.hidden) {
                    (Some(x), Some(h)) => {
                        let inner = x * h as f64;
                        if x <= 0.0 {
                            self.err(
                                Diagnostic::error(
                                    Code::OutOfRange,
                                    espan,
                                    format!("`expand` must be positive, but it is {x}"),
                                )
                                .with_label("must be positive"),
                            );
                            None
                        } else if inner.fract() != 0.0 {
                            self.err(
                                Diagnostic::error(
                                    Code::NotInteger,
                                    espan,
                                    format!("`expand` × `hidden` must be an integer, but it is {inner}"),
                                )
                                .with_label("gives a fractional inner width")
                                .with_help("give `inner` explicitly"),
                            );
                            None
                        } else if inner > MAX_SIZE as f64 {
                            self.err(
                                Diagnostic::error(
                                    Code::OutOfRange,
                                    espan,
                                    format!("`expand` × `hidden` is too large ({inner})"),
                                )
                                .with_label(format!("the inner width must be at most {MAX_SIZE}")),
                            );
                            None
                        } else {
                            Some(inner as u64)
                        }
                    }
                    _ => None,
                }
            }
        };
        let head_dim = a.pos_int(self, "head_dim", Some(64));
        let groups = a.pos_int(self, "groups", Some(1));
        let conv = a.pos_int(self, "conv", Some(4));
        let chunk = a.pos_int(self, "chunk", Some(256));
        let conv_bias = a.bool(self, "conv_bias", true);
        let proj_bias = a.bool(self, "proj_bias", false);
        let dt_min = match a.take("dt_min") {
            None => Some(0.0),
            Some(v) => match self.want_float(&v.value, v.span, "`dt_min`") {
                Some(f) if f < 0.0 => {
                    self.err(
                        Diagnostic::error(
                            Code::OutOfRange,
                            v.span,
                            format!("`dt_min` must not be negative, but it is {f}"),
                        )
                        .with_label("Δ is a softplus, never negative"),
                    );
                    None
                }
                f => f,
            },
        };
        let dt_max_arg = a.take("dt_max");
        let dt_max = match &dt_max_arg {
            None => Some(None),
            Some(ArgValue { value: Value::Word(w), .. }) if w == "none" => Some(None),
            Some(v) => self.want_pos_float(&v.value, v.span, "`dt_max`").map(Some),
        };
        let norm_eps = a.pos_float(self, "norm_eps", Some(1e-5));
        a.finish(self);
        let (inner, head_dim, groups) = (inner?, head_dim?, groups?);
        if inner % head_dim != 0 {
            self.err(
                Diagnostic::error(
                    Code::ShapeMismatch,
                    a.span_of("head_dim").or(a.span_of("inner")).unwrap_or(call.span),
                    format!("the inner width ({inner}) is not divisible by `head_dim` ({head_dim})"),
                )
                .with_label("Mamba2 splits the inner width into heads of `head_dim`")
                .with_help("choose a `head_dim` that divides the inner width (expand × hidden)"),
            );
            return None;
        }
        let heads = inner / head_dim;
        if heads % groups != 0 {
            self.err(
                Diagnostic::error(
                    Code::ShapeMismatch,
                    a.span_of("groups").unwrap_or(call.span),
                    format!("`groups` ({groups}) does not divide the number of heads ({heads})"),
                )
                .with_label("every group must hold the same number of heads"),
            );
            return None;
        }
        let (dt_min, dt_max) = (dt_min?, dt_max?);
        if let (Some(hi), Some(v)) = (dt_max, &dt_max_arg)
            && hi <= dt_min
        {
            self.err(
                Diagnostic::error(
                    Code::OutOfRange,
                    v.span,
                    format!("`dt_max` ({hi}) must be larger than `dt_min` ({dt_min})"),
                )
                .with_label("empty Δ range"),
            );
            return None;
        }
        Some(Mamba2 {
            state: state?,
            inner,
            head_dim,
            heads,
            groups,
            conv: conv?,
            chunk: chunk?,
            conv_bias: conv_bias?,
            proj_bias: proj_bias?,
            dt_min,
            dt_max,
            norm_eps: norm_eps?,
        })
    }

    fn ffn(&mut self, call: &CallValue) -> Option<Ffn> {
        let mut a = Args::new(self, call, &["inner", "act", "bias"])?;
        let inner = a.pos_int(self, "inner", None);
        let act = a.word(
            self,
            "act",
            &[("swiglu", Activation::Swiglu), ("relu2", Activation::Relu2), ("gelu", Activation::Gelu)],
            Activation::Swiglu,
        );
        let bias = a.bool(self, "bias", false);
        a.finish(self);
        Some(Ffn { inner: inner?, act: act?, bias: bias? })
    }

    // ---------------------------------------------------------------- layers

    fn layers(&mut self, model: &Model) -> Option<Vec<Layer>> {
        let Some(def) = self.defs.get("layers").copied().filter(|d| d.kind == DefKind::Setting) else {
            if !self.defs.contains_key("layers") {
                self.missing_setting("layers", model);
            }
            return None;
        };
        let v = self.eval(def.value)?;
        let mut out = Vec::new();
        self.expand(&v, def.value.span, &mut out).ok()?;
        if out.is_empty() {
            self.err(
                Diagnostic::error(Code::EmptyStack, def.value.span, "the layer stack is empty")
                    .with_label("no layers")
                    .with_help("list at least one op or block, e.g. `layers = [A, F]`"),
            );
            return None;
        }
        Some(
            out.into_iter()
                .enumerate()
                .map(|(index, p)| Layer { index, name: p.name, blocks: p.blocks, op: p.op, span: p.span })
                .collect(),
        )
    }

    /// The flat expansion of a block, computed once. Reports recursion between blocks at the
    /// reference that closes the cycle.
    fn expand_block(&mut self, name: &str, use_span: Span) -> Result<Rc<Vec<ProtoLayer>>, Failed> {
        if let Some(done) = self.expanded.get(name) {
            return done.clone().ok_or(Failed::Reported);
        }
        if let Some(pos) = self.expanding.iter().position(|b| b == name) {
            let chain: Vec<String> = self.expanding[pos..].iter().cloned().chain([name.to_string()]).collect();
            let def_span = self.defs.get(name).map(|d| d.name.span).unwrap_or(use_span);
            self.err(
                Diagnostic::error(Code::RecursiveBlock, use_span, format!("block `{name}` contains itself"))
                    .with_label("used inside its own expansion")
                    .with_secondary(def_span, format!("`{name}` is defined here"))
                    .with_note(format!("the blocks nest as {}", chain.join(" -> "))),
            );
            return Err(Failed::Reported);
        }
        let Some(def) = self.defs.get(name).copied() else { return Err(Failed::Reported) };
        if self.expanding.len() >= MAX_CHAIN_DEPTH {
            self.err(
                Diagnostic::error(Code::TooDeep, use_span, "blocks are nested too deeply")
                    .with_label(format!("more than {MAX_CHAIN_DEPTH} blocks deep")),
            );
            self.expanded.insert(name.to_string(), None);
            return Err(Failed::Reported);
        }
        let Some(body) = self.block_body(name) else {
            self.expanded.insert(name.to_string(), None);
            return Err(Failed::Reported);
        };
        self.expanding.push(name.to_string());
        let mut out = Vec::new();
        let r = self.expand(&body, def.value.span, &mut out);
        self.expanding.pop();
        if let Err(e) = r {
            self.expanded.insert(name.to_string(), None);
            return Err(e);
        }
        let out = Rc::new(out);
        self.expanded.insert(name.to_string(), Some(out.clone()));
        Ok(out)
    }

    /// Appends the layers of `v` (a list, op, block or inline operator) to `out`. Keeps going after an
    /// error so every bad element is reported, then fails.
    fn expand(&mut self, v: &Value, span: Span, out: &mut Vec<ProtoLayer>) -> Result<(), Failed> {
        let mut result = Ok(());
        match v {
            Value::List(items) => {
                for it in items {
                    match self.expand(&it.value, it.span, out) {
                        Err(Failed::TooMany) => return Err(Failed::TooMany),
                        Err(e) => result = Err(e),
                        Ok(()) => {}
                    }
                }
            }
            Value::OpRef(name) => match self.op(name) {
                Some(op) => {
                    let span = self.defs.get(name).map(|d| d.value.span).unwrap_or(span);
                    self.push_layers(out, vec![ProtoLayer { name: name.clone(), blocks: Vec::new(), op, span }], span)?;
                }
                None => result = Err(Failed::Reported),
            },
            Value::Call(c) if OPERATOR_KINDS.contains(&c.callee.name.as_str()) => match self.inline_op(v, span) {
                Some(op) => {
                    let layer = ProtoLayer { name: c.callee.name.clone(), blocks: Vec::new(), op, span };
                    self.push_layers(out, vec![layer], span)?;
                }
                None => result = Err(Failed::Reported),
            },
            Value::BlockRef(name) => {
                let inner = self.expand_block(name, span)?;
                let layers = inner
                    .iter()
                    .map(|p| ProtoLayer {
                        blocks: std::iter::once(name.clone()).chain(p.blocks.iter().cloned()).collect(),
                        ..p.clone()
                    })
                    .collect();
                self.push_layers(out, layers, span)?;
            }
            Value::Word(w) => {
                let candidates: Vec<String> = self
                    .defs
                    .values()
                    .filter(|d| matches!(d.kind, DefKind::Op | DefKind::Block))
                    .map(|d| d.name.name.clone())
                    .collect();
                let mut d = Diagnostic::error(Code::UnknownBlock, span, format!("cannot find op or block `{w}`"))
                    .with_label("not an op or a block");
                d = if OPERATOR_KINDS.contains(&w.as_str()) {
                    d.with_help(format!("to use `{w}` directly, give its parameters: `{w}(...)`"))
                } else {
                    match did_you_mean(w, candidates.iter().map(String::as_str)) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None => d.with_help("define it with `op NAME = ...` or `block NAME = [...]`"),
                    }
                };
                self.err(d);
                result = Err(Failed::Reported);
            }
            Value::Call(c) => {
                let name = c.callee.name.clone();
                self.unknown_operator(&name, c.callee.span);
                result = Err(Failed::Reported);
            }
            other => {
                self.err(
                    Diagnostic::error(
                        Code::NotALayer,
                        span,
                        format!("expected an op or a block, found {}", other.describe()),
                    )
                    .with_label("not a layer"),
                );
                result = Err(Failed::Reported);
            }
        }
        result
    }

    fn push_layers(&mut self, out: &mut Vec<ProtoLayer>, layers: Vec<ProtoLayer>, span: Span) -> Result<(), Failed> {
        if out.len() + layers.len() > MAX_LAYERS {
            self.too_many::<()>(span);
            return Err(Failed::TooMany);
        }
        out.extend(layers);
        Ok(())
    }

    // ---------------------------------------------------------------- train

    fn train(&mut self, model: &'a Model) -> Option<Option<Train>> {
        let sections: Vec<&Item> = model
            .items
            .iter()
            .filter(|i| matches!(&i.kind, ItemKind::Section { name, .. } if name.name == "train"))
            .collect();
        let Some(first) = sections.first() else { return Some(None) };
        if let Some(second) = sections.get(1) {
            self.err(
                Diagnostic::error(Code::DuplicateSetting, second.span, "the `train` section is given twice")
                    .with_label("second `train`")
                    .with_secondary(first.span, "first `train` here"),
            );
            return None;
        }
        let ItemKind::Section { items, .. } = &first.kind else { return Some(None) };
        let mut settings: BTreeMap<&str, (&Ident, &Expr)> = BTreeMap::new();
        let mut ok = true;
        for item in items {
            let ItemKind::Setting { key, value } = &item.kind else {
                let what = match &item.kind {
                    ItemKind::Section { .. } => "a section",
                    _ => "a definition",
                };
                self.err(
                    Diagnostic::error(Code::UnknownSetting, item.span, format!("`train` cannot contain {what}"))
                        .with_label("only settings are allowed here")
                        .with_help("define values at the model level and refer to them by name"),
                );
                ok = false;
                continue;
            };
            if !TRAIN_SETTINGS.contains(&key.name.as_str()) {
                let mut d = Diagnostic::error(
                    Code::UnknownSetting,
                    key.span,
                    format!("unknown training setting `{}`", key.name),
                )
                .with_label("not a training setting");
                d = match did_you_mean(&key.name, TRAIN_SETTINGS.iter().copied()) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => {
                        d.with_help(format!("training settings are {}", list_words(TRAIN_SETTINGS.iter().copied())))
                    }
                };
                self.err(d);
                ok = false;
                continue;
            }
            if let Some((prev, _)) = settings.get(key.name.as_str()) {
                let prev_span = prev.span;
                self.err(
                    Diagnostic::error(
                        Code::DuplicateSetting,
                        key.span,
                        format!("the training setting `{}` is given twice", key.name),
                    )
                    .with_label("given again here")
                    .with_secondary(prev_span, "first given here"),
                );
                ok = false;
                continue;
            }
            settings.insert(key.name.as_str(), (key, value));
        }
        // Each setting is absent (use the default), failed (already reported) or a value.
        let mut got: BTreeMap<&str, Option<(Value, Span)>> = BTreeMap::new();
        for (k, (_, e)) in &settings {
            let v = self.eval(e).map(|v| (v, e.span));
            got.insert(k, v);
        }
        let weight_norm = match got.remove("weight_norm") {
            None => Some(WeightNorm::None),
            Some(None) => None,
            Some(Some((v, s))) => {
                self.want_word(&v, s, "`weight_norm`", &[("none", WeightNorm::None), ("paper", WeightNorm::Paper)])
            }
        };
        let lr = match got.remove("lr") {
            None => Some(1e-3),
            Some(None) => None,
            Some(Some((v, s))) => self.want_pos_float(&v, s, "`lr`"),
        };
        let default_decay = if weight_norm == Some(WeightNorm::Paper) { 0.0 } else { 0.1 };
        let optimizer = match got.remove("optimizer") {
            None => Some(Optimizer::Adam { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }),
            Some(None) => None,
            Some(Some((v, s))) => self.optimizer(v, s, default_decay),
        };
        let schedule = match got.remove("schedule") {
            None => Some(Schedule::Cosine { warmup: 0, min_lr: 0.0 }),
            Some(None) => None,
            Some(Some((v, s))) => self.schedule(v, s),
        };
        let grad_clip = match got.remove("grad_clip") {
            None => Some(Some(1.0)),
            Some(None) => None,
            Some(Some((Value::Word(w), _))) if w == "none" => Some(None),
            Some(Some((v, s))) => self.want_pos_float(&v, s, "`grad_clip`").map(Some),
        };
        let mut int = |r: &mut Self, k: &str, min: i64, default: u64| match got.remove(k) {
            None => Some(default),
            Some(None) => None,
            Some(Some((v, s))) => r.want_int_min(&v, s, &format!("`{k}`"), min),
        };
        let batch = int(self, "batch", 1, 8);
        let seq_len = int(self, "seq_len", 1, 1024);
        let steps = int(self, "steps", 1, 1000);
        let seed = int(self, "seed", 0, 0);

        if let (
            Some(WeightNorm::Paper),
            Some(Optimizer::Adam { weight_decay, .. } | Optimizer::Sgd { weight_decay, .. }),
        ) = (weight_norm, &optimizer)
            && *weight_decay > 0.0
            && let Some((_, e)) = settings.get("optimizer")
        {
            self.err(
                Diagnostic::warning(
                    Code::DecayWithWeightNorm,
                    e.span,
                    format!("weight decay {weight_decay} is combined with `weight_norm = paper`"),
                )
                .with_label("weights are renormalised after every step")
                .with_help("weight normalisation already bounds the weights; use `weight_decay = 0`"),
            );
        }
        if !ok {
            return None;
        }
        Some(Some(Train {
            optimizer: optimizer?,
            lr: lr?,
            schedule: schedule?,
            weight_norm: weight_norm?,
            grad_clip: grad_clip?,
            batch: batch?,
            seq_len: seq_len?,
            steps: steps?,
            seed: seed?,
        }))
    }

    fn optimizer(&mut self, v: Value, span: Span, default_decay: f64) -> Option<Optimizer> {
        let call = match v {
            Value::Call(c) => c,
            Value::Word(w) => CallValue { callee: Ident { name: w, span }, args: Vec::new(), span },
            other => {
                self.want_word(&other, span, "`optimizer`", &[("adam", ()), ("adamw", ()), ("sgd", ())]);
                return None;
            }
        };
        match call.callee.name.as_str() {
            "adam" | "adamw" => {
                let decay = if call.callee.name == "adam" { 0.0 } else { default_decay };
                let mut a = Args::new(self, &call, &["beta1", "beta2", "eps", "weight_decay"])?;
                let beta1 = a.unit_float(self, "beta1", 0.9);
                let beta2 = a.unit_float(self, "beta2", 0.95);
                let eps = a.pos_float(self, "eps", Some(1e-8));
                let weight_decay = a.nonneg_float(self, "weight_decay", decay);
                a.finish(self);
                Some(Optimizer::Adam { beta1: beta1?, beta2: beta2?, eps: eps?, weight_decay: weight_decay? })
            }
            "sgd" => {
                let mut a = Args::new(self, &call, &["momentum", "weight_decay"])?;
                let momentum = a.unit_float(self, "momentum", 0.9);
                let weight_decay = a.nonneg_float(self, "weight_decay", 0.0);
                a.finish(self);
                Some(Optimizer::Sgd { momentum: momentum?, weight_decay: weight_decay? })
            }
            _ => {
                let w = Value::Word(call.callee.name.clone());
                self.want_word(&w, call.callee.span, "`optimizer`", &[("adam", ()), ("adamw", ()), ("sgd", ())]);
                None
            }
        }
    }

    fn schedule(&mut self, v: Value, span: Span) -> Option<Schedule> {
        let call = match v {
            Value::Call(c) => c,
            Value::Word(w) => CallValue { callee: Ident { name: w, span }, args: Vec::new(), span },
            other => {
                self.want_word(&other, span, "`schedule`", &[("constant", ()), ("linear", ()), ("cosine", ())]);
                return None;
            }
        };
        let kind = call.callee.name.clone();
        let known: &[&str] = if kind == "constant" { &["warmup"] } else { &["warmup", "min_lr"] };
        if !matches!(kind.as_str(), "constant" | "linear" | "cosine") {
            let w = Value::Word(kind);
            self.want_word(&w, call.callee.span, "`schedule`", &[("constant", ()), ("linear", ()), ("cosine", ())]);
            return None;
        }
        let mut a = Args::new(self, &call, known)?;
        let warmup = a.int_min(self, "warmup", 0, 0);
        let min_lr = if kind == "constant" { Some(0.0) } else { a.nonneg_float(self, "min_lr", 0.0) };
        a.finish(self);
        let (warmup, min_lr) = (warmup?, min_lr?);
        Some(match kind.as_str() {
            "constant" => Schedule::Constant { warmup },
            "linear" => Schedule::Linear { warmup, min_lr },
            _ => Schedule::Cosine { warmup, min_lr },
        })
    }
}

/// Reads the named arguments of one call: rejects positional and duplicate arguments up front, tracks
/// which names were taken, and reports the rest as unknown in `finish`.
struct Args {
    callee: Ident,
    args: Vec<ArgValue>,
    taken: Vec<bool>,
    known: &'static [&'static str],
    spans: BTreeMap<String, Span>,
}

impl Args {
    fn new(r: &mut Resolver<'_>, call: &CallValue, known: &'static [&'static str]) -> Option<Args> {
        let mut ok = true;
        let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
        for a in &call.args {
            let Some(n) = &a.name else {
                r.err(
                    Diagnostic::error(
                        Code::PositionalArg,
                        a.span,
                        format!("the parameters of `{}` must be named", call.callee.name),
                    )
                    .with_label("this value has no name")
                    .with_help(format!(
                        "write `{} = ...`; `{}` takes {}",
                        known.first().copied().unwrap_or("name"),
                        call.callee.name,
                        list_words(known.iter().copied())
                    )),
                );
                ok = false;
                continue;
            };
            if let Some(prev) = seen.get(n.name.as_str()) {
                r.err(
                    Diagnostic::error(
                        Code::DuplicateParam,
                        n.span,
                        format!("the parameter `{}` is given twice", n.name),
                    )
                    .with_label("given again here")
                    .with_secondary(*prev, "first given here"),
                );
                ok = false;
                continue;
            }
            seen.insert(n.name.as_str(), n.span);
        }
        let spans = call.args.iter().filter_map(|a| a.name.as_ref().map(|n| (n.name.clone(), a.span))).collect();
        ok.then(|| Args {
            callee: call.callee.clone(),
            taken: vec![false; call.args.len()],
            args: call.args.clone(),
            known,
            spans,
        })
    }

    fn take(&mut self, name: &str) -> Option<ArgValue> {
        let i = self.args.iter().position(|a| a.name.as_ref().is_some_and(|n| n.name == name))?;
        self.taken[i] = true;
        Some(self.args[i].clone())
    }

    fn span_of(&self, name: &str) -> Option<Span> {
        self.spans.get(name).copied()
    }

    fn missing(&self, r: &mut Resolver<'_>, name: &str) {
        r.err(
            Diagnostic::error(
                Code::MissingParam,
                self.callee.span,
                format!("`{}` is missing the required parameter `{name}`", self.callee.name),
            )
            .with_label(format!("`{name}` is required"))
            .with_help(format!("add `{name} = ...`")),
        );
    }

    fn pos_int(&mut self, r: &mut Resolver<'_>, name: &str, default: Option<u64>) -> Option<u64> {
        match self.take(name) {
            Some(v) => r.want_size(&v.value, v.span, &format!("`{name}`"), 1),
            None => {
                if default.is_none() {
                    self.missing(r, name);
                }
                default
            }
        }
    }

    fn int_min(&mut self, r: &mut Resolver<'_>, name: &str, min: i64, default: u64) -> Option<u64> {
        match self.take(name) {
            Some(v) => r.want_int_min(&v.value, v.span, &format!("`{name}`"), min),
            None => Some(default),
        }
    }

    fn pos_float(&mut self, r: &mut Resolver<'_>, name: &str, default: Option<f64>) -> Option<f64> {
        match self.take(name) {
            Some(v) => r.want_pos_float(&v.value, v.span, &format!("`{name}`")),
            None => {
                if default.is_none() {
                    self.missing(r, name);
                }
                default
            }
        }
    }

    fn nonneg_float(&mut self, r: &mut Resolver<'_>, name: &str, default: f64) -> Option<f64> {
        let Some(v) = self.take(name) else { return Some(default) };
        let f = r.want_float(&v.value, v.span, &format!("`{name}`"))?;
        if f < 0.0 {
            r.err(
                Diagnostic::error(Code::OutOfRange, v.span, format!("`{name}` must not be negative, but it is {f}"))
                    .with_label("must be zero or more"),
            );
            return None;
        }
        Some(f)
    }

    /// A float in [0, 1).
    fn unit_float(&mut self, r: &mut Resolver<'_>, name: &str, default: f64) -> Option<f64> {
        let Some(v) = self.take(name) else { return Some(default) };
        let f = r.want_float(&v.value, v.span, &format!("`{name}`"))?;
        if !(0.0..1.0).contains(&f) {
            r.err(
                Diagnostic::error(Code::OutOfRange, v.span, format!("`{name}` must be in [0, 1), but it is {f}"))
                    .with_label("out of range"),
            );
            return None;
        }
        Some(f)
    }

    fn bool(&mut self, r: &mut Resolver<'_>, name: &str, default: bool) -> Option<bool> {
        match self.take(name) {
            Some(v) => r.want_bool(&v.value, v.span, &format!("`{name}`")),
            None => Some(default),
        }
    }

    fn word<T: Copy>(&mut self, r: &mut Resolver<'_>, name: &str, choices: &[(&str, T)], default: T) -> Option<T> {
        match self.take(name) {
            Some(v) => r.want_word(&v.value, v.span, &format!("`{name}`"), choices),
            None => Some(default),
        }
    }

    /// Reports every argument nobody asked for.
    fn finish(&self, r: &mut Resolver<'_>) {
        for (a, taken) in self.args.iter().zip(&self.taken) {
            if *taken {
                continue;
            }
            let Some(n) = &a.name else { continue };
            let mut d = Diagnostic::error(
                Code::UnknownParam,
                n.span,
                format!("`{}` has no parameter `{}`", self.callee.name, n.name),
            )
            .with_label("unknown parameter");
            d = match did_you_mean(&n.name, self.known.iter().copied()) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d.with_help(format!("`{}` takes {}", self.callee.name, list_words(self.known.iter().copied()))),
            };
            r.err(d);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Num::Int(i) => Value::Int(i),
            Num::Float(f) => Value::Float(f),
        }
    }
}

/// The number of elements of a value with nested lists counted element by element.
fn flat_len(v: &Value) -> usize {
    match v {
        Value::List(items) => items.iter().map(|x| flat_len(&x.value)).fold(0usize, usize::saturating_add),
        _ => 1,
    }
}

fn num(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        _ => f64::NAN,
    }
}

/// A call where a plain word is expected is reported by its name (`foo(...)` → `foo`).
fn call_as_word(v: Value) -> Value {
    match v {
        Value::Call(c) => Value::Word(c.callee.name),
        v => v,
    }
}

fn is_reserved(name: &str) -> bool {
    MODEL_SETTINGS.iter().any(|(k, _)| *k == name)
        || OPERATOR_KINDS.contains(&name)
        || BUILTIN_FUNCTIONS.contains(&name)
        || RESERVED_WORDS.contains(&name)
}

/// `a`, `a` or `b`, `a`, `b` or `c`.
fn list_words<'w>(words: impl Iterator<Item = &'w str>) -> String {
    let words: Vec<String> = words.map(|w| format!("`{w}`")).collect();
    match words.len() {
        0 => String::new(),
        1 => words[0].clone(),
        n => format!("{} or {}", words[..n - 1].join(", "), words[n - 1]),
    }
}
