//! Decoder-level checks on small random models: finite differences of the LoRA gradients through
//! every op at once, gradient checkpointing, and packed rows behaving like separate sequences.

use super::{Batch, CheckpointPolicy, Checkpointing, Decoder, KeptKv, ModelConfig, Projection};
use crate::lora::{LoraConfig, LoraParams};
use kernels::cpu::CpuBackend;
use kernels::{AttentionLayout, Backend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// A small model of family `class` (Mistral gets the window; Qwen3 an explicit head_dim 6 ≠ 16/4).
fn config(class: &str, window: Option<usize>, tied: bool) -> ModelConfig {
    let mut v = json!({
        "architectures": [class],
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 40, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}
    });
    if let Some(w) = window {
        v["sliding_window"] = json!(w);
    }
    if class == QWEN3 {
        v["head_dim"] = json!(6);
    }
    ModelConfig::from_json(v).unwrap()
}

const LLAMA: &str = "LlamaForCausalLM";
const MISTRAL: &str = "MistralForCausalLM";
const QWEN2: &str = "Qwen2ForCausalLM";
const QWEN3: &str = "Qwen3ForCausalLM";

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn model(be: &CpuBackend, c: &ModelConfig, tied: bool) -> Decoder<CpuBackend> {
    Decoder::from_source(be, c.clone(), tied, |name, shape| {
        let n = shape.iter().product();
        let seed = name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        Ok(if name.contains("norm") {
            random(n, seed, 0.3).iter().map(|x| 1.0 + x).collect()
        } else {
            random(n, seed, 0.3)
        })
    })
    .unwrap()
}

fn adapter(be: &CpuBackend, c: &ModelConfig) -> LoraParams<CpuBackend> {
    adapter_on(be, c, &Projection::ALL)
}

/// An adapter of rank 2 on `targets` with random weights.
fn adapter_on(be: &CpuBackend, c: &ModelConfig, targets: &[Projection]) -> LoraParams<CpuBackend> {
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        targets: targets.to_vec(),
        use_rslora: false,
        dropout: 0.0,
    };
    let mut k = 0;
    LoraParams::build(be, c, cfg, |_, s| {
        k += 1;
        Ok(random(s[0] * s[1], 100 + k, 0.3))
    })
    .unwrap()
}

fn tokens(n: usize, seed: u64) -> Vec<i32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..40)).collect()
}

/// Loss `Σ −logp` and the LoRA gradients of that sum.
fn loss_and_grads(
    be: &CpuBackend,
    m: &Decoder<CpuBackend>,
    lora: &mut LoraParams<CpuBackend>,
    batch: &Batch<CpuBackend>,
    checkpointing: CheckpointPolicy,
) -> (f64, Vec<Vec<f32>>) {
    lora.zero_grads(be).unwrap();
    let nll = m
        .loss_and_grad(be, Some(lora), batch, checkpointing, 1.0)
        .unwrap();
    (nll, lora.grads.clone())
}

#[test]
fn lora_gradients_match_finite_differences_through_the_whole_model() {
    use Projection::*;
    let be = CpuBackend::new();
    // Every projection, and input groups with some members adapted (q and v of q/k/v, up alone
    // of gate/up): each adapted member's columns of the group's stacked products.
    for (class, window, tied, targets) in [
        (LLAMA, None, false, &Projection::ALL[..]),
        (MISTRAL, Some(3), true, &[Q, V, Up, Down][..]),
        (QWEN2, None, true, &[K, O, Gate][..]),
        (QWEN3, None, false, &Projection::ALL[..]),
    ] {
        let c = config(class, window, tied);
        let mut m = model(&be, &c, tied);
        let mut lora = adapter_on(&be, &c, targets);
        // Folded where a group is fully adapted: each nudge of a B must reach its weight's pad.
        m.fold_lora(&be, &lora.config).unwrap();
        let layout = AttentionLayout::packed(&[vec![4, 3], vec![6]], 7, window);
        let ids = tokens(14, 1);
        let batch = Batch::new(&be, &c, &ids, &ids, layout).unwrap();
        let (_, grads) = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
        let h = 1e-2f32;
        for (t, g) in grads.iter().enumerate() {
            let scale = g.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-3);
            for i in [0, g.len() / 2, g.len() - 1] {
                let orig = lora.params[t][i];
                let mut at = |v: f32| {
                    lora.params[t][i] = v;
                    lora.sync_compute(&be).unwrap();
                    let acts = m
                        .forward(&be, Some(&lora), &batch, CheckpointPolicy::OFF)
                        .unwrap();
                    let (lp, _) = m
                        .head(&be, &acts, &batch.targets, kernels::CeGrad::None)
                        .unwrap();
                    -lp.iter().map(|&x| x as f64).sum::<f64>()
                };
                let numeric = (at(orig + h) - at(orig - h)) / (2.0 * h as f64);
                at(orig);
                let err = (numeric - g[i] as f64).abs() / scale as f64;
                assert!(
                    err < 5e-3,
                    "{class} {} [{i}]: analytic {} numeric {numeric}",
                    lora.names[t],
                    g[i]
                );
            }
        }
    }
}

