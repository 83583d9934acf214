//! import_hf: the `flashc import-hf` front end — a Hugging Face `config.json` becomes `.arch` text.
//!
//! Supported `model_type`s: `nemotron_flash` (Nemotron-Flash, remote code), `qwen3`, `mamba2` and
//! `nemotron_h`. Each family reader takes every size and option from the config; a key that is absent
//! gets the default of the family's Python config class (or of the reference notes), and the output
//! lists every such key in a comment, so that nothing is silently invented. Keys that decide the shape
//! of the model (vocabulary, widths, head counts, the layer list) are required.
//!
//! Every flashc layer is one pre-norm residual operator, so an HF decoder layer holding attention and
//! an MLP becomes two flashc layers. The per-layer operators are deduplicated into named `op`s
//! (`A`, `SWA`, `D`, `M2`, `F`, numbered when one kind has several variants) and the layer stack is
//! written compactly: a periodic stack becomes `block L = [...]` and `layers = [L] * n`; otherwise
//! the stack is cut into fixed-size blocks (or left as operators) and the sequence is written with
//! `[..] * n` runs joined by `++`, choosing the cheapest description under a simple size measure.
//!
//! Guarantees: no input makes these functions panic (JSON is parsed by serde_json after the
//! non-standard tokens `NaN`, `Infinity` and `-Infinity` that Python writes are rewritten outside
//! strings; sizes are checked and multiplied with overflow checks; the layer count is bounded by
//! [`MAX_LAYERS`]); the output depends only on the input (no hash-order dependence); every failure
//! is an [`ImportError`] whose one-line message names the file and the offending key or option.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::spec::{
    Activation, Attention, DType, DeltaNet, Ffn, Logits, Mamba2, Operator, Rope, RopeScaling, RopeStyle,
};

/// The largest number of flashc layers an import may produce.
pub const MAX_LAYERS: usize = 4096;

/// Why a config could not be imported. Displays as `FILE: MESSAGE` on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportError {
    file: String,
    message: String,
}

impl ImportError {
    fn new(file: &str, message: String) -> Self {
        ImportError { file: file.to_string(), message }
    }

    /// The file the error is about (`config.json`, or the full path for [`import_dir`]).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The message, without the file name.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for ImportError {}

/// Converts the text of a `config.json` into `.arch` text for a model named `model_name`.
///
/// A `model_name` that is already an identifier (`[A-Za-z_][A-Za-z0-9_]*`) is used as is; any other
/// name is normalised as directory names are (see [`import_dir`]). Errors name `config.json`.
pub fn import_config(config_json: &str, model_name: &str) -> Result<String, ImportError> {
    let ident = if is_identifier(model_name) { model_name.to_string() } else { model_identifier(model_name) };
    convert(config_json, model_name, &ident).map_err(|m| ImportError::new("config.json", m))
}

/// Reads `DIR/config.json` and converts it; the model is named after the directory (lowercased,
/// every character other than an ASCII letter or digit replaced by `_`, prefixed by `m_` when it
/// would start with a digit). Errors name the full path of the config file.
pub fn import_dir(dir: &Path) -> Result<String, ImportError> {
    let path = dir.join("config.json");
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(&path).map_err(|e| ImportError::new(&file, format!("cannot read the file: {e}")))?;
    let title = directory_title(dir);
    convert(&text, &title, &model_identifier(&title)).map_err(|m| ImportError::new(&file, m))
}

/// The directory's own name, or that of its canonical path (for `.` and the like).
fn directory_title(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(dir)
        .filter(|n| n != "." && n != "..")
        .or_else(|| dir.canonicalize().ok().and_then(|p| named(&p)))
        .unwrap_or_else(|| "model".to_string())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => chars.all(|c| c.is_ascii_alphanumeric() || c == '_'),
        _ => false,
    }
}

/// Lowercase; non-alphanumerics become `_`; a leading digit gets an `m_` prefix; empty becomes `model`.
fn model_identifier(name: &str) -> String {
    let mut id: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    if id.is_empty() {
        id = "model".to_string();
    }
    if id.starts_with(|c: char| c.is_ascii_digit()) {
        id.insert_str(0, "m_");
    }
    id
}

type Res<T> = Result<T, String>;

fn convert(text: &str, title: &str, ident: &str) -> Res<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: Value = serde_json::from_str(&rewrite_non_finite(text)).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(map) = value.as_object() else {
        return Err(format!("expected a JSON object at the top level, found {}", kind_of(&value)));
    };
    let cfg = Obj { map, path: String::new() };
    let model_type = cfg.req_str("model_type")?;
    let mut defaults = Defaults::default();
    let model = match model_type {
        "nemotron_flash" => nemotron_flash(&cfg, &mut defaults)?,
        "qwen3" => qwen3(&cfg, &mut defaults)?,
        "mamba2" => mamba2_family(&cfg, &mut defaults)?,
        "nemotron_h" => nemotron_h(&cfg, &mut defaults)?,
        other => {
            return Err(format!(
                "unsupported model_type {other:?} (supported: nemotron_flash, qwen3, mamba2, nemotron_h)"
            ));
        }
    };
    if model.layers.is_empty() {
        return Err("the model has no layers".to_string());
    }
    if model.layers.len() > MAX_LAYERS {
        return Err(format!("the model has {} layers; at most {MAX_LAYERS} are supported", model.layers.len()));
    }
    Ok(render(&model, title, ident, model_type, &defaults))
}

// ---------------------------------------------------------------------------------------------------
// JSON access
// ---------------------------------------------------------------------------------------------------

/// Rewrites the bare tokens `NaN`, `Infinity` and `-Infinity` (outside strings) into the
/// `{"__float__": "..."}` objects that transformers 5 writes, which serde_json can parse.
fn rewrite_non_finite(text: &str) -> String {
    const TOKENS: [(&str, &str); 3] = [
        ("-Infinity", r#"{"__float__":"-Infinity"}"#),
        ("Infinity", r#"{"__float__":"Infinity"}"#),
        ("NaN", r#"{"__float__":"NaN"}"#),
    ];
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut skip = 0usize;
    for (i, c) in text.char_indices() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            out.push(c);
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            continue;
        }
        let rest = text.get(i..).unwrap_or("");
        if let Some((token, replacement)) = TOKENS.iter().find(|(t, _)| rest.starts_with(t)) {
            out.push_str(replacement);
            skip = token.len() - 1;
            continue;
        }
        out.push(c);
    }
    out
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let ellipsis = if s.chars().count() > 40 { "..." } else { "" };
            format!("the string {:?}", format!("{short}{ellipsis}"))
        }
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(o) if o.contains_key("__float__") => "a non-finite float object".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// A float from a JSON number or a `{"__float__": "Infinity" | "-Infinity" | "NaN"}` object.
fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Object(o) if o.len() == 1 => match o.get("__float__").and_then(Value::as_str)? {
            "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            "NaN" | "nan" => Some(f64::NAN),
            _ => None,
        },
        _ => None,
    }
}

