//! Loading a component: read, check it is a component, compile once (cached
//! on disk), pre-instantiate, and record what it exports and imports.

use crate::invoke::State;
use anyhow::Context as _;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::{Component, InstancePre, Linker};

/// The export a trigger needs from its component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// `wasmgate:edge/mqtt-handler` (`[[trigger.mqtt]]`).
    Mqtt,
    /// `wasmgate:edge/timer-handler` (`[[trigger.timer]]`).
    Timer,
    /// `wasi:http/incoming-handler` (`[[trigger.http]]`).
    Http,
    /// `wasmgate:edge/kv-stream-handler` (`[[trigger.keyvalue]]`).
    KeyValue,
}

impl Handler {
    /// The WIT interface (without version).
    pub fn interface(self) -> &'static str {
        match self {
            Handler::Mqtt => "wasmgate:edge/mqtt-handler",
            Handler::Timer => "wasmgate:edge/timer-handler",
            Handler::Http => "wasi:http/incoming-handler",
            Handler::KeyValue => "wasmgate:edge/kv-stream-handler",
        }
    }

    /// The world a guest targets to export this handler.
    pub fn world(self) -> &'static str {
        match self {
            Handler::Mqtt => "wasmgate:edge/mqtt-app",
            Handler::Timer => "wasmgate:edge/timer-app",
            Handler::Http => "wasmgate:edge/http-app (or wasi:http/proxy)",
            Handler::KeyValue => "wasmgate:edge/kv-stream-app",
        }
    }
}

/// Capabilities that the manifest must grant before a component may import them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `wasmgate:edge/mqtt-publisher`, granted by `allow.mqtt_publish`
    /// (or `allow.mqtt_response`, for a component that only replies).
    MqttPublish,
    /// `wasi:http/outgoing-handler`, granted by `allow.outbound_http`.
    OutboundHttp,
    /// `wasi:keyvalue/store`, granted by `allow.keyvalue`. A component
    /// that imports it without the grant is refused (whatever
    /// `strict_imports` says): it keeps state, and would fail every
    /// invocation.
    KeyValue,
}

impl Capability {
    /// The imported interface (without version).
    pub fn interface(self) -> &'static str {
        match self {
            Capability::MqttPublish => "wasmgate:edge/mqtt-publisher",
            Capability::OutboundHttp => "wasi:http/outgoing-handler",
            Capability::KeyValue => "wasi:keyvalue/store",
        }
    }

    /// The manifest key that grants it.
    pub fn allow_key(self) -> &'static str {
        match self {
            Capability::MqttPublish => "mqtt_publish",
            Capability::OutboundHttp => "outbound_http",
            Capability::KeyValue => "keyvalue",
        }
    }
}

/// A compiled, pre-instantiated component.
#[derive(Clone)]
pub struct Compiled {
    /// The compiled component.
    pub component: Component,
    /// Ready to instantiate: imports resolved against the host's linker.
    pub pre: InstancePre<State>,
    /// Names of its exported interfaces/functions.
    pub exports: Vec<String>,
    /// Names of its imports.
    pub imports: Vec<String>,
    /// Whether the compiled artifact came from the on-disk cache.
    pub from_cache: bool,
    /// Who signed it, when its signature was verified at load.
    pub signer: Option<wasmgate_manifest::signing::PublicKey>,
    /// SHA-256 of the component file, lowercase hex.
    pub digest: String,
}

impl Compiled {
    /// Checks that it exports the given handler (any version of the
    /// interface); the error names what it does export and the world to target.
    pub fn require_handler(&self, name: &str, handler: Handler) -> Result<(), String> {
        if self
            .exports
            .iter()
            .any(|e| unversioned(e) == handler.interface())
        {
            return Ok(());
        }
        let exports = if self.exports.is_empty() {
            "nothing".to_string()
        } else {
            self.exports.join(", ")
        };
        Err(format!(
            "component {name:?} does not export {} (it exports: {exports}); build it for the {} world",
            handler.interface(),
            handler.world()
        ))
    }

