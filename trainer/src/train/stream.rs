//! The order in which micro-batches are consumed, for every method: epoch by epoch, each epoch's
//! micro-batches planned by the method from (seed, epoch) alone. The position (epoch, next batch)
//! is all a checkpoint needs to resume the stream. With several ranks, rank `r` of `w` takes
//! batches `r, r+w, r+2w, …` of the epoch's list, and every rank takes the same number (the list
//! is cut to a multiple of `w`), so no rank waits at an epoch's end. A plan names examples (or
//! pairs) by index; the method reads the tokens of a rank's own batches only when it reaches them.

use serde::{Deserialize, Serialize};

/// Where the stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: u64,
    /// Index of the next batch of this rank within the epoch.
    pub batch: usize,
}

/// This rank's share of each epoch's micro-batch plans `P`, and where it stands.
pub struct BatchStream<P> {
    rank: usize,
    world: usize,
    pub position: StreamPosition,
    /// This rank's plans of the current epoch.
    current: Option<(u64, Vec<P>)>,
}

impl<P: Clone> BatchStream<P> {
    pub fn new(rank: usize, world: usize) -> Self {
        BatchStream {
            rank,
            world,
            position: StreamPosition::default(),
            current: None,
        }
    }

    /// This rank's plans of `epoch`; `plan_epoch(e)` is the whole job's list for epoch `e`.
    fn epoch(&mut self, epoch: u64, plan_epoch: &dyn Fn(u64) -> Vec<P>) -> &[P] {
        if self.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let all = plan_epoch(epoch);
            let usable = all.len() / self.world * self.world;
            let mine = all
                .into_iter()
                .take(usable)
                .skip(self.rank)
                .step_by(self.world)
                .collect();
            self.current = Some((epoch, mine));
        }
        &self.current.as_ref().unwrap().1
    }

    /// Micro-batches per epoch for this rank.
    pub fn batches_per_epoch(&mut self, plan_epoch: &dyn Fn(u64) -> Vec<P>) -> usize {
        self.epoch(0, plan_epoch).len()
    }

    /// The next optimizer step's plans: up to `accum`, never crossing an epoch boundary.
    pub fn next_step(&mut self, accum: usize, plan_epoch: &dyn Fn(u64) -> Vec<P>) -> Vec<P> {
        let StreamPosition { epoch, batch } = self.position;
        let batches = self.epoch(epoch, plan_epoch);
        let end = (batch + accum).min(batches.len());
        let plans = batches[batch..end].to_vec();
        self.position = if end == batches.len() {
            StreamPosition {
                epoch: epoch + 1,
                batch: 0,
            }
        } else {
            StreamPosition { epoch, batch: end }
        };
        plans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 items in batches of one, shuffled by epoch.
    fn plan(epoch: u64) -> Vec<usize> {
        (0..10).map(|i| (i * 3 + epoch as usize) % 10).collect()
    }

    #[test]
    fn steps_stop_at_epoch_boundaries_and_resume_from_a_position() {
        let five = |e: u64| -> Vec<usize> { plan(e).into_iter().filter(|&i| i < 5).collect() };
        let mut s = BatchStream::new(0, 1);
        assert_eq!(s.batches_per_epoch(&five), 5);
        let sizes: Vec<usize> = (0..4).map(|_| s.next_step(2, &five).len()).collect();
        assert_eq!(sizes, vec![2, 2, 1, 2]);
        assert_eq!(s.position, StreamPosition { epoch: 1, batch: 2 });
        let next = s.next_step(2, &five);
        let mut resumed = BatchStream::new(0, 1);
        resumed.position = StreamPosition { epoch: 1, batch: 2 };
        assert_eq!(resumed.next_step(2, &five), next);
    }

    #[test]
    fn ranks_take_disjoint_equal_shares() {
        let mut seen = Vec::new();
        let mut counts = Vec::new();
        for rank in 0..3 {
            let mut s = BatchStream::new(rank, 3);
            let n = s.batches_per_epoch(&plan);
            counts.push(n);
            for _ in 0..n {
                seen.extend(s.next_step(1, &plan));
            }
        }
        assert_eq!(counts, vec![3, 3, 3]);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "9 of the 10 items, each on exactly one rank");
    }
}
