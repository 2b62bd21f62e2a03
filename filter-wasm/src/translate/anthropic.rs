//! Owns OpenAI ⇄ Anthropic Messages: OpenAI chat requests rewritten for `/v1/messages`, and
//! Anthropic's answers (whole messages, and the named-event SSE stream) rewritten as OpenAI
//! chat completions and chunks; also Anthropic's model list as OpenAI's.
//!
//! System and developer messages become `system`; tool calls and tool results become
//! `tool_use` / `tool_result` blocks; consecutive messages of one role are merged into one turn,
//! as the Messages API wants. Thinking blocks, citations and server tools are not translated.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::openai::{
    self, AssistantMessage, ChatChoice, ChatRequest, Content, Delta, FunctionOut, OutputContext,
    ToolCallOut,
};
use super::wire::Text;
use super::{body_error, upstream_error, RequestError, RequestOptions, ResponseKind, ResponsePlan};
use crate::stream::StreamError;
use crate::usage::{AnthropicUsage, UsageMeter};

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Debug, Serialize)]
struct MessagesOut<'r> {
    model: &'r str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<MessageOut<'r>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'r str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'r>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'r>>,
}

#[derive(Debug, Serialize)]
struct MessageOut<'r> {
    role: &'static str,
    content: Vec<Block<'r>>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'r> {
    Text {
        text: &'r str,
    },
    Image {
        source: ImageSource<'r>,
    },
    ToolUse {
        id: &'r str,
        name: &'r str,
        input: Value,
    },
    ToolResult {
        tool_use_id: &'r str,
        content: String,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource<'r> {
    Base64 { media_type: &'r str, data: &'r str },
    Url { url: &'r str },
}

#[derive(Debug, Serialize)]
struct ToolOut<'r> {
    name: &'r str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'r str>,
    input_schema: Cow<'r, Value>,
}

#[derive(Debug, Serialize)]
struct Metadata<'r> {
    user_id: &'r str,
}

/// `/v1/chat/completions` → `/v1/messages`.
pub fn messages_request(
    body: &[u8],
    options: &RequestOptions,
) -> Result<(Vec<u8>, ResponsePlan), RequestError> {
    let req: ChatRequest<'_> = serde_json::from_slice(body).map_err(body_error)?;
    let model = req
        .model
        .as_ref()
        .map(Text::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or(RequestError::MissingModel)?;
    let mut system: Vec<&str> = Vec::new();
    let mut messages: Vec<MessageOut<'_>> = Vec::new();
    for (i, message) in req.messages.iter().enumerate() {
        let (role, blocks) = match message.role.as_str() {
            "system" | "developer" => {
                system.extend(texts(message.content.as_ref(), i)?);
                continue;
            }
            "user" => ("user", user_blocks(message.content.as_ref(), i)?),
            "assistant" => {
                let mut blocks: Vec<Block<'_>> = texts(message.content.as_ref(), i)?
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .map(|text| Block::Text { text })
                    .collect();
                for call in message.tool_calls.iter().flatten() {
                    let id = call.id.as_ref().map(Text::as_str).ok_or_else(|| {
                        RequestError::InvalidRequest(format!(
                            "messages[{i}]: a tool call has no id"
                        ))
                    })?;
                    blocks.push(Block::ToolUse {
                        id,
                        name: call.function.name.as_str(),
                        input: call.function.arguments_value()?,
                    });
                }
                ("assistant", blocks)
            }
            "tool" | "function" => {
                let id = message
                    .tool_call_id
                    .as_ref()
                    .map(Text::as_str)
                    .ok_or_else(|| {
                        RequestError::InvalidRequest(format!(
                            "messages[{i}]: a tool message has no tool_call_id"
                        ))
                    })?;
                let content = texts(message.content.as_ref(), i)?.concat();
                (
                    "user",
                    vec![Block::ToolResult {
                        tool_use_id: id,
                        content,
                    }],
                )
            }
            other => {
                return Err(RequestError::InvalidRequest(format!(
                    "messages[{i}]: unknown role {other:?}"
                )))
            }
        };
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(MessageOut {
                role,
                content: blocks,
            }),
        }
    }
    let tools: Vec<ToolOut<'_>> = req
        .tools
        .iter()
        .flatten()
        .map(|tool| ToolOut {
            name: &tool.function.name,
            description: tool.function.description.as_deref(),
            input_schema: tool
                .function
                .parameters
                .as_ref()
                .map_or_else(|| Cow::Owned(json!({"type": "object"})), Cow::Borrowed),
        })
        .collect();
    let tool_choice = tool_choice(
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        !tools.is_empty(),
    )?;
    let stream = req.stream.unwrap_or(false);
    let out = MessagesOut {
        model: &model,
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(options.anthropic_max_tokens),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        stop_sequences: req.stop.as_ref().map(|s| s.to_vec()).unwrap_or_default(),
        temperature: req.temperature,
        top_p: req.top_p,
        stream,
        tools,
        tool_choice,
        metadata: req.user.as_ref().map(|u| Metadata {
            user_id: u.as_str(),
        }),
    };
    let body = serde_json::to_vec(&out).map_err(|e| RequestError::InvalidRequest(e.to_string()))?;
    let client_wants_usage = stream
        && req
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage == Some(true));
    Ok((
        body,
        ResponsePlan {
            kind: ResponseKind::AnthropicMessages,
            model: Some(model),
            stream,
            client_wants_usage,
            embeddings_base64: false,
        },
    ))
}

