//! `export-gguf`: a Hugging Face model folder (optionally with a PEFT adapter merged on the fly) → a
//! llama.cpp GGUF file, as llama.cpp's convert_hf_to_gguf.py writes it; or, with `--lora-only`, the
//! adapter alone as a GGUF LoRA adapter, as convert_lora_to_gguf.py writes it.
//!
//! - Names and the Q/K row permutation: [`super::names`]. The type of each tensor:
//!   [`super::file_type`] (vectors F32; one type for every matrix, or llama-quantize's K-quant mixes).
//! - Metadata: `general.*`, the `llama.*` hyper-parameters (Llama and Mistral checkpoints are both
//!   llama.cpp's `llama` architecture), rope settings, and the tokenizer ([`super::vocab`]).
//! - Llama 3.1 rope scaling is written as llama.cpp expects it: a `rope_freqs.weight` tensor of
//!   per-frequency divisors (convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`).

use super::file_type::{FileType, ModelLayout};
use super::names::{gguf_name, permute_rows, Rows};
use super::quant::QuantType;
use super::reader::MetaValue;
use super::vocab::tokenizer_metadata;
use super::writer::{GgufWriter, TensorEntry};
use crate::arch::{ModelConfig, Projection};
use crate::lora::peft;
use crate::merge::MergedTensors;
use crate::model::weights::to_f32;
use anyhow::{anyhow, bail, Context, Result};
use kernels::cpu::CpuBackend;
use kernels::rope::{RopeConfig, RopeScaling};
use kernels::Backend;
use std::collections::BTreeMap;
use std::path::Path;

/// What an export wrote, for the command's summary.
#[derive(Debug, PartialEq)]
pub struct ExportSummary {
    /// Tensors per ggml type name.
    pub tensor_types: BTreeMap<&'static str, usize>,
    /// Adapted projections merged into the weights (or written, with `--lora-only`).
    pub adapted: usize,
    pub bytes: u64,
}

/// The GGUF architecture of a checkpoint and the prefix of its hyper-parameter keys. A new family
/// (qwen2: `qwen2.*` keys, Q/K not permuted, projection biases) is one more arm here and in
/// [`names`](super::names).
fn gguf_arch(config: &ModelConfig) -> &'static str {
    match config.architecture.model_type {
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        _ => "llama",
    }
}

/// Whether llama.cpp stores this architecture's q/k rows permuted for its RoPE (`llama` only).
fn rope_permuted(config: &ModelConfig) -> bool {
    gguf_arch(config) == "llama"
}

/// What the K-quant mixes need of the model; `tied_head`: the file has no `output.weight`.
fn model_layout(config: &ModelConfig, tied_head: bool) -> ModelLayout {
    ModelLayout::new(
        gguf_arch(config),
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        tied_head,
    )
}

fn type_name(ty: QuantType) -> &'static str {
    super::dequant::GgmlType::from_id(ty.ggml_id())
        .expect("export types are ggml types")
        .name()
}

/// A tensor the export writes: its GGUF name and type, where its values come from, its rows.
struct Planned {
    name: String,
    hf_shape: Vec<usize>,
    ty: QuantType,
    source: Source,
    rows: Rows,
}

enum Source {
    /// A (merged) model tensor by Hugging Face name.
    Model(String),
    /// Values computed here (rope_freqs).
    Values(Vec<f32>),
}

