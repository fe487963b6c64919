"""BlendGAN generator and discriminators (paper Sec. 3.2-3.3), drop-in compatible with the release.

Generator: StyleGAN2 synthesis (rosinality layout) driven by a face code z_f (mapping MLP ``style``) and
a style code z_s from the style encoder ``embedder`` (mapping MLP ``embedding``), mixed per layer by the
weighted blending module (WBM, ``add_weight``). State-dict keys, constructor arguments, forward keywords
and return values are the release's (see shared/reference/official_checkpoint_format.md).
"""
import math
import random

import torch
from torch import nn

from layers import (
    Blur, ConstantInput, ConvLayer, Downsample, EqualConv2d, EqualLinear, ModulatedConv2d, NoiseInjection,
    PixelNorm, ResBlock, ScaledLeakyReLU, StyledConv, ToRGB, Upsample, at_least_float32, channels_last_,
    make_kernel)
from op import FusedLeakyReLU, fused_leaky_relu, upfirdn2d
from style_encoder import StyleEncoder

__all__ = [  # the release's model.py namespace: code written against it imports these from here
    "Generator", "Discriminator", "ProjectionDiscriminator", "StyleEncoder", "Blur", "ConstantInput", "ConvLayer",
    "Downsample", "EqualConv2d", "EqualLinear", "FusedLeakyReLU", "ModulatedConv2d", "NoiseInjection", "PixelNorm",
    "ResBlock", "ScaledLeakyReLU", "StyledConv", "ToRGB", "Upsample", "fused_leaky_relu", "make_kernel",
    "upfirdn2d"]

# Generator keys that a plain StyleGAN2 file (rosinality's layout) lacks: the style encoder, the style
# mapping MLP and the WBM weights.
BLENDGAN_ONLY_KEYS = ("embedder.", "embedding.", "add_weight")


def stylegan2_channels(channel_multiplier):
    """Feature maps per resolution of StyleGAN2 config-f (channel_multiplier 2)."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


def n_latent_for(size):
    """Number of W+ entries at an output size: 2*log2(size) - 2 (18 at 1024, 10 at 64)."""
    return int(math.log2(size)) * 2 - 2


class Noises(nn.Module):
    """The stored noise maps ``noise_j`` [1, 1, 2^r, 2^r], r = (j + 5) // 2 (persistent buffers)."""

    def __init__(self, num_layers):
        super().__init__()
        for j in range(num_layers):
            r = (j + 5) // 2
            self.register_buffer(f"noise_{j}", torch.randn(1, 1, 2 ** r, 2 ** r))

    def __getitem__(self, j):
        return getattr(self, f"noise_{j}")


class _ClampForUse(torch.autograd.Function):
    """clamp(x, 0, 1) forward, identity backward.

    The release clamps ``add_weight`` in place and then uses the parameter itself, so its values are
    clamped while its gradient is the plain one; a clamp in the graph would give zero gradient at the
    bounds, and the WBM weights start at exactly 1, so they would never train.
    """

    @staticmethod
    def forward(ctx, x):
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad


def wbm_face_weight(add_weight, add_weight_index=None, theta=None):
    """The weighted blending module's per-layer FACE weight A [1, n_latent, 1] (paper Eq. 4-5).

    Paper:   w = w_s * a + w_f * (1 - a),  a_j = alpha_j * m_j(i),  m_j = 0 (j < i), theta (j = i), 1 (j > i).
    Release: w = w_f * A + w_s * (1 - A)   with the stored ``add_weight`` = A = 1 - alpha (face weight),
             A_j forced to 1 for j < i, and no theta (it behaves as theta = 1).
    So alpha_j = 1 - add_weight_j. With theta set, the boundary layer j = i gets the style weight
    theta * alpha_i, i.e. A_i = 1 - theta * (1 - add_weight_i); every other layer is the release's.
    The stored weight is used clamped to [0, 1] (the release clamps the parameter in place; a clamped
    copy gives the same numbers without a side effect, and passes the gradient through as the release
    does: see _ClampForUse). Training keeps the parameter itself in [0, 1] after each optimizer step.
    i = None and i = 0 blend every layer; i >= n_latent gives exactly the natural face; negative i
    follows Python slicing as in the release.
    """
    a = _ClampForUse.apply(add_weight)
    if add_weight_index is None:
        if theta is not None:
            raise ValueError("theta needs an indicator (add_weight_index)")
        return a
    i = add_weight_index
    a = a.clone()
    a[:, :i] = 1
    if theta is not None:
        n_latent = a.shape[1]
        j = i if i >= 0 else n_latent + i
        if 0 <= j < n_latent:
            a[:, j] = 1 - theta * (1 - a[:, j])
    return a


