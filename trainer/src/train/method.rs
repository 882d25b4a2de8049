//! What a training method plugs into the one loop ([`super::run`]): its data (planned per epoch,
//! read per micro-batch), one micro-batch's forward, loss and backward, evaluation, and the names
//! of its metrics. SFT (`sft.rs`), DPO (`dpo.rs`) and ORPO (`orpo.rs`) implement it.
//!
//! The loss of an optimizer step is normalised over the whole step on every rank: before the
//! first micro-batch runs, the loop sums each micro-batch's [`Method::loss_counts`] (loss tokens,
//! pairs, …) over the step and the ranks, and hands the totals to every [`Method::micro_step`].
//! So W ranks × accumulation k compute the update of 1 rank × accumulation W·k.

use crate::data::batching::HostBatch;
use crate::data::packing::RowFill;
use crate::data::preference::PreferenceStats;
use crate::data::tokenize::TokenizeStats;
use crate::lora::LoraParams;
use crate::model::{CheckpointPolicy, Decoder, LayerHooks};
use anyhow::Result;
use kernels::Backend;

/// The step's per-layer calls ([`LayerHooks`]): a deferred optimizer update before each layer's
/// forward, the gradient sum over the ranks after each layer's backward.
pub type LayerHook<'a, B> = &'a mut dyn LayerHooks<B>;

/// What every micro-batch of a step is told about the whole step.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// [`Method::loss_counts`] summed over the step's micro-batches on all ranks.
    pub totals: &'a [u64],
    /// The fp16 loss scale (1 without loss scaling): every gradient weight is multiplied by it.
    pub loss_scale: f32,
    /// What the forward keeps for backward.
    pub checkpointing: CheckpointPolicy,
}

/// Sums over the items of a step or an evaluation (losses, metric numerators, counts), which
/// micro-batches and ranks add up; means are taken once, from the sums.
pub trait Sums: Default {
    /// The sums as numbers, in a fixed order (for the all-reduce over ranks).
    fn to_values(&self) -> Vec<f64>;
    fn from_values(values: &[f64]) -> Self;
    /// The loss these sums make.
    fn loss(&self) -> f64;
    /// The metrics logged beside `loss`, with TRL's names.
    fn metrics(&self) -> Vec<(&'static str, f64)>;
    /// What an evaluation counted (`tokens`, `pairs`), logged as `eval_<name>`.
    fn counts(&self) -> Vec<(&'static str, u64)>;

    /// `self + other`.
    fn add(&mut self, other: &Self) {
        let sum: Vec<f64> = self
            .to_values()
            .iter()
            .zip(other.to_values())
            .map(|(a, b)| a + b)
            .collect();
        *self = Self::from_values(&sum);
    }
}

/// The data a run trained on, for the summary.
#[derive(Clone, Debug, Default)]
pub struct DataStats {
    pub train: TokenizeStats,
    pub eval: Option<TokenizeStats>,
    pub skipped_records: usize,
    /// Preference methods: the pairs' counts.
    pub preference: Option<PreferenceStats>,
}

/// A method's training data: planned per epoch, read per micro-batch.
pub trait BatchSource {
    /// One micro-batch as indices into the data.
    type Plan: Clone;
    /// One micro-batch read from the data, on the host.
    type Batch;

    /// The whole job's micro-batches of `epoch`, fixed by the seed and the epoch.
    fn epoch_plan(&self, epoch: u64) -> Vec<Self::Plan>;
    /// The examples (or pairs) a plan reads (for the example trace).
    fn plan_items(plan: &Self::Plan) -> Vec<usize>;
    /// Reads a planned micro-batch.
    fn read(&self, plan: &Self::Plan) -> Result<Self::Batch>;
    /// The batch's token rows (for token counts and `train.dump_batches`).
    fn host(batch: &Self::Batch) -> &HostBatch;
    /// How full epoch 0's micro-batches are: real tokens over the token slots they compute.
    fn epoch_fill(&self) -> RowFill;
    /// What was read and tokenized, for the summary.
    fn stats(&self) -> DataStats;
}

/// The micro-batch type of method `M`.
pub type MicroBatch<M, B> = <<M as Method<B>>::Data as BatchSource>::Batch;

/// A training method.
pub trait Method<B: Backend> {
    type Data: BatchSource;
    type Sums: Sums;

    /// The training data.
    fn data(&self) -> &Self::Data;
    /// The counts the step's loss is normalised by (loss tokens; pairs; …).
    fn loss_counts(&self, batch: &MicroBatch<Self, B>) -> Vec<u64>;
    /// Forward, loss and backward of one micro-batch: adds `d(step loss)/dθ · ctx.loss_scale`
    /// into `lora`'s gradients, running `hooks` around each layer's forward and backward, and
    /// returns the micro-batch's sums.
    fn micro_step(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &mut LoraParams<B>,
        batch: &MicroBatch<Self, B>,
        ctx: StepContext<'_>,
        hooks: LayerHook<'_, B>,
    ) -> Result<Self::Sums>;
    /// The sums over the held-out data under `lora` (no gradient); `None` without held-out data.
    fn evaluate(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &LoraParams<B>,
    ) -> Result<Option<Self::Sums>>;
    /// The run's opening line, after `fuselora <method>`: settings and data.
    fn describe(&self) -> String;
}
