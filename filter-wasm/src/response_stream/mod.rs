//! Owns the per-response state machine the exchange drives chunk by chunk: it forwards, rewrites or
//! (for whole-body translations) collects the upstream's bytes, and counts the tokens the
//! upstream reports.
//!
//! The exchange creates one [`ResponseTranscoder`] in the response-headers callback (status known),
//! calls [`ResponseTranscoder::push_into`] for each body chunk and sends what it wrote at once,
//! calls [`ResponseTranscoder::finish_into`] at end of stream, and reads
//! [`ResponseTranscoder::usage`] when the stream is done (or aborted).
//!
//! Streams are rewritten as soon as a complete line or event has arrived; only an unfinished
//! line is held, so time to first byte is unchanged. Memory held per response between chunks:
//!
//! | mode                                  | bound (defaults)                                      |
//! |---------------------------------------|-------------------------------------------------------|
//! | NDJSON stream, translated or counted  | 2 × `max_line_bytes` (128 KiB): a partial line, or the kept fields of an over-long one (Ollama's final line with its `context` array is read this way) |
//! | SSE stream, translated or counted     | 2 × `max_line_bytes` + `max_event_bytes` (192 KiB): partial line, event name, event data |
//! | passthrough body (not streamed)       | 4 KiB: only the usage fields are kept                 |
//! | translated body (not streamed)        | `max_body_bytes` (8 MiB): only the fields translated are kept; skipped ones cost nothing |
//! | error body of a translated request    | 64 KiB                                                |
//!
//! plus a few small strings (model name, stop reason) and the output of one push, which is
//! proportional to that push's input. Buffers are reused, so their allocated capacity may round
//! up to twice what they hold. Each chunk is scanned once; complete lines are parsed once.

#[cfg(test)]
mod golden_tests;

use crate::stream::json_fields::FieldScanner;
use crate::stream::line_splitter::{LineSplitter, Overlong, Segment};
use crate::stream::ndjson::NdjsonReader;
use crate::stream::sse::{Oversize, SseParser};
use crate::stream::StreamError;
use crate::translate::openai::{ChunkUsage, OutputContext};
use crate::translate::{anthropic, ollama, upstream_error, ResponseKind, ResponsePlan};
use crate::usage::{AnthropicUsage, OllamaCounts, OpenAiUsage, TokenCount, UsageMeter};

/// Caps on what one response may make the filter hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One line of a stream (SSE or NDJSON).
    pub max_line_bytes: usize,
    /// The joined `data:` of one SSE event.
    pub max_event_bytes: usize,
    /// The fields of a non-streamed response translated as a whole.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            max_event_bytes: 64 * 1024,
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

/// What the client is told about the response that the upstream does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// Envoy's `x-request-id`; becomes the response id (`chatcmpl-<id>`) and the error body's
    /// `request_id`.
    pub request_id: String,
    /// Unix seconds, for OpenAI's `created`.
    pub created: u64,
}

/// Usage fields are small; a passthrough body's are held only up to this.
const COUNT_FIELDS_MAX_BYTES: usize = 4 * 1024;
/// An upstream error body is read only up to this; past it the error gets a generic message.
const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
const USAGE_FIELDS: &[&str] = &["usage"];

pub struct ResponseTranscoder {
    mode: Mode,
    meter: UsageMeter,
    ctx: OutputContext,
    failed: Option<StreamError>,
    finished: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    OpenAi,
    Ollama,
    Anthropic,
}

enum Mode {
    /// Forwarded as is, not counted.
    Verbatim,
    /// Forwarded as is; usage read from the body's top-level fields.
    CountBody {
        fields: FieldScanner,
        flavor: Flavor,
        counting: bool,
    },
    /// Forwarded as is; usage read from Ollama's final line.
    CountOllamaStream {
        ndjson: NdjsonReader,
        counting: bool,
    },
    /// Forwarded as is; usage read from Anthropic's usage events.
    CountAnthropicStream { sse: SseParser, counting: bool },
    /// OpenAI SSE passed through line by line, counted, the injected usage chunk removed.
    OpenAiStream(OpenAiStream),
    OllamaStream {
        ndjson: NdjsonReader,
        state: ollama::StreamState,
    },
    AnthropicStream {
        sse: SseParser,
        state: anthropic::StreamState,
    },
    /// A whole response translated at the end from its kept fields.
    Body {
        fields: FieldScanner,
        kind: ResponseKind,
        reduced: Option<Vec<u8>>,
        max: usize,
    },
    /// An upstream error for a translated request, rewritten at the end.
    ErrorBody {
        fields: FieldScanner,
        status: u16,
        reduced: Option<Vec<u8>>,
        readable: bool,
    },
}

