//! The non-finite guard: a step whose loss or gradient norm is NaN or infinite changes nothing
//! and is counted (as the f16 loss scaler skips an overflowing step); `train.max_nonfinite_steps`
//! such steps in a row stop the run with an error, leaving the last good checkpoint in place
//! (checkpoints and adapters are never written with a non-finite value: [`crate::finite`]).

use crate::optim::{StepOutcome, StepStats};
use anyhow::{bail, Result};

/// Counts skipped steps and stops the run after too many in a row.
#[derive(Debug)]
pub struct NonFiniteGuard {
    /// Non-finite steps in a row that stop the run.
    limit: u64,
    in_a_row: u64,
    /// Steps skipped over the run (non-finite, and f16 scale overflows).
    pub skipped: u64,
}

impl NonFiniteGuard {
    pub fn new(limit: u64) -> Self {
        NonFiniteGuard {
            limit,
            in_a_row: 0,
            skipped: 0,
        }
    }

    /// Runs the optimizer step `optimizer_step` (step number `step`, 1-based) unless `loss` is not
    /// finite, and counts a skipped one; returns its stats, or an error once `limit` non-finite
    /// steps came in a row.
    pub fn step(
        &mut self,
        step: u64,
        loss: f64,
        optimizer_step: impl FnOnce() -> Result<StepStats>,
    ) -> Result<StepStats> {
        let stats = if loss.is_finite() {
            optimizer_step()?
        } else {
            StepStats {
                grad_norm: f32::NAN,
                clip_coef: 0.0,
                outcome: StepOutcome::SkippedNonFinite,
            }
        };
        match stats.outcome {
            StepOutcome::Applied => self.in_a_row = 0,
            StepOutcome::SkippedScaleOverflow => self.skipped += 1,
            StepOutcome::SkippedNonFinite => {
                self.skipped += 1;
                self.in_a_row += 1;
                eprintln!(
                    "step {step}: skipped: loss {loss}, gradient norm {} (not finite; {} in a row, the run stops at {})",
                    stats.grad_norm, self.in_a_row, self.limit
                );
                if self.in_a_row >= self.limit {
                    bail!(
                        "step {step}: the loss or gradient norm was not finite for {} steps in a row \
                         (train.max_nonfinite_steps = {}), so the run stopped; the checkpoints already \
                         written are intact. Likely causes: a learning rate too high (train.lr), \
                         non-finite values in the data or the model, or f16 overflow (use bf16)",
                        self.in_a_row,
                        self.limit
                    );
                }
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(outcome: StepOutcome) -> StepStats {
        StepStats {
            grad_norm: 1.0,
            clip_coef: 1.0,
            outcome,
        }
    }

    #[test]
    fn non_finite_steps_are_skipped_counted_and_stop_the_run_when_in_a_row() {
        let mut g = NonFiniteGuard::new(3);
        let mut calls = 0;
        let mut step = |g: &mut NonFiniteGuard, n: u64, loss: f64, outcome: StepOutcome| {
            g.step(n, loss, || {
                calls += 1;
                Ok(stats(outcome))
            })
        };
        step(&mut g, 1, f64::NAN, StepOutcome::Applied).unwrap();
        step(&mut g, 2, 2.0, StepOutcome::SkippedNonFinite).unwrap();
        step(&mut g, 3, 2.0, StepOutcome::Applied).unwrap();
        assert_eq!(g.skipped, 2);
        // f16 scale overflows are counted but do not stop the run.
        for n in 4..10 {
            step(&mut g, n, 2.0, StepOutcome::SkippedScaleOverflow).unwrap();
        }
        assert_eq!(g.skipped, 8);
        step(&mut g, 10, f64::INFINITY, StepOutcome::Applied).unwrap();
        step(&mut g, 11, 2.0, StepOutcome::SkippedNonFinite).unwrap();
        let e = step(&mut g, 12, f64::NAN, StepOutcome::Applied)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("step 12")
                && e.contains("3 steps in a row")
                && e.contains("train.max_nonfinite_steps = 3"),
            "{e}"
        );
        assert_eq!(g.skipped, 11);
        assert_eq!(calls, 9, "a non-finite loss never reaches the optimizer");
    }
}
