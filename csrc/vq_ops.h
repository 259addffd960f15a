// fastbicot._C: the three ops that make VQ decoding fast (DESIGN.md §6).
//
// Every op takes and returns ATen tensors, checks its inputs and dispatches on the device: the CPU
// implementation (at::parallel_for) always exists, the CUDA one when the library was compiled with
// FASTBICOT_WITH_CUDA. Activations are 4-D [N, C, H, W] tensors in channels-last memory (NHWC).
#pragma once

#include <ATen/ATen.h>

namespace fastbicot {

// [K, C] table: post_quant_conv(l2_normalize(embedding)) for every codebook row, computed in fp32
// and cast to conv_weight's dtype. embedding [K, E], conv_weight [C, E, 1, 1], conv_bias [C] or undefined.
at::Tensor vq_build_table(const at::Tensor& embedding, const at::Tensor& conv_weight, const at::Tensor& conv_bias);

// tokens [B, h, w] (int32/int64, each in [0, K)) -> [B, C, h, w] channels-last: out[b, :, i, j] = table[tokens[b, i, j]].
at::Tensor vq_embed(const at::Tensor& table, const at::Tensor& tokens);

// GroupNorm (fp32 statistics, biased variance) then, if silu, x * sigmoid(x). x [N, C, H, W] in
// fp32/fp16/bf16; weight/bias [C]. Output has x's dtype and channels-last memory.
at::Tensor group_norm_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps, bool silu);

// x [B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]: round_half_even(clamp((x + 1) / 2 * 255, 0, 255)), in fp32.
at::Tensor to_uint8_image(const at::Tensor& x);

#ifdef FASTBICOT_WITH_CUDA
// CUDA launchers, called by the ops above after their checks: inputs are already contiguous in the
// layout described there (tokens int64, weight/bias fp32) and out is allocated.
void vq_embed_cuda(const at::Tensor& table, const at::Tensor& tokens, at::Tensor& out);
void group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                          double eps, bool silu, at::Tensor& out);
void to_uint8_image_cuda(const at::Tensor& x, at::Tensor& out);
#endif

}  // namespace fastbicot
