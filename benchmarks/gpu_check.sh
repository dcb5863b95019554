#!/usr/bin/env bash
# One script for a lent GPU (≤ 8 minutes in all: 60 + 120 + 200 + 90 s of time boxes). Run from the repository root:
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
# Parts (each time-boxed with `timeout`; a failing part is recorded and the script goes on):
#   1. environment (nvidia-smi, torch/CUDA versions)
#   2. GPU-marked tests (pytest -m gpu)
#   3. bf16 training steps of each paper preset at 512², B = 16, without CT and with CL / InfoNCE:
#      images/s, time and peak-memory ratios vs the no-CT row (benchmarks/training.py)
#   4. the CT loss benchmark on CUDA (benchmarks/ct_loss.py, when present)
# Everything goes under $OUT; $OUT/summary.md lists each part with its exit status and duration.
set -u
OUT="${OUT:-gpu-check-out}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
{
  echo "# ctseg GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| part | exit | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

part() {  # part NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"
  shift 2
  local log="$OUT/$name.log" t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] && echo "TIMED OUT after ${limit}s" >>"$log"
  echo "| $name | $rc | $dt | $name.log |" >> "$SUMMARY"
  tail -n 30 "$log"
  return 0
}

part env 60 bash -c "nvidia-smi; $PY -c 'import torch, lightning; print(torch.__version__, torch.version.cuda, lightning.__version__, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'"
part pytest-gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout=100 tests
part training-bf16 200 "$PY" benchmarks/training.py --device cuda --precision bf16 --size 512 --batch 16 \
  --steps 5 --warmup 2 --json "$OUT/training-bf16.json"
if [ -f benchmarks/ct_loss.py ]; then
  part ct-loss 90 "$PY" benchmarks/ct_loss.py --device cuda --json "$OUT/ct-loss.json"
else
  echo "| ct-loss | skipped | 0 | benchmarks/ct_loss.py absent |" >> "$SUMMARY"
fi

{
  echo
  echo "## Training throughput (bf16, 512², B = 16)"
  echo
  sed -n '/^Training throughput/,$p' "$OUT/training-bf16.log" 2>/dev/null || echo "(no table: see training-bf16.log)"
} >> "$SUMMARY"
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit 0
