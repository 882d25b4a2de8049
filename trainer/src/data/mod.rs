//! Datasets: reading records ([`records`]), tokenizing them ([`tokenize`]; long texts split by
//! [`chunking`]), pre-tokenized token shard files ([`token_shards`]), the [`source`] of examples
//! either gives, and batching tokenized examples ([`batching`], rows filled by [`packing`]).

pub mod batching;
pub mod check;
pub mod chunking;
pub mod packing;
pub mod pair_batching;
pub mod preference;
pub mod records;
pub mod source;
pub mod text;
pub mod token_shards;
pub mod tokenize;