impl ResponseTranscoder {
    /// `status` is the upstream's response status: a translated request whose upstream failed
    /// gets its error rewritten in Tollgate's shape; a passthrough one gets it unchanged.
    pub fn new(plan: &ResponsePlan, status: u16, meta: ResponseMeta, limits: Limits) -> Self {
        let prefix = match plan.kind {
            ResponseKind::OllamaGenerate => "cmpl-",
            _ => "chatcmpl-",
        };
        let id_part = if meta.request_id.is_empty() {
            "tollgate"
        } else {
            meta.request_id.as_str()
        };
        let ctx = OutputContext {
            id: format!("{prefix}{id_part}"),
            created: meta.created,
            model: plan.model.clone().unwrap_or_default(),
            request_id: meta.request_id,
            include_usage: plan.client_wants_usage,
            embeddings_base64: plan.embeddings_base64,
        };
        ResponseTranscoder {
            mode: Mode::new(plan, status, limits),
            meter: UsageMeter::default(),
            ctx,
            failed: None,
            finished: false,
        }
    }

    /// Takes the next body chunk; returns the bytes to send now in its place.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        self.push_into(chunk, &mut out)?;
        Ok(out)
    }

    /// As [`push`](Self::push), appending to a buffer the caller reuses.
    pub fn push_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.finished {
            return Ok(());
        }
        let result = self.mode.push(chunk, &self.ctx, &mut self.meter, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Ends the stream; returns the last bytes to send (`[DONE]`, a translated body, …).
    /// [`StreamError::Truncated`] means a translated stream ended before the upstream's end
    /// marker: the client got no end marker either. Calling it again returns nothing.
    pub fn finish(&mut self) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        self.finish_into(&mut out)?;
        Ok(out)
    }

    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let result = self.mode.finish(&self.ctx, &mut self.meter, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// The tokens the upstream reported so far.
    pub fn usage(&self) -> TokenCount {
        self.meter.count()
    }

    /// Events or lines of a streamed response so far (see [`UsageMeter::events`]).
    pub fn stream_events(&self) -> u64 {
        self.meter.events()
    }

    /// Whether the upstream reported usage at all; when not, [`usage`](Self::usage) is zero
    /// because nothing is known, and the caller should debit its reservation instead.
    pub fn usage_reported(&self) -> bool {
        self.meter.reported()
    }

    /// The `content-type` the response must get, when it changes.
    pub fn content_type(&self) -> Option<&'static str> {
        match self.mode {
            Mode::OllamaStream { .. } => Some("text/event-stream"),
            Mode::Body { .. } | Mode::ErrorBody { .. } => Some("application/json"),
            _ => None,
        }
    }

    /// Whether the output differs from the input. When `false`, the output of each push is
    /// its input and the exchange may leave the body (and `content-length`) alone; when `true`,
    /// it must remove `content-length` in the response headers.
    pub fn rewrites_body(&self) -> bool {
        match &self.mode {
            Mode::Verbatim
            | Mode::CountBody { .. }
            | Mode::CountOllamaStream { .. }
            | Mode::CountAnthropicStream { .. } => false,
            Mode::OpenAiStream(s) => s.strip_usage,
            _ => true,
        }
    }

    /// Whether nothing is sent before [`finish`](Self::finish) (a body translated as a
    /// whole). The exchange may then hold the response headers until the end, so that a failure
    /// can still become an error reply.
    pub fn holds_whole_body(&self) -> bool {
        matches!(self.mode, Mode::Body { .. } | Mode::ErrorBody { .. })
    }
}

