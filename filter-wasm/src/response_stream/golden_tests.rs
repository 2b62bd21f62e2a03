//! Golden transcripts: each upstream recording under `tests/fixtures/` is fed to the transcoder
//! whole, split in two at every byte offset, and byte by byte; the output and the count must be
//! the same every time and equal the expected transcript.
//!
//! `TOLLGATE_BLESS=1 cargo test -p tollgate-filter golden` rewrites the expected files from the
//! current output; review the diff before keeping it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::stream::split_test::splits;
use crate::translate::{ResponseKind, ResponsePlan};

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!("../../../tests/fixtures/", $path)).as_slice()
    };
}

/// An expected transcript: its name (for blessing) and its bytes.
macro_rules! expected {
    ($path:literal) => {
        Expected {
            name: $path,
            bytes: fixture!($path),
        }
    };
}

struct Expected {
    name: &'static str,
    bytes: &'static [u8],
}

fn plan(kind: ResponseKind, model: &str, stream: bool, client_wants_usage: bool) -> ResponsePlan {
    ResponsePlan {
        kind,
        model: Some(model.to_owned()),
        stream,
        client_wants_usage,
        embeddings_base64: false,
    }
}

fn meta() -> ResponseMeta {
    ResponseMeta {
        request_id: "req-7".to_owned(),
        created: 1_741_000_000,
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    out: Vec<u8>,
    usage: TokenCount,
    reported: bool,
    result: Result<(), StreamError>,
}

fn run(plan: &ResponsePlan, status: u16, limits: Limits, chunks: &[&[u8]]) -> Run {
    let mut t = ResponseTranscoder::new(plan, status, meta(), limits);
    let mut out = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        result = t.push_into(chunk, &mut out);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = t.finish_into(&mut out);
    }
    Run {
        out,
        usage: t.usage(),
        reported: t.usage_reported(),
        result,
    }
}

/// Runs `input` whole, then at every split point and byte by byte; all runs must agree.
fn every_split(plan: &ResponsePlan, status: u16, limits: Limits, input: &[u8]) -> Run {
    let whole = run(plan, status, limits, &[input]);
    for chunks in splits(input) {
        let split = run(plan, status, limits, &chunks);
        assert!(
            split == whole,
            "split {:?} differs:\n--- whole\n{}\n--- split\n{}",
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            String::from_utf8_lossy(&whole.out),
            String::from_utf8_lossy(&split.out),
        );
    }
    whole
}

fn bless_path(name: &str) -> Option<String> {
    std::env::var_os("TOLLGATE_BLESS")
        .map(|_| format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR")))
}

/// Byte-exact comparison (SSE transcripts).
fn assert_golden(actual: &[u8], expected: Expected) {
    if let Some(path) = bless_path(expected.name) {
        std::fs::write(path, actual).unwrap();
        return;
    }
    assert!(
        actual == expected.bytes,
        "{} differs:\n--- expected\n{}\n--- actual\n{}",
        expected.name,
        String::from_utf8_lossy(expected.bytes),
        String::from_utf8_lossy(actual),
    );
}

/// JSON comparison (bodies; the files are pretty-printed for reading).
fn assert_golden_json(actual: &[u8], expected: Expected) {
    let actual: serde_json::Value = serde_json::from_slice(actual).expect("output is JSON");
    if let Some(path) = bless_path(expected.name) {
        let mut pretty = serde_json::to_vec_pretty(&actual).unwrap();
        pretty.push(b'\n');
        std::fs::write(path, pretty).unwrap();
        return;
    }
    let wanted: serde_json::Value =
        serde_json::from_slice(expected.bytes).expect("fixture is JSON");
    assert_eq!(actual, wanted, "{} differs", expected.name);
}

/// A translated stream: the same at every split, OpenAI SSE ending in `[DONE]`, and equal to
/// the transcript.
fn translated_stream(p: &ResponsePlan, limits: Limits, input: &[u8], expected: Expected) -> Run {
    let r = every_split(p, 200, limits, input);
    assert_eq!(r.result, Ok(()));
    assert_openai_sse(&r.out);
    assert_golden(&r.out, expected);
    r
}

/// A body translated as a whole: the same at every split and equal to the expected JSON.
fn translated_body(p: &ResponsePlan, status: u16, input: &[u8], expected: Expected) -> Run {
    let r = every_split(p, status, Limits::default(), input);
    assert_eq!(r.result, Ok(()));
    assert_golden_json(&r.out, expected);
    r
}

fn count(prompt: u64, completion: u64) -> TokenCount {
    TokenCount { prompt, completion }
}

/// Every `data:` payload but `[DONE]` is JSON, and the stream ends with `[DONE]`.
fn assert_openai_sse(out: &[u8]) {
    let text = std::str::from_utf8(out).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "no [DONE]:\n{text}");
    for event in text.split_terminator("\n\n") {
        let data = event
            .strip_prefix("data: ")
            .expect("one data line per event");
        if data != "[DONE]" {
            let _: serde_json::Value = serde_json::from_str(data).unwrap();
        }
    }
}

