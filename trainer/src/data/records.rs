//! Reading dataset files (`.json` arrays, `.jsonl`, `.txt`) into [`Sample`]s, in the formats
//! people already have: alpaca, sharegpt (`conversations`, with `tools` and `system`), OpenAI
//! `messages`, raw `text`. A `.txt` file is one text document (long ones are chunked at
//! tokenization). The text comes through [`super::text`] (a byte order mark dropped, lines that
//! are not UTF-8 named). Every record keeps its origin (`file:line`) so that errors can point at
//! it.
//!
//! Nothing is silently trained as something it is not: records made for another method (a
//! boolean `label` as KTO marks, `chosen`/`rejected` preference pairs, images) are refused, and
//! fields the format does not use are reported per file.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// A training example before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    Alpaca {
        system: Option<String>,
        instruction: String,
        input: String,
        output: String,
    },
    Chat {
        messages: Vec<Message>,
        /// The record's tool definitions (JSON schemas), given to the chat template as `tools`.
        tools: Option<Value>,
    },
    Text(String),
}

/// The record formats we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    ShareGpt,
    Messages,
    Text,
}

impl Format {
    /// Guesses the format from a record's fields (after column renames).
    pub fn detect(record: &Value) -> Option<Format> {
        let has = |k: &str| record.get(k).is_some();
        if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("messages") {
            Some(Format::Messages)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// A parsed record and where it came from.
#[derive(Clone, Debug)]
pub struct Record {
    pub sample: Sample,
    /// `path:line`
    pub origin: String,
}

/// What reading a file produced: records, the bad ones skipped (when allowed), and the record
/// fields that the format does not use (to warn about).
#[derive(Debug, Default)]
pub struct ReadResult {
    pub records: Vec<Record>,
    pub skipped: Vec<String>,
    pub unused_fields: BTreeSet<String>,
}

impl ReadResult {
    /// A warning naming the fields of `path` that nothing trains on, if any.
    pub fn unused_fields_warning(&self, path: &Path) -> Option<String> {
        (!self.unused_fields.is_empty()).then(|| {
            let names: Vec<String> = self.unused_fields.iter().map(|f| format!("`{f}`")).collect();
            format!(
                "warning: {}: record field(s) {} are not used for training (map them with data.columns if they hold the text)",
                path.display(),
                names.join(", ")
            )
        })
    }
}

/// True when `path` is a plain text file (`.txt`): one document.
pub fn is_text_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "txt")
}

/// Reads every record of `path`. `format` `None` means detect from the first record;
/// `columns` maps our field names to the file's; with `skip_bad`, malformed records are counted
/// instead of failing the read.
pub fn read_file(
    path: &Path,
    format: Option<Format>,
    columns: &BTreeMap<String, String>,
    skip_bad: bool,
) -> Result<ReadResult> {
    let (text, not_utf8) = super::text::read_dataset_text(path, skip_bad)?;
    if is_text_file(path) {
        return read_text_document(path, text, not_utf8, format);
    }
    let raw = raw_records(path, &text)?;
    let mut format = format;
    let mut out = ReadResult {
        skipped: not_utf8,
        ..ReadResult::default()
    };
    for (line, item) in raw {
        let origin = format!("{}:{line}", path.display());
        let parsed = serde_json::from_str::<Value>(item)
            .map_err(|e| anyhow!("{e}"))
            .map(|v| rename_columns(v, columns))
            .and_then(|v| {
                let f = match format {
                    Some(f) => f,
                    None => {
                        let f = Format::detect(&v).ok_or_else(|| {
                            anyhow!("cannot tell the format of this record (fields: {}); set data.format or data.columns", field_list(&v))
                        })?;
                        format = Some(f);
                        f
                    }
                };
                refuse_other_methods(&v)?;
                out.unused_fields.extend(unused_fields(&v, f));
                to_sample(&v, f)
            });
        match parsed {
            Ok(sample) => out.records.push(Record { sample, origin }),
            Err(e) if skip_bad => out.skipped.push(format!("{origin}: {e}")),
            Err(e) => bail!("{origin}: bad record: {e} (fix it, or set data.skip_bad_records = true to skip such records)"),
        }
    }
    Ok(out)
}

/// A `.txt` file as one text record (none when it holds only white space); `not_utf8` are the
/// lines skipped as not UTF-8.
fn read_text_document(
    path: &Path,
    text: String,
    not_utf8: Vec<String>,
    format: Option<Format>,
) -> Result<ReadResult> {
    if format.is_some_and(|f| f != Format::Text) {
        bail!(
            "{} is a .txt file, read as one text document: set data.format = \"text\" or \"auto\", or convert it to .jsonl records",
            path.display()
        );
    }
    let mut out = ReadResult {
        skipped: not_utf8,
        ..ReadResult::default()
    };
    if !text.trim().is_empty() {
        out.records.push(Record {
            sample: Sample::Text(text),
            origin: format!("{}:1", path.display()),
        });
    }
    Ok(out)
}

/// Refuses records made for a method other than supervised fine-tuning, which would otherwise be
/// trained as something they are not.
fn refuse_other_methods(v: &Value) -> Result<()> {
    if matches!(v.get("label"), Some(Value::Bool(_))) {
        bail!("the record has a boolean `label` (a KTO desirable/undesirable mark); fuselora trains SFT and DPO, and SFT would learn the undesirable answers too: keep only the desirable records and remove `label`");
    }
    if v.get("chosen").is_some() || v.get("rejected").is_some() {
        bail!("the record has `chosen`/`rejected` (a preference pair): set `[method] name = \"dpo\"` (or \"orpo\") to train on pairs");
    }
    for media in ["images", "videos", "audios"] {
        if v.get(media).is_some_and(|m| !m.is_null()) {
            bail!("the record has `{media}`, but fuselora trains text-only models: remove the field or the record");
        }
    }
    Ok(())
}

/// The record's fields that `format` does not read.
fn unused_fields(v: &Value, format: Format) -> Vec<String> {
    let used: &[&str] = match format {
        Format::Alpaca => &["instruction", "input", "output", "system"],
        Format::ShareGpt => &["conversations", "tools", "system"],
        Format::Messages => &["messages", "tools", "system"],
        Format::Text => &["text"],
    };
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !used.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Splits the file into `(line, raw JSON)` items: a JSON array's elements or JSONL lines.
pub(crate) fn raw_records<'a>(path: &Path, text: &'a str) -> Result<Vec<(usize, &'a str)>> {
    let line_of = |offset: usize| text[..offset].bytes().filter(|&b| b == b'\n').count() + 1;
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
            anyhow!(
                "{}:{}: not a valid JSON array: {e}",
                path.display(),
                e.line()
            )
        })?;
        Ok(items
            .into_iter()
            .map(|r| {
                let offset = r.get().as_ptr() as usize - text.as_ptr() as usize;
                (line_of(offset), r.get())
            })
            .collect())
    } else {
        super::text::refuse_multiline_object(path, text)?;
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect())
    }
}

