#!/usr/bin/env bash
# Compile (-c only, no link, no GPU needed) every csrc/*.cu for sm_80 and sm_90 with the flags
# torch's CUDAExtension would use, so that a CUDA compile error fails CI on a CPU-only machine.
# Usage: bash csrc/check_cuda_compile.sh   (needs nvcc on PATH and torch importable)
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found" >&2; exit 1; }

# Torch's include dirs and ABI, and the nvcc flags CUDAExtension adds (half/bf16 operator guards...).
mapfile -t FLAGS < <(python - <<'PY'
import torch
from torch.utils import cpp_extension as ext
for p in ext.include_paths():
    print(f"-I{p}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
for f in ext.COMMON_NVCC_FLAGS:
    print(f)
PY
)
# Torch >= 2.10 headers want C++20; older ones build with C++17.
STD=$(python -c 'import torch; v = tuple(int(x) for x in torch.__version__.split(".")[:2]); print("c++20" if v >= (2, 10) else "c++17")')

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The CPU torch wheel ships the c10/cuda headers but not the one CMake generates for CUDA builds;
# recreate it exactly as a CUDA build of torch writes it (shared library build).
TORCH_INC=${FLAGS[0]#-I}
if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  FLAGS+=("-I$out/shim")
fi
# The sources compile in parallel (CI's 2 cores): one background job per file, statuses collected.
compile_one() {
  local src=$1
  if "$NVCC" -c "$src" -o "$out/${src%.cu}.o" -std="$STD" -O3 --use_fast_math -Xcompiler -fPIC \
      -DFASTBICOT_WITH_CUDA=1 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      "${FLAGS[@]}"; then
    echo "check_cuda_compile: $src OK (sm_80, sm_90)"
  else
    echo "check_cuda_compile: $src FAILED" >&2
    return 1
  fi
}
pids=()
for src in *.cu; do
  compile_one "$src" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit "$status"
