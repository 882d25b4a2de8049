//! Per-op device time, for `fuselora bench --profile`: what a step spends in each kernel and GEMM.

/// The device time one op (a kernel by name, or a GEMM by shape) took over a profiled region.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// The kernel's name (`rms_norm_forward_bf16`), or `gemm MxNxK op` for a matrix product.
    pub name: String,
    /// Launches in the region.
    pub calls: usize,
    /// Summed device time between each launch's start and end events, in milliseconds.
    pub ms: f64,
    /// Floating-point operations the launches did (matrix products and attention; 0 where not counted).
    pub flops: f64,
}

/// Idle stream time shorter than this between two ops is launch spacing; longer gaps are a stream
/// wait for an offload copy, or the host late. Both are named after the op that waited, apart.
const IDLE_NAMED_MS: f64 = 0.02;

/// The profile's name for `ms` of idle stream time right before op `next`: `idle before <next>`
/// from [`IDLE_NAMED_MS`] on, `idle under 20 µs before <next>` below (summed by op, these say
/// which ops the launch spacing falls before: where the host feeds the device just in time).
pub fn idle_name(next: &str, ms: f64) -> String {
    match ms >= IDLE_NAMED_MS {
        true => format!("idle before {next}"),
        false => format!("idle under 20 µs before {next}"),
    }
}

/// Whether a profile row is idle time ([`idle_name`]) rather than an op.
pub fn is_idle(name: &str) -> bool {
    name.starts_with("idle ")
}

/// Sums `(name, ms, flops)` records by name, largest total time first.
pub fn summarise(records: impl IntoIterator<Item = (String, f64, f64)>) -> Vec<OpTime> {
    let mut by_name: std::collections::HashMap<String, OpTime> = std::collections::HashMap::new();
    for (name, ms, flops) in records {
        let e = by_name.entry(name.clone()).or_insert(OpTime {
            name,
            calls: 0,
            ms: 0.0,
            flops: 0.0,
        });
        e.calls += 1;
        e.ms += ms;
        e.flops += flops;
    }
    let mut ops: Vec<OpTime> = by_name.into_values().collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_gaps_are_named_by_the_waiting_op_from_20_us() {
        assert_eq!(
            idle_name("gemm 4x4x4 NN bf16", 0.5),
            "idle before gemm 4x4x4 NN bf16"
        );
        assert_eq!(
            idle_name("rope_bf16", 0.0199),
            "idle under 20 µs before rope_bf16"
        );
        assert!(is_idle(&idle_name("rope_bf16", 0.5)) && is_idle(&idle_name("rope_bf16", 0.0)));
        assert!(!is_idle("rope_bf16"));
    }

    #[test]
    fn records_are_summed_by_name_largest_first() {
        let ops = summarise([
            ("a".to_string(), 1.0, 10.0),
            ("b".to_string(), 5.0, 0.0),
            ("a".to_string(), 2.5, 4.0),
        ]);
        assert_eq!(ops.len(), 2);
        assert_eq!(
            (ops[0].name.as_str(), ops[0].calls, ops[0].ms),
            ("b", 1, 5.0)
        );
        assert_eq!(
            (ops[1].name.as_str(), ops[1].calls, ops[1].ms, ops[1].flops),
            ("a", 2, 3.5, 14.0)
        );
    }
}
