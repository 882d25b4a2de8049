//! fuselora's trainer: everything above the kernels.
//!
//! - [`bench`]: `fuselora bench`, the training step on preset shapes with random weights.
//! - [`arch`]: the model description: families (Llama, Mistral, Qwen2, Qwen3), config.json, tensor names.
//! - [`model`]: Hugging Face weights and the decoder (forward, backward, cached generation) over any `Backend`.
//! - [`lora`]: LoRA parameters and PEFT adapter folders.
//! - [`tokenizer`]: Hugging Face tokenizers, chat templates and SFT label masks.
//! - [`gguf`]: GGUF files: importing them as Hugging Face folders, exporting models and adapters.
//! - [`merge`]: adapters merged into their base model.
//! - [`optim`]: global-norm clipping and AdamW.
//! - [`plan`]: `fuselora plan`, peak memory and tokens/s of a run before it starts.
//! - [`reference`]: `check-reference`, recomputing Hugging Face reference cases.
//! - [`data`]: dataset records and batching.
//! - [`train`]: the run config, schedules, the training loop and checkpoints.
//! - [`generate`]: sampling and generation with a KV cache.
//! - [`io`]: atomic file writes.
//! - [`weights`]: the safetensors files of a model or adapter folder, read as f32.
//! - [`output_dir`]: output folders owned by one writer, written whole (staged and renamed).
//! - [`finite`]: refusing to save tensors with NaN or infinite values.
//! - [`crash`]: the crash report printed on a panic.

pub mod arch;
pub mod bench;
pub mod crash;
pub mod data;
pub mod finite;
pub mod generate;
pub mod gguf;
pub mod io;
pub mod lora;
pub mod merge;
pub mod model;
pub mod optim;
pub mod output_dir;
pub mod plan;
pub mod reference;
pub mod residence;
pub mod tokenizer;
pub mod train;
pub mod weights;