// --- Ollama → OpenAI ---------------------------------------------------------------------------

#[test]
fn ollama_chat_stream_becomes_openai_chunks_with_role_first_and_finish_last() {
    let p = plan(ResponseKind::OllamaChat, "llama3.2", true, false);
    let r = translated_stream(
        &p,
        Limits::default(),
        fixture!("ollama/chat_stream.ndjson"),
        expected!("ollama/chat_stream.expected.sse"),
    );
    assert_eq!(r.usage, count(26, 5));
    assert!(r.reported);
}

#[test]
fn ollama_chat_stream_with_include_usage_adds_a_usage_chunk_before_done() {
    let p = plan(ResponseKind::OllamaChat, "llama3.2", true, true);
    translated_stream(
        &p,
        Limits::default(),
        fixture!("ollama/chat_stream.ndjson"),
        expected!("ollama/chat_stream.usage.expected.sse"),
    );
}

#[test]
fn ollama_tool_call_stream_becomes_tool_call_chunks_and_tool_calls_finish() {
    let p = plan(ResponseKind::OllamaChat, "qwen3", true, false);
    let r = translated_stream(
        &p,
        Limits::default(),
        fixture!("ollama/chat_tool_stream.ndjson"),
        expected!("ollama/chat_tool_stream.expected.sse"),
    );
    assert_eq!(r.usage, count(190, 27));
}

#[test]
fn ollama_generate_stream_becomes_text_completion_chunks() {
    let p = plan(ResponseKind::OllamaGenerate, "qwen2.5-coder", true, true);
    let r = translated_stream(
        &p,
        Limits::default(),
        fixture!("ollama/generate_stream.ndjson"),
        expected!("ollama/generate_stream.expected.sse"),
    );
    assert_eq!(r.usage, count(31, 8));
}

#[test]
fn ollama_final_line_longer_than_the_cap_is_read_without_its_context() {
    let input = fixture!("ollama/generate_stream.ndjson");
    let final_line = input.split(|b| *b == b'\n').rev().nth(1).unwrap();
    let limits = Limits {
        max_line_bytes: 512,
        ..Limits::default()
    };
    assert!(final_line.len() > 4 * limits.max_line_bytes);
    let p = plan(ResponseKind::OllamaGenerate, "qwen2.5-coder", true, true);
    let r = translated_stream(
        &p,
        limits,
        input,
        expected!("ollama/generate_stream.expected.sse"),
    );
    assert_eq!(r.usage, count(31, 8));
}

#[test]
fn ollama_chat_body_becomes_a_chat_completion() {
    let p = plan(ResponseKind::OllamaChat, "llama3.2", false, false);
    let r = translated_body(
        &p,
        200,
        fixture!("ollama/chat.json"),
        expected!("ollama/chat.expected.json"),
    );
    assert_eq!(r.usage, count(26, 9));
}

#[test]
fn ollama_tool_call_body_gets_call_ids_json_arguments_and_tool_calls_finish() {
    let p = plan(ResponseKind::OllamaChat, "llama3.1", false, false);
    translated_body(
        &p,
        200,
        fixture!("ollama/chat_tool.json"),
        expected!("ollama/chat_tool.expected.json"),
    );
}

