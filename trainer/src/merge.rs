//! Merging an adapter into its base model: every adapted projection becomes `W' = W + s · B A`
//! (computed in f32, stored in the base's dtype), everything else is copied; the result is a
//! Hugging Face folder (sharded with an index above 5 GB, like `save_pretrained`) with the base's
//! config, generation config and tokenizer files.
//!
//! A bitsandbytes 4-bit base (QLoRA) cannot take a merge and stay exact in 4 bits, so its
//! projections are dequantized, merged and written dense in `bnb_4bit_compute_dtype` (bf16 when
//! absent), and `quantization_config` is dropped from the config: the result is a plain checkpoint.

use crate::arch::{ModelConfig, Projection};
use crate::io::write_atomic;
use crate::lora::{peft, LoraParams, LoraSlot};
use crate::model::bnb_checkpoint::{quantization_of, read_nf4};
use crate::weights::{to_f32, WeightFiles};
use anyhow::{bail, Context, Result};
use kernels::cpu::{gemm_f32, CpuBackend};
use kernels::DType;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor as written: name, shape, dtype and little-endian bytes.
type StoredTensor = (String, Vec<usize>, Dtype, Vec<u8>);

/// Shards are cut before they pass this many bytes (transformers' default `max_shard_size`).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Suffixes of the tensors that hold a bitsandbytes weight's quantization state.
const QUANT_STATE_SUFFIXES: &[&str] = &[
    ".absmax",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_map",
    ".quant_state.bitsandbytes__nf4",
];

const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
];

fn encode(values: &[f32], dtype: Dtype) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        other => bail!("cannot write tensors of dtype {other:?}"),
    })
}

/// What [`merge`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct MergeSummary {
    /// Adapted projections merged.
    pub merged: usize,
    /// For a 4-bit base: the dtype its dequantized projections were written in.
    pub dequantized_to: Option<Dtype>,
}

/// A base model's tensors with an adapter merged, produced one at a time: adapted projections as
/// `W + s · B A` (f32 arithmetic, stored in the base's dtype), 4-bit projections dequantized to
/// their compute dtype, everything else as stored. `merge` writes them to safetensors,
/// `export-gguf` to GGUF.
pub struct MergedTensors {
    pub config: ModelConfig,
    files: WeightFiles,
    lora: Option<LoraParams<CpuBackend>>,
    /// module weight name → LoRA slot
    deltas: BTreeMap<String, LoraSlot>,
    /// projection weight name → [out, in]
    proj_shapes: BTreeMap<String, [usize; 2]>,
    /// For a 4-bit base: the dtype its dequantized projections are written in.
    pub dequantized_to: Option<Dtype>,
}

impl MergedTensors {
    /// Opens `base` and, when given, the PEFT adapter to merge into it.
    pub fn open(base: &Path, adapter: Option<&Path>) -> Result<Self> {
        let config = ModelConfig::load(base)?;
        let files = WeightFiles::open(base)?;
        let lora: Option<LoraParams<CpuBackend>> = adapter
            .map(|dir| peft::load(&CpuBackend::new(), &config, dir))
            .transpose()?;
        let dequantized_to = quantization_of(&config.raw)?.map(|q| match q.compute_dtype {
            Some(DType::F32) => Dtype::F32,
            Some(DType::F16) => Dtype::F16,
            _ => Dtype::BF16,
        });
        let mut deltas = BTreeMap::new();
        let mut proj_shapes = BTreeMap::new();
        for layer in 0..config.num_layers {
            for p in Projection::ALL {
                let name = p.weight_name(layer);
                if let Some(slot) = lora.as_ref().and_then(|l| l.slot(layer, p)) {
                    deltas.insert(name.clone(), slot);
                }
                let (o, i) = p.shape(&config);
                proj_shapes.insert(name, [o, i]);
            }
        }
        Ok(Self {
            config,
            files,
            lora,
            deltas,
            proj_shapes,
            dequantized_to,
        })
    }

    /// Adapted projections.
    pub fn merged(&self) -> usize {
        self.deltas.len()
    }

    /// The model's tensor names, sorted, without a 4-bit base's quantization state.
    pub fn names(&self) -> Vec<String> {
        self.files
            .names()
            .filter(|name| {
                self.dequantized_to.is_none()
                    || self.is_quantized(name)
                    || !QUANT_STATE_SUFFIXES.iter().any(|s| name.ends_with(s))
            })
            .map(str::to_string)
            .collect()
    }