/// A JSON object being read, with its path for messages (`""` at the top, `"rope_parameters."` below).
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{}", self.path, key)
    }

    /// The value of `key`; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn wrong(&self, key: &str, want: &str, found: &Value) -> String {
        format!("key {:?} must be {want}, found {}", self.name(key), kind_of(found))
    }

    fn missing(&self, key: &str) -> String {
        format!("missing required key {:?}", self.name(key))
    }

    fn u64(&self, key: &str) -> Res<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// A positive integer.
    fn pos(&self, key: &str) -> Res<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.wrong(key, "a positive integer", v)),
            },
        }
    }

    fn req_pos(&self, key: &str) -> Res<u64> {
        self.pos(key)?.ok_or_else(|| self.missing(key))
    }

    /// Any number, including the non-finite float objects.
    fn float(&self, key: &str) -> Res<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_float(v).map(Some).ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// A finite positive number.
    fn pos_float(&self, key: &str) -> Res<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match as_float(v) {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(self.wrong(key, "a finite positive number", v)),
            },
        }
    }

    fn bool(&self, key: &str) -> Res<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    fn str(&self, key: &str) -> Res<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    fn req_str(&self, key: &str) -> Res<&'a str> {
        self.str(key)?.ok_or_else(|| self.missing(key))
    }

    fn array(&self, key: &str) -> Res<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| self.wrong(key, "an array", v)),
        }
    }

    /// An array of strings.
    fn strings(&self, key: &str) -> Res<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| self.wrong(&format!("{key}[{i}]"), "a string", v)))
            .collect::<Res<Vec<_>>>()
            .map(Some)
    }

    fn obj(&self, key: &str) -> Res<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_object() {
                Some(map) => Ok(Some(Obj { map, path: format!("{}.", self.name(key)) })),
                None => Err(self.wrong(key, "an object", v)),
            },
        }
    }
}

/// The keys that were absent and given their default, in the order they were read.
#[derive(Default)]
struct Defaults {
    used: Vec<String>,
}

impl Defaults {
    /// `value`, or `default` (recorded as `key = shown`) when absent.
    fn or<T>(&mut self, value: Option<T>, key: &str, default: T, shown: &str) -> T {
        match value {
            Some(v) => v,
            None => {
                let note = format!("{key} = {shown}");
                if !self.used.contains(&note) {
                    self.used.push(note);
                }
                default
            }
        }
    }

    fn u64(&mut self, cfg: &Obj, key: &str, default: u64) -> Res<u64> {
        Ok(self.or(cfg.u64(key)?, key, default, &default.to_string()))
    }

    fn pos(&mut self, cfg: &Obj, key: &str, default: u64) -> Res<u64> {
        Ok(self.or(cfg.pos(key)?, key, default, &default.to_string()))
    }

    fn pos_float(&mut self, cfg: &Obj, key: &str, default: f64) -> Res<f64> {
        Ok(self.or(cfg.pos_float(key)?, key, default, &float_text(default)))
    }

    fn bool(&mut self, cfg: &Obj, key: &str, default: bool) -> Res<bool> {
        Ok(self.or(cfg.bool(key)?, key, default, &default.to_string()))
    }

    fn str<'a>(&mut self, cfg: &Obj<'a>, key: &str, default: &'a str) -> Res<&'a str> {
        Ok(self.or(cfg.str(key)?, key, default, &format!("{default:?}")))
    }

    /// A `time_step_limit`-style `[min, max]`; unbounded `[0.0, Infinity]` when absent.
    fn dt_limit(&mut self, cfg: &Obj, key: &str) -> Res<(f64, Option<f64>)> {
        Ok(self.or(dt_limit(cfg, key)?, key, (0.0, None), "[0.0, Infinity]"))
    }
}

// ---------------------------------------------------------------------------------------------------
// Shared readers
// ---------------------------------------------------------------------------------------------------

/// What a family reader produces.
struct Imported {
    vocab: u64,
    hidden: u64,
    tie: bool,
    meta_tokens: u64,
    max_seq: u64,
    dtype: DType,
    norm_eps: f64,
    logits: Logits,
    /// Extra comment lines (without `//`).
    notes: Vec<String>,
    layers: Vec<Operator>,
}

fn dtype(cfg: &Obj, d: &mut Defaults) -> Res<DType> {
    // transformers 5 writes `dtype`, older versions `torch_dtype`.
    let key = if cfg.has("torch_dtype") && !cfg.has("dtype") { "torch_dtype" } else { "dtype" };
    match d.str(cfg, key, "bfloat16")? {
        "bfloat16" | "bf16" => Ok(DType::Bf16),
        "float16" | "fp16" | "f16" | "half" => Ok(DType::F16),
        "float32" | "fp32" | "f32" | "float" => Ok(DType::F32),
        other => Err(format!("unsupported {key} {other:?} (supported: bfloat16, float16, float32)")),
    }
}

/// `num_key_value_heads`; absent or null means one KV head per query head, as the config classes read it.
fn kv_heads(cfg: &Obj, d: &mut Defaults, heads: u64) -> Res<u64> {
    Ok(d.or(cfg.pos("num_key_value_heads")?, "num_key_value_heads", heads, "num_attention_heads"))
}

fn checked_mul(a: u64, b: u64, what: &str) -> Res<u64> {
    a.checked_mul(b).ok_or_else(|| format!("{what} overflows ({a} × {b})"))
}

/// The number of HF decoder layers, bounded so that the flashc stack stays within [`MAX_LAYERS`].
fn layer_count(cfg: &Obj, key: &str, flashc_per_layer: u64) -> Res<usize> {
    let n = cfg.req_pos(key)?;
    let limit = (MAX_LAYERS as u64) / flashc_per_layer.max(1);
    if n > limit {
        return Err(format!("key {key:?} = {n} is too large (at most {limit} are supported)"));
    }
    usize::try_from(n).map_err(|_| format!("key {key:?} = {n} is too large"))
}

/// `[min, max]` of a `time_step_limit`-style key: `(dt_min, dt_max)` with `None` for an unbounded max.
fn dt_limit(cfg: &Obj, key: &str) -> Res<Option<(f64, Option<f64>)>> {
    let Some(items) = cfg.array(key)? else {
        return Ok(None);
    };
    let bad = || format!("key {key:?} must be [min, max] with 0 <= min < max (max may be Infinity)");
    let [lo, hi] = items.as_slice() else {
        return Err(bad());
    };
    let (Some(lo), Some(hi)) = (as_float(lo), as_float(hi)) else {
        return Err(bad());
    };
    if !(lo.is_finite() && lo >= 0.0 && hi > lo) {
        return Err(bad());
    }
    Ok(Some((lo, if hi.is_finite() { Some(hi) } else { None })))
}

/// RoPE θ of the standard transformers layouts: `rope_parameters.rope_theta` (transformers 5) or the
/// top-level `rope_theta` (older files). Any scaling other than `default` is refused.
fn standard_rope_theta(cfg: &Obj, d: &mut Defaults) -> Res<f64> {
    if let Some(rp) = cfg.obj("rope_parameters")? {
        let kind_key = if rp.has("rope_type") { "rope_type" } else { "type" };
        match rp.str(kind_key)? {
            None | Some("default") => {}
            Some(other) => {
                return Err(format!(
                    "unsupported {:?} {other:?} (only \"default\" RoPE is supported)",
                    rp.name(kind_key)
                ));
            }
        }
        if let Some(theta) = rp.pos_float("rope_theta")? {
            return Ok(theta);
        }
    }
    if let Some(rs) = cfg.obj("rope_scaling")? {
        let kind_key = if rs.has("rope_type") { "rope_type" } else { "type" };
        match rs.str(kind_key)? {
            None | Some("default") => {}
            Some(other) => {
                return Err(format!(
                    "unsupported {:?} {other:?} (only \"default\" RoPE is supported)",
                    rs.name(kind_key)
                ));
            }
        }
    }
    d.pos_float(cfg, "rope_theta", 10000.0)
}

