//! Owns reading NDJSON (Ollama's streams): one JSON value per `\n`-terminated line, blank lines
//! skipped, built on the line splitter.
//!
//! A line longer than the cap is not held. When the reader was given keys to keep, the line is
//! scanned as it arrives and handed out as a smaller object holding only those top-level members
//! (Ollama's final `/api/generate` line carries a `context` array that grows with the prompt;
//! the gateway needs the counts beside it, not the array). Without keys, such a line is an error.

use super::json_fields::FieldScanner;
use super::line_splitter::{LineSplitter, Overlong, Segment};
use super::StreamError;

pub struct NdjsonReader {
    lines: LineSplitter,
    long: FieldScanner,
}

impl NdjsonReader {
    /// `keep_if_overlong` are the top-level members kept from a line over `max_line_bytes`;
    /// their kept text is bounded by `max_line_bytes` as well.
    pub fn new(max_line_bytes: usize, keep_if_overlong: &'static [&'static str]) -> Self {
        let overlong = if keep_if_overlong.is_empty() {
            Overlong::Fail
        } else {
            Overlong::Report
        };
        NdjsonReader {
            lines: LineSplitter::new(max_line_bytes, overlong),
            long: FieldScanner::new(keep_if_overlong, max_line_bytes),
        }
    }

    /// Calls `on_value` with the bytes of each complete JSON line (or the reduced object of an
    /// over-long one). The bytes are not validated here; the caller parses them once.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_value: impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let long = &mut self.long;
        self.lines
            .feed(chunk, |segment| route(segment, long, &mut on_value))
    }

    /// Ends the stream; a last line without `\n` still counts.
    pub fn finish(
        &mut self,
        mut on_value: impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let long = &mut self.long;
        self.lines
            .finish(|segment| route(segment, long, &mut on_value))
    }
}

fn route(
    segment: Segment<'_>,
    long: &mut FieldScanner,
    on_value: &mut impl FnMut(&[u8]) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    match segment {
        Segment::Line(line) if line.iter().all(u8::is_ascii_whitespace) => Ok(()),
        Segment::Line(line) => on_value(line),
        Segment::Overlong { part, end } => {
            let result = long.feed(part, &mut *on_value);
            if end {
                // Whatever the line was, the next one starts clean.
                long.reset();
            }
            result
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stream::split_test::splits;

    fn read(
        chunks: &[&[u8]],
        max: usize,
        keep: &'static [&'static str],
    ) -> Result<Vec<String>, StreamError> {
        let mut reader = NdjsonReader::new(max, keep);
        let mut out = Vec::new();
        let mut push = |v: &[u8]| {
            out.push(String::from_utf8(v.to_vec()).unwrap());
            Ok(())
        };
        for chunk in chunks {
            reader.feed(chunk, &mut push)?;
        }
        reader.finish(&mut push)?;
        Ok(out)
    }

    const STREAM: &str = include_str!("../../../tests/fixtures/ollama/chat_stream.ndjson");

    #[test]
    fn ndjson_every_line_of_the_ollama_stream_is_a_value() {
        let out = read(&[STREAM.as_bytes()], 4096, &[]).unwrap();
        assert_eq!(out.len(), STREAM.lines().count());
        for line in &out {
            let _: serde_json::Value = serde_json::from_str(line).unwrap();
        }
    }

    #[test]
    fn ndjson_split_inside_utf8_char_is_reassembled() {
        let whole = read(&[STREAM.as_bytes()], 4096, &[]).unwrap();
        assert!(STREAM.contains('🦙') && STREAM.contains('ü'));
        for chunks in splits(STREAM.as_bytes()) {
            assert_eq!(read(&chunks, 4096, &[]).unwrap(), whole);
        }
    }

    #[test]
    fn ndjson_blank_lines_and_crlf_are_tolerated() {
        let out = read(&[b"{\"a\":1}\r\n\r\n  \n{\"b\":2}"], 64, &[]).unwrap();
        assert_eq!(out, ["{\"a\":1}", "{\"b\":2}"]);
    }

    #[test]
    fn ndjson_overlong_line_without_keys_is_an_error() {
        let input = b"{\"a\":1}\n{\"context\":[1,2,3,4,5,6,7,8,9]}\n";
        for chunks in splits(input) {
            assert_eq!(
                read(&chunks, 16, &[]).unwrap_err(),
                StreamError::LineTooLong { max: 16 }
            );
        }
    }

    #[test]
    fn ndjson_overlong_line_keeps_only_the_wanted_fields_at_every_split_point() {
        let input = b"{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":true,\"context\":[101,202,303,404,505,606,707],\"eval_count\":2}\n{\"response\":\"z\",\"done\":false}\n";
        const KEEP: &[&str] = &["response", "done", "eval_count"];
        let expected = [
            "{\"response\":\"a\",\"done\":false}",
            "{\"response\":\"\",\"done\":true,\"eval_count\":2}",
            "{\"response\":\"z\",\"done\":false}",
        ];
        for chunks in splits(input) {
            assert_eq!(read(&chunks, 48, KEEP).unwrap(), expected);
        }
    }
}
