//! GEMM through the `gemm` crate (the kernels candle uses), run single-threaded on fixed tiles
//! of C that rayon spreads over the threads.
//!
//! Why tiles: each tile packs only its own rows of op(A) and columns of op(B) (for a
//! `TILE_ROWS × TILE_COLS` tile that is `(TILE_ROWS + TILE_COLS)·k` copies for
//! `2·TILE_ROWS·TILE_COLS·k` FLOPs), and the tiles depend on the shape alone, never on the
//! thread count, so every C element is computed by the same call whichever thread runs it:
//! results are bitwise identical for any number of threads.

use rayon::prelude::*;

/// Rows and columns of C per parallel task (multiples of every `gemm` micro-kernel size).
const TILE_ROWS: usize = 256;
const TILE_COLS: usize = 256;

/// A matrix inside a slice: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
/// A transposed view swaps the strides, so no GEMM needs transpose flags.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// The writable counterpart of [`MatRef`].
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// Index of the last element of a `rows × cols` view, or `None` for an empty one.
fn last_index(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<usize> {
    (rows > 0 && cols > 0).then(|| (rows - 1) * row_stride + (cols - 1) * col_stride)
}

impl<'a> MatRef<'a> {
    /// Panics when the view reaches past the end of `data` (a bug in the caller's shapes).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if let Some(last) = last_index(rows, cols, row_stride, col_stride) {
            assert!(last < data.len(), "matrix view past the end of its slice");
        }
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `r0..r0+rows` and columns `c0..c0+cols`.
    fn block(self, r0: usize, rows: usize, c0: usize, cols: usize) -> Self {
        assert!(r0 + rows <= self.rows && c0 + cols <= self.cols);
        let start = r0 * self.row_stride + c0 * self.col_stride;
        let data = if rows == 0 || cols == 0 {
            &self.data[..0]
        } else {
            &self.data[start..]
        };
        MatRef::new(data, rows, cols, self.row_stride, self.col_stride)
    }
}

impl<'a> MatMut<'a> {
    /// Panics when the view reaches past the end of `data` (a bug in the caller's shapes).
    pub fn new(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if let Some(last) = last_index(rows, cols, row_stride, col_stride) {
            assert!(last < data.len(), "matrix view past the end of its slice");
        }
        MatMut {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// `C ← alpha · A · B + beta · C` on one thread; with `beta = 0` C is only written
/// (NaN or garbage in it is ignored).
pub fn gemm_view(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "gemm: [{}×{}]·[{}×{}] into [{}×{}]",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    // SAFETY: the constructors checked that every view lies inside its slice, and `c` is
    // borrowed mutably, so it aliases neither `a` nor `b`.
    unsafe { gemm_raw(alpha, a, b, beta, c.data.as_mut_ptr(), &c) }
}

/// The `gemm` call. SAFETY: `c_ptr` must address a `shape.rows × shape.cols` matrix with
/// `shape`'s strides that no other thread touches during the call.
unsafe fn gemm_raw(alpha: f32, a: MatRef, b: MatRef, beta: f32, c_ptr: *mut f32, shape: &MatMut) {
    // With k = 0, gemm scales C by beta (or zeroes it when beta = 0).
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // gemm computes dst ← α·dst + β·lhs·rhs: its α is our beta, its β our alpha.
    gemm::gemm(
        m,
        n,
        k,
        c_ptr,
        shape.col_stride as isize,
        shape.row_stride as isize,
        beta != 0.0,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// C's base pointer, shared by the tasks that write its disjoint tiles.
#[derive(Clone, Copy)]
struct TileTarget(*mut f32);
// SAFETY: each task writes only its own tile of C (see `gemm_f32`).
unsafe impl Send for TileTarget {}
unsafe impl Sync for TileTarget {}

/// `C[m,n] ← alpha · op(A) · op(B) + beta · C` on row-major f32 slices (see `Backend::gemm`),
/// over all threads.
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
    let a = if trans_a {
        MatRef::row_major(a, k, m).t()
    } else {
        MatRef::row_major(a, m, k)
    };
    let b = if trans_b {
        MatRef::row_major(b, n, k).t()
    } else {
        MatRef::row_major(b, k, n)
    };
    let c = MatMut::row_major(c, m, n);
    let (row_tiles, col_tiles) = (m.div_ceil(TILE_ROWS), n.div_ceil(TILE_COLS));
    if row_tiles * col_tiles <= 1 {
        return gemm_view(alpha, a, b, beta, c);
    }
    let target = TileTarget(c.data.as_mut_ptr());
    (0..row_tiles * col_tiles).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / col_tiles) * TILE_ROWS, (t % col_tiles) * TILE_COLS);
        let (rows, cols) = (TILE_ROWS.min(m - r0), TILE_COLS.min(n - c0));
        let tile = MatMut {
            data: &mut [],
            rows,
            cols,
            row_stride: n,
            col_stride: 1,
        };
        let target = target;
        // SAFETY: tile t covers rows r0..r0+rows, columns c0..c0+cols of the m×n row-major C
        // (inside it: checked by `MatMut::row_major` above), and the tiles do not overlap.
        unsafe {
            gemm_raw(
                alpha,
                a.block(r0, rows, 0, k),
                b.block(0, k, c0, cols),
                beta,
                target.0.add(r0 * n + c0),
                &tile,
            )
        }
    });
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
        // 300 × 270 spans 2 × 2 tiles with ragged edges.
        for (m, n, k) in [(70, 45, 33), (300, 270, 40)] {
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
                        "{m}x{n}x{k} ta={ta} tb={tb} i={i}: {} vs {expect}",
                        c[i]
                    );
                }
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

    #[test]
    fn an_empty_inner_dimension_scales_c() {
        let mut c = vec![1.0, 2.0, f32::NAN, 4.0];
        gemm_f32(2, 2, 0, 1.0, &[], false, &[], false, 3.0, &mut c[..]);
        assert_eq!(&c[..2], &[3.0, 6.0]);
        let mut c = vec![f32::NAN; 4];
        gemm_f32(2, 2, 0, 1.0, &[], false, &[], false, 0.0, &mut c);
        assert_eq!(c, vec![0.0; 4]);
    }

    #[test]
    fn strided_views_multiply_like_the_dense_matrices() {
        // A is every other column of a 5 × 8 matrix, B a transposed 4 × 3 block.
        let store_a = random(5 * 8, 6);
        let store_b = random(4 * 3, 7);
        let a = MatRef::new(&store_a, 5, 4, 8, 2);
        let b = MatRef::row_major(&store_b, 4, 3);
        let mut c = vec![0.0; 5 * 3];
        gemm_view(1.0, a, b, 0.0, MatMut::row_major(&mut c, 5, 3));
        for i in 0..5 {
            for j in 0..3 {
                let want: f32 = (0..4)
                    .map(|p| store_a[i * 8 + 2 * p] * store_b[p * 3 + j])
                    .sum();
                assert!((c[i * 3 + j] - want).abs() < 1e-5);
            }
        }
    }
}
