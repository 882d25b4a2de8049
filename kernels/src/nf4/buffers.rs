//! An NF4 weight held in a backend's buffers: what [`crate::Backend::quantize_nf4`] makes and
//! [`crate::Backend::dequantize_nf4`] reads (through [`Nf4Buffers::absmax`]).

use super::{bytes_to_words, Absmax, Nf4Weight, DYNAMIC_MAP};
use crate::{Backend, DType, Nf4Absmax, Result};

/// Packed codes and absmax of one NF4 weight on a backend.
pub struct Nf4Buffers<T, I> {
    /// The `ceil(n / 2)` packed bytes as little-endian i32 words ([`bytes_to_words`]).
    pub packed: I,
    pub absmax: AbsmaxBuffers<T, I>,
}

/// A weight's per-block absmax on a backend (f32 tensors whatever the compute dtype).
pub enum AbsmaxBuffers<T, I> {
    /// One f32 per 64-element block.
    Plain(T),
    /// Double quantization: one 8-bit code per block (in i32 words), one f32 scale per 256 blocks,
    /// the dynamic map `[256]` and the offset (see [`super::double_quant`]).
    Double {
        codes: I,
        nested_absmax: T,
        map: T,
        offset: f32,
    },
}

impl<T, I> Nf4Buffers<T, I> {
    /// Uploads a host NF4 weight.
    pub fn upload<B: Backend<Tensor = T, Indices = I>>(be: &B, w: &Nf4Weight) -> Result<Self> {
        let absmax = match &w.absmax {
            Absmax::Plain(a) => AbsmaxBuffers::Plain(be.upload(a, DType::F32)?),
            Absmax::Double(d) => AbsmaxBuffers::Double {
                codes: be.upload_indices(&bytes_to_words(&d.codes))?,
                nested_absmax: be.upload(&d.nested_absmax, DType::F32)?,
                map: be.upload(&DYNAMIC_MAP, DType::F32)?,
                offset: d.offset,
            },
        };
        Ok(Nf4Buffers {
            packed: be.upload_indices(&bytes_to_words(&w.packed))?,
            absmax,
        })
    }

    /// The absmax as [`crate::Backend::dequantize_nf4`] takes it.
    pub fn absmax(&self) -> Nf4Absmax<'_, T, I> {
        match &self.absmax {
            AbsmaxBuffers::Plain(a) => Nf4Absmax::Plain(a),
            AbsmaxBuffers::Double {
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
        }
    }
}
