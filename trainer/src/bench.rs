//! `fuselora bench`: the real training step (forward with per-layer checkpointing, LM head +
//! cross-entropy, backward, AdamW) on a preset model shape with random weights made on the device,
//! random tokens, LoRA r=16 alpha=16 on all seven projections. Warmup steps, then measured steps.
//!
//! FLOPs per optimizer step, `tok` = tokens per step, `T` = sequence length, `L` layers,
//! `N` = frozen weights the matmuls use (the seven projections of every layer + the LM head; the
//! embedding is a gather), `Nl` = the layers' share of `N`, `P` = LoRA weights, `h·d` = query width:
//! - model FLOPs = `tok · (2N + 2N + 6P) + L · rows · 3.5 · 2·T²·h·d` — forward (`2N`), backward
//!   through the frozen weights to the inputs only (`2N`: no weight gradients), LoRA forward and
//!   both backward products (`6P`), causal attention forward (`2·T²·h·d` per sequence and layer:
//!   two `T×T×d` products, half the square) and backward (2.5× the forward);
//! - hardware FLOPs add what checkpointing recomputes, in the share `ρ` of layers it covers:
//!   `ρ · (tok · (2Nr + 2P) + L · rows · 2·T²·h·d)`, `Nr` = the layers' weights but the down
//!   projection (its output is not recomputed); offloaded, attention and the o projection are not
//!   recomputed either (their outputs come back from the host).
//!
//! MFU = model FLOPs / step time / peak (989 TFLOP/s, the H100/H200 dense bf16 peak, unless told).

use crate::lora::{LoraConfig, LoraParams};
use crate::model::{
    Batch, CheckpointPolicy, Checkpointing, Decoder, ModelConfig, Projection, QuantizeNf4,
};
use crate::optim::{AdamW, LossScaler, UpdateTiming};
use crate::residence::Residence;
use crate::train::distributed::Distributed;
use crate::train::grad_reduce::GradReducer;
use crate::train::init::fresh_adapter;
use crate::train::method::StepContext;
use crate::train::sft::sft_micro_step;
use anyhow::{bail, Result};
use kernels::{is_idle, AdamWParams, AttentionLayout, Backend, OpTime};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;
use std::time::Instant;

/// The preset shapes: `(name, config.json fields)`.
pub const PRESETS: &[&str] = &[
    "llama2-7b",
    "mistral-7b",
    "qwen2.5-7b",
    "qwen3-8b",
    "llama-1b",
    "smollm2-135m",
    "tiny",
];

/// The `config.json` of a preset (Hugging Face's values for the named model; `tiny` is a
/// two-layer toy for tests).
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let raw = match name {
        "llama2-7b" => json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096}),
        "mistral-7b" => json!({"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "sliding_window": 4096, "max_position_embeddings": 32768}),
        "qwen2.5-7b" => json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "use_sliding_window": false, "max_position_embeddings": 32768}),
        "qwen3-8b" => json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "attention_bias": false, "use_sliding_window": false,
            "max_position_embeddings": 40960}),
        "llama-1b" => json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 2048}),
        "smollm2-135m" => json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192}),
        "tiny" => json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 512}),
        other => bail!(
            "unknown bench preset {other:?}; choose one of {}",
            PRESETS.join(", ")
        ),
    };
    ModelConfig::from_json(raw)
}

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSpec {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub checkpointing: CheckpointPolicy,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    /// Peak dense TFLOP/s of the device in its compute dtype, for MFU.
    pub peak_tflops: Option<f64>,
    /// After the measured steps, time one more step op by op on the device.
    pub profile: bool,
    /// The projections quantized to NF4 on the device (QLoRA), or dense in the compute dtype.
    pub quantize: Option<QuantizeNf4>,
    /// Where AdamW's masters and moments wait between steps.
    pub optimizer_state: Residence,
    /// Where the input embedding table stays.
    pub embedding: Residence,
}

