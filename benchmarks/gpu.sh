#!/usr/bin/env bash
# The GPU benchmarks of issue 17, as one prepared script for a lent GPU machine (about 12 minutes on one
# H100/H200; each stage has its own time limit, so a slow stage cannot eat the others' time).
#
#   OUT=/path/for/results bash benchmarks/gpu.sh
#
# Stages and their targets (RESULTS.md records what a run gave, with the device, the command and the date):
#   1. embed: UNI's ViT-L/16 architecture (random weights through the registry's test hook), bf16, batch 256,
#      from stored JPEGs (nvjpeg decoding on the device, the default on a GPU, and workers decoding on the host
#      for comparison) and from the slide; target: end to end >= 90% of model-only.
#   2. MR-PLIP base pretraining step, bf16, MFU against the dense bf16 peak; target: >= 40% MFU.
#   3. 2-rank DDP scaling of the same step (needs 2 GPUs; skipped with a line on one); target: >= 1.8x.
# Needs torch, torchvision, timm and pathvl's dependencies importable (pip install -e . on the machine, or
# PYTHONPATH=src with the dependencies on the path); nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pathvl-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$OUT/gpu.log"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  2>&1 | tee -a "$OUT/gpu.log" || { log "torch with CUDA is not importable: stop"; exit 1; }
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

log "1. embed, ViT-L/16 bf16 (stored JPEGs decoded on the device, and from the slide)"
timeout 300 $PY benchmarks/bench_embed.py --device cuda --encoder uni --slides 4 --parents 24 --model-seconds 8 \
  --sources pixels slide --json "$OUT/embed.json" --work /tmp/pathvl-bench 2>&1 | tee -a "$OUT/gpu.log"
log "1b. embed, stored JPEGs decoded by the workers (host), for comparison"
timeout 180 $PY benchmarks/bench_embed.py --device cuda --encoder uni --slides 4 --parents 24 --model-seconds 8 \
  --sources pixels --jpeg-decode host --no-loader-only --json "$OUT/embed-host.json" --work /tmp/pathvl-bench \
  2>&1 | tee -a "$OUT/gpu.log"

log "2. MR-PLIP base step, bf16, MFU"
PEAK=$($PY -c "
import torch
from pathvl.train.throughput import matmul_peak_flops
print(matmul_peak_flops('cuda', torch.bfloat16) / 1e12)" 2>/dev/null || echo 989.0)
timeout 240 $PY benchmarks/bench_pretrain.py --config mrplip-base --feature-dim 1024 --batch-size 16 --steps 30 \
  --peak-tflops "$PEAK" --json "$OUT/pretrain.json" 2>&1 | tee -a "$OUT/gpu.log"

if [ "$NGPU" -ge 2 ]; then
  log "3. 2-rank DDP"
  timeout 240 $PY benchmarks/bench_pretrain.py --config mrplip-base --feature-dim 1024 --batch-size 16 --steps 30 \
    --nproc 2 --peak-tflops "$PEAK" --json "$OUT/pretrain-ddp.json" 2>&1 | tee -a "$OUT/gpu.log"
else
  log "3. 2-rank DDP skipped: $NGPU GPU(s) on this machine"
fi
log "done; results in $OUT"
