// The index math of the upfirdn2d kernel: which input samples and FIR taps make one output sample.
// Shared by the CUDA kernel (upfirdn2d_kernel.cu) and a host build that tests it on the CPU against the
// PyTorch reference (tests/test_op.py, tests/upfirdn2d_host.cpp), so it uses no CUDA or ATen types.
//
// Along each axis, output o reads the padded, zero-inserted signal at a = o * down - pad0 + t for the taps
// t = 0..k-1 (weight K[k - 1 - t]: a true convolution). Only taps with a % up == 0 and 0 <= a / up < in hit
// an input sample, so the loops start at the first such tap and step by `up` (polyphase): no zero is ever
// multiplied.
//
// Memory layout of x and of the output: [major, H, W, minor], element (m, y, x, c) at
// ((m * H + y) * W + x) * minor + c. A contiguous [N, C, H, W] tensor is [N * C, H, W, 1] (one plane per
// channel); a channels_last one is [N, H, W, C] (neighbouring threads read neighbouring channels).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define UPFIRDN2D_HD __host__ __device__ __forceinline__
#else
#define UPFIRDN2D_HD inline
#endif

namespace upfirdn2d_math {

struct Axis {
  int in;    // input length
  int out;   // output length
  int taps;  // kernel length
  int up;
  int down;
  int pad0;
};

// Output length along one axis ((in * up + pad0 + pad1 - taps) / down + 1), 0 when nothing is left.
UPFIRDN2D_HD int64_t out_size(int64_t in, int64_t up, int64_t down, int64_t pad0, int64_t pad1, int64_t taps) {
  const int64_t span = in * up + pad0 + pad1 - taps;
  return span < 0 ? 0 : span / down + 1;
}

// Taps [first, end) (step up) of output o along `axis` that land on input samples; sample = (start + t) / up.
UPFIRDN2D_HD void tap_range(const Axis& axis, int o, int& start, int& first, int& end) {
  start = o * axis.down - axis.pad0;               // zero-inserted index of tap 0
  const int lo = start < 0 ? -start : 0;            // taps before the signal starts
  const int phase = (start + lo) % axis.up;         // start + lo >= 0
  first = lo + (phase == 0 ? 0 : axis.up - phase);  // first tap on a multiple of up
  const int past = axis.in * axis.up - start;       // start + t < in * up
  end = axis.taps < past ? axis.taps : past;
}

// Output element `idx` (its offset in the output's memory) of upfirdn2d(x, K); taps = K [ky.taps, kx.taps]
// row-major, in the accumulation type.
template <typename scalar_t, typename acc_t>
UPFIRDN2D_HD acc_t output_at(const scalar_t* x, const acc_t* taps, int64_t idx, int64_t minor, const Axis& ax,
                             const Axis& ay) {
  const int64_t channel = minor == 1 ? 0 : idx % minor;
  const int64_t pixel = minor == 1 ? idx : idx / minor;  // (m * out_h + oy) * out_w + ox
  const int ox = static_cast<int>(pixel % ax.out);
  const int oy = static_cast<int>((pixel / ax.out) % ay.out);
  const int64_t major = pixel / (static_cast<int64_t>(ax.out) * ay.out);
  int start_y, first_y, end_y, start_x, first_x, end_x;
  tap_range(ay, oy, start_y, first_y, end_y);
  tap_range(ax, ox, start_x, first_x, end_x);
  const int64_t row_stride = static_cast<int64_t>(ax.in) * minor;
  const scalar_t* x_plane = x + major * ay.in * row_stride + channel;
  // start + first is a multiple of up and the taps step by up: the input sample goes up by exactly one per
  // step (no division inside the loops).
  const int first_ix = (start_x + first_x) / ax.up;
  int iy = (start_y + first_y) / ay.up;
  acc_t sum = acc_t(0);
  for (int ty = first_y; ty < end_y; ty += ay.up, ++iy) {
    const scalar_t* x_row = x_plane + iy * row_stride;
    const acc_t* k_row = taps + (ay.taps - 1 - ty) * ax.taps;
    int ix = first_ix;
    for (int tx = first_x; tx < end_x; tx += ax.up, ++ix) {
      sum += static_cast<acc_t>(x_row[ix * minor]) * k_row[ax.taps - 1 - tx];
    }
  }
  return sum;
}

}  // namespace upfirdn2d_math
