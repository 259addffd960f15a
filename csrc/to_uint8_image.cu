// CUDA version of the fused clamp/scale/round to uint8 NHWC (see to_uint8_image.cpp).
#include "cuda_utils.cuh"
#include "vq_ops.h"

namespace fastbicot {
namespace {

template <typename scalar_t>
__global__ void to_uint8_kernel(const scalar_t* __restrict__ x, uint8_t* __restrict__ out, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    // (x + 1) * 0.5 equals (x + 1) / 2 exactly; fmaxf/fminf send NaN to 0; rintf rounds half to even.
    const float v = (static_cast<float>(x[i]) + 1.0f) * 0.5f * 255.0f;
    out[i] = static_cast<uint8_t>(rintf(fminf(fmaxf(v, 0.0f), 255.0f)));
  }
}

}  // namespace

void to_uint8_image_cuda(const at::Tensor& x, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = x.numel();
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "to_uint8_image_cuda", [&] {
    to_uint8_kernel<scalar_t>
        <<<grid_for(total, threads), threads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<uint8_t>(), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastbicot
