//! The CUDA backend: bf16/fp16 compute with fp32 accumulation (or f32 throughout, for checks),
//! cuBLAS GEMMs and the CUDA C kernels of `kernels/cuda/`, compiled by NVRTC at start for the
//! device's architecture. Everything runs in order on one stream; tensors come from a caching pool.
//!
//! CUDA libraries are loaded at run time (cudarc's dynamic loading): the binary builds without
//! CUDA and finds libcuda, libcublas and libnvrtc through the loader's search path or, failing
//! that, in the Python environment's NVIDIA wheels (`libraries`). The bindings' CUDA version is a
//! build-time choice (see kernels/README.md): 13.0 by default, 12.x with `CUDARC_CUDA_VERSION=12080`.

mod attention;
pub mod compile;
mod event_timing;
mod gemm;
mod gemm_tuning;
mod generation;
mod launch;
pub mod libraries;
mod lm_head;
mod lora_dy;
mod nf4;
mod offload;
mod optimizer;
mod profiler;
mod tensor;

pub use offload::CudaParked;
pub use tensor::{CudaIndices, CudaTensor};

use crate::backend::{check_gemm_at, check_gemm_residual, check_place_block};
use crate::error::{check_block_in_src, check_len, check_rows, check_strided_rows};
use crate::{
    AdamWParams, AfterUpdate, AttentionLayout, Backend, CeGrad, DType, KernelError, LoraPad, MatAt,
    Nf4Absmax, OpTime, ParkLane, Placement, QkvGrads, Result, Rotation,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nvrtc::Ptx;
use gemm::Operand;
use launch::{blocks_for, blocks_for_chunks_of_8, Arg, Kernels};
use profiler::Profiler;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use tensor::{Pool, Storage};

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Copies of offloaded checkpoints (offload.rs), beside the compute stream.
    copy_stream: Arc<CudaStream>,
    /// Host → device copies of parked tensors, so that they run alongside the device → host ones.
    fetch_stream: Arc<CudaStream>,
    offload: offload::Offload,
    blas: CudaBlas,
    kernels: Kernels,
    pool: Arc<Pool>,
    dtype: DType,
    device_name: String,
    compute_capability: (i32, i32),
    attention_kernels: attention::AttentionKernels,
    /// Shared memory one block may opt into (bytes): which attention kernels fit.
    max_shared_per_block: usize,
    /// Streaming multiprocessors: the fused LoRA products size their grid from it (lora_dy.rs).
    multiprocessors: usize,
    /// Each matrix product shape's algorithm (gemm_tuning.rs).
    tuner: gemm_tuning::Tuner,
    profiler: Profiler,
    /// Nanoseconds the host has waited in downloads ([`crate::Backend::host_wait_s`]).
    host_wait_ns: std::sync::atomic::AtomicU64,
}

pub(crate) fn device_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Device {
        op,
        message: format!("{e:?}"),
    }
}

/// The dtype suffix of kernel names.
pub(crate) fn suffix(d: DType) -> &'static str {
    d.name()
}