/// The text parts of a message (a string is one part).
fn texts<'r>(content: Option<&'r Content<'_>>, i: usize) -> Result<Vec<&'r str>, RequestError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(text)) => Ok(vec![text.as_str()]),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|part| match (part.kind.as_str(), &part.text) {
                ("text", Some(text)) => Ok(text.as_str()),
                (kind, _) => Err(RequestError::UnsupportedParameter(format!(
                    "messages[{i}]: content part of type {kind:?} in this role"
                ))),
            })
            .collect(),
    }
}

fn user_blocks<'r>(
    content: Option<&'r Content<'_>>,
    i: usize,
) -> Result<Vec<Block<'r>>, RequestError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(text)) => Ok(vec![Block::Text {
            text: text.as_str(),
        }]),
        Some(Content::Parts(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.kind.as_str(), &part.text, &part.image_url) {
                    // Anthropic refuses empty text blocks.
                    ("text", Some(text), _) if text.as_str().is_empty() => {}
                    ("text", Some(text), _) => blocks.push(Block::Text {
                        text: text.as_str(),
                    }),
                    ("image_url", _, Some(url)) => blocks.push(Block::Image {
                        source: image_source(url.url()),
                    }),
                    (kind, _, _) => {
                        return Err(RequestError::UnsupportedParameter(format!(
                            "messages[{i}]: content part of type {kind:?}"
                        )))
                    }
                }
            }
            Ok(blocks)
        }
    }
}

/// `data:<type>;base64,<data>` becomes an inline image; anything else is fetched by URL.
fn image_source(url: &str) -> ImageSource<'_> {
    url.strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map_or(ImageSource::Url { url }, |(media_type, data)| {
            ImageSource::Base64 { media_type, data }
        })
}

fn tool_choice(
    choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
    has_tools: bool,
) -> Result<Option<Value>, RequestError> {
    let mut out = match choice {
        None | Some(Value::Null) => {
            if !has_tools {
                return Ok(None);
            }
            json!({"type": "auto"})
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => return Ok(Some(json!({"type": "none"}))),
            other => {
                return Err(RequestError::InvalidRequest(format!(
                    "tool_choice {other:?}: expected \"auto\", \"required\" or \"none\""
                )))
            }
        },
        Some(Value::Object(o)) => match o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => json!({"type": "tool", "name": name}),
            None => {
                return Err(RequestError::InvalidRequest(
                    "tool_choice: expected {\"type\":\"function\",\"function\":{\"name\":…}}"
                        .to_owned(),
                ))
            }
        },
        Some(_) => {
            return Err(RequestError::InvalidRequest(
                "tool_choice: expected a string or an object".to_owned(),
            ))
        }
    };
    if parallel_tool_calls == Some(false) {
        if let Value::Object(o) = &mut out {
            o.insert("disable_parallel_tool_use".to_owned(), Value::Bool(true));
        }
    } else if choice.is_none() {
        // Anthropic's default is auto; say nothing rather than restate it.
        return Ok(None);
    }
    Ok(Some(out))
}

// ---------------------------------------------------------------------------------------------
// Responses.

pub const MESSAGE_FIELDS: &[&str] = &["model", "content", "stop_reason", "usage"];
pub const MODELS_FIELDS: &[&str] = &["data"];

/// Anthropic's `stop_reason` as an OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// One stream event, flattened: every event type's fields are optional here, so one pass of
/// serde reads any of them without buffering.
#[derive(Debug, Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    index: Option<u64>,
    #[serde(borrow)]
    message: Option<StartMessage<'a>>,
    #[serde(borrow)]
    content_block: Option<BlockIn<'a>>,
    #[serde(borrow)]
    delta: Option<EventDelta<'a>>,
    usage: Option<AnthropicUsage>,
    #[serde(borrow)]
    error: Option<ErrorIn<'a>>,
}

#[derive(Debug, Deserialize)]
struct StartMessage<'a> {
    #[serde(borrow)]
    model: Option<Text<'a>>,
    usage: Option<AnthropicUsage>,
}

#[derive(Debug, Deserialize)]
struct EventDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    partial_json: Option<Text<'a>>,
    #[serde(borrow)]
    stop_reason: Option<Text<'a>>,
}

#[derive(Debug, Deserialize)]
struct ErrorIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    message: Option<Text<'a>>,
}

/// A content block, as `content_block_start` and whole messages carry it.
#[derive(Debug, Deserialize)]
struct BlockIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    input: Option<Value>,
}

/// State of one Anthropic event stream being rewritten as OpenAI SSE.
#[derive(Debug, Default)]
pub struct StreamState {
    /// The model `message_start` named.
    model: Option<String>,
    stop_reason: Option<String>,
    /// The content block being streamed as a tool call: (block index, OpenAI tool index).
    tool_block: Option<(u64, u32)>,
    tool_calls: u32,
    done: bool,
}

impl StreamState {
    pub fn done(&self) -> bool {
        self.done
    }

