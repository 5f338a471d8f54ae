//! `wasmgate new KIND NAME`: writes a guest project that builds, runs on a
//! sample event and runs under `up` as it is — the handler's source, its
//! build, a manifest, a sample event, a README and a CI workflow — from
//! templates embedded in the binary (no network needed to write it).
//!
//! A Rust project uses plain `wit-bindgen` on the WIT written into its
//! `wasmgate-wit/` (the same files as `wasmgate wit`), so it depends on nothing but
//! crates.io: no path into this repository, and the bindings match the WIT
//! of the binary that wrote them.

use crate::cli::Fatal;
use clap::ValueEnum;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What triggers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// An HTTP handler (`wasi:http`): a JSON echo with status codes.
    Http,
    /// An MQTT handler: a thermostat that parses a reading and publishes a command.
    Mqtt,
    /// A timer handler: a heartbeat published over MQTT.
    Timer,
}

/// The guest's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust, built by cargo for wasm32-wasip2 with wit-bindgen.
    Rust,
    /// Python, built by componentize-py (pinned, installed into .venv by the build).
    Python,
    /// JavaScript, built by ComponentizeJS (pinned, installed by npm ci in the build).
    Js,
}

impl Kind {
    fn flag(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Mqtt => "mqtt",
            Kind::Timer => "timer",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Http => "A JSON echo over HTTP",
            Kind::Mqtt => "An MQTT thermostat",
            Kind::Timer => "A heartbeat on a timer",
        }
    }

    /// What `invoke` prints beyond the common fields.
    fn invoke_notes(self) -> &'static str {
        match self {
            Kind::Http => " and the response (status, headers, body)",
            Kind::Mqtt | Kind::Timer => " and the messages it published",
        }
    }

    /// The manifest, the sample event and the README's "while `up` runs".
    fn files(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Http => (
                include_str!("../templates/kinds/http.toml"),
                include_str!("../templates/kinds/http.json"),
                include_str!("../templates/kinds/http.md"),
            ),
            Kind::Mqtt => (
                include_str!("../templates/kinds/mqtt.toml"),
                include_str!("../templates/kinds/mqtt.json"),
                include_str!("../templates/kinds/mqtt.md"),
            ),
            Kind::Timer => (
                include_str!("../templates/kinds/timer.toml"),
                include_str!("../templates/kinds/timer.json"),
                include_str!("../templates/kinds/timer.md"),
            ),
        }
    }
}

