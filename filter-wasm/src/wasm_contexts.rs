//! Binds the filter logic to proxy-wasm 0.2.5: the root context (configuration, discovery
//! polling) and one HTTP context per exchange, over hostcalls; the VM entry point.
//! Only `hostcalls` functions returning `Result` are used; the trait helpers that `unwrap`
//! internally are avoided, since a panic kills every stream on the worker.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::discovery::Served;
use crate::discovery_schedule::{Poller, Schedule};
use crate::exchange::Exchange;
use crate::host::{self, Host};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The served model sets, shared by the root context (which polls) and every stream.
type SharedServed = Rc<RefCell<Served>>;

#[derive(Default)]
struct Root {
    config: Rc<Config>,
    served: SharedServed,
    schedule: Schedule,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The root context's host calls for discovery polling.
struct RootHost;

impl Poller for RootHost {
    fn dispatch(&mut self, cluster: &str, path: &str, timeout: Duration) -> Result<u32, String> {
        let headers = vec![(":method", "GET"), (":path", path), (":authority", cluster)];
        hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout)
            .map_err(|e| format!("{e:?}"))
    }

    fn set_tick_period(&mut self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn log_info(&self, message: &str) {
        log(LogLevel::Info, message);
    }

    fn log_warn(&self, message: &str) {
        log(LogLevel::Warn, message);
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut served = self.served.borrow_mut();
        self.schedule
            .on_response(&mut RootHost, token, status.as_deref(), &body, &mut served);
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
                self.schedule = Schedule::new(&config);
                self.schedule.start(&mut RootHost);
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
        self.schedule.on_tick(&mut RootHost);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(StreamContext {
            config: Rc::clone(&self.config),
            served: Rc::clone(&self.served),
            exchange: Exchange::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct StreamContext {
    config: Rc<Config>,
    served: SharedServed,
    exchange: Exchange,
}

impl Context for StreamContext {}

fn action(a: host::Action) -> Action {
    match a {
        host::Action::Continue => Action::Continue,
        host::Action::Pause => Action::Pause,
    }
}

impl HttpContext for StreamContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let served = self.served.borrow();
        action(
            self.exchange
                .on_request_headers(&mut Envoy, &self.config, end_of_stream, &served),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let served = self.served.borrow();
        action(self.exchange.on_request_body(
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
            self.exchange
                .on_request_trailers(&mut Envoy, &self.config, &served),
        )
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.exchange.on_response_headers(&mut Envoy))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.exchange
                .on_response_body(&mut Envoy, body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        self.exchange.on_log(&mut Envoy);
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
