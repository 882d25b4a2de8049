//! Every tensor a model of a given config has, with its Hugging Face name and shape: the
//! description's answer to "which tensors exist" (checked by importers, listed for tests).

use super::{HeadNorm, ModelConfig, Projection};

impl ModelConfig {
    /// Every tensor of the model with its shape, layer by layer; `lm_head.weight` only when the
    /// head is not `tied` to the embedding.
    pub fn tensor_shapes(&self, tied: bool) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                vec![h],
            ));
            for p in Projection::ALL {
                let (o, i) = p.shape(self);
                out.push((p.weight_name(l), vec![o, i]));
                if self.has_bias(p) {
                    out.push((p.bias_name(l), vec![o]));
                }
            }
            if self.qk_norm {
                for n in [HeadNorm::Q, HeadNorm::K] {
                    out.push((n.weight_name(l), vec![self.head_dim]));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !tied {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor lists of the tiny Qwen fixtures are exactly the files' tensors.
    #[test]
    fn the_qwen_fixtures_hold_exactly_the_described_tensors() {
        let fixtures =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for case in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
            let dir = fixtures.join(case).join("model");
            let c = ModelConfig::load(&dir).unwrap();
            let files = crate::weights::WeightFiles::open(&dir).unwrap();
            let mut want: Vec<(String, Vec<usize>)> = c.tensor_shapes(c.tie_word_embeddings);
            want.sort();
            let got: Vec<(String, Vec<usize>)> = files
                .names()
                .map(|n| (n.to_string(), files.info(n).unwrap().0))
                .collect();
            assert_eq!(got, want, "{case}");
        }
        let c = ModelConfig::load(&fixtures.join("tiny-qwen2/model")).unwrap();
        let shapes = c.tensor_shapes(true);
        assert_eq!(shapes.len(), 1 + 3 * (2 + 7 + 3) + 1);
        assert!(shapes.contains(&("model.layers.2.self_attn.k_proj.bias".into(), vec![32])));
    }
}
