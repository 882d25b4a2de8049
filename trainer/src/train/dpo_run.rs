//! The DPO training loop (`train.method = "dpo"`). Per optimizer step: the step's micro-batches
//! of whole pairs (gradient accumulation); for each, the reference log-probabilities (the base
//! weights with the adapter off, or the precomputed cache) and [`dpo_micro_step`] with every pair
//! weighted by `1 / (pairs in the step)`, so the step's loss is the mean over its pairs; then
//! clipping, AdamW and the schedule, as for supervised runs. The same checkpoints, resume,
//! `metrics.jsonl` (with TRL's `rewards/*` and `logps/*` keys), held-out evaluation and summary.

use super::checkpoint::{self, TrainerState};
use super::config::RunConfig;
use super::distributed::Distributed;
use super::dpo::{
    dpo_micro_step, score_pairs, sequence_logps, DpoLoss, DpoMetrics, DpoSums, LossType, PairLogps,
};
use super::dpo_reference::{self, upload_pairs, Layout};
use super::grad_reduce::GradReducer;
use super::metrics::{MetricsLog, Progress, StepRecord};
use super::run::{
    adapter_and_optimizer, due, schedule_for, total_steps_for, write_final_outputs, Resume, Summary,
};
use super::stream::StreamPosition;
use crate::data::batching::shuffled;
use crate::data::pair_batching::epoch_pair_batches;
use crate::data::preference::{
    read_preference_file, tokenize_preferences, PairLimits, PreferencePair, PreferenceRecord,
    PreferenceStats,
};
use crate::data::tokenize::TokenizeStats;
use crate::lora::LoraParams;
use crate::model::weights::WeightFiles;
use crate::model::{Decoder, ModelConfig};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use kernels::Backend;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// A logged DPO step: the usual step record and TRL's DPO metrics.
#[derive(Serialize)]
struct DpoStepRecord<'a> {
    #[serde(flatten)]
    base: &'a StepRecord,
    #[serde(flatten)]
    dpo: DpoMetrics,
}

/// The loss of the run config.
pub fn loss_from_config(cfg: &RunConfig) -> DpoLoss {
    DpoLoss {
        kind: LossType::parse(&cfg.dpo.loss_type).unwrap_or(LossType::Sigmoid),
        beta: cfg.dpo.beta,
        label_smoothing: cfg.dpo.label_smoothing,
    }
}

/// Which micro-batches of pairs each step takes; the position is what a checkpoint keeps.
/// Rank `r` of `w` takes micro-batches `r, r+w, …` of each epoch (cut to a multiple of `w`).
pub struct PairStream {
    n_pairs: usize,
    pairs_per_batch: usize,
    seed: u64,
    rank: usize,
    world: usize,
    pub position: StreamPosition,
}

impl PairStream {
    pub fn new(
        n_pairs: usize,
        pairs_per_batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Self {
        PairStream {
            n_pairs,
            pairs_per_batch,
            seed,
            rank,
            world,
            position: StreamPosition::default(),
        }
    }

    fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let all = epoch_pair_batches(self.n_pairs, self.pairs_per_batch, self.seed, epoch);
        let usable = all.len() / self.world * self.world;
        all.into_iter()
            .take(usable)
            .skip(self.rank)
            .step_by(self.world)
            .collect()
    }

    pub fn steps_per_epoch(&self, accum: usize) -> u64 {
        self.epoch(0).len().div_ceil(accum) as u64
    }

    /// The next step's micro-batches (pair indices), never crossing an epoch boundary.
    pub fn next_step(&mut self, accum: usize) -> Vec<Vec<usize>> {
        let StreamPosition { epoch, batch } = self.position;
        let batches = self.epoch(epoch);
        let end = (batch + accum).min(batches.len());
        self.position = if end == batches.len() {
            StreamPosition {
                epoch: epoch + 1,
                batch: 0,
            }
        } else {
            StreamPosition { epoch, batch: end }
        };
        batches[batch..end].to_vec()
    }
}

/// Preference data, tokenized: training and held-out pairs.
pub struct PreparedPairs {
    pub train: Vec<PreferencePair>,
    pub eval: Vec<PreferencePair>,
    pub train_stats: PreferenceStats,
    pub eval_stats: Option<PreferenceStats>,
    pub skipped: usize,
}

