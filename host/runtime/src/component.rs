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
}

impl Handler {
    /// The WIT interface (without version).
    pub fn interface(self) -> &'static str {
        match self {
            Handler::Mqtt => "wasmgate:edge/mqtt-handler",
            Handler::Timer => "wasmgate:edge/timer-handler",
            Handler::Http => "wasi:http/incoming-handler",
        }
    }

    /// The world a guest targets to export this handler.
    pub fn world(self) -> &'static str {
        match self {
            Handler::Mqtt => "wasmgate:edge/mqtt-app",
            Handler::Timer => "wasmgate:edge/timer-app",
            Handler::Http => "wasmgate:edge/http-app (or wasi:http/proxy)",
        }
    }
}

/// Capabilities that the manifest must grant before a component may import them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `wasmgate:edge/mqtt-publisher`, granted by `allow.mqtt_publish`.
    MqttPublish,
    /// `wasi:http/outgoing-handler`, granted by `allow.outbound_http`.
    OutboundHttp,
}

impl Capability {
    /// The imported interface (without version).
    pub fn interface(self) -> &'static str {
        match self {
            Capability::MqttPublish => "wasmgate:edge/mqtt-publisher",
            Capability::OutboundHttp => "wasi:http/outgoing-handler",
        }
    }

    /// The manifest key that grants it.
    pub fn allow_key(self) -> &'static str {
        match self {
            Capability::MqttPublish => "mqtt_publish",
            Capability::OutboundHttp => "outbound_http",
        }
    }
}

/// A compiled, pre-instantiated component.
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
            .finish_non_exhaustive()
    }
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
#[derive(Debug, Clone)]
pub struct Cache {
    dir: Option<PathBuf>,
}

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

    /// Compiles `bytes`, or loads the precompiled artifact. Returns whether it
    /// came from the cache. Cache I/O failures are logged and never fatal.
    pub fn compile(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let Some(dir) = &self.dir else {
            return Ok((Component::new(engine, bytes)?, false));
        };
        let file = dir.join(Self::key(engine, bytes));
        if file.exists() {
            match deserialize(engine, &file) {
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring unusable precompiled artifact; recompiling")
                }
            }
        }
        let artifact = engine.precompile_component(bytes)?;
        if let Err(e) = write_atomically(dir, &file, &artifact) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the precompile cache; components will be recompiled at the next start");
        }
        // Load through the same path as a cache hit, so both behave alike.
        match deserialize(engine, &file) {
            Ok(component) => Ok((component, false)),
            Err(_) => Ok((Component::new(engine, bytes)?, false)),
        }
    }
}

/// Loads a precompiled artifact that this process's cache wrote.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, file: &Path) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime requires that the file is a trusted artifact produced
    // by `Engine::precompile_component` of a compatible engine. Only this cache
    // writes into its directory (atomically, via rename), the name contains the
    // engine's compatibility hash, and wasmtime itself checks the header and
    // version and refuses an incompatible artifact with an error.
    unsafe { Component::deserialize_file(engine, file) }
}

fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

/// Reads, validates, compiles and pre-instantiates a component file.
pub fn load(
    engine: &Engine,
    linker: &Linker<State>,
    cache: &Cache,
    path: &Path,
) -> Result<Compiled, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Both binary formats start with "\0asm"; the next two bytes are the
    // version: 1 for a core module, 0x0d for a component.
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        });
    }
    let (component, from_cache) =
        cache
            .compile(engine, &bytes)
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
    })
}

/// Builds the host linker: WASI 0.2 (cli, clocks, filesystem, io, random,
/// sockets), wasi:http, and `wasmgate:edge/mqtt-publisher`.
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
    Ok(linker)
}
