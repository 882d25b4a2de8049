//! Direct Preference Optimization (`[method] name = "dpo"`): the loss types, one micro-batch
//! step, and the metrics as TRL's `DPOTrainer` names them. The reference log-probabilities are
//! the same forward with the adapter off, per micro-batch or precomputed once
//! (`precompute_ref`, [`dpo_reference`]).
//!
//! For pair i, with sequence log-probabilities summed over completion tokens only,
//!   z_i = (logπ(chosen_i) − logπ(rejected_i)) − (logπ_ref(chosen_i) − logπ_ref(rejected_i))
//! and the loss is the mean over pairs of (TRL `DPOTrainer.dpo_loss`):
//!   sigmoid  L = −(1−ε)·log σ(βz) − ε·log σ(−βz)          DPO (Rafailov et al. 2023, eq. 7);
//!            with label smoothing ε > 0 it is conservative DPO (cDPO, Mitchell 2023)
//!   robust   L = (−(1−ε)·log σ(βz) + ε·log σ(−βz)) / (1−2ε)   rDPO (Chowdhury et al. 2024, eq. 8)
//!   ipo      L = (z − 1/(2β))²                              IPO (Azar et al. 2023, eq. 17); as in
//!            TRL the log-probabilities are then means over completion tokens, not sums.
//! The reference π_ref is the same base weights with the LoRA contribution switched off.
//!
//! The gradient: dL/dlogπ(chosen_i) = w·dL_i/dz and dL/dlogπ(rejected_i) = −w·dL_i/dz with
//! w = 1/(pairs in the whole optimizer step, all ranks). The LM head takes per-token weights for
//! d(−Σ weight·logp): every completion token of a chosen sequence gets −w·dL_i/dz, of a rejected
//! one +w·dL_i/dz (divided by the token count for ipo), every other token 0.
//! Rewards are β·(logπ − logπ_ref); accuracy counts pairs whose chosen reward beats the rejected one.

use super::config::{DpoSection, LossType, RunConfig};
use super::distributed::Distributed;
use super::dpo_reference;
use super::method::{LayerHook, Method, StepContext, Sums};
use super::pairs::{
    backward_from_sequences, log_sigmoid, pair_logps, reward_metrics, sequence_logps, sigmoid,
    PairLogps, PairMicroBatch, PreferenceData, TargetSequences,
};
use crate::lora::LoraParams;
use crate::model::{Batch, Decoder};
use anyhow::{bail, Result};
use kernels::Backend;

/// The loss and its hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct DpoLoss {
    pub kind: LossType,
    pub beta: f64,
    /// ε of cDPO / rDPO; 0 for plain DPO (ignored by ipo).
    pub label_smoothing: f64,
}

impl DpoLoss {
    /// `(L, dL/dz)` for one pair's `z` (the formulas at the top of this file).
    pub fn pair_loss(&self, z: f64) -> (f64, f64) {
        let (b, e) = (self.beta, self.label_smoothing);
        match self.kind {
            // d/dz −log σ(βz) = −β σ(−βz);  d/dz −log σ(−βz) = β σ(βz)
            LossType::Sigmoid => (
                -(1.0 - e) * log_sigmoid(b * z) - e * log_sigmoid(-b * z),
                -(1.0 - e) * b * sigmoid(-b * z) + e * b * sigmoid(b * z),
            ),
            LossType::Robust => (
                (-(1.0 - e) * log_sigmoid(b * z) + e * log_sigmoid(-b * z)) / (1.0 - 2.0 * e),
                (-(1.0 - e) * b * sigmoid(-b * z) - e * b * sigmoid(b * z)) / (1.0 - 2.0 * e),
            ),
            LossType::Ipo => {
                let d = z - 1.0 / (2.0 * b);
                (d * d, 2.0 * d)
            }
        }
    }

    /// Whether sequence log-probabilities are means over completion tokens (ipo) instead of sums.
    pub fn averages_tokens(&self) -> bool {
        self.kind == LossType::Ipo
    }
}

