//! The run config (`fuselora train --config FILE.toml [--set key=value ...]`).
//! Unknown keys are errors that list the valid ones (serde's `deny_unknown_fields`); values are
//! checked in [`RunConfig::validate`] with messages that name the key.

use super::dpo::LossType;
use crate::model::{Projection, QuantizeNf4};
use anyhow::{bail, Context, Result};
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
    /// Used when `train.method = "dpo"`.
    #[serde(default)]
    pub dpo: DpoSection,
    pub output: OutputSection,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model folder.
    pub path: PathBuf,
    /// `auto` (CUDA when built with it and a GPU is present, else CPU), `cpu` or `cuda`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Compute dtype on the GPU: `bf16`, `f16` or `f32` (the CPU backend always computes in f32).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `none`, or `nf4` to keep the projection weights in 4 bits (QLoRA); a bitsandbytes 4-bit
    /// checkpoint is read as NF4 whatever this says.
    #[serde(default = "default_quantize")]
    pub quantize: String,
    /// With `quantize = "nf4"`: store each block's absmax in 8 bits too (bitsandbytes' double quant).
    #[serde(default = "default_true")]
    pub double_quant: bool,
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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// One or more `.json` / `.jsonl` / `.txt` files (a `.txt` file is one text document).
    pub train: Vec<PathBuf>,
    /// `auto`, `alpaca`, `sharegpt`, `messages` or `text`.
    #[serde(default = "default_format")]
    pub format: String,
    /// Renames of record fields, e.g. `{ instruction = "question", output = "answer" }`.
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, String>,
    /// How alpaca records become text: `alpaca` (the Stanford prompt) or `chat` (the chat template).
    #[serde(default = "default_alpaca_template")]
    pub alpaca_template: String,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// `truncate` or `drop` alpaca and chat examples longer than `max_seq_len` (texts are chunked).
    #[serde(default = "default_truncation")]
    pub truncation: String,
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
    /// `sft` (supervised fine-tuning) or `dpo` (Direct Preference Optimization, see `[dpo]`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Rows per micro-batch (for `dpo`: preference pairs per micro-batch).
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
    /// `cosine`, `linear` or `constant`.
    #[serde(default = "default_schedule")]
    pub schedule: String,
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
    #[serde(default = "default_true")]
    pub gradient_checkpointing: bool,
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
}

/// Direct Preference Optimization: the loss, the length limits of pairs, the reference.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// β: how far the policy may move from the reference.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid` (DPO; cDPO with label_smoothing > 0), `robust` (rDPO) or `ipo`.
    #[serde(default = "default_loss_type")]
    pub loss_type: String,
    /// ε: the assumed fraction of flipped preference labels (sigmoid and robust).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Prompts longer than this keep their last tokens (default: 512, at most half of the length).
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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
}

