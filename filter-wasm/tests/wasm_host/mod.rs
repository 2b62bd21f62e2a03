//! A wasmtime host that runs the built `tollgate_filter.wasm` through the proxy-wasm ABI 0.2.1
//! the way Envoy 1.40 drives it, so tests see what Envoy would: actions, local replies, the
//! request as forwarded upstream, the response bytes the filter emitted, filter state.
//!
//! It knows nothing of the filter's Rust API, only the ABI, so it keeps working while the
//! filter's logic and proxy-wasm contexts change. Where Envoy is strict the host is too, so a test fails where
//! Envoy would crash the VM: a header map the filter no longer holds (request headers after
//! `on_request_headers` returned Continue, outside `on_log`) answers `BadArgument`, which
//! proxy-wasm 0.2.5 turns into a panic (`shared/research/envoy-1.40-facts.md`, 4a);
//! `set_buffer_bytes` follows Envoy's `start == 0` drain-and-prepend rule; the plugin
//! configuration is readable only inside `on_configure`. A hostcall the host does not
//! implement answers `Unimplemented` and fails the test, naming the call.
//!
//! Writing a test:
//! ```ignore
//! let mut filter = Filter::load(r#"{"upstream": "ollama"}"#).unwrap();
//!
//! // Request-body rewriting: the body as the upstream got it, and its headers.
//! let mut ex = filter.request(
//!     RequestSpec::post("/v1/chat/completions")
//!         .json(r#"{"model":"m","messages":[]}"#)
//!         .authz("models", "*"), // ext_authz metadata: the key's model allowlist
//! );
//! assert_eq!(ex.request_body_actions(), [Action::Continue]);
//! let up = ex.upstream_request().unwrap();
//! assert_eq!(up.headers.get_str(":path").as_deref(), Some("/api/chat"));
//! let sent: serde_json::Value = serde_json::from_slice(&up.body).unwrap();
//!
//! // Streamed response rewriting: what left the filter for each chunk the upstream sent
//! // (`respond` runs the response callbacks, then `on_log`, `on_done`, `on_delete`).
//! ex.respond(&[(":status", "200"), ("content-type", "application/x-ndjson")],
//!            ["{\"message\":{\"content\":\"He", "llo\"}}\n", "{\"done\":true}\n"]);
//! assert_eq!(ex.response_chunks()[0].emitted, b"");       // incomplete line held back
//! let sse = String::from_utf8(ex.response_body()).unwrap();
//!
//! // Token counting: filter state set with `set_property`, read after `on_log`.
//! assert_eq!(ex.filter_state("tollgate_tokens").as_deref(), Some("42"));
//! ```
//! Step by step instead of `respond`: `response_headers`, `response_chunk` (returns what the
//! filter emitted), then `finish` (early: a client that went away mid-stream).
//! Envoy attributes the filter reads come from `RequestSpec::property` (strings as bytes,
//! integers and doubles as 8-byte little-endian, as Envoy serialises them); `respond` adds
//! `response.code` and `response.code_details` (`via_upstream`) unless the test set them.
//! `local_reply()` is the reply as the client got it; `Filter::tick`, `http_calls` and
//! `answer_http_call` drive the root context's model discovery.
//! The filter's log lines are printed to stderr, which the test runner shows on failure.

// The API is meant for tests still to come (body rewriting, streaming, token counting).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use wasmtime::{
    Caller, Engine, Extern, ExternType, Instance, Linker, Module, Store, Val, ValType, WasmParams,
    WasmResults,
};

type HostResult<T> = wasmtime::Result<T>;
type Cx<'a> = Caller<'a, HostState>;

/// proxy-wasm `WasmResult` codes.
mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// WASI `errno` for "function not supported".
const WASI_ENOSYS: i32 = 52;

/// `proxy_map_type_e` values.
mod map_type {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// `proxy_buffer_type_e` values.
mod buffer_type {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

const ROOT_CONTEXT_ID: i32 = 1;
/// 2025-06-15T12:00:00Z: a fixed clock keeps `created` fields and the like reproducible.
const DEFAULT_NOW_SECS: u64 = 1_750_000_000;

const BUILD_HINT: &str =
    "build it with `cargo build -p tollgate-filter --target wasm32-wasip1 --release`";

/// Where the built filter is: `TOLLGATE_FILTER_WASM`, else under `CARGO_TARGET_DIR`, else the
/// workspace's `target/`.
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_FILTER_WASM") {
        return PathBuf::from(p);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                manifest.join("..").join(dir)
            }
        }
        None => manifest.join("..").join("target"),
    };
    target.join("wasm32-wasip1/release/tollgate_filter.wasm")
}

/// The module is compiled once per test binary and instantiated per `Filter`.
fn compiled() -> &'static (Engine, Module) {
    static COMPILED: OnceLock<Result<(Engine, Module), String>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        let path = wasm_path();
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read the built filter {}: {e}; {BUILD_HINT}",
                path.display()
            )
        })?;
        warn_if_stale(&path);
        let mut config = wasmtime::Config::new();
        // Compile time dominates these tests; the code runs for microseconds.
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        let engine = Engine::new(&config).map_err(|e| format!("wasmtime engine: {e:?}"))?;
        let module = Module::new(&engine, bytes)
            .map_err(|e| format!("cannot compile {}: {e:?}", path.display()))?;
        Ok((engine, module))
    });
    match compiled {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// Tests run against whatever was built last; say so when the sources are newer.
fn warn_if_stale(wasm: &std::path::Path) {
    fn newest(dir: &std::path::Path, acc: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                newest(&path, acc);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                if acc.is_none_or(|t| modified > t) {
                    *acc = Some(modified);
                }
            }
        }
    }
    let Ok(built) = std::fs::metadata(wasm).and_then(|m| m.modified()) else {
        return;
    };
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut latest = None;
    newest(&manifest.join("src"), &mut latest);
    newest(&manifest.join("../core/src"), &mut latest);
    if latest.is_some_and(|t| t > built) {
        eprintln!(
            "warning: {} is older than the filter's sources; {BUILD_HINT}",
            wasm.display()
        );
    }
}

