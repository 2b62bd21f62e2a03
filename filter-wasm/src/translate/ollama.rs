//! Owns OpenAI ⇄ Ollama: OpenAI chat, completion and embedding requests rewritten for
//! `/api/chat`, `/api/generate` and `/api/embed`, and Ollama's answers (whole bodies, and NDJSON
//! streams line by line) rewritten as OpenAI responses and SSE chunks.
//!
//! OpenAI options not listed in `Options` (`n`, `logprobs`, `logit_bias`, `tool_choice`, …)
//! have no Ollama equivalent and are dropped; absent options stay absent so the model's own
//! defaults apply.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::openai::{
    self, AssistantMessage, ChatChoice, ChatRequest, CompletionRequest, Content, Delta,
    EmbeddingList, EmbeddingOut, EmbeddingUsage, EmbeddingValue, EmbeddingsRequest, FunctionOut,
    OutputContext, Prompt, Tool, ToolCallOut,
};
use super::wire::Text;
use super::{base64, body_error, upstream_error, RequestError, ResponseKind, ResponsePlan};
use crate::stream::StreamError;
use crate::usage::{OllamaCounts, UsageMeter};

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Debug, Default, Serialize)]
struct Options<'r> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Vec<&'r str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
}

impl Options<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.seed.is_none()
            && self.num_predict.is_none()
            && self.stop.is_none()
            && self.frequency_penalty.is_none()
            && self.presence_penalty.is_none()
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Format<'r> {
    Json(&'static str),
    Schema(&'r Value),
}

#[derive(Debug, Serialize)]
struct ChatOut<'r> {
    model: &'r str,
    messages: Vec<MessageOut<'r>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Format<'r>>,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options<'r>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'r [Tool],
}

#[derive(Debug, Serialize)]
struct MessageOut<'r> {
    role: &'r str,
    content: Cow<'r, str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<&'r str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOutOllama<'r>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'r str>,
}

#[derive(Debug, Serialize)]
struct ToolCallOutOllama<'r> {
    function: FunctionOutOllama<'r>,
}

#[derive(Debug, Serialize)]
struct FunctionOutOllama<'r> {
    name: &'r str,
    arguments: Value,
}

/// `/v1/chat/completions` → `/api/chat`.
pub fn chat_request(body: &[u8]) -> Result<(Vec<u8>, ResponsePlan), RequestError> {
    let req: ChatRequest<'_> = serde_json::from_slice(body).map_err(body_error)?;
    let model = model_of(req.model.as_ref())?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, message) in req.messages.iter().enumerate() {
        let role = match message.role.as_str() {
            // OpenAI's newer name for the system role.
            "developer" => "system",
            "function" => "tool",
            other => other,
        };
        let (content, images) = match &message.content {
            None => (Cow::Borrowed(""), Vec::new()),
            Some(Content::Text(text)) => (Cow::Borrowed(text.as_str()), Vec::new()),
            Some(Content::Parts(parts)) => {
                let mut texts: Vec<&str> = Vec::new();
                let mut images = Vec::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text, &part.image_url) {
                        ("text", Some(text), _) => texts.push(text.as_str()),
                        ("image_url", _, Some(url)) => images.push(image_base64(url.url())?),
                        (kind, _, _) => {
                            return Err(RequestError::UnsupportedParameter(format!(
                                "messages[{i}]: content part of type {kind:?}"
                            )))
                        }
                    }
                }
                (Cow::Owned(texts.join("\n")), images)
            }
        };
        let mut tool_calls = Vec::new();
        for call in message.tool_calls.iter().flatten() {
            tool_calls.push(ToolCallOutOllama {
                function: FunctionOutOllama {
                    name: call.function.name.as_str(),
                    arguments: call.function.arguments_value()?,
                },
            });
        }
        let tool_name = if role == "tool" {
            message
                .name
                .as_ref()
                .map(Text::as_str)
                .or_else(|| tool_name_for(&req, message.tool_call_id.as_ref()))
        } else {
            None
        };
        messages.push(MessageOut {
            role,
            content,
            images,
            tool_calls,
            tool_name,
        });
    }
    let format = match &req.response_format {
        Some(f) if f.kind.as_str() == "json_object" => Some(Format::Json("json")),
        Some(f) if f.kind.as_str() == "json_schema" => f
            .json_schema
            .as_ref()
            .and_then(|s| s.schema.as_ref())
            .map(Format::Schema),
        _ => None,
    };
    let stream = req.stream.unwrap_or(false);
    let out = ChatOut {
        model: &model,
        messages,
        stream,
        format,
        options: Options {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            num_predict: req.max_completion_tokens.or(req.max_tokens),
            stop: req.stop.as_ref().map(|s| s.to_vec()),
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
        },
        tools: req.tools.as_deref().unwrap_or_default(),
    };
    let body = encode(&out)?;
    Ok((
        body,
        plan(
            ResponseKind::OllamaChat,
            model,
            stream,
            req.stream_options.as_ref(),
        ),
    ))
}

/// A tool result's function name, found from its `tool_call_id` among earlier assistant
/// calls; Ollama matches results to calls by name.
fn tool_name_for<'r>(req: &'r ChatRequest<'_>, id: Option<&Text<'_>>) -> Option<&'r str> {
    let id = id?.as_str();
    req.messages
        .iter()
        .rev()
        .flat_map(|m| m.tool_calls.iter().flatten())
        .find(|call| call.id.as_ref().is_some_and(|c| c.as_str() == id))
        .map(|call| call.function.name.as_str())
}

/// Ollama takes images as bare base64; OpenAI clients send `data:<type>;base64,<data>` URLs.
fn image_base64(url: &str) -> Result<&str, RequestError> {
    url.strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(_, data)| data)
        .ok_or_else(|| {
            RequestError::UnsupportedParameter(
                "image_url must be a base64 data: URL for this model server".to_owned(),
            )
        })
}

#[derive(Debug, Serialize)]
struct GenerateOut<'r> {
    model: &'r str,
    prompt: &'r str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'r str>,
    stream: bool,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options<'r>,
}

/// `/v1/completions` → `/api/generate`. Ollama applies the model's template to the prompt,
/// as its own OpenAI-compatible endpoint does.
pub fn generate_request(body: &[u8]) -> Result<(Vec<u8>, ResponsePlan), RequestError> {
    let req: CompletionRequest<'_> = serde_json::from_slice(body).map_err(body_error)?;
    let model = model_of(req.model.as_ref())?;
    let prompt = match &req.prompt {
        None => "",
        Some(Prompt::Text(text)) => text.as_str(),
        Some(Prompt::Texts(texts)) if texts.len() <= 1 => texts.first().map_or("", Text::as_str),
        Some(Prompt::Texts(_)) => {
            return Err(RequestError::UnsupportedParameter(
                "more than one prompt per request".to_owned(),
            ))
        }
        Some(Prompt::Tokens(_) | Prompt::TokenLists(_)) => {
            return Err(RequestError::UnsupportedParameter(
                "prompts given as token ids".to_owned(),
            ))
        }
    };
    let stream = req.stream.unwrap_or(false);
    let out = GenerateOut {
        model: &model,
        prompt,
        suffix: req.suffix.as_ref().map(Text::as_str),
        stream,
        options: Options {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            num_predict: req.max_tokens,
            stop: req.stop.as_ref().map(|s| s.to_vec()),
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
        },
    };
    let body = encode(&out)?;
    Ok((
        body,
        plan(
            ResponseKind::OllamaGenerate,
            model,
            stream,
            req.stream_options.as_ref(),
        ),
    ))
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum EmbedInput<'r> {
    One(&'r str),
    Many(Vec<&'r str>),
}

#[derive(Debug, Serialize)]
struct EmbedOut<'r> {
    model: &'r str,
    input: EmbedInput<'r>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u64>,
}

/// `/v1/embeddings` → `/api/embed`.
pub fn embed_request(body: &[u8]) -> Result<(Vec<u8>, ResponsePlan), RequestError> {
    let req: EmbeddingsRequest<'_> = serde_json::from_slice(body).map_err(body_error)?;
    let model = model_of(req.model.as_ref())?;
    let input = match &req.input {
        Some(Prompt::Text(text)) => EmbedInput::One(text.as_str()),
        Some(Prompt::Texts(texts)) => EmbedInput::Many(texts.iter().map(Text::as_str).collect()),
        Some(Prompt::Tokens(_) | Prompt::TokenLists(_)) => {
            return Err(RequestError::UnsupportedParameter(
                "embedding input given as token ids".to_owned(),
            ))
        }
        None => {
            return Err(RequestError::InvalidRequest(
                "missing field `input`".to_owned(),
            ))
        }
    };
    let embeddings_base64 = match req.encoding_format.as_ref().map(Text::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(RequestError::InvalidRequest(format!(
                "encoding_format {other:?}: expected \"float\" or \"base64\""
            )))
        }
    };
    let out = EmbedOut {
        model: &model,
        input,
        dimensions: req.dimensions,
    };
    let body = encode(&out)?;
    let mut plan = plan(ResponseKind::OllamaEmbed, model, false, None);
    plan.embeddings_base64 = embeddings_base64;
    Ok((body, plan))
}