#[test]
fn ollama_generate_body_becomes_a_text_completion() {
    let p = plan(ResponseKind::OllamaGenerate, "qwen2.5-coder", false, false);
    let r = translated_body(
        &p,
        200,
        fixture!("ollama/generate.json"),
        expected!("ollama/generate.expected.json"),
    );
    assert_eq!(r.usage, count(31, 8));
}

#[test]
fn ollama_embed_body_becomes_an_embedding_list() {
    let p = plan(ResponseKind::OllamaEmbed, "all-minilm", false, false);
    let r = translated_body(
        &p,
        200,
        fixture!("ollama/embed.json"),
        expected!("ollama/embed.expected.json"),
    );
    assert_eq!(r.usage, count(8, 0));
}

#[test]
fn ollama_embed_body_is_base64_when_the_client_asked() {
    let mut p = plan(ResponseKind::OllamaEmbed, "all-minilm", false, false);
    p.embeddings_base64 = true;
    translated_body(
        &p,
        200,
        fixture!("ollama/embed.json"),
        expected!("ollama/embed.base64.expected.json"),
    );
}

#[test]
fn ollama_tags_become_an_openai_model_list() {
    let mut p = plan(ResponseKind::OllamaTags, "", false, false);
    p.model = None;
    let r = translated_body(
        &p,
        200,
        fixture!("ollama/tags.json"),
        expected!("ollama/tags.expected.json"),
    );
    assert!(!r.reported);
}

#[test]
fn ollama_error_becomes_tollgate_error_with_the_request_id() {
    let p = plan(ResponseKind::OllamaChat, "llama9", true, false);
    let r = translated_body(
        &p,
        404,
        fixture!("ollama/error_404.json"),
        expected!("ollama/error_404.expected.json"),
    );
    assert!(!r.reported);
}

// --- Anthropic → OpenAI ------------------------------------------------------------------------

#[test]
fn anthropic_stream_becomes_openai_chunks() {
    let p = plan(
        ResponseKind::AnthropicMessages,
        "claude-3-5-haiku-latest",
        true,
        false,
    );
    let r = translated_stream(
        &p,
        Limits::default(),
        fixture!("anthropic/messages_stream.sse"),
        expected!("anthropic/messages_stream.expected.sse"),
    );
    assert_eq!(r.usage, count(25, 12));
}

#[test]
fn anthropic_tool_use_stream_becomes_tool_call_chunks_with_usage() {
    let p = plan(
        ResponseKind::AnthropicMessages,
        "claude-sonnet-4-5",
        true,
        true,
    );
    let r = translated_stream(
        &p,
        Limits::default(),
        fixture!("anthropic/messages_tool_stream.sse"),
        expected!("anthropic/messages_tool_stream.expected.sse"),
    );
    // Cache reads are input tokens too.
    assert_eq!(r.usage, count(572, 89));
}

#[test]
fn anthropic_error_event_becomes_an_openai_error_event_and_ends_the_stream() {
    let p = plan(
        ResponseKind::AnthropicMessages,
        "claude-3-5-haiku-latest",
        true,
        false,
    );
    let r = every_split(
        &p,
        200,
        Limits::default(),
        fixture!("anthropic/error_stream.sse"),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.usage, count(25, 1));
    assert_golden(&r.out, expected!("anthropic/error_stream.expected.sse"));
}

#[test]
fn anthropic_message_body_becomes_a_chat_completion() {
    let p = plan(
        ResponseKind::AnthropicMessages,
        "claude-3-5-haiku-latest",
        false,
        false,
    );
    let r = translated_body(
        &p,
        200,
        fixture!("anthropic/messages.json"),
        expected!("anthropic/messages.expected.json"),
    );
    assert_eq!(r.usage, count(25, 12));
}

#[test]
fn anthropic_tool_use_body_becomes_tool_calls() {
    let p = plan(
        ResponseKind::AnthropicMessages,
        "claude-sonnet-4-5",
        false,
        false,
    );
    let r = translated_body(
        &p,
        200,
        fixture!("anthropic/messages_tool.json"),
        expected!("anthropic/messages_tool.expected.json"),
    );
    assert_eq!(r.usage, count(572, 89));
}

