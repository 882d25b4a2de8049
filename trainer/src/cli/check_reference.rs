//! `fuselora check-reference [--backend cpu|cuda|auto] [--dtype f32|bf16|f16] CASE_DIR...`

use super::backend::{run_on, BackendTask, Selection};
use anyhow::Result;
use kernels::Backend;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::train::config::{BackendKind, ComputeDType};

#[derive(clap::Args)]
pub struct Args {
    /// Case folders in the format of tests/fixtures (case.json, model/, adapter/, inputs and expected tensors).
    #[arg(required = true)]
    cases: Vec<PathBuf>,
    /// `cpu` (the f32 reference), `cuda` (the GPU, `LOCAL_RANK` or 0) or `auto`.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Compute dtype on the GPU; the fixtures' tolerances are met in `f32`.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeDType,
}

struct CheckCases(Vec<PathBuf>);

impl BackendTask for CheckCases {
    type Output = bool;
    fn run<B: Backend>(self, be: &B) -> Result<bool> {
        let mut all_passed = true;
        for dir in &self.0 {
            println!("== {} on {}", dir.display(), be.describe());
            match trainer::reference::check_case(be, dir) {
                Ok(report) => {
                    println!("{report}");
                    all_passed &= report.passed();
                }
                Err(e) => {
                    println!("FAIL  {}: {e:#}", dir.display());
                    all_passed = false;
                }
            }
        }
        Ok(all_passed)
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let selection = Selection {
        backend: args.backend,
        dtype: args.dtype,
    };
    Ok(if run_on(&selection, CheckCases(args.cases))? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
