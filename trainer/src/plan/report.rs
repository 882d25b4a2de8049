//! What `plan` (and `train` at start-up) prints, and the search for faster settings that fit.

use super::roofline::GpuKind;
use super::{Plan, PlanSpec, CONTEXT_RESERVE};
use crate::lora::LoraConfig;
use crate::model::{CheckpointPolicy, Checkpointing, ModelConfig, Projection, QuantizeNf4};
use crate::residence::Residence;
use crate::train::config::RunConfig;
use anyhow::Result;
use kernels::DType;

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl PlanSpec {
    /// The setup a run config describes with `checkpointing` (reads the model's config.json only).
    /// A DPO or ORPO micro-batch holds a chosen and a rejected row per pair, `max_len` long.
    pub fn from_run(
        cfg: &RunConfig,
        nproc: usize,
        checkpointing: CheckpointPolicy,
    ) -> Result<PlanSpec> {
        let model = ModelConfig::load(&cfg.model.path)?;
        let dtype = cfg.model.dtype.dtype();
        let (batch, seq) = match cfg.pair_lengths() {
            Some(pair) => (2 * cfg.train.batch_size, pair.max_len),
            None => (cfg.train.batch_size, cfg.data.max_seq_len),
        };
        Ok(PlanSpec {
            lora: LoraConfig {
                r: cfg.lora.r,
                alpha: cfg.lora.alpha,
                targets: cfg.targets(),
                use_rslora: cfg.lora.rslora,
                dropout: cfg.lora.dropout,
            },
            batch,
            seq,
            grad_accum: cfg.train.grad_accum,
            checkpointing,
            dtype,
            // A bitsandbytes 4-bit checkpoint is NF4 whatever `model.quantize` says.
            quantize: match crate::model::bnb_checkpoint::quantization_of(&model.raw)? {
                Some(q) => Some(QuantizeNf4 {
                    double_quant: q.double_quant,
                }),
                None => cfg.model.quantize_nf4(),
            },
            optimizer_state: cfg.train.optimizer_state,
            embedding: cfg.model.embedding,
            model,
            nproc,
        })
    }

    /// The setup `fuselora bench --preset NAME` runs: LoRA r=16, alpha 16 on all seven
    /// projections, bf16, one micro-batch per step.
    pub fn from_preset(
        name: &str,
        batch: usize,
        seq: usize,
        checkpointing: Checkpointing,
        nproc: usize,
    ) -> Result<PlanSpec> {
        Ok(PlanSpec {
            model: crate::bench::preset_config(name)?,
            lora: LoraConfig {
                r: 16,
                alpha: 16.0,
                targets: Projection::ALL.to_vec(),
                use_rslora: false,
                dropout: 0.0,
            },
            batch,
            seq,
            grad_accum: 1,
            checkpointing: CheckpointPolicy::all(checkpointing),
            dtype: DType::BF16,
            quantize: None,
            optimizer_state: Residence::Device,
            embedding: Residence::Device,
            nproc,
        })
    }

    fn settings(&self) -> String {
        format!(
            "batch {} × seq {} × accum {}, {}, checkpointing {}, {}{}{}",
            self.batch,
            self.seq,
            self.grad_accum,
            self.dtype.name(),
            self.checkpointing.describe(self.model.num_layers),
            match self.quantize {
                None => "no quantization".to_string(),
                Some(q) if q.double_quant => "NF4 + double quant".to_string(),
                Some(_) => "NF4".to_string(),
            },
            match (self.optimizer_state, self.embedding) {
                (Residence::Device, Residence::Device) => "",
                (Residence::Host, Residence::Device) => ", optimizer state on the host",
                (Residence::Device, Residence::Host) => ", embedding on the host",
                (Residence::Host, Residence::Host) => ", optimizer state and embedding on the host",
            },
            if self.nproc > 1 {
                format!(", {} GPUs", self.nproc)
            } else {
                String::new()
            }
        )
    }
}

