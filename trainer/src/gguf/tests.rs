//! GGUF reading, dequantization and import against the files of tests/fixtures/gguf, which
//! scripts/make-gguf-fixtures.py built with llama.cpp's own Python package (gguf-py).

use super::reader::{GgufError, GgufFile, MetaValue, DEFAULT_ALIGNMENT};
use super::{import_gguf, ImportSummary};
use crate::arch::ModelConfig;
use crate::model::{Batch, CheckpointPolicy, Decoder};
use crate::weights::WeightFiles;
use kernels::cpu::CpuBackend;
use kernels::AttentionLayout;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gguf")
        .join(name)
}

/// Writes `bytes` as a .gguf file in a fresh temp dir and tries to open it.
fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, Result<GgufFile, GgufError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    (dir, path, result)
}

#[test]
fn metadata_of_every_value_type_is_read() {
    let f = GgufFile::open(&fixture("types.gguf")).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    let expected = [
        ("test.u8", MetaValue::U8(200)),
        ("test.i8", MetaValue::I8(-100)),
        ("test.u16", MetaValue::U16(60000)),
        ("test.i16", MetaValue::I16(-30000)),
        ("test.u32", MetaValue::U32(4_000_000_000)),
        ("test.i32", MetaValue::I32(-2_000_000_000)),
        ("test.f32", MetaValue::F32(0.15625)),
        ("test.bool", MetaValue::Bool(true)),
        ("test.string", MetaValue::String("héllo, wörld".into())),
        ("test.u64", MetaValue::U64(18_000_000_000_000_000_000)),
        ("test.i64", MetaValue::I64(-9_000_000_000_000_000_000)),
        ("test.f64", MetaValue::F64(-2.5e-300)),
        (
            "test.array_i32",
            MetaValue::Array(vec![
                MetaValue::I32(1),
                MetaValue::I32(-2),
                MetaValue::I32(3),
            ]),
        ),
        (
            "test.array_f32",
            MetaValue::Array(vec![MetaValue::F32(0.5), MetaValue::F32(-1.25)]),
        ),
        (
            "test.array_string",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("".into()),
                MetaValue::String("ünï".into()),
            ]),
        ),
        ("general.architecture", MetaValue::String("llama".into())),
        ("general.alignment", MetaValue::U32(64)),
    ];
    for (key, value) in &expected {
        assert_eq!(f.get(key), Some(value), "{key}");
    }
    assert_eq!(f.metadata.len(), expected.len());
}

#[test]
fn tensor_directory_has_names_shapes_types_and_aligned_offsets() {
    let f = GgufFile::open(&fixture("types.gguf")).unwrap();
    let listed: Vec<(&str, Vec<u64>, &str)> = f
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dims.clone(), f.tensor_type(t).name()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("f32", vec![5, 3], "F32"),
            ("f16", vec![7, 2], "F16"),
            ("bf16", vec![9, 2], "BF16"),
            ("q8_0", vec![64, 3], "Q8_0"),
            ("q4_0", vec![64, 3], "Q4_0"),
            ("q4_1", vec![64, 3], "Q4_1"),
            ("q5_0", vec![64, 2], "Q5_0"),
            ("q5_1", vec![64, 2], "Q5_1"),
            ("q2_k", vec![256, 2], "Q2_K"),
            ("q3_k", vec![256, 2], "Q3_K"),
            ("q4_k", vec![256, 2], "Q4_K"),
            ("q5_k", vec![256, 2], "Q5_K"),
            ("q6_k", vec![256, 2], "Q6_K"),
        ]
    );
    assert!(f.tensors.iter().all(|t| t.offset % 64 == 0));
    // Q8_0: 3 rows × 2 blocks × 34 bytes.
    assert_eq!(f.tensor_bytes(f.tensor("q8_0").unwrap()).len(), 204);
}

/// gguf-py's numpy dequantization multiplies and adds in f32 in the same order as ggml's C reference
/// and as ours, with no fused multiply-add on either side: the values must be equal bit for bit.
#[test]
fn every_supported_type_dequantizes_exactly_like_gguf_py() {
    let f = GgufFile::open(&fixture("types.gguf")).unwrap();
    let expected = WeightFiles::open_file(&fixture("types.expected.safetensors")).unwrap();
    for t in &f.tensors {
        let want = expected.f32(&t.name, &t.hf_shape()).unwrap();
        let got = f.dequantize(t).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}[{i}]: {g} vs {w}", t.name);
        }
        assert!(
            want.iter().any(|&x| x != 0.0),
            "{}: fixture is all zeros",
            t.name
        );
    }
}

#[test]
fn an_unsupported_type_names_the_file_the_tensor_and_the_type() {
    let path = fixture("unsupported-type.gguf");
    let f = GgufFile::open(&path).unwrap();
    let e = f.dequantize(&f.tensors[0]).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("`blk.0.attn_q.weight`"), "{e}");
    assert!(e.contains("IQ2_XXS (id 16) is not supported"), "{e}");
}

