//! The run config (`fuselora train --config FILE.toml [--set key=value ...]`).
//! Every choice is a serde enum, so an unknown key or an invalid value fails at parse time with
//! the list of valid ones (serde's `deny_unknown_fields`, `unknown variant`); numbers that serde
//! cannot check are checked in [`RunConfig::validate`] with messages that name the key.
//! The training method is a tagged section, `[method]` with `name = "sft" | "dpo" | "orpo"` and
//! that method's own keys.

use super::schedule::ScheduleKind;
use crate::data::records::Format;
use crate::model::{CheckpointingSetting, Projection, QuantizeNf4};
use crate::residence::Residence;
use anyhow::{bail, Context, Result};
use kernels::DType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    /// The training method and its settings (default: supervised fine-tuning).
    #[serde(default)]
    pub method: MethodSection,
    pub output: OutputSection,
}

/// Which backend runs the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA when built with it and a GPU opens, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The compute dtype on the GPU (the CPU backend always computes in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    #[serde(alias = "bfloat16")]
    Bf16,
    #[serde(alias = "fp16", alias = "float16")]
    F16,
    #[serde(alias = "fp32", alias = "float32")]
    F32,
}

impl ComputeDType {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDType::Bf16 => DType::BF16,
            ComputeDType::F16 => DType::F16,
            ComputeDType::F32 => DType::F32,
        }
    }
}

/// How the frozen projection weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    None,
    /// 4-bit NormalFloat (QLoRA).
    Nf4,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model folder.
    pub path: PathBuf,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    #[serde(default = "default_dtype")]
    pub dtype: ComputeDType,
    /// `nf4` keeps the projection weights in 4 bits (QLoRA); a bitsandbytes 4-bit checkpoint is
    /// read as NF4 whatever this says.
    #[serde(default = "default_quantize")]
    pub quantize: Quantize,
    /// With `quantize = "nf4"`: store each block's absmax in 8 bits too (bitsandbytes' double quant).
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// Where the input embedding table stays: "device" (the default) or "host" (pinned host
    /// memory, each batch's rows gathered there: `vocab × hidden` values less on the device; a
    /// table tied to the LM head stays on the device).
    #[serde(default)]
    pub embedding: Residence,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// Module names, or `["all-linear"]`.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default)]
    pub dropout: f32,
    /// Start from an existing PEFT adapter instead of a fresh one.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
}

/// The record format of the data files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Told from each record's fields.
    Auto,
    Alpaca,
    Sharegpt,
    Messages,
    Text,
}

impl DataFormat {
    /// The format every record must have, or `None` to tell it record by record.
    pub fn fixed(self) -> Option<Format> {
        match self {
            DataFormat::Auto => None,
            DataFormat::Alpaca => Some(Format::Alpaca),
            DataFormat::Sharegpt => Some(Format::ShareGpt),
            DataFormat::Messages => Some(Format::Messages),
            DataFormat::Text => Some(Format::Text),
        }
    }
}

/// How alpaca records become text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlpacaTemplate {
    /// The Stanford Alpaca prompt.
    Alpaca,
    /// The model's chat template.
    Chat,
}

