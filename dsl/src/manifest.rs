//! manifest: every weight tensor of a model, with flashc's canonical name, shape and role.
//!
//! The manifest is the single source of truth for what a `ModelSpec` stores: the parameter counts of
//! `flashc info` (see `stats`), the checkpoint layout, the HF importer's name map and the training
//! runtime's weight normalisation all read it.
//!
//! Conventions:
//! - shapes are PyTorch's `[out, in]` for matrices; depthwise convolution weights are stored squeezed,
//!   `[channels, width]` (HF's `[channels, 1, width]`);
//! - names are `embed`, `meta_tokens`, `layers.{i}.norm`, `layers.{i}.{attn|deltanet|mamba2|ffn}.*`,
//!   `final_norm`, `lm_head`; a bias is the name of its weight followed by `_bias`;
//! - the order is fixed: global tensors (`embed`, `meta_tokens`), then each layer in stack order (its
//!   norm first, then the operator's tensors), then `final_norm` and `lm_head`. It depends only on the
//!   spec, never on hashing.
//!
//! Element counts saturate at `u64::MAX` instead of overflowing, so no spec makes this module panic.

use serde::{Deserialize, Serialize};

use crate::spec::{Activation, Attention, DeltaNet, Ffn, Layer, Mamba2, ModelSpec, Operator};

/// Name of the token embedding, `[vocab, hidden]`.
pub const EMBED: &str = "embed";
/// Name of the learned meta-token prefix, `[meta_tokens, hidden]`.
pub const META_TOKENS: &str = "meta_tokens";
/// Name of the norm before the LM head, `[hidden]`.
pub const FINAL_NORM: &str = "final_norm";
/// Name of the untied LM head, `[vocab, hidden]` (absent when the embedding is tied).
pub const LM_HEAD: &str = "lm_head";

/// What a weight does, as far as training's weight normalisation and the statistics care.
///
/// A closed set: a new operator must map each of its tensors onto one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightRole {
    /// A vocabulary-indexed table: `embed`, the untied `lm_head`, and the `meta_tokens` prefix. Rows
    /// are tokens; not a matmul over the hidden stream in the decode sense (except the LM head).
    Embedding,
    /// A matrix whose input is the (normed) hidden stream: attention and DeltaNet q/k/v, DeltaNet
    /// b/a/g projections, Mamba2 `in_proj`, FFN gate and up. Weight normalisation gives each **row**
    /// unit L2 norm.
    ReadsHidden,
    /// A matrix whose output is added back into the hidden stream: attention and DeltaNet `o_proj`,
    /// Mamba2 `out_proj`, FFN `down_proj`. Weight normalisation gives each **column** unit L2 norm.
    WritesHidden,
    /// The multiplicative weight of an RMSNorm: layer norms, `final_norm`, q/k norms, DeltaNet
    /// `o_norm`, the Mamba2 gated norm.
    Norm,
    /// A depthwise causal convolution weight, `[channels, width]`.
    Conv,
    /// Any other vector: biases, Mamba2/Gated-DeltaNet `A_log` and `dt_bias`, Mamba2 `D`.
    Vector,
}

impl WeightRole {
    /// Whether the tensor is a matmul weight applied to every token (`ReadsHidden` or
    /// `WritesHidden`). The LM head is handled separately, since it is tied or not.
    pub fn is_projection(self) -> bool {
        matches!(self, WeightRole::ReadsHidden | WeightRole::WritesHidden)
    }
}

/// One weight tensor of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorDecl {
    /// Canonical flashc name, e.g. `layers.4.attn.q_proj`.
    pub name: String,
    /// Shape, `[out, in]` for matrices.
    pub shape: Vec<u64>,
    /// What the tensor does.
    pub role: WeightRole,
}