fn model_of(model: Option<&Text<'_>>) -> Result<String, RequestError> {
    model
        .map(Text::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or(RequestError::MissingModel)
}

fn plan(
    kind: ResponseKind,
    model: String,
    stream: bool,
    stream_options: Option<&openai::StreamOptions>,
) -> ResponsePlan {
    ResponsePlan {
        kind,
        model: Some(model),
        stream,
        client_wants_usage: stream && stream_options.is_some_and(|o| o.include_usage == Some(true)),
        embeddings_base64: false,
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RequestError> {
    serde_json::to_vec(value).map_err(|e| RequestError::InvalidRequest(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Responses.

/// Members of an Ollama chat/generate object the translation reads; the rest (`context`,
/// durations) is skipped, however long.
pub const GENERATION_FIELDS: &[&str] = &[
    "model",
    "message",
    "response",
    "done",
    "done_reason",
    "prompt_eval_count",
    "eval_count",
    "error",
];
pub const EMBED_FIELDS: &[&str] = &["model", "embeddings", "prompt_eval_count"];
pub const TAGS_FIELDS: &[&str] = &["models"];
pub const COUNT_FIELDS: &[&str] = &["prompt_eval_count", "eval_count"];

/// One object of `/api/chat` or `/api/generate`, streamed or whole.
#[derive(Debug, Deserialize)]
pub struct Generation<'a> {
    #[serde(borrow)]
    pub model: Option<Text<'a>>,
    #[serde(borrow)]
    pub message: Option<GenerationMessage<'a>>,
    #[serde(borrow)]
    pub response: Option<Text<'a>>,
    #[serde(default)]
    pub done: bool,
    #[serde(borrow)]
    pub done_reason: Option<Text<'a>>,
    pub prompt_eval_count: Option<u64>,
    pub eval_count: Option<u64>,
    #[serde(borrow)]
    pub error: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct GenerationMessage<'a> {
    #[serde(borrow)]
    pub content: Option<Text<'a>>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
}

/// Ollama's tool call: arguments are an object, not a JSON text; `id` and `index` only
/// in newer versions.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    pub arguments: Option<Value>,
}

impl Generation<'_> {
    fn counts(&self) -> OllamaCounts {
        OllamaCounts {
            prompt_eval_count: self.prompt_eval_count,
            eval_count: self.eval_count,
        }
    }

    fn content(&self) -> &str {
        self.message
            .as_ref()
            .and_then(|m| m.content.as_ref())
            .map_or("", Text::as_str)
    }

    fn tool_calls(&self) -> &[ToolCallIn] {
        self.message
            .as_ref()
            .and_then(|m| m.tool_calls.as_deref())
            .unwrap_or_default()
    }
}

/// `done_reason` as an OpenAI `finish_reason`. Tool calls win, as OpenAI reports them.
fn finish_reason(done_reason: Option<&Text<'_>>, tool_calls: bool) -> &'static str {
    if tool_calls {
        return "tool_calls";
    }
    match done_reason.map(Text::as_str) {
        Some("length") => "length",
        _ => "stop",
    }
}

/// OpenAI clients need an id to answer a tool call; old Ollama versions send none.
fn tool_call_id<'c>(call: &'c ToolCallIn, ctx: &OutputContext, n: u32) -> Cow<'c, str> {
    match &call.id {
        Some(id) if !id.is_empty() => Cow::Borrowed(id),
        _ => Cow::Owned(format!("call_{n}_{}", ctx.request_id)),
    }
}

fn tool_calls_out<'c>(
    calls: &'c [ToolCallIn],
    ctx: &OutputContext,
    first_index: u32,
    streamed: bool,
) -> Vec<ToolCallOut<'c>> {
    let mut n = first_index;
    calls
        .iter()
        .map(|call| {
            let arguments = call
                .function
                .arguments
                .as_ref()
                .map_or_else(|| "{}".to_owned(), Value::to_string);
            let out = ToolCallOut {
                index: streamed.then_some(n),
                id: Some(tool_call_id(call, ctx, n)),
                kind: Some("function"),
                function: FunctionOut {
                    name: Some(&call.function.name),
                    arguments: Some(Cow::Owned(arguments)),
                },
            };
            n = n.saturating_add(1);
            out
        })
        .collect()
}

