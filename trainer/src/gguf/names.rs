//! llama.cpp tensor names → Hugging Face names (`llama`, `qwen2`, `qwen3` models: the Qwen2
//! q/k/v biases and the Qwen3 per-head q/k norms included), and undoing llama.cpp's row
//! permutation of the query and key projections, which its converter applies to `llama` only.
//!
//! Why the permutation exists: Hugging Face's RoPE rotates the pairs `(i, i + D/2)` of each head
//! (`rotate_half`), llama.cpp's rotates adjacent pairs `(2i, 2i + 1)`. convert_hf_to_gguf.py therefore
//! reorders the rows of `q_proj` (with `n_head`) and `k_proj` (with `n_head_kv`):
//! ```text
//! w.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(n_head·D, in)      (D = head_dim)
//! ```
//! so GGUF row `h·D + 2i + s` holds Hugging Face row `h·D + s·D/2 + i` (h < n_head, i < D/2, s ∈ {0,1}).
//! Undoing it: Hugging Face row `h·D + s·D/2 + i` ← GGUF row `h·D + 2i + s`.

/// What must happen to a tensor's rows on the way to Hugging Face layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    AsStored,
    /// Undo llama.cpp's RoPE permutation over this many heads.
    Unpermute {
        heads: usize,
    },
}

/// The Hugging Face name of a llama.cpp tensor, and what to do with its rows (q and k rows, bias
/// included, are permuted in a `llama` file: `permuted`); `None` for a name this importer does
/// not know.
pub fn hf_name(
    gguf_name: &str,
    heads: usize,
    kv_heads: usize,
    permuted: bool,
) -> Option<(String, Rows)> {
    let (q_rows, k_rows) = match permuted {
        true => (
            Rows::Unpermute { heads },
            Rows::Unpermute { heads: kv_heads },
        ),
        false => (Rows::AsStored, Rows::AsStored),
    };
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), Rows::AsStored));
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = leaf.split_once('.')?;
    let (module, rows) = match module {
        "attn_norm" => ("input_layernorm", Rows::AsStored),
        "ffn_norm" => ("post_attention_layernorm", Rows::AsStored),
        "attn_q" => ("self_attn.q_proj", q_rows),
        "attn_k" => ("self_attn.k_proj", k_rows),
        "attn_v" => ("self_attn.v_proj", Rows::AsStored),
        "attn_output" => ("self_attn.o_proj", Rows::AsStored),
        "attn_q_norm" => ("self_attn.q_norm", Rows::AsStored),
        "attn_k_norm" => ("self_attn.k_norm", Rows::AsStored),
        "ffn_gate" => ("mlp.gate_proj", Rows::AsStored),
        "ffn_up" => ("mlp.up_proj", Rows::AsStored),
        "ffn_down" => ("mlp.down_proj", Rows::AsStored),
        _ => return None,
    };
    if kind != "weight" && kind != "bias" {
        return None;
    }
    Some((format!("model.layers.{layer}.{module}.{kind}"), rows))
}

/// Undoes llama.cpp's Q/K row permutation of a row-major `[heads·D, cols]` matrix (see the file comment).
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&w[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward permutation, `w.reshape(n_head, 2, D/2, in).swapaxes(1, 2)`, written as
    /// the index map of that numpy expression: output index (h, i, s) reads input index (h, s, i).
    fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
        let rows = w.len() / cols;
        let half = rows / heads / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..heads {
            for i in 0..half {
                for s in 0..2 {
                    let src = h * 2 * half + s * half + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_matches_a_hand_worked_case() {
        // 2 heads of head_dim 4, one column: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] (a/c = first halves)
        // are stored by llama.cpp as [a0 b0 a1 b1 | c0 d0 c1 d1].
        let stored = [0., 2., 1., 3., 4., 6., 5., 7.];
        assert_eq!(
            unpermute_rows(&stored, 2, 1),
            vec![0., 1., 2., 3., 4., 5., 6., 7.]
        );
        assert_eq!(
            permute_rows(&[0., 1., 2., 3., 4., 5., 6., 7.], 2, 1),
            stored.to_vec()
        );
    }

    #[test]
    fn unpermute_undoes_permute_over_rows_and_columns() {
        for (heads, head_dim, cols) in [(9, 64, 3), (3, 64, 2), (1, 4, 5), (4, 6, 1)] {
            let w: Vec<f32> = (0..heads * head_dim * cols).map(|x| x as f32).collect();
            let permuted = permute_rows(&w, heads, cols);
            assert_ne!(permuted, w, "heads {heads} head_dim {head_dim}");
            assert_eq!(unpermute_rows(&permuted, heads, cols), w);
            assert_eq!(
                permute_rows(&unpermute_rows(&w, heads, cols), heads, cols),
                w
            );
        }
    }

    #[test]
    fn names_map_to_transformers_modules() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight", 9, 3, true),
            Some((
                "model.layers.12.self_attn.k_proj.weight".into(),
                Rows::Unpermute { heads: 3 }
            ))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", 9, 3, true).unwrap().1,
            Rows::Unpermute { heads: 9 }
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", 9, 3, true).unwrap().0,
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("output.weight", 9, 3, true).unwrap().0,
            "lm_head.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight", 9, 3, true), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", 9, 3, true), None);
        // qwen2 / qwen3: biases and per-head norms, nothing permuted.
        assert_eq!(
            hf_name("blk.1.attn_v.bias", 9, 3, false),
            Some((
                "model.layers.1.self_attn.v_proj.bias".into(),
                Rows::AsStored
            ))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", 9, 3, false).unwrap().1,
            Rows::AsStored
        );
        assert_eq!(
            hf_name("blk.2.attn_k_norm.weight", 9, 3, false).unwrap().0,
            "model.layers.2.self_attn.k_norm.weight"
        );
        assert_eq!(hf_name("blk.2.attn_k_norm.scale", 9, 3, false), None);
    }
}
