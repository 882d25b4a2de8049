//! The `tojson` filter exactly as transformers defines it for chat templates:
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, with those
//! four options open to the template. Python's spacing differs from serde_json's (`", "` and
//! `": "` without indent, `","` and newline + indent with it), and templates that render tool
//! schemas put that text straight into the prompt, so it has to match byte for byte.

use minijinja::value::{Kwargs, Value as JinjaValue, ValueKind};
use minijinja::{Error, ErrorKind};

/// How `json.dumps` lays text out.
struct PyJsonStyle {
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// The `tojson` filter: `value | tojson(indent=2, sort_keys=true, separators=[",", ":"], ensure_ascii=false)`.
pub fn tojson_filter(value: JinjaValue, options: Kwargs) -> Result<String, Error> {
    let indent: Option<JinjaValue> = options.get("indent")?;
    let separators: Option<Vec<String>> = options.get("separators")?;
    let sort_keys: Option<bool> = options.get("sort_keys")?;
    let ensure_ascii: Option<bool> = options.get("ensure_ascii")?;
    options.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(value) if value.is_none() || value.is_undefined() => None,
        Some(value) => match (value.as_i64(), value.as_str()) {
            (Some(width), _) => Some(" ".repeat(width.max(0) as usize)),
            (None, Some(text)) => Some(text.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be a number or a string, found {value}"),
                ))
            }
        },
    };
    let (item_separator, key_separator) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: separators must be two strings, found {other:?}"),
            ))
        }
    };
    let style = PyJsonStyle {
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_value(&value, &style, 0, &mut out)?;
    Ok(out)
}

/// Writes `value` walking minijinja's own maps, which keep insertion order as Python dicts do.
fn write_value(
    value: &JinjaValue,
    style: &PyJsonStyle,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
        ValueKind::String => {
            write_string(value.as_str().unwrap_or_default(), style.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JinjaValue> = value.try_iter()?.collect();
            write_container(('[', ']'), &items, style, depth, out, |item, out| {
                write_value(item, style, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key.to_string(), item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                ('{', '}'),
                &entries,
                style,
                depth,
                out,
                |(key, item), out| {
                    write_string(key, style.ensure_ascii, out);
                    out.push_str(&style.key_separator);
                    write_value(item, style, depth + 1, out)
                },
            )?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {kind} ({value}) cannot be written as JSON"),
            ))
        }
    }
    Ok(())
}

/// Brackets, separators and (with an indent) one item per line, as `json.dumps` writes them.
fn write_container<T>(
    (open, close): (char, char),
    items: &[T],
    style: &PyJsonStyle,
    depth: usize,
    out: &mut String,
    mut write_item: impl FnMut(&T, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push_str(&style.item_separator);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(item, out)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python prints a float that holds an integer as `1.0`, and exponents as `1e+20` / `2.5e-07`.
fn python_float(float: f64) -> String {
    let text = format!("{float:?}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(digits) => ('-', digits),
                None => ('+', exponent),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

fn write_string(text: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(template: &str) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson_filter);
        env.render_str(template, ()).unwrap()
    }

    #[test]
    fn default_spacing_and_key_order_match_python_json_dumps() {
        let template = r#"{{ {"name": "get_weather", "args": [1, 2.5, true, none], "desc": "Ünï \"q\"\n<b>"} | tojson }}"#;
        assert_eq!(
            render(template),
            r#"{"name": "get_weather", "args": [1, 2.5, true, null], "desc": "Ünï \"q\"\n<b>"}"#
        );
    }

    #[test]
    fn indent_sort_keys_and_ensure_ascii_follow_python() {
        let template = r#"{{ {"b": [], "a": {"x": "é😀"}} | tojson(indent=2, sort_keys=true, ensure_ascii=true) }}"#;
        assert_eq!(
            render(template),
            "{\n  \"a\": {\n    \"x\": \"\\u00e9\\ud83d\\ude00\"\n  },\n  \"b\": []\n}"
        );
    }

    #[test]
    fn custom_separators_are_used() {
        assert_eq!(
            render(r#"{{ {"a": [1, 2]} | tojson(separators=[",", ":"]) }}"#),
            r#"{"a":[1,2]}"#
        );
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(2.5e-7), "2.5e-07");
        assert_eq!(python_float(1e-100), "1e-100");
        assert_eq!(python_float(0.0001), "0.0001");
    }
}
