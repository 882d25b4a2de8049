//! One module per subcommand: its arguments and what it does.

pub mod backend;
pub mod bench;
pub mod check_reference;
pub mod generate;
pub mod import_gguf;
pub mod launch;
pub mod merge;
pub mod prepare_data;
pub mod preview;
pub mod train;
