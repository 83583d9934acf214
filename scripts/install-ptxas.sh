#!/usr/bin/env bash
# Installs NVIDIA's PTX assembler (ptxas) from the pinned PyPI wheel, so the PTX tests can assemble
# every emitted kernel without a GPU or a CUDA toolkit, and prints its path. Idempotent: an
# installed wheel of the pinned version is reused.
#
#   scripts/install-ptxas.sh            # install if needed, print the path
#   export FLASHC_PTXAS=$(scripts/install-ptxas.sh)
set -euo pipefail

WHEEL="nvidia-cuda-nvcc-cu12==12.9.86"
PYTHON="${PYTHON:-python3}"

# The ptxas of the wheel, if installed: nvidia/cuda_nvcc/bin/ptxas under any site-packages dir.
find_ptxas() {
    "$PYTHON" - <<'PY'
import os, site, sys
dirs = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
for d in dirs:
    p = os.path.join(d, "nvidia", "cuda_nvcc", "bin", "ptxas")
    if d and os.path.isfile(p):
        print(p)
        break
PY
}

installed_version() {
    "$PYTHON" -m pip show nvidia-cuda-nvcc-cu12 2>/dev/null | sed -n 's/^Version: //p'
}

if [ "$(installed_version)" != "${WHEEL#*==}" ] || [ -z "$(find_ptxas)" ]; then
    # --user where the interpreter's site-packages is not writable (system Python without a venv).
    if ! "$PYTHON" -m pip install --quiet "$WHEEL" >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --user "$WHEEL" >&2
    fi
fi

PTXAS="$(find_ptxas)"
if [ -z "$PTXAS" ]; then
    echo "install-ptxas: $WHEEL is installed but its ptxas was not found" >&2
    exit 1
fi
chmod +x "$PTXAS" 2>/dev/null || true
"$PTXAS" --version >/dev/null
echo "$PTXAS"
