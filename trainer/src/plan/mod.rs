//! `fuselora plan`: before a run, from config.json alone, the peak device memory of a LoRA / QLoRA
//! training step and its predicted tokens/s per GPU kind, whether it fits, and the fastest settings
//! that do. `train` prints the same accounting at start-up on a GPU.
//!
//! The step is not modelled by hand: the real decoder code (forward with or without checkpointing,
//! the chunked LM head, backward, AdamW) runs on [`meter::MeterBackend`], which does no arithmetic
//! but keeps the books of the CUDA caching pool and logs every op's FLOPs and bytes. The peak is
//! therefore what that code allocates; the breakdown beside it is the same buffers counted by
//! formula (see [`MemoryPlan`]), with the pool's remaining buffers as "workspace". Time comes from
//! a roofline over the op log ([`roofline`]).
//!
//! NF4 (QLoRA) is metered dense and converted: the projections' 4-bit codes (outside the pool, as
//! index buffers on the device) and their absmax replace the dense projections, one dequantized
//! scratch buffer per distinct projection shape joins the pool (in recomputed layers, the copies
//! kept from the recomputation for the backward beside one more), and every dequantization
//! (forward, recompute, backward, but a kept copy's) adds a pass.

pub mod fit;
pub mod meter;
mod report;
pub mod roofline;

pub use report::{describe, describe_suggestions, startup_report, suggestions};

use crate::arch::InputGroup;
use crate::lora::{LoraConfig, LoraParams};
use crate::model::{
    fold_width, Batch, CheckpointPolicy, Checkpointing, Decoder, KeptKv, LayerHooks, ModelConfig,
    Projection, QuantizeNf4,
};
use crate::optim::{AdamW, LossScaler, UpdateTiming};
use crate::residence::Residence;
use anyhow::{bail, Result};
use kernels::{AdamWParams, AttentionLayout, Backend, DType};
use meter::{MeterBackend, Op, OpKind};
use roofline::{step_time, GpuKind, StepTime};

/// One training setup to account for.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSpec {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    /// Rows per micro-batch.
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub checkpointing: CheckpointPolicy,
    pub dtype: DType,
    pub quantize: Option<QuantizeNf4>,
    /// Where AdamW's masters and moments wait between steps.
    pub optimizer_state: Residence,
    /// Where the input embedding table stays (an untied one: a tied table stays on the device).
    pub embedding: Residence,
    /// Data-parallel ranks (one GPU each).
    pub nproc: usize,
}

/// Peak device memory of one rank, in bytes, by what holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// Frozen weights: embedding, norms, projections (dense or NF4 codes + absmax), LM head.
    pub weights: u64,
    /// LoRA A/B: f32 masters and gradients, AdamW's two f32 moments, the compute-dtype copies
    /// (with the optimizer state on the host: gradients, copies and three layers' state).
    pub lora_optimizer: u64,
    /// What gradient checkpointing keeps on the device: every layer input (`layers × tokens ×
    /// hidden`), or, offloaded, two layers' checkpoints.
    pub checkpoints: u64,
    /// The activations backward needs: one layer's (checkpointing) or every layer's, plus the
    /// buffers of one layer's backward.
    pub activations: u64,
    /// The LM head's f32 logits chunk, its gradient written over it (kernels/src/cuda/lm_head.rs).
    pub logits_chunk: u64,
    /// Everything else the pool holds at its peak: RoPE tables, the final norm's buffers, NF4
    /// scratch, buffers cached by the pool between uses.
    pub workspace: u64,
    /// NCCL's own buffers with several ranks (an estimate: they are not in the pool).
    pub nccl: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights
            + self.lora_optimizer
            + self.checkpoints
            + self.activations
            + self.logits_chunk
            + self.workspace
            + self.nccl
    }

    /// What `bench` reports as peak memory: the pool's peak, everything but NCCL's buffers (the
    /// pool counts NF4 codes too).
    pub fn pool_peak(&self) -> u64 {
        self.total() - self.nccl
    }
}

