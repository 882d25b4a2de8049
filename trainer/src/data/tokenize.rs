//! Samples → token ids and labels.
//! - alpaca, `alpaca` template: the Stanford Alpaca prompt, then the output and EOS; the prompt is masked.
//! - alpaca, `chat` template: `[system?, user: instruction (+ "\n" + input), assistant: output]` through
//!   the chat template (the convention of tests/fixtures/smollm2-tokenizer's `sft_example`).
//! - chat (sharegpt / messages): the chat template, given the record's `tools`; user, system and
//!   tool turns masked.
//! - text: the text, then EOS; every token trained. A text longer than `max_seq_len` is split
//!   into chunks ([`super::chunking`]), none of it lost.
//!
//! With `train_on_prompt`, nothing is masked. Alpaca and chat examples longer than `max_seq_len`
//! are truncated or dropped (`data.truncation`); examples left with no trained token are dropped.
//! All are counted.

use super::batching::Example;
use super::chunking::chunk_document;
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
    /// Drop over-long alpaca/chat examples instead of truncating them.
    pub drop_long: bool,
    /// Tokens of context each chunk of a long text repeats from the previous one (unlabelled).
    pub text_overlap: usize,
}

/// Counts for the run summary.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TokenizeStats {
    pub examples: usize,
    pub tokens: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_no_target: usize,
    /// Texts longer than `max_seq_len`, split into several examples (chunks).
    pub texts_chunked: usize,
    /// Records whose `tools` the chat template does not print (it has no tools block).
    pub tools_not_in_template: usize,
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
                None,
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
        Sample::Chat { messages, tools } => {
            let (ids, labels) = tok.encode_chat_for_training(
                &chat_messages(messages),
                tools.as_ref(),
                f.train_on_prompt,
            )?;
            Ok((to_i32(ids), labels))
        }
        Sample::Text(text) => {
            let mut ids = to_i32(tok.encode(text, true)?);
            ids.extend(eos());
            Ok((ids.clone(), ids))
        }
    }
}

fn chat_messages(messages: &[super::records::Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect()
}

/// Whether the chat template prints `tools` at all (rendering with and without them differs).
fn template_prints_tools(
    tok: &Tokenizer,
    messages: &[super::records::Message],
    tools: &serde_json::Value,
) -> Result<bool> {
    let messages = chat_messages(messages);
    Ok(tok.render_chat_with_tools(&messages, false, Some(tools))?
        != tok.render_chat(&messages, false)?)
}

/// The examples one record gives under the length rule (none, one, or a long text's chunks),
/// counted into `stats`.
pub fn tokenize_record(
    tok: &Tokenizer,
    r: &Record,
    f: &Formatting,
    stats: &mut TokenizeStats,
) -> Result<Vec<Example>> {
    let (mut ids, mut labels) = encode_sample(tok, &r.sample, f)
        .with_context(|| format!("{}: cannot tokenize the record", r.origin))?;
    let mut pieces = if ids.len() <= f.max_seq_len {
        vec![Example { ids, labels }]
    } else if matches!(r.sample, Sample::Text(_)) {
        stats.texts_chunked += 1;
        chunk_document(&ids, f.max_seq_len, f.text_overlap)
    } else if f.drop_long {
        stats.dropped_too_long += 1;
        Vec::new()
    } else {
        ids.truncate(f.max_seq_len);
        labels.truncate(f.max_seq_len);
        stats.truncated += 1;
        vec![Example { ids, labels }]
    };
    // A label at position 0 is never a target (nothing predicts it).
    pieces.retain(|e| {
        let keep = e.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX);
        stats.dropped_no_target += usize::from(!keep);
        keep
    });
    stats.tokens += pieces.iter().map(|e| e.ids.len()).sum::<usize>();
    Ok(pieces)
}

/// Tokenizes every record, applying the length rule: texts are chunked, alpaca and chat
/// examples truncated or dropped.
pub fn tokenize_records(
    tok: &Tokenizer,
    records: &[Record],
    f: &Formatting,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(records.len());
    let mut tools_printed = None;
    for r in records {
        if let Sample::Chat {
            messages,
            tools: Some(tools),
        } = &r.sample
        {
            let printed = match tools_printed {
                Some(p) => p,
                None => *tools_printed.insert(template_prints_tools(tok, messages, tools)?),
            };
            stats.tools_not_in_template += usize::from(!printed);
        }
        out.extend(tokenize_record(tok, r, f, &mut stats)?);
    }
    if stats.tools_not_in_template > 0 {
        let origin = tok.chat_template().map_or("", |t| t.origin());
        eprintln!(
            "warning: {} records have `tools`, but the chat template in {origin} does not print them: the model will learn tool calls without seeing the tool definitions (use a model whose template has a tools block)",
            stats.tools_not_in_template
        );
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
            text_overlap: 0,
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
        let chat = Sample::Chat {
            messages: vec![
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
            ],
            tools: None,
        };
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

    fn chat_record(user: &str, assistant: &str) -> Record {
        Record {
            sample: Sample::Chat {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: user.into(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: assistant.into(),
                    },
                ],
                tools: None,
            },
            origin: "x:1".into(),
        }
    }

    #[test]
    fn long_chats_are_truncated_or_dropped_and_counted() {
        let tok = smollm2();
        let records = vec![
            chat_record("Hi", "one two three four five six seven eight"),
            chat_record("Hi", "Hello"),
        ];
        let mut f = fmt(true);
        let short = encode_sample(&tok, &records[1].sample, &f).unwrap().0.len();
        f.max_seq_len = short;
        let (ex, stats) = tokenize_records(&tok, &records, &f).unwrap();
        assert_eq!((ex.len(), stats.truncated), (2, 1));
        assert!(ex.iter().all(|e| e.ids.len() == short));
        f.drop_long = true;
        let (ex, stats) = tokenize_records(&tok, &records, &f).unwrap();
        assert_eq!((ex.len(), stats.dropped_too_long), (1, 1));
    }

    #[test]
    fn long_texts_are_chunked_and_no_token_is_lost() {
        let tok = smollm2();
        let text = "one two three four five six seven eight nine ten eleven twelve";
        let record = Record {
            sample: Sample::Text(text.into()),
            origin: "x:1".into(),
        };
        let (whole, _) = encode_sample(&tok, &record.sample, &fmt(true)).unwrap();
        assert!(whole.len() > 8, "{}", whole.len());
        let mut f = fmt(true);
        f.max_seq_len = 4;
        f.drop_long = true;
        let (ex, stats) = tokenize_records(&tok, std::slice::from_ref(&record), &f).unwrap();
        assert_eq!(stats.texts_chunked, 1);
        assert_eq!(stats.dropped_too_long, 0);
        assert!(ex.iter().all(|e| e.ids.len() <= 4));
        let joined: Vec<i32> = ex.iter().flat_map(|e| e.ids.clone()).collect();
        if whole.len() % 4 == 1 {
            // A one-token tail has no target and is dropped (and counted).
            assert_eq!(stats.dropped_no_target, 1);
            assert_eq!(joined[..], whole[..whole.len() - 1]);
        } else {
            assert_eq!(joined, whole);
        }
        assert_eq!(stats.tokens, joined.len());
    }
}
