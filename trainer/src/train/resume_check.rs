//! What `--resume` refuses: a checkpoint whose adapter another LoRA layout made (rank, alpha,
//! rsLoRA, targets — restoring only the tensors the new config names would silently drop the
//! others, and a changed alpha changes the trained model), and a run that already finished
//! (resuming it would train nothing and rewrite its outputs).

use crate::lora::{peft, LoraConfig};
use anyhow::{bail, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// Refuses to resume from the checkpoint `dir` (its adapter's tensor names `saved_names`) into a
/// run whose adapter is `current` with tensors `names`.
pub fn check_same_adapter<'a>(
    dir: &Path,
    current: &LoraConfig,
    names: &[String],
    saved_names: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let saved = peft::read_config(dir)?;
    let targets = |c: &LoraConfig| {
        let mut t: Vec<&str> = c.targets.iter().map(|p| p.name()).collect();
        t.sort();
        format!("{t:?}")
    };
    let differences = [
        ("lora.r", saved.r.to_string(), current.r.to_string()),
        (
            "lora.alpha",
            saved.alpha.to_string(),
            current.alpha.to_string(),
        ),
        (
            "lora.rslora",
            saved.use_rslora.to_string(),
            current.use_rslora.to_string(),
        ),
        ("lora.targets", targets(&saved), targets(current)),
    ];
    for (key, was, now) in differences {
        if was != now {
            bail!(
                "--resume: checkpoint {} was trained with {key} = {was}, this config says {now}: \
                 resume with the checkpoint's settings, or start a new run (another output.dir, or --overwrite)",
                dir.display()
            );
        }
    }
    let saved: BTreeSet<&str> = saved_names.collect();
    let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    if let Some(name) = saved.symmetric_difference(&wanted).next() {
        bail!(
            "--resume: the adapter of checkpoint {} and this run's differ (`{name}` is in only one of them): \
             was the model changed? Resume with the model and LoRA settings of the checkpoint",
            dir.display()
        );
    }
    Ok(())
}

/// Refuses to resume from the checkpoint `dir` at step `step` when the run ends at `total_steps`.
pub fn refuse_finished(dir: &Path, step: u64, total_steps: u64) -> Result<()> {
    if step >= total_steps {
        bail!(
            "--resume: checkpoint {} is at step {step} and the run ends at step {total_steps}: it has finished, \
             and its outputs are left as they are. To train further, raise train.max_steps (or train.epochs)",
            dir.display()
        );
    }
    Ok(())
}
