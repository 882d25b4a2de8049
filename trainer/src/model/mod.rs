//! The Llama/Mistral decoder: configuration, weights, and the forward/backward pass over any backend.

pub mod bnb_checkpoint;
mod cached;
mod config;
mod decoder;
mod layer;
mod linear;
mod proj_weight;
mod projection;
pub mod validate;
pub mod weights;

#[cfg(test)]
mod tests;

pub use cached::KvCache;
pub use config::{Architecture, ModelConfig};
pub use decoder::{next_token_targets, Activations, Batch, Decoder};
pub use proj_weight::{Nf4Tensor, ProjWeight, QuantizeNf4};
pub use projection::Projection;
