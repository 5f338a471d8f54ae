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

/// Native code is run only from artifacts this cache wrote: an artifact
/// with one byte changed (which wasmtime's own header check does not see),
/// a torn one, or one written under another cache's key is recompiled.
#[test]
fn an_edited_torn_or_foreign_artifact_is_not_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("precompiled");
    runtime(&cache).compile(Path::new(COUNTER)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&cache.join(".key")), 0o600);
    let artifact = artifacts(&cache).pop().unwrap();
    assert_eq!(mode(&artifact), 0o600);
    let good = std::fs::read(&artifact).unwrap();

    // One byte in the middle (in the code, past the header).
    let mut edited = good.clone();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x01;
    std::fs::write(&artifact, &edited).unwrap();
    assert!(
        !runtime(&cache)
            .compile(Path::new(COUNTER))
            .unwrap()
            .from_cache
    );
    assert_eq!(std::fs::read(&artifact).unwrap(), good, "rewritten");

    // Torn: the first half only.
    std::fs::write(&artifact, &good[..good.len() / 2]).unwrap();
    assert!(
        !runtime(&cache)
            .compile(Path::new(COUNTER))
            .unwrap()
            .from_cache
    );

    // Another cache's key: its artifacts are not trusted here.
    std::fs::write(cache.join(".key"), [7u8; 32]).unwrap();
    assert!(
        !runtime(&cache)
            .compile(Path::new(COUNTER))
            .unwrap()
            .from_cache
    );
    assert!(
        runtime(&cache)
            .compile(Path::new(COUNTER))
            .unwrap()
            .from_cache
    );

    // A loose directory mode is tightened.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(
        runtime(&cache)
            .compile(Path::new(COUNTER))
            .unwrap()
            .from_cache
    );
    assert_eq!(mode(&cache), 0o700);
}
