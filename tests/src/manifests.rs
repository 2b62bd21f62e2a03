//! Shared reading of what ships for production and cannot run here (no cluster, no Istio):
//! the Kubernetes and Istio manifests under envoy/kubernetes and envoy/istio, and
//! envoy/envoy.production.yaml.tmpl rendered like the local template. Used by the
//! `deploy_*` tests; a failed expectation panics with the file and place it is about.

use crate::envoy_config::{self, EnvoyPorts};
use crate::paths;
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const CHAIN: [&str; 4] = [
    "envoy.filters.http.ext_authz",
    "envoy.filters.http.wasm",
    "envoy.filters.http.ratelimit",
    "envoy.filters.http.router",
];
pub const TLS_BEGIN: &str = "# tls:begin";
pub const TLS_END: &str = "# tls:end";
/// The prefix every image in the manifests carries: operators replace it with their registry.
pub const REGISTRY: &str = "registry.example.com/tollgate/";

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(paths::workspace_root().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

pub fn yaml(text: &str, what: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}"))
}

/// One YAML document of a manifest file.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: String,
    pub value: Value,
}

impl Doc {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }
    pub fn at(&self) -> String {
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
pub fn docs_under(dir: &str) -> Vec<Doc> {
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

pub fn manifests() -> Vec<Doc> {
    let mut docs = docs_under("envoy/kubernetes");
    docs.extend(docs_under("envoy/istio"));
    docs
}

pub fn of_kind<'a>(docs: &'a [Doc], kind: &str) -> Vec<&'a Doc> {
    docs.iter().filter(|d| d.kind() == kind).collect()
}

pub fn the<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name}");
    found[0]
}

pub fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

pub fn u64_of(v: &Value, what: &str) -> u64 {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{what}: expected a number, got {v:?}"))
}

pub fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

pub fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

pub fn local_ports(credential: &str) -> EnvoyPorts {
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

pub fn wasm_path() -> String {
    paths::filter_wasm().display().to_string()
}

/// envoy/tollgate.yaml.tmpl rendered with the values the production config is compared with.
pub fn local_config() -> Value {
    let vars = envoy_config::vars(&local_ports(""), &wasm_path(), "{}");
    let text = envoy_config::render(&read("envoy/tollgate.yaml.tmpl"), &vars)
        .unwrap_or_else(|e| panic!("envoy/tollgate.yaml.tmpl: {e}"));
    yaml(&text, "rendered envoy/tollgate.yaml.tmpl")
}

pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// The production placeholders: the local template's names plus the production-only ones.
pub fn production_vars(tls: &TlsFiles) -> BTreeMap<&'static str, String> {
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

pub fn production_template() -> String {
    read("envoy/envoy.production.yaml.tmpl")
}

/// The template without the optional TLS listener (the marker lines and what is between).
pub fn without_tls(template: &str) -> String {
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

pub fn render(template: &str, vars: &BTreeMap<&str, String>) -> String {
    let text = envoy_config::render(template, vars)
        .unwrap_or_else(|e| panic!("envoy/envoy.production.yaml.tmpl: {e}"));
    assert!(!text.contains("{{"), "a placeholder was left unrendered");
    text
}

pub fn fake_tls() -> TlsFiles {
    TlsFiles {
        cert: "/etc/tollgate/tls/tls.crt".into(),
        key: "/etc/tollgate/tls/tls.key".into(),
    }
}

pub fn production_config() -> Value {
    yaml(
        &render(&production_template(), &production_vars(&fake_tls())),
        "rendered envoy/envoy.production.yaml.tmpl",
    )
}

pub fn listeners(config: &Value) -> &Vec<Value> {
    seq(&config["static_resources"]["listeners"], "listeners")
}

pub fn listener<'a>(config: &'a Value, name: &str) -> &'a Value {
    listeners(config)
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

pub fn hcm(listener: &Value) -> &Value {
    let f = &listener["filter_chains"][0]["filters"][0];
    assert_eq!(
        f["name"], "envoy.filters.network.http_connection_manager",
        "first network filter of listener {:?}",
        listener["name"]
    );
    &f["typed_config"]
}

pub fn http_filter<'a>(hcm: &'a Value, name: &str) -> &'a Value {
    seq(&hcm["http_filters"], "http_filters")
        .iter()
        .find(|f| f["name"] == name)
        .map(|f| &f["typed_config"])
        .unwrap_or_else(|| panic!("no http filter {name}"))
}

pub fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    seq(&config["static_resources"]["clusters"], "clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

pub fn first_route(hcm: &Value) -> &Value {
    &hcm["route_config"]["virtual_hosts"][0]["routes"][0]
}

pub fn validate(path: &Path) {
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

/// A new, empty directory for one test (the test removes it).
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = crate::process::temp_dir(&format!("deploy-{tag}"));
    assert!(dir.is_dir(), "cannot create {}", dir.display());
    dir
}

/// A throwaway self-signed certificate, or None (loudly) when openssl is missing.
pub fn self_signed(dir: &Path) -> Option<TlsFiles> {
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

/// (port name, containerPort) of a container.
pub fn container_ports(container: &Value) -> Vec<(Option<String>, u64)> {
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

pub fn containers(deployment: &Doc) -> &Vec<Value> {
    seq(
        &deployment.value["spec"]["template"]["spec"]["containers"],
        "containers",
    )
}

/// What runs pods: Deployments and StatefulSets (tollgate-ratelimit, for its per-replica
/// ledger volume).
pub fn workloads(docs: &[Doc]) -> Vec<&Doc> {
    docs.iter()
        .filter(|d| ["Deployment", "StatefulSet"].contains(&d.kind()))
        .collect()
}

/// The workloads in `namespace` whose pods `selector` selects.
pub fn selected_workloads<'a>(
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
