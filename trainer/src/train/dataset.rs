//! A run's records, whatever their kind (supervised records, preference pairs): every file of
//! `data.train` read, and the held-out records — the `data.validation` files, or a seeded
//! `data.validation_split` of the training records, fixed by the seed and independent of order.

use super::config::RunConfig;
use crate::data::batching::shuffled;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// One file's records and the descriptions of the bad ones skipped.
pub type FileRecords<R> = (Vec<R>, Vec<String>);

/// Training and held-out records.
pub struct SplitRecords<R> {
    pub train: Vec<R>,
    pub eval: Vec<R>,
    /// Bad records skipped in all files.
    pub skipped: usize,
}

/// Reads every file of `paths` with `read_file`; reports the first bad records skipped.
pub fn read_all<R>(
    paths: &[PathBuf],
    read_file: &dyn Fn(&Path) -> Result<FileRecords<R>>,
) -> Result<(Vec<R>, usize)> {
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let (r, s) = read_file(p)?;
        records.extend(r);
        skipped.extend(s);
    }
    for s in skipped.iter().take(5) {
        eprintln!("skipped bad record {s}");
    }
    if skipped.len() > 5 {
        eprintln!("… and {} more bad records skipped", skipped.len() - 5);
    }
    Ok((records, skipped.len()))
}

/// The training records of `cfg` and its held-out ones (see the top of this file).
pub fn train_and_held_out<R>(
    cfg: &RunConfig,
    read_file: &dyn Fn(&Path) -> Result<FileRecords<R>>,
) -> Result<SplitRecords<R>> {
    let (mut train, mut skipped) = read_all(&cfg.data.train, read_file)?;
    let mut eval = Vec::new();
    if !cfg.data.validation.is_empty() {
        let (r, s) = read_all(&cfg.data.validation, read_file)?;
        eval = r;
        skipped += s;
    } else if cfg.data.validation_split > 0.0 && !train.is_empty() {
        (train, eval) = split(train, cfg.data.validation_split, cfg.train.seed);
    }
    if train.is_empty() {
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
    Ok(SplitRecords {
        train,
        eval,
        skipped,
    })
}

/// `(kept, held out)`: `round(fraction · n)` records (at least one) chosen by a seeded shuffle,
/// both parts in their original order.
fn split<R>(records: Vec<R>, fraction: f64, seed: u64) -> (Vec<R>, Vec<R>) {
    let n = records.len();
    let n_eval = ((n as f64 * fraction).round() as usize).clamp(1, n);
    let mut held = vec![false; n];
    for &i in &shuffled(n, seed, u64::MAX)[..n_eval] {
        held[i] = true;
    }
    let (e, t): (Vec<_>, Vec<_>) = records.into_iter().enumerate().partition(|(i, _)| held[*i]);
    (
        t.into_iter().map(|(_, r)| r).collect(),
        e.into_iter().map(|(_, r)| r).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_seeded_ordered_and_holds_at_least_one() {
        let (kept, held) = split((0..10).collect(), 0.3, 7);
        assert_eq!((kept.len(), held.len()), (7, 3));
        assert!(kept.windows(2).all(|w| w[0] < w[1]) && held.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(split((0..10).collect::<Vec<_>>(), 0.3, 7).1, held);
        assert_ne!(split((0..10).collect::<Vec<_>>(), 0.3, 8).1, held);
        assert_eq!(split(vec![1, 2], 0.01, 0).1.len(), 1);
    }
}
