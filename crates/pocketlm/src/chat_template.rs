//! Chat templates: the model's own Jinja template rendered with `minijinja`.
//!
//! A model ships its prompt format as a Jinja template (GGUF metadata `tokenizer.chat_template`,
//! or `chat_template` in `tokenizer_config.json`). [`ChatTemplate`] compiles it once and renders
//! conversations the way Hugging Face transformers' `apply_chat_template` does
//! (`transformers/utils/chat_template_utils.py`: `_compile_jinja_template` and
//! `render_jinja_template`):
//!
//! - a sandboxed environment with `trim_blocks = True`, `lstrip_blocks = True` and the
//!   `loopcontrols` extension (`{% break %}`, `{% continue %}`);
//! - the `tojson` filter replaced by Python's `json.dumps(x, ensure_ascii=False, indent=None,
//!   separators=None, sort_keys=False)` (no HTML escaping, `", "` / `": "` separators);
//! - globals `raise_exception(message)` (becomes [`TemplateError::Raised`]) and
//!   `strftime_now(format)`;
//! - the context holds `messages`, `tools` (none when absent), `documents` (none),
//!   `add_generation_prompt`, the special tokens `bos_token` / `eos_token`, and extra kwargs.
//!
//! Python behaviour that templates rely on is reproduced as well: string and dict methods
//! (`.strip()`, `.split()`, `.startswith()`, `.items()`, ... through `minijinja-contrib`'s
//! `pycompat`), and values print as Python prints them (`None`, `True`, `['a', 1]`,
//! `{'k': 'v'}`, `1e+20`), also through the `string` filter. The `{% generation %}` tag of
//! transformers' assistant-mask extension renders its body unchanged.
//!
//! Known differences from Python: `strftime_now` formats the current time in UTC (Python uses
//! the local time zone); the `~` operator and `+` on mixed types follow minijinja's formatting
//! (`true` rather than `True`).
//!
//! The golden test `tests/it/chat_template_golden.rs` checks byte equality with Python jinja2 (and
//! transformers itself) on real templates; `scripts/golden/chat_template.py` makes its inputs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State, Value};
use serde::{Deserialize, Serialize};

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not compile.
    #[error("chat template syntax error{}: {message}", fmt_line(*.line))]
    Syntax {
        /// 1-based line of the template where compilation failed, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The template called `raise_exception(message)`: it refuses the conversation (for
    /// example "Conversation roles must alternate user/assistant/user/assistant/...").
    #[error("chat template rejected the conversation{}: {message}", fmt_line(*.line))]
    Raised {
        /// The message passed to `raise_exception`, exactly.
        message: String,
        /// 1-based template line of the call, when known.
        line: Option<usize>,
    },
    /// Rendering failed for another reason (unknown filter or method, bad operand types, a
    /// value `tojson` cannot serialize, ...).
    #[error("chat template render error{}: {message}", fmt_line(*.line))]
    Render {
        /// 1-based template line where rendering failed, when known.
        line: Option<usize>,
        /// What went wrong.
        message: String,
    },
    /// A `chat_template` field of `tokenizer_config.json` that is neither a string nor a list
    /// of `{name, template}` objects, or a list without the requested template.
    #[error("tokenizer_config.json `chat_template`: {0}")]
    Config(String),
    /// The caller passed a bad argument (for example a kwarg that shadows `messages`).
    #[error("chat template: invalid argument: {0}")]
    InvalidArgument(String),
    /// Any other template failure, with context.
    #[error("chat template: {0}")]
    Other(String),
}

fn fmt_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// One chat message: `role` (`system`, `user`, `assistant`, `tool`, ...), text `content`, and
/// for tool calling OpenAI's `tool_calls` (assistant turns) or `tool_call_id` / `name` (`tool`
/// turns, answering a call).
///
/// Serializes as transformers' message dicts: `{"role": ..., "content": ...}`, plus
/// `tool_calls` (each `{"id", "type": "function", "function": {"name", "arguments"}}` with the
/// arguments as a mapping, as Hugging Face templates expect them, not OpenAI's JSON text),
/// `tool_call_id` and `name` when set. Deserializes OpenAI's shape (arguments as JSON text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks: `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text of the message.
    pub content: String,
    /// Images attached to the message (vision-language models), shown before the text. Not
    /// serialized: a message with images is rendered with list-valued content
    /// `[{"type": "image"}, ..., {"type": "text", "text": content}]`, as transformers'
    /// processors take it (see [`Message::template_value`]).
    #[serde(skip)]
    pub images: Vec<crate::image_processor::RgbImage>,
    /// The calls an `assistant` turn made (empty otherwise).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_tool_calls"
    )]
    pub tool_calls: Vec<crate::tools::ToolCall>,
    /// For a `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a `tool` turn: the function's name (some templates print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `tool_calls` as chat templates take them: arguments as a mapping.
