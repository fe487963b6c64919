// Elementwise CUDA kernels of the fused bias + leaky ReLU (see op/fused_act.py for the math).
// Arithmetic is done in at::opmath_type (float for half / bfloat16), one rounding at the store.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest

int64_t num_blocks(int64_t numel) { return std::min((numel + kThreads - 1) / kThreads, kMaxBlocks); }

// out[i] = leaky(x[i] + bias[c(i)]) * scale, c(i) = (i / inner) % channels for a contiguous [N, C, inner].
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void fused_bias_leaky_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ bias, int64_t numel,
                                             int64_t channels, int64_t inner, acc_t negative_slope,
                                             acc_t scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t v = static_cast<acc_t>(x[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[(i / inner) % channels]);
    v = v > acc_t(0) ? v : v * negative_slope;
    out[i] = static_cast<scalar_t>(v * scale);
  }
}

// grad_x[i] = grad_out[i] * (ref[i] * ref_sign > 0 ? positive_gain : negative_gain).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void leaky_relu_grad_kernel(scalar_t* __restrict__ grad_x, const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ ref, int64_t numel, acc_t positive_gain,
                                       acc_t negative_gain, acc_t ref_sign) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t gain = static_cast<acc_t>(ref[i]) * ref_sign > acc_t(0) ? positive_gain : negative_gain;
    grad_x[i] = static_cast<scalar_t>(static_cast<acc_t>(grad_out[i]) * gain);
  }
}

}  // namespace

at::Tensor fused_bias_leaky_relu_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                      double negative_slope, double scale) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t channels = x.size(1);
  const int64_t inner = numel / (x.size(0) * channels);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "fused_bias_leaky_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bias_ptr = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    fused_bias_leaky_relu_kernel<scalar_t><<<num_blocks(numel), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), bias_ptr, numel, channels, inner,
        static_cast<acc_t>(negative_slope), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor leaky_relu_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& ref_in,
                                double negative_slope, double scale, double ref_sign) {
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor ref = ref_in.contiguous();
  at::Tensor grad_x = at::empty_like(grad_out);
  const int64_t numel = grad_out.numel();
  if (numel == 0) return grad_x;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, grad_out.scalar_type(),
                                  "leaky_relu_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    leaky_relu_grad_kernel<scalar_t><<<num_blocks(numel), kThreads, 0, stream>>>(
        grad_x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), numel,
        static_cast<acc_t>(scale), static_cast<acc_t>(negative_slope * scale), static_cast<acc_t>(ref_sign));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}
