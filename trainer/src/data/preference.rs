//! Preference pairs for DPO: reading them from `.json` / `.jsonl`, tokenizing, truncating.
//!
//! Record forms (fields after `data.columns` renames):
//! - `{prompt, chosen, rejected}` strings: the prompt is one user turn, each completion one
//!   assistant turn;
//! - `{prompt: [messages], chosen: [messages], rejected: [messages]}` (TRL's explicit prompt);
//! - `{chosen: [messages], rejected: [messages]}`: the shared prompt is all but the last assistant
//!   turn, and must be the same in both;
//! - `{conversations: [turns], chosen: turn, rejected: turn}` (LLaMA-Factory's
//!   `dpo_en_demo.json`); `chosen` / `rejected` may also be strings or lists of turns.
//!
//! Turns are `{role, content}` or `{from, value}` objects (user/human, assistant/gpt, system).
//!
//! Tokens, as TRL's `maybe_apply_chat_template` + `DPOTrainer.tokenize_row` make them: the prompt is
//! the chat template rendered with the generation prompt; a completion is the rest of the
//! rendered `prompt + completion` conversation after the text it shares with the prompt; both are
//! encoded without special tokens, and EOS is appended to a completion that does not already hold
//! it (ChatML completions end in `<|im_end|>\n`, which is EOS; TRL would add a second one).
//! Without a chat template, string records are used as raw text (the prompt with the
//! tokenizer's special tokens, as TRL does for non-conversational data).
//!
//! Truncation (TRL's rule): a prompt longer than `max_prompt_len` keeps its last tokens; then a
//! completion that does not fit in `max_len` after the prompt keeps its first tokens. A pair with
//! no completion token left is dropped. All three are counted.

use super::records::{
    field_list, raw_records, rename_columns, sharegpt_role, string_field, type_name,
};
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A preference record before tokenization: the shared prompt and the two completions.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRecord {
    pub prompt: Prompt,
    pub chosen: Completion,
    pub rejected: Completion,
    /// `path:line`
    pub origin: String,
}

/// The prompt of a pair: plain text, or chat turns.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// A completion: plain text, or the turns that follow the prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Completion {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// A tokenized pair.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<i32>,
    pub chosen: Vec<i32>,
    pub rejected: Vec<i32>,
}

/// Length limits, in tokens.
#[derive(Clone, Copy, Debug)]
pub struct PairLimits {
    pub max_prompt_len: usize,
    pub max_len: usize,
}

/// Counts for the run summary.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PreferenceStats {
    pub pairs: usize,
    /// Prompt + chosen + rejected tokens of the kept pairs.
    pub tokens: usize,
    pub prompts_truncated: usize,
    /// Completions (chosen or rejected, each counted) cut to fit `max_len`.
    pub completions_truncated: usize,
    /// Pairs whose prompt left no room for any completion token.
    pub dropped_no_completion: usize,
}

/// Reads every preference record of `path`; with `skip_bad`, malformed records are returned as
/// `path:line: reason` instead of failing the read.
pub fn read_preference_file(
    path: &Path,
    columns: &BTreeMap<String, String>,
    skip_bad: bool,
) -> Result<(Vec<PreferenceRecord>, Vec<String>)> {
    let (text, mut skipped) = super::text::read_dataset_text(path, skip_bad)?;
    let mut records = Vec::new();
    for (line, item) in raw_records(path, &text)? {
        let origin = format!("{}:{line}", path.display());
        let parsed = serde_json::from_str::<Value>(item)
            .map_err(|e| anyhow!("{e}"))
            .and_then(|v| parse_record(&rename_columns(v, columns)));
        match parsed {
            Ok((prompt, chosen, rejected)) => records.push(PreferenceRecord {
                prompt,
                chosen,
                rejected,
                origin,
            }),
            Err(e) if skip_bad => skipped.push(format!("{origin}: {e}")),
            Err(e) => bail!("{origin}: bad preference record: {e} (fix it, or set data.skip_bad_records = true to skip such records)"),
        }
    }
    Ok((records, skipped))
}

