//! A frozen projection weight on the device: dense in the compute dtype, or NF4 4-bit (QLoRA).
//! An NF4 weight stays 4-bit between uses; [`ProjWeight::with_dense`] dequantizes it into a
//! scratch tensor for one GEMM (`W'[i] = c[code[i]] · A[i / 64]`, tests/fixtures/README.md §8.1)
//! and frees it afterwards, so only one dense projection exists at a time — except where the
//! caller keeps it for the weight's next product ([`Dequantized::KeptForNext`]): a recomputed
//! layer's backward follows its recomputation at once and needs the same weights again.
//!
//! Folding ([`ProjWeight::fold`]): when every projection of an input group is adapted, the
//! group's LoRA term joins the frozen product. The dense form is used padded, rows
//! `[W | pad]` of `in + width` (`width = members · r`), the pad holding this member's `B` in
//! its own `r` columns and zeros in the others'; with the group's input laid out
//! `x' = [x | t]` (`t = s · x A_gᵀ`, every member's columns), one product gives
//! `x' W'ᵀ = x Wᵀ + t_p Bᵀ` (Hu et al. 2021, eq. 3) — the skinny `t_p Bᵀ` product, which
//! reads and writes the wide output once more, is gone. A dense weight is stored padded and its
//! pad rewritten when the adapter's compute copies change ([`PadSource::version`]); an NF4
//! weight is dequantized into padded rows, its pad written by the same dequantization.

use crate::lora::{LoraParams, LoraSlot};
use anyhow::Result;
use kernels::nf4::{Nf4Buffers, Nf4Weight};
use kernels::{Backend, LoraPad, MatAt, Placement};
use std::sync::{Mutex, MutexGuard};

/// Quantize a dense checkpoint's projections to NF4 at load (`[model] quantize = "nf4"`). As
/// JSON: `{"format": "nf4", "double_quant": true}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "format", rename = "nf4")]
pub struct QuantizeNf4 {
    /// Store each block's absmax in 8 bits too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

/// A projection's `[out, in]` weight, dense or NF4, folded or not ([`FoldLayout`]).
pub struct ProjWeight<B: Backend> {
    stored: Stored<B>,
    fold: Option<FoldLayout>,
}

enum Stored<B: Backend> {
    Dense(Mutex<DenseWeight<B>>),
    Nf4(Nf4Tensor<B>),
}

/// `[out, in]`, or `[out, in + width]` when folded, its pad holding the B of compute-copy
/// version `pad_holds` (`None`: zeros).
struct DenseWeight<B: Backend> {
    w: B::Tensor,
    pad_holds: Option<u64>,
}

/// How a folded weight's dense rows are laid out: `[W | pad]`, `in_f + width` long, this member's
/// `B [out, rank]` in pad columns `block .. block + rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldLayout {
    pub out_f: usize,
    pub in_f: usize,
    pub width: usize,
    pub block: usize,
    pub rank: usize,
}

impl FoldLayout {
    /// Elements between rows.
    pub fn ld(&self) -> usize {
        self.in_f + self.width
    }

    /// The pad of this member's rows: its `B [out, rank]` from `src` in its block, zeros in the
    /// other members' blocks.
    fn pad_from<'a, B: Backend>(&self, src: &PadSource<'a, B>) -> LoraPad<'a, B::Tensor> {
        LoraPad {
            b: src.compute,
            b_at: MatAt::at(src.b_at, self.rank),
            block: self.block..self.block + self.rank,
        }
    }
}

/// Where a folded weight's pad comes from: its member's `B [out, rank]` at `b_at` of the
/// adapter's compute tensor, at compute-copy `version` ([`crate::lora::LoraParams::compute_version`]).
#[derive(Clone, Copy)]
pub struct PadSource<'a, B: Backend> {
    pub compute: &'a B::Tensor,
    pub b_at: usize,
    pub version: u64,
}

impl<'a, B: Backend> PadSource<'a, B> {
    /// The B of `layer`'s adapted projection in `slot`, as `lora`'s compute copies hold it now.
    pub fn of(lora: &'a LoraParams<B>, layer: usize, slot: LoraSlot) -> Self {
        PadSource {
            compute: lora.compute(),
            b_at: slot.b_at,
            version: lora.compute_version(layer),
        }
    }
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

/// A dense weight as a product reads it: `[out, in]`, or padded rows as `padded` says.
pub struct DenseView<'a, B: Backend> {
    pub w: &'a B::Tensor,
    pub padded: Option<FoldLayout>,
}

