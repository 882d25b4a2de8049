//! GEMM through the `gemm` crate (the kernels candle uses), run single-threaded on fixed tiles
//! of C that rayon spreads over the threads.
//!
//! Why tiles: each tile packs only its own rows of op(A) and columns of op(B) (for a
//! `rows × cols` tile that is `(rows + cols)·k` copies for `2·rows·cols·k` FLOPs), and the
//! tiles depend on the shape alone, never on the thread count, so every C element is computed
//! by the same calls whichever thread runs them: results are bitwise identical for any number
//! of threads.
//!
//! Tiles start at `TILE_ROWS × TILE_COLS` and are halved (down to `MIN_TILE`) until C has
//! `MIN_TASKS` of them, so the skinny LoRA products (`[1024, 16]`, `[16, 576]`) still keep every
//! thread busy. A deep product (k at least `DEEP` times C's longer side: the LM head's
//! `[85, 576]` = `dz [85, 49152] · W`, whose narrow tiles would each re-pack all of A) is split
//! over k instead: `C = β·C + α·Σ_j A_j B_j`, the partial products summed in chunk order.

use crate::MatAt;
use rayon::prelude::*;

/// Rows and columns of C per parallel task at most (multiples of every `gemm` micro-kernel size).
const TILE_ROWS: usize = 256;
const TILE_COLS: usize = 256;
/// Tasks a GEMM is split into when its shape allows: several per thread on a small machine, so
/// that uneven tile counts (3 tiles on 2 threads) cost little. A constant, not the thread count.
const MIN_TASKS: usize = 8;
/// The smallest tile side the halving goes down to.
const MIN_TILE: usize = 64;
/// A product counts as deep, and is split over k, when k is this many times C's longer side.
const DEEP: usize = 16;
/// The shortest inner dimension of one partial product when C is split over k.
const MIN_K_CHUNK: usize = 2048;

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

    /// A row-major `rows × cols` matrix placed in `data` as `at` says.
    pub fn placed(data: &'a [f32], at: MatAt, rows: usize, cols: usize) -> Self {
        let data = if at.extent(rows, cols) == 0 {
            &data[..0]
        } else {
            &data[at.offset..]
        };
        Self::new(data, rows, cols, at.ld, 1)
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

    /// A row-major `rows × cols` matrix placed in `data` as `at` says.
    pub fn placed(data: &'a mut [f32], at: MatAt, rows: usize, cols: usize) -> Self {
        let data = if at.extent(rows, cols) == 0 {
            &mut data[..0]
        } else {
            &mut data[at.offset..]
        };
        Self::new(data, rows, cols, at.ld, 1)
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

/// Rows and columns per tile of an `m × n` C: the largest halvings of `TILE_ROWS × TILE_COLS`
/// (sides multiples of 16, not below `MIN_TILE`) that give `MIN_TASKS` tiles.
fn tile_sides(m: usize, n: usize) -> (usize, usize) {
    let (mut rows, mut cols) = (TILE_ROWS.min(m), TILE_COLS.min(n));
    while m.div_ceil(rows.max(1)) * n.div_ceil(cols.max(1)) < MIN_TASKS {
        let longer = if rows >= cols { &mut rows } else { &mut cols };
        if *longer <= MIN_TILE {
            break;
        }
        *longer = (*longer / 2).next_multiple_of(16);
    }
    (rows, cols)
}

/// C's base pointer, shared by the tasks that write its disjoint tiles.
#[derive(Clone, Copy)]
struct TileTarget(*mut f32);
// SAFETY: each task writes only its own tile of C (see `gemm_tiles`).
unsafe impl Send for TileTarget {}
unsafe impl Sync for TileTarget {}

impl TileTarget {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `C[m,n] ← alpha · op(A) · op(B) + beta · C` on dense row-major f32 slices (see
/// `Backend::gemm`), over all threads.
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
    let [a_at, b_at, c_at] = MatAt::dense_operands(m, n, k, trans_a, trans_b);
    gemm_f32_at(
        m,
        n,
        k,
        alpha,
        (a, a_at),
        trans_a,
        (b, b_at),
        trans_b,
        beta,
        (c, c_at),
    )
}

/// [`gemm_f32`] on matrices inside slices (see `Backend::gemm_at`); panics when one does not fit
/// its slice (the backend checks first).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_at(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    (a, a_at): (&[f32], MatAt),
    trans_a: bool,
    (b, b_at): (&[f32], MatAt),
    trans_b: bool,
    beta: f32,
    (c, c_at): (&mut [f32], MatAt),
) {
    let a = if trans_a {
        MatRef::placed(a, a_at, k, m).t()
    } else {
        MatRef::placed(a, a_at, m, k)
    };
    let b = if trans_b {
        MatRef::placed(b, b_at, n, k).t()
    } else {
        MatRef::placed(b, b_at, k, n)
    };
    let c = MatMut::placed(c, c_at, m, n);
    let k_chunks = if k >= DEEP * m.max(n) {
        MIN_TASKS.min(k / MIN_K_CHUNK)
    } else {
        1
    };
    if k_chunks >= 2 {
        gemm_split_k(alpha, a, b, beta, c, k_chunks);
    } else {
        gemm_tiles(alpha, a, b, beta, c, tile_sides(m, n));
    }
}

/// The GEMM as independent `rows × cols` tiles of C, spread over the threads.
fn gemm_tiles(
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: MatMut,
    (rows, cols): (usize, usize),
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let (row_tiles, col_tiles) = (m.div_ceil(rows.max(1)), n.div_ceil(cols.max(1)));
    if row_tiles * col_tiles <= 1 {
        return gemm_view(alpha, a, b, beta, c);
    }
    let c_rows_apart = c.row_stride;
    let target = TileTarget(c.data.as_mut_ptr());
    (0..row_tiles * col_tiles).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / col_tiles) * rows, (t % col_tiles) * cols);
        let (tile_rows, tile_cols) = (rows.min(m - r0), cols.min(n - c0));
        let tile = MatMut {
            data: &mut [],
            rows: tile_rows,
            cols: tile_cols,
            row_stride: c_rows_apart,
            col_stride: 1,
        };
        // SAFETY: tile t covers rows r0..r0+tile_rows, columns c0..c0+tile_cols of the m×n C
        // (inside its slice: checked by `MatMut::new`; C's columns are adjacent), and the tiles
        // do not overlap.
        unsafe {
            gemm_raw(
                alpha,
                a.block(r0, tile_rows, 0, k),
                b.block(0, k, c0, tile_cols),
                beta,
                target.ptr().add(r0 * c_rows_apart + c0),
                &tile,
            )
        }
    });
}

/// The GEMM as `chunks` partial products over equal slices of k, one per task, then
/// `C ← beta · C + alpha · (P_0 + P_1 + …)` summed in chunk order.
fn gemm_split_k(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut, chunks: usize) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let per_chunk = k.div_ceil(chunks);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|j| {
            let (k0, k1) = (j * per_chunk, ((j + 1) * per_chunk).min(k));
            let mut p = vec![0.0f32; m * n];
            let (aj, bj) = (a.block(0, m, k0, k1 - k0), b.block(k0, k1 - k0, 0, n));
            gemm_view(1.0, aj, bj, 0.0, MatMut::row_major(&mut p, m, n));
            p
        })
        .collect();
    let (first, rest) = partials.split_first().expect("at least two chunks");
    for i in 0..m {
        for j in 0..n {
            let at = i * n + j;
            let sum = rest.iter().fold(first[at], |s, p| s + p[at]);
            let out = &mut c.data[i * c.row_stride + j * c.col_stride];
            *out = if beta == 0.0 {
                alpha * sum
            } else {
                beta * *out + alpha * sum
            };
        }
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

    /// The trait's default `gemm_residual` (the CPU's): the residual plus the product, the residual
    /// kept, and a residual of another length refused by name.
    #[test]
    fn a_residual_product_adds_the_product_to_the_residual() {
        use crate::{Backend, MatAt};
        let be = crate::cpu::CpuBackend::new();
        let (m, n, k) = (70, 45, 33);
        let (a, b, res) = (random(m * k, 1), random(n * k, 2), random(m * n, 3));
        let mut out = vec![0.0; m * n];
        let at = MatAt::dense(k);
        be.gemm_residual(
            m,
            n,
            k,
            0.5,
            (&a, at),
            false,
            (&b, at),
            true,
            &res,
            &mut out,
        )
        .unwrap();
        let product = naive(m, n, k, &a, false, &b, true);
        for i in 0..m * n {
            let want = res[i] + 0.5 * product[i];
            assert!(
                (out[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{i}: {} vs {want}",
                out[i]
            );
        }
        let err = be
            .gemm_residual(
                m,
                n,
                k,
                0.5,
                (&a, at),
                false,
                (&b, at),
                true,
                &res[1..].to_vec(),
                &mut out,
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "gemm_residual: residual has {} elements, expected {}",
                m * n - 1,
                m * n
            )
        );
    }

    #[test]
    fn every_transpose_combination_matches_the_definition() {
        // 300 × 270 spans 2 × 2 tiles with ragged edges; 1000 × 16 is halved into 64-row
        // tiles; 20 × 30 × 4500 is split over k.
        for (m, n, k) in [(70, 45, 33), (300, 270, 40), (1000, 16, 20), (20, 30, 4500)] {
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
                        (c[i] - expect).abs() < 1e-4 * (1.0 + k as f32 / 100.0),
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
        let mut c = [1.0, 2.0, f32::NAN, 4.0];
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

    /// Copies the `rows × cols` block at column `c0` of a row-major matrix with `ld` columns.
    fn block_of(data: &[f32], ld: usize, rows: usize, c0: usize, cols: usize) -> Vec<f32> {
        (0..rows)
            .flat_map(|r| data[r * ld + c0..r * ld + c0 + cols].to_vec())
            .collect()
    }

    #[test]
    fn column_blocks_of_wider_matrices_multiply_like_their_copies() {
        // Each operand is the block at column 3 of a matrix 7 columns wider; C's other columns
        // keep their values. 300 rows span two tiles.
        let (m, n, k, wide) = (300, 20, 16, 7);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let a = random(ar * (ac + wide), 1);
            let b = random(br * (bc + wide), 2);
            let c0 = random(m * (n + wide), 3);
            let mut c = c0.clone();
            gemm_f32_at(
                m,
                n,
                k,
                0.5,
                (&a, MatAt::at(3, ac + wide)),
                ta,
                (&b, MatAt::at(3, bc + wide)),
                tb,
                1.0,
                (&mut c, MatAt::at(3, n + wide)),
            );
            let mut want = block_of(&c0, n + wide, m, 3, n);
            gemm_f32(
                m,
                n,
                k,
                0.5,
                &block_of(&a, ac + wide, ar, 3, ac),
                ta,
                &block_of(&b, bc + wide, br, 3, bc),
                tb,
                1.0,
                &mut want,
            );
            assert_eq!(block_of(&c, n + wide, m, 3, n), want, "ta={ta} tb={tb}");
            for r in 0..m {
                for j in (0..3).chain(3 + n..n + wide) {
                    assert_eq!(c[r * (n + wide) + j], c0[r * (n + wide) + j]);
                }
            }
        }
    }
}
