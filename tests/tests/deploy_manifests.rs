//! Static checks of what ships for production and cannot run here (no cluster, no Istio):
//! the Kubernetes and Istio manifests under envoy/kubernetes and envoy/istio against each
//! other and against envoy/tollgate.yaml.tmpl, and envoy/envoy.production.yaml.tmpl, which
//! must keep the local template's fail-closed chain and pass `envoy --mode validate`.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use tollgate_e2e::envoy_config::{self, EnvoyPorts};
use tollgate_e2e::paths;

const CHAIN: [&str; 4] = [
    "envoy.filters.http.ext_authz",
    "envoy.filters.http.wasm",
    "envoy.filters.http.ratelimit",
    "envoy.filters.http.router",
];
const TLS_BEGIN: &str = "# tls:begin";
const TLS_END: &str = "# tls:end";
/// The prefix every image in the manifests carries: operators replace it with their registry.
const REGISTRY: &str = "registry.example.com/tollgate/";

// ---------------------------------------------------------------------------------------
// Reading files

fn read(rel: &str) -> String {
    std::fs::read_to_string(paths::workspace_root().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(text: &str, what: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}"))
}

/// One YAML document of a manifest file.
#[derive(Debug, Clone)]
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }
    fn at(&self) -> String {
        format!(
            "{} {}/{} in {}",
            self.kind(),
            self.namespace(),
            self.name(),
            self.file
        )
    }
}

/// Every document of every `.yaml`/`.yml` file under `dir` (relative to the workspace).
fn docs_under(dir: &str) -> Vec<Doc> {
    let root = paths::workspace_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests under {dir}");
    let mut docs = Vec::new();
    for path in files {
        let rel = format!(
            "{dir}/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for d in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: rel.clone(),
                    value,
                });
            }
        }
    }
    docs
}

fn manifests() -> Vec<Doc> {
    let mut docs = docs_under("envoy/kubernetes");
    docs.extend(docs_under("envoy/istio"));
    docs
}

fn of_kind<'a>(docs: &'a [Doc], kind: &str) -> Vec<&'a Doc> {
    docs.iter().filter(|d| d.kind() == kind).collect()
}

fn the<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name}");
    found[0]
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn u64_of(v: &Value, what: &str) -> u64 {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{what}: expected a number, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------------
// Envoy configs

fn local_ports(credential: &str) -> EnvoyPorts {
    EnvoyPorts {
        listen_addr: "0.0.0.0".into(),
        listen: 10000,
        admin: 9901,
        authz: vec![("127.0.0.1".into(), 10001)],
        ratelimit: ("127.0.0.1".into(), 10002),
        model: ("127.0.0.1".into(), 11434),
        model_credential: credential.into(),
    }
}

fn wasm_path() -> String {
    paths::filter_wasm().display().to_string()
}

/// envoy/tollgate.yaml.tmpl rendered with the values the production config is compared with.
fn local_config() -> Value {
    let vars = envoy_config::vars(&local_ports(""), &wasm_path(), "{}");
    let text = envoy_config::render(&read("envoy/tollgate.yaml.tmpl"), &vars)
        .unwrap_or_else(|e| panic!("envoy/tollgate.yaml.tmpl: {e}"));
    yaml(&text, "rendered envoy/tollgate.yaml.tmpl")
}

struct TlsFiles {
    cert: String,
    key: String,
}

/// The production placeholders: the local template's names plus the production-only ones.
fn production_vars(tls: &TlsFiles) -> BTreeMap<&'static str, String> {
    let mut v = envoy_config::vars(&local_ports(""), &wasm_path(), "{}");
    for (name, value) in [
        ("AUTHZ_HOST", "127.0.0.1"),
        ("AUTHZ_PORT", "10001"),
        ("TLS_PORT", "8443"),
        ("STATS_ADDR", "127.0.0.1"),
        ("STATS_PORT", "9902"),
        ("XFF_TRUSTED_HOPS", "1"),
        ("MAX_CONNECTIONS", "10000"),
        ("MAX_HEAP_BYTES", "805306368"),
        ("MODEL_HEALTH_PATH", "/api/tags"),
    ] {
        v.insert(name, value.to_string());
    }
    v.insert("TLS_CERT_CHAIN", tls.cert.clone());
    v.insert("TLS_PRIVATE_KEY", tls.key.clone());
    v
}

fn production_template() -> String {
    read("envoy/envoy.production.yaml.tmpl")
}

/// The template without the optional TLS listener (the marker lines and what is between).
fn without_tls(template: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in template.lines() {
        if line == TLS_BEGIN {
            assert!(!inside, "nested {TLS_BEGIN}");
            inside = true;
        } else if line == TLS_END {
            assert!(inside, "{TLS_END} without {TLS_BEGIN}");
            inside = false;
        } else if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(!inside, "{TLS_BEGIN} without {TLS_END}");
    out
}

fn render(template: &str, vars: &BTreeMap<&str, String>) -> String {
    let text = envoy_config::render(template, vars)
        .unwrap_or_else(|e| panic!("envoy/envoy.production.yaml.tmpl: {e}"));
    assert!(!text.contains("{{"), "a placeholder was left unrendered");
    text
}

fn fake_tls() -> TlsFiles {
    TlsFiles {
        cert: "/etc/tollgate/tls/tls.crt".into(),
        key: "/etc/tollgate/tls/tls.key".into(),
    }
}

fn production_config() -> Value {
    yaml(
        &render(&production_template(), &production_vars(&fake_tls())),
        "rendered envoy/envoy.production.yaml.tmpl",
    )
}

fn listeners(config: &Value) -> &Vec<Value> {
    seq(&config["static_resources"]["listeners"], "listeners")
}

fn listener<'a>(config: &'a Value, name: &str) -> &'a Value {
    listeners(config)
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

/// The listeners client traffic arrives on (all but the metrics listener).
const TRAFFIC_LISTENERS: [&str; 2] = ["tollgate", "tollgate_tls"];

fn hcm(listener: &Value) -> &Value {
    let f = &listener["filter_chains"][0]["filters"][0];
    assert_eq!(
        f["name"], "envoy.filters.network.http_connection_manager",
        "first network filter of listener {:?}",
        listener["name"]
    );
    &f["typed_config"]
}

fn http_filter<'a>(hcm: &'a Value, name: &str) -> &'a Value {
    seq(&hcm["http_filters"], "http_filters")
        .iter()
        .find(|f| f["name"] == name)
        .map(|f| &f["typed_config"])
        .unwrap_or_else(|| panic!("no http filter {name}"))
}

fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    seq(&config["static_resources"]["clusters"], "clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn first_route(hcm: &Value) -> &Value {
    &hcm["route_config"]["virtual_hosts"][0]["routes"][0]
}

/// The order and fail-closed settings every Tollgate chain must have.
fn assert_fail_closed_chain(hcm: &Value, what: &str) {
    let names: Vec<&str> = seq(&hcm["http_filters"], "http_filters")
        .iter()
        .map(|f| str_of(&f["name"], "filter name"))
        .collect();
    assert_eq!(names, CHAIN, "{what}: filter order");
    let authz = http_filter(hcm, CHAIN[0]);
    assert_eq!(authz["failure_mode_allow"], Value::Bool(false), "{what}");
    assert_eq!(
        authz["status_on_error"]["code"], "ServiceUnavailable",
        "{what}"
    );
    let wasm = http_filter(hcm, CHAIN[1]);
    assert_eq!(wasm["config"]["failure_policy"], "FAIL_RELOAD", "{what}");
    assert_eq!(
        wasm["config"]["allow_on_headers_stop_iteration"],
        Value::Bool(true),
        "{what}"
    );
    let rls = http_filter(hcm, CHAIN[2]);
    assert_eq!(rls["failure_mode_deny"], Value::Bool(true), "{what}");
    assert_eq!(
        rls["status_on_error"]["code"], "ServiceUnavailable",
        "{what}"
    );
    assert_eq!(
        hcm["always_set_request_id_in_response"],
        Value::Bool(true),
        "{what}"
    );
    assert_eq!(hcm["use_remote_address"], Value::Bool(true), "{what}");
    let mappers = seq(
        &hcm["local_reply_config"]["mappers"],
        "local_reply_config mappers",
    );
    // The first mapper passes Tollgate's own replies (x-tollgate-error) unchanged; every
    // other one writes a JSON error (tests/tests/static_configs.rs checks them in detail).
    assert!(
        mappers[0].get("body_format_override").is_none(),
        "{what}: the first local reply mapper passes Tollgate's own replies unchanged"
    );
    assert!(
        mappers[1..]
            .iter()
            .all(|m| m["body_format_override"]["json_format"]["error"]["code"].is_string()),
        "{what}: every other local reply mapper writes a JSON error"
    );
}

