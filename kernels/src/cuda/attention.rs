//! Launching the attention kernels: for bf16/f16 with head_dim 64 or 128 the tensor-core kernels,
//! on Hopper (compute capability 9.0) the wgmma ones of `kernels/cuda/attention_{fwd,bwd}_hopper.cu`,
//! elsewhere the mma.sync ones of `kernels/cuda/attention_{fwd,bwd}.cu`; the warp-per-row kernels
//! otherwise (the f32 mode and other head sizes). The layout's doc_start lives on the device as
//! `doc_start`. `FUSELORA_ATTENTION=mma-sync` keeps a Hopper GPU on the mma.sync kernels (to compare
//! the two).

use super::launch::Arg;
use super::{suffix, CudaBackend, CudaIndices, CudaTensor};
use crate::error::check_len;
use crate::{AttentionLayout, DType, KernelError, QkvGrads, Result, Rotation};
use cudarc::driver::sys::CUfunction_attribute_enum;

const FWD_QUERIES_PER_BLOCK: usize = 128;
const FWD_WARPS: usize = 8;
const FWD_KEYS_PER_TILE: usize = 64;
const BWD_QUERIES_PER_TILE: usize = 32;
const WARPS_PER_BLOCK_SIMPLE: usize = 8;
/// The wgmma kernels: 128 queries (forward) or keys (backward) a block of two warpgroups, key
/// tiles of 128 (forward), query tiles of 64 (backward), and a producer warpgroup that loads the
/// tiles (the forward's and the backward's into three stages).
const HOPPER_BLOCK_ROWS: usize = 128;
const HOPPER_FORWARD_THREADS: usize = 384;
const HOPPER_FORWARD_KEYS: usize = 128;
const HOPPER_FORWARD_STAGES: usize = 3;
const HOPPER_BACKWARD_THREADS: usize = 384;
const HOPPER_BACKWARD_STAGES: usize = 3;
const HOPPER_TILE_ROWS: usize = 64;

/// The backward kernels compiled: `(head_dim, warps)`, `attention_backward_mma_<t>_d<D>_w<NW>`.
pub(crate) const BACKWARD_MMA_VARIANTS: [(usize, usize); 3] = [(64, 4), (128, 4), (128, 8)];

fn has_mma_kernels(dtype: DType, head_dim: usize) -> bool {
    dtype != DType::F32 && (head_dim == 64 || head_dim == 128)
}

/// Dynamic shared memory of the forward kernel: two stages of K and V tiles, rows padded by 8.
fn forward_shared_bytes(head_dim: usize) -> usize {
    2 * 2 * FWD_KEYS_PER_TILE * (head_dim + 8) * 2
}

/// Dynamic shared memory of the backward kernel with `warps` warps (16 keys each): K, V tiles,
/// two stages of Q and dO tiles, dS, and two stages of three vectors (lse, D, document start).
fn backward_shared_bytes(head_dim: usize, warps: usize) -> usize {
    let ld = head_dim + 8;
    let keys = 16 * warps;
    let halves =
        2 * keys * ld + 2 * 2 * BWD_QUERIES_PER_TILE * ld + BWD_QUERIES_PER_TILE * (keys + 8);
    halves * 2 + 2 * 3 * BWD_QUERIES_PER_TILE * 4
}

/// Which tensor-core attention kernels run on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttentionKernels {
    /// mma.sync (sm_75 and up; f16 only below sm_80).
    MmaSync,
    /// Hopper's warpgroup MMA (compute capability 9.0, built for sm_90a).
    Wgmma,
}

impl AttentionKernels {
    /// wgmma on compute capability 9.0 unless `FUSELORA_ATTENTION=mma-sync`; mma.sync elsewhere.
    pub(crate) fn for_device(compute_capability: (i32, i32)) -> Result<Self> {
        Self::choose(
            compute_capability,
            std::env::var("FUSELORA_ATTENTION").ok().as_deref(),
        )
    }

    /// The choice for a device and a `FUSELORA_ATTENTION` setting (`None`: unset).
    fn choose(compute_capability: (i32, i32), setting: Option<&str>) -> Result<Self> {
        match setting {
            None | Some("") | Some("auto") if compute_capability == (9, 0) => Ok(Self::Wgmma),
            None | Some("") | Some("auto") | Some("mma-sync") => Ok(Self::MmaSync),
            Some(other) => Err(KernelError::Unsupported(format!(
                "FUSELORA_ATTENTION={other}: expected \"auto\" or \"mma-sync\""
            ))),
        }
    }
}

