//! Owns parsing server-sent events (`text/event-stream`, as OpenAI and Anthropic stream) on top
//! of the line splitter: `event:` and `data:` fields, multi-line data joined by `\n`, `:`
//! comments, dispatch on a blank line, a leading byte-order mark dropped.
//!
//! Differences from a browser's parser, on purpose: only `\n` and `\r\n` end lines, and an event
//! still pending when the stream ends is dispatched rather than dropped (a server that omits
//! the last blank line has still said what it said). `id:` and `retry:` are ignored.

use super::line_splitter::{LineSplitter, Overlong, Segment};
use super::StreamError;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event. The bytes are not decoded; callers parse `data` once as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field; empty when absent (the default type, "message").
    pub event: &'a [u8],
    /// The `data:` lines, joined by `\n`.
    pub data: &'a [u8],
}

/// What to do with a line or event over the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// The stream fails ([`StreamError::LineTooLong`] / [`StreamError::EventTooLarge`]).
    Fail,
    /// The event holding it is dropped and parsing goes on; for readers that only count.
    Skip,
}

pub struct SseParser {
    lines: LineSplitter,
    pending: Pending,
}

struct Pending {
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// Part of this event was dropped (`Skip`): it is not dispatched.
    broken: bool,
    started: bool,
    in_long_line: bool,
    long_line_is_comment: bool,
    max_event: usize,
    oversize: Oversize,
}

impl SseParser {
    /// `max_line_bytes` bounds one line; `max_event_bytes` bounds the joined data of one event.
    pub fn new(max_line_bytes: usize, max_event_bytes: usize, oversize: Oversize) -> Self {
        let overlong = match oversize {
            Oversize::Fail => Overlong::Fail,
            Oversize::Skip => Overlong::Report,
        };
        SseParser {
            lines: LineSplitter::new(max_line_bytes, overlong),
            pending: Pending {
                event: Vec::new(),
                data: Vec::new(),
                has_data: false,
                broken: false,
                started: false,
                in_long_line: false,
                long_line_is_comment: false,
                max_event: max_event_bytes,
                oversize,
            },
        }
    }

    /// Calls `on_event` for each event completed by `chunk`.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(SseEvent<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let pending = &mut self.pending;
        self.lines
            .feed(chunk, |segment| pending.segment(segment, &mut on_event))
    }

    /// Ends the stream: a last unterminated line is read and a pending event dispatched.
    pub fn finish(
        &mut self,
        mut on_event: impl FnMut(SseEvent<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let pending = &mut self.pending;
        self.lines
            .finish(|segment| pending.segment(segment, &mut on_event))?;
        self.pending.dispatch(&mut on_event)
    }
}

