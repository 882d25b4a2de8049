//! The training loop. Per optimizer step: the step's micro-batches (gradient accumulation) each
//! run forward, loss and backward, with every token weighted by `1 / (loss tokens in the whole step)`
//! so the step's loss is the token mean over all its micro-batches; then clipping, AdamW and the
//! schedule. Rank 0 alone logs, evaluates into the log, and writes files.
//!
//! Data parallel (several ranks, see [`Distributed`]): each rank runs its share of the step's
//! micro-batches, every token weighted by `1 / (loss tokens of the step over all ranks)`, and the
//! gradients are summed over the ranks after the last micro-batch; so N ranks × accumulation k
//! compute the same update as one rank × accumulation N·k. Clipping then sees the global norm.

use super::checkpoint::{self, TrainerState};
use super::config::RunConfig;
use super::distributed::Distributed;
use super::dump::BatchDump;
use super::grad_reduce::GradReducer;
use super::init::fresh_adapter;
use super::metrics::{EvalRecord, MetricsLog, Progress, StepRecord};
use super::plot::plot_loss;
use super::schedule::{Schedule, ScheduleKind};
use super::stream::{DataStream, SharedExamples};
use super::trace::ExampleTrace;
use crate::data::batching::{self, epoch_batches, Batching, Example, HostBatch};
use crate::data::records::{read_file, Format, Record};
use crate::data::source::ExampleSource;
use crate::data::token_shards::{is_token_shard, TokenShards};
use crate::data::tokenize::{tokenize_records, Formatting, TokenizeStats};
use crate::lora::{peft, LoraConfig, LoraParams};
use crate::model::weights::WeightFiles;
use crate::model::{Batch, Decoder, ModelConfig};
use crate::optim::{AdamW, LossScaler};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use kernels::{AdamWParams, Backend};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where to resume from, if anywhere.
#[derive(Clone, Debug)]
pub enum Resume {
    No,
    Latest,
    From(PathBuf),
}

/// What a run did, written as `summary.json` and printed at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub backend: String,
    pub steps: u64,
    pub train: TokenizeStats,
    pub eval: Option<TokenizeStats>,
    pub skipped_records: usize,
    pub tokens_trained: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub final_loss: Option<f64>,
    pub eval_loss_start: Option<f64>,
    pub eval_loss_end: Option<f64>,
    pub adapter_dir: PathBuf,
    /// The most device memory held at once (`None` on the CPU).
    pub peak_memory_bytes: Option<u64>,
    /// DPO runs: the preference pairs' counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<crate::data::preference::PreferenceStats>,
    /// SFT runs: real tokens over the token slots of the first epoch's micro-batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_fill: Option<f64>,
}

/// Everything loaded before the first step.
pub struct Prepared<B: Backend> {
    pub model: Decoder<B>,
    /// `None` when the data is pre-tokenized and the model folder has no tokenizer.
    pub tokenizer: Option<Tokenizer>,
    /// The id that pads rows.
    pub pad_id: i32,
    /// In memory, or memory-mapped token shards that each rank reads only its part of.
    pub train: SharedExamples,
    pub eval: Vec<Example>,
    pub train_stats: TokenizeStats,
    pub eval_stats: Option<TokenizeStats>,
    pub skipped: usize,
}

/// Reads every record of `paths` in the config's format; returns them and the count skipped as bad.
pub fn read_all(paths: &[PathBuf], cfg: &RunConfig) -> Result<(Vec<Record>, usize)> {
    let format = if cfg.data.format == "auto" {
        None
    } else {
        Format::parse(&cfg.data.format)
    };
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let r = read_file(p, format, &cfg.data.columns, cfg.data.skip_bad_records)?;
        if let Some(warning) = r.unused_fields_warning(p) {
            eprintln!("{warning}");
        }
        records.extend(r.records);
        skipped.extend(r.skipped);
    }
    for s in skipped.iter().take(5) {
        eprintln!("skipped bad record {s}");
    }
    if skipped.len() > 5 {
        eprintln!("… and {} more bad records skipped", skipped.len() - 5);
    }
    Ok((records, skipped.len()))
}

