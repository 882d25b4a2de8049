//! Hugging Face chat templates rendered with minijinja, set up the way transformers'
//! `_compile_jinja_template` sets up Jinja2: `trim_blocks` and `lstrip_blocks` on, the template's
//! own trailing newline dropped (Jinja2's default `keep_trailing_newline=False`), `break` /
//! `continue` allowed (the `loopcontrols` extension), `raise_exception(msg)` and
//! `strftime_now(fmt)` as globals, and `tojson` replaced by Python's `json.dumps`. Python string
//! and dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...) come from
//! minijinja-contrib's pycompat. The variables are the ones `apply_chat_template` passes:
//! `messages`, `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...),
//! `tools` (the list of tool schemas, as `apply_chat_template(..., tools=...)` passes it, or none)
//! and `documents` set to none (not undefined: templates test `tools is not none`).
//!
//! transformers' `{% generation %}...{% endgeneration %}` marker (used for assistant masks) has no
//! minijinja tag; it only marks text, so it is rewritten to `{% if true %}...{% endif %}`, keeping
//! any whitespace-control dashes.

use super::py_json::tojson_filter;
use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// One turn of a conversation, as in the OpenAI / transformers `messages` format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special-token strings a template may print (transformers' `special_tokens_map`). A token
/// that is not set is left undefined, as in transformers, so it prints as nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TemplateTokens {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
}

/// A compiled chat template; `origin` names where it came from in error messages.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `origin` is the file (and key) it was read from.
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))
            .map_err(|err| describe(&err, &origin, "does not compile"))?;
        Ok(Self { env, origin })
    }

    /// Where the template was read from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tools=tools, tokenize=False)`
    /// does; `tools` is a JSON list of tool schemas, given to the template unchanged.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| describe(&err, &self.origin, "is missing"))?;
        let variables = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            tools => tools,
            documents => (),
            ..minijinja::Value::from_serialize(tokens)
        };
        template
            .render(variables)
            .map_err(|err| describe(&err, &self.origin, "failed"))
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation; `msg` reaches the user.
fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)`: the local time, formatted with C `strftime` codes (Llama 3 prints the date).
fn strftime_now(format: String) -> Result<String, Error> {
    let mut text = String::new();
    write!(text, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: {format:?} is not a valid strftime format"),
        )
    })?;
    Ok(text)
}

/// "chat template in FILE failed at line N: MESSAGE", with the template's cause chain.
fn describe(err: &Error, origin: &str, what: &str) -> anyhow::Error {
    let line = err
        .line()
        .map(|line| format!(" at line {line}"))
        .unwrap_or_default();
    let mut message = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    anyhow!("chat template in {origin} {what}{line}: {message}")
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (any dashes kept) to a no-op `if` block.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(keyword) => {
                out.push_str("{%");
                out.push_str(&inner.replacen(body.trim(), keyword, 1));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        source: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        };
        ChatTemplate::new(source, "test/tokenizer_config.json")?.render(
            messages,
            add_generation_prompt,
            None,
            &tokens,
        )
    }

    #[test]
    fn trim_blocks_lstrip_blocks_and_trailing_newline_follow_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(render(source, &messages, false).unwrap(), "[a]\n[b]\n");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}{{ m.content.strip().upper() }}|{{ m.content.split(',')[1] }};{% endfor %}";
        let messages = [
            ChatMessage::new("user", "  x,y "),
            ChatMessage::new("user", "skip,me"),
            ChatMessage::new("user", "p,q"),
        ];
        assert_eq!(render(source, &messages, false).unwrap(), "X,Y|y ;P,Q|q;");
    }

    #[test]
    fn raise_exception_message_reaches_the_caller_with_the_line() {
        let source = "{{ bos_token }}\n{% if messages[0].role != 'user' %}{{ raise_exception('First turn must be the user') }}{% endif %}";
        let err = render(source, &[ChatMessage::new("assistant", "hi")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("First turn must be the user"), "{err}");
        assert!(err.contains("test/tokenizer_config.json"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let err = ChatTemplate::new("ok\n{% for m in messages %}", "dir/tokenizer_config.json")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("dir/tokenizer_config.json does not compile at line 2"),
            "{err}"
        );
    }

    #[test]
    fn tools_and_documents_are_none_and_unset_tokens_print_nothing() {
        let source = "{% if tools is not none or documents is not none %}TOOLS{% endif %}[{{ pad_token }}]{{ bos_token }}";
        assert_eq!(render(source, &[], false).unwrap(), "[]<s>");
    }

    #[test]
    fn strftime_now_prints_the_current_year() {
        let year: i32 = render("{{ strftime_now('%Y') }}", &[], false)
            .unwrap()
            .parse()
            .unwrap();
        let now: i32 = chrono::Local::now()
            .format("%Y")
            .to_string()
            .parse()
            .unwrap();
        assert_eq!(year, now);
    }

    #[test]
    fn generation_markers_render_their_content() {
        let source = "{% for m in messages %}{%- generation -%} <{{ m.content }}> {%- endgeneration %}{% endfor %}";
        assert_eq!(
            without_generation_tags(source),
            "{% for m in messages %}{%- if true -%} <{{ m.content }}> {%- endif %}{% endfor %}"
        );
        assert_eq!(
            render(source, &[ChatMessage::new("assistant", "ok")], false).unwrap(),
            "<ok>"
        );
    }

    #[test]
    fn tools_reach_the_template_as_a_list_of_schemas() {
        // The tool block of Qwen2.5's template, shortened.
        let source = "{% if tools %}<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>{{ tools | length }}{% endif %}{% for m in messages %}[{{ m.content }}]{% endfor %}";
        // Keys keep the file's order (json.dumps does not sort), and trim_blocks drops the
        // newline after each block tag, as in Jinja2.
        let tools = serde_json::json!([{"name": "f", "description": "d"}, {"name": "g"}]);
        let text = ChatTemplate::new(source, "t")
            .unwrap()
            .render(
                &[ChatMessage::new("user", "hi")],
                false,
                Some(&tools),
                &TemplateTokens::default(),
            )
            .unwrap();
        assert_eq!(
            text,
            "<tools>{\"name\": \"f\", \"description\": \"d\"}{\"name\": \"g\"}</tools>2[hi]"
        );
    }
}
