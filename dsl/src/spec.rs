//! spec: the resolved, typed description of a model (`ModelSpec`).
//!
//! A `ModelSpec` is what every later stage consumes. It has no expressions, no names to look up and no
//! defaults left to fill: every size is a concrete integer, every option is explicit, and the layer stack
//! is a flat list in execution order. Every layer is a pre-norm residual layer,
//! `h = h + op(rmsnorm(h))`, with its own RMSNorm weight of width `hidden`.
//!
//! Invariants established by `resolve` (and relied upon downstream):
//! - all sizes are positive; `layers` is not empty;
//! - attention: `kv_heads` divides `heads`; `head_dim` is even when RoPE is on;
//! - mamba2: `head_dim` divides `inner`, `groups` divides `heads`, `heads = inner / head_dim`;
//! - deltanet: `heads * head_dim` and `heads * v_head_dim` are the key and value widths.

use serde::{Deserialize, Serialize};

use crate::diag::Span;

/// A fully resolved model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The name after `model` in the source.
    pub name: String,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab: u64,
    /// Width of the residual stream.
    pub hidden: u64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Number of learned prefix tokens prepended to every sequence (0 = none).
    pub meta_tokens: u64,
    /// The norm used before every layer and before the LM head.
    pub norm: Norm,
    /// How logits are produced from the LM head.
    pub logits: Logits,
    /// Storage type of weights and activations on the GPU.
    pub dtype: DType,
    /// Maximum sequence length (meta tokens included) the model is built for.
    pub max_seq: u64,
    /// The flat layer stack, in execution order.
    pub layers: Vec<Layer>,
    /// Training settings, when the file has a `train` section.
    pub train: Option<Train>,
}

/// The normalisation applied before each layer and before the LM head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Norm {
    /// `x * rsqrt(mean(x^2) + eps) * w`, computed in f32.
    #[serde(rename = "rmsnorm")]
    RmsNorm { eps: f64 },
}

impl Norm {
    /// The epsilon of the norm.
    pub fn eps(&self) -> f64 {
        match self {
            Norm::RmsNorm { eps } => *eps,
        }
    }
}

/// Logit post-processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Logits {
    /// `logits = h · W_lmᵀ`.
    Plain,
    /// `logits[v] = (h · W_lm[v]) / ‖W_lm[v]‖₂` (Nemotron-Flash).
    RowNormalized,
}

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    Bf16,
    F16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The name used in `.arch` files and dumps.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }
}

/// One pre-norm residual layer: `h = h + op(rmsnorm(h))`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// Position in the stack, from 0.
    pub index: usize,
    /// The name of the `op` binding this layer instantiates (or the operator kind for inline operators).
    pub name: String,
    /// The chain of blocks this layer was expanded from, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<String>,
    /// The operator.
    pub op: Operator,
    /// Where the operator was defined in the source.
    #[serde(skip)]
    pub span: Span,
}

/// The operator of a layer. A closed set: adding one means touching the grammar docs, the resolver, the
/// manifest and every later stage (see `docs/add-an-op.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Operator {
    Attention(Attention),
    #[serde(rename = "deltanet")]
    DeltaNet(DeltaNet),
    Mamba2(Mamba2),
    Ffn(Ffn),
}

impl Operator {
    /// The operator kind as written in `.arch` files.
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::Attention(_) => "attention",
            Operator::DeltaNet(_) => "deltanet",
            Operator::Mamba2(_) => "mamba2",
            Operator::Ffn(_) => "ffn",
        }
    }

    /// Whether this operator mixes information across tokens (as opposed to a per-token FFN).
    pub fn is_mixer(&self) -> bool {
        !matches!(self, Operator::Ffn(_))
    }
}

/// Causal softmax attention with grouped-query heads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Query heads.
    pub heads: u64,
    /// Key/value heads; divides `heads` (GQA group = heads / kv_heads).
    pub kv_heads: u64,
    /// Width of one head.
    pub head_dim: u64,
    /// Rotary position embedding; `None` for position-free attention (NemotronH).
    pub rope: Option<Rope>,
    /// Sliding window: each query sees at most this many keys (itself included). `None` = full causal.
    pub window: Option<u64>,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3), with the model norm's eps.
    pub qk_norm: bool,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub out_bias: bool,
}