pub(crate) fn field_list(v: &Value) -> String {
    v.as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "not an object".into())
}

/// Moves each file field named in `columns` (ours → theirs) to our name.
pub(crate) fn rename_columns(mut v: Value, columns: &BTreeMap<String, String>) -> Value {
    if let Some(obj) = v.as_object_mut() {
        for (ours, theirs) in columns {
            if let Some(x) = obj.remove(theirs) {
                obj.insert(ours.clone(), x);
            }
        }
    }
    v
}

pub(crate) fn string_field(v: &Value, key: &str) -> Result<String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("field `{key}` must be a string, found {}", type_name(other)),
        None => bail!("field `{key}` is missing (fields: {})", field_list(v)),
    }
}

fn optional_string(v: &Value, key: &str) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_field(v, key).map(Some),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn to_sample(v: &Value, format: Format) -> Result<Sample> {
    if !v.is_object() {
        bail!("a record must be a JSON object, found {}", type_name(v));
    }
    match format {
        Format::Alpaca => Ok(Sample::Alpaca {
            system: optional_string(v, "system")?,
            instruction: string_field(v, "instruction")?,
            input: optional_string(v, "input")?.unwrap_or_default(),
            output: string_field(v, "output")?,
        }),
        Format::Text => Ok(Sample::Text(string_field(v, "text")?)),
        Format::ShareGpt => chat(v, "conversations", "from", "value", sharegpt_role),
        Format::Messages => chat(v, "messages", "role", "content", messages_role),
    }
}