fn check_attention(a: &Attention, heads_key: &str, kv_key: &str) -> Res<()> {
    if !a.heads.is_multiple_of(a.kv_heads) {
        return Err(format!(
            "{kv_key:?} = {} must divide {heads_key:?} = {} (grouped-query attention)",
            a.kv_heads, a.heads
        ));
    }
    if let Some(rope) = &a.rope {
        if !a.head_dim.is_multiple_of(2) || a.head_dim < 4 {
            return Err(format!("RoPE needs an even head_dim of at least 4, found {}", a.head_dim));
        }
        if !(rope.theta.is_finite() && rope.theta > 1.0) {
            return Err(format!("RoPE theta must be a finite number above 1, found {}", rope.theta));
        }
    }
    Ok(())
}

fn check_mamba(m: &Mamba2, groups_key: &str) -> Res<()> {
    if !m.inner.is_multiple_of(m.head_dim) || m.inner / m.head_dim != m.heads {
        return Err(format!(
            "Mamba2 heads ({}) × head_dim ({}) must equal the inner width ({})",
            m.heads, m.head_dim, m.inner
        ));
    }
    if !m.heads.is_multiple_of(m.groups) {
        return Err(format!("{groups_key:?} = {} must divide the Mamba2 head count {}", m.groups, m.heads));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Families
// ---------------------------------------------------------------------------------------------------

/// Nemotron-Flash (`model_type: nemotron_flash`, NVIDIA remote code).
fn nemotron_flash(cfg: &Obj, d: &mut Defaults) -> Res<Imported> {
    let vocab = cfg.req_pos("vocab_size")?;
    let hidden = cfg.req_pos("hidden_size")?;
    let kinds = cfg.strings("layer_types")?.ok_or_else(|| cfg.missing("layer_types"))?;
    if kinds.len() > MAX_LAYERS {
        return Err(format!("key \"layer_types\" has {} entries; at most {MAX_LAYERS} are supported", kinds.len()));
    }
    for (i, k) in kinds.iter().enumerate() {
        if !matches!(*k, "deltanet" | "m" | "m2" | "a" | "f") {
            return Err(format!(
                "unsupported layer type {k:?} in \"layer_types[{i}]\" (supported: deltanet, m2, a, f)"
            ));
        }
    }
    if let Some(n) = cfg.u64("num_hidden_layers")?
        && n != kinds.len() as u64
    {
        return Err(format!(
            "key \"num_hidden_layers\" = {n} does not match the {} entries of \"layer_types\"",
            kinds.len()
        ));
    }
    let has = |names: &[&str]| kinds.iter().any(|k| names.contains(k));

    // Mixer-internal MLPs: the remote code adds an MLP to every mixer layer when intermediate_size > 0.
    match cfg.u64("intermediate_size")? {
        Some(0) => {}
        Some(n) => {
            return Err(format!(
                "key \"intermediate_size\" = {n} adds an MLP inside every mixer layer, which is unsupported \
                 (must be 0; FFNs are separate \"f\" layers)"
            ));
        }
        None => {
            return Err("missing required key \"intermediate_size\" (must be 0: the class default 14336 adds \
                        an MLP inside every mixer layer, which is unsupported)"
                .to_string());
        }
    }

    let eps = d.pos_float(cfg, "rms_norm_eps", 1e-6)?;
    let max_seq = d.pos(cfg, "max_position_embeddings", 262144)?;
    let meta_tokens = d.u64(cfg, "num_memory_tokens", 0)?;
    let tie = d.bool(cfg, "tie_word_embeddings", false)?;
    let dtype = dtype(cfg, d)?;
    let mut notes = Vec::new();

    let heads = if has(&["deltanet", "a"]) { Some(cfg.req_pos("num_attention_heads")?) } else { None };

    let deltanet = match heads {
        Some(heads) if has(&["deltanet"]) => {
            if !hidden.is_multiple_of(heads) {
                return Err(format!(
                    "DeltaNet needs \"num_attention_heads\" = {heads} to divide \"hidden_size\" = {hidden}"
                ));
            }
            let head_dim = hidden / heads;
            Some(Operator::DeltaNet(DeltaNet {
                heads,
                head_dim,
                v_head_dim: head_dim,
                conv: 4,
                conv_bias: false,
                qk_l2norm: true,
                norm_eps: 1e-5,
                gated: false,
            }))
        }
        _ => None,
    };

    let mamba = if has(&["m", "m2"]) {
        let state = d.pos(cfg, "mamba_d_state", 16)?;
        let expand = d.pos(cfg, "mamba_expand", 2)?;
        let head_dim = d.pos(cfg, "mamba2_headdim", 64)?;
        let conv_key = if cfg.has("d_conv") && !cfg.has("mamba_d_conv") { "d_conv" } else { "mamba_d_conv" };
        let conv = d.pos(cfg, conv_key, 4)?;
        let inner = checked_mul(expand, hidden, "mamba_expand × hidden_size")?;
        if !inner.is_multiple_of(head_dim) {
            return Err(format!(
                "\"mamba2_headdim\" = {head_dim} must divide the Mamba2 inner width {inner} (mamba_expand × hidden_size)"
            ));
        }
        let m = Mamba2 {
            state,
            inner,
            head_dim,
            heads: inner / head_dim,
            groups: 1,
            conv,
            chunk: 256,
            conv_bias: true,
            proj_bias: false,
            dt_min: 0.0,
            dt_max: None,
            norm_eps: 1e-5,
        };
        check_mamba(&m, "ngroups")?;
        Some(Operator::Mamba2(m))
    } else {
        None
    };

    let mut full_attention = None;
    let mut window = None;
    if let Some(heads) = heads.filter(|_| has(&["a"])) {
        let kv_heads = kv_heads(cfg, d, heads)?;
        let width = match cfg.get("attn_hidden_size") {
            None => hidden,
            Some(v) => match v.as_i64() {
                Some(w) if w <= 0 => hidden,
                Some(w) if w as u64 == hidden => hidden,
                Some(w) => {
                    return Err(format!(
                        "key \"attn_hidden_size\" = {w} differs from \"hidden_size\" = {hidden}, which is unsupported"
                    ));
                }
                None => return Err(cfg.wrong("attn_hidden_size", "an integer", v)),
            },
        };
        if !width.is_multiple_of(heads) {
            return Err(format!("\"num_attention_heads\" = {heads} must divide \"hidden_size\" = {hidden}"));
        }
        let head_dim = width / heads;
        for key in ["kq_head_dim", "v_head_dim"] {
            if let Some(v) = cfg.get(key) {
                match v.as_i64() {
                    Some(x) if x <= 0 || x as u64 == head_dim => {}
                    Some(x) => {
                        return Err(format!(
                            "key {key:?} = {x} differs from the attention head width {head_dim}, which is unsupported"
                        ));
                    }
                    None => return Err(cfg.wrong(key, "an integer", v)),
                }
            }
        }
        let qk_norm = match d.str(cfg, "kq_norm", "none")? {
            "none" => false,
            "rms" => true,
            other => {
                return Err(format!("unsupported kq_norm {other:?} (supported: none, rms)"));
            }
        };
        if qk_norm && eps != 1e-6 {
            notes.push(
                "note: the remote code's q/k RMSNorm uses eps 1e-6; flashc uses the model norm's eps".to_string(),
            );
        }
        let rope = if d.bool(cfg, "rope", false)? {
            let theta = d.pos_float(cfg, "rope_theta", 10000.0)?;
            let scaling = match d.str(cfg, "rope_type", "default")? {
                "default" | "none" => RopeScaling::None,
                "ntk" => {
                    let original_max = cfg.pos("orig_max_position_embeddings")?.ok_or_else(|| {
                        cfg.missing("orig_max_position_embeddings") + " (needed by rope_type \"ntk\")"
                    })?;
                    RopeScaling::Ntk { factor: 2.0, original_max }
                }
                other => {
                    return Err(format!("unsupported rope_type {other:?} (supported: default, ntk)"));
                }
            };
            Some(Rope { theta, style: RopeStyle::RotateHalf, scaling })
        } else {
            None
        };
        let a = Attention { heads, kv_heads, head_dim, rope, window: None, qk_norm, qkv_bias: false, out_bias: false };
        check_attention(&a, "num_attention_heads", "num_key_value_heads")?;
        if let Some(w) = cfg.pos("sliding_window")? {
            let global: Vec<u64> = match cfg.array("global_attn_idx")? {
                None => Vec::new(),
                Some(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_u64().ok_or_else(|| cfg.wrong(&format!("global_attn_idx[{i}]"), "a layer index", v))
                    })
                    .collect::<Res<_>>()?,
            };
            window = Some((w, global));
        }
        full_attention = Some(a);
    }

    let ffn = if has(&["f"]) {
        let inner = match cfg.float("ffn_expand_ratio")? {
            None => return Err(cfg.missing("ffn_expand_ratio") + " (\"f\" layers need it)"),
            Some(r) if r.is_finite() && r > 0.0 && r * (hidden as f64) < 1e15 => {
                // int(ratio · hidden) // 128 · 128, as the remote code computes it.
                ((r * hidden as f64).floor() as u64) / 128 * 128
            }
            Some(_) => {
                return Err("key \"ffn_expand_ratio\" must be a finite positive number".to_string());
            }
        };
        if inner == 0 {
            return Err(
                "key \"ffn_expand_ratio\" gives an FFN width of 0 (int(ratio · hidden) // 128 · 128)".to_string()
            );
        }
        let act = match d.str(cfg, "mlp_hidden_act", "silu")? {
            "silu" | "swish" => Activation::Swiglu,
            "relu2" => Activation::Relu2,
            other => {
                return Err(format!("unsupported mlp_hidden_act {other:?} (supported: silu, relu2)"));
            }
        };
        Some(Operator::Ffn(Ffn { inner, act, bias: false }))
    } else {
        None
    };

    if deltanet.is_some() {
        notes.push(
            "DeltaNet: heads = num_attention_heads, head_dim = hidden_size / heads; conv 4 without bias and \
             o_norm eps 1e-5 are fixed by the remote code"
                .to_string(),
        );
    }
    if mamba.is_some() {
        notes.push(
            "Mamba2: groups 1, chunk 256, conv bias on, no projection bias, no dt clamp are fixed by the \
             remote code (mamba_conv_bias / mamba_proj_bias are not read by it)"
                .to_string(),
        );
    }
    let mut layers = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        let op = match *k {
            "deltanet" => deltanet.clone(),
            "m" | "m2" => mamba.clone(),
            "a" => full_attention.clone().map(|mut a| {
                if let Some((w, global)) = &window
                    && !global.contains(&(i as u64))
                {
                    a.window = Some(*w);
                }
                Operator::Attention(a)
            }),
            _ => ffn.clone(),
        };
        layers.push(op.ok_or_else(|| format!("internal: no operator for layer type {k:?}"))?);
    }

    Ok(Imported {
        vocab,
        hidden,
        tie,
        meta_tokens,
        max_seq,
        dtype,
        norm_eps: eps,
        logits: Logits::RowNormalized,
        notes,
        layers,
    })
}

