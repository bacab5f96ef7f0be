#!/usr/bin/env bash
# The one command for a lent GPU (device tool `run`): `bash benchmarks/gpu_check.sh`.
# Runs benchmarks/gpu_check.py with --out "$OUT" (the device tool sets OUT; elsewhere it
# defaults to /tmp/gpu_check) under a hard timeout, and writes gpu_check.json, gpu_check.md
# and gpu_check.log there. The script saves its JSON after every section, so a run the
# timeout kills still leaves its partial results. Extra arguments go to the script
# (e.g. --layers 30 on an H200, --deadline 300).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
# Read-only query of the card as found (clocks, driver); nothing here changes its settings.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv >"$LOG" 2>&1 || echo "nvidia-smi unavailable" >>"$LOG"
# 475 s < 8 minutes: the script stops starting sections at its 420 s deadline, a section takes < 60 s.
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-475}" \
    "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "gpu_check exit status $status; results in $OUT" | tee -a "$LOG"
exit "$status"
