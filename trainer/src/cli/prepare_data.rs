//! `fuselora prepare-data --config FILE.toml --out DIR [--examples-per-shard N]`: tokenizes the
//! config's `data.train` (and `data.validation`) once, as `train` would, into token shard files
//! (`DIR/train-00000.tokens`, …) that training ranks memory-map, each reading only its examples.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trainer::data::batching::Example;
use trainer::data::token_shards::{write_shard, EXTENSION};
use trainer::data::tokenize::tokenize_records;
use trainer::output_dir::{Overwrite, StagedDir};
use trainer::tokenizer::Tokenizer;
use trainer::train::sft::{formatting_for, read_records};

#[derive(clap::Args)]
pub struct Args {
    /// The run config whose model (tokenizer) and data section say what to tokenize and how.
    #[command(flatten)]
    run: super::run_config::RunConfigArgs,
    /// Folder for the shard files (written whole: staged, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out folder (never one holding the config, model or data).
    #[arg(long)]
    overwrite: bool,
    /// Examples per shard file.
    #[arg(long, default_value_t = 100_000)]
    examples_per_shard: usize,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.examples_per_shard == 0 {
        bail!("--examples-per-shard must be at least 1");
    }
    let cfg = args.run.load(&[])?;
    let tokenizer = Tokenizer::load(&cfg.model.path)?;
    let pad_id = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0) as i32;
    let mut inputs = cfg.input_paths();
    inputs.push(("--config", args.run.config.as_path()));
    let staged = StagedDir::begin(&args.out, Overwrite::from_flag(args.overwrite), &inputs)?;
    let mut written = Vec::new();
    for (split, paths) in [
        ("train", &cfg.data.train),
        ("validation", &cfg.data.validation),
    ] {
        if paths.is_empty() {
            continue;
        }
        let (records, skipped) = read_records(paths, &cfg)?;
        let (examples, stats) = tokenize_records(&tokenizer, &records, &formatting_for(&cfg))?;
        let files = write_split(
            staged.path(),
            split,
            &examples,
            args.examples_per_shard,
            pad_id,
        )?;
        eprintln!(
            "{split}: {} examples, {} tokens in {} shard(s); {} long texts chunked, {} truncated, {} dropped as too long, {} without a trained token, {skipped} bad records skipped",
            stats.examples,
            stats.tokens,
            files.len(),
            stats.texts_chunked,
            stats.truncated,
            stats.dropped_too_long,
            stats.dropped_no_target
        );
        written.push((split, files));
    }
    staged.commit()?;
    println!("use the shards in the run config:");
    for (split, files) in written {
        let list: Vec<String> = files
            .iter()
            .map(|f| format!("{:?}", args.out.join(f).display().to_string()))
            .collect();
        println!("  data.{split} = [{}]", list.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `examples` as `DIR/SPLIT-NNNNN.tokens` files of at most `per_shard` examples each;
/// returns their file names.
fn write_split(
    dir: &Path,
    split: &str,
    examples: &[Example],
    per_shard: usize,
    pad_id: i32,
) -> Result<Vec<PathBuf>> {
    examples
        .chunks(per_shard)
        .enumerate()
        .map(|(i, chunk)| {
            let name = PathBuf::from(format!("{split}-{i:05}.{EXTENSION}"));
            write_shard(&dir.join(&name), chunk, pad_id)?;
            Ok(name)
        })
        .collect()
}