/// Qwen3 (`model_type: qwen3`): attention with per-head q/k RMSNorm, then a SwiGLU MLP.
fn qwen3(cfg: &Obj, d: &mut Defaults) -> Res<Imported> {
    let vocab = cfg.req_pos("vocab_size")?;
    let hidden = cfg.req_pos("hidden_size")?;
    let inner = cfg.req_pos("intermediate_size")?;
    let n = layer_count(cfg, "num_hidden_layers", 2)?;
    let heads = cfg.req_pos("num_attention_heads")?;
    let kv_heads = kv_heads(cfg, d, heads)?;
    let head_dim = d.pos(cfg, "head_dim", 128)?;
    let eps = d.pos_float(cfg, "rms_norm_eps", 1e-6)?;
    let theta = standard_rope_theta(cfg, d)?;
    let bias = d.bool(cfg, "attention_bias", false)?;
    match d.str(cfg, "hidden_act", "silu")? {
        "silu" | "swish" => {}
        other => {
            return Err(format!("unsupported hidden_act {other:?} (Qwen3's gated MLP supports silu)"));
        }
    }
    let tie = d.bool(cfg, "tie_word_embeddings", false)?;
    let max_seq = d.pos(cfg, "max_position_embeddings", 32768)?;
    let dtype = dtype(cfg, d)?;

    // Sliding windows, as Qwen3Config resolves them: the window exists only with use_sliding_window,
    // and applies to the "sliding_attention" layers (by default, layers from max_window_layers on).
    let window = if d.bool(cfg, "use_sliding_window", false)? {
        // An explicit null means no window; only an absent key takes the class default.
        if cfg.map.contains_key("sliding_window") {
            cfg.pos("sliding_window")?
        } else {
            Some(d.pos(cfg, "sliding_window", 4096)?)
        }
    } else {
        None
    };
    let sliding: Vec<bool> = match cfg.strings("layer_types")? {
        Some(types) => {
            if types.len() != n {
                return Err(format!("key \"layer_types\" has {} entries but \"num_hidden_layers\" = {n}", types.len()));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match *t {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => Err(format!(
                        "unsupported layer type {other:?} in \"layer_types[{i}]\" \
                         (supported: full_attention, sliding_attention)"
                    )),
                })
                .collect::<Res<_>>()?
        }
        None => {
            let first = if window.is_some() { d.u64(cfg, "max_window_layers", 28)? } else { u64::MAX };
            (0..n).map(|i| i as u64 >= first).collect()
        }
    };

    let attention = Attention {
        heads,
        kv_heads,
        head_dim,
        rope: Some(Rope { theta, style: RopeStyle::RotateHalf, scaling: RopeScaling::None }),
        window: None,
        qk_norm: true,
        qkv_bias: bias,
        out_bias: bias,
    };
    check_attention(&attention, "num_attention_heads", "num_key_value_heads")?;
    let ffn = Operator::Ffn(Ffn { inner, act: Activation::Swiglu, bias: false });
    let mut layers = Vec::with_capacity(2 * n);
    for is_sliding in sliding {
        let mut a = attention.clone();
        if is_sliding {
            a.window = window;
        }
        layers.push(Operator::Attention(a));
        layers.push(ffn.clone());
    }
    Ok(Imported {
        vocab,
        hidden,
        tie,
        meta_tokens: 0,
        max_seq,
        dtype,
        norm_eps: eps,
        logits: Logits::Plain,
        notes: Vec::new(),
        layers,
    })
}

