//! 16-bit floats as checkpoints store them, widened to f32 (exact: every bf16 and f16 value is an
//! f32 value).

use crate::DType;
use rayon::prelude::*;

/// One bf16 or f16 bit pattern as f32.
pub fn widen_one(bits: u16, stored: DType) -> f32 {
    match stored {
        DType::F16 => half::f16::from_bits(bits).to_f32(),
        // bf16 is the top half of an f32.
        _ => f32::from_bits(u32::from(bits) << 16),
    }
}

/// Every value, on every core (each is independent, so the result does not depend on threads).
pub fn widen_16bit(bits: &[u16], stored: DType) -> Vec<f32> {
    bits.par_iter().map(|&b| widen_one(b, stored)).collect()
}

/// Whether a bf16 or f16 bit pattern is infinite or NaN: its exponent bits are all ones.
pub fn is_finite_16bit(bits: u16, stored: DType) -> bool {
    let exponent = if stored == DType::F16 { 0x7c00 } else { 0x7f80 };
    bits & exponent != exponent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_non_finite_values_are_recognised() {
        for x in [0.0f32, -0.0, 1.0, -2.5, 3.140625, 1e-30, 65504.0] {
            let b = half::bf16::from_f32(x);
            assert_eq!(widen_one(b.to_bits(), DType::BF16), b.to_f32());
            let h = half::f16::from_f32(x);
            assert_eq!(widen_one(h.to_bits(), DType::F16), h.to_f32());
            assert!(is_finite_16bit(b.to_bits(), DType::BF16));
            assert!(is_finite_16bit(h.to_bits(), DType::F16));
        }
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!is_finite_16bit(
                half::bf16::from_f32(x).to_bits(),
                DType::BF16
            ));
            assert!(!is_finite_16bit(
                half::f16::from_f32(x).to_bits(),
                DType::F16
            ));
        }
        assert_eq!(widen_16bit(&[0x3f80, 0xc020], DType::BF16), vec![1.0, -2.5]);
    }
}
