#!/usr/bin/env python3
"""Golden reference outputs for flashc's CPU runtime, computed by Hugging Face transformers.

flashc's runtime must reproduce independent implementations. This script builds tiny random checkpoints
with transformers itself, runs them on CPU in float32 and writes what they compute, so that flashc's
tests can compare against files committed under `tests/goldens/` without needing Python.

How to run (from the repository root):

    python3 -m venv /work/venv-goldens
    /work/venv-goldens/bin/pip install -r scripts/requirements-goldens.txt
    /work/venv-goldens/bin/python scripts/make_goldens.py            # writes tests/goldens/
    /work/venv-goldens/bin/python scripts/make_goldens.py --out DIR  # writes DIR instead

The run is deterministic (fixed seeds, float32, CPU, one thread, deterministic algorithms) and
idempotent: every case directory is deleted and rewritten, and a second run writes byte-identical files
(with the same package versions). It needs no network: models are built from configs, never downloaded.
The optional fast kernels (`mamba_ssm`, `causal_conv1d`, `fla`, hub `kernels`) must not be installed;
the script checks that transformers' pure-PyTorch reference functions are the ones in use.

Cases (each in `tests/goldens/<case>/`):

- `qwen3-tied`, `qwen3-untied`: `Qwen3ForCausalLM` (vocab 128, hidden 64, 2 decoder layers, 4 query
  heads, 2 KV heads, head_dim 16, intermediate 96, RoPE θ 10000, RMSNorm eps 1e-6), with tied and with
  separate `lm_head.weight`. Checks per-head q/k RMSNorm, rotate-half RoPE, GQA, SwiGLU, tying.
  `qwen3-tied` also has a tiny WordLevel `tokenizer.json` (loadable by the Rust `tokenizers` crate);
  its `inputs.json` gives the texts whose encodings are the token sequences.
- `mamba2`: `Mamba2ForCausalLM` (hidden 64, state 16, expand 2, head_dim 16 so 8 heads, n_groups 2,
  conv 4, chunk_size 8, 2 layers, vocab 128, tied embeddings). Checks the SSD chunked scan across chunk
  boundaries (sequence lengths 5, 16 and 21 with chunk 8), B/C shared per group, per-group gated RMSNorm,
  the conv bias, dt_bias/softplus, A = -exp(A_log) and the D skip.
- `nemotron-h`: `NemotronHForCausalLM` with pattern `M*-M-` (Mamba2, attention without RoPE, relu² MLP)
  and `time_step_min` = 0.05 set so that the prefill clamp `dt >= time_step_min` is active on part of
  the tokens (see the README for the decode-path caveat).
- `deltanet`: the delta-rule recurrence alone, from transformers' Qwen3-Next reference functions
  `torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule`: `plain.safetensors` (g = 0,
  DeltaNet) and `gated.safetensors` (random g < 0, Gated DeltaNet).

Every model case has `config.json`, `model.safetensors` and `generation_config.json` from
`save_pretrained`, `inputs.json` (token sequences), `logits.safetensors` (`seq0`, `seq1`, ... each
f32 [T, vocab], a plain forward of that sequence alone, batch 1, no padding), `greedy.json` (8 greedy
tokens per sequence) and `meta.json` (the checks this script ran and their numbers).

Besides transformers, the script runs its own float64 implementation of flashc's block math
(`compiler/src/lower.rs`) on the *saved* files and requires it to agree with transformers, so a golden
that passes here is also a check of the formulas flashc implements and of the tensor names it reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

# Must be set before transformers is imported: no hub kernels, no network.
os.environ["USE_HUB_KERNELS"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 128
LENGTHS = (5, 16, 21)  # < one Mamba2 chunk of 8, exactly two chunks, two chunks and a partial third
NEW_TOKENS = 8
# The top-1/top-2 logit gap must be at least this fraction of the sequence's largest |logit| at every
# position (prompt and greedy steps), so that a runtime within the 1e-4 tolerance cannot flip an argmax.
MIN_GAP = 5e-4
# Each greedy continuation must have at least this many distinct tokens (random models like to repeat).
MIN_DISTINCT = 3
# transformers (f32) against this script's float64 implementation of flashc's math.
REF_TOL = 2e-5

FAST_KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d", "fla", "kernels")


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def setup_determinism() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    for pkg in FAST_KERNEL_PACKAGES:
        if importlib.util.find_spec(pkg) is not None:
            sys.exit(f"error: `{pkg}` is installed; uninstall it so transformers uses its PyTorch reference code")


def torch_fallback_in_use(fn) -> bool:
    """True when a `use_kernel_func_from_hub_with_fallback` function resolves to its PyTorch body."""
    names = fn.__code__.co_freevars
    if "is_new_implementation" not in names:
        return True  # not wrapped at all: the function is its own body
    cells = dict(zip(names, (c.cell_contents for c in fn.__closure__)))
    return cells["is_new_implementation"] is False


# ----------------------------------------------------------------------------------------------------
# output helpers


def dump_json(path: Path, obj) -> None:
    """JSON with one line per top-level key and lists of numbers kept on one line."""

    def enc(v, depth):
        if isinstance(v, dict):
            if not v:
                return "{}"
            pad = "  " * (depth + 1)
            items = [f"{pad}{json.dumps(k)}: {enc(x, depth + 1)}" for k, x in v.items()]
            return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
        if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            pad = "  " * (depth + 1)
            return "[\n" + ",\n".join(pad + enc(x, depth + 1) for x in v) + "\n" + "  " * depth + "]"
        return json.dumps(v, allow_nan=False)

    path.write_text(enc(obj, 0) + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the golden tolerance's definition)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def top_gap(logits: torch.Tensor) -> torch.Tensor:
    """top-1 minus top-2 per row of [T, V]."""
    t = logits.double().topk(2, dim=-1).values
    return t[..., 0] - t[..., 1]


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def randomize(model: torch.nn.Module, seed: int, rule) -> list[str]:
    """Overwrites every parameter (tied ones once) with values from `rule(name, shape, gen)`."""
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(param_seed(seed, name))
            v = rule(name, tuple(p.shape), g)
            assert v.shape == p.shape and v.dtype == torch.float32, name
            p.copy_(v)
            done.append(name)
    return done


def normal(shape, g, std):
    return torch.randn(shape, generator=g) * std


def uniform(shape, g, lo, hi):
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def common_rule(name, shape, g, dt_bias_range=(-2.0, 0.5)):
    """Initialisation for every parameter kind of these families; unknown names are an error."""
    last = name.rsplit(".", 1)[-1]
    if "norm" in name and last == "weight":  # RMSNorm weights: random around 1
        return uniform(shape, g, 0.6, 1.4)
    if "embed" in name:
        return normal(shape, g, 0.5)
    if name == "lm_head.weight":
        return normal(shape, g, 0.5)
    if "conv1d" in name:
        return normal(shape, g, 0.4) if last == "weight" else normal(shape, g, 0.2)
    if last == "A_log":  # A = -exp(A_log) in [-4, -0.3]
        return torch.log(uniform(shape, g, 0.3, 4.0))
    if last == "D":
        return uniform(shape, g, 0.5, 1.5)
    if last == "dt_bias":
        return uniform(shape, g, *dt_bias_range)
    if last == "weight" and len(shape) == 2:  # projections
        return normal(shape, g, 0.2)
    if last == "bias":
        return normal(shape, g, 0.1)
    raise ValueError(f"no initialisation rule for parameter {name} {shape}")


# ----------------------------------------------------------------------------------------------------
# float64 implementation of flashc's block math (compiler/src/lower.rs, compiler/src/gir/op.rs)


def rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_rotate_half(x, theta):
    """x [T, heads, d] at positions 0..T-1, inverse frequencies theta^(-2i/d)."""
    t, _, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention(x, w, p, hq, hkv, hd, eps, qk_norm, rope_theta):
    t = x.shape[0]
    q = (x @ w[p + "q_proj.weight"].T).view(t, hq, hd)
    k = (x @ w[p + "k_proj.weight"].T).view(t, hkv, hd)
    v = (x @ w[p + "v_proj.weight"].T).view(t, hkv, hd)
    if qk_norm:
        q = rms(q, w[p + "q_norm.weight"], eps)
        k = rms(k, w[p + "k_norm.weight"], eps)
    if rope_theta is not None:
        q, k = rope_rotate_half(q, rope_theta), rope_rotate_half(k, rope_theta)
    rep = hq // hkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # head h uses kv head h // rep
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, hq * hd)
    return o @ w[p + "o_proj.weight"].T


def ref_mamba2(x, w, p, m):
    """Sequential Mamba2 mixer: in_proj → [z, xBC, dt]; conv+SiLU; SSD recurrence; gated RMSNorm."""
    t = x.shape[0]
    di, nh, hp, g, ns, k = m["inner"], m["heads"], m["head_dim"], m["groups"], m["state"], m["conv"]
    zxbcdt = x @ w[p + "in_proj.weight"].T
    if p + "in_proj.bias" in w:
        zxbcdt = zxbcdt + w[p + "in_proj.bias"]
    conv_ch = di + 2 * g * ns
    z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di : di + conv_ch], zxbcdt[:, di + conv_ch :]
    cw = w[p + "conv1d.weight"].reshape(conv_ch, k)  # [C, 1, K] → [C, K]
    padded = torch.cat([torch.zeros(k - 1, conv_ch, dtype=x.dtype), xbc], 0)
    y = sum(padded[j : j + t] * cw[:, j] for j in range(k))
    if p + "conv1d.bias" in w:
        y = y + w[p + "conv1d.bias"]
    xbc = F.silu(y)
    xs = xbc[:, :di].view(t, nh, hp)
    bm = xbc[:, di : di + g * ns].view(t, g, ns).repeat_interleave(nh // g, dim=1)  # head h: group h // (nh/g)
    cm = xbc[:, di + g * ns :].view(t, g, ns).repeat_interleave(nh // g, dim=1)
    dt = F.softplus(dt + w[p + "dt_bias"]).clamp(min=m["dt_min"], max=m["dt_max"])
    a = -torch.exp(w[p + "A_log"])
    d = w[p + "D"]
    s = torch.zeros(nh, hp, ns, dtype=x.dtype)
    ys = []
    for i in range(t):
        s = torch.exp(dt[i] * a)[:, None, None] * s + (dt[i][:, None] * xs[i])[:, :, None] * bm[i][:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", s, cm[i]) + d[:, None] * xs[i])
    y = torch.stack(ys).reshape(t, di)
    gated = (y * F.silu(z)).view(t, g, di // g)  # norm per group of di / n_groups channels
    gated = (gated * torch.rsqrt((gated * gated).mean(-1, keepdim=True) + m["norm_eps"])).reshape(t, di)
    out = (gated * w[p + "norm.weight"]) @ w[p + "out_proj.weight"].T
    if p + "out_proj.bias" in w:
        out = out + w[p + "out_proj.bias"]
    return out


def ref_qwen3(w, cfg, ids):
    eps, hd = cfg["rms_norm_eps"], cfg["head_dim"]
    theta = cfg["rope_parameters"]["rope_theta"]
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        x = x + ref_attention(
            h, w, p + "self_attn.", cfg["num_attention_heads"], cfg["num_key_value_heads"], hd, eps, True, theta
        )
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        up = h @ w[p + "mlp.up_proj.weight"].T
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return x @ head.T


def ref_mamba2_model(w, cfg, ids):
    eps = cfg["layer_norm_epsilon"]
    lim = cfg["time_step_limit"]
    m = {
        "inner": cfg["num_heads"] * cfg["head_dim"],
        "heads": cfg["num_heads"],
        "head_dim": cfg["head_dim"],
        "groups": cfg["n_groups"],
        "state": cfg["state_size"],
        "conv": cfg["conv_kernel"],
        "dt_min": float(lim[0]),
        "dt_max": float(lim[1]),
        "norm_eps": eps,
    }
    x = w["backbone.embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        x = x + ref_mamba2(rms(x, w[p + "norm.weight"], eps), w, p + "mixer.", m)
    x = rms(x, w["backbone.norm_f.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["backbone.embeddings.weight"]
    return x @ head.T


def ref_nemotron_h(w, cfg, ids):
    eps = cfg["layer_norm_epsilon"]
    m = {
        "inner": cfg["mamba_num_heads"] * cfg["mamba_head_dim"],
        "heads": cfg["mamba_num_heads"],
        "head_dim": cfg["mamba_head_dim"],
        "groups": cfg["n_groups"],
        "state": cfg["ssm_state_size"],
        "conv": cfg["conv_kernel"],
        "dt_min": float(cfg["time_step_min"]),  # transformers' prefill clamp (time_step_limit is ignored)
        "dt_max": float("inf"),
        "norm_eps": eps,
    }
    x = w["backbone.embeddings.weight"][ids]
    for i, kind in enumerate(cfg["layers_block_type"]):
        p = f"backbone.layers.{i}."
        h = rms(x, w[p + "norm.weight"], eps)
        if kind == "linear_attention":
            y = ref_mamba2(h, w, p + "mixer.", m)
        elif kind == "full_attention":
            y = ref_attention(
                h, w, p + "mixer.", cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                eps, False, None,
            )
        elif kind == "mlp":
            y = F.relu(h @ w[p + "mixer.up_proj.weight"].T).square() @ w[p + "mixer.down_proj.weight"].T
        else:
            raise ValueError(kind)
        x = x + y
    x = rms(x, w["backbone.norm_f.weight"], eps)
    return x @ w["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------------
# model cases


def greedy_nocache(model, ids: list[int]):
    """Reference greedy continuation: a full forward of the whole prefix at every step."""
    seq, logits_steps = list(ids), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            lg = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            logits_steps.append(lg)
            seq.append(int(lg.argmax()))
    return seq[len(ids) :], torch.stack(logits_steps)


def greedy_generate(model, ids: list[int]):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=0,
            eos_token_id=None,
            pad_token_id=None,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits, 0)


def build_and_check(
    case, out_dir: Path, make_model, ref_fn, sequences, seed, extra_meta, generate_note=None, retries=100
):
    """Builds the model (retrying seeds until every argmax has a safe margin), saves and checks it."""
    for attempt in range(retries):
        s = seed + attempt
        model = make_model(s)
        model.eval()
        with torch.no_grad():
            logits = [model(torch.tensor([ids]), use_cache=False).logits[0] for ids in sequences]
        greedy = [greedy_nocache(model, ids) for ids in sequences]
        gaps = []
        for lg, (_, gl) in zip(logits, greedy):
            scale = float(torch.cat([lg, gl]).abs().max())
            gaps.append(float(torch.cat([top_gap(lg), top_gap(gl)]).min()) / scale)
        distinct = min(len(set(toks)) for toks, _ in greedy)
        if min(gaps) >= MIN_GAP and distinct >= MIN_DISTINCT:
            break
        print(f"  {case}: seed {s}: min argmax gap {min(gaps):.2e} (relative), {distinct} distinct greedy tokens; next seed")
    else:
        sys.exit(f"error: {case}: no seed in {retries} tries gives safe argmax margins")

    case_dir = out_dir / case
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    model.save_pretrained(case_dir)

    # Reload what was written and compute the goldens from the files themselves.
    cls = type(model)
    loaded = cls.from_pretrained(case_dir, dtype=torch.float32, attn_implementation="eager")
    loaded.eval()
    tensors = {}
    gold_logits = []
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            lg = loaded(torch.tensor([ids]), use_cache=False).logits[0].contiguous()
            assert torch.equal(lg, logits[i]), f"{case}: reloaded model differs from the built one"
            assert torch.isfinite(lg).all(), f"{case}: non-finite logits"
            assert lg.shape == (len(ids), VOCAB)
            gold_logits.append(lg)
            tensors[f"seq{i}"] = lg
    save_file(tensors, str(case_dir / "logits.safetensors"))

    # Independent float64 implementation of flashc's math on the saved files.
    cfg = json.loads((case_dir / "config.json").read_text(), parse_constant=float)
    cfg = unfloat(cfg)
    w = {k: v.double() for k, v in load_file(str(case_dir / "model.safetensors")).items()}
    ref_errs = []
    for ids, lg in zip(sequences, gold_logits):
        ref = ref_fn(w, cfg, torch.tensor(ids))
        e = rel_err(lg, ref)
        ref_errs.append(e)
        assert e < REF_TOL, f"{case}: transformers and the float64 flashc-math reference differ ({e:.2e})"
        assert torch.equal(lg.argmax(-1), ref.argmax(-1)), f"{case}: argmax differs from the reference"

    # Greedy continuations: the reference (no cache) and transformers' generate() with its cache.
    greedy_tokens, gen_tokens, gen_agree, gen_errs = [], [], [], []
    for ids, (toks, steps) in zip(sequences, greedy):
        toks2, steps2 = greedy_nocache(loaded, ids)
        assert toks2 == toks and torch.equal(steps2, steps)
        gtoks, glogits = greedy_generate(loaded, ids)
        greedy_tokens.append(toks)
        gen_tokens.append(gtoks)
        gen_agree.append(gtoks == toks)
        gen_errs.append(rel_err(glogits, steps) if gtoks == toks else None)
    if generate_note is None:
        assert all(gen_agree), f"{case}: generate() with the cache disagrees with the no-cache greedy loop"
        assert max(gen_errs) < REF_TOL, f"{case}: cached decode logits differ from no-cache ones ({max(gen_errs):.2e})"
    for toks in greedy_tokens:
        assert len(toks) == NEW_TOKENS and all(0 <= t < VOCAB for t in toks)
    assert len({t for toks in greedy_tokens for t in toks}) > 1, f"{case}: greedy tokens are all identical"
    for lg in gold_logits:
        assert float(lg.std()) > 0.1, f"{case}: logits are nearly constant"

    greedy_json = {"max_new_tokens": NEW_TOKENS, "sequences": greedy_tokens}
    if not all(gen_agree):
        greedy_json["hf_generate_with_cache"] = gen_tokens
        greedy_json["note"] = generate_note
    dump_json(case_dir / "greedy.json", greedy_json)
    names = sorted(load_file(str(case_dir / "model.safetensors")).keys())
    meta = {
        "case": case,
        "versions": versions(),
        "weight_seed": s,
        "model_class": cls.__name__,
        "tensors": names,
        "logits_tensors": [f"seq{i}" for i in range(len(sequences))],
        "sequence_lengths": [len(x) for x in sequences],
        "max_abs_logit": [round(float(lg.abs().max()), 4) for lg in gold_logits],
        "min_argmax_gap_relative": [float(f"{g:.3e}") for g in gaps],
        "rel_err_vs_float64_flashc_math": [float(f"{e:.3e}") for e in ref_errs],
        "generate_with_cache_matches_greedy": gen_agree,
        "generate_with_cache_logits_rel_err": [None if e is None else float(f"{e:.3e}") for e in gen_errs],
    }
    meta.update(extra_meta(loaded, sequences, greedy_tokens) if extra_meta else {})
    dump_json(case_dir / "meta.json", meta)
    for f in case_dir.iterdir():
        f.chmod(0o644)
    print(f"  {case}: seed {s}, ref rel err {max(ref_errs):.1e}, min gap {min(gaps):.1e}, generate agrees {gen_agree}")
    return case_dir


def unfloat(x):
    """config.json may hold {"__float__": "Infinity"} (transformers 5) or bare Infinity."""
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        return {k: unfloat(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unfloat(v) for v in x]
    return x


def random_sequences(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


# --- Qwen3 -------------------------------------------------------------------------------------------

# A WordLevel vocabulary of exactly VOCAB entries: <unk>, punctuation, digits, then common words.
WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or "
    "had by we can out when up if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just"
).split()
TOKENS = ["<unk>"] + list(".,!?;:'-") + [str(i) for i in range(10)] + WORDS
assert len(TOKENS) == len(set(TOKENS)) == VOCAB, len(TOKENS)

TEXTS = (
    "we can see the water",
    "when the day is long , they go down to the water and look for it",
    "I know a little man who came back after one year , and he had one thing to give me .",
)


def make_tokenizer():
    """A WordLevel tokenizer over TOKENS and the encodings of TEXTS (which must have LENGTHS tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>"])
    return tok, check_tokenizer(tok)


def check_tokenizer(tok):
    seqs = []
    for text, n in zip(TEXTS, LENGTHS):
        ids = tok.encode(text).ids
        assert len(ids) == n, (text, len(ids), n)
        assert 0 not in ids, f"unknown word in {text!r}"
        assert tok.decode(ids) == text, (tok.decode(ids), text)
        seqs.append(ids)
    return seqs


def qwen3_case(out_dir: Path, tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def make(seed):
        cfg = Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=tied,
            attention_bias=False,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            dtype="float32",
        )
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
        randomize(model, seed, common_rule)
        if tied:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        else:
            assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        return model

    case = "qwen3-tied" if tied else "qwen3-untied"
    if tied:
        tok, seqs = make_tokenizer()
        inputs = {"sequences": seqs, "texts": list(TEXTS)}
    else:
        seqs = random_sequences(202)
        inputs = {"sequences": seqs}
    d = build_and_check(case, out_dir, make, ref_qwen3, seqs, seed=1000 if tied else 2000, extra_meta=None)
    names = load_file(str(d / "model.safetensors")).keys()
    assert ("lm_head.weight" in names) == (not tied), "lm_head.weight presence does not follow tying"
    if tied:
        from tokenizers import Tokenizer

        tok.save(str(d / "tokenizer.json"), pretty=True)
        assert check_tokenizer(Tokenizer.from_file(str(d / "tokenizer.json"))) == seqs
    dump_json(d / "inputs.json", inputs)


# --- Mamba2 ------------------------------------------------------------------------------------------


def mamba2_case(out_dir: Path):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.models.mamba2 import modeling_mamba2 as mm

    for fn in (mm.mamba2_chunk_scan, mm.causal_conv1d_fn, mm.causal_conv1d_update, mm.mamba2_selective_state_update):
        assert torch_fallback_in_use(fn), f"{fn.__name__} does not use its PyTorch fallback"

    def make(seed):
        cfg = Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            state_size=16,
            expand=2,
            head_dim=16,
            num_heads=8,
            n_groups=2,
            conv_kernel=4,
            chunk_size=8,
            num_hidden_layers=2,
            use_conv_bias=True,
            use_bias=False,
            layer_norm_epsilon=1e-5,
            residual_in_fp32=True,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            dtype="float32",
        )
        torch.manual_seed(seed)
        model = Mamba2ForCausalLM(cfg)
        randomize(model, seed, common_rule)
        assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
        return model

    def extra(model, seqs, greedy_tokens):
        return {
            "torch_reference_functions": [
                "transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan (prefill; fallback of "
                "mamba_ssm mamba_chunk_scan_combined)",
                "transformers.models.mamba2.modeling_mamba2.causal_conv1d_fn / causal_conv1d_update "
                "(fallbacks of causal_conv1d)",
                "transformers.models.mamba2.modeling_mamba2.mamba2_selective_state_update (cached decode; "
                "fallback of mamba_ssm selective_state_update)",
            ]
        }

    seqs = random_sequences(303)
    d = build_and_check("mamba2", out_dir, make, ref_mamba2_model, seqs, seed=3000, extra_meta=extra)
    dump_json(d / "inputs.json", {"sequences": seqs})


