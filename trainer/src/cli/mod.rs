//! One module per subcommand: its arguments and what it does.

pub mod check_reference;
pub mod import_gguf;
pub mod launch;
pub mod prepare_data;
pub mod train;
