//! Samples → token ids and labels.
//! - alpaca, `alpaca` template: the Stanford Alpaca prompt, then the output and EOS; the prompt is masked.
//! - alpaca, `chat` template: `[system?, user: instruction (+ "\n" + input), assistant: output]` through
//!   the chat template (the convention of tests/fixtures/smollm2-tokenizer's `sft_example`).
//! - chat (sharegpt / messages): the chat template; user and system turns masked.
//! - text: the text, then EOS; every token trained.
//! With `train_on_prompt`, nothing is masked. Examples longer than `max_seq_len` are truncated or
//! dropped; examples left with no trained token are dropped. Both are counted.

use super::batching::Example;
use super::records::{Record, Sample};
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{bail, Context, Result};
use kernels::IGNORE_INDEX;

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// How samples are turned into tokens.
#[derive(Clone, Debug)]
pub struct Formatting {
    /// Alpaca records through the chat template (true) or the Stanford prompt (false).
    pub alpaca_as_chat: bool,
    pub train_on_prompt: bool,
    pub max_seq_len: usize,
    /// Drop over-long examples instead of truncating them.
    pub drop_long: bool,
}

/// Counts for the run summary.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TokenizeStats {
    pub examples: usize,
    pub tokens: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_no_target: usize,
}

/// The Stanford Alpaca prompt for an instruction and optional input.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

/// The chat messages an alpaca record stands for.
pub fn alpaca_messages(
    system: Option<&str>,
    instruction: &str,
    input: &str,
    output: &str,
) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(ChatMessage::new("system", s));
    }
    let user = if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n{input}")
    };
    m.push(ChatMessage::new("user", &user));
    m.push(ChatMessage::new("assistant", output));
    m
}

fn to_i32(ids: Vec<u32>) -> Vec<i32> {
    ids.into_iter().map(|x| x as i32).collect()
}

/// Token ids and labels of one sample (before length limits).
pub fn encode_sample(
    tok: &Tokenizer,
    sample: &Sample,
    f: &Formatting,
) -> Result<(Vec<i32>, Vec<i32>)> {
    let eos = || tok.eos_id().map(|e| e as i32);
    match sample {
        Sample::Alpaca {
            system,
            instruction,
            input,
            output,
        } if f.alpaca_as_chat => {
            let (ids, labels) = tok.encode_chat_for_training(
                &alpaca_messages(system.as_deref(), instruction, input, output),
                f.train_on_prompt,
            )?;
            Ok((to_i32(ids), labels))
        }
        Sample::Alpaca {
            system,
            instruction,
            input,
            output,
        } => {
            let mut prompt = system
                .as_ref()
                .map(|s| format!("{s}\n\n"))
                .unwrap_or_default();
            prompt.push_str(&alpaca_prompt(instruction, input));
            let mut ids = to_i32(tok.encode(&prompt, true)?);
            let mut labels = if f.train_on_prompt {
                ids.clone()
            } else {
                vec![IGNORE_INDEX; ids.len()]
            };
            let mut response = to_i32(tok.encode(output, false)?);
            response.extend(eos());
            ids.extend_from_slice(&response);
            labels.extend_from_slice(&response);
            Ok((ids, labels))
        }
        Sample::Chat(messages) => {
            let msgs: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let (ids, labels) = tok.encode_chat_for_training(&msgs, f.train_on_prompt)?;
            Ok((to_i32(ids), labels))
        }
        Sample::Text(text) => {
            let mut ids = to_i32(tok.encode(text, true)?);
            ids.extend(eos());
            Ok((ids.clone(), ids))
        }
    }
}

