//! Property tests for every parser on the filter's request and response path: the path guard,
//! the stream splitters, the response transcoders, the request translators and the plugin
//! configuration. Each property says what must hold for any input (no panic, the same result
//! however the bytes are chunked, buffers within their documented caps) or for generated
//! valid input (the result equals a simple reference, or survives a round trip).
//!
//! Each property runs a bounded number of cases (see `cases`); `PROPTEST_CASES=100000`
//! runs them longer (docs/TESTING.md).

// proptest is a native dev-dependency only.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Value};

use tollgate_filter::config::{Config, DEFAULT_BLOCKED_PATHS, DEFAULT_BLOCKED_PREFIXES};
use tollgate_filter::path_guard::{self, Blocklist, Decision};
use tollgate_filter::response_stream::{Limits, ResponseMeta, ResponseTranscoder};
use tollgate_filter::stream::json_fields::FieldScanner;
use tollgate_filter::stream::line_splitter::{LineSplitter, Overlong, Segment};
use tollgate_filter::stream::ndjson::NdjsonReader;
use tollgate_filter::stream::sse::{Oversize, SseParser};
use tollgate_filter::stream::StreamError;
use tollgate_filter::translate::{
    plan_request, RequestOptions, ResponseKind, ResponsePlan, TranslatedRequest, Upstream,
};
use tollgate_filter::usage::TokenCount;

/// `n` cases, unless `PROPTEST_CASES` asks for another number: `with_cases` alone would
/// override the environment variable that `ProptestConfig::default()` reads. Failures are not
/// written to a regressions file: each bug a property found is pinned by a named unit test
/// beside the code instead.
fn cases(n: u32) -> ProptestConfig {
    let mut config = if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(n)
    };
    config.failure_persistence = None;
    config
}

/// Cuts `input` at the given points (any number, any place, empty chunks included).
fn split_at<'a>(input: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    at.sort_unstable();
    let mut chunks = Vec::with_capacity(at.len() + 1);
    let mut previous = 0;
    for a in at {
        chunks.push(&input[previous..a]);
        previous = a;
    }
    chunks.push(&input[previous..]);
    chunks
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..12)
}

/// Bytes as streams carry them, and as they break: line ends of every kind, NUL, a BOM,
/// multi-byte characters, invalid UTF-8, JSON and SSE syntax, anything.
fn stream_bytes(max_pieces: usize) -> impl Strategy<Value = Vec<u8>> {
    const PIECES: &[&[u8]] = &[
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"\0",
        b"\xEF\xBB\xBF",
        "é".as_bytes(),
        "🦙".as_bytes(),
        b"\xFF",
        b"\xC0\xAF",
        b"\xF0\x9F",
        b"data: ",
        b"data:",
        b"event: ",
        b": comment",
        b"[DONE]",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b"\\",
        b":",
        b",",
        b" ",
        b"{\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
        b"{\"done\":true,\"prompt_eval_count\":5,\"eval_count\":6}",
        b"{\"type\":\"message_stop\"}",
        b"{\"error\":{\"message\":\"x\"}}",
    ];
    prop::collection::vec(
        prop_oneof![
            6 => prop::sample::select(PIECES.to_vec()).prop_map(<[u8]>::to_vec),
            3 => prop::collection::vec(any::<u8>(), 0..16),
            1 => "[a-z ]{0,40}".prop_map(String::into_bytes),
        ],
        0..max_pieces,
    )
    .prop_map(|pieces| pieces.concat())
}

// =============================================================================================
// Path guard.

fn default_blocklist() -> Blocklist {
    Blocklist::new(&DEFAULT_BLOCKED_PATHS, &DEFAULT_BLOCKED_PREFIXES).unwrap()
}

/// Paths made of the characters that matter to the guard, in any order.
fn pathish() -> impl Strategy<Value = String> {
    const PIECES: &[&str] = &[
        "/",
        "//",
        "\\",
        ".",
        "..",
        "/./",
        "/../",
        ";",
        ";x=1",
        "?",
        "#",
        "%",
        "%2",
        "%2F",
        "%2f",
        "%25",
        "%2e",
        "%2E",
        "%5C",
        "%3B",
        "%3F",
        "%23",
        "%00",
        "%20",
        "%C2%A0",
        "%c0%af",
        "%ff",
        "%u0070",
        "api",
        "pull",
        "API",
        "Pull",
        "blobs",
        "v1",
        "chat",
        "ı",
        "İ",
        "ſ",
        "K",
        " ",
        "\t",
        "\0",
        "é",
        "%70",
        "%2570",
        "%252570",
        "%25252570",
        "*",
    ];
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(PIECES.to_vec()), 0..16)
            .prop_map(|p| p.concat()),
        1 => any::<String>(),
        1 => any::<String>().prop_map(|s| format!("/{s}")),
    ]
}

/// One character of a blocked path, disguised: case changed, swapped for a non-ASCII letter
/// that case-folds to it, or percent-encoded (1 to 3 times, hex digits in either case).
fn disguised_char(c: char) -> BoxedStrategy<String> {
    let lookalikes: Vec<&'static str> = match c {
        'i' => vec!["ı", "İ"],
        's' => vec!["ſ"],
        'k' => vec!["K"],
        _ => vec![],
    };
    let plain = any::<bool>().prop_map(move |upper| {
        if upper {
            c.to_ascii_uppercase().to_string()
        } else {
            c.to_string()
        }
    });
    let encoded = (1usize..=3, any::<bool>()).prop_map(move |(depth, lower)| {
        let mut buf = [0u8; 4];
        c.encode_utf8(&mut buf)
            .bytes()
            .map(|b| percent_encode(b, depth, lower))
            .collect::<String>()
    });
    if lookalikes.is_empty() {
        prop_oneof![3 => plain, 1 => encoded].boxed()
    } else {
        let lookalike = (
            prop::sample::select(lookalikes),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(l, encode, lower)| {
                if encode {
                    l.bytes().map(|b| percent_encode(b, 1, lower)).collect()
                } else {
                    l.to_owned()
                }
            });
        prop_oneof![3 => plain, 1 => encoded, 1 => lookalike].boxed()
    }
}

/// `%XX` for `byte`, its `%` encoded again `depth - 1` times (`%70`, `%2570`, `%252570`).
fn percent_encode(byte: u8, depth: usize, lower: bool) -> String {
    let mut encoded = if lower {
        format!("%{byte:02x}")
    } else {
        format!("%{byte:02X}")
    };
    for _ in 1..depth {
        encoded = encoded.replacen('%', "%25", 1);
    }
    encoded
}

fn disguised_segment(segment: &'static str) -> BoxedStrategy<String> {
    let chars: Vec<BoxedStrategy<String>> = segment.chars().map(disguised_char).collect();
    let suffix = prop::sample::select(vec!["", "", "", ";", ";x=1", "%3Bv", " ", "%20", "%C2%A0"]);
    let prefix = prop::sample::select(vec!["", "", "", " ", "%20"]);
    (prefix, chars, suffix)
        .prop_map(|(prefix, chars, suffix)| format!("{prefix}{}{suffix}", chars.concat()))
        .boxed()
}

/// Separators between segments; `dots` adds the ones that only a reader resolving `.` and
/// `..` maps onto a plain `/`.
fn separator(dots: bool) -> impl Strategy<Value = &'static str> {
    let mut all = vec![
        "/", "/", "/", "//", "\\", "%2F", "%2f", "%252F", "%5C", "/%20/",
    ];
    if dots {
        all.extend([
            "/./",
            "/%2e/",
            "/x/../",
            "/x/%2E%2E/",
            "/x/..;/",
            "/x%2F..%2F",
        ]);
    }
    prop::sample::select(all)
}

