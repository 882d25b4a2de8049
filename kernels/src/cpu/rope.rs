//! Rotary embedding, "rotate-half" layout (transformers' `apply_rotary_pos_emb`):
//! for `j < d/2`, `(x_j, x_{j+d/2}) ← (x_j·cos − x_{j+d/2}·sin, x_{j+d/2}·cos + x_j·sin)`.
//! The backward pass applies the same rotation with `−sin` (a rotation's transpose).

use crate::{KernelError, Result};
use rayon::prelude::*;

pub fn rotate(
    x: &mut [f32],
    positions: &[i32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<()> {
    let half = head_dim / 2;
    let table_rows = cos.len() / half;
    if let Some(&p) = positions
        .iter()
        .find(|&&p| p < 0 || p as usize >= table_rows)
    {
        return Err(KernelError::Unsupported(format!(
            "rope: position {p} outside the table of {table_rows} positions"
        )));
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(token, &p)| {
            let c = &cos[p as usize * half..][..half];
            let s = &sin[p as usize * half..][..half];
            for head in token.chunks_exact_mut(head_dim) {
                let (first, second) = head.split_at_mut(half);
                for (((a, b), &c), &s) in first.iter_mut().zip(second).zip(c).zip(s) {
                    let (x, y, sj) = (*a, *b, sign * s);
                    *a = x * c - y * sj;
                    *b = y * c + x * sj;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{check_gradient, dot, random};
    use crate::rope::{RopeConfig, RopeScaling};

    #[test]
    fn inverse_undoes_forward_and_is_the_gradient() {
        let (n, heads, d) = (5, 2, 8);
        let cfg = RopeConfig {
            theta: 10000.0,
            head_dim: d,
            scaling: RopeScaling::Default,
        };
        let (cos, sin) = cfg.tables(16, 16);
        let positions = vec![0, 3, 7, 15, 2];
        let x = random(n * heads * d, 1);
        let mut y = x.clone();
        rotate(&mut y, &positions, &cos, &sin, heads, d, false).unwrap();
        let mut back = y.clone();
        rotate(&mut back, &positions, &cos, &sin, heads, d, true).unwrap();
        for i in 0..x.len() {
            assert!((back[i] - x[i]).abs() < 1e-6);
        }
        let probe = random(x.len(), 2);
        let mut grad = probe.clone();
        rotate(&mut grad, &positions, &cos, &sin, heads, d, true).unwrap();
        check_gradient(&x, &grad, 1e-2, 1e-3, |x| {
            let mut y = x.to_vec();
            rotate(&mut y, &positions, &cos, &sin, heads, d, false).unwrap();
            dot(&y, &probe)
        });
    }

    #[test]
    fn position_zero_is_the_identity() {
        let cfg = RopeConfig {
            theta: 10000.0,
            head_dim: 4,
            scaling: RopeScaling::Default,
        };
        let (cos, sin) = cfg.tables(2, 2);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rotate(&mut x, &[0], &cos, &sin, 1, 4, false).unwrap();
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn a_position_past_the_table_is_an_error() {
        let cfg = RopeConfig {
            theta: 10000.0,
            head_dim: 4,
            scaling: RopeScaling::Default,
        };
        let (cos, sin) = cfg.tables(2, 2);
        let mut x = vec![0.0; 4];
        assert!(rotate(&mut x, &[2], &cos, &sin, 1, 4, false).is_err());
    }
}
