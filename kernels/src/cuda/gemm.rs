//! Matrix products through cuBLAS (`cublasGemmEx`) with f32 accumulation (`CUBLAS_COMPUTE_32F`):
//! bf16/f16 inputs run on the tensor cores; C may be f32 while A and B are 16-bit (LoRA grads).
//!
//! Our matrices are row-major; cuBLAS's are column-major. A row-major `C[m,n]` is a column-major
//! `Cᵀ[n,m]`, and `Cᵀ = op(B)ᵀ op(A)ᵀ`, so we ask cuBLAS for the product with the operands
//! swapped: first operand B (transposed iff `trans_b`), second A (iff `trans_a`), sizes (n, m, k).
//! Each shape runs `cublasGemmEx` or the cuBLASLt algorithm timed fastest for it (gemm_tuning.rs).

use super::gemm_tuning::{CInput, GemmChoice, GemmShape};
use super::CudaBackend;
use crate::{DType, KernelError, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};

fn cuda_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F16 => cudaDataType::CUDA_R_16F,
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// One operand of [`CudaBackend::gemm_raw`]: the device address of its first element, its dtype
/// and the elements between its rows (row-major).
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub ld: usize,
}

impl Operand {
    /// A dense row-major matrix with rows `cols` long at `ptr`.
    pub fn dense(ptr: u64, dtype: DType, cols: usize) -> Self {
        Operand {
            ptr,
            dtype,
            ld: cols,
        }
    }
}

impl CudaBackend {
    /// `C[m,n] ← alpha · op(A) · op(B) + beta · C` on raw device operands.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        trans_a: bool,
        b: Operand,
        trans_b: bool,
        beta: f32,
        c: Operand,
    ) -> Result<()> {
        let c_input = if beta != 0.0 {
            CInput::Accumulate
        } else {
            CInput::None
        };
        self.gemm_raw_from(
            m,
            n,
            k,
            alpha,
            (a, trans_a),
            (b, trans_b),
            beta,
            (c_input, c.ptr),
            c,
        )
    }

    /// [`CudaBackend::gemm_raw`] with C read from `c_in` (`CInput::Residual`: another matrix of
    /// C's layout, beta 1) or from C itself.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_raw_from(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        (a, trans_a): (Operand, bool),
        (b, trans_b): (Operand, bool),
        beta: f32,
        (c_input, c_in): (CInput, u64),
        c: Operand,
    ) -> Result<()> {
        if a.dtype != b.dtype {
            return Err(KernelError::Unsupported(format!(
                "gemm: A is {} but B is {}; copy one to the other's dtype first",
                a.dtype.name(),
                b.dtype.name()
            )));
        }
        if c.dtype != DType::F32 && c.dtype != a.dtype {
            return Err(KernelError::Unsupported(format!(
                "gemm: C is {} but the inputs are {}; C must be f32 or the inputs' dtype",
                c.dtype.name(),
                a.dtype.name()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let shape = GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
            inputs: a.dtype,
            output: c.dtype,
            c_input,
            lds: [a.ld, b.ld, c.ld],
            aligned: [a.ptr, b.ptr, c.ptr, c_in].iter().all(|p| p % 16 == 0),
        };
        let name = || {
            let t = |x: bool| if x { 'T' } else { 'N' };
            let residual = if c_input == CInput::Residual {
                " +residual"
            } else {
                ""
            };
            format!(
                "gemm {m}x{n}x{k} {}{} {}{residual}",
                t(trans_a),
                t(trans_b),
                c.dtype.name()
            )
        };
        self.timed(
            name,
            || 2.0 * m as f64 * n as f64 * k as f64,
            || {
                let mut choices = self.tuner.choices.lock().expect("gemm choices lock");
                let choice = choices.entry(shape).or_insert(if shape.aligned {
                    GemmChoice::Untuned
                } else {
                    GemmChoice::GemmEx
                });
                self.run_choice(choice, &shape, alpha, a.ptr, b.ptr, beta, (c_in, c.ptr))
            },
        )
    }

    /// `shape`'s product through `cublasGemmEx` on the compute stream, operands swapped to
    /// column-major (the top of this file).
    pub(crate) fn run_gemm_ex(
        &self,
        shape: &GemmShape,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
    ) -> Result<()> {
        let GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lds: [ld_a, ld_b, ld_c],
            ..
        } = *shape;
        // SAFETY: the caller's addresses hold the operands of `shape` in their dtypes.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(trans_b),
                op(trans_a),
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                cuda_type(shape.inputs),
                ld_b as i32,
                a as *const _,
                cuda_type(shape.inputs),
                ld_a as i32,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                cuda_type(shape.output),
                ld_c as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Device {
            op: "gemm",
            message: format!("cublasGemmEx (m={m} n={n} k={k}): {e:?}"),
        })
    }
}
