//! The `orpo` reference case (tests/fixtures/README.md §5.1): mean completion log-probabilities
//! of chosen and rejected rows, the log odds, `log σ(log odds)`, the NLL of the chosen
//! completions, the loss and rewards, and the adapter gradients of the loss — computed by the
//! training step itself ([`orpo_micro_step`]) on the batch layout of the DPO case.

use super::dpo::{insert_grads, load_pair_case, PairCase, ONE_STEP};
use super::sft::REL_TOL;
use super::Comparison;
use crate::model::NoHooks;
use crate::train::method::Sums;
use crate::train::orpo::{orpo_micro_step, OrpoPair, OrpoSums};
use anyhow::{anyhow, Result};
use kernels::Backend;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub fn run<B: Backend>(be: &B, dir: &Path, case: &Value) -> Result<BTreeMap<String, Comparison>> {
    let beta = case
        .get("orpo")
        .and_then(|o| o.get("beta"))
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("case.json orpo.beta is missing"))?;
    let PairCase {
        decoder,
        mut lora,
        batch,
        seqs,
        pairs,
    } = load_pair_case(be, dir)?;
    let chosen_tokens = seqs.seq.iter().filter(|&&s| s >= 0 && s % 2 == 0).count();
    let (results, nll) = orpo_micro_step(
        be,
        &decoder,
        &mut lora,
        &batch,
        &seqs,
        beta,
        pairs as u64,
        chosen_tokens as u64,
        ONE_STEP,
        &mut NoHooks,
    )?;
    let sums = OrpoSums::of(beta, &results, nll, chosen_tokens, 0);
    let rel = |got: Vec<f64>| Comparison::Relative {
        got,
        tol: REL_TOL,
        mask: None,
    };
    let per_pair = |f: &dyn Fn(&OrpoPair) -> f64| rel(results.iter().map(f).collect());
    let mut out = BTreeMap::new();
    out.insert(
        "policy_chosen_avg_logps".into(),
        per_pair(&|p| p.chosen_avg_logp),
    );
    out.insert(
        "policy_rejected_avg_logps".into(),
        per_pair(&|p| p.rejected_avg_logp),
    );
    out.insert("log_odds".into(), per_pair(&|p| p.log_odds));
    out.insert("log_odds_ratio".into(), per_pair(&|p| p.log_odds_ratio));
    out.insert(
        "chosen_rewards".into(),
        per_pair(&|p| beta * p.chosen_avg_logp),
    );
    out.insert(
        "rejected_rewards".into(),
        per_pair(&|p| beta * p.rejected_avg_logp),
    );
    out.insert("nll_loss".into(), rel(vec![sums.nll_loss()]));
    out.insert("loss".into(), rel(vec![sums.loss()]));
    insert_grads(be, &lora, &mut out)?;
    Ok(out)
}
