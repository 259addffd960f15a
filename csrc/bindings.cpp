// Python bindings of fastbicot._C (only compiled by setup.py; CMake builds the ops without Python).
#include <torch/extension.h>

#include <optional>

#include "decode_ops.h"
#include "vq_ops.h"

namespace {
bool has_cuda() {
#ifdef FASTBICOT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbicot C++/CUDA ops: VQ decoding (DESIGN.md section 6), the CPU decode step (section 5)";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def(
      "vq_build_table",
      [](const at::Tensor& embedding, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias) {
        return fastbicot::vq_build_table(embedding, conv_weight, conv_bias.value_or(at::Tensor()));
      }, "[K, C] table post_quant_conv(normalize(embedding))",
        py::arg("embedding"), py::arg("conv_weight"), py::arg("conv_bias"));
  m.def("vq_embed", &fastbicot::vq_embed, "tokens [B, h, w] -> [B, C, h, w] channels-last rows of the table",
        py::arg("table"), py::arg("tokens"));
  m.def("group_norm_silu", &fastbicot::group_norm_silu, "GroupNorm (+ SiLU) over channels-last activations",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("groups"), py::arg("eps"), py::arg("silu"));
  m.def("decode_step_cpu", &fastbicot::decode_step_cpu,
        "one image-decode step through every trunk layer (fused weights; CPU float32/float64)", py::arg("x"),
        py::arg("w_in"), py::arg("w_o"), py::arg("w_gu"), py::arg("w_down"), py::arg("norm_weight"), py::arg("kv"),
        py::arg("pos"), py::arg("cos_sin"), py::arg("eps"));
  m.def("to_uint8_image", &fastbicot::to_uint8_image, "[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]", py::arg("x"));
}
