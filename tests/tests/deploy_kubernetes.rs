//! Static checks of the Kubernetes manifests under envoy/kubernetes (no cluster here): the
//! documents against each other, against the Dockerfile targets and against what the service
//! binaries really serve.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use tollgate_e2e::manifests::*;
use tollgate_e2e::paths;

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

/// The one Deployment or StatefulSet called `name`.
fn workload<'a>(docs: &'a [Doc], name: &str) -> &'a Doc {
    let found: Vec<&Doc> = workloads(docs)
        .into_iter()
        .filter(|d| d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one workload {name}");
    found[0]
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
