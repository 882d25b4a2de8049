//! `import-gguf`: a llama.cpp GGUF file of a `llama`, `qwen2` or `qwen3` model → a Hugging Face
//! folder of the matching class (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`):
//! config.json, model.safetensors in bf16, tokenizer.json, tokenizer_config.json,
//! generation_config.json.
//!
//! Hyperparameters come from the `<arch>.*` metadata (gguf.md "LLM" keys); tensors are dequantized to
//! f32, renamed, the Q/K rows of `llama` files un-permuted (names.rs), and rounded to bf16 (round to
//! nearest even). The LM head is tied to the embedding when the file has no `output.weight`. The
//! tensors must be exactly those the model description lists for the config (`ModelConfig::tensor_shapes`).

use super::names::{hf_name, unpermute_rows, Rows};
use super::reader::{GgufFile, MetaValue};
use super::tokenizer::{self, SpecialIds};
use crate::arch::{Family, ModelConfig, FAMILIES};
use crate::io::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use half::bf16;
use safetensors::tensor::TensorView;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What an import wrote, for the command's summary.
#[derive(Debug)]
pub struct ImportSummary {
    pub config: Value,
    /// Number of tensors per ggml type name in the GGUF file.
    pub tensor_types: BTreeMap<&'static str, usize>,
    pub tied_embeddings: bool,
    pub parameters: usize,
}

/// The llama.cpp architectures import-gguf converts; each is the `model_type` of its family.
const GGUF_ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// The decoder shape from `<arch>.*` metadata.
struct Hparams {
    /// `general.architecture`: the metadata prefix, and whether q/k rows are permuted (`llama`).
    arch: String,
    family: &'static Family,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Value,
}

/// Converts `gguf_path` into a Hugging Face folder at `out_dir` (created if needed).
pub fn import_gguf(gguf_path: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let file = GgufFile::open(gguf_path)?;
    let in_file = || format!("in {}", gguf_path.display());
    let arch = meta(&file, "general.architecture")?
        .as_str()
        .ok_or_else(|| anyhow!("general.architecture is not a string"))
        .with_context(in_file)?;
    let family = GGUF_ARCHITECTURES
        .contains(&arch)
        .then(|| FAMILIES.into_iter().find(|f| f.model_type == arch))
        .flatten()
        .ok_or_else(|| {
            anyhow!(
                "{} holds a `{arch}` model; import-gguf converts {} models (Llama, Mistral, SmolLM and \
                 other LlamaForCausalLM checkpoints are `llama`; Qwen2/Qwen2.5 `qwen2`; Qwen3 `qwen3`)",
                gguf_path.display(),
                GGUF_ARCHITECTURES.join(", ")
            )
        })?;
    let hp = Hparams::read(&file, arch, family).with_context(in_file)?;
    let tokenizer = tokenizer::build(&file.metadata, hp.context_length)
        .with_context(|| format!("rebuilding the tokenizer from {}", gguf_path.display()))?;

    let (tensors, tensor_types) = convert_tensors(&file, &hp)?;
    let tied = !tensors.contains_key("lm_head.weight");
    let embed_shape = &tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| anyhow!("{} has no token_embd.weight", gguf_path.display()))?
        .0;
    let vocab_size = embed_shape[0];
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map_or(0, <[MetaValue]>::len);
    if tokens > vocab_size {
        bail!(
            "{}: the tokenizer has {tokens} tokens but token_embd.weight only {vocab_size} rows",
            gguf_path.display()
        );
    }
    let config = config_json(&hp, vocab_size, tied, &tokenizer.special);
    check_complete(&tensors, &config, &hp, tied).with_context(in_file)?;

    let parameters = tensors
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create the output folder {}", out_dir.display()))?;
    write_json(&out_dir.join("config.json"), &config)?;
    write_json(
        &out_dir.join("generation_config.json"),
        &generation_config(&tokenizer.special),
    )?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer.tokenizer_json)?;
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tokenizer.tokenizer_config,
    )?;
    write_bf16_safetensors(&out_dir.join("model.safetensors"), &tensors)?;
    Ok(ImportSummary {
        config,
        tensor_types,
        tied_embeddings: tied,
        parameters,
    })
}

impl Hparams {
    fn read(file: &GgufFile, arch: &str, family: &'static Family) -> Result<Self> {
        let key = |name: &str| format!("{arch}.{name}");
        let count = |name: &str| -> Result<usize> {
            let key = key(name);
            meta(file, &key)?
                .as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    anyhow!(
                        "metadata `{key}` must be a positive integer (one value for all layers)"
                    )
                })
        };
        let float = |name: &str| -> Result<Option<f64>> {
            let key = key(name);
            file.get(&key)
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| anyhow!("metadata `{key}` is {v:?}, not a float"))
                })
                .transpose()
        };
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        let kv_heads = match file.get(&key("attention.head_count_kv")) {
            Some(_) => count("attention.head_count_kv")?,
            None => heads,
        };
        let head_dim = match file.get(&key("attention.key_length")) {
            Some(_) => count("attention.key_length")?,
            None => hidden / heads,
        };
        if let Some(rot) = file.get(&key("rope.dimension_count")) {
            if rot.as_u64() != Some(head_dim as u64) {
                bail!("{arch}.rope.dimension_count is {rot:?} but the head size is {head_dim}: partial rotary embeddings are not supported");
            }
        }
        let rope_scaling = match file.get(&key("rope.scaling.type")).map(MetaValue::as_str) {
            None | Some(Some("none")) => Value::Null,
            Some(Some("linear")) => {
                let factor = float("rope.scaling.factor")?.ok_or_else(|| {
                    anyhow!("{arch}.rope.scaling.type is linear but {arch}.rope.scaling.factor is missing")
                })?;
                json!({"rope_type": "linear", "factor": shortest(factor)})
            }
            Some(other) => bail!(
                "{arch}.rope.scaling.type {other:?} is not supported; import-gguf converts `none` and `linear`"
            ),
        };
        Ok(Hparams {
            arch: arch.to_string(),
            family,
            hidden,
            intermediate: count("feed_forward_length")?,
            layers: count("block_count")?,
            heads,
            kv_heads,
            head_dim,
            context_length: match file.get(&key("context_length")) {
                Some(_) => count("context_length")?,
                None => 2048,
            },
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?
                .map(shortest)
                .unwrap_or(1e-5),
            rope_theta: float("rope.freq_base")?.map(shortest).unwrap_or(1e4),
            rope_scaling,
        })
    }
}

