// Python binding and argument checks for the upfirdn2d forward kernel (upfirdn2d_kernel.cu).
// Only the tensor, exception and pybind headers: <torch/extension.h> would pull in all of libtorch's C++ API.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                          int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                          int64_t pad_y1);

// Zero-insertion upsampling, padding (negative crops), true convolution with `kernel`, downsampling.
// x [N, C, H, W], kernel [kh, kw] -> [N, C, (H * up_y + pad_y0 + pad_y1 - kh) / down_y + 1, ... W ...].
at::Tensor upfirdn2d(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                     int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                     int64_t pad_y1) {
  TORCH_CHECK(x.is_cuda(), "upfirdn2d: x must be a CUDA tensor");
  TORCH_CHECK(kernel.device() == x.device(), "upfirdn2d: kernel must be on x's device");
  TORCH_CHECK(kernel.scalar_type() == x.scalar_type(), "upfirdn2d: kernel must have x's dtype");
  TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W], got rank ", x.dim());
  TORCH_CHECK(kernel.dim() == 2 && kernel.numel() > 0, "upfirdn2d: kernel must be a non-empty [kh, kw]");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: up and down must be >= 1");
  return upfirdn2d_cuda(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "upsample, FIR filter (true convolution), downsample (CUDA forward)",
        pybind11::arg("x"), pybind11::arg("kernel"), pybind11::arg("up_x"), pybind11::arg("up_y"),
        pybind11::arg("down_x"), pybind11::arg("down_y"), pybind11::arg("pad_x0"), pybind11::arg("pad_x1"),
        pybind11::arg("pad_y0"), pybind11::arg("pad_y1"));
}