/// A blocked endpoint of the default list in one of its disguises.
fn disguised_blocked_path() -> impl Strategy<Value = String> {
    let target: Vec<&'static str> = vec![
        "api/pull",
        "api/push",
        "api/create",
        "api/copy",
        "api/delete",
        "api/blobs",
        "api/blobs/sha256:abc",
        "api/blobs/..",
    ];
    prop::sample::select(target).prop_flat_map(|target| {
        // `/api/blobs/..` is a blob request only to a reader that does not resolve dots
        // (gin); disguising it with dot segments would make it a path no reader routes to
        // the blob handler, so it gets only the other disguises.
        let dots = !target.ends_with("..");
        let segments: Vec<&'static str> = target.split('/').collect();
        let disguised: Vec<BoxedStrategy<String>> =
            segments.iter().map(|s| disguised_segment(s)).collect();
        let separators = prop::collection::vec(separator(dots), segments.len());
        let (lead, trail) = if dots {
            (
                vec!["", "", "/..", "/x/..", "/%2e%2e", "//"],
                vec!["", "", "/", "/.", "/%2e", "?x=1", "#f", "?", "//"],
            )
        } else {
            (vec!["", "//"], vec!["", "/", "//", "?x=1", "#f", "?"])
        };
        (
            prop::sample::select(lead),
            separators,
            disguised,
            prop::sample::select(trail),
        )
            .prop_map(|(lead, separators, segments, trail)| {
                // The first separator is a plain '/': the path must be origin-form to be read.
                let mut path = format!("{lead}/");
                for (i, segment) in segments.iter().enumerate() {
                    if i > 0 {
                        path.push_str(separators[i]);
                    }
                    path.push_str(segment);
                }
                path.push_str(trail);
                path
            })
    })
}

/// Paths of plain segments (letters, digits, `:`, `.` and `..`), for which the guard's
/// decision is simple to state: lower-case, drop empty segments, and block when the path is
/// blocked read literally or with dot segments resolved.
fn plain_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        4 => prop::sample::select(vec![
            "api", "pull", "push", "create", "copy", "delete", "blobs", "chat", "v1", "models",
            "x", ".", "..", "", "API", "Pull", "BLOBS", "sha256:ab", "pullx", "blobsx",
        ])
        .prop_map(str::to_owned),
        1 => "[a-zA-Z0-9:]{1,6}",
    ];
    (
        prop::collection::vec(segment, 0..7),
        prop::sample::select(vec!["", "/", "?q=/api/pull", "#/api/pull"]),
    )
        .prop_map(|(segments, tail)| format!("/{}{tail}", segments.join("/")))
}

fn reference_decision(path: &str) -> Decision {
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let literal = format!("/{}", segments.join("/"));
    let mut resolved: Vec<&str> = Vec::new();
    for s in &segments {
        match *s {
            "." => {}
            ".." => {
                resolved.pop();
            }
            s => resolved.push(s),
        }
    }
    let resolved = format!("/{}", resolved.join("/"));
    let blocked = |p: &str| {
        DEFAULT_BLOCKED_PATHS.contains(&p) || p == "/api/blobs" || p.starts_with("/api/blobs/")
    };
    if blocked(&literal) || blocked(&resolved) {
        Decision::Block
    } else {
        Decision::Allow
    }
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn path_guard_never_panics_and_normalise_is_idempotent(path in pathish()) {
        let list = default_blocklist();
        let decision = path_guard::decide(&path, &list);
        if let Ok(normal) = path_guard::normalise(&path) {
            prop_assert_eq!(path_guard::normalise(&normal), Ok(normal.clone()), "{:?}", path);
            prop_assert!(normal.starts_with('/'));
            // The canonical form is a reading of the path: a blocked canonical form is
            // never let through.
            if path_guard::decide(&normal, &list) == Decision::Block {
                prop_assert_eq!(decision, Decision::Block, "{:?} reads as {:?}", path, normal);
            }
        }
    }

    #[test]
    fn a_disguised_blocked_endpoint_is_blocked_or_invalid_never_allowed(
        path in disguised_blocked_path(),
    ) {
        let decision = path_guard::decide(&path, &default_blocklist());
        prop_assert_ne!(decision, Decision::Allow, "{:?}", path);
    }

    #[test]
    fn path_guard_decision_equals_a_simple_reference_on_plain_paths(path in plain_path()) {
        prop_assert_eq!(
            path_guard::decide(&path, &default_blocklist()),
            reference_decision(&path),
            "{:?}", path
        );
    }
}

#[test]
fn disguise_generator_encodes_as_documented() {
    // The generator itself must produce the encodings it claims to.
    assert_eq!(percent_encode(b'p', 1, false), "%70");
    assert_eq!(percent_encode(b'L', 1, true), "%4c");
    assert_eq!(percent_encode(b'p', 2, false), "%2570");
    assert_eq!(percent_encode(b'p', 3, false), "%252570");
    assert_eq!(
        path_guard::decide("/api/%252570ull", &default_blocklist()),
        Decision::Block
    );
    assert_eq!(reference_decision("/api/pull/.."), Decision::Allow);
    assert_eq!(reference_decision("/API/x/../Pull?q"), Decision::Block);
}

// =============================================================================================
// Stream splitters.

/// What a line splitter hands out, flattened: complete lines, and over-long lines
/// reassembled behind a `LONG:` marker.
fn split_lines(
    chunks: &[&[u8]],
    max: usize,
    overlong: Overlong,
) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut splitter = LineSplitter::new(max, overlong);
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut long: Vec<u8> = Vec::new();
    let mut collect = |segment: Segment<'_>| {
        match segment {
            Segment::Line(line) => {
                assert!(line.len() <= max, "a line over the cap handed out whole");
                out.push(line.to_vec());
            }
            Segment::Overlong { part, end } => {
                long.extend_from_slice(part);
                if end {
                    let mut marked = b"LONG:".to_vec();
                    marked.append(&mut long);
                    out.push(marked);
                }
            }
        }
        Ok(())
    };
    for chunk in chunks {
        let result = splitter.feed(chunk, &mut collect);
        assert!(
            splitter.carried() <= max,
            "carried {} bytes over the cap {max}",
            splitter.carried()
        );
        result?;
    }
    splitter.finish(&mut collect)?;
    Ok(out)
}

/// The line splitter's documented behaviour, on the whole input at once.
fn reference_lines(
    input: &[u8],
    max: usize,
    overlong: Overlong,
) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut pieces: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
    let tail = pieces.pop().unwrap_or_default();
    if !tail.is_empty() {
        pieces.push(tail);
    }
    let mut out = Vec::new();
    for piece in pieces {
        if piece.len() > max {
            match overlong {
                Overlong::Fail => return Err(StreamError::LineTooLong { max }),
                Overlong::Report => out.push([b"LONG:", piece].concat()),
            }
        } else {
            out.push(piece.strip_suffix(b"\r").unwrap_or(piece).to_vec());
        }
    }
    Ok(out)
}

type Events = Vec<(Vec<u8>, Vec<u8>)>;

fn parse_sse(
    chunks: &[&[u8]],
    max_line: usize,
    max_event: usize,
    oversize: Oversize,
) -> Result<Events, StreamError> {
    let mut parser = SseParser::new(max_line, max_event, oversize);
    let mut out = Vec::new();
    let mut push = |e: tollgate_filter::stream::sse::SseEvent<'_>| {
        assert!(e.data.len() <= max_event, "event data over the cap");
        assert!(e.event.len() <= max_line, "event name over the line cap");
        out.push((e.event.to_vec(), e.data.to_vec()));
        Ok(())
    };
    for chunk in chunks {
        parser.feed(chunk, &mut push)?;
    }
    parser.finish(&mut push)?;
    Ok(out)
}

