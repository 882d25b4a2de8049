//! Odds Ratio Preference Optimization (`[method] name = "orpo"`; Hong et al. 2024, as TRL's
//! `ORPOTrainer`): reference-free, one forward over the chosen and rejected sequences of a
//! micro-batch of pairs. With `a = mean over a completion's tokens of log p` (adapter on):
//!   log_odds_i = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))      (log odds(c) − log odds(r))
//!   loss       = NLL − β · mean_i log σ(log_odds_i)
//! where NLL is the token-mean cross-entropy of the chosen completions. Over an optimizer step
//! both means run over the whole step on every rank: NLL over its chosen completion tokens `N`,
//! the odds term over its pairs `P`. So, for a token of pair i's chosen completion (n_c tokens)
//! and of its rejected one (n_r tokens),
//!   ∂loss/∂logp = −1/N − (β/P)·σ(−log_odds_i) · 1/(1 − e^{a_c}) / n_c      (chosen)
//!   ∂loss/∂logp = +(β/P)·σ(−log_odds_i) · 1/(1 − e^{a_r}) / n_r            (rejected)
//! using d/da [a − log(1 − e^a)] = 1/(1 − e^a) and d/dx log σ(x) = σ(−x).
//! Rewards are β·a (TRL's `rewards/chosen`, `rewards/rejected`).

use super::config::{OrpoSection, RunConfig};
use super::method::{LayerHook, Method, StepContext, Sums};
use super::pairs::{
    backward_from_sequences, log_sigmoid, reward_metrics, sequence_logps, sigmoid, PairMicroBatch,
    PreferenceData, TargetSequences,
};
use crate::lora::LoraParams;
use crate::model::{Batch, Decoder};
use anyhow::Result;
use kernels::Backend;

/// What one pair contributed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrpoPair {
    /// Mean completion log-probabilities.
    pub chosen_avg_logp: f64,
    pub rejected_avg_logp: f64,
    pub log_odds: f64,
    /// `log σ(log_odds)`.
    pub log_odds_ratio: f64,
}

/// Sums over pairs and chosen tokens (so ranks and micro-batches add them up).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OrpoSums {
    pub pairs: f64,
    /// Completion tokens of the chosen sequences (the NLL's count) and of all sequences.
    pub chosen_tokens: f64,
    pub tokens: f64,
    /// `Σ −log p` over the chosen completion tokens.
    pub nll: f64,
    /// `Σ −β · log σ(log_odds)`: the odds-ratio loss.
    pub odds_loss: f64,
    pub log_odds_ratio: f64,
    pub log_odds: f64,
    pub chosen_avg_logp: f64,
    pub rejected_avg_logp: f64,
    /// `Σ β · a`.
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    pub correct: f64,
}

impl OrpoSums {
    /// The sums of one micro-batch: its pairs, the NLL of its chosen completions and its tokens.
    pub fn of(
        beta: f64,
        pairs: &[OrpoPair],
        nll: f64,
        chosen_tokens: usize,
        tokens: usize,
    ) -> Self {
        let mut s = OrpoSums {
            pairs: pairs.len() as f64,
            chosen_tokens: chosen_tokens as f64,
            tokens: tokens as f64,
            nll,
            ..OrpoSums::default()
        };
        for p in pairs {
            s.odds_loss -= beta * p.log_odds_ratio;
            s.log_odds_ratio += p.log_odds_ratio;
            s.log_odds += p.log_odds;
            s.chosen_avg_logp += p.chosen_avg_logp;
            s.rejected_avg_logp += p.rejected_avg_logp;
            s.chosen_rewards += beta * p.chosen_avg_logp;
            s.rejected_rewards += beta * p.rejected_avg_logp;
            s.correct += f64::from(u8::from(p.chosen_avg_logp > p.rejected_avg_logp));
        }
        s
    }

    /// TRL's `nll_loss`: the token mean over the chosen completions.
    pub fn nll_loss(&self) -> f64 {
        self.nll / self.chosen_tokens.max(1.0)
    }
}

impl Sums for OrpoSums {
    fn to_values(&self) -> Vec<f64> {
        vec![
            self.pairs,
            self.chosen_tokens,
            self.tokens,
            self.nll,
            self.odds_loss,
            self.log_odds_ratio,
            self.log_odds,
            self.chosen_avg_logp,
            self.rejected_avg_logp,
            self.chosen_rewards,
            self.rejected_rewards,
            self.correct,
        ]
    }

    fn from_values(v: &[f64]) -> Self {
        OrpoSums {
            pairs: v[0],
            chosen_tokens: v[1],
            tokens: v[2],
            nll: v[3],
            odds_loss: v[4],
            log_odds_ratio: v[5],
            log_odds: v[6],
            chosen_avg_logp: v[7],
            rejected_avg_logp: v[8],
            chosen_rewards: v[9],
            rejected_rewards: v[10],
            correct: v[11],
        }
    }

    /// `NLL − β · mean log σ(log_odds)`.
    fn loss(&self) -> f64 {
        self.nll_loss() + self.odds_loss / self.pairs.max(1.0)
    }

    /// Means over the pairs, named as TRL's `ORPOTrainer` logs them.
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        let n = self.pairs.max(1.0);
        let mut metrics = reward_metrics(
            self.pairs,
            [self.chosen_rewards, self.rejected_rewards],
            self.correct,
            [self.chosen_avg_logp, self.rejected_avg_logp],
        );
        metrics.extend([
            ("nll_loss", self.nll_loss()),
            ("log_odds_ratio", self.log_odds_ratio / n),
            ("log_odds_chosen", self.log_odds / n),
        ]);
        metrics
    }

    fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![("pairs", self.pairs as u64), ("tokens", self.tokens as u64)]
    }
}