fn validate(path: &Path) {
    let out = Command::new(paths::envoy())
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", paths::envoy().display()));
    assert!(
        out.status.success(),
        "envoy rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A throwaway self-signed certificate, or None (loudly) when openssl is missing.
fn self_signed(dir: &Path) -> Option<TlsFiles> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(TlsFiles {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }),
        Ok(o) => panic!(
            "openssl could not make a test certificate: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!(
                "WARNING: openssl not found ({e}): the TLS listener of \
                 envoy/envoy.production.yaml.tmpl was NOT validated"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// The production Envoy config

#[test]
fn production_config_keeps_the_fail_closed_chain_on_every_traffic_listener() {
    let config = production_config();
    let names: Vec<&str> = listeners(&config)
        .iter()
        .map(|l| str_of(&l["name"], "listener"))
        .collect();
    assert_eq!(names, ["tollgate", "stats", "tollgate_tls"]);
    for name in TRAFFIC_LISTENERS {
        let l = listener(&config, name);
        assert_fail_closed_chain(hcm(l), &format!("listener {name}"));
        assert_eq!(
            l["per_connection_buffer_limit_bytes"], 8388608,
            "listener {name}: request body cap"
        );
    }
    let plain = yaml(
        &render(
            &without_tls(&production_template()),
            &production_vars(&fake_tls()),
        ),
        "production without TLS",
    );
    let names: Vec<&str> = listeners(&plain)
        .iter()
        .map(|l| str_of(&l["name"], "listener"))
        .collect();
    assert_eq!(
        names,
        ["tollgate", "stats"],
        "the TLS listener must be the only thing the markers cut"
    );
    assert_fail_closed_chain(hcm(listener(&plain, "tollgate")), "production without TLS");
}

#[test]
fn production_metrics_listener_serves_only_get_stats_prometheus_from_the_loopback_admin() {
    let config = production_config();
    let stats = hcm(listener(&config, "stats"));
    let filters: Vec<&str> = seq(&stats["http_filters"], "http_filters")
        .iter()
        .map(|f| str_of(&f["name"], "filter"))
        .collect();
    assert_eq!(filters, ["envoy.filters.http.router"]);
    let vhosts = seq(&stats["route_config"]["virtual_hosts"], "vhosts");
    assert_eq!(vhosts.len(), 1);
    let routes = seq(&vhosts[0]["routes"], "routes");
    assert_eq!(routes.len(), 1, "the metrics listener exposes one route");
    let m = &routes[0]["match"];
    assert_eq!(m["path"], "/stats/prometheus");
    assert!(m["prefix"].is_null() && m["safe_regex"].is_null());
    assert_eq!(m["headers"][0]["name"], ":method");
    assert_eq!(m["headers"][0]["string_match"]["exact"], "GET");
    let target = str_of(&routes[0]["route"]["cluster"], "stats cluster");
    let admin = &cluster(&config, target)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        ["endpoint"]["address"]["socket_address"];
    assert_eq!(
        admin, &config["admin"]["address"]["socket_address"],
        "proxies to the admin API"
    );
}

#[test]
fn production_config_matches_the_local_template_where_it_must() {
    let local = local_config();
    let prod = production_config();
    let local_hcm = hcm(&listeners(&local)[0]);
    let prod_hcm = hcm(listener(&prod, "tollgate"));
    // Every connection-manager setting of the local template (filters, error mappers, access
    // logs, request ids, path normalisation, idle timeout) is in production unchanged;
    // production may only add settings, and tune the route's timeouts.
    let local_map = local_hcm.as_mapping().expect("local HCM is a mapping");
    for (key, value) in local_map {
        let key = str_of(key, "HCM key");
        if key == "route_config" {
            continue;
        }
        assert_eq!(
            &prod_hcm[key], value,
            "HCM `{key}` of envoy/envoy.production.yaml.tmpl differs from envoy/tollgate.yaml.tmpl; \
             change both together"
        );
    }
    let (lr, pr) = (first_route(local_hcm), first_route(prod_hcm));
    assert_eq!(pr["match"], lr["match"], "route match");
    assert_eq!(
        pr["route"]["cluster"], lr["route"]["cluster"],
        "route cluster"
    );
    assert_eq!(
        pr["typed_per_filter_config"], lr["typed_per_filter_config"],
        "per-route ext_authz and rate-limit settings differ from envoy/tollgate.yaml.tmpl"
    );
    assert_eq!(
        seq(&prod_hcm["route_config"]["virtual_hosts"], "vhosts").len(),
        seq(&local_hcm["route_config"]["virtual_hosts"], "vhosts").len()
    );
    assert_eq!(
        listener(&prod, "tollgate")["per_connection_buffer_limit_bytes"],
        listeners(&local)[0]["per_connection_buffer_limit_bytes"]
    );
    let names = |c: &Value| -> BTreeSet<String> {
        seq(&c["static_resources"]["clusters"], "clusters")
            .iter()
            .map(|c| str_of(&c["name"], "cluster name").to_string())
            .collect()
    };
    let extra: Vec<String> = names(&prod).difference(&names(&local)).cloned().collect();
    assert!(
        names(&local).is_subset(&names(&prod)),
        "production lacks a local cluster"
    );
    assert_eq!(extra, ["envoy_admin"], "clusters only production has");
    for grpc in ["tollgate_authz", "tollgate_ratelimit"] {
        let opts = &cluster(&prod, grpc)["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert!(
            opts["explicit_http_config"]["http2_protocol_options"].is_mapping(),
            "{grpc} must speak HTTP/2 (gRPC)"
        );
    }
}

#[test]
fn production_config_hardens_the_edge() {
    let config = production_config();
    assert_eq!(
        config["admin"]["address"]["socket_address"]["address"], "127.0.0.1",
        "admin must be bound to loopback"
    );
    let hcm = hcm(listener(&config, "tollgate"));
    assert_eq!(
        hcm["xff_num_trusted_hops"], 1,
        "XFF_TRUSTED_HOPS is rendered into the HCM"
    );
    assert_eq!(hcm["request_headers_timeout"], "10s");
    assert_eq!(hcm["stream_idle_timeout"], "300s");
    assert_eq!(
        hcm["common_http_protocol_options"]["headers_with_underscores_action"],
        "REJECT_REQUEST"
    );
    let route = &first_route(hcm)["route"];
    assert_eq!(route["timeout"], "900s");
    assert_eq!(route["idle_timeout"], "300s");

    let model = cluster(&config, "model");
    let limits = &model["circuit_breakers"]["thresholds"][0];
    for field in ["max_connections", "max_pending_requests", "max_requests"] {
        assert!(
            u64_of(&limits[field], field) > 0,
            "model circuit breaker {field}"
        );
    }
    assert!(
        u64_of(
            &model["outlier_detection"]["consecutive_gateway_failure"],
            "outlier"
        ) > 0
    );
    assert_eq!(
        model["health_checks"][0]["http_health_check"]["path"], "/api/tags",
        "model server health check"
    );
    // Both services serve grpc.health.v1 (NOT_SERVING while their store does not answer):
    // checked with it, not with TCP, which a replica without its store would pass.
    for (name, service) in [
        ("tollgate_authz", ""),
        (
            "tollgate_ratelimit",
            "envoy.service.ratelimit.v3.RateLimitService",
        ),
    ] {
        let checks = seq(&cluster(&config, name)["health_checks"], "health_checks");
        assert_eq!(checks.len(), 1, "{name}: one health check");
        let grpc = &checks[0]["grpc_health_check"];
        assert!(grpc.is_mapping(), "{name} is checked with grpc.health.v1");
        assert_eq!(
            grpc["service_name"].as_str().unwrap_or(""),
            service,
            "{name}: a service name its binary reports"
        );
        assert!(checks[0]["tcp_health_check"].is_null(), "{name}");
        // Envoy checks every 60 s while a cluster has had no traffic, unless told otherwise.
        assert_eq!(
            checks[0]["no_traffic_interval"], checks[0]["interval"],
            "{name}: a replica is back within one interval, traffic or not"
        );
    }

    let monitors: Vec<&str> = seq(
        &config["overload_manager"]["resource_monitors"],
        "resource monitors",
    )
    .iter()
    .map(|m| str_of(&m["name"], "monitor"))
    .collect();
    assert!(monitors.contains(&"envoy.resource_monitors.global_downstream_max_connections"));
    assert!(monitors.contains(&"envoy.resource_monitors.fixed_heap"));

    let tls = &listener(&config, "tollgate_tls")["filter_chains"][0]["transport_socket"];
    assert_eq!(tls["name"], "envoy.transport_sockets.tls");
    let ctx = &tls["typed_config"];
    assert!(str_of(&ctx["@type"], "tls @type").ends_with("DownstreamTlsContext"));
    let cert = &ctx["common_tls_context"]["tls_certificates"][0];
    assert_eq!(
        cert["certificate_chain"]["filename"],
        "/etc/tollgate/tls/tls.crt"
    );
    assert_eq!(cert["private_key"]["filename"], "/etc/tollgate/tls/tls.key");
    assert_eq!(
        ctx["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"],
        "TLSv1_2"
    );
}

#[test]
fn production_config_passes_envoy_validate_plain_and_with_tls() {
    let dir = temp_dir("validate");
    let template = production_template();
    let plain = dir.join("plain.yaml");
    std::fs::write(
        &plain,
        render(&without_tls(&template), &production_vars(&fake_tls())),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    validate(&plain);
    // Validate mode opens the certificate files: give it real ones.
    if let Some(tls) = self_signed(&dir) {
        let with_tls = dir.join("tls.yaml");
        std::fs::write(&with_tls, render(&template, &production_vars(&tls)))
            .unwrap_or_else(|e| panic!("{e}"));
        validate(&with_tls);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn every_manifest_document_parses_and_names_itself() {
    let docs = manifests();
    let mut seen = BTreeSet::new();
    for d in &docs {
        for field in ["apiVersion", "kind"] {
            assert!(d.value[field].is_string(), "{}: no {field}", d.file);
        }
        assert!(
            !d.name().is_empty(),
            "{}: a {} without metadata.name",
            d.file,
            d.kind()
        );
        assert!(
            seen.insert((
                d.kind().to_string(),
                d.namespace().to_string(),
                d.name().to_string()
            )),
            "{} is defined twice",
            d.at()
        );
        // Values of Secrets never live in the repository; manifests only reference them.
        assert_ne!(
            d.kind(),
            "Secret",
            "{}: Secrets are created by the operator",
            d.at()
        );
    }
    for dir in ["envoy/kubernetes", "envoy/istio"] {
        let k = yaml(&read(&format!("{dir}/kustomization.yaml")), "kustomization");
        for r in seq(&k["resources"], "kustomization resources") {
            let file = str_of(r, "kustomization resource");
            assert!(
                paths::workspace_root().join(dir).join(file).is_file(),
                "{dir}/kustomization.yaml lists missing {file}"
            );
        }
    }
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "AuthorizationPolicy",
        "EnvoyFilter",
        "IstioOperator",
    ] {
        assert!(
            !of_kind(&docs, kind).is_empty(),
            "no {kind} in the manifests"
        );
    }
}

/// (port name, containerPort) of a container.
fn container_ports(container: &Value) -> Vec<(Option<String>, u64)> {
    seq(&container["ports"], "container ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().map(String::from),
                u64_of(&p["containerPort"], "containerPort"),
            )
        })
        .collect()
}

/// The container port a Service targetPort or probe port names (by name or number).
fn resolve_port(ports: &[(Option<String>, u64)], port: &Value) -> Option<u64> {
    match port {
        Value::String(name) => ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name.as_str()))
            .map(|(_, p)| *p),
        Value::Number(n) => n.as_u64().filter(|p| ports.iter().any(|(_, c)| c == p)),
        _ => None,
    }
}

fn containers(deployment: &Doc) -> &Vec<Value> {
    seq(
        &deployment.value["spec"]["template"]["spec"]["containers"],
        "containers",
    )
}

/// What runs pods: Deployments and StatefulSets (tollgate-ratelimit, for its per-replica
/// ledger volume).
fn workloads(docs: &[Doc]) -> Vec<&Doc> {
    docs.iter()
        .filter(|d| ["Deployment", "StatefulSet"].contains(&d.kind()))
        .collect()
}

/// The one Deployment or StatefulSet called `name`.
fn workload<'a>(docs: &'a [Doc], name: &str) -> &'a Doc {
    let found: Vec<&Doc> = workloads(docs)
        .into_iter()
        .filter(|d| d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one workload {name}");
    found[0]
}

