//! Checks of a model folder at load, so that a bad `config.json` or a checkpoint that does not
//! match it is refused with a message naming the key or tensor — never a panic (a division by a
//! zero head count) and never a run that trains on NaN or silently ignores weights.

use super::{ModelConfig, Projection};
use anyhow::{bail, Result};
use kernels::rope::RopeScaling;
use kernels::DType;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::HashSet;

/// The size keys of `config.json` the decoder divides or allocates by.
const SIZE_KEYS: [&str; 5] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
];

/// Checks the sizes of a raw `config.json` before they are used: each is a positive integer, and
/// the attention heads divide the hidden size unless `head_dim` is given.
pub fn check_sizes(raw: &Value) -> Result<()> {
    let optional = ["num_key_value_heads", "head_dim", "max_position_embeddings"];
    for key in SIZE_KEYS.iter().chain(&optional) {
        match raw.get(*key) {
            None if optional.contains(key) => {}
            None => bail!("key `{key}` is missing: every supported family's config.json sets it"),
            Some(v) if v.as_u64().is_some_and(|n| n > 0) => {}
            Some(Value::Null) if optional.contains(key) => {}
            Some(v) => bail!("`{key}: {v}` must be a positive integer"),
        }
    }
    let hidden = raw["hidden_size"].as_u64().unwrap_or(0);
    let heads = raw["num_attention_heads"].as_u64().unwrap_or(0);
    if raw.get("head_dim").is_none_or(Value::is_null) && !hidden.is_multiple_of(heads) {
        bail!(
            "num_attention_heads ({heads}) does not divide hidden_size ({hidden}): fix one of them, or set `head_dim` explicitly"
        );
    }
    Ok(())
}

/// Checks the numerics of a parsed config: a positive finite RoPE base, RMSNorm epsilon and
/// scaling factors (`rope_theta = 0` or `factor = 0` give infinite angles, a negative epsilon a
/// NaN `1/sqrt(mean(x²) + eps)`, and the run would train on NaN).
pub fn check_numerics(c: &ModelConfig) -> Result<()> {
    let positive = |key: &str, v: f32| -> Result<()> {
        if !(v.is_finite() && v > 0.0) {
            bail!("`{key}` = {v} must be a positive finite number");
        }
        Ok(())
    };
    positive("rope_theta", c.rope.theta)?;
    positive("rms_norm_eps", c.rms_norm_eps)?;
    match c.rope.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } => {
            positive("rope_scaling.factor", factor)?
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            positive("rope_scaling.factor", factor)?;
            positive("rope_scaling.low_freq_factor", low_freq_factor)?;
            positive("rope_scaling.high_freq_factor", high_freq_factor)?;
            // The smooth ramp divides by (high_freq_factor − low_freq_factor).
            if high_freq_factor == low_freq_factor {
                bail!("`rope_scaling.high_freq_factor` must differ from `low_freq_factor` (llama3 scaling divides by their difference)");
            }
            if original_max_position_embeddings == 0 {
                bail!("`rope_scaling.original_max_position_embeddings` must be a positive integer");
            }
        }
    }
    Ok(())
}

/// `values` of the checkpoint tensor `name`, refused when one is NaN or infinite: every loss
/// through it would be NaN.
pub fn finite(name: &str, values: Vec<f32>) -> Result<Vec<f32>> {
    match values.par_iter().position_first(|x| !x.is_finite()) {
        None => Ok(values),
        Some(i) => bail!(
            "tensor `{name}` holds a non-finite value ({}) at index {i}: the checkpoint is damaged, or was saved after a run diverged",
            values[i]
        ),
    }
}

/// [`finite`] on a bf16 or f16 tensor's bit patterns.
pub fn finite_16bit(name: &str, bits: Vec<u16>, stored: DType) -> Result<Vec<u16>> {
    match bits
        .par_iter()
        .position_first(|&b| !kernels::is_finite_16bit(b, stored))
    {
        None => Ok(bits),
        Some(i) => bail!(
            "tensor `{name}` holds a non-finite value ({}) at index {i}: the checkpoint is damaged, or was saved after a run diverged",
            kernels::widen_one(bits[i], stored)
        ),
    }
}

/// Whether the decoder of `c` reads the tensor `name`: one of [`ModelConfig::tensor_shapes`]
/// (`lm_head.weight` too, which a tied checkpoint may also store), with `quantized` — a
/// bitsandbytes 4-bit checkpoint — a projection weight's quantization state too.
fn is_used(c: &ModelConfig, described: &HashSet<String>, name: &str, quantized: bool) -> bool {
    // Old checkpoints store RoPE's `inv_freq` buffers; transformers ignores them on load too
    // (`_keys_to_ignore_on_load_unexpected`), as they are recomputed from the config.
    if described.contains(name)
        || name == "lm_head.weight"
        || name.ends_with(".rotary_emb.inv_freq")
    {
        return true;
    }
    quantized
        && (0..c.num_layers).any(|l| {
            Projection::ALL
                .iter()
                .any(|p| name.starts_with(&format!("{}.", p.weight_name(l))))
        })
}

