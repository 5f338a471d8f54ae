#!/bin/sh
# Builds app.wasm from app.js with ComponentizeJS (StarlingMonkey), at the
# version package-lock.json pins, against the world %%world%% of the WIT in
# wit/. The first run installs it with `npm ci` into node_modules/ (about
# 400 MB, 20 s); a build with nothing changed is skipped.
#
# It calls componentize-js (the library behind `jco componentize`) itself:
# `jco componentize` 1.35.0 reads the WIT through a WASI shim that has no
# preopened directory, and fails with "failed to get path metadata".
set -eu
cd "$(dirname "$0")"
command -v npm >/dev/null 2>&1 || {
    echo "build.sh: npm is not installed; this guest needs Node.js 20 or newer with npm" >&2
    exit 1
}
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "build.sh: installing ComponentizeJS (npm ci)" >&2
    npm ci --no-audit --no-fund --loglevel=error
fi
if [ -f app.wasm ] && [ -z "$(find app.js wit package-lock.json -newer app.wasm | head -n 1)" ]; then
    echo "build.sh: app.wasm is up to date" >&2
    exit 0
fi
npx --no-install componentize-js app.js --wit wit --world-name %%world%% -o app.wasm.tmp
mv app.wasm.tmp app.wasm
