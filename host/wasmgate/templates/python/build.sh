#!/bin/sh
# Builds app.wasm from app.py with componentize-py, at the version
# requirements.txt pins, against the world %%world%% of the WIT
# in wit/. The first run installs componentize-py into .venv/ (a virtual
# environment of python3, 3.10 or newer; about 70 MB); a build with nothing
# changed is skipped.
set -eu
cd "$(dirname "$0")"
command -v python3 >/dev/null 2>&1 || {
    echo "build.sh: python3 is not installed; this guest needs Python 3.10 or newer with venv and pip" >&2
    exit 1
}
if [ ! -x .venv/bin/componentize-py ] || ! cmp -s requirements.txt .venv/requirements.txt; then
    echo "build.sh: installing componentize-py into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/requirements.txt
fi
if [ -f app.wasm ] && [ -z "$(find app.py requirements.txt wit -newer app.wasm | head -n 1)" ]; then
    echo "build.sh: app.wasm is up to date" >&2
    exit 0
fi
.venv/bin/componentize-py -d wit -w %%world%% componentize app -o app.wasm.tmp
mv app.wasm.tmp app.wasm
