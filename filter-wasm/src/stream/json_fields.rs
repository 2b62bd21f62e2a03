//! Owns a streaming scanner over top-level JSON values (one response body, or the many values of
//! an NDJSON stream) that keeps the raw text of selected members of each top-level object, as a
//! smaller object, and skips everything else in constant memory.
//!
//! Why: the numbers the gateway needs (`usage`, `prompt_eval_count`, …) sit in bodies that may be
//! large for reasons it does not care about (Ollama's `context` token array, embedding vectors
//! of a passthrough response). Scanning lets the filter forward such bytes at once and still
//! read the few fields it needs, with memory bounded by the kept fields, not by the body.
//!
//! The scanner tracks only structure (depth, strings, escapes); it does not validate JSON. Kept
//! text is parsed by serde afterwards, which does. Keys are compared as raw bytes, so a key
//! written with escapes is not recognised (no upstream writes one). When a key appears twice in
//! one object the first one is kept.

use super::StreamError;

/// Keys longer than this are never wanted; longer ones are not stored.
const MAX_KEY_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Key,
    Colon,
    Value,
}

pub struct FieldScanner {
    keys: &'static [&'static str],
    max: usize,
    /// 0 between top-level values, 1 inside the top-level object or array.
    depth: u32,
    top_is_object: bool,
    in_string: bool,
    escaped: bool,
    /// Only meaningful at depth 1 of a top-level object.
    expect: Expect,
    reading_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// The depth-1 member being read is one of `keys`.
    capturing: bool,
    /// The reduced object being built: `{"key":value,...`.
    kept: Vec<u8>,
    /// Bit `i` set once `keys[i]` was kept from the current object.
    kept_mask: u64,
    failed: bool,
}

