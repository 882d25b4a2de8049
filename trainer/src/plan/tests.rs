use super::meter::MeterBackend;
use super::roofline::GpuKind;
use super::*;

const GIB: f64 = (1u64 << 30) as f64;

fn preset(name: &str, batch: usize, checkpointing: Checkpointing) -> PlanSpec {
    PlanSpec::from_preset(name, batch, 2048, checkpointing, 1).unwrap()
}

#[test]
fn the_meter_keeps_the_pools_books() {
    let be = MeterBackend::new(DType::BF16);
    let a = be.zeros(1000, DType::BF16).unwrap();
    let b = be.zeros(1000, DType::F16).unwrap();
    assert_eq!(be.held_bytes(), 4000);
    drop(a);
    // A bf16 buffer serves an f16 tensor of the same length (one 16-bit storage kind)...
    let c = be.zeros(1000, DType::F16).unwrap();
    assert_eq!(be.held_bytes(), 4000);
    drop(c);
    // ...not an f32 one, but a shorter 16-bit one down to half its length.
    let d = be.zeros(500, DType::F32).unwrap();
    let e = be.zeros(999, DType::BF16).unwrap();
    assert_eq!(be.held_bytes(), 4000 + 2000);
    drop(e);
    let f = be.zeros(499, DType::BF16).unwrap();
    assert_eq!(be.held_bytes(), 4000 + 2000 + 998);
    // Each takes the smallest free buffer that holds it: 600 a 1000 (499 is too short), 450 the 499.
    drop((b, f));
    let g = be.zeros(600, DType::F16).unwrap();
    let h = be.zeros(450, DType::BF16).unwrap();
    assert_eq!(be.held_bytes(), 6998, "both served from the cache");
    drop((d, g, h));
    assert_eq!(be.peak_memory_bytes(), Some(6998));
    // Until they are handed back to the driver.
    be.release_cached().unwrap();
    assert_eq!(be.held_bytes(), 0);
}

/// The H200 measurements of docs/benchmarks.md (session 10, call 5: bf16, LoRA r=16 on all
/// projections, full checkpointing, products' algorithms tuned): `(preset, batch, seq, peak GiB,
/// tokens/s)`.
const MEASURED: [(&str, usize, usize, f64, f64); 4] = [
    ("llama2-7b", 2, 2048, 15.00, 12839.0),
    ("mistral-7b", 2, 2048, 16.01, 12186.0),
    ("llama-1b", 4, 2048, 3.66, 60755.0),
    ("smollm2-135m", 8, 1024, 0.93, 180895.0),
];

#[test]
fn the_bench_presets_are_predicted_within_5_percent_of_memory_and_15_percent_of_speed() {
    for (name, batch, seq, peak_gib, tokens_per_s) in MEASURED {
        let plan = Plan::account(
            &PlanSpec::from_preset(name, batch, seq, Checkpointing::Full, 1).unwrap(),
        )
        .unwrap();
        let peak = plan.memory.pool_peak() as f64 / GIB;
        let tps = plan.tokens_per_s(GpuKind::H200).unwrap();
        println!(
            "{name}: peak {peak:.2} GiB (measured {peak_gib}), {tps:.0} tokens/s (measured {tokens_per_s})"
        );
        assert!((peak / peak_gib - 1.0).abs() < 0.05, "{name}: {peak} GiB");
        assert!(
            (tps / tokens_per_s - 1.0).abs() < 0.15,
            "{name}: {tps} tokens/s"
        );
    }
}

#[test]
fn the_breakdown_adds_up_to_the_metered_peak() {
    for checkpointing in [
        Checkpointing::Full,
        Checkpointing::Offload,
        Checkpointing::Off,
    ] {
        let plan = Plan::account(&preset("llama-1b", 4, checkpointing)).unwrap();
        let m = plan.memory;
        // 1.1 B parameters in bf16 (TinyLlama shape: 22 layers, vocab 32000, untied), and the
        // pads of the folded LoRA terms (r = 16: 48 columns on q, k, v, 32 on gate and up).
        let pads = 22 * ((2048 + 2 * 256) * 48 + 2 * 5632 * 32);
        assert_eq!(m.weights, 2 * (1_100_048_384 + pads));
        assert_eq!(m.checkpoints > 0, checkpointing.recomputes());
        assert!(m.workspace < m.total() / 10, "{m:?}");
        assert_eq!(m.nccl, 0);
        let parts = m.weights
            + m.lora_optimizer
            + m.checkpoints
            + m.activations
            + m.logits_chunk
            + m.workspace;
        assert_eq!(parts, m.total());
    }
    let with = Plan::account(&preset("llama-1b", 4, Checkpointing::Full)).unwrap();
    let without = Plan::account(&preset("llama-1b", 4, Checkpointing::Off)).unwrap();
    assert!(without.memory.total() > with.memory.total() + (1 << 30));
    // Checkpointing recomputes each layer's forward: slower.
    assert!(
        without.tokens_per_s(GpuKind::H200).unwrap() > with.tokens_per_s(GpuKind::H200).unwrap()
    );
}