/// How the config's records become tokens.
pub fn formatting_for(cfg: &RunConfig) -> Formatting {
    Formatting {
        alpaca_as_chat: cfg.data.alpaca_template == "chat",
        train_on_prompt: cfg.data.train_on_prompt,
        max_seq_len: cfg.data.max_seq_len,
        drop_long: cfg.data.truncation == "drop",
        text_overlap: cfg.data.text_overlap,
    }
}

/// Loads the model, tokenizer and datasets named by `cfg`.
pub fn prepare<B: Backend>(be: &B, cfg: &RunConfig) -> Result<Prepared<B>> {
    let model_config = ModelConfig::load(&cfg.model.path)?;
    let model = Decoder::load_with(
        be,
        model_config,
        &WeightFiles::open(&cfg.model.path)?,
        cfg.model.quantize_nf4(),
    )
    .with_context(|| format!("loading the model in {}", cfg.model.path.display()))?;
    if let Some(pretokenized) = prepare_token_shards(cfg)? {
        let (shards, eval) = pretokenized;
        let tokenizer = if cfg.model.path.join("tokenizer.json").is_file() {
            Some(Tokenizer::load(&cfg.model.path)?)
        } else {
            None
        };
        let eval_stats = (!eval.is_empty()).then(|| TokenizeStats {
            examples: eval.len(),
            tokens: eval.iter().map(|e| e.ids.len()).sum(),
            ..TokenizeStats::default()
        });
        return Ok(Prepared {
            model,
            tokenizer,
            pad_id: shards.pad_id(),
            train_stats: TokenizeStats {
                examples: shards.count(),
                tokens: shards.total_tokens(),
                ..TokenizeStats::default()
            },
            train: Arc::new(shards),
            eval,
            eval_stats,
            skipped: 0,
        });
    }
    let tokenizer = Tokenizer::load(&cfg.model.path)?;
    let formatting = formatting_for(cfg);
    let (mut records, mut skipped) = read_all(&cfg.data.train, cfg)?;
    let mut eval_records = Vec::new();
    if !cfg.data.validation.is_empty() {
        let (r, s) = read_all(&cfg.data.validation, cfg)?;
        eval_records = r;
        skipped += s;
    } else if cfg.data.validation_split > 0.0 {
        // A seeded, order-independent split: the held-out records are fixed by the seed.
        let order = crate::data::batching::shuffled(records.len(), cfg.train.seed, u64::MAX);
        let n_eval = ((records.len() as f64) * cfg.data.validation_split)
            .round()
            .max(1.0) as usize;
        let held: std::collections::BTreeSet<usize> =
            order[..n_eval.min(records.len())].iter().copied().collect();
        let (e, t): (Vec<(usize, Record)>, Vec<(usize, Record)>) = records
            .into_iter()
            .enumerate()
            .partition(|(i, _)| held.contains(i));
        eval_records = e.into_iter().map(|(_, r)| r).collect();
        records = t.into_iter().map(|(_, r)| r).collect();
    }
    if records.is_empty() {
        bail!(
            "the training data ({}) holds no record",
            cfg.data
                .train
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (train, train_stats) = tokenize_records(&tokenizer, &records, &formatting)?;
    let (eval, eval_stats) = if eval_records.is_empty() {
        (Vec::new(), None)
    } else {
        let (e, s) = tokenize_records(&tokenizer, &eval_records, &formatting)?;
        (e, Some(s))
    };
    let pad_id = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0) as i32;
    Ok(Prepared {
        model,
        tokenizer: Some(tokenizer),
        pad_id,
        train: Arc::new(train),
        eval,
        train_stats,
        eval_stats,
        skipped,
    })
}

/// Memory-maps `data.train` when it lists token shard files (`fuselora prepare-data`), with the
/// validation shards read into memory; `None` when the data is JSON to tokenize now.
fn prepare_token_shards(cfg: &RunConfig) -> Result<Option<(TokenShards, Vec<Example>)>> {
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
    Ok(Some((train, eval)))
}

/// Token-mean loss of `model` + `lora` over `examples` (no gradient).
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Decoder<B>,
    lora: Option<&LoraParams<B>>,
    examples: &[Example],
    batching: &Batching,
) -> Result<(f64, u64)> {
    let mut nll = 0.0;
    let mut tokens = 0u64;
    for hb in epoch_batches(examples, batching, 0, 0) {
        let batch = upload(be, model, &hb)?;
        let acts = model.forward(be, lora, &batch, false)?;
        let (logp, _) = model.head(be, &acts, &batch.targets, kernels::CeGrad::None)?;
        nll -= be.download(&logp)?.iter().map(|&x| x as f64).sum::<f64>();
        tokens += batch.n_targets as u64;
    }
    Ok((nll / tokens.max(1) as f64, tokens))
}

