//! Choosing each matrix product's algorithm by timing it ([`crate::Backend::tune`]).
//!
//! `cublasGemmEx` takes one algorithm per shape from cuBLAS's heuristics. On an H200 that choice
//! ran some of a 7B step's shapes up to 14 % slower than the best of cuBLASLt's candidates, and
//! the winner differs between machines of one kind (docs/benchmarks.md, session 10): so the
//! choice is made by timing, on the machine. Every shape ([`GemmShape`]: sizes, transposes,
//! dtypes, whether C is accumulated into) runs `cublasGemmEx` until [`CudaBackend::tune_impl`]
//! (the training loop calls it after its first step); that times `cublasGemmEx` and cuBLASLt's
//! first [`CANDIDATES`] heuristic algorithms on scratch operands of each untuned shape (median of
//! [`ROUNDS`] rounds) and keeps the fastest for the rest of the run. The scratch operands come
//! from buffers the pool has cached (the step's freed activations): a shape whose operands no
//! cached buffer holds (the LM head's weight-sized one) keeps `cublasGemmEx` rather than raise
//! the memory peak.
//!
//! Every candidate computes the same products with f32 accumulation; they may add the k terms in
//! another order (split-k), so bits can differ from `cublasGemmEx`'s as they do between GPUs.
//! `FUSELORA_GEMM_TUNING=off` keeps `cublasGemmEx` for every shape.

use super::event_timing::EventClock;
use super::tensor::CudaTensor;
use super::{device_err, CudaBackend};
use crate::{DType, KernelError, Result};
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys::CUevent_flags;
use std::collections::HashMap;
use std::sync::Mutex;

/// cuBLASLt heuristic candidates timed per shape (besides `cublasGemmEx`).
const CANDIDATES: usize = 8;
/// Timed rounds per candidate (the median counts) and products per round.
const ROUNDS: usize = 5;
const REPEATS: usize = 3;
/// The workspace cuBLASLt's candidates may use, allocated at the first tune.
const WORKSPACE_BYTES: usize = crate::GEMM_WORKSPACE_BYTES;

/// What a product adds its A·B to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CInput {
    /// Nothing (`beta = 0`): C is only written.
    None,
    /// C itself (`beta ≠ 0`): read and written.
    Accumulate,
    /// Another matrix of C's layout (`gemm_residual`): read, and C written. cuBLASLt's D ≠ C;
    /// `cublasGemmEx` has no such form, so it copies the residual into C first.
    Residual,
}

/// What identifies a product for the choice of algorithm (row-major sizes as in `gemm_raw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub inputs: DType,
    pub output: DType,
    /// What the product's epilogue reads besides A·B.
    pub c_input: CInput,
    /// Elements between rows of A, B and C as stored (row-major).
    pub lds: [usize; 3],
    /// Every operand's address is a multiple of 16 bytes. cuBLASLt's heuristics assume so (an
    /// operand inside a wider tensor may not be), so only such shapes are tuned; the others run
    /// `cublasGemmEx` from the start (it checks alignment on each call).
    pub aligned: bool,
}

impl GemmShape {
    /// Elements each operand (A, B, C) spans from its first: what a scratch copy needs.
    fn extents(&self) -> [usize; 3] {
        let stored = |rows, cols, trans| if trans { (cols, rows) } else { (rows, cols) };
        let span = |(rows, cols): (usize, usize), ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1) * ld + cols
            }
        };
        [
            span(stored(self.m, self.k, self.trans_a), self.lds[0]),
            span(stored(self.k, self.n, self.trans_b), self.lds[1]),
            span((self.m, self.n), self.lds[2]),
        ]
    }
}

/// How a shape's products run (and, while tuning, one candidate way).
pub(crate) enum GemmChoice {
    /// `cublasGemmEx`, not yet timed against the candidates.
    Untuned,
    /// `cublasGemmEx`, timed fastest (or tuning is off).
    GemmEx,
    /// A cuBLASLt algorithm, timed fastest.
    Lt(LtPlan),
}

/// `FUSELORA_GEMM_TUNING`: whether [`CudaBackend::tune_impl`] times candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmTuning {
    On,
    Off,
}

impl GemmTuning {
    pub(crate) fn from_env() -> Result<Self> {
        Self::parse(std::env::var("FUSELORA_GEMM_TUNING").ok().as_deref())
    }

    /// The setting for a `FUSELORA_GEMM_TUNING` value (`None`: unset).
    fn parse(setting: Option<&str>) -> Result<Self> {
        match setting {
            None | Some("") | Some("on") => Ok(Self::On),
            Some("off") => Ok(Self::Off),
            Some(other) => Err(KernelError::Unsupported(format!(
                "FUSELORA_GEMM_TUNING={other}: expected \"on\" or \"off\""
            ))),
        }
    }
}