/// What one pair contributed: everything the metrics and the reference check need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairResult {
    pub policy: PairLogps,
    pub reference: PairLogps,
    pub z: f64,
    pub loss: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// Sums over pairs of the quantities TRL logs (sums, so ranks and micro-batches add them up).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoSums {
    pub pairs: f64,
    /// Completion tokens scored.
    pub tokens: f64,
    pub loss: f64,
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    pub correct: f64,
    pub policy_chosen: f64,
    pub policy_rejected: f64,
}

impl DpoSums {
    /// The sums of `results`, pairs that scored `tokens` completion tokens.
    pub fn of(results: &[PairResult], tokens: usize) -> DpoSums {
        let mut s = DpoSums {
            tokens: tokens as f64,
            ..DpoSums::default()
        };
        for r in results {
            s.pairs += 1.0;
            s.loss += r.loss;
            s.chosen_rewards += r.chosen_reward;
            s.rejected_rewards += r.rejected_reward;
            s.correct += f64::from(u8::from(r.chosen_reward > r.rejected_reward));
            s.policy_chosen += r.policy.chosen;
            s.policy_rejected += r.policy.rejected;
        }
        s
    }
}

impl Sums for DpoSums {
    fn to_values(&self) -> Vec<f64> {
        vec![
            self.pairs,
            self.tokens,
            self.loss,
            self.chosen_rewards,
            self.rejected_rewards,
            self.correct,
            self.policy_chosen,
            self.policy_rejected,
        ]
    }

    fn from_values(v: &[f64]) -> Self {
        DpoSums {
            pairs: v[0],
            tokens: v[1],
            loss: v[2],
            chosen_rewards: v[3],
            rejected_rewards: v[4],
            correct: v[5],
            policy_chosen: v[6],
            policy_rejected: v[7],
        }
    }

    /// The mean loss over the pairs.
    fn loss(&self) -> f64 {
        self.loss / self.pairs.max(1.0)
    }

    /// Means over the pairs, named as TRL logs them.
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        reward_metrics(
            self.pairs,
            [self.chosen_rewards, self.rejected_rewards],
            self.correct,
            [self.policy_chosen, self.policy_rejected],
        )
    }

    fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![("pairs", self.pairs as u64), ("tokens", self.tokens as u64)]
    }
}

/// The loss, rewards and `dL_i/dz` of every pair, from policy and reference log-probabilities
/// (sums) and each sequence's completion token count.
pub fn score_pairs(
    loss: &DpoLoss,
    policy: &[PairLogps],
    reference: &[PairLogps],
    counts: &[usize],
) -> Result<Vec<(PairResult, f64)>> {
    if policy.len() != reference.len() || counts.len() != 2 * policy.len() {
        bail!(
            "{} pairs of policy log-probabilities, {} of reference ones, {} sequence lengths",
            policy.len(),
            reference.len(),
            counts.len()
        );
    }
    let per_token = |x: f64, n: usize| {
        if loss.averages_tokens() {
            x / n.max(1) as f64
        } else {
            x
        }
    };
    Ok(policy
        .iter()
        .zip(reference)
        .enumerate()
        .map(|(k, (p, r))| {
            let (nc, nr) = (counts[2 * k], counts[2 * k + 1]);
            let pol = PairLogps {
                chosen: per_token(p.chosen, nc),
                rejected: per_token(p.rejected, nr),
            };
            let rf = PairLogps {
                chosen: per_token(r.chosen, nc),
                rejected: per_token(r.rejected, nr),
            };
            let z = (pol.chosen - pol.rejected) - (rf.chosen - rf.rejected);
            let (l, dz) = loss.pair_loss(z);
            let result = PairResult {
                policy: pol,
                reference: rf,
                z,
                loss: l,
                chosen_reward: loss.beta * (pol.chosen - rf.chosen),
                rejected_reward: loss.beta * (pol.rejected - rf.rejected),
            };
            (result, dz)
        })
        .collect())
}

