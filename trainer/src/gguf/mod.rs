//! llama.cpp GGUF files ⇄ Hugging Face model folders (`fuselora import-gguf`, `fuselora export-gguf`).
//!
//! - [`reader`]: the GGUF container: header, metadata, tensor directory, memory-mapped data.
//! - [`dequant`]: ggml tensor types and their dequantization to f32.
//! - [`names`]: llama.cpp → Hugging Face tensor names, undoing the Q/K row permutation.
//! - [`tokenizer`]: tokenizer.json and tokenizer_config.json from the `tokenizer.*` metadata.
//! - [`import`]: the whole conversion.
//! - [`quant`]: f32 → F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, bit-exact with gguf-py's quantizers.
//! - [`kquant`]: f32 → Q4_K/Q5_K/Q6_K, bit-exact with llama.cpp's reference quantizers.
//! - [`file_type`]: `--type` (llama.cpp's file types, the K-quant mixes) → the type of each tensor.
//! - [`writer`]: the GGUF container, written tensor by tensor, atomically.
//! - [`vocab`]: `tokenizer.*` metadata from tokenizer.json and tokenizer_config.json.
//! - [`export`]: a model folder (+ adapter, merged) or an adapter alone → GGUF.

pub mod dequant;
pub mod export;
pub mod file_type;
pub mod import;
pub mod kquant;
pub mod names;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod vocab;
pub mod writer;

#[cfg(test)]
mod tests;

pub use export::{export_gguf, export_lora_gguf, ExportSummary};
pub use file_type::FileType;
pub use import::{import_gguf, ImportSummary};
pub use quant::QuantType;
pub use reader::{GgufError, GgufFile, MetaValue, TensorInfo};
