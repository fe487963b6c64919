"""StyleGAN2 building blocks (Karras et al. 2020), with rosinality's names and state-dict layout.

Shared by model.py (generator, discriminators), style_encoder.py (MLP heads) and psp_encoder/ (style
heads). Equalized learning rate everywhere: weights are stored at N(0, 1) (divided by lr_mul) and scaled
at run time.
"""
import math

import torch
from torch import nn

from op import FusedLeakyReLU, fused_leaky_relu, upfirdn2d
from op import precision


def at_least_float32(t):
    """t in float32 when its dtype is narrower (float16, bfloat16), else t itself (float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2 over dim 1) + 1e-8): first layer of each mapping MLP.

    Computed in at least float32: in float16 a small code's x^2 and the 1e-8 both flush to zero and
    0 * rsqrt(0) is NaN (a float16 style transfer gave NaN images on a GPU this way)."""

    def forward(self, x):
        x32 = at_least_float32(x)
        return (x32 * torch.rsqrt(torch.mean(x32 ** 2, dim=1, keepdim=True) + 1e-8)).to(x.dtype)


def make_kernel(k):
    """1-D taps -> normalised 2-D FIR kernel (outer product, sums to 1)."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class Upsample(nn.Module):
    """2x FIR up-sampling (ToRGB skip path). Buffer ``kernel`` = make_kernel(k) * factor^2."""

    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Downsample(nn.Module):
    """2x FIR down-sampling, the counterpart of Upsample (the release defines it; no network here uses it)."""

    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=1, down=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR filter with padding; after a transposed conv (upsample_factor 2) or before a strided one."""

    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


