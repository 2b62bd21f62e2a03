//! Turns the rendered single-backend config (envoy/tollgate.yaml.tmpl) into the model-routing
//! example of docs/CONFIGURATION.md: two Ollama hosts, one hosted OpenAI-style provider.
//! Everything that is not routing (filter chain, error mappers, access logs, rate-limit
//! descriptors) is taken from the template, so the example cannot drift from it.
//!
//! Backends (the filter names one in `x-tollgate-backend`, a route per backend matches it):
//! - `local`: both Ollama hosts in one cluster (least request, active health checks,
//!   outlier detection, retries on connection failures before any response byte);
//! - `primary`: the first Ollama host, falling back to `spare` (the second) through an
//!   aggregate cluster when it has no healthy host;
//! - `hosted`: the OpenAI-style provider, its credential added on its route only.

use serde_yaml::Value;
use tollgate_core::metadata::HEADER_BACKEND;

/// The `primary` backend's cluster: host a first, host b when a has no healthy host.
const AGGREGATE: &str = "primary_with_spare";

/// Where the example's backends live and how fast health checks run.
#[derive(Debug, Clone)]
pub struct RoutingSpec {
    pub ollama_a: (String, u16),
    pub ollama_b: (String, u16),
    pub hosted: (String, u16),
    /// The hosted provider speaks TLS (SNI = its host name).
    pub hosted_tls: bool,
    /// Environment variable of Envoy holding the hosted provider's API key.
    pub hosted_key_env: String,
    pub health_interval_ms: u64,
    /// Model discovery poll interval of the filter.
    pub discovery_interval_ms: u64,
}

impl RoutingSpec {
    /// The documented example: compose-style host names, production-like intervals.
    pub fn example() -> Self {
        RoutingSpec {
            ollama_a: ("ollama-a".into(), 11434),
            ollama_b: ("ollama-b".into(), 11434),
            hosted: ("api.openai.com".into(), 443),
            hosted_tls: true,
            hosted_key_env: "OPENAI_API_KEY".into(),
            health_interval_ms: 5000,
            discovery_interval_ms: 10000,
        }
    }

    /// The filter configuration (the wasm plugin's `configuration`) for these backends.
    pub fn filter_config(&self) -> String {
        serde_json::json!({
            "max_body_bytes": 1048576,
            "routing": {
                "backends": {
                    "local": {"upstream": "ollama", "cluster": "ollama_pool"},
                    "primary": {"upstream": "ollama", "cluster": "ollama_a", "fallback": "spare"},
                    "spare": {"upstream": "ollama", "cluster": "ollama_b"},
                    "hosted": {"upstream": "openai", "cluster": "hosted", "discovery": false}
                },
                "models": [
                    {"match": "llama3*", "backend": "local"},
                    {"match": "qwen2*", "backend": "primary"},
                    {"match": "gpt-4o-mini", "backend": "hosted"}
                ],
                "aliases": {
                    "chat-default": "llama3.1:8b",
                    "chat-small": "qwen2:0.5b",
                    "chat-hosted": "gpt-4o-mini"
                },
                "default_backend": "local",
                "interval_ms": self.discovery_interval_ms
            }
        })
        .to_string()
    }
}

fn y(text: &str) -> Value {
    // The snippets below are constants of this file; a typo is a bug caught by every test.
    serde_yaml::from_str(text).unwrap_or(Value::Null)
}

fn endpoint((host, port): &(String, u16)) -> Value {
    y(&format!(
        "{{endpoint: {{address: {{socket_address: {{address: \"{host}\", port_value: {port}}}}}}}}}"
    ))
}