impl<B: Backend> DenseView<'_, B> {
    /// `W [out, in_f]` inside the tensor (the padded rows' first `in_f` columns when padded).
    pub fn w_at(&self, in_f: usize) -> MatAt {
        MatAt::at(0, self.padded.map_or(in_f, |f| f.ld()))
    }
}

/// An NF4 weight on the device: packed codes and absmax as [`Backend::dequantize_nf4`] takes them.
pub struct Nf4Tensor<B: Backend> {
    n: usize,
    buffers: Nf4Buffers<B::Tensor, B::Indices>,
    /// The dense copy a product kept for the next ([`Dequantized::KeptForNext`]), padded or not.
    kept: Mutex<Option<(B::Tensor, Option<FoldLayout>)>>,
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

    /// `out ← W'` in `out`'s dtype, rows of `cols` elements `ld` apart, the columns after `cols`
    /// holding `pad` (untouched without one).
    pub fn dequantize_into(
        &self,
        be: &B,
        cols: usize,
        ld: usize,
        pad: Option<LoraPad<'_, B::Tensor>>,
        out: &mut B::Tensor,
    ) -> Result<()> {
        let absmax = self.buffers.absmax();
        be.dequantize_nf4(&self.buffers.packed, absmax, cols, ld, pad, out)?;
        Ok(())
    }
}

/// A folded dense weight whose pad does not hold its B's compute copy at `src`'s version yet,
/// locked until [`write_pads`] rewrites it ([`ProjWeight::stale_pad`]).
pub struct StalePad<'a, B: Backend> {
    dense: MutexGuard<'a, DenseWeight<B>>,
    layout: FoldLayout,
    src: PadSource<'a, B>,
}

