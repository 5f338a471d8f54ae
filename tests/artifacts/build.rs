//! Builds every guest in `guests/` once, for wasm32-wasip2, and writes the
//! path of each component into `$OUT_DIR/guests.rs` as a constant.
//!
//! The guests have their own workspace and target directory
//! (`target/guests` at the repository root), so this nested cargo never waits
//! on the lock of the cargo that runs this script.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &[
    "hello-http",
    "echo-mqtt",
    "tick-timer",
    "hostile",
    "counter",
    "fetch-http",
    "wasi-hello",
    "http-probe",
    "publish-timer",
    "kv-http",
    "kv2-http",
    "dedup-mqtt",
    "kv-audit",
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().expect("repository root");
    let guests = root.join("guests");
    let target_dir = root.join("target/guests");

    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("host/runtime/wit").display()
    );
    rerun_if_changed(&guests);

    check_wasm_target();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--workspace",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("running cargo to build the guests");
    assert!(
        status.success(),
        "building the guests failed (see the output above)"
    );

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut code = String::new();
    for guest in GUESTS {
        let file = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", guest.replace('-', "_")));
        assert!(
            file.exists(),
            "guest {guest} was built but {} is missing",
            file.display()
        );
        let konst = guest.replace('-', "_").to_uppercase();
        code.push_str(&format!(
            "/// The `{guest}` guest component.\npub const {konst}: &str = {:?};\n",
            file.display().to_string()
        ));
    }
    std::fs::write(out.join("guests.rs"), code).unwrap();
}

/// Makes sure the toolchain building the guests has the wasm32-wasip2
/// target: `rust-toolchain.toml`'s `targets` is only honoured when rustup
/// installs the toolchain itself, so a toolchain installed earlier (or with
/// `RUSTUP_AUTO_INSTALL=0`) may lack it. Installs it with rustup, for the
/// toolchain in use, saying so in one line; without rustup, says exactly what
/// to install.
fn check_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("running rustc --print sysroot");
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let lib = Path::new(&sysroot).join("lib/rustlib/wasm32-wasip2");
    if lib.exists() {
        return;
    }
    // The toolchain in use: rustup's proxies say which; else the sysroot's
    // directory is named after it.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| {
        Path::new(&sysroot)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    println!(
        "cargo:warning=the wasm32-wasip2 target is missing for toolchain {toolchain}; installing it with `rustup target add wasm32-wasip2 --toolchain {toolchain}`"
    );
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2", "--toolchain", &toolchain])
        .status();
    match status {
        Ok(s) if s.success() && lib.exists() => {}
        Ok(s) => panic!(
            "\n\n`rustup target add wasm32-wasip2 --toolchain {toolchain}` failed ({s}), so the test guests cannot be built.\n"
        ),
        Err(e) => panic!(
            "\n\nThe wasm32-wasip2 target is not installed and rustup cannot be run ({e}).\n\
             Install the target for this Rust toolchain ({sysroot}): with rustup,\n\n    rustup target add wasm32-wasip2\n\n\
             or, without rustup, your distribution's rust-std package for wasm32-wasip2.\n\n"
        ),
    }
}

fn rerun_if_changed(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        if path.is_dir() {
            rerun_if_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
