//! Mistral (`MistralForCausalLM`): the Llama layer without biases, with an optional sliding
//! window (`sliding_window`: a query sees at most that many keys, itself included).

use super::{Family, LayerKind};
use anyhow::Result;
use serde_json::Value;

pub const MISTRAL: Family = Family {
    hf_class: "MistralForCausalLM",
    model_type: "mistral",
    layer,
};

fn layer(raw: &Value) -> Result<LayerKind> {
    Ok(LayerKind {
        sliding_window: raw
            .get("sliding_window")
            .and_then(Value::as_u64)
            .map(|w| w as usize),
        ..LayerKind::default()
    })
}
