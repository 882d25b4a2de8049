//! Where a piece of training state stays between its uses: on the device, or in pinned host
//! memory and streamed through the device when it is needed — `train.optimizer_state` (AdamW's
//! masters and moments, optim.rs) and `model.embedding` (the input embedding table, the rows of
//! each batch gathered on the host).

use serde::{Deserialize, Serialize};

/// On the device (the fastest) or in pinned host memory (less device memory; the copies cost
/// host-link time: at 55 GB/s on an H200, about 10 ms a step for a 7B model's r = 16 AdamW
/// state, and under a millisecond for its embedding rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Residence {
    #[default]
    Device,
    Host,
}
