//! The generation path shared by the three chat-shaped endpoints (`/v1/chat/completions`,
//! `/v1/responses`, `/v1/messages`): tools and `tool_choice` turned into the prompt and the
//! grammar, the response format into a constraint, the answer parsed for tool calls, whole
//! ([`ChoiceOut`]) or as a stream of [`ChatEvent`]s.

use futures_util::{Stream, StreamExt};
use pocketlm::chat_template::Message;
use pocketlm::constrain::Constraint;
use pocketlm::generate::GenerateParams;
use pocketlm::loader::Prompt;
use pocketlm::tools::grammar::{function_defs, tool_call_grammar, ToolChoice};
use pocketlm::tools::stream::{ToolCallStreamParser, ToolStreamEvent};
use pocketlm::tools::{parse_tool_calls, ToolCall, ToolCallFormat};
use tokio::sync::mpsc;

use crate::api::{CommonParams, Stop};
use crate::engine::Msg;
use crate::error::ApiError;
use crate::logprobs::StepLogprobs;
use crate::AppState;

/// A chat request as the three endpoints share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatSpec {
    /// The conversation (with `tool_calls` and `tool` turns).
    pub messages: Vec<Message>,
    /// OpenAI function tool definitions.
    pub tools: Vec<serde_json::Value>,
    /// `tool_choice` (default `auto`).
    pub tool_choice: ToolChoice,
    /// `parallel_tool_calls` (default true).
    pub parallel: bool,
    /// The constraint of the response format (`json_object` / `json_schema`), if any.
    pub response_constraint: Option<Constraint>,
    /// Sampling, stopping, streaming fields.
    pub common: CommonParams,
    /// `Some(k)`: per-token log-probabilities with `k` alternatives.
    pub logprobs: Option<usize>,
    /// The request field that holds the conversation (for errors): `messages` or `input`.
    pub messages_field: &'static str,
    /// The request field that holds the tools' `tool_choice` (for errors).
    pub tools_field: &'static str,
}

/// The sampling fields the Responses and Messages APIs have (a subset of chat completions':
/// no `n`, penalties, `logit_bias` or `seed`), as the chat path's [`CommonParams`].
#[derive(Debug, Clone, Default)]
pub(crate) struct BasicSampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    /// `max_output_tokens` / `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `stop_sequences` (Messages).
    pub stop: Option<Vec<String>>,
    pub stream: Option<bool>,
}

impl ChatSpec {
    /// A one-choice request of the Responses or Messages API: the conversation from
    /// `messages_field`, OpenAI function tools (converted from the API's own shape) under
    /// `tools`, no log-probabilities.
    pub(crate) fn single(
        messages: Vec<Message>,
        messages_field: &'static str,
        tools: Vec<serde_json::Value>,
        (tool_choice, parallel): (ToolChoice, bool),
        response_constraint: Option<Constraint>,
        sampling: BasicSampling,
    ) -> Self {
        ChatSpec {
            messages,
            tools,
            tool_choice,
            parallel,
            response_constraint,
            common: CommonParams {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                max_tokens: sampling.max_tokens,
                stop: sampling.stop.map(Stop::Many),
                stream: sampling.stream,
                ..CommonParams::default()
            },
            logprobs: None,
            messages_field,
            tools_field: "tools",
        }
    }
}

/// A started chat generation.
pub(crate) struct Started {
    /// Messages of the `n` choices, one after another.
    pub rx: mpsc::Receiver<Msg>,
    /// Prompt tokens (chat template applied).
    pub prompt_tokens: usize,
    /// Number of choices.
    pub n: usize,
    /// `Some(format)`: the answer is parsed for tool calls in that format.
    pub tool_format: Option<ToolCallFormat>,
}

/// Validates the request, renders the prompt, and starts the generation(s).
///
/// Errors: 400 naming the messages field when the model has no chat template; 400 naming the
/// field for bad tools (`tools`), a `tool_choice` naming an unknown
/// function or needing tools that are absent (`tool_choice`), `response_format` together with
/// a forced tool call, bad sampling values; 503 when the queue is full; as
/// [`crate::engine::Engine::encode`].
pub(crate) async fn start_chat(s: &AppState, spec: ChatSpec) -> Result<Started, ApiError> {
    let model = s.engine.model().clone();
    if model.chat_template.is_none() {
        // The model can still complete text (`/v1/completions`): the request is what is wrong.
        return Err(ApiError::bad_param(
            spec.messages_field,
            format!(
                "{}: the model has no chat template, so it cannot take messages; send a \
                 plain prompt to /v1/completions",
                model.path.display()
            ),
        ));
    }
    let info = model.model.info();
    let ctx = info.context_length;
    function_defs(&spec.tools).map_err(|e| ApiError::bad_param(spec.tools_field, e.to_string()))?;
    let use_tools = !spec.tools.is_empty() && spec.tool_choice != ToolChoice::None;
    let format = model.tool_call_format();
    // Without tools, `required` or a named function cannot be met: an error here.
    let tool_constraint = tool_call_grammar(format, &spec.tools, &spec.tool_choice, spec.parallel)
        .map_err(|e| ApiError::bad_param("tool_choice", e.to_string()))?;
    let constraint = match (tool_constraint, spec.response_constraint) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_param(
                "response_format",
                "`response_format` cannot be combined with a forced tool call \
                 (`tool_choice` `required` or a function): the call's format is the grammar",
            ))
        }
        (a, b) => a.or(b),
    };
    let n = spec.common.n()?;
    let mut params: GenerateParams = spec.common.to_generate_params(ctx, &s.sampling_defaults)?;
    if let Some(bias) = spec.common.logit_bias(info.vocab_size)? {
        params.sampling.logit_bias = bias;
    }
    params.logprobs = spec.logprobs;
    params.constraint = constraint;
    let has_tool_turns = spec
        .messages
        .iter()
        .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
    let prompt = if use_tools || has_tool_turns {
        Prompt::ChatWithTools {
            messages: spec.messages,
            tools: if use_tools { spec.tools } else { Vec::new() },
        }
    } else {
        Prompt::Chat(spec.messages)
    };
    let slot = s.engine.admit()?;
    let ids = s
        .engine
        .encode(prompt)
        .await
        .map_err(|e| match e.param.as_deref() {
            Some("messages") => e.with_param(spec.messages_field),
            _ => e,
        })?;
    let prompt_tokens = ids.ids.len();
    params.max_tokens = spec.common.fit_max_tokens(prompt_tokens, ctx)?;
    let all: Vec<GenerateParams> = (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.sampling.seed = p.sampling.seed.map(|seed| seed.wrapping_add(i as u64));
            p
        })
        .collect();
    let rx = s.engine.start(slot, ids, all);
    Ok(Started {
        rx,
        prompt_tokens,
        n,
        tool_format: use_tools.then_some(format),
    })
}