/// The workloads in `namespace` whose pods `selector` selects.
fn selected_workloads<'a>(
    docs: &'a [Doc],
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<&'a Doc> {
    workloads(docs)
        .into_iter()
        .filter(|d| {
            d.namespace() == namespace
                && selects(
                    selector,
                    &labels(&d.value["spec"]["template"]["metadata"]["labels"]),
                )
        })
        .collect()
}

fn probe_port(probe: &Value) -> &Value {
    for kind in ["httpGet", "tcpSocket", "grpc"] {
        if probe[kind].is_mapping() {
            return &probe[kind]["port"];
        }
    }
    panic!("probe without httpGet, tcpSocket or grpc: {probe:?}")
}

fn dockerfile_targets() -> BTreeSet<String> {
    read("Dockerfile")
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1).map(|t| t.trim().to_string()))
        .collect()
}

#[test]
fn deployments_run_two_hardened_replicas_with_probes_and_resources() {
    let docs = manifests();
    let deployments = workloads(&docs);
    let names: BTreeSet<&str> = deployments.iter().map(|d| d.name()).collect();
    for required in ["tollgate-authz", "tollgate-ratelimit", "tollgate-envoy"] {
        assert!(names.contains(required), "no workload {required}");
    }
    let targets = dockerfile_targets();
    for d in deployments {
        let at = d.at();
        let spec = &d.value["spec"];
        assert!(
            u64_of(&spec["replicas"], "replicas") >= 2,
            "{at}: fewer than two replicas"
        );
        let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
        assert!(
            selects(&labels(&spec["selector"]["matchLabels"]), &pod_labels),
            "{at}: selector does not match its own pods"
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"],
            Value::Bool(true),
            "{at}"
        );
        assert!(
            u64_of(&pod["securityContext"]["runAsUser"], "runAsUser") > 0,
            "{at}: runs as root"
        );
        assert_eq!(
            pod["automountServiceAccountToken"],
            Value::Bool(false),
            "{at}: no Kubernetes API token is needed"
        );
        for c in containers(d) {
            let cname = str_of(&c["name"], "container name");
            let ports = container_ports(c);
            for probe in ["readinessProbe", "livenessProbe"] {
                assert!(c[probe].is_mapping(), "{at}/{cname}: no {probe}");
                assert!(
                    resolve_port(&ports, probe_port(&c[probe])).is_some(),
                    "{at}/{cname}: {probe} port is not a container port"
                );
            }
            for bound in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    assert!(
                        !c["resources"][bound][res].is_null(),
                        "{at}/{cname}: no resources.{bound}.{res}"
                    );
                }
            }
            let sc = &c["securityContext"];
            assert_eq!(
                sc["allowPrivilegeEscalation"],
                Value::Bool(false),
                "{at}/{cname}"
            );
            assert_eq!(
                sc["readOnlyRootFilesystem"],
                Value::Bool(true),
                "{at}/{cname}"
            );
            assert_ne!(sc["privileged"], Value::Bool(true), "{at}/{cname}");
            assert_eq!(
                sc["capabilities"]["drop"],
                Value::Sequence(vec![Value::from("ALL")]),
                "{at}/{cname}: capabilities must drop ALL"
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{at}/{cname}: adds capabilities"
            );
            // Images are the Dockerfile's targets under the placeholder registry.
            let image = str_of(&c["image"], "image");
            let target = image
                .strip_prefix(REGISTRY)
                .and_then(|rest| rest.split(':').next())
                .unwrap_or_else(|| panic!("{at}/{cname}: image {image} is not under {REGISTRY}"));
            assert!(
                targets.contains(target),
                "{at}/{cname}: image {image} is not a Dockerfile target ({targets:?})"
            );
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{at}: pin {image}"
            );
            // A service told to listen somewhere listens on all interfaces, on a declared port.
            for env in c["env"].as_sequence().into_iter().flatten() {
                let name = str_of(&env["name"], "env name");
                if let (true, Some(value)) = (name.ends_with("_LISTEN"), env["value"].as_str()) {
                    let (host, port) = value
                        .rsplit_once(':')
                        .unwrap_or_else(|| panic!("{at}: {name}={value} has no port"));
                    assert_eq!(host, "0.0.0.0", "{at}: {name} must bind all interfaces");
                    let port: u64 = port.parse().unwrap_or_else(|_| panic!("{at}: {name}"));
                    assert!(
                        ports.iter().any(|(_, p)| *p == port),
                        "{at}: {name}={value} is not a container port"
                    );
                }
            }
        }
    }
}