/// `log(1 − e^a)` for `a < 0`, without cancellation near 0.
fn log1m_exp(a: f64) -> f64 {
    (-a.exp_m1()).ln()
}

/// Every pair's log odds from the per-sequence sums and counts of completion log-probabilities.
pub fn score_pairs(sums: &[f64], counts: &[usize]) -> Vec<OrpoPair> {
    (0..sums.len() / 2)
        .map(|k| {
            let a_c = sums[2 * k] / counts[2 * k].max(1) as f64;
            let a_r = sums[2 * k + 1] / counts[2 * k + 1].max(1) as f64;
            let log_odds = (a_c - a_r) - (log1m_exp(a_c) - log1m_exp(a_r));
            OrpoPair {
                chosen_avg_logp: a_c,
                rejected_avg_logp: a_r,
                log_odds,
                log_odds_ratio: log_sigmoid(log_odds),
            }
        })
        .collect()
}

/// Forward, ORPO loss and backward for one micro-batch of pairs; `step_pairs` and
/// `step_chosen_tokens` are the step's `P` and `N` over all ranks. Adds
/// `ctx.loss_scale · ∂(step loss)/∂θ` of this micro-batch into the LoRA gradients; returns the
/// pairs and `Σ −log p` over the chosen completion tokens.
#[allow(clippy::too_many_arguments)]
pub fn orpo_micro_step<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: &mut LoraParams<B>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
    beta: f64,
    step_pairs: u64,
    step_chosen_tokens: u64,
    ctx: StepContext<'_>,
    hooks: LayerHook<'_, B>,
) -> Result<(Vec<OrpoPair>, f64)> {
    let (p, n) = (step_pairs.max(1) as f64, step_chosen_tokens.max(1) as f64);
    backward_from_sequences(be, model, lora, batch, seqs, ctx, hooks, |sums, counts| {
        let pairs = score_pairs(sums, counts);
        let mut seq_grad = vec![0.0f64; sums.len()];
        for (k, pair) in pairs.iter().enumerate() {
            let odds = beta / p * sigmoid(-pair.log_odds);
            let (n_c, n_r) = (counts[2 * k].max(1) as f64, counts[2 * k + 1].max(1) as f64);
            seq_grad[2 * k] = -1.0 / n - odds / (-pair.chosen_avg_logp.exp_m1()) / n_c;
            seq_grad[2 * k + 1] = odds / (-pair.rejected_avg_logp.exp_m1()) / n_r;
        }
        let nll = -(0..pairs.len()).map(|k| sums[2 * k]).sum::<f64>();
        Ok(((pairs, nll), seq_grad))
    })
}

/// Completion tokens of the chosen sequences of a micro-batch.
fn chosen_tokens(seqs: &TargetSequences) -> usize {
    seqs.seq.iter().filter(|&&s| s >= 0 && s % 2 == 0).count()
}

/// The ORPO method: preference data and β.
pub struct Orpo {
    data: PreferenceData,
    beta: f64,
}

impl Orpo {
    pub fn prepare(cfg: &RunConfig, section: &OrpoSection) -> Result<Orpo> {
        Ok(Orpo {
            data: PreferenceData::prepare(cfg, section.lengths(cfg.data.max_seq_len))?,
            beta: section.beta,
        })
    }
}

impl<B: Backend> Method<B> for Orpo {
    type Data = PreferenceData;
    type Sums = OrpoSums;

    fn data(&self) -> &PreferenceData {
        &self.data
    }

    /// Pairs (the odds-ratio mean) and chosen completion tokens (the NLL's mean).
    fn loss_counts(&self, batch: &PairMicroBatch) -> Vec<u64> {
        vec![
            batch.indices.len() as u64,
            chosen_tokens(&batch.seqs) as u64,
        ]
    }

    fn micro_step(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &mut LoraParams<B>,
        mb: &PairMicroBatch,
        ctx: StepContext<'_>,
        hooks: LayerHook<'_, B>,
    ) -> Result<OrpoSums> {
        let batch = mb.upload(be, model)?;
        let (pairs, nll) = orpo_micro_step(
            be,
            model,
            lora,
            &batch,
            &mb.seqs,
            self.beta,
            ctx.totals[0],
            ctx.totals[1],
            ctx,
            hooks,
        )?;
        Ok(self.sums(&pairs, nll, mb))
    }

    fn evaluate(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &LoraParams<B>,
    ) -> Result<Option<OrpoSums>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let mut sums = OrpoSums::default();
        for mb in self.data.eval_batches() {
            let batch = mb.upload(be, model)?;
            let (seq_sums, counts) = sequence_logps(be, model, Some(lora), &batch, &mb.seqs)?;
            let pairs = score_pairs(&seq_sums, &counts);
            let nll = -(0..pairs.len()).map(|k| seq_sums[2 * k]).sum::<f64>();
            sums.add(&self.sums(&pairs, nll, &mb));
        }
        Ok(Some(sums))
    }

    fn describe(&self) -> String {
        format!("orpo (β = {}) · {}", self.beta, self.data.describe())
    }
}

impl Orpo {
    fn sums(&self, pairs: &[OrpoPair], nll: f64, mb: &PairMicroBatch) -> OrpoSums {
        OrpoSums::of(
            self.beta,
            pairs,
            nll,
            chosen_tokens(&mb.seqs),
            mb.host.target_count(),
        )
    }
}
