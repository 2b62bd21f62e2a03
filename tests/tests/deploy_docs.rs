//! docs/DEPLOYMENT.md against what ships: its render variables render the production
//! template, and the tollgate-admin commands it shows exist with their flags.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use tollgate_e2e::manifests::*;
use tollgate_e2e::paths;

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
