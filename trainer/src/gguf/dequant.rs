//! ggml tensor types: their block sizes, and dequantization to f32 for the ones fuselora reads.
//!
//! A quantized tensor is a sequence of blocks, each holding `block_elements` values in `block_bytes`
//! bytes; the layouts below are ggml's `ggml-common.h` (`ggml_half` = IEEE f16, little-endian), and the
//! formulas `dequantize_row_*` of `ggml-quants.c`. Every product is done in f32 in the same order as
//! ggml (and as gguf-py's numpy reference), so results match bit for bit.

use half::{bf16, f16};
use rayon::prelude::*;
use thiserror::Error;

/// Dequantizes one block of stored bytes into its values.
type BlockDequantizer = fn(&[u8], &mut [f32]);

/// A ggml tensor type, as stored in GGUF tensor infos.
#[derive(Clone, Copy, Debug)]
pub struct GgmlType {
    pub id: u32,
    name: &'static str,
    block_elements: usize,
    block_bytes: usize,
    /// Dequantizes one block into `block_elements` values; `None` when fuselora does not read this type.
    dequantize_block: Option<BlockDequantizer>,
}

/// The tensor's type is one fuselora cannot dequantize.
#[derive(Debug, Error)]
#[error("ggml type {name} (id {id}) is not supported; fuselora dequantizes {}. Re-quantize the model to one of those with llama.cpp's llama-quantize", supported_names())]
pub struct UnsupportedType {
    pub name: &'static str,
    pub id: u32,
}

const fn ty(
    id: u32,
    name: &'static str,
    block_elements: usize,
    block_bytes: usize,
    dequantize_block: Option<BlockDequantizer>,
) -> GgmlType {
    GgmlType {
        id,
        name,
        block_elements,
        block_bytes,
        dequantize_block,
    }
}

/// Every type id ggml defines (ggml.h `enum ggml_type`; ids 4, 5 and 31–33, 36–38 were removed).
const TYPES: &[GgmlType] = &[
    ty(0, "F32", 1, 4, Some(f32_block)),
    ty(1, "F16", 1, 2, Some(f16_block)),
    ty(2, "Q4_0", 32, 18, Some(q4_0_block)),
    ty(3, "Q4_1", 32, 20, Some(q4_1_block)),
    ty(6, "Q5_0", 32, 22, Some(q5_0_block)),
    ty(7, "Q5_1", 32, 24, Some(q5_1_block)),
    ty(8, "Q8_0", 32, 34, Some(q8_0_block)),
    ty(9, "Q8_1", 32, 36, None),
    ty(10, "Q2_K", 256, 84, Some(q2_k_block)),
    ty(11, "Q3_K", 256, 110, Some(q3_k_block)),
    ty(12, "Q4_K", 256, 144, Some(q4_k_block)),
    ty(13, "Q5_K", 256, 176, Some(q5_k_block)),
    ty(14, "Q6_K", 256, 210, Some(q6_k_block)),
    ty(15, "Q8_K", 256, 292, None),
    ty(16, "IQ2_XXS", 256, 66, None),
    ty(17, "IQ2_XS", 256, 74, None),
    ty(18, "IQ3_XXS", 256, 98, None),
    ty(19, "IQ1_S", 256, 50, None),
    ty(20, "IQ4_NL", 32, 18, None),
    ty(21, "IQ3_S", 256, 110, None),
    ty(22, "IQ2_S", 256, 82, None),
    ty(23, "IQ4_XS", 256, 136, None),
    ty(24, "I8", 1, 1, None),
    ty(25, "I16", 1, 2, None),
    ty(26, "I32", 1, 4, None),
    ty(27, "I64", 1, 8, None),
    ty(28, "F64", 1, 8, None),
    ty(29, "IQ1_M", 256, 56, None),
    ty(30, "BF16", 1, 2, Some(bf16_block)),
    ty(34, "TQ1_0", 256, 54, None),
    ty(35, "TQ2_0", 256, 66, None),
    ty(39, "MXFP4", 32, 17, None),
];