# --- NemotronH ---------------------------------------------------------------------------------------

NEMOTRON_PATTERN = "M*-M-"
NEMOTRON_DT_MIN = 0.05


def nemotron_h_case(out_dir: Path):
    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.models.nemotron_h import modeling_nemotron_h as nm

    for fn in (nm.mamba2_chunk_scan, nm.causal_conv1d_fn, nm.causal_conv1d_update, nm.mamba2_selective_state_update):
        assert torch_fallback_in_use(fn), f"{fn.__name__} does not use its PyTorch fallback"

    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}

    def make(seed):
        cfg = NemotronHConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            layers_block_type=[kinds[c] for c in NEMOTRON_PATTERN],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            mlp_hidden_act="relu2",
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            expand=2,
            chunk_size=8,
            use_conv_bias=True,
            use_bias=False,
            mamba_proj_bias=False,
            mlp_bias=False,
            attention_bias=False,
            time_step_min=NEMOTRON_DT_MIN,
            layer_norm_epsilon=1e-5,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            num_logits_to_keep=1,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            dtype="float32",
        )
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = NemotronHForCausalLM(cfg)
        randomize(model, seed, lambda n, s, g: common_rule(n, s, g, dt_bias_range=(-3.5, 0.0)))
        return model

    def extra(model, seqs, greedy_tokens):
        # How much the prefill clamp dt >= time_step_min matters on these inputs: rerun without it.
        mixers = [layer.mixer for layer in model.model.layers if layer.block_type == "linear_attention"]
        below = [0, 0]  # dt values under the bound, all dt values

        def hook(mod, args, kwargs, out):
            dt = mod.in_proj(args[0])[..., -mod.num_heads :]
            below[0] += int((F.softplus(dt + mod.dt_bias) < NEMOTRON_DT_MIN).sum())
            below[1] += dt.numel()

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mixers]
        with torch.no_grad():
            clamped = [model(torch.tensor([ids]), use_cache=False).logits[0] for ids in seqs]
        for h in handles:
            h.remove()
        saved = [m.time_step_limit for m in mixers]
        for m in mixers:
            m.time_step_limit = (0.0, float("inf"))
        with torch.no_grad():
            unclamped = [model(torch.tensor([ids]), use_cache=False).logits[0] for ids in seqs]
        for m, s in zip(mixers, saved):
            m.time_step_limit = s
        effect = max(rel_err(u, c) for u, c in zip(unclamped, clamped))
        assert effect > 1e-3, "the dt clamp has no visible effect; the case would not exercise it"

        # transformers' cached decode step does not clamp dt. With the clamp added to it, generate()
        # must reproduce the no-cache greedy tokens: that is the only difference.
        orig = nm.mamba2_selective_state_update

        def clamped_step(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kw):
            dt = F.softplus(dt + dt_bias).clamp(min=NEMOTRON_DT_MIN)
            return orig(state, hidden_states, dt, A, B, C, D, dt_bias=None, dt_softplus=False, z=z)

        nm.mamba2_selective_state_update = clamped_step
        try:
            patched = [greedy_generate(model, ids) for ids in seqs]
        finally:
            nm.mamba2_selective_state_update = orig
        patched_errs = []
        for ids, toks, (ptoks, plogits) in zip(seqs, greedy_tokens, patched):
            assert ptoks == toks, "generate() with a clamping decode step disagrees with the greedy loop"
            patched_errs.append(rel_err(plogits, greedy_nocache(model, ids)[1]))
        assert max(patched_errs) < REF_TOL
        return {
            "pattern": NEMOTRON_PATTERN,
            "time_step_min": NEMOTRON_DT_MIN,
            "fraction_of_dt_below_time_step_min": float(f"{below[0] / below[1]:.3f}"),
            "logits_rel_err_without_the_clamp": float(f"{effect:.3e}"),
            "generate_with_clamping_decode_step_matches_greedy": True,
            "generate_with_clamping_decode_step_logits_rel_err": [float(f"{e:.3e}") for e in patched_errs],
        }

    seqs = random_sequences(404)
    note = (
        "sequences: greedy with dt >= time_step_min at every step (a full forward per step; flashc's "
        "semantics). hf_generate_with_cache: transformers' generate(), whose cached decode step does not "
        "clamp dt, so it can differ; with the clamp added to that step it matches sequences."
    )
    d = build_and_check(
        "nemotron-h", out_dir, make, ref_nemotron_h, seqs, seed=4000, extra_meta=extra, generate_note=note
    )
    dump_json(d / "inputs.json", {"sequences": seqs})