class Generator(nn.Module):
    """BlendGAN generator G(z_f, z_s, i).

    size: output resolution; style_dim: width of codes and of the style encoder output (512 in the
    release); n_mlp: layers of each mapping MLP. load_pretrained_vgg: ImageNet VGG-19 for the embedded
    style encoder (False when a checkpoint supplies it, as for every released ``g_ema``).
    """

    def __init__(self, size, style_dim, n_mlp, channel_multiplier=2, blur_kernel=(1, 3, 3, 1), lr_mlp=0.01,
                 load_pretrained_vgg=True, vgg_ckpt=None, style_pool_size=256):
        super().__init__()
        blur_kernel = tuple(blur_kernel)
        self.size = size
        self.style_dim = style_dim
        self.log_size = int(math.log2(size))
        if 2 ** self.log_size != size or size < 8:
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        self.n_latent = n_latent_for(size)
        self.num_layers = (self.log_size - 2) * 2 + 1
        # WBM weights (face weight per layer, see wbm_face_weight); ones = an untrained G ignores z_s.
        self.add_weight = nn.Parameter(torch.ones(1, self.n_latent, 1))
        self.embedder = StyleEncoder(style_dim, 4, load_pretrained_vgg=load_pretrained_vgg, vgg_ckpt=vgg_ckpt,
                                     pool_size=style_pool_size)
        self.embedding = self.mapping(style_dim, n_mlp, lr_mlp)  # z_s -> w_s
        self.style = self.mapping(style_dim, n_mlp, lr_mlp)  # z_f -> w_f

        self.channels = stylegan2_channels(channel_multiplier)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel
        self.noises = Noises(self.num_layers)
        # The activations are channels_last (ConstantInput); 4-D parameters in the same layout get their
        # gradients in the layout DDP's buckets expect and spare oneDNN a weight reorder (layers.channels_last_).
        channels_last_(self)

    @staticmethod
    def mapping(style_dim, n_mlp, lr_mlp):
        """PixelNorm + n_mlp EqualLinear(lr_mul=lr_mlp, fused lrelu); keys ``1..n_mlp``."""
        return nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu")
                                            for _ in range(n_mlp)])

    def make_noise(self):
        """Fresh noise maps, one per layer, [1, 1, H, W] (as rosinality)."""
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            noises += [torch.randn(1, 1, 2 ** i, 2 ** i, device=device) for _ in range(2)]
        return noises

    def mean_latent(self, n_latent, generator=None):
        """Mean of ``style`` over n_latent random z_f: the truncation centre, [1, style_dim]."""
        z = torch.randn(n_latent, self.style_dim, device=self.input.input.device, generator=generator)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z):
        """Face mapping z_f -> w_f."""
        return self.style(z)

    def get_z_embed(self, image):
        """Style code z_s of an image [N, 3, H, W] in [-1, 1], without gradients (as the release)."""
        with torch.no_grad():
            return self.embedder(image)

    def blend(self, latent_face, latent_style, add_weight_index=None, theta=None):
        """WBM: [N, n_latent, 512] face and style W+ -> blended W+ (see wbm_face_weight)."""
        a = wbm_face_weight(self.add_weight, add_weight_index, theta)  # [1, n_latent, 1]
        return latent_face * a + latent_style * (1 - a)

    def synthesis(self, latent, noise):
        """StyleGAN2 synthesis from W+ [N, n_latent, style_dim]; noise: list of num_layers maps or Nones."""
        if len(noise) != self.num_layers:  # zip() below would stop early: a smaller image, no error
            raise ValueError(f"noise: {len(noise)} maps given, the {self.size} px generator has {self.num_layers} "
                             f"noise layers")
        out = self.input(latent)  # [N, C, 4, 4], channels_last
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                        self.to_rgbs):
            out = conv1(out, latent[:, i], noise=noise1)
            out = conv2(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        # The image leaves in the standard layout, as the release's does: code written against it calls
        # .view() on it (a 12 MB copy at 1024 px, next to a forward of ~10^12 FLOPs).
        return skip.contiguous()  # [N, 3, size, size]

    def forward(self, styles=None, return_latents=False, inject_index=None, truncation=1, truncation_latent=None,
                input_is_latent=False, noise=None, randomize_noise=True, style_image=None, z_embed=None,
                only_return_z_embed=False, add_weight_index=None, theta=None):
        """G(z_f, z_s, i), the release's keyword API (format notes Sec. 3), plus ``theta`` (Eq. 5).

        styles: list of face codes ([N, 512] z, or W/W+ with input_is_latent); two codes = style mixing
        at inject_index. style_image ([N, 3, H, W], [-1, 1]) or z_embed ([N, 512]) give the style branch.
        Returns (image, None), or with return_latents (image, latent) / (image, latent, z_embed).
        """
        if only_return_z_embed and style_image is not None:
            return self.get_z_embed(style_image)
        if styles is None:
            raise ValueError("styles (a list of face codes) is required")
        if not input_is_latent:
            styles = [self.style(s) for s in styles]

        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else [self.noises[j] for j in range(self.num_layers)]

        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]

        if len(styles) < 2:
            s = styles[0]
            latent = s.unsqueeze(1).repeat(1, self.n_latent, 1) if s.ndim < 3 else s  # [N, n_latent, 512]
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            s0, s1 = styles[0], styles[1]
            s0 = s0.unsqueeze(1).repeat(1, inject_index, 1) if s0.ndim < 3 else s0[:, :inject_index]
            s1 = (s1.unsqueeze(1).repeat(1, self.n_latent - inject_index, 1) if s1.ndim < 3
                  else s1[:, inject_index:])
            latent = torch.cat([s0, s1], 1)

        if z_embed is None and style_image is not None:
            z_embed = self.get_z_embed(style_image)
        if z_embed is not None:
            latent_style = self.embedding(z_embed).unsqueeze(1).repeat(1, self.n_latent, 1)
            latent = self.blend(latent, latent_style, add_weight_index, theta)

        image = self.synthesis(latent, noise)
        if not return_latents:
            return image, None
        if z_embed is not None:
            return image, latent, z_embed
        return image, latent


