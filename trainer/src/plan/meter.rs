//! A [`Backend`] that computes nothing and measures everything: the training step of the real
//! decoder code runs on it, and it records
//!
//! - memory as the CUDA backend's caching pool holds it (kernels/src/cuda/tensor.rs): a freed
//!   buffer waits for a tensor of the same storage kind (f32, or 16-bit for bf16/f16) whose length
//!   is at least 1/[`kernels::POOL_REUSE_SLACK`] of its own (the smallest such buffer serves), anything else
//!   is a new allocation, and the peak counts buffers in use plus cached — the number `bench`
//!   reports as peak memory. The buffers the CUDA ops take for themselves are mirrored, f32
//!   scratch in 16-bit storage as there (the LM head's logits chunk, kernels/src/cuda/lm_head.rs;
//!   attention backward's `delta`, f32 `dq` accumulator and GQA's f32 dK/dV parts,
//!   kernels/src/cuda/attention.rs);
//! - every op's FLOPs and bytes moved, for the roofline in [`super::roofline`].
//!
//! Index buffers (token ids, positions) are not in the pool, as on the device.

use kernels::{
    pool_buffer_fits, AdamWParams, AfterUpdate, AttentionLayout, Backend, CeGrad, DType, InFlight,
    KernelError, LoraPad, MatAt, Nf4Absmax, ParkLane, QkvGrads, Result, Rotation,
    GEMM_WORKSPACE_BYTES,
};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// What bounds an op on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A cuBLAS GEMM.
    Gemm,
    /// Flash-attention forward or backward.
    Attention,
    /// Everything elementwise or a reduction: limited by memory bandwidth.
    Memory,
}

/// One recorded op.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: OpKind,
    pub flops: f64,
    pub bytes: f64,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<(bool, usize), usize>,
    held: u64,
    peak: u64,
}

/// The pool's books and the op log.
#[derive(Default)]
pub struct Meter {
    pool: Mutex<PoolState>,
    ops: Mutex<Vec<Op>>,
}

/// A buffer: its length and dtype only.
pub struct MeterTensor {
    len: usize,
    /// Elements of the pooled buffer behind it (at least `len`).
    capacity: usize,
    dtype: DType,
    meter: Arc<Meter>,
}

impl Drop for MeterTensor {
    fn drop(&mut self) {
        let mut p = self.meter.pool.lock().expect("meter lock");
        *p.free
            .entry((is_f32(self.dtype), self.capacity))
            .or_insert(0) += 1;
    }
}

fn is_f32(d: DType) -> bool {
    d == DType::F32
}

/// Bytes of cached buffers given as ((is f32, length), count).
fn cached_bytes(free: impl Iterator<Item = ((bool, usize), usize)>) -> u64 {
    free.map(|((f32, len), n)| (len * if f32 { 4 } else { 2 } * n) as u64)
        .sum()
}

fn tensor_bytes(t: &MeterTensor) -> f64 {
    (t.len * t.dtype.size_bytes()) as f64
}

/// The metering backend; `compute` is the dtype the run would use on the device.
pub struct MeterBackend {
    meter: Arc<Meter>,
    compute: DType,
    /// Parked tensors not yet released: the CUDA backend's rule ([`InFlight`]).
    in_flight: Mutex<InFlight<Vec<MeterTensor>>>,
    /// The tuned products' workspace, held from the first [`Backend::tune`] on.
    gemm_workspace: Mutex<Option<MeterTensor>>,
}

/// The lengths and dtypes of a parked group, and its device buffers once prefetched.
pub struct MeterParked {
    parts: Vec<(usize, DType)>,
    lane: ParkLane,
    fetched: Option<Vec<MeterTensor>>,
}

impl MeterBackend {
    pub fn new(compute: DType) -> Self {
        MeterBackend {
            meter: Arc::new(Meter::default()),
            compute,
            in_flight: Mutex::new(InFlight::default()),
            gemm_workspace: Mutex::new(None),
        }
    }

    /// Pool bytes held now (in use plus cached).
    pub fn held_bytes(&self) -> u64 {
        self.meter.pool.lock().expect("meter lock").held
    }

    /// Forgets the ops recorded so far (to measure one step after warm-up).
    pub fn clear_ops(&self) {
        self.meter.ops.lock().expect("meter lock").clear();
    }

    pub fn ops(&self) -> Vec<Op> {
        self.meter.ops.lock().expect("meter lock").clone()
    }