    fn is_quantized(&self, name: &str) -> bool {
        self.dequantized_to.is_some()
            && self
                .files
                .contains(&format!("{name}.quant_state.bitsandbytes__nf4"))
    }

    /// A tensor's shape (a 4-bit projection's dense `[out, in]`).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if self.is_quantized(name) {
            if let Some(&[o, i]) = self.proj_shapes.get(name) {
                return Ok(vec![o, i]);
            }
        }
        Ok(self.files.info(name)?.0)
    }

    /// A tensor's shape, dtype and little-endian bytes, merged.
    pub fn tensor(&self, name: &str) -> Result<(Vec<usize>, Dtype, Vec<u8>)> {
        let (mut shape, mut dtype) = self.files.info(name)?;
        let (_, mut raw) = self.files.bytes(name)?;
        if let (true, Some(dense)) = (self.is_quantized(name), self.dequantized_to) {
            let [o, i] = *self.proj_shapes.get(name).with_context(|| {
                format!("`{name}` is 4-bit but not a q/k/v/o/gate/up/down projection; fuselora cannot merge it")
            })?;
            let w = read_nf4(&self.files, name, [o, i])?.dequantize();
            (shape, dtype, raw) = (vec![o, i], dense, encode(&w, dense)?);
        }
        let (Some(slot), Some(lora)) = (self.deltas.get(name), &self.lora) else {
            return Ok((shape, dtype, raw));
        };
        let mut w = to_f32(dtype, &raw).with_context(|| format!("tensor `{name}`"))?;
        let (out_f, in_f) = (shape[0], shape[1]);
        // W' = W + s · B [out, r] · A [r, in]
        gemm_f32(
            out_f,
            in_f,
            slot.rank,
            slot.scaling,
            &lora.params[slot.a + 1],
            false,
            &lora.params[slot.a],
            false,
            1.0,
            &mut w,
        );
        Ok((shape, dtype, encode(&w, dtype)?))
    }
}

