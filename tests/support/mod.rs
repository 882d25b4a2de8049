//! Shared by the end-to-end tests: the fixture folder and a trainable tiny model.

use std::path::{Path, PathBuf};

/// tests/fixtures (the Hugging Face reference cases and the byte-level tokenizer).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `dir/name`: tiny-llama's weights and config with the byte-level ChatML tokenizer, a model folder
/// that trains on real text in seconds.
pub fn tiny_chat_model(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for (src, file) in [
        ("tiny-llama/model", "config.json"),
        ("tiny-llama/model", "model.safetensors"),
        ("byte-tokenizer", "tokenizer.json"),
        ("byte-tokenizer", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixtures().join(src).join(file), m.join(file)).unwrap();
    }
    m
}
