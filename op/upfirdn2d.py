"""upfirdn2d: upsample, FIR-filter, downsample (StyleGAN2, Karras et al., CVPR 2020, App. B; the
resampling filters follow Zhang, "Making convolutional networks shift-invariant again", ICML 2019).

Per axis, for x [N, C, H, W] and a 2-D FIR kernel K [kh, kw]:
  1. zero insertion: u[a * up] = x[a], zeros in between (length in * up, the last up - 1 are zeros);
  2. pad with p0 zeros in front and p1 behind (a negative pad crops);
  3. TRUE convolution with K ('valid' part), i.e. cross-correlation with K flipped on both axes;
  4. keep every down-th sample.
Output size per axis: (in * up + p0 + p1 - k) // down + 1.

`upfirdn2d_ref` is the reference (differentiable torch ops: one zero-insertion view, one pad, one
depthwise conv2d (groups = C, the kernel repeated per channel) with the stride doing the downsampling;
the depthwise form is 8x (20x in channels_last) faster on CPU than one single-channel conv over N*C
planes and gives identical numbers). The CUDA kernel computes
the forward only; its adjoint is upfirdn2d again with the flipped kernel, up and down swapped and the
pads adjusted (`adjoint_pad`), so the autograd Function calls itself in its backward and derivatives of
every order come out of one kernel.
"""

import torch
import torch.nn.functional as F

from op.build import select_impl
from op.precision import conv2d

EXTENSION = "upfirdn2d"


def _pair(value, name):
    """int or (x, y) -> (x, y) of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (x, y) pair of them, got {value!r}")
    return pair


def _pads(pad):
    """(p0, p1) for both axes, or (x0, x1, y0, y1) -> (x0, x1, y0, y1)."""
    pad = tuple(pad)
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    if len(pad) != 4 or not all(isinstance(p, int) for p in pad):
        raise ValueError(f"pad must be (p0, p1) or (x0, x1, y0, y1) ints, got {pad!r}")
    return pad


def out_size(size, up, down, pad0, pad1, taps):
    """Output length along one axis."""
    return (size * up + pad0 + pad1 - taps) // down + 1


def adjoint_pad(in_size, out_len, up, down, pad0, taps):
    """Pads (q0, q1) along one axis such that upfirdn2d(g, flip(K), up=down, down=up, pad=(q0, q1)) is the
    adjoint (the input gradient) of upfirdn2d(., K, up, down, pad=(pad0, .)) with an input of length
    in_size and an output of length out_len.

    Forward: y[o] = sum_m x[m] K[k - 1 - (m * up + pad0 - o * down)]. The call above evaluates
    sum_o g[o] K[o * down + q0 - m * up], equal to the transposed sum when q0 = k - 1 - pad0; q1 makes
    its output length (out_len * down + q0 + q1 - k) // up + 1 come out as in_size.
    """
    q0 = taps - 1 - pad0
    q1 = in_size * up - out_len * down + pad0 - up + 1
    return q0, q1


def _parse(x, kernel, up, down, pad):
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d needs x of shape [N, C, H, W], got {tuple(x.shape)}")
    if kernel.ndim != 2:
        raise ValueError(f"upfirdn2d needs a 2-D FIR kernel [kh, kw], got shape {tuple(kernel.shape)}")
    up, down, pad = _pair(up, "up"), _pair(down, "down"), _pads(pad)
    out_h = out_size(x.shape[2], up[1], down[1], pad[2], pad[3], kernel.shape[0])
    out_w = out_size(x.shape[3], up[0], down[0], pad[0], pad[1], kernel.shape[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d output would be empty: input {tuple(x.shape[2:])}, kernel "
                         f"{tuple(kernel.shape)}, up {up}, down {down}, pad {pad} -> {out_h}x{out_w}")
    return up, down, pad


def upfirdn2d_ref(x, kernel, up=1, down=1, pad=(0, 0)):
    """Reference upfirdn2d from differentiable torch ops. x [N, C, H, W], kernel [kh, kw]."""
    (up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1) = _parse(x, kernel, up, down, pad)
    n, c, h, w = x.shape
    kernel_h, kernel_w = kernel.shape
    if up_x > 1 or up_y > 1:
        # Zero insertion: every sample followed by up - 1 zeros on each axis.
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up_x - 1, 0, 0, 0, up_y - 1))  # [N, C, H, up_y, W, up_x]
        x = x.reshape(n, c, h * up_y, w * up_x)
    # Pad first, then crop (negative pads): a crop may exceed the signal it would see before padding.
    pads = (pad_x0, pad_x1, pad_y0, pad_y1)
    x = F.pad(x, [max(p, 0) for p in pads])
    if min(pads) < 0:
        x = F.pad(x, [min(p, 0) for p in pads])
    # True convolution = correlation with the flipped kernel, the same filter on every channel
    # (depthwise); the stride keeps every down-th sample.
    weight = kernel.to(x.dtype).flip([0, 1]).expand(c, 1, kernel_h, kernel_w)
    return conv2d(x, weight, stride=(down_y, down_x), groups=c)  # [N, C, out_h, out_w]


class _UpFirDn2d(torch.autograd.Function):
    """Forward by the extension's kernel; backward = the same Function with the adjoint arguments."""

    @staticmethod
    def forward(ctx, x, kernel, up, down, pad, kernels):
        out = kernels.upfirdn2d(x, kernel, *up, *down, *pad)
        ctx.save_for_backward(kernel)
        ctx.args = (up, down, pad, x.shape[2], x.shape[3], kernels)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (kernel,) = ctx.saved_tensors
        (up_x, up_y), (down_x, down_y), (pad_x0, _, pad_y0, _), in_h, in_w, kernels = ctx.args
        kernel_h, kernel_w = kernel.shape
        grad_pad = (*adjoint_pad(in_w, grad_out.shape[3], up_x, down_x, pad_x0, kernel_w),
                    *adjoint_pad(in_h, grad_out.shape[2], up_y, down_y, pad_y0, kernel_h))
        grad_x = _UpFirDn2d.apply(grad_out, kernel.flip([0, 1]), (down_x, down_y), (up_x, up_y), grad_pad,
                                  kernels)
        return grad_x, None, None, None, None, None


