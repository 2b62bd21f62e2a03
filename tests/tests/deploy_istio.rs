//! Static checks of the Istio manifests under envoy/istio (no mesh here): against the
//! Kubernetes manifests, envoy/tollgate.yaml.tmpl and the production Envoy config.

use serde_yaml::Value;
use std::collections::BTreeMap;
use tollgate_e2e::manifests::*;

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