fn upload<B: Backend>(be: &B, model: &Decoder<B>, hb: &HostBatch) -> Result<Batch<B>> {
    Batch::new(
        be,
        &model.config,
        &hb.ids,
        &hb.labels,
        hb.layout(model.config.sliding_window),
    )
}

/// The adapter the run starts from (`lora.init_adapter`, else a fresh one from the seed) and its
/// AdamW with the config's hyper-parameters and clipping.
pub(crate) fn adapter_and_optimizer<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &ModelConfig,
) -> Result<(LoraParams<B>, AdamW<B>)> {
    let lora_config = LoraConfig {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha,
        targets: cfg.targets(),
        use_rslora: cfg.lora.rslora,
        dropout: cfg.lora.dropout,
    };
    let lora = match &cfg.lora.init_adapter {
        Some(dir) => peft::load(be, model, dir)?,
        None => fresh_adapter(be, model, lora_config, cfg.train.seed)?,
    };
    let hp = AdamWParams {
        lr: cfg.train.lr,
        beta1: cfg.train.adam_beta1,
        beta2: cfg.train.adam_beta2,
        eps: cfg.train.adam_eps,
        weight_decay: cfg.train.weight_decay,
    };
    let max_norm = (cfg.train.max_grad_norm > 0.0).then_some(cfg.train.max_grad_norm as f32);
    let opt = AdamW::new(be, &lora, hp, max_norm)?;
    Ok((lora, opt))
}

/// Optimizer steps of the run: `max_steps`, else `epochs` × steps per epoch (rounded up).
pub(crate) fn total_steps_for(cfg: &RunConfig, steps_per_epoch: u64) -> u64 {
    cfg.train
        .max_steps
        .unwrap_or_else(|| (cfg.train.epochs * steps_per_epoch as f64).ceil() as u64)
        .max(1)
}

pub(crate) fn schedule_for(cfg: &RunConfig, total_steps: u64) -> Schedule {
    let kind = match cfg.train.schedule.as_str() {
        "linear" => ScheduleKind::Linear,
        "constant" => ScheduleKind::Constant,
        _ => ScheduleKind::Cosine,
    };
    let warmup = match (cfg.train.warmup_steps, cfg.train.warmup_ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => Schedule::warmup_from_ratio(r, total_steps),
        (None, None) => 0,
    };
    Schedule {
        kind,
        base_lr: cfg.train.lr,
        warmup_steps: warmup,
        total_steps,
    }
}

/// Trains as `cfg` says on one process; returns the summary (also written to `OUTPUT/summary.json`).
pub fn train<B: GradReducer>(be: &B, cfg: &RunConfig, resume: Resume) -> Result<Summary> {
    train_ranks(be, cfg, resume, &Distributed::single())
}

