//! The tokenizer against the Hugging Face fixture `tests/fixtures/smollm2-tokenizer` (ids, decoded
//! text, chat rendering and SFT labels produced by transformers), plus hand-written folders for
//! behaviour the fixture does not cover (BOS handling, a Llama-2 style template, errors).

use super::{ChatMessage, Tokenizer};
use kernels::IGNORE_INDEX;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2-tokenizer")
}

fn case() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("case.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected_i64(name: &str) -> Vec<i64> {
    let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let tensor = tensors.tensor(name).unwrap();
    assert_eq!(tensor.dtype(), Dtype::I64, "{name}");
    tensor
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn json_ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

fn messages(value: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(value.clone()).unwrap()
}

fn widen(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| id as i64).collect()
}

fn smollm2() -> Tokenizer {
    Tokenizer::load(&fixture_dir()).unwrap()
}

#[test]
fn every_fixture_encoding_gives_its_ids_and_decodes_back() {
    let tokenizer = smollm2();
    let case = case();
    let encodings = case["encodings"].as_array().unwrap();
    assert_eq!(encodings.len(), 6);
    for (index, encoding) in encodings.iter().enumerate() {
        let text = encoding["text"].as_str().unwrap();
        let ids = json_ids(&encoding["ids"]);
        let name = encoding["name"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids, "{name}");
        assert_eq!(tokenizer.encode(text, false).unwrap(), ids, "{name}");
        assert_eq!(widen(&ids), expected_i64(&format!("ids_{index}")), "{name}");
        assert_eq!(
            tokenizer.decode(&ids, false).unwrap(),
            encoding["decoded"].as_str().unwrap(),
            "{name}"
        );
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap())
            .collect();
        let expected_tokens: Vec<&str> = encoding["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens, expected_tokens, "{name}");
    }
}

#[test]
fn special_tokens_come_from_tokenizer_config() {
    let tokenizer = smollm2();
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_id(), Some(2));
    assert_eq!(tokenizer.pad_id(), Some(2));
    assert_eq!(tokenizer.unk_id(), Some(0));
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.model_max_length(), Some(8192));
    let special_text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<|endoftext|>";
    let ids = tokenizer.encode(special_text, false).unwrap();
    assert_eq!(
        tokenizer.decode(&ids, true).unwrap(),
        "user\nHello\nassistant\n"
    );
}

#[test]
fn chat_template_renders_and_encodes_like_transformers() {
    let tokenizer = smollm2();
    let case = case();
    let chat = &case["chat_template"];
    let rendered = tokenizer
        .render_chat(
            &messages(&chat["messages"]),
            chat["add_generation_prompt"].as_bool().unwrap(),
        )
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    let ids = tokenizer
        .encode_chat(&messages(&chat["messages"]), true)
        .unwrap();
    assert_eq!(ids, json_ids(&chat["ids"]));
    assert_eq!(widen(&ids), expected_i64("chat_ids"));
}

