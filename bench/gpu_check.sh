#!/usr/bin/env bash
# One command for any CUDA machine, from a fresh clone, in at most 6 minutes of steps (60 s CUDA tests,
# 90 s Triton tests, 210 s table; a step that runs out of time fails loudly):
#   1. environment: the active Python when it already holds torch (GPU machines often bring their own
#      and no package index); the project's other dependencies are installed from a wheel folder
#      (pip install --no-index --find-links DIR, filled on a connected machine by bench/prepare_wheels.sh)
#      into a venv that sees that torch (--system-site-packages), only when something is missing;
#   2. the CUDA tests (pytest -m cuda) and the Triton kernel tests, compiled for this GPU;
#   3. ONE table (bench/gpu_table.py): synthesis images/s at 256 and 1024 px, batch 1/8/32, every
#      backend x fp32/fp16/bf16 with peak memory and max deviation from the float32 reference, the
#      `auto` choices, and a 1024 px training step (s/step, GB per sample) with and without checkpointing.
# Usage: bench/gpu_check.sh [--wheels DIR] [--smoke]
#   --wheels DIR  the wheel folder (default: $CLIP2GAN_WHEELS, else ./wheels)
#   --smoke       the table at tiny sizes on the CPU, no CUDA needed (checks this script itself)
#   PYTHON=...    the interpreter to start from (default: python3)
# Exit status: 0 everything passed; 1 a test failed, a row mismatched or a step failed; 2 no CUDA
# device (nothing was checked); 3 the environment could not be set up.
set -u
cd "$(dirname "$0")/.."
WHEELS="${CLIP2GAN_WHEELS:-wheels}"
SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        *) echo "gpu_check: unknown argument '$1' (expected --wheels DIR or --smoke)" >&2; exit 3 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- 1. environment -------------------------------------------------------------------------------
has_torch() { "$1" -c "import torch" 2>/dev/null; }
has_deps() { "$1" -c "import torch, safetensors, open_clip, lpips, typer, numpy, PIL, pytest" 2>/dev/null; }

if ! has_torch "$PYTHON"; then
    if [ -x .venv-gpu/bin/python ] && has_torch .venv-gpu/bin/python; then
        PYTHON=.venv-gpu/bin/python
    elif [ -d "$WHEELS" ]; then
        echo "gpu_check: $PYTHON has no torch: installing everything from $WHEELS into .venv-gpu"
        "$PYTHON" -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q --no-index --find-links "$WHEELS" \
            -e ".[test]" || { echo "gpu_check: installing from $WHEELS failed" >&2; exit 3; }
        PYTHON=.venv-gpu/bin/python
    else
        echo "gpu_check: $PYTHON has no torch and there is no wheel folder '$WHEELS'" \
             "(fill one with bench/prepare_wheels.sh on a connected machine, then pass --wheels DIR)" >&2
        exit 3
    fi
fi
if ! has_deps "$PYTHON"; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check: dependencies missing beside torch and no wheel folder '$WHEELS'" \
             "(bench/prepare_wheels.sh fills one; or pip install -e '.[test]' where an index is reachable)" >&2
        exit 3
    fi
    if [ ! -x .venv-gpu/bin/python ]; then  # sees the machine's torch; installs only what is missing
        "$PYTHON" -m venv --system-site-packages .venv-gpu || { echo "gpu_check: cannot create .venv-gpu" >&2; exit 3; }
    fi
    echo "gpu_check: installing the missing dependencies from $WHEELS (the existing torch is kept)"
    .venv-gpu/bin/python -m pip install -q --no-index --find-links "$WHEELS" -e ".[test]" \
        || { echo "gpu_check: installing from $WHEELS failed" >&2; exit 3; }
    PYTHON=.venv-gpu/bin/python
fi
has_deps "$PYTHON" || { echo "gpu_check: $PYTHON still lacks a dependency" >&2; exit 3; }

if [ "$SMOKE" = "1" ]; then
    exec "$PYTHON" bench/gpu_table.py --smoke
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to PyTorch (torch.cuda.is_available() is False): nothing to check." >&2
    exit 2
fi

# --- 2. CUDA tests, 3. the table --------------------------------------------------------------------
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
STATUS=0
echo "=== CUDA tests"
timeout 60 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/ || STATUS=1
echo "=== Triton kernels compiled for this GPU vs the reference (forward, gradients, fp32/fp16)"
timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py || STATUS=1
echo "=== table"
timeout 210 "$PYTHON" bench/gpu_table.py --device cuda || STATUS=1
echo "gpu_check: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)"
exit $STATUS
