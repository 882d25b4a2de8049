//! The CPU backend: f32 everywhere, loops the compiler vectorises (`lanes`) and `gemm` GEMMs on
//! fixed tiles spread over rayon.
//! It is the reference the fixtures pin and every other backend is compared against, so each
//! op is written in the most direct form of its equation. Deterministic: the same inputs give
//! the same bits whatever the thread count, since every reduction runs in a fixed order.

mod adamw;
mod attention;
mod broadcast;
mod cross_entropy;
mod embedding;
mod heap;
mod lanes;
mod matmul;
mod nf4;
mod place_block;
pub mod profile;
mod random;
mod rmsnorm;
mod rope;
mod swiglu;

pub use attention::{attention_backward_f32, attention_forward_f32};
pub use matmul::{gemm_f32, gemm_f32_at};

use crate::backend::{check_copy_places, check_gemm_at, check_place_block};
use crate::error::{check_len, check_rows, check_strided_rows};
use crate::nf4::{Nf4Buffers, Nf4Weight};
use crate::{
    AdamWParams, AfterUpdate, AttentionLayout, Backend, CeGrad, DType, LoraPad, MatAt, Nf4Absmax,
    ParkLane, QkvGrads, Result, Rotation,
};
use profile::timed;
use std::ops::Range;