/// Mamba2 (`model_type: mamba2`): a stack of Mamba2 mixers only.
fn mamba2_family(cfg: &Obj, d: &mut Defaults) -> Res<Imported> {
    let vocab = cfg.req_pos("vocab_size")?;
    let hidden = cfg.req_pos("hidden_size")?;
    let n = layer_count(cfg, "num_hidden_layers", 1)?;
    let state = cfg.req_pos("state_size")?;
    let head_dim = cfg.req_pos("head_dim")?;
    let heads = cfg.req_pos("num_heads")?;
    let inner = match cfg.get("expand") {
        None => return Err(cfg.missing("expand")),
        Some(v) => match (v.as_u64(), as_float(v)) {
            (Some(e), _) if e > 0 => checked_mul(e, hidden, "expand × hidden_size")?,
            // int(expand · hidden_size), as transformers computes the inner width.
            (None, Some(e)) if e.is_finite() && e > 0.0 && e * (hidden as f64) < 1e15 => {
                (e * hidden as f64).floor() as u64
            }
            _ => return Err(cfg.wrong("expand", "a positive number", v)),
        },
    };
    let product = checked_mul(heads, head_dim, "num_heads × head_dim")?;
    if product != inner || inner == 0 {
        return Err(format!(
            "\"num_heads\" × \"head_dim\" = {heads} × {head_dim} = {product} does not equal \
             \"expand\" × \"hidden_size\" = {inner}"
        ));
    }
    let groups = d.pos(cfg, "n_groups", 8)?;
    let conv = d.pos(cfg, "conv_kernel", 4)?;
    let chunk = d.pos(cfg, "chunk_size", 256)?;
    let conv_bias = d.bool(cfg, "use_conv_bias", true)?;
    let proj_bias = d.bool(cfg, "use_bias", false)?;
    let eps = d.pos_float(cfg, "layer_norm_epsilon", 1e-5)?;
    let (dt_min, dt_max) = d.dt_limit(cfg, "time_step_limit")?;
    match d.str(cfg, "hidden_act", "silu")? {
        "silu" | "swish" => {}
        other => {
            return Err(format!("unsupported hidden_act {other:?} (the Mamba2 convolution supports silu)"));
        }
    }
    if !d.bool(cfg, "rms_norm", true)? {
        return Err("unsupported option \"rms_norm\" = false (Mamba2 without its gated RMSNorm)".to_string());
    }
    let tie = d.bool(cfg, "tie_word_embeddings", false)?;
    let max_seq = d.pos(cfg, "max_position_embeddings", 4096)?;
    let dtype = dtype(cfg, d)?;
    let m = Mamba2 {
        state,
        inner,
        head_dim,
        heads,
        groups,
        conv,
        chunk,
        conv_bias,
        proj_bias,
        dt_min,
        dt_max,
        norm_eps: eps,
    };
    check_mamba(&m, "n_groups")?;
    Ok(Imported {
        vocab,
        hidden,
        tie,
        meta_tokens: 0,
        max_seq,
        dtype,
        norm_eps: eps,
        logits: Logits::Plain,
        notes: Vec::new(),
        layers: vec![Operator::Mamba2(m); n],
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HKind {
    Mamba,
    Attention,
    Mlp,
}

/// NemotronH (`model_type: nemotron_h`): Mamba2, position-free attention and relu² MLP layers.
fn nemotron_h(cfg: &Obj, d: &mut Defaults) -> Res<Imported> {
    let vocab = cfg.req_pos("vocab_size")?;
    let hidden = cfg.req_pos("hidden_size")?;
    let mut notes = Vec::new();

    let kinds: Vec<HKind> = if let Some(types) = cfg.strings("layers_block_type")? {
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match *t {
                "mamba" | "linear_attention" => Ok(HKind::Mamba),
                "attention" | "full_attention" => Ok(HKind::Attention),
                "mlp" => Ok(HKind::Mlp),
                "moe" => Err(format!("MoE layers are unsupported (\"layers_block_type[{i}]\" = \"moe\")")),
                other => Err(format!(
                    "unsupported layer type {other:?} in \"layers_block_type[{i}]\" \
                     (supported: linear_attention, full_attention, mlp)"
                )),
            })
            .collect::<Res<_>>()?
    } else if let Some(pattern) = cfg.str("hybrid_override_pattern")? {
        pattern
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                'M' => Ok(HKind::Mamba),
                '*' => Ok(HKind::Attention),
                '-' => Ok(HKind::Mlp),
                'E' => Err(format!("MoE layers are unsupported (\"hybrid_override_pattern\" has 'E' at position {i})")),
                other => Err(format!(
                    "unsupported layer {other:?} at position {i} of \"hybrid_override_pattern\" (supported: M, *, -)"
                )),
            })
            .collect::<Res<_>>()?
    } else {
        return Err("missing required key \"layers_block_type\" (or the older \"hybrid_override_pattern\")".to_string());
    };
    if kinds.len() > MAX_LAYERS {
        return Err(format!("the layer list has {} entries; at most {MAX_LAYERS} are supported", kinds.len()));
    }
    if let Some(n) = cfg.u64("num_hidden_layers")?
        && n != kinds.len() as u64
    {
        notes.push(format!(
            "note: num_hidden_layers = {n} in config.json; the layer list (used) has {} entries",
            kinds.len()
        ));
    }
    let eps = d.pos_float(cfg, "layer_norm_epsilon", 1e-5)?;

    let mamba = if kinds.contains(&HKind::Mamba) {
        let heads = cfg.req_pos("mamba_num_heads")?;
        let head_dim = cfg.req_pos("mamba_head_dim")?;
        let state = cfg.req_pos("ssm_state_size")?;
        // transformers 5 spellings first, then the constructor spellings of the older remote code.
        let pick = |a: &'static str, b: &'static str| if cfg.has(a) || !cfg.has(b) { a } else { b };
        let groups_key = pick("n_groups", "mamba_n_groups");
        let groups = d.pos(cfg, groups_key, 8)?;
        let conv = d.pos(cfg, pick("conv_kernel", "mamba_d_conv"), 4)?;
        let chunk = d.pos(cfg, pick("chunk_size", "mamba_chunk_size"), 128)?;
        let conv_bias = d.bool(cfg, pick("use_conv_bias", "mamba_conv_bias"), true)?;
        let proj_bias = match (cfg.bool("mamba_proj_bias")?, cfg.bool("use_bias")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "keys \"mamba_proj_bias\" = {a} and \"use_bias\" = {b} disagree on the Mamba2 projection bias"
                ));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => d.or(None, "mamba_proj_bias", false, "false"),
        };
        let step_min_key = pick("time_step_min", "mamba_dt_min");
        let step_min = match cfg.float(step_min_key)? {
            Some(x) if x.is_finite() && x >= 0.0 => x,
            Some(_) => {
                return Err(format!("key {step_min_key:?} must be a finite non-negative number"));
            }
            None => d.or(None, "time_step_min", 0.001, "0.001"),
        };
        let (limit_min, dt_max) = d.dt_limit(cfg, pick("time_step_limit", "mamba_dt_limit"))?;
        // The reference forward clamps softplus(dt) to at least time_step_min; the kernels clamp
        // to time_step_limit. The tighter lower bound covers both.
        let dt_min = step_min.max(limit_min);
        if let Some(max) = dt_max
            && max <= dt_min
        {
            return Err(format!("\"time_step_limit\" max {max} is not above the lower dt clamp {dt_min}"));
        }
        match d.str(cfg, "mamba_hidden_act", "silu")? {
            "silu" | "swish" => {}
            other => {
                return Err(format!("unsupported mamba_hidden_act {other:?} (supported: silu)"));
            }
        }
        let inner = checked_mul(heads, head_dim, "mamba_num_heads × mamba_head_dim")?;
        let m = Mamba2 {
            state,
            inner,
            head_dim,
            heads,
            groups,
            conv,
            chunk,
            conv_bias,
            proj_bias,
            dt_min,
            dt_max,
            norm_eps: eps,
        };
        check_mamba(&m, groups_key)?;
        Some(Operator::Mamba2(m))
    } else {
        None
    };

    let attention = if kinds.contains(&HKind::Attention) {
        let heads = cfg.req_pos("num_attention_heads")?;
        let kv_heads = kv_heads(cfg, d, heads)?;
        let head_dim = match cfg.pos("head_dim")? {
            Some(h) => h,
            None => d.or(cfg.pos("attention_head_dim")?, "head_dim", 128, "128"),
        };
        let bias = d.bool(cfg, "attention_bias", false)?;
        if let Some(w) = cfg.u64("sliding_window")? {
            return Err(format!("unsupported option \"sliding_window\" = {w} for nemotron_h attention"));
        }
        let a = Attention {
            heads,
            kv_heads,
            head_dim,
            rope: None,
            window: None,
            qk_norm: false,
            qkv_bias: bias,
            out_bias: bias,
        };
        check_attention(&a, "num_attention_heads", "num_key_value_heads")?;
        Some(Operator::Attention(a))
    } else {
        None
    };

    let mlp = if kinds.contains(&HKind::Mlp) {
        let inner = cfg.req_pos("intermediate_size")?;
        let act = match d.str(cfg, "mlp_hidden_act", "relu2")? {
            "relu2" => Activation::Relu2,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::Gelu,
            other => {
                return Err(format!("unsupported mlp_hidden_act {other:?} (supported: relu2, gelu_pytorch_tanh)"));
            }
        };
        let bias = d.bool(cfg, "mlp_bias", false)?;
        Some(Operator::Ffn(Ffn { inner, act, bias }))
    } else {
        None
    };

    let tie = d.bool(cfg, "tie_word_embeddings", false)?;
    let max_seq = d.pos(cfg, "max_position_embeddings", 4096)?;
    let dtype = dtype(cfg, d)?;
    let layers = kinds
        .iter()
        .map(|k| {
            match k {
                HKind::Mamba => mamba.clone(),
                HKind::Attention => attention.clone(),
                HKind::Mlp => mlp.clone(),
            }
            .ok_or_else(|| "internal: a layer kind without its operator".to_string())
        })
        .collect::<Res<_>>()?;
    Ok(Imported {
        vocab,
        hidden,
        tie,
        meta_tokens: 0,
        max_seq,
        dtype,
        norm_eps: eps,
        logits: Logits::Plain,
        notes,
        layers,
    })
}