#[test]
fn nf4_shrinks_the_weights_to_about_a_quarter() {
    let dense = Plan::account(&preset("llama2-7b", 1, Checkpointing::Full)).unwrap();
    let mut spec = preset("llama2-7b", 1, Checkpointing::Full);
    spec.quantize = Some(QuantizeNf4 { double_quant: true });
    let nf4 = Plan::account(&spec).unwrap();
    let ratio = nf4.memory.weights as f64 / dense.memory.weights as f64;
    // Projections at 4.127 bits (codes + double-quant absmax), embedding and LM head still bf16.
    assert!((0.28..0.32).contains(&ratio), "{ratio}");
    assert!(nf4.memory.weights > 3 << 30);
    assert!(nf4.tokens_per_s(GpuKind::H200).unwrap() < dense.tokens_per_s(GpuKind::H200).unwrap());
}

/// A recomputed NF4 layer keeps gate's and up's dense copies for its backward while it
/// dequantizes down: three MLP-sized copies in the workspace, in both checkpointed modes.
#[test]
fn nf4_recomputation_keeps_the_mlp_copies_for_the_backward() {
    let mlp_copy = 11008 * 4096 * 2;
    for mode in [Checkpointing::Full, Checkpointing::Offload] {
        let mut spec = preset("llama2-7b", 2, mode);
        spec.quantize = Some(QuantizeNf4 { double_quant: true });
        let plan = Plan::account(&spec).unwrap();
        let workspace = plan.memory.workspace;
        assert!(workspace >= 3 * mlp_copy, "{mode:?}: {workspace}");
    }
}

#[test]
fn a_t4_is_told_which_7b_qlora_batch_fits() {
    let mut spec = preset("llama2-7b", 4, Checkpointing::Full);
    spec.grad_accum = 4;
    spec.quantize = Some(QuantizeNf4 { double_quant: true });
    let dense_bf16 = Plan::account(&preset("llama2-7b", 2, Checkpointing::Full)).unwrap();
    assert!(!dense_bf16.fits(GpuKind::T4));
    assert_eq!(
        dense_bf16.tokens_per_s(GpuKind::T4),
        None,
        "a T4 has no bf16"
    );
    let fitting = suggestions(&spec, GpuKind::T4).unwrap();
    let text = describe_suggestions(&fitting, GpuKind::T4, 3);
    println!("{text}");
    assert!(!fitting.is_empty());
    for p in &fitting {
        assert_eq!(p.spec.dtype, DType::F16);
        // Dense 7B (12.55 GiB of weights) fits only checkpointed, at batch 1 or offloaded.
        assert!(
            p.spec.quantize.is_some()
                || (p.spec.checkpointing.mode.recomputes() && p.spec.batch == 1)
                || p.spec.checkpointing.mode == Checkpointing::Offload,
            "{text}"
        );
        assert_eq!(p.spec.batch * p.spec.grad_accum, 16);
        assert!(p.memory.total() + CONTEXT_RESERVE <= 15_360 << 20);
    }
    // Batch 16 × 2048 without checkpointing does not fit in 16 GB, even in 4 bits.
    assert!(!fitting
        .iter()
        .any(|p| p.spec.batch == 16 && p.spec.checkpointing.mode == Checkpointing::Off));
    assert!(text.contains("T4 16 GB") && text.contains("NF4"), "{text}");
}

