//! The decoder over any backend: weights on the device, the layer forward and backward (written
//! once, in layer.rs) strung into training, evaluation and cached generation. What a layer holds
//! and runs comes from the model description in [`crate::arch`].

mod batch;
pub mod bnb_checkpoint;
mod cached;
mod checkpointing;
mod decoder;
mod hooks;
mod layer;
mod linear;
mod proj_weight;

#[cfg(test)]
mod tests;

pub use crate::arch::{ModelConfig, Projection};
/// The safetensors reader, re-exported where the decoder's callers have always found it.
pub use crate::weights;
pub use batch::{next_token_targets, Batch};
pub use cached::KvCache;
pub use checkpointing::{CheckpointPolicy, Checkpointing, CheckpointingSetting, KeptKv};
pub use decoder::{Activations, Decoder};
pub use hooks::{LayerHooks, NoHooks};
pub use layer::fold_width;
pub use proj_weight::{Nf4Tensor, ProjWeight, QuantizeNf4};