impl Mode {
    fn new(plan: &ResponsePlan, status: u16, limits: Limits) -> Mode {
        use ResponseKind::*;
        let ok = (200..300).contains(&status);
        let count_stream_ndjson = || NdjsonReader::new(limits.max_line_bytes, ollama::COUNT_FIELDS);
        let count_sse = || {
            SseParser::new(
                limits.max_line_bytes,
                limits.max_event_bytes,
                Oversize::Skip,
            )
        };
        let count_body = |flavor: Flavor| {
            let keys = match flavor {
                Flavor::Ollama => ollama::COUNT_FIELDS,
                Flavor::OpenAi | Flavor::Anthropic => USAGE_FIELDS,
            };
            Mode::CountBody {
                fields: FieldScanner::new(keys, COUNT_FIELDS_MAX_BYTES),
                flavor,
                counting: true,
            }
        };
        let body = |kind: ResponseKind, keys: &'static [&'static str]| Mode::Body {
            fields: FieldScanner::new(keys, limits.max_body_bytes),
            kind,
            reduced: None,
            max: limits.max_body_bytes,
        };
        match plan.kind {
            Opaque => Mode::Verbatim,
            OpenAiPassthrough | OllamaPassthrough | AnthropicPassthrough if !ok => Mode::Verbatim,
            OpenAiPassthrough if plan.stream => Mode::OpenAiStream(OpenAiStream {
                lines: LineSplitter::new(limits.max_line_bytes, Overlong::Report),
                strip_usage: !plan.client_wants_usage,
                dropping: false,
            }),
            OllamaPassthrough if plan.stream => Mode::CountOllamaStream {
                ndjson: count_stream_ndjson(),
                counting: true,
            },
            AnthropicPassthrough if plan.stream => Mode::CountAnthropicStream {
                sse: count_sse(),
                counting: true,
            },
            OpenAiPassthrough => count_body(Flavor::OpenAi),
            OllamaPassthrough => count_body(Flavor::Ollama),
            AnthropicPassthrough => count_body(Flavor::Anthropic),
            _ if !ok => Mode::ErrorBody {
                fields: FieldScanner::new(upstream_error::ERROR_FIELDS, ERROR_BODY_MAX_BYTES),
                status,
                reduced: None,
                readable: true,
            },
            OllamaChat | OllamaGenerate if plan.stream => Mode::OllamaStream {
                ndjson: NdjsonReader::new(limits.max_line_bytes, ollama::GENERATION_FIELDS),
                state: ollama::StreamState::new(plan.kind),
            },
            AnthropicMessages if plan.stream => Mode::AnthropicStream {
                sse: SseParser::new(
                    limits.max_line_bytes,
                    limits.max_event_bytes,
                    Oversize::Fail,
                ),
                state: anthropic::StreamState::default(),
            },
            OllamaChat | OllamaGenerate => body(plan.kind, ollama::GENERATION_FIELDS),
            OllamaEmbed => body(plan.kind, ollama::EMBED_FIELDS),
            OllamaTags => body(plan.kind, ollama::TAGS_FIELDS),
            AnthropicMessages => body(plan.kind, anthropic::MESSAGE_FIELDS),
            AnthropicModels => body(plan.kind, anthropic::MODELS_FIELDS),
        }
    }

    fn push(
        &mut self,
        chunk: &[u8],
        ctx: &OutputContext,
        meter: &mut UsageMeter,
        out: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        match self {
            Mode::Verbatim => {
                out.extend_from_slice(chunk);
                Ok(())
            }
            Mode::CountBody {
                fields,
                flavor,
                counting,
            } => {
                out.extend_from_slice(chunk);
                if *counting {
                    let flavor = *flavor;
                    // Counting never fails a passthrough: the bytes are the client's already.
                    *counting = fields
                        .feed(chunk, |obj| count_body(flavor, obj, meter))
                        .is_ok();
                }
                Ok(())
            }
            Mode::CountOllamaStream { ndjson, counting } => {
                out.extend_from_slice(chunk);
                if *counting {
                    *counting = ndjson
                        .feed(chunk, |line| {
                            meter.event();
                            count_ollama_line(line, meter)
                        })
                        .is_ok();
                }
                Ok(())
            }
            Mode::CountAnthropicStream { sse, counting } => {
                out.extend_from_slice(chunk);
                if *counting {
                    *counting = sse
                        .feed(chunk, |event| {
                            meter.event();
                            count_anthropic_event(event.data, meter)
                        })
                        .is_ok();
                }
                Ok(())
            }
            Mode::OpenAiStream(stream) => {
                stream.push(chunk, meter, out);
                Ok(())
            }
            Mode::OllamaStream { ndjson, state } => ndjson.feed(chunk, |line| {
                meter.event();
                state.line(line, ctx, meter, out)
            }),
            Mode::AnthropicStream { sse, state } => sse.feed(chunk, |event| {
                meter.event();
                state.event(event.data, ctx, meter, out)
            }),
            Mode::Body {
                fields,
                reduced,
                max,
                ..
            } => fields
                .feed(chunk, |obj| keep_first(reduced, obj))
                .map_err(|e| match e {
                    StreamError::EventTooLarge { .. } => StreamError::BodyTooLarge { max: *max },
                    other => other,
                }),
            Mode::ErrorBody {
                fields,
                reduced,
                readable,
                ..
            } => {
                if *readable {
                    *readable = fields.feed(chunk, |obj| keep_first(reduced, obj)).is_ok();
                }
                Ok(())
            }
        }
    }

    fn finish(
        &mut self,
        ctx: &OutputContext,
        meter: &mut UsageMeter,
        out: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        match self {
            Mode::Verbatim | Mode::CountBody { .. } => Ok(()),
            Mode::CountOllamaStream { ndjson, counting } => {
                if *counting {
                    let _ = ndjson.finish(|line| count_ollama_line(line, meter));
                }
                Ok(())
            }
            Mode::CountAnthropicStream { sse, counting } => {
                if *counting {
                    let _ = sse.finish(|event| count_anthropic_event(event.data, meter));
                }
                Ok(())
            }
            Mode::OpenAiStream(stream) => {
                stream.finish(meter, out);
                Ok(())
            }
            Mode::OllamaStream { ndjson, state } => {
                ndjson
                    .finish(|line| state.line(line, ctx, meter, out))
                    .map_err(cut_short)?;
                if state.done() {
                    Ok(())
                } else {
                    Err(StreamError::Truncated)
                }
            }
            Mode::AnthropicStream { sse, state } => {
                sse.finish(|event| state.event(event.data, ctx, meter, out))
                    .map_err(cut_short)?;
                if state.done() {
                    Ok(())
                } else {
                    Err(StreamError::Truncated)
                }
            }
            Mode::Body { kind, reduced, .. } => {
                let Some(reduced) = reduced.as_deref() else {
                    return Err(StreamError::Malformed(
                        "the response body is not a JSON object".to_owned(),
                    ));
                };
                match kind {
                    ResponseKind::AnthropicMessages | ResponseKind::AnthropicModels => {
                        anthropic::body(*kind, reduced, ctx, meter, out)
                    }
                    _ => ollama::body(*kind, reduced, ctx, meter, out),
                }
            }
            Mode::ErrorBody {
                status,
                reduced,
                readable,
                ..
            } => {
                let reduced = reduced.as_deref().filter(|_| *readable);
                out.extend_from_slice(
                    upstream_error::render(*status, reduced, &ctx.request_id).as_bytes(),
                );
                Ok(())
            }
        }
    }
}