#[test]
fn a_wrong_magic_is_named() {
    let mut bytes = std::fs::read(fixture("types.gguf")).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    let (_d, path, r) = open_bytes(&bytes);
    let e = r.err().unwrap().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("not a GGUF file"),
        "{e}"
    );
}

#[test]
fn versions_other_than_2_and_3_are_refused_and_2_is_read() {
    let mut bytes = std::fs::read(fixture("types.gguf")).unwrap();
    for version in [1u32, 4] {
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let (_d, path, r) = open_bytes(&bytes);
        let e = r.err().unwrap().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("GGUF version {version}")) && e.contains("versions 2 and 3"),
            "{e}"
        );
    }
    // Version 2 has the same layout as 3 (3 only added big-endian files).
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (_d, _p, r) = open_bytes(&bytes);
    assert_eq!(r.unwrap().tensors.len(), 13);
}

#[test]
fn truncation_anywhere_is_reported_with_the_file_and_what_was_cut() {
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    // In the header counts, inside the metadata, inside the tensor directory, and in the last
    // tensor's data (q6_k's 420 bytes are followed by 28 bytes of padding to the alignment of 64).
    let directory = bytes.windows(4).position(|w| w == b"q4_1").unwrap();
    for (cut, what) in [
        (10, "tensor count"),
        (60, "metadata"),
        (directory + 2, "the name of tensor #5"),
        (bytes.len() - 40, "the data of tensor `q6_k`"),
    ] {
        let (_d, path, r) = open_bytes(&bytes[..cut]);
        let e = r.err().unwrap().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("is truncated"),
            "cut {cut}: {e}"
        );
        assert!(e.contains(what), "cut {cut}: {e}");
    }
}

#[test]
fn default_alignment_is_32() {
    let f = GgufFile::open(&fixture("tiny-llama.gguf")).unwrap();
    assert_eq!((f.alignment, DEFAULT_ALIGNMENT), (32, 32));
    assert!(f.tensors.iter().all(|t| t.offset % 32 == 0));
}

