//! llama.cpp GGUF files → Hugging Face model folders (`fuselora import-gguf`).
//!
//! - [`reader`]: the GGUF container: header, metadata, tensor directory, memory-mapped data.
//! - [`dequant`]: ggml tensor types and their dequantization to f32.
//! - [`names`]: llama.cpp → Hugging Face tensor names, undoing the Q/K row permutation.
//! - [`tokenizer`]: tokenizer.json and tokenizer_config.json from the `tokenizer.*` metadata.
//! - [`import`]: the whole conversion.

pub mod dequant;
pub mod import;
pub mod names;
pub mod reader;
pub mod tokenizer;

#[cfg(test)]
mod tests;

pub use import::{import_gguf, ImportSummary};
pub use reader::{GgufError, GgufFile, MetaValue, TensorInfo};
