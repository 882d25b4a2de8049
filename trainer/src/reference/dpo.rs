//! The `dpo` reference case (tests/fixtures/README.md §5): policy and reference log-probabilities
//! of chosen and rejected completions, the DPO logits, losses and rewards, and the adapter
//! gradients of the mean loss, computed by the training step itself ([`dpo_micro_step`]).
//! The batch's rows are `[prompt_k + chosen_k for k < P] ++ [prompt_k + rejected_k for k < P]`.

use super::sft::{Inputs, REL_TOL};
use super::Comparison;
use crate::lora::{peft, LoraParams};
use crate::model::weights::{to_i64, WeightFiles};
use crate::model::{next_token_targets, Batch, CheckpointPolicy, Decoder, ModelConfig, NoHooks};
use crate::train::config::LossType;
use crate::train::dpo::{dpo_micro_step, DpoLoss, PairResult};
use crate::train::method::StepContext;
use crate::train::pairs::{pair_logps, sequence_logps, TargetSequences};
use anyhow::{anyhow, bail, Context, Result};
use kernels::{Backend, IGNORE_INDEX};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn loss_from_case(case: &Value) -> Result<DpoLoss> {
    let d = case
        .get("dpo")
        .ok_or_else(|| anyhow!("case.json has no `dpo` object"))?;
    let kind: LossType = match d.get("loss_type") {
        None => LossType::Sigmoid,
        Some(v) => serde_json::from_value(v.clone())
            .with_context(|| format!("case.json dpo.loss_type {v}"))?,
    };
    Ok(DpoLoss {
        kind,
        beta: d
            .get("beta")
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("case.json dpo.beta is missing"))?,
        label_smoothing: d
            .get("label_smoothing")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
    })
}

fn completion_mask(path: &Path) -> Result<Vec<i64>> {
    let files = WeightFiles::open_file(path)?;
    let (_, dtype) = files.info("completion_mask")?;
    let (_, bytes) = files.bytes("completion_mask")?;
    to_i64(dtype, &bytes)
}

/// A preference case's model, adapter and batch: `input_ids` rows `[chosen rows, rejected rows]`
/// with labels on the `completion_mask` positions; sequence `2k` / `2k + 1` is pair `k`'s
/// chosen / rejected row.
pub(super) struct PairCase<B: Backend> {
    pub decoder: Decoder<B>,
    pub lora: LoraParams<B>,
    pub batch: Batch<B>,
    pub seqs: TargetSequences,
    pub pairs: usize,
}

pub(super) fn load_pair_case<B: Backend>(be: &B, dir: &Path) -> Result<PairCase<B>> {
    let model_dir = dir.join("model");
    let config = ModelConfig::load(&model_dir)?;
    let decoder = Decoder::load(be, config.clone(), &WeightFiles::open(&model_dir)?)
        .with_context(|| format!("loading the model in {}", model_dir.display()))?;
    let inputs_path = dir.join("inputs.safetensors");
    let mut inputs = Inputs::load(&inputs_path)?;
    let mask = completion_mask(&inputs_path)?;
    if mask.len() != inputs.ids.len() || inputs.rows % 2 != 0 {
        bail!(
            "{}: completion_mask must have the shape of input_ids, with an even number of rows (chosen rows, then rejected rows)",
            inputs_path.display()
        );
    }
    inputs.labels = inputs
        .ids
        .iter()
        .zip(&mask)
        .map(|(&id, &m)| if m == 1 { id } else { IGNORE_INDEX })
        .collect();
    let pairs = inputs.rows / 2;
    let layout = inputs.layout(config.sliding_window)?;
    let targets = next_token_targets(&inputs.labels, &layout);
    // Row r < P is pair r's chosen sequence (2r); row P + k is pair k's rejected one (2k + 1).
    let seq_of_position: Vec<i32> = (0..inputs.ids.len())
        .map(|i| {
            let r = i / inputs.cols;
            if r < pairs {
                2 * r as i32
            } else {
                2 * (r - pairs) as i32 + 1
            }
        })
        .collect();
    let seqs = TargetSequences::new(&targets, &seq_of_position, pairs);
    let batch = Batch::new(be, &config, &inputs.ids, &inputs.labels, layout)?;
    let lora = peft::load(be, &config, &dir.join("adapter"))?;
    Ok(PairCase {
        decoder,
        lora,
        batch,
        seqs,
        pairs,
    })
}

/// The step of the reference cases: one micro-batch, f32, no loss scaling, no checkpointing.
pub(super) const ONE_STEP: StepContext<'static> = StepContext {
    totals: &[],
    loss_scale: 1.0,
    checkpointing: CheckpointPolicy::OFF,
};

pub fn run<B: Backend>(be: &B, dir: &Path, case: &Value) -> Result<BTreeMap<String, Comparison>> {
    let loss = loss_from_case(case)?;
    let PairCase {
        decoder,
        mut lora,
        batch,
        seqs,
        pairs,
    } = load_pair_case(be, dir)?;
    let reference = pair_logps(&sequence_logps(be, &decoder, None, &batch, &seqs)?.0);
    let results = dpo_micro_step(
        be,
        &decoder,
        &mut lora,
        &batch,
        &seqs,
        &reference,
        &loss,
        1.0 / pairs as f64,
        ONE_STEP,
        &mut NoHooks,
    )?;

    let rel = |got: Vec<f64>| Comparison::Relative {
        got,
        tol: REL_TOL,
        mask: None,
    };
    let per_pair = |f: &dyn Fn(&PairResult) -> f64| rel(results.iter().map(f).collect());
    let mut out = BTreeMap::new();
    out.insert("policy_chosen_logps".into(), per_pair(&|r| r.policy.chosen));
    out.insert(
        "policy_rejected_logps".into(),
        per_pair(&|r| r.policy.rejected),
    );
    out.insert(
        "reference_chosen_logps".into(),
        per_pair(&|r| r.reference.chosen),
    );
    out.insert(
        "reference_rejected_logps".into(),
        per_pair(&|r| r.reference.rejected),
    );
    out.insert("logits_z".into(), per_pair(&|r| r.z));
    out.insert("losses".into(), per_pair(&|r| r.loss));
    out.insert("chosen_rewards".into(), per_pair(&|r| r.chosen_reward));
    out.insert("rejected_rewards".into(), per_pair(&|r| r.rejected_reward));
    out.insert(
        "loss".into(),
        rel(vec![
            results.iter().map(|r| r.loss).sum::<f64>() / pairs as f64,
        ]),
    );
    insert_grads(be, &lora, &mut out)?;
    Ok(out)
}

/// `grad/<key>` of every adapter tensor.
pub(super) fn insert_grads<B: Backend>(
    be: &B,
    lora: &LoraParams<B>,
    out: &mut BTreeMap<String, Comparison>,
) -> Result<()> {
    for (name, g) in lora.names.iter().zip(&lora.grads) {
        out.insert(
            format!("grad/{name}"),
            Comparison::Relative {
                got: be.download(g)?.into_iter().map(f64::from).collect(),
                tol: REL_TOL,
                mask: None,
            },
        );
    }
    Ok(())
}