/// What a callback returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    fn from_raw(callback: &str, raw: i32) -> Action {
        match raw {
            0 => Action::Continue,
            1 => Action::Pause,
            other => panic!("{callback} returned {other}, not an ABI 0.2.1 action"),
        }
    }
}

/// An HTTP header map in Envoy's terms: lower-case names, order kept, repeats allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap(Vec<(String, Vec<u8>)>);

impl HeaderMap {
    pub fn from_pairs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::default();
        for (name, value) in pairs {
            map.add(name, value.as_bytes());
        }
        map
    }

    /// The first value of `name`, as Envoy's `get_header_map_value` answers.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn pairs(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.0.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Replaces the first `name` and drops the others, or appends.
    pub fn set(&mut self, name: &str, value: &[u8]) {
        let name = name.to_ascii_lowercase();
        match self.0.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                self.0[i].1 = value.to_vec();
                let mut seen = 0;
                self.0.retain(|(n, _)| {
                    if *n == name {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.0.push((name, value.to_vec())),
        }
    }

    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.0.retain(|(n, _)| *n != name);
    }

    /// The ABI's pair format: count, then (name size, value size) each, then the
    /// NUL-terminated names and values.
    fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (n, v) in &self.0 {
            out.extend_from_slice(&(n.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (n, v) in &self.0 {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    fn deserialize(bytes: &[u8]) -> Result<HeaderMap, String> {
        fn u32_at(bytes: &[u8], at: usize) -> Result<usize, String> {
            bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| u32::from_le_bytes(b) as usize)
                .ok_or_else(|| format!("header pairs truncated at byte {at}"))
        }
        let mut map = HeaderMap::default();
        if bytes.is_empty() {
            return Ok(map);
        }
        let count = u32_at(bytes, 0)?;
        let mut at = 4 + count * 8;
        for i in 0..count {
            let name_len = u32_at(bytes, 4 + i * 8)?;
            let value_len = u32_at(bytes, 8 + i * 8)?;
            let name = bytes
                .get(at..at + name_len)
                .ok_or("header pairs truncated (name)")?;
            at += name_len + 1;
            let value = bytes
                .get(at..at + value_len)
                .ok_or("header pairs truncated (value)")?;
            at += value_len + 1;
            map.add(&String::from_utf8_lossy(name), value);
        }
        Ok(map)
    }
}

/// A log line the filter wrote with `proxy_log` (level 0 trace … 5 critical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: u32,
    pub message: String,
}

/// A reply the filter made with `send_local_response`, as the client got it: after the
/// filter's own response callbacks ran over it, as Envoy runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    /// Headers including `:status`, and the `content-length` Envoy adds.
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The `details` argument (empty from proxy-wasm 0.2.5's `send_http_response`).
    pub details: String,
    pub grpc_status: i32,
}

impl LocalReply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get_str(name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "local reply body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The request as Envoy forwards it once the filter let it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The whole body was forwarded (the last body callback, or the headers at end of stream,
    /// returned Continue).
    pub complete: bool,
}

/// One response body callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// What the upstream sent for this callback.
    pub input: Vec<u8>,
    pub end_of_stream: bool,
    pub action: Action,
    /// What left the filter: the buffer after the callback when it returned Continue (with any
    /// `set_buffer_bytes` applied); nothing while it pauses (Envoy keeps buffering).
    pub emitted: Vec<u8>,
}

/// An outgoing `dispatch_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    pub upstream: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

type PropertyPath = Vec<String>;

fn path_of(segments: &[&str]) -> PropertyPath {
    segments.iter().map(|s| s.to_string()).collect()
}

/// What the host holds for the stream in flight.
#[derive(Default)]
struct StreamState {
    properties: HashMap<PropertyPath, Vec<u8>>,
    request_headers: HeaderMap,
    /// Envoy drops its pointer to the request headers once `on_request_headers` returns
    /// Continue; after that the map answers `BadArgument` (except in `on_log`).
    request_headers_held: bool,
    response_headers: HeaderMap,
    response_headers_held: bool,
    response_headers_seen: bool,
    access_log_phase: bool,
    /// The buffered body, present during a body callback and while the filter pauses.
    request_body: Option<Vec<u8>>,
    response_body: Option<Vec<u8>>,
    local_reply: Option<LocalReply>,
    set_properties: Vec<(PropertyPath, Vec<u8>)>,
    continued: Vec<i32>,
    closed: Vec<i32>,
    foreign_calls: Vec<String>,
}

#[derive(Default)]
struct HostState {
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    in_configure: bool,
    in_vm_start: bool,
    root_properties: HashMap<PropertyPath, Vec<u8>>,
    now_nanos: u64,
    tick_period_ms: Option<u32>,
    next_token: u32,
    http_calls: Vec<HttpCall>,
    /// Headers and body of the call being answered, during `on_http_call_response`.
    http_call_response: Option<(HeaderMap, Vec<u8>)>,
    effective_context: Option<i32>,
    logs: Vec<LogLine>,
    /// Hostcalls the host refused as unknown, and ABI misuse it noticed: each fails the test.
    failures: Vec<String>,
    random_state: u64,
    stream: StreamState,
}

impl HostState {
    fn property(&self, path: &PropertyPath) -> Option<Vec<u8>> {
        self.stream
            .properties
            .get(path)
            .or_else(|| self.root_properties.get(path))
            .cloned()
    }

    /// The map the filter may read now, or the status Envoy answers.
    fn map(&self, map_type: i32) -> Result<&HeaderMap, i32> {
        let s = &self.stream;
        match map_type {
            map_type::REQUEST_HEADERS if s.request_headers_held || s.access_log_phase => {
                Ok(&s.request_headers)
            }
            map_type::RESPONSE_HEADERS
                if s.response_headers_held || (s.access_log_phase && s.response_headers_seen) =>
            {
                Ok(&s.response_headers)
            }
            map_type::HTTP_CALL_RESPONSE_HEADERS => self
                .http_call_response
                .as_ref()
                .map(|(h, _)| h)
                .ok_or(status::BAD_ARGUMENT),
            // Maps Envoy does not have answer NotFound in the access-log phase.
            _ if s.access_log_phase => Err(status::NOT_FOUND),
            _ => Err(status::BAD_ARGUMENT),
        }
    }

    /// The map the filter may change now, or the status Envoy answers.
    fn map_mut(&mut self, map_type: i32) -> Result<&mut HeaderMap, i32> {
        let s = &mut self.stream;
        if s.access_log_phase {
            return Err(status::BAD_ARGUMENT);
        }
        match map_type {
            map_type::REQUEST_HEADERS if s.request_headers_held => Ok(&mut s.request_headers),
            map_type::RESPONSE_HEADERS if s.response_headers_held => Ok(&mut s.response_headers),
            _ => Err(status::BAD_ARGUMENT),
        }
    }

    fn buffer(&self, buffer_type: i32) -> Option<&[u8]> {
        match buffer_type {
            buffer_type::REQUEST_BODY => self.stream.request_body.as_deref(),
            buffer_type::RESPONSE_BODY => self.stream.response_body.as_deref(),
            buffer_type::HTTP_CALL_RESPONSE_BODY => {
                self.http_call_response.as_ref().map(|(_, b)| b.as_slice())
            }
            // Envoy hands these out only during the callback they belong to.
            buffer_type::VM_CONFIGURATION if self.in_vm_start => Some(&self.vm_config),
            buffer_type::PLUGIN_CONFIGURATION if self.in_configure => Some(&self.plugin_config),
            _ => None,
        }
    }
}

// ---- guest memory -------------------------------------------------------------------------

fn memory(cx: &mut Cx<'_>) -> HostResult<wasmtime::Memory> {
    cx.get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| wasmtime::Error::msg("the module exports no `memory`"))
}

