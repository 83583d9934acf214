//! stats: the numbers behind `flashc info` — parameters, bytes, decode state and decode FLOPs.
//!
//! Every parameter count is a sum over `manifest::manifest`, so the manifest stays the one source of
//! truth for what a model stores. The state and FLOP figures are per sequence at batch 1:
//!
//! - **KV bytes per token** (`kv_bytes_per_token`): for each full-attention layer,
//!   `2 (K and V) × kv_heads × head_dim × dtype bytes`, summed. This is the part of the decode state
//!   that grows with the context.
//! - **Fixed state** (`fixed_state_bytes`), allocated once per sequence whatever its length:
//!   - `window_kv_bytes`: sliding-window attention layers keep at most `min(window, max_seq)` cached
//!     tokens of the same per-token size;
//!   - `recurrent_state_bytes`: DeltaNet `heads × head_dim × v_head_dim` and Mamba2
//!     `heads × head_dim × state` matrices, in f32 (4 bytes) whatever the model dtype;
//!   - `conv_state_bytes`: the last `conv − 1` inputs of every causal depthwise convolution, in the
//!     model dtype: DeltaNet's q, k and v channels (`2·heads·head_dim + heads·v_head_dim`), Mamba2's
//!     xBC channels (`inner + 2·groups·state`).
//! - **Decode FLOPs per token** (`decode_flops_per_token`), at an empty context:
//!   `2 × (projection weights + vocab × hidden)` — every `ReadsHidden`/`WritesHidden` matrix plus the LM
//!   head, counted even when it is tied to the embedding; the embedding gather, norms, convolution
//!   weights and vectors are not matmuls — plus the per-token mixer work:
//!   - DeltaNet: `6 × head_dim × v_head_dim` per head (`Sᵀk`, the rank-1 update, the readout `Sᵀq`,
//!     two FLOPs per multiply-add each);
//!   - Mamba2: `6 × head_dim × state` per head (state decay, `x ⊗ B` update, readout by `C`);
//!   - each convolution: `2 × channels × conv`.
//!
//!   Element-wise work (activations, norms, gates, the `D` skip, softmax) is ignored.
//! - **Attention FLOPs per context token** (`attention_flops_per_context_token`): each cached token
//!   costs every attention layer `2 × heads × head_dim` for `q·k` and as much again for `p·v`, so
//!   `Σ 4 × heads × head_dim`. Decoding at context length `L` costs about
//!   `decode_flops_per_token + L × attention_flops_per_context_token`, except that a sliding-window
//!   layer's share stops growing once `L` reaches its window.
//!
//! Arithmetic saturates at `u64::MAX` instead of overflowing, so no spec makes this module panic.

use serde::{Deserialize, Serialize};

use crate::manifest::{self, EMBED, LM_HEAD, META_TOKENS, TensorDecl};
use crate::spec::{Attention, DType, DeltaNet, ModelSpec, Operator, RopeScaling, RopeStyle};

/// Bytes per element of DeltaNet and Mamba2 recurrent states, which are kept in f32.
pub const RECURRENT_STATE_DTYPE_BYTES: u64 = 4;

/// Size and cost figures of one model (see the module docs for every formula).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    /// The model's name.
    pub name: String,
    /// The model's storage dtype, used for weights, KV and convolution states.
    pub dtype: DType,
    /// Every parameter in the manifest.
    pub params_total: u64,
    /// `embed`, plus `lm_head` when untied.
    pub params_embedding: u64,
    /// The learned meta-token prefix.
    pub params_meta: u64,
    /// Everything else: layers (with their norms) and the final norm.
    pub params_non_embedding: u64,
    /// `params_total × dtype bytes`.
    pub weight_bytes: u64,
    /// KV-cache bytes each decoded token adds, over the full-attention layers.
    pub kv_bytes_per_token: u64,
    /// KV-cache bytes of the sliding-window layers, fixed once the window is full.
    pub window_kv_bytes: u64,
    /// DeltaNet and Mamba2 recurrent states, f32.
    pub recurrent_state_bytes: u64,
    /// Convolution states (the last `conv − 1` inputs), model dtype.
    pub conv_state_bytes: u64,
    /// `window_kv_bytes + recurrent_state_bytes + conv_state_bytes`.
    pub fixed_state_bytes: u64,
    /// FLOPs to decode one token at an empty context.
    pub decode_flops_per_token: u64,
    /// Extra decode FLOPs per cached token, `Σ attention layers 4 × heads × head_dim`.
    pub attention_flops_per_context_token: u64,
    /// Length of the learned prefix prepended to every sequence.
    pub meta_tokens: u64,
    /// One entry per layer, in stack order.
    pub layers: Vec<LayerStats>,
}

