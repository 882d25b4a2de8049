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
/// dy's columns a strip holds: 32 per warp in dB; a block owns `G` strips.
const STRIP: usize = 32 * WARPS;
/// dy's rows a pipeline stage holds: 16 per warp in u.
const CHUNK: usize = 16 * WARPS;
/// Chunks in shared memory at once (cp.async's pipeline).
const STAGES: usize = 3;
/// The ranks the kernel is compiled for: `lora_dy_products_<t>_r<RP>_g<G>` takes `r ≤ RP`.
pub(crate) const PADDED_RANKS: [usize; 4] = [16, 32, 48, 64];
/// The compiled variants `(RP, G)`: `G` strips a block, `G · RP ≤ 64` (dB's accumulators in
/// registers). More strips a block add fewer `u` sums into L2 and more `dB` ones ([`strips_per_block`]).
pub(crate) const VARIANTS: [(usize, usize); 7] = [
    (16, 1),
    (16, 2),
    (16, 4),
    (32, 1),
    (32, 2),
    (48, 1),
    (64, 1),
];
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

/// Dynamic shared memory of the kernel for padded rank `rp` and `g` strips a block, in bytes: B's
/// strips, and per stage a tile of dy and a chunk of t, every row padded by 8 16-bit elements.
fn shared_bytes(rp: usize, g: usize) -> usize {
    2 * (g * STRIP * (rp + 8) + STAGES * CHUNK * (STRIP + 8 + rp + 8))
}

/// The kernel's grid for `n` rows and `out` columns with `g` strips a block, as `(column groups,
/// row splits, rows per split)`: about `BLOCKS_PER_SM` blocks per multiprocessor (fewer where the
/// rows run out), each split a whole number of chunks.
fn grid(n: usize, out: usize, g: usize, multiprocessors: usize) -> (usize, usize, usize) {
    let (groups, chunks) = (out.div_ceil(g * STRIP), n.div_ceil(CHUNK).max(1));
    let wanted = (BLOCKS_PER_SM * multiprocessors)
        .div_ceil(groups.max(1))
        .clamp(1, chunks);
    let chunks_per_split = chunks.div_ceil(wanted);
    (
        groups,
        chunks.div_ceil(chunks_per_split),
        chunks_per_split * CHUNK,
    )
}

/// Shared memory the driver keeps for itself per block (CUDA's reserved 1 KiB).
const RESERVED_SHARED_PER_BLOCK: usize = 1024;

/// The device's shared memory: what one block may opt into and what one multiprocessor holds.
#[derive(Clone, Copy)]
struct SharedLimits {
    per_block: usize,
    per_multiprocessor: usize,
}

impl SharedLimits {
    /// Whether `g` strips a block fit: one strip wherever a block may have its shared memory,
    /// more only where `BLOCKS_PER_SM` such blocks still share a multiprocessor (an A100's 164 KiB
    /// hold two of r 16's two-strip blocks, not of its four-strip ones).
    fn fit(&self, rp: usize, g: usize) -> bool {
        let bytes = shared_bytes(rp, g);
        bytes <= self.per_block
            && (g == 1
                || BLOCKS_PER_SM * (bytes + RESERVED_SHARED_PER_BLOCK) <= self.per_multiprocessor)
    }
}

/// The strips a block owns for padded rank `rp`: of the compiled variants that fit the device
/// ([`SharedLimits::fit`]), the one whose grid adds the fewest f32 sums into L2 — `n` per column
/// group into u and `out` per row split into dB (times r each), the traffic that bounds the
/// kernel — and the fewest strips among equals.
fn strips_per_block(
    n: usize,
    out: usize,
    rp: usize,
    multiprocessors: usize,
    shared: SharedLimits,
) -> usize {
    VARIANTS
        .iter()
        .filter(|&&(r, g)| r == rp && shared.fit(r, g))
        .map(|&(_, g)| g)
        .min_by_key(|&g| {
            let (groups, splits, _) = grid(n, out, g, multiprocessors);
            (n * groups + out * splits, g)
        })
        .unwrap_or(1)
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
        && shared_bytes(rp, 1) <= max_shared;
    fits.then_some(rp)
}