impl TensorDecl {
    /// Number of elements (the product of the shape; saturates at `u64::MAX`).
    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// Every weight tensor of `spec`, in the module's canonical order.
pub fn manifest(spec: &ModelSpec) -> Vec<TensorDecl> {
    let mut out = Vec::new();
    out.push(decl(EMBED.to_string(), vec![spec.vocab, spec.hidden], WeightRole::Embedding));
    if spec.meta_tokens > 0 {
        out.push(decl(META_TOKENS.to_string(), vec![spec.meta_tokens, spec.hidden], WeightRole::Embedding));
    }
    for layer in &spec.layers {
        out.extend(layer_manifest(spec, layer));
    }
    out.push(decl(FINAL_NORM.to_string(), vec![spec.hidden], WeightRole::Norm));
    if !spec.tie_embeddings {
        out.push(decl(LM_HEAD.to_string(), vec![spec.vocab, spec.hidden], WeightRole::Embedding));
    }
    out
}

/// The tensors of one layer: its pre-norm `layers.{i}.norm`, then the operator's tensors.
pub fn layer_manifest(spec: &ModelSpec, layer: &Layer) -> Vec<TensorDecl> {
    let mut b = Builder {
        prefix: format!("layers.{}.{}", layer.index, op_prefix(&layer.op)),
        out: vec![decl(format!("layers.{}.norm", layer.index), vec![spec.hidden], WeightRole::Norm)],
    };
    let h = spec.hidden;
    match &layer.op {
        Operator::Attention(a) => attention(&mut b, h, a),
        Operator::DeltaNet(d) => deltanet(&mut b, h, d),
        Operator::Mamba2(m) => mamba2(&mut b, h, m),
        Operator::Ffn(f) => ffn(&mut b, h, f),
    }
    b.out
}

/// The name segment of an operator's tensors: `attn`, `deltanet`, `mamba2` or `ffn`.
pub fn op_prefix(op: &Operator) -> &'static str {
    match op {
        Operator::Attention(_) => "attn",
        Operator::DeltaNet(_) => "deltanet",
        Operator::Mamba2(_) => "mamba2",
        Operator::Ffn(_) => "ffn",
    }
}

fn decl(name: String, shape: Vec<u64>, role: WeightRole) -> TensorDecl {
    TensorDecl { name, shape, role }
}

/// Collects one layer's tensors under `layers.{i}.{op}.`.
struct Builder {
    prefix: String,
    out: Vec<TensorDecl>,
}

impl Builder {
    fn push(&mut self, name: &str, shape: &[u64], role: WeightRole) {
        self.out.push(decl(format!("{}.{}", self.prefix, name), shape.to_vec(), role));
    }

    /// A matrix `[rows, cols]` followed by its bias `[rows]` when `bias`.
    fn matrix(&mut self, name: &str, rows: u64, cols: u64, role: WeightRole, bias: bool) {
        self.push(name, &[rows, cols], role);
        if bias {
            self.push(&format!("{name}_bias"), &[rows], WeightRole::Vector);
        }
    }

    /// A depthwise convolution `[channels, width]` followed by its bias `[channels]` when `bias`.
    fn conv(&mut self, name: &str, channels: u64, width: u64, bias: bool) {
        self.push(name, &[channels, width], WeightRole::Conv);
        if bias {
            self.push(&format!("{name}_bias"), &[channels], WeightRole::Vector);
        }
    }
}

fn attention(b: &mut Builder, hidden: u64, a: &Attention) {
    let q_width = a.heads.saturating_mul(a.head_dim);
    let kv_width = a.kv_heads.saturating_mul(a.head_dim);
    b.matrix("q_proj", q_width, hidden, WeightRole::ReadsHidden, a.qkv_bias);
    b.matrix("k_proj", kv_width, hidden, WeightRole::ReadsHidden, a.qkv_bias);
    b.matrix("v_proj", kv_width, hidden, WeightRole::ReadsHidden, a.qkv_bias);
    if a.qk_norm {
        b.push("q_norm", &[a.head_dim], WeightRole::Norm);
        b.push("k_norm", &[a.head_dim], WeightRole::Norm);
    }
    b.matrix("o_proj", hidden, q_width, WeightRole::WritesHidden, a.out_bias);
}

