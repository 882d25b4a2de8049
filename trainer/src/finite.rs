//! Never write garbage: tensors are checked for NaN and infinities before they are saved, so a
//! diverged run cannot write an all-NaN adapter, nor a checkpoint that rotates a good one out.

use anyhow::{bail, Result};
use kernels::Backend;

/// Refuses to save `tensors` (named by `names`) as `what` when any holds a NaN or an infinity,
/// naming the first such tensor.
pub fn refuse_non_finite<B: Backend>(
    be: &B,
    tensors: &[B::Tensor],
    names: &[String],
    what: &str,
) -> Result<()> {
    if be.all_finite(tensors)? {
        return Ok(());
    }
    for (t, name) in tensors.iter().zip(names) {
        if !be.all_finite(std::slice::from_ref(t))? {
            bail!(
                "refusing to write {what}: tensor `{name}` holds NaN or infinite values (the run diverged); the files already written are kept"
            );
        }
    }
    bail!("refusing to write {what}: it holds NaN or infinite values (the run diverged)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cpu::CpuBackend;

    #[test]
    fn the_first_non_finite_tensor_is_named() {
        let be = CpuBackend::new();
        let names = vec!["a".to_string(), "b".to_string()];
        refuse_non_finite(&be, &[vec![1.0], vec![2.0]], &names, "x").unwrap();
        let e = refuse_non_finite(
            &be,
            &[vec![1.0], vec![f32::INFINITY]],
            &names,
            "checkpoint-3",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("checkpoint-3") && e.contains("`b`"), "{e}");
    }
}