// ---------------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------------

/// A float as `.arch` text: integral values without a fraction, others in Rust's shortest form
/// (`1e-6`, `0.001`), which always carries a `.` or an exponent.
fn float_text(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 { format!("{}", x as i64) } else { format!("{x:?}") }
}

fn rope_text(rope: &Option<Rope>) -> String {
    let Some(r) = rope else {
        return "none".to_string();
    };
    let mut params = vec![format!("theta = {}", float_text(r.theta))];
    if r.style == RopeStyle::Interleaved {
        params.push("style = interleaved".to_string());
    }
    if let RopeScaling::Ntk { factor, original_max } = &r.scaling {
        let mut inner = Vec::new();
        if *factor != 2.0 {
            inner.push(format!("factor = {}", float_text(*factor)));
        }
        inner.push(format!("original_max = {original_max}"));
        params.push(format!("scaling = ntk({})", inner.join(", ")));
    }
    format!("rope({})", params.join(", "))
}

/// The operator as `.arch` text, parameters equal to their defaults omitted (except the few that
/// make a line readable on its own: attention's `rope`, ffn's `act` and mamba2's `state`).
fn op_text(op: &Operator, hidden: u64) -> String {
    let mut p: Vec<String> = Vec::new();
    match op {
        Operator::Attention(a) => {
            p.push(format!("heads = {}", a.heads));
            if a.kv_heads != a.heads {
                p.push(format!("kv_heads = {}", a.kv_heads));
            }
            if !hidden.is_multiple_of(a.heads) || hidden / a.heads != a.head_dim {
                p.push(format!("head_dim = {}", a.head_dim));
            }
            if let Some(w) = a.window {
                p.push(format!("window = {w}"));
            }
            if a.qk_norm {
                p.push("qk_norm = true".to_string());
            }
            if a.qkv_bias {
                p.push("qkv_bias = true".to_string());
            }
            if a.out_bias {
                p.push("out_bias = true".to_string());
            }
            p.push(format!("rope = {}", rope_text(&a.rope)));
            format!("attention({})", p.join(", "))
        }
        Operator::DeltaNet(dn) => {
            p.push(format!("heads = {}", dn.heads));
            if !hidden.is_multiple_of(dn.heads) || hidden / dn.heads != dn.head_dim {
                p.push(format!("head_dim = {}", dn.head_dim));
            }
            if dn.v_head_dim != dn.head_dim {
                p.push(format!("v_head_dim = {}", dn.v_head_dim));
            }
            if dn.conv != 4 {
                p.push(format!("conv = {}", dn.conv));
            }
            if dn.conv_bias {
                p.push("conv_bias = true".to_string());
            }
            if !dn.qk_l2norm {
                p.push("qk_l2norm = false".to_string());
            }
            if dn.norm_eps != 1e-5 {
                p.push(format!("norm_eps = {}", float_text(dn.norm_eps)));
            }
            if dn.gated {
                p.push("gated = true".to_string());
            }
            format!("deltanet({})", p.join(", "))
        }
        Operator::Mamba2(m) => {
            p.push(format!("state = {}", m.state));
            if m.inner.is_multiple_of(hidden) {
                if m.inner / hidden != 2 {
                    p.push(format!("expand = {}", m.inner / hidden));
                }
            } else {
                p.push(format!("inner = {}", m.inner));
            }
            if m.head_dim != 64 {
                p.push(format!("head_dim = {}", m.head_dim));
            }
            if m.groups != 1 {
                p.push(format!("groups = {}", m.groups));
            }
            if m.conv != 4 {
                p.push(format!("conv = {}", m.conv));
            }
            if m.chunk != 256 {
                p.push(format!("chunk = {}", m.chunk));
            }
            if !m.conv_bias {
                p.push("conv_bias = false".to_string());
            }
            if m.proj_bias {
                p.push("proj_bias = true".to_string());
            }
            if m.dt_min != 0.0 {
                p.push(format!("dt_min = {}", float_text(m.dt_min)));
            }
            if let Some(max) = m.dt_max {
                p.push(format!("dt_max = {}", float_text(max)));
            }
            if m.norm_eps != 1e-5 {
                p.push(format!("norm_eps = {}", float_text(m.norm_eps)));
            }
            format!("mamba2({})", p.join(", "))
        }
        Operator::Ffn(f) => {
            p.push(format!("inner = {}", f.inner));
            p.push(format!("act = {}", f.act.name()));
            if f.bias {
                p.push("bias = true".to_string());
            }
            format!("ffn({})", p.join(", "))
        }
    }
}