#[test]
fn sft_example_ids_and_labels_match_the_fixture() {
    let tokenizer = smollm2();
    let case = case();
    let sft = &case["sft_example"];
    let conversation = messages(&sft["messages"]);
    assert_eq!(
        tokenizer.render_chat(&conversation, false).unwrap(),
        sft["rendered"].as_str().unwrap()
    );
    let (ids, labels) = tokenizer
        .encode_chat_for_training(&conversation, None, false)
        .unwrap();
    assert_eq!(widen(&ids), expected_i64("sft_input_ids"));
    let labels_wide: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    assert_eq!(labels_wide, expected_i64("sft_labels"));
    let prompt_tokens = sft["n_prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(ids.len(), sft["n_tokens"].as_u64().unwrap() as usize);
    assert!(labels[..prompt_tokens].iter().all(|&l| l == IGNORE_INDEX));
    let response: Vec<u32> = labels[prompt_tokens..].iter().map(|&l| l as u32).collect();
    assert_eq!(
        tokenizer.decode(&response, false).unwrap(),
        "The car accelerated rapidly.<|im_end|>\n"
    );

    let (all_ids, all_labels) = tokenizer
        .encode_chat_for_training(&conversation, None, true)
        .unwrap();
    assert_eq!(all_ids, ids);
    assert_eq!(
        all_labels,
        ids.iter().map(|&id| id as i32).collect::<Vec<_>>()
    );
}

/// Each maximal run of trained labels, decoded.
fn trained_spans(tokenizer: &Tokenizer, labels: &[i32]) -> Vec<String> {
    labels
        .split(|&label| label == IGNORE_INDEX)
        .filter(|run| !run.is_empty())
        .map(|run| {
            let ids: Vec<u32> = run.iter().map(|&l| l as u32).collect();
            tokenizer.decode(&ids, false).unwrap()
        })
        .collect()
}

#[test]
fn multi_turn_trains_every_assistant_turn_and_masks_the_rest() {
    let tokenizer = smollm2();
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", "4."),
        ChatMessage::new("user", "And 3+3?"),
        ChatMessage::new("assistant", "6, of course."),
    ];
    let (ids, labels) = tokenizer
        .encode_chat_for_training(&conversation, None, false)
        .unwrap();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(
        trained_spans(&tokenizer, &labels),
        ["4.<|im_end|>\n", "6, of course.<|im_end|>\n"]
    );
    let masked: Vec<u32> = ids
        .iter()
        .zip(&labels)
        .filter(|(_, &label)| label == IGNORE_INDEX)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        tokenizer.decode(&masked, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn stream_decoder_yields_only_whole_characters() {
    let tokenizer = smollm2();
    let case = case();
    let encoding = &case["encodings"][1];
    let text = encoding["text"].as_str().unwrap();
    let ids = json_ids(&encoding["ids"]);
    let mut stream = tokenizer.stream_decoder(false);
    let chunks: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
    // "Ü" is two byte-level tokens (0xC3, 0x9C): nothing after the first, the character after the second.
    assert_eq!(chunks[0], None);
    assert_eq!(chunks[1].as_deref(), Some("Ü"));
    let streamed: String = chunks.iter().flatten().map(String::as_str).collect();
    assert_eq!(streamed, text);
    assert!(chunks
        .iter()
        .flatten()
        .all(|chunk| !chunk.contains('\u{FFFD}')));
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{err}"
    );
    assert!(err.contains("not found"), "{err}");
}

/// A folder with the fixture's tokenizer.json and a hand-written tokenizer_config.json.
fn folder_with_config(config: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

fn llama2_style() -> (tempfile::TempDir, Tokenizer) {
    let dir = folder_with_config(serde_json::json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": {"content": "<|im_end|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "pad_token": null,
        "chat_template": [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": LLAMA2_TEMPLATE}
        ],
        "model_max_length": 1000000000000000019884624838656.0_f64
    }));
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    (dir, tokenizer)
}

#[test]
fn add_bos_token_in_config_adds_bos_to_plain_text_only() {
    let (_dir, tokenizer) = llama2_style();
    assert_eq!(tokenizer.bos_id(), Some(0));
    assert_eq!(tokenizer.pad_id(), None);
    assert_eq!(tokenizer.model_max_length(), None);
    let body = tokenizer.encode("The quick brown fox", false).unwrap();
    assert_eq!(body, [504, 2365, 6354, 16438]);
    assert_eq!(
        tokenizer.encode("The quick brown fox", true).unwrap(),
        [0, 504, 2365, 6354, 16438]
    );
}

