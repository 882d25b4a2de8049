//! A Hugging Face tokenizer folder: `tokenizer.json` (through the tokenizers crate) plus
//! `tokenizer_config.json`, behaving like transformers' `AutoTokenizer`:
//!
//! - `encode(text, true)` is `tokenizer(text)`. When tokenizer_config.json sets `add_bos_token` or
//!   `add_eos_token`, transformers (v5 `TokenizersBackend`) replaces tokenizer.json's
//!   post-processor by one that adds exactly BOS if `add_bos_token` and EOS if `add_eos_token`;
//!   otherwise tokenizer.json's post-processor decides (Llama 3 adds `<|begin_of_text|>` there).
//! - The named special tokens are registered as special added tokens if tokenizer.json lacks
//!   them, so their text always maps to one id (transformers' `_post_init`).
//! - Chat text is encoded without special tokens: the template writes BOS itself when the model
//!   wants one (`apply_chat_template(tokenize=True)` calls the tokenizer with
//!   `add_special_tokens=False`).
//! - `chat_template.jinja` in the folder, when present, is the chat template (newer transformers
//!   save it there); otherwise the `chat_template` key of tokenizer_config.json.

mod chat_template;
mod py_json;
mod sft_masks;
mod stream;
mod tokenizer_config;

#[cfg(test)]
mod fixture_tests;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateTokens};
pub use stream::StreamDecoder;
pub use tokenizer_config::TokenizerConfig;

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::AddedToken;