# ----------------------------------------------------------------------------------------------------
# DeltaNet recurrence


def ref_delta(q, k, v, beta, g, s0, scale):
    """flashc's DeltaScan in float64: S_t = α_t(I − β_t k_t k_tᵀ)S_{t−1} + β_t k_t v_tᵀ, o_t = scale·S_tᵀq_t."""
    q, k, v, beta, g, s = (x.double() for x in (q, k, v, beta, g, s0))
    bsz, t, h, dk = q.shape
    o = torch.zeros(bsz, t, h, v.shape[-1], dtype=torch.float64)
    eye = torch.eye(dk, dtype=torch.float64)
    for i in range(t):
        kt, qt, vt = k[:, i], q[:, i], v[:, i]  # [B, H, d]
        bt, at = beta[:, i][..., None, None], g[:, i].exp()[..., None, None]
        proj = eye - bt * kt[..., :, None] * kt[..., None, :]
        s = at * (proj @ s) + bt * kt[..., :, None] * vt[..., None, :]
        o[:, i] = scale * torch.einsum("bhkv,bhk->bhv", s, qt)
    return o, s


def deltanet_case(out_dir: Path):
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    rec, chunk = qn.torch_recurrent_gated_delta_rule, qn.torch_chunk_gated_delta_rule
    assert torch_fallback_in_use(rec) and torch_fallback_in_use(chunk)
    bsz, t, h, dk, dv = 2, 20, 2, 16, 16
    case_dir = out_dir / "deltanet"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    meta = {"versions": versions()}
    for name, gated, seed in (("plain", False, 5000), ("gated", True, 6000)):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(bsz, t, h, dk, generator=gen)
        k = torch.randn(bsz, t, h, dk, generator=gen)
        v = torch.randn(bsz, t, h, dv, generator=gen)
        beta = torch.sigmoid(torch.randn(bsz, t, h, generator=gen))
        s0 = torch.randn(bsz, h, dk, dv, generator=gen) * 0.5
        if gated:
            g = torch.log(torch.rand(bsz, t, h, generator=gen) * 0.39 + 0.6)  # decay α = exp(g) in [0.6, 0.99)
        else:
            g = torch.zeros(bsz, t, h)
        q_l2 = qn.l2norm(q, dim=-1, eps=1e-6)
        k_l2 = qn.l2norm(k, dim=-1, eps=1e-6)
        common = dict(g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o, s = rec(q, k, v, initial_state=s0, **common)
        o0, s0_out = rec(q, k, v, initial_state=None, **common)
        # Cross-checks: chunked form (several chunks of 8, and one chunk of 64), pre-normalised inputs,
        # and flashc's formula in float64.
        checks = {}
        for cs in (8, 64):
            oc, sc = chunk(q, k, v, initial_state=s0, chunk_size=cs, **common)
            checks[f"chunk{cs}_rel_err"] = max(rel_err(oc, o), rel_err(sc, s))
        o_pre, s_pre = rec(q_l2, k_l2, v, initial_state=s0, g=g, beta=beta, output_final_state=True,
                           use_qk_l2norm_in_kernel=False)
        checks["prenormalised_rel_err"] = max(rel_err(o_pre, o), rel_err(s_pre, s))
        ro, rs = ref_delta(q_l2, k_l2, v, beta, g, s0, dk**-0.5)
        checks["float64_formula_rel_err"] = max(rel_err(o, ro), rel_err(s, rs))
        ro0, rs0 = ref_delta(q_l2, k_l2, v, beta, g, torch.zeros_like(s0), dk**-0.5)
        checks["float64_formula_zero_state_rel_err"] = max(rel_err(o0, ro0), rel_err(s0_out, rs0))
        for key, e in checks.items():
            assert e < REF_TOL, f"deltanet/{name}: {key} = {e:.2e}"
        tensors = {
            "q": q, "k": k, "q_l2": q_l2, "k_l2": k_l2, "v": v, "beta": beta,
            "initial_state": s0, "o": o, "final_state": s,
            "o_zero_state": o0, "final_state_zero_state": s0_out,
        }
        if gated:
            tensors["g"] = g
        for key, x in tensors.items():
            assert x.dtype == torch.float32 and torch.isfinite(x).all(), key
        save_file({k2: x.contiguous() for k2, x in tensors.items()}, str(case_dir / f"{name}.safetensors"))
        meta[name] = {
            "seed": seed,
            "tensors": {k2: list(x.shape) for k2, x in sorted(tensors.items())},
            "checks": {k2: float(f"{e:.3e}") for k2, e in checks.items()},
            "max_abs_o": round(float(o.abs().max()), 4),
        }
    dump_json(case_dir / "meta.json", meta)
    (case_dir / "README.md").write_text(DELTANET_README)
    for f in case_dir.iterdir():
        f.chmod(0o644)
    print(f"  deltanet: {meta['plain']['checks']} {meta['gated']['checks']}")


DELTANET_README = """\
# deltanet: the delta-rule recurrence

Written by `scripts/make_goldens.py`; do not edit by hand.

The reference is transformers' Qwen3-Next code, `transformers.models.qwen3_next.modeling_qwen3_next`:
`torch_recurrent_gated_delta_rule` (token by token; it produced the saved outputs) and
`torch_chunk_gated_delta_rule` (checked to agree, with chunk sizes 8 and 64). Both are the PyTorch
fallbacks of fla's `fused_recurrent_gated_delta_rule` / `chunk_gated_delta_rule`; fla is not installed.

- `plain.safetensors`: g = 0 (plain DeltaNet, α = 1); it has no `g` tensor.
- `gated.safetensors`: Gated DeltaNet with `g = log α`, α uniform in [0.6, 0.99).

B = 2, T = 20, H = 2, dk = dv = 16, float32. All positions are valid (no padding).

| tensor | shape | meaning |
|---|---|---|
| `q`, `k` | [B, T, H, dk] | raw query / key, N(0, 1) |
| `q_l2`, `k_l2` | [B, T, H, dk] | `x * rsqrt(sum(x²) + 1e-6)` over dk (what flashc's `L2Norm { eps: 1e-6 }` gives, and what `DeltaScan` receives) |
| `v` | [B, T, H, dv] | value |
| `beta` | [B, T, H] | β = sigmoid(N(0, 1)), already through the sigmoid |
| `g` | [B, T, H] | gated only: log-decay, < 0 |
| `initial_state` | [B, H, dk, dv] | S₀ |
| `o`, `final_state` | [B, T, H, dv], [B, H, dk, dv] | output and S_T starting from `initial_state` |
| `o_zero_state`, `final_state_zero_state` | same | the same inputs starting from S₀ = 0 |

Conventions of the reference functions (checked by the script against its own float64 loop of flashc's
`DeltaScan` formula, relative error < 2e-5):

- Inputs are `[B, T, H, d]` (token-major, like flashc's op); the functions transpose internally.
- `use_qk_l2norm_in_kernel=True` L2-normalises q and k with `x * rsqrt(Σx² + 1e-6)` (the eps is inside
  the square root, added to the sum of squares, as in fla). Passing `q_l2`/`k_l2` with the flag off gives
  the same result.
- **The functions always scale q by dk^-1/2** (`query / sqrt(dk)`), after the L2 norm; there is no option
  to turn it off. flashc's `DeltaScan { scale: 1/sqrt(dk) }` is the same thing.
- The state is `[B, H, dk, dv]` (key dimension first), as flashc's `delta` state. Per token:
  `S ← exp(g_t)·S`, then `S ← S + k_t (β_t (v_t − Sᵀk_t))ᵀ`, then `o_t = Sᵀ (q_t / sqrt(dk))`. So the decay
  is applied before the delta read (`Sᵀk` uses the decayed state), and the output reads the *updated*
  state: `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`, exactly flashc's
  formula. No transpose of the state happens anywhere.
- `g` is a log-decay (the state is multiplied by `exp(g)`); in a Gated DeltaNet layer it is
  `−exp(A_log) · softplus(a + dt_bias)`, as flashc's lowering computes it.
- The chunked function pads T up to a multiple of the chunk size with zeros; padded steps do not touch
  the final state (β = 0 there), so its final state equals the recurrent one.
"""


# ----------------------------------------------------------------------------------------------------


def write_top_readme(out_dir: Path) -> None:
    v = versions()
    text = TOP_README.format(**v)
    (out_dir / "README.md").write_text(text)


TOP_README = """\
# Golden outputs from Hugging Face transformers

Written by `scripts/make_goldens.py` (this file included; edit the script, not the file). They let
flashc's CPU runtime be checked against an independent implementation without Python in CI.

Made with torch {torch}, transformers {transformers}, safetensors {safetensors}, tokenizers
{tokenizers}, numpy {numpy}, Python {python} (pinned in `scripts/requirements-goldens.txt`), on CPU, in
float32, single-threaded, with fixed seeds. Regenerate with

    python3 -m venv /work/venv-goldens
    /work/venv-goldens/bin/pip install -r scripts/requirements-goldens.txt
    /work/venv-goldens/bin/python scripts/make_goldens.py

A second run writes byte-identical files.

## Cases

| case | model | what it exercises |
|---|---|---|
| `qwen3-tied` | `Qwen3ForCausalLM`, tied embeddings, with `tokenizer.json` | per-head q/k RMSNorm, rotate-half RoPE (θ 10000), GQA 4/2, SwiGLU, no `lm_head.weight` in the file |
| `qwen3-untied` | `Qwen3ForCausalLM`, separate `lm_head.weight` | the same with an untied head |
| `mamba2` | `Mamba2ForCausalLM`, tied, n_groups 2, chunk 8 | SSD chunked scan over 1, 2 and 3 chunks, per-group B/C, per-group gated RMSNorm, conv bias, D skip |
| `nemotron-h` | `NemotronHForCausalLM`, pattern `M*-M-`, untied | Mamba2 + attention without RoPE + relu² MLP; the `dt ≥ time_step_min` clamp (0.05) is active |
| `deltanet` | transformers' Qwen3-Next delta-rule reference functions | DeltaNet (`plain`) and Gated DeltaNet (`gated`) recurrences; see `deltanet/README.md` |

All models: vocab 128, hidden 64; attention 4 query heads, 2 KV heads, head_dim 16; FFN 96; Mamba2
8 heads × 16, state 16, 2 groups, conv 4, chunk 8. Every weight is random, norm weights included
(uniform in [0.6, 1.4]); A_log, D, dt_bias and conv weights too. `meta.json` in each case lists the
seed used, the tensor names of `model.safetensors`, and the checks below with their numbers.

## Files of a model case

- `config.json`, `model.safetensors`, `generation_config.json`: written by `save_pretrained`; load with
  `flashc import-hf <case dir>`.
- `inputs.json`: `{{"sequences": [[ids…], …]}}`, lengths 5, 16 and 21 (`qwen3-tied` also has `"texts"`;
  `tokenizer.json` encodes each text to its sequence and decodes it back).
- `logits.safetensors`: tensors `seq0`, `seq1`, `seq2`, f32 `[T, 128]`: the logits of a plain forward of
  that sequence alone (batch 1, no padding, no cache), at every position.
- `greedy.json`: `{{"max_new_tokens": 8, "sequences": [[8 ids], …]}}`: greedy continuations of each
  sequence. They are computed as argmax of a full forward of the growing sequence at each step (no cache),
  and checked against `generate(do_sample=False)` with transformers' cache: identical tokens, logits
  within 2e-5, for every case except `nemotron-h` (see below).
- The configs set no bos/eos/pad token: generation never stops early.

## What flashc must match

For each sequence: `max |logits_flashc − logits_golden| / max |logits_golden| < 1e-4`, the same argmax at
every position, and the same 8 greedy tokens (prefill of the prompt, then decode steps with the
caches). The script only keeps weights whose top-1/top-2 logit gap is at least 5e-4 × max |logit| at every
position and greedy step, so a runtime within tolerance cannot flip an argmax. For `deltanet`, the same
relative error on `o` and `final_state`.

Before writing a case the script also runs its own float64 implementation of flashc's block math
(`compiler/src/lower.rs`) on the saved `config.json` and `model.safetensors` and requires it to agree with
transformers (relative error < 2e-5, same argmax): the formulas and tensor names flashc relies on are
those of the files here.

## Where transformers differs from the reference notes or from flashc

- `nemotron-h`: transformers clamps `dt = softplus(dt + dt_bias)` to at least `time_step_min` in the
  chunked (prefill) scan only. Its cached decode step (`mamba2_selective_state_update`) applies no clamp,
  and the mixer ignores the config's `time_step_limit` entirely (it uses `(time_step_min, inf)`). flashc
  clamps in prefill and decode (and would also apply a finite `time_step_limit` max). Here about a
  quarter of the dt values fall below the bound, and dropping the clamp changes the logits by ~17%, so
  transformers' own `generate()` (cached) gives different tokens from its no-cache forward for two of the
  three sequences. `greedy.json` `sequences` follows the no-cache definition (clamp at every step), which
  is flashc's; transformers' cached tokens are in `hf_generate_with_cache`. The script checks that adding
  the clamp to transformers' decode step makes `generate()` reproduce `sequences` exactly (logits within
  ~1e-6), so the clamp is the only difference.
- `mamba2`: likewise `time_step_limit` is applied in the chunked scan but not in the cached decode step
  (here the limit is the default `(0, inf)`, so nothing is clamped).
- NemotronH attention has no q/k/v/o bias whatever `attention_bias` says (hard-coded `bias=False`).
- NemotronH is `model.*` in memory but `save_pretrained` writes the original `backbone.*` names.
- transformers {transformers} has no `safe_serialization` argument any more: `save_pretrained` always
  writes safetensors.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "goldens", help="output directory")
    ap.add_argument("--only", nargs="*", help="cases to write (default: all)")
    args = ap.parse_args()
    setup_determinism()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = {
        "qwen3-tied": lambda: qwen3_case(out, tied=True),
        "qwen3-untied": lambda: qwen3_case(out, tied=False),
        "mamba2": lambda: mamba2_case(out),
        "nemotron-h": lambda: nemotron_h_case(out),
        "deltanet": lambda: deltanet_case(out),
    }
    for name in args.only or list(cases):
        print(f"{name}:")
        cases[name]()
    write_top_readme(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
