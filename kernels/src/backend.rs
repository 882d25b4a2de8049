use crate::error::{check_len, check_row_stride};
use crate::nf4::Nf4Buffers;
use crate::{AttentionLayout, OpTime, ParkLane, Result};
use std::ops::Range;

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Logits per chunk of the fused LM head + cross-entropy, in elements: 64 MiB of f32 (on the GPU
/// plus half that of 16-bit gradient) — at 7B, b2 × 2048 eight chunks ([`lm_head_chunk_rows`]),
/// whose GEMMs still run at the GEMM ceiling; the plan's meter keeps the same books. On the CPU
/// each chunk's product streams the whole head weight (113 MiB at SmolLM2-135M), so fewer, larger
/// chunks matter there too: 1 << 24 against 1 << 22 took the 135M head from 1,020-1,116 to 886-936
/// CPU ms a step (2 cores; 1 << 25 was slower again).
pub const LM_HEAD_CHUNK_ELEMENTS: usize = 1 << 24;

/// Rows per chunk of the fused LM head over `rows` rows of `vocab` logits: the fewest chunks of
/// at most [`LM_HEAD_CHUNK_ELEMENTS`] logits, with the rows shared out evenly among them. At 7B,
/// b2 × 2048, that is 8 chunks of 512 rows, not 7 of 524 and one of 428: every chunk's products
/// have one shape, and it is a whole number of 128-row tiles.
pub fn lm_head_chunk_rows(rows: usize, vocab: usize) -> usize {
    let most = (LM_HEAD_CHUNK_ELEMENTS / vocab.max(1)).max(1);
    rows.div_ceil(rows.div_ceil(most).max(1)).max(1)
}

/// Element type of a tensor. The CPU backend stores everything as f32 whatever is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// The name used in configs and messages: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Parses a config value (`f32`/`fp32`/`float32`, `bf16`/`bfloat16`, `f16`/`fp16`/`float16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "fp16" | "float16" => Some(DType::F16),
            _ => None,
        }
    }
}

/// Hyper-parameters of one `torch.optim.AdamW` step.
#[derive(Clone, Copy, Debug, PartialEq)]
/// Kept in f64 like the Python floats torch computes its scalars from.
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// What [`Backend::adamw`] writes besides the update, in the same pass over each value: where a
/// cast of the weights into their compute copies and a zeroing of the gradients would each be a
/// launch after it.
pub struct AfterUpdate<'a, T> {
    /// Each updated weight rounded into `compute` at `at[i]..`, as [`Backend::copy_many_into`]
    /// writes it: the compute-dtype copies the products read.
    pub compute: Option<(&'a mut T, &'a [usize])>,
    /// Each gradient zeroed once read.
    pub zero_grads: bool,
}

impl<T> AfterUpdate<'_, T> {
    /// The update alone.
    pub fn nothing() -> Self {
        AfterUpdate {
            compute: None,
            zero_grads: false,
        }
    }
}

/// What [`Backend::lm_head_cross_entropy`] does with the gradient.
pub enum CeGrad<'a, T> {
    /// Forward only: log-probabilities, no gradient.
    None,
    /// `d(-Σ_r scale · logp[r]) / d hidden`: the token-mean loss uses `scale = 1 / n_tokens`.
    Scale(f32),
    /// `d(-Σ_r weight[r] · logp[r]) / d hidden` with one f32 weight per row (DPO).
    PerRow(&'a T),
}

/// RoPE's tables as [`Backend::rope`] reads them: each token's position, and `cos`, `sin`
/// `[positions, head_dim / 2]` (f32).
pub struct Rotation<'a, I, T> {
    pub positions: &'a I,
    pub cos: &'a T,
    pub sin: &'a T,
}

/// What [`Backend::attention_backward`] returns: the gradients of q, k and v.
pub struct QkvGrads<T> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
}

/// Where [`Backend::dequantize_nf4`] finds each 64-element block's absmax (see [`crate::nf4`]).
pub enum Nf4Absmax<'a, T, I> {
    /// One f32 per block: an f32 tensor `[n_blocks]`.
    Plain(&'a T),
    /// Double quantization: `A[b] = f32(map[codes[b]] · nested_absmax[b / 256]) + offset`, with
    /// `codes` one byte per block packed into i32 words ([`crate::nf4::bytes_to_words`]),
    /// `nested_absmax` f32 `[ceil(n_blocks / 256)]` and `map` the f32 dynamic map `[256]`.
    Double {
        codes: &'a I,
        nested_absmax: &'a T,
        map: &'a T,
        offset: f32,
    },
}