fn deltanet(b: &mut Builder, hidden: u64, d: &DeltaNet) {
    let k_width = d.heads.saturating_mul(d.head_dim);
    let v_width = d.heads.saturating_mul(d.v_head_dim);
    b.matrix("q_proj", k_width, hidden, WeightRole::ReadsHidden, false);
    b.matrix("k_proj", k_width, hidden, WeightRole::ReadsHidden, false);
    b.matrix("v_proj", v_width, hidden, WeightRole::ReadsHidden, false);
    b.matrix("b_proj", d.heads, hidden, WeightRole::ReadsHidden, false);
    if d.gated {
        b.matrix("a_proj", d.heads, hidden, WeightRole::ReadsHidden, false);
        b.push("A_log", &[d.heads], WeightRole::Vector);
        b.push("dt_bias", &[d.heads], WeightRole::Vector);
    }
    b.conv("q_conv", k_width, d.conv, d.conv_bias);
    b.conv("k_conv", k_width, d.conv, d.conv_bias);
    b.conv("v_conv", v_width, d.conv, d.conv_bias);
    b.push("o_norm", &[d.v_head_dim], WeightRole::Norm);
    if d.gated {
        b.matrix("g_proj", v_width, hidden, WeightRole::ReadsHidden, false);
    }
    b.matrix("o_proj", hidden, v_width, WeightRole::WritesHidden, false);
}

/// Channels of the Mamba2 convolution: `x`, `B` and `C`.
pub(crate) fn mamba2_conv_channels(m: &Mamba2) -> u64 {
    m.inner.saturating_add(2u64.saturating_mul(m.groups).saturating_mul(m.state))
}

fn mamba2(b: &mut Builder, hidden: u64, m: &Mamba2) {
    let xbc = mamba2_conv_channels(m);
    // Split order of the in_proj output: z (inner), xBC (inner + 2·groups·state), dt (heads).
    let in_rows = m.inner.saturating_add(xbc).saturating_add(m.heads);
    b.matrix("in_proj", in_rows, hidden, WeightRole::ReadsHidden, m.proj_bias);
    b.conv("conv", xbc, m.conv, m.conv_bias);
    b.push("dt_bias", &[m.heads], WeightRole::Vector);
    b.push("A_log", &[m.heads], WeightRole::Vector);
    b.push("D", &[m.heads], WeightRole::Vector);
    b.push("norm", &[m.inner], WeightRole::Norm);
    b.matrix("out_proj", hidden, m.inner, WeightRole::WritesHidden, m.proj_bias);
}

fn ffn(b: &mut Builder, hidden: u64, f: &Ffn) {
    if f.act == Activation::Swiglu {
        b.matrix("gate_proj", f.inner, hidden, WeightRole::ReadsHidden, f.bias);
    }
    b.matrix("up_proj", f.inner, hidden, WeightRole::ReadsHidden, f.bias);
    b.matrix("down_proj", hidden, f.inner, WeightRole::WritesHidden, f.bias);
}