/// What happens to an example longer than `data.max_seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    Truncate,
    Drop,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// One or more `.json` / `.jsonl` / `.txt` files (a `.txt` file is one text document).
    pub train: Vec<PathBuf>,
    #[serde(default = "default_format")]
    pub format: DataFormat,
    /// Renames of record fields, e.g. `{ instruction = "question", output = "answer" }`.
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_alpaca_template")]
    pub alpaca_template: AlpacaTemplate,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Alpaca and chat examples longer than `max_seq_len` (texts are chunked instead).
    #[serde(default = "default_truncation")]
    pub truncation: Truncation,
    /// Tokens each chunk of a text longer than `max_seq_len` repeats from the previous chunk as
    /// unlabelled context (0: chunks do not overlap).
    #[serde(default)]
    pub text_overlap: usize,
    /// Pack several examples per row (true) or pad one per row, grouped by length (false).
    #[serde(default = "default_true")]
    pub packing: bool,
    /// Train on prompts and user turns too (default: responses only).
    #[serde(default)]
    pub train_on_prompt: bool,
    #[serde(default)]
    pub skip_bad_records: bool,
    #[serde(default)]
    pub validation: Vec<PathBuf>,
    /// Hold out this fraction of the training records for evaluation (when `validation` is empty).
    #[serde(default)]
    pub validation_split: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Rows per micro-batch (for `dpo` and `orpo`: preference pairs per micro-batch).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    /// Overrides `epochs` when set.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    /// 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_eps: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// "auto" (the default: as few layers checkpointed as the GPU's memory needs, offloaded),
    /// `true`/"full", `false`/"off" or "offload" (model/checkpointing.rs).
    #[serde(default = "default_checkpointing")]
    pub gradient_checkpointing: CheckpointingSetting,
    /// With "full" or "offload": checkpoint only the first N layers (the rest keep every
    /// activation: faster, more memory). Unset: every layer.
    #[serde(default)]
    pub checkpoint_layers: Option<usize>,
    /// Where AdamW's f32 masters and moments wait between steps: "device" (the default) or
    /// "host" (pinned host memory, streamed through the device at each step: 12 bytes less per
    /// trainable value on the device, the step longer by their copies; optim.rs).
    #[serde(default)]
    pub optimizer_state: Residence,
    #[serde(default = "default_one_u64")]
    pub log_steps: u64,
    /// 0: evaluate only at the end.
    #[serde(default)]
    pub eval_steps: u64,
    /// 0: save only at the end.
    #[serde(default)]
    pub save_steps: u64,
    /// How many checkpoints to keep (the newest).
    #[serde(default = "default_keep")]
    pub save_total_limit: usize,
    /// Write every step's micro-batches to `batches.jsonl` and the step-0 adapter to
    /// `adapter-init/`, so another trainer can replay the run (scripts/compare-hf-peft.py).
    #[serde(default)]
    pub dump_batches: bool,
    /// Steps in a row whose loss or gradient norm is not finite (each skipped) that stop the run.
    #[serde(default = "default_max_nonfinite_steps")]
    pub max_nonfinite_steps: u64,
}

/// The training method: `[method]` with `name` and the method's own keys.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum MethodSection {
    /// Supervised fine-tuning: token-mean cross-entropy on the responses.
    Sft(SftSection),
    /// Direct Preference Optimization against the frozen base as reference.
    Dpo(DpoSection),
    /// Odds Ratio Preference Optimization: reference-free, SFT loss plus an odds-ratio term.
    Orpo(OrpoSection),
}

impl Default for MethodSection {
    fn default() -> Self {
        MethodSection::Sft(SftSection {})
    }
}

impl MethodSection {
    /// The method's config name.
    pub fn name(&self) -> &'static str {
        match self {
            MethodSection::Sft(_) => "sft",
            MethodSection::Dpo(_) => "dpo",
            MethodSection::Orpo(_) => "orpo",
        }
    }
}

/// `[method] name = "sft"`: no keys of its own (the data section says what is trained).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SftSection {}

/// Which preference loss DPO minimises (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// DPO; cDPO with label smoothing > 0.
    Sigmoid,
    /// rDPO.
    Robust,
    /// IPO.
    Ipo,
}

/// How preference pairs are cut to fit (`dpo` and `orpo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct PairLengths {
    /// Prompts longer than this keep their last tokens.
    pub max_prompt_len: usize,
    /// Prompt + completion; completions are cut from the end to fit. Also the packed row length.
    pub max_len: usize,
}

/// `[method] name = "dpo"`: the loss, the length limits of pairs, the reference.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// β: how far the policy may move from the reference.
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default = "default_loss_type")]
    pub loss_type: LossType,
    /// ε: the assumed fraction of flipped preference labels (sigmoid and robust).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Prompts longer than this keep their last tokens (default: 512, at most half of `max_len`).
    #[serde(default)]
    pub max_prompt_len: Option<usize>,
    /// Prompt + completion; completions are cut from the end to fit. Also the packed row length.
    /// Default: `data.max_seq_len` (TRL's `max_length`).
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Compute the reference log-probabilities once before training and cache them in
    /// `OUTPUT/reference_logps.json` (reused while model and data are unchanged).
    #[serde(default)]
    pub precompute_ref: bool,
}

/// `[method] name = "orpo"`: the odds-ratio weight and the length limits of pairs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoSection {
    /// β (TRL's ORPOConfig.beta, λ in the paper): the weight of the odds-ratio term.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// As DPO's: default 512, at most half of `max_len`.
    #[serde(default)]
    pub max_prompt_len: Option<usize>,
    /// As DPO's: default `data.max_seq_len`.
    #[serde(default)]
    pub max_len: Option<usize>,
}