/// The pad columns [`Backend::dequantize_nf4`] writes after each row of a LoRA-padded weight
/// `W' = [W | pad]` (the layout [`Backend::place_block`] writes for a dense one): pad column `j`
/// (`j < ld − cols`) of row `i` holds `B[i, j − block.start]` for `j ∈ block` and 0 otherwise,
/// with `B [rows, len(block)]` in its tensor as `b_at` says, of `out`'s dtype. A member's B in its
/// own block, zeros in the other members' blocks.
#[derive(Clone, Debug)]
pub struct LoraPad<'a, T> {
    pub b: &'a T,
    pub b_at: MatAt,
    pub block: Range<usize>,
}

/// One [`Backend::place_block`] of a [`Backend::place_blocks`] batch: `src [rows, len(block)]`
/// into columns `block` of `dst [rows, width]`, the other columns of the width zeroed.
#[derive(Debug)]
pub struct Placement<'a, T> {
    pub rows: usize,
    pub width: usize,
    pub block: Range<usize>,
    pub src: (&'a T, MatAt),
    pub dst: (&'a mut T, MatAt),
}

/// Where a row-major matrix operand of [`Backend::gemm_at`] or [`Backend::place_block`] lies in
/// its tensor: row `i` starts at element `offset + i · ld` (`ld` at least the stored row's length).
/// LoRA's products read and write column blocks of a wider matrix this way (`t_q` of
/// `t = x [A_q; A_k; A_v]ᵀ`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatAt {
    pub offset: usize,
    pub ld: usize,
}

impl MatAt {
    /// A whole tensor holding a dense matrix whose rows are `cols` long.
    pub fn dense(cols: usize) -> Self {
        MatAt {
            offset: 0,
            ld: cols,
        }
    }

    /// The layouts of a product's A, B and C when each is a whole dense tensor.
    pub fn dense_operands(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> [Self; 3] {
        [
            MatAt::dense(if trans_a { m } else { k }),
            MatAt::dense(if trans_b { k } else { n }),
            MatAt::dense(n),
        ]
    }

    /// Rows `ld` apart, the first at `offset`.
    pub fn at(offset: usize, ld: usize) -> Self {
        MatAt { offset, ld }
    }

    /// Elements a `rows × cols` matrix laid out this way reaches into its tensor: one past the
    /// last element (0 for an empty matrix).
    pub fn extent(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            self.offset + (rows - 1) * self.ld + cols
        }
    }

    /// Checks that a `rows × cols` matrix laid out this way fits a tensor of `len` elements.
    pub fn check(
        self,
        op: &'static str,
        what: &'static str,
        rows: usize,
        cols: usize,
        len: usize,
    ) -> Result<()> {
        if (rows > 1 && self.ld < cols) || self.extent(rows, cols) > len {
            return Err(crate::KernelError::Layout {
                op,
                what,
                rows,
                cols,
                offset: self.offset,
                ld: self.ld,
                len,
            });
        }
        Ok(())
    }
}

/// Checks [`Backend::gemm_at`]'s three operands against their tensors' lengths.
pub(crate) fn check_gemm_at(
    (m, n, k): (usize, usize, usize),
    (a_at, trans_a, a_len): (MatAt, bool, usize),
    (b_at, trans_b, b_len): (MatAt, bool, usize),
    (c_at, c_len): (MatAt, usize),
) -> Result<()> {
    let stored = |rows, cols, trans| if trans { (cols, rows) } else { (rows, cols) };
    let (ar, ac) = stored(m, k, trans_a);
    let (br, bc) = stored(k, n, trans_b);
    a_at.check("gemm", "A", ar, ac, a_len)?;
    b_at.check("gemm", "B", br, bc, b_len)?;
    c_at.check("gemm", "C", m, n, c_len)
}

/// Checks [`Backend::copy_many_into`]'s places: one per source, each inside `dst_len` elements.
pub(crate) fn check_copy_places(
    src_lens: impl ExactSizeIterator<Item = usize>,
    at: &[usize],
    dst_len: usize,
) -> Result<()> {
    check_len("copy_many_into", "offsets", at.len(), src_lens.len())?;
    for (len, &start) in src_lens.zip(at) {
        MatAt::at(start, len).check("copy_many_into", "src", 1, len, dst_len)?;
    }
    Ok(())
}

/// Checks [`Backend::place_block`]'s block (inside the `width` columns) and its two matrices
/// against their tensors' lengths.
pub(crate) fn check_place_block(
    rows: usize,
    width: usize,
    block: &Range<usize>,
    (src_at, src_len): (MatAt, usize),
    (dst_at, dst_len): (MatAt, usize),
) -> Result<()> {
    check_block_inside(block, width, || {
        format!("place_block: block {block:?} is not a column range inside the width {width}")
    })?;
    src_at.check("place_block", "src", rows, block.len(), src_len)?;
    dst_at.check("place_block", "dst", rows, width, dst_len)
}

