//! One module per subcommand: its arguments and what it does.

pub mod backend;
pub mod bench;
pub mod check_reference;
pub mod export_gguf;
pub mod generate;
pub mod import_gguf;
pub mod launch;
pub mod merge;
#[cfg(feature = "cuda")]
pub mod nccl_link;
pub mod plan;
pub mod prepare_data;
pub mod preview;
pub mod run_config;
pub mod train;