/// Figures of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Position in the stack, from 0.
    pub index: usize,
    /// The `op` binding the layer instantiates.
    pub name: String,
    /// The operator kind (`attention`, `deltanet`, `mamba2`, `ffn`).
    pub kind: String,
    /// The chain of blocks the layer was expanded from, outermost first.
    pub blocks: Vec<String>,
    /// Parameters of the layer, its pre-norm included.
    pub params: u64,
    /// The operator's parameters in a few words, e.g. `heads=16 kv=4 hd=128 rope θ=10000`.
    pub summary: String,
}

fn mul(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

fn sum_numel<'a>(tensors: impl IntoIterator<Item = &'a TensorDecl>) -> u64 {
    tensors.into_iter().fold(0u64, |acc, t| acc.saturating_add(t.numel()))
}

/// Per-token cache bytes of one attention layer: K and V for every KV head.
fn attention_kv_bytes_per_token(a: &Attention, dtype_bytes: u64) -> u64 {
    mul(&[2, a.kv_heads, a.head_dim, dtype_bytes])
}

fn deltanet_conv_channels(d: &DeltaNet) -> u64 {
    mul(&[2, d.heads, d.head_dim]).saturating_add(mul(&[d.heads, d.v_head_dim]))
}

/// Computes every figure of `spec` (see the module docs for the formulas).
pub fn model_stats(spec: &ModelSpec) -> ModelStats {
    let all = manifest::manifest(spec);
    let params_total = sum_numel(&all);
    let params_embedding = sum_numel(all.iter().filter(|t| t.name == EMBED || t.name == LM_HEAD));
    let params_meta = sum_numel(all.iter().filter(|t| t.name == META_TOKENS));
    let params_non_embedding = params_total.saturating_sub(params_embedding).saturating_sub(params_meta);
    let dt = spec.dtype.size();

    // The LM head is a matmul on every decoded token, tied or not.
    let matmul_params =
        sum_numel(all.iter().filter(|t| t.role.is_projection())).saturating_add(mul(&[spec.vocab, spec.hidden]));

    let mut kv_bytes_per_token = 0u64;
    let mut window_kv_bytes = 0u64;
    let mut recurrent_state_bytes = 0u64;
    let mut conv_state_bytes = 0u64;
    let mut mixer_flops = 0u64;
    let mut attention_flops_per_context_token = 0u64;
    let mut layers = Vec::with_capacity(spec.layers.len());

    for layer in &spec.layers {
        match &layer.op {
            Operator::Attention(a) => {
                let per_token = attention_kv_bytes_per_token(a, dt);
                match a.window {
                    None => kv_bytes_per_token = kv_bytes_per_token.saturating_add(per_token),
                    Some(w) => {
                        let cached = w.min(spec.max_seq);
                        window_kv_bytes = window_kv_bytes.saturating_add(cached.saturating_mul(per_token));
                    }
                }
                attention_flops_per_context_token =
                    attention_flops_per_context_token.saturating_add(mul(&[4, a.heads, a.head_dim]));
            }
            Operator::DeltaNet(d) => {
                let channels = deltanet_conv_channels(d);
                recurrent_state_bytes = recurrent_state_bytes.saturating_add(mul(&[
                    d.heads,
                    d.head_dim,
                    d.v_head_dim,
                    RECURRENT_STATE_DTYPE_BYTES,
                ]));
                conv_state_bytes = conv_state_bytes.saturating_add(mul(&[channels, d.conv.saturating_sub(1), dt]));
                mixer_flops = mixer_flops
                    .saturating_add(mul(&[6, d.heads, d.head_dim, d.v_head_dim]))
                    .saturating_add(mul(&[2, channels, d.conv]));
            }
            Operator::Mamba2(m) => {
                let channels = manifest::mamba2_conv_channels(m);
                recurrent_state_bytes = recurrent_state_bytes.saturating_add(mul(&[
                    m.heads,
                    m.head_dim,
                    m.state,
                    RECURRENT_STATE_DTYPE_BYTES,
                ]));
                conv_state_bytes = conv_state_bytes.saturating_add(mul(&[channels, m.conv.saturating_sub(1), dt]));
                mixer_flops = mixer_flops
                    .saturating_add(mul(&[6, m.heads, m.head_dim, m.state]))
                    .saturating_add(mul(&[2, channels, m.conv]));
            }
            Operator::Ffn(_) => {}
        }
        layers.push(LayerStats {
            index: layer.index,
            name: layer.name.clone(),
            kind: layer.op.kind().to_string(),
            blocks: layer.blocks.clone(),
            params: sum_numel(&manifest::layer_manifest(spec, layer)),
            summary: summary(&layer.op),
        });
    }

    ModelStats {
        name: spec.name.clone(),
        dtype: spec.dtype,
        params_total,
        params_embedding,
        params_meta,
        params_non_embedding,
        weight_bytes: params_total.saturating_mul(dt),
        kv_bytes_per_token,
        window_kv_bytes,
        recurrent_state_bytes,
        conv_state_bytes,
        fixed_state_bytes: window_kv_bytes.saturating_add(recurrent_state_bytes).saturating_add(conv_state_bytes),
        decode_flops_per_token: matmul_params.saturating_mul(2).saturating_add(mixer_flops),
        attention_flops_per_context_token,
        meta_tokens: spec.meta_tokens,
        layers,
    }
}

