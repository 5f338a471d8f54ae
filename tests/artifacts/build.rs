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
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().expect("repository root");
    let guests = root.join("guests");
    let target_dir = root.join("target/guests");

    println!("cargo:rerun-if-changed={}", root.join("wit").display());
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

fn check_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("running rustc --print sysroot");
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let lib = Path::new(&sysroot).join("lib/rustlib/wasm32-wasip2");
    if !lib.exists() {
        panic!(
            "\n\nThe wasm32-wasip2 target is not installed, so the test guests cannot be built.\n\
             Install it with:\n\n    rustup target add wasm32-wasip2\n\n"
        );
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
