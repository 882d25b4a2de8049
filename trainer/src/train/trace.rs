//! A record of which examples this rank read, one line per step: `epoch E: i j k …`.
//! Written when `FUSELORA_TRACE_EXAMPLES=DIR` is set, to `DIR/rank-R.txt`; the distributed
//! tests use it to check that the ranks' shards are disjoint and cover the dataset.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

/// The environment variable naming the trace folder.
pub const TRACE_ENV: &str = "FUSELORA_TRACE_EXAMPLES";

/// Appends this rank's example indices to its trace file.
pub struct ExampleTrace {
    file: std::fs::File,
    path: PathBuf,
}

impl ExampleTrace {
    /// The trace of `rank` when [`TRACE_ENV`] is set.
    pub fn from_env(rank: usize) -> Result<Option<ExampleTrace>> {
        let Some(dir) = std::env::var_os(TRACE_ENV).filter(|d| !d.is_empty()) else {
            return Ok(None);
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {TRACE_ENV} folder {}", dir.display()))?;
        let path = dir.join(format!("rank-{rank}.txt"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Some(ExampleTrace { file, path }))
    }

    /// Writes one line: the epoch and the indices of the examples just read.
    pub fn record(&mut self, epoch: u64, examples: impl Iterator<Item = usize>) {
        let list: Vec<String> = examples.map(|i| i.to_string()).collect();
        if let Err(e) = writeln!(self.file, "epoch {epoch}: {}", list.join(" ")) {
            eprintln!("warning: cannot write {}: {e}", self.path.display());
        }
    }
}