impl Lang {
    fn flag(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// The JavaScript HTTP guest's WIT: WASI 0.2.10, the version
/// ComponentizeJS's engine exports `wasi:http` at (the example of the same
/// kind carries the same files).
const JS_HTTP_WIT: &[(&str, &str)] = &[
    ("world.wit", include_str!("../templates/js/http-world.wit")),
    (
        "deps/cli/package.wit",
        include_str!("../../../examples/js-http/wit/deps/cli/package.wit"),
    ),
    (
        "deps/clocks/package.wit",
        include_str!("../../../examples/js-http/wit/deps/clocks/package.wit"),
    ),
    (
        "deps/filesystem/package.wit",
        include_str!("../../../examples/js-http/wit/deps/filesystem/package.wit"),
    ),
    (
        "deps/http/package.wit",
        include_str!("../../../examples/js-http/wit/deps/http/package.wit"),
    ),
    (
        "deps/io/package.wit",
        include_str!("../../../examples/js-http/wit/deps/io/package.wit"),
    ),
    (
        "deps/random/package.wit",
        include_str!("../../../examples/js-http/wit/deps/random/package.wit"),
    ),
    (
        "deps/sockets/package.wit",
        include_str!("../../../examples/js-http/wit/deps/sockets/package.wit"),
    ),
];

/// One file to write: its path in the project, its text, and whether it is
/// a script to run.
struct File {
    path: String,
    text: String,
    executable: bool,
}

/// The language's side of a project: its files and the values the shared
/// templates are filled with.
struct LangParts {
    files: Vec<(String, &'static str, bool)>,
    build: &'static str,
    build_notes: &'static str,
    source: String,
    limits: &'static str,
    world: String,
    files_md: &'static str,
    setup: &'static str,
}

fn lang_parts(lang: Lang, kind: Kind, name: &str) -> LangParts {
    let world = format!("wasmgate:edge/{}-app", kind.flag());
    match lang {
        Lang::Rust => rust(kind, name, world),
        Lang::Python => python(kind, world),
        Lang::Js => js(kind, world),
    }
}

fn rust(kind: Kind, name: &str, world: String) -> LangParts {
    LangParts {
        files: vec![
            (
                "Cargo.toml".into(),
                include_str!("../templates/rust/Cargo.toml"),
                false,
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/rust/gitignore"),
                false,
            ),
            (
                "src/lib.rs".into(),
                match kind {
                    Kind::Http => include_str!("../templates/rust/http.rs"),
                    Kind::Mqtt => include_str!("../templates/rust/mqtt.rs"),
                    Kind::Timer => include_str!("../templates/rust/timer.rs"),
                },
                false,
            ),
        ],
        build: "cargo build --release --target wasm32-wasip2",
        build_notes: "The component is `target/wasm32-wasip2/release/%%crate%%.wasm`.\n   \
            The target needs `rustup target add wasm32-wasip2` once; `wasmgate up\n   \
            --build` runs this build and adds the target when it is missing.",
        source: format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        limits: r#"{ fuel = 50_000_000, memory = "16MiB", timeout = "2s", concurrency = 16 }"#,
        world,
        files_md: include_str!("../templates/rust/files.md"),
        setup: include_str!("../templates/rust/setup.yml"),
    }
}

fn python(kind: Kind, world: String) -> LangParts {
    LangParts {
        files: vec![
            (
                "app.py".into(),
                match kind {
                    Kind::Http => include_str!("../templates/python/http.py"),
                    Kind::Mqtt => include_str!("../templates/python/mqtt.py"),
                    Kind::Timer => include_str!("../templates/python/timer.py"),
                },
                false,
            ),
            (
                "build.sh".into(),
                include_str!("../templates/python/build.sh"),
                true,
            ),
            (
                "requirements.txt".into(),
                include_str!("../templates/python/requirements.txt"),
                false,
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/python/gitignore"),
                false,
            ),
        ],
        build: "./build.sh",
        build_notes: "`build.sh` makes `app.wasm` with componentize-py; its first run\n   \
            installs the pinned version into `.venv/` (python3 3.10 or newer with\n   \
            venv; PyPI is reached once). The component carries the Python runtime\n   \
            (18 MB): its first load compiles it for seconds, later ones load it\n   \
            precompiled (`.wasmgate/precompiled/`).",
        source: "app.wasm".into(),
        // The runtime's memory image is about 13 MB; an invocation costs
        // about 0.4 million fuel (`invoke` prints both).
        limits: r#"{ fuel = 20_000_000, memory = "32MiB", timeout = "2s", concurrency = 4 }"#,
        world,
        files_md: include_str!("../templates/python/files.md"),
        setup: include_str!("../templates/python/setup.yml"),
    }
}

fn js(kind: Kind, world: String) -> LangParts {
    LangParts {
        files: vec![
            (
                "app.js".into(),
                match kind {
                    Kind::Http => include_str!("../templates/js/http.js"),
                    Kind::Mqtt => include_str!("../templates/js/mqtt.js"),
                    Kind::Timer => include_str!("../templates/js/timer.js"),
                },
                false,
            ),
            (
                "build.sh".into(),
                include_str!("../templates/js/build.sh"),
                true,
            ),
            (
                "package.json".into(),
                include_str!("../templates/js/package.json"),
                false,
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/js/gitignore"),
                false,
            ),
        ],
        build: "./build.sh",
        build_notes: "`build.sh` makes `app.wasm` with ComponentizeJS; its first run\n   \
            installs the pinned version with `npm ci` (Node.js 20 or newer; the npm\n   \
            registry is reached once). The component carries the JavaScript engine\n   \
            (12 MB): its first load compiles it for seconds, later ones load it\n   \
            precompiled (`.wasmgate/precompiled/`).",
        source: "app.wasm".into(),
        limits: r#"{ fuel = 50_000_000, memory = "32MiB", timeout = "2s", concurrency = 16 }"#,
        world: if kind == Kind::Http {
            "app".into()
        } else {
            world
        },
        files_md: include_str!("../templates/js/files.md"),
        setup: include_str!("../templates/js/setup.yml"),
    }
}

/// What the component may do beyond its kind's grants (none but for the
/// JavaScript HTTP guest's note).
fn grants(lang: Lang, kind: Kind) -> &'static str {
    match (lang, kind) {
        (Lang::Js, Kind::Http) => {
            "# ComponentizeJS links wasi:http/outgoing-handler into every component: with\n\
             # no allow.outbound_http grant, `check` notes the import and a fetch() fails.\n"
        }
        _ => "",
    }
}

/// Where a project's WIT goes: `wit/`, the convention of the bindings
/// generators, except in a Rust project, where `cargo component build`
/// would read a `wit/` itself (and cargo-component 0.21.1's WIT parser
/// fails on WASI 0.2.12's unstable gates: "interface not found in package").
fn wit_dir(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "wasmgate-wit",
        Lang::Python | Lang::Js => "wit",
    }
}

/// What the README says of the project's WIT.
fn wit_note(lang: Lang, kind: Kind) -> &'static str {
    if (lang, kind) == (Lang::Js, Kind::Http) {
        "the WIT the component is built against: `wasi:http/proxy` of\n  \
         WASI 0.2.10, the version ComponentizeJS's engine implements (not what\n  \
         `wasmgate wit` writes; wasmgate serves WASI 0.2.0 to 0.2.12 alike)."
    } else {
        "the WIT the component is built against (`wasmgate wit --dir\n  \
         %%wit%% --force` writes the one a newer wasmgate serves)."
    }
}