def upfirdn2d_with(kernels, x, kernel, up=1, down=1, pad=(0, 0)):
    """The autograd wrapper around an extension module `kernels` (the compiled one on CUDA; tests pass an
    emulation of it to check the adjoint on CPU). No gradient w.r.t. the FIR kernel."""
    up, down, pad = _parse(x, kernel, up, down, pad)
    return _UpFirDn2d.apply(x, kernel.to(x.dtype), up, down, pad, kernels)


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0), impl="auto"):
    """Upsample by `up`, pad by `pad`, convolve with the FIR `kernel`, downsample by `down`.

    x: [N, C, H, W]; kernel: [kh, kw]; up, down: int or (x, y); pad: (p0, p1) for both axes or
    (x0, x1, y0, y1), negative values crop. Returns [N, C, out_h, out_w] with
    out = (in * up + p0 + p1 - k) // down + 1 per axis.
    impl: 'auto' (CUDA kernel on CUDA tensors when it builds, else the reference), 'ref' or 'cuda'. The
    CUDA path does not differentiate w.r.t. `kernel`: 'auto' takes the reference when `kernel` requires
    grad, 'cuda' raises.
    """
    _parse(x, kernel, up, down, pad)
    kernels = select_impl(impl, EXTENSION, (x, kernel))
    if kernels is not None and kernel.requires_grad and torch.is_grad_enabled():
        if impl == "cuda":
            raise NotImplementedError("the CUDA upfirdn2d has no gradient w.r.t. the FIR kernel; "
                                      "use impl='ref' or a kernel that does not require grad")
        kernels = None
    if kernels is None:
        return upfirdn2d_ref(x, kernel, up, down, pad)
    return upfirdn2d_with(kernels, x, kernel, up, down, pad)
