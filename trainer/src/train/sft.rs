//! Supervised fine-tuning (`[method] name = "sft"`, the default): the token-mean cross-entropy
//! of the trained tokens (responses, or everything with `data.train_on_prompt`) over the whole
//! optimizer step, every token weighted by `1 / (loss tokens of the step over all ranks)`.
//! The data: JSON records tokenized at start, or memory-mapped token shards (`prepare-data`).

use super::config::{AlpacaTemplate, RunConfig, Truncation};
use super::dataset::{read_all, train_and_held_out};
use super::method::{BatchSource, DataStats, LayerHook, Method, StepContext, Sums};
use crate::data::batching::{
    assemble, epoch_batches, epoch_plan, plan_fill, Batching, Example, HostBatch,
};
use crate::data::check::check_examples;
use crate::data::packing::RowFill;
use crate::data::records::{read_file, Record};
use crate::data::source::ExampleSource;
use crate::data::token_shards::{is_token_shard, TokenShards};
use crate::data::tokenize::{tokenize_records, Formatting, TokenizeStats};
use crate::lora::LoraParams;
use crate::model::{Batch, CheckpointPolicy, Decoder};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use kernels::Backend;
use std::path::PathBuf;
use std::sync::Arc;

/// Examples in memory, or memory-mapped token shards that each rank reads only its part of.
pub type SharedExamples = Arc<dyn ExampleSource + Send + Sync>;

/// The supervised method and its tokenized data.
pub struct Sft {
    pub train: SharedExamples,
    pub eval: Vec<Example>,
    pub batching: Batching,
    seed: u64,
    stats: DataStats,
}

/// Σ −log p over a micro-batch's (or an evaluation's) targets, and how many there were.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SftSums {
    pub nll: f64,
    pub tokens: f64,
}

impl Sums for SftSums {
    fn to_values(&self) -> Vec<f64> {
        vec![self.nll, self.tokens]
    }
    fn from_values(v: &[f64]) -> Self {
        SftSums {
            nll: v[0],
            tokens: v[1],
        }
    }
    fn loss(&self) -> f64 {
        self.nll / self.tokens.max(1.0)
    }
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![("tokens", self.tokens as u64)]
    }
}

/// Reads every supervised record of `paths` in the config's format; returns them and the count
/// skipped as bad.
pub fn read_records(paths: &[PathBuf], cfg: &RunConfig) -> Result<(Vec<Record>, usize)> {
    read_all(paths, &|p| read_one(p, cfg))
}

fn read_one(path: &std::path::Path, cfg: &RunConfig) -> Result<(Vec<Record>, Vec<String>)> {
    let r = read_file(
        path,
        cfg.data.format.fixed(),
        &cfg.data.columns,
        cfg.data.skip_bad_records,
    )?;
    if let Some(warning) = r.unused_fields_warning(path) {
        eprintln!("{warning}");
    }
    Ok((r.records, r.skipped))
}

/// How the config's records become tokens.
pub fn formatting_for(cfg: &RunConfig) -> Formatting {
    Formatting {
        alpaca_as_chat: cfg.data.alpaca_template == AlpacaTemplate::Chat,
        train_on_prompt: cfg.data.train_on_prompt,
        max_seq_len: cfg.data.max_seq_len,
        drop_long: cfg.data.truncation == Truncation::Drop,
        text_overlap: cfg.data.text_overlap,
    }
}

fn batching(cfg: &RunConfig, pad_id: i32) -> Batching {
    Batching {
        rows: cfg.train.batch_size,
        max_seq_len: cfg.data.max_seq_len,
        packing: cfg.data.packing,
        pad_id,
    }
}

impl Sft {
    /// Reads and tokenizes the data of `cfg` (or opens its token shards), refusing token ids
    /// outside `0..vocab` and training data without a label ([`check_examples`]).
    pub fn prepare(cfg: &RunConfig, vocab: usize) -> Result<Sft> {
        if let Some(sft) = Self::from_token_shards(cfg, vocab)? {
            return Ok(sft);
        }
        let tokenizer = Tokenizer::load(&cfg.model.path)?;
        let formatting = formatting_for(cfg);
        let records = train_and_held_out(cfg, &|p| read_one(p, cfg))?;
        let (train, train_stats) = tokenize_records(&tokenizer, &records.train, &formatting)?;
        let (eval, eval_stats) = if records.eval.is_empty() {
            (Vec::new(), None)
        } else {
            let (e, s) = tokenize_records(&tokenizer, &records.eval, &formatting)?;
            (e, Some(s))
        };
        let numbered = |i: usize| format!("example {i} (counting after tokenization)");
        check_examples(&train, vocab, "data.train", true, &numbered)?;
        check_examples(&eval, vocab, "data.validation", false, &numbered)?;
        let pad_id = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0) as i32;
        Ok(Sft {
            train: Arc::new(train),
            eval,
            batching: batching(cfg, pad_id),
            seed: cfg.train.seed,
            stats: DataStats {
                train: train_stats,
                eval: eval_stats,
                skipped_records: records.skipped,
                preference: None,
            },
        })
    }

    /// Memory-maps `data.train` when it lists token shard files (`fuselora prepare-data`), with the
    /// validation shards read into memory; `None` when the data is JSON to tokenize now.
    fn from_token_shards(cfg: &RunConfig, vocab: usize) -> Result<Option<Sft>> {
        let shard_count = cfg.data.train.iter().filter(|p| is_token_shard(p)).count();
        if shard_count == 0 {
            return Ok(None);
        }
        if shard_count != cfg.data.train.len() {
            bail!("data.train mixes .tokens shards with other files: list only the shards of `fuselora prepare-data`, or only JSON files");
        }
        if cfg.data.validation_split > 0.0 {
            bail!("data.validation_split needs records to split, but data.train holds token shards: list held-out shards in data.validation instead (prepare-data writes them from the config's data.validation)");
        }
        let train = TokenShards::open(&cfg.data.train)?;
        let eval = if cfg.data.validation.is_empty() {
            Vec::new()
        } else {
            if !cfg.data.validation.iter().all(|p| is_token_shard(p)) {
                bail!("data.train holds token shards, so data.validation must too (make them with `fuselora prepare-data`)");
            }
            TokenShards::open(&cfg.data.validation)?.read_all()
        };
        check_examples(&train, vocab, "data.train", true, &|i| train.origin(i))?;
        check_examples(&eval, vocab, "data.validation", false, &|i| {
            format!("example {i}")
        })?;
        let eval_stats = (!eval.is_empty()).then(|| TokenizeStats {
            examples: eval.len(),
            tokens: eval.iter().map(|e| e.ids.len()).sum(),
            ..TokenizeStats::default()
        });
        Ok(Some(Sft {
            batching: batching(cfg, train.pad_id()),
            stats: DataStats {
                train: TokenizeStats {
                    examples: train.count(),
                    tokens: train.total_tokens(),
                    ..TokenizeStats::default()
                },
                eval: eval_stats,
                skipped_records: 0,
                preference: None,
            },
            train: Arc::new(train),
            eval,
            seed: cfg.train.seed,
        }))
    }
}