/// Each stale pad's columns `← [0 … B … 0]` (its member's B in its block, zeros in the others'),
/// all in one [`Backend::place_blocks`].
pub fn write_pads<B: Backend>(be: &B, stale: &mut [StalePad<'_, B>]) -> Result<()> {
    let mut placements: Vec<Placement<'_, B::Tensor>> = stale
        .iter_mut()
        .map(|p| {
            let (f, pad) = (p.layout, p.layout.pad_from(&p.src));
            Placement {
                rows: f.out_f,
                width: f.width,
                block: pad.block,
                src: (pad.b, pad.b_at),
                dst: (&mut p.dense.w, MatAt::at(f.in_f, f.ld())),
            }
        })
        .collect();
    be.place_blocks(&mut placements)?;
    drop(placements);
    for p in stale {
        p.dense.pad_holds = Some(p.src.version);
    }
    Ok(())
}

impl<B: Backend> ProjWeight<B> {
    /// `w` itself, or its NF4 quantization with `w` freed as soon as it is quantized.
    pub fn from_dense(be: &B, w: B::Tensor, quantize: Option<QuantizeNf4>) -> Result<Self> {
        Ok(match quantize {
            Some(q) => Self::nf4(Nf4Tensor::quantize(be, &w, q)?),
            None => ProjWeight {
                stored: Stored::Dense(Mutex::new(DenseWeight { w, pad_holds: None })),
                fold: None,
            },
        })
    }

    /// An NF4 weight.
    pub fn nf4(w: Nf4Tensor<B>) -> Self {
        ProjWeight {
            stored: Stored::Nf4(w),
            fold: None,
        }
    }

    /// The folded layout, when [`ProjWeight::fold`] set one.
    pub fn fold_layout(&self) -> Option<FoldLayout> {
        self.fold
    }

    /// Lays the weight out for folding as `f` says (a dense weight is copied into padded rows,
    /// the pad zero until its first [`ProjWeight::with_dense`] with a [`PadSource`]).
    pub fn fold(&mut self, be: &B, f: FoldLayout) -> Result<()> {
        if self.fold == Some(f) {
            return Ok(());
        }
        if let Stored::Dense(dense) = &mut self.stored {
            let dense = dense.get_mut().expect("dense weight");
            let ld = self.fold.map_or(f.in_f, |old| old.ld());
            let mut padded = be.empty(f.out_f * f.ld(), be.compute_dtype())?;
            be.place_block(
                f.out_f,
                f.ld(),
                0..f.in_f,
                (&dense.w, MatAt::at(0, ld)),
                (&mut padded, MatAt::dense(f.ld())),
            )?;
            *dense = DenseWeight {
                w: padded,
                pad_holds: None,
            };
        }
        self.fold = Some(f);
        Ok(())
    }

    /// This weight's pad, locked, when it is a folded dense weight whose pad does not hold the B
    /// of `src`'s version (for [`write_pads`]); `None` for an NF4 weight, whose dequantization
    /// writes the pad each time.
    pub fn stale_pad<'a>(&'a self, src: PadSource<'a, B>) -> Option<StalePad<'a, B>> {
        let (Some(layout), Stored::Dense(dense)) = (self.fold, &self.stored) else {
            return None;
        };
        let dense = dense.lock().expect("dense weight");
        (dense.pad_holds != Some(src.version)).then_some(StalePad { dense, layout, src })
    }

    /// The compute-copy version a dense weight's pad holds (`None`: zeros, or not dense).
    #[cfg(test)]
    pub(crate) fn pad_version(&self) -> Option<u64> {
        match &self.stored {
            Stored::Dense(dense) => dense.lock().expect("dense weight").pad_holds,
            Stored::Nf4(_) => None,
        }
    }

    /// Whether a product kept an NF4 dense copy that no later product has taken yet.
    #[cfg(test)]
    pub(crate) fn holds_kept_copy(&self) -> bool {
        matches!(&self.stored, Stored::Nf4(q) if q.kept.lock().expect("kept dense copy").is_some())
    }

    /// Runs `f` on the dense weight ([`DenseView`]): the tensor itself, or `W'` — the copy an
    /// earlier product kept, or dequantized now — freed afterwards or kept for the next product
    /// (`after`). With `pad` (a folded weight's product), the rows are the padded ones with the
    /// pad holding `pad`'s B; without, the rows may be padded or not (`padded`), the pad anything.
    pub fn with_dense<R>(
        &self,
        be: &B,
        after: Dequantized,
        pad: Option<PadSource<'_, B>>,
        f: impl FnOnce(DenseView<'_, B>) -> Result<R>,
    ) -> Result<R> {
        let fold = self.fold.filter(|_| pad.is_some());
        match &self.stored {
            Stored::Dense(dense) => {
                if let Some(mut stale) = pad.and_then(|src| self.stale_pad(src)) {
                    write_pads(be, std::slice::from_mut(&mut stale))?;
                }
                let dense = dense.lock().expect("dense weight");
                f(DenseView {
                    w: &dense.w,
                    padded: self.fold,
                })
            }
            Stored::Nf4(q) => {
                let kept = q.kept.lock().expect("kept dense copy").take();
                let (w, padded) = match kept {
                    // A padded product needs the pad; any other reads the first columns.
                    Some((w, padded)) if fold.is_none() || padded == fold => (w, padded),
                    _ => {
                        let (cols, ld) = fold.map_or((q.n, q.n), |fl| (fl.in_f, fl.ld()));
                        let mut w = be.empty(q.n / cols * ld, be.compute_dtype())?;
                        let lora_pad = fold.zip(pad.as_ref()).map(|(fl, src)| fl.pad_from(src));
                        q.dequantize_into(be, cols, ld, lora_pad, &mut w)?;
                        (w, fold)
                    }
                };
                let r = f(DenseView { w: &w, padded })?;
                if after == Dequantized::KeptForNext {
                    *q.kept.lock().expect("kept dense copy") = Some((w, padded));
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
            q.dequantize_into(&be, x.len(), x.len(), None, &mut dense)
                .unwrap();
            assert_eq!(dense, want.dequantize());
        }
    }

    /// The dense rows `with_dense` hands a product, as a host copy, and whether they are padded.
    fn dense_of(
        w: &ProjWeight<CpuBackend>,
        pad: Option<PadSource<'_, CpuBackend>>,
    ) -> (Vec<f32>, bool) {
        w.with_dense(&CpuBackend::new(), Dequantized::Dropped, pad, |d| {
            Ok((d.w.clone(), d.padded.is_some()))
        })
        .unwrap()
    }

    #[test]
    fn from_dense_keeps_or_quantizes_the_weight() {
        let be = CpuBackend::new();
        let x = bf16_values(4096);
        let kept = ProjWeight::from_dense(&be, x.clone(), None).unwrap();
        assert_eq!(dense_of(&kept, None), (x.clone(), false));
        let q = QuantizeNf4 { double_quant: true };
        let w = ProjWeight::from_dense(&be, x.clone(), Some(q)).unwrap();
        let (got, _) = dense_of(&w, None);
        assert_eq!(got, Nf4Weight::quantize(&x, true).dequantize());
        assert_ne!(
            got, x,
            "NF4 rounds every weight to one of 16 levels per block"
        );
    }

    /// `rows` of `w [rows, in_f]` each followed by `pad(row)`.
    fn padded_rows(w: &[f32], in_f: usize, pad: impl Fn(usize) -> Vec<f32>) -> Vec<f32> {
        w.chunks(in_f)
            .enumerate()
            .flat_map(|(row, r)| r.iter().copied().chain(pad(row)).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn a_folded_weight_holds_its_members_b_in_its_pad_block_and_zeros_elsewhere() {
        let be = CpuBackend::new();
        let (out_f, in_f, rank) = (8, 128, 2);
        let f = FoldLayout {
            out_f,
            in_f,
            width: 3 * rank,
            block: rank,
            rank,
        };
        let x = bf16_values(out_f * in_f);
        // The compute tensor: 5 leading values, then this member's B [out, rank].
        let b: Vec<f32> = (0..out_f * rank).map(|i| i as f32 + 0.5).collect();
        let mut compute: Vec<f32> = vec![9.0; 5].into_iter().chain(b.clone()).collect();
        let pad_of = |b: &[f32]| {
            let b = b.to_vec();
            move |row: usize| {
                let mut p = vec![0.0; 3 * rank];
                p[rank..2 * rank].copy_from_slice(&b[row * rank..(row + 1) * rank]);
                p
            }
        };
        for quantize in [None, Some(QuantizeNf4 { double_quant: true })] {
            let mut w = ProjWeight::from_dense(&be, x.clone(), quantize).unwrap();
            let (w0, _) = dense_of(&w, None);
            w.fold(&be, f).unwrap();
            fn src(compute: &Vec<f32>, version: u64) -> PadSource<'_, CpuBackend> {
                PadSource {
                    compute,
                    b_at: 5,
                    version,
                }
            }
            assert_eq!(
                dense_of(&w, Some(src(&compute, 1))),
                (padded_rows(&w0, in_f, pad_of(&b)), true),
                "{quantize:?}"
            );
            // Without a pad source a product reads only W: an NF4 copy is not padded.
            let (plain, padded) = dense_of(&w, None);
            assert_eq!(padded, quantize.is_none());
            if quantize.is_some() {
                assert_eq!(plain, w0);
            }
            // A new version of the compute copies rewrites the pad; the same version does not
            // (a dense weight keeps its pad; an NF4 copy is written anew each time).
            let b2: Vec<f32> = b.iter().map(|v| -v).collect();
            compute[5..].copy_from_slice(&b2);
            let (same, _) = dense_of(&w, Some(src(&compute, 1)));
            let stale = if quantize.is_none() { &b } else { &b2 };
            assert_eq!(same, padded_rows(&w0, in_f, pad_of(stale)));
            let (fresh, _) = dense_of(&w, Some(src(&compute, 2)));
            assert_eq!(fresh, padded_rows(&w0, in_f, pad_of(&b2)));
            compute[5..].copy_from_slice(&b);
        }
    }

    #[test]
    fn a_kept_dense_copy_serves_the_next_product_once() {
        let be = CpuBackend::new();
        let x = bf16_values(4096);
        let want = Nf4Weight::quantize(&x, true).dequantize();
        let q = QuantizeNf4 { double_quant: true };
        let w = ProjWeight::from_dense(&be, x, Some(q)).unwrap();
        let Stored::Nf4(nf4) = &w.stored else {
            panic!("quantized at load")
        };
        let first = w
            .with_dense(&be, Dequantized::KeptForNext, None, |d| Ok(d.w.clone()))
            .unwrap();
        assert_eq!(first, want);
        let kept = nf4.kept.lock().unwrap().clone();
        assert_eq!(kept, Some((want.clone(), None)), "kept after the product");
        // The next product takes the kept copy (a sentinel value shows it is not dequantized again)
        // and, dropping it, leaves nothing behind.
        *nf4.kept.lock().unwrap() = Some((vec![7.0; want.len()], None));
        let second = w
            .with_dense(&be, Dequantized::Dropped, None, |d| Ok(d.w[0]))
            .unwrap();
        assert_eq!(second, 7.0);
        assert!(nf4.kept.lock().unwrap().is_none());
        let (third, _) = dense_of(&w, None);
        assert_eq!(third, want);
    }
}