fn ollama_cluster(name: &str, hosts: &[&(String, u16)], spec: &RoutingSpec) -> Value {
    let mut c = y(&format!(
        r#"
name: {name}
type: STRICT_DNS
connect_timeout: 2s
dns_lookup_family: V4_ONLY
# Round robin: after a connection failure the retry goes to the next host for sure
# (least request picks among random pairs and can pick the failed host again).
lb_policy: ROUND_ROBIN
health_checks:
- timeout: 2s
  interval: {interval}s
  # Envoy checks a cluster that has seen no traffic only every 60 s by default; a spare
  # must be known healthy (or not) before it is needed.
  no_traffic_interval: {interval}s
  unhealthy_threshold: 2
  healthy_threshold: 1
  http_health_check: {{path: /api/tags}}
outlier_detection:
  consecutive_5xx: 5
  consecutive_gateway_failure: 2
  interval: 2s
  base_ejection_time: 10s
  max_ejection_percent: 50
common_lb_config:
  healthy_panic_threshold: {{value: 0}}
load_assignment:
  cluster_name: {name}
  endpoints:
  - lb_endpoints: []
"#,
        interval = spec.health_interval_ms as f64 / 1000.0
    ));
    c["load_assignment"]["endpoints"][0]["lb_endpoints"] =
        Value::Sequence(hosts.iter().map(|h| endpoint(h)).collect());
    c
}