/// Forward, DPO loss and backward for one micro-batch of pairs. `reference` holds the pairs'
/// summed reference log-probabilities (precomputed, or from [`sequence_logps`] with no adapter);
/// `pair_weight` is `1 / (pairs in the optimizer step over all ranks)`. Adds
/// `ctx.loss_scale · pair_weight · Σ_i dL_i/dθ` into the LoRA gradients and returns every pair's
/// result.
#[allow(clippy::too_many_arguments)]
pub fn dpo_micro_step<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: &mut LoraParams<B>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
    reference: &[PairLogps],
    loss: &DpoLoss,
    pair_weight: f64,
    ctx: StepContext<'_>,
    hooks: LayerHook<'_, B>,
) -> Result<Vec<PairResult>> {
    backward_from_sequences(be, model, lora, batch, seqs, ctx, hooks, |sums, counts| {
        let scored = score_pairs(loss, &pair_logps(sums), reference, counts)?;
        // dL/dlogπ(token of sequence s), divided by the sequence's token count when ipo averages.
        let mut seq_grad = vec![0.0f64; 2 * seqs.pairs];
        for (k, (_, dz)) in scored.iter().enumerate() {
            for (s, sign) in [(2 * k, 1.0), (2 * k + 1, -1.0)] {
                let scale = if loss.averages_tokens() {
                    1.0 / counts[s].max(1) as f64
                } else {
                    1.0
                };
                seq_grad[s] = sign * pair_weight * dz * scale;
            }
        }
        Ok((scored.into_iter().map(|(r, _)| r).collect(), seq_grad))
    })
}

/// The DPO method: preference data, the loss, and the precomputed reference log-probabilities
/// of the training and held-out pairs when `precompute_ref` asks for them.
pub struct Dpo {
    data: PreferenceData,
    loss: DpoLoss,
    train_ref: Option<Vec<PairLogps>>,
    eval_ref: Option<Vec<PairLogps>>,
}

impl Dpo {
    /// Reads the data and, with `precompute_ref`, loads or computes the reference cache in the
    /// output folder (one rank only).
    pub fn prepare<B: Backend>(
        be: &B,
        model: &Decoder<B>,
        cfg: &RunConfig,
        section: &DpoSection,
        dist: &Distributed,
    ) -> Result<Dpo> {
        if dist.world_size() > 1 && section.precompute_ref {
            bail!("method.precompute_ref = true is for one rank: set it to false for data-parallel DPO (each rank then computes its pairs' reference log-probabilities as it goes)");
        }
        let data = PreferenceData::prepare(cfg, section.lengths(cfg.data.max_seq_len))?;
        let (train_ref, eval_ref) = if section.precompute_ref {
            let out = &cfg.output.dir;
            let base_model = cfg.model.path.display().to_string();
            let (t, cached) = dpo_reference::load_or_compute(
                be,
                model,
                &base_model,
                &data.train,
                &data.layout,
                &out.join("reference_logps.json"),
            )?;
            let (e, _) = dpo_reference::load_or_compute(
                be,
                model,
                &base_model,
                &data.eval,
                &data.layout,
                &out.join("reference_logps.eval.json"),
            )?;
            eprintln!(
                "reference log-probabilities of {} pairs {}",
                t.len() + e.len(),
                if cached {
                    "read from the cache"
                } else {
                    "precomputed and cached"
                }
            );
            (Some(t), Some(e))
        } else {
            (None, None)
        };
        Ok(Dpo {
            data,
            loss: DpoLoss {
                kind: section.loss_type,
                beta: section.beta,
                label_smoothing: section.label_smoothing,
            },
            train_ref,
            eval_ref,
        })
    }

