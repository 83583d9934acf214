//! launch: the symbolic problem size of a kernel group, by kind of op. Codegen sizes grids from it
//! and cost models read it; every field is a `Dim` over B, T, S.
//!
//! | ops | launch | fields |
//! |---|---|---|
//! | elementwise, `convert`, `concat`, `slice`, `meta_prefix`, `rope` | `elements` | `n`: elements of result 0 |
//! | `split` | `elements` | `n`: elements of the operand (all results together) |
//! | `kv_write` | `elements` | `n`: elements written (the new keys or values) |
//! | `rmsnorm`, `l2norm`, `gated_rmsnorm`, `row_norm_logits` | `rows` | rows of the last axis × its width |
//! | `embed` | `rows` | one row per id × the hidden width |
//! | `cross_entropy` | `rows` | one row per token × the vocabulary |
//! | `matmul` | `matmul` | `batch` × (`m` × `k`)·(`k` × `n`); with a shared rank-2 `b` the leading dims of `a` fold into `m` and `batch` is 1 |
//! | `conv1d`, `conv1d_update` | `conv` | `batch` × `tokens` (1 for a step) × `channels`, filter `width` |
//! | `attention_prefill`, `attention_decode` | `attention` | `batch_heads` = B × query heads, `tokens` = queries per sequence (1 in decode), `keys` = the most keys one query attends to (the window if any, else cached plus new: `S + tokens`), `head_dim` |
//! | `ssd_scan`, `ssd_step`, `delta_scan`, `delta_step` | `scan` | `batch_heads` = B × heads, `tokens` (1 for a step), `chunk` (1 for a step), `state` = state elements per head (P·N or dk·dv) |
//! | `fused` | the launch of its dominant member | attention and scans, then matmuls, then convs, then row ops; an all-elementwise body is `elements` of the node's result 0 |

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::gir::{Dim, Graph, NodeId, Op, Sym, TensorType};

/// The problem size of a kernel group (see the module table for each op).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Launch {
    /// One work item per element.
    Elements { n: Dim },
    /// A reduction over the last axis: `rows` independent rows of `width` elements.
    Rows { rows: Dim, width: Dim },
    /// `batch` independent products of an `m × k` and a `k × n` matrix.
    Matmul { batch: Dim, m: Dim, n: Dim, k: Dim },
    /// A causal depthwise convolution.
    Conv { batch: Dim, tokens: Dim, channels: Dim, width: Dim },
    /// Softmax attention: per (sequence, query head), `tokens` queries over at most `keys` keys.
    Attention { batch_heads: Dim, tokens: Dim, keys: Dim, head_dim: Dim },
    /// A recurrent mixer: per (sequence, head), `tokens` steps in chunks of `chunk`, carrying `state`
    /// elements.
    Scan { batch_heads: Dim, tokens: Dim, chunk: Dim, state: Dim },
}

impl Launch {
    /// Which launch wins when several ops share a fused kernel: the mixer, then the GEMM, and so on.
    fn rank(&self) -> u8 {
        match self {
            Launch::Attention { .. } | Launch::Scan { .. } => 5,
            Launch::Matmul { .. } => 4,
            Launch::Conv { .. } => 3,
            Launch::Rows { .. } => 2,
            Launch::Elements { .. } => 1,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Launch::Elements { .. } => "elements",
            Launch::Rows { .. } => "rows",
            Launch::Matmul { .. } => "matmul",
            Launch::Conv { .. } => "conv",
            Launch::Attention { .. } => "attention",
            Launch::Scan { .. } => "scan",
        }
    }

    /// The fields as `(name, size)`, in the order the text form prints them.
    pub fn fields(&self) -> Vec<(&'static str, &Dim)> {
        match self {
            Launch::Elements { n } => vec![("n", n)],
            Launch::Rows { rows, width } => vec![("rows", rows), ("width", width)],
            Launch::Matmul { batch, m, n, k } => {
                let mut f = vec![("m", m), ("n", n), ("k", k)];
                if batch.as_const() != Some(1) {
                    f.insert(0, ("batch", batch));
                }
                f
            }
            Launch::Conv { batch, tokens, channels, width } => {
                vec![("batch", batch), ("tokens", tokens), ("channels", channels), ("width", width)]
            }
            Launch::Attention { batch_heads, tokens, keys, head_dim } => {
                vec![("batch_heads", batch_heads), ("tokens", tokens), ("keys", keys), ("head_dim", head_dim)]
            }
            Launch::Scan { batch_heads, tokens, chunk, state } => {
                vec![("batch_heads", batch_heads), ("tokens", tokens), ("chunk", chunk), ("state", state)]
            }
        }
    }
}

impl fmt::Display for Launch {
    /// `matmul[m=B*T, n=2048, k=2048]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.fields().iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}[{}]", self.kind(), parts.join(", "))
    }
}