/// Trains as rank `dist.rank()` of a data-parallel job (every rank calls it with the same config);
/// rank 0 writes the files. Returns the summary of the whole job.
pub fn train_ranks<B: GradReducer>(
    be: &B,
    cfg: &RunConfig,
    resume: Resume,
    dist: &Distributed,
) -> Result<Summary> {
    if cfg.train.method == "dpo" {
        return super::dpo_run::train_dpo(be, cfg, resume, dist);
    }
    let started = Instant::now();
    let out = &cfg.output.dir;
    let main = dist.is_main();
    if main {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output folder {}", out.display()))?;
    }
    let prep = prepare(be, cfg)?;
    let model = &prep.model;
    let pad_id = prep.pad_id;
    let batching = Batching {
        rows: cfg.train.batch_size,
        max_seq_len: cfg.data.max_seq_len,
        packing: cfg.data.packing,
        pad_id,
    };
    let (mut lora, mut opt) = adapter_and_optimizer(be, cfg, &model.config)?;
    let mut scaler = LossScaler::for_dtype(be.compute_dtype());
    let mut stream = DataStream::new(
        prep.train.clone(),
        batching.clone(),
        cfg.train.seed,
        dist.rank(),
        dist.world_size(),
    );
    stream.trace = ExampleTrace::from_env(dist.rank())?;
    let accum = cfg.train.grad_accum;
    let steps_per_epoch = stream.steps_per_epoch(accum).max(1);
    let row_fill = batching::epoch_fill(&*prep.train, &batching, cfg.train.seed);
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
    if let Some(dir) = &resumed_from {
        if main {
            eprintln!("resumed from {} at step {}", dir.display(), state.step);
        }
    }
    let ranks = if dist.world_size() > 1 {
        format!(" × {} ranks ({})", dist.world_size(), dist.describe())
    } else {
        String::new()
    };
    if main {
        eprintln!(
            "fuselora: {} on {}{ranks} · {} examples ({} tokens) · {} steps of {} × {} rows × ≤{} tokens, {:.1}% filled · LoRA r={} ({} values)",
            model.config.architecture.hf_name(),
            be.describe(),
            prep.train_stats.examples,
            prep.train_stats.tokens,
            total_steps,
            accum,
            cfg.train.batch_size,
            cfg.data.max_seq_len,
            100.0 * row_fill,
            lora.config.r,
            lora.num_values()
        );
    }
    let mut log = main
        .then(|| MetricsLog::open(out, state.step))
        .transpose()?;
    let mut dump = match cfg.train.dump_batches && main {
        true => Some(BatchDump::open(out, state.step == 0)?),
        false => None,
    };
    if dump.is_some() && state.step == 0 {
        peft::save(
            be,
            &lora,
            &cfg.model.path.display().to_string(),
            &out.join("adapter-init"),
        )?;
    }
    let progress = Progress::new(total_steps, state.step, main);
    let base_model = cfg.model.path.display().to_string();
    let has_eval = main && !prep.eval.is_empty();
    let eval_at = |step: u64, lora: &LoraParams<B>, log: &mut MetricsLog| -> Result<f64> {
        let (loss, tokens) = evaluate(be, model, Some(lora), &prep.eval, &batching)?;
        log.write(&EvalRecord {
            step,
            eval_loss: loss,
            eval_tokens: tokens,
        })?;
        progress.println(&format!(
            "eval at step {step}: loss {loss:.4} over {tokens} tokens"
        ));
        Ok(loss)
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
        let local_targets: usize = micro.iter().map(HostBatch::target_count).sum();
        let t0 = Instant::now();
        let step_targets = dist.global_sum_u64(&[local_targets as u64])?[0] as usize;
        lora.zero_grads(be)?;
        let mut nll = 0.0;
        if step_targets > 0 {
            let weight = scaler.loss_weight(1.0 / step_targets as f32);
            for (i, hb) in micro.iter().enumerate() {
                // The last micro-batch's layers are summed over ranks as its backward finishes them.
                let last = i + 1 == micro.len();
                nll += model.loss_and_grad_with_hook(
                    be,
                    Some(&mut lora),
                    &upload(be, model, hb)?,
                    cfg.train.gradient_checkpointing,
                    weight,
                    &mut |layer, lp| {
                        if last {
                            dist.layer_done(be, lp, layer)
                        } else {
                            Ok(())
                        }
                    },
                )?;
            }
            dist.wait_for_sums(be)?;
        } else {
            dist.sum_grads(be, &mut lora)?;
        }
        let local_tokens = micro.iter().map(HostBatch::token_count).sum::<usize>() as u64;
        let step_tokens = dist.global_sum_u64(&[local_tokens])?[0];
        let nll = dist.global_sum_f64(&[nll])?[0];
        let lr = schedule.lr(state.step);
        let stats = opt.step_scaled(be, &mut lora, lr, &mut scaler)?;
        state.step += 1;
        if let Some(d) = dump.as_mut() {
            d.write(state.step, &micro)?;
        }
        state.position = stream.position;
        state.tokens_seen += step_targets as u64;
        let loss = nll / step_targets.max(1) as f64;
        final_loss = Some(loss);
        let record = StepRecord {
            step: state.step,
            epoch: state.step as f64 / steps_per_epoch as f64,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: step_tokens,
            loss_tokens: Some(step_targets as u64),
            tokens_per_s: step_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        let Some(log) = &mut log else {
            continue;
        };
        let log_now = state.step % cfg.train.log_steps.max(1) == 0 || state.step == total_steps;
        if log_now {
            log.write(&record)?;
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
        train: prep.train_stats.clone(),
        eval: prep.eval_stats.clone(),
        skipped_records: prep.skipped,
        tokens_trained: state.tokens_seen,
        seconds,
        tokens_per_s: (state.tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        final_loss,
        eval_loss_start,
        eval_loss_end: None,
        adapter_dir: adapter_dir.clone(),
        peak_memory_bytes: be.peak_memory_bytes(),
        preference: None,
        row_fill: Some(row_fill),
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

/// Whether a periodic action (`every` steps; 0 = never) falls on `step` — the last step has its own.
pub(crate) fn due(every: u64, step: u64, total_steps: u64) -> bool {
    every > 0 && step % every == 0 && step < total_steps
}

/// What rank 0 writes when a run ends: the last checkpoint, the PEFT adapter in
/// `summary.adapter_dir`, `loss.png` from metrics.jsonl, and `summary.json`.
pub(crate) fn write_final_outputs<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    base_model: &str,
    lora: &LoraParams<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    summary: &Summary,
) -> Result<()> {
    let out = &cfg.output.dir;
    checkpoint::save(
        be,
        out,
        base_model,
        lora,
        opt,
        state,
        cfg.train.save_total_limit,
    )?;
    peft::save(be, lora, base_model, &summary.adapter_dir)?;
    let (steps, evals) = super::metrics::read_steps(&out.join("metrics.jsonl"))?;
    let tmp_png = out.join(".loss.partial.png");
    plot_loss(&tmp_png, &steps, &evals)?;
    if tmp_png.exists() {
        std::fs::rename(&tmp_png, out.join("loss.png"))?;
    }
    crate::io::write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )
}

/// The end-of-run report, for people.
pub fn describe_summary(s: &Summary, out: &Path) -> String {
    let mut lines = vec![
        format!("trained {} steps in {:.1} s on {} ({:.0} loss tokens/s)", s.steps, s.seconds, s.backend, s.tokens_per_s),
        format!(
            "data: {} examples, {} tokens; {} long texts chunked, {} truncated, {} dropped as too long, {} without a trained token, {} bad records skipped",
            s.train.examples, s.train.tokens, s.train.texts_chunked, s.train.truncated, s.train.dropped_too_long, s.train.dropped_no_target, s.skipped_records
        ),
    ];
    if let Some(fill) = s.row_fill {
        lines.push(format!(
            "micro-batches {:.1}% filled with real tokens",
            100.0 * fill
        ));
    }
    if let Some(p) = &s.preference {
        lines.push(format!(
            "preference pairs: {} kept; {} prompts and {} completions truncated, {} pairs dropped (no room for a completion)",
            p.pairs, p.prompts_truncated, p.completions_truncated, p.dropped_no_completion
        ));
    }
    if let Some(bytes) = s.peak_memory_bytes {
        lines.push(format!(
            "peak device memory {:.2} GiB",
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    if let Some(l) = s.final_loss {
        lines.push(format!("final training loss {l:.4}"));
    }
    if let (Some(a), Some(b)) = (s.eval_loss_start, s.eval_loss_end) {
        lines.push(format!("held-out loss {a:.4} → {b:.4}"));
    }
    lines.push(format!(
        "wrote {}/adapter (PEFT), metrics.jsonl, loss.png, summary.json and the last checkpoint in {}",
        out.display(),
        out.display()
    ));
    lines.join("\n")
}
