//! Turning tokenized examples into micro-batches, deterministically from (seed, epoch):
//! - packing (default): examples fill rows of `max_seq_len` ([`super::packing`], each row as
//!   full as a bounded search can make it), the rows are shuffled, then cut into micro-batches; each example keeps
//!   its own document (no attention across examples, positions restart). Every micro-batch is
//!   `rows × max_seq_len` (an epoch's last one padded with empty rows), the shape `bench` times:
//!   the device's buffer pool is keyed by size, and batches of varying shapes would each keep
//!   their own set of activation buffers;
//! - padding: one example per row, rows grouped by length so little padding is wasted
//!   (examples are sorted by length inside windows of 64 batches, as transformers'
//!   `LengthGroupedSampler` does, then the batches are shuffled). A batch's rows are as long as
//!   its longest row.

use super::packing::{pack_rows, RowFill};
use super::source::ExampleSource;
use crate::model::next_token_targets;
use kernels::{AttentionLayout, IGNORE_INDEX};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One tokenized example: `labels[t]` is `ids[t]` or `IGNORE_INDEX` (Hugging Face convention).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<i32>,
    pub labels: Vec<i32>,
}

/// A micro-batch on the host: `rows × seq_len` tokens, `docs[r]` the document lengths of row `r`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub docs: Vec<Vec<usize>>,
    pub seq_len: usize,
}

impl HostBatch {
    pub fn layout(&self, window: Option<usize>) -> AttentionLayout {
        AttentionLayout::packed(&self.docs, self.seq_len, window)
    }

    /// Tokens that carry a loss (after the next-token shift inside each document).
    pub fn target_count(&self) -> usize {
        next_token_targets(&self.labels, &self.layout(None))
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count()
    }

    /// Real (non-padding) tokens.
    pub fn token_count(&self) -> usize {
        self.docs.iter().flatten().sum()
    }
}

impl ExampleSource for [Example] {
    fn count(&self) -> usize {
        self.len()
    }

    fn length(&self, i: usize) -> usize {
        self[i].ids.len()
    }

    fn append(&self, i: usize, ids: &mut Vec<i32>, labels: &mut Vec<i32>) {
        ids.extend_from_slice(&self[i].ids);
        labels.extend_from_slice(&self[i].labels);
    }
}

impl ExampleSource for Vec<Example> {
    fn count(&self) -> usize {
        self.as_slice().count()
    }

    fn length(&self, i: usize) -> usize {
        self.as_slice().length(i)
    }

    fn append(&self, i: usize, ids: &mut Vec<i32>, labels: &mut Vec<i32>) {
        self.as_slice().append(i, ids, labels)
    }
}

/// How examples become batches.
#[derive(Clone, Debug)]
pub struct Batching {
    pub rows: usize,
    pub max_seq_len: usize,
    pub packing: bool,
    pub pad_id: i32,
}

impl Batching {
    /// The smallest `(rows, seq_len)` a micro-batch is padded to: with packing every micro-batch
    /// is `rows × max_seq_len`; without, as small as its examples allow.
    pub fn min_shape(&self) -> (usize, usize) {
        if self.packing {
            (self.rows, self.max_seq_len)
        } else {
            (0, 1)
        }
    }
}

/// A permutation of `0..n` fixed by `(seed, epoch)`.
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// One epoch's micro-batches as example indices: `plan[batch][row]` lists the examples of a row.
/// Only the examples' lengths are read, so a rank can plan the whole epoch and then read the
/// tokens of its own batches alone.
pub fn epoch_plan<S: ExampleSource + ?Sized>(
    examples: &S,
    b: &Batching,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<Vec<usize>>> {
    let order = shuffled(examples.count(), seed, epoch);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1);
    if b.packing {
        // Rows come out longest example first: shuffle them.
        let mut rows = pack_rows(&order, |i| examples.length(i), b.max_seq_len);
        rows.shuffle(&mut rng);
        rows.chunks(b.rows).map(<[_]>::to_vec).collect()
    } else {
        let rows = group_by_length(examples, &order, b.rows);
        let mut plan: Vec<Vec<Vec<usize>>> = rows.chunks(b.rows).map(<[_]>::to_vec).collect();
        plan.shuffle(&mut rng);
        plan
    }
}

