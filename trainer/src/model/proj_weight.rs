//! A frozen projection weight on the device: dense in the compute dtype, or NF4 4-bit (QLoRA).
//! An NF4 weight stays 4-bit between uses; [`ProjWeight::with_dense`] dequantizes it into a
//! scratch tensor for one GEMM (`W'[i] = c[code[i]] · A[i / 64]`, tests/fixtures/README.md §8.1)
//! and frees it afterwards, so only one dense projection exists at a time.

use anyhow::Result;
use kernels::nf4::{self, Absmax, Nf4Weight, DYNAMIC_MAP};
use kernels::{Backend, DType, Nf4Absmax};

/// Quantize a dense checkpoint's projections to NF4 at load (`[model] quantize = "nf4"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizeNf4 {
    /// Store each block's absmax in 8 bits too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

/// A projection's `[out, in]` weight.
pub enum ProjWeight<B: Backend> {
    Dense(B::Tensor),
    Nf4(Nf4Tensor<B>),
}

/// An NF4 weight on the device: packed codes and absmax as [`Backend::dequantize_nf4`] takes them.
pub struct Nf4Tensor<B: Backend> {
    n: usize,
    /// The packed bytes in i32 words.
    packed: B::Indices,
    absmax: DeviceAbsmax<B>,
}

enum DeviceAbsmax<B: Backend> {
    Plain(B::Tensor),
    Double {
        codes: B::Indices,
        nested_absmax: B::Tensor,
        map: B::Tensor,
        offset: f32,
    },
}

impl<B: Backend> Nf4Tensor<B> {
    /// Uploads a host NF4 weight (absmax tables stay f32 whatever the compute dtype).
    pub fn upload(be: &B, w: &Nf4Weight) -> Result<Self> {
        let absmax = match &w.absmax {
            Absmax::Plain(a) => DeviceAbsmax::Plain(be.upload(a, DType::F32)?),
            Absmax::Double(d) => DeviceAbsmax::Double {
                codes: be.upload_indices(&nf4::bytes_to_words(&d.codes))?,
                nested_absmax: be.upload(&d.nested_absmax, DType::F32)?,
                map: be.upload(&DYNAMIC_MAP, DType::F32)?,
                offset: d.offset,
            },
        };
        Ok(Nf4Tensor {
            n: w.n,
            packed: be.upload_indices(&nf4::bytes_to_words(&w.packed))?,
            absmax,
        })
    }

    /// `out ← W'` in `out`'s dtype.
    pub fn dequantize_into(&self, be: &B, out: &mut B::Tensor) -> Result<()> {
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(a) => Nf4Absmax::Plain(a),
            DeviceAbsmax::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => Nf4Absmax::Double {
                codes,
                nested_absmax,
                map,
                offset: *offset,
            },
        };
        be.dequantize_nf4(&self.packed, absmax, out)?;
        Ok(())
    }
}

impl<B: Backend> ProjWeight<B> {
    /// Runs `f` on the dense weight: the tensor itself, or `W'` dequantized for this call only.
    pub fn with_dense<R>(&self, be: &B, f: impl FnOnce(&B::Tensor) -> Result<R>) -> Result<R> {
        match self {
            ProjWeight::Dense(w) => f(w),
            ProjWeight::Nf4(q) => {
                let mut w = be.zeros(q.n, be.compute_dtype())?;
                q.dequantize_into(be, &mut w)?;
                f(&w)
            }
        }
    }
}