#[test]
fn anthropic_models_become_an_openai_model_list() {
    let mut p = plan(ResponseKind::AnthropicModels, "", false, false);
    p.model = None;
    translated_body(
        &p,
        200,
        fixture!("anthropic/models.json"),
        expected!("anthropic/models.expected.json"),
    );
}

#[test]
fn anthropic_error_body_becomes_tollgate_error() {
    let p = plan(ResponseKind::AnthropicMessages, "claude-9", false, false);
    translated_body(
        &p,
        404,
        fixture!("anthropic/error_404.json"),
        expected!("anthropic/error_404.expected.json"),
    );
}

// --- Passthrough: counted, bytes kept ----------------------------------------------------------

#[test]
fn openai_stream_loses_only_the_injected_usage_chunk_and_is_counted() {
    let p = plan(ResponseKind::OpenAiPassthrough, "gpt-4o-mini", true, false);
    let r = every_split(
        &p,
        200,
        Limits::default(),
        fixture!("openai/chat_stream.sse"),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.usage, count(19, 10));
    assert_golden(
        &r.out,
        expected!("openai/chat_stream.stripped.expected.sse"),
    );
}

#[test]
fn openai_stream_that_asked_for_usage_is_forwarded_unchanged_and_counted() {
    let input = fixture!("openai/chat_stream.sse");
    let p = plan(ResponseKind::OpenAiPassthrough, "gpt-4o-mini", true, true);
    let r = every_split(&p, 200, Limits::default(), input);
    assert_eq!(r.out, input);
    assert_eq!(r.usage, count(19, 10));
}

#[test]
fn openai_body_is_forwarded_unchanged_and_counted() {
    let input = fixture!("openai/chat.json");
    let p = plan(ResponseKind::OpenAiPassthrough, "gpt-4o-mini", false, false);
    let r = every_split(&p, 200, Limits::default(), input);
    assert_eq!(r.out, input);
    assert_eq!(r.usage, count(19, 10));
}

#[test]
fn ollama_native_streams_are_forwarded_unchanged_and_counted_even_with_a_huge_final_line() {
    let limits = Limits {
        max_line_bytes: 256,
        ..Limits::default()
    };
    for (input, expected) in [
        (fixture!("ollama/chat_stream.ndjson"), count(26, 5)),
        (fixture!("ollama/generate_stream.ndjson"), count(31, 8)),
    ] {
        let p = plan(ResponseKind::OllamaPassthrough, "m", true, false);
        let r = every_split(&p, 200, limits, input);
        assert_eq!(r.out, input);
        assert_eq!(r.usage, expected);
        assert_eq!(r.result, Ok(()));
    }
}

#[test]
fn ollama_native_bodies_are_forwarded_unchanged_and_counted() {
    for (input, expected) in [
        (fixture!("ollama/chat.json"), count(26, 9)),
        (fixture!("ollama/generate.json"), count(31, 8)),
        (fixture!("ollama/embed.json"), count(8, 0)),
    ] {
        let p = plan(ResponseKind::OllamaPassthrough, "m", false, false);
        let r = every_split(&p, 200, Limits::default(), input);
        assert_eq!(r.out, input);
        assert_eq!(r.usage, expected);
    }
}

#[test]
fn anthropic_native_stream_and_body_are_forwarded_unchanged_and_counted() {
    for (input, stream, expected) in [
        (
            fixture!("anthropic/messages_stream.sse"),
            true,
            count(25, 12),
        ),
        (
            fixture!("anthropic/messages_tool_stream.sse"),
            true,
            count(572, 89),
        ),
        (fixture!("anthropic/messages.json"), false, count(25, 12)),
    ] {
        let p = plan(ResponseKind::AnthropicPassthrough, "claude", stream, false);
        let r = every_split(&p, 200, Limits::default(), input);
        assert_eq!(r.out, input);
        assert_eq!(r.usage, expected);
    }
}

#[test]
fn passthrough_errors_and_opaque_responses_are_forwarded_unchanged_and_not_counted() {
    let error = fixture!("anthropic/error_404.json");
    for (kind, status) in [
        (ResponseKind::AnthropicPassthrough, 404),
        (ResponseKind::OpenAiPassthrough, 500),
        (ResponseKind::Opaque, 200),
    ] {
        let p = plan(kind, "m", true, false);
        let r = run(&p, status, Limits::default(), &[error]);
        assert_eq!(r.out, error);
        assert!(!r.reported);
        let t = ResponseTranscoder::new(&p, status, meta(), Limits::default());
        assert!(!t.rewrites_body());
        assert_eq!(t.content_type(), None);
    }
}