fn parse_turn(v: &Value, i: usize) -> Result<ChatMessage> {
    let (role_key, content_key) = if v.get("from").is_some() {
        ("from", "value")
    } else {
        ("role", "content")
    };
    let role = string_field(v, role_key).with_context(|| format!("turn {i}"))?;
    let mapped = sharegpt_role(&role).ok_or_else(|| {
        anyhow!("turn {i}: role `{role}` is not supported (use system, user/human, assistant/gpt)")
    })?;
    let content = string_field(v, content_key).with_context(|| format!("turn {i}"))?;
    Ok(ChatMessage::new(mapped, content))
}

fn parse_turns(v: &Value, key: &str) -> Result<Vec<ChatMessage>> {
    let list = v
        .as_array()
        .ok_or_else(|| anyhow!("field `{key}` must be a list of turns"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| parse_turn(t, i).with_context(|| format!("in `{key}`")))
        .collect()
}

fn parse_completion(record: &Value, key: &str) -> Result<Completion> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(Completion::Text(s.clone())),
        Some(v @ Value::Array(_)) => Ok(Completion::Chat(parse_turns(v, key)?)),
        Some(v @ Value::Object(_)) => Ok(Completion::Chat(vec![
            parse_turn(v, 0).with_context(|| format!("in `{key}`"))?
        ])),
        Some(other) => bail!(
            "field `{key}` must be a string, a turn or a list of turns, found {}",
            type_name(other)
        ),
        None => bail!("field `{key}` is missing (fields: {})", field_list(record)),
    }
}

fn parse_record(v: &Value) -> Result<(Prompt, Completion, Completion)> {
    if !v.is_object() {
        bail!("a record must be a JSON object, found {}", type_name(v));
    }
    let chosen = parse_completion(v, "chosen")?;
    let rejected = parse_completion(v, "rejected")?;
    let prompt = match (v.get("prompt"), v.get("conversations")) {
        (Some(Value::String(s)), _) => Prompt::Text(s.clone()),
        (Some(p), _) => Prompt::Chat(parse_turns(p, "prompt")?),
        (None, Some(c)) => Prompt::Chat(parse_turns(c, "conversations")?),
        (None, None) => return split_implicit_prompt(chosen, rejected, v),
    };
    if matches!(prompt, Prompt::Text(_))
        && (matches!(chosen, Completion::Chat(_)) || matches!(rejected, Completion::Chat(_)))
    {
        bail!("a text `prompt` needs text `chosen` and `rejected`; give the prompt as a list of turns to pair it with turns");
    }
    Ok((prompt, chosen, rejected))
}

/// `{chosen: [turns], rejected: [turns]}`: the prompt is what precedes the last turn of each.
fn split_implicit_prompt(
    chosen: Completion,
    rejected: Completion,
    v: &Value,
) -> Result<(Prompt, Completion, Completion)> {
    let (Completion::Chat(mut c), Completion::Chat(mut r)) = (chosen, rejected) else {
        bail!(
            "no `prompt` or `conversations` field (fields: {}): give one, or make `chosen` and `rejected` full conversations",
            field_list(v)
        );
    };
    let (Some(last_c), Some(last_r)) = (c.pop(), r.pop()) else {
        bail!("`chosen` and `rejected` must not be empty");
    };
    if last_c.role != "assistant" || last_r.role != "assistant" {
        bail!("the last turn of `chosen` and of `rejected` must be an assistant turn");
    }
    if c != r {
        bail!("`chosen` and `rejected` must share every turn but the last (the prompt)");
    }
    Ok((
        Prompt::Chat(c),
        Completion::Chat(vec![last_c]),
        Completion::Chat(vec![last_r]),
    ))
}

fn to_i32(ids: Vec<u32>) -> Vec<i32> {
    ids.into_iter().map(|x| x as i32).collect()
}

fn as_chat(c: &Completion) -> Vec<ChatMessage> {
    match c {
        Completion::Text(t) => vec![ChatMessage::new("assistant", t.as_str())],
        Completion::Chat(m) => m.clone(),
    }
}

/// The longest common prefix of the strings, ending on a char boundary.
fn common_prefix_len(texts: &[&str]) -> usize {
    let first = texts[0];
    let mut len = texts.iter().fold(first.len(), |n, t| {
        first
            .bytes()
            .zip(t.bytes())
            .take(n)
            .take_while(|(a, b)| a == b)
            .count()
    });
    while !first.is_char_boundary(len) {
        len -= 1;
    }
    len
}

