//! `config.json` of a Hugging Face model folder: the shapes and numerics every family shares, and
//! the family's own layer description ([`super::family`]).

use super::family::{family_of, Family};
use super::Projection;
use anyhow::{anyhow, bail, Context, Result};
use kernels::rope::{RopeConfig, RopeScaling};
use serde_json::Value;
use std::path::Path;

/// The decoder's shape and numerics, read from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The transformers class (`architecture.hf_name()`), which decides the layer's kind.
    pub architecture: &'static Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    /// Projections with a frozen bias (Qwen2: q, k, v).
    pub biased: Vec<Projection>,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON, kept so that exports can write it back unchanged.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: a Hugging Face model folder needs its config.json",
                path.display()
            )
        })?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a config object (either transformers layout: `rope_parameters` or `rope_theta` + `rope_scaling`).
    pub fn from_json(raw: Value) -> Result<Self> {
        let architecture = family_of(&raw)?;
        super::validate::check_sizes(&raw)?;
        let kind = (architecture.layer)(&raw)?;
        let usize_key = |key: &str| -> Result<usize> {
            raw.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("key `{key}` is missing or not a positive integer"))
        };
        let opt_usize = |key: &str| raw.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})");
        }
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_heads);
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} is odd: rotary embeddings need an even head_dim");
        }
        let max_position_embeddings = opt_usize("max_position_embeddings").unwrap_or(2048);
        let act = raw
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            bail!(
                "hidden_act `{act}` is not supported: {} runs with `silu` (SwiGLU)",
                architecture.hf_class
            );
        }
        let rope = RopeConfig {
            theta: rope_theta(&raw),
            head_dim,
            scaling: rope_scaling(&raw, max_position_embeddings)?,
        };
        let config = ModelConfig {
            architecture,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope,
            max_position_embeddings,
            biased: kind.biased,
            qk_norm: kind.qk_norm,
            sliding_window: kind.sliding_window,
            tie_word_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: raw
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as u32),
            eos_token_ids: token_id_list(raw.get("eos_token_id")),
            raw,
        };
        super::validate::check_numerics(&config)?;
        Ok(config)
    }

    /// Width of the query projection (`heads × head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key and value projections (`kv_heads × head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Whether the projection carries a frozen bias.
    pub fn has_bias(&self, p: Projection) -> bool {
        self.biased.contains(&p)
    }
}

fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The rope parameters object: transformers ≥ 5 `rope_parameters`, else the classic `rope_scaling`.
fn rope_object(raw: &Value) -> Option<&Value> {
    raw.get("rope_parameters")
        .filter(|v| v.is_object())
        .or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()))
}

fn rope_theta(raw: &Value) -> f32 {
    raw.get("rope_parameters")
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| raw.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0) as f32
}

fn rope_scaling(raw: &Value, max_position_embeddings: usize) -> Result<RopeScaling> {
    let Some(obj) = rope_object(raw) else {
        return Ok(RopeScaling::Default);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f32> {
        obj.get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| anyhow!("rope scaling `{kind}` needs the key `{key}`"))
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: num("factor")?,
            max_position_embeddings,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => bail!(
            "rope type `{other}` is not supported; supported: default, linear, dynamic, llama3"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100})
    }

    #[test]
    fn defaults_fill_in_missing_keys() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim), (4, 16));
        assert_eq!(c.rope.scaling, RopeScaling::Default);
        assert_eq!(c.rope.theta, 10000.0);
    }

    #[test]
    fn both_rope_layouts_are_read() {
        let mut v5 = base();
        v5["rope_parameters"] =
            json!({"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0});
        let c = ModelConfig::from_json(v5).unwrap();
        assert_eq!(
            (c.rope.theta, c.rope.scaling.clone()),
            (500000.0, RopeScaling::Linear { factor: 2.0 })
        );
        let mut classic = base();
        classic["rope_theta"] = json!(1e6);
        classic["rope_scaling"] = json!({"type": "dynamic", "factor": 4.0});
        let c = ModelConfig::from_json(classic).unwrap();
        assert_eq!(c.rope.theta, 1e6);
        assert!(matches!(c.rope.scaling, RopeScaling::Dynamic { factor, .. } if factor == 4.0));
    }

    #[test]
    fn unknown_architecture_and_rope_type_are_named() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_json(v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM, MistralForCausalLM"),
            "{e}"
        );
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(v).unwrap_err().to_string();
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
    }

    #[test]
    fn qwen3_reads_its_explicit_head_dim_and_qwen2_its_biases() {
        let mut v = base();
        v["architectures"] = json!(["Qwen3ForCausalLM"]);
        v["head_dim"] = json!(24);
        let c = ModelConfig::from_json(v).unwrap();
        assert_eq!(
            (c.head_dim, c.q_dim(), c.kv_dim(), c.qk_norm),
            (24, 96, 96, true)
        );
        assert_eq!(c.rope.head_dim, 24);
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        let c = ModelConfig::from_json(v).unwrap();
        assert!(c.has_bias(Projection::V) && !c.has_bias(Projection::O) && !c.qk_norm);
        assert_eq!(c.architecture.hf_name(), "Qwen2ForCausalLM");
    }

    #[test]
    fn sliding_window_applies_to_mistral_only() {
        let mut v = base();
        v["sliding_window"] = json!(4096);
        assert_eq!(
            ModelConfig::from_json(v.clone()).unwrap().sliding_window,
            None
        );
        v["architectures"] = json!(["MistralForCausalLM"]);
        assert_eq!(
            ModelConfig::from_json(v).unwrap().sliding_window,
            Some(4096)
        );
    }
}