/// Hand-built specs of real models, shared by this module's and `stats`' tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::diag::Span;
    use crate::spec::{
        Activation, Attention, DType, DeltaNet, Ffn, Layer, Logits, Mamba2, ModelSpec, Norm, Operator, Rope,
        RopeScaling, RopeStyle,
    };

    /// A model with the given operators, one layer each, no blocks.
    pub fn model(name: &str, vocab: u64, hidden: u64, tie: bool, meta: u64, ops: Vec<Operator>) -> ModelSpec {
        let layers = ops
            .into_iter()
            .enumerate()
            .map(|(index, op)| Layer {
                index,
                name: op.kind().to_string(),
                blocks: Vec::new(),
                op,
                span: Span::default(),
            })
            .collect();
        ModelSpec {
            name: name.to_string(),
            vocab,
            hidden,
            tie_embeddings: tie,
            meta_tokens: meta,
            norm: Norm::RmsNorm { eps: 1e-6 },
            logits: Logits::Plain,
            dtype: DType::Bf16,
            max_seq: 32768,
            layers,
            train: None,
        }
    }

    pub fn attn_op(heads: u64, kv_heads: u64, head_dim: u64, qk_norm: bool, theta: f64) -> Operator {
        Operator::Attention(Attention {
            heads,
            kv_heads,
            head_dim,
            rope: Some(Rope { theta, style: RopeStyle::RotateHalf, scaling: RopeScaling::None }),
            window: None,
            qk_norm,
            qkv_bias: false,
            out_bias: false,
        })
    }

    pub fn ffn_op(inner: u64) -> Operator {
        Operator::Ffn(Ffn { inner, act: Activation::Swiglu, bias: false })
    }

    pub fn deltanet_op(heads: u64, head_dim: u64) -> Operator {
        Operator::DeltaNet(DeltaNet {
            heads,
            head_dim,
            v_head_dim: head_dim,
            conv: 4,
            conv_bias: false,
            qk_l2norm: true,
            norm_eps: 1e-5,
            gated: false,
        })
    }

    pub fn mamba2_op(inner: u64, head_dim: u64, state: u64) -> Operator {
        Operator::Mamba2(Mamba2 {
            state,
            inner,
            head_dim,
            heads: inner / head_dim,
            groups: 1,
            conv: 4,
            chunk: 256,
            conv_bias: true,
            proj_bias: false,
            dt_min: 0.0,
            dt_max: None,
            norm_eps: 1e-5,
        })
    }

    /// Qwen3-style stack: `layers` × [attention, SwiGLU FFN], tied.
    pub fn qwen3(name: &str, hidden: u64, layers: usize, kv_heads: u64, inner: u64) -> ModelSpec {
        let mut ops = Vec::new();
        for _ in 0..layers {
            ops.push(attn_op(16, kv_heads, 128, true, 1e6));
            ops.push(ffn_op(inner));
        }
        model(name, 151936, hidden, true, 0, ops)
    }

    pub fn qwen3_0_6b() -> ModelSpec {
        qwen3("qwen3_0_6b", 1024, 28, 8, 3072)
    }

    pub fn qwen3_1_7b() -> ModelSpec {
        qwen3("qwen3_1_7b", 2048, 28, 8, 6144)
    }

    /// A Nemotron-Flash stack from its `layer_types` string (`deltanet`, `m2`, `a`, `f`).
    pub fn nemotron_flash(name: &str, hidden: u64, heads: u64, layout: &str) -> ModelSpec {
        let ops = layout
            .split_whitespace()
            .map(|t| match t {
                "deltanet" => deltanet_op(heads, 128),
                "m2" => mamba2_op(2 * hidden, 64, 128),
                "a" => attn_op(heads, heads / 4, 128, false, 10000.0),
                "f" => ffn_op(3 * hidden),
                other => panic!("unknown layer type {other}"),
            })
            .collect();
        model(name, 131072, hidden, true, 256, ops)
    }

    pub const FLASH_1B_LAYOUT: &str = "deltanet f m2 f a f m2 f deltanet f m2 f a f m2 f \
                                       deltanet f m2 f deltanet f m2 f";
    pub const FLASH_3B_LAYOUT: &str = "deltanet f m2 f a f m2 f deltanet f m2 f a f m2 f \
                                       deltanet f m2 f a f m2 f deltanet f m2 f deltanet f m2 f \
                                       deltanet f m2 f";

    pub fn nemotron_flash_1b() -> ModelSpec {
        nemotron_flash("nemotron_flash_1b", 2048, 16, FLASH_1B_LAYOUT)
    }

    pub fn nemotron_flash_3b() -> ModelSpec {
        nemotron_flash("nemotron_flash_3b", 3072, 24, FLASH_3B_LAYOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn find<'a>(m: &'a [TensorDecl], name: &str) -> &'a TensorDecl {
        m.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn names(m: &[TensorDecl]) -> Vec<&str> {
        m.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn qwen3_layout_and_order() {
        let spec = qwen3_0_6b();
        let m = manifest(&spec);
        let n = names(&m);
        assert_eq!(
            &n[..12],
            &[
                "embed",
                "layers.0.norm",
                "layers.0.attn.q_proj",
                "layers.0.attn.k_proj",
                "layers.0.attn.v_proj",
                "layers.0.attn.q_norm",
                "layers.0.attn.k_norm",
                "layers.0.attn.o_proj",
                "layers.1.norm",
                "layers.1.ffn.gate_proj",
                "layers.1.ffn.up_proj",
                "layers.1.ffn.down_proj",
            ]
        );
        // Tied: no lm_head; final_norm last.
        assert_eq!(n.last(), Some(&"final_norm"));
        assert!(!n.contains(&"lm_head"));
        assert!(!n.contains(&"meta_tokens"));
        // 1 embed + 28 × (6 + 1 attention, 3 + 1 ffn) + final_norm.
        assert_eq!(m.len(), 1 + 28 * (7 + 4) + 1);
        assert_eq!(find(&m, "embed").shape, vec![151936, 1024]);
        assert_eq!(find(&m, "layers.0.attn.q_proj").shape, vec![2048, 1024]);
        assert_eq!(find(&m, "layers.0.attn.k_proj").shape, vec![1024, 1024]);
        assert_eq!(find(&m, "layers.0.attn.o_proj").shape, vec![1024, 2048]);
        assert_eq!(find(&m, "layers.0.attn.q_norm").shape, vec![128]);
        assert_eq!(find(&m, "layers.55.ffn.down_proj").shape, vec![1024, 3072]);
        assert_eq!(find(&m, "layers.55.ffn.gate_proj").shape, vec![3072, 1024]);
        // Deterministic: the same spec gives the same manifest.
        assert_eq!(m, manifest(&spec));
    }

    #[test]
    fn untied_model_has_lm_head_last() {
        let mut spec = qwen3_0_6b();
        spec.tie_embeddings = false;
        let m = manifest(&spec);
        let last = &m[m.len() - 1];
        assert_eq!(last.name, "lm_head");
        assert_eq!(last.shape, vec![151936, 1024]);
        assert_eq!(last.role, WeightRole::Embedding);
        assert_eq!(m[m.len() - 2].name, "final_norm");
    }

    #[test]
    fn nemotron_flash_1b_shapes() {
        let m = manifest(&nemotron_flash_1b());
        assert_eq!(m[0].name, "embed");
        assert_eq!(m[1].name, "meta_tokens");
        assert_eq!(m[1].shape, vec![256, 2048]);
        assert_eq!(m[1].role, WeightRole::Embedding);
        // Layer 0 is DeltaNet.
        let d: Vec<_> = m
            .iter()
            .filter(|t| t.name.starts_with("layers.0."))
            .map(|t| (t.name.as_str(), t.shape.clone(), t.role))
            .collect();
        use WeightRole::*;
        assert_eq!(
            d,
            vec![
                ("layers.0.norm", vec![2048], Norm),
                ("layers.0.deltanet.q_proj", vec![2048, 2048], ReadsHidden),
                ("layers.0.deltanet.k_proj", vec![2048, 2048], ReadsHidden),
                ("layers.0.deltanet.v_proj", vec![2048, 2048], ReadsHidden),
                ("layers.0.deltanet.b_proj", vec![16, 2048], ReadsHidden),
                ("layers.0.deltanet.q_conv", vec![2048, 4], Conv),
                ("layers.0.deltanet.k_conv", vec![2048, 4], Conv),
                ("layers.0.deltanet.v_conv", vec![2048, 4], Conv),
                ("layers.0.deltanet.o_norm", vec![128], Norm),
                ("layers.0.deltanet.o_proj", vec![2048, 2048], WritesHidden),
            ]
        );
        // Layer 2 is Mamba2: in_proj 8512 = 4096 (z) + 4352 (xBC) + 64 (dt).
        let m2: Vec<_> = m
            .iter()
            .filter(|t| t.name.starts_with("layers.2."))
            .map(|t| (t.name.as_str(), t.shape.clone(), t.role))
            .collect();
        assert_eq!(
            m2,
            vec![
                ("layers.2.norm", vec![2048], Norm),
                ("layers.2.mamba2.in_proj", vec![8512, 2048], ReadsHidden),
                ("layers.2.mamba2.conv", vec![4352, 4], Conv),
                ("layers.2.mamba2.conv_bias", vec![4352], Vector),
                ("layers.2.mamba2.dt_bias", vec![64], Vector),
                ("layers.2.mamba2.A_log", vec![64], Vector),
                ("layers.2.mamba2.D", vec![64], Vector),
                ("layers.2.mamba2.norm", vec![4096], Norm),
                ("layers.2.mamba2.out_proj", vec![2048, 4096], WritesHidden),
            ]
        );
        // Layer 4 is attention with GQA 16/4 and no qk-norm.
        assert_eq!(find(&m, "layers.4.attn.k_proj").shape, vec![512, 2048]);
        assert!(!m.iter().any(|t| t.name == "layers.4.attn.q_norm"));
    }

    #[test]
    fn nemotron_flash_3b_mamba_matches_checkpoint() {
        // vLLM's comments on the 3B checkpoint: in_proj out 12640, conv channels 6400, 96 heads.
        let m = manifest(&nemotron_flash_3b());
        assert_eq!(find(&m, "layers.2.mamba2.in_proj").shape, vec![12640, 3072]);
        assert_eq!(find(&m, "layers.2.mamba2.conv").shape, vec![6400, 4]);
        assert_eq!(find(&m, "layers.2.mamba2.A_log").shape, vec![96]);
    }

    #[test]
    fn optional_tensors_follow_flags() {
        let mut a = match attn_op(8, 2, 64, false, 10000.0) {
            Operator::Attention(a) => a,
            _ => unreachable!(),
        };
        a.qkv_bias = true;
        a.out_bias = true;
        let mut g = match deltanet_op(4, 32) {
            Operator::DeltaNet(d) => d,
            _ => unreachable!(),
        };
        g.gated = true;
        g.conv_bias = true;
        g.v_head_dim = 48;
        let mut mm = match mamba2_op(256, 32, 16) {
            Operator::Mamba2(m) => m,
            _ => unreachable!(),
        };
        mm.proj_bias = true;
        mm.conv_bias = false;
        mm.groups = 2;
        let relu = Operator::Ffn(Ffn { inner: 384, act: Activation::Relu2, bias: true });
        let spec = model(
            "flags",
            1000,
            128,
            true,
            0,
            vec![Operator::Attention(a), Operator::DeltaNet(g), Operator::Mamba2(mm), relu],
        );
        let m = manifest(&spec);
        let shape = |n: &str| find(&m, n).shape.clone();
        assert_eq!(shape("layers.0.attn.q_proj_bias"), vec![512]);
        assert_eq!(shape("layers.0.attn.k_proj_bias"), vec![128]);
        assert_eq!(shape("layers.0.attn.v_proj_bias"), vec![128]);
        assert_eq!(shape("layers.0.attn.o_proj_bias"), vec![128]);
        assert_eq!(find(&m, "layers.0.attn.o_proj_bias").role, WeightRole::Vector);

        assert_eq!(shape("layers.1.deltanet.v_proj"), vec![192, 128]);
        assert_eq!(shape("layers.1.deltanet.a_proj"), vec![4, 128]);
        assert_eq!(shape("layers.1.deltanet.A_log"), vec![4]);
        assert_eq!(shape("layers.1.deltanet.dt_bias"), vec![4]);
        assert_eq!(shape("layers.1.deltanet.g_proj"), vec![192, 128]);
        assert_eq!(find(&m, "layers.1.deltanet.g_proj").role, WeightRole::ReadsHidden);
        assert_eq!(shape("layers.1.deltanet.q_conv_bias"), vec![128]);
        assert_eq!(shape("layers.1.deltanet.v_conv"), vec![192, 4]);
        assert_eq!(shape("layers.1.deltanet.v_conv_bias"), vec![192]);
        assert_eq!(shape("layers.1.deltanet.o_norm"), vec![48]);
        assert_eq!(shape("layers.1.deltanet.o_proj"), vec![128, 192]);

        // groups 2: xBC = 256 + 2·2·16 = 320; in_proj = 256 + 320 + 8 heads.
        assert_eq!(shape("layers.2.mamba2.in_proj"), vec![584, 128]);
        assert_eq!(shape("layers.2.mamba2.in_proj_bias"), vec![584]);
        assert_eq!(shape("layers.2.mamba2.conv"), vec![320, 4]);
        assert!(!m.iter().any(|t| t.name == "layers.2.mamba2.conv_bias"));
        assert_eq!(shape("layers.2.mamba2.out_proj_bias"), vec![128]);

        assert!(!m.iter().any(|t| t.name == "layers.3.ffn.gate_proj"));
        assert_eq!(shape("layers.3.ffn.up_proj_bias"), vec![384]);
        assert_eq!(shape("layers.3.ffn.down_proj_bias"), vec![128]);
        assert_eq!(find(&m, "layers.3.ffn.down_proj").role, WeightRole::WritesHidden);

        // No name appears twice.
        let mut all = names(&m);
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(all.len(), before);
    }

    #[test]
    fn numel_and_serde() {
        let t = TensorDecl { name: "x".into(), shape: vec![3, 5, 7], role: WeightRole::ReadsHidden };
        assert_eq!(t.numel(), 105);
        let huge = TensorDecl { name: "y".into(), shape: vec![u64::MAX, 2], role: WeightRole::Vector };
        assert_eq!(huge.numel(), u64::MAX);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"name":"x","shape":[3,5,7],"role":"reads_hidden"}"#);
        let back: TensorDecl = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }
}
