//! NF4 dequantization on the GPU (kernels/cuda/nf4.cu): one thread per packed byte, writing the
//! compute dtype directly, so a 4-bit weight becomes a dense GEMM operand in one pass.

use super::launch::Arg;
use super::{suffix, CudaBackend, CudaIndices, CudaTensor};
use crate::error::check_len;
use crate::nf4::{double_quant::NESTED_BLOCK, n_blocks};
use crate::{DType, Nf4Absmax, Result};

impl CudaBackend {
    pub(crate) fn dequantize_nf4_impl(
        &self,
        packed: &CudaIndices,
        absmax: Nf4Absmax<'_, CudaTensor, CudaIndices>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let n = out.len();
        let bytes = n.div_ceil(2);
        let blocks = n_blocks(n);
        check_len(
            "dequantize_nf4",
            "packed words",
            packed.len(),
            bytes.div_ceil(4),
        )?;
        if n == 0 {
            return Ok(());
        }
        let grid = (bytes.div_ceil(256) as u32, 1, 1);
        let dt = suffix(out.dtype);
        match absmax {
            Nf4Absmax::Plain(a) => {
                check_len("dequantize_nf4", "absmax", a.len(), blocks)?;
                self.require_dtype("dequantize_nf4", "absmax", a, DType::F32)?;
                self.launch(
                    &format!("nf4_dequantize_plain_{dt}"),
                    grid,
                    256,
                    0,
                    &[self.pi(packed), self.p(a), self.p(out), Arg::U64(n as u64)],
                )
            }
            Nf4Absmax::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => {
                check_len(
                    "dequantize_nf4",
                    "absmax code words",
                    codes.len(),
                    blocks.div_ceil(4),
                )?;
                check_len(
                    "dequantize_nf4",
                    "nested absmax",
                    nested_absmax.len(),
                    blocks.div_ceil(NESTED_BLOCK),
                )?;
                check_len("dequantize_nf4", "nested map", map.len(), 256)?;
                self.require_dtype("dequantize_nf4", "nested absmax", nested_absmax, DType::F32)?;
                self.require_dtype("dequantize_nf4", "nested map", map, DType::F32)?;
                self.launch(
                    &format!("nf4_dequantize_double_{dt}"),
                    grid,
                    256,
                    0,
                    &[
                        self.pi(packed),
                        self.pi(codes),
                        self.p(nested_absmax),
                        self.p(map),
                        Arg::F32(offset),
                        self.p(out),
                        Arg::U64(n as u64),
                    ],
                )
            }
        }
    }
}