/// The tuning state of a backend: each shape's choice, cuBLASLt's handle and workspace (the
/// choices first: their plans go before the handle and workspace they were made with).
pub(crate) struct Tuner {
    pub setting: GemmTuning,
    pub choices: Mutex<HashMap<GemmShape, GemmChoice>>,
    lt: Mutex<Option<LtContext>>,
}

impl Tuner {
    pub(crate) fn new(setting: GemmTuning) -> Self {
        Tuner {
            setting,
            choices: Mutex::new(HashMap::new()),
            lt: Mutex::new(None),
        }
    }
}

/// cuBLASLt's handle and the workspace its algorithms share (one stream, so one at a time).
struct LtContext {
    handle: lt::cublasLtHandle_t,
    /// Counted by the pool; its address goes into every plan.
    workspace: CudaTensor,
}

// SAFETY: the handle is used under the tuner's lock or from the backend's one compute stream.
unsafe impl Send for LtContext {}

impl Drop for LtContext {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        let _ = unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

/// A product's cuBLASLt descriptor and its three layouts (B's, A's, C's: the column-major
/// product `gemm_raw` asks `cublasGemmEx` for, Cᵀ[n,m] = op(B)ᵀ op(A)ᵀ).
struct Described {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3],
}

impl Drop for Described {
    fn drop(&mut self) {
        // SAFETY: created in `Described::of`, destroyed once; null ones were never created.
        unsafe {
            if !self.desc.is_null() {
                let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            }
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

impl Described {
    fn of(s: &GemmShape) -> Result<Self> {
        let mut d = Described {
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
        };
        let (rows, cols, k) = (s.n as u64, s.m as u64, s.k as u64);
        // First operand B: op(B)ᵀ is n × k, stored k × n when transposed; second A likewise.
        let first = if s.trans_b { (k, rows) } else { (rows, k) };
        let second = if s.trans_a { (cols, k) } else { (k, cols) };
        // SAFETY: descriptor calls on handles owned by `d`, which destroys them.
        unsafe {
            lt_check(
                "matmul descriptor",
                lt::cublasLtMatmulDescCreate(
                    &mut d.desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType::CUDA_R_32F,
                ),
            )?;
            for (attr, trans) in [
                (
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    s.trans_b,
                ),
                (
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    s.trans_a,
                ),
            ] {
                let op = lt_op(trans);
                lt_check(
                    "transpose attribute",
                    lt::cublasLtMatmulDescSetAttribute(
                        d.desc,
                        attr,
                        (&op) as *const _ as *const _,
                        std::mem::size_of_val(&op),
                    ),
                )?;
            }
            let [ld_a, ld_b, ld_c] = s.lds;
            for (slot, (dtype, (r, c), ld)) in d.layouts.iter_mut().zip([
                (s.inputs, first, ld_b),
                (s.inputs, second, ld_a),
                (s.output, (rows, cols), ld_c),
            ]) {
                lt_check(
                    "matrix layout",
                    lt::cublasLtMatrixLayoutCreate(slot, lt_type(dtype), r, c, ld as i64),
                )?;
            }
        }
        Ok(d)
    }
}

/// A cuBLASLt product, ready to run: its descriptors, algorithm, and the context's handle and
/// workspace address (both outlive every plan: see [`Tuner`]).
pub(crate) struct LtPlan {
    described: Described,
    algo: lt::cublasLtMatmulAlgo_t,
    handle: lt::cublasLtHandle_t,
    workspace: u64,
}

// SAFETY: the descriptors are immutable after creation; runs are ordered on the compute stream.
unsafe impl Send for LtPlan {}

impl LtPlan {
    /// cuBLASLt's first [`CANDIDATES`] algorithms for `s` within the workspace, each as a plan.
    fn candidates(
        handle: lt::cublasLtHandle_t,
        workspace: u64,
        s: &GemmShape,
    ) -> Result<Vec<LtPlan>> {
        let query = Described::of(s)?;
        // SAFETY: the preference is created and destroyed here; `results` has room for
        // CANDIDATES entries and `count` says how many were written.
        let found = unsafe {
            let mut pref = std::ptr::null_mut();
            lt_check("preference", lt::cublasLtMatmulPreferenceCreate(&mut pref))?;
            let max_workspace = WORKSPACE_BYTES as u64;
            let set = lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&max_workspace) as *const _ as *const _,
                std::mem::size_of_val(&max_workspace),
            );
            let mut results: [lt::cublasLtMatmulHeuristicResult_t; CANDIDATES] = std::mem::zeroed();
            let mut count = 0;
            let status = lt::cublasLtMatmulAlgoGetHeuristic(
                handle,
                query.desc,
                query.layouts[0],
                query.layouts[1],
                query.layouts[2],
                query.layouts[2],
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            );
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
            lt_check("workspace preference", set)?;
            if status != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Ok(Vec::new());
            }
            results
                .into_iter()
                .take(count.max(0) as usize)
                .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .collect::<Vec<_>>()
        };
        found
            .into_iter()
            .map(|r| {
                Ok(LtPlan {
                    described: Described::of(s)?,
                    algo: r.algo,
                    handle,
                    workspace,
                })
            })
            .collect()
    }
}

