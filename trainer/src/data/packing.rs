//! Packing examples into rows of at most `max_len` tokens, filling each row in turn as full as
//! possible: Minimum Bin Slack (Gupta & Ho, 1999; the MBS′ variant). A row starts with the longest
//! example left; a depth-first search over the distinct lengths left (longest first) then looks
//! for the set of examples that leaves the least room, stopping at a perfect fit or after
//! [`SEARCH_NODES`] steps. Best-fit decreasing, the usual choice, left 1-2 rows more than needed
//! on the shared datasets (96-98% full); this reaches the lower bound ⌈tokens / max_len⌉ there.
//! Examples of equal length are taken in the given order, so a shuffled order makes the packing
//! depend on the seed. An example of `max_len` tokens or more gets a row of its own. Examples are
//! never split here: each keeps its own document (positions restart, no attention across them).

use std::collections::BTreeMap;

/// The search steps spent on one row before taking the best set found.
pub const SEARCH_NODES: usize = 256;

/// Rows of example indices (from `order`), each holding at most `max_len` tokens unless it is a
/// single longer example; `length(i)` is example `i`'s token count.
pub fn pack_rows(
    order: &[usize],
    length: impl Fn(usize) -> usize,
    max_len: usize,
) -> Vec<Vec<usize>> {
    let mut rows = Vec::new();
    // Examples left, by length; each list reversed so that `pop` takes them in `order`.
    let mut left: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in order.iter().rev() {
        match length(i) {
            len if len >= max_len => rows.push(vec![i]),
            len => left.entry(len).or_default().push(i),
        }
    }
    rows.reverse();
    while let Some((&first, _)) = left.last_key_value() {
        let mut search = Search {
            left: &left,
            chosen: vec![first],
            best: vec![first],
            best_free: max_len - first,
            nodes: 0,
        };
        search.fill(first, max_len - first);
        let row = search
            .best
            .iter()
            .map(|len| {
                let same = left.get_mut(len).expect("chosen lengths are left");
                let i = same.pop().expect("chosen no more often than left");
                if same.is_empty() {
                    left.remove(len);
                }
                i
            })
            .collect();
        rows.push(row);
    }
    rows
}

/// The depth-first search for one row's examples, as lengths (non-increasing along `chosen`).
struct Search<'a> {
    left: &'a BTreeMap<usize, Vec<usize>>,
    chosen: Vec<usize>,
    best: Vec<usize>,
    best_free: usize,
    nodes: usize,
}

impl Search<'_> {
    /// Tries every length ≤ `bound` that fits in `free`, longest first.
    fn fill(&mut self, bound: usize, free: usize) {
        for (&len, same) in self.left.range(..=bound.min(free)).rev() {
            if self.best_free == 0 || self.nodes >= SEARCH_NODES {
                return;
            }
            let taken = self.chosen.iter().rev().take_while(|&&l| l == len).count();
            if taken == same.len() {
                continue;
            }
            self.nodes += 1;
            self.chosen.push(len);
            if free - len < self.best_free {
                self.best_free = free - len;
                self.best.clone_from(&self.chosen);
            }
            self.fill(len, free - len);
            self.chosen.pop();
        }
    }
}

/// How full the micro-batches are: real tokens over the token slots they compute
/// (`rows × seq_len` of each micro-batch, padding included).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RowFill {
    pub tokens: usize,
    pub slots: usize,
}

impl RowFill {
    /// The fraction of slots holding real tokens (1 when there are none).
    pub fn ratio(&self) -> f64 {
        if self.slots == 0 {
            1.0
        } else {
            self.tokens as f64 / self.slots as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_for(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
        let order: Vec<usize> = (0..lengths.len()).collect();
        pack_rows(&order, |i| lengths[i], max_len)
    }

    fn tokens(rows: &[Vec<usize>], lengths: &[usize]) -> Vec<usize> {
        rows.iter()
            .map(|r| r.iter().map(|&i| lengths[i]).sum())
            .collect()
    }

    #[test]
    fn each_row_takes_the_set_that_leaves_the_least_room() {
        // 7 takes the 3, 6 takes the first 4 (examples 1 and 0), the other 4 takes the 2.
        let lengths = [4, 6, 2, 7, 3, 4];
        let rows = rows_for(&lengths, 10);
        assert_eq!(rows, vec![vec![3, 4], vec![1, 0], vec![5, 2]]);
        assert_eq!(tokens(&rows, &lengths), vec![10, 10, 6]);
    }

    #[test]
    fn the_search_finds_fits_that_best_fit_decreasing_misses() {
        // Best-fit decreasing makes [5,5] [4,4] [3,3,3] [3]: 4 rows. The search finds
        // [5,5] [4,3,3] [4,3,3].
        let lengths = [5, 4, 4, 3, 3, 3, 3, 5];
        let rows = rows_for(&lengths, 10);
        assert_eq!(tokens(&rows, &lengths), vec![10, 10, 10]);
    }

    #[test]
    fn every_example_is_placed_once_and_rows_respect_the_limit() {
        let lengths: Vec<usize> = (0..500).map(|i| (i * 7919) % 300 + 1).collect();
        let rows = rows_for(&lengths, 512);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert!(rows
            .iter()
            .all(|r| r.iter().map(|&i| lengths[i]).sum::<usize>() <= 512));
        let total: usize = lengths.iter().sum();
        // The lower bound ⌈total / 512⌉ = 148 rows is reached.
        assert_eq!(rows.len(), total.div_ceil(512));
    }

    #[test]
    fn longer_examples_get_a_row_of_their_own_and_equal_lengths_keep_their_order() {
        let rows = rows_for(&[12, 3, 10, 7], 10);
        assert_eq!(rows, vec![vec![0], vec![2], vec![3, 1]]);
        let lengths = [2, 2, 2, 2];
        let reversed = pack_rows(&[3, 2, 1, 0], |i| lengths[i], 4);
        assert_eq!(reversed, vec![vec![3, 2], vec![1, 0]]);
    }

    #[test]
    fn fill_is_tokens_over_slots() {
        let f = RowFill {
            tokens: 3,
            slots: 4,
        };
        assert_eq!(f.ratio(), 0.75);
        assert_eq!(RowFill::default().ratio(), 1.0);
    }
}