/// A one-line description of an operator's parameters.
fn summary(op: &Operator) -> String {
    match op {
        Operator::Attention(a) => {
            let mut s = format!("heads={} kv={} hd={}", a.heads, a.kv_heads, a.head_dim);
            match &a.rope {
                Some(r) => {
                    s += &format!(" rope θ={}", r.theta);
                    if r.style == RopeStyle::Interleaved {
                        s += " interleaved";
                    }
                    if let RopeScaling::Ntk { factor, original_max } = r.scaling {
                        s += &format!(" ntk×{factor}/{original_max}");
                    }
                }
                None => s += " no-rope",
            }
            if let Some(w) = a.window {
                s += &format!(" window={w}");
            }
            for (on, flag) in [(a.qk_norm, "qk_norm"), (a.qkv_bias, "qkv_bias"), (a.out_bias, "out_bias")] {
                if on {
                    s += " ";
                    s += flag;
                }
            }
            s
        }
        Operator::DeltaNet(d) => {
            let mut s = format!("heads={} hd={}", d.heads, d.head_dim);
            if d.v_head_dim != d.head_dim {
                s += &format!(" vhd={}", d.v_head_dim);
            }
            s += &format!(" conv={}", d.conv);
            for (on, flag) in [(d.gated, "gated"), (d.conv_bias, "conv_bias"), (!d.qk_l2norm, "no-qk-l2norm")] {
                if on {
                    s += " ";
                    s += flag;
                }
            }
            s
        }
        Operator::Mamba2(m) => {
            let mut s = format!(
                "inner={} heads={} hd={} state={} groups={} conv={}",
                m.inner, m.heads, m.head_dim, m.state, m.groups, m.conv
            );
            for (on, flag) in [(m.conv_bias, "conv_bias"), (m.proj_bias, "proj_bias")] {
                if on {
                    s += " ";
                    s += flag;
                }
            }
            s
        }
        Operator::Ffn(f) => {
            let mut s = format!("inner={} {}", f.inner, f.act.name());
            if f.bias {
                s += " bias";
            }
            s
        }
    }
}

