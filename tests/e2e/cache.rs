//! Components are compiled once and loaded from the precompile cache after.

use std::path::Path;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_test_artifacts::COUNTER;

fn runtime(dir: &Path) -> Runtime {
    Runtime::new(
        EngineOptions::default(),
        Cache::new(Some(dir.to_path_buf())),
    )
    .unwrap()
}

fn artifacts(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

#[test]
fn a_restart_loads_the_precompiled_component() {
    let dir = tempfile::tempdir().unwrap();
    let first = runtime(dir.path()).compile(Path::new(COUNTER)).unwrap();
    assert!(!first.from_cache);
    assert_eq!(artifacts(dir.path()).len(), 1);

    // A new engine, as after a restart: same configuration, so a cache hit.
    let second = runtime(dir.path()).compile(Path::new(COUNTER)).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.exports, first.exports);

    // A different engine configuration must not reuse the artifact.
    let no_fuel = Runtime::new(
        EngineOptions {
            fuel: false,
            ..EngineOptions::default()
        },
        Cache::new(Some(dir.path().to_path_buf())),
    )
    .unwrap();
    assert!(!no_fuel.compile(Path::new(COUNTER)).unwrap().from_cache);
    assert_eq!(artifacts(dir.path()).len(), 2);
}

#[test]
fn a_corrupt_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    runtime(dir.path()).compile(Path::new(COUNTER)).unwrap();
    let artifact = artifacts(dir.path()).pop().unwrap();
    std::fs::write(&artifact, b"not an artifact").unwrap();
    let again = runtime(dir.path()).compile(Path::new(COUNTER)).unwrap();
    assert!(!again.from_cache, "the corrupt artifact was not used");
    let third = runtime(dir.path()).compile(Path::new(COUNTER)).unwrap();
    assert!(third.from_cache, "the rewritten artifact is used");
}
