//! The order in which micro-batches are consumed: epoch by epoch, each epoch's batches fixed by
//! (seed, epoch). The position (epoch, next batch) is all a checkpoint needs to resume the stream.
//! With several ranks, rank `r` of `w` takes batches `r, r+w, r+2w, …` of the global list, and every
//! rank takes the same number (the list is cut to a multiple of `w`), so no rank waits at an epoch's end.
//! Every rank plans the epoch from the examples' lengths alone and reads the tokens of its own
//! batches only, when it reaches them.

use super::trace::ExampleTrace;
use crate::data::batching::{assemble, epoch_plan, Batching, HostBatch};
use crate::data::source::ExampleSource;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where the stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: u64,
    /// Index of the next batch of this rank within the epoch.
    pub batch: usize,
}

/// Examples shared by the stream and whoever else reads them.
pub type SharedExamples = Arc<dyn ExampleSource + Send + Sync>;

pub struct DataStream {
    examples: SharedExamples,
    batching: Batching,
    seed: u64,
    rank: usize,
    world: usize,
    pub position: StreamPosition,
    /// This rank's batches of the current epoch, as example indices.
    current: Option<(u64, Vec<Vec<Vec<usize>>>)>,
    /// Records the examples this rank reads (tests of the sharding).
    pub trace: Option<ExampleTrace>,
}

impl DataStream {
    pub fn new(
        examples: SharedExamples,
        batching: Batching,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Self {
        DataStream {
            examples,
            batching,
            seed,
            rank,
            world,
            position: StreamPosition::default(),
            current: None,
            trace: None,
        }
    }

    /// This rank's batches of `epoch`, as example indices.
    fn epoch(&mut self, epoch: u64) -> &[Vec<Vec<usize>>] {
        if self.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let all = epoch_plan(&*self.examples, &self.batching, self.seed, epoch);
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
    pub fn batches_per_epoch(&mut self) -> usize {
        self.epoch(0).len()
    }

    /// Optimizer steps per epoch with `accum` micro-batches per step (the last step of an epoch may be short).
    pub fn steps_per_epoch(&mut self, accum: usize) -> u64 {
        self.batches_per_epoch().div_ceil(accum) as u64
    }

    /// The next optimizer step's micro-batches: up to `accum`, never crossing an epoch boundary.
    pub fn next_step(&mut self, accum: usize) -> Vec<HostBatch> {
        let StreamPosition { epoch, batch } = self.position;
        let batches = self.epoch(epoch);
        let end = (batch + accum).min(batches.len());
        let plans = batches[batch..end].to_vec();
        let last = end == batches.len();
        self.position = if last {
            StreamPosition {
                epoch: epoch + 1,
                batch: 0,
            }
        } else {
            StreamPosition { epoch, batch: end }
        };
        if let Some(trace) = &mut self.trace {
            trace.record(epoch, plans.iter().flatten().flatten().copied());
        }
        plans
            .iter()
            .map(|rows| {
                assemble(
                    &*self.examples,
                    rows,
                    self.batching.pad_id,
                    self.batching.min_shape(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batching::Example;

    fn examples(n: usize) -> SharedExamples {
        let all: Vec<Example> = (0..n)
            .map(|i| Example {
                ids: vec![i as i32; 3],
                labels: vec![i as i32; 3],
            })
            .collect();
        Arc::new(all)
    }

    fn batching() -> Batching {
        Batching {
            rows: 1,
            max_seq_len: 3,
            packing: true,
            pad_id: 0,
        }
    }

    #[test]
    fn steps_stop_at_epoch_boundaries_and_resume_from_a_position() {
        let mut s = DataStream::new(examples(5), batching(), 7, 0, 1);
        assert_eq!(s.steps_per_epoch(2), 3);
        let sizes: Vec<usize> = (0..4).map(|_| s.next_step(2).len()).collect();
        assert_eq!(sizes, vec![2, 2, 1, 2]);
        let pos = s.position;
        let next = s.next_step(2);
        let mut resumed = DataStream::new(examples(5), batching(), 7, 0, 1);
        resumed.position = pos;
        assert_eq!(resumed.next_step(2), next);
    }

    #[test]
    fn ranks_take_disjoint_equal_shares() {
        let mut seen = Vec::new();
        let mut counts = Vec::new();
        for rank in 0..3 {
            let mut s = DataStream::new(examples(10), batching(), 1, rank, 3);
            let n = s.batches_per_epoch();
            counts.push(n);
            for _ in 0..n {
                seen.extend(s.next_step(1).into_iter().map(|b| b.ids[0]));
            }
        }
        assert_eq!(counts, vec![3, 3, 3]);
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            9,
            "9 of the 10 examples, each on exactly one rank"
        );
    }
}