/// Uploads a host micro-batch.
pub fn upload<B: Backend>(be: &B, model: &Decoder<B>, hb: &HostBatch) -> Result<Batch<B>> {
    Batch::new(
        be,
        &model.config,
        &hb.ids,
        &hb.labels,
        hb.layout(model.config.sliding_window),
    )
}

/// The supervised micro-step: forward, cross-entropy and backward of `batch`, every target
/// weighted by `loss_scale / (loss tokens of the step)` (`ctx.totals[0]`), running `hooks` around
/// each layer's forward and backward. Returns `Σ −log p` over the batch's targets and
/// their count.
pub fn sft_micro_step<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: &mut LoraParams<B>,
    batch: &Batch<B>,
    ctx: StepContext<'_>,
    hooks: LayerHook<'_, B>,
) -> Result<SftSums> {
    let weight = (1.0 / ctx.totals[0].max(1) as f32) * ctx.loss_scale;
    let nll =
        model.loss_and_grad_with_hooks(be, Some(lora), batch, ctx.checkpointing, weight, hooks)?;
    Ok(SftSums {
        nll,
        tokens: batch.n_targets as f64,
    })
}

/// Token-mean loss of `model` + `lora` over `examples` (no gradient), and the tokens scored.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: Option<&LoraParams<B>>,
    examples: &[Example],
    batching: &Batching,
) -> Result<SftSums> {
    let mut sums = SftSums::default();
    for hb in epoch_batches(examples, batching, 0, 0) {
        let batch = upload(be, model, &hb)?;
        let acts = model.forward(be, lora, &batch, CheckpointPolicy::FORWARD_ONLY)?;
        let (logp, _) = model.head(be, &acts, &batch.targets, kernels::CeGrad::None)?;
        sums.nll -= be.download(&logp)?.iter().map(|&x| x as f64).sum::<f64>();
        sums.tokens += batch.n_targets as f64;
    }
    Ok(sums)
}

impl BatchSource for Sft {
    /// Rows of example indices.
    type Plan = Vec<Vec<usize>>;
    type Batch = HostBatch;

    fn epoch_plan(&self, epoch: u64) -> Vec<Self::Plan> {
        epoch_plan(&*self.train, &self.batching, self.seed, epoch)
    }

    fn plan_items(plan: &Self::Plan) -> Vec<usize> {
        plan.concat()
    }

    fn read(&self, plan: &Self::Plan) -> Result<HostBatch> {
        Ok(assemble(
            &*self.train,
            plan,
            self.batching.pad_id,
            self.batching.min_shape(),
        ))
    }

    fn host(batch: &HostBatch) -> &HostBatch {
        batch
    }

    /// From the examples' lengths alone (token shards are not read).
    fn epoch_fill(&self) -> RowFill {
        plan_fill(&*self.train, &self.epoch_plan(0), self.batching.min_shape())
    }

    fn stats(&self) -> DataStats {
        self.stats.clone()
    }
}

impl<B: Backend> Method<B> for Sft {
    type Data = Sft;
    type Sums = SftSums;

    fn data(&self) -> &Sft {
        self
    }

    fn loss_counts(&self, batch: &HostBatch) -> Vec<u64> {
        vec![batch.target_count() as u64]
    }

    fn micro_step(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &mut LoraParams<B>,
        batch: &HostBatch,
        ctx: StepContext<'_>,
        hooks: LayerHook<'_, B>,
    ) -> Result<SftSums> {
        let device = upload(be, model, batch)?;
        sft_micro_step(be, model, lora, &device, ctx, hooks)
    }

    fn evaluate(
        &self,
        be: &B,
        model: &Decoder<B>,
        lora: &LoraParams<B>,
    ) -> Result<Option<SftSums>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        evaluate(be, model, Some(lora), &self.eval, &self.batching).map(Some)
    }

    fn describe(&self) -> String {
        format!(
            "sft · {} examples ({} tokens) in rows of ≤{} tokens",
            self.stats.train.examples, self.stats.train.tokens, self.batching.max_seq_len
        )
    }
}