/// Full and offloaded checkpointing, of every layer or of the first only, give the gradients of no
/// checkpointing bit for bit; offloaded in each case of [`KeptKv`]: k alone (Llama, and Mistral with
/// 2 of 4 heads), k and v (Llama with one key/value head), v alone where k has a per-head norm (Qwen3).
#[test]
fn gradient_checkpointing_changes_no_gradient() {
    let be = CpuBackend::new();
    let one_kv_head = {
        let mut c = config(LLAMA, None, false);
        c.num_kv_heads = 1;
        c
    };
    use Projection::*;
    let all = &Projection::ALL[..];
    // Every projection adapted, and (the bottom layer's backward skipping what nothing reads)
    // the MLP alone, o alone, q and v.
    let cases = [
        (config(LLAMA, None, false), KeptKv::K, all),
        (config(LLAMA, None, false), KeptKv::K, &[Gate, Up, Down][..]),
        (config(MISTRAL, Some(4), false), KeptKv::K, all),
        (config(MISTRAL, Some(4), false), KeptKv::K, &[O][..]),
        (one_kv_head, KeptKv::KV, all),
        (config(QWEN3, None, false), KeptKv::V, all),
        (config(QWEN3, None, false), KeptKv::V, &[Q, V][..]),
    ];
    for (c, kept, targets) in cases {
        assert_eq!(KeptKv::of(&c), kept);
        let mut m = model(&be, &c, false);
        let mut lora = adapter_on(&be, &c, targets);
        m.fold_lora(&be, &lora.config).unwrap();
        let ids = tokens(20, 2);
        let batch = Batch::new(
            &be,
            &c,
            &ids,
            &ids,
            AttentionLayout::right_padded(&[10, 7], 10, c.sliding_window),
        )
        .unwrap();
        let (l1, g1) = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
        // Every layer, or only the first one (the second keeps everything), in both modes.
        for mode in [Checkpointing::Full, Checkpointing::Offload] {
            for layers in [None, Some(1)] {
                let policy = CheckpointPolicy { mode, layers };
                let (l2, g2) = loss_and_grads(&be, &m, &mut lora, &batch, policy);
                assert_eq!(l1, l2, "{kept:?} {targets:?} {policy:?}");
                assert_eq!(
                    g1, g2,
                    "{kept:?} {targets:?} {policy:?}: checkpointed gradients must be bitwise identical"
                );
            }
        }
    }
}

