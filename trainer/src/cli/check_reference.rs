//! `fuselora check-reference CASE_DIR...`

use anyhow::Result;
use kernels::cpu::CpuBackend;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Case folders in the format of tests/fixtures (case.json, model/, adapter/, inputs and expected tensors).
    #[arg(required = true)]
    cases: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let be = CpuBackend::new();
    let mut all_passed = true;
    for dir in &args.cases {
        println!(
            "== {} on {}",
            dir.display(),
            kernels::Backend::describe(&be)
        );
        match trainer::reference::check_case(&be, dir) {
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
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