/// Prompt, chosen and rejected ids of one record (before length limits).
pub fn encode_pair(tok: &Tokenizer, r: &PreferenceRecord) -> Result<PreferencePair> {
    let eos = tok.eos_id().map(|e| e as i32);
    let finish = |mut ids: Vec<i32>| {
        if let Some(e) = eos.filter(|e| !ids.contains(e)) {
            ids.push(e);
        }
        ids
    };
    if tok.chat_template().is_none() {
        if let (Prompt::Text(p), Completion::Text(c), Completion::Text(x)) =
            (&r.prompt, &r.chosen, &r.rejected)
        {
            return Ok(PreferencePair {
                prompt: to_i32(tok.encode(p, true)?),
                chosen: finish(to_i32(tok.encode(c, false)?)),
                rejected: finish(to_i32(tok.encode(x, false)?)),
            });
        }
    }
    let prompt: Vec<ChatMessage> = match &r.prompt {
        Prompt::Text(t) => vec![ChatMessage::new("user", t.as_str())],
        Prompt::Chat(m) => m.clone(),
    };
    let render_with = |c: &Completion| {
        let mut all = prompt.clone();
        all.extend(as_chat(c));
        tok.render_chat(&all, false)
    };
    let prompt_text = tok.render_chat(&prompt, true)?;
    let chosen_text = render_with(&r.chosen)?;
    let rejected_text = render_with(&r.rejected)?;
    let shared = common_prefix_len(&[&prompt_text, &chosen_text, &rejected_text]);
    Ok(PreferencePair {
        prompt: to_i32(tok.encode(&prompt_text[..shared], false)?),
        chosen: finish(to_i32(tok.encode(&chosen_text[shared..], false)?)),
        rejected: finish(to_i32(tok.encode(&rejected_text[shared..], false)?)),
    })
}

/// Applies the length limits (TRL's rule, see the top of this file) and counts what it cut.
/// Returns `false` when no completion token is left.
pub fn truncate_pair(p: &mut PreferencePair, l: PairLimits, stats: &mut PreferenceStats) -> bool {
    if p.prompt.len() > l.max_prompt_len {
        p.prompt.drain(..p.prompt.len() - l.max_prompt_len);
        stats.prompts_truncated += 1;
    }
    let room = l.max_len.saturating_sub(p.prompt.len());
    for c in [&mut p.chosen, &mut p.rejected] {
        if c.len() > room {
            c.truncate(room);
            stats.completions_truncated += 1;
        }
    }
    room > 0
}

