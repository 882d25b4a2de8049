//! A batch on the device: token ids, their attention layout and RoPE positions, and next-token targets.

use crate::arch::ModelConfig;
use anyhow::{bail, Result};
use kernels::{AttentionLayout, Backend, DType, IGNORE_INDEX};

/// A batch on the device: tokens, their attention layout, RoPE tables and next-token targets.
pub struct Batch<B: Backend> {
    pub layout: AttentionLayout,
    pub ids: B::Indices,
    pub positions: B::Indices,
    pub doc_start: B::Indices,
    /// `targets[i]` = the token that position `i` must predict, or `IGNORE_INDEX`.
    pub targets: B::Indices,
    /// How many targets are not ignored.
    pub n_targets: usize,
    pub cos: B::Tensor,
    pub sin: B::Tensor,
}

impl<B: Backend> Batch<B> {
    /// Uploads a batch. `labels` are per position (Hugging Face convention: the loss at position
    /// `t` predicts `labels[t+1]`); the shift happens here, within each document.
    pub fn new(
        be: &B,
        config: &ModelConfig,
        ids: &[i32],
        labels: &[i32],
        layout: AttentionLayout,
    ) -> Result<Self> {
        let n = layout.tokens();
        if ids.len() != n || labels.len() != n {
            bail!(
                "batch has {} ids and {} labels for a layout of {n} tokens",
                ids.len(),
                labels.len()
            );
        }
        let targets = next_token_targets(labels, &layout);
        let n_targets = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        let span = layout.position_span().max(1);
        let (cos, sin) = config.rope.tables(span, span);
        Ok(Batch {
            ids: be.upload_indices(ids)?,
            positions: be.upload_indices(&layout.positions)?,
            doc_start: be.upload_indices(&layout.doc_start)?,
            targets: be.upload_indices(&targets)?,
            n_targets,
            cos: be.upload(&cos, DType::F32)?,
            sin: be.upload(&sin, DType::F32)?,
            layout,
        })
    }
}

/// `targets[i]` = `labels[i+1]` when token `i+1` is in the same row and document as token `i`,
/// else [`IGNORE_INDEX`]: the last token of a packed document never predicts the next document.
pub fn next_token_targets(labels: &[i32], layout: &AttentionLayout) -> Vec<i32> {
    let t = layout.seq_len;
    (0..labels.len())
        .map(|i| {
            let next = i + 1;
            if next % t == 0 || layout.doc_start[next] != layout.doc_start[i] {
                IGNORE_INDEX
            } else {
                labels[next]
            }
        })
        .collect()
}
