//! `fuselora merge --model BASE --adapter DIR --out DIR`

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The base model's Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged Hugging Face folder.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let merged = trainer::merge::merge(
        &args.model,
        &args.adapter,
        &args.out,
        trainer::merge::MAX_SHARD_BYTES,
    )?;
    println!(
        "merged {merged} adapted projections into {}",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