fn hosted_cluster(spec: &RoutingSpec) -> Value {
    let mut c = y(r#"
name: hosted
type: STRICT_DNS
connect_timeout: 5s
dns_lookup_family: V4_ONLY
outlier_detection:
  consecutive_gateway_failure: 3
  interval: 5s
  base_ejection_time: 30s
load_assignment:
  cluster_name: hosted
  endpoints:
  - lb_endpoints: []
"#);
    c["load_assignment"]["endpoints"][0]["lb_endpoints"] =
        Value::Sequence(vec![endpoint(&spec.hosted)]);
    if spec.hosted_tls {
        c["transport_socket"] = y(&format!(
            r#"
name: envoy.transport_sockets.tls
typed_config:
  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
  sni: {host}
  common_tls_context:
    validation_context:
      trusted_ca: {{filename: /etc/ssl/certs/ca-certificates.crt}}
"#,
            host = spec.hosted.0
        ));
    }
    c
}

/// Connection failures only (refused, reset, closed — e.g. a pooled connection to a host that
/// just died) and only before any response byte: Envoy never retries once response headers
/// went to the client, so a half-streamed completion is never sent twice. No `5xx`: a model
/// server's error answer is final.
fn retry_policy() -> Value {
    y(r#"
retry_on: connect-failure,refused-stream,reset
num_retries: 3
retry_host_predicate:
- name: envoy.retry_host_predicates.previous_hosts
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
host_selection_retry_max_attempts: 5
"#)
}

/// On an aggregate cluster the fallback is the next priority: a retry goes there at once,
/// before health checks have marked the first cluster's hosts down. (Only there: on a
/// one-priority cluster it would leave a retry no priority at all.)
fn fallback_retry_priority() -> Value {
    y(r#"
name: envoy.retry_priorities.previous_priorities
typed_config:
  "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
  update_frequency: 1
"#)
}

fn backend_route(backend: &str, cluster: &str, spec: &RoutingSpec) -> Value {
    let mut r = y(&format!(
        r#"
match:
  prefix: "/"
  headers:
  - name: {header}
    string_match: {{exact: {backend}}}
route: {{cluster: {cluster}, timeout: 300s}}
"#,
        header = tollgate_header()
    ));
    r["route"]["retry_policy"] = retry_policy();
    if cluster == AGGREGATE {
        r["route"]["retry_policy"]["retry_priority"] = fallback_retry_priority();
    }
    // The backend's name is Envoy's business, not the model server's.
    r["request_headers_to_remove"] = Value::Sequence(vec![Value::String(HEADER_BACKEND.into())]);
    if backend == "hosted" {
        r["route"]["host_rewrite_literal"] = Value::String(spec.hosted.0.clone());
        // The provider's key lives in Envoy's environment and is added on this route only,
        // after tollgate-authz removed the client's Authorization header.
        r["request_headers_to_add"] = y(&format!(
            r#"
- header: {{key: authorization, value: "Bearer %ENVIRONMENT({env})%"}}
  append_action: OVERWRITE_IF_EXISTS_OR_ADD
"#,
            env = spec.hosted_key_env
        ));
    }
    r
}

fn tollgate_header() -> &'static str {
    HEADER_BACKEND
}

/// Rewrites a rendered envoy/tollgate.yaml.tmpl into the routing example.
pub fn apply(rendered: &str, spec: &RoutingSpec) -> Result<String, String> {
    let mut v: Value = serde_yaml::from_str(rendered).map_err(|e| format!("envoy config: {e}"))?;
    let hcm = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]
        .as_mapping_mut()
        .ok_or("envoy config: no http_connection_manager")?;
    // The template strips a client's copy before route selection and every filter
    // (early_header_mutation_extensions): routes match on this header, so it must be there.
    let strips = hcm
        .get("early_header_mutation_extensions")
        .and_then(Value::as_sequence)
        .is_some_and(|exts| {
            exts.iter().any(|e| {
                e["typed_config"]["mutations"]
                    .as_sequence()
                    .is_some_and(|m| m.iter().any(|m| m["remove"] == tollgate_header()))
            })
        });
    if !strips {
        return Err(format!(
            "envoy config: the template does not strip a client's {} at the edge",
            tollgate_header()
        ));
    }
    let host = hcm
        .get_mut("route_config")
        .and_then(|r| r.get_mut("virtual_hosts"))
        .and_then(|h| h.get_mut(0))
        .and_then(Value::as_mapping_mut)
        .ok_or("envoy config: no virtual host")?;
    let per_filter = host
        .get("routes")
        .and_then(|r| r.get(0))
        .and_then(|r| r.get("typed_per_filter_config"))
        .cloned()
        .ok_or("envoy config: the template's route has no per-filter config")?;
    // The template's per-route settings (rate-limit descriptors, …) hold for every backend:
    // on the virtual host they are written once.
    host.insert("typed_per_filter_config".into(), per_filter);
    // The catch-all route matters: ext_authz checks nothing on a request that matches no
    // route, and routes are picked before the filter has named a backend. A request the
    // filter did not route (it always does, or replies itself) ends here with a 404, which
    // the template's local reply mappers turn into the JSON error with the request id.
    let catch_all = y(r#"
match: {prefix: "/"}
direct_response: {status: 404}
"#);
    let routes = vec![
        backend_route("local", "ollama_pool", spec),
        backend_route("primary", AGGREGATE, spec),
        backend_route("spare", "ollama_b", spec),
        backend_route("hosted", "hosted", spec),
        catch_all,
    ];
    host.insert("routes".into(), Value::Sequence(routes));

    let clusters = v["static_resources"]["clusters"]
        .as_sequence_mut()
        .ok_or("envoy config: no clusters")?;
    clusters.retain(|c| c["name"] != "model");
    clusters.push(ollama_cluster(
        "ollama_pool",
        &[&spec.ollama_a, &spec.ollama_b],
        spec,
    ));
    clusters.push(ollama_cluster("ollama_a", &[&spec.ollama_a], spec));
    clusters.push(ollama_cluster("ollama_b", &[&spec.ollama_b], spec));
    clusters.push(y(&format!(
        r#"
name: {AGGREGATE}
connect_timeout: 2s
lb_policy: CLUSTER_PROVIDED
cluster_type:
  name: envoy.clusters.aggregate
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig
    clusters: [ollama_a, ollama_b]
"#
    )));
    clusters.push(hosted_cluster(spec));
    serde_yaml::to_string(&v).map_err(|e| format!("envoy config: {e}"))
}

/// envoy/examples/routing.yaml: the documented example, rendered from the template with the
/// compose service names. `tollgate-dev render-routing` writes it; a test keeps it current.
pub fn render_example() -> Result<String, String> {
    let template = std::fs::read_to_string(crate::paths::envoy_template())
        .map_err(|e| format!("envoy template: {e}"))?;
    let spec = RoutingSpec::example();
    let mut vars = crate::envoy_config::compose_vars();
    vars.insert("FILTER_CONFIG", spec.filter_config().replace('\'', "''"));
    let rendered = crate::envoy_config::render(&template, &vars)?;
    let header = "# Model routing example (docs/CONFIGURATION.md): two Ollama hosts and one hosted\n\
                  # provider. Generated from envoy/tollgate.yaml.tmpl by `tollgate-dev render-routing`;\n\
                  # do not edit by hand.\n";
    Ok(format!("{header}{}", apply(&rendered, &spec)?))
}
