//! `fuselora train --config FILE.toml [--set key=value ...] [--resume [CHECKPOINT]]`

use anyhow::{bail, Result};
use kernels::cpu::CpuBackend;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::train::config::RunConfig;
use trainer::train::run::{describe_summary, train, Resume};

#[derive(clap::Args)]
pub struct Args {
    /// The run config (see configs/ for examples).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, e.g. `--set train.lr=1e-4 --set data.packing=false`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The training method, `sft` or `dpo` (shorthand for `--set train.method=...`).
    #[arg(long, value_parser = ["sft", "dpo"])]
    method: Option<String>,
    /// Continue from the newest checkpoint in the output folder, or from the one given.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut overrides = args.overrides;
    if let Some(m) = &args.method {
        overrides.push(format!("train.method={m}"));
    }
    let cfg = RunConfig::load(&args.config, &overrides)?;
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(p) => Resume::From(PathBuf::from(p)),
    };
    let summary = match choose_backend(&cfg.model.backend)? {
        Chosen::Cpu(reason) => {
            eprintln!("backend: cpu ({reason})");
            train(&CpuBackend::new(), &cfg, resume)?
        }
    };
    println!("{}", describe_summary(&summary, &cfg.output.dir));
    Ok(ExitCode::SUCCESS)
}

enum Chosen {
    Cpu(&'static str),
}

fn choose_backend(wanted: &str) -> Result<Chosen> {
    match wanted {
        "cpu" => Ok(Chosen::Cpu("asked for in the config")),
        "cuda" => bail!("model.backend = \"cuda\", but this build has no CUDA backend: rebuild with `cargo build --release --features cuda`"),
        _ => Ok(Chosen::Cpu("this build has no CUDA backend; build with --features cuda for GPUs")),
    }
}
