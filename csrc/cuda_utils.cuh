// Shared helpers of the CUDA kernels. Only cuda_runtime, ATen core and c10/cuda headers are used:
// the CPU torch wheel ships those, so CI can compile the .cu files without a GPU or CUDA libraries.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace fastbicot {

// Grid for a grid-stride loop over n elements: enough blocks to fill the device, never more than needed.
inline int grid_for(int64_t n, int threads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (n + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8)));
}

}  // namespace fastbicot
