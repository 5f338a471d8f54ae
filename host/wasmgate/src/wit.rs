//! `wasmgate wit`: writes the WIT a guest is built against — the
//! `wasmgate:edge` package and the WASI packages it uses — so any
//! language's bindings generator can use it without this repository.

use crate::cli::Fatal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The files, as they are in the repository's `wit/`, relative to it.
pub(crate) const FILES: &[(&str, &str)] = &[
    ("edge.wit", include_str!("../../../wit/edge.wit")),
    (
        "deps/cli/package.wit",
        include_str!("../../../wit/deps/cli/package.wit"),
    ),
    (
        "deps/clocks/package.wit",
        include_str!("../../../wit/deps/clocks/package.wit"),
    ),
    (
        "deps/filesystem/package.wit",
        include_str!("../../../wit/deps/filesystem/package.wit"),
    ),
    (
        "deps/http/package.wit",
        include_str!("../../../wit/deps/http/package.wit"),
    ),
    (
        "deps/io/package.wit",
        include_str!("../../../wit/deps/io/package.wit"),
    ),
    (
        "deps/keyvalue/atomic.wit",
        include_str!("../../../wit/deps/keyvalue/atomic.wit"),
    ),
    (
        "deps/keyvalue/batch.wit",
        include_str!("../../../wit/deps/keyvalue/batch.wit"),
    ),
    (
        "deps/keyvalue/store.wit",
        include_str!("../../../wit/deps/keyvalue/store.wit"),
    ),
    (
        "deps/keyvalue/watch.wit",
        include_str!("../../../wit/deps/keyvalue/watch.wit"),
    ),
    (
        "deps/keyvalue/world.wit",
        include_str!("../../../wit/deps/keyvalue/world.wit"),
    ),
    (
        "deps/random/package.wit",
        include_str!("../../../wit/deps/random/package.wit"),
    ),
    (
        "deps/sockets/package.wit",
        include_str!("../../../wit/deps/sockets/package.wit"),
    ),
];

/// Writes [`FILES`] under `dir`. A file that exists with other contents is
/// left alone and named in the error, unless `force`.
pub fn write(dir: &Path, force: bool) -> Result<ExitCode, Fatal> {
    let mut differ: Vec<PathBuf> = Vec::new();
    for (name, text) in FILES {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(old) if old == text.as_bytes() => {}
            Ok(_) if !force => differ.push(path),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Fatal(format!("cannot read {}: {e}", path.display()))),
        }
    }
    if !differ.is_empty() {
        let list: Vec<String> = differ.iter().map(|p| p.display().to_string()).collect();
        return Err(Fatal(format!(
            "not overwriting files with other contents: {} (--force replaces them)",
            list.join(", ")
        )));
    }
    for (name, text) in FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Fatal(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// Every file of the repository's `wit/` is embedded, and nothing else.
    #[test]
    fn every_wit_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(&root).unwrap();
                    on_disk.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = super::FILES.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }
}
