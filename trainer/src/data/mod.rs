//! Datasets: reading records ([`records`]), and batching tokenized examples ([`batching`]).

pub mod batching;
pub mod records;
