// One image-decode step of the Llama trunk on CPU, all layers in one call (DESIGN.md §5).
//
// A decode step of a small model on CPU is bound by the number of torch ops, not by FLOPs or
// bytes: from Python each op costs ~15 us of dispatch, and a layer is ~13 ops. Here the matmuls
// stay ATen calls (MKL/oneDNN: right for any size) and everything between them -- RMSNorm, RoPE,
// the K/V write, attention over each row's own keys, SiLU*up -- is one loop over rows, so a layer
// is 4 GEMMs + 4 loops and Python is entered once per step.
//
// The weights are fused by fastbicot/rollout/cpu_decode.py (FusedWeights): w_in rows are
// [q*scale, k, v] with the input RMSNorm weight folded in, w_gu is [gate; up] with the
// post-attention norm weight folded in. Its Python twin, FusedWeights.flat, is the reference
// (tests/test_decode_step_cpu.py).
#include "decode_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace fastbicot {
namespace {

// LlamaRMSNorm without its weight, computed in fp32 whatever the dtype (as transformers does:
// x.float() * rsqrt(mean(x^2) + eps), cast back), optionally scaled by w afterwards.
template <typename T>
void rms_rows(const T* x, T* out, int64_t n, int64_t d, float eps, const T* w) {
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * d;
    T* o = out + r * d;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; ++i) {
      const float v = static_cast<float>(xr[i]);
      acc += v * v;
    }
    const float inv = 1.0f / std::sqrt(acc / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) {
      const T v = static_cast<T>(static_cast<float>(xr[i]) * inv);
      o[i] = w ? w[i] * v : v;
    }
  }
}

// y [n, 3 H D] = [q, k, v] -> RoPE'd q into q_out [n, H, D]; RoPE'd k and v written at slot
// pos[r] of each row's K/V (kv_k/kv_v: [R, H, Ls, D] planes of this layer).
// RoPE as transformers does it: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
template <typename T>
void rope_and_write(const T* y, const T* cos_sin, const int64_t* pos, T* q_out, T* kv_k, T* kv_v, int64_t n,
                    int64_t H, int64_t D, int64_t Ls) {
  const int64_t hd = H * D, h2 = D / 2;
  for (int64_t r = 0; r < n; ++r) {
    const T* c = cos_sin + r * 2 * D;
    const T* s = c + D;
    for (int64_t h = 0; h < H; ++h) {
      const T* qs = y + r * 3 * hd + h * D;
      const T* ks = qs + hd;
      const T* vs = ks + hd;
      T* qd = q_out + r * hd + h * D;
      T* kd = kv_k + ((r * H + h) * Ls + pos[r]) * D;
      T* vd = kv_v + ((r * H + h) * Ls + pos[r]) * D;
      for (int64_t i = 0; i < h2; ++i) {
        qd[i] = qs[i] * c[i] - qs[i + h2] * s[i];
        kd[i] = ks[i] * c[i] - ks[i + h2] * s[i];
      }
      for (int64_t i = h2; i < D; ++i) {
        qd[i] = qs[i] * c[i] + qs[i - h2] * s[i];
        kd[i] = ks[i] * c[i] + ks[i - h2] * s[i];
      }
      for (int64_t i = 0; i < D; ++i) vd[i] = vs[i];
    }
  }
}

// exp for the softmax and SiLU loops. float: a Cody-Waite reduction + degree-6 polynomial (the
// cephes expf coefficients) written as branch-free arithmetic, so the loops that call it
// vectorise (std::exp does not without -ffast-math); relative error ~2 ulp over the clamped range.
// double (tests, references): std::exp.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // ternaries, not std::min/max: they if-convert into vector blends
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2), 1.5 * 2^23 trick
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;               // x - n ln2, ln2 split hi/lo
  float p = 1.98756912e-4f;
  p = p * r + 1.39819994e-3f;
  p = p * r + 8.33345205e-3f;
  p = p * r + 4.16657962e-2f;
  p = p * r + 1.66666672e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;  // * 2^n
  std::memcpy(&p, &bits, 4);
  return p;
}
inline double fast_exp(double x) { return std::exp(x); }

