//! `export-gguf --type`: llama.cpp's file types (llama.h `llama_ftype`, written as
//! `general.file_type`) and the ggml type each gives a tensor.
//!
//! - **f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1**: every matrix in that type, as
//!   convert_hf_to_gguf.py's `--outtype` and gguf-py write it; a matrix whose rows are not whole
//!   blocks falls back to F16.
//! - **The K-quant mixes** choose per tensor as `llama-quantize` does without an importance matrix
//!   (llama-quant.cpp `llama_tensor_get_type`, the arms a dense llama/qwen model reaches):
//!
//!   | type   | id | matrices | more bits                                                        |
//!   |--------|----|----------|------------------------------------------------------------------|
//!   | q4_k_s | 14 | Q4_K     | attn_v of layers 0–3, ffn_down of the first n/8 layers: Q5_K      |
//!   | q4_k_m | 15 | Q4_K     | attn_v and ffn_down of the layers where `use_more_bits`: Q6_K     |
//!   | q5_k_s | 16 | Q5_K     |                                                                  |
//!   | q5_k_m | 17 | Q5_K     | attn_v and ffn_down of the layers where `use_more_bits`: Q6_K     |
//!   | q6_k   | 18 | Q6_K     |                                                                  |
//!
//!   In all of them the LM head (`output.weight`, or `token_embd.weight` when the head is tied and
//!   there is no `output.weight`) is Q6_K, or Q8_0 when its rows are not whole super-blocks of 256;
//!   in llama.cpp's "70B" models (80 layers; for `llama`, with grouped-query attention) an attn_v
//!   still at Q4_K gets Q5_K. `use_more_bits(i, n)`: `i < n/8 || i ≥ 7n/8 || (i − n/8) mod 3 = 2`
//!   (the first and last eighth of the layers and every third between).
//!   A K type whose rows are not whole super-blocks falls back to the legacy type of about its
//!   size (llama-quant.cpp `tensor_type_fallback`): Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and
//!   that to F16 if the rows are not whole blocks of 32 either.
//! - Vectors (norms, biases, rope_freqs) stay F32 in every file type.

use super::quant::QuantType;

/// What `export-gguf --type` writes (llama.cpp's names, lower case).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q4_k_s")]
    Q4_K_S,
    #[value(name = "q4_k_m")]
    Q4_K_M,
    #[value(name = "q5_k_s")]
    Q5_K_S,
    #[value(name = "q5_k_m")]
    Q5_K_M,
    #[value(name = "q6_k")]
    Q6_K,
}

/// What the K mixes look at besides a tensor's name and shape.
#[derive(Clone, Copy, Debug)]
pub struct ModelLayout {
    pub layers: usize,
    /// The file has no `output.weight`: `token_embd.weight` is the head, quantized as the head.
    pub tied_head: bool,
    /// llama.cpp's `LLM_TYPE_70B`, whose attn_v gets Q5_K rather than Q4_K.
    pub seventy_b: bool,
}

impl ModelLayout {
    /// The layout of a model of GGUF architecture `arch` (`llama`, `qwen2`, `qwen3`).
    pub fn new(arch: &str, layers: usize, heads: usize, kv_heads: usize, tied_head: bool) -> Self {
        // llama.cpp's models/llama.cpp and models/qwen2.cpp `load_hparams`.
        let seventy_b = layers == 80 && (arch == "qwen2" || arch == "llama" && heads != kv_heads);
        ModelLayout {
            layers,
            tied_head,
            seventy_b,
        }
    }
}

/// llama-quant.cpp `use_more_bits`: the first and last eighth of `n` layers, and every third between.
fn use_more_bits(layer: usize, n: usize) -> bool {
    layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
}

/// The layer of a `blk.N.*` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

