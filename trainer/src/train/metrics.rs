//! What a run reports while it trains: `metrics.jsonl` (one JSON record per logged step and per
//! evaluation, flushed as written) and the progress display — an indicatif bar on a terminal,
//! plain lines otherwise (CI logs, pipes).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One training step's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f32,
    /// Real (non-padding) tokens in this step, over all ranks.
    pub tokens: u64,
    /// Of those, the tokens that carry a label (responses; the completions of both halves of a
    /// preference pair).
    #[serde(default)]
    pub loss_tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// One evaluation's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub eval_loss: f64,
    pub eval_tokens: u64,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, keeping only records up to `resume_step` (a resumed run
    /// rewrites what followed its checkpoint).
    pub fn open(dir: &Path, resume_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = if resume_step > 0 && path.exists() {
            let f = std::fs::File::open(&path)?;
            std::io::BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= resume_step)
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::io::write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

/// Reads the step records back (for the loss plot and tests).
pub fn read_steps(path: &Path) -> Result<(Vec<StepRecord>, Vec<EvalRecord>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut steps = Vec::new();
    let mut evals = Vec::new();
    for line in text.lines() {
        if let Ok(s) = serde_json::from_str::<StepRecord>(line) {
            steps.push(s);
        } else if let Ok(e) = serde_json::from_str::<EvalRecord>(line) {
            evals.push(e);
        }
    }
    Ok((steps, evals))
}

/// The live display: a bar on a terminal, a line per logged step otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
}

impl Progress {
    pub fn new(total_steps: u64, start: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30.cyan/blue}] {msg} · {elapsed_precise} elapsed, ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_position(start);
            bar
        });
        Progress {
            bar,
            total: total_steps,
        }
    }

    pub fn step(&self, r: &StepRecord, print_line: bool) {
        let msg = format!(
            "loss {:.4} · lr {:.2e} · {:.0} tok/s",
            r.loss, r.lr, r.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step);
                bar.set_message(msg);
            }
            None if print_line => eprintln!("step {}/{} · {msg}", r.step, self.total),
            None => {}
        }
    }

    /// Prints a line above the bar (or plainly).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