fn read(cx: &mut Cx<'_>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(cx)?;
    let mut buf = vec![0; len as u32 as usize];
    mem.read(&*cx, ptr as u32 as usize, &mut buf).map_err(|_| {
        wasmtime::Error::msg(format!(
            "the filter passed an out-of-bounds buffer {ptr:#x}+{len}"
        ))
    })?;
    Ok(buf)
}

fn read_str(cx: &mut Cx<'_>, ptr: i32, len: i32) -> HostResult<String> {
    Ok(String::from_utf8_lossy(&read(cx, ptr, len)?).into_owned())
}

fn write(cx: &mut Cx<'_>, ptr: u32, bytes: &[u8]) -> HostResult<()> {
    let mem = memory(cx)?;
    mem.write(&mut *cx, ptr as usize, bytes).map_err(|_| {
        wasmtime::Error::msg(format!(
            "the filter passed an out-of-bounds pointer {ptr:#x} for {} bytes",
            bytes.len()
        ))
    })
}

fn write_u32(cx: &mut Cx<'_>, ptr: i32, value: u32) -> HostResult<()> {
    write(cx, ptr as u32, &value.to_le_bytes())
}

/// Allocates in guest memory through the module's own allocator.
fn alloc(cx: &mut Cx<'_>, size: usize) -> HostResult<u32> {
    let f = cx
        .get_export("proxy_on_memory_allocate")
        .or_else(|| cx.get_export("malloc"))
        .and_then(Extern::into_func)
        .ok_or_else(|| wasmtime::Error::msg("the module exports no proxy_on_memory_allocate"))?;
    let f = f.typed::<i32, i32>(&*cx)?;
    let ptr = f.call(&mut *cx, size as i32)?;
    if ptr == 0 {
        return Err(wasmtime::Error::msg(format!(
            "the module could not allocate {size} bytes"
        )));
    }
    Ok(ptr as u32)
}

