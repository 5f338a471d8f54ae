#!/usr/bin/env bash
# Builds wasmgate for arm64 gateways (aarch64-unknown-linux-gnu: Raspberry Pi
# 4/5, Jetson, industrial gateways with a 64-bit OS) on an x86-64
# Debian/Ubuntu machine, then smoke-tests the arm64 binary under qemu-user:
# --version, check of the quick start, one invoke that succeeds and one that
# runs out of fuel.
#
#     cross/arm64.sh             # the binary: target/aarch64-unknown-linux-gnu/release/wasmgate
#
# Needs Debian's gcc-aarch64-linux-gnu (the linker, and the C compiler for
# SQLite and ring) and qemu-user (for the smoke test only); installed here
# when missing and running as root, else the script says what to install.
# 32-bit ARM is not supported: wasmtime's compiler, Cranelift, has no 32-bit
# ARM backend.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "cross/arm64.sh: install ${missing[*]} (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 2
  fi
fi
if ! rustup target list --installed --toolchain "$toolchain" | grep -qx "$target"; then
  echo "cross/arm64.sh: adding the $target target to toolchain $toolchain" >&2
  rustup target add "$target" --toolchain "$toolchain"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
start=$(date +%s)
cargo build --release --locked --target "$target" -p wasmgate
echo "cross/arm64.sh: built in $(($(date +%s) - start)) s" >&2
bin=target/$target/release/wasmgate
file "$bin" 2>/dev/null || true

# The smoke test: the arm64 binary under qemu-user, with the arm64 C
# library from gcc-aarch64-linux-gnu's sysroot. With the on-demand
# allocator: qemu-user backs the pooling allocator's terabytes of reserved
# address space with its own page tables, tens of GiB (a real arm64 kernel
# does not; one with a 39-bit address space, as some Raspberry Pi kernels
# have, makes `up` fall back to on-demand by itself).
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
run() { qemu-aarch64 "$bin" "$@"; }
guests=target/guests/wasm32-wasip2/release
if [[ ! -f $guests/hostile.wasm || ! -f $guests/echo_mqtt.wasm ]]; then
  rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-wasip2 ||
    rustup target add wasm32-wasip2 --toolchain "$toolchain"
  cargo build --release --target wasm32-wasip2 --manifest-path guests/Cargo.toml --target-dir target/guests
fi
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export WASMGATE_CACHE_DIR=$cache

run --version
start=$(date +%s)
run check --allocator on-demand -f examples/quickstart/wasmgate.toml >/dev/null
echo "cross/arm64.sh: check of the quick start ok ($(($(date +%s) - start)) s under qemu, compiling its guests)" >&2
out=$(run invoke --allocator on-demand "$guests/hostile.wasm" --mqtt-topic ok)
grep -q '"status": *"ok"' <<<"$out" || { echo "cross/arm64.sh: invoke ok failed: $out" >&2; exit 1; }
echo "cross/arm64.sh: invoke (ok) ok" >&2
set +e
out=$(run invoke --allocator on-demand "$guests/hostile.wasm" --mqtt-topic loop --fuel 50000000)
code=$?
set -e
if [[ $code != 1 ]] || ! grep -q '"status": *"fuel_exhausted"' <<<"$out"; then
  echo "cross/arm64.sh: invoke (loop) should run out of fuel and exit 1; exit $code: $out" >&2
  exit 1
fi
echo "cross/arm64.sh: invoke (loop) ran out of fuel, exit 1, as it must" >&2
echo "cross/arm64.sh: arm64 smoke test passed" >&2