#[test]
fn several_gpus_add_nccl_buffers_and_tokens() {
    let one = Plan::account(&preset("llama-1b", 4, Checkpointing::Full)).unwrap();
    let two = Plan::account(&PlanSpec {
        nproc: 2,
        ..preset("llama-1b", 4, Checkpointing::Full)
    })
    .unwrap();
    assert_eq!(two.memory.total() - one.memory.total(), NCCL_BYTES);
    let ratio = two.tokens_per_s(GpuKind::H200).unwrap() / one.tokens_per_s(GpuKind::H200).unwrap();
    assert!((ratio - 2.0 * 0.997).abs() < 1e-9, "{ratio}");
}

#[test]
fn the_report_names_every_part_and_the_verdict() {
    let plan = Plan::account(&preset("smollm2-135m", 8, Checkpointing::Full)).unwrap();
    let text = describe(&plan, Some(GpuKind::L4));
    for part in [
        "weights",
        "LoRA + AdamW",
        "checkpoints",
        "activations",
        "logits chunk",
        "workspace",
        "NCCL buffers",
        "fits on one L4 24 GB",
        "predicted:",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(
        GpuKind::recognise("cuda:0 NVIDIA H200 (bf16)"),
        Some(GpuKind::H200)
    );
    assert_eq!(
        GpuKind::recognise("cuda:0 Tesla T4 (f16)"),
        Some(GpuKind::T4)
    );
}

#[test]
fn a_run_config_is_planned_from_its_model_config_json() {
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-llama/model");
    let toml = format!(
        "[model]\npath = {:?}\ndtype = \"f16\"\nquantize = \"nf4\"\n[lora]\nr = 8\ntargets = [\"q_proj\", \"v_proj\"]\n\
         [data]\ntrain = [\"t.jsonl\"]\nmax_seq_len = 128\n[train]\nbatch_size = 3\ngrad_accum = 2\n\
         gradient_checkpointing = false\n[output]\ndir = \"out\"\n",
        model.to_str().unwrap()
    );
    let cfg = crate::train::config::RunConfig::from_toml(&toml).unwrap();
    let choice = fit::for_run(&cfg, None, 2).unwrap();
    assert_eq!(choice.why, "as configured");
    let spec = PlanSpec::from_run(&cfg, 2, choice.policy).unwrap();
    assert_eq!(
        (
            spec.batch,
            spec.seq,
            spec.grad_accum,
            spec.checkpointing,
            spec.dtype,
            spec.nproc
        ),
        (
            3,
            128,
            2,
            CheckpointPolicy::all(Checkpointing::Off),
            DType::F16,
            2
        )
    );
    assert_eq!(spec.lora.targets, vec![Projection::Q, Projection::V]);
    assert_eq!(spec.quantize, Some(QuantizeNf4 { double_quant: true }));
    let plan = Plan::account(&spec).unwrap();
    // tiny-llama: 3 layers, hidden 64 → q 64, v 32 wide; r = 8: 8·(64+64 + 64+32)·3 values.
    assert_eq!(plan.memory.lora_optimizer, 8 * (128 + 96) * 3 * (16 + 2));
    assert_eq!(plan.memory.checkpoints, 0);
    assert_eq!(plan.memory.nccl, NCCL_BYTES);
    assert!(plan.fits(GpuKind::T4));

    // A bitsandbytes 4-bit checkpoint is planned as NF4 without `quantize = "nf4"`.
    let qlora = toml
        .replace("tiny-llama/model", "tiny-llama-qlora/model")
        .replace("quantize = \"nf4\"\n", "");
    let cfg = crate::train::config::RunConfig::from_toml(&qlora).unwrap();
    let spec = PlanSpec::from_run(&cfg, 1, CheckpointPolicy::OFF).unwrap();
    assert!(spec.quantize.is_some());
    // "auto" with checkpoint_layers is refused, naming both keys.
    let both = toml.replace(
        "gradient_checkpointing = false",
        "gradient_checkpointing = \"auto\"\ncheckpoint_layers = 2",
    );
    let cfg = crate::train::config::RunConfig::from_toml(&both).unwrap();
    let e = fit::for_run(&cfg, None, 1).err().unwrap().to_string();
    assert!(
        e.contains("checkpoint_layers") && e.contains("\"auto\""),
        "{e}"
    );
}

#[test]
fn auto_checkpoints_the_fewest_layers_that_fit_and_offloads_them() {
    let spec = preset("llama2-7b", 2, Checkpointing::Off);
    let gib = |g: f64| (g * GIB) as u64;
    let host = Some(gib(64.0));
    // 7B, b2 × 2048: ~30 GiB without checkpointing, ~14.4 GiB with every layer offloaded.
    let roomy = fit::choose(&spec, Some(gib(80.0)), host).unwrap();
    assert_eq!(roomy.policy.recomputed_layers(32), 0, "{}", roomy.why);
    let tight = fit::choose(&spec, Some(gib(16.0)), host).unwrap();
    assert_eq!(tight.policy.mode, Checkpointing::Offload);
    assert!(tight.policy.recomputed_layers(32) >= 28, "{}", tight.why);
    let middle = fit::choose(&spec, Some(gib(24.0)), host).unwrap();
    let r = middle.policy.recomputed_layers(32);
    assert!(0 < r && r < 32, "{}", middle.why);
    // The fewest: one layer fewer recomputed does not fit in the budget the choice used.
    let total = |layers| {
        let policy = CheckpointPolicy {
            mode: Checkpointing::Offload,
            layers: Some(layers),
        };
        let p = Plan::account(&PlanSpec {
            checkpointing: policy,
            ..spec.clone()
        });
        p.unwrap().memory.total() as f64 / GIB
    };
    let budget = 24.0 * 0.95 - 0.5;
    assert!(
        total(r) <= budget && total(r - 1) > budget,
        "{}",
        middle.why
    );
    // Without host memory to pin, the layers stay on the device (full checkpointing).
    let no_host = fit::choose(&spec, Some(gib(16.0)), Some(gib(4.0))).unwrap();
    assert_eq!(no_host.policy.mode, Checkpointing::Full);
    // Nothing fits: every layer, and the reason names what to change.
    let small = fit::choose(&spec, Some(gib(8.0)), host).unwrap();
    // (The top layer is never recomputed: `CheckpointPolicy::of_layer`.)
    assert_eq!(small.policy.recomputed_layers(32), 31);
    assert!(small.why.contains("train.batch_size"), "{}", small.why);
    // The CPU: every layer, fully.
    let cpu = fit::choose(&spec, None, None).unwrap();
    assert_eq!(cpu.policy, CheckpointPolicy::all(Checkpointing::Full));
}

/// An offloaded checkpoint's recomputation runs no product for what it keeps: against full
/// checkpointing, the metered step's GEMMs lack exactly the o and kept k/v projections' (frozen
/// weight and LoRA `t Bᵀ` term) and every LoRA input product `x A_gᵀ` — k alone kept at
/// Llama-2-7B's shape, k and v at Mistral-7B's.
#[test]
fn offload_recomputes_no_product_of_what_it_keeps() {
    for (name, kept) in [("llama2-7b", KeptKv::K), ("mistral-7b", KeptKv::KV)] {
        let gemm_flops = |mode| -> f64 {
            let plan =
                Plan::account(&PlanSpec::from_preset(name, 1, 256, mode, 1).unwrap()).unwrap();
            let gemms = plan.ops.iter().filter(|o| o.kind == OpKind::Gemm);
            gemms.map(|o| o.flops).sum()
        };
        let spec = PlanSpec::from_preset(name, 1, 256, Checkpointing::Offload, 1).unwrap();
        let c = &spec.model;
        assert_eq!(KeptKv::of(c), kept);
        let (n, r, layers) = (256.0, spec.lora.r as f64, c.num_layers as f64);
        // A folded projection's LoRA term is part of its frozen product (K = in + the group's
        // width); the o projection's is its own product.
        let skipped_projections: f64 = [Projection::O]
            .iter()
            .chain(kept.projections())
            .map(|p| {
                let (out, inp) = p.shape(c);
                match fold_width(p.input_group(), &spec.lora) {
                    Some(w) => 2.0 * n * (out * (inp + w)) as f64,
                    None => 2.0 * n * (out * inp) as f64 + 2.0 * n * r * out as f64,
                }
            })
            .sum();
        let lora_inputs: f64 = Projection::ALL
            .iter()
            .map(|p| 2.0 * n * r * p.shape(c).1 as f64)
            .sum();
        let saved = gemm_flops(Checkpointing::Full) - gemm_flops(Checkpointing::Offload);
        // Every layer but the top one is recomputed (`CheckpointPolicy::of_layer`).
        let want = (layers - 1.0) * (skipped_projections + lora_inputs);
        assert!(
            (saved / want - 1.0).abs() < 1e-12,
            "{name}: {saved} FLOPs fewer, expected {want}"
        );
    }
}
