//! Matrix products through cuBLAS (`cublasGemmEx`) with f32 accumulation (`CUBLAS_COMPUTE_32F`):
//! bf16/f16 inputs run on the tensor cores; C may be f32 while A and B are 16-bit (LoRA grads).
//!
//! Our matrices are row-major; cuBLAS's are column-major. A row-major `C[m,n]` is a column-major
//! `Cᵀ[n,m]`, and `Cᵀ = op(B)ᵀ op(A)ᵀ`, so we ask cuBLAS for the product with the operands
//! swapped: first operand B (transposed iff `trans_b`), second A (iff `trans_a`), sizes (n, m, k).
//! Each shape runs `cublasGemmEx` or the cuBLASLt algorithm timed fastest for it (gemm_tuning.rs).

use super::gemm_tuning::{GemmChoice, GemmShape};
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

impl CudaBackend {
    /// `C[m,n] ← alpha · op(A) · op(B) + beta · C` on raw device addresses with their dtypes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (u64, DType),
        trans_a: bool,
        b: (u64, DType),
        trans_b: bool,
        beta: f32,
        c: (u64, DType),
    ) -> Result<()> {
        if a.1 != b.1 {
            return Err(KernelError::Unsupported(format!(
                "gemm: A is {} but B is {}; copy one to the other's dtype first",
                a.1.name(),
                b.1.name()
            )));
        }
        if c.1 != DType::F32 && c.1 != a.1 {
            return Err(KernelError::Unsupported(format!(
                "gemm: C is {} but the inputs are {}; C must be f32 or the inputs' dtype",
                c.1.name(),
                a.1.name()
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
            inputs: a.1,
            output: c.1,
            accumulate: beta != 0.0,
        };
        let name = || {
            let t = |x: bool| if x { 'T' } else { 'N' };
            format!(
                "gemm {m}x{n}x{k} {}{} {}",
                t(trans_a),
                t(trans_b),
                c.1.name()
            )
        };
        self.timed(
            name,
            || 2.0 * m as f64 * n as f64 * k as f64,
            || {
                let mut choices = self.tuner.choices.lock().expect("gemm choices lock");
                let choice = choices.entry(shape).or_insert(GemmChoice::Untuned);
                self.run_choice(choice, &shape, alpha, a.0, b.0, beta, c.0)
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
            ..
        } = *shape;
        let lda = if trans_b { k } else { n };
        let ldb = if trans_a { m } else { k };
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
                lda as i32,
                a as *const _,
                cuda_type(shape.inputs),
                ldb as i32,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                cuda_type(shape.output),
                n as i32,
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
