//! Learning-rate schedules as transformers' `get_scheduler` builds them (a `LambdaLR` evaluated at
//! the number of optimizer steps already taken, so the first step uses `lr · λ(0)`):
//! warmup `λ(s) = s / W` for `s < W`; then constant `1`, linear `(T − s)/(T − W)`, or cosine
//! `½(1 + cos(π · (s − W)/(T − W)))`, never below 0.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// The shape after warmup (`train.schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_ratio` becomes `ceil(ratio · total)` steps, as in transformers.
    pub fn warmup_from_ratio(ratio: f64, total_steps: u64) -> u64 {
        (ratio * total_steps as f64).ceil() as u64
    }

    /// Learning rate of the optimizer step taken after `steps_done` steps.
    pub fn lr(&self, steps_done: u64) -> f64 {
        let (s, w, t) = (
            steps_done as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let factor = if steps_done < self.warmup_steps {
            s / w.max(1.0)
        } else {
            let progress = (s - w) / (t - w).max(1.0);
            match self.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
                ScheduleKind::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
            }
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn warmup_starts_at_zero_and_ramps_linearly() {
        let s = sched(ScheduleKind::Cosine);
        assert_eq!((s.lr(0), s.lr(1), s.lr(2)), (0.0, 0.5, 1.0));
    }

    #[test]
    fn linear_and_cosine_decay_to_zero_at_the_end() {
        let l = sched(ScheduleKind::Linear);
        assert_eq!(l.lr(6), 0.5);
        assert_eq!(l.lr(10), 0.0);
        let c = sched(ScheduleKind::Cosine);
        assert!((c.lr(6) - 0.5).abs() < 1e-12);
        assert!(c.lr(10).abs() < 1e-12);
        assert_eq!(sched(ScheduleKind::Constant).lr(9), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(Schedule::warmup_from_ratio(0.03, 100), 3);
        assert_eq!(Schedule::warmup_from_ratio(0.031, 100), 4);
    }
}