/// The bottom layer's backward without its input gradient ([`InputGradient::NotWanted`], what
/// the decoder asks of layer 0: the embedding below it is frozen) returns no `dL/dx` and the LoRA
/// gradients of the backward with it bit for bit: every projection adapted; q, v and down (the
/// attention backward runs for q and v's gradients); o alone (the MLP's `dL/d mid` is still made
/// for o's, the attention backward is not run); the MLP alone (neither is made).
#[test]
fn the_bottom_layer_makes_no_input_gradient_and_the_same_lora_gradients() {
    use super::layer::{Attend, InputGradient};
    use Projection::*;
    let be = CpuBackend::new();
    let c = config(LLAMA, None, false);
    let ids = tokens(20, 2);
    let layout = AttentionLayout::right_padded(&[10, 7], 10, None);
    let batch = Batch::new(&be, &c, &ids, &ids, layout).unwrap();
    let x = random(20 * c.hidden_size, 5, 1.0);
    let dy = random(20 * c.hidden_size, 6, 1.0);
    for targets in [&Projection::ALL[..], &[Q, V, Down], &[O], &[Gate, Up, Down]] {
        let mut m = model(&be, &c, false);
        let mut lora = adapter_on(&be, &c, targets);
        m.fold_lora(&be, &lora.config).unwrap();
        let layer = &m.layers[0];
        let mut grads = Vec::new();
        for wanted in [InputGradient::Wanted, InputGradient::NotWanted] {
            lora.zero_grads(&be).unwrap();
            let attend = Attend::Batch(&batch);
            let (_, saved) = layer
                .forward(&be, &m.shapes, 0, Some(&lora), attend, x.clone())
                .unwrap();
            let dx = layer
                .backward(
                    &be,
                    &m.shapes,
                    0,
                    Some(&mut lora),
                    &batch,
                    saved,
                    dy.clone(),
                    wanted,
                )
                .unwrap();
            assert_eq!(dx.is_some(), wanted == InputGradient::Wanted, "{targets:?}");
            grads.push(lora.grads.clone());
        }
        for (t, g) in grads[0].iter().enumerate() {
            let at_layer_0 = lora.names[t].contains(".layers.0.");
            assert_eq!(
                g.iter().any(|&v| v != 0.0),
                at_layer_0,
                "{targets:?} {}: a gradient where the layer has one",
                lora.names[t]
            );
        }
        assert_eq!(
            grads[0], grads[1],
            "{targets:?}: the LoRA gradients must not change"
        );
    }
}

/// With NF4 weights, a recomputation keeps the dense copies of the projections that the layer's
/// backward runs next (gate and up; q, and k unless the checkpoint keeps it) and the backward takes
/// them: the gradients of no checkpointing bit for bit, and no copy left behind — also at the
/// bottom layer, whose backward runs no q/k/v `dx` products, and none of gate's and up's where
/// the attention half has no adapter ([`super::layer::InputGradient`]).
#[test]
fn nf4_dense_copies_kept_for_the_backward_change_no_gradient() {
    use crate::model::QuantizeNf4;
    use Projection::*;
    let be = CpuBackend::new();
    let one_kv_head = {
        let mut c = config(LLAMA, None, false);
        c.num_kv_heads = 1;
        c
    };
    let cases = [
        (config(MISTRAL, Some(4), false), &Projection::ALL[..]),
        (one_kv_head.clone(), &Projection::ALL[..]),
        (one_kv_head.clone(), &[Gate, Up, Down][..]),
        (config(MISTRAL, Some(4), false), &[O, Up][..]),
    ];
    for (c, targets) in cases {
        let q = Some(QuantizeNf4 { double_quant: true });
        let mut m = Decoder::random(&be, c.clone(), 3, q, None).unwrap();
        let mut lora = adapter_on(&be, &c, targets);
        m.fold_lora(&be, &lora.config).unwrap();
        let ids = tokens(20, 2);
        let layout = AttentionLayout::right_padded(&[10, 7], 10, c.sliding_window);
        let batch = Batch::new(&be, &c, &ids, &ids, layout).unwrap();
        let (l1, g1) = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
        for mode in [Checkpointing::Full, Checkpointing::Offload] {
            let policy = CheckpointPolicy::all(mode);
            let (l2, g2) = loss_and_grads(&be, &m, &mut lora, &batch, policy);
            assert_eq!(
                (l1, &g1),
                (l2, &g2),
                "{targets:?} {mode:?}: gradients must be bitwise identical"
            );
            let left = m.layers.iter().flat_map(|l| &l.proj);
            assert!(
                !left.into_iter().any(|p| p.weight.holds_kept_copy()),
                "{targets:?} {mode:?}: a kept dense copy was not taken by the backward"
            );
        }
    }
}