/// The launch of node `n` of `g`.
pub fn launch(g: &Graph, n: NodeId) -> Result<Launch, String> {
    let node = g.node(n).ok_or_else(|| format!("no node {n}"))?;
    let ins: Vec<TensorType> = g.operands(n).iter().map(|v| g.ty(*v).cloned()).collect::<Result<_, _>>()?;
    let out = node.types.first().ok_or_else(|| format!("{n} has no result"))?;
    let operand = |i: usize| ins.get(i).ok_or_else(|| format!("{n}: `{}` lacks operand {i}", node.op.name()));
    let dim = |t: &TensorType, i: usize| {
        t.shape.get(i).cloned().ok_or_else(|| format!("{n}: `{}` expects axis {i} in {t}", node.op.name()))
    };
    let c = Dim::constant;
    Ok(match &node.op {
        Op::MatMul { trans_a, .. } => {
            let a = operand(0)?;
            let b = operand(1)?;
            let r = out.rank();
            if r < 2 || a.rank() < 2 {
                return Err(format!("{n}: matmul of rank < 2"));
            }
            let k = if *trans_a { dim(a, a.rank() - 2)? } else { dim(a, a.rank() - 1)? };
            let (batch, m) = if b.rank() == 2 {
                (c(1), Dim::product(&out.shape[..r - 1]))
            } else {
                (Dim::product(&out.shape[..r - 2]), out.shape[r - 2].clone())
            };
            Launch::Matmul { batch, m, n: out.shape[r - 1].clone(), k }
        }
        Op::RmsNorm { .. } | Op::L2Norm { .. } | Op::GatedRmsNorm { .. } | Op::RowNormLogits => rows(out),
        Op::RowInvNorm => rows(&ins[0].clone()),
        Op::Embed => Launch::Rows { rows: operand(1)?.numel(), width: out.last() },
        Op::CrossEntropy => rows(operand(0)?),
        Op::Conv1d { .. } => {
            let w = operand(1)?;
            Launch::Conv { batch: dim(out, 0)?, tokens: dim(out, 1)?, channels: dim(out, 2)?, width: dim(w, 1)? }
        }
        Op::Conv1dUpdate { .. } => {
            let w = operand(1)?;
            Launch::Conv { batch: dim(out, 0)?, tokens: c(1), channels: dim(out, 1)?, width: dim(w, 1)? }
        }
        Op::AttentionPrefill { window, .. } => {
            let tokens = dim(out, 1)?;
            let keys = window.map_or_else(|| Dim::sym(Sym::S).add(&tokens), Dim::from);
            Launch::Attention { batch_heads: dim(out, 0)?.mul(&dim(out, 2)?), tokens, keys, head_dim: dim(out, 3)? }
        }
        Op::AttentionDecode { window, .. } => {
            let keys = window.map_or_else(|| Dim::sym(Sym::S).add(&c(1)), Dim::from);
            Launch::Attention {
                batch_heads: dim(out, 0)?.mul(&dim(out, 1)?),
                tokens: c(1),
                keys,
                head_dim: dim(out, 2)?,
            }
        }
        Op::SsdScan { chunk } => {
            let x = operand(0)?;
            let st = operand(6)?;
            Launch::Scan {
                batch_heads: dim(x, 0)?.mul(&dim(x, 2)?),
                tokens: dim(x, 1)?,
                chunk: Dim::from(*chunk),
                state: dim(st, 2)?.mul(&dim(st, 3)?),
            }
        }
        Op::SsdStep => {
            let x = operand(0)?;
            let st = operand(6)?;
            Launch::Scan {
                batch_heads: dim(x, 0)?.mul(&dim(x, 1)?),
                tokens: c(1),
                chunk: c(1),
                state: dim(st, 2)?.mul(&dim(st, 3)?),
            }
        }
        Op::DeltaScan { chunk, .. } => {
            let q = operand(0)?;
            let st = operand(ins.len().saturating_sub(2))?;
            Launch::Scan {
                batch_heads: dim(q, 0)?.mul(&dim(q, 2)?),
                tokens: dim(q, 1)?,
                chunk: Dim::from(*chunk),
                state: dim(st, 2)?.mul(&dim(st, 3)?),
            }
        }
        Op::DeltaStep { .. } => {
            let q = operand(0)?;
            let st = operand(ins.len().saturating_sub(1))?;
            Launch::Scan {
                batch_heads: dim(q, 0)?.mul(&dim(q, 1)?),
                tokens: c(1),
                chunk: c(1),
                state: dim(st, 2)?.mul(&dim(st, 3)?),
            }
        }
        Op::Split { .. } => Launch::Elements { n: operand(0)?.numel() },
        Op::KvWrite => Launch::Elements { n: operand(1)?.numel() },
        Op::Fused(body) => {
            let b = &body.graph;
            let order = b.topo_order().map_err(|_| format!("{n}: the fused body has a cycle"))?;
            let mut best: Option<Launch> = None;
            for m in order.into_iter().filter(|m| !b.op(*m).is_leaf() && !b.op(*m).is_view()) {
                let l = launch(b, m)?;
                if best.as_ref().is_none_or(|x| l.rank() > x.rank()) {
                    best = Some(l);
                }
            }
            match best {
                Some(l) if l.rank() > 1 => l,
                _ => Launch::Elements { n: out.numel() },
            }
        }
        _ => Launch::Elements { n: out.numel() },
    })
}

/// Rows of the last axis of `t`.
fn rows(t: &TensorType) -> Launch {
    let r = t.rank();
    Launch::Rows { rows: Dim::product(&t.shape[..r.saturating_sub(1)]), width: t.last() }
}
