//! NF4 dequantization on the CPU: unpacks the i32 words back to bytes and runs the host-side
//! reference of [`crate::nf4`], so the CPU backend's `W'` is bitsandbytes' to the bit.

use crate::error::check_len;
use crate::nf4::{self, double_quant};
use crate::{Nf4Absmax, Result};

pub fn dequantize(
    packed: &[i32],
    absmax: Nf4Absmax<'_, Vec<f32>, Vec<i32>>,
    out: &mut [f32],
) -> Result<()> {
    let n = out.len();
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
    nf4::dequantize_into(&nf4::words_to_bytes(packed, bytes), &block_absmax, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::{Absmax, Nf4Weight, DYNAMIC_MAP};

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
                dequantize(&packed, absmax, &mut out).unwrap();
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
            &mut out,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("absmax has 1 elements, expected 2"),
            "{e}"
        );
    }
}
