//! The Llama/Mistral decoder: configuration, weights, and the forward/backward pass over any backend.

mod cached;
mod config;
mod decoder;
mod layer;
mod linear;
mod projection;
pub mod weights;

#[cfg(test)]
mod tests;

pub use cached::KvCache;
pub use config::{Architecture, ModelConfig};
pub use decoder::{next_token_targets, Activations, Batch, Decoder};
pub use projection::Projection;
