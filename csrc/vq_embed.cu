// CUDA gather of the precomputed codebook table (see vq_embed.cpp).
#include "cuda_utils.cuh"
#include "vq_ops.h"

namespace fastbicot {
namespace {

// out is [T, C] (channels-last [B, C, h, w]); ids are already range-checked by the caller.
template <typename scalar_t>
__global__ void vq_embed_kernel(const scalar_t* __restrict__ table, const int64_t* __restrict__ ids,
                                scalar_t* __restrict__ out, int64_t total, int64_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / C;
    out[i] = table[ids[t] * C + (i - t * C)];
  }
}

}  // namespace

void vq_embed_cuda(const at::Tensor& table, const at::Tensor& tokens, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t total = out.numel(), C = table.size(1);
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "vq_embed_cuda", [&] {
    vq_embed_kernel<scalar_t><<<grid_for(total, threads), threads, 0, stream>>>(
        table.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), total, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastbicot
