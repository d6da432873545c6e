//! Request and response bodies of the OpenAI API subset served here (field names and shapes
//! from OpenAI's API reference: "Create chat completion", "Create completion", "List models";
//! streaming chunks in the `chat.completion.chunk` shape). Every request field is honoured or
//! refused: [`check_fields`] refuses fields this server does not know with a 400 naming them,
//! except those OpenAI documents as bookkeeping that does not change the answer
//! ([`IGNORED_FIELDS`]).

use pocketlm::chat_template::Message;
use pocketlm::constrain::Constraint;
use pocketlm::generate::GenerateParams;
use pocketlm::sampling::{SamplingOverrides, SamplingParams};
use pocketlm::tools::grammar::ToolChoice;
use pocketlm::tools::ToolCall;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::logprobs::{ChatLogprobs, CompletionLogprobs};

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Most alternatives per token in `top_logprobs` (chat, OpenAI's limit) and `logprobs`
/// (legacy completions: OpenAI allows 5, vLLM 20; 20 here).
pub const MAX_TOP_LOGPROBS: u64 = 20;

fn check_top(param: &str, n: u64) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_param(
            param,
            format!("`{param}` is {n}; expected an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ));
    }
    Ok(n as usize)
}

/// Request fields accepted and ignored because OpenAI documents them as bookkeeping that does
/// not change the answer: `user` and `safety_identifier` (end-user ids for abuse monitoring),
/// `metadata` and `store` (storing the completion for OpenAI's dashboard), `service_tier`
/// (OpenAI's processing tier), `prompt_cache_key` (a routing hint for OpenAI's prompt cache).
pub const IGNORED_FIELDS: [&str; 6] = [
    "user",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
];

/// Fields of [`CommonParams`] (both endpoints).
pub const COMMON_FIELDS: [&str; 20] = [
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "ignore_eos",
    "user",
    "metadata",
    "store",
];

/// Fields of `POST /v1/chat/completions` beyond [`COMMON_FIELDS`].
pub const CHAT_FIELDS: [&str; 8] = [
    "messages",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "modalities",
];

/// Fields of `POST /v1/completions` beyond [`COMMON_FIELDS`].
pub const COMPLETION_FIELDS: [&str; 5] = ["prompt", "logprobs", "echo", "best_of", "suffix"];

/// Why a field of OpenAI's chat request that this server does not implement is refused.
fn refusal_reason(field: &str) -> &'static str {
    match field {
        "audio" => "audio output is not supported (text models only)",
        "prediction" => "predicted outputs are not supported",
        "reasoning_effort" | "reasoning" => "reasoning effort is not supported",
        "verbosity" => "verbosity is not supported",
        "web_search_options" => "web search is not supported (the server fetches nothing)",
        "functions" | "function_call" => {
            "the deprecated functions API is not supported; use `tools` and `tool_choice`"
        }
        _ => "this field is not supported by this server",
    }
}

/// Refuses every top-level field of `body` that is not in `known` nor in [`IGNORED_FIELDS`]:
/// 400 naming the first such field (`param` set to it). `body` that is not a JSON object is a
/// 400 too.
pub fn check_fields(body: &serde_json::Value, known: &[&[&str]]) -> Result<(), ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    for key in obj.keys() {
        let k = key.as_str();
        if IGNORED_FIELDS.contains(&k) || known.iter().any(|list| list.contains(&k)) {
            continue;
        }
        return Err(ApiError::bad_param(
            k,
            format!("unsupported field `{k}`: {}", refusal_reason(k)),
        ));
    }
    Ok(())
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Up to [`MAX_STOP_STRINGS`] stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and empty `choices`) before `data: [DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling and stopping fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Model id; any value is accepted (the server holds one model) and the answer names the
    /// loaded model.
    #[serde(default)]
    pub model: Option<String>,
    /// Softmax temperature in `[0, 2]`; `0` is plain greedy decoding (argmax, without the
    /// default repetition penalty). Default: the model's (see
    /// [`pocketlm::loader::LoadedModel::default_sampling`]: its `generation_config.json`, else
    /// `0.8`).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in `[0, 1]` (`1` is off). Default: the model's (else `0.95`).
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Extension (as vLLM's): keep only the `top_k` most likely tokens (`0` is off; vLLM's
    /// `-1` is taken as off too). Default: the model's (else `40`).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Extension (as vLLM's): drop tokens less likely than `min_p` times the most likely, in
    /// `[0, 1]`. Default: the model's (else `0.05`).
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Extension (as vLLM's): penalty `> 0` for tokens among the last 64 (`1` is off).
    /// Default: the model's (else `1.1`).
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's presence penalty in `[-2, 2]`: subtracted from the logit of each token already
    /// generated (default 0, off).
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty in `[-2, 2]`: subtracted once per earlier occurrence among
    /// the generated tokens (default 0, off).
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// OpenAI's `logit_bias`: token id (as a string key) to a bias in `[-100, 100]` added to
    /// that token's logit.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Most new tokens, `>= 1`. Default: up to the end of the context.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Newer name of `max_tokens` (chat); wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Stop strings; the answer ends before the first one, which is not included.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed of the sampler: same seed and request, same answer.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Number of choices, `1..=`[`MAX_N`]: the answer is generated `n` times (with `seed`, the
    /// `i`-th choice uses `seed + i`).
    #[serde(default)]
    pub n: Option<u64>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Extension (as vLLM's): keep generating past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// Most choices per request (`n`).
pub const MAX_N: u64 = 16;

impl CommonParams {
    /// The number of choices, `n` (default 1). Errors: 400 naming `n` outside `1..=16`.
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_N).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::bad_param(
                "n",
                format!("`n` is {n}; expected an integer in [1, {MAX_N}]"),
            )),
        }
    }

    /// The `logit_bias` pairs, checked against the vocabulary size.
    ///
    /// Errors: 400 naming `logit_bias` for a key that is not a token id below `vocab_size` or a
    /// bias outside `[-100, 100]`.
    pub fn logit_bias(&self, vocab_size: usize) -> Result<Option<Vec<(u32, f32)>>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(map.len());
        for (k, &v) in map {
            let id = k
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "logit_bias",
                        format!(
                            "`logit_bias` key `{k}` is not a token id of this model (0..{vocab_size})"
                        ),
                    )
                })?;
            if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
                return Err(ApiError::bad_param(
                    "logit_bias",
                    format!("`logit_bias[{k}]` is {v}; expected a number in [-100, 100]"),
                ));
            }
            out.push((id, v as f32));
        }
        Ok(Some(out))
    }

    /// Checks the values and builds the library's generation parameters.
    ///
    /// `context_length`: the model's context (the default for `max_tokens`). `defaults`: the
    /// model's sampling defaults ([`pocketlm::loader::LoadedModel::default_sampling`]: its
    /// `generation_config.json`, else the library's recommended sampling), used for every
    /// field the request leaves out; a field the request gives wins
    /// ([`SamplingOverrides::resolve`]).
    /// Errors: 400 naming the field (`n` outside `1..=16`, `temperature` outside `[0, 2]`,
    /// `top_p` or `min_p` outside `[0, 1]`, `repetition_penalty <= 0`, `presence_penalty` or
    /// `frequency_penalty` outside `[-2, 2]`, `max_tokens` 0, more than 4 stop strings).
    /// `logit_bias` is not read here: see [`CommonParams::logit_bias`].
    pub fn to_generate_params(
        &self,
        context_length: usize,
        defaults: &SamplingParams,
    ) -> Result<GenerateParams, ApiError> {
        self.n()?;
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && (-2.0..=2.0).contains(&x)) {
                    return Err(ApiError::bad_param(
                        name,
                        format!("`{name}` is {x}; expected a number in [-2, 2]"),
                    ));
                }
            }
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
                return Err(ApiError::bad_param(
                    "temperature",
                    format!("`temperature` is {t}; expected a number in [0, 2]"),
                ));
            }
        }
        let unit = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && (0.0..=1.0).contains(&x)) => Err(ApiError::bad_param(
                name,
                format!("`{name}` is {x}; expected a number in [0, 1]"),
            )),
            _ => Ok(v.map(|x| x as f32)),
        };
        let top_p = unit("top_p", self.top_p)?;
        let min_p = unit("min_p", self.min_p)?;
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0 && r <= f64::from(f32::MAX)) {
                return Err(ApiError::bad_param(
                    "repetition_penalty",
                    format!("`repetition_penalty` is {r}; expected a number > 0"),
                ));
            }
        }
        let sampling = SamplingOverrides {
            temperature: self.temperature.map(|t| t as f32),
            top_p,
            top_k: self
                .top_k
                .map(|k| usize::try_from(k.max(0)).unwrap_or(usize::MAX)),
            min_p,
            repetition_penalty: self.repetition_penalty.map(|r| r as f32),
            repetition_context_size: None,
            // A seed is any integer; negative ones are reinterpreted bit for bit.
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.map(|x| x as f32),
            frequency_penalty: self.frequency_penalty.map(|x| x as f32),
            logit_bias: None,
        }
        .resolve(defaults);
        let (name, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max {
            Some(0) => {
                return Err(ApiError::bad_param(
                    name,
                    format!("`{name}` is 0; expected an integer >= 1"),
                ))
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX).min(context_length),
            None => context_length,
        };
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "`stop` has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                    stop.len()
                ),
            ));
        }
        Ok(GenerateParams {
            max_tokens,
            sampling,
            // An empty stop string would end every answer before it starts: ignore it.
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            ..GenerateParams::default()
        })
    }

    /// The number of new tokens to generate for a prompt of `prompt_tokens` tokens in a
    /// context of `context_length`: the request's `max_completion_tokens` / `max_tokens`,
    /// which must fit in the room the prompt leaves (`context_length - prompt_tokens`), else
    /// that room.
    ///
    /// Errors: 400 `context_length_exceeded` naming the field and the three numbers when the
    /// request asks for more than the room (as OpenAI and vLLM refuse it; nothing is clamped
    /// silently).
    pub fn fit_max_tokens(
        &self,
        prompt_tokens: usize,
        context_length: usize,
    ) -> Result<usize, ApiError> {
        let room = context_length.saturating_sub(prompt_tokens);
        let (name, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", m),
            (None, Some(m)) => ("max_tokens", m),
            (None, None) => return Ok(room),
        };
        match usize::try_from(asked) {
            Ok(m) if m <= room => Ok(m),
            _ => Err(ApiError::bad_param(
                name,
                format!(
                    "`{name}` is {asked} but the model's context holds {context_length} tokens \
                     and the prompt uses {prompt_tokens}, leaving room for {room} new tokens"
                ),
            )
            .with_code("context_length_exceeded")),
        }
    }

    /// Whether the answer is streamed.
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// One part of a list-valued message `content`: `{"type": "text", "text": "..."}` or
/// `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Part type: `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
    /// The image of an `image_url` part.
    #[serde(default)]
    pub image_url: Option<ImageUrl>,
}

/// `image_url` of a content part: `{"url": ...}` (OpenAI's shape) or the URL alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    /// `{"url": "data:...", "detail": ...}`.
    Object {
        /// The URL; only `data:` URLs with base64 content are accepted (the server fetches
        /// nothing).
        url: String,
    },
    /// The URL as a string.
    Url(String),
}

impl ImageUrl {
    fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url,
        }
    }
}

/// Decodes a `data:[<mime>];base64,<data>` URL into an image.
///
/// Errors: 400 naming `param` for another kind of URL, bad base64 or an undecodable image.
pub fn decode_data_url(
    url: &str,
    param: &str,
) -> Result<pocketlm::image_processor::RgbImage, ApiError> {
    use base64::Engine;
    let bad = |msg: String| ApiError::bad_param(param, msg);
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(40).collect();
        return Err(bad(format!(
            "`{param}`: only `data:` URLs (base64) are accepted, got `{shown}`"
        )));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(bad(format!(
            "`{param}`: a data URL needs a `,` before its data"
        )));
    };
    if !meta.ends_with(";base64") {
        return Err(bad(format!(
            "`{param}`: the data URL is not base64 (`;base64,`)"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(format!("`{param}`: bad base64: {e}")))?;
    pocketlm::image_processor::decode_image(&bytes, param).map_err(|e| bad(e.to_string()))
}

/// A message `content`: a string or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text parts, concatenated.
    Parts(Vec<ContentPart>),
}

/// One chat message of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant`, `tool`.
    pub role: String,
    /// Text (null is an empty message).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls (OpenAI's shape, `arguments` as JSON text).
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The speaker's or function's name.
    #[serde(default)]
    pub name: Option<String>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// `{"name", "schema", "strict", "description"}`.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (required by OpenAI; not used).
    #[serde(default)]
    pub name: Option<String>,
    /// The JSON Schema.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode; the schema is always enforced here (a grammar), so both values
    /// behave the same.
    #[serde(default)]
    pub strict: Option<bool>,
    /// A description (not used).
    #[serde(default)]
    pub description: Option<String>,
}

impl ResponseFormat {
    /// The constraint that enforces it: none for `text`, [`Constraint::JsonObject`],
    /// [`Constraint::JsonSchema`]. Errors: 400 naming `response_format` for a `json_schema`
    /// without an object `schema`.
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        match self {
            ResponseFormat::Text => Ok(None),
            ResponseFormat::JsonObject => Ok(Some(Constraint::JsonObject)),
            ResponseFormat::JsonSchema { json_schema } => match &json_schema.schema {
                Some(schema @ serde_json::Value::Object(_)) => {
                    Ok(Some(Constraint::JsonSchema(schema.clone())))
                }
                _ => Err(ApiError::bad_param(
                    "response_format",
                    "`response_format.json_schema.schema` must be a JSON Schema object",
                )),
            },
        }
    }
}

/// Reads OpenAI's `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function",
/// "function": {"name": ...}}`. Errors: 400 naming `tool_choice` for anything else.
pub fn parse_tool_choice(v: &serde_json::Value) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::bad_param(
            "tool_choice",
            format!(
                "`tool_choice` is {v}; expected \"none\", \"auto\", \"required\" or \
                 {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            ),
        )
    };
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" | "any" => Ok(ToolChoice::Required),
            _ => Err(bad()),
        },
        serde_json::Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(|n| n.as_str())
                .ok_or_else(bad)?;
            Ok(ToolChoice::Function(name.to_owned()))
        }
        _ => Err(bad()),
    }
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation; at least one message.
    pub messages: Vec<ChatMessage>,
    /// Sampling, stopping and streaming fields.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Return the log-probability of each generated token (`choices[].logprobs.content`).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs: true`: how many most likely alternatives to list per token, `0..=20`.
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    /// Function tools the model may call (OpenAI's `{"type": "function", "function": {...}}`).
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto` (default with tools), `required`, or a named function.
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// Whether several calls may come in one answer (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `text`, `json_object` or `json_schema`.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Output modalities; only `["text"]` is supported.
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
}

impl ChatCompletionRequest {
    /// The `k` of [`GenerateParams::logprobs`]: `None` without `logprobs: true`, else
    /// `top_logprobs` (default 0).
    ///
    /// Errors: 400 naming `top_logprobs` when it is above 20, or above 0 without
    /// `logprobs: true` (as OpenAI's API answers).
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = check_top("top_logprobs", self.top_logprobs.unwrap_or(0))?;
        match self.logprobs {
            Some(true) => Ok(Some(top)),
            _ if top > 0 => Err(ApiError::bad_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            )),
            _ => Ok(None),
        }
    }

    /// The messages as the chat template takes them (`developer` is passed as `system`, as
    /// OpenAI documents it as the newer name; text parts are concatenated).
    ///
    /// Errors: 400 for an empty list or a non-text part.
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_param(
                "messages",
                "`messages` is empty; give at least one message",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let mut images = Vec::new();
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text, &p.image_url) {
                            ("text", Some(s), _) => t.push_str(s),
                            ("image_url", _, Some(u)) => images.push(decode_data_url(
                                u.url(),
                                &format!("messages[{i}].content[{j}].image_url"),
                            )?),
                            _ => {
                                return Err(ApiError::bad_param(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "`messages[{i}].content[{j}]` is a `{}` part; only `text` parts with a `text` field and `image_url` parts with an `image_url` are supported",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    t
                }
            };
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].role"),
                        format!(
                            "`messages[{i}].role` is `{other}`; expected one of system, developer, user, assistant, tool"
                        ),
                    ))
                }
            };
            let mut msg = Message::new(role, text).with_images(images);
            msg.tool_calls = m.tool_calls.clone().unwrap_or_default();
            msg.tool_call_id = m.tool_call_id.clone();
            msg.name = m.name.clone().filter(|_| role == "tool");
            out.push(msg);
        }
        Ok(out)
    }
}

/// `prompt` of a completion: a string or a list holding exactly one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    /// One prompt.
    Text(String),
    /// A batch of prompts; only batches of one are supported.
    Batch(Vec<String>),
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt text.
    pub prompt: CompletionPrompt,
    /// Sampling, stopping and streaming fields.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Legacy log-probabilities: `N` (`0..=20`) returns each generated token's
    /// log-probability and the `N` most likely alternatives; null returns none.
    #[serde(default)]
    pub logprobs: Option<u64>,
    /// Echo the prompt before the answer; only `false` is supported.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Candidates to rank server-side; only `1` (or `n`) is supported.
    #[serde(default)]
    pub best_of: Option<u64>,
    /// Text after the insertion point; not supported (null or empty only).
    #[serde(default)]
    pub suffix: Option<String>,
}

impl CompletionRequest {
    /// Refuses the legacy fields this server accepts only with their no-op values.
    ///
    /// Errors: 400 naming `echo` (true), `best_of` (other than 1 or `n`) or `suffix` (not
    /// empty).
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::bad_param("echo", "`echo: true` is not supported"));
        }
        if let Some(b) = self.best_of {
            if b != 1 && Some(b) != self.common.n {
                return Err(ApiError::bad_param(
                    "best_of",
                    format!("`best_of` is {b}; only 1 (or equal to `n`) is supported"),
                ));
            }
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_param(
                "suffix",
                "`suffix` (insertion) is not supported",
            ));
        }
        Ok(())
    }

    /// The `k` of [`GenerateParams::logprobs`]. Errors: 400 naming `logprobs` above 20.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        self.logprobs.map(|n| check_top("logprobs", n)).transpose()
    }

    /// The prompt text. Errors: 400 for a batch of other than one prompt.
    pub fn prompt(&self) -> Result<String, ApiError> {
        match &self.prompt {
            CompletionPrompt::Text(t) => Ok(t.clone()),
            CompletionPrompt::Batch(v) if v.len() == 1 => Ok(v[0].clone()),
            CompletionPrompt::Batch(v) => Err(ApiError::bad_param(
                "prompt",
                format!(
                    "`prompt` is a list of {} prompts; only one prompt per request is supported",
                    v.len()
                ),
            )),
        }
    }
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt as the model saw it (chat template applied).
    pub prompt_tokens: usize,
    /// Tokens generated (end-of-generation token excluded).
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
    /// Details of the prompt tokens (OpenAI's `usage.prompt_tokens_details`): how many came
    /// from the prefix cache. Absent when the server keeps no prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache instead of being
    /// prefilled (of the first choice when there are several).
    pub cached_tokens: usize,
}

impl Usage {
    /// Counts with their sum.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With `prompt_tokens_details.cached_tokens` set, when `cached` is known (`Some`).
    pub fn with_cached(mut self, cached: Option<usize>) -> Self {
        self.prompt_tokens_details =
            cached.map(|cached_tokens| PromptTokensDetails { cached_tokens });
        self
    }
}

/// An assistant message of an answer.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text (null when the answer is only tool calls).
    pub content: Option<String>,
    /// The tool calls of the answer (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// Per-token log-probabilities when `logprobs: true`, else null.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` (end-of-generation token or stop string), `length`, or `tool_calls`.
    pub finish_reason: &'static str,
}

/// Answer of a non-streamed chat completion (`object: chat.completion`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time, seconds.
    pub created: u64,
    /// The loaded model's id.
    pub model: String,
    /// `n` choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// One choice of a text completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// The generated text (a fragment in a streamed chunk).
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Legacy log-probabilities when `logprobs` was given (in a stream: of this chunk's
    /// tokens), else null.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length`, or null in a streamed chunk before the last.
    pub finish_reason: Option<&'static str>,
}

/// Answer (or streamed chunk) of a text completion (`object: text_completion`).
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time, seconds.
    pub created: u64,
    /// The loaded model's id.
    pub model: String,
    /// One choice (none in a final usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (in a stream only in the final usage chunk; null elsewhere).
    pub usage: Option<Usage>,
}

/// `delta` of a streamed chat chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool-call pieces (OpenAI's streamed shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One streamed tool-call piece: the first of a call carries `id`, `type` and the function's
/// `name` (with empty `arguments`), later ones `arguments` text to append.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    /// The call's position in the answer.
    pub index: usize,
    /// The call's id (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first piece only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name and/or arguments.
    pub function: FunctionDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Serialize)]
pub struct FunctionDelta {
    /// The function's name (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Arguments text to append.
    pub arguments: String,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Log-probabilities of this chunk's tokens when `logprobs: true`, else null.
    pub logprobs: Option<ChatLogprobs>,
    /// Null until the last content chunk.
    pub finish_reason: Option<&'static str>,
}

/// A streamed chat chunk (`object: chat.completion.chunk`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id for every chunk of an answer.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time, seconds.
    pub created: u64,
    /// The loaded model's id.
    pub model: String,
    /// One choice, or none in the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Null except in the final usage chunk (`stream_options.include_usage`).
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// Model id (the chat model's: the file name without `.gguf` or `--model-id`; the
    /// embedding model's: the name or path given to `--embedding-model`).
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix time the server started, seconds.
    pub created: u64,
    /// `pocketlm`.
    pub owned_by: &'static str,
}

/// `GET /v1/models` answer.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The loaded models: the chat model, then the embedding model if any.
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str) -> Result<GenerateParams, ApiError> {
        let req: ChatCompletionRequest = serde_json::from_str(body).expect("parses");
        req.common
            .to_generate_params(100, &SamplingParams::recommended())
    }

    #[test]
    fn absent_fields_take_the_library_defaults() {
        let p = params(r#"{"messages": []}"#).expect("valid");
        assert_eq!(p.max_tokens, 100);
        assert_eq!(p.sampling, SamplingParams::recommended());
        assert_eq!(p.sampling.seed, None, "no fixed seed");
        assert!(p.stop.is_empty());
        assert!(!p.ignore_eos);
    }

    #[test]
    fn model_defaults_fill_what_the_request_leaves_out() {
        let defaults = SamplingParams {
            temperature: 0.6,
            top_p: 0.9,
            top_k: 20,
            repetition_penalty: 1.1,
            ..SamplingParams::default()
        };
        let req: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages": [], "top_p": 0.5}"#).expect("parses");
        let p = req
            .common
            .to_generate_params(100, &defaults)
            .expect("valid");
        assert_eq!(p.sampling.temperature, 0.6, "from generation_config");
        assert_eq!(p.sampling.top_p, 0.5, "the request wins");
        assert_eq!(p.sampling.top_k, 20);
        assert_eq!(p.sampling.repetition_penalty, 1.1);
    }

    #[test]
    fn fields_map_to_generation_parameters() {
        let p = params(
            r#"{"messages": [], "max_tokens": 7, "max_completion_tokens": 5, "temperature": 0,
                "top_p": 0.5, "seed": -1, "stop": ["", "END"], "n": 1, "ignore_eos": true}"#,
        )
        .expect("valid");
        assert_eq!(p.max_tokens, 5, "max_completion_tokens wins");
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_p, 0.5);
        assert_eq!(p.sampling.seed, Some(u64::MAX));
        assert_eq!(
            p.sampling.repetition_penalty, 1.0,
            "temperature 0 is plain greedy"
        );
        assert_eq!(
            p.stop,
            vec!["END".to_string()],
            "empty stop strings are dropped"
        );
        assert!(p.ignore_eos);
        let p = params(
            r#"{"messages": [], "top_k": -1, "min_p": 0, "repetition_penalty": 1.3, "temperature": 0.5}"#,
        )
        .expect("valid");
        assert_eq!(
            (
                p.sampling.top_k,
                p.sampling.min_p,
                p.sampling.repetition_penalty
            ),
            (0, 0.0, 1.3)
        );
        assert_eq!(p.sampling.temperature, 0.5);
        let p = params(r#"{"messages": [], "max_tokens": 100000, "stop": "x"}"#).expect("valid");
        assert_eq!(p.max_tokens, 100, "capped at the context");
        assert_eq!(p.stop, vec!["x".to_string()]);
    }

    #[test]
    fn max_tokens_must_fit_beside_the_prompt() {
        let common = |body: &str| {
            serde_json::from_str::<ChatCompletionRequest>(body)
                .expect("parses")
                .common
        };
        let c = common(r#"{"messages": []}"#);
        assert_eq!(c.fit_max_tokens(30, 100).expect("fits"), 70, "the room");
        let c = common(r#"{"messages": [], "max_tokens": 70}"#);
        assert_eq!(c.fit_max_tokens(30, 100).expect("fits"), 70);
        let e = c.fit_max_tokens(31, 100).expect_err("too many");
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        for n in ["70", "100", "31", "69"] {
            assert!(e.message.contains(n), "{n} in {}", e.message);
        }
        let c = common(r#"{"messages": [], "max_tokens": 5, "max_completion_tokens": 1000}"#);
        let e = c.fit_max_tokens(30, 100).expect_err("too many");
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        let c = common(r#"{"messages": [], "max_tokens": 18446744073709551615}"#);
        assert!(c.fit_max_tokens(30, 100).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (body, param) in [
            (r#"{"messages": [], "n": 17}"#, "n"),
            (
                r#"{"messages": [], "presence_penalty": 2.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"messages": [], "frequency_penalty": -3}"#,
                "frequency_penalty",
            ),
            (r#"{"messages": [], "temperature": 2.5}"#, "temperature"),
            (r#"{"messages": [], "temperature": 1e300}"#, "temperature"),
            (r#"{"messages": [], "top_p": 1.5}"#, "top_p"),
            (r#"{"messages": [], "min_p": -0.1}"#, "min_p"),
            (
                r#"{"messages": [], "repetition_penalty": 0}"#,
                "repetition_penalty",
            ),
            (
                r#"{"messages": [], "max_completion_tokens": 0}"#,
                "max_completion_tokens",
            ),
            (
                r#"{"messages": [], "stop": ["a", "b", "c", "d", "e"]}"#,
                "stop",
            ),
        ] {
            let e = params(body).expect_err(body);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn messages_accept_text_parts_and_developer_role() {
        let req: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}]}"#,
        )
        .expect("parses");
        let m = req.messages().expect("valid");
        assert_eq!(
            m,
            vec![
                Message::system("Be brief."),
                Message::user("ab"),
                Message::assistant("")
            ]
        );
    }

    #[test]
    fn unknown_roles_are_refused_naming_the_field() {
        let req: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}"#,
        )
        .expect("parses");
        let e = req.messages().expect_err("wizard is no role");
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        assert!(e.message.contains("wizard"), "{}", e.message);
    }

    #[test]
    fn image_url_parts_decode_data_urls() {
        // A 1x1 red PNG.
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";
        let body = format!(
            r#"{{"messages": [{{"role": "user", "content": [
                {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,{png}"}}}},
                {{"type": "text", "text": "What is this?"}}]}}]}}"#
        );
        let req: ChatCompletionRequest = serde_json::from_str(&body).expect("parses");
        let m = req.messages().expect("valid");
        assert_eq!(m[0].content, "What is this?");
        assert_eq!(m[0].images.len(), 1);
        assert_eq!((m[0].images[0].width, m[0].images[0].height), (1, 1));
        assert_eq!(m[0].images[0].data, vec![255, 0, 0]);
        for (url, what) in [
            ("https://example.com/cat.png", "data:"),
            ("data:image/png,abc", "base64"),
            ("data:image/png;base64,@@@", "base64"),
            ("data:image/png;base64,aGVsbG8=", "decode"),
        ] {
            let body = format!(
                r#"{{"messages": [{{"role": "user", "content": [
                    {{"type": "image_url", "image_url": "{url}"}}]}}]}}"#
            );
            let req: ChatCompletionRequest = serde_json::from_str(&body).expect("parses");
            let e = req.messages().expect_err(url);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[0].image_url"),
                "{url}"
            );
            assert!(e.message.contains(what), "{url}: {}", e.message);
        }
    }

    #[test]
    fn completion_prompt_is_one_string() {
        let one: CompletionRequest = serde_json::from_str(r#"{"prompt": ["hi"]}"#).expect("parses");
        assert_eq!(one.prompt().expect("valid"), "hi");
        let two: CompletionRequest =
            serde_json::from_str(r#"{"prompt": ["a", "b"]}"#).expect("parses");
        assert_eq!(
            two.prompt().expect_err("batch").param.as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn logprob_fields_are_checked() {
        let chat = |body: &str| {
            serde_json::from_str::<ChatCompletionRequest>(body)
                .expect("parses")
                .logprobs()
        };
        assert_eq!(chat(r#"{"messages": []}"#).expect("valid"), None);
        assert_eq!(
            chat(r#"{"messages": [], "logprobs": false, "top_logprobs": 0}"#).expect("valid"),
            None
        );
        assert_eq!(
            chat(r#"{"messages": [], "logprobs": true}"#).expect("valid"),
            Some(0)
        );
        assert_eq!(
            chat(r#"{"messages": [], "logprobs": true, "top_logprobs": 20}"#).expect("valid"),
            Some(20)
        );
        for body in [
            r#"{"messages": [], "logprobs": true, "top_logprobs": 21}"#,
            r#"{"messages": [], "top_logprobs": 3}"#,
        ] {
            let e = chat(body).expect_err(body);
            assert_eq!(e.param.as_deref(), Some("top_logprobs"), "{body}");
        }
        let comp = |body: &str| {
            serde_json::from_str::<CompletionRequest>(body)
                .expect("parses")
                .logprobs()
        };
        assert_eq!(comp(r#"{"prompt": "a"}"#).expect("valid"), None);
        assert_eq!(
            comp(r#"{"prompt": "a", "logprobs": 0}"#).expect("valid"),
            Some(0)
        );
        assert_eq!(
            comp(r#"{"prompt": "a", "logprobs": 5}"#).expect("valid"),
            Some(5)
        );
        let e = comp(r#"{"prompt": "a", "logprobs": 21}"#).expect_err("too many");
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn unknown_fields_are_refused_by_name_and_bookkeeping_is_ignored() {
        let known: &[&[&str]] = &[&COMMON_FIELDS, &CHAT_FIELDS];
        let ok = serde_json::json!({"messages": [], "user": "u", "metadata": {}, "store": false,
            "service_tier": "auto", "safety_identifier": "x", "prompt_cache_key": "k"});
        check_fields(&ok, known).expect("ignorable fields pass");
        for field in [
            "audio",
            "functions",
            "prediction",
            "reasoning_effort",
            "web_search_options",
            "temprature",
        ] {
            let mut body = serde_json::json!({"messages": []});
            body[field] = serde_json::json!(1);
            let e = check_fields(&body, known).expect_err(field);
            assert_eq!(e.param.as_deref(), Some(field));
            assert!(e.message.contains(field), "{}", e.message);
        }
        assert!(check_fields(&serde_json::json!([1]), known).is_err());
    }

    #[test]
    fn sampling_extras_map_to_the_sampler() {
        let req: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [], "presence_penalty": 0.5, "frequency_penalty": -1,
                "logit_bias": {"7": 100, "3": -100}, "n": 4}"#,
        )
        .expect("parses");
        let p = req
            .common
            .to_generate_params(100, &SamplingParams::recommended())
            .expect("valid");
        assert_eq!(
            (p.sampling.presence_penalty, p.sampling.frequency_penalty),
            (0.5, -1.0)
        );
        assert_eq!(req.common.n().unwrap(), 4);
        assert_eq!(
            req.common.logit_bias(10).unwrap(),
            Some(vec![(3, -100.0), (7, 100.0)])
        );
        let e = req
            .common
            .logit_bias(5)
            .expect_err("7 is outside a vocabulary of 5");
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        let req: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages": [], "logit_bias": {"1": 101}}"#).unwrap();
        assert!(req.common.logit_bias(10).is_err());
        let req: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages": [], "logit_bias": {"x": 1}}"#).unwrap();
        assert!(req.common.logit_bias(10).is_err());
    }

    #[test]
    fn tool_choice_and_response_format_parse() {
        use serde_json::json;
        assert_eq!(parse_tool_choice(&json!("none")).unwrap(), ToolChoice::None);
        assert_eq!(parse_tool_choice(&json!("auto")).unwrap(), ToolChoice::Auto);
        assert_eq!(
            parse_tool_choice(&json!("required")).unwrap(),
            ToolChoice::Required
        );
        assert_eq!(
            parse_tool_choice(&json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Function("f".into())
        );
        for bad in [json!("sometimes"), json!(3), json!({"type": "function"})] {
            assert_eq!(
                parse_tool_choice(&bad).unwrap_err().param.as_deref(),
                Some("tool_choice")
            );
        }
        let rf: ResponseFormat = serde_json::from_value(json!({"type": "json_schema",
            "json_schema": {"name": "x", "strict": true, "schema": {"type": "object"}}}))
        .unwrap();
        assert_eq!(
            rf.constraint().unwrap(),
            Some(Constraint::JsonSchema(json!({"type": "object"})))
        );
        let rf: ResponseFormat = serde_json::from_value(json!({"type": "json_object"})).unwrap();
        assert_eq!(rf.constraint().unwrap(), Some(Constraint::JsonObject));
        let rf: ResponseFormat = serde_json::from_value(json!({"type": "text"})).unwrap();
        assert_eq!(rf.constraint().unwrap(), None);
        let rf: ResponseFormat =
            serde_json::from_value(json!({"type": "json_schema", "json_schema": {"name": "x"}}))
                .unwrap();
        assert!(rf.constraint().is_err());
    }

    #[test]
    fn messages_carry_tool_calls_and_tool_results() {
        let req: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "14:05"}]}"#,
        )
        .expect("parses");
        let m = req.messages().expect("valid");
        assert_eq!(m[1].tool_calls[0].function.name, "get_time");
        assert_eq!(
            m[1].tool_calls[0].arguments_value(),
            serde_json::json!({"tz": "UTC"})
        );
        assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(m[2].name.as_deref(), Some("get_time"));
    }

    #[test]
    fn error_body_has_openai_shape() {
        let e = ApiError::bad_param("top_p", "bad").to_json();
        let v: serde_json::Value = serde_json::from_str(&e).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "bad", "type": "invalid_request_error",
                "param": "top_p", "code": null}})
        );
    }
}