fn serialize_tool_calls<S: serde::Serializer>(
    calls: &[crate::tools::ToolCall],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let values: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id,
                "type": c.kind,
                "function": {"name": c.function.name, "arguments": c.arguments_value()},
            })
        })
        .collect();
    values.serialize(serializer)
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The same message with `images` attached.
    pub fn with_images(mut self, images: Vec<crate::image_processor::RgbImage>) -> Self {
        self.images = images;
        self
    }

    /// An `assistant` turn that made `tool_calls` (with optional text `content`).
    pub fn assistant_tool_calls(
        content: impl Into<String>,
        tool_calls: Vec<crate::tools::ToolCall>,
    ) -> Self {
        Message {
            tool_calls,
            ..Message::new("assistant", content)
        }
    }

    /// A `tool` turn: the result `content` of the call `tool_call_id` (of function `name`).
    pub fn tool(
        tool_call_id: impl Into<String>,
        name: Option<String>,
        content: impl Into<String>,
    ) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            name,
            ..Message::new("tool", content)
        }
    }

    /// The message as a chat template sees it: its serialization (see [`Message`]), with
    /// content parts (one `{"type": "image"}` per image, then the text) when it has images.
    pub fn template_value(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({}));
        if !self.images.is_empty() {
            let mut parts: Vec<serde_json::Value> = self
                .images
                .iter()
                .map(|_| serde_json::json!({"type": "image"}))
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": self.content}));
            v["content"] = serde_json::Value::Array(parts);
        }
        v
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// Extra inputs of [`ChatTemplate::render_with`], as the keyword arguments of transformers'
/// `apply_chat_template`.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the header of an assistant turn so that the model answers next.
    pub add_generation_prompt: bool,
    /// Tool (function) JSON schemas, `{"type": "function", "function": {...}}`; `None` renders
    /// as `none` (transformers passes `tools=None`, so `tools is defined` is true).
    pub tools: Option<Vec<serde_json::Value>>,
    /// Documents for retrieval-augmented templates; `None` renders as `none`.
    pub documents: Option<Vec<serde_json::Value>>,
    /// Any other template variables (`enable_thinking`, `date_string`, `tools_in_user_message`,
    /// ...). They may override `bos_token` / `eos_token` but not `messages`, `tools`,
    /// `documents` or `add_generation_prompt` (an [`TemplateError::InvalidArgument`]).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

