//! Rebuilding a Hugging Face byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) from a
//! GGUF file's `tokenizer.*` metadata.
//!
//! `tokenizer.ggml.tokens[id]` is the vocabulary in GPT-2's byte-to-unicode alphabet (the byte 0x20 is
//! `Ġ`), `tokenizer.ggml.merges` the BPE merges as "left right" in priority order, and
//! `tokenizer.ggml.token_type[id]` llama.cpp's `llama_token_type`: 1 normal, 2 unknown, 3 control,
//! 4 user-defined, 5 unused, 6 byte. Control tokens become special added tokens, user-defined ones
//! plain added tokens; both match the raw text before pre-tokenization, as in llama.cpp.
//! `tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp uses (llama-vocab.cpp); each one
//! supported here is written as the Hugging Face pre-tokenizer it was converted from.

use super::reader::MetaValue;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub const TOKEN_CONTROL: i64 = 3;
pub const TOKEN_USER_DEFINED: i64 = 4;

/// The special-token ids the GGUF declares (also written to config.json and generation_config.json).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

/// The two tokenizer files of a Hugging Face folder, as JSON.
pub struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub special: SpecialIds,
}

/// Llama 3's split regex (tokenizer.json of meta-llama/Meta-Llama-3-8B; llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex (tokenizer.json of Qwen/Qwen2.5-7B, also Qwen3; llama.cpp `qwen2`): Llama 3's
/// with every digit alone.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values this importer knows.
const SUPPORTED_PRE: &str = "smollm, gpt-2, default, llama-bpe, qwen2";

/// The `tokenizer.ggml.pre` values export writes (`default` reads as `gpt-2`).
pub const EXPORTED_PRE: [&str; 3] = ["smollm", "gpt-2", "llama-bpe"];

/// llama.cpp's token types (`llama_token_type`) that export writes besides control and user-defined.
pub const TOKEN_NORMAL: i64 = 1;
pub const TOKEN_UNUSED: i64 = 5;

/// Builds the tokenizer files from the metadata; `model_max_length` is the context length.
pub fn build(
    metadata: &BTreeMap<String, MetaValue>,
    model_max_length: usize,
) -> Result<TokenizerFiles> {
    let model = string(metadata, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "tokenizer.ggml.model is `{model}`; import-gguf rebuilds byte-level BPE tokenizers (`gpt2`) only \
             (`llama` is SentencePiece): take tokenizer.json from the original Hugging Face model instead"
        );
    }
    let tokens: Vec<&str> = array(metadata, "tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| anyhow!("tokenizer.ggml.tokens[{i}] is not a string"))
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| anyhow!("tokenizer.ggml.token_type is not an array"))?;
            if a.len() != tokens.len() {
                bail!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    a.len(),
                    tokens.len()
                );
            }
            a.iter()
                .map(|t| {
                    t.as_i64()
                        .ok_or_else(|| anyhow!("tokenizer.ggml.token_type holds {t:?}"))
                })
                .collect::<Result<_>>()?
        }
    };
    let merges: Vec<Value> = array(metadata, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (left, right) = m.as_str().and_then(|s| s.split_once(' ')).ok_or_else(|| {
                anyhow!("tokenizer.ggml.merges[{i}] is {m:?}, not \"left right\"")
            })?;
            Ok(json!([left, right]))
        })
        .collect::<Result<_>>()?;

    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.to_string(), json!(id)) {
            bail!("tokenizer.ggml.tokens has `{token}` twice (ids {first} and {id}); a tokenizer.json vocabulary needs unique tokens");
        }
    }
    let added: Vec<(usize, bool)> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, &t)| (id, t == TOKEN_CONTROL))
        .collect();
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|&(id, special)| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        })
        .collect();

    let special = SpecialIds {
        bos: token_id(metadata, "tokenizer.ggml.bos_token_id", tokens.len())?,
        eos: token_id(metadata, "tokenizer.ggml.eos_token_id", tokens.len())?,
        pad: token_id(metadata, "tokenizer.ggml.padding_token_id", tokens.len())?,
        unk: token_id(metadata, "tokenizer.ggml.unknown_token_id", tokens.len())?,
    };
    let add_bos = flag(metadata, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = flag(metadata, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let Pretokenization {
        normalizer,
        pre_tokenizer,
        ignore_merges,
    } = pre_tokenizer(pre)?;
    let post_processor = match (add_bos, special.bos) {
        (true, Some(bos)) => bos_template(tokens[bos as usize], bos),
        (true, None) => {
            bail!("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing")
        }
        (false, _) => byte_level(true, false, true),
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        }
    });

    let mut config = Map::new();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("add_prefix_space".into(), json!(false));
    let decoder: Map<String, Value> = added
        .iter()
        .map(|&(id, special)| {
            (
                id.to_string(),
                json!({"content": tokens[id], "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": special}),
            )
        })
        .collect();
    config.insert("added_tokens_decoder".into(), Value::Object(decoder));
    for (key, id) in [
        ("bos_token", special.bos),
        ("eos_token", special.eos),
        ("pad_token", special.pad),
        ("unk_token", special.unk),
    ] {
        if let Some(id) = id {
            config.insert(key.into(), json!(tokens[id as usize]));
        }
    }
    if let Some(template) = metadata.get("tokenizer.chat_template") {
        let template = template
            .as_str()
            .ok_or_else(|| anyhow!("tokenizer.chat_template is not a string"))?;
        config.insert("chat_template".into(), json!(template));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(model_max_length));
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(config),
        special,
    })
}