#[test]
fn database_redis_and_provider_credentials_come_from_secret_references() {
    let docs = manifests();
    let authz = workload(&docs, "tollgate-authz");
    let c = &containers(authz)[0];
    let env: BTreeMap<&str, &Value> = seq(&c["env"], "env")
        .iter()
        .map(|e| (str_of(&e["name"], "env name"), e))
        .collect();
    let db = &env["TOLLGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"];
    assert_eq!(db["name"], "tollgate-postgres");
    assert_eq!(db["key"], "url");
    assert_eq!(
        env["TOLLGATE_PROFILE"]["value"], "foundation",
        "production refuses unsafe settings"
    );
    assert_eq!(
        c["envFrom"][0]["secretRef"]["name"], "tollgate-provider-credentials",
        "provider credentials come from a Secret"
    );
    let rls = &containers(workload(&docs, "tollgate-ratelimit"))[0];
    let redis = seq(&rls["env"], "env")
        .iter()
        .find(|e| e["name"] == "TOLLGATE_REDIS_URL")
        .expect("tollgate-ratelimit replicas share counters in Redis");
    assert_eq!(redis["valueFrom"]["secretKeyRef"]["name"], "tollgate-redis");
    // No value anywhere looks like a secret; connection URLs (they carry passwords) come
    // from Secrets.
    for d in workloads(&docs) {
        for c in containers(d) {
            for e in c["env"].as_sequence().into_iter().flatten() {
                let name = str_of(&e["name"], "env name");
                if name.ends_with("_URL") {
                    assert!(
                        e["valueFrom"]["secretKeyRef"]["name"].is_string(),
                        "{}: {name} must come from a Secret",
                        d.at()
                    );
                }
                if let Some(v) = e["value"].as_str() {
                    let lower = name.to_ascii_lowercase();
                    assert!(
                        !["key", "password", "token", "secret", "database_url"]
                            .iter()
                            .any(|s| lower.contains(s) && !lower.ends_with("_config")),
                        "{}: {name} carries a literal value; use a secretKeyRef",
                        d.at()
                    );
                    assert!(!v.contains("://") || !v.contains('@'), "{}: {name}", d.at());
                }
            }
        }
    }
    // The config file the Deployment points at is the ConfigMap it mounts, and tollgate-authz
    // would accept it (known fields only).
    let config_path = str_of(&env["TOLLGATE_AUTHZ_CONFIG"]["value"], "config path");
    let (dir, file) = config_path.rsplit_once('/').unwrap_or(("", config_path));
    let mount = seq(&c["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = seq(
        &authz.value["spec"]["template"]["spec"]["volumes"],
        "volumes",
    )
    .iter()
    .find(|v| v["name"] == mount["name"])
    .unwrap_or_else(|| panic!("no volume {:?}", mount["name"]));
    let cm = the(
        &docs,
        "ConfigMap",
        str_of(&volume["configMap"]["name"], "configMap"),
    );
    let text = str_of(&cm.value["data"][file], "authz config");
    let parsed = tollgate_authz::authz_config::FileConfig::parse(text)
        .unwrap_or_else(|e| panic!("{}: {e}", cm.at()));
    assert!(
        parsed.static_keys.is_empty(),
        "the foundation profile refuses static keys"
    );
    // The key store speaks TLS: the config demands it, and the database URL that
    // docs/DEPLOYMENT.md puts into Secret tollgate-postgres passes the foundation profile.
    assert!(
        parsed.require_database_tls,
        "{}: require_database_tls",
        cm.at()
    );
    let doc = read("docs/DEPLOYMENT.md");
    let url = doc
        .split("create secret generic tollgate-postgres")
        .nth(1)
        .and_then(|rest| rest.split("--from-literal=url='").nth(1))
        .and_then(|rest| rest.split('\'').next())
        .expect("docs/DEPLOYMENT.md creates Secret tollgate-postgres with a url");
    tollgate_authz::profile::check(tollgate_authz::profile::Profile::Foundation, url, &parsed)
        .unwrap_or_else(|e| panic!("docs/DEPLOYMENT.md's database URL {url}: {e}"));
}

/// Environment variables the services read directly rather than through a flag.
const NON_FLAG_ENV: [&str; 2] = ["RUST_LOG", "TOLLGATE_LOG_FORMAT"];

/// The port of a `host:port` value.
fn port_of(addr: &str, what: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {addr} has no port"))
}

/// A service runs on its own, in memory or on SQLite, with its listeners on free ports;
/// answers `paths` (each 200) on the HTTP listener it prints.
fn assert_serves(binary: &str, extra: &[&str], paths: &[&str]) {
    let dir = temp_dir(binary);
    let mut cmd = Command::new(paths::binary(binary));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("TOLLGATE_PROFILE");
    let mut p =
        tollgate_e2e::process::Proc::spawn(binary, cmd, &dir).unwrap_or_else(|e| panic!("{e}"));
    let addr = p
        .wait_for_line("HTTP ", std::time::Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    let port = u16::try_from(port_of(&addr, binary)).unwrap_or_else(|e| panic!("{e}"));
    for path in paths {
        // /readyz turns 200 once the first store check has run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let status = tollgate_e2e::http::get(port, path, &[]).map(|r| r.status);
            if status == Ok(200) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{binary} {path}: {status:?}; {}",
                p.failure("did not answer 200")
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    p.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn service_probes_and_ports_match_what_the_binaries_serve() {
    let docs = manifests();
    for binary in ["tollgate-authz", "tollgate-ratelimit"] {
        let d = workload(&docs, binary);
        let at = d.at();
        let c = &containers(d)[0];
        assert_eq!(c["command"][0], binary, "{at}");
        let flags = tollgate_e2e::service_flags::flags(&paths::binary(binary))
            .unwrap_or_else(|e| panic!("{e}"));
        let env: BTreeMap<&str, &Value> = seq(&c["env"], "env")
            .iter()
            .map(|e| (str_of(&e["name"], "env name"), &e["value"]))
            .collect();
        // Every variable set is one the binary reads: a misspelt one would be ignored.
        for name in env.keys() {
            assert!(
                NON_FLAG_ENV.contains(name)
                    || flags.iter().any(|f| f.env.as_deref() == Some(*name)),
                "{at}: {binary} has no flag read from {name} ({flags:?})"
            );
        }
        assert_eq!(
            env.get("TOLLGATE_PROFILE").and_then(|v| v.as_str()),
            Some("foundation"),
            "{at}: production refuses unsafe settings"
        );
        // Both listeners keep the binary's default ports, on every interface: the HTTP
        // one defaults to loopback, which the kubelet cannot reach.
        let flag = |long: &str| {
            flags
                .iter()
                .find(|f| f.long == long)
                .unwrap_or_else(|| panic!("{binary} has no {long}"))
        };
        let ports = container_ports(c);
        let mut bound = BTreeMap::new();
        for long in ["--listen", "--http-listen"] {
            let f = flag(long);
            let var = f.env.as_deref().unwrap_or_else(|| panic!("{long}: no env"));
            let default = f.default.as_deref().unwrap_or_else(|| panic!("{long}"));
            let value = env
                .get(var)
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("{at}: {var} is not set ({long} defaults to {default})"));
            assert_eq!(
                port_of(value, var),
                port_of(default, long),
                "{at}: {var} moves the binary's default port"
            );
            assert!(value.starts_with("0.0.0.0:"), "{at}: {var}={value}");
            bound.insert(long, port_of(value, var));
        }
        // Probes ask the HTTP listener: /healthz for alive (and started), /readyz for ready.
        let http = bound["--http-listen"];
        for (probe, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            if probe == "startupProbe" && c[probe].is_null() {
                continue;
            }
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{at}: {probe}");
            assert_eq!(
                resolve_port(&ports, &get["port"]),
                Some(http),
                "{at}: {probe} must ask the HTTP listener"
            );
        }
        let annotations = &d.value["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{at}");
        assert_eq!(
            u64_of(&annotations["prometheus.io/port"], "prometheus port"),
            http,
            "{at}: metrics are on the HTTP listener"
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{at}");
    }
    // And the binaries answer those paths.
    let db = temp_dir("serves-db");
    let url = format!("sqlite://{}", db.join("tollgate.db").display());
    assert_serves(
        "tollgate-authz",
        &["--database-url", &url],
        &["/healthz", "/readyz", "/metrics"],
    );
    assert_serves(
        "tollgate-ratelimit",
        &[],
        &["/healthz", "/readyz", "/metrics"],
    );
    let _ = std::fs::remove_dir_all(&db);
}

#[test]
fn services_select_deployments_and_target_their_container_ports() {
    let docs = manifests();
    for s in of_kind(&docs, "Service") {
        let at = s.at();
        let matched =
            selected_workloads(&docs, s.namespace(), &labels(&s.value["spec"]["selector"]));
        assert_eq!(
            matched.len(),
            1,
            "{at}: selects {} workloads",
            matched.len()
        );
        let ports: Vec<(Option<String>, u64)> = containers(matched[0])
            .iter()
            .flat_map(container_ports)
            .collect();
        for p in seq(&s.value["spec"]["ports"], "service ports") {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            assert!(
                resolve_port(&ports, target).is_some(),
                "{at}: targetPort {target:?} is not a port of {}",
                matched[0].at()
            );
            // Istio and Envoy must know these ports speak gRPC (HTTP/2).
            if p["name"].as_str().is_some_and(|n| n.starts_with("grpc")) {
                assert_eq!(p["appProtocol"], "grpc", "{at}");
            }
        }
    }
}

#[test]
fn pod_disruption_budgets_keep_one_replica_of_each_deployment() {
    let docs = manifests();
    let deployments = workloads(&docs);
    let mut covered = BTreeSet::new();
    for pdb in of_kind(&docs, "PodDisruptionBudget") {
        assert_eq!(pdb.value["spec"]["minAvailable"], 1, "{}", pdb.at());
        let selector = labels(&pdb.value["spec"]["selector"]["matchLabels"]);
        let matched = selected_workloads(&docs, pdb.namespace(), &selector);
        assert_eq!(
            matched.len(),
            1,
            "{}: selects {} workloads",
            pdb.at(),
            matched.len()
        );
        covered.insert(matched[0].name().to_string());
    }
    for d in deployments {
        assert!(
            covered.contains(d.name()),
            "{}: no PodDisruptionBudget",
            d.at()
        );
    }
}

/// The environment entry `name` of a container.
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
}

#[test]
fn ratelimit_ledger_buffer_is_on_a_per_replica_persistent_volume_and_its_database_a_secret() {
    let docs = manifests();
    let sts = the(&docs, "StatefulSet", "tollgate-ratelimit");
    let at = sts.at();
    let spec = &sts.value["spec"];
    let c = &containers(sts)[0];
    let flags = tollgate_e2e::service_flags::flags(&paths::binary("tollgate-ratelimit"))
        .unwrap_or_else(|e| panic!("{e}"));
    let env_of = |long: &str| {
        flags
            .iter()
            .find(|f| f.long == long)
            .and_then(|f| f.env.clone())
            .unwrap_or_else(|| panic!("tollgate-ratelimit has no {long} read from the environment"))
    };

    // The ledger database comes from the Secret tollgate-authz's database URL comes from.
    let url_var = env_of("--ledger-url");
    let ledger_url = &env_entry(c, &url_var)
        .unwrap_or_else(|| panic!("{at}: {url_var} is not set"))["valueFrom"]["secretKeyRef"];
    let authz = &containers(workload(&docs, "tollgate-authz"))[0];
    let authz_db = &env_entry(authz, "TOLLGATE_DATABASE_URL")
        .expect("tollgate-authz's database URL")["valueFrom"]["secretKeyRef"];
    assert!(
        ledger_url["name"].is_string(),
        "{at}: {url_var} from a Secret"
    );
    assert_eq!(
        ledger_url, authz_db,
        "{at}: {url_var} is the key store's database"
    );

    // The buffer is on a volume of the pod's own (a volumeClaimTemplate), not shared, not
    // an emptyDir that a rescheduled pod would lose.
    let buffer_var = env_of("--ledger-buffer");
    let buffer = str_of(
        &env_entry(c, &buffer_var).unwrap_or_else(|| panic!("{at}: {buffer_var} is not set"))
            ["value"],
        "buffer path",
    );
    assert!(buffer.starts_with('/'), "{at}: {buffer_var}={buffer}");
    let mount = seq(&c["volumeMounts"], "volumeMounts")
        .iter()
        .filter(|m| Path::new(buffer).starts_with(str_of(&m["mountPath"], "mountPath")))
        .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())
        .unwrap_or_else(|| panic!("{at}: nothing is mounted at {buffer_var}={buffer}"));
    assert_ne!(mount["readOnly"], Value::Bool(true), "{at}: {mount:?}");
    let claim = mount["name"].clone();
    let template = seq(&spec["volumeClaimTemplates"], "volumeClaimTemplates")
        .iter()
        .find(|t| t["metadata"]["name"] == claim)
        .unwrap_or_else(|| panic!("{at}: {buffer} is on {claim:?}, not a volumeClaimTemplate"));
    assert!(
        spec["template"]["spec"]["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .all(|v| v["name"] != claim),
        "{at}: a pod volume {claim:?} would hide the claim"
    );
    assert_eq!(
        template["spec"]["accessModes"],
        yaml("[ReadWriteOnce]", "access modes"),
        "{at}: one pod's volume"
    );
    assert!(
        template["spec"]["resources"]["requests"]["storage"].is_string(),
        "{at}: the claim asks for storage"
    );
    assert_eq!(
        spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"], "Retain",
        "{at}: a scaled-down replica's unflushed buffer is kept"
    );
    // The non-root user can write it, and has time to flush it at SIGTERM.
    let pod = &spec["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"],
        "{at}: the volume is made writable for the service's group"
    );
    assert!(
        u64_of(
            &pod["terminationGracePeriodSeconds"],
            "terminationGracePeriodSeconds"
        ) >= 10,
        "{at}: the ledger is flushed at SIGTERM"
    );

    // The StatefulSet's governing Service is the headless one that selects its pods, and
    // replicas start and are replaced in parallel (they are interchangeable).
    let governing = the(
        &docs,
        "Service",
        str_of(&spec["serviceName"], "serviceName"),
    );
    assert_eq!(
        governing.value["spec"]["clusterIP"],
        "None",
        "{}",
        governing.at()
    );
    assert!(
        selects(
            &labels(&governing.value["spec"]["selector"]),
            &labels(&spec["template"]["metadata"]["labels"])
        ),
        "{}: does not select {at}'s pods",
        governing.at()
    );
    assert_eq!(spec["podManagementPolicy"], "Parallel", "{at}");
}

/// The Service `host` (`name.namespace.svc.cluster.local`) names, its port `port`, and the
/// Deployment it selects runs `command`.
fn assert_service_runs(docs: &[Doc], host: &str, port: u64, command: &str) {
    let (name, ns) = host
        .strip_suffix(".svc.cluster.local")
        .and_then(|h| h.split_once('.'))
        .unwrap_or_else(|| panic!("{host} is not a cluster Service name"));
    let svc = docs
        .iter()
        .find(|d| d.kind() == "Service" && d.name() == name && d.namespace() == ns)
        .unwrap_or_else(|| panic!("no Service {ns}/{name} for {host}"));
    let p = seq(&svc.value["spec"]["ports"], "ports")
        .iter()
        .find(|p| u64_of(&p["port"], "port") == port)
        .unwrap_or_else(|| panic!("{} has no port {port}", svc.at()));
    assert_eq!(
        p["appProtocol"],
        "grpc",
        "{}: port {port} must be gRPC",
        svc.at()
    );
    assert!(
        svc.value["spec"]["clusterIP"] != "None",
        "{}: the mesh needs a ClusterIP Service (a headless one becomes ORIGINAL_DST)",
        svc.at()
    );
    let dep = *selected_workloads(docs, ns, &labels(&svc.value["spec"]["selector"]))
        .first()
        .unwrap_or_else(|| panic!("{} selects no workload", svc.at()));
    assert_eq!(
        containers(dep)[0]["command"][0],
        command,
        "{} should run {command}",
        dep.at()
    );
}

// ---------------------------------------------------------------------------------------
// Istio

fn mesh_providers(docs: &[Doc]) -> BTreeMap<String, Value> {
    let op = the(docs, "IstioOperator", "tollgate");
    seq(
        &op.value["spec"]["meshConfig"]["extensionProviders"],
        "extensionProviders",
    )
    .iter()
    .map(|p| (str_of(&p["name"], "provider name").to_string(), p.clone()))
    .collect()
}

#[test]
fn istio_ext_authz_provider_points_at_the_authz_service_and_fails_closed() {
    let docs = manifests();
    let local = local_config();
    let local_hcm = hcm(&listeners(&local)[0]);
    let providers = mesh_providers(&docs);

    let policy = the(&docs, "AuthorizationPolicy", "tollgate-authz");
    assert_eq!(policy.value["spec"]["action"], "CUSTOM");
    let provider_name = str_of(&policy.value["spec"]["provider"]["name"], "provider");
    // CUSTOM only calls the provider for requests a rule matches: one empty rule = all.
    assert_eq!(
        policy.value["spec"]["rules"],
        Value::Sequence(vec![Value::Mapping(Default::default())]),
        "{}: the CUSTOM policy must match every request, or the rest skip the key check",
        policy.at()
    );
    let grpc = &providers
        .get(provider_name)
        .unwrap_or_else(|| panic!("no mesh extension provider {provider_name}"))
        ["envoyExtAuthzGrpc"];
    assert_eq!(grpc["failOpen"], Value::Bool(false));
    assert_eq!(grpc["statusOnError"], "503");
    let local_authz = http_filter(local_hcm, CHAIN[0]);
    assert_eq!(
        grpc["timeout"], local_authz["grpc_service"]["timeout"],
        "ext_authz timeout"
    );
    let host = str_of(&grpc["service"], "provider service");
    let port = u64_of(&grpc["port"], "provider port");
    assert_service_runs(&docs, host, port, "tollgate-authz");

    // Audit: the same access-log entry as the local config, to the same service.
    let telemetry = the(&docs, "Telemetry", "tollgate-audit");
    let used: Vec<&str> = seq(
        &telemetry.value["spec"]["accessLogging"][0]["providers"],
        "providers",
    )
    .iter()
    .map(|p| str_of(&p["name"], "provider"))
    .collect();
    let als_name = used
        .iter()
        .find(|n| {
            providers
                .get(**n)
                .is_some_and(|p| p["envoyHttpAls"].is_mapping())
        })
        .unwrap_or_else(|| panic!("Telemetry uses no envoyHttpAls provider: {used:?}"));
    let als = &providers[*als_name]["envoyHttpAls"];
    assert_eq!(
        als["service"], grpc["service"],
        "audit goes to tollgate-authz"
    );
    assert_eq!(als["port"], grpc["port"]);
    let local_als = seq(&local_hcm["access_log"], "access_log")
        .iter()
        .find(|a| a["name"] == "envoy.access_loggers.http_grpc")
        .map(|a| &a["typed_config"])
        .expect("local template has a gRPC access log");
    let common = &local_als["common_config"];
    assert_eq!(
        common["grpc_service"]["envoy_grpc"]["cluster_name"],
        local_authz["grpc_service"]["envoy_grpc"]["cluster_name"],
        "locally, audit and ext_authz share the tollgate-authz cluster"
    );
    assert_eq!(als["logName"], common["log_name"]);
    assert_eq!(
        als["filterStateObjectsToLog"],
        common["filter_state_objects_to_log"]
    );
    assert_eq!(
        als["additionalResponseHeadersToLog"],
        local_als["additional_response_headers_to_log"]
    );
}

/// Every `apply_to` patch of an EnvoyFilter, each checked to act on the gateway only.
fn patches<'a>(filter: &'a Doc, apply_to: &str) -> Vec<&'a Value> {
    let found: Vec<&Value> = seq(&filter.value["spec"]["configPatches"], "configPatches")
        .iter()
        .filter(|p| p["applyTo"] == apply_to)
        .collect();
    for p in &found {
        assert_eq!(
            p["match"]["context"],
            "GATEWAY",
            "{}: {apply_to}",
            filter.at()
        );
    }
    found
}