/// Folding the LoRA terms of fully adapted groups into the frozen products
/// ([`crate::model::proj_weight`]) gives the unfolded loss and gradients up to f32 rounding (the
/// products sum in another order), dense and NF4, with and without checkpointing; partly adapted
/// groups (q and v of q/k/v) are not folded. A forward without the adapter still runs on the
/// padded weights and gives the base model's loss.
#[test]
fn folding_lora_into_the_frozen_products_changes_only_rounding() {
    use crate::model::QuantizeNf4;
    use Projection::*;
    let be = CpuBackend::new();
    let c = config(LLAMA, None, false);
    let ids = tokens(20, 2);
    let layout = AttentionLayout::right_padded(&[10, 7], 10, c.sliding_window);
    let batch = Batch::new(&be, &c, &ids, &ids, layout).unwrap();
    for quantize in [None, Some(QuantizeNf4 { double_quant: true })] {
        for targets in [&Projection::ALL[..], &[Q, V, Gate, Up][..]] {
            let mut m = Decoder::random(&be, c.clone(), 3, quantize, None).unwrap();
            let mut lora = adapter_on(&be, &c, targets);
            let base = m.loss_and_grad(&be, None, &batch, CheckpointPolicy::OFF, 1.0);
            let base = base.unwrap();
            let plain = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
            m.fold_lora(&be, &lora.config).unwrap();
            let padded = m.layers[0]
                .proj
                .iter()
                .map(|p| p.weight.fold_layout().is_some());
            let want = targets.len() == 7;
            assert_eq!(
                padded.collect::<Vec<_>>(),
                [want, want, want, false, true, true, false],
                "{targets:?}: the fully adapted q/k/v and gate/up groups are folded"
            );
            for policy in [
                CheckpointPolicy::OFF,
                CheckpointPolicy::all(Checkpointing::Offload),
            ] {
                let folded = loss_and_grads(&be, &m, &mut lora, &batch, policy);
                if quantize.is_none() {
                    // The folded products ran: each padded weight's pad holds its layer's B.
                    for (l, layer) in m.layers.iter().enumerate() {
                        for p in layer
                            .proj
                            .iter()
                            .filter(|p| p.weight.fold_layout().is_some())
                        {
                            assert_eq!(p.weight.pad_version(), Some(lora.compute_version(l)));
                        }
                    }
                }
                assert!((folded.0 - plain.0).abs() < 1e-5 * plain.0.abs());
                for (a, b) in folded.1.iter().flatten().zip(plain.1.iter().flatten()) {
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{policy:?}: {a} vs {b}"
                    );
                }
            }
            let base_folded = m.loss_and_grad(&be, None, &batch, CheckpointPolicy::OFF, 1.0);
            assert!((base_folded.unwrap() - base).abs() < 1e-5 * base.abs());
        }
    }
}

/// The embedding table in host memory gives the same loss and gradients; a tied table, which the
/// LM head reads, stays where it is.
#[test]
fn the_embedding_on_the_host_changes_nothing() {
    let be = CpuBackend::new();
    let c = config(LLAMA, None, false);
    let mut m = model(&be, &c, false);
    let mut lora = adapter(&be, &c);
    let ids = tokens(16, 3);
    let layout = AttentionLayout::right_padded(&[8, 8], 8, None);
    let batch = Batch::new(&be, &c, &ids, &ids, layout).unwrap();
    let on_device = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
    assert!(m.keep_embedding_on_host(&be).unwrap());
    assert!(matches!(m.embed, super::decoder::Embedding::Host(_)));
    let on_host = loss_and_grads(&be, &m, &mut lora, &batch, CheckpointPolicy::OFF);
    assert_eq!(on_device, on_host);
    let tied = config(LLAMA, None, true);
    let mut m = model(&be, &tied, true);
    assert!(!m.keep_embedding_on_host(&be).unwrap());
    assert!(matches!(m.embed, super::decoder::Embedding::Device(_)));
}