impl CudaBackend {
    /// Opens device `device_ordinal` (the rank's local GPU), compiles or loads the kernels for its
    /// architecture and computes in `dtype`: bf16 needs compute capability 8.0+, f16 runs on 7.0+,
    /// f32 everywhere.
    pub fn new(device_ordinal: usize, dtype: DType) -> Result<Self> {
        let libraries = libraries::load()?;
        let ctx = CudaContext::new(device_ordinal).map_err(device_err("open device"))?;
        // One stream: ordering is the stream's, so per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let copy_stream = ctx.new_stream().map_err(device_err("create copy stream"))?;
        let fetch_stream = ctx
            .new_stream()
            .map_err(device_err("create fetch stream"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(device_err("compute capability"))?;
        let device_name = ctx.name().map_err(device_err("device name"))?;
        let max_shared_per_block = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(device_err("shared memory per block"))? as usize;
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device_err("multiprocessor count"))? as usize;
        if dtype == DType::BF16 && compute_capability.0 < 8 {
            return Err(KernelError::Unsupported(format!(
                "{device_name} (compute capability {}.{}) has no bf16 tensor cores; use dtype = \"f16\" \
                 (with loss scaling) or \"f32\"",
                compute_capability.0, compute_capability.1
            )));
        }
        let arch = (compute_capability.0 * 10 + compute_capability.1) as u32;
        let mut functions = HashMap::new();
        for source in compile::KERNEL_SOURCES {
            let ptx = compile::cached_ptx(source, arch)?;
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                let mut message = format!("{e:?}");
                if let Some(problem) = libraries.ptx_version_problem() {
                    message = format!("{message}: {problem}");
                }
                KernelError::Device {
                    op: "load kernel module",
                    message,
                }
            })?;
            for name in (source.entry_points)() {
                let f = module
                    .load_function(&name)
                    .map_err(device_err("load kernel"))?;
                functions.insert(name, f);
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Device {
            op: "cublas init",
            message: format!("{e:?}"),
        })?;
        let backend = CudaBackend {
            ctx,
            stream,
            copy_stream,
            fetch_stream,
            offload: offload::Offload::default(),
            blas,
            kernels: Kernels { functions },
            pool: Arc::new(Pool::default()),
            dtype,
            device_name,
            compute_capability,
            attention_kernels: attention::AttentionKernels::for_device(compute_capability)?,
            max_shared_per_block,
            multiprocessors,
            tuner: gemm_tuning::Tuner::new(gemm_tuning::GemmTuning::from_env()?),
            profiler: Profiler::default(),
            host_wait_ns: Default::default(),
        };
        backend.allow_large_shared_memory()?;
        backend.allow_lora_dy_shared_memory()?;
        Ok(backend)
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The stream every op runs on (for NCCL calls that must be ordered with the ops).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until every queued op has finished, the copies to and from host memory included.
    pub fn synchronize(&self) -> Result<()> {
        for s in [&self.stream, &self.copy_stream, &self.fetch_stream] {
            s.synchronize().map_err(device_err("synchronize"))?;
        }
        Ok(())
    }

    /// A tensor of `len` elements with unspecified contents, from the pool when a buffer fits.
    pub(crate) fn alloc(&self, len: usize, dtype: DType) -> Result<CudaTensor> {
        let is_f32 = dtype == DType::F32;
        let storage = match self.pool.take(is_f32, len) {
            Some(s) => s,
            None => {
                let s = if len == 0 {
                    if is_f32 {
                        Storage::F32(self.stream.null().map_err(device_err("alloc"))?)
                    } else {
                        Storage::Half(self.stream.null().map_err(device_err("alloc"))?)
                    }
                } else if is_f32 {
                    Storage::F32(
                        unsafe { self.stream.alloc::<f32>(len) }.map_err(device_err("alloc"))?,
                    )
                } else {
                    Storage::Half(
                        unsafe { self.stream.alloc::<u16>(len) }.map_err(device_err("alloc"))?,
                    )
                };
                self.pool.count_new(len * if is_f32 { 4 } else { 2 });
                s
            }
        };
        Ok(CudaTensor {
            storage: Some(storage),
            len,
            dtype,
            pool: self.pool.clone(),
        })
    }

    /// A tensor of `len` elements from a buffer the pool has cached, or `None` when none fits
    /// (nothing new is taken from the driver: the held peak stays where it is).
    pub(crate) fn alloc_cached(&self, len: usize, dtype: DType) -> Option<CudaTensor> {
        let storage = self.pool.take(dtype == DType::F32, len)?;
        Some(CudaTensor {
            storage: Some(storage),
            len,
            dtype,
            pool: self.pool.clone(),
        })
    }

    /// An op's own f32 scratch of `len` values (an accumulator, the LM head's logits), passed to
    /// kernels by address only: held in 16-bit storage of `2 · len` elements, so that it reuses
    /// the pool's activation buffers (tensor.rs) instead of raising the peak beside them.
    pub(crate) fn alloc_f32_scratch(&self, len: usize) -> Result<CudaTensor> {
        self.alloc(2 * len, DType::BF16)
    }

    pub(crate) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_counted(name, grid, block, shared, args, || 0.0)
    }

    /// [`CudaBackend::launch`] for a kernel whose floating-point operations the profile counts
    /// (`flops` is evaluated only while profiling).
    pub(crate) fn launch_counted(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
        flops: impl FnOnce() -> f64,
    ) -> Result<()> {
        self.timed(
            || name.to_string(),
            flops,
            || {
                self.kernels
                    .launch(&self.stream, name, grid, block, shared, args)
            },
        )
    }

    /// Runs `op` (which queues work on the stream), timed when profiling is on.
    pub(crate) fn timed(
        &self,
        name: impl FnOnce() -> String,
        flops: impl FnOnce() -> f64,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let timing = self.profiler.begin(&self.ctx, &self.stream)?;
        op()?;
        self.profiler
            .finish(timing, &self.ctx, &self.stream, name, flops)
    }

    /// `src`'s elements, converted to `dtype`, written from device address `dst` on
    /// (`cast_<src>_<dtype>`).
    fn cast_to(&self, src: &CudaTensor, dst: u64, dtype: DType) -> Result<()> {
        let name = format!("cast_{}_{}", suffix(src.dtype), suffix(dtype));
        let n = src.len();
        let args = [self.p(src), Arg::Ptr(dst), Arg::U64(n as u64)];
        self.launch(&name, (blocks_for_chunks_of_8(n), 1, 1), 256, 0, &args)
    }

