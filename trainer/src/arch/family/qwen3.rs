//! Qwen3, dense (`Qwen3ForCausalLM`): the Llama layer with an RMSNorm over each head of q and of
//! k before RoPE (`self_attn.q_norm.weight`, `self_attn.k_norm.weight`, `[head_dim]`, the model's
//! eps), and an explicit `head_dim` (128 in every released size, whatever hidden/heads is).
//! `attention_bias` puts biases on q, k, v and o (released checkpoints: false);
//! `use_sliding_window` is refused as for Qwen2.

use super::{flag, refuse_qwen_sliding_window, Family, LayerKind};
use crate::arch::{Block, Projection};
use anyhow::Result;
use serde_json::Value;

pub const QWEN3: Family = Family {
    hf_class: "Qwen3ForCausalLM",
    model_type: "qwen3",
    layer,
};

fn layer(raw: &Value) -> Result<LayerKind> {
    refuse_qwen_sliding_window(raw, QWEN3.hf_class)?;
    let biased = if flag(raw, "attention_bias") {
        Projection::ALL
            .into_iter()
            .filter(|p| p.block() == Block::Attention)
            .collect()
    } else {
        Vec::new()
    };
    Ok(LayerKind {
        biased,
        qk_norm: true,
        sliding_window: None,
    })
}
