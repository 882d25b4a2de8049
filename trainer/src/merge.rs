//! Merging an adapter into its base model: every adapted projection becomes `W' = W + s · B A`
//! (computed in f32, stored in the base's dtype), everything else is copied; the result is a
//! Hugging Face folder (sharded with an index above 5 GB, like `save_pretrained`) with the base's
//! config, generation config and tokenizer files.

use crate::io::write_atomic;
use crate::lora::{peft, LoraParams};
use crate::model::weights::{to_f32, WeightFiles};
use crate::model::{ModelConfig, Projection};
use anyhow::{bail, Context, Result};
use kernels::cpu::{gemm_f32, CpuBackend};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// Shards are cut before they pass this many bytes (transformers' default `max_shard_size`).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

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

/// Writes `base` + `adapter` merged into `out`; returns the number of merged projections.
pub fn merge(base: &Path, adapter: &Path, out: &Path, max_shard_bytes: usize) -> Result<usize> {
    let config = ModelConfig::load(base)?;
    let files = WeightFiles::open(base)?;
    let be = CpuBackend::new();
    let lora: LoraParams<CpuBackend> = peft::load(&be, &config, adapter)?;
    // module weight name → (A, B, shape of A, scaling)
    let mut deltas = BTreeMap::new();
    for layer in 0..config.num_layers {
        for p in Projection::ALL {
            if let Some(slot) = lora.slot(layer, p) {
                deltas.insert(format!("{}.weight", p.module_path(layer)), slot);
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let names: Vec<String> = files.names().map(str::to_string).collect();
    let mut shards: Vec<Vec<(String, Vec<usize>, Dtype, Vec<u8>)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total_bytes = 0usize;
    for name in &names {
        let (shape, dtype) = files.info(name)?;
        let (_, raw) = files.bytes(name)?;
        let bytes = match deltas.get(name) {
            Some(slot) => {
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
                encode(&w, dtype)?
            }
            None => raw,
        };
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
    for f in COPIED_FILES {
        let src = base.join(f);
        if src.exists() {
            write_atomic(
                &out.join(f),
                &std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?,
            )?;
        }
    }
    Ok(deltas.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Batch, Decoder};
    use crate::reference::sft::Inputs;
    use kernels::Backend;
    use std::path::PathBuf;

    fn fixture(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(p)
    }

    fn expected_lora_logits() -> Vec<f32> {
        let f = WeightFiles::open_file(&fixture("tiny-llama/expected.safetensors")).unwrap();
        f.f32("lora_logits", &[2, 24, 320]).unwrap()
    }

    fn merged_logits(dir: &Path) -> (Vec<f32>, Vec<i32>) {
        let be = CpuBackend::new();
        let config = ModelConfig::load(dir).unwrap();
        let model = Decoder::load(&be, config.clone(), &WeightFiles::open(dir).unwrap()).unwrap();
        let inputs = Inputs::load(&fixture("tiny-llama/inputs.safetensors")).unwrap();
        let batch = Batch::new(
            &be,
            &config,
            &inputs.ids,
            &inputs.labels,
            inputs.layout(None).unwrap(),
        )
        .unwrap();
        let acts = model.forward(&be, None, &batch, false).unwrap();
        (
            be.download(&model.logits(&be, &acts).unwrap()).unwrap(),
            inputs.mask,
        )
    }

    #[test]
    fn the_merged_model_gives_the_adapted_logits_in_one_or_many_shards() {
        let want = expected_lora_logits();
        for max_shard in [MAX_SHARD_BYTES, 200_000] {
            let dir = tempfile::tempdir().unwrap();
            let merged = merge(
                &fixture("tiny-llama/model"),
                &fixture("tiny-llama/adapter"),
                dir.path(),
                max_shard,
            )
            .unwrap();
            assert_eq!(merged, 21);
            assert_eq!(
                dir.path().join("model.safetensors.index.json").exists(),
                max_shard < MAX_SHARD_BYTES
            );
            let (got, mask) = merged_logits(dir.path());
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                if mask[i / 320] == 1 {
                    assert!((a - b).abs() / scale < 1e-4, "logit {i}: {a} vs {b}");
                }
            }
            assert!(dir.path().join("config.json").exists());
        }
    }
}