/// Server-sent events as the module documents them, without caps: lines on `\n` or `\r\n`,
/// a BOM dropped from the first line, `:` comments, `event`/`data` fields (one optional
/// space after the colon), data lines joined by `\n`, dispatch on a blank line and at the end.
fn reference_sse(input: &[u8]) -> Events {
    let lines = reference_lines(input, usize::MAX, Overlong::Fail).unwrap_or_default();
    let mut out = Vec::new();
    let (mut event, mut data, mut has_data) = (Vec::new(), Vec::new(), false);
    let mut dispatch = |event: &mut Vec<u8>, data: &mut Vec<u8>, has_data: &mut bool| {
        if *has_data {
            out.push((event.clone(), data.clone()));
        }
        event.clear();
        data.clear();
        *has_data = false;
    };
    for (i, line) in lines.iter().enumerate() {
        let line = if i == 0 {
            line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            dispatch(&mut event, &mut data, &mut has_data);
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => (
                &line[..c],
                line[c + 1..].strip_prefix(b" ").unwrap_or(&line[c + 1..]),
            ),
            None => (line, &[][..]),
        };
        match field {
            b"event" => event = value.to_vec(),
            b"data" => {
                if has_data {
                    data.push(b'\n');
                }
                data.extend_from_slice(value);
                has_data = true;
            }
            _ => {}
        }
    }
    dispatch(&mut event, &mut data, &mut has_data);
    out
}

fn read_ndjson(
    chunks: &[&[u8]],
    max: usize,
    keep: &'static [&'static str],
) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut reader = NdjsonReader::new(max, keep);
    let mut out = Vec::new();
    let mut push = |v: &[u8]| {
        assert!(v.len() <= max, "value over the cap handed out");
        out.push(v.to_vec());
        Ok(())
    };
    for chunk in chunks {
        reader.feed(chunk, &mut push)?;
    }
    reader.finish(&mut push)?;
    Ok(out)
}

fn scan_fields(
    chunks: &[&[u8]],
    keys: &'static [&'static str],
    max: usize,
) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut scanner = FieldScanner::new(keys, max);
    let mut out = Vec::new();
    for chunk in chunks {
        scanner.feed(chunk, |obj| {
            assert!(obj.len() <= max, "kept object over the cap");
            out.push(obj.to_vec());
            Ok(())
        })?;
    }
    Ok(out)
}

const SCAN_KEYS: &[&str] = &["usage", "model", "done", "eval_count", "message"];

/// JSON values with the scanner's keys among others, nested, with strings that hold
/// quotes, braces and backslashes.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|n| json!(n)),
        prop_oneof![
            any::<String>(),
            prop::sample::select(vec!["\"usage\":{", "}]\\", "a\"}b", "\\\"", "{\"x\":1}"])
                .prop_map(str::to_owned),
        ]
        .prop_map(Value::String),
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "usage",
            "model",
            "done",
            "eval_count",
            "message",
            "context",
            "usagex",
            "",
        ])
        .prop_map(str::to_owned),
        "[a-z]{1,5}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn line_splitter_gives_the_documented_lines_however_the_input_is_chunked(
        input in stream_bytes(48),
        cuts in cuts(),
        max in prop_oneof![1usize..16, 16usize..256, Just(1 << 20)],
        report in any::<bool>(),
    ) {
        let overlong = if report { Overlong::Report } else { Overlong::Fail };
        let whole = split_lines(&[&input], max, overlong);
        prop_assert_eq!(&whole, &reference_lines(&input, max, overlong));
        prop_assert_eq!(split_lines(&split_at(&input, &cuts), max, overlong), whole);
    }

    #[test]
    fn sse_parser_gives_the_documented_events_however_the_input_is_chunked(
        input in stream_bytes(48),
        cuts in cuts(),
    ) {
        let big = 1 << 20;
        let whole = parse_sse(&[&input], big, big, Oversize::Fail);
        prop_assert_eq!(&whole, &Ok(reference_sse(&input)));
        prop_assert_eq!(parse_sse(&split_at(&input, &cuts), big, big, Oversize::Fail), whole);
    }

    #[test]
    fn sse_parser_under_small_caps_is_chunking_invariant_and_within_its_caps(
        input in stream_bytes(64),
        cuts in cuts(),
        max_line in 1usize..64,
        max_event in 0usize..64,
        skip in any::<bool>(),
    ) {
        let oversize = if skip { Oversize::Skip } else { Oversize::Fail };
        let whole = parse_sse(&[&input], max_line, max_event, oversize);
        prop_assert_eq!(parse_sse(&split_at(&input, &cuts), max_line, max_event, oversize), whole);
    }

    #[test]
    fn ndjson_reader_gives_each_non_blank_line_however_the_input_is_chunked(
        input in stream_bytes(48),
        cuts in cuts(),
        max in prop_oneof![1usize..64, Just(1 << 20)],
    ) {
        let whole = read_ndjson(&[&input], max, &[]);
        let reference = reference_lines(&input, max, Overlong::Fail).map(|lines| {
            lines
                .into_iter()
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect::<Vec<_>>()
        });
        prop_assert_eq!(&whole, &reference);
        prop_assert_eq!(read_ndjson(&split_at(&input, &cuts), max, &[]), whole);
    }

    #[test]
    fn ndjson_reader_keeping_fields_of_long_lines_is_chunking_invariant_and_within_its_cap(
        input in stream_bytes(64),
        cuts in cuts(),
        max in 1usize..96,
    ) {
        let whole = read_ndjson(&[&input], max, SCAN_KEYS);
        prop_assert_eq!(read_ndjson(&split_at(&input, &cuts), max, SCAN_KEYS), whole);
    }

    #[test]
    fn field_scanner_on_arbitrary_bytes_is_chunking_invariant_and_within_its_cap(
        input in stream_bytes(64),
        cuts in cuts(),
        max in 0usize..128,
    ) {
        let whole = scan_fields(&[&input], SCAN_KEYS, max);
        prop_assert_eq!(scan_fields(&split_at(&input, &cuts), SCAN_KEYS, max), whole);
    }
}