fn read_all(paths: &[PathBuf], cfg: &RunConfig) -> Result<(Vec<PreferenceRecord>, usize)> {
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let (r, s) = read_preference_file(p, &cfg.data.columns, cfg.data.skip_bad_records)?;
        records.extend(r);
        skipped.extend(s);
    }
    for s in skipped.iter().take(5) {
        eprintln!("skipped bad record {s}");
    }
    Ok((records, skipped.len()))
}

/// Reads, splits (seeded, as for supervised data) and tokenizes the preference data of `cfg`.
pub fn prepare_pairs(tok: &Tokenizer, cfg: &RunConfig) -> Result<PreparedPairs> {
    let limits = PairLimits {
        max_prompt_len: cfg.dpo_max_prompt_len(),
        max_len: cfg.dpo_max_len(),
    };
    let (mut records, mut skipped) = read_all(&cfg.data.train, cfg)?;
    let mut eval_records = Vec::new();
    if !cfg.data.validation.is_empty() {
        let (r, s) = read_all(&cfg.data.validation, cfg)?;
        eval_records = r;
        skipped += s;
    } else if cfg.data.validation_split > 0.0 && !records.is_empty() {
        let order = shuffled(records.len(), cfg.train.seed, u64::MAX);
        let n_eval = ((records.len() as f64 * cfg.data.validation_split).round() as usize)
            .clamp(1, records.len());
        let mut held = vec![false; records.len()];
        order[..n_eval].iter().for_each(|&i| held[i] = true);
        let (e, t): (Vec<_>, Vec<_>) = records.into_iter().enumerate().partition(|(i, _)| held[*i]);
        eval_records = e.into_iter().map(|(_, r)| r).collect();
        records = t.into_iter().map(|(_, r)| r).collect();
    }
    if records.is_empty() {
        bail!(
            "the training data ({}) holds no preference pair",
            cfg.data
                .train
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (train, train_stats) = tokenize_preferences(tok, &records, limits)?;
    let (eval, eval_stats) = if eval_records.is_empty() {
        (Vec::new(), None)
    } else {
        let (e, s) = tokenize_preferences(tok, &eval_records, limits)?;
        (e, Some(s))
    };
    Ok(PreparedPairs {
        train,
        eval,
        train_stats,
        eval_stats,
        skipped,
    })
}

/// DPO loss and metrics of `lora` on `pairs`, and the completion tokens scored, without gradient. `reference`: precomputed
/// log-probabilities of the same pairs, or `None` to compute them batch by batch.
pub fn evaluate_pairs<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: &LoraParams<B>,
    pairs: &[PreferencePair],
    reference: Option<&[PairLogps]>,
    loss: &DpoLoss,
    layout: &Layout,
) -> Result<(DpoSums, u64)> {
    let mut sums = DpoSums::default();
    let mut tokens = 0u64;
    let per = layout.pairs_per_batch.max(1);
    for (c, chunk) in pairs.chunks(per).enumerate() {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let (batch, seqs, _) = upload_pairs(be, model, &refs, layout)?;
        let (policy, counts) = sequence_logps(be, model, Some(lora), &batch, &seqs)?;
        tokens += counts.iter().sum::<usize>() as u64;
        let reference = match reference {
            Some(r) => r[c * per..c * per + chunk.len()].to_vec(),
            None => sequence_logps(be, model, None, &batch, &seqs)?.0,
        };
        for (r, _) in score_pairs(loss, &policy, &reference, &counts)? {
            sums.add(&r);
        }
    }
    Ok((sums, tokens))
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

/// `{step, eval_loss, eval_tokens, eval_pairs, eval_rewards/…, eval_logps/…}` (TRL's eval names).
fn eval_record(step: u64, sums: &DpoSums, tokens: u64) -> Result<serde_json::Value> {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), step.into());
    obj.insert("eval_loss".into(), sums.mean_loss().into());
    obj.insert("eval_pairs".into(), (sums.pairs as u64).into());
    obj.insert("eval_tokens".into(), tokens.into());
    if let serde_json::Value::Object(m) = serde_json::to_value(sums.metrics())? {
        for (k, v) in m {
            obj.insert(format!("eval_{k}"), v);
        }
    }
    Ok(serde_json::Value::Object(obj))
}