fn patch<'a>(filter: &'a Doc, apply_to: &str) -> &'a Value {
    let found = patches(filter, apply_to);
    assert_eq!(
        found.len(),
        1,
        "{}: expected one {apply_to} patch",
        filter.at()
    );
    found[0]
}

/// The HTTP_FILTER patch that inserts the filter called `name`.
fn http_filter_patch<'a>(filter: &'a Doc, name: &str) -> &'a Value {
    let found: Vec<&Value> = patches(filter, "HTTP_FILTER")
        .into_iter()
        .filter(|p| p["patch"]["value"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: expected one HTTP_FILTER patch inserting {name}",
        filter.at()
    );
    found[0]
}

/// Applies the EnvoyFilter's HTTP_FILTER patches, in their order, to `chain` (filter names),
/// the way Istio does: an INSERT_* whose subFilter is not in the chain does nothing.
fn apply_http_filter_patches(filter: &Doc, mut chain: Vec<String>) -> Vec<String> {
    for p in patches(filter, "HTTP_FILTER") {
        let name = str_of(&p["patch"]["value"]["name"], "inserted filter").to_string();
        let sub = p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"].as_str();
        let at = sub.and_then(|s| chain.iter().position(|f| f == s));
        match (str_of(&p["patch"]["operation"], "operation"), at) {
            ("INSERT_BEFORE", Some(i)) => chain.insert(i, name),
            ("INSERT_AFTER", Some(i)) => chain.insert(i + 1, name),
            ("INSERT_FIRST", _) => chain.insert(0, name),
            ("ADD", _) => chain.push(name),
            (op, _) => panic!(
                "{}: {op} of {name} matches nothing in {chain:?}",
                filter.at()
            ),
        }
    }
    chain
}

