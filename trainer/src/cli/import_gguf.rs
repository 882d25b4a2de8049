//! `fuselora import-gguf FILE.gguf --out DIR`

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::output_dir::{Overwrite, StagedDir};

#[derive(clap::Args)]
pub struct Args {
    /// A llama.cpp GGUF file (version 2 or 3) of a `llama`-architecture model.
    gguf: PathBuf,
    /// The Hugging Face folder to write (config.json, model.safetensors in bf16, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out folder.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    // Every error of the import names the file or folder it is about.
    let staged = StagedDir::begin(
        &args.out,
        Overwrite::from_flag(args.overwrite),
        &[("GGUF file", args.gguf.as_path())],
    )?;
    let summary = trainer::gguf::import_gguf(&args.gguf, staged.path())?;
    staged.commit()?;
    let types: Vec<String> = summary
        .tensor_types
        .iter()
        .map(|(name, n)| format!("{n} {name}"))
        .collect();
    let c = &summary.config;
    println!(
        "imported {} → {}: {} parameters ({} layers, hidden {}, {} heads / {} KV heads, vocab {}{}), tensors: {}",
        args.gguf.display(),
        args.out.display(),
        summary.parameters,
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["vocab_size"],
        if summary.tied_embeddings { ", tied embeddings" } else { "" },
        types.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