    /// Rewrites one event's data, appending the SSE it becomes to `out`. The event name is not
    /// read: `data.type` repeats it.
    pub fn event(
        &mut self,
        data: &[u8],
        ctx: &OutputContext,
        meter: &mut UsageMeter,
        out: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        if self.done {
            return Ok(());
        }
        let e: Event<'_> = serde_json::from_slice(data)
            .map_err(|e| StreamError::Malformed(format!("Anthropic stream event: {e}")))?;
        let model = self.model.as_deref().unwrap_or(&ctx.model);
        match e.kind.as_str() {
            "message_start" => {
                if let Some(message) = &e.message {
                    if let Some(usage) = &message.usage {
                        meter.anthropic_start(usage);
                    }
                    if let Some(m) = &message.model {
                        self.model = Some(m.as_str().to_owned());
                    }
                }
                let model = self.model.as_deref().unwrap_or(&ctx.model);
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    tool_calls: &[],
                };
                openai::write_chat_chunk(out, ctx, model, delta, None)
            }
            "content_block_start" => {
                let Some(block) = &e.content_block else {
                    return Ok(());
                };
                match block.kind.as_str() {
                    "tool_use" => {
                        let index = self.tool_calls;
                        self.tool_calls = self.tool_calls.saturating_add(1);
                        self.tool_block = Some((e.index.unwrap_or(0), index));
                        let calls = [ToolCallOut {
                            index: Some(index),
                            id: block.id.as_ref().map(|id| Cow::Borrowed(id.as_str())),
                            kind: Some("function"),
                            function: FunctionOut {
                                name: block.name.as_ref().map(Text::as_str),
                                arguments: Some(Cow::Borrowed("")),
                            },
                        }];
                        let delta = Delta {
                            tool_calls: &calls,
                            ..Delta::default()
                        };
                        openai::write_chat_chunk(out, ctx, model, delta, None)
                    }
                    "text" => match block.text.as_ref().map(Text::as_str) {
                        Some(text) if !text.is_empty() => text_chunk(out, ctx, model, text),
                        _ => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
            "content_block_delta" => {
                let Some(delta) = &e.delta else {
                    return Ok(());
                };
                match delta.kind.as_ref().map(Text::as_str) {
                    Some("text_delta") => match delta.text.as_ref().map(Text::as_str) {
                        Some(text) if !text.is_empty() => text_chunk(out, ctx, model, text),
                        _ => Ok(()),
                    },
                    Some("input_json_delta") => {
                        let partial = delta.partial_json.as_ref().map_or("", Text::as_str);
                        match self.tool_block {
                            Some((block, index))
                                if Some(block) == e.index && !partial.is_empty() =>
                            {
                                let calls = [ToolCallOut {
                                    index: Some(index),
                                    id: None,
                                    kind: None,
                                    function: FunctionOut {
                                        name: None,
                                        arguments: Some(Cow::Borrowed(partial)),
                                    },
                                }];
                                let delta = Delta {
                                    tool_calls: &calls,
                                    ..Delta::default()
                                };
                                openai::write_chat_chunk(out, ctx, model, delta, None)
                            }
                            _ => Ok(()),
                        }
                    }
                    // thinking_delta, signature_delta, citations_delta: no OpenAI equivalent.
                    _ => Ok(()),
                }
            }
            "content_block_stop" => {
                if self
                    .tool_block
                    .is_some_and(|(block, _)| Some(block) == e.index)
                {
                    self.tool_block = None;
                }
                Ok(())
            }
            "message_delta" => {
                if let Some(usage) = &e.usage {
                    meter.anthropic(usage);
                }
                if let Some(reason) = e.delta.as_ref().and_then(|d| d.stop_reason.as_ref()) {
                    self.stop_reason = Some(reason.as_str().to_owned());
                }
                Ok(())
            }
            // The finish chunk waits for the end: there may be more than one `message_delta`.
            "message_stop" => {
                self.done = true;
                let reason = finish_reason(self.stop_reason.as_deref());
                openai::write_chat_end(out, ctx, model, reason, meter.count())
            }
            "error" => {
                self.done = true;
                let (kind, message) = e.error.as_ref().map_or((None, ""), |err| {
                    (
                        err.kind.as_ref().map(Text::as_str),
                        err.message.as_ref().map_or("", Text::as_str),
                    )
                });
                let status = upstream_error::anthropic_status(kind);
                upstream_error::write_stream_error(out, status, kind, message, ctx)
            }
            // `ping`, and event types added later (the API says to expect them).
            _ => Ok(()),
        }
    }
}

fn text_chunk(
    out: &mut Vec<u8>,
    ctx: &OutputContext,
    model: &str,
    text: &str,
) -> Result<(), StreamError> {
    let delta = Delta {
        content: Some(text),
        ..Delta::default()
    };
    openai::write_chat_chunk(out, ctx, model, delta, None)
}

/// A whole Anthropic response, reduced to the fields the translation reads, as an OpenAI body.
pub fn body(
    kind: ResponseKind,
    reduced: &[u8],
    ctx: &OutputContext,
    meter: &mut UsageMeter,
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let malformed =
        |e: serde_json::Error| StreamError::Malformed(format!("Anthropic response: {e}"));
    match kind {
        ResponseKind::AnthropicMessages => {
            #[derive(Deserialize)]
            struct Message<'a> {
                #[serde(borrow)]
                model: Option<Text<'a>>,
                #[serde(borrow, default)]
                content: Vec<BlockIn<'a>>,
                #[serde(borrow)]
                stop_reason: Option<Text<'a>>,
                usage: Option<AnthropicUsage>,
            }
            let m: Message<'_> = serde_json::from_slice(reduced).map_err(malformed)?;
            if let Some(usage) = &m.usage {
                meter.anthropic(usage);
            }
            let mut text = String::new();
            let mut tool_calls = Vec::new();
            for block in &m.content {
                match block.kind.as_str() {
                    "text" => text.push_str(block.text.as_ref().map_or("", Text::as_str)),
                    "tool_use" => tool_calls.push(ToolCallOut {
                        index: None,
                        id: block.id.as_ref().map(|id| Cow::Borrowed(id.as_str())),
                        kind: Some("function"),
                        function: FunctionOut {
                            name: block.name.as_ref().map(Text::as_str),
                            arguments: Some(Cow::Owned(
                                block
                                    .input
                                    .as_ref()
                                    .map_or_else(|| "{}".to_owned(), Value::to_string),
                            )),
                        },
                    }),
                    _ => {}
                }
            }
            let content = (!text.is_empty() || tool_calls.is_empty()).then_some(Cow::Owned(text));
            let choice = ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    tool_calls,
                },
                logprobs: None,
                finish_reason: finish_reason(m.stop_reason.as_ref().map(Text::as_str)),
            };
            let model = m.model.as_ref().map_or(ctx.model.as_str(), Text::as_str);
            openai::write_completion(out, ctx, model, "chat.completion", choice, meter.count())
        }
        ResponseKind::AnthropicModels => {
            #[derive(Deserialize)]
            struct Models<'a> {
                #[serde(borrow, default)]
                data: Vec<ModelIn<'a>>,
            }
            #[derive(Deserialize)]
            struct ModelIn<'a> {
                #[serde(borrow)]
                id: Text<'a>,
                #[serde(borrow)]
                created_at: Option<Text<'a>>,
            }
            let models: Models<'_> = serde_json::from_slice(reduced).map_err(malformed)?;
            let models = models.data.iter().map(|m| {
                let created_at = m.created_at.as_ref().map(Text::as_str);
                (m.id.as_str(), created_at, "anthropic")
            });
            openai::write_model_list(out, models)
        }
        _ => Err(StreamError::Encode(format!(
            "{kind:?} is not an Anthropic body"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn translate(body: &str) -> Value {
        json(
            &messages_request(body.as_bytes(), &RequestOptions::default())
                .unwrap()
                .0,
        )
    }

    #[test]
    fn messages_request_matches_the_golden_translation() {
        let (body, plan) = messages_request(
            include_bytes!("../../../tests/fixtures/openai/chat_request_claude.json"),
            &RequestOptions::default(),
        )
        .unwrap();
        let expected = json(include_bytes!(
            "../../../tests/fixtures/anthropic/messages_request.expected.json"
        ));
        assert_eq!(json(&body), expected);
        assert_eq!(plan.kind, ResponseKind::AnthropicMessages);
        assert!(plan.stream);
        assert!(!plan.client_wants_usage);
    }

    #[test]
    fn max_tokens_defaults_to_the_configured_value() {
        let options = RequestOptions {
            anthropic_max_tokens: 1234,
            ..RequestOptions::default()
        };
        let (body, _) = messages_request(
            br#"{"model":"claude","messages":[{"role":"user","content":"hi"}]}"#,
            &options,
        )
        .unwrap();
        let body = json(&body);
        assert_eq!(body["max_tokens"], 1234);
        assert_eq!(body["stream"], false);
        assert_eq!(
            body["messages"],
            serde_json::json!([{"role":"user","content":[{"type":"text","text":"hi"}]}])
        );
        assert!(body.get("tool_choice").is_none());
    }

    #[test]
    fn max_completion_tokens_and_stop_string_are_mapped() {
        let body = translate(
            r#"{"model":"c","max_completion_tokens":9,"stop":"END","messages":[{"role":"user","content":"x"}]}"#,
        );
        assert_eq!(body["max_tokens"], 9);
        assert_eq!(body["stop_sequences"], serde_json::json!(["END"]));
    }

    #[test]
    fn tool_choice_variants_are_mapped() {
        let tools = r#""tools":[{"type":"function","function":{"name":"f"}}]"#;
        let choice = |c: &str| {
            translate(&format!(
                r#"{{"model":"c","messages":[],{tools},"tool_choice":{c}}}"#
            ))["tool_choice"]
                .clone()
        };
        assert_eq!(choice(r#""auto""#), serde_json::json!({"type":"auto"}));
        assert_eq!(choice(r#""required""#), serde_json::json!({"type":"any"}));
        assert_eq!(choice(r#""none""#), serde_json::json!({"type":"none"}));
        assert_eq!(
            choice(r#"{"type":"function","function":{"name":"f"}}"#),
            serde_json::json!({"type":"tool","name":"f"})
        );
        let body = translate(&format!(
            r#"{{"model":"c","messages":[],{tools},"parallel_tool_calls":false}}"#
        ));
        assert_eq!(
            body["tool_choice"],
            serde_json::json!({"type":"auto","disable_parallel_tool_use":true})
        );
        assert_eq!(
            body["tools"],
            serde_json::json!([{"name":"f","input_schema":{"type":"object"}}])
        );
    }

    #[test]
    fn consecutive_tool_results_become_one_user_turn() {
        let body = translate(
            r#"{"model":"c","messages":[
                {"role":"assistant","content":"","tool_calls":[
                    {"id":"a","type":"function","function":{"name":"f","arguments":"{}"}},
                    {"id":"b","type":"function","function":{"name":"g","arguments":""}}]},
                {"role":"tool","tool_call_id":"a","content":"1"},
                {"role":"tool","tool_call_id":"b","content":[{"type":"text","text":"2"}]},
                {"role":"user","content":"go on"}]}"#,
        );
        assert_eq!(
            body["messages"],
            serde_json::json!([
                {"role":"assistant","content":[
                    {"type":"tool_use","id":"a","name":"f","input":{}},
                    {"type":"tool_use","id":"b","name":"g","input":{}}]},
                {"role":"user","content":[
                    {"type":"tool_result","tool_use_id":"a","content":"1"},
                    {"type":"tool_result","tool_use_id":"b","content":"2"},
                    {"type":"text","text":"go on"}]}
            ])
        );
    }

    #[test]
    fn tool_messages_without_ids_and_unknown_roles_are_400() {
        for body in [
            r#"{"model":"c","messages":[{"role":"tool","content":"x"}]}"#,
            r#"{"model":"c","messages":[{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}]}"#,
            r#"{"model":"c","messages":[{"role":"wizard","content":"x"}]}"#,
            r#"{"model":"c","messages":[],"tool_choice":"sometimes"}"#,
        ] {
            let err = messages_request(body.as_bytes(), &RequestOptions::default()).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
        }
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        assert_eq!(finish_reason(Some("end_turn")), "stop");
        assert_eq!(finish_reason(Some("stop_sequence")), "stop");
        assert_eq!(finish_reason(Some("max_tokens")), "length");
        assert_eq!(finish_reason(Some("tool_use")), "tool_calls");
        assert_eq!(finish_reason(Some("refusal")), "content_filter");
        assert_eq!(finish_reason(None), "stop");
    }
}
