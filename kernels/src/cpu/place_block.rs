//! `dst[i, j] ← src[i, j − block.start]` for `j ∈ block`, `dst[i, j] ← 0` for the other `j < width`:
//! a LoRA B placed in its block of a padded weight's pad columns, or pad columns copied out and back.

use crate::MatAt;
use std::ops::Range;

/// `src [rows, len(block)]` into the columns `block` of `dst [rows, width]`, the rest of those
/// `width` columns zeroed; the layouts are checked by the caller.
pub fn place_block(
    rows: usize,
    width: usize,
    block: Range<usize>,
    (src, src_at): (&[f32], MatAt),
    (dst, dst_at): (&mut [f32], MatAt),
) {
    if width == 0 {
        return;
    }
    for i in 0..rows {
        let row = &mut dst[dst_at.offset + i * dst_at.ld..][..width];
        row[..block.start].fill(0.0);
        row[block.end..].fill(0.0);
        if !block.is_empty() {
            row[block.clone()]
                .copy_from_slice(&src[src_at.offset + i * src_at.ld..][..block.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::CpuBackend;
    use crate::{Backend, MatAt};

    /// B `[3, 2]` into columns 4..6 of 8-wide pad columns that start at column 5 of rows 14 apart:
    /// the block holds B, the other pad columns are 0, every other element keeps its value.
    #[test]
    fn the_block_holds_src_and_the_rest_of_the_width_is_zeroed() {
        let be = CpuBackend::new();
        let (rows, width, ld) = (3, 8, 14);
        let b: Vec<f32> = (1..=6).map(|v| v as f32).collect();
        let mut dst = vec![9.0; rows * ld];
        be.place_block(
            rows,
            width,
            4..6,
            (&b, MatAt::dense(2)),
            (&mut dst, MatAt::at(5, ld)),
        )
        .unwrap();
        for i in 0..rows {
            for j in 0..ld {
                let want = match j.checked_sub(5) {
                    Some(c) if c < width && (4..6).contains(&c) => b[i * 2 + c - 4],
                    Some(c) if c < width => 0.0,
                    _ => 9.0,
                };
                assert_eq!(dst[i * ld + j], want, "row {i} column {j}");
            }
        }
    }

    /// Pad columns copied out to a dense tensor (`block = 0..width`) and back give the same bits;
    /// src's own offset and row distance are honoured.
    #[test]
    fn pad_columns_copied_out_and_back_round_trip() {
        let be = CpuBackend::new();
        let (rows, hidden, width) = (4, 6, 3);
        let ld = hidden + width;
        let padded: Vec<f32> = (0..rows * ld).map(|v| v as f32 * 0.5 - 3.0).collect();
        let mut dense = vec![f32::NAN; rows * width];
        be.place_block(
            rows,
            width,
            0..width,
            (&padded, MatAt::at(hidden, ld)),
            (&mut dense, MatAt::dense(width)),
        )
        .unwrap();
        for i in 0..rows {
            assert_eq!(
                dense[i * width..][..width],
                padded[i * ld + hidden..][..width]
            );
        }
        let mut back = padded.clone();
        back.iter_mut().for_each(|v| *v = -*v);
        be.place_block(
            rows,
            width,
            0..width,
            (&dense, MatAt::dense(width)),
            (&mut back, MatAt::at(hidden, ld)),
        )
        .unwrap();
        for i in 0..rows {
            assert_eq!(
                back[i * ld + hidden..][..width],
                padded[i * ld + hidden..][..width]
            );
            assert_eq!(back[i * ld], -padded[i * ld]);
        }
    }

    #[test]
    fn a_block_outside_the_width_or_a_matrix_past_its_tensor_is_refused() {
        let be = CpuBackend::new();
        let src = vec![1.0; 8];
        let mut dst = vec![0.0; 4 * 10];
        let mut err = |block, src_at, dst_at| {
            be.place_block(4, 8, block, (&src, src_at), (&mut dst, dst_at))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(7..9, MatAt::dense(2), MatAt::dense(10)),
            "place_block: block 7..9 is not a column range inside the width 8"
        );
        assert_eq!(
            err(0..2, MatAt::at(1, 2), MatAt::dense(10)),
            "place_block: src [4×2] at element 1 with rows 2 apart does not fit its tensor of 8 elements"
        );
        assert_eq!(
            err(0..2, MatAt::dense(2), MatAt::at(3, 10)),
            "place_block: dst [4×8] at element 3 with rows 10 apart does not fit its tensor of 40 elements"
        );
        assert_eq!(
            err(0..2, MatAt::dense(2), MatAt::at(0, 6)),
            "place_block: dst [4×8] at element 0 with rows 6 apart does not fit its tensor of 40 elements"
        );
    }
}