fn supported_names() -> String {
    TYPES
        .iter()
        .filter(|t| t.dequantize_block.is_some())
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl GgmlType {
    /// The type with this id, if ggml defines one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.id == id).copied()
    }

    /// ggml's name for it (`Q4_1`, `F32`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Values per block.
    pub fn block_elements(&self) -> usize {
        self.block_elements
    }

    /// Bytes that `elements` values take (`elements` must be a whole number of blocks).
    pub fn bytes_for(&self, elements: u64) -> usize {
        (elements as usize / self.block_elements) * self.block_bytes
    }

    /// Dequantizes `bytes` (whole blocks) into f32 values, in parallel over blocks.
    pub fn dequantize(&self, bytes: &[u8]) -> Result<Vec<f32>, UnsupportedType> {
        let block = self.dequantize_block.ok_or(UnsupportedType {
            name: self.name,
            id: self.id,
        })?;
        let n_blocks = bytes.len() / self.block_bytes;
        let mut out = vec![0f32; n_blocks * self.block_elements];
        const BLOCKS_PER_TASK: usize = 4096;
        out.par_chunks_mut(self.block_elements * BLOCKS_PER_TASK)
            .zip(bytes.par_chunks(self.block_bytes * BLOCKS_PER_TASK))
            .for_each(|(dst, src)| {
                for (y, x) in dst
                    .chunks_exact_mut(self.block_elements)
                    .zip(src.chunks_exact(self.block_bytes))
                {
                    block(x, y);
                }
            });
        Ok(out)
    }
}

fn half_at(x: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([x[at], x[at + 1]]).to_f32()
}

fn f32_block(x: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
}

fn f16_block(x: &[u8], y: &mut [f32]) {
    y[0] = half_at(x, 0);
}

fn bf16_block(x: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32();
}

/// `block_q4_0 { ggml_half d; uint8_t qs[16]; }`: value `j` is the low nibble of `qs[j]`, value
/// `j + 16` the high nibble; `y = (q − 8) · d`.
fn q4_0_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }`: nibbles as in Q4_0; `y = q · d + m`.
fn q4_1_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    let m = half_at(x, 2);
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of Q5_0/Q5_1: low 4 bits are the nibbles of `qs` (as in Q4_0), bit 4 of value
/// `i` is bit `i` of the little-endian u32 `qh`.
fn five_bit_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        let high_lo = ((qh >> j) & 1) as u8;
        let high_hi = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (high_lo << 4);
        q[j + 16] = (qs[j] >> 4) | (high_hi << 4);
    }
    q
}

/// `block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }`: `y = (q − 16) · d`.
fn q5_0_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    for (yj, q) in y.iter_mut().zip(five_bit_values(&x[2..6], &x[6..22])) {
        *yj = (q as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }`: `y = q · d + m`.
fn q5_1_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    let m = half_at(x, 2);
    for (yj, q) in y.iter_mut().zip(five_bit_values(&x[4..8], &x[8..24])) {
        *yj = q as f32 * d + m;
    }
}

/// `block_q8_0 { ggml_half d; int8_t qs[32]; }`: `y = q · d`.
fn q8_0_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    for (yj, &q) in y.iter_mut().zip(&x[2..34]) {
        *yj = (q as i8) as f32 * d;
    }
}

/// `block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; }`: 16 groups of
/// 16 values. Value `128c + 32k + l` (c < 2, k < 4, l < 32) is bits `2k, 2k+1` of `qs[32c + l]`; its
/// group `s = value / 16` has `y = (d · (scales[s] & 15)) · q − dmin · (scales[s] >> 4)`.
fn q2_k_block(x: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&x[..16], &x[16..80]);
    let d = half_at(x, 80);
    let dmin = half_at(x, 82);
    for c in 0..2 {
        for k in 0..4 {
            for l in 0..32 {
                let v = 128 * c + 32 * k + l;
                let q = (qs[32 * c + l] >> (2 * k)) & 3;
                let s = scales[v / 16];
                let dl = d * (s & 0x0F) as f32;
                let ml = dmin * (s >> 4) as f32;
                y[v] = dl * q as f32 - ml;
            }
        }
    }
}

