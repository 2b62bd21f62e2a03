//! Where the harness finds the workspace, the built binaries, Envoy and Python.

use std::path::PathBuf;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A native binary of this workspace. `TOLLGATE_BUILD_PROFILE` picks debug (default) or release.
pub fn binary(name: &str) -> PathBuf {
    let profile = std::env::var("TOLLGATE_BUILD_PROFILE").unwrap_or_else(|_| "debug".into());
    target_dir().join(profile).join(name)
}

pub fn filter_wasm() -> PathBuf {
    std::env::var_os("TOLLGATE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            target_dir()
                .join("wasm32-wasip1")
                .join("release")
                .join("tollgate_filter.wasm")
        })
}

pub fn envoy() -> PathBuf {
    std::env::var_os("TOLLGATE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv").join("bin").join("envoy"))
}

pub fn python() -> PathBuf {
    workspace_root().join(".venv").join("bin").join("python")
}

pub fn envoy_template() -> PathBuf {
    workspace_root().join("envoy").join("tollgate.yaml.tmpl")
}
