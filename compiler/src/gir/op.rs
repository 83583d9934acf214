//! op: the closed set of gir operations, with their typing rules.
//!
//! Every variant documents its operands (in order), attributes and result types. `Op::infer` is the
//! single implementation of those rules: the builder uses it to type new nodes and the verifier uses it
//! to re-check every node. Ops compute in f32 whatever the storage type; results keep the storage type
//! of their main operand unless stated.
//!
//! Shapes: `B` sequences, `T` new tokens, `H` hidden, `Hq`/`Hkv` query/key-value heads, `d` head width,
//! `C` cache capacity, `K` conv width. Index operands (`start`, `lens`) are `i32[B]`: `start[b]` is the
//! number of tokens sequence `b` already has in its caches (its first new token's position), `lens[b]`
//! the number of valid new tokens (the batch is right-padded to `T`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Graph;
use super::dim::Dim;
use super::types::{DType, TensorType};

/// What a graph input carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InputRole {
    /// Token ids, `i32[B, T]`.
    Tokens,
    /// Next-token targets for the loss, `i32[B, T]`; negative entries are ignored.
    Targets,
    /// Tokens already cached per sequence, `i32[B]`.
    Start,
    /// Valid new tokens per sequence, `i32[B]`.
    Lens,
    /// A persistent state (KV cache, conv, SSM or delta state) updated by the graph and returned as the
    /// output of the same name.
    State,
    /// The `i`-th operand of the enclosing fused node (only inside fused bodies).
    Param,
}

impl InputRole {
    pub fn name(self) -> &'static str {
        match self {
            InputRole::Tokens => "tokens",
            InputRole::Targets => "targets",
            InputRole::Start => "start",
            InputRole::Lens => "lens",
            InputRole::State => "state",
            InputRole::Param => "param",
        }
    }

    pub fn parse(s: &str) -> Option<InputRole> {
        Some(match s {
            "tokens" => InputRole::Tokens,
            "targets" => InputRole::Targets,
            "start" => InputRole::Start,
            "lens" => InputRole::Lens,
            "state" => InputRole::State,
            "param" => InputRole::Param,
            _ => return None,
        })
    }
}

/// RoPE pairing (see `flashc_dsl::spec::RopeStyle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeStyle {
    RotateHalf,
    Interleaved,
}

/// The body of a fused node: a subgraph whose `Param` inputs are the node's operands (by index) and
/// whose outputs are the node's results (in order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedBody {
    /// A readable name for the fused kernel (e.g. `rmsnorm_matmul_swiglu`).
    pub name: String,
    pub graph: Graph,
}

