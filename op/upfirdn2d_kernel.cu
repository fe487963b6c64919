// CUDA forward of upfirdn2d (see op/upfirdn2d.py for the definition and the adjoint used in backward).
//
// One thread per output sample, the index math in upfirdn2d_math.h. Contiguous inputs are read plane by
// plane, channels_last inputs in their own layout (no copy; the output is channels_last too). The FIR
// kernel is staged in shared memory per block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>

#include "upfirdn2d_math.h"

namespace {

using upfirdn2d_math::Axis;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ kernel, int64_t total, int64_t minor, Axis ax,
                                 Axis ay) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* taps = reinterpret_cast<acc_t*>(shared_bytes);  // kernel [kh, kw] in acc_t
  const int kernel_numel = ay.taps * ax.taps;
  for (int t = threadIdx.x; t < kernel_numel; t += blockDim.x) taps[t] = static_cast<acc_t>(kernel[t]);
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    out[idx] = static_cast<scalar_t>(upfirdn2d_math::output_at(x, taps, idx, minor, ax, ay));
  }
}

}  // namespace

at::Tensor upfirdn2d_cuda(const at::Tensor& x_in, const at::Tensor& kernel_in, int64_t up_x, int64_t up_y,
                          int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                          int64_t pad_y1) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // channels_last (and not also contiguous, as when C == 1 or H == W == 1): read and written in place.
  const bool channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  const at::Tensor kernel = kernel_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t kernel_h = kernel.size(0), kernel_w = kernel.size(1);
  const int64_t out_h = upfirdn2d_math::out_size(in_h, up_y, down_y, pad_y0, pad_y1, kernel_h);
  const int64_t out_w = upfirdn2d_math::out_size(in_w, up_x, down_x, pad_x0, pad_x1, kernel_w);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "upfirdn2d: empty output (", out_h, "x", out_w, ")");
  // Positions along an axis (in * up + pads) are computed in int.
  TORCH_CHECK(in_h * up_y + std::abs(pad_y0) + std::abs(pad_y1) + kernel_h < (int64_t(1) << 30) &&
                  in_w * up_x + std::abs(pad_x0) + std::abs(pad_x1) + kernel_w < (int64_t(1) << 30),
              "upfirdn2d: spatial extent too large");
  at::Tensor out = at::empty({n, c, out_h, out_w}, x.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const int64_t total = n * c * out_h * out_w;
  if (total == 0) return out;
  const int64_t minor = channels_last ? c : 1;  // [N, H, W, C] or [N * C, H, W, 1] (upfirdn2d_math.h)
  const Axis ax{static_cast<int>(in_w), static_cast<int>(out_w), static_cast<int>(kernel_w),
                static_cast<int>(up_x), static_cast<int>(down_x), static_cast<int>(pad_x0)};
  const Axis ay{static_cast<int>(in_h), static_cast<int>(out_h), static_cast<int>(kernel_h),
                static_cast<int>(up_y), static_cast<int>(down_y), static_cast<int>(pad_y0)};
  const int64_t blocks = std::min((total + kThreads - 1) / kThreads, kMaxBlocks);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "upfirdn2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shared = kernel_h * kernel_w * static_cast<int64_t>(sizeof(acc_t));
    TORCH_CHECK(shared <= kMaxSharedBytes, "upfirdn2d: FIR kernel too large (", kernel_h, "x", kernel_w, ")");
    upfirdn2d_kernel<scalar_t><<<blocks, kThreads, shared, stream>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), total, minor, ax, ay);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
