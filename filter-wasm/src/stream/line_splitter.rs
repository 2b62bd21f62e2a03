//! Owns splitting a byte stream into lines on `\n` bytes (a `\r` before it is dropped), with the
//! partial last line carried to the next chunk under a hard cap.
//!
//! Lines that lie wholly inside one chunk are handed out as slices of that chunk, without a
//! copy; only the unfinished tail is copied, into a buffer that is reused. UTF-8 is never
//! decoded here: a multi-byte character cut by a chunk boundary is simply carried with its line.
//! A bare `\r` is not a line end (no API this gateway speaks uses one).

use super::StreamError;

/// What happens to a line longer than the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlong {
    /// The stream fails with [`StreamError::LineTooLong`], now and on every later call.
    Fail,
    /// The line is handed out in pieces as [`Segment::Overlong`] while it arrives, so the
    /// caller can forward or scan it without the splitter holding it.
    Report,
}

/// One piece of output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// A complete line, without its `\n` or `\r\n`.
    Line(&'a [u8]),
    /// Part of a line longer than the cap, in order, handed out from the moment the line
    /// passes the cap; `end` is set on the last part (its `\n` was reached or the stream
    /// ended). The parts hold every byte of the line but the final `\n`, so a trailing `\r`
    /// may appear in the last part.
    Overlong { part: &'a [u8], end: bool },
}

pub struct LineSplitter {
    carry: Vec<u8>,
    max: usize,
    overlong: Overlong,
    /// Inside a line that already exceeded the cap (`Report` mode).
    in_overlong: bool,
    failed: bool,
}

impl LineSplitter {
    /// `max_line_bytes` bounds a line, counted without its `\n` (a `\r` before it counts).
    pub fn new(max_line_bytes: usize, overlong: Overlong) -> Self {
        LineSplitter {
            carry: Vec::new(),
            max: max_line_bytes,
            overlong,
            in_overlong: false,
            failed: false,
        }
    }

    /// Bytes of an unfinished line held for the next chunk; never more than the cap.
    pub fn carried(&self) -> usize {
        self.carry.len()
    }

    /// Splits `chunk`, calling `on_segment` for each complete line (and, in `Report` mode,
    /// each piece of an over-long one). An error from `on_segment` stops the feed and is
    /// returned; the splitter itself stays usable.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_segment: impl FnMut(Segment<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if self.failed {
            return Err(StreamError::LineTooLong { max: self.max });
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
                self.hold(rest, &mut on_segment)?;
                break;
            };
            let line = &rest[..newline];
            rest = &rest[newline + 1..];
            if self.in_overlong {
                self.in_overlong = false;
                on_segment(Segment::Overlong {
                    part: line,
                    end: true,
                })?;
            } else if self.carry.is_empty() {
                self.complete(line, &mut on_segment)?;
            } else if self.carry.len() + line.len() > self.max {
                self.overflow_with(line, true, &mut on_segment)?;
            } else {
                self.carry.extend_from_slice(line);
                let result = on_segment(Segment::Line(strip_cr(&self.carry)));
                self.carry.clear();
                result?;
            }
        }
        Ok(())
    }

    /// Ends the stream: an unterminated last line is handed out as a line (or as the end of an
    /// over-long one).
    pub fn finish(
        &mut self,
        mut on_segment: impl FnMut(Segment<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if self.failed {
            return Err(StreamError::LineTooLong { max: self.max });
        }
        if self.in_overlong {
            self.in_overlong = false;
            return on_segment(Segment::Overlong {
                part: &[],
                end: true,
            });
        }
        if self.carry.is_empty() {
            return Ok(());
        }
        let result = on_segment(Segment::Line(strip_cr(&self.carry)));
        self.carry.clear();
        result
    }

    /// A complete line that never touched the carry buffer.
    fn complete(
        &mut self,
        line: &[u8],
        on_segment: &mut impl FnMut(Segment<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if line.len() > self.max {
            return self.overflow_with(line, true, on_segment);
        }
        on_segment(Segment::Line(strip_cr(line)))
    }

    /// The unterminated tail of a chunk.
    fn hold(
        &mut self,
        tail: &[u8],
        on_segment: &mut impl FnMut(Segment<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if self.in_overlong {
            return on_segment(Segment::Overlong {
                part: tail,
                end: false,
            });
        }
        if self.carry.len() + tail.len() > self.max {
            return self.overflow_with(tail, false, on_segment);
        }
        self.carry.extend_from_slice(tail);
        Ok(())
    }

    /// The line (carry + `more`) went over the cap.
    fn overflow_with(
        &mut self,
        more: &[u8],
        end: bool,
        on_segment: &mut impl FnMut(Segment<'_>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if self.overlong == Overlong::Fail {
            self.carry = Vec::new();
            self.failed = true;
            return Err(StreamError::LineTooLong { max: self.max });
        }
        self.in_overlong = !end;
        if !self.carry.is_empty() {
            let result = on_segment(Segment::Overlong {
                part: &self.carry,
                end: false,
            });
            // Release the memory: an over-long line says nothing about the next ones.
            self.carry = Vec::new();
            result?;
        }
        on_segment(Segment::Overlong { part: more, end })
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stream::split_test::splits;

    /// What a caller sees, flattened: complete lines, and over-long lines reassembled with a
    /// marker so they can be told apart.
    fn run(chunks: &[&[u8]], max: usize, overlong: Overlong) -> Result<Vec<Vec<u8>>, StreamError> {
        let mut splitter = LineSplitter::new(max, overlong);
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut long: Vec<u8> = Vec::new();
        let mut collect = |segment: Segment<'_>| {
            match segment {
                Segment::Line(line) => out.push(line.to_vec()),
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
            splitter.feed(chunk, &mut collect)?;
            assert!(splitter.carried() <= max, "carry exceeded the cap");
        }
        splitter.finish(&mut collect)?;
        Ok(out)
    }

    fn lines(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn lines_split_on_newline_and_crlf() {
        let out = run(&[b"a\nbc\r\n\nd"], 64, Overlong::Fail).unwrap();
        assert_eq!(out, lines(&["a", "bc", "", "d"]));
    }

    #[test]
    fn bare_carriage_return_is_not_a_line_end() {
        let out = run(&[b"a\rb\n"], 64, Overlong::Fail).unwrap();
        assert_eq!(out, lines(&["a\rb"]));
    }

    #[test]
    fn every_split_point_gives_the_same_lines() {
        let input = "first line\r\nzweite Zeile: Grüße 🦙\n\n{\"k\":\"v\\\"q\"}\nlast".as_bytes();
        let whole = run(&[input], 64, Overlong::Fail).unwrap();
        assert_eq!(
            whole,
            lines(&[
                "first line",
                "zweite Zeile: Grüße 🦙",
                "",
                "{\"k\":\"v\\\"q\"}",
                "last"
            ])
        );
        for chunks in splits(input) {
            assert_eq!(run(&chunks, 64, Overlong::Fail).unwrap(), whole);
        }
    }

    #[test]
    fn split_inside_utf8_char_is_reassembled() {
        let input = "é🦙\n".as_bytes();
        // Cut inside the 2-byte é and inside the 4-byte llama.
        for at in [1, 3, 4, 5] {
            let out = run(&[&input[..at], &input[at..]], 64, Overlong::Fail).unwrap();
            assert_eq!(out, lines(&["é🦙"]));
        }
    }

    #[test]
    fn split_between_cr_and_lf_drops_the_cr() {
        let out = run(&[b"abc\r", b"\ndef\n"], 64, Overlong::Fail).unwrap();
        assert_eq!(out, lines(&["abc", "def"]));
    }

    #[test]
    fn line_at_the_cap_passes_and_one_byte_more_fails() {
        let ok = run(&[b"12345678\n"], 8, Overlong::Fail).unwrap();
        assert_eq!(ok, lines(&["12345678"]));
        let err = run(&[b"123456789\n"], 8, Overlong::Fail).unwrap_err();
        assert_eq!(err, StreamError::LineTooLong { max: 8 });
    }

    #[test]
    fn cap_exceeded_is_an_error_at_every_split_point_not_growth() {
        let input = b"short\n0123456789abcdef\nafter\n";
        for chunks in splits(input) {
            let err = run(&chunks, 8, Overlong::Fail).unwrap_err();
            assert_eq!(err, StreamError::LineTooLong { max: 8 });
        }
    }

    #[test]
    fn unterminated_line_over_the_cap_fails_before_its_newline() {
        let mut splitter = LineSplitter::new(4, Overlong::Fail);
        let mut noop = |_: Segment<'_>| Ok(());
        splitter.feed(b"abc", &mut noop).unwrap();
        assert_eq!(
            splitter.feed(b"de", &mut noop),
            Err(StreamError::LineTooLong { max: 4 })
        );
        assert_eq!(splitter.carried(), 0);
        // Once failed, always failed: the stream is being aborted.
        assert!(splitter.feed(b"\nok\n", &mut noop).is_err());
        assert!(splitter.finish(&mut noop).is_err());
    }

    #[test]
    fn overlong_lines_are_reported_in_pieces_at_every_split_point() {
        let input = b"short\n0123456789abcdef\r\nafter\nlast-is-also-too-long";
        let expected = lines(&[
            "short",
            "LONG:0123456789abcdef\r",
            "after",
            "LONG:last-is-also-too-long",
        ]);
        for chunks in splits(input) {
            assert_eq!(run(&chunks, 8, Overlong::Report).unwrap(), expected);
        }
    }

    #[test]
    fn callback_error_stops_the_feed() {
        let mut splitter = LineSplitter::new(64, Overlong::Fail);
        let mut seen = 0;
        let result = splitter.feed(b"a\nb\nc\n", |_| {
            seen += 1;
            Err(StreamError::Truncated)
        });
        assert_eq!(result, Err(StreamError::Truncated));
        assert_eq!(seen, 1);
    }
}
