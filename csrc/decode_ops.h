// fastbicot._C: the CPU image-decode step (DESIGN.md §5; csrc/decode_step_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastbicot {

// One decode step through every layer of a Llama trunk for rows [0, n), float32/float64 on CPU.
// x [n, hidden]: this step's input embeddings. Per layer l (fused layout of Trunk.fuse_weights):
// w_in[l] [3 H D, hidden] (q*scale, k, v), w_o[l] [hidden, H D], w_gu[l] [2 F, hidden], w_down[l] [hidden, F].
// kv [layers, 2, R, H, slots, D] (contiguous): row r's K/V; this token's are written at slot
// pos[r] and the row attends to slots [0, pos[r]]. cos_sin [n, 2 D]: RoPE cos | sin of this step.
// Returns the final-normed hidden state (norm_weight [hidden]) [n, hidden].
at::Tensor decode_step_cpu(const at::Tensor& x, const std::vector<at::Tensor>& w_in, const std::vector<at::Tensor>& w_o,
                           const std::vector<at::Tensor>& w_gu, const std::vector<at::Tensor>& w_down,
                           const at::Tensor& norm_weight, at::Tensor& kv, const at::Tensor& pos,
                           const at::Tensor& cos_sin, double eps);

}  // namespace fastbicot
