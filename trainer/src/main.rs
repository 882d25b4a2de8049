//! The `fuselora` command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

/// `fuselora -V`: the version and commit.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FUSELORA_GIT_COMMIT"),
    ")"
);

/// `fuselora --version`: also the CUDA bindings and the features built in (set by build.rs).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("FUSELORA_GIT_COMMIT"),
    "\nCUDA: ",
    env!("FUSELORA_CUDA"),
    "\nfeatures: ",
    env!("FUSELORA_FEATURES")
);

#[derive(Parser)]
#[command(
    name = "fuselora",
    version = VERSION,
    long_version = LONG_VERSION,
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
    /// Write a Hugging Face model (optionally with a LoRA adapter merged) or an adapter alone as a llama.cpp GGUF file.
    ExportGguf(cli::export_gguf::Args),
    /// Fine-tune a model with LoRA as a run config says.
    Train(cli::train::Args),
    /// Generate text from a model (and optionally a LoRA adapter), streaming to stdout.
    Generate(cli::generate::Args),
    /// Predict a run's peak GPU memory and tokens/s from its config (no weights read), and the fastest settings that fit.
    Plan(cli::plan::Args),
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
    trainer::crash::install(env!("CARGO_PKG_VERSION"));
    let cli = Cli::parse();
    #[cfg(feature = "cuda")]
    if let Err(e) = cli::nccl_link::relaunch_with_nccl_link_if_needed() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Bench(args) => cli::bench::run_cli(args),
        Command::CheckReference(args) => cli::check_reference::run(args),
        Command::ImportGguf(args) => cli::import_gguf::run(args),
        Command::ExportGguf(args) => cli::export_gguf::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::Plan(args) => cli::plan::run(args),
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn long_version_names_commit_cuda_and_features() {
        let text = Cli::command().render_long_version();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], concat!("fuselora ", env!("CARGO_PKG_VERSION")));
        let commit = lines[1].strip_prefix("commit: ").unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        );
        let cuda = lines[2].strip_prefix("CUDA: ").unwrap();
        assert_eq!(
            cuda.starts_with("bindings for CUDA 1"),
            cfg!(feature = "cuda"),
            "{cuda}"
        );
        let features = lines[3].strip_prefix("features: ").unwrap();
        let expected = match (cfg!(feature = "cuda"), cfg!(feature = "mpi")) {
            (true, true) => "cuda, mpi",
            (true, false) => "cuda",
            (false, true) => "mpi",
            (false, false) => "none (CPU only)",
        };
        assert_eq!(features, expected);
    }
}
