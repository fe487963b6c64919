// CUDA forward of upfirdn2d (see op/upfirdn2d.py for the definition and the adjoint used in backward).
//
// One thread per output sample. Along each axis, output o reads the padded, zero-inserted signal at
// a = o * down - pad0 + t for the taps t = 0..k-1 (weight K[k - 1 - t]: a true convolution). Only taps with
// a % up == 0 and 0 <= a / up < in hit an input sample, so the loops start at the first such tap and step
// by `up` (polyphase): no zero is ever multiplied. The FIR kernel is staged in shared memory per block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest
constexpr int64_t kMaxSharedBytes = 48 * 1024;

struct Axis {
  int in;    // input length
  int out;   // output length
  int taps;  // kernel length
  int up;
  int down;
  int pad0;
};

// Taps [first, end) (step up) of output o along `axis` that land on input samples; sample = (start + t) / up.
__device__ __forceinline__ void tap_range(const Axis& axis, int o, int& start, int& first, int& end) {
  start = o * axis.down - axis.pad0;               // zero-inserted index of tap 0
  const int lo = start < 0 ? -start : 0;            // taps before the signal starts
  const int phase = (start + lo) % axis.up;         // start + lo >= 0
  first = lo + (phase == 0 ? 0 : axis.up - phase);  // first tap on a multiple of up
  end = min(axis.taps, axis.in * axis.up - start);  // start + t < in * up
}

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ kernel, int64_t planes, Axis ax, Axis ay) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* taps = reinterpret_cast<acc_t*>(shared_bytes);  // kernel [kh, kw] in acc_t
  const int kernel_numel = ay.taps * ax.taps;
  for (int t = threadIdx.x; t < kernel_numel; t += blockDim.x) taps[t] = static_cast<acc_t>(kernel[t]);
  __syncthreads();

  const int64_t total = planes * ay.out * ax.out;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int ox = static_cast<int>(idx % ax.out);
    const int oy = static_cast<int>((idx / ax.out) % ay.out);
    const int64_t plane = idx / (static_cast<int64_t>(ax.out) * ay.out);
    int start_y, first_y, end_y, start_x, first_x, end_x;
    tap_range(ay, oy, start_y, first_y, end_y);
    tap_range(ax, ox, start_x, first_x, end_x);
    const scalar_t* x_plane = x + plane * ay.in * ax.in;
    acc_t sum = acc_t(0);
    for (int ty = first_y; ty < end_y; ty += ay.up) {
      const scalar_t* x_row = x_plane + static_cast<int64_t>((start_y + ty) / ay.up) * ax.in;
      const acc_t* k_row = taps + (ay.taps - 1 - ty) * ax.taps;
      for (int tx = first_x; tx < end_x; tx += ax.up) {
        sum += static_cast<acc_t>(x_row[(start_x + tx) / ax.up]) * k_row[ax.taps - 1 - tx];
      }
    }
    out[idx] = static_cast<scalar_t>(sum);
  }
}

int64_t out_size(int64_t in, int64_t up, int64_t down, int64_t pad0, int64_t pad1, int64_t taps) {
  const int64_t span = in * up + pad0 + pad1 - taps;
  return span < 0 ? 0 : span / down + 1;
}

}  // namespace

at::Tensor upfirdn2d_cuda(const at::Tensor& x_in, const at::Tensor& kernel_in, int64_t up_x, int64_t up_y,
                          int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                          int64_t pad_y1) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor kernel = kernel_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t kernel_h = kernel.size(0), kernel_w = kernel.size(1);
  const int64_t out_h = out_size(in_h, up_y, down_y, pad_y0, pad_y1, kernel_h);
  const int64_t out_w = out_size(in_w, up_x, down_x, pad_x0, pad_x1, kernel_w);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "upfirdn2d: empty output (", out_h, "x", out_w, ")");
  // Positions along an axis (in * up + pads) are computed in int.
  TORCH_CHECK(in_h * up_y + std::abs(pad_y0) + std::abs(pad_y1) + kernel_h < (int64_t(1) << 30) &&
                  in_w * up_x + std::abs(pad_x0) + std::abs(pad_x1) + kernel_w < (int64_t(1) << 30),
              "upfirdn2d: spatial extent too large");
  at::Tensor out = at::empty({n, c, out_h, out_w}, x.options());
  const int64_t planes = n * c;
  if (planes == 0) return out;
  const Axis ax{static_cast<int>(in_w), static_cast<int>(out_w), static_cast<int>(kernel_w),
                static_cast<int>(up_x), static_cast<int>(down_x), static_cast<int>(pad_x0)};
  const Axis ay{static_cast<int>(in_h), static_cast<int>(out_h), static_cast<int>(kernel_h),
                static_cast<int>(up_y), static_cast<int>(down_y), static_cast<int>(pad_y0)};
  const int64_t total = planes * out_h * out_w;
  const int64_t blocks = std::min((total + kThreads - 1) / kThreads, kMaxBlocks);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "upfirdn2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shared = kernel_h * kernel_w * static_cast<int64_t>(sizeof(acc_t));
    TORCH_CHECK(shared <= kMaxSharedBytes, "upfirdn2d: FIR kernel too large (", kernel_h, "x", kernel_w, ")");
    upfirdn2d_kernel<scalar_t><<<blocks, kThreads, shared, stream>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), planes, ax, ay);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