#[test]
fn packed_documents_equal_separate_rows() {
    let be = CpuBackend::new();
    let c = config(LLAMA, None, false);
    let m = model(&be, &c, false);
    let mut lora = adapter(&be, &c);
    let (a, b) = (tokens(5, 3), tokens(6, 4));
    let packed_ids: Vec<i32> = a.iter().chain(&b).copied().collect();
    let packed = Batch::new(
        &be,
        &c,
        &packed_ids,
        &packed_ids,
        AttentionLayout::packed(&[vec![5, 6]], 11, None),
    )
    .unwrap();
    let mut rows = vec![0; 12];
    rows[..5].copy_from_slice(&a);
    rows[6..].copy_from_slice(&b);
    let mut labels = rows.clone();
    labels[5] = kernels::IGNORE_INDEX;
    let separate = Batch::new(
        &be,
        &c,
        &rows,
        &labels,
        AttentionLayout::right_padded(&[5, 6], 6, None),
    )
    .unwrap();
    assert_eq!(packed.n_targets, 4 + 5);
    assert_eq!(separate.n_targets, packed.n_targets);
    let (lp, gp) = loss_and_grads(&be, &m, &mut lora, &packed, CheckpointPolicy::OFF);
    let (ls, gs) = loss_and_grads(&be, &m, &mut lora, &separate, CheckpointPolicy::OFF);
    assert!(
        (lp - ls).abs() < 1e-5 * ls.abs(),
        "packed {lp} vs separate {ls}"
    );
    for (x, y) in gp.iter().flatten().zip(gs.iter().flatten()) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[test]
fn cached_decoding_gives_the_full_forward_logits() {
    let be = CpuBackend::new();
    // Qwen2 with its LoRA folded into the products (q/k/v with biases): the cached steps too.
    for (class, window, fold) in [
        (MISTRAL, Some(4), false),
        (QWEN2, None, false),
        (QWEN2, None, true),
        (QWEN3, None, false),
    ] {
        let c = config(class, window, false);
        let mut m = model(&be, &c, false);
        let lora = adapter(&be, &c);
        if fold {
            m.fold_lora(&be, &lora.config).unwrap();
        }
        let ids = tokens(7, 5);
        let full = Batch::new(
            &be,
            &c,
            &ids,
            &ids,
            AttentionLayout::right_padded(&[7], 7, window),
        )
        .unwrap();
        let acts = m
            .forward(&be, Some(&lora), &full, CheckpointPolicy::OFF)
            .unwrap();
        let logits = m.logits(&be, &acts).unwrap();
        let mut cache = super::KvCache::new(&be, &m, vec![0], 7).unwrap();
        let v = c.vocab_size;
        // Prefill 4 tokens, then one at a time: each step's logits equal the full pass at that column.
        let first = m
            .step_cached(&be, Some(&lora), &ids[..4], &mut cache)
            .unwrap();
        let mut steps = vec![(3, first)];
        for t in 4..7 {
            steps.push((
                t,
                m.step_cached(&be, Some(&lora), &ids[t..t + 1], &mut cache)
                    .unwrap(),
            ));
        }
        if fold {
            let padded = m.layers[0]
                .proj
                .iter()
                .filter_map(|p| p.weight.pad_version());
            assert_eq!(
                padded.count(),
                5,
                "the folded q/k/v and gate/up products ran"
            );
        }
        for (t, got) in steps {
            for (a, b) in got.iter().zip(&logits[t * v..(t + 1) * v]) {
                assert!((a - b).abs() < 1e-5, "{class} column {t}: {a} vs {b}");
            }
        }
    }
}

/// `[model] quantize = "nf4"` on tiny-llama's dense weights gives the base logits transformers
/// computes on the same weights saved as a bitsandbytes 4-bit checkpoint.
#[test]
fn quantizing_at_load_matches_the_bitsandbytes_checkpoint() {
    use crate::model::QuantizeNf4;
    use crate::reference::sft::Inputs;
    use crate::weights::WeightFiles;
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let be = CpuBackend::new();
    let dir = fixtures.join("tiny-llama/model");
    let config = ModelConfig::load(&dir).unwrap();
    let quantize = Some(QuantizeNf4 { double_quant: true });
    let model = Decoder::load_with(
        &be,
        config.clone(),
        &WeightFiles::open(&dir).unwrap(),
        quantize,
        None,
    )
    .unwrap();
    let inputs = Inputs::load(&fixtures.join("tiny-llama-qlora/inputs.safetensors")).unwrap();
    let layout = inputs.layout(None).unwrap();
    let batch = Batch::new(&be, &config, &inputs.ids, &inputs.labels, layout).unwrap();
    let acts = model
        .forward(&be, None, &batch, CheckpointPolicy::OFF)
        .unwrap();
    let got = be.download(&model.logits(&be, &acts).unwrap()).unwrap();
    let expected =
        WeightFiles::open_file(&fixtures.join("tiny-llama-qlora/expected.safetensors")).unwrap();
    let want = expected.f32("base_logits", &[2, 24, 320]).unwrap();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(i, _)| inputs.mask[i / 320] == 1)
        .map(|(_, (a, b))| (a - b).abs() / scale)
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "max relative logit error {worst}");
}

