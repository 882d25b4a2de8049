//! Launching [`crate::Backend::swiglu_backward`] (`kernels/cuda/swiglu.cu`): the plain backward,
//! and with a [`LoraInputTerm`] the kernel that adds `scale · u A` to `dout` itself where it
//! applies — bf16/f16, rank 8 or 16, rows a multiple of 8 long, every matrix on 16-byte
//! boundaries — and elsewhere a K = rank product that adds the term into `dout` (`beta = 1`),
//! then the plain backward.

use super::launch::{blocks_for_chunks_of_8, Arg};
use super::{suffix, CudaBackend, CudaTensor};
use crate::error::check_len;
use crate::{Backend, DType, LoraInputTerm, MatAt, Result};

const OP: &str = "swiglu_backward";
/// Threads per block of the fused kernel (its `SWIGLU_LORA_THREADS`); each owns 8 columns.
const THREADS: usize = 128;
/// The ranks the fused kernel is compiled for: `swiglu_backward_lora_<t>_r<R>`.
pub(crate) const FUSED_RANKS: [usize; 2] = [8, 16];
/// Blocks of the fused kernel a multiprocessor holds at once (its `SWIGLU_LORA_BLOCKS_PER_SM`, the
/// `__launch_bounds__` that holds it to 128 registers a thread).
const BLOCKS_PER_SM: usize = 4;
/// Waves of blocks the grid is cut into, so that the last one is not a small remainder.
const WAVES: usize = 2;
/// Fewest rows of a group: a thread loads its columns of A once per group.
const MIN_ROWS_PER_GROUP: usize = 16;
/// Most row groups: the grid's y dimension.
const MAX_GROUPS: usize = 65535;

/// The row groups of the fused kernel's grid for `n` rows in `column_blocks` blocks across, as
/// `(groups, rows per group)`: at most [`WAVES`] full waves of blocks (fewer where groups would
/// drop below [`MIN_ROWS_PER_GROUP`] rows) and [`MAX_GROUPS`] groups, together covering the rows
/// with none empty.
fn row_groups(n: usize, column_blocks: usize, multiprocessors: usize) -> (usize, usize) {
    let wanted =
        (WAVES * BLOCKS_PER_SM * multiprocessors / column_blocks.max(1)).clamp(1, MAX_GROUPS);
    let rows_per_group = n.div_ceil(wanted).max(MIN_ROWS_PER_GROUP);
    (n.div_ceil(rows_per_group), rows_per_group)
}

/// Device addresses of the operands' first elements: `dout`, `gate` and `up`, and u's and A's
/// with their row distances in elements.
struct Placed {
    tensors: [u64; 3],
    u: (u64, usize),
    a: (u64, usize),
}

/// Whether the fused kernel takes these operands: a 16-bit dtype, a rank it is compiled for,
/// rows of `inter` a multiple of 8 long, and every matrix's rows on 16-byte boundaries (its
/// 16-byte loads and stores).
fn takes_fused_kernel(dt: DType, rank: usize, inter: usize, at: &Placed) -> bool {
    let rows_16 = |(addr, ld): (u64, usize)| addr.is_multiple_of(16) && ld.is_multiple_of(8);
    matches!(dt, DType::BF16 | DType::F16)
        && FUSED_RANKS.contains(&rank)
        && inter.is_multiple_of(8)
        && at.tensors.iter().all(|p| p.is_multiple_of(16))
        && rows_16(at.u)
        && rows_16(at.a)
}