    /// The reference log-probabilities of `mb`'s pairs: from `cache` (indexed like the pairs'
    /// dataset), else the forward with the adapter off.
    fn reference<B: Backend>(
        be: &B,
        model: &Decoder<B>,
        batch: &Batch<B>,
        mb: &PairMicroBatch,
        cache: Option<&[PairLogps]>,
    ) -> Result<Vec<PairLogps>> {
        Ok(match cache {
            Some(r) => mb.indices.iter().map(|&i| r[i]).collect(),
            None => pair_logps(&sequence_logps(be, model, None, batch, &mb.seqs)?.0),
        })
    }
}

impl<B: Backend> Method<B> for Dpo {
    type Data = PreferenceData;
    type Sums = DpoSums;

    fn data(&self) -> &PreferenceData {
        &self.data
    }

    /// Pairs: the loss is the mean over the step's pairs.
    fn loss_counts(&self, batch: &PairMicroBatch) -> Vec<u64> {
        vec![batch.indices.len() as u64]
    }

    fn micro_step(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &mut LoraParams<B>,
        mb: &PairMicroBatch,
        ctx: StepContext<'_>,
        hooks: LayerHook<'_, B>,
    ) -> Result<DpoSums> {
        let batch = mb.upload(be, model)?;
        let reference = Self::reference(be, model, &batch, mb, self.train_ref.as_deref())?;
        let results = dpo_micro_step(
            be,
            model,
            lora,
            &batch,
            &mb.seqs,
            &reference,
            &self.loss,
            1.0 / ctx.totals[0].max(1) as f64,
            ctx,
            hooks,
        )?;
        Ok(DpoSums::of(&results, mb.host.target_count()))
    }

