//! `fuselora export-gguf --model DIR [--adapter DIR] --out FILE.gguf --type TYPE [--lora-only]`

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::gguf::FileType;

#[derive(clap::Args)]
pub struct Args {
    /// The base model's Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder, merged into the weights on the way out (or, with --lora-only,
    /// the only thing written).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write (atomically).
    #[arg(long)]
    out: PathBuf,
    /// The type of the matrices (vectors stay f32): one type for all, matrices whose rows are not
    /// whole blocks f16; or a K-quant mix, each tensor's type chosen as llama-quantize does.
    #[arg(long = "type", value_enum, default_value = "f16")]
    ty: FileType,
    /// Write only the adapter, as a llama.cpp GGUF LoRA adapter (`llama-cli --lora FILE`).
    #[arg(long)]
    lora_only: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let summary = match (&args.adapter, args.lora_only) {
        (Some(adapter), true) => {
            trainer::gguf::export_lora_gguf(&args.model, adapter, &args.out, args.ty)?
        }
        (None, true) => bail!("--lora-only writes the adapter: give it with --adapter DIR"),
        (adapter, false) => {
            trainer::gguf::export_gguf(&args.model, adapter.as_deref(), &args.out, args.ty)?
        }
    };
    let types: Vec<String> = summary
        .tensor_types
        .iter()
        .map(|(name, n)| format!("{n} {name}"))
        .collect();
    println!(
        "wrote {} ({:.1} MiB): tensors {}{}",
        args.out.display(),
        summary.bytes as f64 / (1u64 << 20) as f64,
        types.join(", "),
        match (args.lora_only, summary.adapted) {
            (true, n) => format!("; LoRA adapter of {n} projections"),
            (false, 0) => String::new(),
            (false, n) => format!("; {n} adapted projections merged"),
        }
    );
    Ok(ExitCode::SUCCESS)
}