/// Every file of the project `wasmgate new KIND NAME --lang LANG` writes.
fn project(kind: Kind, lang: Lang, name: &str) -> Vec<File> {
    let parts = lang_parts(lang, kind, name);
    let (manifest, event, try_md) = kind.files();
    // Composite values first: they hold placeholders of their own.
    let vars: Vec<(&str, String)> = vec![
        ("try", try_md.trim_end().to_string()),
        ("files", parts.files_md.to_string()),
        ("setup", parts.setup.to_string()),
        ("grants", grants(lang, kind).to_string()),
        ("build_notes", parts.build_notes.to_string()),
        ("invoke_notes", kind.invoke_notes().to_string()),
        ("what", kind.what().to_string()),
        ("kind", kind.flag().to_string()),
        ("lang_flag", lang.flag().to_string()),
        ("lang", lang.name().to_string()),
        ("build", parts.build.to_string()),
        ("source", parts.source.clone()),
        ("limits", parts.limits.to_string()),
        ("world", parts.world.clone()),
        ("crate", name.replace('-', "_")),
        ("wit_note", wit_note(lang, kind).to_string()),
        ("wit", wit_dir(lang).to_string()),
        ("name", name.to_string()),
    ];
    let fill = |text: &str| {
        let mut text = text.to_string();
        for (key, value) in &vars {
            text = text.replace(&format!("%%{key}%%"), value);
        }
        text
    };
    let mut files: Vec<File> = parts
        .files
        .iter()
        .map(|(path, text, executable)| File {
            path: path.clone(),
            text: fill(text),
            executable: *executable,
        })
        .collect();
    let shared = [
        ("wasmgate.toml", manifest),
        ("README.md", include_str!("../templates/README.md")),
        (
            ".github/workflows/wasmgate.yml",
            include_str!("../templates/workflow.yml"),
        ),
    ];
    for (path, text) in shared {
        files.push(File {
            path: path.into(),
            text: fill(text),
            executable: false,
        });
    }
    files.push(File {
        path: format!("events/{}.json", kind.flag()),
        text: event.to_string(),
        executable: false,
    });
    if lang == Lang::Js {
        // The pinned dependency tree of the example, under this project's name.
        files.push(File {
            path: "package-lock.json".into(),
            text: include_str!("../../../examples/js-http/package-lock.json")
                .replace("\"wasmgate-example-js-http\"", &format!("{name:?}")),
            executable: false,
        });
    }
    let wit: &[(&str, &str)] = if (lang, kind) == (Lang::Js, Kind::Http) {
        JS_HTTP_WIT
    } else {
        crate::wit::FILES
    };
    files.extend(wit.iter().map(|(path, text)| File {
        path: format!("{}/{path}", wit_dir(lang)),
        text: (*text).to_string(),
        executable: false,
    }));
    files
}