/// QLoRA on the Qwen families: the projections quantize to NF4 at load (biases and q/k norms stay
/// dense), and the base loss on the fixture batch moves by no more than NF4's rounding does.
#[test]
fn qwen_models_quantize_at_load_and_keep_their_loss() {
    use crate::model::QuantizeNf4;
    use crate::reference::sft::Inputs;
    use crate::weights::WeightFiles;
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let be = CpuBackend::new();
    for case in ["tiny-qwen2", "tiny-qwen3"] {
        let dir = fixtures.join(case).join("model");
        let config = ModelConfig::load(&dir).unwrap();
        let files = WeightFiles::open(&dir).unwrap();
        let inputs = Inputs::load(&fixtures.join(case).join("inputs.safetensors")).unwrap();
        let batch = Batch::new(
            &be,
            &config,
            &inputs.ids,
            &inputs.labels,
            inputs.layout(None).unwrap(),
        )
        .unwrap();
        let loss = |quantize| {
            let m = Decoder::load_with(&be, config.clone(), &files, quantize, None).unwrap();
            m.loss_and_grad(&be, None, &batch, CheckpointPolicy::OFF, 1.0)
                .unwrap()
                / batch.n_targets as f64
        };
        let dense = loss(None);
        let nf4 = loss(Some(QuantizeNf4 { double_quant: true }));
        let want = WeightFiles::open_file(&fixtures.join(case).join("expected.safetensors"))
            .unwrap()
            .f32("base_loss", &[1])
            .unwrap()[0] as f64;
        assert!(
            (dense - want).abs() < 1e-5 * want,
            "{case}: {dense} vs {want}"
        );
        assert!(
            nf4 != dense && (nf4 - dense).abs() < 0.02 * dense,
            "{case}: nf4 {nf4} vs dense {dense}"
        );
    }
}

#[test]
fn missing_and_misshapen_tensors_are_named_with_both_shapes() {
    use crate::weights::WeightFiles;
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-llama/model");
    std::fs::copy(fixture.join("config.json"), dir.path().join("config.json")).unwrap();
    let original = WeightFiles::open(&fixture).unwrap();
    let write = |skip: &str, reshape: &str| {
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = original
            .names()
            .filter(|n| *n != skip)
            .map(|n| {
                let (shape, _) = original.info(n).unwrap();
                let values = original.f32(n, &shape).unwrap();
                let shape = if n == reshape {
                    vec![shape.iter().product()]
                } else {
                    shape
                };
                (n.to_string(), shape, values)
            })
            .collect();
        crate::io::write_safetensors_f32(&dir.path().join("model.safetensors"), &tensors).unwrap();
    };
    let be = CpuBackend::new();
    let load = || {
        let c = ModelConfig::load(dir.path()).unwrap();
        Decoder::load(&be, c, &WeightFiles::open(dir.path()).unwrap())
            .err()
            .map(|e| format!("{e:#}"))
    };
    write("model.layers.1.mlp.up_proj.weight", "");
    let e = load().expect("a missing tensor must be an error");
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    write("", "model.layers.0.self_attn.k_proj.weight");
    let e = load().expect("a misshapen tensor must be an error");
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[2048]")
            && e.contains("[32, 64]"),
        "{e}"
    );
}
