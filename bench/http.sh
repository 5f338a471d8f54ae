#!/usr/bin/env bash
# bench/http.sh — the HTTP hello-world benchmark of BENCHMARKS.md (issue 3).
#
# Run from the repository root:
#
#     bench/http.sh                 # R=3 rounds of D=10 s per server
#     R=1 D=5 bench/http.sh         # a quick check that everything works
#
# What it does
#   1. Builds (release) `wasmgate`, the native baseline `bench/axum-hello`
#      (own workspace, target dir target/bench-axum) and the guests
#      (target/guests/wasm32-wasip2/release/hello_http.wasm is the guest).
#   2. Finds `wasmtime` 48.0.8: $WASMTIME if set, else target/bench-tools/bin,
#      else `wasmtime` on PATH; if none is 48.0.8 it installs it with
#      `cargo install --locked --root target/bench-tools wasmtime-cli@48.0.8`.
#   3. For R rounds, runs each server in turn (each round starts one server
#      later than the round before, so none always runs first), warms
#      it up for WARMUP s, then measures D s with `wrk -t2 -c32 --latency`:
#        wasmgate-fresh   wasmgate, a fresh instance per request (the default)
#        wasmgate-reuse   wasmgate, `reuse = 1000` on the component
#        axum-native      bench/axum-hello (multi-threaded tokio, TCP_NODELAY)
#        wasmtime-serve   `wasmtime serve -S cli=y` (its defaults: pooling)
#        wasmtime-keep    `wasmtime serve -S cli=y` with its keep-resident
#                         pooling options (NOTES-dependencies.md anchors)
#      The four wasm servers run the same hello_http.wasm.
#   4. Per run it records rps, p50, p99 (wrk's latency distribution), server
#      CPU per request (utime+stime of the server process from /proc/PID/stat
#      around the measured window, divided by the requests wrk completed),
#      peak RSS (VmHWM from /proc/PID/status at the end of the run), and the
#      non-2xx responses and socket errors wrk saw (a run with any is flagged).
#   5. Prints a markdown table of the medians across rounds per server, with
#      rps ratios against `wasmtime serve` default and against native axum,
#      and the rps ratio of each round (wasmgate against base, wasmtime serve
#      and axum) computed within that round.
#
# Knobs (environment): R (rounds, 3), D (seconds measured, 10), WARMUP (2),
# THREADS (wrk -t, 2), CONNS (wrk -c, 32), SERVERS (space-separated subset of
# the names above, all by default), WASMTIME (path to a wasmtime 48.0.8),
# REUSE (requests per instance for wasmgate-reuse, 1000), CONCURRENCY
# (wasmgate component concurrency limit, 256: above CONNS, so no request is
# throttled), WASMGATE_LOG (default `info,wasmgate::invocation=warn`: the
# per-request `invocation` info line is off, the `http listening` line stays;
# set WASMGATE_LOG=info to measure with per-request logging),
# SKIP_BUILD=1 (use what is built; WASMGATE=path picks the binary), OUT (results directory, default
# target/bench-results/http-<UTC time>), BASE (path to another `wasmgate`
# binary, e.g. a release build of an earlier commit: adds the servers
# `base-fresh` and `base-reuse`, run like wasmgate-fresh/-reuse with that
# binary, so a change is compared with its baseline in the same rounds).
#
# Output: $OUT/results.tsv (one line per run), $OUT/table.md (the table),
# $OUT/<server>-<round>.wrk (raw wrk output), $OUT/<server>-<round>.log
# (server log). Needs: cargo, wrk, curl, Linux /proc.

set -euo pipefail

