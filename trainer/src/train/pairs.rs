//! What the preference methods (DPO, ORPO) share: their data (pairs read, split and tokenized
//! with the pair length limits, planned per epoch, laid out as micro-batches of whole pairs), the
//! completion log-probabilities of every sequence, and the backward of a loss that depends on
//! them — the LM head takes per-token weights `−∂loss/∂logp(token)`, one value per sequence.
//!
//! Sequence `2k` of a micro-batch is pair `k`'s chosen completion, `2k + 1` its rejected one.

use super::config::{PairLengths, RunConfig};
use super::dataset::train_and_held_out;
use super::method::{BatchSource, DataStats, LayerHook, StepContext};
use crate::data::batching::{shuffled, HostBatch};
use crate::data::packing::RowFill;
use crate::data::pair_batching::pair_batch;
use crate::data::preference::{
    read_preference_file, tokenize_preferences, PairLimits, PreferencePair, PreferenceStats,
};
use crate::data::tokenize::TokenizeStats;
use crate::lora::LoraParams;
use crate::model::{next_token_targets, Batch, CheckpointPolicy, Decoder};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use kernels::{Backend, CeGrad, DType, IGNORE_INDEX};

/// How micro-batches of pairs are laid out (the training micro-batch shape).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub pairs_per_batch: usize,
    pub packing: bool,
    pub row_len: usize,
    pub pad_id: i32,
}

/// Preference data, tokenized: training and held-out pairs.
pub struct PreferenceData {
    pub train: Vec<PreferencePair>,
    pub eval: Vec<PreferencePair>,
    pub layout: Layout,
    pub stats: DataStats,
    seed: u64,
}

fn as_tokenize_stats(s: &PreferenceStats) -> TokenizeStats {
    TokenizeStats {
        examples: s.pairs,
        tokens: s.tokens,
        truncated: s.prompts_truncated + s.completions_truncated,
        dropped_too_long: s.dropped_no_completion,
        dropped_no_target: 0,
        ..TokenizeStats::default()
    }
}

impl PreferenceData {
    /// Reads, splits and tokenizes the preference data of `cfg`, cut to `lengths`.
    pub fn prepare(cfg: &RunConfig, lengths: PairLengths) -> Result<Self> {
        let tok = Tokenizer::load(&cfg.model.path)?;
        let limits = PairLimits {
            max_prompt_len: lengths.max_prompt_len,
            max_len: lengths.max_len,
        };
        let records = train_and_held_out(cfg, &|p| {
            read_preference_file(p, &cfg.data.columns, cfg.data.skip_bad_records)
        })?;
        let (train, train_stats) = tokenize_preferences(&tok, &records.train, limits)?;
        let (eval, eval_stats) = if records.eval.is_empty() {
            (Vec::new(), None)
        } else {
            let (e, s) = tokenize_preferences(&tok, &records.eval, limits)?;
            (e, Some(s))
        };
        Ok(PreferenceData {
            train,
            eval,
            layout: Layout {
                pairs_per_batch: cfg.train.batch_size,
                packing: cfg.data.packing,
                row_len: lengths.max_len,
                pad_id: tok.pad_id().or(tok.eos_id()).unwrap_or(0) as i32,
            },
            stats: DataStats {
                train: as_tokenize_stats(&train_stats),
                eval: eval_stats.as_ref().map(as_tokenize_stats),
                skipped_records: records.skipped,
                preference: Some(train_stats),
            },
            seed: cfg.train.seed,
        })
    }

    /// The held-out pairs in micro-batches, in order.
    pub fn eval_batches(&self) -> impl Iterator<Item = PairMicroBatch> + '_ {
        self.eval
            .chunks(self.layout.pairs_per_batch.max(1))
            .enumerate()
            .map(|(c, chunk)| {
                let start = c * self.layout.pairs_per_batch.max(1);
                let pairs: Vec<&PreferencePair> = chunk.iter().collect();
                PairMicroBatch::new(&pairs, (start..start + chunk.len()).collect(), &self.layout)
            })
    }

    /// `N pairs (T tokens; …)` for the run's opening line.
    pub fn describe(&self) -> String {
        let s = self.stats.preference.as_ref().expect("set by prepare");
        format!(
            "{} pairs ({} tokens; {} prompts and {} completions truncated, {} pairs dropped)",
            s.pairs,
            s.tokens,
            s.prompts_truncated,
            s.completions_truncated,
            s.dropped_no_completion
        )
    }
}

