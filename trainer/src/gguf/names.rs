//! llama.cpp tensor names ⇄ Hugging Face names (`llama`, `qwen2`, `qwen3` models: the Qwen2 q/k/v
//! biases and the Qwen3 per-head q/k norms included), and llama.cpp's row permutation of the query
//! and key projections, which its converter applies to `llama` only (applied on export, undone on
//! import).
//!
//! Why the permutation exists: Hugging Face's RoPE rotates the pairs `(i, i + D/2)` of each head
//! (`rotate_half`), llama.cpp's rotates adjacent pairs `(2i, 2i + 1)`. convert_hf_to_gguf.py therefore
//! reorders the rows of `q_proj` (with `n_head`) and `k_proj` (with `n_head_kv`):
//! ```text
//! w.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(n_head·D, in)      (D = head_dim)
//! ```
//! so GGUF row `h·D + 2i + s` holds Hugging Face row `h·D + s·D/2 + i` (h < n_head, i < D/2, s ∈ {0,1}).

/// How llama.cpp stores a tensor's rows relative to Hugging Face.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    AsStored,
    /// Permuted for llama.cpp's RoPE over this many heads (see the file comment).
    RopePermuted {
        heads: usize,
    },
}

/// Which head count a layer tensor's rows are permuted over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Heads {
    None,
    Query,
    KeyValue,
}

/// The tensors of a whole model: (llama.cpp name, Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The tensors of layer N: (llama.cpp `blk.N.` leaf, Hugging Face `model.layers.N.` module, heads).
const LAYER_TENSORS: [(&str, &str, Heads); 11] = [
    ("attn_norm", "input_layernorm", Heads::None),
    ("ffn_norm", "post_attention_layernorm", Heads::None),
    ("attn_q", "self_attn.q_proj", Heads::Query),
    ("attn_k", "self_attn.k_proj", Heads::KeyValue),
    ("attn_v", "self_attn.v_proj", Heads::None),
    ("attn_output", "self_attn.o_proj", Heads::None),
    ("attn_q_norm", "self_attn.q_norm", Heads::None),
    ("attn_k_norm", "self_attn.k_norm", Heads::None),
    ("ffn_gate", "mlp.gate_proj", Heads::None),
    ("ffn_up", "mlp.up_proj", Heads::None),
    ("ffn_down", "mlp.down_proj", Heads::None),
];

fn rows(heads: Heads, n_head: usize, n_kv_head: usize, permuted: bool) -> Rows {
    match heads {
        _ if !permuted => Rows::AsStored,
        Heads::None => Rows::AsStored,
        Heads::Query => Rows::RopePermuted { heads: n_head },
        Heads::KeyValue => Rows::RopePermuted { heads: n_kv_head },
    }
}

/// The Hugging Face name of a llama.cpp tensor, and how its rows are stored (q and k rows, bias
/// included, are permuted in a `llama` file: `permuted`); `None` for a name this mapping does not
/// know.
pub fn hf_name(
    gguf_name: &str,
    heads: usize,
    kv_heads: usize,
    permuted: bool,
) -> Option<(String, Rows)> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == gguf_name) {
        return Some((hf.to_string(), Rows::AsStored));
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (leaf, kind) = leaf.split_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, module, h) = LAYER_TENSORS.iter().find(|(g, ..)| *g == leaf)?;
    Some((
        format!("model.layers.{layer}.{module}.{kind}"),
        rows(*h, heads, kv_heads, permuted),
    ))
}

/// The llama.cpp name of a Hugging Face tensor, and how llama.cpp stores its rows (`permuted` for
/// the `llama` architecture); `None` for a name llama.cpp does not have.
pub fn gguf_name(
    hf: &str,
    heads: usize,
    kv_heads: usize,
    permuted: bool,
) -> Option<(String, Rows)> {
    if let Some((g, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some((g.to_string(), Rows::AsStored));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module_and_suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = module_and_suffix.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (leaf, _, h) = LAYER_TENSORS.iter().find(|(_, m, _)| *m == module)?;
    Some((
        format!("blk.{layer}.{leaf}.{kind}"),
        rows(*h, heads, kv_heads, permuted),
    ))
}

/// Applies llama.cpp's Q/K row permutation to a row-major `[heads·D, cols]` matrix (export).
pub fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(w, heads, cols, true)
}

/// Undoes llama.cpp's Q/K row permutation of a row-major `[heads·D, cols]` matrix (import).
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(w, heads, cols, false)
}

/// GGUF row `h·D + 2i + s` ⇄ Hugging Face row `h·D + s·D/2 + i`.
fn reorder_rows(w: &[f32], heads: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let rows = w.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                let (dst, src) = if to_gguf {
                    (gguf_row, hf_row)
                } else {
                    (hf_row, gguf_row)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
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
    fn numpy_permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
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
            numpy_permute(&[0., 1., 2., 3., 4., 5., 6., 7.], 2, 1),
            stored.to_vec()
        );
    }

    #[test]
    fn unpermute_undoes_permute_over_rows_and_columns() {
        for (heads, head_dim, cols) in [(9, 64, 3), (3, 64, 2), (1, 4, 5), (4, 6, 1)] {
            let w: Vec<f32> = (0..heads * head_dim * cols).map(|x| x as f32).collect();
            let permuted = numpy_permute(&w, heads, cols);
            assert_ne!(permuted, w, "heads {heads} head_dim {head_dim}");
            assert_eq!(unpermute_rows(&permuted, heads, cols), w);
            assert_eq!(permute_rows(&w, heads, cols), permuted);
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
                Rows::RopePermuted { heads: 3 }
            ))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", 9, 3, true).unwrap().1,
            Rows::RopePermuted { heads: 9 }
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
        for gguf in [
            "blk.12.attn_k.weight",
            "blk.0.attn_q.weight",
            "blk.3.ffn_down.weight",
            "output.weight",
            "token_embd.weight",
        ] {
            let (hf, rows) = hf_name(gguf, 9, 3, true).unwrap();
            assert_eq!(gguf_name(&hf, 9, 3, true), Some((gguf.to_string(), rows)));
        }
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq", 9, 3, true),
            None
        );
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