/// `1 layer`, `2 layers`.
fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let len = digits.len();
    let mut out = String::with_capacity(len + len / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (len - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` in powers of 1000 with the given unit names (`units[0]` for 1, `units[1]` for 10³, …);
/// `decimals(k)` is the number of decimals for unit `k ≥ 1`. Values below 1000 print as integers.
fn scaled(n: u64, units: &[&str], sep: &str, decimals: fn(usize) -> usize) -> String {
    let unit0 = units.first().copied().unwrap_or("");
    if n < 1000 || units.len() < 2 {
        return format!("{n}{sep}{unit0}");
    }
    let mut base = 1.0f64;
    let mut text = String::new();
    for (k, unit) in units.iter().enumerate().skip(1) {
        base *= 1000.0;
        let d = decimals(k);
        let value = format!("{:.*}", d, n as f64 / base);
        text = format!("{value}{sep}{unit}");
        // Move up a unit when rounding reaches 1000 (e.g. 999,999 → `1.0M`, not `1000.0K`).
        if value.parse::<f64>().is_ok_and(|v| v < 1000.0) {
            break;
        }
    }
    text
}

/// Parameter counts: `596.0M`, `1.72B`.
fn human_count(n: u64) -> String {
    scaled(n, &["", "K", "M", "B", "T"], "", |k| if k >= 3 { 2 } else { 1 })
}

/// Bytes in decimal units: `1.19 GB`.
fn human_bytes(n: u64) -> String {
    scaled(n, &["B", "kB", "MB", "GB", "TB", "PB"], " ", |_| 2)
}

/// FLOP counts in decimal units: `1.95 GFLOP`.
fn human_flops(n: u64) -> String {
    scaled(n, &["FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"], " ", |_| 2)
}

/// `596,049,920 (596.0M)`; small counts need no unit.
fn count_with_unit(n: u64) -> String {
    if n < 1000 { thousands(n) } else { format!("{} ({})", thousands(n), human_count(n)) }
}

/// `4,096 B (4.10 kB)`.
fn bytes_with_unit(n: u64) -> String {
    if n < 1000 { format!("{n} B") } else { format!("{} B ({})", thousands(n), human_bytes(n)) }
}

/// `229,376 (229.38 kFLOP)`.
fn flops_with_unit(n: u64) -> String {
    if n < 1000 { format!("{n} FLOP") } else { format!("{} ({})", thousands(n), human_flops(n)) }
}

/// Renders rows as columns separated by two spaces; `right[c]` right-aligns column `c`. The last
/// column is not padded and trailing spaces are trimmed.
fn columns(rows: &[Vec<String>], right: &[bool]) -> String {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    // The last cell of a row is never padded, so it does not widen its column.
    for row in rows {
        for (c, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            widths[c] = widths[c].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line += "  ";
            }
            let pad = widths[c].saturating_sub(cell.chars().count());
            let last = c + 1 == row.len();
            if right.get(c).copied().unwrap_or(false) {
                line.extend(std::iter::repeat_n(' ', pad));
                line += cell;
            } else {
                line += cell;
                if !last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// The text of `flashc info`: a header, a one-line-per-layer table (`#`, `op`, `block`, `params`,
/// `parameters`), then the totals. Deterministic for a given spec.
pub fn render_info(spec: &ModelSpec, stats: &ModelStats) -> String {
    let mut out = String::new();

    // Header: name, layer counts by kind, sizes.
    let kinds = ["attention", "deltanet", "mamba2", "ffn"];
    let counts: Vec<String> = kinds
        .iter()
        .filter_map(|k| {
            let n = stats.layers.iter().filter(|l| l.kind == *k).count();
            (n > 0).then(|| format!("{n} {k}"))
        })
        .collect();
    out += &format!(
        "model {}: {} layers ({}), hidden {}, vocab {}, {}, {} embeddings, max_seq {}\n\n",
        spec.name,
        stats.layers.len(),
        counts.join(", "),
        spec.hidden,
        spec.vocab,
        spec.dtype.name(),
        if spec.tie_embeddings { "tied" } else { "untied" },
        spec.max_seq,
    );

    // Per-layer table.
    let mut rows = vec![vec![
        "#".to_string(),
        "op".to_string(),
        "block".to_string(),
        "params".to_string(),
        "parameters".to_string(),
    ]];
    for l in &stats.layers {
        let op = if l.name == l.kind { l.kind.clone() } else { format!("{} ({})", l.name, l.kind) };
        let block = if l.blocks.is_empty() { "-".to_string() } else { l.blocks.join("/") };
        rows.push(vec![l.index.to_string(), op, block, thousands(l.params), l.summary.clone()]);
    }
    out += &columns(&rows, &[true, false, false, true, false]);
    out.push('\n');

    // Totals: (label, value, note); a row with an empty value is a section heading.
    let full_attn =
        spec.layers.iter().filter(|l| matches!(&l.op, Operator::Attention(a) if a.window.is_none())).count();
    let window_attn =
        spec.layers.iter().filter(|l| matches!(&l.op, Operator::Attention(a) if a.window.is_some())).count();
    let attn = full_attn + window_attn;
    let dtype = spec.dtype.name();
    let dt = spec.dtype.size();
    let embedding_note = if spec.tie_embeddings { "embed (lm_head tied)" } else { "embed + lm_head" };
    let s = stats;
    let section = |label: &str| vec![label.to_string()];
    let row = |label: &str, value: String, note: String| vec![format!("  {label}"), value, note];
    let sub = |label: &str, value: String, note: String| vec![format!("    {label}"), value, note];
    let totals = vec![
        section("parameters"),
        row("total", count_with_unit(s.params_total), String::new()),
        row("embedding", count_with_unit(s.params_embedding), embedding_note.to_string()),
        row("meta tokens", count_with_unit(s.params_meta), format!("{} × {}", s.meta_tokens, spec.hidden)),
        row("non-embedding", count_with_unit(s.params_non_embedding), "layers and final norm".to_string()),
        row(&format!("weights ({dtype})"), bytes_with_unit(s.weight_bytes), String::new()),
        section("decode state per sequence"),
        row(
            "KV per token",
            bytes_with_unit(s.kv_bytes_per_token),
            format!("{} × 2·kv·hd × {dt} B", plural(full_attn, "full-attention layer")),
        ),
        row("fixed state", bytes_with_unit(s.fixed_state_bytes), "independent of context length".to_string()),
        sub(
            "window KV",
            bytes_with_unit(s.window_kv_bytes),
            format!("{} × min(window, max_seq) tokens", plural(window_attn, "sliding-window layer")),
        ),
        sub("recurrent", bytes_with_unit(s.recurrent_state_bytes), "DeltaNet and Mamba2 states, f32".to_string()),
        sub("conv", bytes_with_unit(s.conv_state_bytes), format!("(conv − 1) inputs per channel, {dtype}")),
        section("decode FLOPs"),
        row(
            "per token",
            flops_with_unit(s.decode_flops_per_token),
            "at empty context; 2·matmul weights (LM head included) + mixer state work".to_string(),
        ),
        row(
            "per context token",
            flops_with_unit(s.attention_flops_per_context_token),
            format!("{} × 4·heads·hd; window layers stop at the window", plural(attn, "attention layer")),
        ),
        vec![
            "meta-token prefix".to_string(),
            format!("{} tokens", s.meta_tokens),
            if s.meta_tokens > 0 {
                format!("KV of the prefix: {}", bytes_with_unit(s.meta_tokens.saturating_mul(s.kv_bytes_per_token)))
            } else {
                String::new()
            },
        ],
    ];
    out += &columns(&totals, &[false, false, false]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::testing::*;
    use crate::spec::Attention;

    fn within(actual: u64, target: f64, rel: f64) -> bool {
        ((actual as f64 - target) / target).abs() <= rel
    }

    #[test]
    fn qwen3_0_6b_exact() {
        let s = model_stats(&qwen3_0_6b());
        println!("qwen3-0.6B params_total = {}", s.params_total);
        assert_eq!(s.params_total, 596_049_920);
        assert_eq!(s.params_embedding, 151_936 * 1024);
        assert_eq!(s.params_meta, 0);
        assert_eq!(s.params_non_embedding, 596_049_920 - 151_936 * 1024);
        assert_eq!(s.weight_bytes, 2 * 596_049_920);
        // 28 full-attention layers × 2 × 8 kv × 128 × 2 bytes.
        assert_eq!(s.kv_bytes_per_token, 28 * 2 * 8 * 128 * 2);
        assert_eq!(s.fixed_state_bytes, 0);
        assert_eq!(s.recurrent_state_bytes, 0);
        assert_eq!(s.conv_state_bytes, 0);
        // 2 × (28 × (q 2048·1024 + k,v 2 × 1024·1024 + o 1024·2048 + ffn 3 × 3072·1024) + lm head).
        let per_layer = 2048 * 1024 + 2 * 1024 * 1024 + 1024 * 2048 + 3 * 3072 * 1024;
        assert_eq!(s.decode_flops_per_token, 2 * (28 * per_layer + 151_936 * 1024));
        assert_eq!(s.attention_flops_per_context_token, 28 * 4 * 16 * 128);
        assert_eq!(s.layers.len(), 56);
        // attention: q,k,v,o + q/k norm + layer norm.
        assert_eq!(s.layers[0].params, 2048 * 1024 * 2 + 2 * 1024 * 1024 + 2 * 128 + 1024);
        assert_eq!(s.layers[0].summary, "heads=16 kv=8 hd=128 rope θ=1000000 qk_norm");
        assert_eq!(s.layers[1].params, 3 * 3072 * 1024 + 1024);
        assert_eq!(s.layers[1].summary, "inner=3072 swiglu");
    }

    #[test]
    fn qwen3_1_7b_exact() {
        let s = model_stats(&qwen3_1_7b());
        println!("qwen3-1.7B params_total = {}", s.params_total);
        assert_eq!(s.params_total, 1_720_574_976);
        assert_eq!(s.params_embedding, 151_936 * 2048);
        assert_eq!(s.kv_bytes_per_token, 28 * 2 * 8 * 128 * 2);
    }

    #[test]
    fn nemotron_flash_1b_figures() {
        let s = model_stats(&nemotron_flash_1b());
        println!("nemotron-flash-1B params_total = {}", s.params_total);
        assert!(within(s.params_total, 0.965e9, 0.005), "{}", s.params_total);
        // Exact, by hand: DeltaNet 4·H² + b_proj + 3 convs + o_norm; Mamba2 in_proj 8512·H +
        // conv (+bias) + 3 × 64 + norm 4096 + out_proj; attention q,o H² + k,v 512·H; FFN 3·6144·H;
        // each layer has its H-wide norm.
        let h = 2048u64;
        let deltanet = 4 * h * h + 16 * h + 3 * h * 4 + 128 + h;
        let mamba2 = 8512 * h + 4352 * 4 + 4352 + 3 * 64 + 4096 + h * 4096 + h;
        let attention = 2 * h * h + 2 * 512 * h + h;
        let ffn = 3 * 6144 * h + h;
        let layers = 4 * deltanet + 6 * mamba2 + 2 * attention + 12 * ffn;
        assert_eq!(layers, 696_427_648); // "layers 696.4M" in nemotron-flash.md §1.4
        assert_eq!(s.params_non_embedding, layers + h);
        assert_eq!(s.params_embedding, 131_072 * h);
        assert_eq!(s.params_meta, 256 * h);
        assert_eq!(s.params_total, layers + h + 131_072 * h + 256 * h);
        assert_eq!(s.meta_tokens, 256);

        // §8: KV per token = 2 attention layers × 2 × 4 × 128 × 2 bytes = 4 KB.
        assert_eq!(s.kv_bytes_per_token, 4096);
        assert_eq!(s.window_kv_bytes, 0);
        // §8: 4 DeltaNet × [16,128,128] + 6 Mamba2 × [64,64,128], f32.
        assert_eq!(s.recurrent_state_bytes, (4 * 16 * 128 * 128 + 6 * 64 * 64 * 128) * 4);
        assert_eq!(s.recurrent_state_bytes, 16 << 20);
        // Conv states, bf16: DeltaNet 3 × 2048 channels, Mamba2 4096 + 2·128 channels, 3 inputs each.
        assert_eq!(s.conv_state_bytes, (4 * 3 * 2048 + 6 * 4352) * 3 * 2);
        assert_eq!(s.fixed_state_bytes, s.recurrent_state_bytes + s.conv_state_bytes);

        // Decode FLOPs: 2 × matmul weights (lm head included although tied) + mixer work.
        let matmuls = 4 * (4 * h * h + 16 * h)
            + 6 * (8512 * h + h * 4096)
            + 2 * (2 * h * h + 2 * 512 * h)
            + 12 * (3 * 6144 * h)
            + 131_072 * h;
        let mixers = 4 * (16 * 6 * 128 * 128 + 2 * 3 * 2048 * 4) + 6 * (64 * 6 * 64 * 128 + 2 * 4352 * 4);
        assert_eq!(s.decode_flops_per_token, 2 * matmuls + mixers);
        assert_eq!(s.decode_flops_per_token, 1_954_689_024);
        assert_eq!(s.attention_flops_per_context_token, 2 * 4 * 16 * 128);

        let kinds: Vec<&str> = s.layers.iter().map(|l| l.kind.as_str()).collect();
        assert_eq!(&kinds[..6], &["deltanet", "ffn", "mamba2", "ffn", "attention", "ffn"]);
        assert_eq!(s.layers[0].params, deltanet);
        assert_eq!(s.layers[0].summary, "heads=16 hd=128 conv=4");
        assert_eq!(s.layers[2].params, mamba2);
        assert_eq!(s.layers[2].summary, "inner=4096 heads=64 hd=64 state=128 groups=1 conv=4 conv_bias");
        assert_eq!(s.layers[4].summary, "heads=16 kv=4 hd=128 rope θ=10000");
    }

    #[test]
    fn nemotron_flash_3b_figures() {
        let s = model_stats(&nemotron_flash_3b());
        println!("nemotron-flash-3B params_total = {}", s.params_total);
        // §1.4: 2.750B, 5.500 GB in bf16.
        assert!(within(s.params_total, 2.750e9, 0.005), "{}", s.params_total);
        assert!(within(s.weight_bytes, 5.500e9, 0.005), "{}", s.weight_bytes);
        // §8: 3 attention layers × 2 × 6 × 128 × 2 bytes = 9 KB per token.
        assert_eq!(s.kv_bytes_per_token, 9216);
        // §8: 6 DeltaNet × [24,128,128] + 9 Mamba2 × [96,64,128], f32.
        assert_eq!(s.recurrent_state_bytes, (6 * 24 * 128 * 128 + 9 * 96 * 64 * 128) * 4);
    }

    #[test]
    fn sliding_window_state_is_fixed() {
        // The 1FA+2SWA variant of the 3B (§6, Table 8): two of three attention layers use an 8k window.
        let mut spec = nemotron_flash_3b();
        let attn: Vec<usize> = spec.layers.iter().filter(|l| l.op.kind() == "attention").map(|l| l.index).collect();
        assert_eq!(attn.len(), 3);
        for &i in &attn[1..] {
            if let Operator::Attention(Attention { window, .. }) = &mut spec.layers[i].op {
                *window = Some(8192);
            }
        }
        let full = model_stats(&nemotron_flash_3b());
        let s = model_stats(&spec);
        assert_eq!(s.params_total, full.params_total);
        assert_eq!(s.kv_bytes_per_token, 2 * 6 * 128 * 2);
        assert_eq!(s.window_kv_bytes, 2 * 8192 * 2 * 6 * 128 * 2);
        assert_eq!(s.fixed_state_bytes, full.fixed_state_bytes + s.window_kv_bytes);
        // Sliding-window layers still cost per cached token up to the window.
        assert_eq!(s.attention_flops_per_context_token, full.attention_flops_per_context_token);
        assert_eq!(s.decode_flops_per_token, full.decode_flops_per_token);

        // A window longer than the model's max_seq caches at most max_seq tokens.
        spec.max_seq = 4096;
        assert_eq!(model_stats(&spec).window_kv_bytes, 2 * 4096 * 2 * 6 * 128 * 2);
        assert!(render_info(&spec, &s).contains("window=8192"));
    }

    #[test]
    fn untied_and_f32() {
        let mut spec = qwen3_0_6b();
        spec.tie_embeddings = false;
        spec.dtype = DType::F32;
        let s = model_stats(&spec);
        assert_eq!(s.params_total, 596_049_920 + 151_936 * 1024);
        assert_eq!(s.params_embedding, 2 * 151_936 * 1024);
        assert_eq!(s.weight_bytes, 4 * s.params_total);
        assert_eq!(s.kv_bytes_per_token, 28 * 2 * 8 * 128 * 4);
        // The LM head is counted once whether tied or not.
        assert_eq!(s.decode_flops_per_token, model_stats(&qwen3_0_6b()).decode_flops_per_token);
    }

    #[test]
    fn number_formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(596_049_920), "596,049,920");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(count_with_unit(596_049_920), "596,049,920 (596.0M)");
        assert_eq!(count_with_unit(1_720_574_976), "1,720,574,976 (1.72B)");
        assert_eq!(count_with_unit(999_999), "999,999 (1.0M)");
        assert_eq!(count_with_unit(12), "12");
        assert_eq!(human_bytes(1_192_099_840), "1.19 GB");
        assert_eq!(bytes_with_unit(4096), "4,096 B (4.10 kB)");
        assert_eq!(bytes_with_unit(0), "0 B");
        assert_eq!(human_flops(1_954_689_024), "1.95 GFLOP");
        assert_eq!(human_bytes(u64::MAX), "18446.74 PB");
    }

    #[test]
    fn render_small_model_exactly() {
        let mut spec = model("tiny", 1000, 64, true, 4, vec![attn_op(4, 2, 16, false, 10000.0), ffn_op(128)]);
        spec.layers[1].name = "mlp".to_string();
        spec.layers[1].blocks = vec!["blk".to_string()];
        let out = render_info(&spec, &model_stats(&spec));
        let expected = "\
model tiny: 2 layers (1 attention, 1 ffn), hidden 64, vocab 1000, bf16, tied embeddings, max_seq 32768

#  op         block  params  parameters
0  attention  -      12,352  heads=4 kv=2 hd=16 rope θ=10000
1  mlp (ffn)  blk    24,640  inner=128 swiglu

parameters
  total              101,312 (101.3K)
  embedding          64,000 (64.0K)          embed (lm_head tied)
  meta tokens        256                     4 × 64
  non-embedding      37,056 (37.1K)          layers and final norm
  weights (bf16)     202,624 B (202.62 kB)
decode state per sequence
  KV per token       128 B                   1 full-attention layer × 2·kv·hd × 2 B
  fixed state        0 B                     independent of context length
    window KV        0 B                     0 sliding-window layers × min(window, max_seq) tokens
    recurrent        0 B                     DeltaNet and Mamba2 states, f32
    conv             0 B                     (conv − 1) inputs per channel, bf16
decode FLOPs
  per token          201,728 (201.73 kFLOP)  at empty context; 2·matmul weights (LM head included) + mixer state work
  per context token  256 FLOP                1 attention layer × 4·heads·hd; window layers stop at the window
meta-token prefix    4 tokens                KV of the prefix: 512 B
";
        assert_eq!(out, expected, "\n{out}");
    }

    #[test]
    fn render_is_deterministic_and_aligned() {
        let spec = nemotron_flash_1b();
        let stats = model_stats(&spec);
        let out = render_info(&spec, &stats);
        assert_eq!(out, render_info(&spec, &model_stats(&spec)));
        println!("{out}");
        assert!(out.contains("965,389,440 (965.4M)"));
        assert!(out.contains("4,096 B (4.10 kB)"));
        assert!(out.contains("1,954,689,024 (1.95 GFLOP)"));
        assert!(out.contains("256 tokens"));
        // One table line per layer plus the header; the params column is right-aligned.
        let table: Vec<&str> = out.lines().skip(2).take_while(|l| !l.is_empty()).collect();
        assert_eq!(table.len(), 1 + 24);
        let end = table[0].find("params").map(|p| p + "params".len());
        let ends: Vec<Option<usize>> = table[1..]
            .iter()
            .zip(&stats.layers)
            .map(|(line, l)| {
                let p = thousands(l.params);
                line.find(&format!(" {p} ")).map(|i| i + 1 + p.len())
            })
            .collect();
        let widest = ends.iter().flatten().max().copied();
        assert!(ends.iter().all(|e| *e == widest), "{ends:?}");
        assert_eq!(end, widest);

        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["params_total"], 965_389_440u64);
        assert_eq!(json["kv_bytes_per_token"], 4096);
        assert_eq!(json["layers"][2]["kind"], "mamba2");
        assert_eq!(json["dtype"], "bf16");
    }
}
