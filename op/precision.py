"""Convolutions and matrix products in bfloat16 / float16 on CPUs without native kernels for them.

On a CPU whose oneDNN has no bfloat16 (float16) support (no AVX-512 BF16 / AMX, e.g. an AVX2-only
machine), PyTorch runs a bfloat16 convolution through its generic fallback (`_slow_conv2d_forward`,
one im2col + scalar GEMM per group: 1553 calls for one 32 px generator forward, the depthwise FIR blurs
one per channel) and a bfloat16 matmul without a packed kernel: 20-100x slower than float32. Autocast
reaches these paths for any module that calls F.conv2d / F.linear / matmul, whatever its layout.

`lowp_emulated(x)` tells when that happens: the dtype the op would run in (the autocast dtype, else the
tensor's) is bfloat16/float16, the tensor is on the CPU, and the CPU has no native kernel. The ops here
then round their inputs to that dtype (as autocast casts them; float64 ones stay as they are), compute in
float32 with autocast off and round the result once: the numbers a native low-precision kernel gives (it
too multiplies the rounded inputs, accumulates in float32 and rounds once; only the order of the sums
may differ), the same output dtype, at float32 speed. Everywhere else (CUDA, a CPU with native support,
float32) they are the plain torch op.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def cpu_native_lowp(dtype_name):
    """True when this CPU's oneDNN has native kernels for 'bfloat16' / 'float16' (a property of the
    machine, read once)."""
    probe = "_is_mkldnn_bf16_supported" if dtype_name == "bfloat16" else "_is_mkldnn_fp16_supported"
    try:  # a private probe: a torch without it (or without oneDNN) counts as no native kernels
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def op_dtype(x):
    """The dtype a convolution / matmul of `x` runs in: the autocast dtype of x's device when autocast
    is on there (x of floating type other than float64, which autocast leaves alone), else x's own dtype."""
    device = x.device.type
    if (x.is_floating_point() and x.dtype != torch.float64 and device in ("cpu", "cuda")
            and torch.is_autocast_enabled(device)):
        return torch.get_autocast_dtype(device)
    return x.dtype


def lowp_emulated(x):
    """The low-precision dtype (bfloat16 / float16) an op on `x` would run in without a native CPU kernel,
    or None when the plain op is fine (CUDA, float32, or a CPU with native support)."""
    if x.device.type != "cpu":
        return None
    dtype = op_dtype(x)
    if dtype not in LOW_PRECISION or cpu_native_lowp(str(dtype).removeprefix("torch.")):
        return None
    return dtype


def _rounded(t, dtype):
    """t rounded to `dtype` as autocast would cast it (float64 untouched), held in float32."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype).float()


def lowp_safe(op, x, *tensors, **kwargs):
    """op(x, *tensors, **kwargs) on inputs rounded to the low-precision dtype, computed in float32 and
    rounded once, when lowp_emulated(x) says the low-precision op would take the slow path (see the
    module docstring)."""
    dtype = lowp_emulated(x)
    if dtype is None:
        return op(x, *tensors, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out = op(_rounded(x, dtype), *[_rounded(t, dtype) for t in tensors], **kwargs)
    return out.to(dtype)


def conv2d(x, weight, bias=None, **kwargs):
    """F.conv2d, low-precision safe on the CPU (lowp_safe)."""
    return lowp_safe(F.conv2d, x, weight, bias, **kwargs)


def conv_transpose2d(x, weight, bias=None, **kwargs):
    """F.conv_transpose2d, low-precision safe on the CPU (lowp_safe)."""
    return lowp_safe(F.conv_transpose2d, x, weight, bias, **kwargs)


# A low-precision weight larger than this is multiplied as it is: converting it to float32 on every call
# (E_style's 610,304 x 512 layer: 1.25 GB in float32) costs more than the slower low-precision GEMM, whose
# penalty is large only for small products (1 x 512 x 512: 100x; 8 x 9,536 x 512: 2x).
LARGE_WEIGHT = 2 ** 24


def linear(x, weight, bias=None):
    """F.linear, low-precision safe on the CPU (lowp_safe), except for large low-precision weights."""
    if weight.numel() > LARGE_WEIGHT and weight.dtype in LOW_PRECISION:
        return F.linear(x, weight, bias)
    return lowp_safe(F.linear, x, weight, bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same arguments, parameters and state-dict keys) whose convolution is low-precision
    safe on the CPU: for the VGG-19 of the style encoder and the IR-SE-50 of pSp."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                      groups=self.groups)