// --- Failures: clean errors, never growth ------------------------------------------------------

#[test]
fn translated_stream_cut_before_done_is_truncated_and_sends_no_done() {
    let input = fixture!("ollama/chat_stream.ndjson");
    let cut = &input[..input.len() - 300];
    let p = plan(ResponseKind::OllamaChat, "llama3.2", true, false);
    let r = every_split(&p, 200, Limits::default(), cut);
    assert_eq!(r.result, Err(StreamError::Truncated));
    assert!(!r.out.is_empty());
    assert!(!String::from_utf8_lossy(&r.out).contains("[DONE]"));
    assert!(!r.reported);

    let input = fixture!("anthropic/messages_stream.sse");
    let cut = &input[..input.len() - 40];
    let p = plan(ResponseKind::AnthropicMessages, "claude", true, false);
    let r = every_split(&p, 200, Limits::default(), cut);
    assert_eq!(r.result, Err(StreamError::Truncated));
    // Usage known so far is kept for the debit.
    assert_eq!(r.usage, count(25, 12));
}

#[test]
fn translated_stream_line_over_the_cap_fails_cleanly_at_every_split_point() {
    let limits = Limits {
        max_line_bytes: 100,
        max_event_bytes: 100,
        ..Limits::default()
    };
    let mut long = b"{\"model\":\"m\",\"message\":{\"content\":\"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 500));
    long.extend_from_slice(b"\"},\"done\":false}\n");
    let p = plan(ResponseKind::OllamaChat, "m", true, false);
    let r = every_split(&p, 200, limits, &long);
    assert_eq!(r.result, Err(StreamError::EventTooLarge { max: 100 }));

    let mut long = b"event: content_block_delta\ndata: ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 500));
    long.extend_from_slice(b"\n\n");
    let p = plan(ResponseKind::AnthropicMessages, "m", true, false);
    let r = every_split(&p, 200, limits, &long);
    assert_eq!(r.result, Err(StreamError::LineTooLong { max: 100 }));
}

#[test]
fn translated_body_over_the_cap_fails_instead_of_growing() {
    let limits = Limits {
        max_body_bytes: 64,
        ..Limits::default()
    };
    let p = plan(ResponseKind::OllamaEmbed, "all-minilm", false, false);
    let r = every_split(&p, 200, limits, fixture!("ollama/embed.json"));
    assert_eq!(r.result, Err(StreamError::BodyTooLarge { max: 64 }));
    assert!(r.out.is_empty());
}

#[test]
fn malformed_upstream_line_fails_the_translated_stream() {
    let p = plan(ResponseKind::OllamaChat, "m", true, false);
    let r = run(
        &p,
        200,
        Limits::default(),
        &[b"{\"done\":false}\nnot json\n"],
    );
    assert!(
        matches!(r.result, Err(StreamError::Malformed(_))),
        "{:?}",
        r.result
    );
}

#[test]
fn ollama_error_line_mid_stream_becomes_an_openai_error_event() {
    let p = plan(ResponseKind::OllamaChat, "m", true, false);
    let input = b"{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n{\"error\":\"an error was encountered while running the model: CUDA error\"}\n";
    let r = every_split(&p, 200, Limits::default(), input);
    assert_eq!(r.result, Ok(()));
    let text = String::from_utf8(r.out).unwrap();
    let last = text.split_terminator("\n\n").last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_error");
    assert_eq!(v["error"]["request_id"], "req-7");
    assert!(!text.contains("CUDA"), "upstream internals leaked: {text}");
    assert!(!text.contains("[DONE]"));
}

#[test]
fn upstream_html_error_page_becomes_a_generic_json_error() {
    let p = plan(ResponseKind::OllamaChat, "m", false, false);
    let r = run(
        &p,
        502,
        Limits::default(),
        &[b"<html><body>Bad Gateway</body></html>"],
    );
    assert_eq!(r.result, Ok(()));
    let v: serde_json::Value = serde_json::from_slice(&r.out).unwrap();
    assert_eq!(v["error"]["type"], "upstream_error");
    assert_eq!(v["error"]["code"], "upstream_error");
}

