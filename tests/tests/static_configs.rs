//! Static checks of what cannot run here (no Docker engine) and of the Envoy configs:
//! docker-compose.yml against the Envoy config it mounts, `envoy --mode validate`, and the
//! fail-closed filter chain.

use serde_yaml::Value;
use std::collections::BTreeMap;
use std::process::Command;
use tollgate_e2e::envoy_config::{self, EnvoyPorts};
use tollgate_e2e::paths;

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("invalid YAML: {e}"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(paths::workspace_root().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn local_vars() -> BTreeMap<&'static str, String> {
    let ports = EnvoyPorts {
        listen_addr: "127.0.0.1".into(),
        listen: 10000,
        admin: 9901,
        authz: vec![("127.0.0.1".into(), 10001)],
        ratelimit: ("127.0.0.1".into(), 10002),
        model: ("127.0.0.1".into(), 10003),
        model_credential: String::new(),
    };
    envoy_config::vars(&ports, &paths::filter_wasm().display().to_string(), "{}")
}

fn local_config() -> String {
    envoy_config::render(&read("envoy/tollgate.yaml.tmpl"), &local_vars()).unwrap()
}

fn hcm(config: &Value) -> &Value {
    &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
}

/// cluster name -> (address, port)
fn clusters(config: &Value) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    for c in config["static_resources"]["clusters"]
        .as_sequence()
        .unwrap()
    {
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        out.insert(
            c["name"].as_str().unwrap().to_string(),
            (
                sa["address"].as_str().unwrap().to_string(),
                sa["port_value"].as_u64().unwrap(),
            ),
        );
    }
    out
}

fn validate(path: &std::path::Path) {
    let out = Command::new(paths::envoy())
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "envoy rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn filter_chain_is_authz_wasm_ratelimit_router_and_fails_closed() {
    let config = yaml(&local_config());
    let filters: Vec<&str> = hcm(&config)["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.wasm",
            "envoy.filters.http.ratelimit",
            "envoy.filters.http.router"
        ]
    );
    let f = &hcm(&config)["http_filters"];
    assert_eq!(
        f[0]["typed_config"]["failure_mode_allow"],
        Value::Bool(false)
    );
    assert_eq!(
        f[0]["typed_config"]["status_on_error"]["code"],
        "ServiceUnavailable"
    );
    assert_eq!(
        f[1]["typed_config"]["config"]["failure_policy"],
        "FAIL_RELOAD"
    );
    assert_eq!(f[2]["typed_config"]["failure_mode_deny"], Value::Bool(true));
    assert_eq!(
        f[2]["typed_config"]["status_on_error"]["code"],
        "ServiceUnavailable"
    );
    assert_eq!(
        hcm(&config)["always_set_request_id_in_response"],
        Value::Bool(true)
    );
}