/// A gir operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // ------------------------------------------------------------------ graph boundary
    /// A runtime input. No operands. Result: the declared type. `index` orders `Param` inputs.
    Input { name: String, role: InputRole, index: u32 },
    /// A model weight named as in the manifest. No operands. Result: its declared type.
    Weight { name: String },
    /// A tensor of zeros. No operands. Result: its declared type (fresh states in training).
    Zeros,

    // ------------------------------------------------------------------ data movement
    /// `(table [V, H], ids i32[..]) → [.., H]`: rows of `table` (storage type of `table`).
    Embed,
    /// `(meta [M, H], x [B, T, H]) → [B, M + T, H]`: the learned prefix in front of every sequence.
    MetaPrefix,
    /// `(x) → x` viewed with `shape` (same element count, row-major).
    Reshape { shape: Vec<Dim> },
    /// `(x) → x[.., start .. start + len, ..]` along `axis`.
    Slice { axis: u32, start: Dim, len: Dim },
    /// `(x0, x1, ..) → concatenation along `axis` (all other dims equal, same dtype).
    Concat { axis: u32 },
    /// `(x) → (x0, x1, ..)`: consecutive pieces of `sizes` along `axis` (sizes sum to the axis length).
    Split { axis: u32, sizes: Vec<Dim> },
    /// `(x) → x` converted to `dtype` (round to nearest even).
    Convert { dtype: DType },

    // ------------------------------------------------------------------ linear algebra
    /// `(a [.., M, K], b [.., K, N]) → [.., M, N]` (storage type of `a`); with `trans_a` `a` is
    /// `[.., K, M]`, with `trans_b` `b` is `[.., N, K]` (a PyTorch `[out, in]` weight). Leading batch
    /// dims broadcast; a rank-2 `b` is shared by every batch entry.
    MatMul { trans_a: bool, trans_b: bool },

    // ------------------------------------------------------------------ elementwise
    /// `(a, b) → a + b`, broadcasting (right-aligned, size-1 dims stretch); integers add exactly.
    Add,
    /// `(a, b) → a · b`, broadcasting like `Add`.
    Mul,
    /// `(x) → factor · x`.
    Scale { factor: f64 },
    /// `(x) → x · sigmoid(x)`.
    Silu,
    /// `(x) → ln(1 + eᶻ)`.
    Softplus,
    /// `(x) → eˣ`.
    Exp,
    /// `(x) → 1 / (1 + e⁻ˣ)`.
    Sigmoid,
    /// `(x) → −x`.
    Neg,
    /// `(x) → max(x, 0)²`.
    Relu2,
    /// `(x) → gelu(x)` (tanh approximation).
    Gelu,
    /// `(gate, up) → silu(gate) · up` (same shapes).
    Swiglu,
    /// `(x) → min(max(x, min), max)`; a missing bound does not clamp.
    Clamp { min: Option<f64>, max: Option<f64> },

    // ------------------------------------------------------------------ normalisation
    /// `(x [.., D], w [D]) → x · rsqrt(mean(x²) + eps) · w` over the last dim. Per-head norms reshape
    /// to `[.., heads, d]` first.
    RmsNorm { eps: f64 },
    /// `(x [.., D]) → x · rsqrt(Σx² + eps)` over the last dim.
    L2Norm { eps: f64 },
    /// `(y [.., D], z [.., D], w [D]) → ` per group of `group` channels of the last dim: with
    /// `norm_before_gate` `rmsnorm(y) · w · silu(z)`, else `rmsnorm(y · silu(z)) · w` (Mamba2).
    GatedRmsNorm { eps: f64, group: u64, norm_before_gate: bool },
    /// `(logits [.., V], w [V, H]) → logits[.., v] / ‖w[v]‖₂`, result f32.
    RowNormLogits,
    /// `(w [V, H]) → f32[V]`: `1 / ‖w[v]‖₂` per row (0 for a zero row). On a weight it is computed once
    /// at load, so row-normalised logits become a multiply in the LM head's epilogue.
    RowInvNorm,

    // ------------------------------------------------------------------ positions
    /// `(x [B, T, heads, d], start i32[B]) → x` rotated by position `start[b] + t` with inverse
    /// frequencies `theta^(−2i/d)` (the effective base after any scaling).
    Rope { style: RopeStyle, theta: f64 },

    // ------------------------------------------------------------------ short convolution
    /// `(x [B, T, C], w [C, K], state [B, C, K−1], lens i32[B] [, bias [C]]) → (y [B, T, C],
    /// state' [B, C, K−1])`: causal depthwise convolution whose left context is `state` (the K−1
    /// inputs before the first new token); `state'` holds the K−1 inputs before position `lens[b]`.
    Conv1d { bias: bool },
    /// `(x [B, C], w [C, K], state [B, C, K−1] [, bias [C]]) → (y [B, C], state')`: one decode step;
    /// updates `state` in place (result 1 aliases operand 2).
    Conv1dUpdate { bias: bool },

    // ------------------------------------------------------------------ attention
    /// `(cache [B, C, Hkv, d], new [B, T, Hkv, d], start i32[B]) → cache'`: writes `new[b, t]` to slot
    /// `(start[b] + t) mod C` (a ring buffer when `C` is a sliding window). In place on operand 0.
    KvWrite,
    /// `(q [B, T, Hq, d], k [B, T, Hkv, d], v [B, T, Hkv, d], kcache [B, C, Hkv, d], vcache, start
    /// i32[B], lens i32[B]) → (o [B, T, Hq, d], kcache', vcache')`: causal GQA softmax attention of
    /// the new tokens (at positions `start[b] + t`) over the cached prefix (positions `< start[b]`,
    /// read from the caches) and the new keys; then the `lens[b]` valid new keys are written to the
    /// caches as `KvWrite` does (in place on operands 3 and 4; padding never overwrites a slot). With
    /// `window`, a query at position p sees keys at positions > p − window.
    AttentionPrefill { window: Option<u64>, scale: f64 },
    /// `(q [B, Hq, d], kcache [B, C, Hkv, d], vcache, start i32[B]) → [B, Hq, d]`: one new token per
    /// sequence at position `start[b]`, attending to cached positions `0 ..= start[b]` (after this
    /// step's `KvWrite`), limited to the last `window` positions.
    AttentionDecode { window: Option<u64>, scale: f64 },

    // ------------------------------------------------------------------ Mamba2 (SSD)
    /// `(x [B, T, Hm, P], dt [B, T, Hm], A [Hm], Bm [B, T, G, N], Cm [B, T, G, N], D [Hm], state
    /// f32[B, Hm, P, N], lens i32[B]) → (y [B, T, Hm, P], state' f32[B, Hm, P, N])`:
    /// `s_t = exp(dt_t·A)·s_{t−1} + dt_t·x_t⊗B_t`, `y_t = s_t·C_t + D·x_t`, head h using group
    /// `h / (Hm/G)`, computed by the chunked SSD algorithm with `chunk` tokens per chunk; `state'` is
    /// the state after `lens[b]` tokens.
    SsdScan { chunk: u64 },
    /// `(x [B, Hm, P], dt [B, Hm], A [Hm], Bm [B, G, N], Cm [B, G, N], D [Hm], state) → (y [B, Hm, P],
    /// state')`: the recurrence for one token, in place on operand 6.
    SsdStep,

    // ------------------------------------------------------------------ delta rule
    /// `(q [B, T, Hd, dk], k [B, T, Hd, dk], v [B, T, Hd, dv], beta [B, T, Hd] [, g [B, T, Hd]],
    /// state f32[B, Hd, dk, dv], lens i32[B]) → (o [B, T, Hd, dv], state')`:
    /// `S_t = α_t(I − β_t k_t k_tᵀ)S_{t−1} + β_t k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`, with `α_t = exp(g_t)`
    /// when `gated` (else 1), by the chunked WY algorithm (`chunk` tokens); `state'` after `lens[b]`.
    DeltaScan { chunk: u64, scale: f64, gated: bool },
    /// `(q [B, Hd, dk], k, v [B, Hd, dv], beta [B, Hd] [, g [B, Hd]], state) → (o [B, Hd, dv],
    /// state')`: one token, in place on the state operand.
    DeltaStep { scale: f64, gated: bool },

    // ------------------------------------------------------------------ loss
    /// `(logits [B, T, V], targets i32[B, T]) → f32[]`: mean over targets ≥ 0 of
    /// `logsumexp(logits) − logits[target]`.
    CrossEntropy,

    // ------------------------------------------------------------------ fusion
    /// `(operands..) → (results..)` computed by the body subgraph in one kernel.
    Fused(Box<FusedBody>),
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Dim(Dim),
    Dims(Vec<Dim>),
    None,
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(i) => write!(f, "{i}"),
            // `{:?}` prints the shortest text that reads back to the same f64.
            Attr::Float(x) => write!(f, "{x:?}"),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Str(s) => write!(f, "{s:?}"),
            Attr::Dim(d) => write!(f, "<{d}>"),
            Attr::Dims(ds) => {
                f.write_str("[")?;
                for (i, d) in ds.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
            Attr::None => f.write_str("none"),
        }
    }
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Zeros => "zeros",
            Op::Embed => "embed",
            Op::MetaPrefix => "meta_prefix",
            Op::Reshape { .. } => "reshape",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Split { .. } => "split",
            Op::Convert { .. } => "convert",
            Op::MatMul { .. } => "matmul",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::Silu => "silu",
            Op::Softplus => "softplus",
            Op::Exp => "exp",
            Op::Sigmoid => "sigmoid",
            Op::Neg => "neg",
            Op::Relu2 => "relu2",
            Op::Gelu => "gelu",
            Op::Swiglu => "swiglu",
            Op::Clamp { .. } => "clamp",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::L2Norm { .. } => "l2norm",
            Op::GatedRmsNorm { .. } => "gated_rmsnorm",
            Op::RowNormLogits => "row_norm_logits",
            Op::RowInvNorm => "row_inv_norm",
            Op::Rope { .. } => "rope",
            Op::Conv1d { .. } => "conv1d",
            Op::Conv1dUpdate { .. } => "conv1d_update",
            Op::KvWrite => "kv_write",
            Op::AttentionPrefill { .. } => "attention_prefill",
            Op::AttentionDecode { .. } => "attention_decode",
            Op::SsdScan { .. } => "ssd_scan",
            Op::SsdStep => "ssd_step",
            Op::DeltaScan { .. } => "delta_scan",
            Op::DeltaStep { .. } => "delta_step",
            Op::CrossEntropy => "cross_entropy",
            Op::Fused(_) => "fused",
        }
    }

    /// Attributes in the order the text form prints them.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let opt = |x: Option<f64>| x.map(Attr::Float).unwrap_or(Attr::None);
        let win = |w: Option<u64>| w.map(|w| Attr::Int(w as i64)).unwrap_or(Attr::None);
        match self {
            Op::Input { name, role, index } => {
                let mut a = vec![("name", Attr::Str(name.clone())), ("role", Attr::Str(role.name().to_string()))];
                if *role == InputRole::Param {
                    a.push(("index", Attr::Int(i64::from(*index))));
                }
                a
            }
            Op::Weight { name } => vec![("name", Attr::Str(name.clone()))],
            Op::Reshape { shape } => vec![("shape", Attr::Dims(shape.clone()))],
            Op::Slice { axis, start, len } => vec![
                ("axis", Attr::Int(i64::from(*axis))),
                ("start", Attr::Dim(start.clone())),
                ("len", Attr::Dim(len.clone())),
            ],
            Op::Concat { axis } => vec![("axis", Attr::Int(i64::from(*axis)))],
            Op::Split { axis, sizes } => {
                vec![("axis", Attr::Int(i64::from(*axis))), ("sizes", Attr::Dims(sizes.clone()))]
            }
            Op::Convert { dtype } => vec![("dtype", Attr::Str(dtype.name().to_string()))],
            Op::MatMul { trans_a, trans_b } => {
                vec![("trans_a", Attr::Bool(*trans_a)), ("trans_b", Attr::Bool(*trans_b))]
            }
            Op::Scale { factor } => vec![("factor", Attr::Float(*factor))],
            Op::Clamp { min, max } => vec![("min", opt(*min)), ("max", opt(*max))],
            Op::RmsNorm { eps } | Op::L2Norm { eps } => vec![("eps", Attr::Float(*eps))],
            Op::GatedRmsNorm { eps, group, norm_before_gate } => vec![
                ("eps", Attr::Float(*eps)),
                ("group", Attr::Int(*group as i64)),
                ("norm_before_gate", Attr::Bool(*norm_before_gate)),
            ],
            Op::Rope { style, theta } => vec![
                (
                    "style",
                    Attr::Str(
                        match style {
                            RopeStyle::RotateHalf => "rotate_half",
                            RopeStyle::Interleaved => "interleaved",
                        }
                        .to_string(),
                    ),
                ),
                ("theta", Attr::Float(*theta)),
            ],
            Op::Conv1d { bias } | Op::Conv1dUpdate { bias } => vec![("bias", Attr::Bool(*bias))],
            Op::AttentionPrefill { window, scale } | Op::AttentionDecode { window, scale } => {
                vec![("window", win(*window)), ("scale", Attr::Float(*scale))]
            }
            Op::SsdScan { chunk } => vec![("chunk", Attr::Int(*chunk as i64))],
            Op::DeltaScan { chunk, scale, gated } => {
                vec![("chunk", Attr::Int(*chunk as i64)), ("scale", Attr::Float(*scale)), ("gated", Attr::Bool(*gated))]
            }
            Op::DeltaStep { scale, gated } => vec![("scale", Attr::Float(*scale)), ("gated", Attr::Bool(*gated))],
            Op::Fused(body) => vec![("name", Attr::Str(body.name.clone()))],
            Op::Zeros
            | Op::Embed
            | Op::MetaPrefix
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::Softplus
            | Op::Exp
            | Op::Sigmoid
            | Op::Neg
            | Op::Relu2
            | Op::Gelu
            | Op::Swiglu
            | Op::RowNormLogits
            | Op::RowInvNorm
            | Op::KvWrite
            | Op::SsdStep
            | Op::CrossEntropy => Vec::new(),
        }
    }

    /// Rebuilds an op from its name and attributes (the inverse of `name` + `attrs`; fused bodies are
    /// attached by the parser).
    pub fn from_parts(name: &str, attrs: &[(String, Attr)]) -> Result<Op, String> {
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let need = |k: &str| get(k).ok_or_else(|| format!("`{name}` needs the attribute `{k}`"));
        let int = |k: &str| match need(k)? {
            Attr::Int(i) => Ok(i),
            other => Err(format!("`{k}` must be an integer, found `{other}`")),
        };
        let uint = |k: &str| int(k).and_then(|i| u64::try_from(i).map_err(|_| format!("`{k}` must be ≥ 0")));
        let axis = |k: &str| int(k).and_then(|i| u32::try_from(i).map_err(|_| format!("`{k}` must be ≥ 0")));
        let float = |k: &str| match need(k)? {
            Attr::Float(x) => Ok(x),
            Attr::Int(i) => Ok(i as f64),
            other => Err(format!("`{k}` must be a number, found `{other}`")),
        };
        let opt_float = |k: &str| match need(k)? {
            Attr::None => Ok(None),
            Attr::Float(x) => Ok(Some(x)),
            Attr::Int(i) => Ok(Some(i as f64)),
            other => Err(format!("`{k}` must be a number or none, found `{other}`")),
        };
        let boolean = |k: &str| match need(k)? {
            Attr::Bool(b) => Ok(b),
            other => Err(format!("`{k}` must be true or false, found `{other}`")),
        };
        let string = |k: &str| match need(k)? {
            Attr::Str(s) => Ok(s),
            other => Err(format!("`{k}` must be a string, found `{other}`")),
        };
        let dim = |k: &str| match need(k)? {
            Attr::Dim(d) => Ok(d),
            Attr::Int(i) => Ok(Dim::constant(i)),
            other => Err(format!("`{k}` must be a size, found `{other}`")),
        };
        let dims = |k: &str| match need(k)? {
            Attr::Dims(d) => Ok(d),
            other => Err(format!("`{k}` must be a list of sizes, found `{other}`")),
        };
        let window = |k: &str| match need(k)? {
            Attr::None => Ok(None),
            Attr::Int(i) if i > 0 => Ok(Some(i as u64)),
            other => Err(format!("`{k}` must be a positive integer or none, found `{other}`")),
        };
        let op = match name {
            "input" => {
                let role = string("role")?;
                let role = InputRole::parse(&role).ok_or_else(|| format!("unknown input role `{role}`"))?;
                let index = if role == InputRole::Param {
                    u32::try_from(int("index")?).map_err(|_| "`index` must be ≥ 0".to_string())?
                } else {
                    0
                };
                Op::Input { name: string("name")?, role, index }
            }
            "weight" => Op::Weight { name: string("name")? },
            "zeros" => Op::Zeros,
            "embed" => Op::Embed,
            "meta_prefix" => Op::MetaPrefix,
            "reshape" => Op::Reshape { shape: dims("shape")? },
            "slice" => Op::Slice { axis: axis("axis")?, start: dim("start")?, len: dim("len")? },
            "concat" => Op::Concat { axis: axis("axis")? },
            "split" => Op::Split { axis: axis("axis")?, sizes: dims("sizes")? },
            "convert" => {
                let d = string("dtype")?;
                Op::Convert { dtype: DType::parse(&d).ok_or_else(|| format!("unknown dtype `{d}`"))? }
            }
            "matmul" => Op::MatMul { trans_a: boolean("trans_a")?, trans_b: boolean("trans_b")? },
            "add" => Op::Add,
            "mul" => Op::Mul,
            "scale" => Op::Scale { factor: float("factor")? },
            "silu" => Op::Silu,
            "softplus" => Op::Softplus,
            "exp" => Op::Exp,
            "sigmoid" => Op::Sigmoid,
            "neg" => Op::Neg,
            "relu2" => Op::Relu2,
            "gelu" => Op::Gelu,
            "swiglu" => Op::Swiglu,
            "clamp" => Op::Clamp { min: opt_float("min")?, max: opt_float("max")? },
            "rmsnorm" => Op::RmsNorm { eps: float("eps")? },
            "l2norm" => Op::L2Norm { eps: float("eps")? },
            "gated_rmsnorm" => Op::GatedRmsNorm {
                eps: float("eps")?,
                group: uint("group")?,
                norm_before_gate: boolean("norm_before_gate")?,
            },
            "row_norm_logits" => Op::RowNormLogits,
            "row_inv_norm" => Op::RowInvNorm,
            "rope" => {
                let style = match string("style")?.as_str() {
                    "rotate_half" => RopeStyle::RotateHalf,
                    "interleaved" => RopeStyle::Interleaved,
                    s => return Err(format!("unknown rope style `{s}`")),
                };
                Op::Rope { style, theta: float("theta")? }
            }
            "conv1d" => Op::Conv1d { bias: boolean("bias")? },
            "conv1d_update" => Op::Conv1dUpdate { bias: boolean("bias")? },
            "kv_write" => Op::KvWrite,
            "attention_prefill" => Op::AttentionPrefill { window: window("window")?, scale: float("scale")? },
            "attention_decode" => Op::AttentionDecode { window: window("window")?, scale: float("scale")? },
            "ssd_scan" => Op::SsdScan { chunk: uint("chunk")? },
            "ssd_step" => Op::SsdStep,
            "delta_scan" => Op::DeltaScan { chunk: uint("chunk")?, scale: float("scale")?, gated: boolean("gated")? },
            "delta_step" => Op::DeltaStep { scale: float("scale")?, gated: boolean("gated")? },
            "cross_entropy" => Op::CrossEntropy,
            "fused" => Op::Fused(Box::new(FusedBody { name: string("name")?, graph: Graph::new("fused") })),
            _ => return Err(format!("unknown op `{name}`")),
        };
        let known: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        if let Some((k, _)) = attrs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(format!("`{name}` has no attribute `{k}`"));
        }
        Ok(op)
    }

    /// Elementwise ops (including broadcasting binaries): the candidates for elementwise fusion.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Add
                | Op::Mul
                | Op::Scale { .. }
                | Op::Silu
                | Op::Softplus
                | Op::Exp
                | Op::Sigmoid
                | Op::Neg
                | Op::Relu2
                | Op::Gelu
                | Op::Swiglu
                | Op::Clamp { .. }
                | Op::Convert { .. }
        )
    }

    /// Graph-boundary nodes that compute nothing (inputs, weights, zeros).
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. } | Op::Zeros)
    }

    /// Ops that only reinterpret their operand's memory (no kernel needed).
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape { .. })
    }

    /// The `(operand, result)` pairs of in-place updates: each such result is the new version of that
    /// operand and shares its storage. A fused node updates what its body updates.
    pub fn in_place(&self, operands: usize) -> Vec<(usize, usize)> {
        match self {
            Op::KvWrite => vec![(0, 0)],
            Op::AttentionPrefill { .. } => vec![(3, 1), (4, 2)],
            Op::Conv1d { .. } | Op::Conv1dUpdate { .. } => vec![(2, 1)],
            Op::SsdScan { .. } | Op::SsdStep => vec![(6, 1)],
            // The state is the last operand of a step and the one before `lens` of a scan.
            Op::DeltaStep { .. } => operands.checked_sub(1).map(|i| vec![(i, 1)]).unwrap_or_default(),
            Op::DeltaScan { .. } => operands.checked_sub(2).map(|i| vec![(i, 1)]).unwrap_or_default(),
            Op::Fused(body) => body.graph.param_updates(),
            _ => Vec::new(),
        }
    }

    /// Whether two ops compute the same function of the same operands (for CSE). Leaves and in-place
    /// updates are never merged.
    pub fn cse_key(&self) -> Option<String> {
        if self.is_leaf() || !self.in_place(usize::MAX).is_empty() || matches!(self, Op::Fused(_)) {
            return None;
        }
        let attrs: Vec<String> = self.attrs().iter().map(|(k, v)| format!("{k}={v}")).collect();
        Some(format!("{}[{}]", self.name(), attrs.join(",")))
    }

    /// The result types for operands of types `ins`, or why they are wrong. `declared` is the type
    /// stated for leaves (inputs, weights, zeros), which have no operands to infer from.
    pub fn infer(&self, ins: &[&TensorType], declared: Option<&[TensorType]>) -> Result<Vec<TensorType>, String> {
        infer(self, ins, declared)
    }
}