/// Hands `bytes` to the guest as Envoy does: in memory the guest allocated, pointer and size
/// written where it asked; an empty value as a null pointer.
fn return_bytes(cx: &mut Cx<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> HostResult<()> {
    let ptr = if bytes.is_empty() {
        0
    } else {
        let p = alloc(cx, bytes.len())?;
        write(cx, p, bytes)?;
        p
    };
    write_u32(cx, ptr_ptr, ptr)?;
    write_u32(cx, size_ptr, bytes.len() as u32)
}

fn split_path(bytes: &[u8]) -> PropertyPath {
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn level_name(level: i32) -> &'static str {
    match level {
        0 => "trace",
        1 => "debug",
        2 => "info",
        3 => "warn",
        4 => "error",
        _ => "critical",
    }
}

// ---- the imports ----------------------------------------------------------------------------

fn linker(
    engine: &Engine,
    module: &Module,
    store: &mut Store<HostState>,
) -> HostResult<Linker<HostState>> {
    let mut l = Linker::new(engine);

    l.func_wrap(
        "env",
        "proxy_log",
        |mut cx: Cx<'_>, level: i32, ptr: i32, len: i32| -> HostResult<i32> {
            let message = read_str(&mut cx, ptr, len)?;
            eprintln!("[filter {}] {message}", level_name(level));
            cx.data_mut().logs.push(LogLine {
                level: level as u32,
                message,
            });
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut cx: Cx<'_>,
         path_ptr: i32,
         path_len: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> HostResult<i32> {
            let path = split_path(&read(&mut cx, path_ptr, path_len)?);
            match cx.data().property(&path) {
                Some(value) => {
                    return_bytes(&mut cx, &value, ret_ptr, ret_size)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut cx: Cx<'_>,
         path_ptr: i32,
         path_len: i32,
         value_ptr: i32,
         value_len: i32|
         -> HostResult<i32> {
            let path = split_path(&read(&mut cx, path_ptr, path_len)?);
            let value = read(&mut cx, value_ptr, value_len)?;
            cx.data_mut().stream.set_properties.push((path, value));
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut cx: Cx<'_>,
         map: i32,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> HostResult<i32> {
            let key = read_str(&mut cx, key_ptr, key_len)?;
            let value = match cx.data().map(map) {
                Ok(m) => m.get(&key).map(<[u8]>::to_vec),
                Err(status) => return Ok(status),
            };
            match value {
                Some(v) => {
                    return_bytes(&mut cx, &v, ret_ptr, ret_size)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut cx: Cx<'_>, map: i32, ret_ptr: i32, ret_size: i32| -> HostResult<i32> {
            let bytes = match cx.data().map(map) {
                Ok(m) => m.serialize(),
                Err(status) => return Ok(status),
            };
            return_bytes(&mut cx, &bytes, ret_ptr, ret_size)?;
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut cx: Cx<'_>, map: i32, ptr: i32, len: i32| -> HostResult<i32> {
            let pairs =
                HeaderMap::deserialize(&read(&mut cx, ptr, len)?).map_err(wasmtime::Error::msg)?;
            match cx.data_mut().map_mut(map) {
                Ok(m) => {
                    *m = pairs;
                    Ok(status::OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut cx: Cx<'_>,
         map: i32,
         key_ptr: i32,
         key_len: i32,
         val_ptr: i32,
         val_len: i32|
         -> HostResult<i32> {
            let key = read_str(&mut cx, key_ptr, key_len)?;
            let value = read(&mut cx, val_ptr, val_len)?;
            match cx.data_mut().map_mut(map) {
                Ok(m) => {
                    m.add(&key, &value);
                    Ok(status::OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut cx: Cx<'_>,
         map: i32,
         key_ptr: i32,
         key_len: i32,
         val_ptr: i32,
         val_len: i32|
         -> HostResult<i32> {
            let key = read_str(&mut cx, key_ptr, key_len)?;
            let value = read(&mut cx, val_ptr, val_len)?;
            match cx.data_mut().map_mut(map) {
                Ok(m) => {
                    m.set(&key, &value);
                    Ok(status::OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut cx: Cx<'_>, map: i32, key_ptr: i32, key_len: i32| -> HostResult<i32> {
            let key = read_str(&mut cx, key_ptr, key_len)?;
            match cx.data_mut().map_mut(map) {
                Ok(m) => {
                    m.remove(&key);
                    Ok(status::OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut cx: Cx<'_>,
         buffer: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> HostResult<i32> {
            let Some(buf) = cx.data().buffer(buffer) else {
                return Ok(status::NOT_FOUND);
            };
            let start = start as u32 as usize;
            if start > buf.len() {
                return Ok(status::BAD_ARGUMENT);
            }
            // proxy-wasm asks for `usize::MAX`; Envoy clamps to what the buffer has.
            let end = start.saturating_add(max as u32 as usize).min(buf.len());
            let bytes = buf[start..end].to_vec();
            return_bytes(&mut cx, &bytes, ret_ptr, ret_size)?;
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut cx: Cx<'_>,
         buffer: i32,
         start: i32,
         size: i32,
         ptr: i32,
         len: i32|
         -> HostResult<i32> {
            let data = read(&mut cx, ptr, len)?;
            let state = cx.data_mut();
            let buf = match buffer {
                buffer_type::REQUEST_BODY => state.stream.request_body.as_mut(),
                buffer_type::RESPONSE_BODY => state.stream.response_body.as_mut(),
                // Read-only buffers.
                other if state.buffer(other).is_some() => return Ok(status::BAD_ARGUMENT),
                _ => None,
            };
            let Some(buf) = buf else {
                return Ok(status::NOT_FOUND);
            };
            // Envoy's rule: at 0, drain `size` bytes then prepend; at or past the end, append.
            let start = start as u32 as usize;
            if start == 0 {
                let drained = (size as u32 as usize).min(buf.len());
                let rest = buf.split_off(drained);
                *buf = data;
                buf.extend_from_slice(&rest);
            } else if start >= buf.len() {
                buf.extend_from_slice(&data);
            } else {
                return Ok(status::BAD_ARGUMENT);
            }
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut cx: Cx<'_>,
         status_code: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         grpc_status: i32|
         -> HostResult<i32> {
            let details = read_str(&mut cx, details_ptr, details_len)?;
            let body = read(&mut cx, body_ptr, body_len)?;
            let headers = HeaderMap::deserialize(&read(&mut cx, headers_ptr, headers_len)?)
                .map_err(wasmtime::Error::msg)?;
            let state = cx.data_mut();
            if state.stream.local_reply.is_some() {
                state
                    .failures
                    .push("send_local_response called twice on one stream".to_string());
            }
            state.stream.local_reply = Some(LocalReply {
                status: status_code as u32,
                headers,
                body,
                details,
                grpc_status,
            });
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut cx: Cx<'_>, period: i32| -> HostResult<i32> {
            cx.data_mut().tick_period_ms = Some(period as u32);
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut cx: Cx<'_>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         _trailers_ptr: i32,
         _trailers_len: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> HostResult<i32> {
            let upstream = read_str(&mut cx, upstream_ptr, upstream_len)?;
            let headers = HeaderMap::deserialize(&read(&mut cx, headers_ptr, headers_len)?)
                .map_err(wasmtime::Error::msg)?;
            let body = read(&mut cx, body_ptr, body_len)?;
            let state = cx.data_mut();
            state.next_token += 1;
            let token = state.next_token;
            state.http_calls.push(HttpCall {
                token,
                upstream,
                headers,
                body,
                timeout_ms: timeout_ms as u32,
            });
            write_u32(&mut cx, token_ptr, token)?;
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut cx: Cx<'_>, ptr: i32| -> HostResult<i32> {
            let now = cx.data().now_nanos;
            write(&mut cx, ptr as u32, &now.to_le_bytes())?;
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut cx: Cx<'_>, context: i32| -> HostResult<i32> {
            cx.data_mut().effective_context = Some(context);
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut cx: Cx<'_>, stream: i32| -> HostResult<i32> {
            cx.data_mut().stream.continued.push(stream);
            Ok(status::OK)
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut cx: Cx<'_>, stream: i32| -> HostResult<i32> {
            cx.data_mut().stream.closed.push(stream);
            Ok(status::OK)
        },
    )?;

    l.func_wrap("env", "proxy_done", || -> HostResult<i32> {
        Ok(status::OK)
    })?;

    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut cx: Cx<'_>,
         name_ptr: i32,
         name_len: i32,
         _args_ptr: i32,
         _args_len: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> HostResult<i32> {
            let name = read_str(&mut cx, name_ptr, name_len)?;
            cx.data_mut().stream.foreign_calls.push(name.clone());
            // Envoy's only foreign function a filter here would use; it returns no data.
            if name == "clear_route_cache" {
                return_bytes(&mut cx, &[], ret_ptr, ret_size)?;
                Ok(status::OK)
            } else {
                Ok(status::NOT_FOUND)
            }
        },
    )?;

    // WASI, as far as Rust's std needs it in a proxy-wasm module.
    l.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut cx: Cx<'_>, count_ptr: i32, size_ptr: i32| -> HostResult<i32> {
            write_u32(&mut cx, count_ptr, 0)?;
            write_u32(&mut cx, size_ptr, 0)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "environ_get",
        |_: Cx<'_>, _environ: i32, _buf: i32| -> HostResult<i32> { Ok(0) },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut cx: Cx<'_>, fd: i32, iovs: i32, iovs_len: i32, written_ptr: i32| -> HostResult<i32> {
            let mut text = Vec::new();
            for i in 0..iovs_len {
                let iov = read(&mut cx, iovs + i * 8, 8)?;
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                text.extend(read(&mut cx, ptr, len)?);
            }
            eprint!("[filter fd {fd}] {}", String::from_utf8_lossy(&text));
            write_u32(&mut cx, written_ptr, text.len() as u32)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_: Cx<'_>, code: i32| -> HostResult<()> {
            Err(wasmtime::Error::msg(format!(
                "the filter called proc_exit({code})"
            )))
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "clock_time_get",
        |mut cx: Cx<'_>, _clock: i32, _precision: i64, ptr: i32| -> HostResult<i32> {
            let now = cx.data().now_nanos;
            write(&mut cx, ptr as u32, &now.to_le_bytes())?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "random_get",
        |mut cx: Cx<'_>, ptr: i32, len: i32| -> HostResult<i32> {
            // Deterministic on purpose: tests must not depend on chance.
            let mut bytes = Vec::with_capacity(len as u32 as usize);
            let mut x = cx.data().random_state | 1;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            cx.data_mut().random_state = x;
            write(&mut cx, ptr as u32, &bytes)?;
            Ok(0)
        },
    )?;

    // Everything else the module imports: refuse, record, and fail the test by name.
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        if l.get_by_import(&mut *store, &import).is_some() {
            continue;
        }
        let label = format!("{}.{}", import.module(), import.name());
        let code = if import.module() == "env" {
            status::UNIMPLEMENTED
        } else {
            WASI_ENOSYS
        };
        let returns_status =
            ty.results().len() == 1 && ty.results().all(|t| matches!(t, ValType::I32));
        l.func_new(
            import.module(),
            import.name(),
            ty,
            move |mut cx, _, results| {
                let message = format!(
                    "the filter called {label}, which the test host (tests/wasm_host) does not \
                 implement"
                );
                cx.data_mut().failures.push(message.clone());
                if returns_status {
                    results[0] = Val::I32(code);
                    Ok(())
                } else {
                    Err(wasmtime::Error::msg(message))
                }
            },
        )?;
    }
    Ok(l)
}

// ---- the filter -----------------------------------------------------------------------------

/// One instance of the built filter with its root context configured.
pub struct Filter {
    store: Store<HostState>,
    instance: Instance,
    next_context_id: i32,
    /// Envoy's `allow_on_headers_stop_iteration` (set in all our Envoy configs). Without it a
    /// Pause from the headers callback with a body to follow means body callbacks never come.
    pub allow_on_headers_stop_iteration: bool,
}

impl Filter {
    /// Instantiates the built module and starts it like Envoy: `_initialize`,
    /// `proxy_on_context_create(root, 0)`, `proxy_on_vm_start`, `proxy_on_configure` with
    /// `config_json` as the plugin configuration. `Err` when a start callback returns false.
    pub fn load(config_json: &str) -> Result<Filter, String> {
        let (engine, module) = compiled();
        let mut store = Store::new(
            engine,
            HostState {
                plugin_config: config_json.as_bytes().to_vec(),
                now_nanos: DEFAULT_NOW_SECS * 1_000_000_000,
                random_state: 0x9e37_79b9_7f4a_7c15,
                ..HostState::default()
            },
        );
        let linker = linker(engine, module, &mut store)
            .unwrap_or_else(|e| panic!("linking the filter: {e:?}"));
        let instance = linker
            .instantiate(&mut store, module)
            .unwrap_or_else(|e| panic!("instantiating the filter: {e:?}"));
        let mut filter = Filter {
            store,
            instance,
            next_context_id: ROOT_CONTEXT_ID + 1,
            allow_on_headers_stop_iteration: true,
        };
        for start in ["_initialize", "_start"] {
            if filter.instance.get_func(&mut filter.store, start).is_some() {
                filter.call::<(), ()>(start, ());
                break;
            }
        }
        filter.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT_CONTEXT_ID, 0));
        let vm_config_size = filter.store.data().vm_config.len() as i32;
        filter.store.data_mut().in_vm_start = true;
        let started =
            filter.call::<(i32, i32), i32>("proxy_on_vm_start", (ROOT_CONTEXT_ID, vm_config_size));
        filter.store.data_mut().in_vm_start = false;
        if started == 0 {
            return Err(format!(
                "proxy_on_vm_start returned false; {}",
                filter.recent_logs()
            ));
        }
        filter.store.data_mut().in_configure = true;
        let configured = filter.call::<(i32, i32), i32>(
            "proxy_on_configure",
            (ROOT_CONTEXT_ID, config_json.len() as i32),
        );
        filter.store.data_mut().in_configure = false;
        if configured == 0 {
            return Err(format!(
                "proxy_on_configure returned false; {}",
                filter.recent_logs()
            ));
        }
        Ok(filter)
    }

    /// Calls an export, failing the test on a trap or on anything the host refused.
    fn call<P: WasmParams, R: WasmResults>(&mut self, name: &str, params: P) -> R {
        let f = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .unwrap_or_else(|e| panic!("the filter's export {name}: {e:?}"));
        let result = f.call(&mut self.store, params);
        let failures = std::mem::take(&mut self.store.data_mut().failures);
        match result {
            Ok(r) if failures.is_empty() => r,
            Ok(_) => panic!("during {name}: {}", failures.join("; ")),
            Err(e) => {
                let mut why = format!("{name} trapped: {e:?}");
                if !failures.is_empty() {
                    why.push_str(&format!("\nafter: {}", failures.join("; ")));
                }
                panic!("{why}\n{}", self.recent_logs())
            }
        }
    }

    fn recent_logs(&self) -> String {
        let logs = &self.store.data().logs;
        let tail: Vec<String> = logs
            .iter()
            .skip(logs.len().saturating_sub(5))
            .map(|l| format!("[{}] {}", level_name(l.level as i32), l.message))
            .collect();
        if tail.is_empty() {
            "the filter logged nothing".to_string()
        } else {
            format!("last filter logs:\n{}", tail.join("\n"))
        }
    }

    /// Every line the filter logged since it was loaded.
    pub fn logs(&self) -> &[LogLine] {
        &self.store.data().logs
    }

    /// An attribute for every stream (a stream's own `RequestSpec::property` wins).
    pub fn set_property(&mut self, path: &[&str], value: impl Into<Vec<u8>>) {
        self.store
            .data_mut()
            .root_properties
            .insert(path_of(path), value.into());
    }

    /// Sets the clock `get_current_time` answers (Unix seconds).
    pub fn set_now(&mut self, unix_secs: u64) {
        self.store.data_mut().now_nanos = unix_secs * 1_000_000_000;
    }

    pub fn advance(&mut self, by: Duration) {
        self.store.data_mut().now_nanos += by.as_nanos() as u64;
    }

    /// The period the filter asked for with `set_tick_period`, if any.
    pub fn tick_period_ms(&self) -> Option<u32> {
        self.store.data().tick_period_ms
    }

    /// Runs the root context's `on_tick`.
    pub fn tick(&mut self) {
        self.call::<i32, ()>("proxy_on_tick", ROOT_CONTEXT_ID);
    }

    /// Calls the filter dispatched and that were not answered yet.
    pub fn http_calls(&self) -> &[HttpCall] {
        &self.store.data().http_calls
    }

    /// Answers a dispatched call (`on_http_call_response` on the root context).
    pub fn answer_http_call(&mut self, token: u32, headers: &[(&str, &str)], body: &[u8]) {
        let state = self.store.data_mut();
        let Some(i) = state.http_calls.iter().position(|c| c.token == token) else {
            panic!("no pending http call with token {token}");
        };
        state.http_calls.remove(i);
        let headers = HeaderMap::from_pairs(headers);
        let count = headers.len() as i32;
        state.http_call_response = Some((headers, body.to_vec()));
        self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            (ROOT_CONTEXT_ID, token as i32, count, body.len() as i32, 0),
        );
        self.store.data_mut().http_call_response = None;
    }

    /// Starts a stream: creates its context and runs the request callbacks like Envoy
    /// (headers, then each body chunk, Envoy's buffering while the filter pauses). A local
    /// reply stops the request there and runs the filter's response callbacks over it.
    pub fn request(&mut self, spec: RequestSpec) -> Exchange<'_> {
        let ctx = self.next_context_id;
        self.next_context_id += 1;
        let log_start = self.store.data().logs.len();
        let state = self.store.data_mut();
        state.stream = StreamState {
            properties: spec.properties.into_iter().collect(),
            request_headers: spec.headers,
            ..StreamState::default()
        };
        self.call::<(i32, i32), ()>("proxy_on_context_create", (ctx, ROOT_CONTEXT_ID));
        let mut ex = Exchange {
            filter: self,
            ctx,
            log_start,
            finished: false,
            request_headers_action: Action::Continue,
            request_body_actions: Vec::new(),
            upstream: None,
            stalled: false,
            response_headers_action: None,
            client_response_headers: None,
            chunks: Vec::new(),
        };
        ex.run_request(spec.body_chunks);
        ex
    }
}

/// A request as the client sends it, and the attributes Envoy would have for it.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    headers: HeaderMap,
    body_chunks: Vec<Vec<u8>>,
    properties: Vec<(PropertyPath, Vec<u8>)>,
}

impl RequestSpec {
    /// The `x-request-id` Envoy generated, also the `request.id` attribute.
    pub const REQUEST_ID: &'static str = "9b0f6c1e-3d2a-4f5b-8c7d-1e2f3a4b5c6d";

    pub fn new(method: &str, path: &str) -> RequestSpec {
        RequestSpec {
            headers: HeaderMap::from_pairs(&[
                (":authority", "gateway.test"),
                (":path", path),
                (":method", method),
                (":scheme", "http"),
                ("user-agent", "tollgate-tests"),
            ]),
            body_chunks: Vec::new(),
            properties: Vec::new(),
        }
        .request_id(Self::REQUEST_ID)
    }

    pub fn get(path: &str) -> RequestSpec {
        RequestSpec::new("GET", path)
    }

    pub fn post(path: &str) -> RequestSpec {
        RequestSpec::new("POST", path)
    }

    /// A JSON body in one chunk, with `content-type` and `content-length`.
    pub fn json(self, body: &str) -> RequestSpec {
        self.header("content-type", "application/json")
            .header("content-length", &body.len().to_string())
            .body_chunks([body])
    }

    /// The body as it arrives, chunk by chunk (no length header is added).
    pub fn body_chunks<C: AsRef<[u8]>>(mut self, chunks: impl IntoIterator<Item = C>) -> Self {
        self.body_chunks = chunks.into_iter().map(|c| c.as_ref().to_vec()).collect();
        self
    }

    /// Sets (replaces) a header.
    pub fn header(self, name: &str, value: &str) -> Self {
        self.header_bytes(name, value.as_bytes())
    }

    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.set(name, value);
        self
    }

    pub fn without_header(mut self, name: &str) -> Self {
        self.headers.remove(name);
        self
    }

    /// `x-request-id` and the `request.id` attribute (Envoy keeps them equal).
    pub fn request_id(self, id: &str) -> Self {
        self.header("x-request-id", id)
            .property(&["request", "id"], id)
    }

    /// No request id at all.
    pub fn without_request_id(mut self) -> Self {
        self.headers.remove("x-request-id");
        self.properties
            .retain(|(p, _)| *p != path_of(&["request", "id"]));
        self
    }

    /// An attribute; a later value for the same path wins.
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        let path = path_of(path);
        self.properties.retain(|(p, _)| *p != path);
        self.properties.push((path, value.into()));
        self
    }

    /// An integer attribute, as Envoy serialises it (8-byte little-endian).
    pub fn property_i64(self, path: &[&str], value: i64) -> Self {
        self.property(path, value.to_le_bytes().to_vec())
    }

    /// A number from dynamic metadata, as Envoy serialises it (8-byte little-endian f64).
    pub fn property_f64(self, path: &[&str], value: f64) -> Self {
        self.property(path, value.to_le_bytes().to_vec())
    }

    /// ext_authz dynamic metadata: `metadata.filter_metadata.envoy.filters.http.ext_authz.<key>`.
    pub fn authz(self, key: &str, value: &str) -> Self {
        self.property(
            &[
                "metadata",
                "filter_metadata",
                "envoy.filters.http.ext_authz",
                key,
            ],
            value,
        )
    }

    /// The Envoy route the request matched (`xds.route_name`).
    pub fn route(self, name: &str) -> Self {
        self.property(&["xds", "route_name"], name)
    }
}

/// One stream through the filter: what the request callbacks did, then the response.
/// Dropping it finishes the stream (`on_log`, `on_done`, `on_delete`) if the test did not.
pub struct Exchange<'f> {
    filter: &'f mut Filter,
    ctx: i32,
    log_start: usize,
    finished: bool,
    request_headers_action: Action,
    request_body_actions: Vec<Action>,
    upstream: Option<UpstreamRequest>,
    stalled: bool,
    response_headers_action: Option<Action>,
    client_response_headers: Option<HeaderMap>,
    chunks: Vec<Chunk>,
}

impl Exchange<'_> {
    fn state(&self) -> &StreamState {
        &self.filter.store.data().stream
    }

    fn state_mut(&mut self) -> &mut StreamState {
        &mut self.filter.store.data_mut().stream
    }

    fn run_request(&mut self, chunks: Vec<Vec<u8>>) {
        let ctx = self.ctx;
        self.state_mut().request_headers_held = true;
        let count = self.state().request_headers.len() as i32;
        let eos = chunks.is_empty();
        let raw = self
            .filter
            .call::<(i32, i32, i32), i32>("proxy_on_request_headers", (ctx, count, eos as i32));
        let action = Action::from_raw("proxy_on_request_headers", raw);
        self.request_headers_action = action;
        if self.reply_locally() {
            return;
        }
        if action == Action::Continue {
            self.state_mut().request_headers_held = false;
            self.forward_request(Vec::new(), eos);
        } else if !eos && !self.filter.allow_on_headers_stop_iteration {
            // Envoy turns the stop into stop-all: no body callback, the request hangs.
            self.stalled = true;
            return;
        }
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let eos = i == last;
            let buffered = self.state_mut().request_body.get_or_insert_with(Vec::new);
            buffered.extend_from_slice(&chunk);
            let size = buffered.len() as i32;
            let raw = self
                .filter
                .call::<(i32, i32, i32), i32>("proxy_on_request_body", (ctx, size, eos as i32));
            let action = Action::from_raw("proxy_on_request_body", raw);
            self.request_body_actions.push(action);
            if self.reply_locally() {
                return;
            }
            if action == Action::Continue {
                let body = self.state_mut().request_body.take().unwrap_or_default();
                self.forward_request(body, eos);
            }
        }
    }

    /// Records what went upstream: the headers as they are when they first leave, the body
    /// as each piece is let go.
    fn forward_request(&mut self, body: Vec<u8>, complete: bool) {
        let headers = self.state().request_headers.clone();
        let up = self.upstream.get_or_insert(UpstreamRequest {
            headers,
            body: Vec::new(),
            complete: false,
        });
        up.body.extend(body);
        up.complete = complete;
    }

    /// If the last callback sent a local reply, sends it through the filter's response
    /// callbacks as Envoy does, and records what the client got.
    fn reply_locally(&mut self) -> bool {
        let Some(sent) = self.state_mut().local_reply.take() else {
            return false;
        };
        let mut headers = HeaderMap::default();
        headers.add(":status", sent.status.to_string().as_bytes());
        for (name, value) in &sent.headers.0 {
            headers.add(name, value);
        }
        if !sent.body.is_empty() {
            headers.set("content-length", sent.body.len().to_string().as_bytes());
            if !headers.contains("content-type") {
                headers.set("content-type", b"text/plain");
            }
        }
        let props = &mut self.state_mut().properties;
        props.insert(
            path_of(&["response", "code"]),
            i64::from(sent.status).to_le_bytes().to_vec(),
        );
        props.insert(
            path_of(&["response", "code_details"]),
            sent.details.as_bytes().to_vec(),
        );
        let eos = sent.body.is_empty();
        self.run_response_headers(headers, eos);
        if !eos {
            self.response_chunk(&sent.body, true);
        }
        let client_headers = self.client_response_headers.clone().unwrap_or_default();
        let status = client_headers
            .get_str(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(sent.status);
        let body = self.response_body();
        self.state_mut().local_reply = Some(LocalReply {
            status,
            headers: client_headers,
            body,
            ..sent
        });
        true
    }

    /// What `on_request_headers` returned.
    pub fn request_headers_action(&self) -> Action {
        self.request_headers_action
    }

    /// What each `on_request_body` returned.
    pub fn request_body_actions(&self) -> &[Action] {
        &self.request_body_actions
    }

    /// The local reply as the client got it, if the filter sent one.
    pub fn local_reply(&self) -> Option<&LocalReply> {
        self.state().local_reply.as_ref()
    }

    /// The request as forwarded upstream; `None` while the filter holds it (or replied).
    pub fn upstream_request(&self) -> Option<&UpstreamRequest> {
        self.upstream.as_ref()
    }

    /// The headers callback paused with a body to follow and Envoy was not configured with
    /// `allow_on_headers_stop_iteration`: in Envoy the request now hangs.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// The request header map as it is now (after the filter's changes).
    pub fn request_headers(&self) -> &HeaderMap {
        &self.state().request_headers
    }

    /// Every `set_property` the filter made on this stream, in order.
    pub fn set_properties(&self) -> Vec<(Vec<String>, Vec<u8>)> {
        self.state().set_properties.clone()
    }

    /// The last value set with `set_property([name])`: Envoy's filter state `wasm.<name>`.
    pub fn filter_state(&self, name: &str) -> Option<String> {
        self.state()
            .set_properties
            .iter()
            .rev()
            .find(|(p, _)| p.len() == 1 && p[0] == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// `proxy_continue_stream` calls (0 request, 1 response).
    pub fn continued(&self) -> &[i32] {
        &self.state().continued
    }

    /// `proxy_call_foreign_function` names.
    pub fn foreign_calls(&self) -> &[String] {
        &self.state().foreign_calls
    }

    /// What the filter logged during this stream.
    pub fn logs(&self) -> &[LogLine] {
        &self.filter.store.data().logs[self.log_start..]
    }

    /// Sets an attribute mid-stream (for example `response.code_details` before `respond`).
    pub fn set_property(&mut self, path: &[&str], value: impl Into<Vec<u8>>) {
        self.state_mut()
            .properties
            .insert(path_of(path), value.into());
    }

    /// The upstream's response: headers, then the body chunk by chunk, then the end of the
    /// stream (`on_log`, `on_done`, `on_delete`).
    pub fn respond<C: AsRef<[u8]>>(
        &mut self,
        headers: &[(&str, &str)],
        chunks: impl IntoIterator<Item = C>,
    ) {
        let chunks: Vec<Vec<u8>> = chunks.into_iter().map(|c| c.as_ref().to_vec()).collect();
        self.response_headers(headers, chunks.is_empty());
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.iter().enumerate() {
            self.response_chunk(chunk, i == last);
        }
        self.finish();
    }

    /// The upstream's response headers (`:status` among them). Sets `response.code` and, unless
    /// the test set it, `response.code_details` = `via_upstream`.
    pub fn response_headers(&mut self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        assert!(
            self.local_reply().is_none(),
            "the filter already replied locally; there is no upstream response"
        );
        let map = HeaderMap::from_pairs(headers);
        let code = map
            .get_str(":status")
            .and_then(|s| s.parse::<i64>().ok())
            .expect("response headers need a numeric :status");
        let props = &mut self.state_mut().properties;
        props
            .entry(path_of(&["response", "code"]))
            .or_insert_with(|| code.to_le_bytes().to_vec());
        props
            .entry(path_of(&["response", "code_details"]))
            .or_insert_with(|| b"via_upstream".to_vec());
        self.run_response_headers(map, end_of_stream)
    }

    fn run_response_headers(&mut self, headers: HeaderMap, end_of_stream: bool) -> Action {
        let ctx = self.ctx;
        let count = headers.len() as i32;
        let s = self.state_mut();
        s.response_headers = headers;
        s.response_headers_held = true;
        s.response_headers_seen = true;
        let raw = self.filter.call::<(i32, i32, i32), i32>(
            "proxy_on_response_headers",
            (ctx, count, end_of_stream as i32),
        );
        let action = Action::from_raw("proxy_on_response_headers", raw);
        self.response_headers_action = Some(action);
        if action == Action::Continue {
            self.state_mut().response_headers_held = false;
            self.client_response_headers = Some(self.state().response_headers.clone());
        }
        action
    }

    /// One response body callback; returns what the filter emitted for it.
    pub fn response_chunk(&mut self, bytes: &[u8], end_of_stream: bool) -> Vec<u8> {
        let ctx = self.ctx;
        let buffered = self.state_mut().response_body.get_or_insert_with(Vec::new);
        buffered.extend_from_slice(bytes);
        let size = buffered.len() as i32;
        let raw = self.filter.call::<(i32, i32, i32), i32>(
            "proxy_on_response_body",
            (ctx, size, end_of_stream as i32),
        );
        let action = Action::from_raw("proxy_on_response_body", raw);
        let emitted = if action == Action::Continue {
            if self.client_response_headers.is_none() {
                self.client_response_headers = Some(self.state().response_headers.clone());
            }
            self.state_mut().response_body.take().unwrap_or_default()
        } else {
            Vec::new()
        };
        self.chunks.push(Chunk {
            input: bytes.to_vec(),
            end_of_stream,
            action,
            emitted: emitted.clone(),
        });
        emitted
    }

    /// What `on_response_headers` returned, if it ran.
    pub fn response_headers_action(&self) -> Option<Action> {
        self.response_headers_action
    }

    /// The response headers as they left the filter (`None` while it holds them).
    pub fn client_response_headers(&self) -> Option<&HeaderMap> {
        self.client_response_headers.as_ref()
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        self.client_response_headers.as_ref()?.get_str(name)
    }

    /// Every response body callback, in order.
    pub fn response_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// All the response body bytes that left the filter.
    pub fn response_body(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.emitted.clone()).collect()
    }

    /// Ends the stream: `on_log` (Envoy's access-log phase), `on_done`, `on_delete`. Called
    /// after some chunks without an end of stream, it is a client that went away mid-stream
    /// (set `response.code_details` first if the test depends on it).
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let ctx = self.ctx;
        self.state_mut().access_log_phase = true;
        self.filter.call::<i32, ()>("proxy_on_log", ctx);
        self.state_mut().access_log_phase = false;
        self.filter.call::<i32, i32>("proxy_on_done", ctx);
        self.filter.call::<i32, ()>("proxy_on_delete", ctx);
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.finish();
        }
    }
}
