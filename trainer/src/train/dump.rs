//! `train.dump_batches = true`: the exact micro-batches of every optimizer step, one JSON line per
//! step in `OUTPUT/batches.jsonl` (`{"step", "micro": [{"ids", "labels", "docs", "seq_len"}]}`,
//! rows of `seq_len` tokens flattened, `docs[row]` = document lengths of that row), so another
//! trainer (scripts/compare-hf-peft.py) can replay the same batches and compare loss curves.

use crate::data::batching::HostBatch;
use anyhow::{Context, Result};
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends each step's micro-batches to `batches.jsonl`.
pub struct BatchDump {
    path: PathBuf,
    file: File,
}

impl BatchDump {
    /// Opens `out/batches.jsonl`, truncated when the run starts at step 0, appended to on resume.
    pub fn open(out: &Path, fresh: bool) -> Result<Self> {
        let path = out.join("batches.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(&path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        Ok(BatchDump { path, file })
    }

    /// Writes the micro-batches of optimizer step `step` (1-based, as in metrics.jsonl).
    pub fn write<'a>(
        &mut self,
        step: u64,
        micro: impl Iterator<Item = &'a HostBatch>,
    ) -> Result<()> {
        let micro: Vec<_> = micro
            .map(
                |b| json!({"ids": b.ids, "labels": b.labels, "docs": b.docs, "seq_len": b.seq_len}),
            )
            .collect();
        writeln!(self.file, "{}", json!({"step": step, "micro": micro}))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_is_one_line_with_its_micro_batches() {
        let dir = tempfile::tempdir().unwrap();
        let b = HostBatch {
            ids: vec![5, 6, 7, 0],
            labels: vec![-100, 6, 7, -100],
            docs: vec![vec![3]],
            seq_len: 4,
        };
        let mut d = BatchDump::open(dir.path(), true).unwrap();
        d.write(1, [&b, &b].into_iter()).unwrap();
        d.write(2, std::iter::once(&b)).unwrap();
        drop(d);
        let text = std::fs::read_to_string(dir.path().join("batches.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 1);
        assert_eq!(lines[0]["micro"].as_array().unwrap().len(), 2);
        assert_eq!(lines[1]["micro"][0]["ids"], json!([5, 6, 7, 0]));
        assert_eq!(lines[1]["micro"][0]["docs"], json!([[3]]));
        let mut again = BatchDump::open(dir.path(), true).unwrap();
        again.write(1, std::iter::empty()).unwrap();
        drop(again);
        let text = std::fs::read_to_string(dir.path().join("batches.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 1, "a fresh run starts the file anew");
    }
}
