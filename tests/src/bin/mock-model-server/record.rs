//! In-memory log of received requests, served at `GET /__mock/requests` so tests can assert
//! exactly what reached the upstream (and what the gateway blocked).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use http::{HeaderMap, Method, Uri};
use serde::Serialize;

/// Oldest entries are dropped beyond this, so a long `make up` session cannot grow unbounded.
pub const MAX_RECORDED: usize = 10_000;

/// One element of the `GET /__mock/requests` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Path plus query string, exactly as received on the request line.
    pub path: String,
    /// Lower-case header name to value; repeated headers are joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The body as UTF-8 (invalid bytes replaced); empty when the body was over the size cap.
    pub body: String,
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
        }
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