    fn evaluate(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &LoraParams<B>,
    ) -> Result<Option<DpoSums>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let mut sums = DpoSums::default();
        for mb in self.data.eval_batches() {
            let batch = mb.upload(be, model)?;
            let (policy, counts) = sequence_logps(be, model, Some(lora), &batch, &mb.seqs)?;
            let reference = Self::reference(be, model, &batch, &mb, self.eval_ref.as_deref())?;
            let scored = score_pairs(&self.loss, &pair_logps(&policy), &reference, &counts)?;
            let results: Vec<PairResult> = scored.into_iter().map(|(r, _)| r).collect();
            sums.add(&DpoSums::of(&results, mb.host.target_count()));
        }
        Ok(Some(sums))
    }

    fn describe(&self) -> String {
        format!(
            "dpo ({:?}, β = {}) · {}",
            self.loss.kind,
            self.loss.beta,
            self.data.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(kind: LossType, beta: f64, eps: f64) -> DpoLoss {
        DpoLoss {
            kind,
            beta,
            label_smoothing: eps,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn sigmoid_loss_matches_hand_values() {
        // z = 0: −log σ(0) = ln 2, dL/dz = −β/2.
        let (l, d) = loss(LossType::Sigmoid, 0.1, 0.0).pair_loss(0.0);
        close(l, std::f64::consts::LN_2);
        close(d, -0.05);
        // z = 10, β = 0.1: −log σ(1) = ln(1 + e^−1) = 0.31326168751822286.
        let (l, d) = loss(LossType::Sigmoid, 0.1, 0.0).pair_loss(10.0);
        close(l, 0.313_261_687_518_222_86);
        close(d, -0.1 * 0.268_941_421_369_995_1);
        // cDPO, ε = 0.1, βz = 1: 0.9·0.31326168751822286 + 0.1·1.3132616875182228.
        let (l, d) = loss(LossType::Sigmoid, 0.1, 0.1).pair_loss(10.0);
        close(
            l,
            0.9 * 0.313_261_687_518_222_86 + 0.1 * 1.313_261_687_518_222_8,
        );
        close(
            d,
            -0.9 * 0.1 * 0.268_941_421_369_995_1 + 0.1 * 0.1 * 0.731_058_578_630_004_9,
        );
    }

    #[test]
    fn robust_and_ipo_match_hand_values() {
        // rDPO, ε = 0.1, βz = 1: (0.9·0.31326168751822286 − 0.1·1.3132616875182228) / 0.8.
        let (l, _) = loss(LossType::Robust, 0.1, 0.1).pair_loss(10.0);
        close(
            l,
            (0.9 * 0.313_261_687_518_222_86 - 0.1 * 1.313_261_687_518_222_8) / 0.8,
        );
        // IPO, β = 0.1: (z − 5)², z = 2 → 9, dL/dz = −6.
        let (l, d) = loss(LossType::Ipo, 0.1, 0.0).pair_loss(2.0);
        close(l, 9.0);
        close(d, -6.0);
    }

    #[test]
    fn loss_derivatives_agree_with_finite_differences() {
        for kind in [LossType::Sigmoid, LossType::Robust, LossType::Ipo] {
            let f = loss(kind, 0.3, 0.2);
            for z in [-7.0, -0.4, 0.0, 1.3, 25.0] {
                let h = 1e-6;
                let fd = (f.pair_loss(z + h).0 - f.pair_loss(z - h).0) / (2.0 * h);
                let (_, d) = f.pair_loss(z);
                assert!((fd - d).abs() < 1e-6, "{kind:?} at {z}: {fd} vs {d}");
            }
        }
    }

    #[test]
    fn large_margins_stay_finite() {
        let (l, d) = loss(LossType::Sigmoid, 1.0, 0.0).pair_loss(-1000.0);
        close(l, 1000.0);
        close(d, -1.0);
        let (l, d) = loss(LossType::Sigmoid, 1.0, 0.0).pair_loss(1000.0);
        assert!((0.0..1e-300).contains(&l) && d.abs() < 1e-300);
    }

    #[test]
    fn pair_scores_and_metrics_average_pairs() {
        let (sums, counts) = (vec![-3.0, -4.0, -0.5, -0.25], vec![2, 1, 1, 1]);
        let policy = pair_logps(&sums);
        let reference = vec![
            PairLogps {
                chosen: -4.0,
                rejected: -3.0
            };
            2
        ];
        let l = loss(LossType::Sigmoid, 0.5, 0.0);
        let scored = score_pairs(&l, &policy, &reference, &counts).unwrap();
        // pair 0: z = (−3 + 4) − (−4 + 3) = 2; pair 1: z = (−0.5 + 0.25) − (−1) = 0.75.
        close(scored[0].0.z, 2.0);
        close(scored[1].0.z, 0.75);
        let results: Vec<PairResult> = scored.into_iter().map(|(r, _)| r).collect();
        let sums = DpoSums::of(&results, 5);
        let m: std::collections::BTreeMap<&str, f64> = sums.metrics().into_iter().collect();
        close(
            m["rewards/chosen"],
            0.5 * ((-3.0 + 4.0) + (-0.5 + 4.0)) / 2.0,
        );
        close(
            m["rewards/rejected"],
            0.5 * ((-4.0 + 3.0) + (-0.25 + 3.0)) / 2.0,
        );
        close(m["rewards/accuracies"], 1.0);
        close(m["logps/chosen"], -1.75);
        close(
            m["rewards/margins"],
            m["rewards/chosen"] - m["rewards/rejected"],
        );
        assert_eq!(sums.counts(), vec![("pairs", 2), ("tokens", 5)]);
        let mut twice = sums;
        twice.add(&sums);
        close(twice.loss(), sums.loss());
        close(twice.pairs, 4.0);
    }

    #[test]
    fn ipo_averages_log_probabilities_over_tokens() {
        let l = loss(LossType::Ipo, 0.1, 0.0);
        let policy = [PairLogps {
            chosen: -6.0,
            rejected: -6.0,
        }];
        let reference = [PairLogps {
            chosen: -8.0,
            rejected: -4.0,
        }];
        let scored = score_pairs(&l, &policy, &reference, &[2, 4]).unwrap();
        // means: policy −3, −1.5; reference −4, −1; z = (−1.5) − (−3) = 1.5.
        close(scored[0].0.z, 1.5);
        close(scored[0].0.loss, (1.5f64 - 5.0).powi(2));
    }
}
