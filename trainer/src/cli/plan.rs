//! `fuselora plan --config FILE.toml [--set key=value ...] [--gpu KIND] [--nproc N]`, or
//! `fuselora plan --preset NAME [--batch B --seq T --no-checkpointing --quantize nf4]` for a
//! `bench` preset.

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::bench::PRESETS;
use trainer::model::Checkpointing;
use trainer::plan::roofline::GpuKind;
use trainer::plan::{
    describe, describe_suggestions, fit, suggestions, Plan, PlanSpec, CONTEXT_RESERVE,
};
use trainer::residence::Residence;
use trainer::train::config::RunConfig;

#[derive(clap::Args)]
pub struct Args {
    /// The run config; only the model's config.json is read, no weights.
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.batch_size=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Plan `fuselora bench --preset NAME` instead (LoRA r=16 on all projections, bf16).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: Option<String>,
    /// With --preset: rows per micro-batch.
    #[arg(long, default_value_t = 2, requires = "preset")]
    batch: usize,
    /// With --preset: tokens per row.
    #[arg(long, default_value_t = 2048, requires = "preset")]
    seq: usize,
    /// With --preset: what the forward keeps for backward, as `bench --checkpointing`.
    #[arg(long, value_enum, default_value = "full", requires = "preset")]
    checkpointing: Checkpointing,
    /// With --preset: the same as `--checkpointing off`.
    #[arg(long, requires = "preset", conflicts_with = "checkpointing")]
    no_checkpointing: bool,
    /// With --preset: frozen projections dense or NF4, as `bench --quantize`.
    #[arg(long, value_enum, default_value = "none", requires = "preset")]
    quantize: super::bench::Quantize,
    /// With --quantize nf4: store each block's absmax in 8 bits too (bnb_4bit_use_double_quant).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, requires = "preset")]
    double_quant: bool,
    /// With --preset: where AdamW's masters and moments wait between steps, as `bench
    /// --optimizer-state`.
    #[arg(long, value_enum, default_value = "device", requires = "preset")]
    optimizer_state: Residence,
    /// With --preset: where the input embedding table stays, as `bench --embedding`.
    #[arg(long, value_enum, default_value = "device", requires = "preset")]
    embedding: Residence,
    /// The GPU kind to plan for.
    #[arg(long, value_enum, default_value = "h200")]
    gpu: GpuKind,
    /// Data-parallel GPUs (`fuselora launch --nproc-per-node N`).
    #[arg(long, default_value_t = 1)]
    nproc: usize,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let spec = match (&args.config, &args.preset) {
        (Some(config), _) => {
            let cfg = RunConfig::load(config, &args.overrides)?;
            // "auto" as it would choose on a device of this kind, empty.
            let free = (args.gpu.spec().memory_mib << 20).saturating_sub(CONTEXT_RESERVE);
            let choice = fit::for_run(&cfg, Some(free), args.nproc)?;
            PlanSpec::from_run(&cfg, args.nproc, choice.policy)?
        }
        (None, Some(preset)) => PlanSpec {
            quantize: args.quantize.nf4(args.double_quant),
            optimizer_state: args.optimizer_state,
            embedding: args.embedding,
            ..PlanSpec::from_preset(
                preset,
                args.batch,
                args.seq,
                if args.no_checkpointing {
                    Checkpointing::Off
                } else {
                    args.checkpointing
                },
                args.nproc,
            )?
        },
        (None, None) => unreachable!("clap requires --config or --preset"),
    };
    let plan = Plan::account(&spec)?;
    println!("{}", describe(&plan, Some(args.gpu)));
    println!(
        "{}",
        describe_suggestions(&suggestions(&spec, args.gpu)?, args.gpu, 3)
    );
    Ok(ExitCode::SUCCESS)
}