    /// Whether it imports a capability's interface.
    pub fn imports_capability(&self, cap: Capability) -> bool {
        self.imports
            .iter()
            .any(|i| unversioned(i) == cap.interface())
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("exports", &self.exports)
            .field("imports", &self.imports)
            .field("from_cache", &self.from_cache)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// The WASI preview 1 module (`wasi_snapshot_preview1`, or the older
/// `wasi_unstable`) a core module imports from, if any.
fn preview1_import(bytes: &[u8]) -> Option<String> {
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::ImportSection(section) = payload.ok()? {
            return section
                .into_imports()
                .filter_map(Result::ok)
                .find(|i| matches!(i.module, "wasi_snapshot_preview1" | "wasi_unstable"))
                .map(|i| i.module.to_string());
        }
    }
    None
}

fn unversioned(name: &str) -> &str {
    name.split_once('@').map_or(name, |(base, _)| base)
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than a component may be.
    #[error(
        "{path} is {size} bytes, more than the {max} bytes a component may have (the largest \
         language runtimes are tens of MB)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The bound, [`MAX_COMPONENT_BYTES`].
        max: u64,
    },
    /// The file is not WebAssembly at all.
    #[error("{path} is not a WebAssembly file (no \\0asm header)")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core module, not a component.
    #[error(
        "{path} is a core WebAssembly module, not a component: build it with \
         `cargo build --target wasm32-wasip2` (or `cargo component build`), or wrap it with \
         `wasm-tools component new`"
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core module built for WASI preview 1.
    #[error(
        "{path} is a core WebAssembly module for WASI preview 1 (it imports {module}), not a \
         component: build it for wasm32-wasip2 (`cargo build --target wasm32-wasip2`), or with \
         `cargo component build`, which adds the preview 1 adapter; or adapt it with \
         `wasm-tools component new {path} --adapt wasi_snapshot_preview1.reactor.wasm` (the \
         adapter comes with each wasmtime release)"
    )]
    Preview1Module {
        /// The file.
        path: PathBuf,
        /// The preview 1 import module it names.
        module: String,
    },
    /// wasmtime refused to compile it.
    #[error("{path} is not a valid component: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// wasmtime's message.
        message: String,
    },
    /// It imports something the host does not provide.
    #[error(
        "{path} imports something wasmgate does not provide ({message}); wasmgate provides \
         wasi:cli, wasi:clocks, wasi:filesystem, wasi:io, wasi:random, wasi:sockets and wasi:http \
         0.2.x and wasmgate:edge/mqtt-publisher@0.1.0 — was it built for another world?"
    )]
    UnknownImport {
        /// The file.
        path: PathBuf,
        /// wasmtime's message, naming the import.
        message: String,
    },
}

/// Compiles components, reusing precompiled artifacts from a directory.
///
/// The key of an artifact is the SHA-256 of the component's bytes plus a hash
/// of the engine's compatibility settings, so a changed component, a changed
/// engine configuration or another wasmtime version all miss the cache.
///
/// An artifact is native code the host will run, so the cache trusts only
/// what it wrote itself: each file ends with an HMAC-SHA-256 of the artifact
/// under a random key kept in the directory (`.key`, mode 0600; the
/// directory is 0700), checked before the bytes are deserialized. A torn,
/// truncated or edited file fails the check and is recompiled. Files are
/// written to a temporary name, fsynced, renamed into place, and the
/// directory is fsynced, so a power cut leaves the old file or the new one.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: Option<PathBuf>,
}

/// Length of the MAC trailer of an artifact file.
const MAC_LEN: usize = 32;
/// Name of the cache key file in the cache directory.
const KEY_FILE: &str = ".key";

impl Cache {
    /// A cache in `dir` (created when first written), or none.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The default cache for bare `.wasm` files: `$WASMGATE_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/wasmgate`, else `~/.cache/wasmgate`.
    pub fn user_default() -> Self {
        let dir = std::env::var_os("WASMGATE_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("wasmgate"))
            })
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/wasmgate")));
        Self { dir }
    }

    fn key(engine: &Engine, bytes: &[u8]) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        format!(
            "{}-{:016x}.cwasm",
            hex::encode(Sha256::digest(bytes)),
            hasher.finish()
        )
    }

    /// Removes the artifacts of every component whose SHA-256 digest (hex)
    /// is not in `keep`, so that deploys do not fill the disk with the
    /// artifacts of versions gone. Returns how many were removed.
    pub fn retain(&self, keep: &std::collections::BTreeSet<String>) -> usize {
        let Some(dir) = &self.dir else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((digest, _)) = name.split_once('-') else {
                continue;
            };
            if name.ends_with(".cwasm")
                && !keep.contains(digest)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Compiles `bytes`, or loads the precompiled artifact. Returns whether it
    /// came from the cache. Cache I/O failures are logged and never fatal.
    pub fn compile(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let Some(dir) = &self.dir else {
            return Ok((Component::new(engine, bytes)?, false));
        };
        let mac_key = match open_dir(dir) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot use the precompile cache; compiling without it");
                return Ok((Component::new(engine, bytes)?, false));
            }
        };
        let file = dir.join(Self::key(engine, bytes));
        if file.exists() {
            match load_verified(engine, &mac_key, &file) {
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring unusable precompiled artifact; recompiling")
                }
            }
        }
        let mut artifact = engine.precompile_component(bytes)?;
        let component = deserialize(engine, &artifact)?;
        let tag = ring::hmac::sign(&mac_key, &artifact);
        artifact.extend_from_slice(tag.as_ref());
        if let Err(e) = write_durably(dir, &file, &artifact) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the precompile cache; components will be recompiled at the next start");
        }
        Ok((component, false))
    }
}

