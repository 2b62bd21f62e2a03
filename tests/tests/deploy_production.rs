//! Static checks of envoy/envoy.production.yaml.tmpl, which cannot run here: it must keep
//! the local template's fail-closed chain, harden the edge and pass `envoy --mode validate`.

use serde_yaml::Value;
use std::collections::BTreeSet;
use tollgate_e2e::manifests::*;

/// The listeners client traffic arrives on (all but the metrics listener).
const TRAFFIC_LISTENERS: [&str; 2] = ["tollgate", "tollgate_tls"];

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
        // Within a settings block (common_http_protocol_options) production may add settings
        // too (its idle timeout); every setting the local template has must be there.
        if let Some(settings) = value.as_mapping() {
            for (sub, v) in settings {
                let sub = str_of(sub, "HCM setting");
                assert_eq!(
                    &prod_hcm[key][sub], v,
                    "HCM `{key}.{sub}` of envoy/envoy.production.yaml.tmpl differs from \
                     envoy/tollgate.yaml.tmpl; change both together"
                );
            }
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