fn op_base(op: &Operator) -> &'static str {
    match op {
        Operator::Attention(a) if a.window.is_some() => "SWA",
        Operator::Attention(_) => "A",
        Operator::DeltaNet(_) => "D",
        Operator::Mamba2(_) => "M2",
        Operator::Ffn(_) => "F",
    }
}

/// Text safe inside a `//` comment: no control characters.
fn comment_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn render(m: &Imported, title: &str, ident: &str, model_type: &str, defaults: &Defaults) -> String {
    // Distinct operators in order of first use, and each layer's operator index.
    let mut texts: Vec<String> = Vec::new();
    let mut bases: Vec<&'static str> = Vec::new();
    let mut seq: Vec<usize> = Vec::with_capacity(m.layers.len());
    for op in &m.layers {
        let text = op_text(op, m.hidden);
        let idx = match texts.iter().position(|t| *t == text) {
            Some(i) => i,
            None => {
                texts.push(text);
                bases.push(op_base(op));
                texts.len() - 1
            }
        };
        seq.push(idx);
    }
    let names: Vec<String> = bases
        .iter()
        .enumerate()
        .map(|(i, base)| {
            let same = bases.iter().filter(|b| *b == base).count();
            if same == 1 {
                base.to_string()
            } else {
                let nth = bases[..=i].iter().filter(|b| *b == base).count();
                let sep = if base.ends_with(|c: char| c.is_ascii_digit()) { "_" } else { "" };
                format!("{base}{sep}{nth}")
            }
        })
        .collect();
    let stack = layout(&seq, &names);

    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "// {} — imported by `flashc import-hf` from config.json (model_type {model_type})",
        comment_safe(title)
    ));
    if !defaults.used.is_empty() {
        line("// Absent from config.json (or null), defaulted:".to_string());
        for note in &defaults.used {
            line(format!("//   {}", comment_safe(note)));
        }
    }
    for note in &m.notes {
        line(format!("// {}", comment_safe(note)));
    }
    line(format!("model {ident} {{"));
    line(format!("  vocab = {}", m.vocab));
    line(format!("  hidden = {}", m.hidden));
    line(format!("  tie_embeddings = {}", m.tie));
    if m.meta_tokens > 0 {
        line(format!("  meta_tokens = {}", m.meta_tokens));
    }
    line(format!("  max_seq = {}", m.max_seq));
    line(format!("  dtype = {}", m.dtype.name()));
    line(format!("  norm = rmsnorm(eps = {})", float_text(m.norm_eps)));
    line(format!(
        "  logits = {}",
        match m.logits {
            Logits::Plain => "plain",
            Logits::RowNormalized => "row_normalized",
        }
    ));
    line(String::new());
    for (name, text) in names.iter().zip(&texts) {
        line(format!("  op {name} = {text}"));
    }
    line(String::new());
    for (name, items) in &stack.blocks {
        line(format!("  block {name} = [{}]", items.join(", ")));
    }
    line(format!("  layers = {}", stack.layers));
    line("}".to_string());
    out
}

// ---------------------------------------------------------------------------------------------------
// Layer-stack layout
// ---------------------------------------------------------------------------------------------------

/// Blocks (name, items) and the `layers` expression.
struct Stack {
    blocks: Vec<(String, Vec<String>)>,
    layers: String,
}

/// One piece of a compressed sequence: a plain list, or a pattern repeated `times` (≥ 2) times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    List { start: usize, len: usize },
    Repeat { start: usize, period: usize, times: usize },
}

/// Above this many layers, only the direct (block-free) description is searched.
const CHUNK_SEARCH_MAX_LAYERS: usize = 512;
/// The largest block length tried.
const MAX_BLOCK_LEN: usize = 32;

fn layout(seq: &[usize], names: &[String]) -> Stack {
    let n = seq.len();
    let name = |i: usize| names.get(i).cloned().unwrap_or_default();
    if let Some(p) = (1..n).find(|&p| n.is_multiple_of(p) && (p..n).all(|i| seq[i] == seq[i - p])) {
        if p == 1 {
            return Stack { blocks: Vec::new(), layers: format!("[{}] * {n}", name(seq[0])) };
        }
        let items = seq[..p].iter().map(|&i| name(i)).collect();
        return Stack { blocks: vec![("L".to_string(), items)], layers: format!("[L] * {}", n / p) };
    }

    // Candidates: the operators themselves, or a cut into blocks of k operators after o leading
    // ones. Cost in half-units: each block costs its length + 2; the expression's lists cost
    // 2 per item + 2, repeats 2 per item + 3.
    let n_ops = names.len();
    let (direct_cost, direct_segs) = compress(seq);
    let mut best: (u64, Vec<Vec<usize>>, Vec<usize>, Vec<Seg>) = (direct_cost, Vec::new(), seq.to_vec(), direct_segs);
    if n <= CHUNK_SEARCH_MAX_LAYERS {
        for k in 2..=MAX_BLOCK_LEN.min(n / 2) {
            for o in 0..k {
                if n < o + 2 * k {
                    break;
                }
                let count = (n - o) / k;
                let mut distinct: Vec<Vec<usize>> = Vec::new();
                let mut symbols: Vec<usize> = seq[..o].to_vec();
                for c in 0..count {
                    let chunk = &seq[o + c * k..o + (c + 1) * k];
                    let id = match distinct.iter().position(|d| d.as_slice() == chunk) {
                        Some(id) => id,
                        None => {
                            distinct.push(chunk.to_vec());
                            distinct.len() - 1
                        }
                    };
                    symbols.push(n_ops + id);
                }
                if distinct.len() == count {
                    continue;
                }
                symbols.extend_from_slice(&seq[o + count * k..]);
                let blocks_cost = distinct.len() as u64 * (k as u64 + 2);
                if blocks_cost >= best.0 {
                    continue;
                }
                let (cost, segs) = compress(&symbols);
                if blocks_cost + cost < best.0 {
                    best = (blocks_cost + cost, distinct, symbols, segs);
                }
            }
        }
    }

    let (_, distinct, symbols, segs) = best;
    let block_name = |id: usize| format!("B{}", id + 1);
    let sym_name = |s: usize| {
        if s >= n_ops { block_name(s - n_ops) } else { name(s) }
    };
    let list = |items: &[usize]| format!("[{}]", items.iter().map(|&s| sym_name(s)).collect::<Vec<_>>().join(", "));
    let pieces: Vec<String> = segs
        .iter()
        .map(|seg| match *seg {
            Seg::List { start, len } => list(symbols.get(start..start + len).unwrap_or(&[])),
            Seg::Repeat { start, period, times } => {
                format!("{} * {times}", list(symbols.get(start..start + period).unwrap_or(&[])))
            }
        })
        .collect();
    let blocks = distinct
        .iter()
        .enumerate()
        .map(|(id, items)| (block_name(id), items.iter().map(|&i| name(i)).collect()))
        .collect();
    Stack { blocks, layers: pieces.join(" ++ ") }
}