/// Trains with DPO as `cfg` says; returns the summary (also written to `OUTPUT/summary.json`).
/// Runs DPO as rank `dist.rank()` of the job (one rank: `Distributed::single()`); rank 0 writes the
/// files. Pair counts, metric sums and gradients are summed over the ranks, so the loss is the mean
/// over every pair of the step on all ranks.
pub fn train_dpo<B: GradReducer>(
    be: &B,
    cfg: &RunConfig,
    resume: Resume,
    dist: &Distributed,
) -> Result<Summary> {
    let started = Instant::now();
    let out = &cfg.output.dir;
    let main = dist.is_main();
    if dist.world_size() > 1 && cfg.dpo.precompute_ref {
        bail!("dpo.precompute_ref = true is for one rank: set it to false for data-parallel DPO (each rank then computes its pairs' reference log-probabilities as it goes)");
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let model_config = ModelConfig::load(&cfg.model.path)?;
    let tokenizer = Tokenizer::load(&cfg.model.path)?;
    let model = Decoder::load_with(
        be,
        model_config,
        &WeightFiles::open(&cfg.model.path)?,
        cfg.model.quantize_nf4(),
    )
    .with_context(|| format!("loading the model in {}", cfg.model.path.display()))?;
    let data = prepare_pairs(&tokenizer, cfg)?;
    let loss = loss_from_config(cfg);
    let layout = Layout {
        pairs_per_batch: cfg.train.batch_size,
        packing: cfg.data.packing,
        row_len: cfg.dpo_max_len(),
        pad_id: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0) as i32,
    };
    let base_model = cfg.model.path.display().to_string();
    let (train_ref, eval_ref) = if cfg.dpo.precompute_ref {
        let (t, cached) = dpo_reference::load_or_compute(
            be,
            &model,
            &base_model,
            &data.train,
            &layout,
            &out.join("reference_logps.json"),
        )?;
        let (e, _) = dpo_reference::load_or_compute(
            be,
            &model,
            &base_model,
            &data.eval,
            &layout,
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

    let (mut lora, mut opt) = adapter_and_optimizer(be, cfg, &model.config)?;
    let mut stream = PairStream::new(
        data.train.len(),
        cfg.train.batch_size,
        cfg.train.seed,
        dist.rank(),
        dist.world_size(),
    );
    let accum = cfg.train.grad_accum;
    let steps_per_epoch = stream.steps_per_epoch(accum).max(1);
    let total_steps = total_steps_for(cfg, steps_per_epoch);
    let schedule = schedule_for(cfg, total_steps);
    let fresh = TrainerState {
        step: 0,
        position: stream.position,
        seed: cfg.train.seed,
        total_steps,
        tokens_seen: 0,
    };
    let (mut state, resumed_from) =
        checkpoint::starting_state(be, out, resume, &mut lora, &mut opt, fresh)?;
    stream.position = state.position;
    if let (Some(dir), true) = (&resumed_from, main) {
        eprintln!("resumed from {} at step {}", dir.display(), state.step);
    }
    let s = &data.train_stats;
    let ranks = if dist.world_size() > 1 {
        format!(" × {} ranks", dist.world_size())
    } else {
        String::new()
    };
    if main {
        eprintln!(
        "fuselora dpo ({}, β = {}): {} on {}{ranks} · {} pairs ({} tokens; {} prompts and {} completions truncated, {} pairs dropped) · {} steps of {} × {} pairs · LoRA r={}",
        cfg.dpo.loss_type, loss.beta, model.config.architecture.hf_name(), be.describe(),
        s.pairs, s.tokens, s.prompts_truncated, s.completions_truncated, s.dropped_no_completion,
        total_steps, accum, cfg.train.batch_size, lora.config.r
        );
    }
    let mut log = main
        .then(|| MetricsLog::open(out, state.step))
        .transpose()?;
    let progress = Progress::new(total_steps, state.step, main);
    let has_eval = main && !data.eval.is_empty();
    let eval_at = |step: u64, lora: &LoraParams<B>, log: &mut MetricsLog| -> Result<f64> {
        let (sums, tokens) = evaluate_pairs(
            be,
            &model,
            lora,
            &data.eval,
            eval_ref.as_deref(),
            &loss,
            &layout,
        )?;
        log.write(&eval_record(step, &sums, tokens)?)?;
        let m = sums.metrics();
        progress.println(&format!(
            "eval at step {step}: loss {:.4} · rewards/accuracies {:.3} · rewards/margins {:.4} over {} pairs",
            sums.mean_loss(), m.rewards_accuracies, m.rewards_margins, sums.pairs
        ));
        Ok(sums.mean_loss())
    };
    let eval_loss_start = match &mut log {
        Some(log) if has_eval && state.step == 0 => Some(eval_at(0, &lora, log)?),
        _ => None,
    };

    let loop_start = Instant::now();
    let tokens_at_start = state.tokens_seen;
    let mut final_loss = None;
    while state.step < total_steps {
        dist.fail_if_asked(state.step + 1)?;
        let micro = stream.next_step(accum);
        let local_pairs = micro.iter().map(Vec::len).sum::<usize>() as u64;
        let step_pairs = dist.global_sum_u64(&[local_pairs])?[0] as usize;
        lora.zero_grads(be)?;
        let t0 = Instant::now();
        let mut sums = DpoSums::default();
        let mut tokens = 0usize;
        for indices in &micro {
            let pairs: Vec<&PreferencePair> = indices.iter().map(|&i| &data.train[i]).collect();
            let (batch, seqs, n_tok) = upload_pairs(be, &model, &pairs, &layout)?;
            tokens += n_tok;
            let reference = match &train_ref {
                Some(r) => indices.iter().map(|&i| r[i]).collect(),
                None => sequence_logps(be, &model, None, &batch, &seqs)?.0,
            };
            let results = dpo_micro_step(
                be,
                &model,
                &mut lora,
                &batch,
                &seqs,
                &reference,
                &loss,
                1.0 / step_pairs.max(1) as f64,
                cfg.train.gradient_checkpointing,
            )?;
            results.iter().for_each(|r| sums.add(r));
        }
        dist.sum_grads(be, &mut lora)?;
        let sums = sums.summed_over(dist)?;
        let tokens = dist.global_sum_u64(&[tokens as u64])?[0] as usize;
        let lr = schedule.lr(state.step);
        let stats = opt.step(be, &mut lora, lr)?;
        state.step += 1;
        state.position = stream.position;
        state.tokens_seen += tokens as u64;
        final_loss = Some(sums.mean_loss());
        let record = StepRecord {
            step: state.step,
            epoch: state.step as f64 / steps_per_epoch as f64,
            loss: sums.mean_loss(),
            lr,
            grad_norm: stats.grad_norm,
            tokens: tokens as u64,
            loss_tokens: None,
            tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        let Some(log) = &mut log else {
            continue;
        };
        let log_now = state.step % cfg.train.log_steps.max(1) == 0 || state.step == total_steps;
        if log_now {
            log.write(&DpoStepRecord {
                base: &record,
                dpo: sums.metrics(),
            })?;
        }
        progress.step(&record, log_now);
        if has_eval && due(cfg.train.eval_steps, state.step, total_steps) {
            eval_at(state.step, &lora, log)?;
        }
        if due(cfg.train.save_steps, state.step, total_steps) {
            let dir = checkpoint::save(
                be,
                out,
                &base_model,
                &lora,
                &opt,
                &state,
                cfg.train.save_total_limit,
            )?;
            progress.println(&format!("saved {}", dir.display()));
        }
    }
    progress.finish();
    let adapter_dir = out.join("adapter");
    let seconds = loop_start.elapsed().as_secs_f64();
    let mut summary = Summary {
        backend: be.describe(),
        steps: state.step,
        train: as_tokenize_stats(&data.train_stats),
        eval: data.eval_stats.as_ref().map(as_tokenize_stats),
        skipped_records: data.skipped,
        tokens_trained: state.tokens_seen,
        seconds,
        tokens_per_s: (state.tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        final_loss,
        eval_loss_start,
        eval_loss_end: None,
        adapter_dir: adapter_dir.clone(),
        preference: Some(data.train_stats.clone()),
        peak_memory_bytes: be.peak_memory_bytes(),
        row_fill: None,
    };
    let Some(log) = &mut log else {
        return Ok(summary);
    };
    if has_eval {
        summary.eval_loss_end = Some(eval_at(state.step, &lora, log)?);
    }
    write_final_outputs(be, cfg, &base_model, &lora, &opt, &state, &summary)?;
    Ok(summary)
}