impl FileType {
    /// The `--type` value (`q4_k_m`).
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("every file type has a name")
            .get_name()
            .to_string()
    }

    /// `general.file_type` (llama.h `enum llama_ftype`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::Bf16 => 32,
        }
    }

    /// The type of most matrices (llama-quant.cpp `llama_ftype_get_default_type`).
    pub fn base_type(self) -> QuantType {
        match self {
            FileType::F32 => QuantType::F32,
            FileType::F16 => QuantType::F16,
            FileType::Bf16 => QuantType::Bf16,
            FileType::Q8_0 => QuantType::Q8_0,
            FileType::Q4_0 => QuantType::Q4_0,
            FileType::Q4_1 => QuantType::Q4_1,
            FileType::Q5_0 => QuantType::Q5_0,
            FileType::Q5_1 => QuantType::Q5_1,
            FileType::Q4_K_S | FileType::Q4_K_M => QuantType::Q4_K,
            FileType::Q5_K_S | FileType::Q5_K_M => QuantType::Q5_K,
            FileType::Q6_K => QuantType::Q6_K,
        }
    }

    /// Whether it is one of the K-quant mixes (whose types depend on the tensor).
    pub fn is_k_mix(self) -> bool {
        self.base_type().block_elements() == 256
    }

    /// The type of tensor `name` (GGUF name, shape in Hugging Face order) in a file of this type.
    pub fn tensor_type(self, name: &str, hf_shape: &[usize], model: &ModelLayout) -> QuantType {
        let row = match hf_shape {
            [_, .., row] => *row,
            _ => return QuantType::F32,
        };
        if !self.is_k_mix() {
            return fitting(self.base_type(), row).unwrap_or(QuantType::F16);
        }
        let head = name == "output.weight" || model.tied_head && name == "token_embd.weight";
        // The head's fallback (rows not whole super-blocks) is Q6_K's, Q8_0.
        let chosen = if head {
            QuantType::Q6_K
        } else {
            self.layer_type(name, model)
        };
        fitting(chosen, row)
            .or_else(|| fitting(legacy_of_similar_size(chosen), row))
            .unwrap_or(QuantType::F16)
    }

    /// The K mix's choice for a tensor that is not the head: more bits for some layers' attn_v
    /// and ffn_down (llama.cpp counts those tensors in file order: layer order here).
    fn layer_type(self, name: &str, model: &ModelLayout) -> QuantType {
        let base = self.base_type();
        let is_v = name.contains("attn_v.weight");
        let Some(layer) = layer_of(name).filter(|_| is_v || name.contains("ffn_down")) else {
            return base;
        };
        let n = model.layers;
        // Q4_K_S: attn_v of layers 0–3, ffn_down of the first eighth.
        let q4_k_s_more = if is_v { layer < 4 } else { layer < n / 8 };
        let chosen = match self {
            FileType::Q4_K_M | FileType::Q5_K_M if use_more_bits(layer, n) => QuantType::Q6_K,
            FileType::Q4_K_S if q4_k_s_more => QuantType::Q5_K,
            _ => base,
        };
        if is_v && model.seventy_b && chosen == QuantType::Q4_K {
            QuantType::Q5_K
        } else {
            chosen
        }
    }
}

/// `ty` if rows of `row` values are whole blocks of it.
fn fitting(ty: QuantType, row: usize) -> Option<QuantType> {
    row.is_multiple_of(ty.block_elements()).then_some(ty)
}