// SiLU*up is elementwise over long rows: built for AVX-512 / AVX2 next to the baseline and picked
// at load time by the CPU (GCC/Clang function multiversioning), so the extension still runs on
// any x86-64. (The attention loops are left at the baseline: with head_dim 16 their per-key dot
// products are faster in 128-bit registers than with wide horizontal reductions.)
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTBICOT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTBICOT_MULTIVERSION
#endif

// One (row, head): o = softmax(q . K[:len]) V[:len]; q already carries the attention scale.
// DC > 0: head_dim known at compile time (the common ones), so the per-key loops unroll into a
// few vector instructions; DC == 0: any head_dim.
template <typename T, int DC>
inline void attend_head(const T* __restrict__ q, const T* __restrict__ K, const T* __restrict__ V, int64_t len,
                        int64_t D_, T* __restrict__ p, T* __restrict__ o) {
  const int64_t D = DC > 0 ? DC : D_;
  for (int64_t j = 0; j < len; ++j) {
    const T* __restrict__ kj = K + j * D;
    T a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < D; ++i) a += q[i] * kj[i];
    p[j] = a;
  }
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < len; ++j) m = p[j] > m ? p[j] : m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    p[j] = fast_exp(p[j] - m);
    sum += p[j];
  }
  for (int64_t i = 0; i < D; ++i) o[i] = T(0);
  for (int64_t j = 0; j < len; ++j) {
    const T pj = p[j];
    const T* __restrict__ vj = V + j * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) o[i] += pj * vj[i];
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) o[i] *= inv;
}

template <typename T>
inline void attend_head_any(const T* q, const T* K, const T* V, int64_t len, int64_t D, T* p, T* o) {
  switch (D) {
    case 16: return attend_head<T, 16>(q, K, V, len, D, p, o);
    case 32: return attend_head<T, 32>(q, K, V, len, D, p, o);
    case 64: return attend_head<T, 64>(q, K, V, len, D, p, o);
    case 128: return attend_head<T, 128>(q, K, V, len, D, p, o);
    default: return attend_head<T, 0>(q, K, V, len, D, p, o);
  }
}


// o[r, h] = softmax(q[r, h] . K[r, h, :len]) V[r, h, :len], len = pos[r] + 1 (the row's keys so
// far, this token's included).
template <typename T>
void attend(const T* q, const T* kv_k, const T* kv_v, const int64_t* pos, T* out, int64_t n, int64_t H, int64_t D,
            int64_t Ls) {
  at::parallel_for(0, n * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> p(Ls);
    for (int64_t rh = begin; rh < end; ++rh) {
      attend_head_any<T>(q + rh * D, kv_k + rh * Ls * D, kv_v + rh * Ls * D, pos[rh / H] + 1, D, p.data(),
                           out + rh * D);
    }
  });
}

// gu [n, 2F] -> act [n, F] = silu(gate) * up
template <typename T>
inline void silu_mul(const T* __restrict__ gu, T* __restrict__ act, int64_t n, int64_t F) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict__ g = gu + r * 2 * F;
    const T* __restrict__ u = g + F;
    T* __restrict__ a = act + r * F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) a[i] = g[i] / (T(1) + fast_exp(-g[i])) * u[i];
  }
}
FASTBICOT_MULTIVERSION void silu_mul_f32(const float* gu, float* act, int64_t n, int64_t F) {
  silu_mul<float>(gu, act, n, F);
}
inline void silu_mul_dispatch(const float* gu, float* act, int64_t n, int64_t F) { silu_mul_f32(gu, act, n, F); }
inline void silu_mul_dispatch(const double* gu, double* act, int64_t n, int64_t F) { silu_mul<double>(gu, act, n, F); }

void check_2d(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "decode_step_cpu: ", what, " must be [", rows,
              ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "decode_step_cpu: ", what, " has dtype ", t.scalar_type(),
              ", x has ", x.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "decode_step_cpu: ", what, " must be on the CPU");
}

}  // namespace