/// State of one NDJSON stream being rewritten as OpenAI SSE.
#[derive(Debug)]
pub struct StreamState {
    generate: bool,
    role_sent: bool,
    tool_calls: u32,
    done: bool,
}

impl StreamState {
    pub fn new(kind: ResponseKind) -> Self {
        StreamState {
            generate: kind == ResponseKind::OllamaGenerate,
            role_sent: false,
            tool_calls: 0,
            done: false,
        }
    }

    /// The final object (or an error) was seen; later lines are ignored.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Rewrites one NDJSON line, appending the SSE it becomes to `out`.
    pub fn line(
        &mut self,
        line: &[u8],
        ctx: &OutputContext,
        meter: &mut UsageMeter,
        out: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        if self.done {
            return Ok(());
        }
        let g: Generation<'_> = serde_json::from_slice(line)
            .map_err(|e| StreamError::Malformed(format!("Ollama stream line: {e}")))?;
        if let Some(message) = &g.error {
            self.done = true;
            return upstream_error::write_stream_error(out, 500, None, message.as_str(), ctx);
        }
        let model = g.model.as_ref().map_or(ctx.model.as_str(), Text::as_str);
        if self.generate {
            let text = g.response.as_ref().map_or("", Text::as_str);
            if !text.is_empty() {
                openai::write_text_chunk(out, ctx, model, text, None)?;
            }
        } else {
            let content = g.content();
            let calls = g.tool_calls();
            if !content.is_empty() || !calls.is_empty() || !self.role_sent {
                let tool_calls = tool_calls_out(calls, ctx, self.tool_calls, true);
                self.tool_calls = self.tool_calls.saturating_add(calls.len() as u32);
                // The first chunk carries the role; content is "" there, as OpenAI sends it,
                // unless the chunk is only tool calls (then content is omitted).
                let content = match (content.is_empty(), self.role_sent, calls.is_empty()) {
                    (false, _, _) => Some(content),
                    (true, false, true) => Some(""),
                    _ => None,
                };
                let delta = Delta {
                    role: (!self.role_sent).then_some("assistant"),
                    content,
                    tool_calls: &tool_calls,
                };
                self.role_sent = true;
                openai::write_chat_chunk(out, ctx, model, delta, None)?;
            }
        }
        if g.done {
            self.done = true;
            meter.ollama(g.counts());
            let reason = finish_reason(g.done_reason.as_ref(), self.tool_calls > 0);
            if self.generate {
                openai::write_text_end(out, ctx, model, reason, meter.count())?;
            } else {
                openai::write_chat_end(out, ctx, model, reason, meter.count())?;
            }
        }
        Ok(())
    }
}