impl PairLengths {
    /// The limits a method section sets, defaults filled in: `max_len` defaults to
    /// `data.max_seq_len` (TRL's `max_length`), `max_prompt_len` to 512 (TRL's
    /// `max_prompt_length`) or half of `max_len` when that is shorter.
    pub fn resolve(
        max_prompt_len: Option<usize>,
        max_len: Option<usize>,
        max_seq_len: usize,
    ) -> Self {
        let max_len = max_len.unwrap_or(max_seq_len);
        PairLengths {
            max_prompt_len: max_prompt_len.unwrap_or(512.min(max_len / 2)),
            max_len,
        }
    }
}

impl DpoSection {
    /// The pair limits, given `data.max_seq_len`.
    pub fn lengths(&self, max_seq_len: usize) -> PairLengths {
        PairLengths::resolve(self.max_prompt_len, self.max_len, max_seq_len)
    }
}

impl OrpoSection {
    /// The pair limits, given `data.max_seq_len`.
    pub fn lengths(&self, max_seq_len: usize) -> PairLengths {
        PairLengths::resolve(self.max_prompt_len, self.max_len, max_seq_len)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// A fresh run deletes a non-empty `dir` instead of refusing it (`train --overwrite`).
    #[serde(default)]
    pub overwrite: bool,
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss_type() -> LossType {
    LossType::Sigmoid
}
fn default_backend() -> BackendKind {
    BackendKind::Auto
}
fn default_dtype() -> ComputeDType {
    ComputeDType::Bf16
}
fn default_quantize() -> Quantize {
    Quantize::None
}
fn default_r() -> usize {
    16
}
fn default_alpha() -> f32 {
    16.0
}
fn default_targets() -> Vec<String> {
    Projection::ALL
        .iter()
        .map(|p| p.name().to_string())
        .collect()
}
fn default_format() -> DataFormat {
    DataFormat::Auto
}
fn default_alpaca_template() -> AlpacaTemplate {
    AlpacaTemplate::Chat
}
fn default_max_seq_len() -> usize {
    1024
}
fn default_truncation() -> Truncation {
    Truncation::Truncate
}
fn default_checkpointing() -> CheckpointingSetting {
    CheckpointingSetting::Auto
}

fn default_true() -> bool {
    true
}
fn default_batch_size() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_one_u64() -> u64 {
    1
}
fn default_epochs() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    2e-4
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_seed() -> u64 {
    42
}
fn default_keep() -> usize {
    2
}
fn default_max_nonfinite_steps() -> u64 {
    3
}

impl Default for LoraSection {
    fn default() -> Self {
        toml::from_str("").expect("every lora key has a default")
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").expect("every train key has a default")
    }
}

impl ModelSection {
    /// The NF4 quantization to apply at load, if `quantize` asks for one.
    pub fn quantize_nf4(&self) -> Option<QuantizeNf4> {
        (self.quantize == Quantize::Nf4).then_some(QuantizeNf4 {
            double_quant: self.double_quant,
        })
    }
}

impl RunConfig {
    /// The files and folders the run reads, with the key that names each: an output folder must
    /// not hold them (output_dir.rs).
    pub fn input_paths(&self) -> Vec<(&'static str, &Path)> {
        let mut inputs = vec![("model.path", self.model.path.as_path())];
        inputs.extend(self.data.train.iter().map(|p| ("data.train", p.as_path())));
        inputs.extend(
            self.data
                .validation
                .iter()
                .map(|p| ("data.validation", p.as_path())),
        );
        if let Some(p) = &self.lora.init_adapter {
            inputs.push(("lora.init_adapter", p.as_path()));
        }
        inputs
    }

    /// Reads `path`, applies `key=value` overrides (dotted keys, TOML values), resolves relative
    /// paths against the config's folder, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let file: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        // The config from the file and every override but `skip`.
        let build = |skip: Option<usize>| -> Result<RunConfig> {
            let mut table = file.clone();
            for (i, o) in overrides.iter().enumerate() {
                if Some(i) != skip {
                    apply_override(&mut table, o)?;
                }
            }
            let mut config: RunConfig = toml::Value::Table(table).try_into()?;
            config.resolve_paths(base);
            config.validate()?;
            Ok(config)
        };
        build(None).map_err(|e| {
            // Blame the override without which the error goes away or changes, else the file.
            let message = format!("{e:#}");
            let culprit = (0..overrides.len()).find(|&i| {
                build(Some(i)).map_or_else(|other| format!("{other:#}") != message, |_| true)
            });
            match culprit {
                Some(i) => e.context(format!("in --set {}", overrides[i])),
                None => e.context(format!("in {}", path.display())),
            }
        })
    }

    /// Parses a config from TOML text (paths left as written).
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: RunConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = lexically_normal(&base.join(&*p));
            }
        };
        fix(&mut self.model.path);
        self.data.train.iter_mut().for_each(fix);
        self.data.validation.iter_mut().for_each(fix);
        if let Some(p) = self.lora.init_adapter.as_mut() {
            fix(p);
        }
        fix(&mut self.output.dir);
    }

    /// Checks every value that serde cannot.
    // `!(x > 0.0)` on purpose: NaN fails the checks too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        if self.lora.r == 0 {
            bail!("`lora.r` must be at least 1");
        }
        if self.lora.dropout != 0.0 {
            bail!("`lora.dropout = {}` is not supported yet: set it to 0 (dropout would break exact resume and comparisons)", self.lora.dropout);
        }
        if self.lora.targets.is_empty() {
            bail!("`lora.targets` is empty, so nothing would train (and PEFT refuses such an adapter): list modules such as [\"q_proj\", \"v_proj\"], or [\"all-linear\"]");
        }
        for t in &self.lora.targets {
            if t != "all-linear" && Projection::from_name(t).is_none() {
                bail!(
                    "`lora.targets` entry `{t}` is unknown; choose among all-linear, {}",
                    Projection::ALL.map(|p| p.name()).join(", ")
                );
            }
        }
        if self.data.train.is_empty() {
            bail!("`data.train` must name at least one .json, .jsonl or .txt file");
        }
        if self.data.max_seq_len < 2 {
            bail!("`data.max_seq_len` must be at least 2");
        }
        if self.data.text_overlap >= self.data.max_seq_len / 2 {
            bail!(
                "`data.text_overlap = {}` must be below half of `data.max_seq_len = {}` (each chunk must add new tokens)",
                self.data.text_overlap,
                self.data.max_seq_len
            );
        }
        if !(0.0..1.0).contains(&self.data.validation_split) {
            bail!("`data.validation_split` must be in [0, 1)");
        }
        let t = &self.train;
        if t.batch_size == 0 || t.grad_accum == 0 {
            bail!("`train.batch_size` and `train.grad_accum` must be at least 1");
        }
        if t.max_steps.is_none() && t.epochs <= 0.0 {
            bail!("`train.epochs` must be positive (or set `train.max_steps`)");
        }
        if t.max_steps == Some(0) {
            bail!("`train.max_steps` must be at least 1");
        }
        if !(t.lr > 0.0) {
            bail!("`train.lr` must be positive");
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            bail!("set either `train.warmup_steps` or `train.warmup_ratio`, not both");
        }
        if let Some(r) = t.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                bail!("`train.warmup_ratio` must be in [0, 1]");
            }
        }
        if t.max_grad_norm < 0.0 || t.weight_decay < 0.0 {
            bail!("`train.max_grad_norm` and `train.weight_decay` must not be negative");
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            bail!("`train.adam_beta1` and `train.adam_beta2` must be in [0, 1)");
        }
        if t.max_nonfinite_steps == 0 {
            bail!("`train.max_nonfinite_steps` must be at least 1");
        }
        if t.save_total_limit == 0 {
            bail!("`train.save_total_limit` must be at least 1");
        }
        match &self.method {
            MethodSection::Sft(_) => Ok(()),
            MethodSection::Dpo(d) => {
                check_beta(d.beta)?;
                if !(0.0..0.5).contains(&d.label_smoothing) {
                    bail!("`method.label_smoothing` must be in [0, 0.5)");
                }
                if d.loss_type == LossType::Ipo && d.label_smoothing != 0.0 {
                    bail!("`method.label_smoothing` applies to the sigmoid and robust losses; set it to 0 with `method.loss_type = \"ipo\"`");
                }
                check_lengths(d.lengths(self.data.max_seq_len))
            }
            MethodSection::Orpo(o) => {
                check_beta(o.beta)?;
                check_lengths(o.lengths(self.data.max_seq_len))
            }
        }
    }

    /// The pair limits of a preference method (`None` for SFT).
    pub fn pair_lengths(&self) -> Option<PairLengths> {
        match &self.method {
            MethodSection::Sft(_) => None,
            MethodSection::Dpo(d) => Some(d.lengths(self.data.max_seq_len)),
            MethodSection::Orpo(o) => Some(o.lengths(self.data.max_seq_len)),
        }
    }

    /// The LoRA targets as projections.
    pub fn targets(&self) -> Vec<Projection> {
        if self.lora.targets.iter().any(|t| t == "all-linear") {
            return Projection::ALL.to_vec();
        }
        Projection::ALL
            .into_iter()
            .filter(|p| self.lora.targets.iter().any(|t| t == p.name()))
            .collect()
    }
}

