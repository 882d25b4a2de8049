//! Supervised fine-tuning examples: a conversation's ids and its labels, where labels are
//! IGNORE_INDEX (-100) on everything the model should not learn to write (system and user turns,
//! the template's role headers) and equal to the ids on the assistant responses.
//!
//! Works for any template by rendering prefixes of the conversation. For assistant turn `i`:
//!   start = len(render(messages[..i],  add_generation_prompt=true))   (end of "<|im_start|>assistant\n")
//!   end   = len(render(messages[..=i], add_generation_prompt=false))  (after "<|im_end|>\n")
//! The whole conversation is rendered and tokenized once; a token is trained when its first byte
//! lies in some [start, end). A token that starts in the prompt and runs into the response stays
//! masked, which is what tokenizing the prompt alone and training the tokens after it gives
//! (the convention of the Hugging Face fixture `sft_example`). Tool schemas, when given, are
//! passed to every render.

use super::{ChatMessage, Tokenizer};
use anyhow::{bail, Result};
use kernels::IGNORE_INDEX;
use std::ops::Range;

impl Tokenizer {
    /// Ids of the rendered conversation (with `tools`, a JSON list of tool schemas) and their
    /// labels: the ids themselves on assistant responses (on every token with
    /// `train_on_prompt`) and [`IGNORE_INDEX`] elsewhere.
    pub fn encode_chat_for_training(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        train_on_prompt: bool,
    ) -> Result<(Vec<u32>, Vec<i32>)> {
        let text = self.render_chat_with_tools(messages, false, tools)?;
        let encoded = self.encode_with_offsets(&text)?;
        if train_on_prompt {
            let labels = encoded.ids.iter().map(|&id| id as i32).collect();
            return Ok((encoded.ids, labels));
        }
        let spans = self.assistant_spans(messages, tools, &text)?;
        let labels = encoded
            .ids
            .iter()
            .zip(&encoded.offsets)
            .map(|(&id, &(start, _))| {
                if spans.iter().any(|span| span.contains(&start)) {
                    id as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok((encoded.ids, labels))
    }

    /// Byte ranges of `rendered` written for each assistant turn after its generation prompt.
    fn assistant_spans(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        rendered: &str,
    ) -> Result<Vec<Range<usize>>> {
        let mut spans = Vec::new();
        for (turn, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let prompt = self.render_chat_with_tools(&messages[..turn], true, tools)?;
            let through_turn = self.render_chat_with_tools(&messages[..=turn], false, tools)?;
            let is_prefix = rendered.starts_with(&prompt)
                && rendered.starts_with(&through_turn)
                && prompt.len() <= through_turn.len();
            if !is_prefix {
                let origin = self.chat_template().map_or("", |t| t.origin());
                bail!(
                    "the chat template in {origin} renders the conversation up to assistant turn \
                     {turn} differently from the start of the whole conversation, so the \
                     assistant text cannot be located for the loss mask; use a template that \
                     renders earlier turns the same way whatever follows, or set train_on_prompt"
                );
            }
            spans.push(prompt.len()..through_turn.len());
        }
        Ok(spans)
    }
}
