//! The `fuselora` command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(
    name = "fuselora",
    version,
    about = "LoRA / QLoRA fine-tuning of Llama- and Mistral-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the training step on a preset model shape with random weights (tokens/s, MFU, memory).
    Bench(cli::bench::Args),
    /// Recompute a Hugging Face reference case and compare every expected tensor.
    CheckReference(cli::check_reference::Args),
    /// Convert a llama.cpp GGUF file (llama architecture) into a Hugging Face model folder.
    ImportGguf(cli::import_gguf::Args),
    /// Fine-tune a model with LoRA as a run config says.
    Train(cli::train::Args),
    /// Generate text from a model (and optionally a LoRA adapter), streaming to stdout.
    Generate(cli::generate::Args),
    /// Merge a LoRA adapter into its base model and write a Hugging Face folder.
    Merge(cli::merge::Args),
    /// Start one rank per GPU on this node running a fuselora command, e.g. `-- train --config run.toml`.
    Launch(launcher::LaunchArgs),
    /// Tokenize a run config's datasets once into token shard files that ranks memory-map.
    PrepareData(cli::prepare_data::Args),
    /// Print the first training examples as the run tokenizes them, trained tokens highlighted.
    Preview(cli::preview::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => cli::bench::run_cli(args),
        Command::CheckReference(args) => cli::check_reference::run(args),
        Command::ImportGguf(args) => cli::import_gguf::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::Launch(args) => cli::launch::run(args),
        Command::PrepareData(args) => cli::prepare_data::run(args),
        Command::Preview(args) => cli::preview::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
