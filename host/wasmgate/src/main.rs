//! The `wasmgate` binary: see `wasmgate --help` and the library's `cli` module.

fn main() -> std::process::ExitCode {
    wasmgate::cli::main()
}
