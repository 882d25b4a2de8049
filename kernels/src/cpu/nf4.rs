//! NF4 dequantization on the CPU: unpacks the i32 words back to bytes and runs the host-side
//! reference of [`crate::nf4`], so the CPU backend's `W'` is bitsandbytes' to the bit. Element
//! `i` of the weight lands in `out[(i / cols) · ld + i % cols]`; the columns `cols..ld` of each
//! row are left as they are.

use crate::backend::nf4_out_elements;
use crate::error::check_len;
use crate::nf4::{self, double_quant};
use crate::{Nf4Absmax, Result};

pub fn dequantize(
    packed: &[i32],
    absmax: Nf4Absmax<'_, Vec<f32>, Vec<i32>>,
    cols: usize,
    ld: usize,
    out: &mut [f32],
) -> Result<()> {
    let n = nf4_out_elements(cols, ld, out.len())?;
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
                dequantize(&packed, absmax, n, n, &mut out).unwrap();
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
            128,
            128,
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
                be.dequantize_nf4(&q.packed, q.absmax(), cols, ld, &mut out)
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

    #[test]
    fn rows_that_overlap_or_do_not_fill_out_are_refused() {
        let be = CpuBackend::new();
        let q = Nf4Buffers::upload(&be, &Nf4Weight::quantize(&weight(128), false)).unwrap();
        let mut out = vec![0.0; 192];
        let mut err = |cols, ld| {
            be.dequantize_nf4(&q.packed, q.absmax(), cols, ld, &mut out)
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