/// A whole (non-streamed) Ollama response, reduced to the fields the translation reads, as an
/// OpenAI body.
pub fn body(
    kind: ResponseKind,
    reduced: &[u8],
    ctx: &OutputContext,
    meter: &mut UsageMeter,
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let malformed = |e: serde_json::Error| StreamError::Malformed(format!("Ollama response: {e}"));
    match kind {
        ResponseKind::OllamaChat | ResponseKind::OllamaGenerate => {
            let g: Generation<'_> = serde_json::from_slice(reduced).map_err(malformed)?;
            meter.ollama(g.counts());
            let model = g.model.as_ref().map_or(ctx.model.as_str(), Text::as_str);
            if kind == ResponseKind::OllamaGenerate {
                let text = g.response.as_ref().map_or("", Text::as_str);
                let reason = finish_reason(g.done_reason.as_ref(), false);
                let choice = openai::text_choice(text, Some(reason));
                return openai::write_completion(
                    out,
                    ctx,
                    model,
                    "text_completion",
                    choice,
                    meter.count(),
                );
            }
            let calls = g.tool_calls();
            let content = g.content();
            let choice = ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: (!content.is_empty() || calls.is_empty())
                        .then_some(Cow::Borrowed(content)),
                    tool_calls: tool_calls_out(calls, ctx, 0, false),
                },
                logprobs: None,
                finish_reason: finish_reason(g.done_reason.as_ref(), !calls.is_empty()),
            };
            openai::write_completion(out, ctx, model, "chat.completion", choice, meter.count())
        }
        ResponseKind::OllamaEmbed => {
            #[derive(Deserialize)]
            struct Embed<'a> {
                #[serde(borrow)]
                model: Option<Text<'a>>,
                #[serde(default)]
                embeddings: Vec<Vec<f64>>,
                prompt_eval_count: Option<u64>,
            }
            let e: Embed<'_> = serde_json::from_slice(reduced).map_err(malformed)?;
            meter.ollama(OllamaCounts {
                prompt_eval_count: e.prompt_eval_count,
                eval_count: None,
            });
            let data = e
                .embeddings
                .into_iter()
                .enumerate()
                .map(|(index, vector)| EmbeddingOut {
                    object: "embedding",
                    index,
                    embedding: if ctx.embeddings_base64 {
                        EmbeddingValue::Base64(base64::f32_le(&vector))
                    } else {
                        EmbeddingValue::Floats(vector)
                    },
                })
                .collect();
            let prompt = meter.count().prompt;
            openai::write_json(
                out,
                &EmbeddingList {
                    object: "list",
                    data,
                    model: e.model.as_ref().map_or(ctx.model.as_str(), Text::as_str),
                    usage: EmbeddingUsage {
                        prompt_tokens: prompt,
                        total_tokens: prompt,
                    },
                },
            )
        }
        ResponseKind::OllamaTags => {
            #[derive(Deserialize)]
            struct Tags<'a> {
                #[serde(borrow, default)]
                models: Vec<Tag<'a>>,
            }
            #[derive(Deserialize)]
            struct Tag<'a> {
                #[serde(borrow)]
                name: Text<'a>,
                #[serde(borrow)]
                modified_at: Option<Text<'a>>,
            }
            let tags: Tags<'_> = serde_json::from_slice(reduced).map_err(malformed)?;
            let models = tags.models.iter().map(|tag| {
                let id = tag.name.as_str();
                (id, tag.modified_at.as_ref().map(Text::as_str), owner(id))
            });
            openai::write_model_list(out, models)
        }
        _ => Err(StreamError::Encode(format!(
            "{kind:?} is not an Ollama body"
        ))),
    }
}

/// The namespace of an Ollama model name (`hf.co/org/model:tag` → `org`), `library` for the
/// official ones, as Ollama's own `/v1/models` reports it.
fn owner(name: &str) -> &str {
    let mut parts = name.rsplit('/');
    parts.next();
    parts.next().unwrap_or("library")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn chat_request_matches_the_golden_translation() {
        let (body, plan) = chat_request(include_bytes!(
            "../../../tests/fixtures/openai/chat_request.json"
        ))
        .unwrap();
        let expected = json(include_bytes!(
            "../../../tests/fixtures/ollama/chat_request.expected.json"
        ));
        assert_eq!(json(&body), expected);
        assert_eq!(plan.kind, ResponseKind::OllamaChat);
        assert_eq!(plan.model.as_deref(), Some("llama3.2"));
        assert!(plan.stream);
        assert!(plan.client_wants_usage);
    }

    #[test]
    fn chat_request_sets_stream_false_explicitly_when_the_client_omits_it() {
        let (body, plan) = chat_request(br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(
            json(&body),
            serde_json::json!({"model":"m","messages":[],"stream":false})
        );
        assert!(!plan.stream);
        assert!(!plan.client_wants_usage);
    }

    #[test]
    fn response_formats_map_to_ollama_format() {
        let (body, _) = chat_request(
            br#"{"model":"m","messages":[],"response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        assert_eq!(json(&body)["format"], "json");
        let (body, _) = chat_request(
            br#"{"model":"m","messages":[],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert_eq!(json(&body)["format"], serde_json::json!({"type":"object"}));
        let (body, _) =
            chat_request(br#"{"model":"m","messages":[],"response_format":{"type":"text"}}"#)
                .unwrap();
        assert!(json(&body).get("format").is_none());
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens_and_stop_string_becomes_a_list() {
        let (body, _) = chat_request(
            br#"{"model":"m","messages":[],"max_tokens":5,"max_completion_tokens":7,"stop":"END"}"#,
        )
        .unwrap();
        let body = json(&body);
        assert_eq!(body["options"]["num_predict"], 7);
        assert_eq!(body["options"]["stop"], serde_json::json!(["END"]));
    }

    #[test]
    fn remote_image_urls_are_refused_for_ollama() {
        let err = chat_request(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, RequestError::UnsupportedParameter(_)));
    }

    #[test]
    fn invalid_tool_call_arguments_are_400() {
        let err = chat_request(
            br#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{not json"}}]}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, RequestError::InvalidRequest(_)));
    }

    #[test]
    fn generate_request_maps_prompt_suffix_and_options() {
        let (body, plan) = generate_request(
            br#"{"model":"qwen2.5-coder","prompt":["def f():"],"suffix":"return 1","max_tokens":16,"stream":true,"temperature":0}"#,
        )
        .unwrap();
        assert_eq!(
            json(&body),
            serde_json::json!({
                "model":"qwen2.5-coder","prompt":"def f():","suffix":"return 1","stream":true,
                "options":{"temperature":0.0,"num_predict":16}
            })
        );
        assert_eq!(plan.kind, ResponseKind::OllamaGenerate);
        assert!(!plan.client_wants_usage);
    }

    #[test]
    fn token_prompts_and_several_prompts_are_unsupported() {
        for body in [
            &br#"{"model":"m","prompt":[1,2,3]}"#[..],
            br#"{"model":"m","prompt":[[1],[2]]}"#,
            br#"{"model":"m","prompt":["a","b"]}"#,
        ] {
            assert!(matches!(
                generate_request(body).unwrap_err(),
                RequestError::UnsupportedParameter(_)
            ));
        }
    }

    #[test]
    fn embed_request_keeps_string_or_list_input_and_remembers_base64() {
        let (body, plan) =
            embed_request(br#"{"model":"all-minilm","input":"hi","encoding_format":"base64"}"#)
                .unwrap();
        assert_eq!(
            json(&body),
            serde_json::json!({"model":"all-minilm","input":"hi"})
        );
        assert!(plan.embeddings_base64);
        let (body, plan) =
            embed_request(br#"{"model":"all-minilm","input":["a","b"],"dimensions":64}"#).unwrap();
        assert_eq!(
            json(&body),
            serde_json::json!({"model":"all-minilm","input":["a","b"],"dimensions":64})
        );
        assert!(!plan.embeddings_base64);
        assert!(embed_request(br#"{"model":"m"}"#).is_err());
        assert!(embed_request(br#"{"model":"m","input":"x","encoding_format":"hex"}"#).is_err());
    }

    #[test]
    fn owner_is_the_namespace() {
        assert_eq!(owner("llama3.2:latest"), "library");
        assert_eq!(owner("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4"), "bartowski");
        assert_eq!(owner("me/mymodel"), "me");
    }
}