/// The memory breakdown, and on `gpu` whether it fits and the predicted speed.
pub fn describe(plan: &Plan, gpu: Option<GpuKind>) -> String {
    let s = &plan.spec;
    let m = &plan.memory;
    let c = &s.model;
    let lora_values = super::lora_values(c, &s.lora);
    let recomputed = s.checkpointing.recomputed_layers(c.num_layers);
    let mut lines = vec![
        format!(
            "plan: {} layers, hidden {}, vocab {}; LoRA r={} on {} projections; {}",
            c.num_layers,
            c.hidden_size,
            c.vocab_size,
            s.lora.r,
            s.lora.targets.len(),
            s.settings()
        ),
        "peak device memory per GPU:".to_string(),
    ];
    let rows = [
        (
            "weights",
            m.weights,
            format!(
                "{}{}",
                if s.quantize.is_some() {
                    "projections NF4, the rest in the compute dtype".to_string()
                } else {
                    s.dtype.name().to_string()
                },
                if s.embedding == Residence::Host && !c.tie_word_embeddings {
                    format!(
                        "; the embedding in host memory: {}",
                        gib((c.vocab_size * c.hidden_size * s.dtype.size_bytes()) as u64)
                    )
                } else {
                    String::new()
                }
            ),
        ),
        (
            "LoRA + AdamW",
            m.lora_optimizer,
            match s.optimizer_state {
                Residence::Device => format!(
                    "{lora_values} values: f32 master, grad, m, v + {} copy",
                    s.dtype.name()
                ),
                Residence::Host => format!(
                    "{lora_values} values: f32 grad + {} copy; master, m, v in pinned host memory: {}",
                    s.dtype.name(),
                    gib(12 * lora_values)
                ),
            },
        ),
        (
            "checkpoints",
            m.checkpoints,
            match (s.checkpointing.mode, recomputed) {
                (_, 0) | (Checkpointing::Off, _) => "off".to_string(),
                (Checkpointing::Full, r) => format!("{r} layer inputs"),
                (Checkpointing::Offload, r) => format!(
                    "2 of {r} layer checkpoints (the rest in pinned host memory: {})",
                    gib(super::fit::offload_host_bytes(s, s.checkpointing))
                ),
            },
        ),
        (
            "activations",
            m.activations,
            match c.num_layers - recomputed {
                // The top layer is never recomputed (`CheckpointPolicy::of_layer`).
                0 | 1 => "one layer's forward + backward".to_string(),
                kept => format!("{kept} layers' forward + one backward"),
            },
        ),
        (
            "logits chunk",
            m.logits_chunk,
            "f32 logits of one LM-head chunk (the gradient written over them)".to_string(),
        ),
        (
            "workspace",
            m.workspace,
            "RoPE tables, final norm, NF4 scratch, cached buffers".to_string(),
        ),
        (
            "NCCL buffers",
            m.nccl,
            if s.nproc > 1 {
                "estimate".to_string()
            } else {
                "one GPU".to_string()
            },
        ),
    ];
    for (name, bytes, note) in rows {
        lines.push(format!("  {name:<14}{:>11}   {note}", gib(bytes)));
    }
    lines.push(format!(
        "  {:<14}{:>11}   (pool peak, what `bench` reports: {})",
        "total",
        gib(m.total()),
        gib(m.pool_peak())
    ));
    if let Some(gpu) = gpu {
        let spec = gpu.spec();
        let capacity = spec.memory_mib << 20;
        let verdict = if plan.fits(gpu) {
            format!(
                "fits on one {} ({} of {} with {} kept for the CUDA context)",
                spec.name,
                gib(m.total()),
                gib(capacity),
                gib(CONTEXT_RESERVE)
            )
        } else {
            format!(
                "does NOT fit on one {}: needs {} more than its {} (with {} kept for the CUDA context)",
                spec.name,
                gib(m.total() + CONTEXT_RESERVE - capacity),
                gib(capacity),
                gib(CONTEXT_RESERVE)
            )
        };
        lines.push(verdict);
        match (plan.step_time(gpu), plan.tokens_per_s(gpu)) {
            (Some(t), Some(tps)) => lines.push(format!(
                "predicted: {tps:.0} tokens/s, {:.3} s per step (GEMMs {:.3} s, attention {:.3} s, memory-bound {:.3} s, launches {:.3} s)",
                t.total(),
                t.gemm,
                t.attention,
                t.memory,
                t.launches
            )),
            _ => lines.push(format!(
                "the {} has no {} tensor cores: use dtype = \"f16\"",
                spec.name,
                s.dtype.name()
            )),
        }
    }
    lines.join("\n")
}