/// The cheapest cut of `sym` into plain lists and repeats (see [`layout`] for the costs), by dynamic
/// programming from the end; `lce[j]` is the longest common extension of positions `i` and `j`.
fn compress(sym: &[usize]) -> (u64, Vec<Seg>) {
    let n = sym.len();
    let mut best = vec![u64::MAX; n + 1];
    let mut choice: Vec<Option<Seg>> = vec![None; n + 1];
    best[n] = 0;
    let mut next = vec![0usize; n + 2]; // lce(i + 1, ·)
    let mut row = vec![0usize; n + 2]; // lce(i, ·)
    for i in (0..n).rev() {
        for j in i + 1..n {
            row[j] = if sym[i] == sym[j] { 1 + next[j + 1] } else { 0 };
        }
        row[n] = 0;
        for period in 1..=(n - i) / 2 {
            let times_max = 1 + row[i + period] / period;
            for times in (2..=times_max).rev() {
                let end = i + times * period;
                let cost = best[end].saturating_add(2 * period as u64 + 3);
                if cost < best[i] {
                    best[i] = cost;
                    choice[i] = Some(Seg::Repeat { start: i, period, times });
                }
            }
        }
        for end in i + 1..=n {
            let cost = best[end].saturating_add(2 * (end - i) as u64 + 2);
            if cost < best[i] {
                best[i] = cost;
                choice[i] = Some(Seg::List { start: i, len: end - i });
            }
        }
        std::mem::swap(&mut row, &mut next);
    }
    let mut segs = Vec::new();
    let mut i = 0;
    while i < n {
        let Some(seg) = choice[i] else { break };
        i = match seg {
            Seg::List { start, len } => start + len,
            Seg::Repeat { start, period, times } => start + period * times,
        };
        segs.push(seg);
    }
    (best[0], segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> Vec<String> {
        ns.iter().map(|s| s.to_string()).collect()
    }

    fn seq_of(text: &str, ops: &[&str]) -> Vec<usize> {
        text.split_whitespace().map(|t| ops.iter().position(|o| *o == t).unwrap_or(usize::MAX)).collect()
    }

    fn show(stack: &Stack) -> String {
        let mut s = String::new();
        for (name, items) in &stack.blocks {
            s.push_str(&format!("block {name} = [{}]\n", items.join(", ")));
        }
        s.push_str(&format!("layers = {}", stack.layers));
        s
    }

    #[test]
    fn nemotron_flash_layouts() {
        let ops = ["D", "F", "M2", "A"];
        let one_b = "D F M2 F A F M2 F D F M2 F A F M2 F D F M2 F D F M2 F";
        let got = show(&layout(&seq_of(one_b, &ops), &names(&ops)));
        assert_eq!(got, "block B1 = [D, F, M2, F]\nblock B2 = [A, F, M2, F]\nlayers = [B1, B2] * 2 ++ [B1] * 2");
        let three_b = "D F M2 F A F M2 F D F M2 F A F M2 F D F M2 F A F M2 F D F M2 F D F M2 F D F M2 F";
        let got = show(&layout(&seq_of(three_b, &ops), &names(&ops)));
        assert_eq!(got, "block B1 = [D, F, M2, F]\nblock B2 = [A, F, M2, F]\nlayers = [B1, B2] * 3 ++ [B1] * 3");
    }

    #[test]
    fn periodic_and_plain_layouts() {
        let ops = ["A", "F", "SWA", "M2"];
        let got = show(&layout(&seq_of(&"A F ".repeat(28), &ops), &names(&ops)));
        assert_eq!(got, "block L = [A, F]\nlayers = [L] * 28");
        let got = show(&layout(&seq_of(&"M2 ".repeat(24), &ops), &names(&ops)));
        assert_eq!(got, "layers = [M2] * 24");
        let got = show(&layout(&seq_of("M2", &ops), &names(&ops)));
        assert_eq!(got, "layers = [M2]");
        let mixed = format!("{}{}", "A F ".repeat(20), "SWA F ".repeat(8));
        let got = show(&layout(&seq_of(&mixed, &ops), &names(&ops)));
        assert_eq!(got, "layers = [A, F] * 20 ++ [SWA, F] * 8");
        let got = show(&layout(&seq_of("M2 F M2 A F M2 F", &ops), &names(&ops)));
        assert_eq!(got, "layers = [M2, F, M2, A, F, M2, F]");
    }

    #[test]
    fn layout_expands_to_the_sequence() {
        // Expanding the emitted description must give back the sequence, for many shapes.
        let ops = ["M", "A", "F", "D"];
        let pattern =
            "M F M F M F M A F M F M F M F M F M A F M F M F M F M F M A F M F M F M F M F M A F M F M F M F M F";
        let cases = [pattern.to_string(), "M A F D M".to_string(), "F F M F F M F F M D".to_string(), "A ".repeat(3)];
        for text in cases {
            let seq = seq_of(&text, &ops);
            let stack = layout(&seq, &names(&ops));
            let expanded = expand(&stack);
            let want: Vec<String> = seq.iter().map(|&i| ops[i].to_string()).collect();
            assert_eq!(expanded, want, "{}", show(&stack));
        }
    }

    fn expand(stack: &Stack) -> Vec<String> {
        let mut out = Vec::new();
        for piece in stack.layers.split(" ++ ") {
            let (list, times) = match piece.rsplit_once(" * ") {
                Some((l, t)) => (l, t.parse::<usize>().unwrap_or(0)),
                None => (piece, 1),
            };
            let items: Vec<&str> = list.trim_start_matches('[').trim_end_matches(']').split(", ").collect();
            for _ in 0..times {
                for item in &items {
                    match stack.blocks.iter().find(|(n, _)| n == item) {
                        Some((_, inner)) => out.extend(inner.iter().cloned()),
                        None => out.push(item.to_string()),
                    }
                }
            }
        }
        out
    }

    #[test]
    fn non_finite_tokens_are_rewritten_outside_strings_only() {
        let text = r#"{"a": [0.0, Infinity], "b": -Infinity, "c": NaN, "s": "NaN \" Infinity"}"#;
        let v: Value = serde_json::from_str(&rewrite_non_finite(text)).unwrap_or(Value::Null);
        assert_eq!(v["s"], Value::String("NaN \" Infinity".to_string()));
        assert_eq!(as_float(&v["a"][1]), Some(f64::INFINITY));
        assert_eq!(as_float(&v["b"]), Some(f64::NEG_INFINITY));
        assert!(as_float(&v["c"]).is_some_and(f64::is_nan));
    }

    #[test]
    fn names_and_floats() {
        assert_eq!(model_identifier("Qwen3-0.6B"), "qwen3_0_6b");
        assert_eq!(model_identifier("3b-model"), "m_3b_model");
        assert_eq!(model_identifier(""), "model");
        assert_eq!(float_text(1e-6), "1e-6");
        assert_eq!(float_text(1e-5), "1e-5");
        assert_eq!(float_text(1000000.0), "1000000");
        assert_eq!(float_text(0.001), "0.001");
    }
}