/// Dynamic shared memory of the wgmma forward: the block's queries, three stages of K and V tiles,
/// and up to 1 KiB to align the tiles' swizzle atoms to 1024 bytes (one block a multiprocessor).
fn hopper_forward_shared_bytes(head_dim: usize) -> usize {
    (HOPPER_BLOCK_ROWS + HOPPER_FORWARD_STAGES * 2 * HOPPER_FORWARD_KEYS) * head_dim * 2 + 1024
}

/// Dynamic shared memory of the wgmma backward: the block's K and V, three stages of Q and dO tiles
/// and of three vectors (lse, D, document start), two dS buffers, and the 1 KiB of alignment.
fn hopper_backward_shared_bytes(head_dim: usize) -> usize {
    let halves = (2 * HOPPER_BLOCK_ROWS + HOPPER_BACKWARD_STAGES * 2 * HOPPER_TILE_ROWS) * head_dim
        + 2 * HOPPER_TILE_ROWS * HOPPER_BLOCK_ROWS;
    halves * 2 + HOPPER_BACKWARD_STAGES * 3 * HOPPER_TILE_ROWS * 4 + 1024
}

impl CudaBackend {
    /// Whether the wgmma kernels run this attention (bf16/f16, head_dim 64 or 128, on Hopper).
    fn attention_uses_wgmma(&self, dtype: DType, head_dim: usize) -> bool {
        self.attention_kernels == AttentionKernels::Wgmma && has_mma_kernels(dtype, head_dim)
    }

    /// Whether the tensor-core forward runs here: a bf16/f16 kernel for the head size whose shared
    /// memory the device can give one block (a T4's 64 KiB does not hold head_dim 128's 68 KiB).
    fn forward_uses_mma(&self, dtype: DType, head_dim: usize) -> bool {
        has_mma_kernels(dtype, head_dim)
            && forward_shared_bytes(head_dim) <= self.max_shared_per_block
    }

    /// The warps of the tensor-core backward for this head size: the largest compiled variant whose
    /// shared memory fits one block on this device; `None` means the warp-per-row kernels.
    fn backward_mma_warps(&self, dtype: DType, head_dim: usize) -> Option<usize> {
        if !has_mma_kernels(dtype, head_dim) {
            return None;
        }
        BACKWARD_MMA_VARIANTS
            .iter()
            .filter(|&&(d, w)| {
                d == head_dim && backward_shared_bytes(d, w) <= self.max_shared_per_block
            })
            .map(|&(_, w)| w)
            .max()
    }

