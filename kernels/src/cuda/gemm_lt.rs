//! The large 16-bit products (the frozen-weight GEMMs of a layer) through cuBLASLt, with the
//! algorithm chosen by timing. `cublasGemmEx` takes cuBLAS's one heuristic pick; on the H200 that
//! pick ran 4096×11008×4096 NT at ~710 TFLOP/s inside the step where cuBLASLt's reached ~771 in
//! isolation (docs/benchmarks.md, session 6). So at the first product of each shape (with β = 0,
//! so that the call's own output may be written), cuBLASLt proposes up to [`CANDIDATES`]
//! algorithms; each of them and `cublasGemmEx` are timed on the call's own operands, and the
//! fastest serves that shape from then on. Every candidate accumulates in f32
//! (`CUBLAS_COMPUTE_32F`, split-k partial sums in f32 too), as `cublasGemmEx` does: they differ only
//! in the order of the f32 sums.
//!
//! The operands are mapped as in gemm.rs: row-major `C[m,n] = op(A) op(B)` is column-major
//! `Cᵀ[n,m] = op(B)ᵀ op(A)ᵀ`, so cuBLASLt's first operand is our B and its second our A.

use super::{device_err, CudaBackend};
use crate::{DType, KernelError, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Algorithms cuBLASLt is asked for per shape.
const CANDIDATES: usize = 8;
/// Workspace the algorithms may use (allocated at the first tuned shape, outside the pool).
const WORKSPACE_BYTES: usize = 32 << 20;
/// Products with all three sizes at least this large are tuned; the rest (LoRA's rank-16 ones,
/// the LM head's chunks) stay with `cublasGemmEx`.
const MIN_SIZE: usize = 1024;

/// What serves one shape.
enum Choice {
    GemmEx,
    Lt(Plan),
}

/// One shape's cuBLASLt descriptors and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A (our B), B (our A), and C = D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `Plan::new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

// SAFETY: the descriptors are plain host objects, used under the backend's lock.
unsafe impl Send for Plan {}

/// A product's shape: m, n, k, the transposes, the dtype.
type Key = (usize, usize, usize, bool, bool, DType);

/// The cuBLASLt handle, its workspace and the choice per shape.
#[derive(Default)]
pub(crate) struct Tuned {
    state: Mutex<TunedState>,
}

#[derive(Default)]
struct TunedState {
    handle: Option<Handle>,
    workspace: Option<CudaSlice<u8>>,
    choices: HashMap<Key, Choice>,
}

struct Handle(sys::cublasLtHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created once by `create_handle`, destroyed once here.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

// SAFETY: as for `Plan`.
unsafe impl Send for Handle {}

fn lt_err(what: &'static str) -> impl Fn(cudarc::cublaslt::result::CublasError) -> KernelError {
    move |e| KernelError::Device {
        op: what,
        message: format!("{e:?}"),
    }
}

impl Plan {
    fn new(key: Key, dtype: sys::cudaDataType) -> Result<Plan> {
        let (m, n, k, trans_a, trans_b, _) = key;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_err("cublasLt descriptor"))?;
        let op = |t: bool| {
            if t {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        for (attr, t) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                trans_b,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                trans_a,
            ),
        ] {
            let o = op(t);
            // SAFETY: `desc` is live; the attribute is a cublasOperation_t.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    &o as *const _ as *const c_void,
                    std::mem::size_of_val(&o),
                )
            }
            .map_err(lt_err("cublasLt transpose"))?;
        }
        // Column-major (rows, cols, ld): our B as stored, our A as stored, Cᵀ [n, m].
        let shapes = [
            if trans_b { (k, n, k) } else { (n, k, n) },
            if trans_a { (m, k, m) } else { (k, m, k) },
            (n, m, n),
        ];
        let mut layouts = [std::ptr::null_mut(); 3];
        for (l, (rows, cols, ld)) in layouts.iter_mut().zip(shapes) {
            *l = lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
                .map_err(lt_err("cublasLt layout"))?;
        }
        Ok(Plan {
            desc,
            layouts,
            // SAFETY: an all-zero algorithm is a valid placeholder until `candidates` fills it.
            algo: unsafe { std::mem::zeroed() },
        })
    }

    /// cuBLASLt's proposals for this shape that fit the workspace.
    fn candidates(&self, handle: sys::cublasLtHandle_t) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let pref = lt::create_matmul_pref().map_err(lt_err("cublasLt preference"))?;
        let bytes = WORKSPACE_BYTES as u64;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            // SAFETY: plain C structs, written by the heuristic below before being read.
            vec![unsafe { std::mem::zeroed() }; CANDIDATES];
        let mut found = 0i32;
        // Split-k partial sums only in f32 (the compute type), never in the 16-bit output type.
        let reductions =
            sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
        // SAFETY: every descriptor is live; `results` holds CANDIDATES entries.
        let status = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                8,
            )
            .and_then(|()| {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &reductions as *const u32 as *const c_void,
                    4,
                )
            })
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    self.desc,
                    self.layouts[0],
                    self.layouts[1],
                    self.layouts[2],
                    self.layouts[2],
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
                .result()
            })
        };
        // SAFETY: created above.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        status.map_err(lt_err("cublasLt heuristic"))?;
        Ok(results
            .into_iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }
}