proptest! {
    #![proptest_config(cases(192))]

    #[test]
    fn field_scanner_keeps_exactly_the_wanted_top_level_members_of_json_values(
        values in prop::collection::vec((json_value(), any::<bool>()), 1..5),
        cuts in cuts(),
    ) {
        // A stream of values, compact or pretty, one per line; only objects give output.
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (value, pretty) in &values {
            let text = if *pretty {
                serde_json::to_vec_pretty(value).unwrap()
            } else {
                serde_json::to_vec(value).unwrap()
            };
            input.extend_from_slice(&text);
            input.push(b'\n');
            // Compared as the same parser reads the original text (floats need not survive
            // a print and parse bit for bit).
            let value: Value = serde_json::from_slice(&text).unwrap();
            if let Value::Object(members) = &value {
                let kept: serde_json::Map<String, Value> = members
                    .iter()
                    .filter(|(k, _)| SCAN_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                expected.push(Value::Object(kept));
            }
        }
        let out = scan_fields(&split_at(&input, &cuts), SCAN_KEYS, 1 << 20).unwrap();
        let out: Vec<Value> = out
            .iter()
            .map(|o| serde_json::from_slice(o).expect("kept text is JSON"))
            .collect();
        prop_assert_eq!(out, expected);
    }
}

// =============================================================================================
// Response transcoders.

fn plan(kind: ResponseKind, stream: bool, client_wants_usage: bool) -> ResponsePlan {
    ResponsePlan {
        kind,
        model: Some("requested-model".to_owned()),
        stream,
        client_wants_usage,
        embeddings_base64: false,
    }
}

fn meta() -> ResponseMeta {
    ResponseMeta {
        request_id: "req-1".to_owned(),
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

/// Output never outgrows the input by more than this factor (plus `OUTPUT_SLACK`): every
/// line or event is rewritten once, as it arrives, and nothing is repeated or accumulated.
const OUTPUT_FACTOR: usize = 4;
const OUTPUT_SLACK: usize = 4096;

fn transcode(plan: &ResponsePlan, status: u16, limits: Limits, chunks: &[&[u8]]) -> Run {
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

/// Like `transcode`, checking after every push that the output stayed proportional to the
/// input so far.
fn transcode_bounded(plan: &ResponsePlan, chunks: &[&[u8]]) -> Result<Run, TestCaseError> {
    let mut t = ResponseTranscoder::new(plan, 200, meta(), Limits::default());
    let mut out = Vec::new();
    let mut input = 0;
    let mut result = Ok(());
    for chunk in chunks {
        input += chunk.len();
        result = t.push_into(chunk, &mut out);
        prop_assert!(
            out.len() <= OUTPUT_FACTOR * input + OUTPUT_SLACK,
            "{} bytes out for {} in",
            out.len(),
            input
        );
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = t.finish_into(&mut out);
    }
    prop_assert!(out.len() <= OUTPUT_FACTOR * input + OUTPUT_SLACK);
    Ok(Run {
        out,
        usage: t.usage(),
        reported: t.usage_reported(),
        result,
    })
}

/// What a generated upstream answer says: its model, its text in pieces, its counts.
#[derive(Debug, Clone)]
struct Answer {
    model: String,
    pieces: Vec<String>,
    prompt: u32,
    completion: u32,
    /// Anthropic's cache creation and read input tokens.
    cache: (Option<u32>, Option<u32>),
    /// Ollama's `context` array on the final generate line.
    context: usize,
    /// Anthropic `ping` events between the others.
    pings: Vec<bool>,
    /// SSE lines end in `\r\n`.
    crlf: bool,
}

impl Answer {
    fn text(&self) -> String {
        self.pieces.concat()
    }

    fn anthropic_prompt(&self) -> u64 {
        u64::from(self.prompt)
            + u64::from(self.cache.0.unwrap_or(0))
            + u64::from(self.cache.1.unwrap_or(0))
    }
}

fn text_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z ,.]{0,12}",
        1 => prop::sample::select(vec![
            "Grüße", "🦙", "\"q\"", "\n", "\r\n\r\n", "\\", "data: [DONE]", "\u{0}", "}]{[", "\u{2028}",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        "[a-z0-9.:-]{1,24}",
        prop::collection::vec(text_piece(), 0..10),
        any::<u32>(),
        any::<u32>(),
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
        ),
        prop_oneof![Just(0usize), 0usize..3000],
        prop::collection::vec(prop::bool::weighted(0.2), 12),
        any::<bool>(),
    )
        .prop_map(
            |(model, pieces, prompt, completion, cache, context, pings, crlf)| Answer {
                model,
                pieces,
                prompt,
                completion,
                cache,
                context,
                pings,
                crlf,
            },
        )
}

fn ndjson_line(out: &mut Vec<u8>, value: &Value) {
    serde_json::to_writer(&mut *out, value).unwrap();
    out.push(b'\n');
}

/// Ollama's `/api/chat` or `/api/generate` stream for `a`.
fn ollama_stream(a: &Answer, generate: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in &a.pieces {
        let line = if generate {
            json!({"model": a.model, "created_at": "2025-03-04T10:00:00Z", "response": piece, "done": false})
        } else {
            json!({"model": a.model, "created_at": "2025-03-04T10:00:00Z",
                   "message": {"role": "assistant", "content": piece}, "done": false})
        };
        ndjson_line(&mut out, &line);
    }
    let mut last = json!({"model": a.model, "created_at": "2025-03-04T10:00:01Z", "done": true,
        "done_reason": "stop", "total_duration": 123456, "prompt_eval_count": a.prompt,
        "eval_count": a.completion});
    if generate {
        last["response"] = json!("");
        last["context"] = json!((0..a.context).collect::<Vec<_>>());
    } else {
        last["message"] = json!({"role": "assistant", "content": ""});
    }
    ndjson_line(&mut out, &last);
    out
}

fn ollama_body(a: &Answer, generate: bool) -> Vec<u8> {
    let mut body = json!({"model": a.model, "created_at": "2025-03-04T10:00:01Z", "done": true,
        "done_reason": "stop", "prompt_eval_count": a.prompt, "eval_count": a.completion});
    if generate {
        body["response"] = json!(a.text());
        body["context"] = json!((0..a.context).collect::<Vec<_>>());
    } else {
        body["message"] = json!({"role": "assistant", "content": a.text()});
    }
    serde_json::to_vec(&body).unwrap()
}

fn sse_event(out: &mut Vec<u8>, name: Option<&str>, data: &Value, crlf: bool) {
    let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(end);
    }
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, data).unwrap();
    out.extend_from_slice(end);
    out.extend_from_slice(end);
}

/// Anthropic's Messages stream for `a`.
fn anthropic_stream(a: &Answer) -> Vec<u8> {
    let mut out = Vec::new();
    let mut usage = json!({"input_tokens": a.prompt, "output_tokens": 1});
    if let Some(n) = a.cache.0 {
        usage["cache_creation_input_tokens"] = json!(n);
    }
    if let Some(n) = a.cache.1 {
        usage["cache_read_input_tokens"] = json!(n);
    }
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1",
            "type": "message", "role": "assistant", "model": a.model, "content": [],
            "stop_reason": null, "usage": usage}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for piece in &a.pieces {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": a.completion}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    for (i, (name, data)) in events.iter().enumerate() {
        if a.pings.get(i).copied().unwrap_or(false) {
            sse_event(&mut out, Some("ping"), &json!({"type": "ping"}), a.crlf);
        }
        sse_event(&mut out, Some(name), data, a.crlf);
    }
    out
}

fn anthropic_body(a: &Answer) -> Vec<u8> {
    let mut usage = json!({"input_tokens": a.prompt, "output_tokens": a.completion});
    if let Some(n) = a.cache.0 {
        usage["cache_creation_input_tokens"] = json!(n);
    }
    if let Some(n) = a.cache.1 {
        usage["cache_read_input_tokens"] = json!(n);
    }
    let content: Vec<Value> = a
        .pieces
        .iter()
        .map(|p| json!({"type": "text", "text": p}))
        .collect();
    serde_json::to_vec(
        &json!({"id": "msg_1", "type": "message", "role": "assistant",
        "model": a.model, "content": content, "stop_reason": "end_turn", "usage": usage}),
    )
    .unwrap()
}

/// An OpenAI chat stream for `a`; with `usage_chunk`, the usage-only chunk before `[DONE]`.
/// Returns the stream and the same stream without that chunk.
fn openai_stream(a: &Answer, usage_chunk: bool) -> (Vec<u8>, Vec<u8>) {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
               "model": a.model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
               "finish_reason": finish}], "usage": null})
    };
    let mut body = Vec::new();
    sse_event(
        &mut body,
        None,
        &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        false,
    );
    for piece in &a.pieces {
        sse_event(
            &mut body,
            None,
            &chunk(json!({"content": piece}), Value::Null),
            false,
        );
    }
    sse_event(&mut body, None, &chunk(json!({}), json!("stop")), false);
    let mut without = body.clone();
    if usage_chunk {
        sse_event(
            &mut body,
            None,
            &json!({"id": "chatcmpl-x", "object": "chat.completion.chunk",
            "created": 1, "model": a.model, "choices": [],
            "usage": {"prompt_tokens": a.prompt, "completion_tokens": a.completion,
                      "total_tokens": u64::from(a.prompt) + u64::from(a.completion)}}),
            false,
        );
    }
    for stream in [&mut body, &mut without] {
        stream.extend_from_slice(b"data: [DONE]\n\n");
    }
    (body, without)
}