fn import_tiny() -> (tempfile::TempDir, ImportSummary) {
    let dir = tempfile::tempdir().unwrap();
    let summary = import_gguf(&fixture("tiny-llama.gguf"), dir.path()).unwrap();
    (dir, summary)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn tiny_llama_imports_with_original_tensors_and_config() {
    let (dir, summary) = import_tiny();
    assert!(summary.tied_embeddings);
    assert_eq!(
        summary.tensor_types.iter().collect::<Vec<_>>(),
        vec![(&"F16", &1), (&"F32", &10)]
    );
    let config = read_json(&dir.path().join("config.json"));
    for (key, value) in [
        ("architectures", json!(["LlamaForCausalLM"])),
        ("hidden_size", json!(8)),
        ("intermediate_size", json!(12)),
        ("num_hidden_layers", json!(1)),
        ("num_attention_heads", json!(2)),
        ("num_key_value_heads", json!(1)),
        ("head_dim", json!(4)),
        ("max_position_embeddings", json!(128)),
        ("rms_norm_eps", json!(1e-5)),
        ("rope_theta", json!(50000.0)),
        ("vocab_size", json!(262)),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(1)),
        ("eos_token_id", json!(2)),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    assert_eq!(
        read_json(&dir.path().join("generation_config.json")),
        json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    );
    // The fixture's values are multiples of 1/64, exact in bf16: the import must reproduce them exactly,
    // which needs the right names, shapes and the Q/K rows un-permuted.
    let got = WeightFiles::open(dir.path()).unwrap();
    let want = WeightFiles::open_file(&fixture("tiny-llama.expected.safetensors")).unwrap();
    assert_eq!(
        got.names().collect::<Vec<_>>(),
        want.names().collect::<Vec<_>>()
    );
    for name in want.names() {
        let (shape, dtype) = got.info(name).unwrap();
        assert_eq!(dtype, safetensors::Dtype::BF16, "{name}");
        assert_eq!(
            got.f32(name, &shape).unwrap(),
            want.f32(name, &shape).unwrap(),
            "{name}"
        );
    }
    let config = ModelConfig::load(dir.path()).unwrap();
    let be = CpuBackend::new();
    let model = Decoder::load(&be, config.clone(), &got).unwrap();
    let batch = Batch::new(
        &be,
        &config,
        &[1, 107, 108],
        &[1, 107, 108],
        AttentionLayout::right_padded(&[3], 3, None),
    )
    .unwrap();
    let acts = model
        .forward(&be, None, &batch, CheckpointPolicy::OFF)
        .unwrap();
    let logits = kernels::Backend::download(&be, &model.logits(&be, &acts).unwrap()).unwrap();
    assert_eq!(logits.len(), 3 * 262);
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn tiny_llama_tokenizer_splits_digits_merges_and_keeps_specials() {
    let (dir, _) = import_tiny();
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    // ids: 0–2 specials, 3 + b for the byte b, 259 "Ġt", 260 "he", 261 "Ġthe".
    // "hi the 12": Digits splits off 1 and 2; GPT-2's regex gives "hi", " the", " " → h i Ġthe Ġ 1 2.
    let enc = tok
        .encode("<|im_start|>hi the 12<|im_end|>", false)
        .unwrap();
    assert_eq!(
        enc.get_ids(),
        &[1, 3 + b'h' as u32, 3 + b'i' as u32, 261, 35, 52, 53, 2]
    );
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "<|im_start|>hi the 12<|im_end|>"
    );
    let config = read_json(&dir.path().join("tokenizer_config.json"));
    assert_eq!(config["add_bos_token"], json!(false));
    assert_eq!(
        (
            &config["bos_token"],
            &config["eos_token"],
            &config["pad_token"],
            &config["unk_token"]
        ),
        (
            &json!("<|im_start|>"),
            &json!("<|im_end|>"),
            &json!("<|im_end|>"),
            &json!("<|endoftext|>")
        )
    );
    assert_eq!(config["added_tokens_decoder"]["2"]["special"], json!(true));
    assert_eq!(
        config["chat_template"],
        json!("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    );
}

#[test]
fn an_unknown_pre_tokenizer_is_refused_by_name() {
    let f = GgufFile::open(&fixture("tiny-llama.gguf")).unwrap();
    let mut meta = f.metadata.clone();
    meta.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("deepseek-coder".into()),
    );
    let e = super::tokenizer::build(&meta, 128)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`deepseek-coder`") && e.contains("smollm"),
        "{e}"
    );
}

#[test]
fn add_bos_token_prepends_bos_through_the_post_processor() {
    let f = GgufFile::open(&fixture("tiny-llama.gguf")).unwrap();
    let mut meta = f.metadata.clone();
    meta.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
    let files = super::tokenizer::build(&meta, 128).unwrap();
    let tok: tokenizers::Tokenizer = files.tokenizer_json.to_string().parse().unwrap();
    assert_eq!(tok.encode("he", true).unwrap().get_ids(), &[1, 260]);
    assert_eq!(tok.encode("he", false).unwrap().get_ids(), &[260]);
    assert_eq!(files.tokenizer_config["add_bos_token"], json!(true));
}

/// `qwen2` and `qwen3` files become `Qwen2ForCausalLM` / `Qwen3ForCausalLM` folders: their biases and
/// per-head norms come across, Q/K rows stay as stored, every tensor equals the Hugging Face one, and
/// the Qwen pre-tokenizer (NFC, single digits) is rebuilt.
#[test]
fn tiny_qwen2_and_qwen3_import_as_their_families() {
    for (arch, class, tied, head_dim) in [
        ("qwen2", "Qwen2ForCausalLM", true, 4),
        ("qwen3", "Qwen3ForCausalLM", false, 6),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let summary = import_gguf(&fixture(&format!("tiny-{arch}.gguf")), dir.path()).unwrap();
        assert_eq!(summary.tied_embeddings, tied, "{arch}");
        let config = ModelConfig::load(dir.path()).unwrap();
        assert_eq!(config.architecture.hf_name(), class);
        assert_eq!(
            (config.head_dim, config.qk_norm),
            (head_dim, arch == "qwen3")
        );
        assert_eq!(config.biased.len(), if arch == "qwen2" { 3 } else { 0 });
        let got = WeightFiles::open(dir.path()).unwrap();
        let want =
            WeightFiles::open_file(&fixture(&format!("tiny-{arch}.expected.safetensors"))).unwrap();
        assert_eq!(
            got.names().collect::<Vec<_>>(),
            want.names().collect::<Vec<_>>(),
            "{arch}"
        );
        for name in want.names() {
            let (shape, _) = got.info(name).unwrap();
            assert_eq!(
                got.f32(name, &shape).unwrap(),
                want.f32(name, &shape).unwrap(),
                "{arch} {name}"
            );
        }
        let be = CpuBackend::new();
        let model = Decoder::load(&be, config.clone(), &got).unwrap();
        let batch = Batch::new(
            &be,
            &config,
            &[1, 107, 108],
            &[1, 107, 108],
            AttentionLayout::right_padded(&[3], 3, None),
        )
        .unwrap();
        let acts = model
            .forward(&be, None, &batch, CheckpointPolicy::OFF)
            .unwrap();
        let logits = kernels::Backend::download(&be, &model.logits(&be, &acts).unwrap()).unwrap();
        assert!(logits.len() == 3 * 262 && logits.iter().all(|x| x.is_finite()));

        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        // Every digit alone (Qwen's regex); "e\u{301}" is NFC-composed to "é" = bytes C3 A9 first.
        let enc = tok.encode("the 12 e\u{301}", false).unwrap();
        assert_eq!(
            enc.get_ids(),
            &[3 + b't' as u32, 260, 35, 52, 53, 35, 3 + 0xC3, 3 + 0xA9],
            "{arch}"
        );
    }
}
