//! Renders `envoy/tollgate.yaml.tmpl` with concrete ports and paths.

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct EnvoyPorts {
    /// Listener and admin bind address: loopback locally, all interfaces in a container.
    pub listen_addr: String,
    pub listen: u16,
    pub admin: u16,
    /// One or more tollgate-authz replicas.
    pub authz: Vec<(String, u16)>,
    pub ratelimit: (String, u16),
    pub model: (String, u16),
    /// Credential tollgate-authz injects for the model route (`""` = none).
    pub model_credential: String,
}

/// A YAML flow list of `lb_endpoints` entries.
fn endpoints(hosts: &[(String, u16)]) -> String {
    let items: Vec<String> = hosts
        .iter()
        .map(|(h, p)| {
            format!("{{endpoint: {{address: {{socket_address: {{address: \"{h}\", port_value: {p}}}}}}}}}")
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Replaces every `{{NAME}}`; an unknown or leftover placeholder is an error.
pub fn render(template: &str, vars: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "unterminated {{ in template".to_string())?;
        let name = &after[..end];
        let value = vars
            .get(name)
            .ok_or_else(|| format!("template placeholder {{{{{name}}}}} has no value"))?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn vars(
    ports: &EnvoyPorts,
    wasm_path: &str,
    filter_config: &str,
) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    v.insert("LISTEN_ADDR", ports.listen_addr.clone());
    v.insert("LISTEN_PORT", ports.listen.to_string());
    v.insert("ADMIN_PORT", ports.admin.to_string());
    v.insert("AUTHZ_ENDPOINTS", endpoints(&ports.authz));
    v.insert("RLS_HOST", ports.ratelimit.0.clone());
    v.insert("RLS_PORT", ports.ratelimit.1.to_string());
    v.insert("MODEL_HOST", ports.model.0.clone());
    v.insert("MODEL_PORT", ports.model.1.to_string());
    v.insert("WASM_PATH", wasm_path.to_string());
    v.insert("MODEL_CREDENTIAL", ports.model_credential.clone());
    // Inside a single-quoted YAML scalar a quote is written twice.
    v.insert("FILTER_CONFIG", filter_config.replace('\'', "''"));
    v
}

/// The values behind `envoy/envoy.compose.yaml`: service names and ports of
/// docker-compose.yml. `tollgate-dev render-compose` writes the file; a test keeps it in step.
pub fn compose_vars() -> BTreeMap<&'static str, String> {
    let ports = EnvoyPorts {
        listen_addr: "0.0.0.0".into(),
        listen: 10000,
        admin: 9901,
        authz: vec![("tollgate-authz".into(), 10001)],
        ratelimit: ("tollgate-ratelimit".into(), 10002),
        model: ("ollama".into(), 11434),
        model_credential: String::new(),
    };
    vars(&ports, "/etc/tollgate/tollgate_filter.wasm", "{}")
}

pub fn render_compose() -> Result<String, String> {
    let template = std::fs::read_to_string(crate::paths::envoy_template())
        .map_err(|e| format!("envoy template: {e}"))?;
    let header = "# Generated from envoy/tollgate.yaml.tmpl by `tollgate-dev render-compose`; do not edit.\n";
    Ok(format!("{header}{}", render(&template, &compose_vars())?))
}

/// Keeps only the named HTTP filters (the router always stays); without ext_authz the
/// per-route filter configs and the access log to tollgate-authz go too. Used by the
/// benchmark to measure bare Envoy and each Tollgate piece in the same run.
pub fn keep_http_filters(yaml: &str, keep: &[&str]) -> Result<String, String> {
    use serde_yaml::Value;
    let mut v: Value = serde_yaml::from_str(yaml).map_err(|e| format!("envoy config: {e}"))?;
    let hcm = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]
        .as_mapping_mut()
        .ok_or("envoy config: no http_connection_manager")?;
    let keeps = |name: &str| name == "envoy.filters.http.router" || keep.contains(&name);
    if let Some(Value::Sequence(filters)) = hcm.get_mut("http_filters") {
        filters.retain(|f| f["name"].as_str().is_some_and(keeps));
    }
    if !keep.contains(&"envoy.filters.http.ext_authz") {
        if let Some(Value::Sequence(logs)) = hcm.get_mut("access_log") {
            logs.retain(|l| l["name"] != "envoy.access_loggers.http_grpc");
        }
    }
    if let Some(Value::Sequence(hosts)) = hcm
        .get_mut("route_config")
        .and_then(|r| r.get_mut("virtual_hosts"))
    {
        for host in hosts {
            if let Some(Value::Sequence(routes)) = host.get_mut("routes") {
                for route in routes {
                    if let Some(Value::Mapping(per)) = route.get_mut("typed_per_filter_config") {
                        per.retain(|k, _| k.as_str().is_some_and(keeps));
                    }
                }
            }
        }
    }
    serde_yaml::to_string(&v).map_err(|e| format!("envoy config: {e}"))
}

/// Drops the rate-limit entries Envoy sends at stream end (`apply_on_stream_done`): token
/// debit/refund, lease release, ledger usage. Used by the benchmark to tell the filter's own
/// cost from the cost of the stream-done RLS call it enables.
pub fn without_stream_done_calls(yaml: &str) -> Result<String, String> {
    use serde_yaml::Value;
    let mut v: Value = serde_yaml::from_str(yaml).map_err(|e| format!("envoy config: {e}"))?;
    let hosts = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"]
        .as_sequence_mut()
        .ok_or("envoy config: no virtual hosts")?;
    for host in hosts {
        if let Some(Value::Sequence(routes)) = host.get_mut("routes") {
            for route in routes {
                let limits = route
                    .get_mut("typed_per_filter_config")
                    .and_then(|p| p.get_mut("envoy.filters.http.ratelimit"))
                    .and_then(|r| r.get_mut("rate_limits"));
                if let Some(Value::Sequence(limits)) = limits {
                    limits.retain(|l| l["apply_on_stream_done"] != Value::Bool(true));
                }
            }
        }
    }
    serde_yaml::to_string(&v).map_err(|e| format!("envoy config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_and_missing_ones_fail() {
        let mut v = BTreeMap::new();
        v.insert("A", "1".to_string());
        assert_eq!(render("x{{A}}y{{A}}", &v).unwrap(), "x1y1");
        assert!(render("{{B}}", &v).is_err());
        assert!(render("{{A", &v).is_err());
    }

    #[test]
    fn stream_done_entries_are_dropped_and_admission_entries_kept() {
        let rendered = render_compose().unwrap();
        let count = |yaml: &str| -> (usize, usize) {
            let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
            let limits = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
                ["typed_per_filter_config"]["envoy.filters.http.ratelimit"]["rate_limits"];
            let all = limits.as_sequence().unwrap();
            let done = all
                .iter()
                .filter(|l| l["apply_on_stream_done"] == serde_yaml::Value::Bool(true))
                .count();
            (all.len(), done)
        };
        let (all, done) = count(&rendered);
        assert!(done > 0 && all > done);
        assert_eq!(
            count(&without_stream_done_calls(&rendered).unwrap()),
            (all - done, 0)
        );
    }
}