fn openai_body(a: &Answer) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": "chatcmpl-x", "object": "chat.completion", "created": 1,
        "model": a.model, "choices": [{"index": 0, "message": {"role": "assistant",
        "content": a.text()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": a.prompt, "completion_tokens": a.completion,
                  "total_tokens": u64::from(a.prompt) + u64::from(a.completion)}}),
    )
    .unwrap()
}

/// The events of an OpenAI SSE stream the gateway wrote: JSON payloads, and whether it ended
/// with `[DONE]`.
fn openai_events(out: &[u8]) -> Result<(Vec<Value>, bool), TestCaseError> {
    let text = std::str::from_utf8(out).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut events = Vec::new();
    let mut done = false;
    for event in text.split_terminator("\n\n") {
        let data = event
            .strip_prefix("data: ")
            .ok_or_else(|| TestCaseError::fail(format!("not one data line: {event:?}")))?;
        prop_assert!(!done, "an event after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(
                serde_json::from_str(data)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {data:?}")))?,
            );
        }
    }
    Ok((events, done))
}

/// The text of translated chunks (`delta.content` of chat chunks, `text` of completions).
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str().or(c["text"].as_str()))
        .collect()
}

fn count(prompt: u64, completion: u64) -> TokenCount {
    TokenCount { prompt, completion }
}

/// Checks a translated stream's output: OpenAI events ending in `[DONE]`, the text of the
/// answer, and the usage chunk exactly when the client asked for it.
fn check_translated_stream(
    run: &Run,
    text: &str,
    usage: TokenCount,
    wants_usage: bool,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&run.result, &Ok(()));
    prop_assert_eq!(run.usage, usage);
    prop_assert!(run.reported);
    let (events, done) = openai_events(&run.out)?;
    prop_assert!(done, "no [DONE]");
    prop_assert_eq!(streamed_text(&events), text);
    let usage_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["choices"].as_array().is_some_and(Vec::is_empty))
        .collect();
    if wants_usage {
        prop_assert_eq!(usage_events.len(), 1);
        prop_assert_eq!(
            &usage_events[0]["usage"]["prompt_tokens"],
            &json!(usage.prompt)
        );
        prop_assert_eq!(
            &usage_events[0]["usage"]["completion_tokens"],
            &json!(usage.completion)
        );
    } else {
        prop_assert!(usage_events.is_empty());
    }
    Ok(())
}

const ALL_KINDS: [ResponseKind; 10] = [
    ResponseKind::Opaque,
    ResponseKind::OpenAiPassthrough,
    ResponseKind::OllamaPassthrough,
    ResponseKind::AnthropicPassthrough,
    ResponseKind::OllamaChat,
    ResponseKind::OllamaGenerate,
    ResponseKind::OllamaEmbed,
    ResponseKind::OllamaTags,
    ResponseKind::AnthropicMessages,
    ResponseKind::AnthropicModels,
];

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn translated_ollama_streams_carry_the_text_and_count_the_usage_however_chunked(
        a in answer(),
        generate in any::<bool>(),
        wants_usage in any::<bool>(),
        cuts in cuts(),
    ) {
        let kind = if generate { ResponseKind::OllamaGenerate } else { ResponseKind::OllamaChat };
        let p = plan(kind, true, wants_usage);
        let input = ollama_stream(&a, generate);
        let whole = transcode(&p, 200, Limits::default(), &[&input]);
        let split = transcode_bounded(&p, &split_at(&input, &cuts))?;
        prop_assert_eq!(&split, &whole);
        let usage = count(a.prompt.into(), a.completion.into());
        check_translated_stream(&whole, &a.text(), usage, wants_usage)?;
    }

    #[test]
    fn translated_anthropic_streams_carry_the_text_and_count_the_usage_however_chunked(
        a in answer(),
        wants_usage in any::<bool>(),
        cuts in cuts(),
    ) {
        let p = plan(ResponseKind::AnthropicMessages, true, wants_usage);
        let input = anthropic_stream(&a);
        let whole = transcode(&p, 200, Limits::default(), &[&input]);
        let split = transcode_bounded(&p, &split_at(&input, &cuts))?;
        prop_assert_eq!(&split, &whole);
        let usage = count(a.anthropic_prompt(), a.completion.into());
        check_translated_stream(&whole, &a.text(), usage, wants_usage)?;
    }

    #[test]
    fn translated_bodies_carry_the_text_and_count_the_usage_however_chunked(
        a in answer(),
        which in 0u8..3,
        cuts in cuts(),
    ) {
        let (kind, input, usage) = match which {
            0 => (ResponseKind::OllamaChat, ollama_body(&a, false), count(a.prompt.into(), a.completion.into())),
            1 => (ResponseKind::OllamaGenerate, ollama_body(&a, true), count(a.prompt.into(), a.completion.into())),
            _ => (ResponseKind::AnthropicMessages, anthropic_body(&a), count(a.anthropic_prompt(), a.completion.into())),
        };
        let p = plan(kind, false, false);
        let whole = transcode(&p, 200, Limits::default(), &[&input]);
        prop_assert_eq!(&transcode(&p, 200, Limits::default(), &split_at(&input, &cuts)), &whole);
        prop_assert_eq!(&whole.result, &Ok(()));
        prop_assert_eq!(whole.usage, usage);
        let body: Value = serde_json::from_slice(&whole.out).unwrap();
        let choice = &body["choices"][0];
        let text = choice["message"]["content"].as_str().or(choice["text"].as_str());
        let want = a.text();
        prop_assert_eq!(text, Some(want.as_str()));
        prop_assert_eq!(&body["usage"]["prompt_tokens"], &json!(usage.prompt));
        prop_assert_eq!(&body["usage"]["completion_tokens"], &json!(usage.completion));
        prop_assert_eq!(&body["usage"]["total_tokens"], &json!(usage.total()));
    }

    #[test]
    fn passthrough_responses_are_forwarded_byte_for_byte_and_counted_however_chunked(
        a in answer(),
        which in 0u8..7,
        cuts in cuts(),
    ) {
        let ollama = count(a.prompt.into(), a.completion.into());
        let (kind, stream, input, usage) = match which {
            0 => (ResponseKind::OllamaPassthrough, true, ollama_stream(&a, false), ollama),
            1 => (ResponseKind::OllamaPassthrough, true, ollama_stream(&a, true), ollama),
            2 => (ResponseKind::OllamaPassthrough, false, ollama_body(&a, true), ollama),
            3 => (ResponseKind::AnthropicPassthrough, true, anthropic_stream(&a), count(a.anthropic_prompt(), a.completion.into())),
            4 => (ResponseKind::AnthropicPassthrough, false, anthropic_body(&a), count(a.anthropic_prompt(), a.completion.into())),
            5 => (ResponseKind::OpenAiPassthrough, true, openai_stream(&a, true).0, ollama),
            _ => (ResponseKind::OpenAiPassthrough, false, openai_body(&a), ollama),
        };
        // The client asked for usage itself, so nothing is removed from an OpenAI stream.
        let p = plan(kind, stream, true);
        let whole = transcode(&p, 200, Limits::default(), &[&input]);
        prop_assert_eq!(&transcode(&p, 200, Limits::default(), &split_at(&input, &cuts)), &whole);
        prop_assert_eq!(&whole.result, &Ok(()));
        prop_assert!(whole.out == input, "bytes changed");
        prop_assert_eq!(whole.usage, usage);
        prop_assert!(whole.reported);
    }

    #[test]
    fn openai_stream_loses_only_the_usage_chunk_the_gateway_asked_for(
        a in answer(),
        cuts in cuts(),
    ) {
        let p = plan(ResponseKind::OpenAiPassthrough, true, false);
        let (input, without) = openai_stream(&a, true);
        let whole = transcode(&p, 200, Limits::default(), &[&input]);
        prop_assert_eq!(&transcode_bounded(&p, &split_at(&input, &cuts))?, &whole);
        prop_assert_eq!(&whole.result, &Ok(()));
        prop_assert!(
            whole.out == without,
            "got:\n{}\nwanted:\n{}",
            String::from_utf8_lossy(&whole.out),
            String::from_utf8_lossy(&without)
        );
        prop_assert_eq!(whole.usage, count(a.prompt.into(), a.completion.into()));
    }
}