/// Creates the cache directory (0700) if needed, tightens its mode, and
/// returns the MAC key, made on first use.
fn open_dir(dir: &Path) -> std::io::Result<ring::hmac::Key> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(key) if key.len() == MAC_LEN => key,
        Ok(_) => {
            // Not a key of ours: a new one (every old artifact then misses).
            std::fs::remove_file(&path)?;
            new_key(dir, &path)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_key(dir, &path)?,
        Err(e) => return Err(e),
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))
}

/// Makes the cache key at `path` (mode 0600, fsynced). When another process
/// made one first, that one is used.
fn new_key(dir: &Path, path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; MAC_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no random numbers for the cache key"))?;
    let tmp = dir.join(format!(".key-{}", uuid::Uuid::now_v7()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    // A link, not a rename: it fails rather than replace another's key.
    let linked = std::fs::hard_link(&tmp, path);
    std::fs::remove_file(&tmp)?;
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)?.sync_all()?;
            Ok(key.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(path),
        Err(e) => Err(e),
    }
}

/// Reads an artifact file, checks its MAC, and deserializes the artifact.
fn load_verified(
    engine: &Engine,
    key: &ring::hmac::Key,
    file: &Path,
) -> wasmtime::Result<Component> {
    let bytes = std::fs::read(file)?;
    let Some(split) = bytes.len().checked_sub(MAC_LEN) else {
        wasmtime::bail!("the file is too short to be an artifact");
    };
    let (artifact, tag) = bytes.split_at(split);
    ring::hmac::verify(key, artifact, tag).map_err(|_| {
        wasmtime::format_err!(
            "the artifact's MAC does not match: the file is torn, edited or not this cache's"
        )
    })?;
    deserialize(engine, artifact)
}

/// Loads an artifact whose MAC this cache has checked (or that the engine
/// just produced).
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime requires that the bytes are a trusted artifact produced
    // by `Engine::precompile_component` of a compatible engine. They either
    // come straight from the engine, or from a file whose HMAC under this
    // cache's private key was checked on exactly these bytes (so nobody
    // without the key wrote them, and the file is neither torn nor edited);
    // wasmtime itself also checks the header and version and refuses an
    // incompatible artifact with an error.
    unsafe { Component::deserialize(engine, artifact) }
}

/// Writes `bytes` to `file` in `dir` so that after a crash or power cut it
/// is the old file or the new one, complete: a temporary file (mode 0600),
/// fsync, rename, fsync of the directory.
pub fn write_durably(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads, validates, compiles and pre-instantiates a component file.
pub fn load(
    engine: &Engine,
    linker: &Linker<State>,
    cache: &Cache,
    path: &Path,
) -> Result<Compiled, LoadError> {
    let bytes = read(path)?;
    load_bytes(engine, linker, cache, path, &bytes)
}

/// The largest component file read: 256 MiB. A Python or JavaScript
/// component, runtime included, is 10–20 MB.
pub const MAX_COMPONENT_BYTES: u64 = 256 * 1024 * 1024;

/// Reads a component file, refusing one over [`MAX_COMPONENT_BYTES`]
/// before reading it (and never reading more, should it grow meanwhile).
pub fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let read_error = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Not a FIFO or a device: opening one could block, reading it never end.
    if !std::fs::metadata(path).map_err(read_error)?.is_file() {
        return Err(LoadError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    let file = std::fs::File::open(path).map_err(read_error)?;
    let too_large = |size| LoadError::TooLarge {
        path: path.to_path_buf(),
        size,
        max: MAX_COMPONENT_BYTES,
    };
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_COMPONENT_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Compiles `bytes`, read from `path` (which only names it in errors).
pub fn load_bytes(
    engine: &Engine,
    linker: &Linker<State>,
    cache: &Cache,
    path: &Path,
    bytes: &[u8],
) -> Result<Compiled, LoadError> {
    // Both binary formats start with "\0asm"; the next two bytes are the
    // version: 1 for a core module, 0x0d for a component.
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(match preview1_import(bytes) {
            Some(module) => LoadError::Preview1Module {
                path: path.to_path_buf(),
                module,
            },
            None => LoadError::CoreModule {
                path: path.to_path_buf(),
            },
        });
    }
    let (component, from_cache) = cache
        .compile(engine, bytes)
        .map_err(|e| LoadError::Invalid {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
    let ty = component.component_type();
    let exports = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let imports = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::UnknownImport {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
    Ok(Compiled {
        component,
        pre,
        exports,
        imports,
        from_cache,
        signer: None,
        digest: hex::encode(Sha256::digest(bytes)),
    })
}

/// Builds the host linker: WASI 0.2 (cli, clocks, filesystem, io, random,
/// sockets), wasi:http, `wasmgate:edge/mqtt-publisher` and
/// `wasi:keyvalue`.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking WASI")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking wasi:http")?;
    crate::bindings::Bindings::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
        &mut linker,
        |s| s,
    )
    .map_err(anyhow::Error::from)
    .context("linking wasmgate:edge")?;
    crate::keyvalue::add_to_linker(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking wasi:keyvalue")?;
    Ok(linker)
}
