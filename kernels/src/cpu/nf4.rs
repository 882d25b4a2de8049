//! NF4 dequantization on the CPU: unpacks the i32 words back to bytes and runs the host-side
//! reference of [`crate::nf4`], so the CPU backend's `W'` is bitsandbytes' to the bit. Element
//! `i` of the weight lands in `out[(i / cols) · ld + i % cols]`; the columns `cols..ld` of each
//! row get the [`LoraPad`] ([`super::place_block`]'s write), or are left as they are without one.

use super::place_block::place_block;
use crate::backend::{check_lora_pad, nf4_out_elements};
use crate::error::check_len;
use crate::nf4::{self, double_quant};
use crate::{LoraPad, MatAt, Nf4Absmax, Result};

pub fn dequantize(
    packed: &[i32],
    absmax: Nf4Absmax<'_, Vec<f32>, Vec<i32>>,
    (cols, ld): (usize, usize),
    pad: Option<LoraPad<'_, Vec<f32>>>,
    out: &mut [f32],
) -> Result<()> {
    let n = nf4_out_elements(cols, ld, out.len())?;
    let rows = n / cols;
    if let Some(p) = &pad {
        check_lora_pad((rows, cols, ld), &p.block, (p.b_at, p.b.len()))?;
    }
    let blocks = nf4::n_blocks(n);
    let bytes = n.div_ceil(2);
    check_len(
        "dequantize_nf4",
        "packed words",
        packed.len(),
        bytes.div_ceil(4),
    )?;
    let block_absmax = match absmax {
        Nf4Absmax::Plain(a) => {
            check_len("dequantize_nf4", "absmax", a.len(), blocks)?;
            a.clone()
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
                blocks.div_ceil(double_quant::NESTED_BLOCK),
            )?;
            check_len("dequantize_nf4", "nested map", map.len(), 256)?;
            let codes = nf4::words_to_bytes(codes, blocks);
            double_quant::decode_absmax(&codes, nested_absmax, map, offset)
        }
    };
    let bytes = nf4::words_to_bytes(packed, bytes);
    for (r, row) in out.chunks_mut(ld).enumerate() {
        for (j, o) in row[..cols].iter_mut().enumerate() {
            *o = nf4::dequantize_element(&bytes, &block_absmax, r * cols + j);
        }
    }
    if let Some(p) = pad {
        let pad_columns = MatAt::at(cols, ld);
        place_block(rows, ld - cols, p.block, (p.b, p.b_at), (out, pad_columns));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::nf4::{Absmax, Nf4Buffers, Nf4Weight, DYNAMIC_MAP};
    use crate::Backend;

    fn weight(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn backend_op_equals_the_host_reference_for_both_absmax_storages() {
        for n in [64 * 300 + 3, 128] {
            let x = weight(n);
            for double in [false, true] {
                let w = Nf4Weight::quantize(&x, double);
                let packed = nf4::bytes_to_words(&w.packed);
                let map = DYNAMIC_MAP.to_vec();
                let (plain, codes, nested);
                let absmax = match &w.absmax {
                    Absmax::Plain(a) => {
                        plain = a.clone();
                        Nf4Absmax::Plain(&plain)
                    }
                    Absmax::Double(d) => {
                        codes = nf4::bytes_to_words(&d.codes);
                        nested = d.nested_absmax.clone();
                        Nf4Absmax::Double {
                            codes: &codes,
                            nested_absmax: &nested,
                            map: &map,
                            offset: d.offset,
                        }
                    }
                };
                let mut out = vec![0.0; n];
                dequantize(&packed, absmax, (n, n), None, &mut out).unwrap();
                assert_eq!(out, w.dequantize(), "n {n}, double {double}");
            }
        }
    }

    #[test]
    fn wrong_absmax_length_is_a_shape_error() {
        let w = Nf4Weight::quantize(&weight(128), false);
        let short = vec![1.0];
        let mut out = vec![0.0; 128];
        let e = dequantize(
            &nf4::bytes_to_words(&w.packed),
            Nf4Absmax::Plain(&short),
            (128, 128),
            None,
            &mut out,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("absmax has 1 elements, expected 2"),
            "{e}"
        );
    }

    /// Rows `ld` apart: row `r` holds the dense weight's elements `r·cols ..` bit for bit, and the
    /// pad columns keep their values (chunks of 8 across rows, an odd `n`, a partial last block).
    #[test]
    fn strided_rows_hold_the_dense_rows_and_leave_the_pad() {
        let be = CpuBackend::new();
        for (rows, cols, ld) in [(7, 128, 176), (5, 41, 44), (3, 64, 64)] {
            let w_dense = weight(rows * cols);
            for double in [false, true] {
                let w = Nf4Weight::quantize(&w_dense, double);
                let q = Nf4Buffers::upload(&be, &w).unwrap();
                let want = w.dequantize();
                let mut out = vec![-3.25; rows * ld];
                be.dequantize_nf4(&q.packed, q.absmax(), cols, ld, None, &mut out)
                    .unwrap();
                for r in 0..rows {
                    let what = format!("rows {rows} cols {cols} ld {ld} double {double} row {r}");
                    assert_eq!(&out[r * ld..][..cols], &want[r * cols..][..cols], "{what}");
                    assert!(
                        out[r * ld + cols..][..ld - cols]
                            .iter()
                            .all(|&v| v == -3.25),
                        "{what}"
                    );
                }
            }
        }
    }

    /// With a [`LoraPad`], row `r`'s data columns are the unpadded dequantization's bits and its
    /// pad columns hold `B[r, j − block.start]` in the block, 0 elsewhere: B read at an offset with
    /// rows farther apart than the block is wide, a block at the pad's start, middle and end.
    #[test]
    fn a_lora_pad_puts_b_in_its_block_and_zeros_in_the_rest_of_the_pad() {
        let be = CpuBackend::new();
        for (rows, cols, ld, block) in [(7, 128, 176, 16..32), (5, 41, 44, 0..2), (3, 64, 70, 4..6)]
        {
            let w_dense = weight(rows * cols);
            let b_at = MatAt::at(3, block.len() + 2);
            let b: Vec<f32> = (0..b_at.extent(rows, block.len()))
                .map(|v| v as f32 + 0.5)
                .collect();
            for double in [false, true] {
                let w = Nf4Weight::quantize(&w_dense, double);
                let q = Nf4Buffers::upload(&be, &w).unwrap();
                let want = w.dequantize();
                let mut out = vec![-3.25; rows * ld];
                let pad = LoraPad {
                    b: &b,
                    b_at,
                    block: block.clone(),
                };
                be.dequantize_nf4(&q.packed, q.absmax(), cols, ld, Some(pad), &mut out)
                    .unwrap();
                for r in 0..rows {
                    let what = format!("rows {rows} cols {cols} ld {ld} double {double} row {r}");
                    assert_eq!(&out[r * ld..][..cols], &want[r * cols..][..cols], "{what}");
                    for j in 0..ld - cols {
                        let expected = if block.contains(&j) {
                            b[b_at.offset + r * b_at.ld + j - block.start]
                        } else {
                            0.0
                        };
                        assert_eq!(out[r * ld + cols + j], expected, "{what} pad column {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_pad_block_outside_the_pad_or_rows_without_a_pad_are_refused() {
        let be = CpuBackend::new();
        let q = Nf4Buffers::upload(&be, &Nf4Weight::quantize(&weight(128), false)).unwrap();
        let b = vec![1.0; 8];
        let err = |ld, block, b_at| {
            let pad = LoraPad { b: &b, b_at, block };
            let mut out = vec![0.0; 2 * ld];
            be.dequantize_nf4(&q.packed, q.absmax(), 64, ld, Some(pad), &mut out)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(70, 5..7, MatAt::dense(2)),
            "dequantize_nf4: pad block 5..7 is not a column range inside the pad's 6 columns (ld - cols)"
        );
        assert_eq!(
            err(64, 0..0, MatAt::dense(0)),
            "dequantize_nf4: a LoRA pad was given but the rows have no pad columns (ld = cols = 64); \
             pass no pad for the dense weight, or rows ld > cols apart"
        );
        assert_eq!(
            err(70, 0..4, MatAt::at(1, 4)),
            "dequantize_nf4: pad B [2×4] at element 1 with rows 4 apart does not fit its tensor of 8 elements"
        );
    }

    #[test]
    fn rows_that_overlap_or_do_not_fill_out_are_refused() {
        let be = CpuBackend::new();
        let q = Nf4Buffers::upload(&be, &Nf4Weight::quantize(&weight(128), false)).unwrap();
        let mut out = vec![0.0; 192];
        let mut err = |cols, ld| {
            be.dequantize_nf4(&q.packed, q.absmax(), cols, ld, None, &mut out)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(64, 32),
            "dequantize_nf4: out's rows are 32 elements apart, fewer than the 64 each holds"
        );
        assert_eq!(
            err(64, 80),
            "dequantize_nf4: out (whole rows `ld` apart) has 192 elements, expected 240"
        );
        assert!(err(0, 96).contains("cols is 0"));
        // 192 / 96 = 2 rows of 32: 64 elements, one absmax block, but the packed codes are of 128.
        assert_eq!(
            err(32, 96),
            "dequantize_nf4: packed words has 16 elements, expected 8"
        );
    }
}
