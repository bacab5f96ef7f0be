#!/usr/bin/env bash
# The one command for issue 11 on a lent GPU: `bash benchmarks/gpu_e2e.sh [gpu_e2e.py options]`.
# It installs nothing: vLLM 0.32 must already be in /tmp/site from ../shared/gpu's bundle, whose
# last chunk also installs this working tree. A session's device calls, back to back (the
# machine keeps /tmp only while warm, about 30 s between calls):
#
#   bash ../shared/gpu/build_bundle.sh          # here, once, from the project root: .gpu/c1..c4
#   run(command="bash .gpu/c1/device_install.sh .gpu/c1", carry=[".gpu/c1"], timeout_s=120)
#   run(command="bash .gpu/c2/device_install.sh .gpu/c2", carry=[".gpu/c2"], timeout_s=120)
#   run(command="bash .gpu/c3/device_install.sh .gpu/c3", carry=[".gpu/c3"], timeout_s=120)
#   run(command="bash .gpu/c4/device_install.sh .gpu/c4 && bash benchmarks/gpu_e2e.sh",
#       carry=[".gpu/c4"], timeout_s=600)
#   run(command="GPU_E2E_BUDGET_S=190 bash benchmarks/gpu_e2e.sh --stages a_fp32,a_reference,a_lora,a_image,"
#               "a_pps,a_invariant,a_invariant_eager", timeout_s=230)   # what the first call left: 900 s minus
#                                                                  # about 45 + 600 s before it
#
# With no options it runs every stage in priority order (`python3 benchmarks/gpu_e2e.py --list`)
# under GPU_E2E_BUDGET_S (default 510 s, so the install in the
# same call and the hard kill 30 s later stay under the 600 s a command may run; in a call of
# its own, give it timeout_s - 30); a stage that does not fit is skipped and says so. Results
# come back in $OUT: summary.json and summary.md (rewritten before and after every stage),
# logs/<stage>.log, gpu_e2e.log, bench/d_*.json and d_report's plots. A later session runs
# what is left, e.g. `--stages c_release,c_compile` (c_compile divides by the c_release of the
# same call) or `--stages d_offline_plugin,d_offline_ar,d_report`; benchmark
# runs of several sessions merge with `python benchmarks/compare_report.py */bench/d_*.json`.
#
# Compile cache (untested on the device): vLLM's torch.compile and Triton caches live in
# /tmp/gpu_e2e_cache. GPU_E2E_SAVE_CACHE=1 sends them back as $OUT/compile_cache.tgz.part*
# (15 MiB each); copied into .gpu/cache/ here and carried by a later session to a call that runs
# this script (with .gpu/c4 if both fit the 64 MiB a call carries, else alone with `--stages
# env`), they are restored into /tmp before the stages run, so compiled engines (AR and in-tree
# Gemma 4: torch.compile is about 1 of their 3 minutes of start-up) load instead of compiling.
# Valid only for the same card model, bundle and source tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_e2e_out}
BUDGET=${GPU_E2E_BUDGET_S:-510}
CACHE=/tmp/gpu_e2e_cache
mkdir -p "$OUT" "$CACHE"
export PYTHONPATH="${GPU_SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# No flashinfer in the bundle: vLLM's sampler imports it unguarded unless this is 0.
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_CACHE_ROOT="$CACHE/vllm" TRITON_CACHE_DIR="$CACHE/triton"

if compgen -G ".gpu/cache/compile_cache.tgz.part*" >/dev/null && [ ! -e "$CACHE/.restored" ]; then
    cat .gpu/cache/compile_cache.tgz.part* | tar -xzf - -C "$CACHE" && touch "$CACHE/.restored" \
        && echo "gpu_e2e: compile cache restored ($(du -sh "$CACHE" | cut -f1))"
fi
python3 -c "import vllm, diffusiongemma_vllm" || { echo "gpu_e2e: vLLM or the plugin is not importable: install the bundle first"; exit 3; }
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv \
    >"$OUT/nvidia-smi.csv" 2>&1 || true

timeout --signal=TERM --kill-after=15 $((${BUDGET%.*} + 30)) \
    python3 benchmarks/gpu_e2e.py --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 | tee "$OUT/gpu_e2e.log"
status=${PIPESTATUS[0]}

if [ "${GPU_E2E_SAVE_CACHE:-0}" = 1 ]; then
    tar -czf - -C "$CACHE" vllm triton 2>/dev/null | split -b 15m -d - "$OUT/compile_cache.tgz.part"
    echo "gpu_e2e: compile cache sent back: $(ls "$OUT"/compile_cache.tgz.part* | wc -l) parts"
fi
echo "gpu_e2e exit status $status; results in $OUT"
exit "$status"
