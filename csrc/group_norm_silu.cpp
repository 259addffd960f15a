// Fused GroupNorm + SiLU over channels-last activations.
//
// Every resblock of the VQ decoder runs norm -> x*sigmoid(x) twice; in torch that is a GroupNorm
// pass plus two elementwise passes over full-resolution tensors, and torch's GroupNorm prefers
// NCHW. Here: one statistics pass (fp32, in double on CPU) and one pass that applies
// y = (x - mean[n,c]) * scale[n,c] + beta[c] and the SiLU while the value is in a register.
// (Subtracting the mean first, not folding it into a shift, keeps near-constant groups exact.)
#include "vq_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastbicot {
namespace {

template <typename scalar_t, bool silu>
inline void apply_row(const scalar_t* in, const float* mean, const float* scale, const float* beta, scalar_t* out,
                      int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float v = (static_cast<float>(in[c]) - mean[c]) * scale[c] + beta[c];
    if (silu) v = v / (1.0f + std::exp(-v));
    out[c] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void group_norm_silu_cpu(const scalar_t* x, const float* gamma, const float* beta, scalar_t* y, int64_t N, int64_t HW,
                         int64_t C, int64_t G, double eps, bool silu) {
  const int64_t Cg = C / G;
  // Statistics: each (sample, slice of rows) task sums whole contiguous rows into per-channel
  // accumulators (vectorisable), relative to the sample's first row so that E[x^2] - E[x]^2 does
  // not cancel; per-channel moments are then merged exactly into group moments.
  const int64_t slices = std::min<int64_t>(HW, std::max<int64_t>(1, 4 * at::get_num_threads() / N));
  const int64_t rows = (HW + slices - 1) / slices;
  std::vector<double> part(N * slices * C * 2, 0.0);  // [N, slices, {sum, sumsq}, C]
  at::parallel_for(0, N * slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / slices, p0 = (t % slices) * rows, p1 = std::min(HW, p0 + rows);
      const scalar_t* ref = x + n * HW * C;
      double* sum = part.data() + t * 2 * C;
      double* sumsq = sum + C;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* row = ref + p * C;
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<double>(static_cast<float>(row[c])) - static_cast<float>(ref[c]);
          sum[c] += v;
          sumsq[c] += v * v;
        }
      }
    }
  });
  // Per (n, c): the group's mean and rstd * gamma[c].
  std::vector<float> mean_c(N * C), scale(N * C);
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      // channel c: mean m_c = ref_c + S1/HW, variance v_c = S2/HW - (S1/HW)^2; the group's mean is
      // the average m_c and its variance the average of v_c + (m_c - mean)^2.
      double mean = 0.0, m2 = 0.0;
      std::vector<double> m_c(Cg);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t t = n * slices; t < (n + 1) * slices; ++t) {
          s1 += part[t * 2 * C + c];
          s2 += part[t * 2 * C + C + c];
        }
        const double d = s1 / HW;
        m_c[c - g * Cg] = static_cast<float>(x[n * HW * C + c]) + d;
        m2 += std::max(s2 / HW - d * d, 0.0);
        mean += m_c[c - g * Cg];
      }
      mean /= Cg;
      for (double m : m_c) m2 += (m - mean) * (m - mean);
      const double rstd = 1.0 / std::sqrt(m2 / Cg + eps);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        mean_c[n * C + c] = static_cast<float>(mean);
        scale[n * C + c] = static_cast<float>(rstd * gamma[c]);
      }
    }
  });
  at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = (r / HW) * C;
      if (silu) {
        apply_row<scalar_t, true>(x + r * C, mean_c.data() + nc, scale.data() + nc, beta, y + r * C, C);
      } else {
        apply_row<scalar_t, false>(x + r * C, mean_c.data() + nc, scale.data() + nc, beta, y + r * C, C);
      }
    }
  });
}

}  // namespace

at::Tensor group_norm_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps, bool silu) {
  TORCH_CHECK(x.dim() == 4, "group_norm_silu: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "group_norm_silu: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: ", C, " channels do not split into ", groups, " groups");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && bias.dim() == 1 && bias.size(0) == C,
              "group_norm_silu: weight and bias must be [", C, "], got ", weight.sizes(), " and ", bias.sizes());
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "group_norm_silu: weight/bias must be on ", x.device());
  TORCH_CHECK(eps >= 0, "group_norm_silu: eps must be >= 0, got ", eps);
  at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor gamma = weight.to(at::kFloat).contiguous(), beta = bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(src, src.options(), at::MemoryFormat::ChannelsLast);
  if (x.numel() == 0) return out;
  if (x.is_cuda()) {
#ifdef FASTBICOT_WITH_CUDA
    group_norm_silu_cuda(src, gamma, beta, groups, eps, silu, out);
    return out;
#else
    TORCH_CHECK(false, "group_norm_silu: fastbicot._C was built without CUDA");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "group_norm_silu: unsupported device ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "group_norm_silu", [&] {
    group_norm_silu_cpu<scalar_t>(src.data_ptr<scalar_t>(), gamma.data_ptr<float>(), beta.data_ptr<float>(),
                                  out.data_ptr<scalar_t>(), N, HW, C, groups, eps, silu);
  });
  return out;
}

}  // namespace fastbicot