    /// Checks RoPE's tables for a `[tokens, heads, head_dim]` tensor (the caller checks its
    /// length) and returns the rope kernels' arguments after the tensors (positions, tables,
    /// sizes, sign); `None` when there is nothing to rotate.
    fn rope_tail(
        &self,
        op: &'static str,
        r: &Rotation<'_, CudaIndices, CudaTensor>,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<Option<Vec<Arg>>> {
        let (positions, cos, sin) = (r.positions, r.cos, r.sin);
        self.require_dtype(op, "cos", cos, DType::F32)?;
        self.require_dtype(op, "sin", sin, DType::F32)?;
        let half = head_dim / 2;
        let table_rows = cos.len() / half.max(1);
        if let Some(&p) = positions
            .host(op)?
            .iter()
            .find(|&&p| p < 0 || p as usize >= table_rows)
        {
            return Err(KernelError::Unsupported(format!(
                "{op}: position {p} outside the table of {table_rows} positions"
            )));
        }
        if positions.len() * heads * half == 0 {
            return Ok(None);
        }
        Ok(Some(vec![
            self.pi(positions),
            self.p(cos),
            self.p(sin),
            Arg::I32(positions.len() as i32),
            Arg::I32(heads as i32),
            Arg::I32(head_dim as i32),
            Arg::F32(if inverse { -1.0 } else { 1.0 }),
        ]))
    }

    /// A product's operands as `gemm_raw` takes them, after `check_gemm_at`'s checks.
    fn gemm_operands(
        &self,
        mnk: (usize, usize, usize),
        (a, a_at, trans_a): (&CudaTensor, MatAt, bool),
        (b, b_at, trans_b): (&CudaTensor, MatAt, bool),
        (c, c_at): (&CudaTensor, MatAt),
    ) -> Result<[Operand; 3]> {
        check_gemm_at(
            mnk,
            (a_at, trans_a, a.len()),
            (b_at, trans_b, b.len()),
            (c_at, c.len()),
        )?;
        let operand = |t: &CudaTensor, at: MatAt| Operand {
            ptr: t.ptr(&self.stream) + (at.offset * t.dtype.size_bytes()) as u64,
            dtype: t.dtype,
            ld: at.ld,
        };
        Ok([operand(a, a_at), operand(b, b_at), operand(c, c_at)])
    }

    fn p(&self, t: &CudaTensor) -> Arg {
        Arg::Ptr(t.ptr(&self.stream))
    }

    fn pi(&self, t: &CudaIndices) -> Arg {
        Arg::Ptr(t.ptr(&self.stream))
    }

    fn require_dtype(
        &self,
        op: &'static str,
        what: &str,
        t: &CudaTensor,
        want: DType,
    ) -> Result<()> {
        if t.dtype == want {
            Ok(())
        } else {
            Err(KernelError::Unsupported(format!(
                "{op}: {what} is {}, expected {}",
                t.dtype.name(),
                want.name()
            )))
        }
    }

    /// Launches a batched kernel (`place_blocks_<t>`, `axpy_blocks_f32`) over `copies` copies:
    /// `args`, then the address of `table` uploaded (a row of it per copy), the grid's y the copy
    /// and its x sized for the longest copy (`longest` elements, 8 a thread). Nothing runs when
    /// every copy is empty.
    fn launch_batched(
        &self,
        name: &str,
        args: &[Arg],
        (table, copies): (&[u64], usize),
        longest: usize,
    ) -> Result<()> {
        if longest == 0 {
            return Ok(());
        }
        let table = launch::upload_tables(&self.stream, &[table])?;
        let grid = (blocks_for_chunks_of_8(longest), copies as u32, 1);
        let mut all = args.to_vec();
        all.push(table.arg(0));
        self.launch(name, grid, 256, 0, &all)
    }

