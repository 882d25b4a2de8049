//! Launching [`crate::Backend::lora_dy_products`]'s fused kernel (`kernels/cuda/lora_dy.cu`:
//! `dB += dyᵀ t` and `u += dy B` from one read of dy) where it applies — bf16/f16 on compute
//! capability 8.0+, a rank that is a multiple of 8 up to 64, operands on the boundaries its
//! 16-byte copies need — and the two products through cuBLAS with f32 outputs elsewhere.

use super::launch::Arg;
use super::{device_err, suffix, CudaBackend, CudaTensor};
use crate::{DType, MatAt, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;

/// Warps per block (the kernel's `LORA_WARPS`).
const WARPS: usize = 4;
/// dy's columns a block owns: 32 per warp in dB.
const STRIP: usize = 32 * WARPS;
/// dy's rows a pipeline stage holds: 16 per warp in u.
const CHUNK: usize = 16 * WARPS;
/// Chunks in shared memory at once (cp.async's pipeline).
const STAGES: usize = 3;
/// The ranks the kernel is compiled for: `lora_dy_products_<t>_r<RP>` takes `r ≤ RP`.
pub(crate) const PADDED_RANKS: [usize; 4] = [16, 32, 48, 64];
/// Blocks per multiprocessor the grid is sized for.
const BLOCKS_PER_SM: usize = 2;
/// Sizes the kernel's 32-bit row and column indices hold with room to spare.
const MAX_SIDE: usize = 1 << 30;

/// The kernel variant for rank `r`: `r` a multiple of 8 up to 64, rounded up to a multiple of 16
/// (ldmatrix loads the rank columns 16 at a time).
fn padded_rank(r: usize) -> Option<usize> {
    (r > 0 && r.is_multiple_of(8))
        .then(|| r.next_multiple_of(16))
        .filter(|rp| PADDED_RANKS.contains(rp))
}

/// Dynamic shared memory of the kernel for padded rank `rp`, in bytes: B's strip, and per stage a
/// chunk of dy and of t, every row padded by 8 16-bit elements.
fn shared_bytes(rp: usize) -> usize {
    2 * (STRIP * (rp + 8) + STAGES * CHUNK * (STRIP + 8 + rp + 8))
}

/// The grid's row splits for `n` rows and `out` columns, as `(splits, rows per split)`: about
/// `BLOCKS_PER_SM` blocks per multiprocessor over all the strips (fewer where the rows run out),
/// each split a whole number of chunks.
fn row_splits(n: usize, out: usize, multiprocessors: usize) -> (usize, usize) {
    let (strips, chunks) = (out.div_ceil(STRIP), n.div_ceil(CHUNK).max(1));
    let wanted = (BLOCKS_PER_SM * multiprocessors)
        .div_ceil(strips.max(1))
        .clamp(1, chunks);
    let chunks_per_split = chunks.div_ceil(wanted);
    (chunks.div_ceil(chunks_per_split), chunks_per_split * CHUNK)
}

/// Device addresses of the operands' first elements and their row distances in elements.
struct Placed {
    dy: u64,
    t: (u64, usize),
    b: (u64, usize),
    u: (u64, usize),
}

/// The padded rank of the fused kernel for these operands, or `None` where the two products run
/// instead: a rank [`padded_rank`] takes; dy's rows (`out` elements) and t's and B's starts and
/// rows on 16-byte boundaries (cp.async's copies); u's starts and rows on 8 (its column pairs are
/// added as one 8-byte vector); sides the kernel's indices hold; shared memory a block may have.
fn fused_rank(n: usize, out: usize, r: usize, at: &Placed, max_shared: usize) -> Option<usize> {
    let rows_16 = |(addr, ld): (u64, usize)| addr.is_multiple_of(16) && ld.is_multiple_of(8);
    let rp = padded_rank(r)?;
    let fits = n <= MAX_SIDE
        && out <= MAX_SIDE
        && out.is_multiple_of(8)
        && at.dy.is_multiple_of(16)
        && rows_16(at.t)
        && rows_16(at.b)
        && at.u.0.is_multiple_of(8)
        && at.u.1.is_multiple_of(2)
        && shared_bytes(rp) <= max_shared;
    fits.then_some(rp)
}

impl CudaBackend {
    /// Lets each fused kernel have the shared memory it needs (above the default 48 KiB), where the
    /// device allows a block that much, and all of L1 as shared memory so that blocks share a
    /// multiprocessor.
    pub(crate) fn allow_lora_dy_shared_memory(&self) -> Result<()> {
        for t in ["bf16", "f16"] {
            for rp in PADDED_RANKS {
                let bytes = shared_bytes(rp);
                if bytes > self.max_shared_per_block {
                    continue;
                }
                let f = self.kernels.get(&format!("lora_dy_products_{t}_r{rp}"))?;
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(device_err("kernel shared memory limit"))?;
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .map_err(device_err("kernel shared memory carveout"))?;
            }
        }
        Ok(())
    }

    /// [`crate::Backend::lora_dy_products`]: the checks, then the fused kernel or the two products.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_dy_products_impl(
        &self,
        n: usize,
        out: usize,
        r: usize,
        dy: &CudaTensor,
        (t, t_at): (&CudaTensor, MatAt),
        (b, b_at): (&CudaTensor, MatAt),
        db: &mut CudaTensor,
        (u, u_at): (&mut CudaTensor, MatAt),
    ) -> Result<()> {
        const OP: &str = "lora_dy_products";
        crate::lora_dy::check(
            (n, out, r),
            dy.len(),
            (t_at, t.len()),
            (b_at, b.len()),
            db.len(),
            (u_at, u.len()),
        )?;
        let dt = self.same_dtype(OP, &[("dy", dy), ("t", t), ("B", b)])?;
        self.require_dtype(OP, "dB", db, DType::F32)?;
        self.require_dtype(OP, "u", u, DType::F32)?;
        if n == 0 || out == 0 || r == 0 {
            return Ok(());
        }
        let address = |x: &CudaTensor, m: MatAt| {
            x.ptr(&self.stream) + (m.offset * x.dtype.size_bytes()) as u64
        };
        let at = Placed {
            dy: dy.ptr(&self.stream),
            t: (address(t, t_at), t_at.ld),
            b: (address(b, b_at), b_at.ld),
            u: (address(u, u_at), u_at.ld),
        };
        let fused = match dt {
            DType::BF16 | DType::F16 if self.compute_capability.0 >= 8 => {
                fused_rank(n, out, r, &at, self.max_shared_per_block)
            }
            _ => None,
        };
        let Some(rp) = fused else {
            return crate::lora_dy::as_two_products(
                self,
                n,
                out,
                r,
                dy,
                (t, t_at),
                (b, b_at),
                db,
                (u, u_at),
            );
        };
        let (splits, rows_per_split) = row_splits(n, out, self.multiprocessors);
        let args = [
            Arg::Ptr(at.dy),
            Arg::Ptr(at.t.0),
            Arg::Ptr(at.b.0),
            self.p(db),
            Arg::Ptr(at.u.0),
            Arg::I32(n as i32),
            Arg::I32(out as i32),
            Arg::I32(r as i32),
            Arg::U64(at.t.1 as u64),
            Arg::U64(at.b.1 as u64),
            Arg::U64(at.u.1 as u64),
            Arg::I32(rows_per_split as i32),
        ];
        self.launch_counted(
            &format!("lora_dy_products_{}_r{rp}", suffix(dt)),
            (out.div_ceil(STRIP) as u32, splits as u32, 1),
            (32 * WARPS) as u32,
            shared_bytes(rp) as u32,
            &args,
            || 4.0 * (n * out * r) as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_pad_to_the_compiled_variants() {
        let padded: Vec<_> = (0..=72)
            .filter_map(|r| Some((r, padded_rank(r)?)))
            .collect();
        assert_eq!(
            padded,
            [
                (8, 16),
                (16, 16),
                (24, 32),
                (32, 32),
                (40, 48),
                (48, 48),
                (56, 64),
                (64, 64)
            ]
        );
    }

    /// 66 KiB at r ≤ 16 (three blocks on an H200's 228 KiB), 96 KiB at r ≤ 64 (one on an RTX
    /// 3090's 99 KiB a block).
    #[test]
    fn shared_memory_per_variant() {
        assert_eq!(PADDED_RANKS.map(shared_bytes), [67584, 77824, 88064, 98304]);
    }

    /// Llama-2-7B's widths on an H200 (132 multiprocessors) at b2 × 2048, and tails: every split
    /// a whole number of 64-row chunks, together covering the rows with none empty.
    #[test]
    fn row_splits_give_two_blocks_per_multiprocessor_where_the_rows_allow() {
        for (n, out, sms, want) in [
            (4096, 14336, 132, (3, 1408)),
            (4096, 11008, 132, (4, 1024)),
            (4096, 4096, 132, (8, 512)),
            (4096, 1024, 132, (32, 128)),
            (1000, 1000, 132, (16, 64)),
            (1, 8, 132, (1, 64)),
            (4096, 4096, 1, (1, 4096)),
        ] {
            let (splits, rows) = row_splits(n, out, sms);
            assert_eq!((splits, rows), want, "n {n} out {out} on {sms} SMs");
            assert!(rows.is_multiple_of(CHUNK) && splits * rows >= n && (splits - 1) * rows < n);
        }
    }

    #[test]
    fn misaligned_operands_or_unsupported_ranks_take_the_two_products() {
        let base = Placed {
            dy: 1 << 20,
            t: ((1 << 21) + 2 * 32, 48),
            b: ((1 << 22) + 2 * 16 * 100, 16),
            u: ((1 << 23) + 4 * 32, 48),
        };
        let fused = |n, out, r, at: &Placed| fused_rank(n, out, r, at, 227 << 10);
        assert_eq!(fused(4096, 4096, 16, &base), Some(16));
        assert_eq!(fused(4096, 4096, 8, &base), Some(16));
        assert_eq!(fused(4096, 4096, 12, &base), None);
        assert_eq!(fused(4096, 4096, 72, &base), None);
        assert_eq!(fused(4096, 4100, 16, &base), None);
        let t_odd = Placed {
            t: (base.t.0 + 2, 48),
            ..base
        };
        assert_eq!(fused(4096, 4096, 16, &t_odd), None);
        let b_ld = Placed {
            b: (base.b.0, 20),
            ..base
        };
        assert_eq!(fused(4096, 4096, 16, &b_ld), None);
        let u_ld = Placed {
            u: (base.u.0, 47),
            ..base
        };
        assert_eq!(fused(4096, 4096, 16, &u_ld), None);
        assert_eq!(fused_rank(4096, 4096, 64, &base, 64 << 10), None);
    }
}