/// llama-quant.cpp `tensor_type_fallback` for a K type: the 32-value type of about its size.
fn legacy_of_similar_size(ty: QuantType) -> QuantType {
    match ty {
        QuantType::Q4_K => QuantType::Q5_0,
        QuantType::Q5_K => QuantType::Q5_1,
        QuantType::Q6_K => QuantType::Q8_0,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(layers: usize, tied_head: bool) -> ModelLayout {
        ModelLayout::new("llama", layers, 9, 3, tied_head)
    }

    #[test]
    fn more_bits_go_to_the_first_and_last_eighth_and_every_third_layer() {
        // 30 layers (SmolLM2-135M): n/8 = 3, 7n/8 = 26.
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        // 32 layers (Llama 2 7B): n/8 = 4, 7n/8 = 28.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn q4_k_m_picks_q6_k_for_the_head_and_some_attn_v_and_ffn_down() {
        let m = layout(30, true);
        let ty = |name: &str, shape: &[usize]| FileType::Q4_K_M.tensor_type(name, shape, &m);
        assert_eq!(ty("token_embd.weight", &[1024, 512]), QuantType::Q6_K);
        assert_eq!(ty("blk.5.attn_v.weight", &[256, 512]), QuantType::Q6_K);
        assert_eq!(ty("blk.6.attn_v.weight", &[256, 512]), QuantType::Q4_K);
        assert_eq!(ty("blk.29.ffn_down.weight", &[512, 1536]), QuantType::Q6_K);
        assert_eq!(ty("blk.4.ffn_down.weight", &[512, 1536]), QuantType::Q4_K);
        assert_eq!(ty("blk.5.attn_q.weight", &[512, 512]), QuantType::Q4_K);
        assert_eq!(ty("blk.5.attn_norm.weight", &[512]), QuantType::F32);
        // Rows of 576 (SmolLM2's hidden size) are not whole super-blocks: the legacy fallbacks.
        assert_eq!(ty("token_embd.weight", &[49152, 576]), QuantType::Q8_0);
        assert_eq!(ty("blk.5.attn_v.weight", &[192, 576]), QuantType::Q8_0);
        assert_eq!(ty("blk.6.attn_v.weight", &[192, 576]), QuantType::Q5_0);
        // ... and rows of 40 are not whole blocks of 32 either.
        assert_eq!(ty("blk.6.attn_v.weight", &[192, 40]), QuantType::F16);
    }

    #[test]
    fn an_untied_model_keeps_token_embd_at_the_base_type() {
        let m = layout(30, false);
        let ty = |name: &str| FileType::Q5_K_M.tensor_type(name, &[1024, 512], &m);
        assert_eq!(ty("token_embd.weight"), QuantType::Q5_K);
        assert_eq!(ty("output.weight"), QuantType::Q6_K);
        assert_eq!(ty("blk.0.attn_v.weight"), QuantType::Q6_K);
        assert_eq!(ty("blk.3.ffn_down.weight"), QuantType::Q5_K);
        let q5_1 = FileType::Q5_K_M.tensor_type("blk.3.ffn_up.weight", &[1024, 96], &m);
        assert_eq!(q5_1, QuantType::Q5_1);
    }

    #[test]
    fn q4_k_s_and_seventy_b_rules() {
        let m = layout(32, true);
        let ty = |name: &str| FileType::Q4_K_S.tensor_type(name, &[1024, 512], &m);
        assert_eq!(ty("blk.3.attn_v.weight"), QuantType::Q5_K);
        assert_eq!(ty("blk.4.attn_v.weight"), QuantType::Q4_K);
        assert_eq!(ty("blk.3.ffn_down.weight"), QuantType::Q5_K);
        assert_eq!(ty("blk.4.ffn_down.weight"), QuantType::Q4_K);
        let big = ModelLayout::new("llama", 80, 64, 8, false);
        assert!(big.seventy_b && !ModelLayout::new("llama", 80, 64, 64, false).seventy_b);
        let v = |ft: FileType, layer: usize| {
            ft.tensor_type(&format!("blk.{layer}.attn_v.weight"), &[1024, 8192], &big)
        };
        // n/8 = 10: layer 12 is the second of every third.
        assert_eq!(v(FileType::Q4_K_M, 12), QuantType::Q6_K);
        assert_eq!(v(FileType::Q4_K_M, 11), QuantType::Q5_K);
        assert_eq!(v(FileType::Q4_K_S, 12), QuantType::Q5_K);
        assert_eq!(v(FileType::Q5_K_S, 12), QuantType::Q5_K);
    }

    #[test]
    fn legacy_types_quantize_every_matrix_alike() {
        let m = layout(30, true);
        let ty = |ft: FileType, name: &str, shape: &[usize]| ft.tensor_type(name, shape, &m);
        assert_eq!(
            ty(FileType::Q4_0, "token_embd.weight", &[49152, 576]),
            QuantType::Q4_0
        );
        assert_eq!(
            ty(FileType::Q4_0, "blk.0.attn_v.weight", &[8, 40]),
            QuantType::F16
        );
        assert_eq!(
            ty(FileType::Q6_K, "blk.0.attn_v.weight", &[8, 512]),
            QuantType::Q6_K
        );
        assert_eq!(FileType::Q4_K_M.id(), 15);
    }
}
