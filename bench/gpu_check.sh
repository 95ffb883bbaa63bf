#!/usr/bin/env bash
# GPU check for the StyleGAN2 ops backends, in under 5 minutes on one CUDA device:
#   1. the CUDA-marked tests (pytest -m cuda), fused vs reference on the GPU;
#   2. bench/generator.py on CUDA: reference vs fused at 256 and 1024, batch 1 and 8,
#      in float32 (TF32 off), float16, and bfloat16 where the GPU supports it;
#   3. one summary at the end.
# Usage: bench/gpu_check.sh            (from anywhere; uses .venv/bin/python when present)
# Exit status: 0 all steps passed, 1 a step failed, 2 no CUDA device (nothing was run).
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to PyTorch (torch.cuda.is_available() is False): nothing to check." >&2
    exit 2
fi

LOG_DIR="$(mktemp -d)"
trap 'rm -rf "$LOG_DIR"' EXIT
STATUS=0
declare -a SUMMARY

step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the log, remember the outcome
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local outcome="ok"
    [ "$rc" -eq 124 ] && outcome="TIMED OUT after ${limit}s"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && outcome="FAILED (exit $rc)"
    [ "$rc" -ne 0 ] && STATUS=1
    SUMMARY+=("$(printf '%-16s %-28s %4ds' "$name" "$outcome" $((SECONDS - started)))")
}

DEVICE_NAME="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)")"
BF16="$("$PYTHON" -c "import torch; print(int(torch.cuda.is_bf16_supported()))")"

step cuda-tests 90 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/
step bench-fp32 120 "$PYTHON" bench/generator.py --device cuda --dtype float32 --reps 10
step bench-fp16 45 "$PYTHON" bench/generator.py --device cuda --dtype float16 --reps 10 --no-memory
if [ "$BF16" = "1" ]; then
    step bench-bf16 45 "$PYTHON" bench/generator.py --device cuda --dtype bfloat16 --reps 10 --no-memory
else
    SUMMARY+=("bench-bf16       skipped: no bfloat16 on this GPU")
fi

echo
echo "================ gpu_check summary ================"
echo "device: $DEVICE_NAME"
for line in "${SUMMARY[@]}"; do echo "$line"; done
echo "--- CUDA tests"
tail -n 1 "$LOG_DIR/cuda-tests.log"
for name in bench-fp32 bench-fp16 bench-bf16; do
    [ -f "$LOG_DIR/$name.log" ] || continue
    echo "--- $name (ms per image, img/s, peak MB; ratio = reference / fused)"
    grep -E '^ +[0-9]+ +[0-9]+ \|' "$LOG_DIR/$name.log" || echo "(no result rows)"
done
echo "overall: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)"
exit $STATUS
