//! Golden manifest tests: `tests/ui/valid/*.toml` must pass `wasmgate check`
//! with the output in the matching `.stdout`; `tests/ui/invalid/*.toml` must
//! fail with exactly the text in the matching `.stderr`.
//!
//! Run with `BLESS=1` to rewrite the expected files after an intended change.

use crate::util::{root, run};
use std::path::Path;

fn cases(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no cases in {dir}");
    names
}

fn compare(expected_file: &Path, actual: &str, failures: &mut Vec<String>) {
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(expected_file, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(expected_file).unwrap_or_default();
    if expected != actual {
        failures.push(format!(
            "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
            expected_file.display()
        ));
    }
}

#[test]
fn invalid_manifests_fail_with_the_expected_error() {
    let mut failures = Vec::new();
    for name in cases("tests/ui/invalid") {
        let path = format!("tests/ui/invalid/{name}");
        let out = run(&["check", "-f", &path]);
        if out.status.code() != Some(2) {
            failures.push(format!("{path}: exit {:?}, want 2", out.status.code()));
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        compare(
            &root().join(path.replace(".toml", ".stderr")),
            &stderr,
            &mut failures,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn valid_manifests_pass_check() {
    let mut failures = Vec::new();
    for name in cases("tests/ui/valid") {
        let path = format!("tests/ui/valid/{name}");
        // A fixed "now", so the timers' next fire times are stable.
        let out = run(&["check", "-f", &path, "--now", "2026-03-28T23:00:00Z"]);
        if out.status.code() != Some(0) {
            failures.push(format!(
                "{path}: exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        compare(
            &root().join(path.replace(".toml", ".stdout")),
            &stdout,
            &mut failures,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
