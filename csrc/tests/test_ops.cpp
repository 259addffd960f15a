// ctest for the libtorch build: each CPU op against an ATen (float64) reference on random inputs.
#include <ATen/ATen.h>

#include <cstdio>

#include "vq_ops.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double atol, const char* what) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  std::printf("%-32s max abs err %.3g (atol %.3g)\n", what, err, atol);
  if (!(err <= atol)) ++failures;
}

void test_group_norm_silu() {
  const int64_t N = 2, C = 15, H = 5, W = 3, G = 5;  // 3 channels per group, non-square
  at::Tensor x = (at::randn({N, C, H, W}) * 2 + 7).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor w = at::randn({C}), b = at::randn({C});
  at::Tensor xd = x.to(at::kDouble).reshape({N, G, -1});
  at::Tensor mean = xd.mean({2}, true);
  at::Tensor var = (xd - mean).pow(2).mean({2}, true);
  at::Tensor ref = ((xd - mean) / (var + 1e-6).sqrt()).reshape({N, C, H, W}) * w.to(at::kDouble).view({1, C, 1, 1}) +
                   b.to(at::kDouble).view({1, C, 1, 1});
  expect_close(fastbicot::group_norm_silu(x, w, b, G, 1e-6, false), ref, 1e-4, "group_norm");
  expect_close(fastbicot::group_norm_silu(x, w, b, G, 1e-6, true), ref * at::sigmoid(ref), 1e-4, "group_norm_silu");
}

void test_vq_embed() {
  const int64_t K = 37, E = 8, C = 11;
  at::Tensor emb = at::randn({K, E}), cw = at::randn({C, E, 1, 1}), cb = at::randn({C});
  at::Tensor table = fastbicot::vq_build_table(emb, cw, cb);
  at::Tensor ed = emb.to(at::kDouble);
  at::Tensor ref = at::addmm(cb.to(at::kDouble), ed / ed.norm(2, {1}, true), cw.to(at::kDouble).view({C, E}).t());
  expect_close(table, ref, 1e-5, "vq_build_table");
  at::Tensor tokens = at::randint(K, {2, 3, 4}, at::kLong);
  expect_close(fastbicot::vq_embed(table, tokens), table.index({tokens}).permute({0, 3, 1, 2}), 0.0, "vq_embed");
  bool threw = false;
  try {
    fastbicot::vq_embed(table, at::full({1, 1, 1}, K, at::kLong));
  } catch (const c10::Error&) {
    threw = true;
  }
  std::printf("%-32s %s\n", "vq_embed rejects id == K", threw ? "ok" : "FAILED");
  if (!threw) ++failures;
}

void test_to_uint8_image() {
  at::Tensor x = at::randn({2, 3, 4, 5}) * 1.5;
  at::Tensor ref = ((x + 1) / 2 * 255).clamp(0, 255).round().to(at::kByte).permute({0, 2, 3, 1});
  expect_close(fastbicot::to_uint8_image(x), ref, 0.0, "to_uint8_image");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_group_norm_silu();
  test_vq_embed();
  test_to_uint8_image();
  std::printf(failures ? "FAILED (%d)\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