const TEMPLATE_NAME: &str = "chat_template";
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// A compiled chat template with its special tokens. Compile once, render many times; it is
/// `Send + Sync`, so one instance can serve several threads.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) in transformers' environment; `bos_token` and `eos_token` are
    /// the token strings the template sees as `bos_token` / `eos_token` (e.g. `<|im_start|>`,
    /// `<|im_end|>`).
    ///
    /// Errors: [`TemplateError::Syntax`] with the 1-based line when the source does not compile.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = python_environment();
        let prepared = rewrite_generation_tags(source).into_owned();
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| TemplateError::Syntax {
                line: e.line(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The Jinja source this template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` string given to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` string given to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages` to the prompt text; with `add_generation_prompt` the text ends with
    /// the header of an assistant turn. Same as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    ///
    /// Errors: [`TemplateError::Raised`] when the template calls `raise_exception` (e.g. a
    /// system message for a model without a system role), [`TemplateError::Render`] otherwise.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let options = RenderOptions {
            add_generation_prompt,
            ..RenderOptions::default()
        };
        self.render_with(messages, &options)
    }

    /// Renders messages of any serializable shape (e.g. `serde_json::Value` messages with
    /// `tool_calls`) with tools, documents and extra template variables.
    ///
    /// Errors: as [`ChatTemplate::render`], plus [`TemplateError::InvalidArgument`] when a
    /// kwarg is named `messages`, `tools`, `documents` or `add_generation_prompt`.
    pub fn render_with<M: Serialize>(
        &self,
        messages: &[M],
        options: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("tools".into(), optional_value(options.tools.as_ref()));
        ctx.insert(
            "documents".into(),
            optional_value(options.documents.as_ref()),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(options.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.as_str()));
        for (key, value) in &options.kwargs {
            if RESERVED.contains(&key.as_str()) {
                return Err(TemplateError::InvalidArgument(format!(
                    "kwarg `{key}` is set by the renderer itself; pass it through its own field"
                )));
            }
            ctx.insert(key.clone(), Value::from_serialize(value));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Other(describe(&e)))?;
        template.render(Value::from(ctx)).map_err(render_error)
    }
}

fn optional_value(v: Option<&Vec<serde_json::Value>>) -> Value {
    match v {
        Some(v) => Value::from_serialize(v),
        None => Value::from(()),
    }
}

/// Picks the template text out of a `chat_template` field of `tokenizer_config.json`: either a
/// string, or a list of `{"name": ..., "template": ...}` objects (transformers' named
/// templates), from which `name` is taken, `"default"` when `name` is `None`.
///
/// Errors: [`TemplateError::Config`] when the field has another shape or the name is absent
/// (the message lists the names present).
pub fn select_chat_template(
    field: &serde_json::Value,
    name: Option<&str>,
) -> Result<String, TemplateError> {
    let wanted = name.unwrap_or("default");
    match field {
        serde_json::Value::String(s) => {
            if name.is_some_and(|n| n != "default") {
                return Err(TemplateError::Config(format!(
                    "only one unnamed template is present, not `{wanted}`"
                )));
            }
            Ok(s.clone())
        }
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let entry_name = item.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                    TemplateError::Config(format!("entry {i} has no string `name`"))
                })?;
                let template = item
                    .get("template")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        TemplateError::Config(format!(
                            "entry {i} (`{entry_name}`) has no string `template`"
                        ))
                    })?;
                if entry_name == wanted {
                    return Ok(template.to_owned());
                }
                names.push(entry_name.to_owned());
            }
            Err(TemplateError::Config(format!(
                "no template named `{wanted}`; present: {}",
                names.join(", ")
            )))
        }
        other => Err(TemplateError::Config(format!(
            "expected a string or a list of {{name, template}} objects, found {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

// ------------------------------------------------------------------ environment

/// The error source attached to the error of `raise_exception`, to recognise it after render.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn python_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", string_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn raise_exception(message: Value) -> Result<Value, minijinja::Error> {
    let text = py_str(&message);
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, text.clone())
            .with_source(RaisedByTemplate(text)),
    )
}

fn strftime_now(format: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(now, format)
}

fn python_formatter(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    if value.is_undefined() {
        return Ok(());
    }
    if let Some(s) = value.as_str() {
        return out.write_str(s).map_err(minijinja::Error::from);
    }
    let mut text = String::new();
    write_py_str(&mut text, value);
    out.write_str(&text).map_err(minijinja::Error::from)
}

fn string_filter(value: &Value) -> Value {
    if value.kind() == ValueKind::String {
        value.clone()
    } else {
        Value::from(py_str(value))
    }
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, positional
/// order as transformers' override of the filter.
fn tojson_filter(value: &Value, args: &[Value], kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    if args.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let arg = |i: usize, key: &str| -> Result<Option<Value>, minijinja::Error> {
        let kw: Option<Value> = kwargs.get(key)?;
        Ok(kw.or_else(|| args.get(i).cloned()))
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_owned())
            } else if let Ok(n) = i64::try_from(v.clone()) {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "tojson: indent must be an integer or a string, not {}",
                        v.kind()
                    ),
                ));
            }
        }
    };
    let separators = match arg(2, "separators")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
            ) {
                (Some(item), Some(key)) if parts.len() == 2 => {
                    Some((item.to_owned(), key.to_owned()))
                }
                _ => return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings (item_separator, key_separator)",
                )),
            }
        }
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = separators.unwrap_or_else(|| {
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_owned(), ": ".to_owned())
    });
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    json_dump(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

fn render_error(e: minijinja::Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<RaisedByTemplate>() {
            return TemplateError::Raised {
                message: raised.0.clone(),
                line: e.line(),
            };
        }
        source = s.source();
    }
    TemplateError::Render {
        line: e.line(),
        message: describe(&e),
    }
}

/// Turns transformers' `{% generation %}` / `{% endgeneration %}` (assistant-mask extension)
/// into `{% if true %}` / `{% endif %}`: same body, same whitespace control.
fn rewrite_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos + 2]);
        rest = &rest[pos + 2..];
        let after_marker = rest.strip_prefix(['-', '+']).unwrap_or(rest);
        let marker = &rest[..rest.len() - after_marker.len()];
        let trimmed = after_marker.trim_start();
        let ws = &after_marker[..after_marker.len() - trimmed.len()];
        let (word, replacement) = if trimmed.starts_with("endgeneration") {
            ("endgeneration", "endif")
        } else if trimmed.starts_with("generation") {
            ("generation", "if true")
        } else {
            continue;
        };
        let tail = &trimmed[word.len()..];
        let tail_trimmed = tail.trim_start();
        let closes = tail_trimmed.starts_with("%}")
            || ((tail_trimmed.starts_with('-') || tail_trimmed.starts_with('+'))
                && tail_trimmed[1..].starts_with("%}"));
        if !closes {
            continue;
        }
        out.push_str(marker);
        out.push_str(ws);
        out.push_str(replacement);
        rest = tail;
    }
    out.push_str(rest);
    Cow::Owned(out)
}

// ------------------------------------------------------------------ Python str() / repr()

/// Python's `str(value)`.
fn py_str(value: &Value) -> String {
    let mut out = String::new();
    write_py_str(&mut out, value);
    out
}

fn write_py_str(out: &mut String, value: &Value) {
    match value.as_str() {
        Some(s) if value.kind() == ValueKind::String => out.push_str(s),
        _ => write_py_repr(out, value),
    }
}

/// Python's `repr(value)` for the JSON-like values templates see.
fn write_py_repr(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) => out.push_str(&py_float_repr(f)),
                    Err(_) => {
                        let _ = write!(out, "{value}");
                    }
                }
            }
        }
        ValueKind::String => write_py_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => match value.try_iter() {
            Ok(iter) => {
                out.push('[');
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_py_repr(out, &item);
                }
                out.push(']');
            }
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                out.push('{');
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_py_repr(out, &key);
                    out.push_str(": ");
                    let item = value.get_item(&key).unwrap_or(Value::UNDEFINED);
                    write_py_repr(out, &item);
                }
                out.push('}');
            }
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; escapes for
/// backslash, the quote, `\n \r \t`, and non-printable characters (`\xNN`, `\uNNNN`,
/// `\UNNNNNNNN`). Printability follows `str.isprintable` for the characters that occur in
/// practice (controls, non-space separators, format characters); it is not the full table.
fn write_py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let code = c as u32;
                let _ = if code <= 0xff {
                    write!(out, "\\x{code:02x}")
                } else if code <= 0xffff {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn py_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    !(c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}'))
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation when the
/// decimal exponent is in `-4..16`, else `d.ddde+XX`; `1.0` keeps its `.0`.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.2345e-7", "1e20", "0e0".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

// ------------------------------------------------------------------ Python json.dumps

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(what: impl std::fmt::Display) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: object of type {what} is not JSON serializable"),
    )
}

/// Python's `json.dumps` on a template value (see [`JsonOpts`]).
fn json_dump(
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    level: usize,
) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone())?;
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&py_float_repr(f));
                }
            }
        }
        ValueKind::String => {
            json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(out, opts, level + 1);
                json_dump(out, item, opts, level + 1)?;
            }
            json_newline(out, opts, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(out, opts, level + 1);
                json_string(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                json_dump(out, item, opts, level + 1)?;
            }
            json_newline(out, opts, level);
            out.push('}');
        }
        other => return Err(not_serializable(other)),
    }
    Ok(())
}

fn json_newline(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// Python's conversion of dict keys: strings as they are, numbers / booleans / None as JSON.
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => py_float_repr(f64::try_from(key.clone())?),
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ))
        }
    })
}

/// Python's JSON string encoder: `\" \\ \n \r \t \b \f`, other controls as `\u00XX`; with
/// `ensure_ascii` every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ------------------------------------------------------------------ strftime

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Proleptic Gregorian (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (H. Hinnant, "chrono-compatible low-level date algorithms", `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// C/Python `strftime` of a UNIX time (seconds) in UTC, C locale. Supports `%a %A %b %B %c %d
/// %D %e %F %h %H %I %j %m %M %n %p %R %S %t %T %u %w %y %Y %%`; `%z` and `%Z` are empty (a
/// naive time, as Python's `datetime.now()`); other directives are copied as they are.
pub(crate) fn strftime_utc(timestamp: i64, format: &str) -> String {
    let days = timestamp.div_euclid(86_400);
    let secs = timestamp.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let cumulative = [0u32, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'a' => write!(out, "{}", &weekday_name[..3]),
            'A' => write!(out, "{weekday_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'c' => write!(
                out,
                "{} {} {day:2} {hour:02}:{minute:02}:{second:02} {year}",
                &weekday_name[..3],
                &month_name[..3]
            ),
            'd' => write!(out, "{day:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'e' => write!(out, "{day:2}"),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'j' => write!(out, "{yday:03}"),
            'm' => write!(out, "{month:02}"),
            'M' => write!(out, "{minute:02}"),
            'n' => writeln!(out),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'R' => write!(out, "{hour:02}:{minute:02}"),
            'S' => write!(out, "{second:02}"),
            't' => write!(out, "\t"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'u' => write!(out, "{}", if weekday == 0 { 7 } else { weekday }),
            'w' => write!(out, "{weekday}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'Y' => write!(out, "{year}"),
            'z' | 'Z' => Ok(()),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(source: &str) -> ChatTemplate {
        ChatTemplate::new(source, "<s>", "</s>").expect("test template compiles")
    }

    #[test]
    fn raise_exception_becomes_raised_error_with_message() {
        let t = tmpl("line one\n{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok");
        let err = t
            .render(&[Message::system("x"), Message::user("y")], true)
            .expect_err("system message must be rejected");
        match err {
            TemplateError::Raised { message, line } => {
                assert_eq!(message, "System role not supported");
                assert_eq!(line, Some(2));
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(
            t.render(&[Message::user("y")], false).unwrap(),
            "line one\nok"
        );
    }

    #[test]
    fn bad_template_reports_syntax_error_with_line() {
        let err = ChatTemplate::new("{% for m in messages %}\n{{ m.content }}\n{% if %}", "", "")
            .expect_err("must not compile");
        match &err {
            TemplateError::Syntax { line, message } => {
                assert_eq!(*line, Some(3), "{err}");
                assert!(message.contains("syntax error"), "{message}");
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        assert!(err.to_string().contains("line 3"), "{err}");
        let unclosed = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "")
            .expect_err("unclosed for must not compile");
        assert!(
            matches!(unclosed, TemplateError::Syntax { .. }),
            "{unclosed:?}"
        );
    }

    #[test]
    fn runtime_error_is_render_error_not_raised() {
        let t = tmpl("a\n{{ messages[0].content.nosuchmethod() }}");
        match t.render(&[Message::user("x")], false) {
            Err(TemplateError::Render { line, message }) => {
                assert_eq!(line, Some(2));
                assert!(message.contains("nosuchmethod"), "{message}");
            }
            other => panic!("expected Render error, got {other:?}"),
        }
        let undefined_json = tmpl("{{ nothing | tojson }}");
        assert!(matches!(
            undefined_json.render(&[Message::user("x")], false),
            Err(TemplateError::Render { .. })
        ));
    }

    #[test]
    fn context_has_python_defaults_and_kwargs() {
        let t = tmpl("{{ bos_token }}|{{ eos_token }}|{{ tools is defined }}|{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}|{{ flag }}");
        assert_eq!(
            t.render(&[Message::user("x")], true).unwrap(),
            "<s>|</s>|True|True|True|True|"
        );
        let mut options = RenderOptions::default();
        options
            .kwargs
            .insert("flag".into(), serde_json::json!(false));
        options
            .kwargs
            .insert("bos_token".into(), serde_json::json!("<B>"));
        assert_eq!(
            t.render_with(&[Message::user("x")], &options).unwrap(),
            "<B>|</s>|True|True|True|False|False"
        );
        options
            .kwargs
            .insert("messages".into(), serde_json::json!([]));
        assert!(matches!(
            t.render_with(&[Message::user("x")], &options),
            Err(TemplateError::InvalidArgument(_))
        ));
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = tmpl("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}");
        assert_eq!(
            t.render(&[Message::user("u"), Message::assistant("a")], false)
                .unwrap(),
            "u[a]"
        );
        assert_eq!(
            rewrite_generation_tags("{%- generation -%}x{% endgeneration %}"),
            "{%- if true -%}x{% endif %}"
        );
        assert_eq!(
            rewrite_generation_tags("{% if generation %}"),
            "{% if generation %}"
        );
    }

    #[test]
    fn select_chat_template_picks_default_or_named() {
        let single = serde_json::json!("{{ x }}");
        assert_eq!(select_chat_template(&single, None).unwrap(), "{{ x }}");
        assert!(select_chat_template(&single, Some("tool_use")).is_err());
        let list = serde_json::json!([
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]);
        assert_eq!(select_chat_template(&list, None).unwrap(), "D");
        assert_eq!(select_chat_template(&list, Some("tool_use")).unwrap(), "T");
        let err = select_chat_template(&list, Some("rag")).unwrap_err();
        assert!(err.to_string().contains("tool_use, default"), "{err}");
        let no_default = serde_json::json!([{"name": "tool_use", "template": "T"}]);
        assert!(matches!(
            select_chat_template(&no_default, None),
            Err(TemplateError::Config(_))
        ));
        assert!(select_chat_template(&serde_json::json!(3), None).is_err());
        assert!(select_chat_template(&serde_json::json!([{"name": "default"}]), None).is_err());
    }

    #[test]
    fn python_float_repr() {
        for (x, want) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1e20, "1e+20"),
            (1.5e-7, "1.5e-07"),
            (1e-4, "0.0001"),
            (123456789.125, "123456789.125"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (1.2345678901234568e16, "1.2345678901234568e+16"),
            (-2.5e-300, "-2.5e-300"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn python_string_repr() {
        let cases = [
            ("abc", "'abc'"),
            ("it's", "\"it's\""),
            ("say \"hi\" it's", "'say \"hi\" it\\'s'"),
            ("a\nb\\c\t\u{1}", "'a\\nb\\\\c\\t\\x01'"),
            ("é😊\u{a0}\u{200b}", "'é😊\\xa0\\u200b'"),
        ];
        for (s, want) in cases {
            let mut out = String::new();
            write_py_str_repr(&mut out, s);
            assert_eq!(out, want);
        }
    }

    #[derive(Deserialize)]
    struct StrftimeCase {
        timestamp: i64,
        format: String,
        expected: String,
    }

    #[test]
    fn strftime_matches_python() {
        // Expected strings computed by Python's datetime.strftime (scripts/golden/chat_template.py).
        let cases: Vec<StrftimeCase> =
            serde_json::from_str(include_str!("../tests/golden/chat_template/strftime.json"))
                .expect("strftime golden parses");
        assert!(cases.len() >= 20);
        for c in cases {
            assert_eq!(
                strftime_utc(c.timestamp, &c.format),
                c.expected,
                "{} {}",
                c.timestamp,
                c.format
            );
        }
        assert_eq!(strftime_utc(-1, "%Y-%m-%d %H:%M:%S"), "1969-12-31 23:59:59");
        assert_eq!(strftime_utc(0, "%Q %"), "%Q %");
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let out = tmpl("{{ strftime_now('%Y-%m-%d') }}")
            .render(&[Message::user("x")], false)
            .unwrap();
        let parts: Vec<&str> = out.split('-').collect();
        assert_eq!(parts.len(), 3, "{out}");
        let year: i64 = parts[0].parse().unwrap();
        assert!(year >= 2024, "{out}");
    }

    #[test]
    fn template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
