//! The `tokenizer` reference case: plain encodings, a rendered chat prompt, and an SFT example's
//! ids and labels (tests/fixtures/README.md §6), all compared exactly.

use super::Comparison;
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn messages(v: &Value, what: &str) -> Result<Vec<ChatMessage>> {
    serde_json::from_value(
        v.get("messages")
            .cloned()
            .ok_or_else(|| anyhow!("case.json {what}.messages is missing"))?,
    )
    .with_context(|| format!("case.json {what}.messages must be a list of {{role, content}}"))
}

fn exact(ids: impl IntoIterator<Item = i64>) -> Comparison {
    Comparison::Exact {
        got: ids.into_iter().collect(),
    }
}

pub fn run(dir: &Path, case: &Value) -> Result<BTreeMap<String, Comparison>> {
    let tok = Tokenizer::load(dir)?;
    let mut out = BTreeMap::new();
    let encodings = case
        .get("encodings")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, e) in encodings.iter().enumerate() {
        let text = e
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("case.json encodings[{i}].text is missing"))?;
        out.insert(
            format!("ids_{i}"),
            exact(tok.encode(text, true)?.into_iter().map(i64::from)),
        );
    }
    if let Some(chat) = case.get("chat_template") {
        let add = chat
            .get("add_generation_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let ids = tok.encode_chat(&messages(chat, "chat_template")?, add)?;
        out.insert("chat_ids".into(), exact(ids.into_iter().map(i64::from)));
    }
    if let Some(sft) = case.get("sft_example") {
        let (ids, labels) =
            tok.encode_chat_for_training(&messages(sft, "sft_example")?, None, false)?;
        out.insert(
            "sft_input_ids".into(),
            exact(ids.into_iter().map(i64::from)),
        );
        out.insert(
            "sft_labels".into(),
            exact(labels.into_iter().map(i64::from)),
        );
    }
    Ok(out)
}
