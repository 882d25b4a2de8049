//! The parts of `tokenizer_config.json` (and the older `special_tokens_map.json`) that change how
//! text becomes ids: the named special tokens, `add_bos_token` / `add_eos_token`, the chat
//! template, `model_max_length` and `clean_up_tokenization_spaces`.
//!
//! transformers reads the special tokens from `tokenizer_config.json` and lets the entries of
//! `special_tokens_map.json` (when that file exists) replace them; both files are optional.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// What `tokenizer_config.json` says, with every field already checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
    /// `Some` when the key is present: transformers then rebuilds the post-processor from the
    /// two flags (an absent or null flag counts as false) instead of using tokenizer.json's.
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub chat_template: Option<String>,
    /// `None` when absent or larger than any real context (transformers writes 1e30 for "no limit").
    pub model_max_length: Option<usize>,
    pub clean_up_tokenization_spaces: bool,
}

const NAMED_TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json` and `dir/special_tokens_map.json`; either may be absent.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let mut config = match read_json_object(&config_path)? {
            Some(object) => {
                Self::from_json(&object).with_context(|| format!("in {}", config_path.display()))?
            }
            None => Self::default(),
        };
        let map_path = dir.join("special_tokens_map.json");
        if let Some(object) = read_json_object(&map_path)? {
            config
                .apply_special_tokens_map(&object)
                .with_context(|| format!("in {}", map_path.display()))?;
        }
        Ok(config)
    }

    /// Parses a `tokenizer_config.json` object.
    pub fn from_json(object: &Map<String, Value>) -> Result<Self> {
        let mut config = Self {
            add_bos_token: flag(object, "add_bos_token")?,
            add_eos_token: flag(object, "add_eos_token")?,
            chat_template: chat_template(object.get("chat_template"))?,
            model_max_length: model_max_length(object.get("model_max_length"))?,
            clean_up_tokenization_spaces: flag(object, "clean_up_tokenization_spaces")?
                .unwrap_or(false),
            ..Self::default()
        };
        config.apply_special_tokens_map(object)?;
        Ok(config)
    }

    /// Takes the named tokens found in `object`, replacing the ones already set.
    fn apply_special_tokens_map(&mut self, object: &Map<String, Value>) -> Result<()> {
        for key in NAMED_TOKEN_KEYS {
            if let Some(value) = object.get(key) {
                let token = token_content(value).with_context(|| format!("key `{key}`"))?;
                match key {
                    "bos_token" => self.bos_token = token,
                    "eos_token" => self.eos_token = token,
                    "pad_token" => self.pad_token = token,
                    _ => self.unk_token = token,
                }
            }
        }
        if let Some(list) = object.get("additional_special_tokens") {
            let Value::Array(items) = list else {
                bail!("key `additional_special_tokens` must be a list of tokens, found {list}");
            };
            self.additional_special_tokens = items
                .iter()
                .filter_map(|item| token_content(item).transpose())
                .collect::<Result<_>>()
                .context("key `additional_special_tokens`")?;
        }
        Ok(())
    }
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(object)) => Ok(Some(object)),
        Ok(_) => bail!("{} must hold a JSON object", path.display()),
        Err(err) => Err(err).with_context(|| format!("{} is not valid JSON", path.display())),
    }
}

/// A token is written as a plain string or as an AddedToken object `{"content": "...", ...}`.
fn token_content(value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text.clone())),
        Value::Object(fields) => match fields.get("content") {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            _ => bail!("an AddedToken object needs a string \"content\", found {value}"),
        },
        _ => bail!("expected a string, null or {{\"content\": ...}}, found {value}"),
    }
}

fn flag(object: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(false)),
        Some(Value::Bool(yes)) => Ok(Some(*yes)),
        Some(other) => bail!("key `{key}` must be true or false, found {other}"),
    }
}

/// `chat_template` is one string, or a list of `{"name", "template"}` of which `default` is used.
fn chat_template(value: Option<&Value>) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => {
            for entry in named {
                if entry.get("name").and_then(Value::as_str) == Some("default") {
                    return match entry.get("template") {
                        Some(Value::String(source)) => Ok(Some(source.clone())),
                        _ => bail!("key `chat_template`: the \"default\" entry needs a string \"template\""),
                    };
                }
            }
            bail!(
                "key `chat_template` lists named templates but none is named \"default\"; add one"
            )
        }
        Some(other) => bail!(
            "key `chat_template` must be a string or a list of {{name, template}}, found {other}"
        ),
    }
}

fn model_max_length(value: Option<&Value>) -> Result<Option<usize>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => Ok(number.as_u64().and_then(|n| usize::try_from(n).ok())),
        Some(other) => bail!("key `model_max_length` must be a number, found {other}"),
    }
}
