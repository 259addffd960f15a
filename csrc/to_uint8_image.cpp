// Fused clamp/scale/round of the decoded image to the uint8 NHWC layout reward models take.
//
// The torch version is five passes ((x+1), /2, *255, clamp, round) plus a cast and a permute copy;
// here it is one read of x and one write of a quarter of its bytes.
#include "vq_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace fastbicot {

at::Tensor to_uint8_image(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "to_uint8_image: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "to_uint8_image: x must be floating point, got ", x.scalar_type());
  // channels-last [B, C, H, W] has exactly the memory of the [B, H, W, C] output.
  at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return out;
  if (x.is_cuda()) {
#ifdef FASTBICOT_WITH_CUDA
    to_uint8_image_cuda(src, out);
    return out;
#else
    TORCH_CHECK(false, "to_uint8_image: fastbicot._C was built without CUDA");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "to_uint8_image: unsupported device ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "to_uint8_image", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    at::parallel_for(0, src.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float v = (static_cast<float>(in[i]) + 1.0f) / 2.0f * 255.0f;
        // fmax/fmin send NaN to 0; nearbyint rounds half to even like torch.round.
        o[i] = static_cast<uint8_t>(std::nearbyint(std::fmin(std::fmax(v, 0.0f), 255.0f)));
      }
    });
  });
  return out;
}

}  // namespace fastbicot
