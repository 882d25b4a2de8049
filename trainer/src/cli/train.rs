//! `fuselora train --config FILE.toml [--set key=value ...] [--resume [CHECKPOINT]]`

use super::backend::{run_on, BackendTask, Selection};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::train::checkpoint::Resume;
use trainer::train::config::RunConfig;
use trainer::train::distributed::Distributed;
use trainer::train::grad_reduce::GradReducer;
use trainer::train::run::{describe_summary, train_ranks, Summary};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    run: super::run_config::RunConfigArgs,
    /// The training method, `sft`, `dpo` or `orpo` (shorthand for `--set method.name=...`; the
    /// method's other keys come from the config's `[method]` section).
    #[arg(long, value_parser = ["sft", "dpo", "orpo"])]
    method: Option<String>,
    /// Continue from the newest checkpoint in the output folder, or from the one given.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    /// Delete a non-empty output folder (another run's) and start afresh (`output.overwrite = true`).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
}

struct Train {
    cfg: RunConfig,
    resume: Resume,
}

impl BackendTask for Train {
    /// The summary, on rank 0 only.
    type Output = Option<Summary>;
    fn run<B: GradReducer>(self, be: &B) -> Result<Option<Summary>> {
        let dist = Distributed::join(be)?;
        let summary = train_ranks(be, &self.cfg, self.resume, &dist)?;
        let main = dist.is_main();
        dist.finish()?;
        Ok(main.then_some(summary))
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(m) = &args.method {
        overrides.push(format!("method.name={m}"));
    }
    if args.overwrite {
        overrides.push("output.overwrite=true".into());
    }
    let cfg = args.run.load(&overrides)?;
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(p) => Resume::From(PathBuf::from(p)),
    };
    let selection = Selection {
        backend: cfg.model.backend,
        dtype: cfg.model.dtype,
    };
    let out = cfg.output.dir.clone();
    if let Some(summary) = run_on(&selection, Train { cfg, resume })? {
        println!("{}", describe_summary(&summary, &out));
    }
    Ok(ExitCode::SUCCESS)
}
