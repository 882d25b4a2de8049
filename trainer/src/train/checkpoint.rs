//! Checkpoints: `OUTPUT/checkpoint-STEP/` with the adapter (PEFT folder), the AdamW moments
//! (`optimizer.safetensors`) and `trainer_state.json` (step, data position, seed). A checkpoint
//! is written under a temporary name and renamed when complete, so an interrupted save never
//! damages the previous one; only the newest `keep` are kept.

use super::stream::StreamPosition;
use crate::io::{write_atomic, write_safetensors_f32};
use crate::lora::{peft, LoraParams};
use crate::model::weights::WeightFiles;
use crate::optim::AdamW;
use anyhow::{bail, Context, Result};
use kernels::Backend;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where to resume from, if anywhere.
#[derive(Clone, Debug)]
pub enum Resume {
    No,
    Latest,
    From(PathBuf),
}

/// What, besides tensors, a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    pub position: StreamPosition,
    pub seed: u64,
    pub total_steps: u64,
    /// Tokens trained on so far (for the summary and tokens/s).
    pub tokens_seen: u64,
}

const PREFIX: &str = "checkpoint-";

/// Saves a checkpoint of step `state.step` into `output`, then prunes old ones.
pub fn save<B: Backend>(
    be: &B,
    output: &Path,
    base_model: &str,
    lora: &LoraParams<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = output.join(format!("{PREFIX}{}", state.step));
    let what = format!("{}", final_dir.display());
    crate::finite::refuse_non_finite(be, &opt.m, &lora.names, &what)?;
    crate::finite::refuse_non_finite(be, &opt.v, &lora.names, &what)?;
    let tmp = output.join(format!(".{PREFIX}{}.partial", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    peft::save(be, lora, base_model, &tmp)?;
    let mut moments = Vec::with_capacity(2 * lora.names.len());
    for (i, name) in lora.names.iter().enumerate() {
        let shape = lora.shapes[i].to_vec();
        moments.push((format!("m/{name}"), shape.clone(), be.download(&opt.m[i])?));
        moments.push((format!("v/{name}"), shape, be.download(&opt.v[i])?));
    }
    write_safetensors_f32(&tmp.join("optimizer.safetensors"), &moments)?;
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    prune(output, keep)?;
    Ok(final_dir)
}

/// Completed checkpoints in `output`, oldest first.
pub fn list(output: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(output) else {
        return Ok(found);
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").exists() {
                found.push((step, e.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn prune(output: &Path, keep: usize) -> Result<()> {
    let all = list(output)?;
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// The newest checkpoint in `output`, with a clear error when there is none.
pub fn latest(output: &Path) -> Result<PathBuf> {
    match list(output)?.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "--resume: no checkpoint-* folder with a trainer_state.json in {}",
            output.display()
        ),
    }
}

/// Restores the adapter, optimizer moments and state of the checkpoint in `dir`.
pub fn restore<B: Backend>(
    be: &B,
    dir: &Path,
    lora: &mut LoraParams<B>,
    opt: &mut AdamW<B>,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a trainer state", state_path.display()))?;
    let adapter = WeightFiles::open_file(&dir.join("adapter_model.safetensors"))?;
    let moments = WeightFiles::open_file(&dir.join("optimizer.safetensors"))?;
    super::resume_check::check_same_adapter(dir, &lora.config, &lora.names, adapter.names())?;
    for (i, name) in lora.names.iter().enumerate() {
        let shape = lora.shapes[i];
        lora.params[i] = be.upload(
            &adapter
                .f32(name, &shape)
                .context("the checkpoint's adapter does not match this run's LoRA settings")?,
            kernels::DType::F32,
        )?;
        opt.m[i] = be.upload(
            &moments.f32(&format!("m/{name}"), &shape)?,
            kernels::DType::F32,
        )?;
        opt.v[i] = be.upload(
            &moments.f32(&format!("v/{name}"), &shape)?,
            kernels::DType::F32,
        )?;
    }
    lora.sync_compute(be)?;
    opt.step = state.step;
    Ok(state)
}

/// Where a run starts: step 0 (`fresh`), or — when `resume` names a checkpoint — that checkpoint's
/// state, with the adapter and optimizer restored into `lora` and `opt`. A checkpoint made with
/// another seed is refused (its data order would differ). Returns the state and the folder used.
pub fn starting_state<B: Backend>(
    be: &B,
    output: &Path,
    resume: Resume,
    lora: &mut LoraParams<B>,
    opt: &mut AdamW<B>,
    fresh: TrainerState,
) -> Result<(TrainerState, Option<PathBuf>)> {
    let dir = match resume {
        Resume::No => return Ok((fresh, None)),
        Resume::Latest => latest(output)?,
        Resume::From(p) => p,
    };
    let state = restore(be, &dir, lora, opt)?;
    if state.seed != fresh.seed {
        bail!(
            "checkpoint {} was made with seed {}, this config says {}: resume with the same seed",
            dir.display(),
            state.seed,
            fresh.seed
        );
    }
    super::resume_check::refuse_finished(&dir, state.step, fresh.total_steps)?;
    Ok((state, Some(dir)))
}
