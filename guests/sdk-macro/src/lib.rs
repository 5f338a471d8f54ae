//! The `bindings!` macro behind `wasmgate-guest`.
//!
//! `wit_bindgen::generate!` needs the WIT directory as a string literal. This
//! macro supplies the absolute path of the repository's `wit/` directory, so a
//! guest does not repeat a relative path that breaks when it moves.

use proc_macro::TokenStream;
use std::path::PathBuf;

/// The worlds of `wasmgate:edge` a guest can target.
const WORLDS: &[&str] = &[
    "mqtt-app",
    "timer-app",
    "kv-stream-app",
    "http-app",
    "event-app",
    "edge-app",
];

/// Generates the bindings of one `wasmgate:edge` world in the calling crate.
///
/// See the `wasmgate-guest` crate documentation.
#[proc_macro]
pub fn bindings(input: TokenStream) -> TokenStream {
    let text = input.to_string();
    let world = text.trim().trim_matches('"');
    if !text.trim().starts_with('"') || !WORLDS.contains(&world) {
        let msg = format!(
            "wasmgate_guest::bindings! takes one world name as a string literal, one of {WORLDS:?}; got `{text}`"
        );
        return format!("::core::compile_error!({msg:?});").parse().unwrap();
    }
    let wit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    let wit = wit.canonicalize().unwrap_or(wit);
    let wit = wit.to_string_lossy();
    format!(
        r#"::wasmgate_guest::__wit_bindgen::generate!({{
            world: "wasmgate:edge/{world}",
            path: {wit:?},
            runtime_path: "::wasmgate_guest::__wit_bindgen::rt",
            generate_all,
        }});"#
    )
    .parse()
    .unwrap()
}