/// Tokenizes every record and applies the limits.
pub fn tokenize_preferences(
    tok: &Tokenizer,
    records: &[PreferenceRecord],
    limits: PairLimits,
) -> Result<(Vec<PreferencePair>, PreferenceStats)> {
    let mut stats = PreferenceStats::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let mut pair = encode_pair(tok, r)
            .with_context(|| format!("{}: cannot tokenize the pair", r.origin))?;
        if !truncate_pair(&mut pair, limits, &mut stats) {
            stats.dropped_no_completion += 1;
            continue;
        }
        stats.tokens += pair.prompt.len() + pair.chosen.len() + pair.rejected.len();
        out.push(pair);
    }
    stats.pairs = out.len();
    if out.is_empty() && !records.is_empty() {
        bail!(
            "no usable preference pair: {} of {} had no room for a completion after a prompt of up to method.max_prompt_len = {} tokens within method.max_len = {}",
            stats.dropped_no_completion,
            records.len(),
            limits.max_prompt_len,
            limits.max_len
        );
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn smollm2() -> Tokenizer {
        Tokenizer::load(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2-tokenizer"),
        )
        .unwrap()
    }

    fn read(text: &str) -> Result<(Vec<PreferenceRecord>, Vec<String>)> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prefs.jsonl");
        std::fs::write(&p, text).unwrap();
        read_preference_file(&p, &BTreeMap::new(), false)
    }

    fn decode(tok: &Tokenizer, ids: &[i32]) -> String {
        tok.decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false)
            .unwrap()
    }

    const SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

    #[test]
    fn the_three_forms_give_the_same_tokens() {
        let tok = smollm2();
        let (records, _) = read(concat!(
            "{\"prompt\": \"2+2?\", \"chosen\": \"4.\", \"rejected\": \"5.\"}\n",
            "{\"chosen\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}],",
            " \"rejected\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"5.\"}]}\n",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"2+2?\"}], \"chosen\": {\"from\": \"gpt\", \"value\": \"4.\"},",
            " \"rejected\": {\"from\": \"gpt\", \"value\": \"5.\"}}\n"
        ))
        .unwrap();
        assert_eq!(records.len(), 3);
        let pairs: Vec<PreferencePair> = records
            .iter()
            .map(|r| encode_pair(&tok, r).unwrap())
            .collect();
        assert_eq!(pairs[0], pairs[1]);
        assert_eq!(pairs[0], pairs[2]);
        let p = &pairs[0];
        assert_eq!(
            decode(&tok, &p.prompt),
            format!("{SYSTEM}<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(decode(&tok, &p.chosen), "4.<|im_end|>\n");
        assert_eq!(decode(&tok, &p.rejected), "5.<|im_end|>\n");
        // `4`, `.`, `<|im_end|>`=2, `\n`: no second EOS.
        assert_eq!(p.chosen.len(), 4);
        assert_eq!(p.chosen[2], 2);
    }

    #[test]
    fn multi_turn_conversations_keep_earlier_turns_in_the_prompt() {
        let tok = smollm2();
        let (records, _) = read(concat!(
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello!\"},",
            " {\"from\": \"human\", \"value\": \"Bye\"}], \"chosen\": {\"from\": \"gpt\", \"value\": \"Goodbye!\"},",
            " \"rejected\": {\"from\": \"gpt\", \"value\": \"No.\"}}"
        ))
        .unwrap();
        let p = encode_pair(&tok, &records[0]).unwrap();
        assert_eq!(
            decode(&tok, &p.prompt),
            format!("{SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(decode(&tok, &p.rejected), "No.<|im_end|>\n");
    }

    #[test]
    fn bad_records_name_the_line_and_the_problem() {
        let e = read("{\"prompt\": \"q\", \"chosen\": \"a\"}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prefs.jsonl:1") && e.contains("`rejected` is missing"),
            "{e}"
        );
        let e = read(concat!(
            "{\"chosen\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"x\"}],",
            " \"rejected\": [{\"role\": \"user\", \"content\": \"b\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("share every turn but the last"), "{e}");
    }

    #[test]
    fn truncation_keeps_the_prompt_end_and_the_completion_start() {
        let mut stats = PreferenceStats::default();
        let mut p = PreferencePair {
            prompt: (1..=6).collect(),
            chosen: vec![10, 11, 12],
            rejected: vec![20, 21, 22, 23, 24],
        };
        let limits = PairLimits {
            max_prompt_len: 4,
            max_len: 7,
        };
        assert!(truncate_pair(&mut p, limits, &mut stats));
        assert_eq!(p.prompt, vec![3, 4, 5, 6]);
        assert_eq!(p.chosen, vec![10, 11, 12]);
        assert_eq!(p.rejected, vec![20, 21, 22]);
        assert_eq!(
            (stats.prompts_truncated, stats.completions_truncated),
            (1, 1)
        );
        let mut q = PreferencePair {
            prompt: (1..=6).collect(),
            chosen: vec![10],
            rejected: vec![20],
        };
        let tight = PairLimits {
            max_prompt_len: 6,
            max_len: 6,
        };
        assert!(!truncate_pair(&mut q, tight, &mut stats));
    }

    #[test]
    fn tokenizing_counts_truncations_and_drops() {
        let tok = smollm2();
        let (records, _) = read(concat!(
            "{\"prompt\": \"Tell me a long story about dragons and castles.\", \"chosen\": \"Once upon a time there was a dragon.\", \"rejected\": \"No.\"}\n",
            "{\"prompt\": \"Hi\", \"chosen\": \"Hello\", \"rejected\": \"Go away\"}\n"
        ))
        .unwrap();
        let limits = PairLimits {
            max_prompt_len: 30,
            max_len: 34,
        };
        let (pairs, stats) = tokenize_preferences(&tok, &records, limits).unwrap();
        assert_eq!(pairs.len(), 2);
        assert!(pairs
            .iter()
            .all(|p| p.prompt.len() <= 30 && p.prompt.len() + p.chosen.len() <= 34));
        assert!(stats.prompts_truncated >= 1 && stats.completions_truncated >= 1);
        assert_eq!(
            stats.tokens,
            pairs
                .iter()
                .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum::<usize>()
        );
    }
}