/// `log σ(x)`, stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// `σ(x)`, stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl BatchSource for PreferenceData {
    /// Pair indices.
    type Plan = Vec<usize>;
    type Batch = PairMicroBatch;

    /// A seeded shuffle of the pairs cut into micro-batches.
    fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        shuffled(self.train.len(), self.seed, epoch)
            .chunks(self.layout.pairs_per_batch.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    fn plan_items(plan: &Vec<usize>) -> Vec<usize> {
        plan.clone()
    }

    fn read(&self, indices: &Vec<usize>) -> Result<PairMicroBatch> {
        let pairs: Vec<&PreferencePair> = indices.iter().map(|&i| &self.train[i]).collect();
        Ok(PairMicroBatch::new(&pairs, indices.clone(), &self.layout))
    }

    fn host(batch: &PairMicroBatch) -> &HostBatch {
        &batch.host
    }

    fn epoch_fill(&self) -> RowFill {
        let mut fill = RowFill::default();
        for plan in self.epoch_plan(0) {
            let pairs: Vec<&PreferencePair> = plan.iter().map(|&i| &self.train[i]).collect();
            let host = PairMicroBatch::new(&pairs, plan, &self.layout).host;
            fill.tokens += host.token_count();
            fill.slots += host.ids.len();
        }
        fill
    }

    fn stats(&self) -> DataStats {
        self.stats.clone()
    }
}

/// For each position of a micro-batch, the sequence its next-token target scores (`2k` chosen,
/// `2k + 1` rejected of the batch's pair `k`; `-1` for prompt, padding and positions without a
/// target).
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

/// A micro-batch of whole pairs on the host.
pub struct PairMicroBatch {
    /// The pairs' indices in their dataset.
    pub indices: Vec<usize>,
    pub host: HostBatch,
    pub seqs: TargetSequences,
}

impl PairMicroBatch {
    pub fn new(pairs: &[&PreferencePair], indices: Vec<usize>, l: &Layout) -> Self {
        let pb = pair_batch(pairs, l.packing, l.row_len, l.pad_id);
        let seqs = TargetSequences::new(
            &next_token_targets(&pb.host.labels, &pb.host.layout(None)),
            &pb.seq_of_position,
            pb.pairs,
        );
        PairMicroBatch {
            indices,
            host: pb.host,
            seqs,
        }
    }

    pub fn upload<B: Backend>(&self, be: &B, model: &Decoder<B>) -> Result<Batch<B>> {
        let h = &self.host;
        let layout = h.layout(model.config.sliding_window);
        Batch::new(be, &model.config, &h.ids, &h.labels, layout)
    }
}

/// Log-probabilities of one pair's completions (sums or means over their tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
}

/// Per-pair values from per-sequence ones (`[chosen0, rejected0, chosen1, …]`).
pub fn pair_logps(per_sequence: &[f64]) -> Vec<PairLogps> {
    per_sequence
        .chunks(2)
        .map(|c| PairLogps {
            chosen: c[0],
            rejected: c[1],
        })
        .collect()
}

/// Summed completion log-probabilities of every sequence of the batch under `lora` (`None`: the
/// base weights alone), and each sequence's completion token count, with no gradient.
pub fn sequence_logps<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: Option<&LoraParams<B>>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let acts = model.forward(be, lora, batch, CheckpointPolicy::FORWARD_ONLY)?;
    let (logp, _) = model.head(be, &acts, &batch.targets, CeGrad::None)?;
    Ok(seqs.sum_by_sequence(&be.download(&logp)?))
}