    /// [`Backend::rms_norm`], and with `beside` [`Backend::rms_norm_beside`]: one launch.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_launch(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        hidden: usize,
        eps: f32,
        (y, y_ld): (&mut CudaTensor, usize),
        beside: Option<&CudaTensor>,
        rstd: &mut CudaTensor,
    ) -> Result<()> {
        check_len("rms_norm", "w", w.len(), hidden)?;
        check_len("rms_norm", "rstd", rstd.len() * hidden, x.len())?;
        check_strided_rows("rms_norm", "y", (rstd.len(), hidden, y_ld), y.len())?;
        let dt = self.same_dtype("rms_norm", &[("x", x), ("w", w), ("y", y)])?;
        self.require_dtype("rms_norm", "rstd", rstd, DType::F32)?;
        let rows = rstd.len();
        if rows == 0 {
            return Ok(());
        }
        let name = format!("rms_norm_forward_{}", suffix(dt));
        let (grid, threads, rows_per_block) = norm_launch(rows, hidden);
        let args = [
            self.p(x),
            self.p(w),
            self.p(y),
            Arg::I32(y_ld as i32),
            self.p(rstd),
            Arg::I32(rows as i32),
            Arg::I32(rows_per_block as i32),
            Arg::I32(hidden as i32),
            Arg::F32(eps),
            beside.map_or(Arg::Ptr(0), |b| self.p(b)),
        ];
        self.launch(&name, grid, threads, 0, &args)
    }

    fn same_dtype(&self, op: &'static str, tensors: &[(&str, &CudaTensor)]) -> Result<DType> {
        let first = tensors[0].1.dtype;
        for (what, t) in tensors {
            if t.dtype != first {
                return Err(KernelError::Unsupported(format!(
                    "{op}: {what} is {} but {} is {}",
                    t.dtype.name(),
                    tensors[0].0,
                    first.name()
                )));
            }
        }
        Ok(first)
    }

    fn memset_zero(&self, t: &mut CudaTensor) -> Result<()> {
        let stream = &self.stream;
        self.timed(
            || "memset".to_string(),
            || 0.0,
            || match t.storage.as_mut() {
                _ if t.len == 0 => Ok(()),
                Some(Storage::F32(s)) => stream
                    .memset_zeros(&mut s.slice_mut(..t.len))
                    .map_err(device_err("memset")),
                Some(Storage::Half(s)) => stream
                    .memset_zeros(&mut s.slice_mut(..t.len))
                    .map_err(device_err("memset")),
                None => Ok(()),
            },
        )
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Indices = CudaIndices;
    type Parked = CudaParked;

    fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({})",
            self.ctx.ordinal(),
            self.device_name,
            self.dtype.name()
        )
    }

    fn compute_dtype(&self) -> DType {
        self.dtype
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.pool.peak_bytes())
    }

    fn tune(&self) -> Result<()> {
        self.tune_impl()
    }

    fn release_cached(&self) -> Result<()> {
        self.synchronize()?;
        self.pool.release_cached();
        // The frees are stream-ordered: the driver's pool gives the memory back to the device at
        // the next synchronization, before other sizes could fragment it.
        self.synchronize()
    }

    fn reserved_peak_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut high: u64 = 0;
        // SAFETY: out-parameters of the right types for the driver's default pool of this
        // context's device and its u64 attribute.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .ok()?;
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                &mut high as *mut u64 as *mut std::ffi::c_void,
            )
            .result()
            .ok()?;
        }
        Some(high)
    }

    fn free_memory_bytes(&self) -> Option<u64> {
        self.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64)
    }

    fn profile_start(&self) {
        self.profiler.start()
    }

    fn profile_stop(&self) -> Result<Vec<OpTime>> {
        self.profiler.stop()
    }

    fn zeros(&self, len: usize, dtype: DType) -> Result<CudaTensor> {
        let mut t = self.alloc(len, dtype)?;
        self.memset_zero(&mut t)?;
        Ok(t)
    }

    fn empty(&self, len: usize, dtype: DType) -> Result<CudaTensor> {
        self.alloc(len, dtype)
    }

    fn upload(&self, data: &[f32], dtype: DType) -> Result<CudaTensor> {
        let mut t = self.alloc(data.len(), dtype)?;
        if data.is_empty() {
            return Ok(t);
        }
        let err = device_err("upload");
        let len = t.len;
        match (t.storage.as_mut().expect("fresh tensor"), dtype) {
            (Storage::F32(s), _) => self
                .stream
                .memcpy_htod(data, &mut s.slice_mut(..len))
                .map_err(err)?,
            // Rounded on every core (a 7B model is 6.7 billion values; each is independent).
            (Storage::Half(s), DType::BF16) => {
                let bits: Vec<u16> = data
                    .par_iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                self.stream
                    .memcpy_htod(&bits, &mut s.slice_mut(..len))
                    .map_err(err)?
            }
            (Storage::Half(s), _) => {
                let bits: Vec<u16> = data
                    .par_iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                self.stream
                    .memcpy_htod(&bits, &mut s.slice_mut(..len))
                    .map_err(err)?
            }
        }
        Ok(t)
    }

    fn upload_16bit(&self, bits: &[u16], stored: DType, dtype: DType) -> Result<CudaTensor> {
        if dtype != stored || dtype == DType::F32 {
            return self.upload(&crate::widen_16bit(bits, stored), dtype);
        }
        let mut t = self.alloc(bits.len(), dtype)?;
        if let (false, Some(Storage::Half(s))) = (bits.is_empty(), t.storage.as_mut()) {
            self.stream
                .memcpy_htod(bits, &mut s.slice_mut(..bits.len()))
                .map_err(device_err("upload"))?;
        }
        Ok(t)
    }

    fn host_wait_s(&self) -> f64 {
        self.host_wait_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let err = device_err("download");
        // The wait for the queued work, timed apart from the copy and the conversion.
        let start = std::time::Instant::now();
        self.stream.synchronize().map_err(device_err("download"))?;
        let waited = start.elapsed().as_nanos() as u64;
        self.host_wait_ns
            .fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
        match t.storage.as_ref().expect("tensor storage") {
            _ if t.is_empty() => Ok(Vec::new()),
            Storage::F32(s) => self.stream.clone_dtoh(&s.slice(..t.len)).map_err(err),
            Storage::Half(s) => {
                let bits = self.stream.clone_dtoh(&s.slice(..t.len)).map_err(err)?;
                Ok(match t.dtype {
                    DType::BF16 => bits
                        .iter()
                        .map(|&b| half::bf16::from_bits(b).to_f32())
                        .collect(),
                    _ => bits
                        .iter()
                        .map(|&b| half::f16::from_bits(b).to_f32())
                        .collect(),
                })
            }
        }
    }

    fn upload_indices(&self, data: &[i32]) -> Result<CudaIndices> {
        let slice = if data.is_empty() {
            self.stream.null().map_err(device_err("upload indices"))?
        } else {
            self.stream
                .clone_htod(data)
                .map_err(device_err("upload indices"))?
        };
        Ok(CudaIndices::new(
            slice,
            Some(data.to_vec()),
            self.pool.clone(),
        ))
    }

    fn len(&self, t: &CudaTensor) -> usize {
        t.len()
    }

    fn copy(&self, src: &CudaTensor, dst: &mut CudaTensor) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        self.cast_to(src, dst.ptr(&self.stream), dst.dtype)
    }

    fn copy_many_into(&self, src: &[CudaTensor], dst: &mut CudaTensor, at: &[usize]) -> Result<()> {
        self.copy_many_into_impl(src, dst, at)
    }

    fn fill_zero(&self, t: &mut CudaTensor) -> Result<()> {
        self.memset_zero(t)
    }

    fn fill_zero_many(&self, ts: &mut [CudaTensor]) -> Result<()> {
        self.fill_zero_many_impl(ts)
    }

    fn park(&self, ts: Vec<CudaTensor>, lane: ParkLane) -> Result<CudaParked> {
        self.park_impl(ts, lane)
    }

    fn embedding_from_host(
        &self,
        table: &CudaParked,
        ids: &CudaIndices,
        hidden: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.embedding_from_host_impl(table, ids, hidden, out)
    }

    fn prefetch(&self, p: &mut CudaParked) -> Result<()> {
        self.prefetch_impl(p)
    }

    fn unpark(&self, p: CudaParked) -> Result<Vec<CudaTensor>> {
        self.unpark_impl(p)
    }

    fn fill_random(&self, t: &mut CudaTensor, seed: u64, scale: f32) -> Result<()> {
        self.fill_random_impl(t, seed, scale)
    }

    fn axpy_from(
        &self,
        alpha: f32,
        (src, offset): (&CudaTensor, usize),
        dst: &mut CudaTensor,
    ) -> Result<()> {
        let n = dst.len();
        check_block_in_src("axpy_from", src.len(), offset, n)?;
        let name = format!("axpy_{}_{}", suffix(src.dtype), suffix(dst.dtype));
        let at = src.ptr(&self.stream) + (offset * src.dtype.size_bytes()) as u64;
        self.launch(
            &name,
            (blocks_for_chunks_of_8(n), 1, 1),
            256,
            0,
            &[
                Arg::F32(alpha),
                Arg::Ptr(at),
                self.p(dst),
                Arg::U64(n as u64),
            ],
        )
    }

    /// All f32: one `axpy_blocks_f32` launch, a row of (src, dst, n) per block, the grid's y the
    /// block; otherwise one `axpy_from` each.
    fn axpy_from_many(
        &self,
        alpha: f32,
        src: &CudaTensor,
        dsts: &mut [(usize, &mut CudaTensor)],
    ) -> Result<()> {
        let f32s = src.dtype == DType::F32 && dsts.iter().all(|(_, d)| d.dtype == DType::F32);
        if !f32s || dsts.is_empty() {
            for (offset, dst) in dsts {
                self.axpy_from(alpha, (src, *offset), dst)?;
            }
            return Ok(());
        }
        let (mut table, mut longest) = (Vec::with_capacity(3 * dsts.len()), 0);
        for (offset, dst) in dsts.iter() {
            let n = dst.len();
            check_block_in_src("axpy_from_many", src.len(), *offset, n)?;
            table.extend([
                src.ptr(&self.stream) + (offset * 4) as u64,
                dst.ptr(&self.stream),
                n as u64,
            ]);
            longest = longest.max(n);
        }
        let copies = (&table[..], dsts.len());
        self.launch_batched("axpy_blocks_f32", &[Arg::F32(alpha)], copies, longest)
    }

    fn scale(&self, alpha: f32, t: &mut CudaTensor) -> Result<()> {
        let n = t.len();
        let name = format!("scale_{}", suffix(t.dtype));
        self.launch(
            &name,
            (blocks_for_chunks_of_8(n), 1, 1),
            256,
            0,
            &[Arg::F32(alpha), self.p(t), Arg::U64(n as u64)],
        )
    }

    fn gemm_at(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        (a, a_at): (&CudaTensor, MatAt),
        trans_a: bool,
        (b, b_at): (&CudaTensor, MatAt),
        trans_b: bool,
        beta: f32,
        (c, c_at): (&mut CudaTensor, MatAt),
    ) -> Result<()> {
        let [a, b, c] =
            self.gemm_operands((m, n, k), (a, a_at, trans_a), (b, b_at, trans_b), (c, c_at))?;
        self.gemm_raw(m, n, k, alpha, a, trans_a, b, trans_b, beta, c)
    }

    fn gemm_residual(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        (a, a_at): (&CudaTensor, MatAt),
        trans_a: bool,
        (b, b_at): (&CudaTensor, MatAt),
        trans_b: bool,
        residual: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check_gemm_residual((m, n), residual.len(), out.len())?;
        self.same_dtype("gemm_residual", &[("residual", residual), ("out", out)])?;
        let out_at = MatAt::dense(n);
        let [a, b, c] = self.gemm_operands(
            (m, n, k),
            (a, a_at, trans_a),
            (b, b_at, trans_b),
            (out, out_at),
        )?;
        let c_in = (gemm_tuning::CInput::Residual, residual.ptr(&self.stream));
        self.gemm_raw_from(m, n, k, alpha, (a, trans_a), (b, trans_b), 1.0, c_in, c)
    }

    fn lora_dy_products(
        &self,
        n: usize,
        out: usize,
        r: usize,
        dy: &CudaTensor,
        t: (&CudaTensor, MatAt),
        b: (&CudaTensor, MatAt),
        db: &mut CudaTensor,
        u: (&mut CudaTensor, MatAt),
    ) -> Result<()> {
        self.lora_dy_products_impl(n, out, r, dy, t, b, db, u)
    }

    fn embedding(
        &self,
        table: &CudaTensor,
        ids: &CudaIndices,
        hidden: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check_len("embedding", "out", out.len(), ids.len() * hidden)?;
        let dt = self.same_dtype("embedding", &[("table", table), ("out", out)])?;
        check_token_ids(
            "embedding",
            ids.host("embedding")?,
            table.len() / hidden.max(1),
        )?;
        if ids.is_empty() {
            return Ok(());
        }
        let name = format!("embedding_{}", suffix(dt));
        self.launch(
            &name,
            (ids.len() as u32, 1, 1),
            256,
            0,
            &[
                self.p(table),
                self.pi(ids),
                self.p(out),
                Arg::I32(hidden as i32),
            ],
        )
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        hidden: usize,
        eps: f32,
        y: &mut CudaTensor,
        y_ld: usize,
        rstd: &mut CudaTensor,
    ) -> Result<()> {
        self.rms_norm_launch(x, w, hidden, eps, (y, y_ld), None, rstd)
    }

    fn rms_norm_beside(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        hidden: usize,
        eps: f32,
        (y, y_ld): (&mut CudaTensor, usize),
        beside: &CudaTensor,
        rstd: &mut CudaTensor,
    ) -> Result<()> {
        let width = y_ld.saturating_sub(hidden);
        check_len(
            "rms_norm_beside",
            "beside",
            beside.len(),
            rstd.len() * width,
        )?;
        self.same_dtype("rms_norm_beside", &[("y", y), ("beside", beside)])?;
        self.rms_norm_launch(x, w, hidden, eps, (y, y_ld), Some(beside), rstd)
    }

    fn rms_norm_backward(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        rstd: &CudaTensor,
        hidden: usize,
        dx: &mut CudaTensor,
    ) -> Result<()> {
        check_len("rms_norm_backward", "w", w.len(), hidden)?;
        check_len("rms_norm_backward", "rstd", rstd.len() * hidden, x.len())?;
        check_len("rms_norm_backward", "dx", dx.len(), x.len())?;
        check_len("rms_norm_backward", "dy", dy.len(), x.len())?;
        let dt = self.same_dtype(
            "rms_norm_backward",
            &[("dy", dy), ("x", x), ("w", w), ("dx", dx)],
        )?;
        self.require_dtype("rms_norm_backward", "rstd", rstd, DType::F32)?;
        let rows = rstd.len();
        if rows == 0 {
            return Ok(());
        }
        let name = format!("rms_norm_backward_{}", suffix(dt));
        let (grid, threads, rows_per_block) = norm_launch(rows, hidden);
        let args = [
            self.p(dy),
            self.p(x),
            self.p(w),
            self.p(rstd),
            self.p(dx),
            Arg::I32(rows as i32),
            Arg::I32(rows_per_block as i32),
            Arg::I32(hidden as i32),
        ];
        self.launch(&name, grid, threads, 0, &args)
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        positions: &CudaIndices,
        cos: &CudaTensor,
        sin: &CudaTensor,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        check_len("rope", "x", x.len(), positions.len() * heads * head_dim)?;
        let tables = Rotation {
            positions,
            cos,
            sin,
        };
        let Some(tail) = self.rope_tail("rope", &tables, heads, head_dim, inverse)? else {
            return Ok(());
        };
        let n = positions.len() * heads * (head_dim / 2);
        let name = format!("rope_{}", suffix(x.dtype));
        let args: Vec<Arg> = [self.p(x)].into_iter().chain(tail).collect();
        self.launch(&name, (blocks_for_chunks_of_8(n), 1, 1), 256, 0, &args)
    }

    fn attention(
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
        self.attention_forward(
            q, k, v, layout, doc_start, heads, kv_heads, head_dim, out, lse,
        )
    }

    fn attention_backward(
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
        self.attention_backward_impl(
            q,
            k,
            v,
            out,
            lse,
            dout,
            layout,
            doc_start,
            heads,
            kv_heads,
            head_dim,
            unrotate_dq,
        )
    }

    fn write_cache(
        &self,
        src: &CudaTensor,
        cache: &mut CudaTensor,
        rows: usize,
        new: usize,
        capacity: usize,
        width: usize,
        at: usize,
    ) -> Result<()> {
        self.write_cache_impl(src, cache, rows, new, capacity, width, at)
    }

    fn attention_cached(
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
        self.attention_cached_impl(
            q, k_cache, v_cache, first_key, rows, new, filled, capacity, window, heads, kv_heads,
            head_dim, out,
        )
    }

    fn broadcast_rows(&self, row: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        check_rows("broadcast_rows", out.len(), row.len())?;
        let dt = self.same_dtype("broadcast_rows", &[("row", row), ("out", out)])?;
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let name = format!("broadcast_rows_{}", suffix(dt));
        self.launch(
            &name,
            (blocks_for(n), 1, 1),
            256,
            0,
            &[
                self.p(row),
                self.p(out),
                Arg::U64(row.len() as u64),
                Arg::U64(n as u64),
            ],
        )
    }

    fn place_block(
        &self,
        rows: usize,
        width: usize,
        block: Range<usize>,
        (src, src_at): (&CudaTensor, MatAt),
        (dst, dst_at): (&mut CudaTensor, MatAt),
    ) -> Result<()> {
        check_place_block(
            rows,
            width,
            &block,
            (src_at, src.len()),
            (dst_at, dst.len()),
        )?;
        let dt = self.same_dtype("place_block", &[("src", src), ("dst", dst)])?;
        let n = rows * width;
        if n == 0 {
            return Ok(());
        }
        let at = |t: &CudaTensor, m: MatAt| {
            Arg::Ptr(t.ptr(&self.stream) + (m.offset * dt.size_bytes()) as u64)
        };
        let args = [
            at(src, src_at),
            Arg::U64(src_at.ld as u64),
            at(dst, dst_at),
            Arg::U64(dst_at.ld as u64),
            Arg::U64(width as u64),
            Arg::U64(block.start as u64),
            Arg::U64(block.end as u64),
            Arg::U64(n as u64),
        ];
        let name = format!("place_block_{}", suffix(dt));
        // Threads for 16-byte words; the element loop, where it runs, strides over the same grid.
        self.launch(&name, (blocks_for_chunks_of_8(n), 1, 1), 256, 0, &args)
    }

    /// One `place_blocks_<t>` launch: a row of 8 u64 per copy (place_block's arguments), the
    /// grid's y the copy.
    fn place_blocks(&self, placements: &mut [Placement<'_, CudaTensor>]) -> Result<()> {
        let Some(first) = placements.first() else {
            return Ok(());
        };
        let dt = first.dst.0.dtype;
        let (mut table, mut widest) = (Vec::with_capacity(8 * placements.len()), 0);
        for p in placements.iter() {
            let (src, src_at) = p.src;
            let (dst, dst_at) = (&*p.dst.0, p.dst.1);
            check_place_block(
                p.rows,
                p.width,
                &p.block,
                (src_at, src.len()),
                (dst_at, dst.len()),
            )?;
            self.same_dtype(
                "place_blocks",
                &[("src", src), ("dst", dst), ("the first dst", first.dst.0)],
            )?;
            let at = |t: &CudaTensor, m: MatAt| {
                t.ptr(&self.stream) + (m.offset * dt.size_bytes()) as u64
            };
            let n = p.rows * p.width;
            table.extend([
                at(src, src_at),
                src_at.ld as u64,
                at(dst, dst_at),
                dst_at.ld as u64,
                p.width as u64,
                p.block.start as u64,
                p.block.end as u64,
                n as u64,
            ]);
            widest = widest.max(n);
        }
        let name = format!("place_blocks_{}", suffix(dt));
        self.launch_batched(&name, &[], (&table[..], placements.len()), widest)
    }

    fn swiglu(&self, gate: &CudaTensor, up: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        check_len("swiglu", "up", up.len(), gate.len())?;
        check_len("swiglu", "out", out.len(), gate.len())?;
        let dt = self.same_dtype("swiglu", &[("gate", gate), ("up", up), ("out", out)])?;
        let n = gate.len();
        let name = format!("swiglu_forward_{}", suffix(dt));
        self.launch(
            &name,
            (blocks_for_chunks_of_8(n), 1, 1),
            256,
            0,
            &[self.p(gate), self.p(up), self.p(out), Arg::U64(n as u64)],
        )
    }

    fn swiglu_backward(
        &self,
        dout: &mut CudaTensor,
        gate: &mut CudaTensor,
        up: &mut CudaTensor,
    ) -> Result<()> {
        check_len("swiglu_backward", "dout", dout.len(), gate.len())?;
        check_len("swiglu_backward", "up", up.len(), gate.len())?;
        let dt = self.same_dtype(
            "swiglu_backward",
            &[("dout", dout), ("gate", gate), ("up", up)],
        )?;
        let n = gate.len();
        let name = format!("swiglu_backward_{}", suffix(dt));
        let args = [self.p(dout), self.p(gate), self.p(up), Arg::U64(n as u64)];
        self.launch(&name, (blocks_for_chunks_of_8(n), 1, 1), 256, 0, &args)
    }

    fn lm_head_cross_entropy(
        &self,
        hidden: &CudaTensor,
        weight: &CudaTensor,
        targets: &CudaIndices,
        rows: usize,
        hidden_dim: usize,
        vocab: usize,
        grad: CeGrad<'_, CudaTensor>,
        logp: &mut CudaTensor,
        dhidden: Option<&mut CudaTensor>,
    ) -> Result<()> {
        self.lm_head_cross_entropy_impl(
            hidden, weight, targets, rows, hidden_dim, vocab, grad, logp, dhidden,
        )
    }

    fn sum_of_squares(&self, tensors: &[CudaTensor]) -> Result<f64> {
        self.sum_of_squares_impl(tensors)
    }

    fn quantize_nf4(
        &self,
        x: &CudaTensor,
        double_quant: bool,
    ) -> Result<crate::nf4::Nf4Buffers<CudaTensor, CudaIndices>> {
        self.quantize_nf4_impl(x, double_quant)
    }

    fn dequantize_nf4(
        &self,
        packed: &CudaIndices,
        absmax: Nf4Absmax<'_, CudaTensor, CudaIndices>,
        cols: usize,
        ld: usize,
        pad: Option<LoraPad<'_, CudaTensor>>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.dequantize_nf4_impl(packed, absmax, (cols, ld), pad, out)
    }

    fn all_finite(&self, tensors: &[CudaTensor]) -> Result<bool> {
        self.all_finite_impl(tensors)
    }

    fn adamw(
        &self,
        params: &mut [CudaTensor],
        grads: &mut [CudaTensor],
        m: &mut [CudaTensor],
        v: &mut [CudaTensor],
        hp: &AdamWParams,
        step: u64,
        grad_scale: f32,
        after: AfterUpdate<'_, CudaTensor>,
    ) -> Result<()> {
        self.adamw_impl(params, grads, m, v, hp, step, grad_scale, after)
    }
}