/// Inputs for the no-panic property: arbitrary bytes, or a valid upstream stream with a few
/// bytes changed, inserted or cut.
fn damaged_or_arbitrary() -> impl Strategy<Value = Vec<u8>> {
    let valid = (answer(), 0u8..6).prop_map(|(a, which)| match which {
        0 => ollama_stream(&a, false),
        1 => ollama_stream(&a, true),
        2 => anthropic_stream(&a),
        3 => openai_stream(&a, true).0,
        4 => ollama_body(&a, false),
        _ => anthropic_body(&a),
    });
    let damaged = (
        valid,
        prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..3), 0..6),
    )
        .prop_map(|(mut bytes, edits)| {
            for (at, byte, how) in edits {
                let i = at.index(bytes.len() + 1);
                match how {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => bytes.truncate(i),
                }
            }
            bytes
        });
    prop_oneof![damaged, stream_bytes(64)]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_bytes_give_every_transcoder_the_same_result_however_chunked_and_never_panic(
        input in damaged_or_arbitrary(),
        cuts in cuts(),
        kind in prop::sample::select(ALL_KINDS.to_vec()),
        stream in any::<bool>(),
        wants_usage in any::<bool>(),
        base64 in any::<bool>(),
        status in prop::sample::select(vec![200u16, 201, 400, 404, 429, 500, 502]),
        small in any::<bool>(),
    ) {
        let mut p = plan(kind, stream, wants_usage);
        p.embeddings_base64 = base64;
        let limits = if small {
            Limits { max_line_bytes: 64, max_event_bytes: 48, max_body_bytes: 256 }
        } else {
            Limits::default()
        };
        let whole = transcode(&p, status, limits, &[&input]);
        prop_assert_eq!(transcode(&p, status, limits, &split_at(&input, &cuts)), whole);
    }
}

// =============================================================================================
// Request translators.

const UPSTREAMS: [Upstream; 3] = [Upstream::OpenAi, Upstream::Ollama, Upstream::Anthropic];

fn request_path() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
            "/v1/messages", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
            "/api/show", "/api/tags", "/v1/chat/completions/", "/v1/chat/completions?x=1",
            "/V1/chat/completions", "/",
        ])
        .prop_map(str::to_owned),
        1 => pathish(),
    ]
}

/// JSON built from the request APIs' own field names and values, in any shape.
fn request_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        8 => prop::sample::select(vec![
            "model", "messages", "role", "content", "type", "text", "image_url", "url", "stream",
            "stream_options", "include_usage", "max_tokens", "max_completion_tokens",
            "temperature", "top_p", "seed", "stop", "tools", "function", "name", "arguments",
            "parameters", "tool_calls", "tool_call_id", "id", "tool_choice", "response_format",
            "json_schema", "schema", "prompt", "suffix", "input", "encoding_format",
            "dimensions", "user", "parallel_tool_calls", "n", "options", "num_predict",
            "keep_alive", "format", "system", "Model", "MODEL",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(1.5),
            json!(1e30),
            json!(4096),
            json!(2_147_483_648u64),
            json!(u64::MAX),
            json!(i64::MIN),
        ]),
        any::<i64>().prop_map(|n| json!(n)),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "developer",
            "tool",
            "function",
            "text",
            "image_url",
            "data:image/png;base64,iVBORw0KGgo=",
            "https://x/y.png",
            "json_object",
            "json_schema",
            "auto",
            "none",
            "required",
            "base64",
            "float",
            "",
            "m",
            "{}",
            "{\"a\":1}",
            "not json",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        any::<String>().prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(4, 48, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    // Mostly an object with a model, as clients send.
    (value, prop::option::weighted(0.7, "[a-z0-9.:-]{1,12}")).prop_map(|(v, model)| {
        match (v, model) {
            (Value::Object(mut m), Some(model)) => {
                m.insert("model".to_owned(), Value::String(model));
                Value::Object(m)
            }
            (v, _) => v,
        }
    })
}

/// A valid chat request with a few members added or replaced anywhere in it.
fn near_valid_request() -> impl Strategy<Value = Value> {
    (
        chat_request(),
        prop::collection::vec((any::<Index>(), any::<Index>(), request_json()), 0..3),
    )
        .prop_map(|(r, edits)| {
            let mut body = r.to_json();
            for (place, field, value) in edits {
                // Somewhere in the request: the top level or one of its messages.
                let messages = body["messages"].as_array().map_or(0, Vec::len);
                let i = place.index(messages + 1);
                let target = if i == 0 {
                    &mut body
                } else {
                    &mut body["messages"][i - 1]
                };
                let keys: Vec<String> = match (&value, target.as_object()) {
                    (Value::Object(v), _) if !v.is_empty() => v.keys().cloned().collect(),
                    (_, Some(t)) if !t.is_empty() => t.keys().cloned().collect(),
                    _ => vec!["model".to_owned()],
                };
                let key = keys[field.index(keys.len())].clone();
                let new = match &value {
                    Value::Object(v) => v.get(&key).cloned().unwrap_or(Value::Null),
                    other => other.clone(),
                };
                if let Some(t) = target.as_object_mut() {
                    t.insert(key, new);
                }
            }
            body
        })
}

/// Bodies as they arrive: JSON of the APIs' shapes, raw bytes, or JSON text with duplicate
/// members and odd spellings spliced in.
fn request_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => request_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        3 => near_valid_request().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => stream_bytes(16),
        1 => (request_json(), prop::sample::select(vec![
            r#""model":"other","#, r#""stream":true,"#, r#""max_tokens":1e5,"#,
            r#""max_tokens":"100","#, r#""stream":null,"#, " ",
        ]))
            .prop_map(|(v, member)| {
                let text = serde_json::to_string(&v).unwrap();
                match text.strip_prefix('{') {
                    Some(rest) if rest != "}" => format!("{{{member}{rest}").into_bytes(),
                    _ => text.into_bytes(),
                }
            }),
    ]
}

fn translate(upstream: Upstream, path: &str, body: &[u8]) -> Result<TranslatedRequest, u16> {
    plan_request(upstream, path)
        .and_then(|plan| plan.translate_body(body, &RequestOptions::default()))
        .map_err(|e| e.status())
}

#[derive(Debug, Clone)]
enum Content {
    Text(String),
    Parts(Vec<String>),
}

impl Content {
    fn to_json(&self) -> Value {
        match self {
            Content::Text(t) => json!(t),
            Content::Parts(parts) => {
                json!(parts
                    .iter()
                    .map(|t| json!({"type": "text", "text": t}))
                    .collect::<Vec<_>>())
            }
        }
    }

