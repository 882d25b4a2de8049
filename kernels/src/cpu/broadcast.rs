//! `out[r, :] ← row` for every row: the bias of a linear layer laid down before the GEMM that
//! accumulates `x Wᵀ` onto it (`y = b + x Wᵀ`, the order of torch's `addmm`).

use rayon::prelude::*;

pub fn broadcast_rows(row: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(row.len())
        .for_each(|o| o.copy_from_slice(row));
}

#[cfg(test)]
mod tests {
    use crate::cpu::CpuBackend;
    use crate::Backend;

    #[test]
    fn every_row_gets_the_row_and_a_partial_row_is_refused() {
        let be = CpuBackend::new();
        let mut out = vec![9.0; 6];
        be.broadcast_rows(&vec![1.0, -2.0, 0.5], &mut out).unwrap();
        assert_eq!(out, [1.0, -2.0, 0.5, 1.0, -2.0, 0.5]);
        let e = be.broadcast_rows(&vec![1.0; 4], &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "broadcast_rows: out (whole rows of the broadcast row) has 6 elements, expected 8"
        );
    }

    /// `y = b + x Wᵀ` through the GEMM's `beta = 1` equals the bias added after the product.
    #[test]
    fn bias_then_gemm_is_the_affine_map() {
        let be = CpuBackend::new();
        let (n, i, o) = (3, 4, 2);
        let x: Vec<f32> = (0..n * i).map(|v| v as f32 * 0.25 - 1.0).collect();
        let w: Vec<f32> = (0..o * i).map(|v| 0.5 - v as f32 * 0.125).collect();
        let b = vec![0.75, -1.5];
        let mut y = vec![0.0; n * o];
        be.broadcast_rows(&b, &mut y).unwrap();
        be.gemm(n, o, i, 1.0, &x, false, &w, true, 1.0, &mut y)
            .unwrap();
        for r in 0..n {
            for c in 0..o {
                let dot: f32 = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum();
                assert!((y[r * o + c] - (dot + b[c])).abs() < 1e-6);
            }
        }
    }
}
