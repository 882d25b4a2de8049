//! The `--config FILE --set KEY=VALUE ...` pair of the commands that read a run config.

use anyhow::Result;
use std::path::PathBuf;
use trainer::train::config::RunConfig;

#[derive(clap::Args)]
pub struct RunConfigArgs {
    /// The run config (see configs/ for examples).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set train.lr=1e-4 --set data.max_seq_len=2048`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl RunConfigArgs {
    /// The config with the overrides (and `extra` ones after them) applied.
    pub fn load(&self, extra: &[String]) -> Result<RunConfig> {
        let overrides: Vec<String> = self.overrides.iter().chain(extra).cloned().collect();
        RunConfig::load(&self.config, &overrides)
    }
}
