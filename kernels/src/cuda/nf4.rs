//! NF4 on the GPU: quantization (kernels/cuda/nf4_quantize.cu), bit for bit the host quantizer,
//! and dequantization (kernels/cuda/nf4.cu), chunks of 8 elements written in the compute dtype, so
//! a 4-bit weight becomes a dense GEMM operand, or a LoRA-padded one with its pad, in one pass.

use super::launch::Arg;
use super::{device_err, suffix, CudaBackend, CudaIndices, CudaTensor};
use crate::backend::{check_lora_pad, nf4_out_elements};
use crate::error::check_len;
use crate::nf4::double_quant::{absmax_mean, NESTED_BLOCK};
use crate::nf4::{n_blocks, AbsmaxBuffers, Nf4Buffers, DYNAMIC_MAP};
use crate::{Backend, DType, LoraPad, Nf4Absmax, Result};

/// Threads per block of the NF4 kernels (the double quantization needs one per absmax of a group).
const THREADS: u32 = 256;
/// Chunks of 8 elements each thread of the dequantization decodes: nf4.cu's `NF4_CHUNKS_PER_THREAD`.
const NF4_CHUNKS_PER_THREAD: usize = 4;

impl CudaBackend {
    /// `len` i32 words with unspecified contents (every kernel writing one writes it in full).
    fn alloc_indices(&self, len: usize) -> Result<CudaIndices> {
        let slice = if len == 0 {
            self.stream.null()
        } else {
            // SAFETY: uninitialised device memory; the kernel that gets it writes every word.
            unsafe { self.stream.alloc::<i32>(len) }
        }
        .map_err(device_err("alloc indices"))?;
        Ok(CudaIndices::new(slice, None, self.pool.clone()))
    }

    /// Copies indices back to the host (checks and tests read NF4 codes made on the device).
    pub fn download_indices(&self, t: &CudaIndices) -> Result<Vec<i32>> {
        if t.is_empty() {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&t.slice)
            .map_err(device_err("download indices"))
    }

    /// Quantizes on the device; the double-quant offset is the host's [`absmax_mean`] of the
    /// downloaded absmax (`n/16` bytes), so it is the host quantizer's to the bit.
    pub(crate) fn quantize_nf4_impl(
        &self,
        x: &CudaTensor,
        double_quant: bool,
    ) -> Result<Nf4Buffers<CudaTensor, CudaIndices>> {
        let n = x.len();
        let words = n.div_ceil(2).div_ceil(4);
        let blocks = n_blocks(n);
        let packed = self.alloc_indices(words)?;
        let absmax = self.alloc(blocks, DType::F32)?;
        if n > 0 {
            // One thread per 8 packed bytes, so also per 16 elements.
            let threads = words.div_ceil(2);
            self.launch(
                &format!("nf4_quantize_{}", suffix(x.dtype)),
                (threads.div_ceil(THREADS as usize) as u32, 1, 1),
                THREADS,
                0,
                &[
                    self.p(x),
                    self.pi(&packed),
                    self.p(&absmax),
                    Arg::U64(n as u64),
                    Arg::U64(4 * words as u64),
                ],
            )?;
        }
        if !double_quant {
            return Ok(Nf4Buffers {
                packed,
                absmax: AbsmaxBuffers::Plain(absmax),
            });
        }
        let offset = absmax_mean(&self.download(&absmax)?);
        let codes = self.alloc_indices(blocks.div_ceil(4))?;
        let groups = blocks.div_ceil(NESTED_BLOCK);
        let nested_absmax = self.alloc(groups, DType::F32)?;
        let map = self.upload(&DYNAMIC_MAP, DType::F32)?;
        if groups > 0 {
            self.launch(
                "nf4_double_quant",
                (groups as u32, 1, 1),
                NESTED_BLOCK as u32,
                0,
                &[
                    self.p(&absmax),
                    self.pi(&codes),
                    self.p(&nested_absmax),
                    self.p(&map),
                    Arg::F32(offset),
                    Arg::U64(blocks as u64),
                ],
            )?;
        }
        Ok(Nf4Buffers {
            packed,
            absmax: AbsmaxBuffers::Double {
                codes,
                nested_absmax,
                map,
                offset,
            },
        })
    }

