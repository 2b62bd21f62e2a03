//! Owns OpenAI's wire shapes: the requests clients send (chat, completions, embeddings), the
//! responses and stream chunks the gateway writes back when it translates, and the passthrough
//! request rewrite that asks an OpenAI-style upstream for usage on streams.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::wire::{OneOrMany, Text};
use super::{rfc3339, RequestError};
use crate::request_head::StreamOptions as StreamOptionsSeen;
use crate::stream::StreamError;
use crate::usage::TokenCount;

// ---------------------------------------------------------------------------------------------
// Requests, as clients send them.

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`. Fields no upstream of ours can honour (`n`, `logprobs`,
/// `logit_bias`, …) are not read.
#[derive(Debug, Deserialize)]
pub struct ChatRequest<'a> {
    #[serde(borrow)]
    pub model: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub messages: Vec<ChatMessage<'a>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    #[serde(borrow)]
    pub stop: Option<OneOrMany<'a>>,
    #[serde(borrow)]
    pub response_format: Option<ResponseFormat<'a>>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(borrow)]
    pub user: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage<'a> {
    #[serde(borrow)]
    pub role: Text<'a>,
    #[serde(borrow)]
    pub content: Option<Content<'a>>,
    #[serde(borrow)]
    pub name: Option<Text<'a>>,
    #[serde(borrow)]
    pub tool_calls: Option<Vec<ToolCallIn<'a>>>,
    #[serde(borrow)]
    pub tool_call_id: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content<'a> {
    Text(#[serde(borrow)] Text<'a>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

#[derive(Debug, Deserialize)]
pub struct Part<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Text<'a>,
    #[serde(borrow)]
    pub text: Option<Text<'a>>,
    #[serde(borrow)]
    pub image_url: Option<ImageUrl<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl<'a> {
    Object {
        #[serde(borrow)]
        url: Text<'a>,
    },
    Url(#[serde(borrow)] Text<'a>),
}

impl ImageUrl<'_> {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url.as_str(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ToolCallIn<'a> {
    #[serde(borrow)]
    pub id: Option<Text<'a>>,
    #[serde(borrow)]
    pub function: FunctionCallIn<'a>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallIn<'a> {
    #[serde(borrow)]
    pub name: Text<'a>,
    /// A JSON text, as OpenAI sends it.
    #[serde(borrow)]
    pub arguments: Option<Text<'a>>,
}

impl FunctionCallIn<'_> {
    /// The arguments as a JSON value; empty means no arguments.
    pub fn arguments_value(&self) -> Result<Value, RequestError> {
        let text = self.arguments.as_ref().map_or("", Text::as_str);
        if text.trim().is_empty() {
            return Ok(Value::Object(serde_json::Map::new()));
        }
        serde_json::from_str(text).map_err(|_| {
            RequestError::InvalidRequest(format!(
                "tool call {:?}: arguments are not valid JSON",
                self.name.as_str()
            ))
        })
    }
}

/// A tool offered to the model, in OpenAI's (and Ollama's) shape.
#[derive(Debug, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: ToolFunction,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ToolFunction {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Text<'a>,
    pub json_schema: Option<JsonSchema>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchema {
    pub schema: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest<'a> {
    #[serde(borrow)]
    pub model: Option<Text<'a>>,
    #[serde(borrow)]
    pub prompt: Option<Prompt<'a>>,
    #[serde(borrow)]
    pub suffix: Option<Text<'a>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    #[serde(borrow)]
    pub stop: Option<OneOrMany<'a>>,
}

/// A completion prompt: text, a list of texts, or token ids (one list or many).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt<'a> {
    Text(#[serde(borrow)] Text<'a>),
    Texts(#[serde(borrow)] Vec<Text<'a>>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest<'a> {
    #[serde(borrow)]
    pub model: Option<Text<'a>>,
    #[serde(borrow)]
    pub input: Option<Prompt<'a>>,
    #[serde(borrow)]
    pub encoding_format: Option<Text<'a>>,
    pub dimensions: Option<u64>,
}

/// For a streamed passthrough request that did not ask for usage: the body with
/// `stream_options.include_usage: true`, or `None` when it already asks.
///
/// When `stream_options` is absent (the usual case) the member is inserted after the opening
/// brace, leaving the client's bytes as they are; otherwise the object is rewritten.
pub fn inject_include_usage(
    body: &[u8],
    object_start: usize,
    options: StreamOptionsSeen,
) -> Result<Option<Vec<u8>>, RequestError> {
    match options {
        StreamOptionsSeen::IncludeUsage => Ok(None),
        StreamOptionsSeen::Absent => {
            const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
            let split = object_start + 1;
            let mut out = Vec::with_capacity(body.len() + MEMBER.len());
            out.extend_from_slice(body.get(..split).unwrap_or_default());
            out.extend_from_slice(MEMBER);
            out.extend_from_slice(body.get(split..).unwrap_or_default());
            Ok(Some(out))
        }
        StreamOptionsSeen::Other => {
            let mut object: serde_json::Map<String, Value> =
                serde_json::from_slice(body).map_err(super::body_error)?;
            let options = object
                .entry("stream_options")
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            if !options.is_object() {
                *options = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(options) = options {
                options.insert("include_usage".to_owned(), Value::Bool(true));
            }
            serde_json::to_vec(&object)
                .map(Some)
                .map_err(|e| RequestError::InvalidRequest(e.to_string()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses, as the gateway writes them when it translates.

/// What every translated response of one request shares.
#[derive(Debug, Clone)]
pub struct OutputContext {
    /// `chatcmpl-…` or `cmpl-…`, from the request id.
    pub id: String,
    pub created: u64,
    /// The model the request named; used when the upstream does not say.
    pub model: String,
    pub request_id: String,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The client asked for `encoding_format: "base64"` embeddings.
    pub embeddings_base64: bool,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct UsageOut {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<TokenCount> for UsageOut {
    fn from(count: TokenCount) -> Self {
        UsageOut {
            prompt_tokens: count.prompt,
            completion_tokens: count.completion,
            total_tokens: count.total(),
        }
    }
}

/// The envelope every completion response and stream chunk shares: `chat.completion`,
/// `chat.completion.chunk` and `text_completion` differ only in `object` and the choice type.
#[derive(Debug, Serialize)]
pub struct Envelope<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [C],
    /// Whole responses always have it. On stream chunks it is absent unless the client asked
    /// for usage; then `null` on every chunk but the usage one, as OpenAI does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'a str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    /// `null` when the answer is only tool calls, as OpenAI sends it.
    pub content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ToolCallOut<'a> {
    /// Only in stream chunks, where calls arrive in pieces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionOut<'a>,
}

#[derive(Debug, Serialize)]
pub struct FunctionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: &'a [ToolCallOut<'a>],
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingList<'a> {
    pub object: &'static str,
    pub data: Vec<EmbeddingOut>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingOut {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingValue,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Floats(Vec<f64>),
    /// Little-endian f32s in standard base64, as OpenAI's `encoding_format: "base64"`.
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelOut<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelOut<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'a str,
}

/// Appends `data: <json>\n\n`.
pub fn write_event<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), StreamError> {
    out.extend_from_slice(b"data: ");
    write_json(out, value)?;
    out.extend_from_slice(b"\n\n");
    Ok(())
}

pub fn write_done(out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: [DONE]\n\n");
}

pub fn write_json<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), StreamError> {
    serde_json::to_writer(&mut *out, value).map_err(|e| StreamError::Encode(e.to_string()))
}

/// One stream chunk with a single choice.
fn write_chunk<C: Serialize>(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    object: &'static str,
    choice: C,
) -> Result<(), StreamError> {
    write_event(
        out,
        &Envelope {
            id: &ctx.id,
            object,
            created: ctx.created,
            model,
            choices: &[choice],
            usage: ctx.include_usage.then_some(None),
        },
    )
}

/// The closing frames of a translated stream: the chunk with the finish reason, the usage
/// chunk (only if the client asked), `[DONE]`.
fn write_end<C: Serialize>(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    object: &'static str,
    last: C,
    usage: TokenCount,
) -> Result<(), StreamError> {
    write_chunk(out, ctx, model, object, last)?;
    if ctx.include_usage {
        write_event(
            out,
            &Envelope::<C> {
                id: &ctx.id,
                object,
                created: ctx.created,
                model,
                choices: &[],
                usage: Some(Some(usage.into())),
            },
        )?;
    }
    write_done(out);
    Ok(())
}

pub fn write_chat_chunk(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    delta: Delta<'_>,
    finish_reason: Option<&str>,
) -> Result<(), StreamError> {
    let choice = ChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason,
    };
    write_chunk(out, ctx, model, "chat.completion.chunk", choice)
}

pub fn write_chat_end(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    finish_reason: &str,
    usage: TokenCount,
) -> Result<(), StreamError> {
    let last = ChunkChoice {
        index: 0,
        delta: Delta::default(),
        logprobs: None,
        finish_reason: Some(finish_reason),
    };
    write_end(out, ctx, model, "chat.completion.chunk", last, usage)
}

pub fn write_text_chunk(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    text: &str,
    finish_reason: Option<&str>,
) -> Result<(), StreamError> {
    write_chunk(
        out,
        ctx,
        model,
        "text_completion",
        text_choice(text, finish_reason),
    )
}

pub fn write_text_end(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    finish_reason: &str,
    usage: TokenCount,
) -> Result<(), StreamError> {
    let last = text_choice("", Some(finish_reason));
    write_end(out, ctx, model, "text_completion", last, usage)
}

pub fn text_choice<'a>(text: &'a str, finish_reason: Option<&'a str>) -> TextChoice<'a> {
    TextChoice {
        text,
        index: 0,
        logprobs: None,
        finish_reason,
    }
}

/// A whole (non-streamed) response with one choice and its usage.
pub fn write_completion<C: Serialize>(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    object: &'static str,
    choice: C,
    usage: TokenCount,
) -> Result<(), StreamError> {
    write_json(
        out,
        &Envelope {
            id: &ctx.id,
            object,
            created: ctx.created,
            model,
            choices: &[choice],
            usage: Some(Some(usage.into())),
        },
    )
}

/// An OpenAI model list from `(id, RFC 3339 creation time, owner)` entries.
pub fn write_model_list<'a>(
    out: &mut Vec<u8>,
    models: impl Iterator<Item = (&'a str, Option<&'a str>, &'a str)>,
) -> Result<(), StreamError> {
    let data = models
        .map(|(id, created_at, owned_by)| ModelOut {
            id,
            object: "model",
            created: created_at.and_then(rfc3339::unix_seconds).unwrap_or(0),
            owned_by,
        })
        .collect();
    write_json(
        out,
        &ModelList {
            object: "list",
            data,
        },
    )
}

/// A stream chunk, as far as a passthrough cares: is it the usage-only chunk?
#[derive(Debug, Deserialize)]
pub struct ChunkUsage {
    pub choices: Option<Vec<serde::de::IgnoredAny>>,
    pub usage: Option<crate::usage::OpenAiUsage>,
}

impl ChunkUsage {
    /// The extra chunk `include_usage` adds: no choices, only usage.
    pub fn is_usage_only(&self) -> bool {
        self.usage.is_some() && self.choices.as_ref().is_some_and(Vec::is_empty)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head(body: &[u8]) -> StreamOptionsSeen {
        crate::request_head::RequestHead::parse(body)
            .unwrap()
            .stream_options
    }

    fn inject(body: &str) -> Option<Value> {
        let start = body.find('{').unwrap();
        inject_include_usage(body.as_bytes(), start, head(body.as_bytes()))
            .unwrap()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn usage_is_injected_after_the_brace_when_stream_options_is_absent() {
        let body = r#"  {"model":"m","stream":true}"#;
        let start = body.find('{').unwrap();
        let out = inject_include_usage(body.as_bytes(), start, head(body.as_bytes())).unwrap();
        assert_eq!(
            String::from_utf8(out.unwrap()).unwrap(),
            r#"  {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
    }

    #[test]
    fn usage_is_merged_into_existing_stream_options() {
        let v =
            inject(r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#)
                .unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        let v = inject(r#"{"model":"m","stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn body_that_already_asks_for_usage_is_left_alone() {
        assert!(inject(r#"{"model":"m","stream_options":{"include_usage":true}}"#).is_none());
    }

    #[test]
    fn usage_only_chunk_is_recognised() {
        let c: ChunkUsage =
            serde_json::from_str(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert!(c.is_usage_only());
        let c: ChunkUsage = serde_json::from_str(r#"{"choices":[{}],"usage":null}"#).unwrap();
        assert!(!c.is_usage_only());
        let c: ChunkUsage =
            serde_json::from_str(r#"{"choices":[{}],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert!(!c.is_usage_only());
    }
}
