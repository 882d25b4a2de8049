//! The NF4 functions against bitsandbytes 0.50.2 (tests/fixtures/nf4-quant): every code, packed
//! byte, absmax, nested absmax and dequantized value must be identical, bit for bit.

use super::double_quant::{absmax_mean, code8_lut, DoubleQuantAbsmax};
use super::*;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

const MATRICES: [&str; 6] = [
    "w_64x160",
    "w_160x64",
    "w_320x64",
    "w_129x131",
    "w_outliers_96x64",
    "w_f32_ties_64x64",
];

fn read(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/nf4-quant")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    t.data().to_vec()
}

/// Asserts identical bits (so −0.0 ≠ 0.0 and every ulp counts).
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn tables_match_bitsandbytes() {
    let bytes = read("expected.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_bits(&NF4_CODE, &f32s(&st, "quant_map"), "quant_map");
    assert_bits(&nf4_midpoints(), &f32s(&st, "nf4_midpoints"), "midpoints");
    assert_bits(&DYNAMIC_MAP, &f32s(&st, "nested_quant_map"), "nested map");
    assert_eq!(code8_lut(), &u8s(&st, "nested_quant_map_lut")[..]);
}

#[test]
fn every_matrix_quantizes_and_dequantizes_bit_exactly() {
    let (inputs, expected) = (read("inputs.safetensors"), read("expected.safetensors"));
    let inp = SafeTensors::deserialize(&inputs).unwrap();
    let exp = SafeTensors::deserialize(&expected).unwrap();
    for name in MATRICES {
        let x = f32s(&inp, name);
        let (codes, absmax) = quantize(&x);
        assert_eq!(codes, u8s(&exp, &format!("{name}/codes")), "{name} codes");
        assert_bits(&absmax, &f32s(&exp, &format!("{name}/plain/absmax")), name);
        let packed = pack(&codes);
        assert_eq!(packed, u8s(&exp, &format!("{name}/plain/packed")), "{name}");
        assert_eq!(
            packed,
            u8s(&exp, &format!("{name}/double/packed")),
            "{name}"
        );
        assert_eq!(unpack(&packed, x.len()), codes, "{name} unpack");
        assert_bits(
            &dequantize(&packed, &absmax, x.len()),
            &f32s(&exp, &format!("{name}/plain/dequantized")),
            &format!("{name} plain dequantized"),
        );

        let offset = f32s(&exp, &format!("{name}/double/offset"))[0];
        let recomputed = absmax_mean(&absmax);
        assert!(
            (recomputed.to_bits() as i64 - offset.to_bits() as i64).abs() <= 1,
            "{name}: offset {recomputed} vs {offset}"
        );
        let dq = DoubleQuantAbsmax::quantize(&absmax, offset);
        assert_eq!(
            dq.codes,
            u8s(&exp, &format!("{name}/double/absmax")),
            "{name}"
        );
        assert_bits(
            &dq.nested_absmax,
            &f32s(&exp, &format!("{name}/double/nested_absmax")),
            &format!("{name} nested absmax"),
        );
        let decoded = dq.decode();
        assert_bits(
            &decoded,
            &f32s(&exp, &format!("{name}/double/absmax_dequantized")),
            &format!("{name} absmax dequantized"),
        );
        assert_bits(
            &dequantize(&packed, &decoded, x.len()),
            &f32s(&exp, &format!("{name}/double/dequantized")),
            &format!("{name} double dequantized"),
        );
    }
}

#[test]
fn bf16_inputs_widen_exactly_to_the_f32_copies() {
    let inputs = read("inputs.safetensors");
    let inp = SafeTensors::deserialize(&inputs).unwrap();
    for name in &MATRICES[..5] {
        let t = inp.tensor(&format!("bf16/{name}")).unwrap();
        assert_eq!(t.dtype(), Dtype::BF16);
        let widened: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect();
        assert_bits(&widened, &f32s(&inp, name), name);
    }
}

#[test]
fn nf4_weight_round_trips_through_both_absmax_storages() {
    let inputs = read("inputs.safetensors");
    let expected = read("expected.safetensors");
    let inp = SafeTensors::deserialize(&inputs).unwrap();
    let exp = SafeTensors::deserialize(&expected).unwrap();
    let x = f32s(&inp, "w_64x160");
    let plain = Nf4Weight::quantize(&x, false);
    assert_bits(
        &plain.dequantize(),
        &f32s(&exp, "w_64x160/plain/dequantized"),
        "plain",
    );
    // w_64x160's offset equals the f64 mean rounded (case.json), so the recomputed one is exact.
    let double = Nf4Weight::quantize(&x, true);
    assert_bits(
        &double.dequantize(),
        &f32s(&exp, "w_64x160/double/dequantized"),
        "double",
    );
}