#[test]
fn istio_envoy_filter_inserts_the_fail_closed_ratelimit_before_the_router_with_template_descriptors(
) {
    let docs = manifests();
    let local = local_config();
    let local_hcm = hcm(&listeners(&local)[0]);
    let ef = the(&docs, "EnvoyFilter", "tollgate");

    // 1. The filter, before the router, identical to the template's but for its cluster.
    let p = http_filter_patch(ef, CHAIN[2]);
    assert_eq!(p["patch"]["operation"], "INSERT_BEFORE");
    let chain = &p["match"]["listener"]["filterChain"]["filter"];
    assert_eq!(
        chain["name"],
        "envoy.filters.network.http_connection_manager"
    );
    assert_eq!(chain["subFilter"]["name"], "envoy.filters.http.router");
    assert_eq!(p["patch"]["value"]["name"], CHAIN[2]);
    let mut ours = p["patch"]["value"]["typed_config"].clone();
    let cluster = str_of(
        &ours["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"],
        "RLS cluster",
    )
    .to_string();
    let mut theirs = http_filter(local_hcm, CHAIN[2]).clone();
    for v in [&mut ours, &mut theirs] {
        v["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] = Value::Null;
    }
    assert_eq!(
        ours, theirs,
        "ratelimit filter differs from envoy/tollgate.yaml.tmpl"
    );
    // Istio's outbound cluster name: outbound|PORT||HOST.
    let parts: Vec<&str> = cluster.split('|').collect();
    assert_eq!(parts.len(), 4, "{cluster}");
    assert_eq!((parts[0], parts[2]), ("outbound", ""), "{cluster}");
    let port: u64 = parts[1].parse().unwrap_or_else(|_| panic!("{cluster}"));
    assert_service_runs(&docs, parts[3], port, "tollgate-ratelimit");

    // 2. The route's descriptors and credential: the template's, on the VirtualService route.
    let p = patch(ef, "HTTP_ROUTE");
    assert_eq!(p["patch"]["operation"], "MERGE");
    let route_name = str_of(
        &p["match"]["routeConfiguration"]["vhost"]["route"]["name"],
        "route name",
    );
    assert_eq!(
        p["patch"]["value"]["typed_per_filter_config"],
        first_route(local_hcm)["typed_per_filter_config"],
        "per-route rate limits differ from envoy/tollgate.yaml.tmpl"
    );
    let vs_routes: Vec<&str> = of_kind(&docs, "VirtualService")
        .iter()
        .flat_map(|vs| seq(&vs.value["spec"]["http"], "http routes"))
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        vs_routes.contains(&route_name),
        "EnvoyFilter route {route_name} is not a VirtualService route ({vs_routes:?})"
    );

    // 3. Error mappers and request ids; 4. the body limit.
    let p = patch(ef, "NETWORK_FILTER");
    assert_eq!(p["patch"]["operation"], "MERGE");
    let merged = &p["patch"]["value"]["typed_config"];
    assert_eq!(
        merged["local_reply_config"],
        local_hcm["local_reply_config"]
    );
    assert_eq!(
        merged["always_set_request_id_in_response"],
        Value::Bool(true)
    );
    let p = patch(ef, "LISTENER");
    assert_eq!(
        p["patch"]["value"]["per_connection_buffer_limit_bytes"],
        listeners(&local)[0]["per_connection_buffer_limit_bytes"]
    );
}