/// The accounting of one setup: memory, and the op log of one optimizer step.
pub struct Plan {
    pub spec: PlanSpec,
    pub memory: MemoryPlan,
    ops: Vec<Op>,
}

/// Memory the CUDA context, cuBLAS workspace and kernels take besides the pool (not measured:
/// a typical figure), kept free when deciding whether a setup fits.
pub const CONTEXT_RESERVE: u64 = 768 << 20;

/// NCCL's buffers per rank with a ring of several GPUs (an estimate: 2 peers × 8 channels × three
/// protocols of ~4 MiB, `NCCL_BUFFSIZE`).
const NCCL_BYTES: u64 = 2 * 8 * 3 * (4 << 20);

impl Plan {
    /// Meters one optimizer step of `spec` (after a first step, so the pool is warm as in `bench`).
    pub fn account(spec: &PlanSpec) -> Result<Plan> {
        if spec.batch == 0 || spec.seq < 2 || spec.grad_accum == 0 || spec.nproc == 0 {
            bail!("a plan needs batch ≥ 1, seq ≥ 2, grad_accum ≥ 1 and nproc ≥ 1");
        }
        let c = &spec.model;
        let be = MeterBackend::new(spec.dtype);
        let mut model = Decoder::random(&be, c.clone(), 0, None, Some(&spec.lora))?;
        let embedding_on_host =
            spec.embedding == Residence::Host && model.keep_embedding_on_host(&be)?;
        let mut lora =
            LoraParams::build(&be, c, spec.lora.clone(), |_, [r, k]| Ok(vec![0.0; r * k]))?;
        let hp = AdamWParams {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(&be, &lora, hp, Some(1.0))?;
        opt.place(&be, &mut lora, spec.optimizer_state)?;
        let mut scaler = LossScaler::for_dtype(spec.dtype);
        let n = spec.batch * spec.seq;
        let ids = vec![0i32; n];
        let docs = vec![vec![spec.seq]; spec.batch];
        for step in 0..2 {
            if step == 1 {
                be.clear_ops();
            }
            lora.zero_grads(&be)?;
            for _ in 0..spec.grad_accum {
                let layout = AttentionLayout::packed(&docs, spec.seq, c.sliding_window);
                let batch = Batch::new(&be, c, &ids, &ids, layout)?;
                let mut hooks = DeferredUpdate {
                    be: &be,
                    opt: &mut opt,
                };
                model.loss_and_grad_with_hooks(
                    &be,
                    Some(&mut lora),
                    &batch,
                    spec.checkpointing,
                    1.0,
                    &mut hooks,
                )?;
            }
            // As the training loop: with the state on the host, step 1's forward updates the
            // layers with step 0's update.
            opt.step_scaled(
                &be,
                &mut lora,
                hp.lr,
                &mut scaler,
                UpdateTiming::InNextForward,
            )?;
            if step == 0 {
                be.tune()?;
            }
        }
        opt.finish_update(&be, &mut lora)?;
        let mut ops = be.ops();
        let pool_peak = be.peak_memory_bytes().unwrap_or(0);
        drop((model, lora, opt));

        let e = spec.dtype.size_bytes() as u64;
        let nf4 = spec.quantize.map(|q| Nf4Bytes::of(c, q));
        let mut dense = dense_weight_bytes(c, &spec.lora, e);
        if embedding_on_host {
            dense.total -= (c.vocab_size * c.hidden_size) as u64 * e;
        }
        let (weights, index_bytes, scratch) = match &nf4 {
            None => (dense.total, 0, 0),
            Some(q) => {
                let pooled = dense.total - dense.projections + q.pooled;
                ops.extend(q.dequant_ops(c, spec, e));
                (
                    pooled + q.index_bytes,
                    q.index_bytes,
                    q.scratch(c, &spec.lora, spec.checkpointing, e),
                )
            }
        };
        let pooled_total = pool_peak - dense.total + (weights - index_bytes) + scratch;
        let parts = Parts::of(spec, e);
        let lora_optimizer = lora_bytes(c, &spec.lora, e, spec.optimizer_state);
        // The activations' formula counts one layer's buffers as if none were reused; the pool
        // (the metered run) reuses some, so where the formula exceeds what the pool held besides
        // the other parts and the NF4 scratch, the activations are that (the total stays the
        // pool's peak, the scratch in the workspace).
        let others =
            (weights - index_bytes) + lora_optimizer + parts.checkpoints + parts.logits_chunk;
        let activations = parts
            .activations
            .min(pooled_total.saturating_sub(others + scratch));
        let memory = MemoryPlan {
            weights,
            lora_optimizer,
            checkpoints: parts.checkpoints,
            activations,
            logits_chunk: parts.logits_chunk,
            workspace: pooled_total.saturating_sub(others + activations),
            nccl: if spec.nproc > 1 { NCCL_BYTES } else { 0 },
        };
        Ok(Plan {
            spec: spec.clone(),
            memory,
            ops,
        })
    }

    /// Predicted time of one optimizer step on one GPU of `gpu`; `None` if it cannot run the dtype.
    pub fn step_time(&self, gpu: GpuKind) -> Option<StepTime> {
        let mut t = step_time(&self.ops, gpu, self.spec.dtype)?;
        if self.spec.optimizer_state == Residence::Host {
            // Masters, m and v (12 bytes a value) go in and out, the two directions at once,
            // layer by layer during the next forward (optim.rs): the device waits only for the
            // first layer's group.
            let c = &self.spec.model;
            let bytes = 12 * lora_values(c, &self.spec.lora) / c.num_layers.max(1) as u64;
            t.host_copies = bytes as f64 / (gpu.spec().host_link_gb_s * 1e9);
        }
        Some(t)
    }

    /// Predicted tokens/s over all ranks (the gradient all-reduce measured ~0.3 % on 2 × H200).
    pub fn tokens_per_s(&self, gpu: GpuKind) -> Option<f64> {
        let s = &self.spec;
        let tokens = (s.batch * s.seq * s.grad_accum * s.nproc) as f64;
        let scaling = if s.nproc > 1 { 0.997 } else { 1.0 };
        Some(tokens / self.step_time(gpu)?.total() * scaling)
    }

    /// Whether the peak (plus the context reserve) fits in one GPU of `gpu`.
    pub fn fits(&self, gpu: GpuKind) -> bool {
        self.memory.total() + CONTEXT_RESERVE <= gpu.spec().memory_mib << 20
    }
}

/// Dense frozen weights in the compute dtype.
struct DenseBytes {
    total: u64,
    projections: u64,
}

/// Projection `p`'s dense `[out, in]` elements, with the pad of a LoRA term folded into it
/// ([`fold_width`]).
fn dense_elements(c: &ModelConfig, lora: &LoraConfig, p: Projection) -> u64 {
    let (o, i) = p.shape(c);
    let pad = fold_width(p.input_group(), lora).unwrap_or(0);
    (o * (i + pad)) as u64
}

/// The columns a folded group's input rows have besides the input: `t` ([`fold_width`]).
fn folded_input_columns(lora: &LoraConfig) -> u64 {
    InputGroup::ALL
        .iter()
        .filter_map(|&g| fold_width(g, lora))
        .sum::<usize>() as u64
}

fn dense_weight_bytes(c: &ModelConfig, lora: &LoraConfig, e: u64) -> DenseBytes {
    let (v, h) = (c.vocab_size as u64, c.hidden_size as u64);
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    let norms = (2 * c.num_layers as u64 + 1) * h;
    let per_layer: u64 = Projection::ALL
        .iter()
        .map(|&p| dense_elements(c, lora, p))
        .sum();
    let projections = per_layer * c.num_layers as u64 * e;
    DenseBytes {
        total: (heads * v * h + norms) * e + projections,
        projections,
    }
}

/// LoRA values (A and B of every adapted projection).
fn lora_values(c: &ModelConfig, lora: &LoraConfig) -> u64 {
    lora.targets
        .iter()
        .map(|p| {
            let (o, i) = p.shape(c);
            (lora.r * (o + i)) as u64
        })
        .sum::<u64>()
        * c.num_layers as u64
}

/// The training loop's per-layer hook, metered: the deferred optimizer update before each layer.
struct DeferredUpdate<'a> {
    be: &'a MeterBackend,
    opt: &'a mut AdamW<MeterBackend>,
}

