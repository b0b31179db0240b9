#!/usr/bin/env bash
# The GPU suite (issue 13, item 5): every throughput that matters on one GPU, in one run of under
# 8 minutes on an H100/H200 (its sections' time limits add up to 440 s), on a machine without
# network (random-weight backbones, synthetic images and activations). Writes its tables to
# OUT/gpu_suite.md (default results/gpu_suite) and to the terminal; BENCHMARKS.md quotes them.
#
#   bash benchmarks/gpu_suite.sh [OUT]            # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_suite.sh [OUT]    # tiny sizes on the CPU: tests the script itself
#
# Sections: (1) the trainer at the paper's sizes, fp32 and bf16, batches resident on the GPU,
# against the released loop, with achieved TFLOP/s against a bf16 matmul peak measured in the
# same run; (2) the trainer fed by the cache loader on the GPU; (3) the same through
# usae_distributed.train on one GPU (torchrun, nccl); (4) the loader alone; (5) extraction
# images/s for the paper's trio (random weights); (6) the cache-free stream's tokens/s.
# A section that fails or runs past its time limit is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu_suite}
mkdir -p "$out"
report="$out/gpu_suite.md"
smoke=${SMOKE:-0}
if [ "$smoke" = 1 ]; then
    device=cpu
    trainer=(--n 256 --k 8 --tokens 392 --widths 24,48,48 --steps 1 --rounds 1 --quick)
    fed=(--smoke --steps 3 --warmup 1)
    loader=(--rows 20000 --batch-size 392 --batches 4 --trainer-steps 0)
    extraction=(--count 4 --batch-size 2 --repeats 1 --workers 2 --backbones random:vit)
    stream=(--count 4 --batch-size 196 --buffer-images 2 --forward-images 2 --repeats 1
            --backbones random:vit)
    images=4
else
    device=cuda
    trainer=(--steps 5 --rounds 3)
    fed=(--steps 20 --warmup 3)
    loader=(--rows 2000000 --batches 64 --trainer-steps 0)
    extraction=(--count 512 --batch-size 64 --repeats 2 --workers 8
                --backbones random:dinov2,random:siglip,random:vit)
    stream=(--count 512 --batch-size 6272 --buffer-images 256 --forward-images 64 --workers 8
            --repeats 2 --backbones random:dinov2,random:siglip,random:vit)
    images=512
fi

section() {  # section TITLE SECONDS COMMAND...: run it, keep its output in the report
    local title=$1 limit=$2
    shift 2
    printf '\n## %s\n\n`%s`\n\n```\n' "$title" "$*" | tee -a "$report"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e '^USAE:' -e 'it/s]$' | tee -a "$report"
    local status=${PIPESTATUS[0]}
    printf '```\n(%s s, exit %s%s)\n' "$((SECONDS - start))" "$status" \
        "$([ "$status" = 124 ] && echo ': past its time limit')" | tee -a "$report"
}

{
    echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, \
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
} | tee "$report"

# Synthetic photographs for extraction (noise JPEGs: the backbones' cost does not depend on
# content, and the machine has no dataset).
python - "$out/images" "$images" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder, count = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(count):
    if not (folder / f"noise_{i:04d}.jpg").exists():
        pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"noise_{i:04d}.jpg", quality=90)
EOF

section "1. Trainer at the paper's sizes, batches resident" 110 \
    python benchmarks/train_throughput.py --device "$device" "${trainer[@]}"
section "2. Trainer fed by the cache loader" 60 \
    python benchmarks/train_from_loader.py --device "$device" "${fed[@]}"
section "3. The same through usae_distributed.train, one process per GPU (torchrun)" 60 \
    python -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmarks/train_from_loader.py --device "$device" "${fed[@]}"
section "4. The cache loader alone (CPU side, paper widths)" 40 \
    python benchmarks/loader_throughput.py "${loader[@]}"
section "5. Extraction, the paper's trio with random weights" 90 \
    python benchmarks/extraction_throughput.py --images "$out/images" --device "$device" \
    "${extraction[@]}"
section "6. The cache-free token stream, the paper's trio with random weights" 80 \
    python benchmarks/stream_throughput.py --images "$out/images" --device "$device" \
    "${stream[@]}"
echo "Report: $report"
