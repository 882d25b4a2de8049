//! Output folders that belong to one writer: a command refuses a destination that is not empty
//! (unless told to overwrite) or that holds one of its own inputs, writes everything into a
//! temporary sibling folder, and renames it into place only when complete — so a failed or killed
//! command leaves the old folder whole, and a replaced folder keeps no stale file of the old one.
//!
//! `train` is the exception that proves the rule: its folder fills during the run (checkpoints,
//! metrics), so it is claimed at start ([`claim_run_folder`]) instead of staged, and every file in
//! it is written atomically on its own.

use crate::train::checkpoint::Resume;
use crate::train::config::RunConfig;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What to do with a destination that already holds files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse, naming `--overwrite`.
    Refuse,
    /// Replace the whole folder (never an input of the command).
    Replace,
}

impl Overwrite {
    /// `--overwrite` given or not.
    pub fn from_flag(overwrite: bool) -> Self {
        if overwrite {
            Overwrite::Replace
        } else {
            Overwrite::Refuse
        }
    }
}

/// `path` made absolute without requiring it to exist: its nearest existing ancestor is
/// canonicalized (symlinks resolved) and the rest appended.
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path)
        .with_context(|| format!("cannot resolve the path {}", path.display()))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        let Some(parent) = existing.parent() else {
            return Ok(abs);
        };
        rest.push(existing.file_name().unwrap_or_default().to_owned());
        existing = parent;
    }
    let mut out = existing
        .canonicalize()
        .with_context(|| format!("cannot resolve the path {}", existing.display()))?;
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Refuses `dest` when replacing it would destroy one of `inputs` (`(what, path)` pairs such as
/// `("--model", dir)`): the same folder, or a folder that contains it.
pub fn refuse_in_place(dest: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let d = absolute(dest)?;
    for (what, input) in inputs {
        let i = absolute(input)?;
        if i.starts_with(&d) {
            let how = if i == d { "is" } else { "contains" };
            bail!(
                "the output {} {how} the input {what} {}: writing there would destroy it while it is read; choose another output folder",
                dest.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Whether `dir` exists and holds at least one entry (a file that is not a folder counts too).
fn holds_files(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Ok(true);
    }
    let mut entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    Ok(entries.next().is_some())
}

/// Names of up to five entries of `dir`, for messages.
fn some_entries(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let more = names.len().saturating_sub(5);
    names.truncate(5);
    if more > 0 {
        names.push(format!("and {more} more"));
    }
    names.join(", ")
}

/// A folder being written: the contents go to a temporary sibling that [`StagedDir::commit`]
/// renames onto the destination. Dropped without a commit, it removes the temporary folder.
pub struct StagedDir {
    dest: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Checks `dest` (not an input, empty unless `overwrite` says replace) and creates the
    /// temporary folder beside it.
    pub fn begin(dest: &Path, overwrite: Overwrite, inputs: &[(&str, &Path)]) -> Result<Self> {
        refuse_in_place(dest, inputs)?;
        if dest.exists() && !dest.is_dir() {
            bail!(
                "the output {} is a file, not a folder: choose a folder path",
                dest.display()
            );
        }
        if overwrite == Overwrite::Refuse && holds_files(dest)? {
            bail!(
                "the output folder {} is not empty (it holds {}): pass --overwrite to replace it whole, or choose another folder",
                dest.display(),
                some_entries(dest)
            );
        }
        let name = dest
            .file_name()
            .with_context(|| format!("the output {} has no folder name", dest.display()))?
            .to_string_lossy()
            .into_owned();
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the folder {}", parent.display()))?;
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot clear {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(StagedDir {
            dest: dest.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Puts the written folder in place of the destination (an existing one is moved aside
    /// first and deleted after, so a crash in between leaves one of the two whole).
    pub fn commit(mut self) -> Result<()> {
        let old = self.tmp.with_file_name(format!(
            "{}.old",
            self.tmp.file_name().unwrap_or_default().to_string_lossy()
        ));
        let replaced = self.dest.exists();
        if replaced {
            std::fs::rename(&self.dest, &old)
                .with_context(|| format!("cannot move the old {} aside", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })?;
        self.committed = true;
        if replaced {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove the old folder {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the folder is ours and incomplete; a leftover is named `.NAME.partial-PID`.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Files a training run writes into its output folder; anything else there is not a run's.
const RUN_FILES: &[&str] = &[
    "adapter",
    "adapter-init",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "batches.jsonl",
    "reference_logps.json",
    "reference_logps.eval.json",
];

/// The output folder of a training run, claimed at start. Dropped, it removes the folder again
/// if this run created it and wrote nothing into it (a run that failed while loading).
pub struct RunFolder {
    dir: PathBuf,
    created: bool,
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        if self.created {
            // `remove_dir` removes only an empty folder: one with any output stays.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Claims `dir` for a run. A fresh run (`resuming` false) refuses a folder that holds files —
/// another run's checkpoints would be pruned in favour of its higher steps, and a later
/// `--resume` would pick them — unless `overwrite` says replace, which deletes the folder first
/// (never when it holds one of `inputs`). A resumed run needs the folder as it is.
pub fn claim_run_folder(
    dir: &Path,
    resuming: bool,
    overwrite: Overwrite,
    inputs: &[(&str, &Path)],
) -> Result<RunFolder> {
    if !resuming && holds_files(dir)? {
        if dir.is_file() {
            bail!(
                "output.dir {} is a file, not a folder: choose a folder path",
                dir.display()
            );
        }
        match overwrite {
            Overwrite::Refuse => {
                let run = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("checkpoint-") || RUN_FILES.contains(&n.as_str())
                });
                let what = if run {
                    "holds another run"
                } else {
                    "is not empty"
                };
                bail!(
                    "output.dir {} {what} ({}): pass --resume to continue that run, --overwrite to delete it and start afresh, or choose another output.dir",
                    dir.display(),
                    some_entries(dir)
                );
            }
            Overwrite::Replace => {
                refuse_in_place(dir, inputs)?;
                std::fs::remove_dir_all(dir).with_context(|| {
                    format!("--overwrite: cannot delete the old {}", dir.display())
                })?;
            }
        }
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    Ok(RunFolder {
        dir: dir.to_path_buf(),
        created,
    })
}

/// [`claim_run_folder`] for the run `cfg` (`output.dir`, `output.overwrite`), never deleting its
/// model, data or initial adapter.
pub fn claim_for_run(cfg: &RunConfig, resume: &Resume) -> Result<RunFolder> {
    let inputs = cfg.input_paths();
    claim_run_folder(
        &cfg.output.dir,
        !matches!(resume, Resume::No),
        Overwrite::from_flag(cfg.output.overwrite),
        &inputs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_folder_replaces_the_old_one_whole_and_only_when_committed() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("stale.safetensors"), b"old").unwrap();

        let e = StagedDir::begin(&dest, Overwrite::Refuse, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("not empty") && e.contains("stale.safetensors") && e.contains("--overwrite"),
            "{e}"
        );

        let staged = StagedDir::begin(&dest, Overwrite::Replace, &[]).unwrap();
        std::fs::write(staged.path().join("model.safetensors"), b"new").unwrap();
        drop(staged);
        assert_eq!(
            std::fs::read(dest.join("stale.safetensors")).unwrap(),
            b"old"
        );
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);

        let staged = StagedDir::begin(&dest, Overwrite::Replace, &[]).unwrap();
        std::fs::write(staged.path().join("model.safetensors"), b"new").unwrap();
        staged.commit().unwrap();
        let names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["model.safetensors".to_string()]);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_input_or_a_folder_holding_one_is_never_a_destination() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("models/base");
        std::fs::create_dir_all(&model).unwrap();
        for dest in [model.clone(), root.path().join("models"), model.join("..")] {
            let e = StagedDir::begin(&dest, Overwrite::Replace, &[("--model", model.as_path())])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("--model") && e.contains("destroy"), "{e}");
        }
        assert!(StagedDir::begin(
            &model.join("merged"),
            Overwrite::Refuse,
            &[("--model", model.as_path())]
        )
        .is_ok());
    }

    #[test]
    fn a_fresh_run_refuses_another_runs_folder_and_a_failed_start_leaves_none() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        drop(claim_run_folder(&out, false, Overwrite::Refuse, &[]).unwrap());
        assert!(
            !out.exists(),
            "an empty folder of a failed start is removed"
        );

        std::fs::create_dir_all(out.join("checkpoint-20")).unwrap();
        let e = claim_run_folder(&out, false, Overwrite::Refuse, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("another run")
                && e.contains("checkpoint-20")
                && e.contains("--resume")
                && e.contains("--overwrite"),
            "{e}"
        );
        let kept = claim_run_folder(&out, true, Overwrite::Refuse, &[]).unwrap();
        drop(kept);
        assert!(out.join("checkpoint-20").exists());
        let _claimed = claim_run_folder(&out, false, Overwrite::Replace, &[]).unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
