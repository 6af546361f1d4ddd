#!/usr/bin/env bash
# Compile every CUDA source of robustops on a machine without a GPU (compile-only check).
# Uses a separate venv holding the CUDA build of torch (the CPU wheel has no CUDA headers) and the
# machine's nvcc. Usage: cuda_check.sh <venv-dir> <cuda-torch-version>
set -euo pipefail
VENV=${1:-.venv-cuda}
TORCH_VERSION=${2:-2.14.1}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy ninja setuptools wheel
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# nvcc 13 needs the CUDA runtime headers the CUDA torch wheel ships under nvidia/cu13.
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext \
  --build-temp "$out/temp" --build-lib "$out/lib"
so=$(find "$out/lib" -name '_C*.so' | head -n 1)
test -n "$so"
echo "CUDA build OK: $(ls csrc/ops/cuda/*.cu | wc -l) .cu files compiled for sm_${TORCH_CUDA_ARCH_LIST/./}"
nm -D "$so" | grep -c 'cuda' >/dev/null && echo "symbols: $(nm -DC "$so" | grep -ci cuda) CUDA-related"
