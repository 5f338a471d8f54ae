//! A deployment: a manifest with every component compiled and checked
//! against the triggers that use it and the capabilities it was granted.

use crate::component::{self, Cache, Capability, Compiled, Handler, LoadError};
use crate::engine::{EngineOptions, HostEngine};
use crate::invoke::{Invocable, State};
use crate::signature::Policy;
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmgate_manifest::{ComponentConfig, Manifest, ManifestError};
use wasmtime::component::Linker;

/// The engine and linker every component of a host shares.
pub struct Runtime {
    engine: HostEngine,
    linker: Linker<State>,
    cache: Cache,
}

impl Runtime {
    /// Builds the engine and the linker; `cache` holds precompiled components.
    pub fn new(options: EngineOptions, cache: Cache) -> anyhow::Result<Self> {
        let engine = HostEngine::new(options)?;
        let linker = component::linker(engine.engine())?;
        Ok(Self {
            engine,
            linker,
            cache,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &HostEngine {
        &self.engine
    }

    /// The precompiled-component cache.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Loads one component file.
    pub fn compile(&self, path: &std::path::Path) -> Result<Compiled, LoadError> {
        component::load(self.engine.engine(), &self.linker, &self.cache, path)
    }

    /// Compiles a component's bytes, read from `path`.
    pub fn compile_bytes(
        &self,
        path: &std::path::Path,
        bytes: &[u8],
    ) -> Result<Compiled, LoadError> {
        component::load_bytes(self.engine.engine(), &self.linker, &self.cache, path, bytes)
    }
}

/// A manifest with all its components loaded.
pub struct Deployment {
    /// The runtime.
    pub runtime: Runtime,
    /// What each component exports and imports, by name (as loaded).
    pub compiled: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// The capabilities each component imports without a grant (each call
    /// is denied), by name; only components that have some (as loaded).
    pub ungranted: BTreeMap<String, Vec<Capability>>,
    /// The verified signer of each signed component, by name (as loaded).
    pub signers: BTreeMap<String, wasmgate_manifest::signing::PublicKey>,
    /// The manifest and components running now: the loaded ones until a
    /// reload replaces them.
    current: std::sync::RwLock<Arc<Current>>,
}

/// The manifest a gateway runs and its components: replaced as a whole by
/// a reload, so a reader never sees one manifest with another's components.
pub struct Current {
    /// The manifest.
    pub manifest: Manifest,
    /// Components by name.
    pub components: BTreeMap<String, Arc<Invocable>>,
    /// The pause switch of every trigger.
    pub pauses: crate::trigger::Pauses,
}

/// Why a deployment could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    /// The manifest itself is wrong.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The engine could not be built.
    #[error("cannot start the WebAssembly engine: {0:#}")]
    Engine(anyhow::Error),
}

impl Deployment {
    /// Loads every component of `manifest` and checks every trigger and grant.
    pub fn load(manifest: Manifest, options: EngineOptions) -> Result<Self, DeploymentError> {
        let cache = Cache::new(Some(manifest.state_dir().join("precompiled")));
        let runtime = Runtime::new(options, cache).map_err(DeploymentError::Engine)?;
        let mut components = BTreeMap::new();
        let mut compiled_info = BTreeMap::new();
        let mut compiled: BTreeMap<String, Compiled> = BTreeMap::new();
        for name in manifest.components.keys() {
            compiled.insert(name.clone(), load_component(&manifest, &runtime, name)?);
        }
        for (key, component, handler) in uses(&manifest) {
            let c = &compiled[component.get_ref()];
            if let Err(message) = c.require_handler(component.get_ref(), handler) {
                return Err(manifest
                    .invalid(component.span(), &format!("{key}.component"), message)
                    .into());
            }
        }
        let mut ungranted = BTreeMap::new();
        let mut signers = BTreeMap::new();
        for (name, c) in compiled {
            if let Some(signer) = c.signer {
                signers.insert(name.clone(), signer);
            }
            let missing = ungranted_imports(&manifest.components[&name], &c);
            if !missing.is_empty() {
                ungranted.insert(name.clone(), missing);
            }
            compiled_info.insert(name.clone(), (c.exports.clone(), c.imports.clone()));
            let invocable = invocable(&manifest, &runtime, &name, c);
            components.insert(name, Arc::new(invocable));
        }
        Ok(Self {
            runtime,
            compiled: compiled_info,
            ungranted,
            signers,
            current: std::sync::RwLock::new(Arc::new(Current {
                pauses: crate::trigger::Pauses::of(&manifest),
                manifest,
                components,
            })),
        })
    }

    /// The manifest and components running now.
    pub fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A running component.
    pub fn component(&self, name: &str) -> Option<Arc<Invocable>> {
        self.current().components.get(name).cloned()
    }

    /// Makes `next` the running manifest and components (a reload).
    pub fn replace(&self, next: Current) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }
}

/// Every trigger's use of a component: the trigger's manifest key, the
/// component, and the handler it calls.
pub fn uses(manifest: &Manifest) -> Vec<(String, &wasmgate_manifest::Spanned<String>, Handler)> {
    let t = &manifest.triggers;
    t.http
        .iter()
        .enumerate()
        .flat_map(|(i, x)| {
            x.components()
                .into_iter()
                .map(move |c| (format!("trigger.http[{i}]"), c, Handler::Http))
        })
        .chain(
            t.mqtt
                .iter()
                .enumerate()
                .map(|(i, x)| (format!("trigger.mqtt[{i}]"), &x.component, Handler::Mqtt)),
        )
        .chain(
            t.timer
                .iter()
                .enumerate()
                .map(|(i, x)| (format!("trigger.timer[{i}]"), &x.component, Handler::Timer)),
        )
        .chain(t.keyvalue.iter().enumerate().map(|(i, x)| {
            (
                format!("trigger.keyvalue[{i}]"),
                &x.component,
                Handler::KeyValue,
            )
        }))
        .collect()
}

/// Checks a new version of component `name`, read from `path`, the way
/// [`load_component`] checks the manifest's: its signature under the
/// manifest's policy, that it compiles, that it exports the handler of
/// every trigger that calls it, and (`strict_imports`) that it imports
/// only what it is granted. The error says what is wrong, without a
/// manifest key (the manifest did not change).
pub fn load_version(
    manifest: &Manifest,
    runtime: &Runtime,
    name: &str,
    path: &std::path::Path,
    bytes: &[u8],
) -> Result<Compiled, String> {
    let config = &manifest.components[name];
    let signer = Policy::of(manifest)
        .check(path, bytes)
        .map_err(|e| e.to_string())?;
    let mut c = runtime
        .compile_bytes(path, bytes)
        .map_err(|e| e.to_string())?;
    c.signer = signer;
    for (key, component, handler) in uses(manifest) {
        if component.get_ref() == name {
            c.require_handler(name, handler)
                .map_err(|e| format!("{key} calls it: {e}"))?;
        }
    }
    if let Some((cap, why)) = refused_import(config, &c) {
        return Err(format!(
            "it imports {} but the manifest does not grant it ({why})",
            cap.interface()
        ));
    }
    Ok(c)
}

/// Compiles one manifest component and checks that it imports only the
/// capabilities the manifest grants it. Errors name the manifest key.
pub fn load_component(
    manifest: &Manifest,
    runtime: &Runtime,
    name: &str,
) -> Result<Compiled, ManifestError> {
    let config = &manifest.components[name];
    let path = manifest.resolve(config.source.get_ref());
    let key = format!("component.{name}.source");
    let invalid = |e: LoadError| {
        let hint = match &e {
            LoadError::Read { .. } if config.build.is_some() => {
                " (run `wasmgate up --build` to build it first)"
            }
            _ => "",
        };
        manifest.invalid(config.source.span(), &key, format!("{e}{hint}"))
    };
    // Read once: the bytes whose signature is checked are the ones compiled.
    let bytes = component::read(&path).map_err(invalid)?;
    let signer = Policy::of(manifest)
        .check(&path, &bytes)
        .map_err(|e| manifest.invalid(config.source.span(), &key, e.to_string()))?;
    if let Some(signer) = &signer {
        tracing::info!(component = name, %signer, "signature verified");
    }
    let mut c = runtime.compile_bytes(&path, &bytes).map_err(invalid)?;
    c.signer = signer;
    if let Some((cap, why)) = refused_import(config, &c) {
        return Err(manifest.invalid(
            config.source.span(),
            &format!("component.{name}"),
            format!(
                "the component imports {} but the manifest does not grant it ({why}): add `allow.{} = [...]` to [component.{name}]",
                cap.interface(),
                cap.allow_key()
            ),
        ));
    }
    Ok(c)
}

/// The first ungranted import that refuses the component, and why: any
/// with `strict_imports = true`; key-value always (its state would be
/// refused on every call).
fn refused_import(config: &ComponentConfig, c: &Compiled) -> Option<(Capability, &'static str)> {
    ungranted_imports(config, c).into_iter().find_map(|cap| {
        if cap == Capability::KeyValue {
            Some((
                cap,
                "a component that keeps state needs its buckets granted",
            ))
        } else if config.strict_imports {
            Some((cap, "strict_imports = true"))
        } else {
            None
        }
    })
}

/// The capabilities `c` imports that its manifest entry does not grant:
/// the component loads (unless `strict_imports`), and each call to one of
/// them is denied.
pub fn ungranted_imports(config: &ComponentConfig, c: &Compiled) -> Vec<Capability> {
    [
        (Capability::MqttPublish, config.allow.grants_mqtt()),
        (
            Capability::OutboundHttp,
            config.allow.outbound_http.is_some(),
        ),
        (Capability::KeyValue, config.allow.keyvalue.is_some()),
    ]
    .into_iter()
    .filter(|(cap, granted)| c.imports_capability(*cap) && !granted)
    .map(|(cap, _)| cap)
    .collect()
}

/// Wraps a manifest component, compiled, for invocation.
pub fn invocable(
    manifest: &Manifest,
    runtime: &Runtime,
    name: &str,
    compiled: Compiled,
) -> Invocable {
    let config = &manifest.components[name];
    let outbound = config
        .allow
        .outbound_http
        .iter()
        .flatten()
        .map(|h| h.get_ref().clone())
        .collect();
    Invocable::new(
        name.to_string(),
        compiled.pre,
        config.limits.get_ref().resolve(),
        config.allow.publish_filters(),
        outbound,
        runtime.engine(),
    )
    .with_response_acl(config.allow.response_filters())
    .with_env(
        config
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
    .with_keyvalue(
        config
            .allow
            .keyvalue
            .iter()
            .flatten()
            .map(|b| b.get_ref().clone())
            .collect(),
    )
    .with_reuse(config.reuse())
    .with_identity(compiled.digest, compiled.signer.map(|s| s.to_string()))
}