/// Settings that fit on `gpu`, fastest first: the same rows per optimizer step (micro-batch ×
/// accumulation), checkpointing on or off, with and without NF4, in bf16 (f16 where the GPU has no
/// bf16).
pub fn suggestions(spec: &PlanSpec, gpu: GpuKind) -> Result<Vec<Plan>> {
    let rows_per_step = spec.batch * spec.grad_accum;
    let dtype = match (spec.dtype, gpu.spec().bf16_tflops) {
        (DType::BF16, None) => DType::F16,
        (d, _) => d,
    };
    let quantize = [
        None,
        Some(spec.quantize.unwrap_or(QuantizeNf4 { double_quant: true })),
    ];
    let mut fitting = Vec::new();
    for batch in [1, 2, 4, 8, 16, 32, 64] {
        if batch > rows_per_step || !rows_per_step.is_multiple_of(batch) {
            continue;
        }
        for checkpointing in [
            Checkpointing::Off,
            Checkpointing::Full,
            Checkpointing::Offload,
        ] {
            // With offload, also the least device memory: AdamW's state and the embedding on the host.
            let residences: &[Residence] = match checkpointing {
                Checkpointing::Offload => &[Residence::Device, Residence::Host],
                _ => &[Residence::Device],
            };
            for q in quantize {
                for &residence in residences {
                    let candidate = PlanSpec {
                        batch,
                        grad_accum: rows_per_step / batch,
                        checkpointing: CheckpointPolicy::all(checkpointing),
                        quantize: q,
                        dtype,
                        optimizer_state: residence,
                        embedding: residence,
                        ..spec.clone()
                    };
                    let plan = Plan::account(&candidate)?;
                    if plan.fits(gpu) {
                        fitting.push(plan);
                    }
                }
            }
        }
    }
    fitting.sort_by(|a, b| {
        let speed = |p: &Plan| p.tokens_per_s(gpu).unwrap_or(0.0);
        speed(b).total_cmp(&speed(a))
    });
    Ok(fitting)
}

/// The first `n` suggestions as lines.
pub fn describe_suggestions(plans: &[Plan], gpu: GpuKind, n: usize) -> String {
    if plans.is_empty() {
        return format!(
            "nothing fits on one {} at this many rows per step: lower data.max_seq_len, or use more GPUs",
            gpu.spec().name
        );
    }
    let mut lines = vec![format!(
        "fastest settings that fit on one {}:",
        gpu.spec().name
    )];
    for p in plans.iter().take(n) {
        lines.push(format!(
            "  {:>7.0} tokens/s  {:>10}  {}",
            p.tokens_per_s(gpu).unwrap_or(0.0),
            gib(p.memory.total()),
            p.spec.settings()
        ));
    }
    lines.join("\n")
}

/// What `train` prints before its first step on a GPU (`backend` is the backend's description,
/// e.g. `cuda:0 NVIDIA H200 (bf16)`); `None` on the CPU, where the pool does not exist.
pub fn startup_report(
    cfg: &RunConfig,
    checkpointing: CheckpointPolicy,
    backend: &str,
    nproc: usize,
) -> Option<String> {
    if !backend.starts_with("cuda") {
        return None;
    }
    let planned =
        PlanSpec::from_run(cfg, nproc, checkpointing).and_then(|spec| Plan::account(&spec));
    Some(match planned {
        Ok(plan) => describe(&plan, GpuKind::recognise(backend)),
        Err(e) => format!("plan: the memory accounting failed ({e:#}); training goes on"),
    })
}