fn arity(op: &Op, ins: &[&TensorType], n: usize) -> Result<(), String> {
    if ins.len() != n {
        return Err(format!("`{}` takes {n} operand(s), found {}", op.name(), ins.len()));
    }
    Ok(())
}

fn rank(what: &str, t: &TensorType, r: usize) -> Result<(), String> {
    if t.rank() != r {
        return Err(format!("{what} must have rank {r}, found {t}"));
    }
    Ok(())
}

fn same(what: &str, a: &Dim, b: &Dim) -> Result<(), String> {
    if a != b {
        return Err(format!("{what}: {a} ≠ {b}"));
    }
    Ok(())
}

fn index_vec(what: &str, t: &TensorType, b: &Dim) -> Result<(), String> {
    if t.dtype != DType::I32 || t.rank() != 1 || &t.shape[0] != b {
        return Err(format!("{what} must be i32[{b}], found {t}"));
    }
    Ok(())
}

fn float(what: &str, t: &TensorType) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, found {t}"));
    }
    Ok(())
}

/// Right-aligned broadcasting of two shapes.
pub fn broadcast(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if a.dtype != b.dtype {
        return Err(format!("operand types differ: {a} and {b}"));
    }
    let n = a.rank().max(b.rank());
    let one = Dim::constant(1);
    let mut shape = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.rank() >= n { &a.shape[i + a.rank() - n] } else { &one };
        let db = if i + b.rank() >= n { &b.shape[i + b.rank() - n] } else { &one };
        if da == db || *db == one {
            shape.push(da.clone());
        } else if *da == one {
            shape.push(db.clone());
        } else {
            return Err(format!("shapes {a} and {b} do not broadcast"));
        }
    }
    Ok(TensorType { dtype: a.dtype, shape })
}

