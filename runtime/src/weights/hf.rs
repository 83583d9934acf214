//! hf: the one place that knows how each checkpoint family names flashc's tensors.
//!
//! | family | embedding | layer `i` | final norm |
//! |---|---|---|---|
//! | `Flashc` | `embed` | `layers.{i}.*` (the manifest's own names) | `final_norm` |
//! | `NemotronFlash` | `model.embed_tokens.weight` | `model.layers.{i}.{input_layernorm,pre_ffn_layernorm}` + `gla.*`, `mamba.*`, `self_attn.*`, `ffn.*` | `model.final_layernorm.weight` |
//! | `Qwen3` | `model.embed_tokens.weight` | decoder layer `n` holds flashc layers `2n` (attention, `input_layernorm`) and `2n + 1` (MLP, `post_attention_layernorm`) | `model.norm.weight` |
//! | `Backbone` (Mamba2, NemotronH) | `backbone.embeddings.weight` | `backbone.layers.{i}.norm` + `mixer.*` | `backbone.norm_f.weight` |
//!
//! Meta tokens are `model.memory_tokens`, an untied head is `lm_head.weight`. Depthwise conv weights
//! are `[C, 1, K]` in these checkpoints (the loader accepts both forms).

use std::collections::BTreeMap;

use flashc_dsl::ModelSpec;
use flashc_dsl::manifest::manifest;
use flashc_dsl::spec::Operator;

/// A naming scheme for checkpoint tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Flashc,
    NemotronFlash,
    Qwen3,
    Backbone,
}

impl Family {
    /// Recognises the family from the tensor names of a checkpoint.
    pub fn detect(names: &[&str]) -> Option<Family> {
        let has = |n: &str| names.contains(&n);
        if has("embed") {
            Some(Family::Flashc)
        } else if has("backbone.embeddings.weight") {
            Some(Family::Backbone)
        } else if has("model.embed_tokens.weight") {
            // Nemotron-Flash names its final norm `final_layernorm`; Qwen3 calls it `norm`.
            if has("model.final_layernorm.weight") || names.iter().any(|n| n.contains(".pre_ffn_layernorm.")) {
                Some(Family::NemotronFlash)
            } else {
                Some(Family::Qwen3)
            }
        } else {
            None
        }
    }
}

/// Canonical name → checkpoint name for every manifest tensor of `spec` under `family`.
pub fn source_names(family: Family, spec: &ModelSpec) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // Qwen3 decoder-layer index of each flashc layer: attention starts a decoder layer.
    let mut qwen_layer = Vec::with_capacity(spec.layers.len());
    let mut n: i64 = -1;
    for l in &spec.layers {
        if !matches!(l.op, Operator::Ffn(_)) || n < 0 {
            n += 1;
        }
        qwen_layer.push(n.max(0) as usize);
    }
    for decl in manifest(spec) {
        let name = decl.name.clone();
        let mapped = match family {
            Family::Flashc => name.clone(),
            _ => map_one(family, spec, &qwen_layer, &name),
        };
        out.insert(name, mapped);
    }
    out
}

fn map_one(family: Family, spec: &ModelSpec, qwen_layer: &[usize], name: &str) -> String {
    match name {
        "embed" => {
            return match family {
                Family::Backbone => "backbone.embeddings.weight".to_string(),
                _ => "model.embed_tokens.weight".to_string(),
            };
        }
        "meta_tokens" => return "model.memory_tokens".to_string(),
        "final_norm" => {
            return match family {
                Family::NemotronFlash => "model.final_layernorm.weight",
                Family::Qwen3 => "model.norm.weight",
                _ => "backbone.norm_f.weight",
            }
            .to_string();
        }
        "lm_head" => return "lm_head.weight".to_string(),
        _ => {}
    }
    // layers.{i}.{rest}
    let Some(rest) = name.strip_prefix("layers.") else { return name.to_string() };
    let Some((idx, rest)) = rest.split_once('.') else { return name.to_string() };
    let Ok(i) = idx.parse::<usize>() else { return name.to_string() };
    let Some(layer) = spec.layers.get(i) else { return name.to_string() };
    let is_ffn = matches!(layer.op, Operator::Ffn(_));
    // Split `attn.q_proj_bias` into module `attn`, tensor `q_proj`, bias flag.
    let (module, tensor) = rest.split_once('.').unwrap_or(("", rest));
    let (tensor, bias) = match tensor.strip_suffix("_bias") {
        Some(t) if t != "dt" => (t, true),
        _ => (tensor, false),
    };
    let suffix = if bias { "bias" } else { "weight" };
    match family {
        Family::NemotronFlash => {
            let p = format!("model.layers.{i}");
            if rest == "norm" {
                let which = if is_ffn { "pre_ffn_layernorm" } else { "input_layernorm" };
                return format!("{p}.{which}.weight");
            }
            let m = match module {
                "attn" => "self_attn",
                "deltanet" => "gla",
                "mamba2" => "mamba",
                _ => "ffn",
            };
            format!("{p}.{m}.{}", hf_tensor(module, tensor, suffix))
        }
        Family::Qwen3 => {
            let p = format!("model.layers.{}", qwen_layer.get(i).copied().unwrap_or(i));
            if rest == "norm" {
                let which = if is_ffn { "post_attention_layernorm" } else { "input_layernorm" };
                return format!("{p}.{which}.weight");
            }
            let m = if module == "attn" { "self_attn" } else { "mlp" };
            format!("{p}.{m}.{}", hf_tensor(module, tensor, suffix))
        }
        Family::Backbone => {
            let p = format!("backbone.layers.{i}");
            if rest == "norm" {
                return format!("{p}.norm.weight");
            }
            format!("{p}.mixer.{}", hf_tensor(module, tensor, suffix))
        }
        Family::Flashc => name.to_string(),
    }
}