impl LayerHooks<MeterBackend> for DeferredUpdate<'_> {
    fn before_forward(&mut self, layer: usize, lora: &mut LoraParams<MeterBackend>) -> Result<()> {
        self.opt.update_layer(self.be, lora, layer)
    }

    fn after_backward(&mut self, _: usize, _: &mut LoraParams<MeterBackend>) -> Result<()> {
        Ok(())
    }
}

fn lora_bytes(c: &ModelConfig, lora: &LoraConfig, e: u64, state: Residence) -> u64 {
    let values = lora_values(c, lora);
    match state {
        // f32 master + f32 gradient + AdamW m and v in f32 + the compute-dtype copy.
        Residence::Device => values * (4 * 4 + e),
        // The gradient and the copy stay; master, m and v of three layers pass through (optim.rs).
        Residence::Host => {
            let per_layer = values / c.num_layers.max(1) as u64;
            values * (4 + e) + 3 * per_layer * 12
        }
    }
}

/// The NF4 storage of the projections (bitsandbytes blocks of 64 values).
struct Nf4Bytes {
    /// Packed codes (and double-quant absmax codes): index buffers, which the metering backend does
    /// not count (the CUDA pool does).
    index_bytes: u64,
    /// f32 absmax (or nested absmax + the 256-entry map per projection): tensors.
    pooled: u64,
}

