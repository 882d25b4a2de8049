//! GEMM through `matrixmultiply`, with the rows of C split across rayon threads.
//! Each C element is computed by the same kernel over the same k-blocks whichever thread owns
//! its row, so the split changes no bit.

use rayon::prelude::*;

/// Rows of C per parallel task: enough work to amortise the packing of B.
const ROWS_PER_TASK: usize = 32;

/// `C[m,n] ← alpha · op(A) · op(B) + beta · C` on row-major f32 slices (see `Backend::gemm`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    beta: f32,
    c: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    // Strides of op(A) [m,k] and op(B) [k,n] in their storage.
    let (rsa, csa) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (rsb, csb) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let run = |row0: usize, c_rows: &mut [f32]| {
        let rows = c_rows.len() / n;
        let a_off = if trans_a { row0 } else { row0 * k };
        // SAFETY: the strides above address exactly op(A)[row0..row0+rows, 0..k] inside `a`,
        // op(B)[0..k, 0..n] inside `b` and `c_rows` as [rows, n]; lengths were checked by the caller.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                alpha,
                a.as_ptr().add(a_off),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                beta,
                c_rows.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    };
    if m <= ROWS_PER_TASK || (m * n * k) < (1 << 18) {
        run(0, c);
    } else {
        c.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(t, rows)| run(t * ROWS_PER_TASK, rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::random;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn every_transpose_combination_matches_the_definition() {
        let (m, n, k) = (70, 45, 33);
        let a = random(m * k, 1);
        let b = random(k * n, 2);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = random(m * n, 3);
            let c0 = c.clone();
            gemm_f32(m, n, k, 0.5, &a, ta, &b, tb, 2.0, &mut c);
            let want = naive(m, n, k, &a, ta, &b, tb);
            for i in 0..m * n {
                let expect = 0.5 * want[i] + 2.0 * c0[i];
                assert!(
                    (c[i] - expect).abs() < 1e-4,
                    "ta={ta} tb={tb} i={i}: {} vs {expect}",
                    c[i]
                );
            }
        }
    }

    #[test]
    fn beta_zero_ignores_garbage_in_c() {
        let a = random(6, 4);
        let b = random(6, 5);
        let mut c = vec![f32::NAN; 4];
        gemm_f32(2, 2, 3, 1.0, &a, false, &b, false, 0.0, &mut c);
        assert!(c.iter().all(|x| x.is_finite()));
    }
}