/// Refuses tensors of the checkpoint that the decoder of `c` would not read: layers beyond
/// `num_hidden_layers`, biases, modules of another architecture. Ignoring them would train a
/// different model from the one the folder describes.
pub fn check_no_unused_tensors<'a>(
    c: &ModelConfig,
    names: impl Iterator<Item = &'a str>,
    quantized: bool,
) -> Result<()> {
    let described: HashSet<String> = c.tensor_shapes(false).into_iter().map(|(n, _)| n).collect();
    let unused: Vec<&str> = names
        .filter(|n| !is_used(c, &described, n, quantized))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    let shown = unused
        .iter()
        .take(5)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let more = match unused.len() {
        n if n > 5 => format!(" and {} more", n - 5),
        _ => String::new(),
    };
    let beyond = unused.iter().any(|n| {
        n.strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok())
            .is_some_and(|l| l >= c.num_layers)
    });
    let hint = if beyond {
        format!(
            "the checkpoint has more layers than `num_hidden_layers` = {}: fix config.json",
            c.num_layers
        )
    } else if unused.iter().any(|n| n.ends_with(".bias")) {
        format!(
            "config.json gives these {} projections no biases: if the checkpoint has them, \
             config.json is wrong (Llama: `attention_bias`/`mlp_bias`), else this checkpoint is of another architecture",
            c.architecture.hf_name()
        )
    } else {
        "this checkpoint does not match its config.json".to_string()
    };
    bail!(
        "{} tensor(s) would be ignored: {shown}{more}; {hint}",
        unused.len()
    )
}

/// Refuses a LoRA rank above the smaller side of an adapted projection: `B·A` cannot have a rank
/// above `min(in, out)`, so a larger `r` adds parameters (and gigabytes) but nothing the adapter
/// can express.
pub fn check_lora_rank(c: &ModelConfig, r: usize, targets: &[Projection]) -> Result<()> {
    let narrowest = targets.iter().min_by_key(|p| {
        let (o, i) = p.shape(c);
        o.min(i)
    });
    if let Some(p) = narrowest {
        let (o, i) = p.shape(c);
        if r > o.min(i) {
            bail!(
                "`lora.r = {r}` exceeds the smaller side of {} ({o} × {i}): B·A cannot have a rank above {}, so use `lora.r` ≤ {}",
                p.name(),
                o.min(i),
                o.min(i)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100})
    }

    fn config_error(edit: impl Fn(&mut Value)) -> String {
        let mut v = base();
        edit(&mut v);
        ModelConfig::from_json(v).unwrap_err().to_string()
    }

    #[test]
    fn zero_or_indivisible_sizes_are_refused_by_key() {
        let e = config_error(|v| v["num_attention_heads"] = json!(0));
        assert!(
            e.contains("num_attention_heads: 0") && e.contains("positive"),
            "{e}"
        );
        let e = config_error(|v| v["num_hidden_layers"] = json!(-1));
        assert!(e.contains("num_hidden_layers"), "{e}");
        let e = config_error(|v| v["num_attention_heads"] = json!(6));
        assert!(
            e.contains("does not divide") && e.contains("head_dim"),
            "{e}"
        );
        let mut v = base();
        v["num_attention_heads"] = json!(6);
        v["head_dim"] = json!(16);
        assert_eq!(ModelConfig::from_json(v).unwrap().q_dim(), 96);
    }

    #[test]
    fn non_positive_rope_and_norm_numbers_are_refused_by_key() {
        let e = config_error(|v| v["rope_theta"] = json!(0.0));
        assert!(e.contains("rope_theta"), "{e}");
        let e = config_error(|v| v["rms_norm_eps"] = json!(-1e-6));
        assert!(e.contains("rms_norm_eps"), "{e}");
        let e = config_error(|v| v["rope_scaling"] = json!({"type": "linear", "factor": 0.0}));
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }

    #[test]
    fn tensors_the_decoder_would_not_read_are_named() {
        let c = ModelConfig::from_json(base()).unwrap();
        let good = [
            "model.embed_tokens.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
        ];
        check_no_unused_tensors(&c, good.into_iter(), false).unwrap();
        let e =
            check_no_unused_tensors(&c, ["model.layers.2.mlp.up_proj.weight"].into_iter(), false)
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("model.layers.2.mlp.up_proj.weight") && e.contains("num_hidden_layers"),
            "{e}"
        );
        let e = check_no_unused_tensors(
            &c,
            ["model.layers.0.self_attn.q_proj.bias"].into_iter(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q_proj.bias") && e.contains("biases"), "{e}");
        // What a family's layer reads is used: Qwen2's q/k/v biases, Qwen3's q/k norms.
        for (class, name) in [
            ("Qwen2ForCausalLM", "model.layers.0.self_attn.q_proj.bias"),
            ("Qwen3ForCausalLM", "model.layers.1.self_attn.k_norm.weight"),
        ] {
            let mut v = base();
            v["architectures"] = json!([class]);
            let c = ModelConfig::from_json(v).unwrap();
            check_no_unused_tensors(&c, [name].into_iter(), false).unwrap();
        }
        let absmax = "model.layers.0.self_attn.q_proj.weight.absmax";
        check_no_unused_tensors(&c, [absmax].into_iter(), true).unwrap();
        assert!(check_no_unused_tensors(&c, [absmax].into_iter(), false).is_err());
    }

    #[test]
    fn a_non_finite_weight_is_named() {
        assert_eq!(finite("w", vec![1.0, -2.0]).unwrap(), vec![1.0, -2.0]);
        let e = finite("model.norm.weight", vec![1.0, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.norm.weight") && e.contains("NaN") && e.contains("index 1"),
            "{e}"
        );
        // The same check on the bit patterns of a bf16 or f16 checkpoint.
        assert_eq!(
            finite_16bit("w", vec![0x3f80, 0xc020], DType::BF16).unwrap(),
            vec![0x3f80, 0xc020]
        );
        let e = finite_16bit("q_proj", vec![0x3c00, 0x0001, 0xfc00], DType::F16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q_proj") && e.contains("inf") && e.contains("index 2"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_above_the_smallest_side_is_refused() {
        let c = ModelConfig::from_json(base()).unwrap();
        check_lora_rank(&c, 64, &Projection::ALL).unwrap();
        let e = check_lora_rank(&c, 100_000, &[Projection::Q])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r = 100000") && e.contains("64"), "{e}");
    }
}