/// One whole choice of an answer.
#[derive(Debug, Clone)]
pub(crate) struct ChoiceOut {
    /// Text outside tool calls.
    pub content: String,
    /// The calls.
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// Tokens generated for this choice.
    pub completion_tokens: usize,
    /// Prompt tokens taken from the prefix cache (`None`: no prefix cache).
    pub cached_tokens: Option<usize>,
    /// Log-probabilities, one per token, when asked for.
    pub steps: Vec<StepLogprobs>,
}

/// Gathers the `n` whole choices of `started`, parsed for tool calls.
pub(crate) async fn collect_choices(started: Started) -> Result<Vec<ChoiceOut>, ApiError> {
    let Started {
        mut rx,
        n,
        tool_format,
        ..
    } = started;
    let mut out = Vec::with_capacity(n);
    let mut text = String::new();
    let mut steps = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Delta { text: t, logprobs } => {
                text.push_str(&t);
                steps.extend(logprobs.map(|b| *b));
            }
            Msg::Done {
                finish_reason,
                completion_tokens,
                cached_tokens,
            } => {
                let (content, tool_calls) = match tool_format {
                    Some(f) => {
                        let p = parse_tool_calls(f, &text);
                        (p.content, p.tool_calls)
                    }
                    None => (std::mem::take(&mut text), Vec::new()),
                };
                text.clear();
                out.push(ChoiceOut {
                    finish_reason: if tool_calls.is_empty() {
                        finish_reason
                    } else {
                        "tool_calls"
                    },
                    content,
                    tool_calls,
                    completion_tokens,
                    cached_tokens,
                    steps: std::mem::take(&mut steps),
                });
                if out.len() == n {
                    return Ok(out);
                }
            }
            Msg::Error(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the generation ended without an answer"))
}

/// What a streamed chat answer (one choice) says, in order.
#[derive(Debug)]
pub(crate) enum ChatEvent {
    /// Content text.
    Content(String),
    /// A tool call begins (calls come one after another: pieces belong to the last one).
    CallStart {
        /// Its id.
        id: String,
        /// The function's name.
        name: String,
    },
    /// A piece of the current call's arguments.
    CallArguments {
        /// JSON text to append.
        fragment: String,
    },
    /// The answer ended (`stop`, `length` or `tool_calls`).
    Done {
        /// Why.
        finish_reason: &'static str,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The generation failed.
    Error(ApiError),
}

fn from_tool_events(events: Vec<ToolStreamEvent>, out: &mut Vec<ChatEvent>) {
    for e in events {
        out.push(match e {
            ToolStreamEvent::Content(t) => ChatEvent::Content(t),
            ToolStreamEvent::CallStart { id, name, .. } => ChatEvent::CallStart { id, name },
            ToolStreamEvent::CallArguments { fragment, .. } => {
                ChatEvent::CallArguments { fragment }
            }
        });
    }
}

/// The events of a started one-choice generation, tool calls parsed as they complete. Ends
/// after [`ChatEvent::Done`] or [`ChatEvent::Error`].
pub(crate) fn chat_events(started: Started) -> impl Stream<Item = ChatEvent> + Send {
    struct St {
        rx: mpsc::Receiver<Msg>,
        parser: Option<ToolCallStreamParser>,
        finished: bool,
    }
    let st = St {
        rx: started.rx,
        parser: started.tool_format.map(ToolCallStreamParser::new),
        finished: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let mut out = Vec::new();
        match st.rx.recv().await {
            Some(Msg::Delta { text, .. }) => match &mut st.parser {
                Some(p) => from_tool_events(p.push(&text), &mut out),
                None if !text.is_empty() => out.push(ChatEvent::Content(text)),
                None => {}
            },
            Some(Msg::Done {
                finish_reason,
                completion_tokens,
                ..
            }) => {
                st.finished = true;
                let mut calls = 0;
                if let Some(p) = &mut st.parser {
                    from_tool_events(p.finish(), &mut out);
                    calls = p.calls();
                }
                out.push(ChatEvent::Done {
                    finish_reason: if calls > 0 {
                        "tool_calls"
                    } else {
                        finish_reason
                    },
                    completion_tokens,
                });
            }
            Some(Msg::Error(e)) => {
                st.finished = true;
                out.push(ChatEvent::Error(e));
            }
            None => {
                st.finished = true;
                out.push(ChatEvent::Error(ApiError::internal(
                    "the generation ended without an answer",
                )));
            }
        }
        Some((futures_util::stream::iter(out), st))
    })
    .flatten()
}