    /// Lets the tensor-core attention kernels that fit this device use more than the default
    /// 48 KiB of shared memory.
    pub(crate) fn allow_large_shared_memory(&self) -> Result<()> {
        for t in ["bf16", "f16"] {
            let forward = [64, 128].map(|d| {
                (
                    format!("attention_forward_mma_{t}_d{d}"),
                    forward_shared_bytes(d),
                )
            });
            let backward = BACKWARD_MMA_VARIANTS.map(|(d, w)| {
                (
                    format!("attention_backward_mma_{t}_d{d}_w{w}"),
                    backward_shared_bytes(d, w),
                )
            });
            for (name, bytes) in forward.into_iter().chain(backward) {
                if bytes > self.max_shared_per_block {
                    continue;
                }
                let f = self.kernels.get(&name)?;
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(super::device_err("kernel shared memory limit"))?;
                // All of L1 as shared memory where it lets more blocks share a multiprocessor.
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .map_err(super::device_err("kernel shared memory carveout"))?;
            }
        }
        if self.attention_kernels == AttentionKernels::Wgmma {
            for t in ["bf16", "f16"] {
                for d in [64, 128] {
                    for (name, bytes) in [
                        (
                            format!("attention_forward_wgmma_{t}_d{d}"),
                            hopper_forward_shared_bytes(d),
                        ),
                        (
                            format!("attention_backward_wgmma_{t}_d{d}"),
                            hopper_backward_shared_bytes(d),
                        ),
                    ] {
                        self.kernels
                            .get(&name)?
                            .set_attribute(
                                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                bytes as i32,
                            )
                            .map_err(super::device_err("kernel shared memory limit"))?;
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attention(
        &self,
        op: &'static str,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        layout: &AttentionLayout,
        doc_start: &CudaIndices,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<DType> {
        let n = layout.tokens();
        check_len(op, "q", q.len(), n * heads * head_dim)?;
        check_len(op, "k", k.len(), n * kv_heads * head_dim)?;
        check_len(op, "v", v.len(), n * kv_heads * head_dim)?;
        check_len(op, "doc_start", doc_start.len(), n)?;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(KernelError::Unsupported(format!(
                "{op}: {heads} query heads do not split over {kv_heads} kv heads"
            )));
        }
        if head_dim > 256 || !head_dim.is_multiple_of(2) {
            return Err(KernelError::Unsupported(format!(
                "{op}: head_dim {head_dim} (must be even and at most 256)"
            )));
        }
        self.same_dtype(op, &[("q", q), ("k", k), ("v", v)])
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_forward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        layout: &AttentionLayout,
        doc_start: &CudaIndices,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut CudaTensor,
        lse: &mut CudaTensor,
    ) -> Result<()> {
        let dt = self.check_attention(
            "attention",
            q,
            k,
            v,
            layout,
            doc_start,
            heads,
            kv_heads,
            head_dim,
        )?;
        let n = layout.tokens();
        check_len("attention", "out", out.len(), n * heads * head_dim)?;
        check_len("attention", "lse", lse.len(), n * heads)?;
        self.require_dtype("attention", "out", out, dt)?;
        self.require_dtype("attention", "lse", lse, DType::F32)?;
        if n == 0 {
            return Ok(());
        }
        let window = layout.window.unwrap_or(0) as i32;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (seq, rows) = (layout.seq_len, layout.rows);
        if self.forward_uses_mma(dt, head_dim) {
            let wgmma = self.attention_uses_wgmma(dt, head_dim);
            let (kind, threads, shared) = if wgmma {
                (
                    "wgmma",
                    HOPPER_FORWARD_THREADS,
                    hopper_forward_shared_bytes(head_dim),
                )
            } else {
                ("mma", FWD_WARPS * 32, forward_shared_bytes(head_dim))
            };
            let name = format!("attention_forward_{kind}_{}_d{head_dim}", suffix(dt));
            let grid = (
                seq.div_ceil(FWD_QUERIES_PER_BLOCK) as u32,
                heads as u32,
                rows as u32,
            );
            let args = [
                self.p(q),
                self.p(k),
                self.p(v),
                self.pi(doc_start),
                self.p(out),
                self.p(lse),
                Arg::I32(seq as i32),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(window),
                Arg::F32(scale),
            ];
            let flops = || 4.0 * (heads * head_dim) as f64 * layout.visible_pairs() as f64;
            self.launch_counted(&name, grid, threads as u32, shared as u32, &args, flops)
        } else {
            let name = format!("attention_forward_simple_{}", suffix(dt));
            let warps = n * heads;
            let args = [
                self.p(q),
                self.p(k),
                self.p(v),
                self.pi(doc_start),
                self.p(out),
                self.p(lse),
                Arg::I32(rows as i32),
                Arg::I32(seq as i32),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(head_dim as i32),
                Arg::I32(window),
                Arg::F32(scale),
            ];
            let blocks = warps.div_ceil(WARPS_PER_BLOCK_SIMPLE) as u32;
            self.launch(
                &name,
                (blocks, 1, 1),
                (WARPS_PER_BLOCK_SIMPLE * 32) as u32,
                0,
                &args,
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: CudaTensor,
        lse: &CudaTensor,
        dout: &CudaTensor,
        layout: &AttentionLayout,
        doc_start: &CudaIndices,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        unrotate_dq: Option<Rotation<'_, CudaIndices, CudaTensor>>,
    ) -> Result<QkvGrads<CudaTensor>> {
        let op = "attention_backward";
        let dt = self.check_attention(op, q, k, v, layout, doc_start, heads, kv_heads, head_dim)?;
        let n = layout.tokens();
        check_len(op, "out", out.len(), n * heads * head_dim)?;
        check_len(op, "dout", dout.len(), n * heads * head_dim)?;
        check_len(op, "lse", lse.len(), n * heads)?;
        self.same_dtype(op, &[("q", q), ("out", &out), ("dout", dout)])?;
        self.require_dtype(op, "lse", lse, DType::F32)?;
        let q_len = n * heads * head_dim;
        let kv_len = n * kv_heads * head_dim;
        let grads = |be: &Self| -> Result<QkvGrads<CudaTensor>> {
            Ok(QkvGrads {
                dq: be.alloc(q_len, dt)?,
                dk: be.alloc(kv_len, dt)?,
                dv: be.alloc(kv_len, dt)?,
            })
        };
        if n == 0 {
            return grads(self);
        }
        let window = layout.window.unwrap_or(0) as i32;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (seq, rows) = (layout.seq_len, layout.rows);
        let pairs = n * heads;
        let delta = self.alloc_f32_scratch(pairs)?;
        let mma_warps = self.backward_mma_warps(dt, head_dim);
        let wgmma = mma_warps.is_some() && self.attention_uses_wgmma(dt, head_dim);
        // Both tensor-core kernels add dQ into an f32 accumulator, and with GQA the wgmma one adds
        // dK and dV into f32 sums per kv head: these start from zeros, which the D_i kernel
        // writes beside its dot products (no memset launches of their own).
        let dq_acc = match mma_warps {
            Some(_) => Some(self.alloc_f32_scratch(q_len)?),
            None => None,
        };
        let parts = match mma_warps {
            Some(_) if heads > kv_heads => {
                let len = n * if wgmma { kv_heads } else { heads } * head_dim;
                Some((self.alloc_f32_scratch(len)?, self.alloc_f32_scratch(len)?))
            }
            _ => None,
        };
        let zeroed = |t: Option<&CudaTensor>| t.map_or(Arg::Ptr(0), |t| self.p(t));
        let zeroed_parts = parts.as_ref().filter(|_| wgmma);
        let dot_blocks = pairs.div_ceil(WARPS_PER_BLOCK_SIMPLE) as u32;
        self.launch(
            &format!("attention_backward_dot_{}", suffix(dt)),
            (dot_blocks, 1, 1),
            (WARPS_PER_BLOCK_SIMPLE * 32) as u32,
            0,
            &[
                self.p(dout),
                self.p(&out),
                self.p(&delta),
                Arg::U64(pairs as u64),
                Arg::I32(head_dim as i32),
                zeroed(dq_acc.as_ref()),
                zeroed(zeroed_parts.map(|p| &p.0)),
                zeroed(zeroed_parts.map(|p| &p.1)),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
            ],
        )?;
        // The D_i were out's last read: its buffer goes to the pool for the gradients (the
        // stream orders the dot before any kernel writing them).
        drop(out);
        let mut grads = grads(self)?;
        let QkvGrads { dq, dk, dv } = &mut grads;
        let common = [
            Arg::I32(seq as i32),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
        ];
        let launched = if let (Some(warps), Some(dq_acc)) = (mma_warps, dq_acc) {
            // (name, keys a block, threads, shared bytes)
            let (name, block_keys, threads, shared) = if wgmma {
                (
                    format!("attention_backward_wgmma_{}_d{head_dim}", suffix(dt)),
                    HOPPER_BLOCK_ROWS,
                    HOPPER_BACKWARD_THREADS,
                    hopper_backward_shared_bytes(head_dim),
                )
            } else {
                (
                    format!("attention_backward_mma_{}_d{head_dim}_w{warps}", suffix(dt)),
                    16 * warps,
                    32 * warps,
                    backward_shared_bytes(head_dim, warps),
                )
            };
            // GQA: one block per query head. The wgmma kernel adds each head's dK and dV into f32
            // sums per kv head (bulk reductions), rounded into dk and dv afterwards; the mma.sync
            // one writes f32 parts per query head, which attention_backward_group_sum adds up.
            let grid = (
                seq.div_ceil(block_keys) as u32,
                if parts.is_some() { heads } else { kv_heads } as u32,
                rows as u32,
            );
            let part_ptr = |i: usize| match &parts {
                Some(p) => self.p(if i == 0 { &p.0 } else { &p.1 }),
                None => Arg::Ptr(0),
            };
            let mut args = vec![
                self.p(q),
                self.p(k),
                self.p(v),
                self.p(dout),
                self.p(lse),
                self.p(&delta),
                self.pi(doc_start),
                self.p(&dq_acc),
                self.p(dk),
                self.p(dv),
                part_ptr(0),
                part_ptr(1),
            ];
            args.extend(common);
            args.extend([Arg::I32(window), Arg::F32(scale)]);
            // Backward: dV = PᵀdO, dP = dO Vᵀ, dS → dQ = dS K, dK = dSᵀQ, plus S = QKᵀ again:
            // five products against the forward's two, so 2.5× its FLOPs.
            let flops = || 10.0 * (heads * head_dim) as f64 * layout.visible_pairs() as f64;
            self.launch_counted(&name, grid, threads as u32, shared as u32, &args, flops)?;
            if let Some((dk_part, dv_part)) = &parts {
                let total = n * kv_heads * head_dim;
                for (part, out) in [(dk_part, &mut *dk), (dv_part, &mut *dv)] {
                    if wgmma {
                        self.launch(
                            &format!("cast_f32_{}", suffix(dt)),
                            (super::launch::blocks_for(total), 1, 1),
                            256,
                            0,
                            &[self.p(part), self.p(out), Arg::U64(total as u64)],
                        )?;
                        continue;
                    }
                    self.launch(
                        &format!("attention_backward_group_sum_{}", suffix(dt)),
                        (super::launch::blocks_for(total), 1, 1),
                        256,
                        0,
                        &[
                            self.p(part),
                            self.p(out),
                            Arg::U64(total as u64),
                            Arg::I32(heads as i32),
                            Arg::I32(kv_heads as i32),
                            Arg::I32(head_dim as i32),
                        ],
                    )?;
                }
            }
            // dq ← dq_acc rounded to the compute dtype (and rotated back by RoPE's inverse).
            let total = dq.len();
            match unrotate_dq {
                Some(r) => {
                    let tail = self.rope_tail(op, &r, heads, head_dim, true)?;
                    let args: Vec<Arg> = [self.p(&dq_acc), self.p(dq)]
                        .into_iter()
                        .chain(tail.unwrap_or_default())
                        .collect();
                    self.launch(
                        &format!("rope_from_f32_{}", suffix(dt)),
                        (super::launch::blocks_for_chunks_of_8(total / 2), 1, 1),
                        256,
                        0,
                        &args,
                    )
                }
                None => self.launch(
                    &format!("cast_f32_{}", suffix(dt)),
                    (super::launch::blocks_for(total), 1, 1),
                    256,
                    0,
                    &[self.p(&dq_acc), self.p(dq), Arg::U64(total as u64)],
                ),
            }
        } else {
            let base = [
                self.p(q),
                self.p(k),
                self.p(v),
                self.p(dout),
                self.p(lse),
                self.p(&delta),
                self.pi(doc_start),
            ];
            let tail = [
                Arg::I32(rows as i32),
                Arg::I32(seq as i32),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(head_dim as i32),
                Arg::I32(window),
                Arg::F32(scale),
            ];
            let threads = (WARPS_PER_BLOCK_SIMPLE * 32) as u32;
            let mut args = base.to_vec();
            args.push(self.p(dq));
            args.extend(tail);
            self.launch(
                &format!("attention_backward_simple_dq_{}", suffix(dt)),
                (dot_blocks, 1, 1),
                threads,
                0,
                &args,
            )?;
            let mut args = base.to_vec();
            args.extend([self.p(dk), self.p(dv)]);
            args.extend(tail);
            let kv_blocks = (n * kv_heads).div_ceil(WARPS_PER_BLOCK_SIMPLE) as u32;
            self.launch(
                &format!("attention_backward_simple_dkdv_{}", suffix(dt)),
                (kv_blocks, 1, 1),
                threads,
                0,
                &args,
            )?;
            match unrotate_dq {
                Some(r) => {
                    crate::Backend::rope(self, dq, r.positions, r.cos, r.sin, heads, head_dim, true)
                }
                None => Ok(()),
            }
        };
        launched.map(|()| grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_takes_wgmma_unless_told_otherwise() {
        let choose = AttentionKernels::choose;
        assert_eq!(choose((9, 0), None).unwrap(), AttentionKernels::Wgmma);
        assert_eq!(
            choose((9, 0), Some("auto")).unwrap(),
            AttentionKernels::Wgmma
        );
        assert_eq!(
            choose((9, 0), Some("mma-sync")).unwrap(),
            AttentionKernels::MmaSync
        );
        // wgmma exists only on 9.0 (sm_90a): not on Ampere, Ada, Turing or Blackwell.
        for cc in [(8, 0), (8, 9), (7, 5), (10, 0), (12, 0)] {
            assert_eq!(choose(cc, None).unwrap(), AttentionKernels::MmaSync);
        }
        let err = choose((9, 0), Some("wgmma")).unwrap_err().to_string();
        assert!(
            err.contains("FUSELORA_ATTENTION=wgmma") && err.contains("mma-sync"),
            "{err}"
        );
    }

    #[test]
    fn the_hopper_kernels_fit_an_h100s_shared_memory() {
        // 227 KiB a block on compute capability 9.0 (the few static bytes of mbarriers and the
        // forward's first keys included).
        let per_block = 227 * 1024;
        for d in [64, 128] {
            assert!(
                hopper_backward_shared_bytes(d) + 1024 <= per_block,
                "backward d{d}"
            );
            assert!(
                hopper_forward_shared_bytes(d) + 1024 <= per_block,
                "forward d{d}"
            );
        }
        assert_eq!(hopper_backward_shared_bytes(128), 199_936);
        assert_eq!(hopper_backward_shared_bytes(64), 118_016);
        assert_eq!(hopper_forward_shared_bytes(128), 230_400);
    }
}