impl CudaBackend {
    /// [`crate::Backend::swiglu_backward`]: the checks, then the plain kernel, the fused one, or
    /// the term's product and the plain kernel.
    pub(crate) fn swiglu_backward_impl(
        &self,
        dout: &mut CudaTensor,
        gate: &mut CudaTensor,
        up: &mut CudaTensor,
        lora: Option<LoraInputTerm<'_, CudaTensor>>,
    ) -> Result<()> {
        check_len(OP, "dout", dout.len(), gate.len())?;
        check_len(OP, "up", up.len(), gate.len())?;
        let dt = self.same_dtype(OP, &[("dout", dout), ("gate", gate), ("up", up)])?;
        let Some(term) = lora else {
            return self.swiglu_backward_plain(dt, dout, gate, up);
        };
        let n = term.check(dout.len(), term.u.len(), term.a.len())?;
        self.same_dtype(
            OP,
            &[("dout", dout), ("LoRA u", term.u), ("LoRA A", term.a)],
        )?;
        if n == 0 || term.rank == 0 {
            return self.swiglu_backward_plain(dt, dout, gate, up);
        }
        let address = |x: &CudaTensor, m: MatAt| {
            x.ptr(&self.stream) + (m.offset * x.dtype.size_bytes()) as u64
        };
        let at = Placed {
            tensors: [
                dout.ptr(&self.stream),
                gate.ptr(&self.stream),
                up.ptr(&self.stream),
            ],
            u: (address(term.u, term.u_at), term.u_at.ld),
            a: (address(term.a, term.a_at), term.a_at.ld),
        };
        if !takes_fused_kernel(dt, term.rank, term.inter, &at) {
            self.gemm_at(
                n,
                term.inter,
                term.rank,
                term.scale,
                (term.u, term.u_at),
                false,
                (term.a, term.a_at),
                false,
                1.0,
                (dout, MatAt::dense(term.inter)),
            )?;
            return self.swiglu_backward_plain(dt, dout, gate, up);
        }
        let column_blocks = (term.inter / 8).div_ceil(THREADS);
        let (groups, rows_per_group) = row_groups(n, column_blocks, self.multiprocessors);
        let args = [
            Arg::Ptr(at.tensors[0]),
            Arg::Ptr(at.tensors[1]),
            Arg::Ptr(at.tensors[2]),
            Arg::Ptr(at.u.0),
            Arg::Ptr(at.a.0),
            Arg::U64(n as u64),
            Arg::U64(term.inter as u64),
            Arg::U64(at.u.1 as u64),
            Arg::U64(at.a.1 as u64),
            Arg::F32(term.scale),
            Arg::U64(rows_per_group as u64),
        ];
        self.launch_counted(
            &format!("swiglu_backward_lora_{}_r{}", suffix(dt), term.rank),
            (column_blocks as u32, groups as u32, 1),
            THREADS as u32,
            0,
            &args,
            || 2.0 * (n * term.inter * term.rank) as f64,
        )
    }

    /// The backward without a LoRA term: `swiglu_backward_<t>` over all elements.
    fn swiglu_backward_plain(
        &self,
        dt: DType,
        dout: &mut CudaTensor,
        gate: &mut CudaTensor,
        up: &mut CudaTensor,
    ) -> Result<()> {
        let n = gate.len();
        let name = format!("swiglu_backward_{}", suffix(dt));
        let args = [self.p(dout), self.p(gate), self.p(up), Arg::U64(n as u64)];
        self.launch(&name, (blocks_for_chunks_of_8(n), 1, 1), 256, 0, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B's and Mistral-7B's inter on an H200 (132 multiprocessors) at b2 × 2048, and
    /// small or odd shapes: at most two waves of blocks, groups of at least 16 rows (but one group
    /// for fewer rows) and at most 65535 of them, together covering the rows with none empty.
    #[test]
    fn row_groups_make_at_most_two_waves_and_cover_the_rows() {
        for (n, inter, sms, want) in [
            (4096, 11008, 132, (96, 43)),
            (4096, 14336, 132, (75, 55)),
            (4096, 4096, 132, (256, 16)),
            (37, 200, 132, (3, 16)),
            (5, 8, 132, (1, 16)),
            (4096, 11008, 1, (1, 4096)),
            (1 << 21, 8, 10_000, (63551, 33)),
        ] {
            let column_blocks = (inter / 8usize).div_ceil(THREADS);
            let (groups, rows) = row_groups(n, column_blocks, sms);
            assert_eq!((groups, rows), want, "n {n} inter {inter} on {sms} SMs");
            assert!(groups * rows >= n && (groups - 1) * rows < n && groups <= MAX_GROUPS);
            let whole_waves = groups * column_blocks <= WAVES * BLOCKS_PER_SM * sms;
            assert!(whole_waves || groups == 1 || rows == MIN_ROWS_PER_GROUP);
        }
    }

    #[test]
    fn other_dtypes_ranks_widths_or_misaligned_rows_take_the_product() {
        let base = Placed {
            tensors: [1 << 20, 1 << 21, 1 << 22],
            u: ((1 << 23) + 2 * 16, 16),
            a: ((1 << 24) + 2 * 11008, 11008),
        };
        let fused = |dt, rank, inter, at: &Placed| takes_fused_kernel(dt, rank, inter, at);
        assert!(fused(DType::BF16, 16, 11008, &base));
        assert!(fused(DType::F16, 8, 11008, &base));
        assert!(!fused(DType::F32, 16, 11008, &base));
        assert!(!fused(DType::BF16, 12, 11008, &base));
        assert!(!fused(DType::BF16, 32, 11008, &base));
        assert!(!fused(DType::BF16, 16, 11004, &base));
        let dout_odd = Placed {
            tensors: [(1 << 20) + 8, 1 << 21, 1 << 22],
            ..base
        };
        assert!(!fused(DType::BF16, 16, 11008, &dout_odd));
        let u_ld = Placed {
            u: (base.u.0, 20),
            ..base
        };
        assert!(!fused(DType::BF16, 16, 11008, &u_ld));
        let a_offset = Placed {
            a: (base.a.0 + 2, 11008),
            ..base
        };
        assert!(!fused(DType::BF16, 16, 11008, &a_offset));
    }
}
