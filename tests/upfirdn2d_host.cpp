// The CUDA upfirdn2d kernel's index math (op/upfirdn2d_math.h) run on the CPU, one output at a time in
// memory order as the kernel's threads run them, so tests/test_op.py can compare it with the PyTorch
// reference without a GPU. Built with the system C++ compiler and called through ctypes.
#include "../op/upfirdn2d_math.h"

namespace {

upfirdn2d_math::Axis axis(int64_t in, int64_t out, int64_t taps, int64_t up, int64_t down, int64_t pad0) {
  return {static_cast<int>(in), static_cast<int>(out), static_cast<int>(taps), static_cast<int>(up),
          static_cast<int>(down), static_cast<int>(pad0)};
}

}  // namespace

extern "C" {

// Output size (out_h, out_w) of upfirdn2d on an [.., in_h, in_w] input.
void upfirdn2d_host_out_size(int64_t in_h, int64_t in_w, int64_t kernel_h, int64_t kernel_w, int64_t up_x,
                             int64_t up_y, int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1,
                             int64_t pad_y0, int64_t pad_y1, int64_t* out_hw) {
  out_hw[0] = upfirdn2d_math::out_size(in_h, up_y, down_y, pad_y0, pad_y1, kernel_h);
  out_hw[1] = upfirdn2d_math::out_size(in_w, up_x, down_x, pad_x0, pad_x1, kernel_w);
}

// out = upfirdn2d(x, kernel) in float64; x and out are [major, H, W, minor] in memory (upfirdn2d_math.h),
// kernel is [kernel_h, kernel_w] row-major.
void upfirdn2d_host(double* out, const double* x, const double* kernel, int64_t major, int64_t minor,
                    int64_t in_h, int64_t in_w, int64_t kernel_h, int64_t kernel_w, int64_t up_x, int64_t up_y,
                    int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_y0, int64_t out_h,
                    int64_t out_w) {
  const upfirdn2d_math::Axis ax = axis(in_w, out_w, kernel_w, up_x, down_x, pad_x0);
  const upfirdn2d_math::Axis ay = axis(in_h, out_h, kernel_h, up_y, down_y, pad_y0);
  const int64_t total = major * out_h * out_w * minor;
  for (int64_t idx = 0; idx < total; ++idx) {
    out[idx] = upfirdn2d_math::output_at(x, kernel, idx, minor, ax, ay);
  }
}

// The one output element at memory offset `idx` of upfirdn2d over a float32 x (as the kernel reads a
// float tensor), for offsets past 2^31 without computing the whole output.
double upfirdn2d_host_at(const float* x, const double* kernel, int64_t idx, int64_t minor, int64_t in_h,
                         int64_t in_w, int64_t kernel_h, int64_t kernel_w, int64_t up_x, int64_t up_y,
                         int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_y0, int64_t out_h,
                         int64_t out_w) {
  return upfirdn2d_math::output_at(x, kernel, idx, minor, axis(in_w, out_w, kernel_w, up_x, down_x, pad_x0),
                                   axis(in_h, out_h, kernel_h, up_y, down_y, pad_y0));
}

}  // extern "C"