/// Forward with the adapter, then backward of a loss of the sequences' summed log-probabilities.
/// `score(sums, counts)` returns its result and, per sequence, `∂(step loss)/∂logp(token)` —
/// the same for every completion token of the sequence. Adds `loss_scale ·` the gradient into
/// `lora`, running `hooks` around each layer's forward and backward.
#[allow(clippy::too_many_arguments)]
pub fn backward_from_sequences<B: Backend, R>(
    be: &B,
    model: &Decoder<B>,
    lora: &mut LoraParams<B>,
    batch: &Batch<B>,
    seqs: &TargetSequences,
    ctx: StepContext<'_>,
    hooks: LayerHook<'_, B>,
    score: impl FnOnce(&[f64], &[usize]) -> Result<(R, Vec<f64>)>,
) -> Result<R> {
    let acts = model.forward_with_hooks(be, lora, batch, ctx.checkpointing, hooks)?;
    let (logp, _) = model.head(be, &acts, &batch.targets, CeGrad::None)?;
    let (sums, counts) = seqs.sum_by_sequence(&be.download(&logp)?);
    let (result, seq_grad) = score(&sums, &counts)?;
    // The head differentiates −Σ weight·logp, so weight = −∂loss/∂logp.
    let weights: Vec<f32> = seqs
        .seq
        .iter()
        .map(|&s| {
            if s >= 0 {
                (-seq_grad[s as usize] * ctx.loss_scale as f64) as f32
            } else {
                0.0
            }
        })
        .collect();
    let w = be.upload(&weights, DType::F32)?;
    let (_, dnormed) = model.head(be, &acts, &batch.targets, CeGrad::PerRow(&w))?;
    let dnormed = dnormed.expect("a gradient was requested");
    model.backward_with_hooks(be, Some(lora), batch, acts, &dnormed, hooks)?;
    Ok(result)
}

/// TRL's metrics of a preference method, as means over `pairs`: `rewards/chosen`,
/// `rewards/rejected`, `rewards/accuracies` (share of pairs with chosen > rejected),
/// `rewards/margins` (chosen − rejected), and `logps/chosen`, `logps/rejected` (the policy's
/// completion log-probabilities: sums for DPO, token means for ORPO). `rewards` and `logps` are
/// `[chosen, rejected]` sums.
pub fn reward_metrics(
    pairs: f64,
    rewards: [f64; 2],
    correct: f64,
    logps: [f64; 2],
) -> Vec<(&'static str, f64)> {
    let n = pairs.max(1.0);
    let [chosen, rejected] = rewards;
    vec![
        ("rewards/chosen", chosen / n),
        ("rewards/rejected", rejected / n),
        ("rewards/accuracies", correct / n),
        ("rewards/margins", (chosen - rejected) / n),
        ("logps/chosen", logps[0] / n),
        ("logps/rejected", logps[1] / n),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_sum_only_their_targets() {
        // Two pairs; positions 1 and 2 → seq 0, 3 → seq 1, 4 → seq 2, 5 → seq 3; 0 has no target.
        let targets = [IGNORE_INDEX, 5, 6, 7, 8, 9];
        let seq_of_position = [0, 0, 0, 1, 2, 3];
        let seqs = TargetSequences::new(&targets, &seq_of_position, 2);
        let (sums, counts) = seqs.sum_by_sequence(&[-100.0, -1.0, -2.0, -4.0, -0.5, -0.25]);
        assert_eq!(sums, vec![-3.0, -4.0, -0.5, -0.25]);
        assert_eq!(counts, vec![2, 1, 1, 1]);
        assert_eq!(
            pair_logps(&sums)[1],
            PairLogps {
                chosen: -0.5,
                rejected: -0.25
            }
        );
    }

    #[test]
    fn epochs_cover_every_pair_once_in_a_seeded_order() {
        let pair = PreferencePair {
            prompt: vec![1],
            chosen: vec![2],
            rejected: vec![3],
        };
        let data = PreferenceData {
            train: vec![pair; 7],
            eval: Vec::new(),
            layout: Layout {
                pairs_per_batch: 3,
                packing: false,
                row_len: 8,
                pad_id: 0,
            },
            stats: DataStats::default(),
            seed: 1,
        };
        let batches = data.epoch_plan(0);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert_ne!(data.epoch_plan(0), data.epoch_plan(1));
        let mb = data.read(&vec![4, 0]).unwrap();
        assert_eq!(mb.indices, vec![4, 0]);
        assert_eq!(mb.host.docs, vec![vec![2]; 4]);
    }
}
