//! The `sft` (and shared part of other) reference cases: logits and losses with and without the
//! adapter, LoRA gradients, and two clipped AdamW steps, as tests/fixtures/README.md §4 defines them.

use super::Comparison;
use crate::lora::{peft, LoraParams};
use crate::model::weights::{to_i64, WeightFiles};
use crate::model::{Batch, CheckpointPolicy, Decoder, ModelConfig};
use crate::optim::{clip_coefficient, AdamW, UpdateTiming};
use anyhow::{anyhow, bail, Context, Result};
use kernels::{AdamWParams, AttentionLayout, Backend, CeGrad};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Logits, losses, gradients: ≤ 1e-4 relative (fixtures README §7).
pub const REL_TOL: f64 = 1e-4;
/// Optimizer results: 1e-6 absolute, leaving out elements whose clipped gradient is below 1e-6
/// (there Adam's first step is lr·g/(|g|+eps), ill-conditioned; README §7).
const UPDATE_TOL: f64 = 1e-6;
const ILL_CONDITIONED: f64 = 1e-6;

/// An `[rows, cols]` integer input of the case.
pub struct Inputs {
    pub ids: Vec<i32>,
    pub mask: Vec<i32>,
    pub labels: Vec<i32>,
    pub rows: usize,
    pub cols: usize,
}

impl Inputs {
    pub fn load(path: &Path) -> Result<Self> {
        let files = WeightFiles::open_file(path)?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<i32>)> {
            let (shape, dtype) = files.info(name)?;
            let (_, bytes) = files.bytes(name)?;
            Ok((
                shape,
                to_i64(dtype, &bytes)?
                    .into_iter()
                    .map(|x| x as i32)
                    .collect(),
            ))
        };
        let (shape, ids) = read("input_ids")?;
        if shape.len() != 2 {
            bail!(
                "input_ids in {} must be [batch, seq], found {shape:?}",
                path.display()
            );
        }
        let mask = if files.contains("attention_mask") {
            read("attention_mask")?.1
        } else {
            vec![1; ids.len()]
        };
        let labels = if files.contains("labels") {
            read("labels")?.1
        } else {
            ids.clone()
        };
        Ok(Inputs {
            ids,
            mask,
            labels,
            rows: shape[0],
            cols: shape[1],
        })
    }

    /// The attention layout transformers uses for this mask in a plain forward call: positions
    /// `0..T-1`, padding keys hidden. Each row's ones must be one contiguous run.
    pub fn layout(&self, window: Option<usize>) -> Result<AttentionLayout> {
        let t = self.cols;
        let mut doc_start = vec![0i32; self.ids.len()];
        for r in 0..self.rows {
            let row = &self.mask[r * t..][..t];
            let first = row.iter().position(|&m| m == 1).unwrap_or(t);
            let last = row.iter().rposition(|&m| m == 1).map_or(0, |p| p + 1);
            if row[first..last].iter().any(|&m| m != 1) {
                bail!("attention_mask row {r} has gaps: only left or right padding is supported");
            }
            for c in 0..t {
                doc_start[r * t + c] = if (first..last).contains(&c) {
                    first as i32
                } else {
                    c as i32
                };
            }
        }
        let positions = (0..self.ids.len()).map(|i| (i % t) as i32).collect();
        Ok(AttentionLayout {
            rows: self.rows,
            seq_len: t,
            doc_start,
            positions,
            window,
        })
    }
}

fn optimizer_from_case(case: &Value) -> Result<(AdamWParams, f32)> {
    let o = case
        .get("optimizer")
        .ok_or_else(|| anyhow!("case.json has no `optimizer` object"))?;
    let num = |k: &str| {
        o.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("case.json optimizer.{k} is missing"))
    };
    let betas = o
        .get("betas")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("case.json optimizer.betas is missing"))?;
    let beta = |i: usize| {
        betas
            .get(i)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("optimizer.betas needs two numbers"))
    };
    let hp = AdamWParams {
        lr: num("lr")?,
        beta1: beta(0)?,
        beta2: beta(1)?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
    };
    Ok((hp, num("max_grad_norm")? as f32))
}