R=${R:-3}
D=${D:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
REUSE=${REUSE:-1000}
CONCURRENCY=${CONCURRENCY:-256}
SERVERS=${SERVERS:-"wasmgate-fresh wasmgate-reuse axum-native wasmtime-serve wasmtime-keep"}
WASMTIME_VERSION=48.0.8
KEEP_RESIDENT="pooling-memory-keep-resident=2097152,pooling-table-keep-resident=65536,pooling-async-stack-keep-resident=2097152"
export WASMGATE_LOG=${WASMGATE_LOG:-"info,wasmgate::invocation=warn"}

ROOT=$(pwd)
if [[ ! -f "$ROOT/host/wasmgate/Cargo.toml" || ! -d "$ROOT/bench/axum-hello" ]]; then
    echo "run bench/http.sh from the repository root" >&2
    exit 2
fi
for tool in wrk curl cargo; do
    command -v "$tool" >/dev/null || { echo "bench/http.sh needs $tool" >&2; exit 2; }
done

OUT=${OUT:-"$ROOT/target/bench-results/http-$(date -u +%Y%m%dT%H%M%SZ)"}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wasmgate-bench.XXXXXX")
SERVER_PID=""

cleanup() {
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- build ----
WASMGATE=${WASMGATE:-"$ROOT/target/release/wasmgate"}
AXUM="$ROOT/target/bench-axum/release/axum-hello"
GUEST="$ROOT/target/guests/wasm32-wasip2/release/hello_http.wasm"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building wasmgate (release)"
    cargo build --release -p wasmgate
    log "building the axum baseline (release)"
    cargo build --release --manifest-path bench/axum-hello/Cargo.toml --target-dir target/bench-axum
    log "building the guests (wasm32-wasip2, release)"
    cargo build --release --target wasm32-wasip2 --manifest-path guests/Cargo.toml --target-dir target/guests
fi
for f in "$WASMGATE" "$GUEST"; do
    [[ -f "$f" ]] || { echo "missing $f (run without SKIP_BUILD=1)" >&2; exit 2; }
done
if [[ " $SERVERS " == *" axum-native "* && ! -f "$AXUM" ]]; then
    echo "missing $AXUM (run without SKIP_BUILD=1)" >&2
    exit 2
fi

is_wasmtime_48() { [[ -x "$1" ]] && "$1" --version 2>/dev/null | grep -q "wasmtime $WASMTIME_VERSION"; }

if [[ -n "${WASMTIME:-}" ]]; then
    is_wasmtime_48 "$WASMTIME" || { echo "WASMTIME=$WASMTIME is not wasmtime $WASMTIME_VERSION" >&2; exit 2; }
elif is_wasmtime_48 "$ROOT/target/bench-tools/bin/wasmtime"; then
    WASMTIME="$ROOT/target/bench-tools/bin/wasmtime"
elif command -v wasmtime >/dev/null && is_wasmtime_48 "$(command -v wasmtime)"; then
    WASMTIME=$(command -v wasmtime)
elif [[ " $SERVERS " == *" wasmtime-"* ]]; then
    log "installing wasmtime-cli $WASMTIME_VERSION into target/bench-tools (takes a while)"
    cargo install --locked --root "$ROOT/target/bench-tools" "wasmtime-cli@$WASMTIME_VERSION"
    WASMTIME="$ROOT/target/bench-tools/bin/wasmtime"
fi

# -------------------------------------------------------------- servers ----
write_manifest() { # name reuse
    local dir="$WORK/$1"
    mkdir -p "$dir"
    cat >"$dir/wasmgate.toml" <<EOF
[gateway]
name = "bench"
state_dir = "$WORK/state"

[http]
listen = "127.0.0.1:0"

[component.hello]
source = "$GUEST"
limits = { concurrency = $CONCURRENCY }
reuse = $2

[[trigger.http]]
component = "hello"
priority = 1
path = "/*"
EOF
    echo "$dir/wasmgate.toml"
}

free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo "no free port found" >&2
    exit 1
}

# Starts server $1, logging to $2; sets SERVER_PID and ADDR.
start_server() {
    local name=$1 logfile=$2 port
    ADDR=""
    case $name in
    wasmgate-fresh | wasmgate-reuse | base-fresh | base-reuse)
        local reuse=1 bin=$WASMGATE
        [[ $name == *-reuse ]] && reuse=$REUSE
        if [[ $name == base-* ]]; then
            [[ -x ${BASE:-} ]] || { echo "server $name needs BASE=/path/to/wasmgate" >&2; exit 2; }
            bin=$BASE
        fi
        local manifest
        manifest=$(write_manifest "$name" "$reuse")
        "$bin" --log-format json up -f "$manifest" >"$logfile" 2>&1 &
        SERVER_PID=$!
        for _ in $(seq 600); do
            ADDR=$(sed -nE 's/.*"message":"http listening".*"address":"([^"]+)".*/\1/p' "$logfile" | head -1)
            [[ -n $ADDR ]] && break
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        ;;
    axum-native)
        port=$(free_port)
        "$AXUM" "127.0.0.1:$port" >"$logfile" 2>&1 &
        SERVER_PID=$!
        ADDR="127.0.0.1:$port"
        ;;
    wasmtime-serve | wasmtime-keep)
        port=$(free_port)
        local extra=()
        [[ $name == wasmtime-keep ]] && extra=(-O "$KEEP_RESIDENT")
        "$WASMTIME" serve -S cli=y "${extra[@]}" --addr "127.0.0.1:$port" "$GUEST" >"$logfile" 2>&1 &
        SERVER_PID=$!
        ADDR="127.0.0.1:$port"
        ;;
    *)
        echo "unknown server $name" >&2
        exit 2
        ;;
    esac
    for _ in $(seq 600); do
        if [[ -n $ADDR ]] && curl -sf -o /dev/null "http://$ADDR/"; then
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "server $name did not come up; its log ($logfile):" >&2
    tail -20 "$logfile" >&2
    exit 1
}