/// Tokenizes every record, applying the length rule.
pub fn tokenize_records(
    tok: &Tokenizer,
    records: &[Record],
    f: &Formatting,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let (mut ids, mut labels) = encode_sample(tok, &r.sample, f)
            .with_context(|| format!("{}: cannot tokenize the record", r.origin))?;
        if ids.len() > f.max_seq_len {
            if f.drop_long {
                stats.dropped_too_long += 1;
                continue;
            }
            ids.truncate(f.max_seq_len);
            labels.truncate(f.max_seq_len);
            stats.truncated += 1;
        }
        // A label at position 0 is never a target (nothing predicts it).
        if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            stats.dropped_no_target += 1;
            continue;
        }
        stats.tokens += ids.len();
        out.push(Example { ids, labels });
    }
    stats.examples = out.len();
    if out.is_empty() && !records.is_empty() {
        bail!(
            "no usable example: {} dropped as longer than max_seq_len = {}, {} with no trained token",
            stats.dropped_too_long,
            f.max_seq_len,
            stats.dropped_no_target
        );
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::Message;
    use std::path::PathBuf;

    fn smollm2() -> Tokenizer {
        Tokenizer::load(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2-tokenizer"),
        )
        .unwrap()
    }

    fn fmt(chat: bool) -> Formatting {
        Formatting {
            alpaca_as_chat: chat,
            train_on_prompt: false,
            max_seq_len: 4096,
            drop_long: false,
        }
    }

    fn trained_text(tok: &Tokenizer, ids: &[i32], labels: &[i32]) -> String {
        let kept: Vec<u32> = ids
            .iter()
            .zip(labels)
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(&i, _)| i as u32)
            .collect();
        tok.decode(&kept, false).unwrap()
    }

    #[test]
    fn alpaca_prompt_is_masked_and_the_output_ends_with_eos() {
        let tok = smollm2();
        let s = Sample::Alpaca {
            system: None,
            instruction: "Add the numbers.".into(),
            input: "2 and 3".into(),
            output: "5".into(),
        };
        let (ids, labels) = encode_sample(&tok, &s, &fmt(false)).unwrap();
        assert_eq!(trained_text(&tok, &ids, &labels), "5<|im_end|>");
        let all = tok
            .decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false)
            .unwrap();
        assert!(
            all.starts_with("Below is an instruction")
                && all.contains("### Input:\n2 and 3\n\n### Response:\n5"),
            "{all}"
        );
    }

    #[test]
    fn alpaca_as_chat_matches_the_fixture_convention() {
        let tok = smollm2();
        let s = Sample::Alpaca {
            system: None,
            instruction: "Transform the following sentence using a synonym: The car sped quickly."
                .into(),
            input: String::new(),
            output: "The car accelerated rapidly.".into(),
        };
        let (ids, labels) = encode_sample(&tok, &s, &fmt(true)).unwrap();
        assert_eq!(ids.len(), 51);
        assert_eq!(labels.iter().filter(|&&l| l == IGNORE_INDEX).count(), 44);
        assert_eq!(
            trained_text(&tok, &ids, &labels),
            "The car accelerated rapidly.<|im_end|>\n"
        );
    }

    #[test]
    fn sharegpt_trains_every_assistant_turn_and_text_trains_everything() {
        let tok = smollm2();
        let chat = Sample::Chat(vec![
            Message {
                role: "user".into(),
                content: "2+2?".into(),
            },
            Message {
                role: "assistant".into(),
                content: "4.".into(),
            },
            Message {
                role: "user".into(),
                content: "3+3?".into(),
            },
            Message {
                role: "assistant".into(),
                content: "6.".into(),
            },
        ]);
        let (ids, labels) = encode_sample(&tok, &chat, &fmt(true)).unwrap();
        assert_eq!(
            trained_text(&tok, &ids, &labels),
            "4.<|im_end|>\n6.<|im_end|>\n"
        );
        let (ids, labels) =
            encode_sample(&tok, &Sample::Text("hello world".into()), &fmt(true)).unwrap();
        assert_eq!(ids, labels);
        assert_eq!(*ids.last().unwrap(), tok.eos_id().unwrap() as i32);
    }

    #[test]
    fn long_examples_are_truncated_or_dropped_and_counted() {
        let tok = smollm2();
        let rec = |t: &str| Record {
            sample: Sample::Text(t.into()),
            origin: "x:1".into(),
        };
        let records = vec![rec("one two three four five six seven eight"), rec("short")];
        let mut f = fmt(true);
        f.max_seq_len = 4;
        let (ex, stats) = tokenize_records(&tok, &records, &f).unwrap();
        assert_eq!((ex.len(), stats.truncated), (2, 1));
        assert!(ex.iter().all(|e| e.ids.len() <= 4));
        f.drop_long = true;
        let (ex, stats) = tokenize_records(&tok, &records, &f).unwrap();
        assert_eq!((ex.len(), stats.dropped_too_long), (1, 1));
    }
}