    fn texts(&self) -> Vec<String> {
        match self {
            Content::Text(t) => vec![t.clone()],
            Content::Parts(parts) => parts.clone(),
        }
    }
}

/// An OpenAI chat request with text messages.
#[derive(Debug, Clone)]
struct ChatRequest {
    model: String,
    messages: Vec<(&'static str, Content)>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
}

impl ChatRequest {
    fn to_json(&self) -> Value {
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content.to_json()}))
            .collect();
        let mut body = json!({"model": self.model, "messages": messages});
        if let Some(s) = self.stream {
            body["stream"] = json!(s);
        }
        if let Some(u) = self.include_usage {
            body["stream_options"] = json!({"include_usage": u});
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(n) = self.max_completion_tokens {
            body["max_completion_tokens"] = json!(n);
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        body
    }

    fn completion_budget(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .map(u64::from)
    }
}

fn chat_request() -> impl Strategy<Value = ChatRequest> {
    let text = prop_oneof![3 => "[a-zA-Z ,.]{1,12}", 1 => text_piece().prop_filter("non-empty", |t| !t.is_empty())];
    let content = prop_oneof![
        3 => text.clone().prop_map(Content::Text),
        1 => prop::collection::vec(text, 1..3).prop_map(Content::Parts),
    ];
    let message = (
        prop::sample::select(vec!["system", "developer", "user", "user", "assistant"]),
        content,
    );
    (
        "[a-z0-9.:-]{1,24}",
        prop::collection::vec(message, 0..8),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(1u32..1_000_000),
        prop::option::of(1u32..1_000_000),
        prop::option::of((0u32..=20).prop_map(|t| f64::from(t) / 10.0)),
    )
        .prop_map(
            |(
                model,
                messages,
                stream,
                include_usage,
                max_tokens,
                max_completion_tokens,
                temperature,
            )| {
                ChatRequest {
                    model,
                    messages,
                    stream,
                    include_usage,
                    max_tokens,
                    max_completion_tokens,
                    temperature,
                }
            },
        )
}

/// What Anthropic's Messages API must receive for `r`: the system text, then the other
/// messages with consecutive turns of one role merged, as (role, texts).
fn anthropic_reference(r: &ChatRequest) -> (Option<String>, Vec<(&'static str, Vec<String>)>) {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<String>)> = Vec::new();
    for (role, content) in &r.messages {
        let texts = content.texts();
        let (role, texts) = match *role {
            "system" | "developer" => {
                system.extend(texts);
                continue;
            }
            // Anthropic refuses empty text blocks; a plain string is sent as it is.
            "user" => match content {
                Content::Text(_) => ("user", texts),
                Content::Parts(_) => (
                    "user",
                    texts.into_iter().filter(|t| !t.is_empty()).collect(),
                ),
            },
            _ => (
                "assistant",
                texts.into_iter().filter(|t| !t.is_empty()).collect(),
            ),
        };
        match turns.last_mut() {
            Some((last, blocks)) if *last == role => blocks.extend(texts),
            _ => turns.push((role, texts)),
        }
    }
    ((!system.is_empty()).then(|| system.join("\n\n")), turns)
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_request_body_on_any_route_translates_or_is_refused_with_a_4xx(
        upstream in prop::sample::select(UPSTREAMS.to_vec()),
        path in request_path(),
        body in request_body(),
    ) {
        match translate(upstream, &path, &body) {
            Err(status) => prop_assert!((400..500).contains(&status), "status {}", status),
            Ok(t) => {
                if let Some(new) = &t.body {
                    let parsed: Value = serde_json::from_slice(new)
                        .map_err(|e| TestCaseError::fail(format!("translated body is not JSON: {e}")))?;
                    prop_assert!(parsed.is_object());
                    // What the upstream reads is what the filter checked.
                    prop_assert_eq!(parsed["model"].as_str(), t.model());
                }
                if t.response.kind != ResponseKind::Opaque && t.model().is_some() {
                    prop_assert!(!t.model().unwrap_or_default().is_empty());
                }
            }
        }
    }

    #[test]
    fn openai_chat_to_ollama_keeps_model_messages_and_stream(r in chat_request()) {
        let body = serde_json::to_vec(&r.to_json()).unwrap();
        let t = translate(Upstream::Ollama, "/v1/chat/completions", &body)
            .map_err(|s| TestCaseError::fail(format!("refused with {s}")))?;
        prop_assert_eq!(t.path.as_deref(), Some("/api/chat"));
        prop_assert_eq!(t.model(), Some(r.model.as_str()));
        let stream = r.stream.unwrap_or(false);
        prop_assert_eq!(t.stream(), stream);
        prop_assert_eq!(t.client_wants_usage(), stream && r.include_usage == Some(true));
        let out: Value = serde_json::from_slice(t.body.as_deref().unwrap_or_default()).unwrap();
        prop_assert_eq!(&out["model"], &json!(r.model));
        prop_assert_eq!(&out["stream"], &json!(stream));
        // Reverse mapping: Ollama's (role, content) back to OpenAI's.
        let messages = out["messages"].as_array().cloned().unwrap_or_default();
        prop_assert_eq!(messages.len(), r.messages.len());
        for (m, (role, content)) in messages.iter().zip(&r.messages) {
            let role = if *role == "developer" { "system" } else { role };
            prop_assert_eq!(&m["role"], &json!(role));
            prop_assert_eq!(&m["content"], &json!(content.texts().join("\n")));
        }
        prop_assert_eq!(out["options"]["num_predict"].as_u64(), r.completion_budget());
        prop_assert_eq!(out["options"]["temperature"].as_f64(), r.temperature);
    }

    #[test]
    fn openai_chat_to_anthropic_keeps_model_system_turns_and_stream(r in chat_request()) {
        let body = serde_json::to_vec(&r.to_json()).unwrap();
        let t = translate(Upstream::Anthropic, "/v1/chat/completions", &body)
            .map_err(|s| TestCaseError::fail(format!("refused with {s}")))?;
        prop_assert_eq!(t.path.as_deref(), Some("/v1/messages"));
        prop_assert_eq!(t.model(), Some(r.model.as_str()));
        let stream = r.stream.unwrap_or(false);
        prop_assert_eq!(t.stream(), stream);
        let out: Value = serde_json::from_slice(t.body.as_deref().unwrap_or_default()).unwrap();
        prop_assert_eq!(&out["model"], &json!(r.model));
        prop_assert_eq!(&out["stream"], &json!(stream));
        prop_assert_eq!(
            out["max_tokens"].as_u64(),
            Some(r.completion_budget().unwrap_or(RequestOptions::default().anthropic_max_tokens))
        );
        let (system, turns) = anthropic_reference(&r);
        prop_assert_eq!(out["system"].as_str(), system.as_deref());
        let got: Vec<(String, Vec<String>)> = out["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let texts = m["content"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|b| b["text"].as_str().unwrap_or("<not text>").to_owned())
                    .collect();
                (m["role"].as_str().unwrap_or("").to_owned(), texts)
            })
            .collect();
        let want: Vec<(String, Vec<String>)> =
            turns.into_iter().map(|(r, t)| (r.to_owned(), t)).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn openai_passthrough_stream_gets_only_include_usage_added(r in chat_request()) {
        let original = r.to_json();
        let body = serde_json::to_vec(&original).unwrap();
        let t = translate(Upstream::OpenAi, "/v1/chat/completions", &body)
            .map_err(|s| TestCaseError::fail(format!("refused with {s}")))?;
        prop_assert_eq!(t.path.as_deref(), None);
        prop_assert_eq!(t.model(), Some(r.model.as_str()));
        let stream = r.stream == Some(true);
        prop_assert_eq!(t.stream(), stream);
        match &t.body {
            None => prop_assert!(!stream || r.include_usage == Some(true)),
            Some(new) => {
                prop_assert!(stream && r.include_usage != Some(true));
                let mut expected = original.clone();
                expected["stream_options"] = json!({"include_usage": true});
                let new: Value = serde_json::from_slice(new).unwrap();
                prop_assert_eq!(new, expected);
                prop_assert!(!t.client_wants_usage(), "the injected usage chunk must be removed");
            }
        }
    }
}

// =============================================================================================
// Plugin configuration.

/// Numbers as configurations spell them, in and out of range.
fn config_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec![
            json!(1), json!(100), json!(1024), json!(4096), json!(1_000_000_000u64), Value::Null,
        ]),
        3 => prop::sample::select(vec![
            json!(0), json!(1_000_000_001u64), json!(2_147_483_648u64), json!(4_294_967_296u64),
            json!(9_007_199_254_740_993u64), json!(i64::MAX), json!(u64::MAX), json!(-1),
            json!(1.5), json!(1e30), json!("100"),
        ]),
        1 => any::<u64>().prop_map(|n| json!(n)),
    ]
}

