//! The model families fuselora runs. A [`Family`] names a transformers class and reads, from its
//! `config.json`, how that family's decoder layer differs from Llama's ([`LayerKind`]): which
//! projections carry a bias, whether q and k are RMS-normalised per head before RoPE, and the
//! sliding window. Everything else (shapes, RoPE, tied head, head_dim) is common and read by
//! [`super::ModelConfig`].
//!
//! Adding a family: one file here with its `Family` constant (its layer function refuses the
//! config keys it cannot honour), one line in [`FAMILIES`], plus any op its layer needs
//! (docs/architecture.md, "Adding a model family").

mod llama;
mod mistral;
mod qwen2;
mod qwen3;

use super::Projection;
use anyhow::{bail, Result};
use serde_json::Value;

/// One transformers `*ForCausalLM` class.
#[derive(Debug)]
pub struct Family {
    /// `architectures[0]` in config.json, e.g. `Qwen2ForCausalLM`.
    pub hf_class: &'static str,
    /// `model_type` in config.json, e.g. `qwen2`.
    pub model_type: &'static str,
    /// Reads this family's layer description from config.json, refusing what fuselora cannot run.
    pub layer: fn(&Value) -> Result<LayerKind>,
}

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.hf_class == other.hf_class
    }
}

impl Family {
    /// The `architectures[0]` string transformers writes.
    pub fn hf_name(&self) -> &'static str {
        self.hf_class
    }
}

/// How a family's decoder layer differs from the plain Llama layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerKind {
    /// Projections with a frozen `.bias` tensor (`y = b + x Wᵀ`), in [`Projection::ALL`] order.
    pub biased: Vec<Projection>,
    /// RMSNorm over each head of q and k before RoPE (`self_attn.q_norm`/`k_norm`, `[head_dim]`).
    pub qk_norm: bool,
    /// A query sees at most this many keys, itself included (Mistral).
    pub sliding_window: Option<usize>,
}

/// Every family fuselora runs.
pub const FAMILIES: [&Family; 4] = [
    &llama::LLAMA,
    &mistral::MISTRAL,
    &qwen2::QWEN2,
    &qwen3::QWEN3,
];

/// The family of a config: `architectures[0]`, or `model_type` when no class is listed.
pub fn family_of(raw: &Value) -> Result<&'static Family> {
    let class = raw
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let found = FAMILIES.into_iter().find(|f| match class {
        Some(c) => c == f.hf_class,
        None => model_type == Some(f.model_type),
    });
    match found {
        Some(f) => Ok(f),
        None => bail!(
            "unsupported architecture {} (model_type {}): fuselora runs {}; \
             Gemma, Phi-3 and mixture-of-experts models are not supported",
            class.map_or("(none listed)".to_string(), |s| format!("`{s}`")),
            model_type.map_or("(none)".to_string(), |s| format!("`{s}`")),
            FAMILIES.map(|f| f.hf_class).join(", "),
        ),
    }
}

/// `key` as a bool (absent or null: `false`).
fn flag(raw: &Value, key: &str) -> bool {
    raw.get(key).and_then(Value::as_bool) == Some(true)
}

/// Refuses `use_sliding_window: true` (Qwen's per-layer windows, which fuselora does not run).
fn refuse_qwen_sliding_window(raw: &Value, family: &str) -> Result<()> {
    if flag(raw, "use_sliding_window") {
        bail!(
            "`use_sliding_window: true` is not supported for {family}: fuselora runs every layer with \
             full attention; set it to false (released Qwen checkpoints ship it false)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_family_reads_its_own_layer_keys() {
        let kind = |v: Value| (family_of(&v).unwrap().layer)(&v).unwrap();
        let llama = kind(json!({"architectures": ["LlamaForCausalLM"], "attention_bias": true}));
        assert_eq!(
            llama.biased,
            [Projection::Q, Projection::K, Projection::V, Projection::O]
        );
        let mistral = kind(json!({"model_type": "mistral", "sliding_window": 4096}));
        assert_eq!(mistral.sliding_window, Some(4096));
        let qwen2 = kind(
            json!({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                 "use_sliding_window": false}),
        );
        assert_eq!(
            qwen2,
            LayerKind {
                biased: vec![Projection::Q, Projection::K, Projection::V],
                qk_norm: false,
                sliding_window: None
            }
        );
        let qwen3 = kind(json!({"architectures": ["Qwen3ForCausalLM"], "attention_bias": false}));
        assert_eq!((qwen3.biased.len(), qwen3.qk_norm), (0, true));
    }

    #[test]
    fn unsupported_families_and_qwen_windows_are_refused_by_name() {
        for class in [
            "Gemma2ForCausalLM",
            "Phi3ForCausalLM",
            "Qwen3MoeForCausalLM",
        ] {
            let e = family_of(&json!({"architectures": [class]}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(class) && e.contains("Qwen2ForCausalLM, Qwen3ForCausalLM"),
                "{e}"
            );
        }
        let v = json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true});
        let e = (family_of(&v).unwrap().layer)(&v).unwrap_err().to_string();
        assert!(
            e.contains("use_sliding_window") && e.contains("Qwen2"),
            "{e}"
        );
    }
}