#[test]
fn errors_stick_and_finish_runs_once() {
    let p = plan(ResponseKind::OllamaChat, "m", true, false);
    let mut t = ResponseTranscoder::new(&p, 200, meta(), Limits::default());
    let err = t.push(b"nope\n").unwrap_err();
    assert_eq!(t.push(b"{}\n"), Err(err.clone()));
    assert_eq!(t.finish(), Err(err));

    let mut t = ResponseTranscoder::new(&p, 200, meta(), Limits::default());
    let out = t.push(fixture!("ollama/chat_stream.ndjson")).unwrap();
    assert!(!out.is_empty());
    assert_eq!(t.finish(), Ok(Vec::new()));
    assert_eq!(t.finish(), Ok(Vec::new()));
    assert_eq!(t.push(b"more"), Ok(Vec::new()));
}

// --- Glue contract -----------------------------------------------------------------------------

#[test]
fn first_complete_line_is_sent_at_once() {
    let input = fixture!("ollama/chat_stream.ndjson");
    let first_line_end = input.iter().position(|b| *b == b'\n').unwrap() + 1;
    let p = plan(ResponseKind::OllamaChat, "llama3.2", true, false);
    let mut t = ResponseTranscoder::new(&p, 200, meta(), Limits::default());
    assert_eq!(t.push(&input[..first_line_end - 1]).unwrap(), b"");
    let out = t.push(&input[first_line_end - 1..first_line_end]).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("Grüße"));

    let input = fixture!("anthropic/messages_stream.sse");
    let first_event_end = input.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    let p = plan(ResponseKind::AnthropicMessages, "claude", true, false);
    let mut t = ResponseTranscoder::new(&p, 200, meta(), Limits::default());
    let out = t.push(&input[..first_event_end]).unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("\"role\":\"assistant\""));
}

#[test]
fn glue_flags_follow_the_mode() {
    let t = |kind, stream, usage, status| {
        ResponseTranscoder::new(
            &plan(kind, "m", stream, usage),
            status,
            meta(),
            Limits::default(),
        )
    };
    let s = t(ResponseKind::OllamaChat, true, false, 200);
    assert_eq!(s.content_type(), Some("text/event-stream"));
    assert!(s.rewrites_body() && !s.holds_whole_body());
    let s = t(ResponseKind::OllamaChat, false, false, 200);
    assert_eq!(s.content_type(), Some("application/json"));
    assert!(s.rewrites_body() && s.holds_whole_body());
    let s = t(ResponseKind::AnthropicMessages, true, false, 200);
    assert_eq!(s.content_type(), None);
    assert!(s.rewrites_body());
    let s = t(ResponseKind::AnthropicMessages, true, false, 429);
    assert_eq!(s.content_type(), Some("application/json"));
    assert!(s.holds_whole_body());
    let s = t(ResponseKind::OpenAiPassthrough, true, false, 200);
    assert!(s.rewrites_body());
    let s = t(ResponseKind::OpenAiPassthrough, true, true, 200);
    assert!(!s.rewrites_body());
    let s = t(ResponseKind::OllamaPassthrough, true, false, 200);
    assert!(!s.rewrites_body() && !s.holds_whole_body());
}

#[test]
fn response_id_comes_from_the_request_id() {
    let p = plan(ResponseKind::OllamaGenerate, "m", false, false);
    let r = run(
        &p,
        200,
        Limits::default(),
        &[fixture!("ollama/generate.json")],
    );
    let v: serde_json::Value = serde_json::from_slice(&r.out).unwrap();
    assert_eq!(v["id"], "cmpl-req-7");
    let mut t = ResponseTranscoder::new(
        &plan(ResponseKind::OllamaChat, "m", false, false),
        200,
        ResponseMeta {
            request_id: String::new(),
            created: 5,
        },
        Limits::default(),
    );
    let mut out = t.push(fixture!("ollama/chat.json")).unwrap();
    out.extend(t.finish().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["id"], "chatcmpl-tollgate");
    assert_eq!(v["created"], 5);
}
