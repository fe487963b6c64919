// Python bindings and argument checks for the fused bias + leaky ReLU kernels (fused_bias_act_kernel.cu).
// Only the tensor, exception and pybind headers: <torch/extension.h> would pull in all of libtorch's C++ API.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

at::Tensor fused_bias_leaky_relu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                      double negative_slope, double scale);
at::Tensor leaky_relu_grad_cuda(const at::Tensor& grad_out, const at::Tensor& ref, double negative_slope,
                                double scale, double ref_sign);

// out = leaky_relu(x + bias.view(1, C, 1, ...), negative_slope) * scale; x [N, C, ...], bias [C] or None.
at::Tensor fused_bias_leaky_relu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                 double negative_slope, double scale) {
  TORCH_CHECK(x.is_cuda(), "fused_bias_leaky_relu: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 2, "fused_bias_leaky_relu: x must have rank >= 2, got ", x.dim());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "fused_bias_leaky_relu: bias must be on x's device");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fused_bias_leaky_relu: bias must have x's dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1),
                "fused_bias_leaky_relu: bias must have shape [C] with C = x.size(1)");
  }
  return fused_bias_leaky_relu_cuda(x, bias, negative_slope, scale);
}

// grad_x = grad_out * (ref * ref_sign > 0 ? scale : negative_slope * scale); ref is the forward output.
at::Tensor leaky_relu_grad(const at::Tensor& grad_out, const at::Tensor& ref, double negative_slope,
                           double scale, double ref_sign) {
  TORCH_CHECK(grad_out.is_cuda() && ref.device() == grad_out.device(),
              "leaky_relu_grad: grad_out and ref must be CUDA tensors on one device");
  TORCH_CHECK(grad_out.sizes() == ref.sizes(), "leaky_relu_grad: grad_out and ref must have one shape");
  TORCH_CHECK(grad_out.scalar_type() == ref.scalar_type(),
              "leaky_relu_grad: grad_out and ref must have one dtype");
  return leaky_relu_grad_cuda(grad_out, ref, negative_slope, scale, ref_sign);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_bias_leaky_relu", &fused_bias_leaky_relu, "leaky_relu(x + bias, slope) * scale (CUDA)",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("negative_slope"), pybind11::arg("scale"));
  m.def("leaky_relu_grad", &leaky_relu_grad,
        "gradient of the scaled leaky ReLU from its output's sign (CUDA)", pybind11::arg("grad_out"),
        pybind11::arg("ref"), pybind11::arg("negative_slope"), pybind11::arg("scale"), pybind11::arg("ref_sign"));
}
