//! A Hugging Face byte-level BPE tokenizer folder → GGUF `tokenizer.*` metadata: the inverse of
//! [`super::tokenizer`], written as llama.cpp's convert_hf_to_gguf.py writes it (`get_vocab_base`).
//!
//! - `tokenizer.ggml.tokens[id]` for every id below the model's vocabulary size; ids the tokenizer
//!   does not use become `[PAD{id}]` of type unused.
//! - `token_type`: added special tokens are control (3), other added tokens user-defined (4),
//!   the rest normal (1).
//! - `tokenizer.ggml.pre` is the llama.cpp pre-tokenizer whose Hugging Face form (the one import
//!   writes) equals tokenizer.json's `pre_tokenizer`.
//! - Special ids, `add_bos_token` / `add_eos_token` and the chat template come from the same
//!   files, read as `train` reads them.

use super::reader::MetaValue;
use super::tokenizer::{
    pre_tokenizer, EXPORTED_PRE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED,
};
use crate::tokenizer::{chat_template_source, Tokenizer, TokenizerConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The `tokenizer.*` metadata of the tokenizer in `dir`, for a model with `n_vocab` embedding rows.
pub fn tokenizer_metadata(dir: &Path, n_vocab: usize) -> Result<Vec<(&'static str, MetaValue)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: export-gguf writes the model's tokenizer into the GGUF and needs its tokenizer.json",
            path.display()
        )
    })?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let in_file = || format!("in {}", path.display());
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        bail!(
            "{}: export-gguf writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen); \
             this one is {} with byte_fallback {} (a SentencePiece-style tokenizer such as Llama 2's or \
             Mistral's, which llama.cpp stores as `llama` with scores); convert it with llama.cpp's \
             convert_hf_to_gguf.py",
            path.display(),
            model["type"],
            model["byte_fallback"]
        );
    }
    let pre = exported_pre(&json["pre_tokenizer"]).with_context(in_file)?;

    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![TOKEN_NORMAL; n_vocab];
    let mut place = |id: u64, token: &str, ty: i64| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!("token `{token}` has id {id} but the model's embedding has only {n_vocab} rows")
        })?;
        *slot = Some(token.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("model.vocab is not an object"))
        .with_context(in_file)?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| anyhow!("model.vocab[{token:?}] is {id}, not an id"))
            .with_context(in_file)?;
        place(id, token, TOKEN_NORMAL).with_context(in_file)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            bail!(
                "{}: added token {added} has no id or content",
                path.display()
            );
        };
        let ty = if added["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        place(id, content, ty).with_context(in_file)?;
    }
    let tokens: Vec<MetaValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            MetaValue::String(t.unwrap_or_else(|| {
                types[id] = TOKEN_UNUSED;
                format!("[PAD{id}]")
            }))
        })
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("model.merges is not a list"))
        .with_context(in_file)?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(MetaValue::String(s.clone())),
            Value::Array(pair) => match (
                pair.first().and_then(Value::as_str),
                pair.get(1).and_then(Value::as_str),
            ) {
                (Some(l), Some(r)) if pair.len() == 2 => Ok(MetaValue::String(format!("{l} {r}"))),
                _ => bail!("merge {m} is not a pair of strings"),
            },
            other => bail!("merge {other} is neither \"left right\" nor [left, right]"),
        })
        .collect::<Result<Vec<_>>>()
        .with_context(in_file)?;

    let tokenizer = Tokenizer::load(dir)?;
    let config = TokenizerConfig::load(dir)?;
    let mut meta = vec![
        ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::String(pre.into())),
        ("tokenizer.ggml.tokens", MetaValue::Array(tokens)),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.merges", MetaValue::Array(merges)),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tokenizer.bos_id()),
        ("tokenizer.ggml.eos_token_id", tokenizer.eos_id()),
        ("tokenizer.ggml.unknown_token_id", tokenizer.unk_id()),
        ("tokenizer.ggml.padding_token_id", tokenizer.pad_id()),
    ] {
        if let Some(id) = id {
            if id as usize >= n_vocab {
                bail!("{key}: the special token has id {id}, beyond the model's {n_vocab} embedding rows (tokenizer files in {})", dir.display());
            }
            meta.push((key, MetaValue::U32(id)));
        }
    }
    // tokenizer_config.json's flags when it sets them, else what tokenizer.json's post-processor
    // adds (Llama 3 prepends <|begin_of_text|> there), as gguf-py's SpecialVocab reads them.
    let template = template_processing(&json["post_processor"]);
    let adds = |at_start: bool, token: Option<&str>| {
        let template = template?;
        let end = if at_start {
            template.first()
        } else {
            template.last()
        };
        Some(
            end.and_then(|p| p["SpecialToken"]["id"].as_str())
                .is_some_and(|t| Some(t) == token),
        )
    };
    let bos_text = tokenizer.bos_token().map(|t| t.text.as_str());
    let eos_text = tokenizer.eos_token().map(|t| t.text.as_str());
    for (key, flag) in [
        (
            "tokenizer.ggml.add_bos_token",
            config.add_bos_token.or_else(|| adds(true, bos_text)),
        ),
        (
            "tokenizer.ggml.add_eos_token",
            config.add_eos_token.or_else(|| adds(false, eos_text)),
        ),
    ] {
        if let Some(flag) = flag {
            meta.push((key, MetaValue::Bool(flag)));
        }
    }
    if let Some((source, _)) = chat_template_source(dir, config.chat_template.as_deref())? {
        meta.push(("tokenizer.chat_template", MetaValue::String(source)));
    }
    Ok(meta)
}

/// The `single` sequence of a TemplateProcessing post-processor (alone or inside a Sequence).
fn template_processing(post: &Value) -> Option<&Vec<Value>> {
    match post["type"].as_str()? {
        "TemplateProcessing" => post["single"].as_array(),
        "Sequence" => post["processors"]
            .as_array()?
            .iter()
            .find_map(template_processing),
        _ => None,
    }
}

/// The `tokenizer.ggml.pre` whose Hugging Face pre-tokenizer is `hf`.
fn exported_pre(hf: &Value) -> Result<&'static str> {
    for name in EXPORTED_PRE {
        if pre_tokenizer(name)?.pre_tokenizer == *hf {
            return Ok(name);
        }
    }
    bail!(
        "the pre_tokenizer {hf} is not one llama.cpp knows under a name export-gguf writes ({}); \
         convert this model with llama.cpp's convert_hf_to_gguf.py",
        EXPORTED_PRE.join(", ")
    )
}
