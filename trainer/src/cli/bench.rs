//! `fuselora bench --preset NAME [--batch B --seq T --grad-accum A --no-checkpointing
//! --checkpointing full|offload|off|auto --checkpoint-layers N
//! --warmup W --steps S --backend auto|cpu|cuda --dtype bf16|f16|f32 --json FILE --profile
//! --quantize none|nf4 --double-quant true|false --optimizer-state device|host
//! --embedding device|host]`

use super::backend::{run_on, BackendTask, Selection};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::bench::{describe, run, BenchResult, BenchSpec, PRESETS};
use trainer::model::{CheckpointPolicy, Checkpointing, QuantizeNf4};
use trainer::plan::{fit, PlanSpec};
use trainer::residence::Residence;
use trainer::train::config::{BackendKind, ComputeDType};
use trainer::train::distributed::Distributed;
use trainer::train::grad_reduce::GradReducer;

#[derive(clap::Args)]
pub struct Args {
    /// Model shape: llama2-7b, mistral-7b, llama-1b (TinyLlama), smollm2-135m, tiny.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// What the forward keeps for backward: `full` (layer inputs; backward recomputes each layer),
    /// `offload` (layer inputs and attention outputs in pinned host memory; backward recomputes
    /// the rest), `off` (every activation), or `auto` (what `train.gradient_checkpointing = "auto"`
    /// chooses on this device: the fewest offloaded layers that fit).
    #[arg(long, value_enum, default_value = "full")]
    checkpointing: BenchCheckpointing,
    /// With `full` or `offload`: checkpoint only the first N layers (the rest keep everything).
    #[arg(long, conflicts_with = "no_checkpointing")]
    checkpoint_layers: Option<usize>,
    /// The same as `--checkpointing off`.
    #[arg(long, conflicts_with = "checkpointing")]
    no_checkpointing: bool,
    /// Steps run before timing starts.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak dense TFLOP/s for MFU (default: 989 on H100/H200 in bf16/f16, else no MFU).
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: ComputeDType,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the measured steps, time one step op by op on the GPU and print the table.
    #[arg(long)]
    profile: bool,
    /// Frozen projections: dense in the compute dtype, or NF4 quantized on the device (QLoRA).
    #[arg(long, value_enum, default_value = "none")]
    quantize: Quantize,
    /// With --quantize nf4: store each block's absmax in 8 bits too (bnb_4bit_use_double_quant).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    double_quant: bool,
    /// Where AdamW's masters and moments wait between steps (`train.optimizer_state`).
    #[arg(long, value_enum, default_value = "device")]
    optimizer_state: Residence,
    /// Where the input embedding table stays (`model.embedding`).
    #[arg(long, value_enum, default_value = "device")]
    embedding: Residence,
}

/// `--checkpointing` of `bench`: a mode for every layer, or the one "auto" chooses.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchCheckpointing {
    Full,
    Offload,
    Off,
    Auto,
}

/// `--quantize` of `bench` and `plan --preset`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Quantize {
    None,
    Nf4,
}

impl Quantize {
    /// The NF4 setting this asks for (`double_quant`: bnb_4bit_use_double_quant).
    pub fn nf4(self, double_quant: bool) -> Option<QuantizeNf4> {
        match self {
            Quantize::None => None,
            Quantize::Nf4 => Some(QuantizeNf4 { double_quant }),
        }
    }
}

/// The bench to run; with `auto`, its checkpointing is chosen on the device first.
struct Bench {
    spec: BenchSpec,
    auto: bool,
}

impl BackendTask for Bench {
    /// The result, on rank 0 only.
    type Output = Option<BenchResult>;
    fn run<B: GradReducer>(mut self, be: &B) -> Result<Option<BenchResult>> {
        let name = be.describe();
        let dense_16bit = be.compute_dtype() != kernels::DType::F32;
        let spec = &mut self.spec;
        if spec.peak_tflops.is_none()
            && dense_16bit
            && (name.contains("H100") || name.contains("H200"))
        {
            spec.peak_tflops = Some(989.0);
        }
        let dist = Distributed::join(be)?;
        if self.auto {
            let plan = PlanSpec {
                quantize: spec.quantize,
                dtype: be.compute_dtype(),
                optimizer_state: spec.optimizer_state,
                embedding: spec.embedding,
                ..PlanSpec::from_preset(
                    &spec.preset,
                    spec.batch,
                    spec.seq,
                    Checkpointing::Off,
                    dist.world_size(),
                )?
            };
            let choice = fit::choose(&plan, be.free_memory_bytes(), fit::host_available_bytes())?;
            eprintln!("checkpointing auto: {}", choice.why);
            spec.checkpointing = choice.policy;
        }
        let result = run(be, spec, &dist)?;
        let main = dist.is_main();
        dist.finish()?;
        Ok(main.then_some(result))
    }
}

pub fn run_cli(args: Args) -> Result<ExitCode> {
    let spec = BenchSpec {
        preset: args.preset,
        batch: args.batch,
        seq: args.seq,
        grad_accum: args.grad_accum,
        checkpointing: CheckpointPolicy {
            mode: match (args.no_checkpointing, args.checkpointing) {
                (true, _) | (_, BenchCheckpointing::Off) => Checkpointing::Off,
                (_, BenchCheckpointing::Offload) => Checkpointing::Offload,
                // "auto" is replaced on the device, before the run.
                (_, BenchCheckpointing::Full | BenchCheckpointing::Auto) => Checkpointing::Full,
            },
            layers: args.checkpoint_layers,
        },
        warmup: args.warmup,
        steps: args.steps,
        seed: args.seed,
        peak_tflops: args.peak_tflops,
        profile: args.profile,
        quantize: args.quantize.nf4(args.double_quant),
        optimizer_state: args.optimizer_state,
        embedding: args.embedding,
    };
    let selection = Selection {
        backend: args.backend,
        dtype: args.dtype,
    };
    let auto = args.checkpointing == BenchCheckpointing::Auto && !args.no_checkpointing;
    let Some(result) = run_on(&selection, Bench { spec, auto })? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!("{}", describe(&result));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result)?;
        trainer::io::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing the bench result to {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