/// RMSNorm's launch over `rows` rows of `hidden` (rmsnorm.cu `norm_row`): `(grid, threads a block,
/// rows a block)`. Rows of up to 1024 elements (a head's q or k, a small model's hidden) take a
/// warp each, 8 a block; longer rows a block each of 256 threads. The kernel reads its rows from
/// `rows_per_block` and the block's size alike: the two are made here together.
fn norm_launch(rows: usize, hidden: usize) -> ((u32, u32, u32), u32, usize) {
    const WARP_ROWS_UP_TO: usize = 1024;
    const ROWS_A_BLOCK: usize = 8;
    if hidden <= WARP_ROWS_UP_TO {
        let grid = rows.div_ceil(ROWS_A_BLOCK) as u32;
        ((grid, 1, 1), (32 * ROWS_A_BLOCK) as u32, ROWS_A_BLOCK)
    } else {
        ((rows as u32, 1, 1), 256, 1)
    }
}

impl Drop for CudaBackend {
    /// Pinned host buffers (offload.rs) are freed with the backend: no copy may still use them.
    fn drop(&mut self) {
        let _ = self.synchronize();
    }
}

/// Every id must name a row of a table of `vocab` rows.
fn check_token_ids(op: &str, ids: &[i32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        Some(id) => Err(KernelError::Unsupported(format!(
            "{op}: token id {id} outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}