/// GGUF stores these floats as f32: write the shortest decimal that reads back as the same f32
/// (1e-05, not 9.999999747378752e-06), as the Hugging Face config had it.
fn shortest(v: f64) -> f64 {
    (v as f32).to_string().parse().unwrap_or(v)
}

fn meta<'a>(file: &'a GgufFile, key: &str) -> Result<&'a MetaValue> {
    file.get(key).ok_or_else(|| {
        anyhow!(
            "metadata `{key}` is missing (llama.cpp's converter writes it for every model of the architecture)"
        )
    })
}

/// Every GGUF tensor, dequantized, renamed and un-permuted: HF name → (HF shape, f32 values).
type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn convert_tensors(
    file: &GgufFile,
    hp: &Hparams,
) -> Result<(Tensors, BTreeMap<&'static str, usize>)> {
    let mut tensors = HashMap::new();
    let mut types = BTreeMap::new();
    for info in &file.tensors {
        if info.name == "rope_freqs.weight" {
            bail!(
                "{} has rope_freqs.weight (Llama 3.1-style rope scaling): the GGUF keeps only the \
                 resulting frequency factors, not the `rope_scaling` parameters config.json needs, so \
                 import-gguf cannot convert it; use the original Hugging Face checkpoint",
                file.path.display()
            );
        }
        let permuted = hp.arch == "llama";
        let (name, rows) =
            hf_name(&info.name, hp.heads, hp.kv_heads, permuted).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{}` has no Hugging Face {} counterpart that import-gguf knows \
                     (it maps token_embd, output_norm, output and blk.N.{{attn_norm, attn_q, attn_k, attn_v, \
                     attn_output, attn_q_norm, attn_k_norm, ffn_norm, ffn_gate, ffn_up, ffn_down}})",
                    file.path.display(),
                    info.name,
                    hp.family.hf_name()
                )
            })?;
        *types.entry(file.tensor_type(info).name()).or_insert(0) += 1;
        let values = file.dequantize(info)?;
        let shape = info.hf_shape();
        let values = match rows {
            Rows::AsStored => values,
            Rows::RopePermuted { heads } => {
                if shape.is_empty() || shape.len() > 2 || shape[0] != heads * hp.head_dim {
                    bail!(
                        "{}: tensor `{}` has shape {shape:?}; expected {heads} heads × {} rows",
                        file.path.display(),
                        info.name,
                        hp.head_dim
                    );
                }
                // A bias `[rows]` is one column.
                unpermute_rows(&values, heads, shape.get(1).copied().unwrap_or(1))
            }
        };
        tensors.insert(name, (shape, values));
    }
    Ok((tensors, types))
}

/// The tensors are exactly those the model description lists for `config`, with their shapes.
fn check_complete(tensors: &Tensors, config: &Value, hp: &Hparams, tied: bool) -> Result<()> {
    let described = ModelConfig::from_json(config.clone())?;
    let expected = described.tensor_shapes(tied);
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => bail!(
                "tensor `{name}` is missing (the metadata declares a {}-layer {} model)",
                hp.layers,
                hp.family.hf_name()
            ),
            Some((s, _)) if s != shape => {
                bail!("tensor `{name}` has shape {s:?}, expected {shape:?} from the metadata")
            }
            Some(_) => {}
        }
    }
    if tensors.len() != expected.len() {
        bail!(
            "the file has {} tensors but a {}-layer model has {}: it holds layers beyond {}.block_count",
            tensors.len(),
            hp.layers,
            expected.len(),
            hp.arch
        );
    }
    Ok(())
}

/// The config.json transformers writes for the family (Qwen's per-layer windows off, no biases
/// beyond the family's own).
fn config_json(hp: &Hparams, vocab_size: usize, tied: bool, special: &SpecialIds) -> Value {
    let mut config = json!({
        "architectures": [hp.family.hf_class],
        "model_type": hp.family.model_type,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context_length,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": hp.rope_scaling,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": "bfloat16",
        "use_cache": true,
    });
    let family_keys = match hp.arch.as_str() {
        "llama" => json!({"attention_bias": false, "mlp_bias": false}),
        "qwen3" => json!({"attention_bias": false, "use_sliding_window": false}),
        _ => json!({"use_sliding_window": false}),
    };
    if let (Value::Object(c), Value::Object(extra)) = (&mut config, family_keys) {
        c.extend(extra);
    }
    config
}

fn generation_config(special: &SpecialIds) -> Value {
    json!({
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes the tensors as bf16 (round to nearest even) safetensors, atomically.
fn write_bf16_safetensors(path: &Path, tensors: &Tensors) -> Result<()> {
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            let b = values
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect();
            (name, shape, b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, b)| {
            Ok((
                name.to_string(),
                TensorView::new(safetensors::Dtype::BF16, shape.to_vec(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(meta))
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    write_atomic(path, &data)
}