fn infer(op: &Op, ins: &[&TensorType], declared: Option<&[TensorType]>) -> Result<Vec<TensorType>, String> {
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Zeros => {
            arity(op, ins, 0)?;
            match declared {
                Some([t]) => one(t.clone()),
                _ => Err(format!("`{}` needs exactly one declared type", op.name())),
            }
        }
        Op::Embed => {
            arity(op, ins, 2)?;
            rank("embedding table", ins[0], 2)?;
            if ins[1].dtype != DType::I32 {
                return Err(format!("token ids must be i32, found {}", ins[1]));
            }
            let mut shape = ins[1].shape.clone();
            shape.push(ins[0].shape[1].clone());
            one(TensorType::new(ins[0].dtype, shape))
        }
        Op::MetaPrefix => {
            arity(op, ins, 2)?;
            rank("meta tokens", ins[0], 2)?;
            rank("hidden states", ins[1], 3)?;
            same("meta-token width", &ins[0].shape[1], &ins[1].shape[2])?;
            let t = ins[0].shape[0].add(&ins[1].shape[1]);
            one(TensorType::new(ins[1].dtype, [ins[1].shape[0].clone(), t, ins[1].shape[2].clone()]))
        }
        Op::Reshape { shape } => {
            arity(op, ins, 1)?;
            let out = TensorType::new(ins[0].dtype, shape.clone());
            same("reshape element count", &ins[0].numel(), &out.numel())?;
            one(out)
        }
        Op::Slice { axis, start, len } => {
            arity(op, ins, 1)?;
            let a = *axis as usize;
            let Some(full) = ins[0].shape.get(a) else { return Err(format!("axis {a} out of range for {}", ins[0])) };
            if !start.is_nonneg_at_runtime() || !full.sub(&start.add(len)).is_nonneg_at_runtime() {
                return Err(format!("slice {start}..{start} + {len} does not fit axis of length {full}"));
            }
            let mut shape = ins[0].shape.clone();
            shape[a] = len.clone();
            one(ins[0].with_shape(shape))
        }
        Op::Concat { axis } => {
            if ins.is_empty() {
                return Err("`concat` needs at least one operand".to_string());
            }
            let a = *axis as usize;
            let first = ins[0];
            if a >= first.rank() {
                return Err(format!("axis {a} out of range for {first}"));
            }
            let mut total = Dim::constant(0);
            for t in ins {
                if t.dtype != first.dtype || t.rank() != first.rank() {
                    return Err(format!("concat operands differ: {first} and {t}"));
                }
                for (i, (x, y)) in t.shape.iter().zip(&first.shape).enumerate() {
                    if i != a {
                        same("concat non-axis dim", x, y)?;
                    }
                }
                total = total.add(&t.shape[a]);
            }
            let mut shape = first.shape.clone();
            shape[a] = total;
            one(first.with_shape(shape))
        }
        Op::Split { axis, sizes } => {
            arity(op, ins, 1)?;
            let a = *axis as usize;
            let Some(full) = ins[0].shape.get(a) else { return Err(format!("axis {a} out of range for {}", ins[0])) };
            let total = sizes.iter().fold(Dim::constant(0), |acc, s| acc.add(s));
            same("split sizes must sum to the axis", &total, full)?;
            Ok(sizes
                .iter()
                .map(|s| {
                    let mut shape = ins[0].shape.clone();
                    shape[a] = s.clone();
                    ins[0].with_shape(shape)
                })
                .collect())
        }
        Op::Convert { dtype } => {
            arity(op, ins, 1)?;
            one(ins[0].with_dtype(*dtype))
        }
        Op::MatMul { trans_a, trans_b } => {
            arity(op, ins, 2)?;
            let (a, b) = (ins[0], ins[1]);
            float("matmul operand", a)?;
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("matmul operands need rank ≥ 2, found {a} and {b}"));
            }
            let (m, k) = if *trans_a {
                (&a.shape[a.rank() - 1], &a.shape[a.rank() - 2])
            } else {
                (&a.shape[a.rank() - 2], &a.shape[a.rank() - 1])
            };
            let (kb, n) = if *trans_b {
                (&b.shape[b.rank() - 1], &b.shape[b.rank() - 2])
            } else {
                (&b.shape[b.rank() - 2], &b.shape[b.rank() - 1])
            };
            same("matmul inner dimension", k, kb)?;
            let batch_a = &a.shape[..a.rank() - 2];
            let batch_b = &b.shape[..b.rank() - 2];
            if !batch_b.is_empty() && batch_b != batch_a {
                return Err(format!("matmul batch dims differ: {a} and {b}"));
            }
            let mut shape = batch_a.to_vec();
            shape.push(m.clone());
            shape.push(n.clone());
            one(TensorType::new(a.dtype, shape))
        }
        Op::Add => {
            arity(op, ins, 2)?;
            one(broadcast(ins[0], ins[1])?)
        }
        Op::Mul => {
            arity(op, ins, 2)?;
            float("operand", ins[0])?;
            one(broadcast(ins[0], ins[1])?)
        }
        Op::Swiglu => {
            arity(op, ins, 2)?;
            if ins[0] != ins[1] {
                return Err(format!("swiglu operands differ: {} and {}", ins[0], ins[1]));
            }
            one(ins[0].clone())
        }
        Op::Scale { .. }
        | Op::Silu
        | Op::Softplus
        | Op::Exp
        | Op::Sigmoid
        | Op::Neg
        | Op::Relu2
        | Op::Gelu
        | Op::Clamp { .. } => {
            arity(op, ins, 1)?;
            float("operand", ins[0])?;
            one(ins[0].clone())
        }
        Op::RmsNorm { .. } => {
            arity(op, ins, 2)?;
            float("operand", ins[0])?;
            rank("norm weight", ins[1], 1)?;
            same("norm weight width", &ins[1].shape[0], &ins[0].last())?;
            one(ins[0].clone())
        }
        Op::L2Norm { .. } => {
            arity(op, ins, 1)?;
            float("operand", ins[0])?;
            one(ins[0].clone())
        }
        Op::GatedRmsNorm { group, .. } => {
            arity(op, ins, 3)?;
            if ins[0] != ins[1] {
                return Err(format!("gated norm operands differ: {} and {}", ins[0], ins[1]));
            }
            rank("norm weight", ins[2], 1)?;
            same("norm weight width", &ins[2].shape[0], &ins[0].last())?;
            let width = ins[0].last().as_const();
            if *group == 0 || width.is_none_or(|w| w % (*group as i64) != 0) {
                return Err(format!("group {group} does not divide the width {}", ins[0].last()));
            }
            one(ins[0].clone())
        }
        Op::RowNormLogits => {
            arity(op, ins, 2)?;
            rank("lm head", ins[1], 2)?;
            same("vocabulary", &ins[0].last(), &ins[1].shape[0])?;
            one(ins[0].with_dtype(DType::F32))
        }
        Op::RowInvNorm => {
            arity(op, ins, 1)?;
            rank("matrix", ins[0], 2)?;
            float("matrix", ins[0])?;
            one(TensorType::new(DType::F32, [ins[0].shape[0].clone()]))
        }
        Op::Rope { .. } => {
            arity(op, ins, 2)?;
            rank("rope operand", ins[0], 4)?;
            index_vec("start", ins[1], &ins[0].shape[0])?;
            if ins[0].shape[3].as_const().is_none_or(|d| d % 2 != 0) {
                return Err(format!("rope needs an even head width, found {}", ins[0]));
            }
            one(ins[0].clone())
        }
        Op::Conv1d { bias } => {
            arity(op, ins, if *bias { 5 } else { 4 })?;
            let (x, w, st, lens) = (ins[0], ins[1], ins[2], ins[3]);
            rank("conv input", x, 3)?;
            rank("conv weight", w, 2)?;
            rank("conv state", st, 3)?;
            same("conv channels", &w.shape[0], &x.shape[2])?;
            same("conv state channels", &st.shape[1], &x.shape[2])?;
            same("conv state batch", &st.shape[0], &x.shape[0])?;
            same("conv state width", &st.shape[2], &w.shape[1].sub(&Dim::constant(1)))?;
            index_vec("lens", lens, &x.shape[0])?;
            if *bias {
                rank("conv bias", ins[4], 1)?;
                same("conv bias", &ins[4].shape[0], &x.shape[2])?;
            }
            Ok(vec![x.clone(), st.clone()])
        }
        Op::Conv1dUpdate { bias } => {
            arity(op, ins, if *bias { 4 } else { 3 })?;
            let (x, w, st) = (ins[0], ins[1], ins[2]);
            rank("conv input", x, 2)?;
            rank("conv weight", w, 2)?;
            rank("conv state", st, 3)?;
            same("conv channels", &w.shape[0], &x.shape[1])?;
            same("conv state channels", &st.shape[1], &x.shape[1])?;
            same("conv state batch", &st.shape[0], &x.shape[0])?;
            same("conv state width", &st.shape[2], &w.shape[1].sub(&Dim::constant(1)))?;
            if *bias {
                rank("conv bias", ins[3], 1)?;
                same("conv bias", &ins[3].shape[0], &x.shape[1])?;
            }
            Ok(vec![x.clone(), st.clone()])
        }
        Op::KvWrite => {
            arity(op, ins, 3)?;
            let (cache, new, start) = (ins[0], ins[1], ins[2]);
            rank("kv cache", cache, 4)?;
            rank("new keys/values", new, 4)?;
            same("kv batch", &cache.shape[0], &new.shape[0])?;
            same("kv heads", &cache.shape[2], &new.shape[2])?;
            same("kv head width", &cache.shape[3], &new.shape[3])?;
            index_vec("start", start, &cache.shape[0])?;
            one(cache.clone())
        }
        Op::AttentionPrefill { .. } => {
            arity(op, ins, 7)?;
            let (q, k, v, kc, vc, start) = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]);
            index_vec("lens", ins[6], &q.shape[0])?;
            for (w, t) in [("q", q), ("k", k), ("v", v), ("k cache", kc), ("v cache", vc)] {
                rank(w, t, 4)?;
            }
            if k != v || kc != vc {
                return Err(format!("k and v must match: {k} / {v}, {kc} / {vc}"));
            }
            same("batch", &q.shape[0], &k.shape[0])?;
            same("tokens", &q.shape[1], &k.shape[1])?;
            same("head width", &q.shape[3], &k.shape[3])?;
            same("cache kv heads", &kc.shape[2], &k.shape[2])?;
            same("cache head width", &kc.shape[3], &k.shape[3])?;
            gqa(&q.shape[2], &k.shape[2])?;
            index_vec("start", start, &q.shape[0])?;
            same("cache batch", &kc.shape[0], &q.shape[0])?;
            Ok(vec![q.clone(), kc.clone(), vc.clone()])
        }
        Op::AttentionDecode { .. } => {
            arity(op, ins, 4)?;
            let (q, kc, vc, start) = (ins[0], ins[1], ins[2], ins[3]);
            rank("q", q, 3)?;
            rank("k cache", kc, 4)?;
            if kc != vc {
                return Err(format!("k and v caches must match: {kc} / {vc}"));
            }
            same("batch", &q.shape[0], &kc.shape[0])?;
            same("head width", &q.shape[2], &kc.shape[3])?;
            gqa(&q.shape[1], &kc.shape[2])?;
            index_vec("start", start, &q.shape[0])?;
            one(q.clone())
        }
        Op::SsdScan { chunk } => {
            arity(op, ins, 8)?;
            if *chunk == 0 {
                return Err("chunk must be positive".to_string());
            }
            let (x, dt, a, bm, cm, d, st, lens) = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6], ins[7]);
            rank("x", x, 4)?;
            rank("dt", dt, 3)?;
            rank("B", bm, 4)?;
            if bm != cm {
                return Err(format!("B and C must match: {bm} / {cm}"));
            }
            ssd_common(&x.shape[0], &x.shape[2], &x.shape[3], a, d, st, &bm.shape[2], &bm.shape[3])?;
            same("dt", &Dim::product(&dt.shape), &Dim::product(&x.shape[..3]))?;
            same("B batch/tokens", &Dim::product(&bm.shape[..2]), &Dim::product(&x.shape[..2]))?;
            index_vec("lens", lens, &x.shape[0])?;
            Ok(vec![x.clone(), st.clone()])
        }
        Op::SsdStep => {
            arity(op, ins, 7)?;
            let (x, dt, a, bm, cm, d, st) = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6]);
            rank("x", x, 3)?;
            rank("dt", dt, 2)?;
            rank("B", bm, 3)?;
            if bm != cm {
                return Err(format!("B and C must match: {bm} / {cm}"));
            }
            ssd_common(&x.shape[0], &x.shape[1], &x.shape[2], a, d, st, &bm.shape[1], &bm.shape[2])?;
            same("dt", &Dim::product(&dt.shape), &Dim::product(&x.shape[..2]))?;
            same("B batch", &bm.shape[0], &x.shape[0])?;
            Ok(vec![x.clone(), st.clone()])
        }
        Op::DeltaScan { chunk, gated, .. } => {
            arity(op, ins, if *gated { 7 } else { 6 })?;
            if *chunk == 0 {
                return Err("chunk must be positive".to_string());
            }
            let (q, k, v, beta) = (ins[0], ins[1], ins[2], ins[3]);
            let st = ins[ins.len() - 2];
            let lens = ins[ins.len() - 1];
            for (w, t) in [("q", q), ("k", k), ("v", v)] {
                rank(w, t, 4)?;
            }
            if q != k {
                return Err(format!("q and k must match: {q} / {k}"));
            }
            same("v batch/tokens/heads", &Dim::product(&v.shape[..3]), &Dim::product(&q.shape[..3]))?;
            let bth = TensorType::new(beta.dtype, q.shape[..3].to_vec());
            if beta.shape != bth.shape || (*gated && ins[4].shape != bth.shape) {
                return Err(format!("beta (and g) must be [{}]", join(&q.shape[..3])));
            }
            delta_state(st, &q.shape[0], &q.shape[2], &q.shape[3], &v.shape[3])?;
            index_vec("lens", lens, &q.shape[0])?;
            Ok(vec![v.clone(), st.clone()])
        }
        Op::DeltaStep { gated, .. } => {
            arity(op, ins, if *gated { 6 } else { 5 })?;
            let (q, k, v, beta) = (ins[0], ins[1], ins[2], ins[3]);
            let st = ins[ins.len() - 1];
            for (w, t) in [("q", q), ("k", k), ("v", v)] {
                rank(w, t, 3)?;
            }
            if q != k {
                return Err(format!("q and k must match: {q} / {k}"));
            }
            if beta.shape != q.shape[..2] || (*gated && ins[4].shape != q.shape[..2]) {
                return Err(format!("beta (and g) must be [{}]", join(&q.shape[..2])));
            }
            same("v batch/heads", &Dim::product(&v.shape[..2]), &Dim::product(&q.shape[..2]))?;
            delta_state(st, &q.shape[0], &q.shape[1], &q.shape[2], &v.shape[2])?;
            Ok(vec![v.clone(), st.clone()])
        }
        Op::CrossEntropy => {
            arity(op, ins, 2)?;
            if ins[1].dtype != DType::I32 || ins[1].shape[..] != ins[0].shape[..ins[0].rank().saturating_sub(1)] {
                return Err(format!("targets must be i32 with the logits' leading dims, found {}", ins[1]));
            }
            one(TensorType::new(DType::F32, []))
        }
        Op::Fused(body) => {
            let params = body.graph.params();
            if params.len() != ins.len() {
                return Err(format!("fused body takes {} operand(s), found {}", params.len(), ins.len()));
            }
            for (i, (p, t)) in params.iter().zip(ins).enumerate() {
                if &p != t {
                    return Err(format!("fused operand {i}: body expects {p}, found {t}"));
                }
            }
            Ok(body.graph.output_types())
        }
    }
}