/// How full the micro-batches of epoch 0 are: real tokens over the token slots they compute.
pub fn epoch_fill<S: ExampleSource + ?Sized>(examples: &S, b: &Batching, seed: u64) -> f64 {
    plan_fill(examples, &epoch_plan(examples, b, seed, 0), b.min_shape()).ratio()
}

/// How full the micro-batches of `plan` are (tokens over the slots they compute).
pub fn plan_fill<S: ExampleSource + ?Sized>(
    examples: &S,
    plan: &[Vec<Vec<usize>>],
    min_shape: (usize, usize),
) -> RowFill {
    let mut fill = RowFill::default();
    for rows in plan {
        let (n_rows, seq_len) = batch_shape(examples, rows, min_shape);
        fill.slots += n_rows * seq_len;
        fill.tokens += rows
            .iter()
            .flatten()
            .map(|&i| examples.length(i))
            .sum::<usize>();
    }
    fill
}

/// The micro-batches of one epoch.
pub fn epoch_batches<S: ExampleSource + ?Sized>(
    examples: &S,
    b: &Batching,
    seed: u64,
    epoch: u64,
) -> Vec<HostBatch> {
    epoch_plan(examples, b, seed, epoch)
        .iter()
        .map(|rows| assemble(examples, rows, b.pad_id, b.min_shape()))
        .collect()
}

/// One example per row, sorted by length (longest first) inside windows of 64 batches.
fn group_by_length<S: ExampleSource + ?Sized>(
    examples: &S,
    order: &[usize],
    rows_per_batch: usize,
) -> Vec<Vec<usize>> {
    let mut out = Vec::with_capacity(order.len());
    for window in order.chunks(64 * rows_per_batch) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(examples.length(i)));
        out.extend(w.into_iter().map(|i| vec![i]));
    }
    out
}

/// `(rows, seq_len)` of the micro-batch holding `rows`: at least `min_shape`, and as long as
/// its longest row.
fn batch_shape<S: ExampleSource + ?Sized>(
    examples: &S,
    rows: &[Vec<usize>],
    min_shape: (usize, usize),
) -> (usize, usize) {
    let longest = rows
        .iter()
        .map(|r| r.iter().map(|&i| examples.length(i)).sum::<usize>())
        .max()
        .unwrap_or(0);
    (rows.len().max(min_shape.0), longest.max(min_shape.1).max(1))
}