impl FieldScanner {
    /// `keys` (at most 64) are the top-level members to keep; `max_kept_bytes` bounds the
    /// reduced object of one top-level value.
    pub fn new(keys: &'static [&'static str], max_kept_bytes: usize) -> Self {
        FieldScanner {
            keys,
            max: max_kept_bytes,
            depth: 0,
            top_is_object: false,
            in_string: false,
            escaped: false,
            expect: Expect::Key,
            reading_key: false,
            key: Vec::new(),
            key_too_long: false,
            capturing: false,
            kept: Vec::new(),
            kept_mask: 0,
            failed: false,
        }
    }

    /// Inside a top-level value that has not ended yet.
    pub fn in_value(&self) -> bool {
        self.depth > 0 || self.in_string
    }

    /// Forgets any unfinished value, e.g. at the end of an NDJSON line that was not JSON.
    pub fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.reading_key = false;
        self.capturing = false;
        self.failed = false;
        self.kept.clear();
    }

    /// Scans `bytes`, calling `on_object` with the reduced object (`{}` when no wanted key was
    /// present) each time a top-level object ends. Top-level arrays and scalars are skipped.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut on_object: impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        if self.failed {
            return Err(StreamError::EventTooLarge { max: self.max });
        }
        let result = self.scan(bytes, &mut on_object);
        if matches!(result, Err(StreamError::EventTooLarge { .. })) {
            self.failed = true;
            self.kept = Vec::new();
        }
        result
    }

    fn scan(
        &mut self,
        bytes: &[u8],
        on_object: &mut impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let mut i = 0;
        while i < bytes.len() {
            if !self.in_string {
                let b = bytes[i];
                i += 1;
                self.structural(b, on_object)?;
                continue;
            }
            if !self.escaped {
                // Most bytes are string content: jump to the next quote or backslash.
                let rest = &bytes[i..];
                let n = rest
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .unwrap_or(rest.len());
                self.string_bytes(&rest[..n])?;
                i += n;
                if i == bytes.len() {
                    break;
                }
            }
            let b = bytes[i];
            i += 1;
            if self.escaped {
                self.escaped = false;
                self.string_bytes(&[b])?;
            } else if b == b'\\' {
                self.escaped = true;
                self.string_bytes(&[b])?;
            } else {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    self.expect = Expect::Colon;
                } else {
                    self.keep(&[b])?;
                }
            }
        }
        Ok(())
    }

    fn structural(
        &mut self,
        b: u8,
        on_object: &mut impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        match b {
            // Whitespace outside strings means nothing in JSON; it is not kept.
            b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.top_is_object && self.expect == Expect::Key {
                    self.reading_key = true;
                    self.key.clear();
                    self.key_too_long = false;
                    Ok(())
                } else {
                    self.keep(b"\"")
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    self.depth = 1;
                    self.top_is_object = b == b'{';
                    self.expect = Expect::Key;
                    self.capturing = false;
                    self.kept_mask = 0;
                    self.kept.clear();
                    self.kept.push(b'{');
                    return Ok(());
                }
                self.depth = self.depth.saturating_add(1);
                self.keep(&[b])
            }
            b'}' | b']' => match self.depth {
                // A stray closer between values: not JSON; serde will say so if it matters.
                0 => Ok(()),
                1 => {
                    self.depth = 0;
                    self.capturing = false;
                    if self.top_is_object {
                        // `keep` reserves this byte, but an object with nothing kept never
                        // went through it: a cap under 2 bytes is too small even for `{}`.
                        if self.kept.len() + 1 > self.max {
                            return Err(StreamError::EventTooLarge { max: self.max });
                        }
                        self.kept.push(b'}');
                        on_object(&self.kept)?;
                    }
                    Ok(())
                }
                _ => {
                    self.depth -= 1;
                    self.keep(&[b])
                }
            },
            b',' if self.depth == 1 => {
                self.capturing = false;
                self.expect = Expect::Key;
                Ok(())
            }
            b':' if self.depth == 1 && self.top_is_object => {
                if self.expect == Expect::Colon {
                    self.expect = Expect::Value;
                    self.start_capture_if_wanted()?;
                }
                Ok(())
            }
            _ => self.keep(&[b]),
        }
    }

    fn string_bytes(&mut self, part: &[u8]) -> Result<(), StreamError> {
        if self.reading_key {
            if self.key.len() + part.len() > MAX_KEY_BYTES {
                self.key_too_long = true;
            } else {
                self.key.extend_from_slice(part);
            }
            return Ok(());
        }
        self.keep(part)
    }

    fn start_capture_if_wanted(&mut self) -> Result<(), StreamError> {
        if self.key_too_long {
            return Ok(());
        }
        let Some(index) = self.keys.iter().position(|k| k.as_bytes() == self.key) else {
            return Ok(());
        };
        let bit = 1u64.checked_shl(index as u32).unwrap_or(0);
        if self.kept_mask & bit != 0 {
            return Ok(());
        }
        self.kept_mask |= bit;
        let extra = self.key.len() + 4;
        if self.kept.len() + extra > self.max {
            return Err(StreamError::EventTooLarge { max: self.max });
        }
        if self.kept.len() > 1 {
            self.kept.push(b',');
        }
        self.kept.push(b'"');
        self.kept.extend_from_slice(&self.key);
        self.kept.extend_from_slice(b"\":");
        self.capturing = true;
        Ok(())
    }

    fn keep(&mut self, part: &[u8]) -> Result<(), StreamError> {
        if !self.capturing {
            return Ok(());
        }
        // One byte is reserved for the closing brace.
        if self.kept.len() + part.len() + 1 > self.max {
            return Err(StreamError::EventTooLarge { max: self.max });
        }
        self.kept.extend_from_slice(part);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stream::split_test::splits;

    fn scan(
        keys: &'static [&'static str],
        max: usize,
        chunks: &[&[u8]],
    ) -> Result<Vec<String>, StreamError> {
        let mut scanner = FieldScanner::new(keys, max);
        let mut out = Vec::new();
        for chunk in chunks {
            scanner.feed(chunk, |obj| {
                out.push(String::from_utf8(obj.to_vec()).unwrap());
                Ok(())
            })?;
        }
        Ok(out)
    }

    const USAGE: &[&str] = &["usage", "prompt_eval_count"];

    #[test]
    fn keeps_only_wanted_top_level_members() {
        let body = br#"{"id":"x","choices":[{"usage":"nested, not top-level"}],"usage":{"prompt_tokens":3,"completion_tokens":5},"prompt_eval_count":7}"#;
        let out = scan(USAGE, 1024, &[body]).unwrap();
        assert_eq!(
            out,
            [r#"{"usage":{"prompt_tokens":3,"completion_tokens":5},"prompt_eval_count":7}"#]
        );
    }

    #[test]
    fn object_without_wanted_keys_gives_an_empty_object() {
        assert_eq!(scan(USAGE, 64, &[br#"{"a":1}"#]).unwrap(), ["{}"]);
    }

    #[test]
    fn strings_with_quotes_braces_and_keys_inside_do_not_confuse_the_scanner() {
        let body = br#"{"text":"\"usage\":{\"x\":1}, } ] \\","usage" : { "s" : "a\"}b" , "n" : [1, {"k":2}] } }"#;
        let out = scan(USAGE, 1024, &[body]).unwrap();
        assert_eq!(out, [r#"{"usage":{"s":"a\"}b","n":[1,{"k":2}]}}"#]);
        let parsed: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(parsed["usage"]["s"], "a\"}b");
    }

    #[test]
    fn every_split_point_gives_the_same_objects() {
        let input = "{\"context\":[1,2,3],\"message\":{\"content\":\"Grüße 🦙 \\\"q\\\"\"},\"eval_count\":9}\n{\"eval_count\":10}\n[{\"eval_count\":1}]\n".as_bytes();
        const KEYS: &[&str] = &["message", "eval_count"];
        let whole = scan(KEYS, 1024, &[input]).unwrap();
        assert_eq!(
            whole,
            [
                "{\"message\":{\"content\":\"Grüße 🦙 \\\"q\\\"\"},\"eval_count\":9}",
                "{\"eval_count\":10}"
            ]
        );
        for chunks in splits(input) {
            assert_eq!(scan(KEYS, 1024, &chunks).unwrap(), whole);
        }
    }

    #[test]
    fn large_skipped_members_cost_no_memory() {
        let mut body = br#"{"context":["#.to_vec();
        for i in 0..100_000 {
            body.extend_from_slice(format!("{i},").as_bytes());
        }
        body.extend_from_slice(br#"0],"prompt_eval_count":12}"#);
        let mut scanner = FieldScanner::new(USAGE, 64);
        let mut out = Vec::new();
        for chunk in body.chunks(1000) {
            scanner
                .feed(chunk, |o| {
                    out.push(o.to_vec());
                    Ok(())
                })
                .unwrap();
            assert!(scanner.kept.capacity() <= 64);
        }
        assert_eq!(out, [br#"{"prompt_eval_count":12}"#.to_vec()]);
    }

    #[test]
    fn kept_bytes_over_the_cap_are_an_error_not_growth() {
        let body = br#"{"usage":{"prompt_tokens":1234567890}}"#;
        for chunks in splits(body) {
            let err = scan(USAGE, 16, &chunks).unwrap_err();
            assert_eq!(err, StreamError::EventTooLarge { max: 16 });
        }
    }

    /// Found by `field_scanner_on_arbitrary_bytes_is_chunking_invariant_and_within_its_cap`
    /// (tests/properties.rs): `{}` was handed out under a cap of 0 or 1 byte.
    #[test]
    fn empty_reduced_object_respects_a_cap_below_its_two_bytes() {
        for max in [0, 1] {
            let err = scan(USAGE, max, &[b"{}"]).unwrap_err();
            assert_eq!(err, StreamError::EventTooLarge { max });
        }
        assert_eq!(scan(USAGE, 2, &[b"{ }"]).unwrap(), ["{}"]);
    }

    #[test]
    fn first_of_duplicate_keys_is_kept() {
        let out = scan(USAGE, 64, &[br#"{"usage":1,"usage":2}"#]).unwrap();
        assert_eq!(out, [r#"{"usage":1}"#]);
    }

    #[test]
    fn unfinished_value_is_reported_and_reset_forgets_it() {
        let mut scanner = FieldScanner::new(USAGE, 64);
        scanner.feed(br#"{"usage":{"a""#, |_| Ok(())).unwrap();
        assert!(scanner.in_value());
        scanner.reset();
        assert!(!scanner.in_value());
        let mut out = Vec::new();
        scanner
            .feed(br#"{"usage":2}"#, |o| {
                out.push(o.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(out, [br#"{"usage":2}"#.to_vec()]);
    }
}
