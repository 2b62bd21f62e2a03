//! In-memory log of received requests, served at `GET /__mock/requests` so tests can assert
//! exactly what reached the upstream (and what the gateway blocked).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use http::{HeaderMap, Method, Uri};
use serde::Serialize;
use serde_json::Value;

/// Oldest entries are dropped beyond this, so a long `make up` session cannot grow unbounded.
pub const MAX_RECORDED: usize = 10_000;

/// Header a test sets to find its own requests again (`GET /__mock/requests?tag=…`).
pub const TAG_HEADER: &str = "x-mock-tag";

/// What the mock made of a request, as the server kind it plays reads it: the oracle of
/// the invariant suite compares this, not what the gateway thinks it sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interpreted {
    /// `ollama`, `openai`, `anthropic`, or `all` (the one-process mock of every API).
    pub api: &'static str,
    /// The endpoint it acted on (`chat`, `generate`, `pull`, `delete_model`, `list_stored`,
    /// …), or `none` when it did nothing (unknown path: 404; trailing slash: redirect).
    pub operation: String,
    /// The model it read (from the body as it decodes it, or the path).
    pub model: Option<String>,
    pub stream: Option<bool>,
    /// Whether the operation generates output tokens (chat, completions, responses, …).
    pub generates: bool,
    /// Output tokens it was asked to honour per choice; `null` when nothing bounds them
    /// (Ollama's default `num_predict` −1, a provider's model default).
    pub max_tokens: Option<u64>,
    /// Choices (or `best_of` candidates) it generates; the budget is `max_tokens × n`.
    pub n: u64,
    /// Prompt tokens it reported (whitespace-separated words, at least 1).
    pub tokens_in: u64,
    /// Output tokens it generated and reported over all choices (capped by the mock).
    pub tokens_out: u64,
    /// Ollama runtime knobs it honoured (shared server state): raw JSON, `null` if absent.
    pub keep_alive: Option<Value>,
    pub num_ctx: Option<Value>,
    /// Other load-time `options` it honoured (`num_gpu`, `num_thread`, `use_mmap`, …): a
    /// model loaded with other values is reloaded for everyone.
    pub load_options: Vec<String>,
    /// The status it answered with; no generation happened unless it is 200.
    pub status: u16,
    pub error: Option<String>,
}

impl Interpreted {
    pub fn new(api: &'static str, operation: &str) -> Self {
        Self {
            api,
            operation: operation.to_owned(),
            model: None,
            stream: None,
            generates: false,
            max_tokens: None,
            n: 1,
            tokens_in: 0,
            tokens_out: 0,
            keep_alive: None,
            num_ctx: None,
            load_options: Vec::new(),
            status: 200,
            error: None,
        }
    }
}

/// One element of the `GET /__mock/requests` array.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Path plus query string, exactly as received on the request line.
    pub path: String,
    /// Lower-case header name to value; repeated headers are joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The body as UTF-8 (invalid bytes replaced); empty when the body was over the size cap.
    pub body: String,
    /// What the mock made of it (see `Interpreted`); `null` for a body over the size cap.
    pub interpreted: Option<Interpreted>,
}

impl RecordedRequest {
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Self {
        let path = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let mut flat: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            flat.entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        Self {
            method: method.as_str().to_owned(),
            path,
            headers: flat,
            body: String::from_utf8_lossy(body).into_owned(),
            interpreted: None,
        }
    }

    pub fn with(mut self, interpreted: Interpreted) -> Self {
        self.interpreted = Some(interpreted);
        self
    }

    fn tag(&self) -> Option<&str> {
        self.headers.get(TAG_HEADER).map(String::as_str)
    }
}

#[derive(Debug)]
pub struct Recorder {
    entries: Mutex<VecDeque<RecordedRequest>>,
    cap: usize,
}

impl Recorder {
    pub fn new(cap: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            cap,
        }
    }

    pub fn record(&self, entry: RecordedRequest) {
        let mut entries = self.lock();
        if entries.len() >= self.cap {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    pub fn snapshot(&self) -> Vec<RecordedRequest> {
        self.lock().iter().cloned().collect()
    }

    /// The entries whose `x-mock-tag` header is `tag`.
    pub fn tagged(&self, tag: &str) -> Vec<RecordedRequest> {
        self.lock()
            .iter()
            .filter(|e| e.tag() == Some(tag))
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The lock is never held across an await or a panic-prone call, but if a panic ever
    /// poisons it the log is still consistent (one push/pop at a time), so keep using it.
    fn lock(&self) -> MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn entry(path: &str) -> RecordedRequest {
        let uri: Uri = path.parse().expect("test uri");
        RecordedRequest::new(&Method::GET, &uri, &HeaderMap::new(), b"")
    }

    #[test]
    fn oldest_entry_is_dropped_at_the_cap() {
        let recorder = Recorder::new(2);
        for p in ["/a", "/b", "/c"] {
            recorder.record(entry(p));
        }
        let paths: Vec<String> = recorder.snapshot().into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["/b", "/c"]);
    }

    #[test]
    fn query_is_kept_and_repeated_headers_are_joined() {
        let uri: Uri = "/v1/models?limit=2&x=%20".parse().expect("test uri");
        let mut headers = HeaderMap::new();
        headers.append("X-Trace", HeaderValue::from_static("one"));
        headers.append("x-trace", HeaderValue::from_static("two"));
        let e = RecordedRequest::new(&Method::POST, &uri, &headers, b"{\xff}");
        assert_eq!(e.path, "/v1/models?limit=2&x=%20");
        assert_eq!(e.headers["x-trace"], "one, two");
        assert_eq!(e.body, "{\u{fffd}}");
    }
}