/// Reads the examples of `rows` into one micro-batch, padded to at least `min_shape`
/// (`(rows, seq_len)`; missing rows are all padding).
pub fn assemble<S: ExampleSource + ?Sized>(
    examples: &S,
    rows: &[Vec<usize>],
    pad_id: i32,
    min_shape: (usize, usize),
) -> HostBatch {
    let (n_rows, seq_len) = batch_shape(examples, rows, min_shape);
    let mut ids = Vec::with_capacity(n_rows * seq_len);
    let mut labels = Vec::with_capacity(n_rows * seq_len);
    let mut docs = Vec::with_capacity(n_rows);
    let empty = Vec::new();
    for row in rows
        .iter()
        .chain(std::iter::repeat_n(&empty, n_rows - rows.len()))
    {
        let start = ids.len();
        for &i in row {
            examples.append(i, &mut ids, &mut labels);
        }
        let pad = seq_len - (ids.len() - start);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        docs.push(row.iter().map(|&i| examples.length(i)).collect());
    }
    HostBatch {
        ids,
        labels,
        docs,
        seq_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, tag: i32) -> Example {
        Example {
            ids: vec![tag; len],
            labels: vec![tag; len],
        }
    }

    #[test]
    fn packing_fills_rows_without_splitting_examples() {
        let examples = vec![ex(3, 1), ex(4, 2), ex(2, 3), ex(5, 4)];
        let b = Batching {
            rows: 2,
            max_seq_len: 7,
            packing: true,
            pad_id: 0,
        };
        let batches = epoch_batches(&examples, &b, 1, 0);
        let total: usize = batches.iter().map(|b| b.token_count()).sum();
        assert_eq!(total, 14);
        for batch in &batches {
            assert!(batch.seq_len <= 7);
            for (r, docs) in batch.docs.iter().enumerate() {
                let mut col = 0;
                for &len in docs {
                    let tags = &batch.ids[r * batch.seq_len + col..][..len];
                    assert!(
                        tags.iter().all(|&t| t == tags[0]),
                        "an example was split: {tags:?}"
                    );
                    col += len;
                }
            }
        }
    }

    #[test]
    fn padding_groups_similar_lengths_and_masks_the_pad() {
        let examples: Vec<Example> = (1..=8).map(|l| ex(l, l as i32)).collect();
        let b = Batching {
            rows: 2,
            max_seq_len: 16,
            packing: false,
            pad_id: -1,
        };
        let batches = epoch_batches(&examples, &b, 3, 0);
        assert_eq!(batches.len(), 4);
        for batch in &batches {
            let lens: Vec<usize> = batch.docs.iter().map(|d| d[0]).collect();
            assert!(
                lens[0].abs_diff(lens[1]) == 1,
                "sorted neighbours pair up: {lens:?}"
            );
            let pad = batch.seq_len - lens[1];
            assert!(batch.labels[2 * batch.seq_len - pad..]
                .iter()
                .all(|&l| l == IGNORE_INDEX));
        }
    }

    #[test]
    fn the_same_seed_and_epoch_give_the_same_batches() {
        let examples: Vec<Example> = (1..30).map(|l| ex(l % 7 + 1, l as i32)).collect();
        let b = Batching {
            rows: 3,
            max_seq_len: 12,
            packing: true,
            pad_id: 0,
        };
        assert_eq!(
            epoch_batches(&examples, &b, 5, 2),
            epoch_batches(&examples, &b, 5, 2)
        );
        assert_ne!(
            epoch_batches(&examples, &b, 5, 2),
            epoch_batches(&examples, &b, 5, 3)
        );
    }

    #[test]
    fn packed_micro_batches_all_have_the_same_shape_and_their_fill_counts_padding() {
        // 17 tokens in rows of 8 need 3 rows: micro-batches of 2 rows are 2 × 8, the last one
        // padded with an empty row.
        let examples = vec![ex(5, 1), ex(3, 2), ex(4, 3), ex(4, 4), ex(1, 5)];
        let b = Batching {
            rows: 2,
            max_seq_len: 8,
            packing: true,
            pad_id: 0,
        };
        let batches = epoch_batches(&examples, &b, 7, 0);
        assert_eq!(batches.len(), 2);
        for batch in &batches {
            assert_eq!(
                (batch.docs.len(), batch.seq_len, batch.ids.len()),
                (2, 8, 16)
            );
        }
        assert_eq!(epoch_fill(&examples, &b, 7), 17.0 / 32.0);
        let padded = Batching {
            packing: false,
            ..b
        };
        // One example per row, each batch as long as its longest: no shape is imposed.
        assert!(epoch_batches(&examples, &padded, 7, 0)
            .iter()
            .any(|batch| batch.seq_len < 8));
    }

    #[test]
    fn targets_skip_document_boundaries() {
        let examples = vec![ex(3, 1), ex(3, 2)];
        let b = Batching {
            rows: 1,
            max_seq_len: 6,
            packing: true,
            pad_id: 0,
        };
        let batch = &epoch_batches(&examples, &b, 0, 0)[0];
        assert_eq!(batch.target_count(), 4);
    }
}