/// What was measured (written as JSON by `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub spec: BenchSpec,
    pub backend: String,
    /// Data-parallel ranks (GPUs) the step ran on; tokens count all of them.
    pub ranks: usize,
    /// The checkpointing as run, in words (`CheckpointPolicy::describe`).
    pub checkpointing: String,
    pub tokens_per_step: usize,
    pub step_times_s: Vec<f64>,
    pub median_step_s: f64,
    /// The host's busy share of a step (median): the step's time less the time the host spent
    /// blocked waiting for the device ([`kernels::Backend::host_wait_s`]). Near
    /// `median_step_s`, the device waits for the host (launches, host work); well under it, the
    /// device's queue never runs dry.
    pub median_host_busy_s: f64,
    pub tokens_per_s: f64,
    pub model_flops_per_step: f64,
    pub hardware_flops_per_step: f64,
    pub model_tflops: f64,
    pub mfu: Option<f64>,
    pub flops_formula: &'static str,
    /// The pool's peak: the most memory in tensors at once (as `max_memory_allocated`).
    pub peak_memory_bytes: Option<u64>,
    /// The driver allocator's reserved peak behind those tensors (as `max_memory_reserved`).
    pub reserved_peak_bytes: Option<u64>,
    /// Both peaks as they stood before the first step (the model, adapter and optimizer made and
    /// placed): which part of the run set them.
    pub setup_peak_bytes: Option<u64>,
    pub setup_reserved_peak_bytes: Option<u64>,
    pub final_loss: f64,
    /// Device time per op of the profiled step (empty without `profile`, and on the CPU).
    pub profile: Vec<OpTime>,
}

const FLOPS_FORMULA: &str = "model = tokens*(2N fwd + 2N bwd input grads + 6P LoRA) + layers*rows*3.5*2*T^2*h*d causal attention (fwd + 2.5x bwd); hardware adds rho*(tokens*(2N_recomputed + 2P) + layers*rows*2*T^2*h*d), rho = share of layers checkpointed, N_recomputed = layer weights but down (and o, the kept k, v or both, and no attention, when offloaded); N = frozen projection + LM-head weights, P = LoRA weights";

/// `(model, hardware)` FLOPs of one optimizer step.
pub fn step_flops(c: &ModelConfig, lora_values: usize, spec: &BenchSpec) -> (f64, f64) {
    let weights = |p: &Projection| {
        let (o, i) = p.shape(c);
        (o * i * c.num_layers) as f64
    };
    let layer_n: f64 = Projection::ALL.iter().map(weights).sum();
    let n = layer_n + (c.vocab_size * c.hidden_size) as f64;
    let p = lora_values as f64;
    let rows = (spec.batch * spec.grad_accum) as f64;
    let tokens = rows * spec.seq as f64;
    let t = spec.seq as f64;
    let attn_fwd = c.num_layers as f64 * rows * 2.0 * t * t * (c.num_heads * c.head_dim) as f64;
    let model = tokens * (4.0 * n + 6.0 * p) + 3.5 * attn_fwd;
    let policy = spec.checkpointing;
    let share = policy.recomputed_layers(c.num_layers) as f64 / c.num_layers as f64;
    let offloaded = policy.mode == Checkpointing::Offload;
    let not_recomputed = policy.mode.not_recomputed(c);
    let recomputed_n = layer_n - not_recomputed.iter().map(weights).sum::<f64>();
    let attn_again = if offloaded { 0.0 } else { attn_fwd };
    let recompute = share * (tokens * (2.0 * recomputed_n + 2.0 * p) + attn_again);
    (model, model + recompute)
}

fn random_batch<B: Backend>(
    be: &B,
    c: &ModelConfig,
    spec: &BenchSpec,
    rng: &mut ChaCha8Rng,
) -> Result<Batch<B>> {
    let n = spec.batch * spec.seq;
    let ids: Vec<i32> = (0..n)
        .map(|_| rng.random_range(0..c.vocab_size as i32))
        .collect();
    let docs = vec![vec![spec.seq]; spec.batch];
    let layout = AttentionLayout::packed(&docs, spec.seq, c.sliding_window);
    Batch::new(be, c, &ids, &ids, layout)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        l if !l.is_multiple_of(2) => v[l / 2],
        l => (v[l / 2 - 1] + v[l / 2]) / 2.0,
    }
}

