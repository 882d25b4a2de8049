//! Preference pairs → micro-batches. A micro-batch holds whole pairs: the chosen and the rejected
//! sequence (`prompt + completion`, labels only on the completion) of each of its pairs, so both
//! halves of a pair always see the same weights. Sequence `2k` is pair `k`'s chosen one, `2k + 1`
//! its rejected one. With packing, sequences fill rows of `row_len` tokens as `data::packing` packs
//! them (each its own document); without, one sequence per row, padded to the longest.

use super::batching::{assemble, Example, HostBatch};
use super::packing::pack_rows;
use super::preference::PreferencePair;
use kernels::IGNORE_INDEX;

/// A micro-batch of pairs on the host, with the sequence of every token.
#[derive(Clone, Debug, PartialEq)]
pub struct PairBatch {
    pub host: HostBatch,
    /// `seq_of_position[i]`: the sequence token `i` belongs to, -1 for padding.
    pub seq_of_position: Vec<i32>,
    pub pairs: usize,
}

fn sequence(prompt: &[i32], completion: &[i32]) -> Example {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(completion);
    let mut labels = vec![IGNORE_INDEX; prompt.len()];
    labels.extend_from_slice(completion);
    Example { ids, labels }
}

/// Lays out `pairs` (in this order) as one micro-batch.
pub fn pair_batch(
    pairs: &[&PreferencePair],
    packing: bool,
    row_len: usize,
    pad_id: i32,
) -> PairBatch {
    let examples: Vec<Example> = pairs
        .iter()
        .flat_map(|p| {
            [
                sequence(&p.prompt, &p.chosen),
                sequence(&p.prompt, &p.rejected),
            ]
        })
        .collect();
    let order: Vec<usize> = (0..examples.len()).collect();
    let rows: Vec<Vec<usize>> = if packing {
        pack_rows(&order, |i| examples[i].ids.len(), row_len)
    } else {
        order.iter().map(|&i| vec![i]).collect()
    };
    let host = assemble(&examples, &rows, pad_id, (0, 1));
    let mut seq_of_position = vec![-1i32; host.ids.len()];
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * host.seq_len;
        for &i in row {
            let len = examples[i].ids.len();
            seq_of_position[at..at + len].fill(i as i32);
            at += len;
        }
    }
    PairBatch {
        host,
        seq_of_position,
        pairs: pairs.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: usize, c: usize, r: usize, tag: i32) -> PreferencePair {
        PreferencePair {
            prompt: vec![tag; p],
            chosen: vec![tag + 1; c],
            rejected: vec![tag + 2; r],
        }
    }

    #[test]
    fn padded_rows_hold_one_sequence_each_with_labels_on_the_completion() {
        let (a, b) = (pair(2, 1, 3, 10), pair(1, 2, 1, 20));
        let batch = pair_batch(&[&a, &b], false, 100, 0);
        assert_eq!(batch.host.seq_len, 5);
        assert_eq!(batch.host.docs, vec![vec![3], vec![5], vec![3], vec![2]]);
        assert_eq!(&batch.host.ids[5..10], &[10, 10, 12, 12, 12]);
        assert_eq!(
            &batch.host.labels[5..10],
            &[IGNORE_INDEX, IGNORE_INDEX, 12, 12, 12]
        );
        assert_eq!(
            batch.seq_of_position,
            vec![0, 0, 0, -1, -1, 1, 1, 1, 1, 1, 2, 2, 2, -1, -1, 3, 3, -1, -1, -1]
        );
    }

    #[test]
    fn packed_rows_keep_sequences_whole_and_mapped() {
        let (a, b) = (pair(2, 1, 3, 10), pair(1, 2, 1, 20));
        let batch = pair_batch(&[&a, &b], true, 8, 0);
        // Longest first: 5 starts row 0 and a 3 fills it; the other 3 and the 2 share row 1.
        assert_eq!(batch.host.docs, vec![vec![5, 3], vec![3, 2]]);
        assert_eq!(
            batch.seq_of_position,
            vec![1, 1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 3, 3, -1, -1, -1]
        );
        assert_eq!(batch.host.target_count(), 1 + 3 + 2 + 1);
    }
}
