//! trainer

pub mod tokenizer;