#[test]
fn llama2_style_template_writes_one_bos_per_user_turn_and_masks_instructions() {
    let (_dir, tokenizer) = llama2_style();
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", " Hi "),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
        ChatMessage::new("assistant", "Goodbye."),
    ];
    let rendered = tokenizer.render_chat(&conversation, false).unwrap();
    assert_eq!(
        rendered,
        "<|endoftext|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|im_end|>\
         <|endoftext|>[INST] Bye [/INST] Goodbye. <|im_end|>"
    );
    let (ids, labels) = tokenizer
        .encode_chat_for_training(&conversation, None, false)
        .unwrap();
    assert_eq!(
        ids.iter().filter(|&&id| id == 0).count(),
        2,
        "one BOS per user turn, none added"
    );
    assert_eq!(ids[0], 0);
    assert_eq!(
        trained_spans(&tokenizer, &labels),
        [" Hello! <|im_end|>", " Goodbye. <|im_end|>"]
    );
}

#[test]
fn llama2_style_template_rejects_roles_out_of_order() {
    let (_dir, tokenizer) = llama2_style();
    let conversation = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = tokenizer
        .render_chat(&conversation, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Conversation roles must alternate user/assistant"),
        "{err}"
    );
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert!(err.contains("line 1"), "{err}");
    let err = tokenizer
        .encode_chat_for_training(&conversation, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}

#[test]
fn add_eos_token_appends_eos() {
    let dir = folder_with_config(serde_json::json!({
        "eos_token": "<|im_end|>",
        "add_eos_token": true
    }));
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tokenizer.encode("The quick", true).unwrap(), [504, 2365, 2]);
    assert_eq!(tokenizer.encode("The quick", false).unwrap(), [504, 2365]);
}

#[test]
fn post_processor_of_tokenizer_json_applies_without_config_flags() {
    let dir = folder_with_config(serde_json::json!({"bos_token": "<|endoftext|>"}));
    let path = dir.path().join("tokenizer.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    std::fs::write(&path, json.to_string()).unwrap();
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tokenizer.encode("The quick", true).unwrap(), [0, 504, 2365]);
    assert_eq!(tokenizer.encode("The quick", false).unwrap(), [504, 2365]);
}

#[test]
fn special_token_missing_from_tokenizer_json_is_added_as_one_id() {
    let dir = folder_with_config(serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"}));
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(49152));
    assert_eq!(tokenizer.eos_id(), Some(49153));
    assert_eq!(tokenizer.vocab_size(), 49154);
    assert_eq!(
        tokenizer.encode("<s>The</s>", false).unwrap(),
        [49152, 504, 49153]
    );
}

#[test]
fn chat_template_jinja_file_wins_and_missing_template_is_explained() {
    let dir = folder_with_config(serde_json::json!({"chat_template": "from config"}));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.content }}>{% endfor %}\n",
    )
    .unwrap();
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(
        tokenizer
            .render_chat(&[ChatMessage::new("user", "x")], false)
            .unwrap(),
        "<x>"
    );

    let bare = folder_with_config(serde_json::json!({}));
    let err = Tokenizer::load(bare.path())
        .unwrap()
        .render_chat(&[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no `chat_template` key"), "{err}");
    assert!(
        err.contains(
            &bare
                .path()
                .join("tokenizer_config.json")
                .display()
                .to_string()
        ),
        "{err}"
    );
}

#[test]
fn malformed_config_keys_are_named() {
    let dir = folder_with_config(serde_json::json!({"eos_token": 7}));
    let err = format!("{:#}", Tokenizer::load(dir.path()).err().unwrap());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("`eos_token`"),
        "{err}"
    );

    let dir = folder_with_config(
        serde_json::json!({"chat_template": [{"name": "rag", "template": "x"}]}),
    );
    let err = format!("{:#}", Tokenizer::load(dir.path()).err().unwrap());
    assert!(err.contains("none is named \"default\""), "{err}");
}

#[test]
fn special_tokens_map_json_replaces_config_tokens() {
    let dir = folder_with_config(
        serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    );
    let map = serde_json::json!({"eos_token": {"content": "<|endoftext|>", "special": true}});
    std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();
    let tokenizer = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_id(), Some(0));
    assert_eq!(tokenizer.eos_token().unwrap().text, "<|endoftext|>");
}
