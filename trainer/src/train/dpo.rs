//! Direct Preference Optimization on the training engine: the loss types, one micro-batch step,
//! and the per-step metrics as TRL's `DPOTrainer` names them.
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

use crate::lora::LoraParams;
use crate::model::{Batch, Decoder};
use anyhow::{bail, Result};
use kernels::{Backend, CeGrad, DType, IGNORE_INDEX};
use serde::Serialize;

/// Which preference loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    Sigmoid,
    Robust,
    Ipo,
}

impl LossType {
    pub const NAMES: [&'static str; 3] = ["sigmoid", "robust", "ipo"];

    pub fn parse(s: &str) -> Option<LossType> {
        match s {
            "sigmoid" => Some(LossType::Sigmoid),
            "robust" => Some(LossType::Robust),
            "ipo" => Some(LossType::Ipo),
            _ => None,
        }
    }
}

/// The loss and its hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct DpoLoss {
    pub kind: LossType,
    pub beta: f64,
    /// ε of cDPO / rDPO; 0 for plain DPO (ignored by ipo).
    pub label_smoothing: f64,
}

/// `log σ(x)`, stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
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

/// For each position of a micro-batch, the sequence its next-token target scores:
/// `2k` for the chosen completion of the batch's pair `k`, `2k + 1` for the rejected one,
/// `-1` for prompt, padding and positions without a target.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSequences {
    pub seq: Vec<i32>,
    pub pairs: usize,
}

impl TargetSequences {
    /// `targets` are the shifted next-token targets; `seq_of_position` the sequence of each token.
    pub fn new(targets: &[i32], seq_of_position: &[i32], pairs: usize) -> Self {
        let seq = targets
            .iter()
            .zip(seq_of_position)
            .map(|(&t, &s)| if t == IGNORE_INDEX { -1 } else { s })
            .collect();
        TargetSequences { seq, pairs }
    }

    /// Per sequence: the sum of the token log-probabilities and the number of tokens.
    pub fn sum_by_sequence(&self, token_logp: &[f32]) -> (Vec<f64>, Vec<usize>) {
        let mut sums = vec![0.0f64; 2 * self.pairs];
        let mut counts = vec![0usize; 2 * self.pairs];
        for (&s, &lp) in self.seq.iter().zip(token_logp) {
            if s >= 0 {
                sums[s as usize] += lp as f64;
                counts[s as usize] += 1;
            }
        }
        (sums, counts)
    }
}

/// Log-probabilities of one pair's completions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
}

/// Per-pair summed log-probabilities from per-sequence sums.
fn pair_logps(sums: &[f64]) -> Vec<PairLogps> {
    sums.chunks(2)
        .map(|c| PairLogps {
            chosen: c[0],
            rejected: c[1],
        })
        .collect()
}

/// Summed completion log-probabilities of every pair of the batch under `lora` (`None`: the
/// reference, base weights alone), with no gradient.
pub fn sequence_logps<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: Option<&LoraParams<B>>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
) -> Result<(Vec<PairLogps>, Vec<usize>)> {
    let acts = model.forward(be, lora, batch, false)?;
    let (logp, _) = model.head(be, &acts, &batch.targets, CeGrad::None)?;
    let (sums, counts) = seqs.sum_by_sequence(&be.download(&logp)?);
    Ok((pair_logps(&sums), counts))
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
    pub loss: f64,
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    pub correct: f64,
    pub policy_chosen: f64,
    pub policy_rejected: f64,
}

impl DpoSums {
    /// The sums over every rank of the job (the identity on one rank).
    pub fn summed_over(&self, dist: &super::distributed::Distributed) -> anyhow::Result<DpoSums> {
        let v = dist.global_sum_f64(&[
            self.pairs,
            self.loss,
            self.chosen_rewards,
            self.rejected_rewards,
            self.correct,
            self.policy_chosen,
            self.policy_rejected,
        ])?;
        Ok(DpoSums {
            pairs: v[0],
            loss: v[1],
            chosen_rewards: v[2],
            rejected_rewards: v[3],
            correct: v[4],
            policy_chosen: v[5],
            policy_rejected: v[6],
        })
    }

    pub fn add(&mut self, r: &PairResult) {
        self.pairs += 1.0;
        self.loss += r.loss;
        self.chosen_rewards += r.chosen_reward;
        self.rejected_rewards += r.rejected_reward;
        self.correct += f64::from(u8::from(r.chosen_reward > r.rejected_reward));
        self.policy_chosen += r.policy.chosen;
        self.policy_rejected += r.policy.rejected;
    }