/// The HF tensor name inside a module (`q_proj.weight`, `conv1d.bias`, `A_log`, ...).
fn hf_tensor(module: &str, tensor: &str, suffix: &str) -> String {
    match (module, tensor) {
        // Parameters that are bare tensors, not modules.
        (_, "A_log" | "D" | "dt_bias") => tensor.to_string(),
        ("deltanet", "q_conv" | "k_conv" | "v_conv") => format!("{}_conv1d.{suffix}", &tensor[..1]),
        ("mamba2", "conv") => format!("conv1d.{suffix}"),
        _ => format!("{tensor}.{suffix}"),
    }
}

/// Checkpoint tensors that are not weights (or are redundant) and may be left unused.
pub fn ignorable(family: Family, spec: &ModelSpec, name: &str) -> bool {
    // Rotary caches some exporters keep; a tied head that is also stored.
    name.ends_with("rotary_emb.inv_freq")
        || (spec.tie_embeddings && name == "lm_head.weight" && family != Family::Flashc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(src: &str) -> ModelSpec {
        flashc_dsl::load(src).expect("valid").0
    }

    #[test]
    fn names_per_family() {
        let s = spec(
            "model m { vocab = 16 hidden = 8 meta_tokens = 2 op A = attention(heads = 2, qk_norm = true, qkv_bias = true) \
             op F = ffn(inner = 16) op D = deltanet(heads = 2) op M = mamba2(state = 4, head_dim = 4) layers = [A, F, D, M] }",
        );
        let nf = source_names(Family::NemotronFlash, &s);
        assert_eq!(nf["layers.0.norm"], "model.layers.0.input_layernorm.weight");
        assert_eq!(nf["layers.1.norm"], "model.layers.1.pre_ffn_layernorm.weight");
        assert_eq!(nf["layers.0.attn.q_proj_bias"], "model.layers.0.self_attn.q_proj.bias");
        assert_eq!(nf["layers.2.deltanet.q_conv"], "model.layers.2.gla.q_conv1d.weight");
        assert_eq!(nf["layers.3.mamba2.conv_bias"], "model.layers.3.mamba.conv1d.bias");
        assert_eq!(nf["layers.3.mamba2.dt_bias"], "model.layers.3.mamba.dt_bias");
        assert_eq!(nf["meta_tokens"], "model.memory_tokens");
        assert_eq!(nf["final_norm"], "model.final_layernorm.weight");
        let q = source_names(Family::Qwen3, &s);
        assert_eq!(q["layers.1.norm"], "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(q["layers.1.ffn.gate_proj"], "model.layers.0.mlp.gate_proj.weight");
        assert_eq!(q["layers.0.attn.q_norm"], "model.layers.0.self_attn.q_norm.weight");
        let b = source_names(Family::Backbone, &s);
        assert_eq!(b["layers.3.mamba2.in_proj"], "backbone.layers.3.mixer.in_proj.weight");
        assert_eq!(b["layers.3.mamba2.A_log"], "backbone.layers.3.mixer.A_log");
        assert_eq!(b["embed"], "backbone.embeddings.weight");
        assert_eq!(Family::detect(&["model.embed_tokens.weight", "model.norm.weight"]), Some(Family::Qwen3));
        assert_eq!(Family::detect(&["x"]), None);
    }
}
