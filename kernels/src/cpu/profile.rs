//! Wall time and useful FLOPs per op of the CPU backend, summed over calls. Off (one relaxed
//! atomic load per op) unless [`enable`]d; the per-op table of docs/benchmarks.md comes from
//! it, through the trainer's `examples/cpu_profile.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<OpTotal>> = Mutex::new(Vec::new());

/// One op's calls, time and FLOPs since the last [`take`].
#[derive(Clone, Debug, PartialEq)]
pub struct OpTotal {
    /// The op and, for GEMMs, its shape class.
    pub op: String,
    pub calls: u64,
    pub seconds: f64,
    /// The multiply-adds the op's equation needs, ×2 (0 for the memory-bound ops).
    pub flops: f64,
}

/// Starts counting.
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// The totals so far, in first-call order; the counters restart from zero.
pub fn take() -> Vec<OpTotal> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`; when counting, charges its wall time to the op and FLOPs `describe` names.
pub(crate) fn timed<R>(describe: impl FnOnce() -> (String, f64), f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let seconds = t0.elapsed().as_secs_f64();
    let (op, flops) = describe();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|t| t.op == op) {
        Some(t) => {
            t.calls += 1;
            t.seconds += seconds;
            t.flops += flops;
        }
        None => totals.push(OpTotal {
            op,
            calls: 1,
            seconds,
            flops,
        }),
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_of_one_op_are_summed_and_take_resets() {
        enable();
        take();
        for _ in 0..3 {
            timed(|| ("profile-test op".to_string(), 10.0), || ());
        }
        let totals: Vec<OpTotal> = take()
            .into_iter()
            .filter(|t| t.op == "profile-test op")
            .collect();
        assert_eq!(totals.len(), 1);
        assert_eq!((totals[0].calls, totals[0].flops), (3, 30.0));
        assert!(take().iter().all(|t| t.op != "profile-test op"));
    }
}