    pub fn merge(&mut self, o: &DpoSums) {
        self.pairs += o.pairs;
        self.loss += o.loss;
        self.chosen_rewards += o.chosen_rewards;
        self.rejected_rewards += o.rejected_rewards;
        self.correct += o.correct;
        self.policy_chosen += o.policy_chosen;
        self.policy_rejected += o.policy_rejected;
    }

    /// Means over the pairs, named as TRL logs them.
    pub fn metrics(&self) -> DpoMetrics {
        let n = self.pairs.max(1.0);
        DpoMetrics {
            rewards_chosen: self.chosen_rewards / n,
            rewards_rejected: self.rejected_rewards / n,
            rewards_accuracies: self.correct / n,
            rewards_margins: (self.chosen_rewards - self.rejected_rewards) / n,
            logps_chosen: self.policy_chosen / n,
            logps_rejected: self.policy_rejected / n,
        }
    }

    /// The mean loss over the pairs.
    pub fn mean_loss(&self) -> f64 {
        self.loss / self.pairs.max(1.0)
    }
}

/// TRL's DPO metrics (the loss is logged beside them as `loss`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct DpoMetrics {
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
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
/// `pair_weight · Σ_i dL_i/dθ` into the LoRA gradients and returns every pair's result.
pub fn dpo_micro_step<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: &mut LoraParams<B>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
    reference: &[PairLogps],
    loss: &DpoLoss,
    pair_weight: f64,
    checkpoint: bool,
) -> Result<Vec<PairResult>> {
    let acts = model.forward(be, Some(lora), batch, checkpoint)?;
    let (logp, _) = model.head(be, &acts, &batch.targets, CeGrad::None)?;
    let (sums, counts) = seqs.sum_by_sequence(&be.download(&logp)?);
    let scored = score_pairs(loss, &pair_logps(&sums), reference, &counts)?;
    // dL/dlogπ(sequence s), divided by its token count when ipo averages.
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
    // The head differentiates −Σ weight·logp, so weight = −dL/dlogp.
    let weights: Vec<f32> = seqs
        .seq
        .iter()
        .map(|&s| {
            if s >= 0 {
                -seq_grad[s as usize] as f32
            } else {
                0.0
            }
        })
        .collect();
    let w = be.upload(&weights, DType::F32)?;
    let (_, dnormed) = model.head(be, &acts, &batch.targets, CeGrad::PerRow(&w))?;
    let dnormed = dnormed.expect("a gradient was requested");
    model.backward(be, Some(lora), batch, acts, &dnormed)?;
    Ok(scored.into_iter().map(|(r, _)| r).collect())
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
        assert!(l >= 0.0 && l < 1e-300 && d.abs() < 1e-300);
    }

    #[test]
    fn sequences_sum_only_their_targets_and_metrics_average_pairs() {
        // Two pairs; positions 1 and 2 → seq 0, 3 → seq 1, 4 → seq 2, 5 → seq 3; 0 has no target.
        let targets = [IGNORE_INDEX, 5, 6, 7, 8, 9];
        let seq_of_position = [0, 0, 0, 1, 2, 3];
        let seqs = TargetSequences::new(&targets, &seq_of_position, 2);
        let (sums, counts) = seqs.sum_by_sequence(&[-100.0, -1.0, -2.0, -4.0, -0.5, -0.25]);
        assert_eq!(sums, vec![-3.0, -4.0, -0.5, -0.25]);
        assert_eq!(counts, vec![2, 1, 1, 1]);
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
        let mut sums = DpoSums::default();
        scored.iter().for_each(|(r, _)| sums.add(r));
        let m = sums.metrics();
        close(m.rewards_chosen, 0.5 * ((-3.0 + 4.0) + (-0.5 + 4.0)) / 2.0);
        close(
            m.rewards_rejected,
            0.5 * ((-4.0 + 3.0) + (-0.25 + 3.0)) / 2.0,
        );
        close(m.rewards_accuracies, 1.0);
        close(m.logps_chosen, -1.75);
        let json = serde_json::to_value(m).unwrap();
        assert!(json.get("rewards/margins").is_some() && json.get("logps/rejected").is_some());
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
