//! Where tokenized examples come from: a vector in memory (datasets tokenized at start) or
//! memory-mapped token shards (`fuselora prepare-data`). Batching needs only every example's
//! length to plan an epoch; a rank then reads the tokens of its own batches alone.

use super::batching::Example;

/// Indexed tokenized examples.
pub trait ExampleSource {
    /// Number of examples.
    fn count(&self) -> usize;
    /// Tokens in example `i`.
    fn length(&self, i: usize) -> usize;
    /// Appends example `i`'s ids and labels to `ids` and `labels`.
    fn append(&self, i: usize, ids: &mut Vec<i32>, labels: &mut Vec<i32>);
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