/// A special token's text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// Text ⇄ ids for one model, with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    /// `Some((add_bos, add_eos))` when tokenizer_config.json overrides tokenizer.json's post-processor.
    special_token_override: Option<(bool, bool)>,
    template_tokens: TemplateTokens,
    chat_template: Option<ChatTemplate>,
    model_max_length: Option<usize>,
    clean_up_tokenization_spaces: bool,
    dir: PathBuf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`,
    /// `dir/special_tokens_map.json` and `dir/chat_template.jinja`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(anyhow!(
                "{} not found: fuselora needs the fast-tokenizer file of the model \
                 (save one with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
                tokenizer_path.display()
            ));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|err| {
            anyhow!(
                "{} is not a tokenizer file that the `tokenizers` library can read ({err});                  save the model's fast tokenizer again with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`",
                tokenizer_path.display()
            )
        })?;
        inner
            .with_truncation(None)
            .map_err(|err| anyhow!("{err}"))?;
        inner.with_padding(None);
        let config = TokenizerConfig::load(dir)?;
        let chat_template = load_chat_template(dir, config.chat_template.as_deref())?;
        Self::from_parts(inner, config, chat_template, dir)
    }

    fn from_parts(
        mut inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        chat_template: Option<ChatTemplate>,
        dir: &Path,
    ) -> Result<Self> {
        let named = [
            &config.bos_token,
            &config.eos_token,
            &config.pad_token,
            &config.unk_token,
        ];
        let added_texts: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|token| token.content)
            .collect();
        let missing: Vec<AddedToken> = named
            .into_iter()
            .flatten()
            .chain(&config.additional_special_tokens)
            .filter(|text| !added_texts.contains(text))
            .map(|text| AddedToken::from(text.clone(), true))
            .collect();
        inner.add_special_tokens(&missing);

        let special = |text: &Option<String>| -> Option<SpecialToken> {
            let text = text.clone()?;
            let id = inner.token_to_id(&text)?;
            Some(SpecialToken { text, id })
        };
        let special_token_override =
            (config.add_bos_token.is_some() || config.add_eos_token.is_some()).then(|| {
                (
                    config.add_bos_token.unwrap_or(false),
                    config.add_eos_token.unwrap_or(false),
                )
            });
        Ok(Self {
            bos: special(&config.bos_token),
            eos: special(&config.eos_token),
            pad: special(&config.pad_token),
            unk: special(&config.unk_token),
            special_token_override,
            template_tokens: TemplateTokens {
                bos_token: config.bos_token,
                eos_token: config.eos_token,
                pad_token: config.pad_token,
                unk_token: config.unk_token,
                additional_special_tokens: config.additional_special_tokens,
            },
            chat_template,
            model_max_length: config.model_max_length,
            clean_up_tokenization_spaces: config.clean_up_tokenization_spaces,
            dir: dir.to_path_buf(),
            inner,
        })
    }

    /// Ids of `text`; with `add_special_tokens`, BOS/EOS as `tokenizer(text)` adds them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self.special_token_override {
            Some((add_bos, add_eos)) if add_special_tokens => {
                let body = self.encode_with_offsets(text)?;
                let bos = self.bos.as_ref().filter(|_| add_bos).map(|t| t.id);
                let eos = self.eos.as_ref().filter(|_| add_eos).map(|t| t.id);
                Ok(bos.into_iter().chain(body.ids).chain(eos).collect())
            }
            _ => {
                let encoding = self
                    .inner
                    .encode(text, add_special_tokens)
                    .map_err(|err| anyhow!("cannot tokenize text: {err}"))?;
                Ok(encoding.get_ids().to_vec())
            }
        }
    }

    /// Ids of `text` without special tokens, with each token's byte range in `text`.
    pub(crate) fn encode_with_offsets(&self, text: &str) -> Result<Encoded> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|err| anyhow!("cannot tokenize text: {err}"))?;
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
        })
    }

    /// Text of `ids`; `skip_special` drops special tokens (BOS, EOS, `<|im_end|>`, ...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special)
            .map_err(|err| anyhow!("cannot decode ids: {err}"))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// A decoder that turns generated ids into text one id at a time.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self.inner.decode_stream(skip_special))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|t| t.id)
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk.as_ref().map(|t| t.id)
    }

    pub fn bos_token(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos_token(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// Number of ids, added tokens included (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `model_max_length` of tokenizer_config.json; `None` when it is absent or means "no limit".
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The chat template applied to `messages` (`apply_chat_template(..., tokenize=False)`).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat_with_tools(messages, add_generation_prompt, None)
    }

    /// The chat template applied to `messages` with `tools`, a JSON list of tool schemas
    /// (`apply_chat_template(..., tools=tools, tokenize=False)`).
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        self.require_chat_template()?.render(
            messages,
            add_generation_prompt,
            tools,
            &self.template_tokens,
        )
    }

    /// Ids of the rendered chat (`apply_chat_template(..., tokenize=True)`: no extra BOS).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        Ok(self.encode_with_offsets(&text)?.ids)
    }

    fn require_chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            anyhow!(
                "{} has no `chat_template` key and {} does not exist: this tokenizer has no chat \
                 template; add one, or use a dataset format that needs none (raw text)",
                self.dir.join("tokenizer_config.json").display(),
                self.dir.join("chat_template.jinja").display()
            )
        })
    }
}

/// Ids with the byte range each one covers in the encoded text.
pub(crate) struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

fn load_chat_template(dir: &Path, from_config: Option<&str>) -> Result<Option<ChatTemplate>> {
    chat_template_source(dir, from_config)?
        .map(|(source, origin)| ChatTemplate::new(&source, origin))
        .transpose()
}

/// The chat template's text and where it came from: `dir/chat_template.jinja` when present, else
/// tokenizer_config.json's `chat_template` (`from_config`).
pub fn chat_template_source(
    dir: &Path,
    from_config: Option<&str>,
) -> Result<Option<(String, String)>> {
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.is_file() {
        let source = std::fs::read_to_string(&jinja_path)
            .with_context(|| format!("cannot read {}", jinja_path.display()))?;
        return Ok(Some((source, jinja_path.display().to_string())));
    }
    let config_path = dir.join("tokenizer_config.json");
    Ok(from_config.map(|source| (source.to_string(), config_path.display().to_string())))
}

/// transformers' `clean_up_tokenization`: removes the space a word-piece decoder puts before
/// punctuation and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |text, (from, to)| text.replace(from, to))
}
