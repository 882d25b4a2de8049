//! Long texts split into consecutive chunks of at most `max_len` tokens instead of being cut, as
//! Hugging Face's `group_texts` recipe and torchtune's text datasets do: none of the text is lost.
//!
//! Chunk `k` starts at token `k · (max_len − overlap)`. With `overlap = o > 0` the first `o` tokens
//! of every chunk but the first repeat the end of the previous chunk as context and carry no
//! label (they were trained there), so every token of the document except its first is trained
//! exactly once, each with at least `o` tokens of context. With `o = 0` the chunks do not overlap
//! and the first token of each chunk is not a target (nothing precedes it in its row).

use super::batching::Example;
use kernels::IGNORE_INDEX;

/// `ids` (a whole document, every token trained) as chunks of at most `max_len` tokens, the
/// later ones starting with `overlap` unlabelled tokens of context. Needs `overlap < max_len`.
pub fn chunk_document(ids: &[i32], max_len: usize, overlap: usize) -> Vec<Example> {
    assert!(
        overlap < max_len,
        "overlap {overlap} must be below the chunk length {max_len}"
    );
    let mut chunks = Vec::with_capacity(ids.len().div_ceil(max_len - overlap));
    let mut start = 0;
    loop {
        let end = (start + max_len).min(ids.len());
        let context = if start == 0 { 0 } else { overlap };
        let mut labels = ids[start..end].to_vec();
        labels[..context].fill(IGNORE_INDEX);
        chunks.push(Example {
            ids: ids[start..end].to_vec(),
            labels,
        });
        if end == ids.len() {
            return chunks;
        }
        start = end - overlap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(n: usize) -> Vec<i32> {
        (0..n as i32).collect()
    }

    /// Tokens that are next-token targets inside their chunk (label set, not the chunk's first).
    fn trained(chunks: &[Example]) -> Vec<i32> {
        chunks
            .iter()
            .flat_map(|c| {
                c.labels
                    .iter()
                    .skip(1)
                    .copied()
                    .filter(|&l| l != IGNORE_INDEX)
            })
            .collect()
    }

    #[test]
    fn without_overlap_the_chunks_are_the_document() {
        let doc = document(1000);
        let chunks = chunk_document(&doc, 256, 0);
        assert_eq!(
            chunks.iter().map(|c| c.ids.len()).collect::<Vec<_>>(),
            vec![256, 256, 256, 232]
        );
        let joined: Vec<i32> = chunks.iter().flat_map(|c| c.ids.clone()).collect();
        assert_eq!(joined, doc);
        assert!(chunks.iter().all(|c| c.labels == c.ids));
    }

    #[test]
    fn with_overlap_every_token_but_the_first_is_trained_once() {
        let doc = document(1000);
        let chunks = chunk_document(&doc, 256, 32);
        // Starts 0, 224, 448, 672, 896: the last chunk holds tokens 896..1000.
        assert_eq!(
            chunks.iter().map(|c| c.ids[0]).collect::<Vec<_>>(),
            vec![0, 224, 448, 672, 896]
        );
        assert!(chunks.iter().all(|c| c.ids.len() <= 256));
        assert_eq!(trained(&chunks), document(1000)[1..].to_vec());
        assert!(chunks[1].labels[..32].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(chunks[1].labels[32], 256);
    }

    #[test]
    fn a_short_document_is_one_chunk() {
        let chunks = chunk_document(&document(10), 256, 32);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].labels, document(10));
    }
}
