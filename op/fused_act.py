"""Fused bias + leaky ReLU, the activation of StyleGAN2 (Karras et al., CVPR 2020, App. B) used by
BlendGAN's StyledConv and EqualLinear layers:

    fused_leaky_relu(x, b) = leaky_relu(x + b.view(1, C, 1, ...), negative_slope) * scale

with the bias broadcast along dim 1 and `scale = sqrt(2)` restoring the signal gain of the leaky ReLU.

Two implementations of the same function: `fused_leaky_relu_ref` (differentiable torch ops, used on CPU
and as the fallback) and the CUDA kernels in fused_bias_act*.cu/.cpp wrapped in autograd Functions
whose backward is again a fused kernel, so derivatives of every order exist (R1 and path-length
regularisation differentiate through the activation twice).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from op.build import select_impl

EXTENSION = "fused_bias_act"


def _check_args(x, bias):
    if x.ndim < 2:
        raise ValueError(f"fused_leaky_relu needs x of rank >= 2 ([N, C, ...]), got shape {tuple(x.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != x.shape[1]):
        raise ValueError(f"bias must have shape [C] = [{x.shape[1]}], got {tuple(bias.shape)}")


def fused_leaky_relu_ref(x, bias, negative_slope=0.2, scale=2 ** 0.5):
    """Reference: leaky_relu(x + bias, negative_slope) * scale; x [N, C, ...], bias [C] or None."""
    _check_args(x, bias)
    if bias is not None:
        x = x + bias.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))  # [1, C, 1, ...]
        if not x.requires_grad:
            # Inference: x is our own temporary, so activate and scale it in place (no two more
            # full-size allocations; at 1024 px each is 128 MB of fresh pages).
            return F.leaky_relu_(x, negative_slope).mul_(scale)
    return F.leaky_relu(x, negative_slope) * scale


class _LeakyReLUGrad(torch.autograd.Function):
    """grad_x = grad_out * (ref * ref_sign > 0 ? scale : negative_slope * scale).

    `ref` is the saved forward output: its sign (times the sign of `scale`) is the sign of x + bias, so
    nothing else is kept. The map is linear in grad_out with a factor that is constant almost
    everywhere, so its backward is this same op applied to the incoming gradient and it has no gradient
    w.r.t. `ref`: each further order of differentiation reuses it.
    """

    @staticmethod
    def forward(ctx, grad_out, ref, negative_slope, scale, ref_sign, kernels):
        ctx.save_for_backward(ref)
        ctx.args = (negative_slope, scale, ref_sign, kernels)
        return kernels.leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign)

    @staticmethod
    def backward(ctx, grad_grad):
        (ref,) = ctx.saved_tensors
        return _LeakyReLUGrad.apply(grad_grad, ref, *ctx.args), None, None, None, None, None


class _FusedBiasLeakyReLU(torch.autograd.Function):
    """CUDA forward; the backward is `_LeakyReLUGrad` on the saved output, the bias gradient its sum."""

    @staticmethod
    def forward(ctx, x, bias, negative_slope, scale, kernels):
        out = kernels.fused_bias_leaky_relu(x, bias, negative_slope, scale)
        ctx.save_for_backward(out)
        ctx.args = (negative_slope, scale, 1.0 if scale >= 0 else -1.0, kernels)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        # The derivative w.r.t. the saved output is zero almost everywhere: detach it.
        grad_x = _LeakyReLUGrad.apply(grad_out, out.detach(), *ctx.args)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_x.sum(dim=[0, *range(2, grad_x.ndim)])  # [C]
        return grad_x, grad_bias, None, None, None


def fused_bias_leaky_relu_with(kernels, x, bias, negative_slope=0.2, scale=2 ** 0.5):
    """The autograd wrapper around an extension module `kernels` (the compiled one on CUDA; tests pass an
    emulation of it to check the wiring on CPU)."""
    _check_args(x, bias)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    args = (bias, float(negative_slope), float(scale), kernels)
    x_last = x.movedim(1, -1)  # [N, ..., C]
    if x.ndim > 2 and not x.is_contiguous() and x_last.is_contiguous():
        # channels_last (the networks' layout): the kernels see it as [N * H * W, C] with the bias on dim 1,
        # a view, so nothing is copied to NCHW and back; the output (and its gradient) stays channels_last.
        out = _FusedBiasLeakyReLU.apply(x_last.reshape(-1, x.shape[1]), *args)  # [N * H * W, C]
        return out.view(x_last.shape).movedim(-1, 1)
    return _FusedBiasLeakyReLU.apply(x, *args)


def fused_leaky_relu(x, bias, negative_slope=0.2, scale=2 ** 0.5, impl="auto"):
    """leaky_relu(x + bias.view(1, C, 1, ...), negative_slope) * scale.

    x: [N, C, ...] (rank >= 2, e.g. [N, C] after EqualLinear or [N, C, H, W]); bias: [C] or None.
    impl: 'auto' (CUDA kernel on CUDA tensors when it builds, else the reference), 'ref' or 'cuda'.
    """
    _check_args(x, bias)
    kernels = select_impl(impl, EXTENSION, (x, bias))
    if kernels is None:
        return fused_leaky_relu_ref(x, bias, negative_slope, scale)
    return fused_bias_leaky_relu_with(kernels, x, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias followed by the scaled leaky ReLU; the bias (zeros at init) is the state-dict
    key `bias`, as in the official checkpoints (`*.activate.bias`).

    The release's signature (channel, negative_slope, scale); ``bias`` is keyword-only, since rosinality's
    later op put it second: a positional bool there is refused rather than read as the slope.
    """

    def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5, *, bias=True, impl="auto"):
        super().__init__()
        if isinstance(negative_slope, bool):
            raise TypeError("FusedLeakyReLU(channel, negative_slope=0.2, scale=sqrt(2), *, bias=True): "
                            f"negative_slope={negative_slope}; pass bias by keyword")
        if bias:
            self.bias = nn.Parameter(torch.zeros(channel))  # [C]
        else:
            self.register_parameter("bias", None)
        self.channel = channel
        self.negative_slope = negative_slope
        self.scale = scale
        self.impl = impl

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale, impl=self.impl)

    def extra_repr(self):
        return (f"{self.channel}, bias={self.bias is not None}, negative_slope={self.negative_slope}, "
                f"scale={self.scale:.4g}")
