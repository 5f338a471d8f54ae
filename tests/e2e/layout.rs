//! The crate layout's rules, checked on Cargo's own view of the workspace,
//! so a change that breaks a wall fails the tests (see the README's
//! Architecture):
//!
//! - dependencies point one way: manifest → runtime → store → trigger-* →
//!   wasmgate; no trigger crate depends on another;
//! - nothing but the binary depends on clap;
//! - the manifest crate builds without tokio, wasmtime, rusqlite, rumqttc or
//!   hyper (it is pure parsing and validation).
//!
//! Function length has its own check: clippy's `too_many_lines` (threshold
//! in `clippy.toml`), denied in CI; a long function carries its reason in an
//! `#[expect(clippy::too_many_lines, reason = "...")]`.

use std::collections::BTreeMap;
use std::process::Command;

/// Each host crate's layer; a crate may depend only on crates of a lower one.
const LAYERS: &[(&str, u32)] = &[
    ("wasmgate-manifest", 0),
    ("wasmgate-runtime", 1),
    ("wasmgate-store", 2),
    ("wasmgate-trigger-http", 3),
    ("wasmgate-trigger-mqtt", 3),
    ("wasmgate-trigger-timer", 3),
    ("wasmgate-trigger-keyvalue", 3),
    ("wasmgate", 4),
];

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// Each workspace member's normal (non-dev, non-build) dependencies, by name.
fn declared_dependencies() -> BTreeMap<String, Vec<String>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn host_crates_depend_only_on_lower_layers() {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let deps = declared_dependencies();
    for (krate, layer) in LAYERS {
        let Some(own) = deps.get(*krate) else {
            panic!("{krate} is not a workspace member");
        };
        for dep in own {
            if let Some(dep_layer) = layers.get(dep.as_str()) {
                assert!(
                    dep_layer < layer,
                    "{krate} (layer {layer}) depends on {dep} (layer {dep_layer}): dependencies must point to lower layers only"
                );
            }
        }
    }
}

#[test]
fn only_the_binary_depends_on_clap() {
    for (krate, own) in declared_dependencies() {
        if krate != "wasmgate" {
            assert!(
                !own.iter().any(|d| d == "clap"),
                "{krate} depends on clap: command-line parsing belongs to the binary"
            );
        }
    }
}

#[test]
fn the_manifest_crate_needs_no_runtime_store_or_network_crates() {
    let out = cargo()
        .args([
            "tree",
            "-p",
            "wasmgate-manifest",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains(&"wasmgate-manifest"), "{tree}");
    for banned in ["tokio", "wasmtime", "rusqlite", "rumqttc", "hyper"] {
        assert!(
            !names.contains(&banned),
            "wasmgate-manifest pulls in {banned}:\n{tree}"
        );
    }
}