at::Tensor decode_step_cpu(const at::Tensor& x_in, const std::vector<at::Tensor>& w_in,
                           const std::vector<at::Tensor>& w_o, const std::vector<at::Tensor>& w_gu,
                           const std::vector<at::Tensor>& w_down, const at::Tensor& norm_weight, at::Tensor& kv,
                           const at::Tensor& pos_in, const at::Tensor& cos_sin_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "decode_step_cpu: x must be a 2-D CPU tensor, got ",
              x_in.sizes(), " on ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "decode_step_cpu: float32 or float64 only, got ", x_in.scalar_type());
  const int64_t L = static_cast<int64_t>(w_in.size());
  TORCH_CHECK(L > 0 && w_o.size() == w_in.size() && w_gu.size() == w_in.size() && w_down.size() == w_in.size(),
              "decode_step_cpu: one w_in, w_o, w_gu, w_down per layer");
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == L && kv.size(1) == 2 && kv.is_contiguous() &&
                  kv.scalar_type() == x_in.scalar_type() && kv.device().is_cpu(),
              "decode_step_cpu: kv must be a contiguous [layers, 2, rows, heads, slots, head_dim] CPU tensor of x's "
              "dtype, got ",
              kv.sizes(), " ", kv.scalar_type());
  const int64_t n = x_in.size(0), hidden = x_in.size(1);
  const int64_t R = kv.size(2), H = kv.size(3), Ls = kv.size(4), D = kv.size(5), hd = H * D;
  TORCH_CHECK(n <= R, "decode_step_cpu: ", n, " rows but the cache has ", R);
  TORCH_CHECK(pos_in.dim() == 1 && pos_in.size(0) == n, "decode_step_cpu: pos must be [", n, "], got ", pos_in.sizes());
  const at::Tensor pos = pos_in.to(at::kLong).contiguous();
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = pos.data_ptr<int64_t>()[r];
    TORCH_CHECK(p >= 0 && p < Ls, "decode_step_cpu: row ", r, " writes slot ", p, " outside the cache's ", Ls,
                " slots");
  }
  check_2d(cos_sin_in, n, 2 * D, x_in, "cos_sin");
  check_2d(norm_weight.view({1, -1}), 1, hidden, x_in, "norm_weight");
  const int64_t F = w_gu[0].size(0) / 2;
  for (int64_t l = 0; l < L; ++l) {
    check_2d(w_in[l], 3 * hd, hidden, x_in, "w_in");
    check_2d(w_o[l], hidden, hd, x_in, "w_o");
    check_2d(w_gu[l], 2 * F, hidden, x_in, "w_gu");
    check_2d(w_down[l], hidden, F, x_in, "w_down");
  }
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor cos_sin = cos_sin_in.contiguous(), nw = norm_weight.contiguous();
  at::Tensor h = at::empty_like(x), q = at::empty({n, hd}, x.options()), o = at::empty({n, hd}, x.options());
  at::Tensor act = at::empty({n, F}, x.options());
  at::Tensor y = at::empty({n, 3 * hd}, x.options()), gu = at::empty({n, 2 * F}, x.options());
  const float feps = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_step_cpu", [&] {
    using T = scalar_t;
    const int64_t* p = pos.data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      T* k_plane = kv.data_ptr<T>() + (l * 2) * R * H * Ls * D;
      T* v_plane = k_plane + R * H * Ls * D;
      rms_rows<T>(x.data_ptr<T>(), h.data_ptr<T>(), n, hidden, feps, nullptr);
      at::mm_out(y, h, w_in[l].t());
      rope_and_write<T>(y.data_ptr<T>(), cos_sin.data_ptr<T>(), p, q.data_ptr<T>(), k_plane, v_plane, n, H, D, Ls);
      attend<T>(q.data_ptr<T>(), k_plane, v_plane, p, o.data_ptr<T>(), n, H, D, Ls);
      x.addmm_(o, w_o[l].t());
      rms_rows<T>(x.data_ptr<T>(), h.data_ptr<T>(), n, hidden, feps, nullptr);
      at::mm_out(gu, h, w_gu[l].t());
      silu_mul_dispatch(gu.data_ptr<T>(), act.data_ptr<T>(), n, F);
      x.addmm_(act, w_down[l].t());
    }
    rms_rows<T>(x.data_ptr<T>(), h.data_ptr<T>(), n, hidden, feps, nw.data_ptr<T>());
  });
  return h;
}

}  // namespace fastbicot
