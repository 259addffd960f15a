// CUDA version of the fused GroupNorm + SiLU over channels-last activations (see group_norm_silu.cpp).
//
// Three launches: (1) partial sums per (sample, group, slice of rows) so that even batch 1 with 32
// groups fills the GPU, (2) one thread per (sample, group) turns them into per-channel mean and scale,
// (3) one elementwise pass y = silu((x - mean) * scale + beta). Sums are taken relative to the group's first
// value, so E[x^2] - E[x]^2 does not cancel catastrophically in fp32 when |mean| >> std.
#include "cuda_utils.cuh"
#include "vq_ops.h"

namespace fastbicot {
namespace {

constexpr int kThreads = 256;

__device__ inline void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    a = lane < warps ? sa[lane] : 0.0f;
    b = lane < warps ? sb[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// grid (N*G, S): block (ng, s) sums rows [s*rows, (s+1)*rows) of group g of sample n.
template <typename scalar_t>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ partial, int64_t HW,
                                     int64_t C, int64_t Cg, int64_t G, int64_t rows) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G;
  const scalar_t* base = x + n * HW * C + g * Cg;
  const float ref = static_cast<float>(base[0]);
  const int64_t p0 = blockIdx.y * rows;
  const int64_t count = (min(HW, p0 + rows) - p0) * Cg;
  float sum = 0.0f, sumsq = 0.0f;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const int64_t p = p0 + e / Cg;
    const float v = static_cast<float>(base[p * C + e % Cg]) - ref;
    sum += v;
    sumsq += v * v;
  }
  block_sum2(sum, sumsq);
  if (threadIdx.x == 0) {
    float* out = partial + (ng * gridDim.y + blockIdx.y) * 2;
    out[0] = sum;
    out[1] = sumsq;
  }
}

template <typename scalar_t>
__global__ void finalize_kernel(const float* __restrict__ partial, const scalar_t* __restrict__ x,
                                const float* __restrict__ gamma, float* __restrict__ mean_c, float* __restrict__ scale, int64_t NG, int64_t G,
                                int64_t S, int64_t HW, int64_t C, int64_t Cg, double eps) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  const int64_t n = ng / G, g = ng % G;
  const float ref = static_cast<float>(x[n * HW * C + g * Cg]);
  double sum = 0.0, sumsq = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    sum += partial[(ng * S + s) * 2];
    sumsq += partial[(ng * S + s) * 2 + 1];
  }
  const double count = static_cast<double>(HW * Cg);
  const double m = sum / count;
  const double rstd = 1.0 / sqrt(fmax(sumsq / count - m * m, 0.0) + eps);
  const double mean = ref + m;
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    mean_c[n * C + c] = static_cast<float>(mean);
    scale[n * C + c] = static_cast<float>(rstd * gamma[c]);
  }
}

template <typename scalar_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const float* __restrict__ mean_c,
                             const float* __restrict__ scale, const float* __restrict__ beta,
                             scalar_t* __restrict__ y, int64_t total, int64_t HWC, int64_t C, bool silu) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, nc = (i / HWC) * C + c;
    float v = (static_cast<float>(x[i]) - mean_c[nc]) * scale[nc] + beta[c];
    if (silu) v = v / (1.0f + __expf(-v));
    y[i] = static_cast<scalar_t>(v);
  }
}

}  // namespace

void group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                          double eps, bool silu, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = groups, Cg = C / G, NG = N * G;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Split each group's rows so that about 4 blocks per SM take part in the statistics pass.
  int64_t splits = std::min<int64_t>(HW, std::max<int64_t>(1, (4 * int64_t(sms) + NG - 1) / NG));
  const int64_t rows = (HW + splits - 1) / splits;
  splits = (HW + rows - 1) / rows;
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({NG, splits, 2}, fopts);
  at::Tensor mean_c = at::empty({N, C}, fopts), scale = at::empty({N, C}, fopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    partial_stats_kernel<scalar_t><<<dim3(NG, splits), kThreads, 0, stream>>>(xp, partial.data_ptr<float>(), HW, C,
                                                                                Cg, G, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<scalar_t><<<(NG + 127) / 128, 128, 0, stream>>>(
        partial.data_ptr<float>(), xp, weight.data_ptr<float>(), mean_c.data_ptr<float>(), scale.data_ptr<float>(), NG, G, splits, HW, C, Cg, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = x.numel();
    apply_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        xp, mean_c.data_ptr<float>(), scale.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<scalar_t>(), total,
        HW * C, C, silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastbicot
