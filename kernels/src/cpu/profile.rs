//! Wall time, CPU time and useful FLOPs per op of the CPU backend, summed over calls. Off (one
//! relaxed atomic load per op) unless [`enable`]d; the per-op table of docs/benchmarks.md comes
//! from it, through the trainer's `examples/cpu_profile.rs`. The CPU time (all of the process's
//! threads) is what to compare on a machine other programs share: their load stretches the
//! wall time of every op but adds little to the CPU time.

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
    /// CPU seconds of the whole process during the op's calls.
    pub cpu_seconds: f64,
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

/// Seconds of CPU time this process has used so far, all threads together.
pub fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Runs `f`; when counting, charges its wall and CPU time to the op and FLOPs `describe` names.
pub(crate) fn timed<R>(describe: impl FnOnce() -> (String, f64), f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    let r = f();
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let (op, flops) = describe();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|t| t.op == op) {
        Some(t) => {
            t.calls += 1;
            t.seconds += seconds;
            t.cpu_seconds += cpu;
            t.flops += flops;
        }
        None => totals.push(OpTotal {
            op,
            calls: 1,
            seconds,
            cpu_seconds: cpu,
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
