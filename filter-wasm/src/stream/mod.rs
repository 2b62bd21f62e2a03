//! Owns the byte-level stream parsers: lines, SSE events, NDJSON values and a bounded scanner
//! for selected JSON fields. They work on bytes as Envoy hands them over, carry partial input
//! to the next chunk under a hard cap, and never decode UTF-8 per chunk.

pub mod json_fields;
pub mod line_splitter;
pub mod ndjson;
pub mod sse;

use std::fmt;

/// Why a stream cannot go on. The exchange turns any of these into a clean abort of the stream
/// (or, before anything was sent, an error reply); nothing here grows without bound instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// One line is longer than the cap and the reader cannot skip it.
    LineTooLong { max: usize },
    /// One SSE event's data, or the kept fields of one JSON value, exceed the cap.
    EventTooLarge { max: usize },
    /// A response that is translated as a whole exceeds the cap.
    BodyTooLarge { max: usize },
    /// The upstream sent something that is not its documented format.
    Malformed(String),
    /// The upstream stream ended before its terminal marker (Ollama `done`, Anthropic
    /// `message_stop`, OpenAI `[DONE]`).
    Truncated,
    /// Writing the output failed; not expected with in-memory buffers.
    Encode(String),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::LineTooLong { max } => write!(f, "stream line longer than {max} bytes"),
            StreamError::EventTooLarge { max } => {
                write!(f, "stream event larger than {max} bytes")
            }
            StreamError::BodyTooLarge { max } => {
                write!(f, "response body larger than {max} bytes")
            }
            StreamError::Malformed(why) => write!(f, "malformed upstream response: {why}"),
            StreamError::Truncated => write!(f, "upstream stream ended before its end marker"),
            StreamError::Encode(why) => write!(f, "encoding the response failed: {why}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Test support shared by the stream and transcoder tests: feeding one input at every split
/// point.
#[cfg(test)]
pub(crate) mod split_test {
    /// Every way of cutting `input` in two, plus byte by byte: yields the chunk lists.
    pub fn splits(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all: Vec<Vec<&[u8]>> = (0..=input.len())
            .map(|at| vec![&input[..at], &input[at..]])
            .collect();
        all.push(input.chunks(1).collect());
        all
    }
}