stop_server() {
    [[ -n ${SERVER_PID:-} ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# utime + stime of a process, in microseconds.
cpu_us() {
    local stat ticks
    stat=$(cat "/proc/$1/stat")
    stat=${stat##*) } # after the command name, which may hold spaces
    read -r -a f <<<"$stat"
    # fields after ")" start at field 3 (state): utime is 14, stime 15.
    ticks=$((f[11] + f[12]))
    echo $((ticks * 1000000 / $(getconf CLK_TCK)))
}

vm_hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# wrk latency ("812.00us", "1.20ms", "2.01s", "1.5m") → milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# ------------------------------------------------------------------ run ----
{
    echo "# bench/http.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git diff --quiet 2>/dev/null || echo '(dirty)')"
    echo "# $(nproc) cores: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "# R=$R D=$D WARMUP=$WARMUP wrk -t$THREADS -c$CONNS; REUSE=$REUSE CONCURRENCY=$CONCURRENCY"
    echo "# WASMGATE_LOG=$WASMGATE_LOG RUST_BACKTRACE=${RUST_BACKTRACE:-unset}"
    echo "# wasmtime: ${WASMTIME:-none} ($("${WASMTIME:-true}" --version 2>/dev/null || true))"
} | tee "$OUT/header.txt" >&2
printf 'server\tround\trps\tp50_ms\tp99_ms\tcpu_us_per_req\tpeak_rss_kib\trequests\tnon2xx\tsocket_errors\n' >"$OUT/results.tsv"

read -r -a server_list <<<"$SERVERS"
for round in $(seq "$R"); do
    # Each round starts one server later than the one before, so no server
    # always runs first (or right after the same neighbour).
    shift_by=$(((round - 1) % ${#server_list[@]}))
    order=("${server_list[@]:shift_by}" "${server_list[@]:0:shift_by}")
    for server in "${order[@]}"; do
        tag="$server-$round"
        log "round $round/$R: $server"
        start_server "$server" "$OUT/$tag.log"
        url="http://$ADDR/"
        wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" "$url" >"$OUT/$tag.warmup" 2>&1
        cpu0=$(cpu_us "$SERVER_PID")
        wrk -t"$THREADS" -c"$CONNS" -d"${D}s" --latency "$url" >"$OUT/$tag.wrk" 2>&1
        cpu1=$(cpu_us "$SERVER_PID")
        rss=$(vm_hwm_kib "$SERVER_PID")
        stop_server

        w="$OUT/$tag.wrk"
        requests=$(awk '/requests in/ {print $1}' "$w")
        rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$w")
        p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$w")")
        p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$w")")
        non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$w")
        errors=$(awk '/Socket errors:/ {n = 0; for (i = 3; i <= NF; i++) n += $i; print n}' "$w")
        [[ -n $requests && $requests -gt 0 ]] || { echo "wrk completed no requests; see $w" >&2; exit 1; }
        cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$requests" 'BEGIN {printf "%.1f", (b - a) / n}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$round" "$rps" "$p50" "$p99" \
            "$cpu" "$rss" "$requests" "${non2xx:-0}" "${errors:-0}" >>"$OUT/results.tsv"
        log "  $rps rps, p50 ${p50} ms, p99 ${p99} ms, ${cpu} µs CPU/req, peak RSS $((rss / 1024)) MiB, non-2xx ${non2xx:-0}, socket errors ${errors:-0}"
    done
done

# ---------------------------------------------------------------- table ----
awk -F'\t' -v servers="$SERVERS" -v rounds="$R" '
function median(list,    a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
NR > 1 {
    by_round[$1, $2] = $3
    rps[$1] = rps[$1] " " $3; p50[$1] = p50[$1] " " $4; p99[$1] = p99[$1] " " $5
    cpu[$1] = cpu[$1] " " $6; rss[$1] = rss[$1] " " $7; bad[$1] += $9 + $10
}
END {
    n = split(servers, s, " ")
    for (i = 1; i <= n; i++) m[s[i]] = median(rps[s[i]])
    printf "| server | rps | p50 ms | p99 ms | server CPU µs/req | peak RSS MiB | rps vs wasmtime serve | rps vs axum |\n"
    printf "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    for (i = 1; i <= n; i++) {
        k = s[i]
        vw = ("wasmtime-serve" in m && m["wasmtime-serve"] > 0) ? sprintf("%.2f×", m[k] / m["wasmtime-serve"]) : "–"
        va = ("axum-native" in m && m["axum-native"] > 0) ? sprintf("%.2f×", m[k] / m["axum-native"]) : "–"
        flag = bad[k] > 0 ? sprintf(" (%d non-2xx/errors)", bad[k]) : ""
        printf "| %s%s | %.0f | %.3f | %.3f | %.1f | %.1f | %s | %s |\n", k, flag, m[k], median(p50[k]),
            median(p99[k]), median(cpu[k]), median(rss[k]) / 1024, vw, va
    }
    printf "\nMedians of %d round(s); rps of each round:\n", rounds
    for (i = 1; i <= n; i++) printf "- %s:%s\n", s[i], rps[s[i]]
    # Same-round ratios: each divides two runs of one round, never a median
    # by another median, so one slow run shows up as one odd ratio.
    np = split("wasmgate-fresh:base-fresh wasmgate-reuse:base-reuse wasmgate-fresh:wasmtime-serve wasmgate-reuse:wasmtime-serve wasmgate-fresh:axum-native", pairs, " ")
    for (q = 1; q <= np; q++) {
        split(pairs[q], ab, ":")
        line = ""
        for (r = 1; r <= rounds; r++)
            if ((ab[1], r) in by_round && (ab[2], r) in by_round && by_round[ab[2], r] > 0)
                line = line sprintf(" %.2f×", by_round[ab[1], r] / by_round[ab[2], r])
        if (line != "") printf "- rps %s / %s, each round:%s\n", ab[1], ab[2], line
    }
}' "$OUT/results.tsv" >"$OUT/table.md"

echo
cat "$OUT/header.txt"
echo
cat "$OUT/table.md"
echo
echo "raw results: $OUT"