fn config_json() -> impl Strategy<Value = Value> {
    let entry = prop_oneof![
        4 => prop::sample::select(vec![
            "/api/pull", "/API//Pull/", "/api/%70ush", "/admin/", "/", "/x\\y", "/api/blobs/",
        ])
        .prop_map(str::to_owned),
        1 => pathish(),
    ];
    let path_list = prop_oneof![
        6 => prop::collection::vec(entry, 0..4).prop_map(|v| json!(v)),
        1 => Just(Value::Null),
        1 => Just(json!("/api/pull")),
        1 => Just(json!([1])),
    ];
    let upstream_name = prop_oneof![
        6 => prop::sample::select(vec!["openai", "ollama", "anthropic"]),
        1 => prop::sample::select(vec!["grpc", "", "Ollama"]),
    ]
    .prop_map(|s| json!(s));
    let routes = prop::collection::btree_map("[a-z]{1,4}", upstream_name.clone(), 0..3)
        .prop_map(|m| json!(m));
    let discovery = (
        prop::sample::select(vec!["model", ""]),
        prop::sample::select(vec!["/api/tags", "/v1/models", "api/tags"]),
        prop::option::of(config_number()),
        prop::option::of(config_number()),
    )
        .prop_map(|(cluster, path, interval, timeout)| {
            let mut d = json!({"cluster": cluster, "path": path});
            if let Some(i) = interval {
                d["interval_ms"] = i;
            }
            if let Some(t) = timeout {
                d["timeout_ms"] = t;
            }
            d
        });
    let routing = prop::sample::select(vec![
        json!({"backends": {"a": {"upstream": "ollama", "cluster": "c"}},
               "models": [{"match": "*", "backend": "a"}]}),
        json!({"backends": {"a": {"upstream": "openai", "cluster": "c", "discovery": false},
                            "b": {"upstream": "openai", "cluster": "d", "fallback": "a"}},
               "models": [{"match": "gpt-*", "backend": "b"}], "default_backend": "a",
               "aliases": {"fast": "gpt-4o-mini"}}),
        json!({"backends": {}}),
        json!({"backends": {"bad name": {"upstream": "ollama", "cluster": "c"}}}),
        json!({"backends": {"a": {"upstream": "ollama", "cluster": "c"}},
               "models": [{"match": "*", "backend": "missing"}]}),
    ]);
    let prices = prop::sample::select(vec![
        json!({"models": [{"match": "gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}]}),
        json!({"default": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 3.0}}),
        json!({"default": {"input_usd_per_mtok": -2, "output_usd_per_mtok": 1}}),
        json!({"default": {"input_usd_per_mtok": 1e300, "output_usd_per_mtok": 1}}),
        json!({}),
    ]);
    use prop::option::weighted as some;
    (
        some(0.3, path_list.clone()),
        some(0.3, path_list),
        some(0.3, upstream_name),
        some(0.3, routes),
        some(0.3, config_number()),
        some(0.3, config_number()),
        some(0.3, config_number()),
        some(0.2, discovery),
        prop::option::weighted(0.2, routing),
        prop::option::weighted(0.2, prices),
        prop::option::weighted(0.05, Just(json!(1))),
    )
        .prop_map(
            |(
                paths,
                prefixes,
                upstream,
                routes,
                body,
                anthropic,
                reservation,
                discovery,
                routing,
                prices,
                bogus,
            )| {
                let mut c = serde_json::Map::new();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        c.insert(k.to_owned(), v);
                    }
                };
                put("blocked_paths", paths);
                put("blocked_prefixes", prefixes);
                put("upstream", upstream);
                put("routes", routes);
                put("max_body_bytes", body);
                put("anthropic_max_tokens", anthropic);
                put("default_reservation_tokens", reservation);
                put("discovery", discovery);
                put("routing", routing);
                put("prices", prices);
                put("bogus", bogus);
                Value::Object(c)
            },
        )
}

/// The configuration an accepted one says it is, written out again: the validated fields
/// from the typed value, the others (routing, prices, …) as they were given.
fn rewritten(cfg: &Config, original: &Value) -> Value {
    const REBUILT: [&str; 8] = [
        "blocked_paths",
        "blocked_prefixes",
        "upstream",
        "routes",
        "max_body_bytes",
        "anthropic_max_tokens",
        "default_reservation_tokens",
        "discovery",
    ];
    let mut c: serde_json::Map<String, Value> = original
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !REBUILT.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    c.insert("blocked_paths".into(), json!(cfg.blocklist.paths()));
    c.insert("blocked_prefixes".into(), json!(cfg.blocklist.prefixes()));
    c.insert("max_body_bytes".into(), json!(cfg.max_body_bytes));
    c.insert(
        "anthropic_max_tokens".into(),
        json!(cfg.request_options.anthropic_max_tokens),
    );
    c.insert(
        "default_reservation_tokens".into(),
        json!(cfg.default_reservation_tokens),
    );
    if cfg.routing.is_none() {
        c.insert("upstream".into(), json!(cfg.upstream.as_str()));
        let routes: serde_json::Map<String, Value> = cfg
            .routes
            .iter()
            .map(|(k, u)| (k.clone(), json!(u.as_str())))
            .collect();
        c.insert("routes".into(), Value::Object(routes));
        if let Some(d) = &cfg.discovery {
            c.insert(
                "discovery".into(),
                json!({"cluster": d.cluster, "path": d.path, "interval_ms": d.interval_ms,
                       "timeout_ms": d.timeout_ms}),
            );
        }
    }
    Value::Object(c)
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn any_plugin_configuration_is_parsed_or_refused_and_what_is_accepted_revalidates(
        config in prop_oneof![
            4 => config_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => request_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => stream_bytes(16),
        ],
    ) {
        let Ok(cfg) = Config::from_json(&config) else { return Ok(()) };
        // Every blocklist entry is in normal form, and the configuration written back from
        // what was accepted is accepted as the same configuration.
        for entry in cfg.blocklist.paths().iter().chain(cfg.blocklist.prefixes()) {
            prop_assert_eq!(path_guard::normalise(entry), Ok(entry.clone()));
        }
        prop_assert!(cfg.max_body_bytes > 0);
        let original: Value = serde_json::from_slice(&config).unwrap_or(json!({}));
        let again = serde_json::to_vec(&rewritten(&cfg, &original)).unwrap();
        let reparsed = Config::from_json(&again);
        prop_assert!(reparsed.is_ok(), "{:?} refused on re-validation: {:?}", String::from_utf8_lossy(&again), reparsed.err());
        prop_assert_eq!(reparsed.ok(), Some(cfg));
    }
}