/// At the end of a stream only an unterminated last line or event is read; when it does not
/// parse, the stream was cut inside it.
fn cut_short(e: StreamError) -> StreamError {
    match e {
        StreamError::Malformed(_) => StreamError::Truncated,
        other => other,
    }
}

/// A body holds one JSON value; anything after it is ignored.
fn keep_first(reduced: &mut Option<Vec<u8>>, obj: &[u8]) -> Result<(), StreamError> {
    if reduced.is_none() {
        *reduced = Some(obj.to_vec());
    }
    Ok(())
}

fn count_body(flavor: Flavor, obj: &[u8], meter: &mut UsageMeter) -> Result<(), StreamError> {
    #[derive(serde::Deserialize)]
    struct WithOpenAi {
        usage: Option<OpenAiUsage>,
    }
    #[derive(serde::Deserialize)]
    struct WithAnthropic {
        usage: Option<AnthropicUsage>,
    }
    // A body whose usage does not parse is simply not counted.
    match flavor {
        Flavor::OpenAi => {
            if let Ok(WithOpenAi { usage: Some(u) }) = serde_json::from_slice(obj) {
                meter.openai(u);
            }
        }
        Flavor::Anthropic => {
            if let Ok(WithAnthropic { usage: Some(u) }) = serde_json::from_slice(obj) {
                meter.anthropic(&u);
            }
        }
        Flavor::Ollama => {
            if let Ok(counts) = serde_json::from_slice::<OllamaCounts>(obj) {
                meter.ollama(counts);
            }
        }
    }
    Ok(())
}