// `!(beta > 0.0)` on purpose: NaN fails the check too.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn check_beta(beta: f64) -> Result<()> {
    if !(beta > 0.0) {
        bail!("`method.beta` must be positive (TRL's default is 0.1)");
    }
    Ok(())
}

fn check_lengths(l: PairLengths) -> Result<()> {
    if l.max_prompt_len == 0 || l.max_prompt_len >= l.max_len {
        bail!(
            "`method.max_prompt_len = {}` must be at least 1 and below `method.max_len = {}` (room must remain for the completion; method.max_len defaults to data.max_seq_len)",
            l.max_prompt_len,
            l.max_len
        );
    }
    Ok(())
}

/// `configs/../runs/x` → `runs/x`, without touching the file system (the path may not exist yet).
fn lexically_normal(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Applies `a.b.c=value` to a TOML table; the value is parsed as TOML, else taken as a string.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) = item
        .split_once('=')
        .with_context(|| "expected KEY=VALUE, e.g. train.lr=1e-4")?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, sections) = parts.split_last().unwrap();
    let mut cur = table;
    for s in sections {
        cur = cur
            .entry(s.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("`{s}` is not a section"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\npath = \"m\"\n[data]\ntrain = [\"t.jsonl\"]\n[output]\ndir = \"out\"\n";

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c = RunConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.train.schedule, ScheduleKind::Cosine);
        assert_eq!(
            (c.model.backend, c.model.dtype),
            (BackendKind::Auto, ComputeDType::Bf16)
        );
        assert_eq!(c.targets().len(), 7);
        assert_eq!(c.model.quantize_nf4(), None);
        assert!(matches!(c.method, MethodSection::Sft(_)));
    }

    #[test]
    fn quantize_nf4_defaults_to_double_quant_and_other_methods_are_refused() {
        let c =
            RunConfig::from_toml(&MINIMAL.replace("[data]", "quantize = \"nf4\"\n[data]")).unwrap();
        assert_eq!(
            c.model.quantize_nf4(),
            Some(QuantizeNf4 { double_quant: true })
        );
        let e = RunConfig::from_toml(&MINIMAL.replace("[data]", "quantize = \"gptq\"\n[data]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gptq") && e.contains("nf4"), "{e}");
    }

    #[test]
    fn unknown_keys_name_themselves_and_the_valid_ones() {
        let e = RunConfig::from_toml(&format!("{MINIMAL}[train]\nlearning_rate = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate") && e.contains("lr"), "{e}");
    }

    #[test]
    fn invalid_choices_fail_at_parse_time_listing_the_valid_ones() {
        for (section, key, bad, valid) in [
            ("train", "schedule", "wavy", "cosine"),
            ("model", "backend", "tpu", "cuda"),
            ("model", "dtype", "fp8", "bf16"),
            ("data", "format", "csv", "sharegpt"),
            ("data", "truncation", "wrap", "drop"),
            ("data", "alpaca_template", "vicuna", "chat"),
        ] {
            let line = format!("{key} = \"{bad}\"\n");
            let text = if MINIMAL.contains(&format!("[{section}]")) {
                MINIMAL.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}"))
            } else {
                format!("{MINIMAL}[{section}]\n{line}")
            };
            let e = RunConfig::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(valid), "{key}: {e}");
        }
        let e = RunConfig::from_toml(&format!("{MINIMAL}[lora]\ntargets = [\"lm_head\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head") && e.contains("q_proj"), "{e}");
        let c =
            RunConfig::from_toml(&MINIMAL.replace("[data]", "dtype = \"fp16\"\n[data]")).unwrap();
        assert_eq!(c.model.dtype.dtype(), DType::F16);
    }

    #[test]
    fn the_method_is_a_tagged_section_with_its_own_keys() {
        let dpo = format!("{MINIMAL}[method]\nname = \"dpo\"\n");
        let MethodSection::Dpo(d) = RunConfig::from_toml(&dpo).unwrap().method else {
            panic!("not dpo");
        };
        assert_eq!(
            (d.beta, d.loss_type, d.label_smoothing),
            (0.1, LossType::Sigmoid, 0.0)
        );
        assert_eq!((d.max_prompt_len, d.max_len), (None, None));
        assert_eq!(
            d.lengths(1024),
            PairLengths {
                max_prompt_len: 512,
                max_len: 1024
            }
        );
        // Pair lengths follow data.max_seq_len (ORPO's too, sharing the pair data path).
        let short = format!("{MINIMAL}[method]\nname = \"orpo\"\nbeta = 0.25\n")
            .replace("[output]", "max_seq_len = 256\n[output]");
        let c = RunConfig::from_toml(&short).unwrap();
        let MethodSection::Orpo(o) = &c.method else {
            panic!("not orpo");
        };
        assert_eq!(o.beta, 0.25);
        assert_eq!(
            o.lengths(c.data.max_seq_len),
            PairLengths {
                max_prompt_len: 128,
                max_len: 256
            }
        );
        let e = RunConfig::from_toml(&MINIMAL.replace("[output]", "text_overlap = 600\n[output]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.text_overlap = 600"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[method]\nname = \"ppo\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ppo") && e.contains("orpo") && e.contains("dpo"),
            "{e}"
        );
        // A key of another method is refused, naming itself.
        let e = RunConfig::from_toml(&format!(
            "{MINIMAL}[method]\nname = \"orpo\"\nprecompute_ref = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("precompute_ref"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[method]\nname = \"sft\"\nbeta = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta"), "{e}");
        let e = RunConfig::from_toml(&format!("{dpo}loss_type = \"hinge\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hinge") && e.contains("ipo"), "{e}");
        let e = RunConfig::from_toml(&format!("{dpo}max_prompt_len = 2048\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("method.max_prompt_len = 2048"), "{e}");
        let e = RunConfig::from_toml(&format!(
            "{dpo}loss_type = \"ipo\"\nlabel_smoothing = 0.1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("method.label_smoothing"), "{e}");
    }

    #[test]
    fn an_error_of_an_override_names_the_override_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let set = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            format!("{:#}", RunConfig::load(&path, &o).unwrap_err())
        };
        let e = set(&["train.lr=0.5", "train.learning_rate=1"]);
        assert!(
            e.starts_with("in --set train.learning_rate=1:") && e.contains("learning_rate"),
            "{e}"
        );
        assert!(!e.contains("base.toml"), "{e}");
        let e = set(&["train.schedule=wavy"]);
        assert!(e.starts_with("in --set train.schedule=wavy:"), "{e}");
        std::fs::write(&path, format!("{MINIMAL}[train]\nlearnin_rate = 1\n")).unwrap();
        let e = set(&["train.lr=0.5"]);
        assert!(e.contains("base.toml") && !e.contains("--set"), "{e}");
    }

    #[test]
    fn an_empty_target_list_is_refused() {
        let e = RunConfig::from_toml(&format!("{MINIMAL}[lora]\ntargets = []\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`lora.targets` is empty") && e.contains("all-linear"),
            "{e}"
        );
    }

    #[test]
    fn overrides_set_nested_keys_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = RunConfig::load(
            &path,
            &[
                "train.lr=0.5".into(),
                "data.packing=false".into(),
                "model.backend=cpu".into(),
                "method.name=orpo".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 0.5);
        assert!(!c.data.packing);
        assert_eq!(c.model.backend, BackendKind::Cpu);
        assert_eq!(c.method.name(), "orpo");
        assert_eq!(c.model.path, dir.path().join("m"));
        assert_eq!(
            lexically_normal(Path::new("configs/../demo-out/run")),
            PathBuf::from("demo-out/run")
        );
        assert_eq!(
            lexically_normal(Path::new("../x/./y")),
            PathBuf::from("../x/y")
        );
    }
}
