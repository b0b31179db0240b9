#!/usr/bin/env bash
# Regenerate every figure of the paper: runs each notebook in notebooks/ with papermill, in order.
# The options are the fields of usae_pipeline.Experiment: see `bash run_all.sh --help` and
# usae_cli.py. Relative paths in them are relative to where this is called from.
exec python "$(dirname "$0")/usae_cli.py" "$@"
