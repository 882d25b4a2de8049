//! A frozen projection weight on the device: dense in the compute dtype, or NF4 4-bit (QLoRA).
//! An NF4 weight stays 4-bit between uses; [`ProjWeight::with_dense`] dequantizes it into a
//! scratch tensor for one GEMM (`W'[i] = c[code[i]] · A[i / 64]`, tests/fixtures/README.md §8.1)
//! and frees it afterwards, so only one dense projection exists at a time — except where the
//! caller keeps it for the weight's next product ([`Dequantized::KeptForNext`]): a recomputed
//! layer's backward follows its recomputation at once and needs the same weights again.

use anyhow::Result;
use kernels::nf4::{Nf4Buffers, Nf4Weight};
use kernels::Backend;
use std::sync::Mutex;

/// Quantize a dense checkpoint's projections to NF4 at load (`[model] quantize = "nf4"`). As
/// JSON: `{"format": "nf4", "double_quant": true}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "format", rename = "nf4")]
pub struct QuantizeNf4 {
    /// Store each block's absmax in 8 bits too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

/// A projection's `[out, in]` weight.
pub enum ProjWeight<B: Backend> {
    Dense(B::Tensor),
    Nf4(Nf4Tensor<B>),
}

/// What becomes of an NF4 weight's dequantized copy after a product ([`ProjWeight::with_dense`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dequantized {
    /// Freed at once.
    Dropped,
    /// Kept until the weight's next product, which uses it instead of dequantizing again (the
    /// weight is frozen, so the copy stays exact): one projection's dense copy of memory held
    /// in between, for one dequantization (~40 µs at Llama-2-7B's MLP shapes) saved.
    KeptForNext,
}

/// An NF4 weight on the device: packed codes and absmax as [`Backend::dequantize_nf4`] takes them.
pub struct Nf4Tensor<B: Backend> {
    n: usize,
    buffers: Nf4Buffers<B::Tensor, B::Indices>,
    /// The dense copy a product kept for the next ([`Dequantized::KeptForNext`]).
    kept: Mutex<Option<B::Tensor>>,
}

impl<B: Backend> Nf4Tensor<B> {
    /// Uploads a host NF4 weight (absmax tables stay f32 whatever the compute dtype).
    pub fn upload(be: &B, w: &Nf4Weight) -> Result<Self> {
        Ok(Nf4Tensor {
            n: w.n,
            buffers: Nf4Buffers::upload(be, w)?,
            kept: Mutex::new(None),
        })
    }

    /// Quantizes a dense weight on the backend ([`Backend::quantize_nf4`], bit for bit the host
    /// quantizer); the caller drops `dense` afterwards.
    pub fn quantize(be: &B, dense: &B::Tensor, q: QuantizeNf4) -> Result<Self> {
        Ok(Nf4Tensor {
            n: be.len(dense),
            buffers: be.quantize_nf4(dense, q.double_quant)?,
            kept: Mutex::new(None),
        })
    }

    /// `out ← W'` in `out`'s dtype.
    pub fn dequantize_into(&self, be: &B, out: &mut B::Tensor) -> Result<()> {
        be.dequantize_nf4(&self.buffers.packed, self.buffers.absmax(), out)?;
        Ok(())
    }
}

impl<B: Backend> ProjWeight<B> {
    /// `w` itself, or its NF4 quantization with `w` freed as soon as it is quantized.
    pub fn from_dense(be: &B, w: B::Tensor, quantize: Option<QuantizeNf4>) -> Result<Self> {
        Ok(match quantize {
            Some(q) => ProjWeight::Nf4(Nf4Tensor::quantize(be, &w, q)?),
            None => ProjWeight::Dense(w),
        })
    }

    /// Whether a product kept an NF4 dense copy that no later product has taken yet.
    #[cfg(test)]
    pub(crate) fn holds_kept_copy(&self) -> bool {
        matches!(self, ProjWeight::Nf4(q) if q.kept.lock().expect("kept dense copy").is_some())
    }

    /// Runs `f` on the dense weight: the tensor itself, or `W'` — the copy an earlier product
    /// kept, or dequantized now — freed afterwards or kept for the next product (`after`).
    pub fn with_dense<R>(
        &self,
        be: &B,
        after: Dequantized,
        f: impl FnOnce(&B::Tensor) -> Result<R>,
    ) -> Result<R> {
        match self {
            ProjWeight::Dense(w) => f(w),
            ProjWeight::Nf4(q) => {
                let w = match q.kept.lock().expect("kept dense copy").take() {
                    Some(w) => w,
                    None => {
                        let mut w = be.empty(q.n, be.compute_dtype())?;
                        q.dequantize_into(be, &mut w)?;
                        w
                    }
                };
                let r = f(&w)?;
                if after == Dequantized::KeptForNext {
                    *q.kept.lock().expect("kept dense copy") = Some(w);
                }
                Ok(r)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cpu::CpuBackend;
    use kernels::nf4::{bytes_to_words, Absmax, AbsmaxBuffers};
    use kernels::DType;

    /// Values a bf16 checkpoint can hold (so uploading them as bf16 changes nothing).
    fn bf16_values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.08;
                f32::from_bits(v.to_bits() & 0xffff_0000)
            })
            .collect()
    }

    #[test]
    fn quantizing_on_the_backend_gives_the_host_quantizers_buffers_and_weight() {
        let be = CpuBackend::new();
        let x = bf16_values(64 * 300 + 17);
        for double_quant in [false, true] {
            let want = Nf4Weight::quantize(&x, double_quant);
            let dense = be.upload(&x, DType::BF16).unwrap();
            let q = Nf4Tensor::quantize(&be, &dense, QuantizeNf4 { double_quant }).unwrap();
            assert_eq!(q.n, x.len());
            assert_eq!(q.buffers.packed, bytes_to_words(&want.packed));
            match (&q.buffers.absmax, &want.absmax) {
                (AbsmaxBuffers::Plain(a), Absmax::Plain(b)) => assert_eq!(a, b),
                (
                    AbsmaxBuffers::Double {
                        codes,
                        nested_absmax,
                        offset,
                        ..
                    },
                    Absmax::Double(d),
                ) => {
                    assert_eq!(codes, &bytes_to_words(&d.codes));
                    assert_eq!(nested_absmax, &d.nested_absmax);
                    assert_eq!(offset.to_bits(), d.offset.to_bits());
                }
                _ => panic!("absmax storage differs (double_quant = {double_quant})"),
            }
            let mut dense = vec![0.0; x.len()];
            q.dequantize_into(&be, &mut dense).unwrap();
            assert_eq!(dense, want.dequantize());
        }
    }

    #[test]
    fn from_dense_keeps_or_quantizes_the_weight() {
        let be = CpuBackend::new();
        let x = bf16_values(4096);
        let ProjWeight::Dense(kept) = ProjWeight::from_dense(&be, x.clone(), None).unwrap() else {
            panic!("no quantization asked: the weight stays dense");
        };
        assert_eq!(kept, x);
        let q = QuantizeNf4 { double_quant: true };
        let w = ProjWeight::from_dense(&be, x.clone(), Some(q)).unwrap();
        let got = w
            .with_dense(&be, Dequantized::Dropped, |d| Ok(d.clone()))
            .unwrap();
        assert_eq!(got, Nf4Weight::quantize(&x, true).dequantize());
        assert_ne!(
            got, x,
            "NF4 rounds every weight to one of 16 levels per block"
        );
    }

    #[test]
    fn a_kept_dense_copy_serves_the_next_product_once() {
        let be = CpuBackend::new();
        let x = bf16_values(4096);
        let want = Nf4Weight::quantize(&x, true).dequantize();
        let q = QuantizeNf4 { double_quant: true };
        let w = ProjWeight::from_dense(&be, x, Some(q)).unwrap();
        let ProjWeight::Nf4(nf4) = &w else {
            panic!("quantized at load")
        };
        let first = w
            .with_dense(&be, Dequantized::KeptForNext, |d| Ok(d.clone()))
            .unwrap();
        assert_eq!(first, want);
        let kept = nf4.kept.lock().unwrap().clone();
        assert_eq!(kept.as_ref(), Some(&want), "kept after the product");
        // The next product takes the kept copy (a sentinel value shows it is not dequantized again)
        // and, dropping it, leaves nothing behind.
        *nf4.kept.lock().unwrap() = Some(vec![7.0; want.len()]);
        let second = w
            .with_dense(&be, Dequantized::Dropped, |d| Ok(d[0]))
            .unwrap();
        assert_eq!(second, 7.0);
        assert!(nf4.kept.lock().unwrap().is_none());
        let third = w
            .with_dense(&be, Dequantized::Dropped, |d| Ok(d.clone()))
            .unwrap();
        assert_eq!(third, want);
    }
}
