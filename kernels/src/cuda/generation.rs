//! Launchers of `cuda/generation.cu` (the KV cache of generation: write, attend) and
//! `cuda/random.cu` (the deterministic uniform fill of benchmark weights).

use super::launch::{blocks_for, Arg};
use super::{suffix, CudaBackend, CudaIndices, CudaTensor};
use crate::error::check_len;
use crate::{KernelError, Result};

/// The largest head dimension `attention_cached` handles (8 values per lane of a warp).
const MAX_CACHED_HEAD_DIM: usize = 256;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_cache_impl(
        &self,
        src: &CudaTensor,
        cache: &mut CudaTensor,
        rows: usize,
        new: usize,
        capacity: usize,
        width: usize,
        at: usize,
    ) -> Result<()> {
        check_len("write_cache", "src", src.len(), rows * new * width)?;
        check_len("write_cache", "cache", cache.len(), rows * capacity * width)?;
        let dt = self.same_dtype("write_cache", &[("src", src), ("cache", cache)])?;
        if at + new > capacity {
            return Err(KernelError::Unsupported(format!(
                "write_cache: columns {at}..{} exceed the capacity {capacity}",
                at + new
            )));
        }
        let n = rows * new * width;
        if n == 0 {
            return Ok(());
        }
        let args = [
            self.p(src),
            self.p(cache),
            Arg::U64(rows as u64),
            Arg::U64(new as u64),
            Arg::U64(capacity as u64),
            Arg::U64(width as u64),
            Arg::U64(at as u64),
        ];
        let name = format!("write_cache_{}", suffix(dt));
        self.launch(&name, (blocks_for(n), 1, 1), 256, 0, &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_cached_impl(
        &self,
        q: &CudaTensor,
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        first_key: &CudaIndices,
        rows: usize,
        new: usize,
        filled: usize,
        capacity: usize,
        window: Option<usize>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let op = "attention_cached";
        check_len(op, "q", q.len(), rows * new * heads * head_dim)?;
        check_len(
            op,
            "k_cache",
            k_cache.len(),
            rows * capacity * kv_heads * head_dim,
        )?;
        check_len(
            op,
            "v_cache",
            v_cache.len(),
            rows * capacity * kv_heads * head_dim,
        )?;
        check_len(op, "out", out.len(), rows * new * heads * head_dim)?;
        check_len(op, "first_key", first_key.len(), rows)?;
        let dt = self.same_dtype(
            op,
            &[
                ("q", q),
                ("k_cache", k_cache),
                ("v_cache", v_cache),
                ("out", out),
            ],
        )?;
        if head_dim > MAX_CACHED_HEAD_DIM || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(KernelError::Unsupported(format!(
                "{op}: head_dim {head_dim} (at most {MAX_CACHED_HEAD_DIM}) with {heads} query heads over \
                 {kv_heads} kv heads is not supported"
            )));
        }
        if new > filled || filled > capacity {
            return Err(KernelError::Unsupported(format!(
                "{op}: {new} new columns, {filled} filled, capacity {capacity}: need new ≤ filled ≤ capacity"
            )));
        }
        if rows * new * heads == 0 {
            return Ok(());
        }
        let args = [
            self.p(q),
            self.p(k_cache),
            self.p(v_cache),
            Arg::Ptr(first_key.ptr(&self.stream)),
            self.p(out),
            Arg::I32(new as i32),
            Arg::I32(filled as i32),
            Arg::I32(capacity as i32),
            Arg::I32(window.unwrap_or(0) as i32),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
        ];
        let name = format!("attention_cached_{}", suffix(dt));
        self.launch(&name, ((rows * new) as u32, heads as u32, 1), 32, 0, &args)
    }

    pub(crate) fn fill_random_impl(&self, t: &mut CudaTensor, seed: u64, scale: f32) -> Result<()> {
        let n = t.len();
        if n == 0 {
            return Ok(());
        }
        let name = format!("fill_random_{}", suffix(t.dtype));
        let args = [
            self.p(t),
            Arg::U64(n as u64),
            Arg::U64(seed),
            Arg::F32(scale),
        ];
        self.launch(&name, (blocks_for(n), 1, 1), 256, 0, &args)
    }
}
