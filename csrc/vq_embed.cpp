// Codebook lookup + l2-normalisation + the 1x1 post_quant_conv, folded into one row gather.
//
// JanusVQVAE.decode computes post_quant_conv(normalize(embedding[tokens])). Every step is per
// token and linear after the normalisation, so the whole chain is a function of the token id alone:
// precompute it once per model as a [K, C] table and decoding starts with a single gather.
#include "vq_ops.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace fastbicot {

at::Tensor vq_build_table(const at::Tensor& embedding, const at::Tensor& conv_weight, const at::Tensor& conv_bias) {
  TORCH_CHECK(embedding.dim() == 2, "vq_build_table: embedding must be [K, E], got ", embedding.sizes());
  const int64_t E = embedding.size(1);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == E && conv_weight.size(2) == 1 && conv_weight.size(3) == 1,
              "vq_build_table: conv_weight must be [C, ", E, ", 1, 1], got ", conv_weight.sizes());
  const int64_t C = conv_weight.size(0);
  TORCH_CHECK(embedding.device() == conv_weight.device(), "vq_build_table: embedding and conv_weight on different devices");
  at::Tensor emb = embedding.to(at::kFloat);
  // F.normalize(p=2, eps=1e-12): x / max(||x||, eps).
  at::Tensor normed = emb / emb.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  at::Tensor w = conv_weight.reshape({C, E}).to(at::kFloat);
  at::Tensor table;
  if (conv_bias.defined()) {
    TORCH_CHECK(conv_bias.dim() == 1 && conv_bias.size(0) == C, "vq_build_table: conv_bias must be [", C, "], got ",
                conv_bias.sizes());
    table = at::addmm(conv_bias.to(at::kFloat), normed, w.t());
  } else {
    table = at::mm(normed, w.t());
  }
  return table.to(conv_weight.scalar_type()).contiguous();
}

at::Tensor vq_embed(const at::Tensor& table, const at::Tensor& tokens) {
  TORCH_CHECK(table.dim() == 2, "vq_embed: table must be [K, C], got ", table.sizes());
  TORCH_CHECK(tokens.dim() == 3, "vq_embed: tokens must be [B, h, w], got ", tokens.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
              "vq_embed: tokens must be int64 or int32, got ", tokens.scalar_type());
  TORCH_CHECK(table.device() == tokens.device(), "vq_embed: table on ", table.device(), " but tokens on ", tokens.device());
  const int64_t K = table.size(0), C = table.size(1);
  const int64_t B = tokens.size(0), h = tokens.size(1), w = tokens.size(2);
  at::Tensor out = at::empty({B, C, h, w}, table.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (tokens.numel() == 0) return out;
  // A bad id would read outside the table: check the range once (one sync on CUDA, negligible
  // next to the decoder's convolutions).
  auto [lo, hi] = at::aminmax(tokens);
  const int64_t min_id = lo.item<int64_t>(), max_id = hi.item<int64_t>();
  TORCH_CHECK(min_id >= 0 && max_id < K, "vq_embed: token ids must lie in [0, ", K, "), got min ", min_id, " max ",
              max_id);
  at::Tensor ids = tokens.to(at::kLong).contiguous();
  at::Tensor tab = table.contiguous();
  if (tokens.is_cuda()) {
#ifdef FASTBICOT_WITH_CUDA
    vq_embed_cuda(tab, ids, out);
    return out;
#else
    TORCH_CHECK(false, "vq_embed: fastbicot._C was built without CUDA");
#endif
  }
  TORCH_CHECK(tokens.is_cpu(), "vq_embed: unsupported device ", tokens.device());
  // channels-last [B, C, h, w] is [B*h*w, C] in memory: one row copy per token.
  const int64_t row_bytes = C * tab.element_size();
  const char* src = static_cast<const char*>(tab.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* id = ids.data_ptr<int64_t>();
  at::parallel_for(0, B * h * w, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) std::memcpy(dst + t * row_bytes, src + id[t] * row_bytes, row_bytes);
  });
  return out;
}

}  // namespace fastbicot
