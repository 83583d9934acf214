//! lower: spec + mode → gir. The exact block math of `../shared/reference/nemotron-flash.md` §2 and
//! the Hugging Face families, written once as graph construction.
//!
//! Graph boundary, by mode:
//! - **prefill** — inputs `tokens i32[B, T]`, `start i32[B]` (tokens already cached per sequence),
//!   `lens i32[B]` (valid positions per sequence; the batch is right-padded), and every layer's state;
//!   outputs `logits f32[B, T, V]` and every state's new version. With `prepend_meta` the meta tokens
//!   are placed in front of the prompt (the sequence is `M + T` long and `start`/`lens` count the
//!   prefix); otherwise the caches are expected to hold the prefix already.
//! - **decode** — inputs `tokens i32[B, 1]`, `start i32[B]` (the new token's position) and the states;
//!   outputs `logits f32[B, 1, V]` and the new states.
//! - **train** — inputs `tokens`, `targets i32[B, T]` and `lens`; states start as zeros; output
//!   `loss f32[]` (mean cross-entropy over targets ≥ 0) and `logits`.
//!
//! State names: `layers.{i}.k_cache`/`v_cache` (attention, capacity `max_seq`, or the window for
//! sliding-window layers), `layers.{i}.conv` and `layers.{i}.ssm` (Mamba2), `layers.{i}.conv_q`,
//! `conv_k`, `conv_v` and `layers.{i}.delta` (DeltaNet). Recurrent states are f32; caches and conv
//! states use the model dtype. Every node records the layer it came from in `Graph::origin`, which
//! leads back to the layer's span in the source through `ModelSpec::layers`.

use flashc_dsl::spec::{self, Activation, Attention, DeltaNet, Ffn, Logits, Mamba2, ModelSpec, Operator, RopeScaling};

use crate::gir::{DType, Dim, Graph, InputRole, Mode, NodeId, Op, RopeStyle, Sym, TensorType, Value};

/// Options of `lower`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    pub mode: Mode,
    /// Prefill only: put the meta tokens in front of the prompt (true), or expect them in the caches.
    pub prepend_meta: bool,
}

impl LowerOptions {
    pub fn new(mode: Mode) -> LowerOptions {
        LowerOptions { mode, prepend_meta: true }
    }
}

/// Lowers a spec. A failure is an internal error (a valid spec always lowers).
pub fn lower(spec: &ModelSpec, opts: &LowerOptions) -> Result<Graph, String> {
    let mut l = Lowerer::new(spec, opts);
    l.model()?;
    Ok(l.g)
}

/// The effective RoPE base after scaling.
pub fn rope_theta(spec: &ModelSpec, rope: &spec::Rope, head_dim: u64) -> f64 {
    match &rope.scaling {
        RopeScaling::None => rope.theta,
        RopeScaling::Ntk { factor, original_max } => {
            let d = head_dim as f64;
            let ratio = factor * spec.max_seq as f64 / *original_max as f64 - (factor - 1.0);
            rope.theta * ratio.max(1.0).powf(d / (d - 2.0))
        }
    }
}

struct Lowerer<'a> {
    spec: &'a ModelSpec,
    opts: LowerOptions,
    g: Graph,
    dtype: DType,
    /// The layer being lowered (recorded as each node's origin).
    layer: Option<u32>,
    /// The sequence length of the hidden states (T, M + T, or 1).
    seq: Dim,
    start: Option<Value>,
    lens: Option<Value>,
}

fn d(x: u64) -> Dim {
    Dim::from(x)
}

fn b() -> Dim {
    Dim::sym(Sym::B)
}