/// Writes `model` (+ `adapter`, merged) as a GGUF file of type `ty` at `out`.
pub fn export_gguf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    ty: FileType,
) -> Result<ExportSummary> {
    let merged = MergedTensors::open(model, adapter)?;
    let config = &merged.config;
    let arch = gguf_arch(config);
    let mut w = GgufWriter::default();
    general_metadata(&mut w, arch, model, "model");
    w.add("general.file_type", MetaValue::U32(ty.id()));
    if ty.base_type().is_quantized() {
        // GGML_QNT_VERSION of ggml.h, which gguf-py writes with every quantized file.
        w.add("general.quantization_version", MetaValue::U32(2));
    }
    hyperparameters(&mut w, arch, config)?;
    let embed = merged.shape("model.embed_tokens.weight")?;
    for (key, value) in tokenizer_metadata(model, embed[0])
        .with_context(|| format!("writing the tokenizer of {}", model.display()))?
    {
        w.add(key, value);
    }

    let names = merged.names();
    let has_head = names.iter().any(|n| n == "lm_head.weight");
    let layout = model_layout(config, config.tie_word_embeddings || !has_head);
    let mut planned = Vec::new();
    for name in names {
        if name == "lm_head.weight" && config.tie_word_embeddings {
            continue;
        }
        let (gguf, rows) = gguf_name(&name, config.num_heads, config.num_kv_heads, rope_permuted(config)).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` has no llama.cpp `{arch}` counterpart (export-gguf maps embed_tokens, \
                 norm, lm_head and the layers' norms and q/k/v/o/gate/up/down projections)",
                model.display()
            )
        })?;
        let hf_shape = merged.shape(&name)?;
        planned.push(Planned {
            ty: ty.tensor_type(&gguf, &hf_shape, &layout),
            name: gguf,
            hf_shape,
            source: Source::Model(name),
            rows,
        });
    }
    if let Some(factors) = llama3_rope_factors(&config.rope) {
        planned.push(Planned {
            name: "rope_freqs.weight".into(),
            hf_shape: vec![factors.len()],
            ty: QuantType::F32,
            source: Source::Values(factors),
            rows: Rows::AsStored,
        });
    }
    planned.sort_by_key(|p| tensor_order(&p.name));

    let summary = write_planned(&mut w, planned, out, |source| match source {
        Source::Model(name) => {
            let (_, dtype, bytes) = merged.tensor(name)?;
            to_f32(dtype, &bytes).with_context(|| format!("tensor `{name}` of {}", model.display()))
        }
        Source::Values(v) => Ok(v.clone()),
    })?;
    Ok(ExportSummary {
        adapted: merged.merged(),
        ..summary
    })
}

/// Writes the adapter in `adapter` (for the base in `model`) as a GGUF LoRA adapter: for every
/// adapted projection `blk.N.<name>.weight.lora_a` `[r, in]` and `.lora_b` `[out, r]`, B's rows
/// permuted like the projection's, and `adapter.lora.alpha` such that llama.cpp's scale
/// `alpha / r` is the adapter's scaling (`lora_alpha / r`, or `lora_alpha / √r` with rsLoRA).
pub fn export_lora_gguf(
    model: &Path,
    adapter: &Path,
    out: &Path,
    ty: FileType,
) -> Result<ExportSummary> {
    if ty.is_k_mix() {
        bail!(
            "--type {} is one of llama-quantize's mixes for a whole model; write the adapter \
             (--lora-only) as f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1",
            ty.name()
        );
    }
    let config = ModelConfig::load(model)?;
    let be = CpuBackend::new();
    let lora = peft::load(&be, &config, adapter)?;
    let arch = gguf_arch(&config);
    let layout = model_layout(&config, config.tie_word_embeddings);
    let mut w = GgufWriter::default();
    general_metadata(&mut w, arch, adapter, "adapter");
    w.add("adapter.type", MetaValue::String("lora".into()));
    let alpha = lora.config.scaling() * lora.config.r as f32;
    w.add("adapter.lora.alpha", MetaValue::F32(alpha));

    let mut planned = Vec::new();
    for layer in 0..config.num_layers {
        for p in Projection::ALL {
            let Some(slot) = lora.slot(layer, p) else {
                continue;
            };
            let hf = format!("{}.weight", p.module_path(layer));
            let (gguf, rows) = gguf_name(
                &hf,
                config.num_heads,
                config.num_kv_heads,
                rope_permuted(&config),
            )
            .ok_or_else(|| anyhow!("projection `{hf}` has no llama.cpp name"))?;
            for (suffix, index, rows) in [
                ("lora_a", slot.a, Rows::AsStored),
                ("lora_b", slot.a + 1, rows),
            ] {
                let hf_shape = lora.shapes[index].to_vec();
                let name = format!("{gguf}.{suffix}");
                planned.push(Planned {
                    ty: ty.tensor_type(&name, &hf_shape, &layout),
                    name,
                    hf_shape,
                    source: Source::Values(be.download(&lora.params[index])?),
                    rows,
                });
            }
        }
    }
    let summary = write_planned(&mut w, planned, out, |source| match source {
        Source::Values(v) => Ok(v.clone()),
        Source::Model(_) => unreachable!("an adapter export holds only adapter values"),
    })?;
    Ok(ExportSummary {
        adapted: summary.tensor_types.values().sum::<usize>() / 2,
        ..summary
    })
}

/// Adds the directory of `planned` to `w` and writes the file, each tensor's f32 values from `values`.
fn write_planned(
    w: &mut GgufWriter,
    planned: Vec<Planned>,
    out: &Path,
    values: impl Fn(&Source) -> Result<Vec<f32>>,
) -> Result<ExportSummary> {
    let mut tensor_types = BTreeMap::new();
    let mut sources = Vec::new();
    for p in planned {
        *tensor_types.entry(type_name(p.ty)).or_insert(0) += 1;
        w.add_tensor(TensorEntry {
            name: p.name,
            hf_shape: p.hf_shape,
            type_id: p.ty.ggml_id(),
        });
        sources.push((p.source, p.rows, p.ty));
    }
    let entries = w.tensors();
    w.write(out, |i| {
        let (source, rows, ty) = &sources[i];
        let mut v = values(source)?;
        if let Rows::RopePermuted { heads } = *rows {
            let shape = &entries[i].hf_shape;
            if shape.len() != 2 || !shape[0].is_multiple_of(2 * heads) {
                bail!(
                    "tensor `{}` has shape {shape:?}, which is not {heads} heads of an even number of rows",
                    entries[i].name
                );
            }
            v = permute_rows(&v, heads, shape[1]);
        }
        Ok(ty.quantize(&v))
    })
    .with_context(|| format!("writing {}", out.display()))?;
    let bytes = std::fs::metadata(out)
        .with_context(|| format!("cannot stat {}", out.display()))?
        .len();
    Ok(ExportSummary {
        tensor_types,
        adapted: 0,
        bytes,
    })
}

/// token_embd, rope_freqs, the layers in order, output_norm, output (convert_hf_to_gguf.py's order).
fn tensor_order(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, _)| l.parse::<usize>().ok());
    match (layer, name) {
        (_, "token_embd.weight") => (0, String::new()),
        (_, "rope_freqs.weight") => (1, String::new()),
        (Some(l), _) => (2 + l, name.to_string()),
        (None, _) => (usize::MAX, name.to_string()),
    }
}

fn general_metadata(w: &mut GgufWriter, arch: &str, source: &Path, kind: &str) {
    w.add("general.architecture", MetaValue::String(arch.into()));
    w.add("general.type", MetaValue::String(kind.into()));
    let name = source
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    w.add("general.name", MetaValue::String(name));
}

/// The `{arch}.*` hyper-parameters llama.cpp reads (gguf.md "LLM" keys).
fn hyperparameters(w: &mut GgufWriter, arch: &str, c: &ModelConfig) -> Result<()> {
    let u32_of = |v: usize| MetaValue::U32(v as u32);
    let keys = [
        ("vocab_size", u32_of(c.vocab_size)),
        ("context_length", u32_of(c.max_position_embeddings)),
        ("embedding_length", u32_of(c.hidden_size)),
        ("block_count", u32_of(c.num_layers)),
        ("feed_forward_length", u32_of(c.intermediate_size)),
        ("attention.head_count", u32_of(c.num_heads)),
        ("attention.head_count_kv", u32_of(c.num_kv_heads)),
        ("attention.key_length", u32_of(c.head_dim)),
        ("attention.value_length", u32_of(c.head_dim)),
        ("rope.dimension_count", u32_of(c.head_dim)),
        ("rope.freq_base", MetaValue::F32(c.rope.theta)),
        (
            "attention.layer_norm_rms_epsilon",
            MetaValue::F32(c.rms_norm_eps),
        ),
    ];
    for (key, value) in keys {
        w.add(&format!("{arch}.{key}"), value);
    }
    match &c.rope.scaling {
        RopeScaling::Default | RopeScaling::Llama3 { .. } => {}
        RopeScaling::Linear { factor } => {
            w.add(
                &format!("{arch}.rope.scaling.type"),
                MetaValue::String("linear".into()),
            );
            w.add(
                &format!("{arch}.rope.scaling.factor"),
                MetaValue::F32(*factor),
            );
        }
        RopeScaling::Dynamic { .. } => bail!(
            "rope scaling `dynamic` (NTK) has no llama.cpp equivalent for the llama architecture; \
             remove `rope_scaling` from config.json to export the model with plain RoPE"
        ),
    }
    Ok(())
}

/// Llama 3.1's per-frequency divisors (convert_hf_to_gguf.py, in f64 over transformers' f32
/// `inv_freq`): 1 above the high-frequency wavelength, `factor` beyond the low one, and
/// `1 / ((1 − smooth)/factor + smooth)` between, `smooth = (L/λ − low) / (high − low)`.
fn llama3_rope_factors(rope: &RopeConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = rope.scaling
    else {
        return None;
    };
    let base = RopeConfig {
        scaling: RopeScaling::Default,
        ..rope.clone()
    };
    let (factor, low, high, old) = (
        factor as f64,
        low_freq_factor as f64,
        high_freq_factor as f64,
        original_max_position_embeddings as f64,
    );
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    Some(
        base.inv_freq(0)
            .into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect(),
    )
}