/// Runs the benchmark on `be` as one rank of `dist` (every rank trains its own random batches; the
/// LoRA gradients are summed over ranks each step, as in data-parallel training).
pub fn run<B: GradReducer>(be: &B, spec: &BenchSpec, dist: &Distributed) -> Result<BenchResult> {
    if spec.batch == 0 || spec.seq < 2 || spec.grad_accum == 0 || spec.steps == 0 {
        bail!("bench needs batch ≥ 1, seq ≥ 2, grad_accum ≥ 1 and steps ≥ 1");
    }
    let config = preset_config(&spec.preset)?;
    let lora_config = LoraConfig {
        r: 16,
        alpha: 16.0,
        targets: Projection::ALL.to_vec(),
        use_rslora: false,
        dropout: 0.0,
    };
    let mut model = Decoder::random(
        be,
        config.clone(),
        spec.seed,
        spec.quantize,
        Some(&lora_config),
    )?;
    if spec.embedding == Residence::Host && !model.keep_embedding_on_host(be)? {
        bail!(
            "--embedding host: the {} preset ties its embedding to the LM head",
            spec.preset
        );
    }
    let mut lora: LoraParams<B> = fresh_adapter(be, &config, lora_config, spec.seed)?;
    let hp = AdamWParams {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(be, &lora, hp, Some(1.0))?;
    opt.place(be, &mut lora, spec.optimizer_state)?;
    let mut scaler = LossScaler::for_dtype(be.compute_dtype());
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed.wrapping_add(dist.rank() as u64));
    let batches = (0..spec.grad_accum)
        .map(|_| random_batch(be, &config, spec, &mut rng))
        .collect::<Result<Vec<_>>>()?;
    let targets: usize = batches.iter().map(|b| b.n_targets).sum();
    be.download(&lora.grads[0])?; // waits for the setup's queued work
    let (setup_peak, setup_reserved) = (be.peak_memory_bytes(), be.reserved_peak_bytes());
    let mut times = Vec::with_capacity(spec.steps);
    let mut host_busy = Vec::with_capacity(spec.steps);
    let mut final_loss = 0.0;
    let mut profile = Vec::new();
    // The warmup steps, the measured steps, then (with `profile`) one step timed op by op.
    for i in 0..spec.warmup + spec.steps + usize::from(spec.profile) {
        let profiled = i == spec.warmup + spec.steps;
        if profiled {
            be.profile_start();
        }
        let (t0, waited0) = (Instant::now(), be.host_wait_s());
        // The training step: the SFT micro-step on each micro-batch, then AdamW.
        let ctx = StepContext {
            totals: &[targets as u64],
            loss_scale: scaler.loss_weight(1.0),
            checkpointing: spec.checkpointing,
        };
        let mut update = |layer, lora: &mut LoraParams<B>| opt.update_layer(be, lora, layer);
        let sums = dist.accumulate(be, &mut lora, &batches, &mut update, |b, lora, hooks| {
            sft_micro_step(be, &model, lora, b, ctx, hooks)
        })?;
        // As the training loop: with the state on the host, the update reaches each layer in the
        // next step's forward.
        opt.step_scaled(
            be,
            &mut lora,
            hp.lr,
            &mut scaler,
            UpdateTiming::InNextForward,
        )?;
        // Reading a gradient back waits for the step's queued work, so the time is the whole
        // step's: its forward (with the previous step's update), backward and gradient norm.
        be.download(&lora.grads[0])?;
        if i == 0 {
            // As the training loop after its first step: each product's algorithm is timed once.
            be.tune()?;
        }
        final_loss = sums.iter().map(|s| s.nll).sum::<f64>() / targets as f64;
        if profiled {
            profile = be.profile_stop()?;
        } else if i >= spec.warmup {
            let step = t0.elapsed().as_secs_f64();
            times.push(step);
            host_busy.push(step - (be.host_wait_s() - waited0));
        }
    }
    // Every rank's step time is the slowest rank's (the all-reduce waits for it).
    let tokens_per_step = spec.batch * spec.seq * spec.grad_accum * dist.world_size();
    let (model_flops, hardware_flops) = step_flops(&config, lora.num_values(), spec);
    let med = median(&times);
    let total: f64 = times.iter().sum();
    let model_tflops = model_flops / med / 1e12;
    Ok(BenchResult {
        spec: spec.clone(),
        checkpointing: spec.checkpointing.describe(config.num_layers),
        backend: be.describe(),
        ranks: dist.world_size(),
        tokens_per_step,
        median_step_s: med,
        median_host_busy_s: median(&host_busy),
        tokens_per_s: tokens_per_step as f64 * times.len() as f64 / total,
        step_times_s: times,
        model_flops_per_step: model_flops,
        hardware_flops_per_step: hardware_flops,
        model_tflops,
        mfu: spec.peak_tflops.map(|p| model_tflops / p),
        flops_formula: FLOPS_FORMULA,
        peak_memory_bytes: be.peak_memory_bytes(),
        reserved_peak_bytes: be.reserved_peak_bytes(),
        setup_peak_bytes: setup_peak,
        setup_reserved_peak_bytes: setup_reserved,
        final_loss,
        profile,
    })
}