impl<'a> Lowerer<'a> {
    fn new(spec: &'a ModelSpec, opts: &LowerOptions) -> Lowerer<'a> {
        let mut g = Graph::new(spec.name.clone());
        g.mode = Some(opts.mode);
        Lowerer {
            spec,
            opts: *opts,
            g,
            dtype: spec.dtype.into(),
            layer: None,
            seq: Dim::sym(Sym::T),
            start: None,
            lens: None,
        }
    }

    fn decode(&self) -> bool {
        self.opts.mode == Mode::Decode
    }

    fn node(&mut self, op: Op, operands: &[Value]) -> Result<NodeId, String> {
        let n = self.g.add(op, operands).map_err(|e| format!("internal error while lowering: {e}"))?;
        if let Some(l) = self.layer {
            self.g.origin.insert(n, l);
        }
        Ok(n)
    }

    fn v(&mut self, op: Op, operands: &[Value]) -> Result<Value, String> {
        self.node(op, operands).map(Value::from)
    }

    fn input(&mut self, name: &str, role: InputRole, ty: TensorType) -> Value {
        self.g.add_leaf(Op::Input { name: name.to_string(), role, index: 0 }, ty).into()
    }

    fn weight(&mut self, name: String, shape: &[u64]) -> Value {
        let ty = TensorType::new(self.dtype, shape.iter().map(|x| d(*x)));
        self.g.add_leaf(Op::Weight { name }, ty).into()
    }

    /// A layer state: an input in prefill/decode, zeros in training; returned as an output either way.
    fn state(&mut self, name: String, ty: TensorType) -> Value {
        if self.opts.mode == Mode::Train {
            self.g.add_leaf(Op::Zeros, ty).into()
        } else {
            self.input(&name, InputRole::State, ty)
        }
    }

    fn state_out(&mut self, name: String, v: Value) {
        if self.opts.mode != Mode::Train {
            self.g.set_output(name, v);
        }
    }

    fn reshape(&mut self, x: Value, shape: Vec<Dim>) -> Result<Value, String> {
        self.v(Op::Reshape { shape }, &[x])
    }

    /// `x · Wᵀ (+ bias)` for a PyTorch `[out, in]` weight.
    fn linear(&mut self, x: Value, w: &str, out: u64, inp: u64, bias: bool) -> Result<Value, String> {
        let wv = self.weight(w.to_string(), &[out, inp]);
        let y = self.v(Op::MatMul { trans_a: false, trans_b: true }, &[x, wv])?;
        if bias {
            let bv = self.weight(format!("{w}_bias"), &[out]);
            return self.v(Op::Add, &[y, bv]);
        }
        Ok(y)
    }

    fn split(&mut self, x: Value, axis: u32, sizes: &[u64]) -> Result<Vec<Value>, String> {
        let n = self.node(Op::Split { axis, sizes: sizes.iter().map(|s| d(*s)).collect() }, &[x])?;
        Ok((0..sizes.len()).map(|i| Value::new(n, i as u16)).collect())
    }

    /// `[B, seq, rest..]` (prefill/train) or `[B, rest..]` (decode) shapes for per-token tensors.
    fn tok_shape(&self, rest: &[u64]) -> Vec<Dim> {
        let mut s = vec![b()];
        if !self.decode() {
            s.push(self.seq.clone());
        }
        s.extend(rest.iter().map(|x| d(*x)));
        s
    }

    fn model(&mut self) -> Result<(), String> {
        let spec = self.spec;
        let (h, v) = (spec.hidden, spec.vocab);
        let i32_ = |shape: Vec<Dim>| TensorType::new(DType::I32, shape);
        let t = if self.decode() { d(1) } else { Dim::sym(Sym::T) };
        let tokens = self.input("tokens", InputRole::Tokens, i32_(vec![b(), t.clone()]));
        let targets = (self.opts.mode == Mode::Train)
            .then(|| self.input("targets", InputRole::Targets, i32_(vec![b(), t.clone()])));
        self.start = Some(match self.opts.mode {
            Mode::Train => self.g.add_leaf(Op::Zeros, i32_(vec![b()])).into(),
            _ => self.input("start", InputRole::Start, i32_(vec![b()])),
        });
        if self.opts.mode != Mode::Decode {
            self.lens = Some(self.input("lens", InputRole::Lens, i32_(vec![b()])));
        }

        let embed = self.weight("embed".to_string(), &[v, h]);
        let mut x = self.v(Op::Embed, &[embed, tokens])?;
        let meta = spec.meta_tokens;
        let prepend =
            meta > 0 && self.opts.mode != Mode::Decode && (self.opts.prepend_meta || self.opts.mode == Mode::Train);
        self.seq = t.clone();
        if prepend {
            let mw = self.weight("meta_tokens".to_string(), &[meta, h]);
            x = self.v(Op::MetaPrefix, &[mw, x])?;
            self.seq = t.add(&d(meta));
        }
        if self.decode() {
            // Decode mixers work on [B, ...]; the residual stream keeps its token axis of 1.
            self.seq = d(1);
        }

        for layer in &spec.layers {
            self.layer = Some(layer.index as u32);
            let i = layer.index;
            let nw = self.weight(format!("layers.{i}.norm"), &[h]);
            let n = self.v(Op::RmsNorm { eps: spec.norm.eps() }, &[x, nw])?;
            let y = match &layer.op {
                Operator::Attention(a) => self.attention(i, a, n)?,
                Operator::DeltaNet(dn) => self.deltanet(i, dn, n)?,
                Operator::Mamba2(m) => self.mamba2(i, m, n)?,
                Operator::Ffn(f) => self.ffn(i, f, n)?,
            };
            x = self.v(Op::Add, &[x, y])?;
        }
        self.layer = None;

        let fw = self.weight("final_norm".to_string(), &[h]);
        let mut x = self.v(Op::RmsNorm { eps: spec.norm.eps() }, &[x, fw])?;
        if prepend {
            x = self.v(Op::Slice { axis: 1, start: d(meta), len: t.clone() }, &[x])?;
        }
        let head = if spec.tie_embeddings { embed } else { self.weight("lm_head".to_string(), &[v, h]) };
        let raw = self.v(Op::MatMul { trans_a: false, trans_b: true }, &[x, head])?;
        let raw = if self.dtype == DType::F32 { raw } else { self.v(Op::Convert { dtype: DType::F32 }, &[raw])? };
        let logits = match spec.logits {
            // The inverse row norms depend on the weight only: computed once at load.
            Logits::RowNormalized => {
                let inv = self.v(Op::RowInvNorm, &[head])?;
                self.v(Op::Mul, &[raw, inv])?
            }
            Logits::Plain => raw,
        };
        self.g.set_output("logits", logits);
        if let Some(targets) = targets {
            let loss = self.v(Op::CrossEntropy, &[logits, targets])?;
            self.g.set_output("loss", loss);
        }
        Ok(())
    }

    fn attention(&mut self, i: usize, a: &Attention, n: Value) -> Result<Value, String> {
        let h = self.spec.hidden;
        let (hq, hkv, hd) = (a.heads, a.kv_heads, a.head_dim);
        let p = format!("layers.{i}.attn");
        let q = self.linear(n, &format!("{p}.q_proj"), hq * hd, h, a.qkv_bias)?;
        let k = self.linear(n, &format!("{p}.k_proj"), hkv * hd, h, a.qkv_bias)?;
        let vv = self.linear(n, &format!("{p}.v_proj"), hkv * hd, h, a.qkv_bias)?;
        // Heads on their own axis, with the token axis kept (1 in decode).
        let seq = self.seq.clone();
        let heads4 = |heads: u64| vec![b(), seq.clone(), d(heads), d(hd)];
        let mut q = self.reshape(q, heads4(hq))?;
        let mut k = self.reshape(k, heads4(hkv))?;
        let vv = self.reshape(vv, heads4(hkv))?;
        if a.qk_norm {
            let eps = self.spec.norm.eps();
            let qn = self.weight(format!("{p}.q_norm"), &[hd]);
            let kn = self.weight(format!("{p}.k_norm"), &[hd]);
            q = self.v(Op::RmsNorm { eps }, &[q, qn])?;
            k = self.v(Op::RmsNorm { eps }, &[k, kn])?;
        }
        let start = self.start.ok_or("no start input")?;
        if let Some(rope) = &a.rope {
            let theta = rope_theta(self.spec, rope, hd);
            let style = match rope.style {
                spec::RopeStyle::RotateHalf => RopeStyle::RotateHalf,
                spec::RopeStyle::Interleaved => RopeStyle::Interleaved,
            };
            q = self.v(Op::Rope { style, theta }, &[q, start])?;
            k = self.v(Op::Rope { style, theta }, &[k, start])?;
        }
        let cap = a.window.map_or(self.spec.max_seq, |w| w.min(self.spec.max_seq));
        // Training attends within the batch only; its cache (unused afterwards) holds T tokens.
        let cap_dim = if self.opts.mode == Mode::Train { self.seq.clone() } else { d(cap) };
        let cache_ty = TensorType::new(self.dtype, [b(), cap_dim, d(hkv), d(hd)]);
        let kc = self.state(format!("layers.{i}.k_cache"), cache_ty.clone());
        let vc = self.state(format!("layers.{i}.v_cache"), cache_ty);
        let scale = 1.0 / (hd as f64).sqrt();
        let o = if self.decode() {
            let kc2 = self.v(Op::KvWrite, &[kc, k, start])?;
            let vc2 = self.v(Op::KvWrite, &[vc, vv, start])?;
            self.state_out(format!("layers.{i}.k_cache"), kc2);
            self.state_out(format!("layers.{i}.v_cache"), vc2);
            let q3 = self.reshape(q, vec![b(), d(hq), d(hd)])?;
            self.v(Op::AttentionDecode { window: a.window, scale }, &[q3, kc2, vc2, start])?
        } else {
            let lens = self.lens.ok_or("no lens input")?;
            let n = self.node(Op::AttentionPrefill { window: a.window, scale }, &[q, k, vv, kc, vc, start, lens])?;
            self.state_out(format!("layers.{i}.k_cache"), Value::new(n, 1));
            self.state_out(format!("layers.{i}.v_cache"), Value::new(n, 2));
            Value::from(n)
        };
        let o = self.reshape(o, vec![b(), self.seq_or_one(), d(hq * hd)])?;
        self.linear(o, &format!("{p}.o_proj"), h, hq * hd, a.out_bias)
    }

    /// The token axis of the residual stream (1 in decode).
    fn seq_or_one(&self) -> Dim {
        if self.decode() { d(1) } else { self.seq.clone() }
    }

    /// Causal depthwise conv with its state (prefill) or one step (decode), then SiLU.
    fn conv(&mut self, x: Value, w: &str, state: &str, channels: u64, width: u64, bias: bool) -> Result<Value, String> {
        let wv = self.weight(w.to_string(), &[channels, width]);
        let st_ty = TensorType::new(self.dtype, [b(), d(channels), d(width - 1)]);
        let st = self.state(state.to_string(), st_ty);
        let mut ins = vec![x, wv, st];
        let n = if self.decode() {
            if bias {
                ins.push(self.weight(format!("{w}_bias"), &[channels]));
            }
            self.node(Op::Conv1dUpdate { bias }, &ins)?
        } else {
            ins.push(self.lens.ok_or("no lens input")?);
            if bias {
                ins.push(self.weight(format!("{w}_bias"), &[channels]));
            }
            self.node(Op::Conv1d { bias }, &ins)?
        };
        self.state_out(state.to_string(), Value::new(n, 1));
        self.v(Op::Silu, &[Value::from(n)])
    }

    /// `[B, 1, x]` → `[B, x]` in decode (mixers run per token); identity otherwise.
    fn squeeze_token(&mut self, x: Value, width: u64) -> Result<Value, String> {
        if self.decode() { self.reshape(x, vec![b(), d(width)]) } else { Ok(x) }
    }

    fn deltanet(&mut self, i: usize, dn: &DeltaNet, n: Value) -> Result<Value, String> {
        let h = self.spec.hidden;
        let (hd, dk, dv) = (dn.heads, dn.head_dim, dn.v_head_dim);
        let p = format!("layers.{i}.deltanet");
        let s = format!("layers.{i}");
        let q = self.linear(n, &format!("{p}.q_proj"), hd * dk, h, false)?;
        let k = self.linear(n, &format!("{p}.k_proj"), hd * dk, h, false)?;
        let v = self.linear(n, &format!("{p}.v_proj"), hd * dv, h, false)?;
        let bproj = self.linear(n, &format!("{p}.b_proj"), hd, h, false)?;
        let q = self.squeeze_token(q, hd * dk)?;
        let k = self.squeeze_token(k, hd * dk)?;
        let v = self.squeeze_token(v, hd * dv)?;
        let q = self.conv(q, &format!("{p}.q_conv"), &format!("{s}.conv_q"), hd * dk, dn.conv, dn.conv_bias)?;
        let k = self.conv(k, &format!("{p}.k_conv"), &format!("{s}.conv_k"), hd * dk, dn.conv, dn.conv_bias)?;
        let v = self.conv(v, &format!("{p}.v_conv"), &format!("{s}.conv_v"), hd * dv, dn.conv, dn.conv_bias)?;
        let mut q = self.reshape(q, self.tok_shape(&[hd, dk]))?;
        let mut k = self.reshape(k, self.tok_shape(&[hd, dk]))?;
        let v = self.reshape(v, self.tok_shape(&[hd, dv]))?;
        if dn.qk_l2norm {
            q = self.v(Op::L2Norm { eps: 1e-6 }, &[q])?;
            k = self.v(Op::L2Norm { eps: 1e-6 }, &[k])?;
        }
        let bproj = self.reshape(bproj, self.tok_shape(&[hd]))?;
        let beta = self.v(Op::Sigmoid, &[bproj])?;
        let mut ins = vec![q, k, v, beta];
        if dn.gated {
            let a = self.linear(n, &format!("{p}.a_proj"), hd, h, false)?;
            let a = self.reshape(a, self.tok_shape(&[hd]))?;
            let dt_bias = self.weight(format!("{p}.dt_bias"), &[hd]);
            let a_log = self.weight(format!("{p}.A_log"), &[hd]);
            let sp = self.v(Op::Add, &[a, dt_bias])?;
            let sp = self.v(Op::Softplus, &[sp])?;
            let ea = self.v(Op::Exp, &[a_log])?;
            let na = self.v(Op::Neg, &[ea])?;
            ins.push(self.v(Op::Mul, &[sp, na])?);
        }
        let st = self.state(format!("{s}.delta"), TensorType::new(DType::F32, [b(), d(hd), d(dk), d(dv)]));
        ins.push(st);
        let scale = 1.0 / (dk as f64).sqrt();
        let node = if self.decode() {
            self.node(Op::DeltaStep { scale, gated: dn.gated }, &ins)?
        } else {
            ins.push(self.lens.ok_or("no lens input")?);
            self.node(Op::DeltaScan { chunk: 64, scale, gated: dn.gated }, &ins)?
        };
        self.state_out(format!("{s}.delta"), Value::new(node, 1));
        let o = Value::from(node);
        let onorm = self.weight(format!("{p}.o_norm"), &[dv]);
        let o = if dn.gated {
            let g = self.linear(n, &format!("{p}.g_proj"), hd * dv, h, false)?;
            let g = self.reshape(g, self.tok_shape(&[hd, dv]))?;
            self.v(Op::GatedRmsNorm { eps: dn.norm_eps, group: dv, norm_before_gate: true }, &[o, g, onorm])?
        } else {
            self.v(Op::RmsNorm { eps: dn.norm_eps }, &[o, onorm])?
        };
        let o = self.reshape(o, vec![b(), self.seq_or_one(), d(hd * dv)])?;
        self.linear(o, &format!("{p}.o_proj"), h, hd * dv, false)
    }

    fn mamba2(&mut self, i: usize, m: &Mamba2, n: Value) -> Result<Value, String> {
        let h = self.spec.hidden;
        let (di, nh, hp, g, ns) = (m.inner, m.heads, m.head_dim, m.groups, m.state);
        let p = format!("layers.{i}.mamba2");
        let conv_ch = di + 2 * g * ns;
        let zxbcdt = self.linear(n, &format!("{p}.in_proj"), 2 * di + 2 * g * ns + nh, h, m.proj_bias)?;
        let zxbcdt = self.squeeze_token(zxbcdt, 2 * di + 2 * g * ns + nh)?;
        let axis = if self.decode() { 1 } else { 2 };
        let parts = self.split(zxbcdt, axis, &[di, conv_ch, nh])?;
        let (z, xbc, dt) = (parts[0], parts[1], parts[2]);
        let xbc = self.conv(xbc, &format!("{p}.conv"), &format!("layers.{i}.conv"), conv_ch, m.conv, m.conv_bias)?;
        let parts = self.split(xbc, axis, &[di, g * ns, g * ns])?;
        let x = self.reshape(parts[0], self.tok_shape(&[nh, hp]))?;
        let bm = self.reshape(parts[1], self.tok_shape(&[g, ns]))?;
        let cm = self.reshape(parts[2], self.tok_shape(&[g, ns]))?;
        let dt_bias = self.weight(format!("{p}.dt_bias"), &[nh]);
        let dt = self.v(Op::Add, &[dt, dt_bias])?;
        let mut dt = self.v(Op::Softplus, &[dt])?;
        if m.dt_min > 0.0 || m.dt_max.is_some() {
            let min = (m.dt_min > 0.0).then_some(m.dt_min);
            dt = self.v(Op::Clamp { min, max: m.dt_max }, &[dt])?;
        }
        let a_log = self.weight(format!("{p}.A_log"), &[nh]);
        let ea = self.v(Op::Exp, &[a_log])?;
        let a = self.v(Op::Neg, &[ea])?;
        let dskip = self.weight(format!("{p}.D"), &[nh]);
        let st = self.state(format!("layers.{i}.ssm"), TensorType::new(DType::F32, [b(), d(nh), d(hp), d(ns)]));
        let node = if self.decode() {
            self.node(Op::SsdStep, &[x, dt, a, bm, cm, dskip, st])?
        } else {
            let lens = self.lens.ok_or("no lens input")?;
            self.node(Op::SsdScan { chunk: m.chunk }, &[x, dt, a, bm, cm, dskip, st, lens])?
        };
        self.state_out(format!("layers.{i}.ssm"), Value::new(node, 1));
        let y = self.reshape(Value::from(node), self.tok_shape(&[di]))?;
        let nw = self.weight(format!("{p}.norm"), &[di]);
        let y = self.v(Op::GatedRmsNorm { eps: m.norm_eps, group: di / g, norm_before_gate: false }, &[y, z, nw])?;
        let y = if self.decode() { self.reshape(y, vec![b(), d(1), d(di)])? } else { y };
        self.linear(y, &format!("{p}.out_proj"), h, di, m.proj_bias)
    }

    fn ffn(&mut self, i: usize, f: &Ffn, n: Value) -> Result<Value, String> {
        let h = self.spec.hidden;
        let p = format!("layers.{i}.ffn");
        // The gate projection is built first so that the horizontal matmul fusion packs [gate; up]:
        // the gate is then the first half of the fused product, as the GEMM/GEMV SwiGLU epilogue
        // expects.
        let act = match f.act {
            Activation::Swiglu => {
                let gate = self.linear(n, &format!("{p}.gate_proj"), f.inner, h, f.bias)?;
                let up = self.linear(n, &format!("{p}.up_proj"), f.inner, h, f.bias)?;
                self.v(Op::Swiglu, &[gate, up])?
            }
            Activation::Relu2 => {
                let up = self.linear(n, &format!("{p}.up_proj"), f.inner, h, f.bias)?;
                self.v(Op::Relu2, &[up])?
            }
            Activation::Gelu => {
                let up = self.linear(n, &format!("{p}.up_proj"), f.inner, h, f.bias)?;
                self.v(Op::Gelu, &[up])?
            }
        };
        self.linear(act, &format!("{p}.down_proj"), h, f.inner, f.bias)
    }
}