/// Writes `base` + `adapter` merged into `out`.
pub fn merge(
    base: &Path,
    adapter: &Path,
    out: &Path,
    max_shard_bytes: usize,
) -> Result<MergeSummary> {
    let merged = MergedTensors::open(base, Some(adapter))?;
    let (config, dequantized_to) = (&merged.config, merged.dequantized_to);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut shards: Vec<Vec<StoredTensor>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total_bytes = 0usize;
    for name in merged.names() {
        let (shape, dtype, bytes) = merged.tensor(&name)?;
        if shard_bytes + bytes.len() > max_shard_bytes && shard_bytes > 0 {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes.len();
        total_bytes += bytes.len();
        shards
            .last_mut()
            .unwrap()
            .push((name.clone(), shape, dtype, bytes));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let views = shard
            .iter()
            .map(|(name, shape, dtype, bytes)| {
                Ok((
                    name.clone(),
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        write_atomic(
            &out.join(&file),
            &safetensors::serialize(views, Some(meta))?,
        )?;
        for (name, ..) in shard {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        write_atomic(
            &out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    let mut config_json = config.raw.clone();
    if let (Some(dense), Some(obj)) = (dequantized_to, config_json.as_object_mut()) {
        obj.remove("quantization_config");
        let name = match dense {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            _ => "bfloat16",
        };
        obj.insert("torch_dtype".into(), name.into());
        write_atomic(
            &out.join("config.json"),
            serde_json::to_string_pretty(&config_json)?.as_bytes(),
        )?;
    }
    for f in COPIED_FILES {
        let src = base.join(f);
        let rewritten = dequantized_to.is_some() && *f == "config.json";
        if src.exists() && !rewritten {
            write_atomic(
                &out.join(f),
                &std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?,
            )?;
        }
    }
    Ok(MergeSummary {
        merged: merged.merged(),
        dequantized_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, CheckpointPolicy, Decoder};
    use crate::reference::sft::Inputs;
    use kernels::Backend;
    use std::path::PathBuf;

    fn fixture(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(p)
    }

    fn expected_lora_logits(case: &str) -> Vec<f32> {
        let f = WeightFiles::open_file(&fixture(&format!("{case}/expected.safetensors"))).unwrap();
        f.f32("lora_logits", &[2, 24, 320]).unwrap()
    }

    /// The merged model's logits on `case`'s inputs, and the inputs' attention mask.
    fn merged_logits(dir: &Path, case: &str) -> (Vec<f32>, Vec<i32>) {
        let be = CpuBackend::new();
        let config = ModelConfig::load(dir).unwrap();
        let model = Decoder::load(&be, config.clone(), &WeightFiles::open(dir).unwrap()).unwrap();
        let inputs = Inputs::load(&fixture(&format!("{case}/inputs.safetensors"))).unwrap();
        let batch = Batch::new(
            &be,
            &config,
            &inputs.ids,
            &inputs.labels,
            inputs.layout(None).unwrap(),
        )
        .unwrap();
        let acts = model
            .forward(&be, None, &batch, CheckpointPolicy::OFF)
            .unwrap();
        (
            be.download(&model.logits(&be, &acts).unwrap()).unwrap(),
            inputs.mask,
        )
    }

    #[test]
    fn the_merged_model_gives_the_adapted_logits_in_one_or_many_shards() {
        let want = expected_lora_logits("tiny-llama");
        for max_shard in [MAX_SHARD_BYTES, 200_000] {
            let dir = tempfile::tempdir().unwrap();
            let merged = merge(
                &fixture("tiny-llama/model"),
                &fixture("tiny-llama/adapter"),
                dir.path(),
                max_shard,
            )
            .unwrap();
            assert_eq!(
                merged,
                MergeSummary {
                    merged: 21,
                    dequantized_to: None
                }
            );
            assert_eq!(
                dir.path().join("model.safetensors.index.json").exists(),
                max_shard < MAX_SHARD_BYTES
            );
            let (got, mask) = merged_logits(dir.path(), "tiny-llama");
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                if mask[i / 320] == 1 {
                    assert!((a - b).abs() / scale < 1e-4, "logit {i}: {a} vs {b}");
                }
            }
            assert!(dir.path().join("config.json").exists());
        }
    }

    #[test]
    fn a_4bit_base_is_dequantized_and_written_dense_in_its_compute_dtype() {
        let want = expected_lora_logits("tiny-llama-qlora");
        let dir = tempfile::tempdir().unwrap();
        let summary = merge(
            &fixture("tiny-llama-qlora/model"),
            &fixture("tiny-llama-qlora/adapter"),
            dir.path(),
            MAX_SHARD_BYTES,
        )
        .unwrap();
        assert_eq!(
            summary,
            MergeSummary {
                merged: 21,
                dequantized_to: Some(Dtype::F32)
            }
        );
        let files = WeightFiles::open(dir.path()).unwrap();
        assert_eq!(files.names().count(), 3 * 9 + 3);
        assert_eq!(
            files.info("model.layers.0.mlp.down_proj.weight").unwrap(),
            (vec![64, 160], Dtype::F32)
        );
        let config = ModelConfig::load(dir.path()).unwrap();
        assert!(config.raw.get("quantization_config").is_none());
        let (got, mask) = merged_logits(dir.path(), "tiny-llama-qlora");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            if mask[i / 320] == 1 {
                assert!((a - b).abs() / scale < 1e-4, "logit {i}: {a} vs {b}");
            }
        }
    }

    /// Qwen2's q/k/v biases and Qwen3's q/k norms are copied unchanged beside the merged weights, and
    /// the merged model gives the adapted logits.
    #[test]
    fn qwen_biases_and_head_norms_are_carried_through() {
        for case in ["tiny-qwen2", "tiny-qwen3"] {
            let dir = tempfile::tempdir().unwrap();
            let base = fixture(&format!("{case}/model"));
            let summary = merge(
                &base,
                &fixture(&format!("{case}/adapter")),
                dir.path(),
                MAX_SHARD_BYTES,
            )
            .unwrap();
            assert_eq!(summary.merged, 21, "{case}");
            let (original, merged) = (
                WeightFiles::open(&base).unwrap(),
                WeightFiles::open(dir.path()).unwrap(),
            );
            let carried: Vec<&str> = original
                .names()
                .filter(|n| n.ends_with(".bias") || n.contains("_norm."))
                .collect();
            // Qwen2: q/k/v biases of 3 layers; Qwen3: q/k norms of 3 layers.
            assert_eq!(carried.len(), if case == "tiny-qwen2" { 9 } else { 6 });
            for name in carried {
                let (shape, _) = original.info(name).unwrap();
                assert_eq!(
                    merged.f32(name, &shape).unwrap(),
                    original.f32(name, &shape).unwrap(),
                    "{case} {name}"
                );
            }
            let want = expected_lora_logits(case);
            let (got, mask) = merged_logits(dir.path(), case);
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                if mask[i / 320] == 1 {
                    assert!((a - b).abs() / scale < 1e-4, "{case} logit {i}: {a} vs {b}");
                }
            }
        }
    }
}