/// Everything a model case computes. `adapter` may be absent (base-only cases).
pub fn run<B: Backend>(be: &B, dir: &Path, case: &Value) -> Result<BTreeMap<String, Comparison>> {
    let sub = |key: &str, default: &str| {
        dir.join(
            case.get(key)
                .and_then(|m| m.get("dir"))
                .and_then(Value::as_str)
                .unwrap_or(default),
        )
    };
    let model_dir = sub("model", "model");
    let config = ModelConfig::load(&model_dir)?;
    let decoder = Decoder::load(be, config.clone(), &WeightFiles::open(&model_dir)?)
        .with_context(|| format!("loading the model in {}", model_dir.display()))?;
    let inputs = Inputs::load(&dir.join("inputs.safetensors"))?;
    let batch = Batch::new(
        be,
        &config,
        &inputs.ids,
        &inputs.labels,
        inputs.layout(config.sliding_window)?,
    )?;
    if batch.n_targets == 0 {
        bail!("the case's labels leave no token to predict");
    }
    let n_tok = batch.n_targets as f64;
    let vocab = config.vocab_size;
    let logit_mask: Vec<bool> = inputs
        .mask
        .iter()
        .flat_map(|&m| std::iter::repeat_n(m == 1, vocab))
        .collect();
    let mut out = BTreeMap::new();
    let rel = |got: Vec<f32>| Comparison::Relative {
        got: got.into_iter().map(f64::from).collect(),
        tol: REL_TOL,
        mask: None,
    };

    // Base model.
    let acts = decoder.forward(be, None, &batch, CheckpointPolicy::OFF)?;
    let logits = be.download(&decoder.logits(be, &acts)?)?;
    let (logp, _) = decoder.head(be, &acts, &batch.targets, CeGrad::None)?;
    let base_loss = -be.download(&logp)?.iter().map(|&x| x as f64).sum::<f64>() / n_tok;
    out.insert(
        "base_logits".into(),
        Comparison::Relative {
            got: logits.iter().map(|&x| x as f64).collect(),
            tol: REL_TOL,
            mask: Some(logit_mask.clone()),
        },
    );
    out.insert(
        "base_loss".into(),
        Comparison::Relative {
            got: vec![base_loss],
            tol: REL_TOL,
            mask: None,
        },
    );

    let adapter_dir = sub("adapter", "adapter");
    if !adapter_dir.exists() {
        return Ok(out);
    }
    let mut lora: LoraParams<B> = peft::load(be, &config, &adapter_dir)?;
    let acts = decoder.forward(be, Some(&lora), &batch, CheckpointPolicy::OFF)?;
    let logits = be.download(&decoder.logits(be, &acts)?)?;
    out.insert(
        "lora_logits".into(),
        Comparison::Relative {
            got: logits.iter().map(|&x| x as f64).collect(),
            tol: REL_TOL,
            mask: Some(logit_mask),
        },
    );
    let lora_loss = decoder.loss_and_grad(
        be,
        Some(&mut lora),
        &batch,
        CheckpointPolicy::OFF,
        (1.0 / n_tok) as f32,
    )? / n_tok;
    out.insert(
        "lora_loss".into(),
        Comparison::Relative {
            got: vec![lora_loss],
            tol: REL_TOL,
            mask: None,
        },
    );
    let grads1 = download_all(be, &lora.grads)?;
    for (name, g) in lora.names.iter().zip(&grads1) {
        out.insert(format!("lora_grad/{name}"), rel(g.clone()));
    }
    if case.get("optimizer").is_none() {
        return Ok(out);
    }

    // Two optimizer steps on the same batch, as the case's optimizer section says.
    let (hp, max_norm) = optimizer_from_case(case)?;
    let mut opt = AdamW::new(be, &lora, hp, Some(max_norm))?;
    let stats = opt.step(be, &mut lora, hp.lr, UpdateTiming::Now)?;
    out.insert("step1_grad_norm".into(), rel(vec![stats.grad_norm]));
    out.insert(
        "step1_clip_coef".into(),
        rel(vec![clip_coefficient(stats.grad_norm, max_norm)]),
    );
    let well_conditioned: Vec<Vec<bool>> = grads1
        .iter()
        .map(|g| {
            g.iter()
                .map(|&x| ((x * stats.clip_coef) as f64).abs() >= ILL_CONDITIONED)
                .collect()
        })
        .collect();
    for (k, (name, p)) in lora
        .names
        .iter()
        .zip(download_all(be, &lora.params)?)
        .enumerate()
    {
        out.insert(
            format!("step1_clipped_grad/{name}"),
            rel(grads1[k].iter().map(|x| x * stats.clip_coef).collect()),
        );
        let mask = well_conditioned[k].clone();
        out.insert(
            format!("step1_updated/{name}"),
            Comparison::Absolute {
                got: p.iter().map(|&x| x as f64).collect(),
                tol: UPDATE_TOL,
                mask: Some(mask),
            },
        );
    }
    lora.zero_grads(be)?;
    let step2_loss = decoder.loss_and_grad(
        be,
        Some(&mut lora),
        &batch,
        CheckpointPolicy::OFF,
        (1.0 / n_tok) as f32,
    )? / n_tok;
    out.insert(
        "step2_loss".into(),
        Comparison::Relative {
            got: vec![step2_loss],
            tol: REL_TOL,
            mask: None,
        },
    );
    let grads2 = download_all(be, &lora.grads)?;
    for (name, g) in lora.names.iter().zip(&grads2) {
        out.insert(format!("step2_grad/{name}"), rel(g.clone()));
    }
    let stats2 = opt.step(be, &mut lora, hp.lr, UpdateTiming::Now)?;
    out.insert("step2_grad_norm".into(), rel(vec![stats2.grad_norm]));
    for (k, (name, p)) in lora
        .names
        .iter()
        .zip(download_all(be, &lora.params)?)
        .enumerate()
    {
        let mask: Vec<bool> = well_conditioned[k]
            .iter()
            .zip(&grads2[k])
            .map(|(&ok1, &g2)| ok1 && ((g2 * stats2.clip_coef) as f64).abs() >= ILL_CONDITIONED)
            .collect();
        out.insert(
            format!("step2_updated/{name}"),
            Comparison::Absolute {
                got: p.iter().map(|&x| x as f64).collect(),
                tol: UPDATE_TOL,
                mask: Some(mask),
            },
        );
    }
    Ok(out)
}

fn download_all<B: Backend>(be: &B, ts: &[B::Tensor]) -> Result<Vec<Vec<f32>>> {
    ts.iter().map(|t| Ok(be.download(t)?)).collect()
}
