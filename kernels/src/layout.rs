/// Which keys each query token may attend to, for a batch of `rows` rows of `seq_len` tokens
/// (token `i` of the flattened batch is row `i / seq_len`, column `i % seq_len`).
///
/// A query at column `q` sees key column `k` iff `doc_start[q] <= k <= q` and, with a sliding
/// window `W`, `q - k < W`. This one rule covers causal masking, right padding (padding sits after
/// every real token, so no real query reaches it), left padding (real tokens start their document
/// after the padding) and packed rows (each document starts where the previous one ended).
/// Padding queries get `doc_start = q`: they see only themselves, so their outputs stay finite.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionLayout {
    pub rows: usize,
    pub seq_len: usize,
    /// `[rows * seq_len]`: the first key column (within the row) the query may see.
    pub doc_start: Vec<i32>,
    /// `[rows * seq_len]`: the RoPE position of each token (restarts at 0 per packed document).
    pub positions: Vec<i32>,
    /// Sliding-window size `W` (Mistral), or `None` for full causal attention.
    pub window: Option<usize>,
}

impl AttentionLayout {
    /// Rows of real tokens followed by padding: `lengths[r]` real tokens in row `r`.
    pub fn right_padded(lengths: &[usize], seq_len: usize, window: Option<usize>) -> Self {
        let docs: Vec<Vec<usize>> = lengths.iter().map(|&l| vec![l]).collect();
        Self::packed(&docs, seq_len, window)
    }

    /// Rows that each hold several documents back to back (`docs[r]` = their lengths), then padding.
    /// Positions restart at 0 in each document; no token sees another document.
    pub fn packed(docs: &[Vec<usize>], seq_len: usize, window: Option<usize>) -> Self {
        let n = docs.len() * seq_len;
        let mut doc_start = vec![0i32; n];
        let mut positions = vec![0i32; n];
        for (r, lens) in docs.iter().enumerate() {
            let base = r * seq_len;
            let mut col = 0usize;
            for &len in lens {
                assert!(
                    col + len <= seq_len,
                    "documents of row {r} are longer than seq_len {seq_len}"
                );
                for j in 0..len {
                    doc_start[base + col + j] = col as i32;
                    positions[base + col + j] = j as i32;
                }
                col += len;
            }
            for c in col..seq_len {
                doc_start[base + c] = c as i32;
                positions[base + c] = 0;
            }
        }
        AttentionLayout {
            rows: docs.len(),
            seq_len,
            doc_start,
            positions,
            window,
        }
    }

    /// Rows whose real tokens are at the end (`lengths[r]` of them) after left padding,
    /// with positions counted from the first real token, as transformers does for generation.
    pub fn left_padded(lengths: &[usize], seq_len: usize, window: Option<usize>) -> Self {
        let n = lengths.len() * seq_len;
        let mut doc_start = vec![0i32; n];
        let mut positions = vec![0i32; n];
        for (r, &len) in lengths.iter().enumerate() {
            let first = seq_len - len;
            for c in 0..seq_len {
                let i = r * seq_len + c;
                if c < first {
                    doc_start[i] = c as i32;
                } else {
                    doc_start[i] = first as i32;
                    positions[i] = (c - first) as i32;
                }
            }
        }
        AttentionLayout {
            rows: lengths.len(),
            seq_len,
            doc_start,
            positions,
            window,
        }
    }

    /// Number of tokens (rows × seq_len).
    pub fn tokens(&self) -> usize {
        self.rows * self.seq_len
    }

    /// First key column query `i` (flat index) may see, window included.
    pub fn first_key(&self, i: usize) -> usize {
        let q = i % self.seq_len;
        let start = self.doc_start[i] as usize;
        match self.window {
            Some(w) => start.max((q + 1).saturating_sub(w)),
            None => start,
        }
    }

    /// Query-key pairs attention computes: `Σ_i (i − first_key(i) + 1)` over every token.
    /// Causal forward FLOPs are `4 · heads · head_dim · visible_pairs` (QKᵀ and PV).
    pub fn visible_pairs(&self) -> usize {
        (0..self.tokens())
            .map(|i| i % self.seq_len + 1 - self.first_key(i))
            .sum()
    }

    /// The largest position used, plus one: how many RoPE table rows the batch needs.
    pub fn position_span(&self) -> usize {
        self.positions
            .iter()
            .copied()
            .max()
            .map_or(0, |p| p as usize + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_restart_positions_and_documents() {
        let l = AttentionLayout::packed(&[vec![3, 2], vec![4]], 6, None);
        assert_eq!(l.positions, vec![0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 0]);
        assert_eq!(l.doc_start, vec![0, 0, 0, 3, 3, 5, 0, 0, 0, 0, 4, 5]);
        assert_eq!(l.first_key(4), 3);
        // Row 0: 1+2+3 + 1+2 + 1 (padding sees itself); row 1: 1+2+3+4 + 1 + 1.
        assert_eq!(l.visible_pairs(), 10 + 12);
    }

    #[test]
    fn window_limits_the_first_key() {
        let l = AttentionLayout::right_padded(&[10], 10, Some(4));
        assert_eq!(l.first_key(9), 6);
        assert_eq!(l.first_key(2), 0);
    }

    #[test]
    fn left_padding_starts_documents_after_the_pad() {
        let l = AttentionLayout::left_padded(&[2], 4, None);
        assert_eq!(l.doc_start, vec![0, 1, 2, 2]);
        assert_eq!(l.positions, vec![0, 0, 0, 1]);
    }
}
