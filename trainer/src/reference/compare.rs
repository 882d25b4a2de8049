//! Comparing computed tensors with a case's expected ones, and the printed report.

use crate::model::weights::{to_f32, to_i64, WeightFiles};
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// How one computed tensor is compared with its reference.
pub enum Comparison {
    /// `max |got − want| / max |want| ≤ tol` over the positions where `mask` (if any) is true.
    Relative {
        got: Vec<f64>,
        tol: f64,
        mask: Option<Vec<bool>>,
    },
    /// `max |got − want| ≤ tol` over the masked positions (ill-conditioned elements excluded).
    Absolute {
        got: Vec<f64>,
        tol: f64,
        mask: Option<Vec<bool>>,
    },
    /// Equal element for element (ids, quantized bytes).
    Exact { got: Vec<i64> },
}

/// The reference tensors of a case, as f64 (floats) or i64 (integers).
pub struct Expected {
    pub tensors: BTreeMap<String, Vec<f64>>,
}

impl Expected {
    pub fn load(path: &Path) -> Result<Self> {
        let files = WeightFiles::open_file(path)?;
        let mut tensors = BTreeMap::new();
        for name in files.names() {
            let (_, dtype) = files.info(name)?;
            let (_, bytes) = files.bytes(name)?;
            let values = match to_f32(dtype, &bytes) {
                Ok(v) => v.into_iter().map(f64::from).collect(),
                Err(_) => match dtype {
                    safetensors::Dtype::U8 => bytes.iter().map(|&b| b as f64).collect(),
                    _ => to_i64(dtype, &bytes)?
                        .into_iter()
                        .map(|x| x as f64)
                        .collect(),
                },
            };
            tensors.insert(name.to_string(), values);
        }
        Ok(Expected { tensors })
    }
}

/// One line of the report.
pub struct Line {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Every expected tensor with its verdict.
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    /// Compares each expected tensor with the computed one of the same name; missing ones fail.
    pub fn new(expected: &Expected, mut computed: BTreeMap<String, Comparison>) -> Self {
        let lines = expected
            .tensors
            .iter()
            .map(|(name, want)| match computed.remove(name) {
                None => Line {
                    name: name.clone(),
                    passed: false,
                    detail: "cannot compute this tensor".into(),
                },
                Some(c) => judge(name, want, c),
            })
            .collect();
        Report { lines }
    }

    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.passed)
    }

    /// Names of the failed lines.
    pub fn failures(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| !l.passed)
            .map(|l| l.name.as_str())
            .collect()
    }
}

fn judge(name: &str, want: &[f64], c: Comparison) -> Line {
    let fail = |detail: String| Line {
        name: name.to_string(),
        passed: false,
        detail,
    };
    let n = match &c {
        Comparison::Relative { got, .. } | Comparison::Absolute { got, .. } => got.len(),
        Comparison::Exact { got } => got.len(),
    };
    if n != want.len() {
        return fail(format!("computed {n} values, expected {}", want.len()));
    }
    match c {
        Comparison::Exact { got } => {
            let bad = got.iter().zip(want).position(|(g, w)| *g as f64 != *w);
            match bad {
                None => Line {
                    name: name.into(),
                    passed: true,
                    detail: format!("exact ({n} values)"),
                },
                Some(i) => fail(format!("differs at index {i}: {} vs {}", got[i], want[i])),
            }
        }
        Comparison::Relative { got, tol, mask } | Comparison::Absolute { got, tol, mask }
            if got.iter().any(|x| !x.is_finite()) =>
        {
            let _ = (tol, mask);
            fail("non-finite values computed".into())
        }
        Comparison::Relative { got, tol, mask } => {
            let keep = |i: usize| mask.as_ref().is_none_or(|m| m[i]);
            let scale = (0..n)
                .filter(|&i| keep(i))
                .fold(0.0f64, |m, i| m.max(want[i].abs()))
                .max(1e-30);
            let err = (0..n)
                .filter(|&i| keep(i))
                .fold(0.0f64, |m, i| m.max((got[i] - want[i]).abs()))
                / scale;
            Line {
                name: name.into(),
                passed: err <= tol,
                detail: format!("max rel err {err:.2e} (tol {tol:.0e})"),
            }
        }
        Comparison::Absolute { got, tol, mask } => {
            let keep = |i: usize| mask.as_ref().is_none_or(|m| m[i]);
            let excluded = (0..n).filter(|&i| !keep(i)).count();
            let err = (0..n)
                .filter(|&i| keep(i))
                .fold(0.0f64, |m, i| m.max((got[i] - want[i]).abs()));
            let note = if excluded > 0 {
                format!(", {excluded} ill-conditioned excluded")
            } else {
                String::new()
            };
            Line {
                name: name.into(),
                passed: err <= tol,
                detail: format!("max abs err {err:.2e} (tol {tol:.0e}{note})"),
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(
                f,
                "{}  {:<80} {}",
                if l.passed { "PASS" } else { "FAIL" },
                l.name,
                l.detail
            )?;
        }
        let failed = self.lines.iter().filter(|l| !l.passed).count();
        write!(f, "{} passed, {} failed", self.lines.len() - failed, failed)
    }
}