/// Names cargo refuses for a package.
const RUST_RESERVED: &[&str] = &[
    "alloc",
    "as",
    "async",
    "await",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
    "yield",
];

/// Writes the project into `dir` (default `./NAME`), which must be new or
/// empty, and says what to run next.
pub fn new(kind: Kind, lang: Lang, name: &str, dir: Option<&Path>) -> Result<ExitCode, Fatal> {
    wasmgate_manifest::validate_component_name(name).map_err(Fatal)?;
    if lang == Lang::Rust && RUST_RESERVED.contains(&name.replace('-', "_").as_str()) {
        return Err(Fatal(format!(
            "{name:?} cannot name a Rust crate (a keyword or a standard crate): choose another name"
        )));
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    match std::fs::read_dir(&dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => {
            return Err(Fatal(format!(
                "{} exists and is not empty: wasmgate new writes into a new or empty directory (--dir chooses another)",
                dir.display()
            )));
        }
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Fatal(format!("cannot read {}: {e}", dir.display()))),
    }
    let files = project(kind, lang, name);
    for file in &files {
        write(&dir.join(&file.path), file)?;
    }
    let parts = lang_parts(lang, kind, name);
    println!(
        "wrote {} files into {}: {} ({}, component {name}). Next:\n\n    cd {}\n    {}\n    wasmgate invoke {name} --event events/{}.json\n    wasmgate up\n",
        files.len(),
        dir.display(),
        kind.what(),
        lang.name(),
        dir.display(),
        parts.build,
        kind.flag()
    );
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, file: &File) -> Result<(), Fatal> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Fatal(format!("cannot create {}: {e}", parent.display())))?;
    }
    std::fs::write(path, &file.text)
        .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))?;
    if file.executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Fatal(format!("cannot make {} executable: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Kind; 3] = [Kind::Http, Kind::Mqtt, Kind::Timer];
    const LANGS: [Lang; 3] = [Lang::Rust, Lang::Python, Lang::Js];

    /// Every placeholder of every template is filled, and every manifest
    /// parses and names the component.
    #[test]
    fn every_template_is_filled_and_its_manifest_parses() {
        for kind in KINDS {
            for lang in LANGS {
                let files = project(kind, lang, "my-guest");
                for file in &files {
                    assert!(
                        !file.text.contains("%%"),
                        "{kind:?}/{lang:?} {}: a placeholder is left:\n{}",
                        file.path,
                        file.text
                    );
                }
                let manifest = files.iter().find(|f| f.path == "wasmgate.toml").unwrap();
                let parsed = wasmgate_manifest::Manifest::parse(
                    Path::new("/tmp/my-guest/wasmgate.toml"),
                    manifest.text.clone(),
                )
                .unwrap_or_else(|e| panic!("{kind:?}/{lang:?}: {e}\n{}", manifest.text));
                assert!(
                    parsed.components.contains_key("my-guest"),
                    "{kind:?}/{lang:?}"
                );
                let event = files
                    .iter()
                    .find(|f| f.path.starts_with("events/"))
                    .unwrap();
                serde_json::from_str::<wasmgate_store::deadletter::StoredEvent>(&event.text)
                    .unwrap_or_else(|e| panic!("{}: {e}", event.path));
            }
        }
    }

    #[test]
    fn a_rust_keyword_is_refused_as_a_rust_guest_name() {
        let dir = std::env::temp_dir().join("wasmgate-new-keyword-test");
        let err = new(Kind::Mqtt, Lang::Rust, "test", Some(&dir)).unwrap_err();
        assert!(err.0.contains("cannot name a Rust crate"), "{}", err.0);
        assert!(!dir.exists());
    }
}
