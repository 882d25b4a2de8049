//! The training loop, one for every method ([`Method`]). Per optimizer step: the step's
//! micro-batches (gradient accumulation) — the loss counts of all of them on all ranks summed
//! first, so every micro-batch knows the whole step's normaliser — each run forward, loss and
//! backward, the last one's gradients summed over the ranks layer by layer during its backward;
//! then loss unscaling (fp16), clipping, AdamW and the schedule. Rank 0 alone creates the output
//! folder, logs, evaluates into the log and writes files.
//!
//! Data parallel (several ranks, see [`Distributed`]): each rank runs its share of the step's
//! micro-batches with the same global weights, and the gradients are summed over the ranks; so N
//! ranks × accumulation k compute the same update as one rank × accumulation N·k.

use super::checkpoint::{self, Resume, TrainerState};
use super::config::{MethodSection, RunConfig};
use super::distributed::Distributed;
use super::dpo::Dpo;
use super::dump::BatchDump;
use super::grad_reduce::GradReducer;
use super::init::fresh_adapter;
use super::method::{BatchSource, Method, StepContext, Sums};
use super::metrics::{MetricsLog, Progress, StepRecord};
use super::nonfinite::NonFiniteGuard;
use super::orpo::Orpo;
use super::plot::plot_loss;
use super::schedule::Schedule;
use super::sft::Sft;
use super::stream::BatchStream;
use super::trace::ExampleTrace;
use crate::data::preference::PreferenceStats;
use crate::data::tokenize::TokenizeStats;
use crate::lora::{peft, LoraConfig, LoraParams};
use crate::model::weights::WeightFiles;
use crate::model::{CheckpointPolicy, Decoder, ModelConfig};
use crate::optim::{AdamW, LossScaler, UpdateTiming};
use crate::output_dir::{Overwrite, StagedDir};
use crate::plan::fit::Choice;
use crate::residence::Residence;
use anyhow::{bail, Context, Result};
use kernels::{AdamWParams, Backend};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run did, written as `summary.json` and printed at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub method: String,
    pub backend: String,
    pub steps: u64,
    pub train: TokenizeStats,
    pub eval: Option<TokenizeStats>,
    pub skipped_records: usize,
    /// Loss-carrying tokens trained on (responses; completions of preference pairs).
    pub tokens_trained: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub final_loss: Option<f64>,
    pub eval_loss_start: Option<f64>,
    pub eval_loss_end: Option<f64>,
    pub adapter_dir: PathBuf,
    /// The most device memory held at once (`None` on the CPU).
    pub peak_memory_bytes: Option<u64>,
    /// Steps skipped because their loss or gradients were not finite (or f16 overflowed).
    pub skipped_steps: u64,
    /// Preference methods: the pairs' counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceStats>,
    /// Real tokens over the token slots (rows × sequence length, padding included) of the first
    /// epoch's micro-batches.
    pub row_fill: f64,
}

/// Loads the model named by `cfg` (quantized at load when `model.quantize` says so), laid out
/// for folding the run's adapter into its products. Prints how long the load took.
pub fn load_model<B: Backend>(be: &B, cfg: &RunConfig) -> Result<Decoder<B>> {
    let start = std::time::Instant::now();
    let model_config = ModelConfig::load(&cfg.model.path)?;
    let quantize = cfg.model.quantize_nf4();
    let mut model = Decoder::load_with(
        be,
        model_config,
        &WeightFiles::open(&cfg.model.path)?,
        quantize,
        Some(&lora_config(cfg)?),
    )
    .with_context(|| format!("loading the model in {}", cfg.model.path.display()))?;
    if cfg.model.embedding == Residence::Host && !model.keep_embedding_on_host(be)? {
        eprintln!(
            "model.embedding = \"host\": {} ties its embedding to the LM head, which reads it on the \
             device, so it stays there",
            cfg.model.path.display()
        );
    }
    eprintln!(
        "loaded {} in {:.1} s{}",
        cfg.model.path.display(),
        start.elapsed().as_secs_f64(),
        if quantize.is_some() {
            " (dense projections quantized to NF4 on the backend)"
        } else {
            ""
        }
    );
    Ok(model)
}