def blur_before_stride2(blur_kernel, kernel_size):
    """The FIR blur before a stride-2 k x k convolution (a 2x down-sampling conv): pads so that the
    output is half the input."""
    p = (len(blur_kernel) - 2) + (kernel_size - 1)
    return Blur(blur_kernel, pad=((p + 1) // 2, p // 2))


class ScaledLeakyReLU(nn.Module):
    """leaky_relu(x, negative_slope) * sqrt(2) with no bias (the release's name; ConvLayer's activation
    when its convolution has no bias)."""

    def __init__(self, negative_slope=0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return fused_leaky_relu(x, None, self.negative_slope)


class EqualConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x):
        return precision.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear layer with equalized lr: y = x (W * lr_mul / sqrt(in))^T + b * lr_mul.

    activation='fused_lrelu' applies the bias inside the fused leaky ReLU (slope 0.2, gain sqrt 2).
    """

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0, lr_mul=1, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.weight.numel() > precision.LARGE_WEIGHT:
            # (x * scale) W^T == x (W * scale)^T: scaling the [N, in] input avoids a weight-sized temporary
            # (1.25 GB for E_style's 610,304 x 512 layer, whose input needs no gradient).
            out = precision.linear(x * self.scale, self.weight)
        else:
            # The release's order. The stored W is randn / lr_mul (std 100 in the mapping networks): with the
            # scale on x instead, float16 autocast's backward would form grad_out @ W at sqrt(in) / lr_mul
            # (~2,300) times the true input gradient and overflow, defeating GradScaler.
            out = precision.linear(x, self.weight * self.scale)
        if self.activation:
            return fused_leaky_relu(out, bias)
        return out if bias is None else out + bias.to(out.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}, activation={self.activation}"


class ModulatedConv2d(nn.Module):
    """Modulated (and demodulated) convolution, StyleGAN2 Eq. 1-3.

    Per-sample weights W'_b = W * s_b / sqrt(in*k*k), s_b = modulation(w_b); demodulation divides each
    output filter by sqrt(sum W'^2 + 1e-8). upsample: transposed conv with stride 2, then a FIR blur
    (pad (1, 1) for k = 3).

    Two exact formulations of the same function:
    - fused=False (default): for a batch, modulate the activations, x * s_b, run one convolution with
      the shared weight, scale the output by the demodulation coefficients (computed from s_b^2 and
      sum_k W^2): no per-sample weight tensors, much cheaper at low resolution and for batches. For a
      single sample, fold s and the demodulation into the one weight instead (cheaper than two passes
      over the activations at high resolution).
    - fused=True: build the per-sample weights and run one grouped convolution over the batch (the
      release's path). Both agree to float rounding; tests check them against a per-sample loop.

    downsample: FIR blur, then a stride-2 convolution (in the release's signature; the generator does not
    use it).
    """

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True, upsample=False,
                 downsample=False, blur_kernel=(1, 3, 3, 1), fused=False):
        super().__init__()
        if upsample and downsample:
            raise ValueError("ModulatedConv2d: upsample and downsample exclude each other")
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        self.fused = fused
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            self.blur = blur_before_stride2(blur_kernel, kernel_size)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def extra_repr(self):
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, demodulate={self.demodulate}, "
                f"upsample={self.upsample}, downsample={self.downsample}, fused={self.fused}")

    def forward(self, x, style):
        s = self.modulation(style)  # [B, in]
        if self.fused:
            return self._forward_grouped(x, s)
        batch = x.shape[0]
        w = self.weight[0] * self.scale  # [out, in, k, k]
        # sum_(i,k) (W s)^2 = s^2 @ sum_k W^2: the demodulation without per-sample weights.
        # The demodulation and the one-sample weight in at least float32, autocast or not: in float16 the
        # sum overflows for large styles and the 1e-8 flushes to zero.
        s32, w32 = at_least_float32(s), at_least_float32(w)
        demod = None
        if self.demodulate:
            with torch.autocast(s.device.type, enabled=False):
                demod = torch.rsqrt(s32.pow(2) @ w32.pow(2).sum([2, 3]).t() + self.eps)  # [B, out]
        if batch == 1:
            # One sample: scale the [out, in, k, k] weight instead of two full-size activations (1.7x
            # faster per layer at 1024 px on CPU).
            w = w32 * s32.view(1, -1, 1, 1)  # [out, in, k, k]
            if demod is not None:
                w = w * demod.view(-1, 1, 1, 1)
            return self._conv(x, w.to(x.dtype))
        out = self._conv(x * s.view(batch, -1, 1, 1).to(x.dtype), w)
        if demod is not None:
            out = out * demod.view(batch, -1, 1, 1).to(out.dtype)
        return out

    def _conv(self, x, w):
        """x [B, in, H, W] with the shared weight w [out, in, k, k] -> [B, out, H', W']."""
        if self.upsample:
            return self.blur(precision.conv_transpose2d(x, w.transpose(0, 1), stride=2))
        if self.downsample:
            return precision.conv2d(self.blur(x), w, stride=2)
        return precision.conv2d(x, w, padding=self.padding)

    def _forward_grouped(self, x, s):
        if self.downsample:
            x = self.blur(x)
        batch, in_channel, height, width = x.shape
        weight = self.scale * self.weight * s.view(batch, 1, in_channel, 1, 1)  # [B, out, in, k, k]
        if self.demodulate:
            demod = torch.rsqrt(at_least_float32(weight).pow(2).sum([2, 3, 4]) + self.eps)  # >= float32, as above
            weight = weight * demod.to(weight.dtype).view(batch, self.out_channel, 1, 1, 1)
        k = self.kernel_size
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = precision.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)
        weight = weight.view(batch * self.out_channel, in_channel, k, k)
        if self.downsample:
            out = precision.conv2d(x, weight, stride=2, groups=batch)
        else:
            out = precision.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """x + weight * noise; fresh N(0, 1) noise per sample when none is given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        # In the image's dtype: under autocast the float32 weight (and a float32 noise buffer) would
        # otherwise promote the sum, and every activation after it, to float32.
        return image + self.weight.to(image.dtype) * noise.to(image.dtype)


def channels_last_(module):
    """Store every 4-D parameter and buffer of `module` channels_last (except per-channel biases), in
    place; returns the module. Generator and the discriminators do this to themselves on construction.

    Module.to(memory_format=...) cannot do this here: it also converts 5-D tensors (the modulated
    convolutions' [1, out, in, k, k] weights) and fails on them. The activations of the synthesis are
    channels_last in any case (ConstantInput), as are those of the style encoder and pSp (their
    forwards); channels_last weights save oneDNN a reorder per call for the plain convolutions (the
    discriminators' and encoders'). Values are unchanged.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.ndim == 4 and tensor.shape[0] * tensor.shape[2] * tensor.shape[3] > 1:
                # Per-channel biases [1, C, 1, 1] stay as they are: their gradients (sums over N, H, W)
                # come back contiguous. empty_like, not .contiguous(): the exact channels_last strides
                # also on size-1 dimensions ([out, in, 1, 1] weights), those of the gradients the
                # convolutions return (DDP's buckets take the parameters' strides and warn otherwise).
                tensor.data = torch.empty_like(tensor.data, memory_format=torch.channels_last).copy_(tensor.data)
    return module


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent):
        """latent: the W+ codes [B, n_latent, 512] (the release's call) or the batch size B."""
        batch = latent if isinstance(latent, int) else latent.shape[0]
        # The synthesis runs channels_last whatever the parameters' layout: every convolution, transposed
        # convolution and FIR blur after this one follows its input's layout, and oneDNN / cuDNN are
        # faster in it (CPU: ~1.2x float32, ~2x bfloat16). A plain Generator is as fast as one prepared
        # by layers.channels_last_; values are the same up to float rounding.
        return self.input.repeat(batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)  # [B, C, size, size]


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + leaky ReLU."""

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False,
                 blur_kernel=(1, 3, 3, 1), demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        out = self.conv(x, style)
        out = self.noise(out, noise=noise)
        return self.activate(out)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB, plus the FIR-upsampled skip image."""

    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU, or ScaledLeakyReLU without bias]; keys .0/.1/.2 as
    rosinality (fixes the D layout).

    The convolution has no bias of its own when an activation follows (the activation holds it).
    """

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False, blur_kernel=(1, 3, 3, 1),
                 bias=True, activate=True):
        layers = []
        if downsample:
            layers.append(blur_before_stride2(blur_kernel, kernel_size))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel) if bias else ScaledLeakyReLU())
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Discriminator residual block: two 3x3 convs (the second downsamples) + 1x1 skip, / sqrt 2."""

    def __init__(self, in_channel, out_channel, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, blur_kernel=blur_kernel,
                              activate=False, bias=False)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return (out + self.skip(x)) / math.sqrt(2)
