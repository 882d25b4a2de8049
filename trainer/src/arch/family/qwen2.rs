//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the Llama layer with biases on q_proj, k_proj and
//! v_proj (not o_proj, not the MLP), always. `use_sliding_window` (windows on the upper layers)
//! is refused; released checkpoints ship it false, and then `sliding_window` is not used.

use super::{refuse_qwen_sliding_window, Family, LayerKind};
use crate::arch::Projection;
use anyhow::Result;
use serde_json::Value;

pub const QWEN2: Family = Family {
    hf_class: "Qwen2ForCausalLM",
    model_type: "qwen2",
    layer,
};

fn layer(raw: &Value) -> Result<LayerKind> {
    refuse_qwen_sliding_window(raw, QWEN2.hf_class)?;
    Ok(LayerKind {
        biased: vec![Projection::Q, Projection::K, Projection::V],
        ..LayerKind::default()
    })
}