fn count_ollama_line(line: &[u8], meter: &mut UsageMeter) -> Result<(), StreamError> {
    if let Ok(counts) = serde_json::from_slice::<OllamaCounts>(line) {
        meter.ollama(counts);
    }
    Ok(())
}

fn count_anthropic_event(data: &[u8], meter: &mut UsageMeter) -> Result<(), StreamError> {
    #[derive(serde::Deserialize)]
    struct Start {
        usage: Option<AnthropicUsage>,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        message: Option<Start>,
        usage: Option<AnthropicUsage>,
    }
    if let Ok(event) = serde_json::from_slice::<Event>(data) {
        if let Some(usage) = event.message.and_then(|m| m.usage) {
            meter.anthropic_start(&usage);
        }
        if let Some(usage) = event.usage {
            meter.anthropic(&usage);
        }
    }
    Ok(())
}

/// An OpenAI stream to an OpenAI client. Lines are read to count usage; when the gateway asked
/// for usage on the client's behalf, the usage-only event is removed, with its blank line.
struct OpenAiStream {
    lines: LineSplitter,
    strip_usage: bool,
    /// Inside the removed event, until its blank line.
    dropping: bool,
}

impl OpenAiStream {
    fn push(&mut self, chunk: &[u8], meter: &mut UsageMeter, out: &mut Vec<u8>) {
        let strip = self.strip_usage;
        if !strip {
            out.extend_from_slice(chunk);
        }
        let dropping = &mut self.dropping;
        // Lines over the cap are passed on in pieces (`Overlong::Report`), so this cannot fail.
        let _ = self.lines.feed(chunk, |segment| {
            openai_segment(segment, strip, dropping, meter, out)
        });
    }

    fn finish(&mut self, meter: &mut UsageMeter, out: &mut Vec<u8>) {
        let strip = self.strip_usage;
        let dropping = &mut self.dropping;
        let _ = self
            .lines
            .finish(|segment| openai_segment(segment, strip, dropping, meter, out));
    }
}

fn openai_segment(
    segment: Segment<'_>,
    strip: bool,
    dropping: &mut bool,
    meter: &mut UsageMeter,
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    match segment {
        Segment::Line(line) => {
            if *dropping {
                *dropping = !line.is_empty();
                return Ok(());
            }
            let keep = match line.strip_prefix(b"data:") {
                Some(data) => {
                    meter.event();
                    let data = data.strip_prefix(b" ").unwrap_or(data);
                    match serde_json::from_slice::<ChunkUsage>(data) {
                        Ok(chunk) => {
                            if let Some(usage) = chunk.usage {
                                meter.openai(usage);
                            }
                            !(strip && chunk.is_usage_only())
                        }
                        // `[DONE]`, or not JSON: not ours to judge.
                        Err(_) => true,
                    }
                }
                None => true,
            };
            if !keep {
                *dropping = true;
            } else if strip {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
        }
        // A usage chunk is never this long: pass it on as it comes.
        Segment::Overlong { part, end } => {
            if strip && !*dropping {
                out.extend_from_slice(part);
                if end {
                    out.push(b'\n');
                }
            }
        }
    }
    Ok(())
}
