//! `fuselora check-reference CASE_DIR`: recomputes a Hugging Face reference case (the format of
//! tests/fixtures: case.json, model/, adapter/, inputs.safetensors, expected.safetensors) and
//! compares every expected tensor. A tensor we cannot compute is a failure, never a skip.

mod compare;
mod dpo;
mod nf4;
mod orpo;
pub mod sft;
mod tokenizer;

pub use compare::{Comparison, Report};

use anyhow::{bail, Context, Result};
use kernels::Backend;
use serde_json::Value;
use std::path::Path;

/// Runs the case in `dir` on `be` and returns the report (one line per expected tensor).
pub fn check_case<B: Backend>(be: &B, dir: &Path) -> Result<Report> {
    let case_path = dir.join("case.json");
    let text = std::fs::read_to_string(&case_path).with_context(|| {
        format!(
            "cannot read {}: a reference case folder needs case.json",
            case_path.display()
        )
    })?;
    let case: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", case_path.display()))?;
    let kind = case
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    let expected = compare::Expected::load(&dir.join("expected.safetensors"))?;
    let computed = match kind {
        "sft" => sft::run(be, dir, &case)?,
        "tokenizer" => tokenizer::run(dir, &case)?,
        "dpo" => dpo::run(be, dir, &case)?,
        "orpo" => orpo::run(be, dir, &case)?,
        "nf4_quant" => nf4::run_quant(dir, &case)?,
        "qlora_sft" => nf4::run_qlora(be, dir, &case)?,
        other => bail!("unknown case kind `{other}` in {}: known kinds are sft, dpo, orpo, tokenizer, nf4_quant, qlora_sft", case_path.display()),
    };
    Ok(Report::new(&expected, computed))
}
