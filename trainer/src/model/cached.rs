//! Incremental decoding with a KV cache (generation): each call runs only the new tokens through
//! the layers, appending their keys and values to the cache, and returns the last token's logits.
//! Rows may be left-padded prompts: `first_key[r]` is where row `r`'s real tokens start, and the
//! RoPE position of column `c` is `c − first_key[r]`.

use super::decoder::Decoder;
use super::layer::dims;
use super::linear;
use super::Projection;
use crate::lora::LoraParams;
use anyhow::{bail, Result};
use kernels::{Backend, DType};

/// Keys and values of every layer for `rows` sequences of up to `capacity` tokens.
pub struct KvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    pub rows: usize,
    pub capacity: usize,
    /// Columns filled so far (the same for every row).
    pub filled: usize,
    first_key: Vec<i32>,
    first_key_dev: B::Indices,
    cos: B::Tensor,
    sin: B::Tensor,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache; `first_key[r]` = number of left-padding columns of row `r`.
    pub fn new(be: &B, model: &Decoder<B>, first_key: Vec<i32>, capacity: usize) -> Result<Self> {
        let c = &model.config;
        let rows = first_key.len();
        let width = c.kv_dim();
        let alloc = || be.zeros(rows * capacity * width, be.compute_dtype());
        let k = (0..c.num_layers)
            .map(|_| alloc())
            .collect::<Result<Vec<_>, _>>()?;
        let v = (0..c.num_layers)
            .map(|_| alloc())
            .collect::<Result<Vec<_>, _>>()?;
        let (cos, sin) = c.rope.tables(capacity, capacity);
        Ok(KvCache {
            k,
            v,
            rows,
            capacity,
            filled: 0,
            first_key_dev: be.upload_indices(&first_key)?,
            first_key,
            cos: be.upload(&cos, DType::F32)?,
            sin: be.upload(&sin, DType::F32)?,
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// Runs `ids [rows, new]` (the next `new` columns of every row) and returns the logits of each
    /// row's last new token, `[rows, vocab]` f32.
    pub fn step_cached(
        &self,
        be: &B,
        lora: Option<&LoraParams<B>>,
        ids: &[i32],
        cache: &mut KvCache<B>,
    ) -> Result<Vec<f32>> {
        let s = &self.shapes;
        let rows = cache.rows;
        let new = ids.len() / rows;
        if new == 0 || ids.len() != rows * new {
            bail!("step_cached: {} ids do not fill {rows} rows", ids.len());
        }
        if cache.filled + new > cache.capacity {
            bail!(
                "the KV cache holds {} tokens; {} more do not fit",
                cache.capacity,
                cache.filled + new - cache.capacity
            );
        }
        let n = rows * new;
        let dt = be.compute_dtype();
        let start = cache.filled;
        let positions: Vec<i32> = (0..n)
            .map(|i| ((start + i % new) as i32 - cache.first_key[i / new]).max(0))
            .collect();
        let positions = be.upload_indices(&positions)?;
        let mut x = be.zeros(n * s.hidden, dt)?;
        be.embedding(&self.embed, &be.upload_indices(ids)?, s.hidden, &mut x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let slot = |p: Projection| lora.and_then(|lp| lp.slot(l, p).map(|sl| (lp, sl)));
            let project = |p: Projection, input: &B::Tensor, out: &mut B::Tensor| -> Result<()> {
                linear::forward(
                    be,
                    dims(s, p, n),
                    input,
                    &layer.proj[p.index()],
                    slot(p),
                    out,
                )
                .map(|_| ())
            };
            let mut rstd = be.zeros(n, DType::F32)?;
            let mut h = be.zeros(n * s.hidden, dt)?;
            be.rms_norm(&x, &layer.input_norm, s.hidden, s.eps, &mut h, &mut rstd)?;
            let mut q = be.zeros(n * s.q_dim, dt)?;
            let mut k = be.zeros(n * s.kv_dim, dt)?;
            let mut v = be.zeros(n * s.kv_dim, dt)?;
            project(Projection::Q, &h, &mut q)?;
            project(Projection::K, &h, &mut k)?;
            project(Projection::V, &h, &mut v)?;
            be.rope(
                &mut q, &positions, &cache.cos, &cache.sin, s.heads, s.head_dim, false,
            )?;
            be.rope(
                &mut k, &positions, &cache.cos, &cache.sin, s.kv_heads, s.head_dim, false,
            )?;
            be.write_cache(
                &k,
                &mut cache.k[l],
                rows,
                new,
                cache.capacity,
                s.kv_dim,
                start,
            )?;
            be.write_cache(
                &v,
                &mut cache.v[l],
                rows,
                new,
                cache.capacity,
                s.kv_dim,
                start,
            )?;
            let mut attn = be.zeros(n * s.q_dim, dt)?;
            be.attention_cached(
                &q,
                &cache.k[l],
                &cache.v[l],
                &cache.first_key_dev,
                rows,
                new,
                start + new,
                cache.capacity,
                self.config.sliding_window,
                s.heads,
                s.kv_heads,
                s.head_dim,
                &mut attn,
            )?;
            let mut mid = be.zeros(n * s.hidden, dt)?;
            project(Projection::O, &attn, &mut mid)?;
            be.axpy(1.0, &x, &mut mid)?;
            be.rms_norm(
                &mid,
                &layer.post_attention_norm,
                s.hidden,
                s.eps,
                &mut h,
                &mut rstd,
            )?;
            let mut gate = be.zeros(n * s.inter, dt)?;
            let mut up = be.zeros(n * s.inter, dt)?;
            project(Projection::Gate, &h, &mut gate)?;
            project(Projection::Up, &h, &mut up)?;
            let mut act = be.zeros(n * s.inter, dt)?;
            be.swiglu(&gate, &up, &mut act)?;
            let mut out = be.zeros(n * s.hidden, dt)?;
            project(Projection::Down, &act, &mut out)?;
            be.axpy(1.0, &mid, &mut out)?;
            x = out;
        }
        cache.filled += new;
        // Only each row's last token needs logits.
        let all = be.download(&x)?;
        let last: Vec<f32> = (0..rows)
            .flat_map(|r| all[((r + 1) * new - 1) * s.hidden..][..s.hidden].to_vec())
            .collect();
        let last = be.upload(&last, dt)?;
        let mut rstd = be.zeros(rows, DType::F32)?;
        let mut normed = be.zeros(rows * s.hidden, dt)?;
        be.rms_norm(
            &last,
            &self.final_norm,
            s.hidden,
            s.eps,
            &mut normed,
            &mut rstd,
        )?;
        let v = self.config.vocab_size;
        let mut logits = be.zeros(rows * v, DType::F32)?;
        be.gemm(
            rows,
            v,
            s.hidden,
            1.0,
            &normed,
            false,
            self.head_weight(),
            true,
            0.0,
            &mut logits,
        )?;
        Ok(be.download(&logits)?)
    }
}
