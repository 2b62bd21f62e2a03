//! Binds the filter logic to proxy-wasm 0.2.5: contexts, hostcalls, the VM entry point.
//! Only `hostcalls` functions returning `Result` are used; the trait helpers that `unwrap`
//! internally are avoided, since a panic kills every stream on the worker.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::http_filter::{self, Host};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &format!("tollgate: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Rc<Config>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match http_filter::on_request_headers(&mut Envoy, &self.config) {
            http_filter::Action::Continue => Action::Continue,
            http_filter::Action::Pause => Action::Pause,
        }
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

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        if let Err(status) = hostcalls::send_http_response(
            u32::from(status),
            headers.to_vec(),
            Some(body.as_bytes()),
        ) {
            let _ = hostcalls::log(
                LogLevel::Error,
                &format!("tollgate: local reply failed: {status:?}"),
            );
        }
    }
}