impl Pending {
    fn segment(
        &mut self,
        segment: Segment<'_>,
        on_event: &mut impl FnMut(SseEvent<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        match segment {
            Segment::Line(line) => self.line(line, on_event),
            // Only reported in `Skip` mode; a long comment harms nothing.
            Segment::Overlong { part, end } => {
                if !self.in_long_line {
                    self.in_long_line = true;
                    self.long_line_is_comment = part.first() == Some(&b':');
                }
                if end {
                    self.in_long_line = false;
                    self.broken |= !self.long_line_is_comment;
                }
                Ok(())
            }
        }
    }

    fn line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(SseEvent<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let line = if self.started {
            line
        } else {
            self.started = true;
            line.strip_prefix(BOM).unwrap_or(line)
        };
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => {
                let added = value.len() + usize::from(self.has_data);
                if self.data.len() + added > self.max_event {
                    match self.oversize {
                        Oversize::Fail => {
                            return Err(StreamError::EventTooLarge {
                                max: self.max_event,
                            })
                        }
                        Oversize::Skip => self.broken = true,
                    }
                } else if !self.broken {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        on_event: &mut impl FnMut(SseEvent<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let result = if self.has_data && !self.broken {
            on_event(SseEvent {
                event: &self.event,
                data: &self.data,
            })
        } else {
            Ok(())
        };
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        self.broken = false;
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stream::split_test::splits;

    fn parse(
        chunks: &[&[u8]],
        max_line: usize,
        max_event: usize,
        oversize: Oversize,
    ) -> Result<Vec<(String, String)>, StreamError> {
        let mut parser = SseParser::new(max_line, max_event, oversize);
        let mut out = Vec::new();
        let mut push = |e: SseEvent<'_>| {
            out.push((
                String::from_utf8(e.event.to_vec()).unwrap(),
                String::from_utf8(e.data.to_vec()).unwrap(),
            ));
            Ok(())
        };
        for chunk in chunks {
            parser.feed(chunk, &mut push)?;
        }
        parser.finish(&mut push)?;
        Ok(out)
    }

    fn events(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(e, d)| ((*e).to_owned(), (*d).to_owned()))
            .collect()
    }

    const ANTHROPIC: &str = include_str!("../../../tests/fixtures/anthropic/messages_stream.sse");

    #[test]
    fn sse_anthropic_stream_parses_into_named_events() {
        let out = parse(&[ANTHROPIC.as_bytes()], 4096, 4096, Oversize::Fail).unwrap();
        let names: Vec<&str> = out.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        assert!(names.contains(&"ping"));
        for (name, data) in &out {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["type"], name.as_str());
        }
    }

    #[test]
    fn sse_split_inside_utf8_char_and_json_string_gives_the_same_events() {
        let whole = parse(&[ANTHROPIC.as_bytes()], 4096, 4096, Oversize::Fail).unwrap();
        assert!(ANTHROPIC.contains('🦙'));
        for chunks in splits(ANTHROPIC.as_bytes()) {
            assert_eq!(parse(&chunks, 4096, 4096, Oversize::Fail).unwrap(), whole);
        }
    }

    #[test]
    fn sse_fields_comments_multiline_data_and_bom() {
        let input = "\u{FEFF}: keep-alive\nevent: a\ndata: one\ndata:two\ndata\nid: 7\nretry: 10\nunknown: x\n\n\
                     data: {\"x\": 1}\r\n\r\n\
                     event: only-name\n\n\
                     data:  two spaces\n\n";
        let expected = events(&[("a", "one\ntwo\n"), ("", "{\"x\": 1}"), ("", " two spaces")]);
        for chunks in splits(input.as_bytes()) {
            assert_eq!(parse(&chunks, 64, 64, Oversize::Fail).unwrap(), expected);
        }
    }

    #[test]
    fn sse_event_type_does_not_leak_into_the_next_event() {
        let out = parse(
            &[b"event: x\ndata: 1\n\ndata: 2\n\n"],
            64,
            64,
            Oversize::Fail,
        )
        .unwrap();
        assert_eq!(out, events(&[("x", "1"), ("", "2")]));
    }

    #[test]
    fn sse_pending_event_is_dispatched_at_end_of_stream() {
        let out = parse(&[b"data: [DONE]\n"], 64, 64, Oversize::Fail).unwrap();
        assert_eq!(out, events(&[("", "[DONE]")]));
        let out = parse(&[b"data: [DONE]"], 64, 64, Oversize::Fail).unwrap();
        assert_eq!(out, events(&[("", "[DONE]")]));
    }

    #[test]
    fn sse_line_over_the_cap_fails_the_stream() {
        let input = b"data: short\n\ndata: 0123456789012345678901234567890123456789\n\n";
        for chunks in splits(input) {
            assert_eq!(
                parse(&chunks, 16, 1024, Oversize::Fail).unwrap_err(),
                StreamError::LineTooLong { max: 16 }
            );
        }
    }

    #[test]
    fn sse_event_over_the_cap_fails_the_stream() {
        let input = b"data: 0123456789\ndata: 0123456789\n\n";
        for chunks in splits(input) {
            assert_eq!(
                parse(&chunks, 64, 16, Oversize::Fail).unwrap_err(),
                StreamError::EventTooLarge { max: 16 }
            );
        }
    }

    #[test]
    fn sse_skip_mode_drops_only_the_oversized_events() {
        let input = b"data: a\n\ndata: 0123456789012345678901234567890123456789\n\n: a comment that is far too long to hold\ndata: b\n\ndata: 0123456789\ndata: 0123456789\n\ndata: c\n\n";
        let expected = events(&[("", "a"), ("", "b"), ("", "c")]);
        for chunks in splits(input) {
            assert_eq!(parse(&chunks, 24, 16, Oversize::Skip).unwrap(), expected);
        }
    }
}