/// Raw operands of one product: device addresses (the dtype is in the key), α, β.
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub alpha: f32,
    pub beta: f32,
}

impl CudaBackend {
    /// Runs the product on the shape's tuned choice; `Ok(false)` when it is not one to tune (or
    /// not tuned yet and β ≠ 0), for `cublasGemmEx` to run it instead. `gemm_ex` runs the
    /// `cublasGemmEx` version of this very product (timed against the candidates).
    pub(crate) fn gemm_tuned(
        &self,
        key: Key,
        ops: Operands,
        gemm_ex: &dyn Fn() -> Result<()>,
    ) -> Result<bool> {
        let (m, n, k, _, _, dtype) = key;
        let aligned = [ops.a, ops.b, ops.c].iter().all(|p| p % 256 == 0);
        if m.min(n).min(k) < MIN_SIZE || dtype == DType::F32 || !aligned {
            return Ok(false);
        }
        let mut state = self.lt.state.lock().expect("cublasLt lock");
        if !state.choices.contains_key(&key) {
            if ops.beta != 0.0 {
                return Ok(false);
            }
            let choice = self.tune(&mut state, key, ops, gemm_ex)?;
            state.choices.insert(key, choice);
        }
        let TunedState {
            handle,
            workspace,
            choices,
        } = &*state;
        match (&choices[&key], handle, workspace) {
            (Choice::Lt(plan), Some(h), Some(w)) => {
                self.lt_matmul(h.0, plan, &plan.algo, ops, w)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Times `cublasGemmEx` and cuBLASLt's candidates on this product and keeps the fastest.
    fn tune(
        &self,
        state: &mut TunedState,
        key: Key,
        ops: Operands,
        gemm_ex: &dyn Fn() -> Result<()>,
    ) -> Result<Choice> {
        if state.handle.is_none() {
            state.handle = Some(Handle(
                lt::create_handle().map_err(lt_err("cublasLt init"))?,
            ));
            state.workspace = Some(
                // SAFETY: scratch the algorithms write before they read.
                unsafe { self.stream.alloc::<u8>(WORKSPACE_BYTES) }
                    .map_err(device_err("cublasLt workspace"))?,
            );
        }
        let handle = state.handle.as_ref().expect("made above").0;
        let workspace = state.workspace.as_ref().expect("made above");
        let dtype = match key.5 {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            _ => sys::cudaDataType::CUDA_R_16F,
        };
        let mut plan = Plan::new(key, dtype)?;
        let mut best = (self.time_twice(gemm_ex)?, None);
        for algo in plan.candidates(handle)? {
            let run = || self.lt_matmul(handle, &plan, &algo, ops, workspace);
            // An algorithm the heuristic offers may still refuse these operands: skip it.
            if run().is_err() {
                continue;
            }
            let t = self.time_twice(&run)?;
            if t < best.0 {
                best = (t, Some(algo));
            }
        }
        Ok(match best.1 {
            Some(algo) => {
                plan.algo = algo;
                Choice::Lt(plan)
            }
            None => Choice::GemmEx,
        })
    }

    /// Device seconds of two back-to-back runs of `f` (after it ran once).
    fn time_twice(&self, f: &dyn Fn() -> Result<()>) -> Result<f32> {
        f()?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(flags)
            .map_err(device_err("tuning event"))?;
        f()?;
        f()?;
        let end = self
            .stream
            .record_event(flags)
            .map_err(device_err("tuning event"))?;
        end.synchronize().map_err(device_err("tuning event"))?;
        super::profiler::milliseconds_between(&start, &end)
    }

    fn lt_matmul(
        &self,
        handle: sys::cublasLtHandle_t,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: Operands,
        workspace: &CudaSlice<u8>,
    ) -> Result<()> {
        let (w, _record) = workspace.device_ptr(&self.stream);
        // SAFETY: the layouts describe the operands' shapes (checked by the caller's gemm_raw),
        // the workspace holds WORKSPACE_BYTES, and everything is queued on the compute stream.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                &ops.alpha as *const f32 as *const c_void,
                &ops.beta as *const f32 as *const c_void,
                ops.b as *const c_void,
                plan.layouts[0],
                ops.a as *const c_void,
                plan.layouts[1],
                ops.c as *const c_void,
                plan.layouts[2],
                ops.c as *mut c_void,
                plan.layouts[2],
                algo,
                w as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(lt_err("cublasLtMatmul"))
    }
}