/// A record's `tools`: a list of tool schemas, or that list as a JSON string (LLaMA-Factory's
/// sharegpt files); `None` when absent, null, empty or `"[]"`.
fn tools_field(v: &Value) -> Result<Option<Value>> {
    let tools = match v.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .map_err(|e| anyhow!("field `tools` is a string but not JSON ({e}); give the list of tool schemas as JSON"))?,
        Some(other) => other.clone(),
    };
    match tools {
        Value::Array(a) if a.is_empty() => Ok(None),
        Value::Array(_) => Ok(Some(tools)),
        other => bail!(
            "field `tools` must be a list of tool schemas, found {}",
            type_name(&other)
        ),
    }
}

/// sharegpt roles; a `function_call` is the assistant's (trained) turn, an `observation` is the
/// tool's answer (masked), as in LLaMA-Factory's sharegpt convention.
pub(crate) fn sharegpt_role(r: &str) -> Option<&'static str> {
    match r {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bard" | "function_call" => Some("assistant"),
        "observation" | "tool" => Some("tool"),
        "system" => Some("system"),
        _ => None,
    }
}

fn messages_role(r: &str) -> Option<&'static str> {
    match r {
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        "system" => Some("system"),
        "tool" => Some("tool"),
        _ => None,
    }
}

fn chat(
    v: &Value,
    list: &str,
    role_key: &str,
    content_key: &str,
    role: fn(&str) -> Option<&'static str>,
) -> Result<Sample> {
    let turns = v
        .get(list)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("field `{list}` must be a list of turns"))?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    // A top-level `system` field (LLaMA-Factory's sharegpt column) is the first turn.
    if let Some(system) = optional_string(v, "system")?.filter(|s| !s.is_empty()) {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (i, t) in turns.iter().enumerate() {
        let r = string_field(t, role_key).with_context(|| format!("turn {i}"))?;
        let mapped = role(&r).ok_or_else(|| {
            anyhow!("turn {i}: role `{r}` is not supported (use system, user/human, assistant/gpt/function_call, tool/observation)")
        })?;
        let content = string_field(t, content_key).with_context(|| format!("turn {i}"))?;
        messages.push(Message {
            role: mapped.to_string(),
            content,
        });
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("the conversation has no assistant turn to learn from");
    }
    Ok(Sample::Chat {
        messages,
        tools: tools_field(v)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, ext: &str, format: Option<Format>, skip: bool) -> Result<ReadResult> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("d.{ext}"));
        std::fs::write(&p, text).unwrap();
        read_file(&p, format, &BTreeMap::new(), skip)
    }

    #[test]
    fn each_format_is_detected_and_parsed() {
        let r = read(
            "{\"instruction\": \"Add\", \"input\": \"1+1\", \"output\": \"2\"}\n\n{\"instruction\": \"Hi\", \"output\": \"Hello\"}\n",
            "jsonl",
            None,
            false,
        )
        .unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.records[1].origin.rsplit(':').next(), Some("3"));
        assert!(matches!(&r.records[1].sample, Sample::Alpaca { input, .. } if input.is_empty()));
        let r = read("[{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}]", "json", None, false).unwrap();
        assert_eq!(
            r.records[0].sample,
            Sample::Chat {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: "q".into()
                    },
                    Message {
                        role: "assistant".into(),
                        content: "a".into()
                    }
                ],
                tools: None
            }
        );
        let r = read("{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "jsonl", None, false).unwrap();
        assert!(
            matches!(&r.records[0].sample, Sample::Chat { messages, .. } if messages[0].role == "system")
        );
        let r = read("{\"text\": \"plain\"}", "jsonl", None, false).unwrap();
        assert_eq!(r.records[0].sample, Sample::Text("plain".into()));
    }

    #[test]
    fn json_arrays_report_the_line_of_a_bad_record() {
        let text =
            "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"c\"}\n]";
        let e = read(text, "json", Some(Format::Alpaca), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.json:3")
                && e.contains("`output` is missing")
                && e.contains("skip_bad_records"),
            "{e}"
        );
        let r = read(text, "json", Some(Format::Alpaca), true).unwrap();
        assert_eq!((r.records.len(), r.skipped.len()), (1, 1));
    }

    #[test]
    fn malformed_json_and_unknown_roles_are_named() {
        let e = read(
            "{\"text\": \"ok\"}\n{\"text\": oops}\n",
            "jsonl",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("d.jsonl:2"), "{e}");
        let e = read(
            "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}",
            "jsonl",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("role `robot`"), "{e}");
    }

    #[test]
    fn columns_are_renamed_before_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"question\": \"q\", \"answer\": \"a\"}").unwrap();
        let cols = BTreeMap::from([
            ("instruction".to_string(), "question".to_string()),
            ("output".to_string(), "answer".to_string()),
        ]);
        let r = read_file(&p, None, &cols, false).unwrap();
        assert!(
            matches!(&r.records[0].sample, Sample::Alpaca { instruction, output, .. } if instruction == "q" && output == "a")
        );
    }

    #[test]
    fn sharegpt_tools_and_system_are_read_and_a_bom_is_skipped() {
        let record = "\u{feff}{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"function_call\", \"value\": \"{}\"}], \"tools\": \"[{\\\"name\\\": \\\"f\\\", \\\"description\\\": \\\"d\\\"}]\", \"system\": \"be brief\", \"id\": 7}";
        let r = read(record, "jsonl", None, false).unwrap();
        let Sample::Chat { messages, tools } = &r.records[0].sample else {
            panic!("{:?}", r.records[0].sample)
        };
        // The schema keeps its keys in the file's order (serde_json's preserve_order).
        assert_eq!(
            serde_json::to_string(tools).unwrap(),
            r#"[{"name":"f","description":"d"}]"#
        );
        assert_eq!(
            messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
            vec!["system", "user", "assistant"]
        );
        assert_eq!(r.unused_fields, BTreeSet::from(["id".to_string()]));
        let warning = r.unused_fields_warning(Path::new("d.jsonl")).unwrap();
        assert!(
            warning.contains("`id`") && warning.contains("d.jsonl"),
            "{warning}"
        );
        let e = read(
            "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}], \"tools\": \"[{oops\"}",
            "jsonl",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`tools`") && e.contains("d.jsonl:1"), "{e}");
    }

    #[test]
    fn records_for_other_methods_are_refused() {
        let kto = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}], \"label\": false}";
        let e = read(kto, "jsonl", None, false).unwrap_err().to_string();
        assert!(e.contains("KTO") && e.contains("d.jsonl:1"), "{e}");
        let r = read(kto, "jsonl", None, true).unwrap();
        assert_eq!((r.records.len(), r.skipped.len()), (0, 1));
        let dpo = "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}], \"chosen\": {\"from\": \"gpt\", \"value\": \"a\"}, \"rejected\": {\"from\": \"gpt\", \"value\": \"b\"}}";
        let e = read(dpo, "jsonl", None, false).unwrap_err().to_string();
        assert!(e.contains("name = \"dpo\""), "{e}");
        let e = read(
            "{\"text\": \"x\", \"images\": [\"a.png\"]}",
            "jsonl",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`images`"), "{e}");
    }

    #[test]
    fn a_txt_file_is_one_text_document() {
        let text = "\u{feff}First paragraph.\n\nSecond paragraph.\n";
        let r = read(text, "txt", None, false).unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(
            r.records[0].sample,
            Sample::Text("First paragraph.\n\nSecond paragraph.\n".into())
        );
        assert_eq!(r.records[0].origin.rsplit(':').next(), Some("1"));
        assert!(read(" \n", "txt", None, false).unwrap().records.is_empty());
        let e = read(text, "txt", Some(Format::Alpaca), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.format = \"text\""), "{e}");
    }
}