    /// The padded kernels' last arguments (nf4.cu's `Nf4Pad`): B's first element, its row
    /// distance, the block's columns, and the `width` pad columns to write (0 without a pad: the
    /// pad is left as it is).
    fn nf4_pad_args(&self, pad: Option<&LoraPad<'_, CudaTensor>>, width: usize) -> [Arg; 5] {
        match pad {
            Some(p) => [
                Arg::Ptr(p.b.ptr(&self.stream) + (p.b_at.offset * p.b.dtype.size_bytes()) as u64),
                Arg::U64(p.b_at.ld as u64),
                Arg::U64(p.block.start as u64),
                Arg::U64(p.block.end as u64),
                Arg::U64(width as u64),
            ],
            None => [
                Arg::Ptr(0),
                Arg::U64(0),
                Arg::U64(0),
                Arg::U64(0),
                Arg::U64(0),
            ],
        }
    }

    /// Dequantizes the `n = rows · cols` elements into rows `ld` apart (`rows = len(out) / ld`),
    /// and with `pad` writes the pad columns in the same launch.
    pub(crate) fn dequantize_nf4_impl(
        &self,
        packed: &CudaIndices,
        absmax: Nf4Absmax<'_, CudaTensor, CudaIndices>,
        (cols, ld): (usize, usize),
        pad: Option<LoraPad<'_, CudaTensor>>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let n = nf4_out_elements(cols, ld, out.len())?;
        if let Some(p) = &pad {
            check_lora_pad((n / cols, cols, ld), &p.block, (p.b_at, p.b.len()))?;
            self.same_dtype("dequantize_nf4", &[("out", out), ("pad B", p.b)])?;
        }
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
        // Each thread decodes NF4_CHUNKS_PER_THREAD chunks of 8 elements (nf4.cu). The dense
        // weight's grid covers its n / 8 chunks (block 0 also the last n % 8); the padded rows'
        // grid is (rows, parts of a row), a block's threads sized to the row's chunks, and takes
        // the row length, the row distance and the pad's arguments.
        let (variant, grid, threads, shape_args) = if cols == ld {
            let chunks_per_block = NF4_CHUNKS_PER_THREAD * THREADS as usize;
            let grid = ((n / 8).div_ceil(chunks_per_block).max(1) as u32, 1, 1);
            (
                suffix(out.dtype).to_string(),
                grid,
                THREADS,
                vec![Arg::U64(n as u64)],
            )
        } else {
            let row_chunks = cols.div_ceil(8);
            let threads = row_chunks
                .div_ceil(NF4_CHUNKS_PER_THREAD)
                .next_multiple_of(32)
                .min(THREADS as usize);
            let parts = row_chunks.div_ceil(NF4_CHUNKS_PER_THREAD * threads);
            let mut args = vec![Arg::U64(cols as u64), Arg::U64(ld as u64)];
            args.extend(self.nf4_pad_args(pad.as_ref(), ld - cols));
            (
                format!("padded_{}", suffix(out.dtype)),
                ((n / cols) as u32, parts as u32, 1),
                threads as u32,
                args,
            )
        };
        match absmax {
            Nf4Absmax::Plain(a) => {
                check_len("dequantize_nf4", "absmax", a.len(), blocks)?;
                self.require_dtype("dequantize_nf4", "absmax", a, DType::F32)?;
                self.launch(
                    &format!("nf4_dequantize_plain_{variant}"),
                    grid,
                    threads,
                    0,
                    &[&[self.pi(packed), self.p(a), self.p(out)], &shape_args[..]].concat(),
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
                    &format!("nf4_dequantize_double_{variant}"),
                    grid,
                    threads,
                    0,
                    &[
                        &[
                            self.pi(packed),
                            self.pi(codes),
                            self.p(nested_absmax),
                            self.p(map),
                            Arg::F32(offset),
                            self.p(out),
                        ],
                        &shape_args[..],
                    ]
                    .concat(),
                )
            }
        }
    }
}
