//! fuselora's trainer: everything above the kernels.
//!
//! - [`model`]: Hugging Face config and weights, the Llama/Mistral decoder over any `Backend`.
//! - [`lora`]: LoRA parameters and PEFT adapter folders.
//! - [`optim`]: global-norm clipping and AdamW.
//! - [`reference`]: `check-reference`, recomputing Hugging Face reference cases.
//! - [`gguf`]: importing llama.cpp GGUF files as Hugging Face folders.
//! - [`io`]: atomic file writes.

pub mod gguf;
pub mod io;
pub mod lora;
pub mod model;
pub mod optim;
pub mod reference;
