//! A dataset file's text, read as people's files come: a UTF-8 byte-order mark (Windows editors
//! write one) is dropped, a line that is not UTF-8 is named by its line number (or, with
//! `data.skip_bad_records`, skipped like any bad record), and a single pretty-printed JSON object
//! is recognised for what it is instead of failing as JSON Lines.

use anyhow::{bail, Context, Result};
use std::path::Path;

const BOM: &str = "\u{feff}";

/// The text of `path` without a BOM. Lines that are not UTF-8 are refused by number; with
/// `skip_bad` they become empty lines (so later line numbers stay true) and are returned as
/// `path:line: reason` in the second value.
pub fn read_dataset_text(path: &Path, skip_bad: bool) -> Result<(String, Vec<String>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read dataset {}", path.display()))?;
    let mut text = String::with_capacity(bytes.len());
    let mut skipped = Vec::new();
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        match std::str::from_utf8(line) {
            Ok(s) => text.push_str(s),
            Err(e) => {
                let why = format!(
                    "{}:{}: not valid UTF-8 (byte {} of the line)",
                    path.display(),
                    i + 1,
                    e.valid_up_to() + 1
                );
                if !skip_bad {
                    bail!("{why}: re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set data.skip_bad_records = true to skip such lines");
                }
                skipped.push(why);
                text.push('\n');
            }
        }
    }
    match text.strip_prefix(BOM) {
        Some(rest) => Ok((rest.to_string(), skipped)),
        None => Ok((text, skipped)),
    }
}

/// Refuses JSON-Lines text that is really one JSON object spread over several lines (a
/// pretty-printed record, or an object wrapping the records), which would otherwise fail on its
/// first line with "EOF while parsing an object".
pub fn refuse_multiline_object(path: &Path, text: &str) -> Result<()> {
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    if lines < 2 || !text.trim_start().starts_with('{') {
        return Ok(());
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(text) else {
        return Ok(());
    };
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    bail!(
        "{} holds one JSON object over {lines} lines (keys: {}), not JSON Lines: a dataset is a JSON array of records \
         (`[{{...}}, {{...}}]`) or one record per line (.jsonl); reformat it, e.g. `jq -c . FILE` for one record",
        path.display(),
        keys.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bom_is_dropped_and_bad_utf8_is_named_by_line_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            b"\xef\xbb\xbf{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n{\"text\": \"c\"}\n",
        )
        .unwrap();
        let e = read_dataset_text(&p, false).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl:2: not valid UTF-8") && e.contains("skip_bad_records"),
            "{e}"
        );
        let (text, skipped) = read_dataset_text(&p, true).unwrap();
        assert_eq!(text, "{\"text\": \"a\"}\n\n{\"text\": \"c\"}\n");
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].ends_with("d.jsonl:2: not valid UTF-8 (byte 11 of the line)"),
            "{}",
            skipped[0]
        );
    }

    #[test]
    fn a_pretty_printed_object_is_recognised() {
        let p = Path::new("d.json");
        refuse_multiline_object(p, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        refuse_multiline_object(p, "{\"text\": \"a\"}\n").unwrap();
        let e = refuse_multiline_object(
            p,
            "{\n  \"instruction\": \"hi\",\n  \"output\": \"yo\"\n}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("one JSON object over 4 lines") && e.contains("instruction, output"),
            "{e}"
        );
    }
}