/// The table printed to stdout.
pub fn describe(r: &BenchResult) -> String {
    let s = &r.spec;
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    [
        format!(
            "preset      {} on {}{}",
            s.preset,
            r.backend,
            if r.ranks > 1 {
                format!(" × {} ranks", r.ranks)
            } else {
                String::new()
            }
        ),
        format!(
            "shape       batch {} × seq {} × accum {} = {} tokens/step, checkpointing {}{}{}",
            s.batch,
            s.seq,
            s.grad_accum,
            r.tokens_per_step,
            r.checkpointing,
            match s.optimizer_state {
                Residence::Device => "",
                Residence::Host => ", optimizer state on the host",
            },
            match s.embedding {
                Residence::Device => "",
                Residence::Host => ", embedding on the host",
            }
        ),
        format!(
            "weights     {}",
            match s.quantize {
                Some(q) if q.double_quant => "nf4 projections (double quant), made on the device",
                Some(_) => "nf4 projections (f32 absmax), made on the device",
                None => "dense projections in the compute dtype",
            }
        ),
        format!("steps       {} warmup, {} measured", s.warmup, s.steps),
        format!("tokens/s    {:.0}", r.tokens_per_s),
        format!(
            "step time   {:.4} s (median), the host busy for {:.4} s of it (the rest waiting for the device)",
            r.median_step_s, r.median_host_busy_s
        ),
        format!(
            "model FLOPs {:.3e}/step = {:.1} TFLOP/s{}",
            r.model_flops_per_step,
            r.model_tflops,
            r.mfu
                .map(|m| format!(", MFU {:.1}%", m * 100.0))
                .unwrap_or_default()
        ),
        format!(
            "peak memory {}{}{}",
            r.peak_memory_bytes.map(gib).unwrap_or("n/a (cpu)".into()),
            r.reserved_peak_bytes
                .map(|b| format!(" in tensors, {} reserved by the driver", gib(b)))
                .unwrap_or_default(),
            r.setup_peak_bytes
                .map(|b| format!(
                    "\nsetup peak  {}{} (the model, adapter and optimizer made, before the first step)",
                    gib(b),
                    r.setup_reserved_peak_bytes
                        .map(|b| format!(" in tensors, {} reserved", gib(b)))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        ),
        format!("loss        {:.4} (last step)", r.final_loss),
    ]
    .join("\n")
        + &profile_table(&r.profile, r.median_step_s)
}

/// The per-op table of a profiled step: calls, device time, share of the median step, TFLOP/s;
/// the idle rows ([`kernels::is_idle`]) counted apart from the ops' time.
fn profile_table(ops: &[OpTime], step_s: f64) -> String {
    if ops.is_empty() {
        return String::new();
    }
    let idle: f64 = ops.iter().filter(|o| is_idle(&o.name)).map(|o| o.ms).sum();
    let busy: f64 = ops.iter().filter(|o| !is_idle(&o.name)).map(|o| o.ms).sum();
    let mut lines = vec![
        String::new(),
        format!(
            "profile     one step, {:.1} ms of device time in ops ({:.1}% of the median step), \
             {:.1} ms idle between them",
            busy,
            100.0 * busy / 1e3 / step_s,
            idle
        ),
        "| op | calls | ms | % of step | TFLOP/s |".to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    for o in ops {
        let rate = if o.flops > 0.0 {
            format!("{:.0}", o.flops / (o.ms / 1e3) / 1e12)
        } else {
            "—".to_string()
        };
        lines.push(format!(
            "| {} | {} | {:.2} | {:.1} | {} |",
            o.name,
            o.calls,
            o.ms,
            100.0 * o.ms / 1e3 / step_s,
            rate
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cpu::CpuBackend;

    fn spec(checkpointing: Checkpointing) -> BenchSpec {
        let checkpointing = CheckpointPolicy::all(checkpointing);
        BenchSpec {
            preset: "tiny".into(),
            batch: 2,
            seq: 16,
            grad_accum: 2,
            checkpointing,
            warmup: 1,
            steps: 3,
            seed: 5,
            peak_tflops: Some(1.0),
            profile: true,
            quantize: None,
            optimizer_state: Residence::Device,
            embedding: Residence::Device,
        }
    }

    #[test]
    fn the_tiny_preset_trains_on_the_cpu_and_reports_every_number() {
        let be = CpuBackend::new();
        let r = run(&be, &spec(Checkpointing::Full), &Distributed::single()).unwrap();
        assert_eq!(r.tokens_per_step, 64);
        assert_eq!(r.step_times_s.len(), 3);
        assert!(r.tokens_per_s > 0.0 && r.median_step_s > 0.0);
        // The CPU queues nothing: the host is busy the whole step.
        assert_eq!(r.median_host_busy_s, r.median_step_s);
        // Random weights of std 0.02 predict about uniformly: loss ≈ ln(vocab) = ln 256.
        assert!((r.final_loss - 256f64.ln()).abs() < 0.1, "{}", r.final_loss);
        assert_eq!(r.peak_memory_bytes, None);
        assert!(r.profile.is_empty(), "the CPU backend times no ops");
        let no_ckpt = run(&be, &spec(Checkpointing::Off), &Distributed::single()).unwrap();
        assert_eq!(no_ckpt.final_loss, r.final_loss, "checkpointing is exact");
        let host = BenchSpec {
            optimizer_state: Residence::Host,
            ..spec(Checkpointing::Full)
        };
        let host = run(&be, &host, &Distributed::single()).unwrap();
        assert_eq!(host.final_loss, r.final_loss, "the host state steps alike");
        assert!(describe(&host).contains("optimizer state on the host"));
        assert!(r.hardware_flops_per_step > r.model_flops_per_step);
        assert_eq!(
            no_ckpt.hardware_flops_per_step,
            no_ckpt.model_flops_per_step
        );
    }

    #[test]
    fn the_tiny_preset_trains_with_nf4_projections_and_records_the_choice() {
        let be = CpuBackend::new();
        let q = QuantizeNf4 { double_quant: true };
        let s = BenchSpec {
            quantize: Some(q),
            ..spec(Checkpointing::Full)
        };
        let r = run(&be, &s, &Distributed::single()).unwrap();
        let dense = run(&be, &spec(Checkpointing::Full), &Distributed::single()).unwrap();
        // NF4 moves each weight by at most half a code step, so the loss stays at ln 256.
        assert!((r.final_loss - 256f64.ln()).abs() < 0.1, "{}", r.final_loss);
        assert_ne!(r.final_loss, dense.final_loss, "the weights are quantized");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["spec"]["quantize"],
            serde_json::json!({"format": "nf4", "double_quant": true})
        );
        assert_eq!(
            serde_json::to_value(&dense).unwrap()["spec"]["quantize"],
            serde_json::Value::Null
        );
        assert!(describe(&r).contains("nf4 projections (double quant)"));
    }

    #[test]
    fn flops_follow_the_stated_formula_at_7b() {
        let c = preset_config("llama2-7b").unwrap();
        let s = BenchSpec {
            preset: "llama2-7b".into(),
            batch: 2,
            seq: 2048,
            grad_accum: 1,
            checkpointing: CheckpointPolicy::all(Checkpointing::Full),
            warmup: 0,
            steps: 1,
            seed: 0,
            peak_tflops: None,
            profile: false,
            quantize: None,
            optimizer_state: Residence::Device,
            embedding: Residence::Device,
        };
        // LoRA r=16 on all seven projections of Llama-2-7B: 39,976,960 values.
        let p = 16 * (3 * (4096 + 4096) + (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)) * 32;
        assert_eq!(p, 39_976_960);
        let (model, hw) = step_flops(&c, p, &s);
        let n = 6_476_005_376f64 + 32000.0 * 4096.0;
        let attn = 32.0 * 2.0 * 2.0 * 2048f64.powi(2) * 4096.0;
        assert_eq!(model, 4096.0 * (4.0 * n + 6.0 * p as f64) + 3.5 * attn);
        // Recomputation: every weight but the down projections' (4096 × 11008 × 32), attention,
        // in 31 of the 32 layers (never the top one).
        let down = 4096.0 * 11008.0 * 32.0;
        let recomputed = 4096.0 * (2.0 * (6_476_005_376f64 - down) + 2.0 * p as f64);
        assert!((hw - model - (recomputed + attn) * 31.0 / 32.0).abs() < 1.0);
        // Offloaded for the first 16 of 32 layers: half of that, without o and k (4096²·32 each:
        // the checkpoint keeps k) or attention.
        let half_offload = BenchSpec {
            checkpointing: CheckpointPolicy {
                mode: Checkpointing::Offload,
                layers: Some(16),
            },
            ..s
        };
        let (_, hw) = step_flops(&c, p, &half_offload);
        let (o, k) = (4096.0 * 4096.0 * 32.0, 4096.0 * 4096.0 * 32.0);
        let recomputed = 4096.0 * (2.0 * (6_476_005_376f64 - down - o - k) + 2.0 * p as f64);
        assert!((hw - model - recomputed / 2.0).abs() < 1.0);
    }

    /// Every preset parses; the Qwen shapes give the published sizes (7.6B and 8.2B parameters:
    /// the projections of every layer, the embedding and the separate LM head).
    #[test]
    fn qwen_presets_have_their_published_sizes() {
        for name in PRESETS {
            preset_config(name).unwrap();
        }
        for (name, billions, family) in [
            ("qwen2.5-7b", 7.6, "Qwen2ForCausalLM"),
            ("qwen3-8b", 8.2, "Qwen3ForCausalLM"),
        ] {
            let c = preset_config(name).unwrap();
            assert_eq!(c.architecture.hf_name(), family);
            let layer: usize = Projection::ALL
                .iter()
                .map(|p| p.shape(&c).0 * p.shape(&c).1)
                .sum();
            let total = layer * c.num_layers + 2 * c.vocab_size * c.hidden_size;
            assert!(
                (total as f64 / 1e9 - billions).abs() < 0.05,
                "{name}: {total}"
            );
        }
    }

    #[test]
    fn unknown_presets_are_named() {
        let e = preset_config("gpt2").unwrap_err().to_string();
        assert!(e.contains("llama2-7b") && e.contains("gpt2"), "{e}");
    }
}
