//! The model description: which families fuselora runs, which tensors each has and how its
//! decoder layer runs (projection biases, per-head q/k RMSNorm, tied or separate head, sliding
//! window, RoPE variant, head_dim), all read from `config.json`. The decoder (`model/`) and the
//! adapters (`lora/`) both build on this description; it depends on neither. [`validate`] refuses,
//! at load, a config or checkpoint the description cannot run (by key or tensor name, never a panic).

mod config;
mod family;
mod projection;
mod tensors;
pub mod validate;

pub use config::ModelConfig;
pub use family::{Family, LayerKind, FAMILIES};
pub use projection::{Block, HeadNorm, InputGroup, Projection};