fn join(dims: &[Dim]) -> String {
    dims.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn gqa(hq: &Dim, hkv: &Dim) -> Result<(), String> {
    match (hq.as_const(), hkv.as_const()) {
        (Some(q), Some(k)) if k > 0 && q % k == 0 => Ok(()),
        _ => Err(format!("kv heads {hkv} must divide query heads {hq}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn ssd_common(
    b: &Dim,
    h: &Dim,
    p: &Dim,
    a: &TensorType,
    d: &TensorType,
    st: &TensorType,
    g: &Dim,
    n: &Dim,
) -> Result<(), String> {
    rank("A", a, 1)?;
    rank("D", d, 1)?;
    same("A heads", &a.shape[0], h)?;
    same("D heads", &d.shape[0], h)?;
    let want = TensorType::new(DType::F32, [b.clone(), h.clone(), p.clone(), n.clone()]);
    if st != &want {
        return Err(format!("ssm state must be {want}, found {st}"));
    }
    match (h.as_const(), g.as_const()) {
        (Some(h), Some(g)) if g > 0 && h % g == 0 => Ok(()),
        _ => Err(format!("groups {g} must divide heads {h}")),
    }
}

fn delta_state(st: &TensorType, b: &Dim, h: &Dim, dk: &Dim, dv: &Dim) -> Result<(), String> {
    let want = TensorType::new(DType::F32, [b.clone(), h.clone(), dk.clone(), dv.clone()]);
    if st != &want {
        return Err(format!("delta state must be {want}, found {st}"));
    }
    Ok(())
}
