//! Llama (`LlamaForCausalLM`, also SmolLM, TinyLlama, Llama 2/3): the plain decoder layer.
//! transformers gives every attention projection (q, k, v, o) a bias when `attention_bias` is
//! true and every MLP projection (gate, up, down) one when `mlp_bias` is true; released
//! checkpoints set both false.

use super::{flag, Family, LayerKind};
use crate::arch::{Block, Projection};
use anyhow::Result;
use serde_json::Value;

pub const LLAMA: Family = Family {
    hf_class: "LlamaForCausalLM",
    model_type: "llama",
    layer,
};

fn layer(raw: &Value) -> Result<LayerKind> {
    let biased = Projection::ALL
        .into_iter()
        .filter(|p| match p.block() {
            Block::Attention => flag(raw, "attention_bias"),
            Block::Mlp => flag(raw, "mlp_bias"),
        })
        .collect();
    Ok(LayerKind {
        biased,
        ..LayerKind::default()
    })
}