/// What the text goes through before BPE, as tokenizer.json spells it.
pub struct Pretokenization {
    pub normalizer: Value,
    pub pre_tokenizer: Value,
    /// BPE's `ignore_merges`: a whole pre-token found in the vocabulary is one token.
    pub ignore_merges: bool,
}

/// The Hugging Face normalizer and pre-tokenizer for llama.cpp's `tokenizer.ggml.pre`.
pub fn pre_tokenizer(pre: &str) -> Result<Pretokenization> {
    let split = |regex: &str, trim_offsets: bool| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false, trim_offsets, false),
        ]})
    };
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
        // SmolLM / StarCoder: every digit alone, then GPT-2's regex.
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true),
            ]}),
            false,
        ),
        "gpt-2" | "default" => (Value::Null, byte_level(false, true, true), false),
        "llama-bpe" => (Value::Null, split(LLAMA3_SPLIT, true), true),
        // Qwen2, Qwen2.5, Qwen3: Unicode NFC first.
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_SPLIT, false), false),
        other => bail!(
            "tokenizer.ggml.pre `{other}` is not supported; import-gguf knows {SUPPORTED_PRE}. \
             Take tokenizer.json from the original Hugging Face model instead"
        ),
    };
    Ok(Pretokenization {
        normalizer,
        pre_tokenizer,
        ignore_merges,
    })
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
           "trim_offsets": trim_offsets, "use_regex": use_regex})
}

/// Prepends BOS to every sequence, as Hugging Face does for tokenizers with `add_bos_token`.
fn bos_template(bos: &str, id: u32) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}
    })
}

fn string<'a>(metadata: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<&'a str> {
    metadata
        .get(key)
        .with_context(|| format!("metadata `{key}` is missing: the file carries no tokenizer"))?
        .as_str()
        .ok_or_else(|| anyhow!("metadata `{key}` is not a string"))
}

fn array<'a>(metadata: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<&'a [MetaValue]> {
    metadata
        .get(key)
        .with_context(|| format!("metadata `{key}` is missing: the file carries no tokenizer"))?
        .as_array()
        .ok_or_else(|| anyhow!("metadata `{key}` is not an array"))
}

fn flag(metadata: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<bool>> {
    metadata
        .get(key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| anyhow!("metadata `{key}` is {v:?}, not a bool"))
        })
        .transpose()
}

fn token_id(metadata: &BTreeMap<String, MetaValue>, key: &str, n: usize) -> Result<Option<u32>> {
    let Some(v) = metadata.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < n => Ok(Some(id as u32)),
        _ => bail!("metadata `{key}` is {v:?}, not a token id below the vocabulary size {n}"),
    }
}