fn lt_type(d: DType) -> lt::cudaDataType {
    match d {
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
    }
}

/// cuBLASLt's transpose attributes take cuBLAS's operation values (a 32-bit enum).
fn lt_op(trans: bool) -> cudarc::cublas::sys::cublasOperation_t {
    if trans {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn lt_check(what: &'static str, status: lt::cublasStatus_t) -> Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Device {
            op: "gemm tuning",
            message: format!("{what}: {status:?}"),
        })
    }
}

impl CudaBackend {
    /// `shape`'s product `C ← alpha · op(A) op(B) + beta · C_in` the way `choice` says, on the
    /// compute stream: C read from `c_in` and written to `c` (the same address but for a residual
    /// product).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_choice(
        &self,
        choice: &GemmChoice,
        shape: &GemmShape,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        (c_in, c): (u64, u64),
    ) -> Result<()> {
        match choice {
            GemmChoice::Untuned | GemmChoice::GemmEx => {
                if c_in != c {
                    self.copy_rows(c_in, c, shape)?;
                }
                self.run_gemm_ex(shape, alpha, a, b, beta, c)
            }
            GemmChoice::Lt(plan) => self.run_lt(plan, alpha, a, b, beta, (c_in, c)),
        }
    }

    /// `C ← residual` for cublasGemmEx's residual product: C's dense `[m, n]` bytes.
    fn copy_rows(&self, from: u64, to: u64, shape: &GemmShape) -> Result<()> {
        let bytes = shape.m * shape.n * shape.output.size_bytes();
        // SAFETY: both addresses hold a dense [m, n] matrix of the output dtype (gemm_residual
        // checks the lengths), on this backend's stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream())
        }
        .map_err(super::device_err("gemm residual copy"))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_lt(
        &self,
        plan: &LtPlan,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        (c_in, c): (u64, u64),
    ) -> Result<()> {
        let d = &plan.described;
        // SAFETY: the addresses hold the operands of the shape `plan` was made for; the
        // workspace (WORKSPACE_BYTES, the candidates' limit) lives as long as the backend and is
        // used by one product at a time (one stream).
        let status = unsafe {
            lt::cublasLtMatmul(
                plan.handle,
                d.desc,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                d.layouts[0],
                a as *const _,
                d.layouts[1],
                (&beta) as *const f32 as *const _,
                c_in as *const _,
                d.layouts[2],
                c as *mut _,
                d.layouts[2],
                &plan.algo,
                plan.workspace as *mut _,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        };
        lt_check("cublasLtMatmul", status)
    }

    /// Times the candidates of every shape run since the last call and keeps each one's fastest
    /// ([`crate::Backend::tune`]). Needs scratch operands of each shape: call it where the step's
    /// activations are freed (the training loop does after its first step).
    pub(crate) fn tune_impl(&self) -> Result<()> {
        let untuned: Vec<GemmShape> = {
            let mut choices = self.tuner.choices.lock().expect("gemm choices lock");
            let untuned = choices
                .iter()
                .filter(|(_, c)| matches!(c, GemmChoice::Untuned))
                .map(|(s, _)| *s)
                .collect();
            // SAFETY: is_culib_present only tries to dlopen cuBLASLt's names.
            if self.tuner.setting == GemmTuning::Off || !unsafe { lt::is_culib_present() } {
                for c in choices.values_mut() {
                    if matches!(c, GemmChoice::Untuned) {
                        *c = GemmChoice::GemmEx;
                    }
                }
                return Ok(());
            }
            untuned
        };
        if untuned.is_empty() {
            return Ok(());
        }
        let (handle, workspace) = self.lt_context()?;
        for shape in untuned {
            let choice = self.fastest(handle, workspace, &shape)?;
            self.tuner
                .choices
                .lock()
                .expect("gemm choices lock")
                .insert(shape, choice);
        }
        Ok(())
    }

    /// cuBLASLt's handle and workspace address, made at the first tune.
    fn lt_context(&self) -> Result<(lt::cublasLtHandle_t, u64)> {
        let mut context = self.tuner.lt.lock().expect("cublasLt lock");
        if context.is_none() {
            let mut handle = std::ptr::null_mut();
            // SAFETY: creates a handle, destroyed by LtContext's Drop.
            lt_check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
            let workspace = self.alloc(WORKSPACE_BYTES / 2, DType::BF16)?;
            *context = Some(LtContext { handle, workspace });
        }
        let c = context.as_ref().expect("made above");
        Ok((c.handle, c.workspace.ptr(&self.stream)))
    }

    /// The fastest way to run `shape` on this device: `cublasGemmEx` or one of cuBLASLt's
    /// candidates, each timed [`ROUNDS`] × [`REPEATS`] times on random operands (median round) —
    /// `cublasGemmEx` untimed when the pool has no cached buffers for the operands.
    fn fastest(
        &self,
        handle: lt::cublasLtHandle_t,
        workspace: u64,
        shape: &GemmShape,
    ) -> Result<GemmChoice> {
        let [a_len, b_len, c_len] = shape.extents();
        let scratch = [
            (a_len, shape.inputs),
            (b_len, shape.inputs),
            (c_len, shape.output),
        ]
        .map(|(len, dtype)| self.alloc_cached(len, dtype));
        let [Some(mut a), Some(mut b), Some(mut c)] = scratch else {
            return Ok(GemmChoice::GemmEx);
        };
        self.fill_random_impl(&mut a, 1, 1.0)?;
        self.fill_random_impl(&mut b, 2, 1.0)?;
        self.memset_zero(&mut c)?;
        let (pa, pb, pc) = (
            a.ptr(&self.stream),
            b.ptr(&self.stream),
            c.ptr(&self.stream),
        );
        let beta = if shape.c_input == CInput::None {
            0.0
        } else {
            1.0
        };
        // A residual product is timed reading C into itself: the same traffic as from another
        // matrix, for every candidate but cublasGemmEx, whose copy of the residual it leaves out —
        // so that one is a candidate only where no cuBLASLt algorithm runs.
        let run = |cand: &GemmChoice| self.run_choice(cand, shape, 1.0, pa, pb, beta, (pc, pc));
        let mut candidates = match shape.c_input {
            CInput::Residual => vec![],
            CInput::None | CInput::Accumulate => vec![GemmChoice::GemmEx],
        };
        candidates.extend(
            LtPlan::candidates(handle, workspace, shape)?
                .into_iter()
                .map(GemmChoice::Lt),
        );
        // A candidate that fails to launch is dropped; warm-up runs first.
        candidates.retain(|cand| run(cand).and_then(|_| run(cand)).is_ok());
        if candidates.is_empty() {
            return Ok(GemmChoice::GemmEx);
        }
        let clock = EventClock::new("time a gemm")?;
        let mut times = vec![Vec::with_capacity(ROUNDS); candidates.len()];
        for _ in 0..ROUNDS {
            let mut events = Vec::with_capacity(candidates.len() + 1);
            events.push(self.timing_event()?);
            for cand in &candidates {
                for _ in 0..REPEATS {
                    run(cand)?;
                }
                events.push(self.timing_event()?);
            }
            for (t, pair) in times.iter_mut().zip(events.windows(2)) {
                t.push(clock.elapsed_ms(&pair[0], &pair[1])?);
            }
        }
        let median = |t: &Vec<f32>| {
            let mut t = t.clone();
            t.sort_by(f32::total_cmp);
            t[t.len() / 2]
        };
        let best = (0..candidates.len())
            .min_by(|&i, &j| median(&times[i]).total_cmp(&median(&times[j])))
            .expect("candidates is not empty");
        Ok(candidates.swap_remove(best))
    }

    fn timing_event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(device_err("record timing event"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_is_on_unless_switched_off() {
        assert_eq!(GemmTuning::parse(None).unwrap(), GemmTuning::On);
        assert_eq!(GemmTuning::parse(Some("")).unwrap(), GemmTuning::On);
        assert_eq!(GemmTuning::parse(Some("on")).unwrap(), GemmTuning::On);
        assert_eq!(GemmTuning::parse(Some("off")).unwrap(), GemmTuning::Off);
        let e = GemmTuning::parse(Some("fast")).unwrap_err().to_string();
        assert!(
            e.contains("FUSELORA_GEMM_TUNING=fast") && e.contains("\"off\""),
            "{e}"
        );
    }
}