impl Nf4Bytes {
    fn of(c: &ModelConfig, q: QuantizeNf4) -> Self {
        let per_projection: Vec<u64> = Projection::ALL
            .iter()
            .map(|p| {
                let (o, i) = p.shape(c);
                (o * i) as u64
            })
            .collect();
        let layers = c.num_layers as u64;
        let (mut outside, mut pooled) = (0u64, 0u64);
        for n in per_projection {
            let blocks = n.div_ceil(64);
            // Codes: two per byte, in i32 words.
            outside += n.div_ceil(2).div_ceil(4) * 4;
            if q.double_quant {
                outside += blocks.div_ceil(4) * 4;
                pooled += blocks.div_ceil(256) * 4 + 256 * 4;
            } else {
                pooled += blocks * 4;
            }
        }
        Nf4Bytes {
            index_bytes: outside * layers,
            pooled: pooled * layers,
        }
    }

    /// One dequantized weight per distinct projection shape stays cached in the pool; a
    /// recomputed layer's backward holds the copies kept from its recomputation
    /// ([`Checkpointing::dense_kept_for_backward`]) while it dequantizes the rest of that half
    /// one at a time.
    fn scratch(&self, c: &ModelConfig, lora: &LoraConfig, policy: CheckpointPolicy, e: u64) -> u64 {
        let size = |p: &Projection| dense_elements(c, lora, *p);
        let mut sizes: Vec<u64> = Projection::ALL.iter().map(size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let distinct = sizes.iter().sum::<u64>();
        if policy.recomputed_layers(c.num_layers) == 0 {
            return distinct * e;
        }
        let kept = policy.mode.dense_kept_for_backward(c);
        let half = |members: &[Projection]| -> u64 {
            let held: u64 = members.iter().filter(|p| kept.contains(p)).map(size).sum();
            let other = members.iter().filter(|p| !kept.contains(p)).map(size).max();
            held + other.unwrap_or(0)
        };
        let attention = [Projection::Q, Projection::K, Projection::V, Projection::O];
        let mlp = [Projection::Gate, Projection::Up, Projection::Down];
        distinct.max(half(&attention)).max(half(&mlp)) * e
    }

    /// Dequantizing each projection before each of its GEMMs, per micro-batch: forward and
    /// backward, and in the recomputed layers the recomputation's (which skips the down
    /// projection, and offloaded the o projection and the kept k/v too; the backward takes the
    /// copies the recomputation kept instead of dequantizing again).
    fn dequant_ops(&self, c: &ModelConfig, spec: &PlanSpec, e: u64) -> Vec<Op> {
        let policy = spec.checkpointing;
        let recomputed = policy.recomputed_layers(c.num_layers);
        let skipped = policy.mode.not_recomputed(c);
        let kept = policy.mode.dense_kept_for_backward(c);
        let mut ops = Vec::new();
        for l in 0..c.num_layers * spec.grad_accum {
            let recomputes = l % c.num_layers < recomputed;
            for p in Projection::ALL {
                let uses = if recomputes && !skipped.contains(&p) && !kept.contains(&p) {
                    3
                } else {
                    2
                };
                let (o, i) = p.shape(c);
                let n = (o * i) as f64;
                let dense = dense_elements(c, &spec.lora, p) as f64;
                ops.extend(std::iter::repeat_n(
                    Op {
                        kind: OpKind::Memory,
                        flops: 0.0,
                        bytes: n / 2.0 + dense * e as f64,
                    },
                    uses,
                ));
            }
        }
        ops
    }
}

/// The activation buffers counted by formula, following model/layer.rs and model/decoder.rs.
struct Parts {
    checkpoints: u64,
    activations: u64,
    logits_chunk: u64,
}

impl Parts {
    fn of(spec: &PlanSpec, e: u64) -> Self {
        let c = &spec.model;
        let n = (spec.batch * spec.seq) as u64;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
        let heads = c.num_heads as u64;
        let lora_t = spec.lora.targets.len() as u64 * spec.lora.r as u64;
        // LayerSaved: x, norm1, q, k, v, attn, mid, norm2, gate, up (norm1 and norm2 with
        // room for a folded group's `t`), x·Aᵀ per adapted projection (compute dtype; not the
        // SwiGLU output, which the backward makes again); rstd1, rstd2, lse (f32).
        let folded = folded_input_columns(&spec.lora);
        let saved_without_input =
            e * n * (3 * h + 2 * qd + 2 * kvd + 2 * i + lora_t + folded) + 4 * n * (2 + heads);
        let layer_input = e * n * h;
        // LayerWeights::backward at its widest: dact and dnorm2 (MLP; dgate and dup overwrite
        // gate and up), then dattn, dq, dk, dv, dnorm1 and attention's f32 delta and dq
        // accumulator; one LoRA `u` at a time.
        let backward = e * n * (i + h) + e * n * spec.lora.r as u64;
        let layers = c.num_layers as u64;
        let policy = spec.checkpointing;
        let recomputed = policy.recomputed_layers(c.num_layers) as u64;
        // The layers above the checkpointed ones keep everything.
        let kept = (layers - recomputed) * (layer_input + saved_without_input);
        let checkpoints = match policy.mode {
            _ if recomputed == 0 => 0,
            Checkpointing::Off => 0,
            Checkpointing::Full => recomputed * layer_input,
            // One layer's checkpoint (input, attention output, residual, lse, kept k/v) in flight
            // to the host and the one fetched back ahead of its layer.
            Checkpointing::Offload => {
                let (compute, f32s) = KeptKv::checkpoint_values_per_token(c, lora_t as usize);
                2 * n * (e * compute as u64 + 4 * f32s as u64)
            }
        };
        // A recomputed layer's saved state exists one layer at a time, during its backward.
        let recomputing = if recomputed > 0 {
            saved_without_input
        } else {
            0
        };
        // The kept layers' backward runs first and frees them before the first recomputation.
        let activations = kept.max(recomputing) + backward;
        let v = c.vocab_size;
        let chunk = kernels::lm_head_chunk_rows(n as usize, v) as u64;
        Parts {
            checkpoints,
            activations,
            // f32 logits; the gradient is written over them (kernels/src/cuda/lm_head.rs).
            logits_chunk: chunk * v as u64 * 4,
        }
    }
}

#[cfg(test)]
mod tests;