/// Checks [`Backend::dequantize_nf4`]'s output rows (`cols ≥ 1` elements each, `ld ≥ cols` apart,
/// `len` a whole number of them) and returns the weight's element count `n = rows · cols`.
pub(crate) fn nf4_out_elements(cols: usize, ld: usize, len: usize) -> Result<usize> {
    if cols == 0 {
        return Err(crate::KernelError::Unsupported(
            "dequantize_nf4: cols is 0; every row of the weight holds at least one element".into(),
        ));
    }
    check_row_stride("dequantize_nf4", "out", cols, ld)?;
    if !len.is_multiple_of(ld) {
        return Err(crate::KernelError::Shape {
            op: "dequantize_nf4",
            what: "out (whole rows `ld` apart)",
            got: len,
            expected: len.next_multiple_of(ld),
        });
    }
    Ok(len / ld * cols)
}

/// Checks [`Backend::dequantize_nf4`]'s [`LoraPad`] against `rows` rows of `cols` elements `ld`
/// apart (checked by [`nf4_out_elements`]): the rows have pad columns, the block lies inside
/// them, and B `[rows, len(block)]` inside its tensor of `b_len` elements.
pub(crate) fn check_lora_pad(
    (rows, cols, ld): (usize, usize, usize),
    block: &Range<usize>,
    (b_at, b_len): (MatAt, usize),
) -> Result<()> {
    if ld == cols {
        return Err(crate::KernelError::Unsupported(format!(
            "dequantize_nf4: a LoRA pad was given but the rows have no pad columns (ld = cols = \
             {cols}); pass no pad for the dense weight, or rows ld > cols apart"
        )));
    }
    let width = ld - cols;
    check_block_inside(block, width, || {
        format!(
            "dequantize_nf4: pad block {block:?} is not a column range inside the pad's {width} \
             columns (ld - cols)"
        )
    })?;
    b_at.check("dequantize_nf4", "pad B", rows, block.len(), b_len)
}

/// A column block `start..end` inside `width` columns, else the error `message` says.
fn check_block_inside(
    block: &Range<usize>,
    width: usize,
    message: impl FnOnce() -> String,
) -> Result<()> {
    match block.start <= block.end && block.end <= width {
        true => Ok(()),
        false => Err(crate::KernelError::Unsupported(message())),
    }
}

/// Checks [`Backend::gemm_residual`]'s `residual` and `out`: dense `[m, n]` each.
pub(crate) fn check_gemm_residual(
    (m, n): (usize, usize),
    residual_len: usize,
    out_len: usize,
) -> Result<()> {
    check_len("gemm_residual", "residual", residual_len, m * n)?;
    check_len("gemm_residual", "out", out_len, m * n)
}

/// The ops a Llama/Mistral decoder needs for LoRA training, each with an explicit backward.
///
/// Conventions: matrices are row-major; `N` is the number of tokens in the batch
/// (rows × seq_len); activations are `[N, features]`; projection weights are `[out, in]` as in
/// Hugging Face checkpoints. Tensors are flat buffers: shapes travel as arguments and each
/// backend checks lengths. Outputs are written, except where a doc says "adds into".
pub trait Backend {
    /// A flat device buffer of f32, bf16 or f16 values.
    type Tensor;
    /// A flat device buffer of i32 (token ids, labels, positions, document starts).
    type Indices;
    /// Tensors moved out of device memory by [`Backend::park`] (checkpoint offload).
    type Parked;

    /// A name for logs: `cpu (f32, 2 threads)`, `cuda:0 NVIDIA H200 (bf16)`.
    fn describe(&self) -> String;
    /// The dtype activations and frozen weights are stored in.
    fn compute_dtype(&self) -> DType;
    /// The most device memory the backend has held at once so far, in bytes (`None` on the CPU).
    fn peak_memory_bytes(&self) -> Option<u64>;
    /// Seconds the host has spent blocked in [`Backend::download`] waiting for the device's
    /// queued work, since the backend was made (0 on the CPU, where nothing is queued): a step's
    /// share of it against the step's time says whether the device waits for the host.
    fn host_wait_s(&self) -> f64 {
        0.0
    }
    /// The most device memory the driver's stream-ordered allocator has reserved for the
    /// backend's buffers (its own rounding and fragmentation included), in bytes: the honest
    /// counterpart of [`Backend::peak_memory_bytes`] (`None` on the CPU).
    fn reserved_peak_bytes(&self) -> Option<u64> {
        None
    }
    /// Device memory free now, in bytes, outside what the backend's pool holds (`None` on the
    /// CPU, and where no device answers).
    fn free_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// Hands the buffers the backend's pool keeps for reuse back to the device, once every queued
    /// op is done (before something large that the pool's cached sizes cannot hold; nothing on the
    /// CPU).
    fn release_cached(&self) -> Result<()> {
        Ok(())
    }
    /// Picks, for every matrix-product shape [`Backend::gemm`] has run since the last call, the
    /// fastest of the library's algorithms on this device, by timing them on scratch operands
    /// (the same product in f32 accumulation; the order of its k-sum may differ). Call it where
    /// the step's activations are freed. Nothing on the CPU.
    fn tune(&self) -> Result<()> {
        Ok(())
    }
    /// Starts timing every op on the device (the CPU backend times nothing).
    fn profile_start(&self) {}
    /// Ends the region begun by [`Backend::profile_start`]: the device time per op, largest first
    /// (empty on the CPU).
    fn profile_stop(&self) -> Result<Vec<OpTime>> {
        Ok(Vec::new())
    }

