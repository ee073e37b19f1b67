#!/usr/bin/env bash
# Check and time the GPU path on a CUDA machine (made for one H100/H200 and 16 cores), in under
# 5 minutes all told:
#   1. what the machine is (GPUs, torch, CUDA);
#   2. benchmarks/benchmark.py: gpt2-small, context 1024, batch 16: fp32 (TF32, as the scripts),
#      bf16, bf16 + torch.compile, DDP scaling over the visible GPUs, the book baseline; it gets
#      all the budget but the last RESERVE seconds, and if it is cut short, the sections it
#      finished are still reported;
#   3. DDP-script.py trains for 20 steps on the GPU, eager and with --compile (exit code 0).
# Results go to ${OUT:-gpu-results}: benchmark-gpu.json and .md, and a log of each step.
#
#   bash benchmarks/gpu.sh                  # BATCH=8 bash benchmarks/gpu.sh on a smaller GPU
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu-results}"
BATCH="${BATCH:-16}"
BUDGET="${BUDGET:-290}"  # seconds for the whole script; each step gets at most what is left
RESERVE="${RESERVE:-120}"  # of which the two training checks after the benchmark keep this much
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 GPT_DDP_CACHE="$WORK/cache" MASTER_ADDR=127.0.0.1
failed=0

left() {  # seconds left of the budget, but at most $1
  local rest=$((BUDGET - SECONDS))
  if ((rest > $1)); then echo "$1"; else echo $((rest > 1 ? rest : 1)); fi
}

step() {  # step NAME CAP COMMAND...: run with a timeout, log to $OUT/NAME.log, note a failure
  local name=$1 cap=$2
  shift 2
  echo "== $name (timeout $(left "$cap")s)"
  if timeout -k 10 "$(left "$cap")" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED (exit ${PIPESTATUS[0]})"
    failed=1
  fi
}

step gpus 30 nvidia-smi -L
step versions 60 python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
  'GPUs', torch.cuda.device_count(), torch.cuda.get_device_name())"

bench_cap=$((BUDGET - RESERVE - SECONDS))
step benchmark $((bench_cap > 30 ? bench_cap : 30)) python benchmarks/benchmark.py --device cuda \
  --preset gpt2-small --context 1024 --batch "$BATCH" --steps 10 --warmup 3 \
  --configs fp32 bf16 bf16+compile --scaling-intervals 5 --scaling-repeats 1 --rounds 3 \
  --json "$OUT/benchmark-gpu.json"
if [[ -s "$OUT/benchmark-gpu.json" ]]; then  # the JSON is saved after every section
  python benchmarks/benchmark.py --report-from "$OUT/benchmark-gpu.json" > "$OUT/benchmark-gpu.md"
fi

step train-eager 50 python DDP-script.py --model gpt-nano --max-steps 20 --out "$WORK/eager"
step train-compile 70 python DDP-script.py --model gpt-nano --max-steps 20 --compile \
  --out "$WORK/compile"
cp "$WORK/eager/metrics.jsonl" "$OUT/train-eager-metrics.jsonl" 2>/dev/null || true
cp "$WORK/compile/metrics.jsonl" "$OUT/train-compile-metrics.jsonl" 2>/dev/null || true

echo "done in ${SECONDS}s; results in $OUT"
exit "$failed"