    fn alloc(&self, len: usize, dtype: DType) -> MeterTensor {
        let mut p = self.meter.pool.lock().expect("meter lock");
        let kind = is_f32(dtype);
        let fit = p
            .free
            .iter()
            .filter(|&(&(f, cap), &n)| n > 0 && f == kind && pool_buffer_fits(len, cap))
            .map(|(&(_, cap), _)| cap)
            .min();
        let capacity = match fit {
            Some(cap) => {
                *p.free.get_mut(&(kind, cap)).expect("found above") -= 1;
                cap
            }
            None => {
                p.held += (len * dtype.size_bytes()) as u64;
                p.peak = p.peak.max(p.held);
                len
            }
        };
        MeterTensor {
            len,
            capacity,
            dtype,
            meter: self.meter.clone(),
        }
    }

    /// An op's f32 scratch of `len` values, held in 16-bit storage as the CUDA backend does
    /// (`CudaBackend::alloc_f32_scratch`).
    fn alloc_f32_scratch(&self, len: usize) -> MeterTensor {
        self.alloc(2 * len, DType::BF16)
    }

    fn record(&self, kind: OpKind, flops: f64, bytes: f64) {
        self.meter
            .ops
            .lock()
            .expect("meter lock")
            .push(Op { kind, flops, bytes });
    }

    fn memory_op(&self, bytes: f64) {
        self.record(OpKind::Memory, 0.0, bytes);
    }
}

impl Backend for MeterBackend {
    type Tensor = MeterTensor;
    type Indices = usize;
    type Parked = MeterParked;

    fn describe(&self) -> String {
        format!("meter ({})", self.compute.name())
    }