fn default_method() -> String {
    "sft".into()
}
fn default_beta() -> f64 {
    0.1
}
fn default_loss_type() -> String {
    "sigmoid".into()
}
fn default_backend() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "bf16".into()
}
fn default_quantize() -> String {
    "none".into()
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
fn default_format() -> String {
    "auto".into()
}
fn default_alpaca_template() -> String {
    "chat".into()
}
fn default_max_seq_len() -> usize {
    1024
}
fn default_truncation() -> String {
    "truncate".into()
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
fn default_schedule() -> String {
    "cosine".into()
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

impl Default for LoraSection {
    fn default() -> Self {
        toml::from_str("").expect("every lora key has a default")
    }
}

impl Default for DpoSection {
    fn default() -> Self {
        toml::from_str("").expect("every dpo key has a default")
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").expect("every train key has a default")
    }
}

fn one_of(key: &str, value: &str, valid: &[&str]) -> Result<()> {
    if valid.contains(&value) {
        Ok(())
    } else {
        bail!(
            "`{key} = \"{value}\"` is not valid; choose one of: {}",
            valid.join(", ")
        )
    }
}

impl ModelSection {
    /// The NF4 quantization to apply at load, if `quantize` asks for one.
    pub fn quantize_nf4(&self) -> Option<QuantizeNf4> {
        (self.quantize == "nf4").then_some(QuantizeNf4 {
            double_quant: self.double_quant,
        })
    }
}

impl RunConfig {
    /// Reads `path`, applies `key=value` overrides (dotted keys, TOML values), resolves relative
    /// paths against the config's folder, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        for o in overrides {
            apply_override(&mut table, o).with_context(|| format!("in --set {o}"))?;
        }
        let mut config: RunConfig = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("in {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
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
    pub fn validate(&self) -> Result<()> {
        one_of(
            "model.backend",
            &self.model.backend,
            &["auto", "cpu", "cuda"],
        )?;
        one_of("model.dtype", &self.model.dtype, &["bf16", "f16", "f32"])?;
        one_of("model.quantize", &self.model.quantize, &["none", "nf4"])?;
        one_of(
            "data.format",
            &self.data.format,
            &["auto", "alpaca", "sharegpt", "messages", "text"],
        )?;
        one_of(
            "data.alpaca_template",
            &self.data.alpaca_template,
            &["alpaca", "chat"],
        )?;
        one_of(
            "data.truncation",
            &self.data.truncation,
            &["truncate", "drop"],
        )?;
        one_of(
            "train.schedule",
            &self.train.schedule,
            &["cosine", "linear", "constant"],
        )?;
        if self.lora.r == 0 {
            bail!("`lora.r` must be at least 1");
        }
        if self.lora.dropout != 0.0 {
            bail!("`lora.dropout = {}` is not supported yet: set it to 0 (dropout would break exact resume and comparisons)", self.lora.dropout);
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
        if t.save_total_limit == 0 {
            bail!("`train.save_total_limit` must be at least 1");
        }
        one_of("train.method", &t.method, &["sft", "dpo"])?;
        self.validate_dpo()
    }

    fn validate_dpo(&self) -> Result<()> {
        let d = &self.dpo;
        one_of("dpo.loss_type", &d.loss_type, &LossType::NAMES)?;
        if !(d.beta > 0.0) {
            bail!("`dpo.beta` must be positive (TRL's default is 0.1)");
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            bail!("`dpo.label_smoothing` must be in [0, 0.5)");
        }
        if d.loss_type == "ipo" && d.label_smoothing != 0.0 {
            bail!("`dpo.label_smoothing` applies to the sigmoid and robust losses; set it to 0 with `dpo.loss_type = \"ipo\"`");
        }
        let (prompt, len) = (self.dpo_max_prompt_len(), self.dpo_max_len());
        if prompt == 0 || prompt >= len {
            bail!(
                "`dpo.max_prompt_len = {prompt}` must be at least 1 and below `dpo.max_len = {len}` (room must remain for the completion; dpo.max_len defaults to data.max_seq_len)"
            );
        }
        Ok(())
    }

    /// DPO's prompt + completion limit and packed row length: `dpo.max_len`, else `data.max_seq_len`.
    pub fn dpo_max_len(&self) -> usize {
        self.dpo.max_len.unwrap_or(self.data.max_seq_len)
    }

    /// DPO's prompt limit: `dpo.max_prompt_len`, else 512 (TRL's default) or half of the length.
    pub fn dpo_max_prompt_len(&self) -> usize {
        self.dpo
            .max_prompt_len
            .unwrap_or_else(|| 512.min(self.dpo_max_len() / 2))
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
        assert_eq!(c.train.schedule, "cosine");
        assert_eq!(c.targets().len(), 7);
        assert_eq!(c.model.quantize_nf4(), None);
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
        assert!(e.contains("model.quantize") && e.contains("nf4"), "{e}");
    }

    #[test]
    fn unknown_keys_name_themselves_and_the_valid_ones() {
        let e = RunConfig::from_toml(&format!("{MINIMAL}[train]\nlearning_rate = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate") && e.contains("lr"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = RunConfig::from_toml(&format!("{MINIMAL}[train]\nschedule = \"wavy\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.schedule") && e.contains("cosine"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[lora]\ntargets = [\"lm_head\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head") && e.contains("q_proj"), "{e}");
    }

    #[test]
    fn dpo_defaults_follow_trl_and_bad_values_name_the_key() {
        let c = RunConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.train.method, "sft");
        assert_eq!(
            (c.dpo.beta, c.dpo.loss_type.as_str(), c.dpo.label_smoothing),
            (0.1, "sigmoid", 0.0)
        );
        assert_eq!((c.dpo_max_prompt_len(), c.dpo_max_len()), (512, 1024));
        let short =
            RunConfig::from_toml(&MINIMAL.replace("[output]", "max_seq_len = 256\n[output]"))
                .unwrap();
        assert_eq!(
            (short.dpo_max_prompt_len(), short.dpo_max_len()),
            (128, 256)
        );
        let e = RunConfig::from_toml(&MINIMAL.replace("[output]", "text_overlap = 600\n[output]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.text_overlap = 600"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[train]\nmethod = \"ppo\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.method") && e.contains("dpo"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[dpo]\nloss_type = \"hinge\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dpo.loss_type") && e.contains("ipo"), "{e}");
        let e = RunConfig::from_toml(&format!("{MINIMAL}[dpo]\nmax_prompt_len = 2048\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dpo.max_prompt_len = 2048"), "{e}");
        let e = RunConfig::from_toml(&format!(
            "{MINIMAL}[dpo]\nloss_type = \"ipo\"\nlabel_smoothing = 0.1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("dpo.label_smoothing"), "{e}");
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
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 0.5);
        assert!(!c.data.packing);
        assert_eq!(c.model.backend, "cpu");
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