def discriminator_trunk(size, channel_multiplier, blur_kernel):
    """fromRGB 1x1 conv + ResBlocks down to 4x4 (``convs``); returns (module, out channels)."""
    channels = stylegan2_channels(channel_multiplier)
    convs = [ConvLayer(3, channels[size], 1)]
    in_channel = channels[size]
    for i in range(int(math.log2(size)), 2, -1):
        out_channel = channels[2 ** (i - 1)]
        convs.append(ResBlock(in_channel, out_channel, blur_kernel))
        in_channel = out_channel
    return nn.Sequential(*convs), in_channel


def minibatch_stddev(x, group_size=4, n_feat=1):
    """Append the minibatch standard deviation feature map (StyleGAN's Sec. 3 of ProGAN).

    The group is the largest divisor of the batch not above group_size (rosinality's min(batch, 4)
    whenever that divides the batch, which is the only case rosinality accepts).
    """
    batch, channel, height, width = x.shape
    group = min(batch, group_size)
    while batch % group:
        group -= 1
    # At least float32: in float16 the 1e-8 vanishes, a zero variance gives sqrt'(0) = inf and NaN gradients.
    y = at_least_float32(x.view(group, -1, n_feat, channel // n_feat, height, width))
    y = torch.sqrt(y.var(0, unbiased=False) + 1e-8)
    y = y.mean([2, 3, 4], keepdim=True).squeeze(2)  # [batch/group, n_feat, 1, 1]
    y = y.repeat(group, 1, height, width).to(x.dtype)
    return torch.cat([x, y], 1)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator (D_face and D_style): image [N, 3, size, size] -> logit [N, 1]."""

    def __init__(self, size, channel_multiplier=2, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.convs, in_channel = discriminator_trunk(size, channel_multiplier, tuple(blur_kernel))
        self.stddev_group = 4
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channel + 1, 512, 3)
        self.final_linear = nn.Sequential(EqualLinear(512 * 4 * 4, 512, activation="fused_lrelu"),
                                          EqualLinear(512, 1))
        channels_last_(self)  # as the activations (forward): faster convolutions, gradients in DDP's layout

    def forward(self, image):
        image = image.contiguous(memory_format=torch.channels_last)
        out = minibatch_stddev(self.convs(image), self.stddev_group, self.stddev_feat)
        out = self.final_conv(out)
        return self.final_linear(out.reshape(out.shape[0], -1))  # [N, 512*4*4], (C, H, W) order in any layout


class ProjectionDiscriminator(nn.Module):
    """D_style_latent (paper Sec. 3.3): does the image match the style code z_s? (projection D, Miyato 2018)

    h = sum over space of the 4x4 features; logit = l_out(h) + <l_style(z_s), h>.
    """

    def __init__(self, size, style_dim=512, channel_multiplier=2, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.convs, in_channel = discriminator_trunk(size, channel_multiplier, tuple(blur_kernel))
        self.stddev_group = 4
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channel + 1, 512, 3)
        self.l_out = EqualLinear(in_channel, 1)
        self.l_style = EqualLinear(style_dim, in_channel)
        channels_last_(self)  # as the activations (forward): faster convolutions, gradients in DDP's layout

    def forward(self, image, style):
        image = image.contiguous(memory_format=torch.channels_last)
        out = minibatch_stddev(self.convs(image), self.stddev_group, self.stddev_feat)
        h = self.final_conv(out).sum(dim=(2, 3))  # [N, 512]
        return self.l_out(h) + (self.l_style(style) * h).sum(dim=1, keepdim=True)


def infer_generator_config(state_dict):
    """Generator arguments a g_ema state dict was made for: dict(size, style_dim, n_mlp, channel_multiplier).

    channel_multiplier is None when it cannot be told (sizes below 64 share their channel counts).
    Raises KeyError/IndexError when the dict is not a generator's; a StyleGAN2 generator's (no add_weight,
    no embedding.*) is read too.
    """
    # one ToRGB per resolution above 4 px: counted, not read from add_weight, which a StyleGAN2 file lacks
    n_to_rgbs = len([k for k in state_dict if k.startswith("to_rgbs.") and k.endswith(".conv.weight")])
    size = 2 ** (n_to_rgbs + 2)
    n_mlp = len([k for k in state_dict if k.startswith("style.") and k.endswith(".weight")])
    last = n_to_rgbs - 1
    in_ch = state_dict[f"to_rgbs.{last}.conv.weight"].shape[2]
    cm = in_ch / stylegan2_channels(1)[size] if size >= 64 else None
    return dict(size=size, style_dim=state_dict["style.1.weight"].shape[0], n_mlp=n_mlp,
                channel_multiplier=int(cm) if cm and cm == int(cm) else None)


def guess_generator_config(state_dict):
    """infer_generator_config as a sentence for error messages ('' when the dict is not a generator's)."""
    try:
        cfg = infer_generator_config(state_dict)
    except (KeyError, IndexError, AttributeError):
        return ""
    cm = f", channel_multiplier={cfg['channel_multiplier']}" if cfg["channel_multiplier"] else ""
    return f"The file looks like Generator(size={cfg['size']}, style_dim={cfg['style_dim']}, n_mlp={cfg['n_mlp']}{cm})"
