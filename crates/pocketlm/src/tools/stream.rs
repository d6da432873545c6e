//! Incremental tool-call parsing for streamed answers: text goes in as it is generated,
//! content comes out as soon as it cannot be the start of a call, and each call comes out as
//! OpenAI's streamed `tool_calls` deltas: first its index, id and function name
//! ([`ToolStreamEvent::CallStart`]), then its arguments ([`ToolStreamEvent::CallArguments`]).
//!
//! Hermes calls written as `{"name": "...", "arguments": ...}` (the order the templates teach
//! and the grammar enforces) start as soon as the name is complete, and their arguments stream
//! in pieces as they are generated (holding back only what may be the call's closing `}`); a
//! Hermes block in another shape is emitted whole when its `</tool_call>` arrives (and is
//! content if it does not parse, as in [`super::parse_tool_calls`]). Llama 3 JSON answers and
//! Mistral calls, which run to the end of the answer, are emitted when
//! [`ToolCallStreamParser::finish`] is called. Text held back because it may start a call is
//! at most the length of the call marker (`<tool_call>`, `[TOOL_CALLS]`), or, for an answer
//! that starts like a Llama or Mistral call, the whole answer.

use super::{parse_tool_calls, ToolCall, ToolCallFormat};

/// What the parser found in the text pushed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStreamEvent {
    /// Message content (text outside calls).
    Content(String),
    /// A call begins: its position among this answer's calls, its id and function name.
    CallStart {
        /// 0 for the first call of the answer, then 1, 2, ...
        index: usize,
        /// The call's id (`call_...`).
        id: String,
        /// The function's name.
        name: String,
    },
    /// A piece of a call's arguments (JSON text; the pieces of one call concatenate to it).
    CallArguments {
        /// The call's index.
        index: usize,
        /// The piece.
        fragment: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing but whitespace yet (Llama / Mistral: the answer's start decides).
    Start,
    /// Plain text; a call marker may come.
    Content,
    /// Inside a Hermes `<tool_call>` block.
    InCall,
    /// A Llama / Mistral call runs to the end: keep everything for [`ToolCallStreamParser::finish`].
    Rest,
}

/// The incremental parser of one streamed answer (see the module documentation).
#[derive(Debug, Clone)]
pub struct ToolCallStreamParser {
    format: ToolCallFormat,
    buf: String,
    mode: Mode,
    calls: usize,
    /// A call just closed: whitespace after it is not content.
    after_call: bool,
    /// Inside a Hermes block whose name was emitted: (the call's index, byte offset of the
    /// arguments in `buf`, bytes of them already emitted).
    streaming: Option<(usize, usize, usize)>,
}

/// The prefix `{"name": "<name>", "arguments":` (any JSON whitespace) of a Hermes call body:
/// the name and the offset where the arguments begin. `None` while incomplete or in another
/// shape.
fn hermes_head(body: &str) -> Option<(String, usize)> {
    let ws = |s: &str, i: usize| i + (s[i..].len() - s[i..].trim_start().len());
    let lit = |s: &str, i: usize, t: &str| s[i..].starts_with(t).then(|| i + t.len());
    let mut i = ws(body, 0);
    i = lit(body, i, "{")?;
    i = ws(body, i);
    i = lit(body, i, "\"name\"")?;
    i = ws(body, i);
    i = lit(body, i, ":")?;
    i = ws(body, i);
    let mut de = serde_json::Deserializer::from_str(&body[i..]).into_iter::<String>();
    let name = de.next()?.ok()?;
    i += de.byte_offset();
    i = ws(body, i);
    i = lit(body, i, ",")?;
    i = ws(body, i);
    i = lit(body, i, "\"arguments\"")?;
    i = ws(body, i);
    i = lit(body, i, ":")?;
    let start = ws(body, i);
    // Wait for the first character of the value (an object or array streams as it is).
    matches!(body[start..].chars().next(), Some('{') | Some('[')).then_some((name, start))
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";

/// Length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_marker(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&marker[..n]))
        .unwrap_or(0)
}

impl ToolCallStreamParser {
    /// A parser for answers in `format`.
    pub fn new(format: ToolCallFormat) -> Self {
        let mode = match format {
            ToolCallFormat::Hermes => Mode::Content,
            _ => Mode::Start,
        };
        ToolCallStreamParser {
            format,
            buf: String::new(),
            mode,
            calls: 0,
            after_call: false,
            streaming: None,
        }
    }

    /// How many calls were emitted so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn emit_call(&mut self, call: ToolCall, out: &mut Vec<ToolStreamEvent>) {
        let index = self.calls;
        self.calls += 1;
        out.push(ToolStreamEvent::CallStart {
            index,
            id: call.id,
            name: call.function.name,
        });
        out.push(ToolStreamEvent::CallArguments {
            index,
            fragment: call.function.arguments,
        });
    }

    fn emit_content(&mut self, text: &str, out: &mut Vec<ToolStreamEvent>) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        self.after_call = false;
        match out.last_mut() {
            Some(ToolStreamEvent::Content(c)) => c.push_str(text),
            _ => out.push(ToolStreamEvent::Content(text.to_owned())),
        }
    }

    /// Emits the parse of `text` (a whole call region) as content and calls.
    fn emit_parsed(&mut self, text: &str, out: &mut Vec<ToolStreamEvent>) {
        let parsed = parse_tool_calls(self.format, text);
        if parsed.tool_calls.is_empty() {
            self.emit_content(text, out);
            return;
        }
        self.emit_content(&parsed.content, out);
        for call in parsed.tool_calls {
            self.emit_call(call, out);
        }
        self.after_call = true;
    }

    /// Takes the next piece of generated text; returns what became final.
    pub fn push(&mut self, text: &str) -> Vec<ToolStreamEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    let starts_call = match self.format {
                        ToolCallFormat::Llama3Json => {
                            t.starts_with('{') || t.starts_with("<|python_tag|>")
                        }
                        ToolCallFormat::Mistral => t.starts_with(MISTRAL) || t.starts_with("[{"),
                        ToolCallFormat::Hermes => false,
                    };
                    let may_start = match self.format {
                        ToolCallFormat::Llama3Json => "<|python_tag|>".starts_with(t),
                        ToolCallFormat::Mistral => MISTRAL.starts_with(t) || t == "[",
                        ToolCallFormat::Hermes => false,
                    };
                    if starts_call {
                        self.mode = Mode::Rest;
                    } else if may_start {
                        return out;
                    } else {
                        self.mode = Mode::Content;
                    }
                }
                Mode::Content => {
                    let marker = match self.format {
                        ToolCallFormat::Hermes => OPEN,
                        ToolCallFormat::Mistral => MISTRAL,
                        // A Llama call is the whole answer: later text is content.
                        ToolCallFormat::Llama3Json => {
                            let all = std::mem::take(&mut self.buf);
                            self.emit_content(&all, &mut out);
                            return out;
                        }
                    };
                    if let Some(pos) = self.buf.find(marker) {
                        let before = self.buf[..pos].to_owned();
                        if !before.trim().is_empty() {
                            self.emit_content(&before, &mut out);
                        }
                        if self.format == ToolCallFormat::Hermes {
                            self.buf.drain(..pos + OPEN.len());
                            self.mode = Mode::InCall;
                        } else {
                            self.buf.drain(..pos);
                            self.mode = Mode::Rest;
                        }
                        continue;
                    }
                    let keep = partial_marker(&self.buf, marker);
                    let ready: String = self.buf.drain(..self.buf.len() - keep).collect();
                    if self.after_call && ready.trim().is_empty() {
                        // Whitespace between calls: hold it until we know what follows.
                        self.buf.insert_str(0, &ready);
                        return out;
                    }
                    self.emit_content(&ready, &mut out);
                    return out;
                }
                Mode::InCall => {
                    if self.streaming.is_none() {
                        if let Some((name, start)) = hermes_head(&self.buf) {
                            let index = self.calls;
                            self.calls += 1;
                            out.push(ToolStreamEvent::CallStart {
                                index,
                                id: self.format.new_call_id(),
                                name,
                            });
                            self.streaming = Some((index, start, 0));
                        }
                    }
                    let end = self.buf.find(CLOSE);
                    if let Some((index, start, sent)) = self.streaming {
                        // The arguments end before the body's last `}` (the call object's)
                        // and the whitespace before it; until the block closes, the last `}`
                        // so far and the whitespace before it may be those, so they wait.
                        let region = &self.buf[start..end.unwrap_or(self.buf.len())];
                        let upto = match (end, region.rfind('}')) {
                            (_, Some(close)) => region[..close].trim_end().len(),
                            (Some(_), None) => region.trim_end().len(),
                            (None, None) => region.len(),
                        };
                        if upto > sent {
                            out.push(ToolStreamEvent::CallArguments {
                                index,
                                fragment: region[sent..upto].to_owned(),
                            });
                            self.streaming = Some((index, start, upto));
                        }
                    }
                    let Some(end) = end else {
                        return out;
                    };
                    if self.streaming.take().is_some() {
                        self.buf.drain(..end + CLOSE.len());
                        self.mode = Mode::Content;
                        self.after_call = true;
                        continue;
                    }
                    let block = format!("{OPEN}{}{CLOSE}", &self.buf[..end]);
                    self.buf.drain(..end + CLOSE.len());
                    self.mode = Mode::Content;
                    self.emit_parsed(&block, &mut out);
                }
                Mode::Rest => return out,
            }
        }
    }

    /// The answer ended: returns what was held back (a call still open is parsed as it is;
    /// text that does not parse as a call is content).
    pub fn finish(&mut self) -> Vec<ToolStreamEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.mode {
            Mode::Start | Mode::Content => {
                if !(self.after_call && rest.trim().is_empty()) {
                    self.emit_content(&rest, &mut out);
                }
            }
            Mode::InCall => match self.streaming.take() {
                // A call cut off (token limit): send the rest of what was written.
                Some((index, start, sent)) => {
                    let region = rest.get(start..).unwrap_or("").trim_end();
                    let region = region.strip_suffix('}').unwrap_or(region).trim_end();
                    if region.len() > sent {
                        out.push(ToolStreamEvent::CallArguments {
                            index,
                            fragment: region[sent..].to_owned(),
                        });
                    }
                }
                None => self.emit_parsed(&format!("{OPEN}{rest}"), &mut out),
            },
            Mode::Rest => self.emit_parsed(&rest, &mut out),
        }
        self.mode = Mode::Content;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` characters and gathers content and calls.
    fn run(
        format: ToolCallFormat,
        text: &str,
        step: usize,
    ) -> (String, Vec<(usize, String, String)>) {
        let mut p = ToolCallStreamParser::new(format);
        let chars: Vec<char> = text.chars().collect();
        let mut events = Vec::new();
        for piece in chars.chunks(step) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        events.extend(p.finish());
        let mut content = String::new();
        let mut calls: Vec<(usize, String, String)> = Vec::new();
        for e in events {
            match e {
                ToolStreamEvent::Content(c) => content.push_str(&c),
                ToolStreamEvent::CallStart { index, id, name } => {
                    assert_eq!(index, calls.len());
                    assert!(!id.is_empty());
                    calls.push((index, name, String::new()));
                }
                ToolStreamEvent::CallArguments { index, fragment } => {
                    calls[index].2.push_str(&fragment)
                }
            }
        }
        (content, calls)
    }

    #[test]
    fn hermes_stream_matches_the_whole_text_parse_for_any_chunking() {
        let text = "Checking <tool_ca...\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n";
        for step in [1, 2, 3, 7, 1000] {
            let (content, calls) = run(ToolCallFormat::Hermes, text, step);
            assert_eq!(content, "Checking <tool_ca...\n", "step {step}");
            let got: Vec<(&str, serde_json::Value)> = calls
                .iter()
                .map(|(_, n, a)| (n.as_str(), serde_json::from_str(a).unwrap()))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("get_weather", serde_json::json!({"city": "Paris"})),
                    ("get_time", serde_json::json!({}))
                ],
                "step {step}"
            );
        }
    }

    /// Whitespace between the arguments and the call's closing `}` (a pretty-printed call) is
    /// not part of the streamed arguments, which equal the whole-text parse's for any chunking.
    #[test]
    fn streamed_arguments_equal_the_whole_parse_with_whitespace_before_the_last_brace() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\n    \"city\": \"Paris\",\n    \"unit\": {\"c\": 1}\n}\n}\n</tool_call>";
        let whole = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(
            whole.tool_calls[0].function.arguments,
            "{\n    \"city\": \"Paris\",\n    \"unit\": {\"c\": 1}\n}"
        );
        for step in [1, 2, 3, 5, 1000] {
            let (content, calls) = run(ToolCallFormat::Hermes, text, step);
            assert_eq!(content, "", "step {step}");
            assert_eq!(
                calls[0].2, whole.tool_calls[0].function.arguments,
                "step {step}"
            );
        }
    }

    #[test]
    fn hermes_arguments_stream_in_pieces_before_the_call_closes() {
        let mut p = ToolCallStreamParser::new(ToolCallFormat::Hermes);
        let mut events = p.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ");
        assert!(
            matches!(&events[0], ToolStreamEvent::CallStart { index: 0, name, .. } if name == "f"),
            "{events:?}"
        );
        events.extend(p.push("[1, 2]"));
        let args: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                ToolStreamEvent::CallArguments { fragment, .. } => Some(fragment.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            args,
            vec!["{\"a\": ".to_string(), "[1, 2]".to_string()],
            "before the close"
        );
        let rest = p.push("}}\n</tool_call>");
        assert_eq!(
            rest,
            vec![ToolStreamEvent::CallArguments {
                index: 0,
                fragment: "}".into()
            }]
        );
        assert!(p.finish().is_empty());
        // Cut off by the token limit: what was written is sent.
        let mut p = ToolCallStreamParser::new(ToolCallFormat::Hermes);
        let mut events = p.push("<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":1}");
        events.extend(p.finish());
        let sent: String = events
            .iter()
            .filter_map(|e| match e {
                ToolStreamEvent::CallArguments { fragment, .. } => Some(fragment.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(sent, "{\"a\":1");
    }

    #[test]
    fn plain_text_streams_through_and_a_partial_marker_is_released_at_the_end() {
        let mut p = ToolCallStreamParser::new(ToolCallFormat::Hermes);
        assert_eq!(
            p.push("Hello"),
            vec![ToolStreamEvent::Content("Hello".into())]
        );
        assert_eq!(p.push(" <tool"), vec![ToolStreamEvent::Content(" ".into())]);
        assert_eq!(p.finish(), vec![ToolStreamEvent::Content("<tool".into())]);
        assert_eq!(p.calls(), 0);
        // An unclosed call at the end is parsed as it is.
        let (content, calls) = run(
            ToolCallFormat::Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
            4,
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        // A block that is not a call is content.
        let (content, calls) = run(ToolCallFormat::Hermes, "<tool_call>oops</tool_call>", 3);
        assert_eq!(content, "<tool_call>oops</tool_call>");
        assert!(calls.is_empty());
    }

    #[test]
    fn llama_and_mistral_streams() {
        let (content, calls) = run(
            ToolCallFormat::Llama3Json,
            "  {\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}",
            5,
        );
        assert_eq!(content, "");
        assert_eq!(
            calls.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        let (content, calls) = run(ToolCallFormat::Llama3Json, "Hi {there}", 2);
        assert_eq!((content.as_str(), calls.len()), ("Hi {there}", 0));
        let (content, calls) = run(
            ToolCallFormat::Mistral,
            "Sure.[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {}}]",
            3,
        );
        assert_eq!((content.as_str(), calls.len()), ("Sure.", 1));
        let (content, calls) = run(
            ToolCallFormat::Mistral,
            "[{\"name\": \"f\", \"arguments\": {}}]",
            1,
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        let (content, calls) = run(ToolCallFormat::Mistral, "[1, 2] is a list", 1);
        assert_eq!((content.as_str(), calls.len()), ("[1, 2] is a list", 0));
    }
}