    // ---- memory -------------------------------------------------------------------------------
    /// A zero-filled tensor of `len` elements.
    fn zeros(&self, len: usize, dtype: DType) -> Result<Self::Tensor>;
    /// A tensor of `len` elements with unspecified contents, for an output the next op writes in
    /// full (GEMMs with `beta = 0`, norms, activations): no fill pass over memory. The default
    /// zero-fills.
    fn empty(&self, len: usize, dtype: DType) -> Result<Self::Tensor> {
        self.zeros(len, dtype)
    }
    /// Copies host f32 values to a new tensor, rounding to `dtype`.
    fn upload(&self, data: &[f32], dtype: DType) -> Result<Self::Tensor>;
    /// Copies 16-bit values as a checkpoint stores them (`stored`: bf16 or f16 bits) to a new
    /// tensor in `dtype`: widened exactly, then rounded as [`Backend::upload`] rounds — so the
    /// result is `upload` of the widened values. The default widens on the host; the CUDA backend
    /// copies the bits as they are when `dtype == stored` (a 7B checkpoint is 13.5 GB of them).
    fn upload_16bit(&self, bits: &[u16], stored: DType, dtype: DType) -> Result<Self::Tensor> {
        self.upload(&crate::widen_16bit(bits, stored), dtype)
    }
    /// Copies a tensor back to the host as f32.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Copies host indices to the device.
    fn upload_indices(&self, data: &[i32]) -> Result<Self::Indices>;
    /// Number of elements.
    fn len(&self, t: &Self::Tensor) -> usize;
    /// `dst ← src`, converting dtype (f32 master weights → compute dtype copies).
    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor) -> Result<()>;
    /// `dst[at[i] .. at[i] + len(src[i])] ← src[i]` for every i, converting dtype: the LoRA
    /// compute copies, which share one tensor (the model's, or one layer's part of it). The CUDA
    /// backend does f32 → one dtype in one launch.
    fn copy_many_into(
        &self,
        src: &[Self::Tensor],
        dst: &mut Self::Tensor,
        at: &[usize],
    ) -> Result<()>;
    /// `t ← 0`.
    fn fill_zero(&self, t: &mut Self::Tensor) -> Result<()>;
    /// `t ← 0` for every tensor of `ts`: all LoRA gradients at the start of a step. The CUDA
    /// backend zeroes f32 tensors in one launch (448 memsets a step at 7B otherwise).
    fn fill_zero_many(&self, ts: &mut [Self::Tensor]) -> Result<()> {
        for t in ts {
            self.fill_zero(t)?;
        }
        Ok(())
    }
    /// Moves the tensors `ts` (one layer's checkpoint) to host memory as one group (no arithmetic:
    /// their elements cross the host link once each way between `park` and [`Backend::unpark`]).
    /// The device copies are freed once the transfer is done, without the device waiting for it:
    /// the CUDA backend copies on a second stream, overlapped with the ops queued after this call.
    /// The CPU backend keeps the tensors as they are. `lane` says who parks ([`ParkLane`]): a
    /// call releases only its own lane's earlier parks and what was parked before them.
    fn park(&self, ts: Vec<Self::Tensor>, lane: ParkLane) -> Result<Self::Parked>;
    /// Starts bringing `p` back to the device, so that the copy overlaps the ops queued before the
    /// matching [`Backend::unpark`]. Optional: `unpark` fetches what was not prefetched.
    fn prefetch(&self, p: &mut Self::Parked) -> Result<()>;
    /// The parked tensors on the device again, in the order given to `park`, with their values
    /// bit for bit, ready for every op queued after this call.
    fn unpark(&self, p: Self::Parked) -> Result<Vec<Self::Tensor>>;
    /// `t[i] ← scale · (2u − 1)` with `u ∈ [0, 1)` a pure function of `(seed, i)`
    /// (splitmix64, see `cuda/random.cu`): uniform on `[−scale, scale)`, the same values on every
    /// backend up to rounding to the tensor's dtype. Random weights for benchmarks, made in place.
    fn fill_random(&self, t: &mut Self::Tensor, seed: u64, scale: f32) -> Result<()>;
    /// `dst ← dst + alpha · src`: [`Backend::axpy_from`] at offset 0, lengths equal.
    fn axpy(&self, alpha: f32, src: &Self::Tensor, dst: &mut Self::Tensor) -> Result<()> {
        check_len("axpy", "dst", self.len(dst), self.len(src))?;
        self.axpy_from(alpha, (src, 0), dst)
    }
    /// `dst[i] ← dst[i] + alpha · src[offset + i]` for every `i < len(dst)`: one block of a
    /// stacked result added into its own tensor (an input group's `dA`, one product for all its
    /// members, into each member's gradient).
    fn axpy_from(
        &self,
        alpha: f32,
        src: (&Self::Tensor, usize),
        dst: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`Backend::axpy_from`] for each `(offset, dst)`: `dst[i] ← dst[i] + alpha · src[offset + i]`,
    /// every `dst` a tensor of its own. An input group's stacked `dA` added into each member's
    /// gradient (one launch on the GPU where all are f32, 5 a layer otherwise).
    fn axpy_from_many(
        &self,
        alpha: f32,
        src: &Self::Tensor,
        dsts: &mut [(usize, &mut Self::Tensor)],
    ) -> Result<()> {
        for (offset, dst) in dsts {
            self.axpy_from(alpha, (src, *offset), dst)?;
        }
        Ok(())
    }
    /// `t ← alpha · t`.
    fn scale(&self, alpha: f32, t: &mut Self::Tensor) -> Result<()>;
    /// `out[r, :] ← row` for every row of `out [rows, len(row)]`: a linear layer's bias, laid down
    /// before its GEMM accumulates `x Wᵀ` onto it (`y = b + x Wᵀ`, torch's `addmm` order). The
    /// biases are frozen and `dx` does not depend on them, so the op has no backward.
    fn broadcast_rows(&self, row: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;
    /// `dst[i, j] ← src[i, j − block.start]` for `j ∈ block` and `dst[i, j] ← 0` for the other
    /// `j < width`, for every row `i < rows`; each matrix inside its tensor as a [`MatAt`], src
    /// `[rows, len(block)]` and dst `[rows, width]`, both of one dtype. A LoRA B `[out, r]` written
    /// into its block of a padded weight's pad columns (the other members' blocks zeroed), and pad
    /// columns copied out to a dense tensor or back (`block = 0..width`).
    fn place_block(
        &self,
        rows: usize,
        width: usize,
        block: Range<usize>,
        src: (&Self::Tensor, MatAt),
        dst: (&mut Self::Tensor, MatAt),
    ) -> Result<()>;
    /// [`Backend::place_block`] for each placement, every `dst` a tensor of its own and all of
    /// one dtype: a layer's LoRA B blocks written into its folded weights' pads after an update
    /// (one launch on the GPU, where each of the ~5 a layer is a launch-bound few hundred KiB).
    fn place_blocks(&self, placements: &mut [Placement<'_, Self::Tensor>]) -> Result<()> {
        for p in placements {
            let (src, src_at) = p.src;
            let (dst, dst_at) = (&mut *p.dst.0, p.dst.1);
            self.place_block(
                p.rows,
                p.width,
                p.block.clone(),
                (src, src_at),
                (dst, dst_at),
            )?;
        }
        Ok(())
    }

    // ---- matrix product -----------------------------------------------------------------------
    /// `C[m,n] ← alpha · op(A) · op(B) + beta · C` with fp32 accumulation, each operand a matrix
    /// inside its tensor ([`MatAt`]: the element row 0 starts at, and the distance between rows).
    /// `op(A)` is `[m,k]`: A is stored `[m,k]`, or `[k,m]` when `trans_a`. `op(B)` is `[k,n]`:
    /// B is stored `[k,n]`, or `[n,k]` when `trans_b` (so `y = x Wᵀ` is `trans_b = true`).
    /// C may have another dtype than A and B (bf16 inputs accumulating into f32 LoRA grads).
    /// C must not overlap A or B.
    #[allow(clippy::too_many_arguments)]
    fn gemm_at(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (&Self::Tensor, MatAt),
        trans_a: bool,
        b: (&Self::Tensor, MatAt),
        trans_b: bool,
        beta: f32,
        c: (&mut Self::Tensor, MatAt),
    ) -> Result<()>;

    /// `out[m,n] ← alpha · op(A) · op(B) + residual`, `out` and `residual` dense `[m, n]` of one
    /// dtype (A and B as in [`Backend::gemm_at`]): a product that lands on a residual stream
    /// (`h = x + y`, the o and down projections), where the product's epilogue reads `residual`
    /// instead of `out` being written, read again and added to in a pass of its own. Rounded once
    /// from `residual + A·B` in f32. This default copies `residual` into `out` and accumulates.
    #[allow(clippy::too_many_arguments)]
    fn gemm_residual(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (&Self::Tensor, MatAt),
        trans_a: bool,
        b: (&Self::Tensor, MatAt),
        trans_b: bool,
        residual: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check_gemm_residual((m, n), self.len(residual), self.len(out))?;
        self.copy(residual, out)?;
        let out_at = MatAt::dense(n);
        self.gemm_at(m, n, k, alpha, a, trans_a, b, trans_b, 1.0, (out, out_at))
    }

    /// [`Backend::gemm_at`] on whole tensors, each a dense row-major matrix.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Self::Tensor,
        trans_a: bool,
        b: &Self::Tensor,
        trans_b: bool,
        beta: f32,
        c: &mut Self::Tensor,
    ) -> Result<()> {
        check_len("gemm", "A", self.len(a), m * k)?;
        check_len("gemm", "B", self.len(b), k * n)?;
        check_len("gemm", "C", self.len(c), m * n)?;
        let [a_at, b_at, c_at] = MatAt::dense_operands(m, n, k, trans_a, trans_b);
        self.gemm_at(
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

    /// LoRA's two backward products with a projection's output gradient `dy [n, out]` (dense),
    /// added into f32 accumulators:
    /// `dB [out, r] += dyᵀ · t`  and  `u [n, r] += dy · B`,
    /// with `t [n, r]` (one member's columns of `t = s · x A_gᵀ`), `B [out, r]` (the adapter's, in
    /// the compute copies) and `u` matrices inside their tensors ([`MatAt`]), `dB` a dense f32
    /// tensor and `u`'s tensor f32; `dy`, `t` and `B` share a dtype. The CUDA backend reads `dy`
    /// once for both (`cuda/lora_dy.cu`; bf16/f16 on compute capability 8.0+, aligned operands);
    /// the default, which the CPU backend runs, is the two products through [`Backend::gemm_at`]
    /// with `beta = 1` (`crate::lora_dy`). The sums' order differs between the two: equal up to
    /// f32 rounding.
    #[allow(clippy::too_many_arguments)]
    fn lora_dy_products(
        &self,
        n: usize,
        out: usize,
        r: usize,
        dy: &Self::Tensor,
        t: (&Self::Tensor, MatAt),
        b: (&Self::Tensor, MatAt),
        db: &mut Self::Tensor,
        u: (&mut Self::Tensor, MatAt),
    ) -> Result<()> {
        crate::lora_dy::as_two_products(self, n, out, r, dy, t, b, db, u)
    }

    // ---- layers ---------------------------------------------------------------------------------
    /// `out[i,:] ← table[ids[i],:]`; table `[vocab, hidden]`, out `[N, hidden]`.
    fn embedding(
        &self,
        table: &Self::Tensor,
        ids: &Self::Indices,
        hidden: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`Backend::embedding`] from a table parked in host memory (one `[vocab, hidden]` tensor
    /// given to [`Backend::park`]): `out[i,:] ← table[ids[i],:]`, the rows read from host memory
    /// (CUDA: by the gather kernel, across the host link), so the table takes no device memory.
    fn embedding_from_host(
        &self,
        table: &Self::Parked,
        ids: &Self::Indices,
        hidden: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// RMSNorm: `y = w ⊙ x · r`, `r = 1/sqrt(mean(x²) + eps)` per row; saves `rstd[N] = r` (f32).
    /// `x` is `[N, hidden]` with `N = len(rstd)`; `y` holds its N rows `y_ld ≥ hidden` apart
    /// (`len(y) = N · y_ld`) and only their columns `0..hidden` are written, so `y_ld > hidden`
    /// leaves pad columns beside the norm for another op (LoRA's `x' = [x | s·t]`).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        hidden: usize,
        eps: f32,
        y: &mut Self::Tensor,
        y_ld: usize,
        rstd: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`Backend::rms_norm`] with `y`'s pad columns filled too: `y[i, hidden..y_ld] ←
    /// beside[i, ..]` for `beside [N, y_ld − hidden]` (dense), in the same launch on the GPU. A
    /// recomputed layer's norm writes the LoRA `t` its checkpoint kept beside its rows, where a
    /// [`Backend::place_block`] launch would follow the norm.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_beside(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        hidden: usize,
        eps: f32,
        (y, y_ld): (&mut Self::Tensor, usize),
        beside: &Self::Tensor,
        rstd: &mut Self::Tensor,
    ) -> Result<()> {
        self.rms_norm(x, w, hidden, eps, y, y_ld, rstd)?;
        let (rows, width) = (self.len(rstd), y_ld.saturating_sub(hidden));
        self.place_block(
            rows,
            width,
            0..width,
            (beside, MatAt::dense(width)),
            (y, MatAt::at(hidden, y_ld)),
        )
    }
    /// RMSNorm backward, adding into `dx`: `dx += r · (w⊙dy − x̂ · mean(w⊙dy ⊙ x̂))`, `x̂ = x·r`;
    /// `dy`, `x` and `dx` are `[N, hidden]`, `N = len(rstd)`.
    /// The norm weight is frozen, so it gets no gradient.
    fn rms_norm_backward(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        rstd: &Self::Tensor,
        hidden: usize,
        dx: &mut Self::Tensor,
    ) -> Result<()>;

    /// Rotary embedding in place on `x [N, heads, head_dim]` ("rotate-half" layout):
    /// `x' = x·cos + rotate_half(x)·sin` with angles from `cos/sin [positions, head_dim/2]` (f32)
    /// at each token's position. `inverse` rotates by the negative angle — the backward pass,
    /// since a rotation's transpose is its inverse.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Tensor,
        positions: &Self::Indices,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;

    /// Causal self-attention: `q [N, hq, d]`, `k, v [N, hkv, d]` (query head j reads kv head
    /// `j / (hq/hkv)`), `out [N, hq, d]`, `lse [N, hq]` f32 = log-sum-exp of each query's scaled
    /// scores (saved for backward). Masking follows `layout` (held on the device as `doc_start`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        layout: &AttentionLayout,
        doc_start: &Self::Indices,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
    ) -> Result<()>;
    /// Attention backward: `dq [N, hq, d]`, `dk, dv [N, hkv, d]` from `dout` and the forward's
    /// `out` and `lse` (FlashAttention-2's: `D_i = dout_i · out_i` first, then the products).
    /// `out` is taken: nothing reads it after the `D_i`, so its buffer goes back to the pool
    /// before the gradients are made and one of them reuses it (at a 7B layer's backward, the
    /// one that sets the step's peak, that is 32 MiB less). Given `unrotate_dq` (RoPE's tables
    /// of the forward), `dq` is also rotated back — `rope(dq, .., inverse = true)`, the gradient
    /// of q before RoPE — in the pass that rounds the CUDA backend's f32 dq accumulator.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: Self::Tensor,
        lse: &Self::Tensor,
        dout: &Self::Tensor,
        layout: &AttentionLayout,
        doc_start: &Self::Indices,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        unrotate_dq: Option<Rotation<'_, Self::Indices, Self::Tensor>>,
    ) -> Result<QkvGrads<Self::Tensor>>;

    /// Writes `new` tokens per row of `src [rows, new, width]` into the cache
    /// `cache [rows, capacity, width]` at columns `at..at+new` (the KV cache of generation).
    #[allow(clippy::too_many_arguments)]
    fn write_cache(
        &self,
        src: &Self::Tensor,
        cache: &mut Self::Tensor,
        rows: usize,
        new: usize,
        capacity: usize,
        width: usize,
        at: usize,
    ) -> Result<()>;

    /// Attention of `new` query tokens per row against a KV cache (generation, forward only):
    /// `q [rows, new, hq, d]`, caches `[rows, capacity, hkv, d]` holding `filled` valid columns per
    /// row, the queries being the last `new` of them. Query column `c` sees key columns
    /// `max(first_key[row], c − W + 1) ..= c` (`first_key` skips left padding; `W` the window).
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        first_key: &Self::Indices,
        rows: usize,
        new: usize,
        filled: usize,
        capacity: usize,
        window: Option<usize>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// SwiGLU: `out = silu(gate) ⊙ up`, all `[N, inter]`.
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;
    /// SwiGLU backward in place (the forward's `gate` and `up` are read and overwritten, so the
    /// MLP's backward holds no second pair of `[N, inter]` buffers):
    /// `gate ← dout ⊙ up ⊙ silu'(gate)`, `up ← dout ⊙ silu(gate)`, and `dout ← silu(gate) ⊙ up`,
    /// the forward's output bit for bit ([`Backend::swiglu`]'s arithmetic), so that a backward
    /// that still needs it (the down projection's `dA` reads it) neither keeps nor recomputes it.
    fn swiglu_backward(
        &self,
        dout: &mut Self::Tensor,
        gate: &mut Self::Tensor,
        up: &mut Self::Tensor,
    ) -> Result<()>;

    /// Fused LM head + cross-entropy over `rows` tokens, chunked so the full `[rows, vocab]` logits
    /// never exist at once: `logp[r] = log_softmax(hidden[r] · Wᵀ)[targets[r]]` (f32, 0 where the
    /// target is [`IGNORE_INDEX`]). With a gradient request, writes
    /// `dhidden = Σ_r weight[r] · (softmax_r − onehot_r) · W` (the gradient of `−Σ weight·logp`).
    #[allow(clippy::too_many_arguments)]
    fn lm_head_cross_entropy(
        &self,
        hidden: &Self::Tensor,
        weight: &Self::Tensor,
        targets: &Self::Indices,
        rows: usize,
        hidden_dim: usize,
        vocab: usize,
        grad: CeGrad<'_, Self::Tensor>,
        logp: &mut Self::Tensor,
        dhidden: Option<&mut Self::Tensor>,
    ) -> Result<()>;

    // ---- quantized weights ----------------------------------------------------------------------
    /// NF4 quantization (bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64)`) of `x`, any
    /// dtype, read as the f32 values it holds; bit for bit [`crate::nf4::Nf4Weight::quantize`]:
    /// `absmax[b] = max |x|` over each 64-element block, `code = #{j : m[j] < clamp(x · f32(1/a),
    /// −1, 1)}` with `a = max(absmax, 1e−38)` and `m` the 15 midpoints of the NF4 table, codes
    /// packed two per byte (element `2k` high); with `double_quant` the absmax is stored in 8 bits
    /// around `offset = f32(mean)` through bitsandbytes' grid ([`crate::nf4::double_quant`]).
    fn quantize_nf4(
        &self,
        x: &Self::Tensor,
        double_quant: bool,
    ) -> Result<Nf4Buffers<Self::Tensor, Self::Indices>>;
    /// NF4 dequantization (bitsandbytes, blocksize 64) of a weight of `n = rows · cols` elements
    /// into rows `ld ≥ cols` apart: `out` holds `rows = len(out) / ld` of them, and
    /// `out[(i / cols) · ld + i % cols] = c[code[i]] · A[i / 64]` for `i < n`, with `c` the NF4
    /// table and the 4-bit codes packed two per byte, element `2k` in the high nibble, the bytes in
    /// i32 words ([`crate::nf4::bytes_to_words`]); `cols = ld` is the dense `[rows, cols]` weight.
    /// Columns `cols..ld` of a LoRA-padded weight `W' = [W | pad]` are written as `pad` says
    /// ([`LoraPad`]: `out[i · ld + cols + j] = B[i, j − block.start]` for `j ∈ block`, 0 for the
    /// other `j < ld − cols`; only with `ld > cols`), or left as they are without one.
    /// Products are single f32 roundings, so an f32 `out` holds exactly [`crate::nf4::dequantize`]'s bits.
    fn dequantize_nf4(
        &self,
        packed: &Self::Indices,
        absmax: Nf4Absmax<'_, Self::Tensor, Self::Indices>,
        cols: usize,
        ld: usize,
        pad: Option<LoraPad<'_, Self::Tensor>>,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    // ---- optimizer ------------------------------------------------------------------------------
    /// Whether every element of every tensor is finite (no NaN, no ±inf): the overflow check of
    /// fp16 dynamic loss scaling.
    fn all_finite(&self, tensors: &[Self::Tensor]) -> Result<bool>;
    /// `Σ x²` over all tensors together (for global-norm clipping), accumulated in f64 on the host side.
    fn sum_of_squares(&self, tensors: &[Self::Tensor]) -> Result<f64>;
    /// One `torch.optim.AdamW` step (step number `step` ≥ 1) on every tensor, with the gradient
    /// first multiplied by `grad_scale` (the clip coefficient):
    /// `p ← p(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;`
    /// `p ← p − lr · (m/(1−β1ᵗ)) / (sqrt(v/(1−β2ᵗ)) + eps)`; then what `after` asks for.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        params: &mut [Self::Tensor],
        grads: &mut [Self::Tensor],
        m: &mut [Self::Tensor],
        v: &mut [Self::Tensor],
        hp: &AdamWParams,
        step: u64,
        grad_scale: f32,
        after: AfterUpdate<'_, Self::Tensor>,
    ) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fewest chunks within the logits budget, the rows shared out evenly among them.
    #[test]
    fn lm_head_chunks_are_the_fewest_and_even() {
        assert_eq!(lm_head_chunk_rows(4096, 32000), 512, "7B, b2 × 2048");
        assert_eq!(lm_head_chunk_rows(1024, 49152), 256, "SmolLM2, b2 × 512");
        assert_eq!(lm_head_chunk_rows(100, 32000), 100, "within one chunk");
        assert_eq!(lm_head_chunk_rows(0, 32000), 1);
        assert_eq!(lm_head_chunk_rows(3, LM_HEAD_CHUNK_ELEMENTS * 2), 1);
        for rows in [1, 7, 523, 524, 525, 4096, 10_000] {
            for vocab in [1000, 32000, 49152, 151_936] {
                let chunk = lm_head_chunk_rows(rows, vocab);
                let most = LM_HEAD_CHUNK_ELEMENTS / vocab;
                assert!(
                    chunk <= most,
                    "{rows} × {vocab}: {chunk} rows over the budget"
                );
                assert_eq!(
                    rows.div_ceil(chunk),
                    rows.div_ceil(most),
                    "{rows} × {vocab}"
                );
                let last = rows - (rows.div_ceil(chunk) - 1) * chunk;
                assert!(
                    chunk - last < rows.div_ceil(chunk),
                    "{rows} × {vocab}: uneven"
                );
            }
        }
    }
}