/// The config of the adapter the run trains: `lora.init_adapter`'s, else the `[lora]` section's.
fn lora_config(cfg: &RunConfig) -> Result<LoraConfig> {
    Ok(match &cfg.lora.init_adapter {
        Some(dir) => peft::read_config(dir)?,
        None => LoraConfig {
            r: cfg.lora.r,
            alpha: cfg.lora.alpha,
            targets: cfg.targets(),
            use_rslora: cfg.lora.rslora,
            dropout: cfg.lora.dropout,
        },
    })
}

/// The adapter the run starts from (`lora.init_adapter`, else a fresh one from the seed) and its
/// AdamW with the config's hyper-parameters and clipping.
fn adapter_and_optimizer<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &ModelConfig,
) -> Result<(LoraParams<B>, AdamW<B>)> {
    let lora = match &cfg.lora.init_adapter {
        Some(dir) => peft::load(be, model, dir)?,
        None => {
            let lora_config = lora_config(cfg)?;
            crate::arch::validate::check_lora_rank(model, cfg.lora.r, &lora_config.targets)?;
            fresh_adapter(be, model, lora_config, cfg.train.seed)?
        }
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

fn schedule_for(cfg: &RunConfig, total_steps: u64) -> Schedule {
    let warmup = match (cfg.train.warmup_steps, cfg.train.warmup_ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => Schedule::warmup_from_ratio(r, total_steps),
        (None, None) => 0,
    };
    Schedule {
        kind: cfg.train.schedule,
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
    // Held until the run ends: a start that fails before writing anything removes the folder.
    let _folder = dist
        .is_main()
        .then(|| crate::output_dir::claim_for_run(cfg, &resume))
        .transpose()?;
    // Chosen before the weights load, while the device's free memory is all the run's.
    let choice = crate::plan::fit::for_run(cfg, be.free_memory_bytes(), dist.world_size())?;
    let model = load_model(be, cfg)?;
    if dist.is_main() {
        report_checkpointing(be, cfg, &choice, model.config.num_layers, dist.world_size());
    }
    let ck = choice.policy;
    let adapter = adapter_and_optimizer(be, cfg, &model.config)?;
    match &cfg.method {
        MethodSection::Sft(_) => {
            let sft = Sft::prepare(cfg, model.config.vocab_size)?;
            run_loop(be, cfg, resume, dist, &model, adapter, &sft, ck)
        }
        MethodSection::Dpo(d) => {
            let dpo = Dpo::prepare(be, &model, cfg, d, dist)?;
            run_loop(be, cfg, resume, dist, &model, adapter, &dpo, ck)
        }
        MethodSection::Orpo(o) => {
            let orpo = Orpo::prepare(cfg, o)?;
            run_loop(be, cfg, resume, dist, &model, adapter, &orpo, ck)
        }
    }
}

/// Prints the run's checkpointing (`train.gradient_checkpointing`, "auto" resolved by the plan)
/// and, on a GPU, the plan's memory accounting for it.
fn report_checkpointing<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    choice: &Choice,
    num_layers: usize,
    nproc: usize,
) {
    let policy = choice.policy;
    eprintln!(
        "checkpointing: {} ({})",
        policy.describe(num_layers),
        choice.why
    );
    if let Some(report) = crate::plan::startup_report(cfg, policy, &be.describe(), nproc) {
        eprintln!("{report}");
    }
}

/// Whether a periodic action (`every` steps; 0 = never) falls on `step` — the last step has its own.
fn due(every: u64, step: u64, total_steps: u64) -> bool {
    every > 0 && step.is_multiple_of(every) && step < total_steps
}

/// A metrics.jsonl line: `base`'s fields, then `extra` (the method's metrics and counts; counts
/// stay whole numbers, as [`crate::train::metrics::EvalRecord`] reads them).
fn record_with(
    base: &impl Serialize,
    extra: &[(String, serde_json::Value)],
) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(base)?;
    let obj = value.as_object_mut().expect("records are JSON objects");
    for (k, v) in extra {
        obj.insert(k.clone(), v.clone());
    }
    Ok(value)
}

/// The training loop of `method` (see the top of this file), from the adapter and optimizer of
/// [`adapter_and_optimizer`].
#[allow(clippy::too_many_arguments)]
fn run_loop<B: GradReducer, M: Method<B>>(
    be: &B,
    cfg: &RunConfig,
    resume: Resume,
    dist: &Distributed,
    model: &Decoder<B>,
    (mut lora, mut opt): (LoraParams<B>, AdamW<B>),
    method: &M,
    checkpointing: CheckpointPolicy,
) -> Result<Summary> {
    let started = Instant::now();
    let out = &cfg.output.dir;
    let main = dist.is_main();
    let mut scaler = LossScaler::for_dtype(be.compute_dtype());
    let mut guard = NonFiniteGuard::new(cfg.train.max_nonfinite_steps);
    let data = method.data();
    let plan_epoch = |epoch| data.epoch_plan(epoch);
    let mut stream = BatchStream::new(dist.rank(), dist.world_size());
    let mut trace = ExampleTrace::from_env(dist.rank())?;
    let accum = cfg.train.grad_accum;
    let batches_per_epoch = stream.batches_per_epoch(&plan_epoch);
    if batches_per_epoch == 0 {
        bail!(
            "the training data makes {} micro-batches per epoch, fewer than the {} ranks: use fewer ranks or a smaller train.batch_size",
            data.epoch_plan(0).len(),
            dist.world_size()
        );
    }
    let steps_per_epoch = batches_per_epoch.div_ceil(accum) as u64;
    let row_fill = data.epoch_fill().ratio();
    let total_steps = cfg
        .train
        .max_steps
        .unwrap_or_else(|| (cfg.train.epochs * steps_per_epoch as f64).ceil() as u64)
        .max(1);
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
    if main {
        let ranks = if dist.world_size() > 1 {
            format!(" × {} ranks ({})", dist.world_size(), dist.describe())
        } else {
            String::new()
        };
        eprintln!(
            "fuselora {}: {} on {}{ranks} · {} steps of {accum} × {}, {:.1}% filled · LoRA r={} ({} values)",
            method.describe(),
            model.config.architecture.hf_name(),
            be.describe(),
            total_steps,
            cfg.train.batch_size,
            100.0 * row_fill,
            lora.config.r,
            lora.num_values()
        );
    }
    let mut log = main
        .then(|| MetricsLog::open(out, state.step))
        .transpose()?;
    let base_model = cfg.model.path.display().to_string();
    let mut dump = match cfg.train.dump_batches && main {
        true => Some(BatchDump::open(out, state.step == 0)?),
        false => None,
    };
    if dump.is_some() && state.step == 0 {
        peft::save(be, &lora, &base_model, &out.join("adapter-init"))?;
    }
    opt.place(be, &mut lora, cfg.train.optimizer_state)?;
    let progress = Progress::new(total_steps, state.step, main);
    let eval_at = |step: u64, lora: &LoraParams<B>, log: &mut MetricsLog| -> Result<Option<f64>> {
        let Some(sums) = method.evaluate(be, model, lora)? else {
            return Ok(None);
        };
        let mut extra: Vec<(String, serde_json::Value)> = sums
            .counts()
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v.into()))
            .collect();
        extra.extend(
            sums.metrics()
                .into_iter()
                .map(|(k, v)| (format!("eval_{k}"), v.into())),
        );
        #[derive(Serialize)]
        struct Eval {
            step: u64,
            eval_loss: f64,
        }
        let eval_loss = sums.loss();
        log.write(&record_with(&Eval { step, eval_loss }, &extra)?)?;
        let shown: Vec<String> = sums
            .metrics()
            .iter()
            .map(|(k, v)| format!(" · {k} {v:.4}"))
            .chain(sums.counts().iter().map(|(k, v)| format!(" · {v} {k}")))
            .collect();
        progress.println(&format!(
            "eval at step {step}: loss {eval_loss:.4}{}",
            shown.concat()
        ));
        Ok(Some(eval_loss))
    };
    let eval_loss_start = match &mut log {
        Some(log) if state.step == 0 => eval_at(0, &lora, log)?,
        _ => None,
    };

    let loop_start = Instant::now();
    let first_step = state.step;
    let tokens_at_start = state.tokens_seen;
    let mut final_loss = None;
    while state.step < total_steps {
        dist.fail_if_asked(state.step + 1)?;
        let epoch = stream.position.epoch;
        let plans = stream.next_step(accum, &plan_epoch);
        if let Some(trace) = &mut trace {
            trace.record(epoch, plans.iter().flat_map(M::Data::plan_items));
        }
        let micro = plans
            .iter()
            .map(|p| data.read(p))
            .collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        // The step's loss counts, then its loss tokens and real tokens, summed over the ranks.
        let mut local = vec![0u64; method.loss_counts(&micro[0]).len()];
        let (mut loss_tokens, mut tokens) = (0u64, 0u64);
        for b in &micro {
            for (t, c) in local.iter_mut().zip(method.loss_counts(b)) {
                *t += c;
            }
            loss_tokens += M::Data::host(b).target_count() as u64;
            tokens += M::Data::host(b).token_count() as u64;
        }
        local.extend([loss_tokens, tokens]);
        let mut totals = dist.global_sum_u64(&local)?;
        let tokens = totals.pop().expect("pushed above");
        let loss_tokens = totals.pop().expect("pushed above");
        let ctx = StepContext {
            totals: &totals,
            loss_scale: scaler.loss_weight(1.0),
            checkpointing,
        };
        let mut update = |layer, lora: &mut LoraParams<B>| opt.update_layer(be, lora, layer);
        let results = dist.accumulate(be, &mut lora, &micro, &mut update, |b, lora, hooks| {
            method.micro_step(be, model, lora, b, ctx, hooks)
        })?;
        let mut sums = M::Sums::default();
        results.iter().for_each(|s| sums.add(s));
        let sums = M::Sums::from_values(&dist.global_sum_f64(&sums.to_values())?);
        let lr = schedule.lr(state.step);
        // With the state on the host, the update reaches each layer in the next step's forward
        // (an evaluation or a save first finishes it).
        let stats = guard.step(state.step + 1, sums.loss(), || {
            opt.step_scaled(be, &mut lora, lr, &mut scaler, UpdateTiming::InNextForward)
        })?;
        state.step += 1;
        if let Some(d) = dump.as_mut() {
            d.write(state.step, micro.iter().map(M::Data::host))?;
        }
        state.position = stream.position;
        state.tokens_seen += loss_tokens;
        final_loss = Some(sums.loss());
        let record = StepRecord {
            step: state.step,
            epoch: state.step as f64 / steps_per_epoch as f64,
            loss: sums.loss(),
            lr,
            grad_norm: stats.grad_norm,
            tokens,
            loss_tokens,
            tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        if state.step == first_step + 1 {
            // Activations are freed here: time each matrix product's algorithms once (after the
            // first step's speed is taken, so it does not count the tuning).
            be.tune()?;
        }
        let Some(log) = &mut log else {
            continue;
        };
        let log_now = state.step % cfg.train.log_steps.max(1) == 0 || state.step == total_steps;
        if log_now {
            let metrics: Vec<(String, serde_json::Value)> = sums
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            log.write(&record_with(&record, &metrics)?)?;
        }
        progress.step(&record, log_now);
        if due(cfg.train.eval_steps, state.step, total_steps) {
            opt.finish_update(be, &mut lora)?;
            eval_at(state.step, &lora, log)?;
        }
        if due(cfg.train.save_steps, state.step, total_steps) {
            let dir = opt.on_device(be, &mut lora, |lora, opt| {
                checkpoint::save(
                    be,
                    out,
                    &base_model,
                    lora,
                    opt,
                    &state,
                    cfg.train.save_total_limit,
                )
            })?;
            progress.println(&format!("saved {}", dir.display()));
        }
    }
    opt.finish_update(be, &mut lora)?;
    progress.finish();
    let seconds = loop_start.elapsed().as_secs_f64();
    let stats = data.stats();
    let mut summary = Summary {
        method: cfg.method.name().to_string(),
        backend: be.describe(),
        steps: state.step,
        train: stats.train,
        eval: stats.eval,
        skipped_records: stats.skipped_records,
        tokens_trained: state.tokens_seen,
        seconds,
        tokens_per_s: (state.tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        final_loss,
        eval_loss_start,
        eval_loss_end: None,
        adapter_dir: out.join("adapter"),
        peak_memory_bytes: be.peak_memory_bytes(),
        preference: stats.preference,
        row_fill,
        skipped_steps: guard.skipped,
    };
    let Some(log) = &mut log else {
        return Ok(summary);
    };
    summary.eval_loss_end = eval_at(state.step, &lora, log)?;
    opt.on_device(be, &mut lora, |lora, opt| {
        write_final_outputs(be, cfg, &base_model, lora, opt, &state, &summary)
    })?;
    Ok(summary)
}

/// What rank 0 writes when a run ends: the last checkpoint, the PEFT adapter in
/// `summary.adapter_dir`, `loss.png` from metrics.jsonl, and `summary.json`.
fn write_final_outputs<B: Backend>(
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
    let adapter = StagedDir::begin(&summary.adapter_dir, Overwrite::Replace, &[])?;
    peft::save(be, lora, base_model, adapter.path())?;
    adapter.commit()?;
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
        format!("trained {} steps ({}) in {:.1} s on {} ({:.0} loss tokens/s)", s.steps, s.method, s.seconds, s.backend, s.tokens_per_s),
        format!(
            "data: {} examples, {} tokens; {} long texts chunked, {} truncated, {} dropped as too long, {} without a trained token, {} bad records skipped",
            s.train.examples, s.train.tokens, s.train.texts_chunked, s.train.truncated, s.train.dropped_too_long, s.train.dropped_no_target, s.skipped_records
        ),
        format!("micro-batches {:.1}% filled with real tokens", 100.0 * s.row_fill),
    ];
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
    if s.skipped_steps > 0 {
        lines.push(format!(
            "{} steps skipped: their loss or gradients were not finite",
            s.skipped_steps
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Checkpointing, LayerHooks};
    use comms::{Comms, RankInfo, SingleProcess};
    use kernels::cpu::CpuBackend;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    /// The tiny-llama fixture model with the byte-level ChatML tokenizer, 8 preference pairs, and
    /// a config training `method` (the `[method]` section's lines) on them.
    fn preference_run(dir: &Path, method: &str) -> RunConfig {
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        for (src, file) in [
            ("tiny-llama/model", "config.json"),
            ("tiny-llama/model", "model.safetensors"),
            ("byte-tokenizer", "tokenizer.json"),
            ("byte-tokenizer", "tokenizer_config.json"),
        ] {
            std::fs::copy(fixtures().join(src).join(file), model.join(file)).unwrap();
        }
        let lines: Vec<String> = (0..8)
            .map(|i| serde_json::json!({"prompt": format!("Is {i} odd?"), "chosen": format!("{}", i % 2 == 1), "rejected": "who knows"}).to_string())
            .collect();
        std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
        let text = format!(
            "[model]\npath = \"model\"\nbackend = \"cpu\"\n[lora]\nr = 4\nalpha = 8.0\n\
             [data]\ntrain = [\"pairs.jsonl\"]\n[train]\nbatch_size = 2\nmax_steps = 2\nlr = 0.01\n\
             [method]\n{method}\nmax_prompt_len = 32\nmax_len = 64\n[output]\ndir = \"out\"\n"
        );
        std::fs::write(dir.join("run.toml"), text).unwrap();
        RunConfig::load(&dir.join("run.toml"), &[]).unwrap()
    }

    /// The layers each hook saw, in order.
    #[derive(Default)]
    struct SeenLayers {
        forward: Vec<usize>,
        backward: Vec<usize>,
    }

    impl LayerHooks<CpuBackend> for SeenLayers {
        fn before_forward(&mut self, l: usize, _: &mut LoraParams<CpuBackend>) -> Result<()> {
            self.forward.push(l);
            Ok(())
        }

        fn after_backward(&mut self, l: usize, _: &mut LoraParams<CpuBackend>) -> Result<()> {
            self.backward.push(l);
            Ok(())
        }
    }

    /// One micro-step of `method` with a trained-looking adapter (every B non-zero, so that every
    /// gradient is): the LoRA gradients and the layers the hooks saw.
    fn one_micro_step<M: Method<CpuBackend>>(
        be: &CpuBackend,
        cfg: &RunConfig,
        model: &Decoder<CpuBackend>,
        method: &M,
        loss_scale: f32,
    ) -> (Vec<Vec<f32>>, SeenLayers) {
        let (mut lora, _) = adapter_and_optimizer(be, cfg, &model.config).unwrap();
        for p in lora.params.iter_mut() {
            p.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x += 0.01 * (i % 7) as f32);
        }
        lora.sync_compute(be).unwrap();
        lora.zero_grads(be).unwrap();
        let batch = method.data().read(&method.data().epoch_plan(0)[0]).unwrap();
        let totals = method.loss_counts(&batch);
        let ctx = StepContext {
            totals: &totals,
            loss_scale,
            checkpointing: CheckpointPolicy::all(Checkpointing::Full),
        };
        let mut layers = SeenLayers::default();
        method
            .micro_step(be, model, &mut lora, &batch, ctx, &mut layers)
            .unwrap();
        (lora.grads.clone(), layers)
    }

    /// The fp16 path's loss scale reaches every gradient of `method` exactly (a power of two
    /// scales without rounding), and the per-layer hooks fire before each layer's forward in
    /// order and after each layer's backward, last layer first, as for SFT.
    fn scales_its_loss_and_reduces_per_layer<M: Method<CpuBackend>>(
        cfg: &RunConfig,
        prepare: impl Fn(&CpuBackend, &Decoder<CpuBackend>) -> M,
    ) {
        let be = CpuBackend::new();
        let model = load_model(&be, cfg).unwrap();
        let method = prepare(&be, &model);
        let (plain, layers) = one_micro_step(&be, cfg, &model, &method, 1.0);
        let (scaled, _) = one_micro_step(&be, cfg, &model, &method, 1024.0);
        let n = model.config.num_layers;
        assert_eq!(layers.forward, (0..n).collect::<Vec<_>>());
        assert_eq!(layers.backward, (0..n).rev().collect::<Vec<_>>());
        assert!(plain.iter().flatten().any(|&g| g != 0.0));
        for (p, s) in plain.iter().flatten().zip(scaled.iter().flatten()) {
            assert_eq!(p * 1024.0, *s);
        }
    }

    #[test]
    fn dpo_scales_its_loss_and_reduces_per_layer_like_sft() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = preference_run(dir.path(), "name = \"dpo\"");
        let MethodSection::Dpo(section) = &cfg.method else {
            panic!("dpo config")
        };
        scales_its_loss_and_reduces_per_layer(&cfg, |be, model| {
            Dpo::prepare(be, model, &cfg, section, &Distributed::single()).unwrap()
        });
    }

    #[test]
    fn orpo_scales_its_loss_and_reduces_per_layer_like_sft() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = preference_run(dir.path(), "name = \"orpo\"");
        let MethodSection::Orpo(section) = &cfg.method else {
            panic!("orpo config")
        };
        scales_its_loss_and_reduces_per_layer(&cfg, |_, _| Orpo::prepare(&cfg, section).unwrap());
    }

    /// A run with AdamW's state on the host writes the same checkpoints (adapter and moments) and
    /// final adapter, byte for byte, as one with the state on the device.
    #[test]
    fn the_optimizer_state_on_the_host_saves_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = preference_run(dir.path(), "name = \"dpo\"");
        cfg.train.save_steps = 1;
        let mut outputs = Vec::new();
        for state in [Residence::Device, Residence::Host] {
            cfg.train.optimizer_state = state;
            cfg.output.dir = dir.path().join(format!("out-{state:?}"));
            let summary = train(&CpuBackend::new(), &cfg, Resume::No).unwrap();
            assert_eq!(summary.steps, 2);
            let read = |f: &str| std::fs::read(cfg.output.dir.join(f)).unwrap();
            outputs.push([
                read("checkpoint-1/adapter_model.safetensors"),
                read("checkpoint-1/optimizer.safetensors"),
                read("checkpoint-2/optimizer.safetensors"),
                read("adapter/adapter_model.safetensors"),
            ]);
        }
        assert!(outputs[0] == outputs[1], "the saved files differ");
    }

    #[test]
    fn only_rank_0_creates_and_writes_the_output_folder() {
        let dir = tempfile::tempdir().unwrap();
        let be = CpuBackend::new();
        for method in ["name = \"dpo\"", "name = \"orpo\""] {
            let cfg = preference_run(dir.path(), method);
            // Rank 1 of 2, its collectives the identity: it trains its share and writes nothing.
            let rank_1 = Distributed::new(
                RankInfo {
                    rank: 1,
                    world_size: 2,
                    ..RankInfo::single()
                },
                Comms::Single(SingleProcess),
            );
            let summary = train_ranks(&be, &cfg, Resume::No, &rank_1).unwrap();
            assert_eq!(summary.steps, 2);
            assert!(!cfg.output.dir.exists(), "{method}: rank 1 wrote files");
            let summary = train_ranks(&be, &cfg, Resume::No, &Distributed::single()).unwrap();
            assert_eq!(summary.steps, 2);
            // Pairs of two short sequences each, in packed rows of 64: some padding, never none.
            assert!(
                summary.row_fill > 0.2 && summary.row_fill < 1.0,
                "{method}: {}",
                summary.row_fill
            );
            assert!(cfg.output.dir.join("summary.json").is_file(), "{method}");
            std::fs::remove_dir_all(&cfg.output.dir).unwrap();
        }
    }
}
