#!/usr/bin/env bash
# The GPU path, checked and timed on one CUDA machine in about 5 minutes: made for the lent H200
# (15 minutes of device time in all, start-up included; 10 minutes a command; 8 files back).
# Each part runs under its own time limit, and a failed part never stops the others:
#   facts      the machine: GPU, driver, torch, CUDA, NCCL
#   default    python3 DDP-script.py as a GPU user runs it (book-124m, bf16), a snapshot, a resume
#   fp16       --amp fp16 with its GradScaler, a snapshot, a resume
#   precision  the bf16 snapshot of "default" resumed with --amp fp16 (the scaler starts fresh)
#   torchrun   DDP-script-torchrun.py under torchrun --standalone, one GPU
#   compile    DDP-script.py --compile
#   benchmark  benchmarks/benchmark.py: gpt2-small, context 1024, bf16 and bf16 + compile (tokens/s,
#              MFU against the measured matmul peak and the datasheet); no one-GPU "scaling"
#   profile    the top kernels of one bf16 + compile step (benchmarks/profile_step.py)
# Writes at most 4 files to $OUT: gpu.log (everything), summary.md (a line a part, then the
# profile), benchmark.json and benchmark.md. Exits 0 only when every part passed.
#
#   bash benchmarks/gpu.sh                      # all parts, into ./gpu-results
#   PARTS="fp16 profile" bash benchmarks/gpu.sh # only these
#   DEVICE=cpu bash benchmarks/gpu.sh           # the rehearsal: tiny sizes on the CPU, no compile
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-gpu-results}"
DEVICE="${DEVICE:-cuda}"
BUDGET="${BUDGET:-330}"  # seconds for all parts; each gets at most its cap and what is left
if [[ "$DEVICE" == cuda ]]; then
  PARTS="${PARTS:-facts default fp16 precision torchrun compile benchmark profile}"
  TINY=() TINY_TORCHRUN=() ALT_AMP=fp16 STEPS=6
  BENCH=(--preset gpt2-small --context 1024 --batch 16 --steps 10 --warmup 3
         --configs bf16 bf16+compile)
  PROFILE=(--preset gpt2-small --context 1024 --batch 16 --compile)
else  # the rehearsal: the same parts and files, sized for a CPU, no compile, bf16 for fp16
  PARTS="${PARTS:-facts default fp16 precision torchrun benchmark profile}"
  TINY_TORCHRUN=(--device cpu --model gpt-nano --context-length 32 --amp off --sample-tokens 5)
  TINY=("${TINY_TORCHRUN[@]}" --nprocs 1)
  ALT_AMP=bf16 STEPS=4
  BENCH=(--quick --configs fp32 bf16)
  PROFILE=(--device cpu --preset gpt-nano --context 32 --batch 2 --amp off --warmup 1)
fi
mkdir -p "$OUT"
LOG="$OUT/gpu.log" SUMMARY="$OUT/summary.md"
: > "$LOG"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 GPT_DDP_CACHE="$WORK/cache" MASTER_ADDR=127.0.0.1
echo "# benchmarks/gpu.sh on $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)" > "$SUMMARY"
echo >> "$SUMMARY"
failed=0

run() {  # run CAP COMMAND...: the command under a time limit (at most what the budget has left)
  local cap=$1 rest=$((BUDGET - SECONDS))
  shift
  ((rest < cap)) && cap=$((rest > 5 ? rest : 5))
  echo "\$ $*" >> "$LOG"
  timeout -k 5 "$cap" "$@" >> "$LOG" 2>&1
}

part() {  # part NAME COMMAND...: one part of the check, a line of the summary
  local name=$1 t0=$SECONDS code
  shift
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "== $name" | tee -a "$LOG"
  "$@"
  code=$?
  if ((code == 0)); then
    echo "- $name: ok ($((SECONDS - t0)) s)" >> "$SUMMARY"
  else
    echo "- $name: FAILED (exit $code$([[ $code == 124 ]] && echo ", timed out"), $((SECONDS - t0)) s; see gpu.log)" >> "$SUMMARY"
    failed=1
  fi
}

facts() {
  if command -v nvidia-smi > /dev/null; then run 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  run 60 "$PY" -c "import torch, torch.distributed as dist
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(),
          'NCCL', '.'.join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else 'none')"
}

last_step() {  # last_step FOLDER: the step of the last line of its metrics.jsonl
  "$PY" -c "import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['step'])" \
    "$1/metrics.jsonl" 2>> "$LOG"
}

snapshot_and_resume() {  # snapshot_and_resume FOLDER FLAGS...: train, then resume to more steps
  local out=$1
  shift
  run 150 "$PY" DDP-script.py "${TINY[@]}" "$@" --max-steps "$STEPS" --save-every 2 --out "$out" &&
    run 90 "$PY" DDP-script.py "${TINY[@]}" "$@" --max-steps $((STEPS + 2)) --out "$out" --resume &&
    [[ "$(last_step "$out")" == $((STEPS + 2)) && -s "$out/model.pt" ]]
}

other_precision() {  # the default run's snapshot, resumed with the other precision
  run 90 "$PY" DDP-script.py "${TINY[@]}" --amp "$ALT_AMP" --max-steps $((STEPS + 4)) \
    --out "$WORK/default" --resume && [[ "$(last_step "$WORK/default")" == $((STEPS + 4)) ]]
}

torchrun_one() {  # torchrun decides the processes: no --nprocs
  run 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 DDP-script-torchrun.py \
    "${TINY_TORCHRUN[@]}" --max-steps "$STEPS" --out "$WORK/torchrun" &&
    [[ -s "$WORK/torchrun/model.pt" ]]
}

compiled() {
  run 200 "$PY" DDP-script.py "${TINY[@]}" --compile --max-steps "$STEPS" --out "$WORK/compile"
}

benchmark() {
  run 240 "$PY" benchmarks/benchmark.py --device "$DEVICE" "${BENCH[@]}" --skip-scaling \
    --skip-baseline --json "$OUT/benchmark.json"
  local code=$?
  if [[ -s "$OUT/benchmark.json" ]]; then  # the JSON is saved after every section
    "$PY" benchmarks/benchmark.py --report-from "$OUT/benchmark.json" > "$OUT/benchmark.md" 2>> "$LOG"
  fi
  return $code
}

profile() {
  run 150 "$PY" benchmarks/profile_step.py "${PROFILE[@]}" --output "$WORK/profile.txt"
}

part facts facts
part default snapshot_and_resume "$WORK/default"
part fp16 snapshot_and_resume "$WORK/fp16" --amp "$ALT_AMP"
part precision other_precision
part torchrun torchrun_one
part compile compiled
part benchmark benchmark
part profile profile
echo "done in ${SECONDS}s: $(grep -c ': ok' "$SUMMARY") part(s) ok, $(grep -c 'FAILED' "$SUMMARY") failed; results in $OUT" | tee -a "$LOG" "$SUMMARY"
if [[ -s "$WORK/profile.txt" ]]; then  # the summary ends with the profile's table
  { echo; echo '```'; cat "$WORK/profile.txt"; echo '```'; } >> "$SUMMARY"
fi
exit "$failed"
