#!/usr/bin/env bash
# fuzz/run.sh — builds the fuzz targets and runs each one (libFuzzer, via
# cargo-fuzz).
#
#     fuzz/run.sh                  # every target for 300 s (issue 14's run)
#     fuzz/run.sh 10               # every target for 10 s (what CI runs)
#     fuzz/run.sh 60 router topic  # some targets
#
# The targets are built without a sanitizer (`--sanitizer none`): the code
# under test is safe Rust, so what fuzzing looks for is a panic, an abort or
# an input that takes too long, and time limits then mean real time.
# cargo-fuzz needs a nightly toolchain: the script
# installs `nightly` (minimal profile) with rustup when it is missing, and
# cargo-fuzz with `cargo install --locked` — explicitly, so it works with
# RUSTUP_AUTO_INSTALL=0 on a fresh machine. Each target's corpus starts from
# seeds in the repository (the golden manifests of tests/ui and the
# examples for `manifest`); a run fails on a crash, a leak, or one input
# taking more than 1 s (-timeout=1), and leaves the input in
# fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-300}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(manifest router topic schedule redirect records)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo +nightly install cargo-fuzz --locked
fi

# Seeds.
mkdir -p fuzz/corpus/manifest fuzz/corpus/records
for f in tests/ui/valid/*.toml tests/ui/invalid/*.toml examples/*/wasmgate.toml; do
    cp "$f" "fuzz/corpus/manifest/$(echo "$f" | tr '/' '_')"
done
cp fuzz/seeds/records/*.json fuzz/corpus/records/

cargo +nightly fuzz build --sanitizer none
marker=$(mktemp)
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${secs}s"
    cargo +nightly fuzz run --sanitizer none "$t" -- -max_total_time="$secs" -timeout=1 -rss_limit_mb=2048 \
        -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written)" || true
    # A failing input of this run (libFuzzer writes it and stops).
    found=$(find "fuzz/artifacts/$t" -maxdepth 1 -type f -newer "$marker" \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'leak-*' -o -name 'oom-*' \) 2>/dev/null || true)
    if [ -n "$found" ]; then
        echo "fuzz: $t found a failing input: $found"
        echo "      reproduce: cargo +nightly fuzz run --sanitizer none $t $found"
        rm -f "$marker"
        exit 1
    fi
done
rm -f "$marker"
echo "fuzz: ${targets[*]}: no crash, no input over 1 s, in ${secs}s each"