impl CudaBackend {
    /// Lets each fused kernel have the shared memory it needs (above the default 48 KiB), where the
    /// device allows a block that much, and all of L1 as shared memory so that blocks share a
    /// multiprocessor.
    pub(crate) fn allow_lora_dy_shared_memory(&self) -> Result<()> {
        for t in ["bf16", "f16"] {
            for (rp, g) in VARIANTS {
                let bytes = shared_bytes(rp, g);
                if bytes > self.max_shared_per_block {
                    continue;
                }
                let f = self
                    .kernels
                    .get(&format!("lora_dy_products_{t}_r{rp}_g{g}"))?;
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
        let shared = SharedLimits {
            per_block: self.max_shared_per_block,
            per_multiprocessor: self.max_shared_per_multiprocessor,
        };
        let g = strips_per_block(n, out, rp, self.multiprocessors, shared);
        let (groups, splits, rows_per_split) = grid(n, out, g, self.multiprocessors);
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
            &format!("lora_dy_products_{}_r{rp}_g{g}", suffix(dt)),
            (groups as u32, splits as u32, 1),
            (32 * WARPS) as u32,
            shared_bytes(rp, g) as u32,
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

    /// 66 KiB at r ≤ 16 with one strip (three blocks on an H200's 228 KiB), 84 KiB with four
    /// (two), 96 KiB at r ≤ 64 (one on an RTX 3090's 99 KiB a block).
    #[test]
    fn shared_memory_per_variant() {
        assert_eq!(
            VARIANTS.map(|(rp, g)| shared_bytes(rp, g)),
            [67584, 73728, 86016, 77824, 88064, 88064, 98304]
        );
        assert!(PADDED_RANKS.iter().all(|rp| VARIANTS.contains(&(*rp, 1))));
    }

    /// Llama-2-7B's widths on an H200 (132 multiprocessors) at b2 × 2048, and tails: every split
    /// a whole number of 64-row chunks, together covering the rows with none empty.
    #[test]
    fn the_grid_gives_two_blocks_per_multiprocessor_where_the_rows_allow() {
        for (n, out, g, sms, want) in [
            (4096, 14336, 1, 132, (112, 3, 1408)),
            (4096, 14336, 4, 132, (28, 10, 448)),
            (4096, 11008, 1, 132, (86, 4, 1024)),
            (4096, 11008, 4, 132, (22, 11, 384)),
            (4096, 4096, 1, 132, (32, 8, 512)),
            (4096, 4096, 2, 132, (16, 16, 256)),
            (4096, 1024, 1, 132, (8, 32, 128)),
            (1000, 1000, 1, 132, (8, 16, 64)),
            (1, 8, 4, 132, (1, 1, 64)),
            (4096, 4096, 1, 1, (32, 1, 4096)),
        ] {
            let (groups, splits, rows) = grid(n, out, g, sms);
            assert_eq!(
                (groups, splits, rows),
                want,
                "n {n} out {out} g {g} on {sms} SMs"
            );
            assert!(rows.is_multiple_of(CHUNK) && splits * rows >= n && (splits - 1) * rows < n);
            assert!(groups * g * STRIP >= out && (groups - 1) * g * STRIP < out);
        }
    }

    /// The strips a block takes where its grid adds the fewest sums: Llama-2-7B's and Mistral-7B's
    /// widths at b2 × 2048 on an H200, the kernel checks' shapes, and devices whose blocks or
    /// multiprocessors hold less shared memory (an A100: 163 KiB a block, 164 a multiprocessor).
    #[test]
    fn strips_per_block_minimise_the_sums_added() {
        let h200 = SharedLimits {
            per_block: 227 << 10,
            per_multiprocessor: 228 << 10,
        };
        let on_h200 = |n, out, rp| strips_per_block(n, out, rp, 132, h200);
        assert_eq!(on_h200(4096, 4096, 16), 2);
        assert_eq!(on_h200(4096, 11008, 16), 4);
        assert_eq!(on_h200(4096, 14336, 16), 4);
        assert_eq!(on_h200(4096, 1024, 16), 1);
        assert_eq!(on_h200(1000, 1000, 16), 4);
        assert_eq!(on_h200(1000, 1000, 32), 2);
        assert_eq!(on_h200(300, 520, 64), 1);
        let small_blocks = SharedLimits {
            per_block: 80 << 10,
            ..h200
        };
        assert_eq!(strips_per_block(4096, 11008, 16, 132, small_blocks), 2);
        let a100 = SharedLimits {
            per_block: 163 << 10,
            per_multiprocessor: 164 << 10,
        };
        assert_eq!(strips_per_block(4096, 11008, 16, 108, a100), 2);
        assert_eq!(strips_per_block(4096, 11008, 32, 108, a100), 1);
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