/// The f32 reference backend.
#[derive(Clone, Debug)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        heap::keep_freed_memory();
        CpuBackend
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Indices = Vec<i32>;
    /// Host memory is where the tensor already is.
    type Parked = Vec<Vec<f32>>;

    fn describe(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn compute_dtype(&self) -> DType {
        DType::F32
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }

    fn zeros(&self, len: usize, _dtype: DType) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32], _dtype: DType) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, t: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(t.clone())
    }

    fn upload_indices(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }

    fn len(&self, t: &Vec<f32>) -> usize {
        t.len()
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn copy_many_into(&self, src: &[Vec<f32>], dst: &mut Vec<f32>, at: &[usize]) -> Result<()> {
        check_copy_places(src.iter().map(Vec::len), at, dst.len())?;
        for (s, &start) in src.iter().zip(at) {
            dst[start..start + s.len()].copy_from_slice(s);
        }
        Ok(())
    }

    fn fill_zero(&self, t: &mut Vec<f32>) -> Result<()> {
        t.fill(0.0);
        Ok(())
    }

    fn park(&self, ts: Vec<Vec<f32>>, _lane: ParkLane) -> Result<Vec<Vec<f32>>> {
        Ok(ts)
    }

    fn prefetch(&self, _p: &mut Vec<Vec<f32>>) -> Result<()> {
        Ok(())
    }

    fn unpark(&self, p: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        Ok(p)
    }

    fn fill_random(&self, t: &mut Vec<f32>, seed: u64, scale: f32) -> Result<()> {
        random::fill(t, seed, scale);
        Ok(())
    }

    fn axpy_from(
        &self,
        alpha: f32,
        (src, offset): (&Vec<f32>, usize),
        dst: &mut Vec<f32>,
    ) -> Result<()> {
        crate::error::check_block_in_src("axpy_from", src.len(), offset, dst.len())?;
        let block = &src[offset..offset + dst.len()];
        dst.iter_mut().zip(block).for_each(|(d, s)| *d += alpha * s);
        Ok(())
    }

    fn scale(&self, alpha: f32, t: &mut Vec<f32>) -> Result<()> {
        t.iter_mut().for_each(|x| *x *= alpha);
        Ok(())
    }

    fn gemm_at(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        (a, a_at): (&Vec<f32>, MatAt),
        trans_a: bool,
        (b, b_at): (&Vec<f32>, MatAt),
        trans_b: bool,
        beta: f32,
        (c, c_at): (&mut Vec<f32>, MatAt),
    ) -> Result<()> {
        check_gemm_at(
            (m, n, k),
            (a_at, trans_a, a.len()),
            (b_at, trans_b, b.len()),
            (c_at, c.len()),
        )?;
        let describe = || {
            let op = if m.min(n).min(k) <= 64 {
                "gemm, one side ≤ 64 (LoRA)".to_string()
            } else {
                format!("gemm {m}×{n}×{k}")
            };
            (op, 2.0 * (m * n * k) as f64)
        };
        timed(describe, || {
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
        });
        Ok(())
    }

    fn embedding_from_host(
        &self,
        table: &Vec<Vec<f32>>,
        ids: &Vec<i32>,
        hidden: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check_len("embedding_from_host", "parked tensors", table.len(), 1)?;
        self.embedding(&table[0], ids, hidden, out)
    }

    fn embedding(
        &self,
        table: &Vec<f32>,
        ids: &Vec<i32>,
        hidden: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check_len("embedding", "out", out.len(), ids.len() * hidden)?;
        embedding::gather(table, ids, hidden, out)
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        hidden: usize,
        eps: f32,
        y: &mut Vec<f32>,
        y_ld: usize,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        check_len("rms_norm", "w", w.len(), hidden)?;
        check_len("rms_norm", "rstd", rstd.len() * hidden, x.len())?;
        check_strided_rows("rms_norm", "y", (rstd.len(), hidden, y_ld), y.len())?;
        timed(
            || ("rms_norm".into(), 0.0),
            || rmsnorm::forward(x, w, hidden, eps, (y, y_ld), rstd),
        );
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        hidden: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        check_len("rms_norm_backward", "w", w.len(), hidden)?;
        check_len("rms_norm_backward", "rstd", rstd.len() * hidden, x.len())?;
        check_len("rms_norm_backward", "dx", dx.len(), x.len())?;
        check_len("rms_norm_backward", "dy", dy.len(), x.len())?;
        timed(
            || ("rms_norm_backward".into(), 0.0),
            || rmsnorm::backward(dy, x, w, rstd, hidden, dx),
        );
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &Vec<i32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        check_len("rope", "x", x.len(), positions.len() * heads * head_dim)?;
        timed(
            || ("rope".into(), 0.0),
            || rope::rotate(x, positions, cos, sin, heads, head_dim, inverse),
        )
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        layout: &AttentionLayout,
        _doc_start: &Vec<i32>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let n = layout.tokens();
        check_len("attention", "q", q.len(), n * heads * head_dim)?;
        check_len("attention", "k", k.len(), n * kv_heads * head_dim)?;
        check_len("attention", "v", v.len(), n * kv_heads * head_dim)?;
        check_len("attention", "out", out.len(), n * heads * head_dim)?;
        check_len("attention", "lse", lse.len(), n * heads)?;
        // 2 products (QKᵀ, PV) of 2·d FLOPs per visible (query, key) pair and head
        let flops = || 4.0 * (visible_pairs(layout) * heads * head_dim) as f64;
        timed(
            || ("attention".into(), flops()),
            || attention_forward_f32(q, k, v, layout, heads, kv_heads, head_dim, out, lse),
        );
        Ok(())
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        layout: &AttentionLayout,
        _doc_start: &Vec<i32>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        unrotate_dq: Option<Rotation<'_, Vec<i32>, Vec<f32>>>,
    ) -> Result<QkvGrads<Vec<f32>>> {
        let n = layout.tokens();
        check_len("attention_backward", "out", out.len(), n * heads * head_dim)?;
        check_len(
            "attention_backward",
            "dout",
            dout.len(),
            n * heads * head_dim,
        )?;
        let mut dq = vec![0.0; n * heads * head_dim];
        let mut dk = vec![0.0; n * kv_heads * head_dim];
        let mut dv = vec![0.0; n * kv_heads * head_dim];
        // 5 products (QKᵀ, dO Vᵀ, dV, dK, dQ) of 2·d FLOPs per visible pair and head
        let flops = || 10.0 * (visible_pairs(layout) * heads * head_dim) as f64;
        timed(
            || ("attention_backward".into(), flops()),
            || {
                attention_backward_f32(
                    q, k, v, &out, lse, dout, layout, heads, kv_heads, head_dim, &mut dq, &mut dk,
                    &mut dv,
                )
            },
        );
        if let Some(r) = unrotate_dq {
            self.rope(&mut dq, r.positions, r.cos, r.sin, heads, head_dim, true)?;
        }
        Ok(QkvGrads { dq, dk, dv })
    }

    fn write_cache(
        &self,
        src: &Vec<f32>,
        cache: &mut Vec<f32>,
        rows: usize,
        new: usize,
        capacity: usize,
        width: usize,
        at: usize,
    ) -> Result<()> {
        check_len("write_cache", "src", src.len(), rows * new * width)?;
        check_len("write_cache", "cache", cache.len(), rows * capacity * width)?;
        if at + new > capacity {
            return Err(crate::KernelError::Unsupported(format!(
                "write_cache: columns {at}..{} exceed the capacity {capacity}",
                at + new
            )));
        }
        for r in 0..rows {
            cache[(r * capacity + at) * width..][..new * width]
                .copy_from_slice(&src[r * new * width..][..new * width]);
        }
        Ok(())
    }

    fn attention_cached(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        first_key: &Vec<i32>,
        rows: usize,
        new: usize,
        filled: usize,
        capacity: usize,
        window: Option<usize>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check_len(
            "attention_cached",
            "q",
            q.len(),
            rows * new * heads * head_dim,
        )?;
        check_len(
            "attention_cached",
            "k_cache",
            k_cache.len(),
            rows * capacity * kv_heads * head_dim,
        )?;
        check_len(
            "attention_cached",
            "out",
            out.len(),
            rows * new * heads * head_dim,
        )?;
        check_len("attention_cached", "first_key", first_key.len(), rows)?;
        attention::attention_cached_f32(
            q, k_cache, v_cache, first_key, new, filled, capacity, window, heads, kv_heads,
            head_dim, out,
        );
        Ok(())
    }

    fn broadcast_rows(&self, row: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        check_rows("broadcast_rows", out.len(), row.len())?;
        broadcast::broadcast_rows(row, out);
        Ok(())
    }

    fn place_block(
        &self,
        rows: usize,
        width: usize,
        block: Range<usize>,
        (src, src_at): (&Vec<f32>, MatAt),
        (dst, dst_at): (&mut Vec<f32>, MatAt),
    ) -> Result<()> {
        check_place_block(
            rows,
            width,
            &block,
            (src_at, src.len()),
            (dst_at, dst.len()),
        )?;
        place_block::place_block(rows, width, block, (src, src_at), (dst, dst_at));
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        check_len("swiglu", "up", up.len(), gate.len())?;
        check_len("swiglu", "out", out.len(), gate.len())?;
        timed(|| ("swiglu".into(), 0.0), || swiglu::forward(gate, up, out));
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dout: &mut Vec<f32>,
        gate: &mut Vec<f32>,
        up: &mut Vec<f32>,
    ) -> Result<()> {
        check_len("swiglu_backward", "dout", dout.len(), gate.len())?;
        check_len("swiglu_backward", "up", up.len(), gate.len())?;
        timed(
            || ("swiglu_backward".into(), 0.0),
            || swiglu::backward(dout, gate, up),
        );
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        hidden: &Vec<f32>,
        weight: &Vec<f32>,
        targets: &Vec<i32>,
        rows: usize,
        hidden_dim: usize,
        vocab: usize,
        grad: CeGrad<'_, Vec<f32>>,
        logp: &mut Vec<f32>,
        dhidden: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        check_len(
            "lm_head_cross_entropy",
            "hidden",
            hidden.len(),
            rows * hidden_dim,
        )?;
        check_len(
            "lm_head_cross_entropy",
            "weight",
            weight.len(),
            vocab * hidden_dim,
        )?;
        check_len("lm_head_cross_entropy", "targets", targets.len(), rows)?;
        check_len("lm_head_cross_entropy", "logp", logp.len(), rows)?;
        if let CeGrad::PerRow(w) = &grad {
            check_len("lm_head_cross_entropy", "row weights", w.len(), rows)?;
        }
        if let Some(d) = &dhidden {
            check_len(
                "lm_head_cross_entropy",
                "dhidden",
                d.len(),
                rows * hidden_dim,
            )?;
        }
        // the logits GEMM, and with dhidden the one back through the head
        let products = if dhidden.is_some() { 2.0 } else { 1.0 };
        let flops = products * 2.0 * (rows * vocab * hidden_dim) as f64;
        timed(
            || ("lm_head_cross_entropy".into(), flops),
            || {
                cross_entropy::lm_head_cross_entropy(
                    hidden, weight, targets, hidden_dim, vocab, grad, logp, dhidden,
                )
            },
        )
    }

    fn quantize_nf4(
        &self,
        x: &Vec<f32>,
        double_quant: bool,
    ) -> Result<Nf4Buffers<Vec<f32>, Vec<i32>>> {
        Nf4Buffers::upload(self, &Nf4Weight::quantize(x, double_quant))
    }

    fn dequantize_nf4(
        &self,
        packed: &Vec<i32>,
        absmax: Nf4Absmax<'_, Vec<f32>, Vec<i32>>,
        cols: usize,
        ld: usize,
        pad: Option<LoraPad<'_, Vec<f32>>>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        nf4::dequantize(packed, absmax, (cols, ld), pad, out)
    }

    fn all_finite(&self, tensors: &[Vec<f32>]) -> Result<bool> {
        Ok(tensors.iter().flatten().all(|x| x.is_finite()))
    }

    fn sum_of_squares(&self, tensors: &[Vec<f32>]) -> Result<f64> {
        Ok(tensors
            .iter()
            .flat_map(|t| t.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum())
    }

    fn adamw(
        &self,
        params: &mut [Vec<f32>],
        grads: &mut [Vec<f32>],
        m: &mut [Vec<f32>],
        v: &mut [Vec<f32>],
        hp: &AdamWParams,
        step: u64,
        grad_scale: f32,
        after: AfterUpdate<'_, Vec<f32>>,
    ) -> Result<()> {
        for i in 0..params.len() {
            check_len("adamw", "grad", grads[i].len(), params[i].len())?;
            check_len("adamw", "exp_avg", m[i].len(), params[i].len())?;
            check_len("adamw", "exp_avg_sq", v[i].len(), params[i].len())?;
        }
        timed(
            || ("adamw".into(), 0.0),
            || {
                for i in 0..params.len() {
                    adamw::step(
                        &mut params[i],
                        &grads[i],
                        &mut m[i],
                        &mut v[i],
                        hp,
                        step,
                        grad_scale,
                    );
                }
            },
        );
        if let Some((compute, at)) = after.compute {
            self.copy_many_into(params, compute, at)?;
        }
        if after.zero_grads {
            self.fill_zero_many(grads)?;
        }
        Ok(())
    }
}

/// Σ over query tokens of the keys each sees (see `AttentionLayout`).
fn visible_pairs(layout: &AttentionLayout) -> usize {
    (0..layout.tokens())
        .map(|i| i % layout.seq_len + 1 - layout.first_key(i))
        .sum()
}

#[cfg(test)]
pub(crate) mod testing;