/// `block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }`: 16 groups of
/// 16 values with 6-bit scales: scale `i` has low 4 bits from nibble `i / 8` of `scales[i mod 8]` and
/// high 2 bits from bits `2(i / 4), +1` of `scales[8 + i mod 4]`, and is used as `scale − 32`.
/// Value `128c + 32k + l` takes bits `2k, 2k+1` of `qs[32c + l]`, minus 4 unless bit `4c + k` of
/// `hmask[l]` is set; `y = (d · (scale − 32)) · q`.
fn q3_k_block(x: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&x[..32], &x[32..96], &x[96..108]);
    let d = half_at(x, 108);
    let mut dl = [0f32; 16];
    for (i, dli) in dl.iter_mut().enumerate() {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *dli = d * ((low | (high << 4)) as i32 - 32) as f32;
    }
    for c in 0..2 {
        for k in 0..4 {
            for l in 0..32 {
                let v = 128 * c + 32 * k + l;
                let low = ((qs[32 * c + l] >> (2 * k)) & 3) as i32;
                let high_set = (hmask[l] >> (4 * c + k)) & 1 == 1;
                let q = if high_set { low } else { low - 4 };
                y[v] = dl[v / 16] * q as f32;
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) packed in the 12 bytes `s` of Q4_K/Q5_K
/// (ggml `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }`: 8 sub-blocks
/// of 32; value `32j + l` is nibble `j mod 2` of `qs[32(j/2) + l]`, and
/// `y = (d · scale_j) · q − dmin · min_j`.
fn q4_k_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    let dmin = half_at(x, 2);
    let (scales, qs) = (&x[4..16], &x[16..144]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            let q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
            y[32 * j + l] = d1 * q as f32 - m1;
        }
    }
}

/// `block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }`:
/// as Q4_K, with bit 4 of value `32j + l` = bit `j` of `qh[l]`.
fn q5_k_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 0);
    let dmin = half_at(x, 2);
    let (scales, qh, qs) = (&x[4..16], &x[16..48], &x[48..176]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            let low = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
            let high = (qh[l] >> j) & 1;
            y[32 * j + l] = d1 * (low | (high << 4)) as f32 - m1;
        }
    }
}

/// `block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }`, 256 values in
/// two halves of 128. In half `h` (ql += 64h, qh += 32h, scales += 8h), for `l` in 0..32 and
/// `k` in 0..4, value `128h + 32k + l` has
/// low 4 bits = nibble `k / 2` (low for k even) of `ql[l + 32·(k mod 2)]`, high 2 bits = bits
/// `2k, 2k+1` of `qh[l]`, and `y = (d · scales[l/16 + 2k]) · (q − 32)`.
fn q6_k_block(x: &[u8], y: &mut [f32]) {
    let d = half_at(x, 208);
    for h in 0..2 {
        let ql = &x[64 * h..64 * h + 64];
        let qh = &x[128 + 32 * h..128 + 32 * h + 32];
        let scales = &x[192 + 8 * h..192 + 8 * h + 8];
        for k in 0..4 {
            for l in 0..32 {
                let low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
                let high = (qh[l] >> (2 * k)) & 0x03;
                let q = (low | (high << 4)) as i32 - 32;
                let scale = scales[l / 16 + 2 * k] as i8;
                y[128 * h + 32 * k + l] = d * scale as f32 * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(name: &str) -> GgmlType {
        *TYPES.iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5 (f16 0x3800); qs[0] = 0x9F: value 0 = 0xF − 8 = 7, value 16 = 0x9 − 8 = 1.
        let mut x = vec![0x00, 0x38];
        x.extend([0x9F].iter().chain(&[0x88; 15]));
        let y = get("Q4_0").dequantize(&x).unwrap();
        assert_eq!((y[0], y[16], y[1], y[17]), (3.5, 0.5, 0.0, 0.0));
    }

    #[test]
    fn q5_0_takes_bit_i_of_qh_as_bit_4_of_value_i() {
        // d = 1; qh has bits 0 and 16 set; every nibble 0: value 0 and value 16 = 16 − 16 = 0, the rest −16.
        let mut x = vec![0x00, 0x3C, 0x01, 0x00, 0x01, 0x00];
        x.extend([0u8; 16]);
        let y = get("Q5_0").dequantize(&x).unwrap();
        assert_eq!((y[0], y[1], y[16], y[17]), (0.0, -16.0, 0.0, -16.0));
    }

    #[test]
    fn unsupported_type_names_itself_and_the_supported_ones() {
        let e = get("IQ2_XXS")
            .dequantize(&[0u8; 66])
            .unwrap_err()
            .to_string();
        assert!(e.contains("IQ2_XXS (id 16)"), "{e}");
        assert!(
            e.contains(
                "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16"
            ),
            "{e}"
        );
    }
}
