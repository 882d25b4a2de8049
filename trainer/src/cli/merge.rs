//! `fuselora merge --model BASE --adapter DIR --out DIR`

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::output_dir::{Overwrite, StagedDir};

#[derive(clap::Args)]
pub struct Args {
    /// The base model's Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged Hugging Face folder (written whole: staged, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out folder (never --model or --adapter).
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let staged = StagedDir::begin(
        &args.out,
        Overwrite::from_flag(args.overwrite),
        &[
            ("--model", args.model.as_path()),
            ("--adapter", args.adapter.as_path()),
        ],
    )?;
    let summary = trainer::merge::merge(
        &args.model,
        &args.adapter,
        staged.path(),
        trainer::merge::MAX_SHARD_BYTES,
    )?;
    staged.commit()?;
    if let Some(dtype) = summary.dequantized_to {
        println!(
            "the base model is 4-bit NF4: merging into 4 bits would lose the adapter, so its projections \
             were dequantized and the merged model is written dense in {dtype:?} (no quantization_config)"
        );
    }
    println!(
        "merged {} adapted projections into {}",
        summary.merged,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