/// Rotary position embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    /// Base of the inverse frequencies `theta^(-2i/d)`.
    pub theta: f64,
    /// Which dimensions are rotated together.
    pub style: RopeStyle,
    /// Context-extension scaling.
    pub scaling: RopeScaling,
}

/// Pairing of rotated dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Pairs `(i, i + d/2)` (Llama, Qwen, Nemotron-Flash).
    RotateHalf,
    /// Pairs `(2i, 2i + 1)` (GPT-J).
    Interleaved,
}

/// RoPE scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RopeScaling {
    None,
    /// Nemotron-Flash NTK: `theta' = theta * (factor * max_seq / original_max - (factor - 1))^(d / (d - 2))`.
    Ntk {
        factor: f64,
        original_max: u64,
    },
}

/// DeltaNet, or Gated DeltaNet when `gated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaNet {
    /// Heads.
    pub heads: u64,
    /// Key (and query) width of one head.
    pub head_dim: u64,
    /// Value width of one head.
    pub v_head_dim: u64,
    /// Width of the causal depthwise convolutions on q, k and v.
    pub conv: u64,
    /// Bias on the convolutions.
    pub conv_bias: bool,
    /// L2-normalise q and k per head (eps 1e-6).
    pub qk_l2norm: bool,
    /// Epsilon of the per-head output RMSNorm.
    pub norm_eps: f64,
    /// Gated DeltaNet: decay `-exp(A_log) * softplus(a_proj(x) + dt_bias)` and an output gate.
    pub gated: bool,
}

/// Mamba2 (SSD) mixer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mamba2 {
    /// State size N per head.
    pub state: u64,
    /// Inner width (expand × hidden).
    pub inner: u64,
    /// Head dim P; `heads = inner / head_dim`.
    pub head_dim: u64,
    /// Number of heads.
    pub heads: u64,
    /// B/C groups; the gated RMSNorm normalises over `inner / groups` channels.
    pub groups: u64,
    /// Width of the causal depthwise convolution on xBC.
    pub conv: u64,
    /// Chunk length of the SSD prefill scan.
    pub chunk: u64,
    /// Bias on the convolution.
    pub conv_bias: bool,
    /// Bias on in_proj and out_proj.
    pub proj_bias: bool,
    /// Lower clamp of Δ after softplus.
    pub dt_min: f64,
    /// Upper clamp of Δ after softplus (`None` = unbounded).
    pub dt_max: Option<f64>,
    /// Epsilon of the gated RMSNorm.
    pub norm_eps: f64,
}

/// Position-wise feed-forward network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ffn {
    /// Inner width.
    pub inner: u64,
    /// Activation; `swiglu` has a gate projection.
    pub act: Activation,
    /// Bias on the projections.
    pub bias: bool,
}

/// FFN activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`.
    Swiglu,
    /// `down(relu(up(x))^2)`.
    Relu2,
    /// `down(gelu(up(x)))` (tanh approximation).
    Gelu,
}

impl Activation {
    /// The name used in `.arch` files.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Swiglu => "swiglu",
            Activation::Relu2 => "relu2",
            Activation::Gelu => "gelu",
        }
    }
}

/// Training settings (`train { ... }`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Train {
    pub optimizer: Optimizer,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Weight normalisation after every optimizer step.
    pub weight_norm: WeightNorm,
    /// Global gradient-norm clip (`None` = off).
    pub grad_clip: Option<f64>,
    /// Sequences per step.
    pub batch: u64,
    /// Tokens per sequence.
    pub seq_len: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Seed of initialisation and data order.
    pub seed: u64,
}

/// Optimizers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Optimizer {
    /// Adam with decoupled weight decay (AdamW; `weight_decay = 0` is plain Adam).
    Adam { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    /// Stochastic gradient descent with momentum.
    Sgd { momentum: f64, weight_decay: f64 },
}

/// Learning-rate schedules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant { warmup: u64 },
    Linear { warmup: u64, min_lr: f64 },
    Cosine { warmup: u64, min_lr: f64 },
}

/// Weight normalisation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightNorm {
    None,
    /// Nemotron-Flash: unit L2 rows for matrices that read the hidden stream, unit L2 columns for
    /// matrices that write into it.
    Paper,
}

impl ModelSpec {
    /// Number of mixer layers (attention, DeltaNet, Mamba2).
    pub fn mixer_count(&self) -> usize {
        self.layers.iter().filter(|l| l.op.is_mixer()).count()
    }
}
