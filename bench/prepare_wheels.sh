#!/usr/bin/env bash
# Fill a wheel folder for bench/gpu_check.sh on a GPU machine without a package index. Run it on a
# connected machine; copy the folder over with the clone.
# Usage: bench/prepare_wheels.sh DIR [PYTHON_VERSION] [PLATFORM] [--with-torch]
#   DIR             the folder to fill (created)
#   PYTHON_VERSION  the GPU machine's Python, e.g. 3.10 or 3.12 (default: this machine's)
#   PLATFORM        pip's platform tag (default manylinux_2_28_x86_64, which pip widens to every older
#                   manylinux tag; aarch64 GPU hosts: manylinux_2_28_aarch64)
#   --with-torch    also the CUDA torch/torchvision wheels (large: only for machines without a torch of their own)
# With an explicit version or platform pip can only take binary wheels (--only-binary=:all:);
# every dependency of clip2gan has one. pip resolves open_clip/timm/lpips through torch, so it fetches
# the torch wheels too (several GB) and, without --with-torch, they are deleted at the end.
set -eu
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/prepare_wheels.sh DIR [PYTHON_VERSION] [PLATFORM] [--with-torch]" >&2; exit 2; }
DIR="$1"; shift
PYVER=""; PLATFORM="manylinux_2_28_x86_64"; WITH_TORCH=0
for arg in "$@"; do
    case "$arg" in
        --with-torch) WITH_TORCH=1 ;;
        [0-9].*) PYVER="$arg" ;;
        *) PLATFORM="$arg" ;;
    esac
done
PYTHON="${PYTHON:-python3}"
PYVER="${PYVER:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$DIR"

# The project's requirements (with the test extras), read from pyproject.toml; torch and torchvision
# come from the GPU machine unless --with-torch.
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
"$PYTHON" - "$WITH_TORCH" > "$REQS" <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
with_torch = sys.argv[1] == "1"
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].lower()
    if with_torch or name not in ("torch", "torchvision"):
        print(requirement)
print("setuptools>=68")
print("wheel")
EOF
echo "prepare_wheels: Python $PYVER, $PLATFORM -> $DIR"
"$PYTHON" -m pip download --dest "$DIR" --only-binary=:all: --python-version "$PYVER" --platform "$PLATFORM" \
    -r "$REQS"
# Packages that need torch pull it in as a dependency; drop it unless asked for (the GPU machine has its own).
if [ "$WITH_TORCH" = "0" ]; then
    rm -f "$DIR"/torch-*.whl "$DIR"/torchvision-*.whl "$DIR"/nvidia_*.whl "$DIR"/triton-*.whl
fi
echo "prepare_wheels: $(ls "$DIR" | wc -l) files in $DIR; on the GPU machine: bench/gpu_check.sh --wheels $DIR"