    fn compute_dtype(&self) -> DType {
        self.compute
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.meter.pool.lock().expect("meter lock").peak)
    }

    fn tune(&self) -> Result<()> {
        let mut workspace = self.gemm_workspace.lock().expect("meter lock");
        if workspace.is_none() {
            *workspace = Some(self.alloc(GEMM_WORKSPACE_BYTES / 2, DType::BF16));
        }
        Ok(())
    }

    fn release_cached(&self) -> Result<()> {
        let mut p = self.meter.pool.lock().expect("meter lock");
        p.held -= cached_bytes(p.free.drain());
        Ok(())
    }

    fn zeros(&self, len: usize, dtype: DType) -> Result<MeterTensor> {
        let t = self.alloc(len, dtype);
        self.memory_op(tensor_bytes(&t));
        Ok(t)
    }

    fn empty(&self, len: usize, dtype: DType) -> Result<MeterTensor> {
        Ok(self.alloc(len, dtype))
    }

    fn upload(&self, data: &[f32], dtype: DType) -> Result<MeterTensor> {
        Ok(self.alloc(data.len(), dtype))
    }

    fn download(&self, t: &MeterTensor) -> Result<Vec<f32>> {
        Ok(vec![0.0; t.len])
    }

    fn upload_indices(&self, data: &[i32]) -> Result<usize> {
        Ok(data.len())
    }

    fn len(&self, t: &MeterTensor) -> usize {
        t.len
    }

    fn copy(&self, src: &MeterTensor, dst: &mut MeterTensor) -> Result<()> {
        self.memory_op(tensor_bytes(src) + tensor_bytes(dst));
        Ok(())
    }

    /// One launch, as the CUDA backend's.
    fn copy_many_into(
        &self,
        src: &[MeterTensor],
        dst: &mut MeterTensor,
        _at: &[usize],
    ) -> Result<()> {
        let read: f64 = src.iter().map(tensor_bytes).sum();
        let written: usize = src.iter().map(|s| s.len * dst.dtype.size_bytes()).sum();
        self.memory_op(read + written as f64);
        Ok(())
    }

    fn fill_zero(&self, t: &mut MeterTensor) -> Result<()> {
        self.memory_op(tensor_bytes(t));
        Ok(())
    }

    /// One launch, as the CUDA backend's.
    fn fill_zero_many(&self, ts: &mut [MeterTensor]) -> Result<()> {
        self.memory_op(ts.iter().map(tensor_bytes).sum());
        Ok(())
    }

    /// The copies run beside the compute stream: no op is recorded, only the pool's books move.
    fn park(&self, ts: Vec<MeterTensor>, lane: ParkLane) -> Result<MeterParked> {
        let parked = MeterParked {
            parts: ts.iter().map(|t| (t.len, t.dtype)).collect(),
            lane,
            fetched: None,
        };
        let mut in_flight = self.in_flight.lock().expect("meter lock");
        drop(in_flight.release(lane));
        in_flight.push(lane, ts);
        Ok(parked)
    }

    fn prefetch(&self, p: &mut MeterParked) -> Result<()> {
        if p.fetched.is_none() {
            drop(self.in_flight.lock().expect("meter lock").release(p.lane));
            p.fetched = Some(
                p.parts
                    .iter()
                    .map(|&(len, dtype)| self.alloc(len, dtype))
                    .collect(),
            );
        }
        Ok(())
    }

    fn unpark(&self, mut p: MeterParked) -> Result<Vec<MeterTensor>> {
        self.prefetch(&mut p)?;
        Ok(p.fetched.take().expect("prefetched above"))
    }

    fn fill_random(&self, t: &mut MeterTensor, _seed: u64, _scale: f32) -> Result<()> {
        self.memory_op(tensor_bytes(t));
        Ok(())
    }

    fn axpy_from(
        &self,
        _alpha: f32,
        (src, _): (&MeterTensor, usize),
        dst: &mut MeterTensor,
    ) -> Result<()> {
        let src_bytes = (dst.len * src.dtype.size_bytes()) as f64;
        self.memory_op(src_bytes + 2.0 * tensor_bytes(dst));
        Ok(())
    }

    fn scale(&self, _alpha: f32, t: &mut MeterTensor) -> Result<()> {
        self.memory_op(2.0 * tensor_bytes(t));
        Ok(())
    }

    /// The matrices' own bytes cross memory (a block of a wider tensor, not the whole tensor).
    fn gemm_at(
        &self,
        m: usize,
        n: usize,
        k: usize,
        _alpha: f32,
        (a, _): (&MeterTensor, MatAt),
        _trans_a: bool,
        (b, _): (&MeterTensor, MatAt),
        _trans_b: bool,
        beta: f32,
        (c, _): (&mut MeterTensor, MatAt),
    ) -> Result<()> {
        let bytes = |t: &MeterTensor, elements: usize| (elements * t.dtype.size_bytes()) as f64;
        let c_passes = if beta == 0.0 { 1.0 } else { 2.0 };
        self.record(
            OpKind::Gemm,
            2.0 * (m * n * k) as f64,
            bytes(a, m * k) + bytes(b, k * n) + c_passes * bytes(c, m * n),
        );
        Ok(())
    }

    fn embedding(
        &self,
        _table: &MeterTensor,
        _ids: &usize,
        _hidden: usize,
        out: &mut MeterTensor,
    ) -> Result<()> {
        self.memory_op(2.0 * tensor_bytes(out));
        Ok(())
    }

    fn embedding_from_host(
        &self,
        _table: &MeterParked,
        _ids: &usize,
        _hidden: usize,
        out: &mut MeterTensor,
    ) -> Result<()> {
        // The rows come over the host link; on the device the copy only writes them.
        self.memory_op(tensor_bytes(out));
        Ok(())
    }

    /// Only `hidden` columns of each of y's rows are written.
    fn rms_norm(
        &self,
        x: &MeterTensor,
        _w: &MeterTensor,
        hidden: usize,
        _eps: f32,
        y: &mut MeterTensor,
        _y_ld: usize,
        rstd: &mut MeterTensor,
    ) -> Result<()> {
        let y_written = (rstd.len * hidden * y.dtype.size_bytes()) as f64;
        self.memory_op(tensor_bytes(x) + y_written + tensor_bytes(rstd));
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dy: &MeterTensor,
        x: &MeterTensor,
        _w: &MeterTensor,
        _rstd: &MeterTensor,
        _hidden: usize,
        dx: &mut MeterTensor,
    ) -> Result<()> {
        self.memory_op(tensor_bytes(dy) + tensor_bytes(x) + 2.0 * tensor_bytes(dx));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut MeterTensor,
        _positions: &usize,
        _cos: &MeterTensor,
        _sin: &MeterTensor,
        _heads: usize,
        _head_dim: usize,
        _inverse: bool,
    ) -> Result<()> {
        self.memory_op(2.0 * tensor_bytes(x));
        Ok(())
    }

    fn attention(
        &self,
        q: &MeterTensor,
        k: &MeterTensor,
        v: &MeterTensor,
        layout: &AttentionLayout,
        _doc_start: &usize,
        heads: usize,
        _kv_heads: usize,
        head_dim: usize,
        out: &mut MeterTensor,
        lse: &mut MeterTensor,
    ) -> Result<()> {
        let bytes = tensor_bytes(q) + tensor_bytes(k) + tensor_bytes(v) + tensor_bytes(out);
        self.record(
            OpKind::Attention,
            attention_forward_flops(layout, heads, head_dim),
            bytes + tensor_bytes(lse),
        );
        Ok(())
    }

    fn attention_backward(
        &self,
        q: &MeterTensor,
        k: &MeterTensor,
        v: &MeterTensor,
        out: MeterTensor,
        lse: &MeterTensor,
        dout: &MeterTensor,
        layout: &AttentionLayout,
        _doc_start: &usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        _unrotate_dq: Option<Rotation<'_, usize, MeterTensor>>,
    ) -> Result<QkvGrads<MeterTensor>> {
        // attention.rs: `delta [n·heads]` f32, and with the mma kernels an f32 dq accumulator and,
        // with GQA, f32 dK and dV per query head (the mma.sync kernels' parts; Hopper's wgmma
        // kernel sums per kv head, less: the larger is counted); all f32 scratch in 16-bit storage.
        // Then `out` goes back to the pool and the gradients are made.
        let n = layout.tokens();
        let (q_len, kv_len) = (n * heads * head_dim, n * kv_heads * head_dim);
        let _delta = self.alloc_f32_scratch(n * heads);
        let mma = self.compute != DType::F32 && matches!(head_dim, 64 | 128);
        let _dq_acc = mma.then(|| self.alloc_f32_scratch(q_len));
        let gqa = mma && heads > kv_heads;
        let _parts = gqa.then(|| [self.alloc_f32_scratch(q_len), self.alloc_f32_scratch(q_len)]);
        let out_bytes = tensor_bytes(&out);
        drop(out);
        let grads = QkvGrads {
            dq: self.alloc(q_len, self.compute),
            dk: self.alloc(kv_len, self.compute),
            dv: self.alloc(kv_len, self.compute),
        };
        let bytes = [q, k, v, lse, dout, &grads.dq, &grads.dk, &grads.dv]
            .iter()
            .map(|t| tensor_bytes(t))
            .sum::<f64>()
            + out_bytes;
        // Backward: five T×T×d products against the forward's two (2.5×).
        self.record(
            OpKind::Attention,
            2.5 * attention_forward_flops(layout, heads, head_dim),
            bytes,
        );
        Ok(grads)
    }

    fn write_cache(
        &self,
        src: &MeterTensor,
        _cache: &mut MeterTensor,
        _rows: usize,
        _new: usize,
        _capacity: usize,
        _width: usize,
        _at: usize,
    ) -> Result<()> {
        self.memory_op(2.0 * tensor_bytes(src));
        Ok(())
    }

    fn attention_cached(
        &self,
        _q: &MeterTensor,
        k_cache: &MeterTensor,
        v_cache: &MeterTensor,
        _first_key: &usize,
        _rows: usize,
        _new: usize,
        _filled: usize,
        _capacity: usize,
        _window: Option<usize>,
        _heads: usize,
        _kv_heads: usize,
        _head_dim: usize,
        out: &mut MeterTensor,
    ) -> Result<()> {
        self.memory_op(tensor_bytes(k_cache) + tensor_bytes(v_cache) + tensor_bytes(out));
        Ok(())
    }

    fn swiglu(&self, gate: &MeterTensor, up: &MeterTensor, out: &mut MeterTensor) -> Result<()> {
        self.memory_op(tensor_bytes(gate) + tensor_bytes(up) + tensor_bytes(out));
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dout: &mut MeterTensor,
        gate: &mut MeterTensor,
        up: &mut MeterTensor,
    ) -> Result<()> {
        // Read dout, gate, up; write the gradients and the forward's output in their place.
        self.memory_op(2.0 * (tensor_bytes(dout) + tensor_bytes(gate) + tensor_bytes(up)));
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        hidden: &MeterTensor,
        weight: &MeterTensor,
        _targets: &usize,
        rows: usize,
        hidden_dim: usize,
        vocab: usize,
        grad: CeGrad<'_, MeterTensor>,
        _logp: &mut MeterTensor,
        dhidden: Option<&mut MeterTensor>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        // lm_head.rs: f32 logits for `chunk` rows, the compute-dtype dz written over them.
        let dt = hidden.dtype;
        let chunk = kernels::lm_head_chunk_rows(rows, vocab);
        let _logits = self.alloc_f32_scratch(chunk * vocab);
        let want_grad = !matches!(grad, CeGrad::None);
        let e = dt.size_bytes() as f64;
        for start in (0..rows).step_by(chunk) {
            let c = chunk.min(rows - start);
            let logits = (c * vocab) as f64;
            self.record(
                OpKind::Gemm,
                2.0 * (c * vocab * hidden_dim) as f64,
                (c * hidden_dim) as f64 * e + tensor_bytes(weight) + 4.0 * logits,
            );
            self.memory_op(4.0 * logits + if want_grad { e * logits } else { 0.0 });
            if dhidden.is_some() {
                self.record(
                    OpKind::Gemm,
                    2.0 * (c * vocab * hidden_dim) as f64,
                    e * logits + tensor_bytes(weight) + (c * hidden_dim) as f64 * e,
                );
            }
        }
        Ok(())
    }

    fn broadcast_rows(&self, row: &MeterTensor, out: &mut MeterTensor) -> Result<()> {
        self.memory_op(tensor_bytes(row) + tensor_bytes(out));
        Ok(())
    }

    /// Reads the block's `rows · len(block)` elements, writes `rows · width`.
    fn place_block(
        &self,
        rows: usize,
        width: usize,
        block: Range<usize>,
        (src, _): (&MeterTensor, MatAt),
        (dst, _): (&mut MeterTensor, MatAt),
    ) -> Result<()> {
        if src.dtype != dst.dtype {
            return Err(KernelError::Unsupported(format!(
                "place_block: dst is {} but src is {}",
                dst.dtype.name(),
                src.dtype.name()
            )));
        }
        let elements = rows * (block.len() + width);
        self.memory_op((elements * dst.dtype.size_bytes()) as f64);
        Ok(())
    }

    fn quantize_nf4(
        &self,
        x: &MeterTensor,
        _double_quant: bool,
    ) -> Result<kernels::nf4::Nf4Buffers<MeterTensor, usize>> {
        // Read x once, write the packed nibbles and one f32 absmax per 64 values.
        let n = x.len;
        let absmax = self.alloc(n.div_ceil(64), DType::F32);
        self.memory_op(tensor_bytes(x) + n.div_ceil(2) as f64 + tensor_bytes(&absmax));
        Ok(kernels::nf4::Nf4Buffers {
            packed: n.div_ceil(8),
            absmax: kernels::nf4::AbsmaxBuffers::Plain(absmax),
        })
    }

    /// The packed words read, the weight's `rows · cols` elements written; with a pad also its
    /// block of B read and its `rows · (ld − cols)` elements written.
    fn dequantize_nf4(
        &self,
        packed: &usize,
        _absmax: Nf4Absmax<'_, MeterTensor, usize>,
        cols: usize,
        ld: usize,
        pad: Option<LoraPad<'_, MeterTensor>>,
        out: &mut MeterTensor,
    ) -> Result<()> {
        let rows = out.len / ld.max(1);
        let pad_elements = match pad {
            Some(p) if p.b.dtype != out.dtype => {
                return Err(KernelError::Unsupported(format!(
                    "dequantize_nf4: out is {} but pad B is {}",
                    out.dtype.name(),
                    p.b.dtype.name()
                )))
            }
            Some(p) => rows * (p.block.len() + ld.saturating_sub(cols)),
            None => 0,
        };
        let elements = rows * cols + pad_elements;
        self.memory_op(4.0 * *packed as f64 + (elements * out.dtype.size_bytes()) as f64);
        Ok(())
    }

    fn all_finite(&self, tensors: &[MeterTensor]) -> Result<bool> {
        self.memory_op(tensors.iter().map(tensor_bytes).sum());
        Ok(true)
    }

    fn sum_of_squares(&self, tensors: &[MeterTensor]) -> Result<f64> {
        self.memory_op(tensors.iter().map(tensor_bytes).sum());
        Ok(0.0)
    }

    /// One launch, as the CUDA backend's, its compute copies and zeroed gradients included.
    fn adamw(
        &self,
        params: &mut [MeterTensor],
        _grads: &mut [MeterTensor],
        _m: &mut [MeterTensor],
        _v: &mut [MeterTensor],
        _hp: &AdamWParams,
        _step: u64,
        _grad_scale: f32,
        after: AfterUpdate<'_, MeterTensor>,
    ) -> Result<()> {
        // p, m, v read and written, g read: 7 f32 passes; then the copies and the zeroing.
        let f32_pass: f64 = params.iter().map(tensor_bytes).sum();
        let copies: usize = match &after.compute {
            Some((dst, _)) => params.iter().map(|p| p.len * dst.dtype.size_bytes()).sum(),
            None => 0,
        };
        let zeroing = if after.zero_grads { f32_pass } else { 0.0 };
        self.memory_op(7.0 * f32_pass + copies as f64 + zeroing);
        Ok(())
    }
}

/// Causal attention forward FLOPs: two `T×T×d` products per head, half the square kept
/// (`2 · 2 · T²/2 · d` per head and row), as in trainer/src/bench.rs.
fn attention_forward_flops(layout: &AttentionLayout, heads: usize, head_dim: usize) -> f64 {
    let t = layout.seq_len as f64;
    layout.rows as f64 * 2.0 * t * t * (heads * head_dim) as f64
}
