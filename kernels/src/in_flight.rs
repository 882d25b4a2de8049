//! When a parked group's device buffers may go back to the pool ([`crate::Backend::park`]).
//!
//! A park copies its tensors to the host on a side stream; until that copy is done, their device
//! buffers are "in flight". Handing them to a later op needs the compute stream to wait for the
//! copy, which is free if the copy had time to finish and costs the copy's whole time if it was
//! issued just before. So a park, prefetch or unpark releases only what is surely copied by then:
//! the earlier parks of its own [`ParkLane`], and every park made before the newest of them.
//!
//! With one lane this is "release everything parked so far" (a layer's checkpoint is parked once
//! per layer, so each release finds the previous layer's copy done). Two lanes park in one forward
//! when AdamW's host-resident state is updated there, layer by layer (`trainer/src/optim.rs`): per
//! layer, the optimizer group is parked before the layer runs and the checkpoint after it, so each
//! lane's previous park is a whole layer old when its next call releases it, and neither waits for
//! the other's fresh copy. The CUDA backend holds the buffers, `fuselora plan`'s meter books them.

/// Who parks a group, so that one lane's calls do not wait for the other's fresh copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkLane {
    /// Layer checkpoints (and the host-resident embedding table, parked once).
    Activations,
    /// AdamW's host-resident masters and moments, one layer's group at a time.
    OptimizerState,
}

/// Parked groups whose device buffers are not yet released, oldest first.
#[derive(Debug)]
pub struct InFlight<T> {
    entries: Vec<(ParkLane, T)>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            entries: Vec::new(),
        }
    }
}

impl<T> InFlight<T> {
    /// Takes out what a call from `lane` may release: every entry up to `lane`'s newest one
    /// (nothing when `lane` has none in flight), oldest first.
    pub fn release(&mut self, lane: ParkLane) -> Vec<T> {
        match self.entries.iter().rposition(|(l, _)| *l == lane) {
            Some(newest) => self.entries.drain(..=newest).map(|(_, t)| t).collect(),
            None => Vec::new(),
        }
    }

    /// Records a group just parked by `lane`.
    pub fn push(&mut self, lane: ParkLane, t: T) {
        self.entries.push((lane, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ParkLane::{Activations as A, OptimizerState as O};

    #[test]
    fn one_lane_releases_everything_parked_before() {
        let mut f = InFlight::default();
        assert!(f.release(A).is_empty());
        f.push(A, 1);
        assert_eq!(f.release(A), vec![1]);
        f.push(A, 2);
        f.push(A, 3);
        assert_eq!(f.release(A), vec![2, 3]);
        assert!(f.release(A).is_empty(), "nothing is left in flight");
    }

    /// The forward with a deferred optimizer update: per layer l, prefetch group l+1, park group
    /// l, run the layer, park its checkpoint. No call releases a park made since the last layer.
    #[test]
    fn two_lanes_release_only_parks_a_layer_old() {
        let mut f = InFlight::default();
        // layer 0
        assert!(f.release(O).is_empty(), "prefetch of group 1");
        f.push(O, "group 0");
        f.push(A, "checkpoint 0");
        // layer 1
        assert_eq!(f.release(O), vec!["group 0"], "prefetch of group 2");
        assert!(f.release(O).is_empty(), "park of group 1");
        f.push(O, "group 1");
        assert_eq!(f.release(A), vec!["checkpoint 0"], "park of checkpoint 1");
        f.push(A, "checkpoint 1");
        // backward's first prefetch (a checkpoint) releases both, and nothing else is in flight
        assert_eq!(f.release(A), vec!["group 1", "checkpoint 1"]);
        assert!(f.release(O).is_empty());
    }
}
