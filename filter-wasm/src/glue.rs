//! Binds the filter logic to proxy-wasm 0.2.5: contexts, hostcalls, the VM entry point.
//! Only `hostcalls` functions returning `Result` are used; the trait helpers that `unwrap`
//! internally are avoided, since a panic kills every stream on the worker.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::discovery::{ModelSet, Served};
use crate::http_filter::{self, Host, Stream};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The served model sets, shared by the root context (which polls) and every stream.
type SharedServed = Rc<RefCell<Served>>;

/// One list endpoint to poll: the source name it is stored under, cluster, path.
#[derive(Clone)]
struct Target {
    source: String,
    cluster: String,
    path: String,
}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
    served: SharedServed,
    targets: Vec<Target>,
    /// Polls in flight (token → target index), so ticks do not pile calls up.
    pending: BTreeMap<u32, usize>,
    /// Every target has answered once: ticks slow down to the configured interval.
    settled: bool,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

impl Root {
    fn discovery_timing(&self) -> Option<(u64, u64)> {
        if let Some(r) = &self.config.routing {
            return Some((r.interval_ms, r.timeout_ms));
        }
        self.config
            .discovery
            .as_ref()
            .map(|d| (d.interval_ms, d.timeout_ms))
    }

    fn poll(&mut self) {
        let Some((_, timeout_ms)) = self.discovery_timing() else {
            return;
        };
        for (i, t) in self.targets.iter().enumerate() {
            if self.pending.values().any(|&p| p == i) {
                continue;
            }
            let headers = vec![
                (":method", "GET"),
                (":path", t.path.as_str()),
                (":authority", t.cluster.as_str()),
            ];
            match hostcalls::dispatch_http_call(
                &t.cluster,
                headers,
                None,
                vec![],
                Duration::from_millis(timeout_ms),
            ) {
                Ok(token) => {
                    self.pending.insert(token, i);
                }
                Err(e) => log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: model discovery call to {} failed: {e:?}",
                        t.cluster
                    ),
                ),
            }
        }
    }
}

fn targets(config: &Config) -> Vec<Target> {
    if let Some(r) = &config.routing {
        return r
            .discovery_targets()
            .map(|(source, cluster, path)| Target {
                source: source.to_owned(),
                cluster: cluster.to_owned(),
                path: path.to_owned(),
            })
            .collect();
    }
    config
        .discovery
        .iter()
        .map(|d| Target {
            source: Served::SINGLE.to_owned(),
            cluster: d.cluster.clone(),
            path: d.path.clone(),
        })
        .collect()
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(index) = self.pending.remove(&token) else {
            return;
        };
        let Some(target) = self.targets.get(index).cloned() else {
            return;
        };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if status.as_deref() != Some("200") {
            log(
                LogLevel::Warn,
                &format!(
                    "tollgate: model discovery from {} got status {status:?}",
                    target.cluster
                ),
            );
            return;
        }
        match ModelSet::parse(&body) {
            Ok(set) => {
                let first = !self.served.borrow().knows(&target.source);
                if first {
                    log(
                        LogLevel::Info,
                        &format!(
                            "tollgate: {} models served by {}",
                            set.len(),
                            target.cluster
                        ),
                    );
                }
                self.served.borrow_mut().insert(&target.source, set);
                let all = {
                    let served = self.served.borrow();
                    self.targets.iter().all(|t| served.knows(&t.source))
                };
                if all && !self.settled {
                    self.settled = true;
                    if let Some((interval_ms, _)) = self.discovery_timing() {
                        let _ = hostcalls::set_tick_period(Duration::from_millis(interval_ms));
                    }
                }
            }
            Err(e) => log(
                LogLevel::Warn,
                &format!("tollgate: model discovery from {}: {e}", target.cluster),
            ),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(config) => {
                self.targets = targets(&config);
                if !self.targets.is_empty() {
                    // Poll quickly until every source answered, then at the configured interval.
                    let _ = hostcalls::set_tick_period(Duration::from_millis(200));
                }
                self.config = Rc::new(config);
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("tollgate: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.poll();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(StreamContext {
            config: Rc::clone(&self.config),
            served: Rc::clone(&self.served),
            stream: Stream::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct StreamContext {
    config: Rc<Config>,
    served: SharedServed,
    stream: Stream,
}

impl Context for StreamContext {}

fn action(a: http_filter::Action) -> Action {
    match a {
        http_filter::Action::Continue => Action::Continue,
        http_filter::Action::Pause => Action::Pause,
    }
}

impl HttpContext for StreamContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let served = self.served.borrow();
        action(
            self.stream
                .on_request_headers(&mut Envoy, &self.config, end_of_stream, &served),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let served = self.served.borrow();
        action(self.stream.on_request_body(
            &mut Envoy,
            &self.config,
            body_size,
            end_of_stream,
            &served,
        ))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let served = self.served.borrow();
        action(
            self.stream
                .on_request_trailers(&mut Envoy, &self.config, &served),
        )
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.stream.on_response_headers(&mut Envoy))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .on_response_body(&mut Envoy, body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        self.stream.on_log(&mut Envoy, &self.config);
    }
}

/// The running Envoy, seen through [`Host`].
struct Envoy;

impl Host for Envoy {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        if hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_err() {
            log(
                LogLevel::Warn,
                &format!("tollgate: cannot set request header {name}"),
            );
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_property(&mut self, name: &str, value: &str) {
        if hostcalls::set_property(vec![name], Some(value.as_bytes())).is_err() {
            log(
                LogLevel::Warn,
                &format!("tollgate: cannot set filter state {name}"),
            );
        }
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        if let Err(status) = hostcalls::send_http_response(
            u32::from(status),
            headers.to_vec(),
            Some(body.as_bytes()),
        ) {
            log(
                LogLevel::Error,
                &format!("tollgate: local reply failed: {status:?}"),
            );
        }
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn set_request_body(&mut self, size: usize, body: &[u8]) {
        if hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body).is_err() {
            log(LogLevel::Warn, "tollgate: cannot replace the request body");
        }
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        if hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value).is_err() {
            log(
                LogLevel::Warn,
                &format!("tollgate: cannot set response header {name}"),
            );
        }
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn set_response_body(&mut self, size: usize, body: &[u8]) {
        if hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body).is_err() {
            log(LogLevel::Warn, "tollgate: cannot replace the response body");
        }
    }

    fn now_secs(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn log_warn(&self, message: &str) {
        log(LogLevel::Warn, message);
    }
}
