//! Chat templates rendered by pocketlm must equal, byte for byte, what Python jinja2 renders in
//! transformers' `apply_chat_template` environment (golden files written by
//! `scripts/golden/chat_template.py`, cross-checked there against transformers itself).
//!
//! Real templates: SmolLM2-135M-Instruct (from the default GGUF), Llama 3.2, Qwen3, Gemma 2,
//! Phi-3.5, Mistral Nemo, gpt-oss (harmony); plus `features.json`, small templates pinning Python behaviours.
//! A case has either `expected` (the rendered text) or `error` (the `raise_exception` message).

use std::path::PathBuf;

use pocketlm::chat_template::{ChatTemplate, Message, RenderOptions, TemplateError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Suite {
    name: String,
    template: String,
    bos_token: String,
    eos_token: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    tools: Option<Vec<serde_json::Value>>,
    kwargs: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/chat_template")
}

fn load(file: &str) -> Vec<Suite> {
    let path = golden_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let suites = match value {
        serde_json::Value::Array(_) => value,
        single => serde_json::Value::Array(vec![single]),
    };
    serde_json::from_value(suites).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Messages with only `role` and `content` strings, as [`Message`]s (the plain `render` path).
fn plain_messages(messages: &[serde_json::Value]) -> Option<Vec<Message>> {
    messages
        .iter()
        .map(|m| {
            let obj = m.as_object()?;
            if obj.len() != 2 {
                return None;
            }
            Some(Message::new(
                obj.get("role")?.as_str()?,
                obj.get("content")?.as_str()?,
            ))
        })
        .collect()
}

/// Renders every case of `file`; returns how many cases were checked.
fn check_file(file: &str) -> usize {
    check_file_with(file, &|text| text)
}

/// As [`check_file`], with `fix` applied to each text pocketlm renders before the comparison.
fn check_file_with(file: &str, fix: &dyn Fn(String) -> String) -> usize {
    let mut checked = 0;
    for suite in load(file) {
        let template = ChatTemplate::new(&suite.template, &suite.bos_token, &suite.eos_token)
            .unwrap_or_else(|e| panic!("{file} {}: {e}", suite.name));
        for case in &suite.cases {
            let id = format!("{file} {}/{}", suite.name, case.name);
            let options = RenderOptions {
                add_generation_prompt: case.add_generation_prompt,
                tools: case.tools.clone(),
                documents: None,
                kwargs: case.kwargs.clone(),
            };
            let got = template.render_with(&case.messages, &options);
            // The plain API must agree with the general one wherever it applies.
            if case.tools.is_none() && case.kwargs.is_empty() {
                if let Some(plain) = plain_messages(&case.messages) {
                    let via_plain = template.render(&plain, case.add_generation_prompt);
                    assert_eq!(
                        format!("{via_plain:?}"),
                        format!("{got:?}"),
                        "{id}: render and render_with disagree"
                    );
                }
            }
            match (&case.expected, &case.error, got) {
                (Some(want), None, Ok(text)) => {
                    let text = fix(text);
                    assert!(
                        text == *want,
                        "{id}:\n--- python ---\n{want}\n--- rust ---\n{text}\n"
                    )
                }
                (None, Some(want), Err(TemplateError::Raised { message, .. })) => {
                    assert_eq!(message, *want, "{id}")
                }
                (_, _, got) => panic!(
                    "{id}: expected {:?} / error {:?}, got {got:?}",
                    case.expected, case.error
                ),
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn smollm2_from_gguf() {
    assert_eq!(check_file("smollm2-135m-instruct.json"), 5);
}

/// openai/gpt-oss's harmony template: its system message holds today's date
/// (`strftime_now("%Y-%m-%d")`), which the golden texts leave as `{TODAY}`; ours is put back
/// there (the date from our own `strftime_now`).
#[test]
fn gpt_oss() {
    let today = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "")
        .unwrap()
        .render(&[Message::user("x")], false)
        .unwrap();
    let line = format!("Current date: {today}\n");
    let fix = |t: String| t.replacen(&line, "Current date: {TODAY}\n", 1);
    assert_eq!(check_file_with("openai-gpt-oss-120b.json", &fix), 11);
}

#[test]
fn llama_3_2() {
    assert_eq!(check_file("llama-3.2-3b-instruct.json"), 9);
}

#[test]
fn qwen3() {
    assert_eq!(check_file("qwen3-0.6b.json"), 9);
}

#[test]
fn gemma_2() {
    assert_eq!(check_file("gemma-2-2b-it.json"), 6);
}

#[test]
fn phi_3_5() {
    assert_eq!(check_file("phi-3.5-mini-instruct.json"), 6);
}

#[test]
fn mistral_nemo() {
    assert_eq!(check_file("mistral-nemo-instruct-2407.json"), 9);
}

#[test]
fn python_behaviours() {
    assert_eq!(check_file("features.json"), 14);
}

/// The golden SmolLM2 template is the one in the default model file: if the GGUF is present,
/// its `tokenizer.chat_template` must be byte-identical to the golden copy (this keeps the
/// golden file honest without parsing GGUF here; the loader's own tests parse it).
#[test]
fn smollm2_golden_template_is_in_the_default_gguf() {
    let path = pocketlm_testutil::default_model_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let suite = load("smollm2-135m-instruct.json").remove(0);
    let needle = suite.template.as_bytes();
    // GGUF metadata (where the template lives) precedes the tensor data: its first 16 MiB.
    let head = &bytes[..bytes.len().min(16 << 20)];
    assert!(
        head.windows(needle.len()).any(|w| w == needle),
        "the golden SmolLM2 template is not in {}",
        path.display()
    );
}

/// A case of `tools.json`: the conversation in OpenAI's wire shape (`arguments` as JSON text),
/// and the text (or error) transformers renders from it with `tools`.
#[derive(Deserialize)]
struct ToolCase {
    name: String,
    openai_messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    tools: Option<Vec<serde_json::Value>>,
    kwargs: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ToolSuite {
    name: String,
    template: String,
    bos_token: String,
    eos_token: String,
    cases: Vec<ToolCase>,
}

/// Typed [`Message`]s with `tool_calls` and `tool` turns, built from OpenAI's wire shape, render
/// as transformers' `apply_chat_template(messages, tools=...)` renders them (Qwen2.5's real
/// template, Llama 3.1-style JSON calls, Mistral `[TOOL_CALLS]`; `tools.json` from
/// `scripts/golden/chat_template_tools.py`).
#[test]
fn tool_calling_typed_messages_match_transformers() {
    let path = golden_dir().join("tools.json");
    let text = std::fs::read_to_string(&path).expect("tools.json");
    let suites: Vec<ToolSuite> = serde_json::from_str(&text).expect("tools.json parses");
    let mut checked = 0;
    for suite in &suites {
        let template = ChatTemplate::new(&suite.template, &suite.bos_token, &suite.eos_token)
            .unwrap_or_else(|e| panic!("{}: {e}", suite.name));
        for case in &suite.cases {
            let id = format!("{}/{}", suite.name, case.name);
            let messages: Vec<Message> =
                serde_json::from_value(serde_json::Value::Array(case.openai_messages.clone()))
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
            assert!(messages.iter().any(|m| m.role == "user"), "{id}");
            let values: Vec<serde_json::Value> =
                messages.iter().map(|m| m.template_value()).collect();
            let options = RenderOptions {
                add_generation_prompt: case.add_generation_prompt,
                tools: case.tools.clone(),
                documents: None,
                kwargs: case.kwargs.clone(),
            };
            match (
                &case.expected,
                &case.error,
                template.render_with(&values, &options),
            ) {
                (Some(want), None, Ok(text)) => assert!(
                    text == *want,
                    "{id}:\n--- python ---\n{want}\n--- rust ---\n{text}\n"
                ),
                (None, Some(want), Err(TemplateError::Raised { message, .. })) => {
                    assert_eq!(message, *want, "{id}")
                }
                (_, _, got) => panic!("{id}: expected {:?}, got {got:?}", case.expected),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

/// The fallback for templates that know no tools (the default SmolLM2's): the tool prompt in
/// the system turn, calls as Hermes `<tool_call>` blocks, results as `<tool_response>` user turns.
#[test]
fn tool_calling_fallback_on_smollm2_template() {
    use pocketlm::tools::{ToolCall, ToolCallFormat};
    let suite = load("smollm2-135m-instruct.json").remove(0);
    let template = ChatTemplate::new(&suite.template, &suite.bos_token, &suite.eos_token).unwrap();
    assert!(!pocketlm::tools::template_knows_tools(template.source()));
    let tool = serde_json::json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}});
    let call = ToolCall::new(
        ToolCallFormat::Hermes,
        "get_time",
        r#"{"tz": "UTC"}"#.into(),
    );
    let messages = vec![
        Message::user("Time?"),
        Message::assistant_tool_calls("", vec![call.clone()]),
        Message::tool(call.id.clone(), None, "14:05"),
        Message::tool(call.id.clone(), None, "again"),
    ];
    let rewritten = pocketlm::loader::fallback_messages(&messages, std::slice::from_ref(&tool));
    let text = template.render(&rewritten, true).unwrap();
    let want = format!(
        "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\nTime?<|im_end|>\n\
         <|im_start|>assistant\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{\"tz\":\"UTC\"}}}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\n14:05\n</tool_response>\n<tool_response>\nagain\n</tool_response><|im_end|>\n\
         <|im_start|>assistant\n",
        pocketlm::tools::fallback_system_prompt(&[tool])
    );
    assert_eq!(text, want);
}
