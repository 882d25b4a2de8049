//! `fuselora check-reference` on the Hugging Face fixtures (copied into tests/fixtures).

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn check(case: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fuselora"))
        .arg("check-reference")
        .arg(fixture(case))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn tiny_llama_matches_transformers_and_peft() {
    let (ok, text) = check("tiny-llama");
    assert!(ok, "{text}");
    assert!(text.contains("218 passed, 0 failed"), "{text}");
}

#[test]
fn tiny_mistral_with_sliding_window_matches() {
    let (ok, text) = check("tiny-mistral");
    assert!(ok, "{text}");
    assert!(text.contains("218 passed, 0 failed"), "{text}");
}

#[test]
fn tiny_qwen2_with_qkv_biases_and_tied_head_matches() {
    let (ok, text) = check("tiny-qwen2");
    assert!(ok, "{text}");
    assert!(text.contains("218 passed, 0 failed"), "{text}");
}

#[test]
fn tiny_qwen3_with_per_head_qk_norms_and_explicit_head_dim_matches() {
    let (ok, text) = check("tiny-qwen3");
    assert!(ok, "{text}");
    assert!(text.contains("218 passed, 0 failed"), "{text}");
}

#[test]
fn a_folder_without_a_case_fails_with_the_path() {
    let (ok, text) = check("no-such-case");
    assert!(!ok);
    assert!(text.contains("no-such-case/case.json"), "{text}");
}

#[test]
fn smollm2_tokenizer_ids_are_exact() {
    let (ok, text) = check("smollm2-tokenizer");
    assert!(ok, "{text}");
    assert!(text.contains("9 passed, 0 failed"), "{text}");
}

#[test]
fn tiny_llama_dpo_matches_trl() {
    let (ok, text) = check("tiny-llama-dpo");
    assert!(ok, "{text}");
    assert!(text.contains("51 passed, 0 failed"), "{text}");
}

#[test]
fn nf4_quantization_is_bit_exact_with_bitsandbytes() {
    let (ok, text) = check("nf4-quant");
    assert!(ok, "{text}");
    assert!(text.contains("70 passed, 0 failed"), "{text}");
}

#[test]
fn qlora_on_a_bitsandbytes_4bit_checkpoint_matches() {
    let (ok, text) = check("tiny-llama-qlora");
    assert!(ok, "{text}");
    assert!(text.contains("88 passed, 0 failed"), "{text}");
}

#[test]
fn tiny_llama_orpo_matches_trl() {
    let (ok, text) = check("tiny-llama-orpo");
    assert!(ok, "{text}");
    assert!(text.contains("50 passed, 0 failed"), "{text}");
}
