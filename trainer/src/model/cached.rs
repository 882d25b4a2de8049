//! Incremental decoding with a KV cache (generation): each call runs only the new tokens through
//! the layers (the one layer forward of layer.rs, with [`Attend::Cached`]), appending their keys
//! and values to the cache, and returns the last token's logits.
//! Rows may be left-padded prompts: `first_key[r]` is where row `r`'s real tokens start, and the
//! RoPE position of column `c` is `c − first_key[r]`.

use super::decoder::Decoder;
use super::layer::{Attend, CacheStep};
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
        self.embed
            .rows(be, &be.upload_indices(ids)?, s.hidden, &mut x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let step = CacheStep {
                k: &mut cache.k[l],
                v: &mut cache.v[l],
                positions: &positions,
                cos: &cache.cos,
                sin: &cache.sin,
                first_key: &cache.first_key_dev,
                rows,
                new,
                start,
                capacity: cache.capacity,
                window: self.config.sliding_window,
            };
            x = layer.forward(be, s, l, lora, Attend::Cached(step), x)?.0;
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
            s.hidden,
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
