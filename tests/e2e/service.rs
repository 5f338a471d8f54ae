//! The systemd unit and manifest in `examples/systemd`.

use crate::util::{root, run};
use std::process::Command;

/// `systemd-analyze verify` accepts the unit (with its binary path pointed at
/// the binary under test, since verify checks that ExecStart exists).
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(root().join("examples/systemd/wasmgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/wasmgate up -f /etc/wasmgate/wasmgate.toml"));
    assert!(unit.contains("StateDirectory=wasmgate"));
    assert!(unit.contains("Restart=on-failure"));
    // The JIT needs writable-then-executable mappings.
    assert!(
        !unit
            .lines()
            .any(|l| l.trim_start().starts_with("MemoryDenyWriteExecute"))
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/wasmgate", env!("CARGO_BIN_EXE_wasmgate")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed: .ci/run installs it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("wasmgate.service"),
        "systemd-analyze verify warned about the unit:\n{stderr}"
    );
}

/// The example manifest is valid: `check` (the unit's ExecStartPre) accepts it
/// once its absolute paths point at the built guests and a writable state dir.
#[test]
fn the_systemd_example_manifest_passes_check() {
    let manifest = std::fs::read_to_string(root().join("examples/systemd/wasmgate.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let guests = std::path::Path::new(wasmgate_test_artifacts::HELLO_HTTP)
        .parent()
        .unwrap();
    assert!(guests.join("echo_mqtt.wasm").exists());
    let manifest = manifest
        .replace("/etc/wasmgate/components", guests.to_str().unwrap())
        .replace(
            "/var/lib/wasmgate",
            dir.path().join("state").to_str().unwrap(),
        );
    let path = dir.path().join("wasmgate.toml");
    std::fs::write(&path, manifest).unwrap();
    let out = run(&["check", "-f", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "check failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