/// The EXTENSION_CONFIG (ECDS) patch of the EnvoyFilter: tollgate-filter's Envoy Wasm config.
fn istio_wasm_extension(ef: &Doc) -> &Value {
    let p = patch(ef, "EXTENSION_CONFIG");
    assert_eq!(p["patch"]["operation"], "ADD", "{}", ef.at());
    &p["patch"]["value"]
}

#[test]
fn istio_envoy_filter_inserts_tollgate_filter_after_ext_authz_with_the_template_wasm_config() {
    let docs = manifests();
    // One integration per gateway: a WasmPlugin cannot set allow_on_headers_stop_iteration,
    // and a second copy of the filter would parse and count every request twice.
    assert!(
        of_kind(&docs, "WasmPlugin").is_empty(),
        "the filter is delivered by the EnvoyFilter, not a WasmPlugin"
    );
    let ef = the(&docs, "EnvoyFilter", "tollgate");
    let ext = istio_wasm_extension(ef);
    let name = str_of(&ext["name"], "extension name");

    // In the chain: right after the CUSTOM policy's ext_authz, through ECDS with that name.
    let p = http_filter_patch(ef, name);
    assert_eq!(p["patch"]["operation"], "INSERT_AFTER");
    let chain = &p["match"]["listener"]["filterChain"]["filter"];
    assert_eq!(
        chain["name"],
        "envoy.filters.network.http_connection_manager"
    );
    assert_eq!(chain["subFilter"]["name"], CHAIN[0]);
    let discovery = &p["patch"]["value"]["config_discovery"];
    assert_eq!(
        discovery["type_urls"],
        Value::Sequence(vec![Value::from(
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
        )])
    );
    assert!(
        discovery["config_source"]["ads"].is_mapping(),
        "from istiod"
    );
    assert!(
        p["patch"]["value"]["typed_config"].is_null(),
        "the config comes from the extension, not inline"
    );
    // What Istio builds for the gateway (CUSTOM ext_authz first, its own filters, router
    // last), then these patches: the order must come out as the template's.
    let istio_chain: Vec<String> = [
        CHAIN[0],
        "istio.metadata_exchange",
        "envoy.filters.http.rbac",
        "istio.stats",
        CHAIN[3],
    ]
    .map(String::from)
    .to_vec();
    let patched = apply_http_filter_patches(ef, istio_chain);
    let ours: Vec<&str> = patched
        .iter()
        .map(String::as_str)
        .filter(|f| [CHAIN[0], name, CHAIN[2], CHAIN[3]].contains(f))
        .collect();
    assert_eq!(ours, [CHAIN[0], name, CHAIN[2], CHAIN[3]], "{patched:?}");
    assert_eq!(
        patched.iter().position(|f| f == name),
        Some(1),
        "tollgate-filter runs right after ext_authz: {patched:?}"
    );

    // The Wasm config: the local template's, but for where the code comes from and the
    // filter's JSON configuration.
    let local = local_config();
    let local_wasm = http_filter(hcm(&listeners(&local)[0]), CHAIN[1]);
    let typed = &ext["typed_config"];
    assert_eq!(
        typed["config"]["allow_on_headers_stop_iteration"],
        Value::Bool(true)
    );
    assert_eq!(typed["config"]["failure_policy"], "FAIL_RELOAD");
    let (mut ours, mut theirs) = (typed.clone(), local_wasm.clone());
    for v in [&mut ours, &mut theirs] {
        v["config"]["vm_config"]["code"] = Value::Null;
        v["config"]["configuration"]["value"] = Value::Null;
    }
    assert_eq!(
        ours, theirs,
        "EnvoyFilter Wasm config differs from envoy/tollgate.yaml.tmpl"
    );

    // The filter's JSON configuration is one tollgate-filter accepts (unknown fields are
    // refused there), and it keeps the default blocks.
    let json = str_of(
        &typed["config"]["configuration"]["value"],
        "filter configuration",
    );
    let parsed = tollgate_filter::config::Config::from_json(json.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", ef.at()));
    for path in tollgate_filter::config::DEFAULT_BLOCKED_PATHS {
        assert!(
            parsed.blocklist.paths().iter().any(|p| p == path),
            "{path} is not blocked"
        );
    }
    assert!(parsed
        .blocklist
        .prefixes()
        .iter()
        .any(|p| p == "/api/blobs"));

    // The module: pulled by the Istio agent from the registry, pinned by a checksum.
    let remote = &typed["config"]["vm_config"]["code"]["remote"];
    let uri = str_of(&remote["http_uri"]["uri"], "module uri");
    assert!(uri.starts_with(&format!("oci://{REGISTRY}")), "{uri}");
    assert!(!str_of(&remote["http_uri"]["cluster"], "cluster").is_empty());
    assert!(remote["http_uri"]["timeout"].is_string(), "fetch timeout");
    let sha = str_of(&remote["sha256"], "sha256");
    assert!(
        !sha.is_empty() && sha != "nil",
        "an unpinned module would be loaded unchecked"
    );
    // docs/DEPLOYMENT.md builds that image and writes its digest over the placeholder.
    let doc = read("docs/DEPLOYMENT.md");
    let image = uri.trim_start_matches("oci://");
    assert!(
        doc.contains(&format!("-t {image} ")) && doc.contains(&format!("docker push {image}")),
        "docs/DEPLOYMENT.md must build and push {image}"
    );
    assert!(
        doc.split("```")
            .any(|b| b.contains(sha) && b.contains("envoy/istio/envoy-filter.yaml")),
        "docs/DEPLOYMENT.md must replace sha256 {sha} in envoy/istio/envoy-filter.yaml"
    );

    // Envoy 1.40 accepts the config once the agent has swapped in a local file.
    let mut config = local.clone();
    let filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence_mut()
        .expect("http_filters");
    let wasm = filters
        .iter_mut()
        .find(|f| f["name"] == CHAIN[1])
        .expect("wasm filter");
    let mut swapped = typed.clone();
    swapped["config"]["vm_config"]["code"] = yaml(
        &format!("local: {{filename: \"{}\"}}", wasm_path()),
        "local code",
    );
    wasm["typed_config"] = swapped;
    let dir = temp_dir("istio-wasm");
    let file = dir.join("istio-wasm.yaml");
    std::fs::write(
        &file,
        serde_yaml::to_string(&config).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    validate(&file);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn istio_resources_act_on_the_same_gateway_pods_from_one_namespace() {
    let docs = manifests();
    let ns = the(&docs, "EnvoyFilter", "tollgate").namespace();
    // The three Tollgate resources and the Gateway act on the same gateway pods; a selector
    // policy applies only in its own namespace.
    let gateway_labels = labels(&the(&docs, "Gateway", "tollgate").value["spec"]["selector"]);
    assert!(!gateway_labels.is_empty());
    for (kind, name, sel) in [
        (
            "AuthorizationPolicy",
            "tollgate-authz",
            &["spec", "selector", "matchLabels"][..],
        ),
        (
            "EnvoyFilter",
            "tollgate",
            &["spec", "workloadSelector", "labels"][..],
        ),
        (
            "Telemetry",
            "tollgate-audit",
            &["spec", "selector", "matchLabels"][..],
        ),
    ] {
        let d = the(&docs, kind, name);
        let v = sel.iter().fold(&d.value, |v, k| &v[*k]);
        assert_eq!(labels(v), gateway_labels, "{}: selects other pods", d.at());
        assert_eq!(
            d.namespace(),
            ns,
            "{}: policies apply in their own namespace",
            d.at()
        );
    }
}

#[test]
fn istio_routes_to_the_model_server_like_the_production_config() {
    let docs = manifests();
    let prod = production_config();
    let model = cluster(&prod, "model");
    let vs = the(&docs, "VirtualService", "tollgate-models");
    assert!(
        seq(&vs.value["spec"]["gateways"], "gateways").contains(&Value::from("tollgate")),
        "VirtualService is not bound to the tollgate Gateway"
    );
    let route = &vs.value["spec"]["http"][0];
    assert_eq!(
        route["timeout"],
        first_route(hcm(listener(&prod, "tollgate")))["route"]["timeout"]
    );
    assert_eq!(
        route["retries"]["attempts"], 0,
        "retries would replay generations"
    );
    let host = &route["route"][0]["destination"]["host"];
    let dr = the(&docs, "DestinationRule", "tollgate-models");
    assert_eq!(&dr.value["spec"]["host"], host);
    let tp = &dr.value["spec"]["trafficPolicy"];
    let cb = &model["circuit_breakers"]["thresholds"][0];
    let od = &model["outlier_detection"];
    for (istio, envoy) in [
        (
            &tp["connectionPool"]["tcp"]["maxConnections"],
            &cb["max_connections"],
        ),
        (
            &tp["connectionPool"]["http"]["http1MaxPendingRequests"],
            &cb["max_pending_requests"],
        ),
        (
            &tp["connectionPool"]["http"]["http2MaxRequests"],
            &cb["max_requests"],
        ),
        (
            &tp["outlierDetection"]["consecutiveGatewayErrors"],
            &od["consecutive_gateway_failure"],
        ),
        (
            &tp["outlierDetection"]["consecutive5xxErrors"],
            &od["consecutive_5xx"],
        ),
        (
            &tp["outlierDetection"]["maxEjectionPercent"],
            &od["max_ejection_percent"],
        ),
        (
            &tp["outlierDetection"]["baseEjectionTime"],
            &od["base_ejection_time"],
        ),
        (&tp["outlierDetection"]["interval"], &od["interval"]),
    ] {
        assert_eq!(
            istio, envoy,
            "DestinationRule and the production model cluster differ"
        );
    }
}

// ---------------------------------------------------------------------------------------
// docs/DEPLOYMENT.md

/// The `s|{{NAME}}|VALUE|` substitutions of the sed command that renders the production
/// template in docs/DEPLOYMENT.md.
fn documented_render_vars() -> BTreeMap<String, String> {
    let doc = read("docs/DEPLOYMENT.md");
    let block = doc
        .split("```")
        .find(|b| b.contains("envoy/envoy.production.yaml.tmpl") && b.contains("s|{{"))
        .expect("docs/DEPLOYMENT.md has no sed command rendering the production template");
    let mut vars = BTreeMap::new();
    for part in block.split("s|{{").skip(1) {
        let (name, rest) = part.split_once("}}|").expect("s|{{NAME}}|VALUE|");
        let (value, _) = rest.split_once('|').expect("s|{{NAME}}|VALUE|");
        vars.insert(name.to_string(), value.to_string());
    }
    vars
}

#[test]
fn deployment_doc_renders_the_production_template_for_the_kubernetes_manifests() {
    let docs = manifests();
    let doc_vars = documented_render_vars();
    let template = production_template();
    let mut needed = BTreeSet::new();
    for part in template.split("{{").skip(1) {
        if let Some((name, _)) = part.split_once("}}") {
            needed.insert(name.to_string());
        }
    }
    let documented: BTreeSet<String> = doc_vars.keys().cloned().collect();
    assert_eq!(
        documented, needed,
        "docs/DEPLOYMENT.md must render every placeholder"
    );

    // The values reach the manifests: headless Services, container ports, mounts, image.
    for (host, port) in [("AUTHZ_HOST", "AUTHZ_PORT"), ("RLS_HOST", "RLS_PORT")] {
        let (name, ns) = doc_vars[host]
            .strip_suffix(".svc.cluster.local")
            .and_then(|h| h.split_once('.'))
            .unwrap_or_else(|| panic!("{host}={} is not a cluster Service", doc_vars[host]));
        let svc = docs
            .iter()
            .find(|d| d.kind() == "Service" && d.name() == name && d.namespace() == ns)
            .unwrap_or_else(|| panic!("{host}: no Service {ns}/{name}"));
        assert_eq!(
            svc.value["spec"]["clusterIP"], "None",
            "{host}: STRICT_DNS needs a headless Service"
        );
        let port: u64 = doc_vars[port].parse().unwrap_or_else(|_| panic!("{port}"));
        assert!(seq(&svc.value["spec"]["ports"], "ports")
            .iter()
            .any(|p| u64_of(&p["port"], "port") == port));
    }
    let envoy = the(&docs, "Deployment", "tollgate-envoy");
    let c = &containers(envoy)[0];
    let ports = container_ports(c);
    for name in ["LISTEN_PORT", "TLS_PORT", "STATS_PORT"] {
        let p: u64 = doc_vars[name].parse().unwrap_or_else(|_| panic!("{name}"));
        assert!(
            ports.iter().any(|(_, c)| *c == p),
            "{name}={p} is not an Envoy container port"
        );
    }
    let mounts = seq(&c["volumeMounts"], "volumeMounts");
    for name in ["TLS_CERT_CHAIN", "TLS_PRIVATE_KEY"] {
        assert!(
            mounts
                .iter()
                .any(|m| doc_vars[name]
                    .starts_with(&format!("{}/", str_of(&m["mountPath"], "mount")))),
            "{name}={} is not under a mounted volume",
            doc_vars[name]
        );
    }
    assert!(
        read("Dockerfile").contains(&doc_vars["WASM_PATH"]),
        "WASM_PATH is where the Dockerfile's envoy image has the filter"
    );
    let heap: u64 = doc_vars["MAX_HEAP_BYTES"].parse().expect("MAX_HEAP_BYTES");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert!(
        heap < 1 << 30,
        "Envoy's heap cap must sit below its memory limit"
    );
    let deployment_doc = read("docs/DEPLOYMENT.md");
    let config_map = the(&docs, "Deployment", "tollgate-envoy").value["spec"]["template"]["spec"]
        ["volumes"]
        .as_sequence()
        .and_then(|vs| vs.iter().find_map(|v| v["configMap"]["name"].as_str()))
        .expect("the Envoy Deployment mounts its config from a ConfigMap");
    assert!(
        deployment_doc.contains(&format!("create configmap {config_map} ")),
        "docs/DEPLOYMENT.md must create ConfigMap {config_map}"
    );

    // And Envoy accepts the result (files it opens swapped for local ones).
    let dir = temp_dir("doc-render");
    let mut vars: BTreeMap<&str, String> = doc_vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    vars.insert("WASM_PATH", wasm_path());
    let plain = dir.join("plain.yaml");
    std::fs::write(&plain, render(&without_tls(&template), &vars))
        .unwrap_or_else(|e| panic!("{e}"));
    validate(&plain);
    if let Some(tls) = self_signed(&dir) {
        vars.insert("TLS_CERT_CHAIN", tls.cert);
        vars.insert("TLS_PRIVATE_KEY", tls.key);
        let with_tls = dir.join("tls.yaml");
        std::fs::write(&with_tls, render(&template, &vars)).unwrap_or_else(|e| panic!("{e}"));
        validate(&with_tls);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tollgate_admin_commands_in_the_docs_exist_with_their_flags() {
    let admin = paths::binary("tollgate-admin");
    assert!(
        admin.is_file(),
        "{} is missing: run `cargo build -p tollgate-authz` first",
        admin.display()
    );
    let mut checked = 0;
    for file in [
        "docs/DEPLOYMENT.md",
        "docs/OPERATIONS.md",
        "docs/THREAT_MODEL.md",
    ] {
        for line in read(file).lines() {
            let Some((_, rest)) = line.split_once("tollgate-admin ") else {
                continue;
            };
            let rest = rest.split(['`', '#', '|', ';', '&']).next().unwrap_or("");
            let tokens: Vec<&str> = rest.split_whitespace().collect();
            // Leading global options, then the (sub)command words.
            let mut i = 0;
            while i < tokens.len() && tokens[i].starts_with("--") {
                i += if tokens[i] == "--json" { 1 } else { 2 };
            }
            let group = match tokens.get(i) {
                Some(g) => *g,
                None => continue,
            };
            let words: Vec<&str> = match group {
                "migrate" | "audit" => vec![group],
                "tenant" | "key" | "policy" => match tokens.get(i + 1) {
                    Some(w) => vec![group, w],
                    None => continue,
                },
                // Prose such as "tollgate-admin --help" or a sentence.
                _ => continue,
            };
            let out = Command::new(&admin)
                .args(&words)
                .arg("--help")
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", admin.display()));
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{file}: `tollgate-admin {}` is not a command: {}",
                words.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            for flag in tokens.iter().filter(|t| t.starts_with("--")) {
                let flag = flag.split('=').next().unwrap_or(flag);
                assert!(
                    help.contains(flag),
                    "{file}: `tollgate-admin {}` has no {flag}",
                    words.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "expected the docs to show tollgate-admin commands, found {checked}"
    );
}
