//! Where tokenized examples come from: a vector in memory (datasets tokenized at start) or
//! memory-mapped token shards (`fuselora prepare-data`). Batching needs only every example's
//! length to plan an epoch; a rank then reads the tokens of its own batches alone.

/// Indexed tokenized examples.
pub trait ExampleSource {
    /// Number of examples.
    fn count(&self) -> usize;
    /// Tokens in example `i`.
    fn length(&self, i: usize) -> usize;
    /// Appends example `i`'s ids and labels to `ids` and `labels`.
    fn append(&self, i: usize, ids: &mut Vec<i32>, labels: &mut Vec<i32>);
}