#[test]
fn local_and_compose_envoy_configs_pass_envoy_validate() {
    let dir = std::env::temp_dir().join(format!("tollgate-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = dir.join("local.yaml");
    std::fs::write(&local, local_config()).unwrap();
    validate(&local);
    // The compose config names a wasm path inside the image; validate mode opens the file,
    // so point it at the built one.
    let compose = read("envoy/envoy.compose.yaml").replace(
        "/etc/tollgate/tollgate_filter.wasm",
        &paths::filter_wasm().display().to_string(),
    );
    let compose_path = dir.join("compose.yaml");
    std::fs::write(&compose_path, compose).unwrap();
    validate(&compose_path);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compose_envoy_config_is_the_rendered_template() {
    assert_eq!(
        read("envoy/envoy.compose.yaml"),
        envoy_config::render_compose().unwrap(),
        "envoy/envoy.compose.yaml is stale: run `target/debug/tollgate-dev render-compose > envoy/envoy.compose.yaml`"
    );
}

fn port_of_listen(env: &Value, name: &str) -> u64 {
    env[name]
        .as_str()
        .and_then(|s| s.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{name} has no port"))
}

#[test]
fn docker_compose_matches_the_envoy_config_it_mounts() {
    let compose = yaml(&read("docker-compose.yml"));
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for required in [
        "envoy",
        "tollgate-authz",
        "tollgate-ratelimit",
        "redis",
        "postgres",
        "ollama",
    ] {
        assert!(
            names.contains(&required),
            "service {required} missing: {names:?}"
        );
    }
    // Every depends_on names a service; every named volume is declared; every bind mount exists.
    let declared_volumes = compose["volumes"].as_mapping().cloned().unwrap_or_default();
    for (name, svc) in services {
        if let Some(deps) = svc["depends_on"].as_mapping() {
            for d in deps.keys() {
                assert!(
                    names.contains(&d.as_str().unwrap()),
                    "{name:?} depends on unknown {d:?}"
                );
            }
        }
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(
                    paths::workspace_root().join(src).exists(),
                    "{name:?} mounts missing {src}"
                );
            } else {
                assert!(
                    declared_volumes.contains_key(src),
                    "{name:?} uses undeclared volume {src}"
                );
            }
        }
    }
    for svc in [
        "envoy",
        "tollgate-authz",
        "tollgate-ratelimit",
        "redis",
        "postgres",
    ] {
        assert!(
            services[svc]["healthcheck"]["test"].is_sequence(),
            "{svc} has no healthcheck"
        );
    }

    // The Envoy config mounted into the envoy service reaches the services where they listen.
    let envoy_mount = services["envoy"]["volumes"][0].as_str().unwrap();
    assert!(envoy_mount.starts_with("./envoy/envoy.compose.yaml:/etc/envoy/envoy.yaml"));
    let config = yaml(&read("envoy/envoy.compose.yaml"));
    let c = clusters(&config);
    let authz_env = &services["tollgate-authz"]["environment"];
    let rls_env = &services["tollgate-ratelimit"]["environment"];
    assert_eq!(
        c["tollgate_authz"],
        (
            "tollgate-authz".into(),
            port_of_listen(authz_env, "TOLLGATE_AUTHZ_LISTEN")
        )
    );
    assert_eq!(
        c["tollgate_ratelimit"],
        (
            "tollgate-ratelimit".into(),
            port_of_listen(rls_env, "TOLLGATE_RATELIMIT_LISTEN")
        )
    );
    // Ollama's own default port.
    assert_eq!(c["model"], ("ollama".into(), 11434));
    let listener = &config["static_resources"]["listeners"][0]["address"]["socket_address"];
    assert_eq!(listener["address"], "0.0.0.0");
    let published = services["envoy"]["ports"][0].as_str().unwrap();
    assert_eq!(
        published,
        format!("{0}:{0}", listener["port_value"].as_u64().unwrap())
    );
    // The services bind all interfaces inside their containers.
    assert!(authz_env["TOLLGATE_AUTHZ_LISTEN"]
        .as_str()
        .unwrap()
        .starts_with("0.0.0.0:"));
    assert!(rls_env["TOLLGATE_RATELIMIT_LISTEN"]
        .as_str()
        .unwrap()
        .starts_with("0.0.0.0:"));
    // The wasm path Envoy loads is where the Dockerfile puts it.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("/etc/tollgate/tollgate_filter.wasm"));
    assert!(read("envoy/envoy.compose.yaml")
        .contains("filename: \"/etc/tollgate/tollgate_filter.wasm\""));
}

#[test]
fn compose_healthchecks_ask_the_services_readyz_where_the_binaries_serve_it() {
    let compose = yaml(&read("docker-compose.yml"));
    let services = &compose["services"];
    // The services image has curl (the healthchecks run inside the container).
    let dockerfile = read("Dockerfile");
    let services_stage = dockerfile
        .split("FROM ")
        .find(|stage| stage.contains(" AS services"))
        .expect("Dockerfile has a services stage");
    assert!(
        services_stage.contains(" curl"),
        "the services image needs curl"
    );
    for binary in ["tollgate-authz", "tollgate-ratelimit"] {
        let svc = &services[binary];
        let flags = tollgate_e2e::service_flags::flags(&paths::binary(binary))
            .unwrap_or_else(|e| panic!("{e}"));
        let env = svc["environment"].as_mapping().expect("environment");
        for name in env.keys().filter_map(|k| k.as_str()) {
            assert!(
                name == "RUST_LOG" || flags.iter().any(|f| f.env.as_deref() == Some(name)),
                "{binary}: no flag reads {name}"
            );
        }
        // The HTTP listener: set in the environment, or the binary's default (loopback is
        // fine, the healthcheck runs in the container).
        let http = flags
            .iter()
            .find(|f| f.long == "--http-listen")
            .unwrap_or_else(|| panic!("{binary} has no --http-listen"));
        let var = http.env.as_deref().expect("--http-listen env");
        let addr = env
            .get(var)
            .and_then(|v| v.as_str())
            .or(http.default.as_deref())
            .expect("--http-listen default");
        let port = addr.rsplit(':').next().unwrap_or_default();
        assert_eq!(
            svc["healthcheck"]["test"],
            yaml(&format!(
                r#"["CMD", "curl", "-fsS", "http://127.0.0.1:{port}/readyz"]"#
            )),
            "{binary}: healthy means ready (its store answers)"
        );
    }
    // The rate limiter counts in the redis service it waits for.
    let rls = &services["tollgate-ratelimit"];
    let url = rls["environment"]["TOLLGATE_REDIS_URL"]
        .as_str()
        .expect("tollgate-ratelimit uses the redis service");
    assert!(url.starts_with("redis://redis:"), "{url}");
    assert_eq!(
        rls["depends_on"]["redis"]["condition"], "service_healthy",
        "starts once Redis answers"
    );
}

/// The environment variable the binary reads `long` from, per its `--help`.
fn env_of(flags: &[tollgate_e2e::service_flags::Flag], binary: &str, long: &str) -> String {
    flags
        .iter()
        .find(|f| f.long == long)
        .and_then(|f| f.env.clone())
        .unwrap_or_else(|| panic!("{binary} has no {long} read from the environment"))
}

#[test]
fn compose_ratelimit_records_usage_in_the_postgres_ledger_through_a_buffer_on_a_volume() {
    let compose = yaml(&read("docker-compose.yml"));
    let services = &compose["services"];
    let rls = &services["tollgate-ratelimit"];
    let flags = tollgate_e2e::service_flags::flags(&paths::binary("tollgate-ratelimit"))
        .unwrap_or_else(|e| panic!("{e}"));
    let url_var = env_of(&flags, "tollgate-ratelimit", "--ledger-url");
    let buffer_var = env_of(&flags, "tollgate-ratelimit", "--ledger-buffer");

    // The ledger is the postgres service's database, as its user, with its password.
    let url = rls["environment"][url_var.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("tollgate-ratelimit: no {url_var}"));
    let pg = &services["postgres"];
    let (user, db) = (
        pg["environment"]["POSTGRES_USER"].as_str().expect("user"),
        pg["environment"]["POSTGRES_DB"].as_str().expect("db"),
    );
    let secret = pg["secrets"][0].as_str().expect("postgres password secret");
    let password_var = compose["secrets"][secret]["environment"]
        .as_str()
        .expect("the password secret comes from the environment");
    assert_eq!(
        url,
        format!("postgres://{user}:${{{password_var}}}@postgres:5432/{db}"),
        "{url_var}"
    );
    assert_eq!(
        rls["depends_on"]["postgres"]["condition"], "service_healthy",
        "migrates the ledger at start: wait for PostgreSQL"
    );

    // The buffer is on a named volume (it must outlive the container), below its mount.
    let buffer = rls["environment"][buffer_var.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("tollgate-ratelimit: no {buffer_var}"));
    let declared = compose["volumes"].as_mapping().cloned().unwrap_or_default();
    let mount = rls["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.split_once(':'))
        .find(|(_, target)| {
            let target = target.split(':').next().unwrap_or(target);
            std::path::Path::new(buffer).starts_with(target)
        })
        .unwrap_or_else(|| panic!("{buffer_var}={buffer} is on no volume of tollgate-ratelimit"));
    assert!(
        declared.contains_key(mount.0),
        "{buffer_var}={buffer} is on {mount:?}, not a named volume"
    );
    assert!(
        !mount.1.ends_with(":ro"),
        "the ledger buffer is written: {mount:?}"
    );
    // A fresh named volume takes the ownership of the image's directory it is mounted on:
    // the services image must create it for its user.
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("mkdir -p {}", mount.1))
            && dockerfile.contains(&format!("chown tollgate {}", mount.1)),
        "the services image must make {} for the tollgate user",
        mount.1
    );
}

/// The request id of an error body Envoy writes: the request's own when it has one, else the
/// one the mapper adds to the response (a request refused before Envoy assigned an id).
const REPLY_REQUEST_ID: &str = "%CEL('x-request-id' in request.headers ? request.headers['x-request-id'] : response.headers['x-request-id'])%";

/// The connection manager of every config that carries one in full: local, compose, the
/// routing example, and the connection-manager patch of the Istio EnvoyFilter. (Production
/// must equal the local template there: tests/tests/deploy_production.rs, deploy_istio.rs.)
fn connection_managers() -> Vec<(&'static str, Value)> {
    let istio = yaml(&read("envoy/istio/envoy-filter.yaml"));
    let istio_hcm = istio["spec"]["configPatches"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == "NETWORK_FILTER")
        .expect("the EnvoyFilter patches the connection manager")["patch"]["value"]["typed_config"]
        .clone();
    vec![
        ("local", hcm(&yaml(&local_config())).clone()),
        (
            "compose",
            hcm(&yaml(&read("envoy/envoy.compose.yaml"))).clone(),
        ),
        (
            "routing example",
            hcm(&yaml(&read("envoy/examples/routing.yaml"))).clone(),
        ),
        ("istio", istio_hcm),
    ]
}

#[test]
fn every_config_strips_a_client_backend_header_before_route_selection() {
    for (what, hcm) in connection_managers() {
        let exts = hcm["early_header_mutation_extensions"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{what}: no early_header_mutation_extensions"));
        let strips = exts.iter().any(|e| {
            e["name"] == "envoy.http.early_header_mutation.header_mutation"
                && e["typed_config"]["mutations"]
                    .as_sequence()
                    .is_some_and(|m| {
                        m.iter()
                            .any(|m| m["remove"] == tollgate_core::metadata::HEADER_BACKEND)
                    })
        });
        assert!(strips, "{what}: {exts:?}");
    }
}

fn status_filter(op: &str, status: u64) -> Value {
    yaml(&format!(
        "{{comparison: {{op: {op}, value: {{default_value: {status}}}}}}}"
    ))
}

/// The part of a status_code_filter the check cares about (runtime keys aside).
fn status_of(filter: &Value) -> Value {
    let c = &filter["status_code_filter"]["comparison"];
    yaml(&format!(
        "{{comparison: {{op: {}, value: {{default_value: {}}}}}}}",
        c["op"].as_str().unwrap_or("?"),
        c["value"]["default_value"].as_u64().unwrap_or(0)
    ))
}

#[test]
fn every_envoy_reply_mapper_writes_the_json_error_with_the_request_id() {
    for (what, hcm) in connection_managers() {
        let lrc = &hcm["local_reply_config"];
        // A global format would wrap Tollgate's own JSON bodies too.
        assert!(lrc.get("body_format").is_none(), "{what}");
        let mappers = lrc["mappers"].as_sequence().unwrap();
        let (first, rest) = mappers.split_first().unwrap();
        assert_eq!(
            first["filter"]["extension_filter"]["typed_config"]["expression"],
            "'x-tollgate-error' in response.headers",
            "{what}: Tollgate's own replies are matched first"
        );
        for field in [
            "body_format_override",
            "headers_to_add",
            "status_code",
            "body",
        ] {
            assert!(
                first.get(field).is_none(),
                "{what}: Tollgate's own replies pass unchanged ({field})"
            );
        }
        for m in rest {
            let format = &m["body_format_override"];
            let error = &format["json_format"]["error"];
            let code = error["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {m:?}"));
            assert!(
                error["type"].is_string() && error["message"].is_string(),
                "{what}: {code}"
            );
            assert_eq!(error["request_id"], REPLY_REQUEST_ID, "{what}: {code}");
            assert_eq!(format["content_type"], "application/json", "{what}: {code}");
            let headers = m["headers_to_add"].as_sequence().unwrap();
            assert_eq!(
                headers[0],
                yaml("{header: {key: x-request-id, value: '%UNIQUE_ID%'}, append_action: ADD_IF_ABSENT}"),
                "{what}: {code} adds a request id when the request has none"
            );
            assert!(
                headers
                    .iter()
                    .any(|h| h["header"]["key"] == "x-tollgate-error"
                        && h["header"]["value"] == code),
                "{what}: {code} names itself in x-tollgate-error"
            );
        }
        // The last two catch every other 4xx and 5xx Envoy sends.
        let n = rest.len();
        let client = &rest[n - 2]["filter"]["and_filter"]["filters"];
        assert_eq!(
            (status_of(&client[0]), status_of(&client[1])),
            (status_filter("GE", 400), status_filter("LE", 499)),
            "{what}"
        );
        assert_eq!(
            status_of(&rest[n - 1]["filter"]),
            status_filter("GE", 500),
            "{what}"
        );
    }
}
