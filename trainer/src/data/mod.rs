//! Datasets: reading records ([`records`]), tokenizing them ([`tokenize`]) and batching
//! tokenized examples ([`batching`]).

pub mod batching;
pub mod pair_batching;
pub mod preference;
pub mod records;
pub mod tokenize;
