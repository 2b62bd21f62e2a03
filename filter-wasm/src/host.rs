//! Owns the seam between the filter logic and Envoy: the few host calls it needs, as a trait
//! the proxy-wasm contexts implement with hostcalls and tests implement with a fake.

/// The host calls the filter logic needs. Reads return `None` when the value is missing or the
/// host refused the call: the logic decides what that means, never a panic.
pub trait Host {
    /// A request header's raw value (`:path`, …).
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets (or with `None` removes) a request header. Only while request headers are held.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// An Envoy attribute such as `["request", "id"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets filter state `wasm.<name>`.
    fn set_property(&mut self, name: &str, value: &str);
    /// Ends the stream with a locally generated response.
    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
    /// The buffered request body, bytes `0..size`.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (`size` bytes) with `body`.
    fn set_request_body(&mut self, size: usize, body: &[u8]);
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The current response body chunk (`size` bytes).
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the current response body chunk with `body`.
    fn set_response_body(&mut self, size: usize, body: &[u8]);
    /// Unix seconds.
    fn now_secs(&self) -> u64;
    fn log_warn(&self, message: &str);
}

/// What the host should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The filter sent a local reply, or waits for more body; do not forward yet.
    Pause,
}

/// A header or property as text; `None` when missing or not UTF-8.
pub fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok())
}
