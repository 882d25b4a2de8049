//! [`Backend::lora_dy_products`]: `dB += dyᵀ t` and `u += dy B`, LoRA's two backward products with
//! a projection's output gradient. Here: the checks every backend runs, and the op as two
//! [`Backend::gemm_at`] products with β = 1 — the reference the CPU backend runs, and the CUDA
//! backend's path where its fused kernel (`cuda/lora_dy.cu`, one read of dy) does not apply.

use crate::error::check_len;
use crate::{Backend, MatAt, Result};

const OP: &str = "lora_dy_products";

/// Checks the operands against their tensors' lengths: `dy [n, out]` and `dB [out, r]` dense,
/// `t [n, r]`, `B [out, r]` and `u [n, r]` where their [`MatAt`] places them.
pub(crate) fn check(
    (n, out, r): (usize, usize, usize),
    dy_len: usize,
    (t_at, t_len): (MatAt, usize),
    (b_at, b_len): (MatAt, usize),
    db_len: usize,
    (u_at, u_len): (MatAt, usize),
) -> Result<()> {
    check_len(OP, "dy", dy_len, n * out)?;
    t_at.check(OP, "t", n, r, t_len)?;
    b_at.check(OP, "B", out, r, b_len)?;
    check_len(OP, "dB", db_len, out * r)?;
    u_at.check(OP, "u", n, r, u_len)
}

/// `dB [out, r] += dyᵀ [out, n] · t [n, r]`, then `u [n, r] += dy [n, out] · B [out, r]`, each
/// through [`Backend::gemm_at`] (so each reads all of `dy`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn as_two_products<B: Backend + ?Sized>(
    be: &B,
    n: usize,
    out: usize,
    r: usize,
    dy: &B::Tensor,
    (t, t_at): (&B::Tensor, MatAt),
    (b, b_at): (&B::Tensor, MatAt),
    db: &mut B::Tensor,
    (u, u_at): (&mut B::Tensor, MatAt),
) -> Result<()> {
    check(
        (n, out, r),
        be.len(dy),
        (t_at, be.len(t)),
        (b_at, be.len(b)),
        be.len(db),
        (u_at, be.len(u)),
    )?;
    let dy_at = MatAt::dense(out);
    be.gemm_at(
        out,
        r,
        n,
        1.0,
        (dy, dy_at),
        true,
        (t, t_at),
        false,
        1.0,
        (db, MatAt::dense(r)),
    )?;
    be.gemm_at(
        n,
        r,
        out,
        1.0,
        (dy, dy_at),
        false,
        (b, b_at),
        false,
        1.0,
        (u, u_at),
    )
}

#[cfg(test)]
mod tests {
    use crate::cpu::testing::random;
    use crate::cpu::CpuBackend;
    use crate::{Backend, MatAt};

    /// The CPU backend's op against the sums written out, in f64: one member's columns of a
    /// 3-member `t` and `u` (width 3r, each behind a leading offset), B inside a larger tensor,
    /// both results added onto non-zero values; u's other columns keep theirs.
    #[test]
    fn adds_both_products_onto_the_accumulators() {
        let be = CpuBackend::new();
        let (n, out) = (37, 24);
        for r in [8, 16] {
            let width = 3 * r;
            let (t_at, b_at, u_at) = (
                MatAt::at(5 + r, width),
                MatAt::at(3, r),
                MatAt::at(2 + 2 * r, width),
            );
            let dy = random(n * out, 1);
            let t = random(5 + n * width, 2);
            let b = random(3 + out * r + 7, 3);
            let db0 = random(out * r, 4);
            let u0 = random(2 + n * width, 5);
            let (mut db, mut u) = (db0.clone(), u0.clone());
            be.lora_dy_products(
                n,
                out,
                r,
                &dy,
                (&t, t_at),
                (&b, b_at),
                &mut db,
                (&mut u, u_at),
            )
            .unwrap();
            let close = |got: f32, want: f64, what: &str| {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "r {r} {what}: {got} against {want}"
                );
            };
            for o in 0..out {
                for j in 0..r {
                    let sum: f64 = (0..n)
                        .map(|i| dy[i * out + o] as f64 * t[t_at.offset + i * width + j] as f64)
                        .sum();
                    close(db[o * r + j], db0[o * r + j] as f64 + sum, "dB");
                }
            }
            assert_eq!(u[..2], u0[..2], "r {r}: u before the matrix");
            for i in 0..n {
                for j in 0..width {
                    let at = 2 + i * width + j;
                    if !(2 * r..3 * r).contains(&j) {
                        assert_eq!(u[at], u0[at], "r {r}: u [{i}, {j}], another member's");
                        continue;
                    }
                    let sum: f64 = (0..out)
                        .map(|o| dy[i * out + o] as f64 * b[b_at.offset + o * r + j - 2 * r] as f64)
                        .sum();
                    close(u[at], u0[at] as f64 + sum, "u");
                }
            }
        }
    }

    #[test]
    fn an_operand_past_its_tensor_is_refused() {
        let be = CpuBackend::new();
        let (n, out, r) = (4, 8, 8);
        let (dy, t, b) = (vec![0.0; n * out], vec![0.0; n * r], vec![0.0; out * r]);
        let (mut db, mut u) = (vec![0.0; out * r], vec![0.0; n * 2 * r]);
        let err = be
            .lora_dy_products(
                n,
                out,
                r,
                &dy,
                (&t, MatAt::dense(r)),
                (&b, MatAt::dense(r)),
                &mut db,
                (&mut u, MatAt::at(r + 1, 2 * r)),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "lora_dy_products: u [4×8] at element 9 with rows 16 apart does not fit its tensor of 64 elements"
        );
        let err = be
            .lora_dy_products(
                n,
                out,
                r,
                &dy[1..].to_vec(),
                (&t, MatAt::dense(r)),
                (&b, MatAt::dense(r)),
                &mut db,
                (&mut u, MatAt::dense(r)),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(err, "lora_dy_products: dy has 31 elements, expected 32");
    }
}
