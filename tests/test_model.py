"""model.py / style_encoder.py / checkpoint.py against the release's schema and independent computations."""
import itertools
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, save_checkpoint
from conftest import reference_file
from layers import EqualLinear, ModulatedConv2d, channels_last_
from model import Discriminator, Generator, ProjectionDiscriminator, guess_generator_config, wbm_face_weight
from style_encoder import VGG19_TAPS, Projector, StyleEncoder, VGGFeatureExtractor, gram_dim


def schema_rows(name):
    with open(reference_file("official_checkpoint_schema.json", env="BLENDGAN_SCHEMA")) as f:
        mod = json.load(f)["modules"][name]
    rows = [r for group in mod["groups"].values() for r in group]
    return mod, rows


def test_missing_reference_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    missing = str(tmp_path / "absent.json")
    monkeypatch.setenv("BLENDGAN_SCHEMA", missing)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent.json"):
        reference_file("official_checkpoint_schema.json", env="BLENDGAN_SCHEMA")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{missing} is missing.*CI=true"):
        reference_file("official_checkpoint_schema.json", env="BLENDGAN_SCHEMA")
    present = tmp_path / "present.json"
    present.write_text("{}")
    monkeypatch.setenv("BLENDGAN_SCHEMA", str(present))
    assert reference_file("official_checkpoint_schema.json", env="BLENDGAN_SCHEMA") == str(present)


@pytest.mark.parametrize("name,build", [
    ("Generator_1024", lambda: Generator(1024, 512, 8, channel_multiplier=2, load_pretrained_vgg=False)),
    ("Discriminator_1024", lambda: Discriminator(1024, channel_multiplier=2)),
    ("ProjectionDiscriminator_1024", lambda: ProjectionDiscriminator(1024, style_dim=512, channel_multiplier=2)),
    ("StyleEncoder", lambda: StyleEncoder(512, 4, load_pretrained_vgg=False)),
    ("Projector", lambda: Projector(512, 4)),
])
def test_state_dict_matches_release_schema(name, build):
    mod, rows = schema_rows(name)
    with torch.device("meta"):
        net = build()
    sd = net.state_dict()
    assert list(sd.keys()) == [r[0] for r in rows]  # same keys, same (registration) order
    for key, shape, dtype, kind in rows:
        assert list(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == "torch." + dtype, key
    params = dict(net.named_parameters())
    assert {r[0] for r in rows if r[3] == "parameter"} == set(params)
    assert sum(v.numel() for v in sd.values()) == mod["n_elements"]


def test_gram_dim_is_derived():
    assert gram_dim() == 610304 == 64 ** 2 + 128 ** 2 + 256 ** 2 + 512 ** 2 + 512 ** 2
    assert gram_dim({"relu1_2": 3, "relu2_2": 8}) == 64 ** 2 + 128 ** 2
    # counted without building layers: no random numbers drawn (exact resume of the trainers' RNG state)
    state = torch.get_rng_state()
    gram_dim()
    assert torch.equal(state, torch.get_rng_state())
    with torch.device("meta"):
        enc = StyleEncoder(512, 4, load_pretrained_vgg=False)
    assert tuple(enc.embedder_mlp[0].weight.shape) == (512, 610304)


def small_generator(seed=0, size=16, style_dim=16, **kw):
    torch.manual_seed(seed)
    g = Generator(size, style_dim, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32, **kw)
    with torch.no_grad():  # trained-like WBM weights, some outside [0, 1] to exercise the clamp
        g.add_weight.copy_(torch.linspace(-0.3, 1.3, g.n_latent).view(1, -1, 1))
        for conv in list(g.convs) + [g.conv1]:
            conv.noise.weight.fill_(0.1)
    return g


def test_wbm_matches_release_semantics():
    g = small_generator()
    n = g.n_latent
    torch.manual_seed(1)
    z = torch.randn(2, 16)
    z_embed = torch.randn(2, 16)
    w_f = g.style(z).unsqueeze(1).repeat(1, n, 1)
    w_s = g.embedding(z_embed).unsqueeze(1).repeat(1, n, 1)
    before = g.add_weight.detach().clone()
    for i in [None, 0, 1, 3, n - 1, n, n + 2, -1]:
        a = before.clone().clamp_(0, 1)  # the release: clamp in place, then A[:, :i] = 1
        if i is not None:
            a[:, :i] = 1
        expected = w_f * a + w_s * (1 - a)
        _, latent, ze = g([z], z_embed=z_embed, add_weight_index=i, return_latents=True, randomize_noise=False)
        assert torch.equal(latent, expected), i
        assert ze is z_embed
    assert torch.equal(g.add_weight, before)  # forward never writes the parameter

    nat, _ = g([z], randomize_noise=False)
    for i in (n, n + 3):
        img, _ = g([z], z_embed=z_embed, add_weight_index=i, randomize_noise=False)
        assert torch.equal(img, nat)
    a0, _ = g([z], z_embed=z_embed, add_weight_index=0, randomize_noise=False)
    an, _ = g([z], z_embed=z_embed, add_weight_index=None, randomize_noise=False)
    assert torch.equal(a0, an)


def test_wbm_weights_get_the_release_gradient_at_the_bounds():
    aw = torch.tensor([1.0, 0.0, 0.5, 1.4, -0.2]).view(1, 5, 1).requires_grad_(True)
    a = wbm_face_weight(aw)
    assert torch.equal(a.detach(), aw.detach().clamp(0, 1))
    (a * torch.arange(1.0, 6.0).view(1, 5, 1)).sum().backward()
    # the release uses the (in-place clamped) parameter itself: the gradient is the plain one everywhere
    assert torch.equal(aw.grad.view(-1), torch.arange(1.0, 6.0))


def test_wbm_theta_only_changes_boundary_layer():
    aw = torch.tensor([0.2, 0.5, 0.7, 0.1, 0.9, 0.4]).view(1, 6, 1)
    base = wbm_face_weight(aw, 2)
    for theta in (0.0, 0.3, 1.0):
        a = wbm_face_weight(aw, 2, theta)
        alpha = 1 - aw  # the paper's alpha
        assert torch.allclose(1 - a[0, 2], theta * alpha[0, 2])  # style weight at j = i is theta * alpha_i
        keep = [0, 1, 3, 4, 5]
        assert torch.equal(a[:, keep], base[:, keep])
    assert torch.equal(wbm_face_weight(aw, 2, 1.0), base)
    assert torch.equal(wbm_face_weight(aw, 6, 0.5), torch.ones(1, 6, 1))
    a = wbm_face_weight(aw, -1, 0.5)  # boundary counted from the end, like the slicing
    assert torch.allclose(a[0, 5], 1 - 0.5 * (1 - aw[0, 5]))


def test_forward_returns_truncation_mixing_and_noise():
    g = small_generator()
    n = g.n_latent
    torch.manual_seed(2)
    z1, z2 = torch.randn(3, 16), torch.randn(3, 16)
    out = g([z1])
    assert len(out) == 2 and out[1] is None and out[0].shape == (3, 3, 16, 16)
    img, latent = g([z1], return_latents=True, randomize_noise=False)
    assert torch.equal(latent, g.style(z1).unsqueeze(1).repeat(1, n, 1))
    # truncation on the face branch only, before mixing
    t = g.mean_latent(64)
    assert t.shape == (1, 16)
    _, lat = g([z1, z2], inject_index=3, truncation=0.5, truncation_latent=t, return_latents=True)
    w1, w2 = [t + 0.5 * (g.style(z) - t) for z in (z1, z2)]
    assert torch.allclose(lat[:, :3], w1.unsqueeze(1).expand(-1, 3, -1))
    assert torch.allclose(lat[:, 3:], w2.unsqueeze(1).expand(-1, n - 3, -1))
    # truncation >= 1 is ignored; W+ input used as is
    wplus = torch.randn(3, n, 16)
    _, lat = g([wplus], input_is_latent=True, truncation=1.5, truncation_latent=t, return_latents=True)
    assert torch.equal(lat, wplus)
    # stored noise is deterministic, random noise is not; explicit noise wins
    a, _ = g([z1], randomize_noise=False)
    b, _ = g([z1], randomize_noise=False)
    c, _ = g([z1], randomize_noise=True)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    stored = [g.noises[j] for j in range(g.num_layers)]
    d, _ = g([z1], noise=stored)
    assert torch.equal(a, d)
    with pytest.raises(ValueError, match=f"noise: 3 maps given, the 16 px generator has {g.num_layers}"):
        g([z1], noise=stored[:3])  # (it returned a 4x4 image)
    assert [tuple(x.shape) for x in g.make_noise()] == [tuple(x.shape) for x in stored]
    # mean_latent: the same numbers drawn from a seeded generator give the same centre
    m1 = g.mean_latent(32, generator=torch.Generator().manual_seed(5))
    m2 = g.style(torch.randn(32, 16, generator=torch.Generator().manual_seed(5))).mean(0, keepdim=True)
    assert torch.equal(m1, m2)


def reference_linear(x, weight, bias, lr_mul, activate):
    """EqualLinear written out: x (W lr_mul / sqrt(in))^T + b lr_mul, then leaky ReLU(0.2) * sqrt(2)."""
    out = x @ (weight * lr_mul / math.sqrt(weight.shape[1])).t() + bias * lr_mul
    return F.leaky_relu(out, 0.2) * math.sqrt(2) if activate else out


def fir_kernel(gain=1):
    """The [1, 3, 3, 1] FIR kernel as a 4x4 filter summing to ``gain``."""
    k = torch.tensor([1., 3., 3., 1.], dtype=torch.float64)
    return torch.outer(k, k) / 64 * gain


def reference_fir(x, kernel, pad):
    """True 2-D convolution of every channel with ``kernel`` after zero padding (p0, p1) on each side."""
    c = x.shape[1]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    return F.conv2d(x, kernel.flip(0, 1).to(x.dtype).expand(c, 1, *kernel.shape).contiguous(), groups=c)


def zero_insert(x):
    """[N, C, H, W] -> [N, C, 2H, 2W] with the samples at even positions."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return up


def reference_modulated_conv(x, conv, style):
    """Per-sample loop: StyleGAN2 Eq. 1-3 written out, upsampling by zero-insertion + FIR (independent path)."""
    outs = []
    for b in range(x.shape[0]):
        s = reference_linear(style[b:b + 1], conv.modulation.weight, conv.modulation.bias, 1, False)[0]  # [in]
        w = conv.weight[0] * s.view(1, -1, 1, 1) / math.sqrt(conv.in_channel * conv.kernel_size ** 2)
        if conv.demodulate:
            w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xb = x[b:b + 1]
        if conv.downsample:
            # FIR blur with the pads that halve the size (4 - 2 + k - 1 in all), then a stride-2 valid conv
            p = 4 - 2 + conv.kernel_size - 1
            y = F.conv2d(reference_fir(xb, fir_kernel(), ((p + 1) // 2, p // 2)), w, stride=2)
        elif conv.upsample:
            # transposed conv stride 2 == zero-insert then conv with the flipped kernel, full padding
            n, c, h, wd = xb.shape
            up = xb.new_zeros(n, c, 2 * h - 1, 2 * wd - 1)
            up[..., ::2, ::2] = xb
            k = conv.kernel_size
            y = F.conv2d(F.pad(up, (k - 1,) * 4), w.flip(2, 3))
            y = reference_fir(y, fir_kernel(gain=4), (1, 1))  # blur, gain 4 (the zero-inserted samples)
        else:
            y = F.conv2d(xb, w, padding=conv.kernel_size // 2)
        outs.append(y)
    return torch.cat(outs)


def reference_generator(g, z, z_embed=None, index=None, psi=1.0, centre=None):
    """StyleGAN2 + WBM written out with torch.nn.functional from g's parameters (float64): mapping MLPs
    (PixelNorm, lr_mul 0.01), truncation of the face code, the release's blend (face weight A =
    clamp(add_weight), A[:, :i] = 1), then the synthesis: 4x4 constant, per resolution an up-sampling and a
    plain modulated conv (each + weight * noise, bias, leaky ReLU * sqrt 2) and ToRGB (+ bias, + the 2x FIR
    up-sampled skip: zero insertion, pads (2, 1), gain 4); latents 0, 1 then (i, i+1, i+2) per block."""
    def mapping(code, mlp):
        x = code / torch.sqrt(code.pow(2).mean(1, keepdim=True) + 1e-8)
        for lin in list(mlp)[1:]:
            x = reference_linear(x, lin.weight, lin.bias, 0.01, True)
        return x

    def styled_conv(x, layer, w, noise):
        out = reference_modulated_conv(x, layer.conv, w) + layer.noise.weight * noise
        return F.leaky_relu(out + layer.activate.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def to_rgb(x, layer, w, skip):
        out = reference_modulated_conv(x, layer.conv, w) + layer.bias
        return out if skip is None else out + reference_fir(zero_insert(skip), fir_kernel(gain=4), (2, 1))

    w_f = mapping(z, g.style)  # [N, dim]
    if centre is not None:
        w_f = centre + psi * (w_f - centre)
    latent = w_f.unsqueeze(1).repeat(1, g.n_latent, 1)  # [N, n_latent, dim]
    if z_embed is not None:
        a = g.add_weight.clamp(0, 1).clone()  # [1, n_latent, 1]
        if index is not None:
            a[:, :index] = 1
        latent = latent * a + mapping(z_embed, g.embedding).unsqueeze(1) * (1 - a)
    noise = [getattr(g.noises, f"noise_{j}") for j in range(g.num_layers)]
    x = g.input.input.repeat(z.shape[0], 1, 1, 1)
    x = styled_conv(x, g.conv1, latent[:, 0], noise[0])
    skip = to_rgb(x, g.to_rgb1, latent[:, 1], None)
    for k, rgb in enumerate(g.to_rgbs):
        x = styled_conv(x, g.convs[2 * k], latent[:, 1 + 2 * k], noise[1 + 2 * k])
        x = styled_conv(x, g.convs[2 * k + 1], latent[:, 2 + 2 * k], noise[2 + 2 * k])
        skip = to_rgb(x, rgb, latent[:, 3 + 2 * k], skip)
    return skip


def test_generator_matches_written_out_stylegan2():
    """The whole forward against reference_generator, with every bias, noise strength and WBM weight
    non-trivial (trained-like), truncation at the scripts' 0.75, several indicators and the natural face."""
    g = small_generator(size=32).double()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # every layer its own face weight (two outside [0, 1]): each latent row differs when blended
        g.add_weight.copy_(torch.tensor([0.2, 0.7, 1.3, -0.2, 0.5, 0.9, 0.1, 0.6]).view(1, 8, 1))
        for name, p in g.named_parameters():
            if name.startswith("embedder."):
                continue
            if name.startswith(("style.", "embedding.")) and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 30)  # x lr_mul 0.01
            elif name.endswith("modulation.bias"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("bias") or name.endswith("noise.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    z = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    z_embed = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    centre = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    cases = [dict(), dict(z_embed=z_embed), dict(z_embed=z_embed, index=3), dict(z_embed=z_embed, index=-2),
             dict(z_embed=z_embed, index=4, psi=0.75, centre=centre)]
    with torch.no_grad():
        for case in cases:
            want = reference_generator(g, z, **case)
            got, _ = g([z], z_embed=case.get("z_embed"), add_weight_index=case.get("index"),
                       truncation=case.get("psi", 1), truncation_latent=case.get("centre"), randomize_noise=False)
            assert want.shape == got.shape == (2, 3, 32, 32)
            assert torch.allclose(got, want, rtol=0, atol=1e-9 * want.abs().max()), case


def test_modulated_conv_matches_per_sample_reference():
    g = small_generator().double()
    torch.manual_seed(3)
    # the release's signature: downsample before blur_kernel (a positional call); the generator has none
    down = ModulatedConv2d(6, 5, 3, 16, True, False, True, [1, 3, 3, 1]).double()
    assert down.blur.pad == (2, 2)  # 8 px + 4 - 3 (blur) = 9, stride-2 valid 3x3 conv -> 4 px
    with torch.no_grad():
        down.modulation.bias.uniform_(0.5, 1.5)
    # batch 2 modulates activations, batch 1 the weight (fused=False); fused=True is the grouped path
    for conv, batch in itertools.product((g.convs[0].conv, g.convs[1].conv, g.to_rgbs[0].conv, down), (1, 2)):
        x = torch.randn(batch, conv.in_channel, 8, 8, dtype=torch.float64)
        style = torch.randn(batch, 16, dtype=torch.float64)
        ref = reference_modulated_conv(x, conv, style)
        assert ref.shape[2] == {True: 4, False: 8}[conv.downsample] * (2 if conv.upsample else 1)
        for fused in (False, True):
            conv.fused = fused
            assert torch.allclose(conv(x, style), ref, atol=1e-10), (conv, batch, fused)
        conv.fused = False
    with pytest.raises(ValueError, match="exclude each other"):
        ModulatedConv2d(6, 5, 3, 16, upsample=True, downsample=True)


def test_release_namespace_and_calls():
    """Code written against the release: names it imports from model.py, ConstantInput called with the
    latent (its synthesis loop), and an output image in the standard layout (.view() on it works)."""
    import model as model_module
    import model_encoder
    assert (model_encoder.StyleEncoder, model_encoder.Projector) == (StyleEncoder, Projector)
    assert model_encoder.FeatureOutput._fields == ("relu1", "relu2", "relu3", "relu4", "relu5")
    for name in ("Downsample", "ScaledLeakyReLU", "FusedLeakyReLU", "fused_leaky_relu", "upfirdn2d",
                 "ModulatedConv2d", "StyledConv", "ToRGB", "EqualLinear", "ConstantInput", "Blur", "Upsample"):
        assert name in model_module.__all__ and hasattr(model_module, name), name
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ker = torch.tensor([1., 3., 3., 1.], dtype=torch.float64)
    ker = torch.outer(ker, ker) / ker.sum() ** 2
    # 2x FIR down-sampling = blur with pads (1, 1), keep every second sample
    want = F.conv2d(F.pad(x, (1, 1, 1, 1)), ker.expand(3, 1, 4, 4).contiguous(), groups=3)[..., ::2, ::2]
    assert torch.allclose(model_module.Downsample([1, 3, 3, 1]).double()(x), want, atol=1e-12)
    assert torch.allclose(model_module.ScaledLeakyReLU(0.2)(x), F.leaky_relu(x, 0.2) * math.sqrt(2), atol=1e-12)

    g = small_generator(size=16)
    z = torch.randn(2, 16)
    with torch.no_grad():
        image, latent = g([z], return_latents=True, randomize_noise=False)
    assert torch.equal(g.input(latent), g.input(2)) and g.input(latent).shape == (2, g.input.input.shape[1], 4, 4)
    assert image.is_contiguous() and image.view(2, -1).shape == (2, 3 * 16 * 16)
    assert isinstance(g.embedder.embedder.avg_pool, torch.nn.AdaptiveAvgPool2d)  # the release's name of its pooling


def test_release_model_encoder_and_psp_names(monkeypatch):
    """The rest of the release's model_encoder namespace: gram_matrix in its [N, C, C] shape, FeatureExtractor
    and StyleEmbedder with its constructors (ImageNet weights unless load_pretrained_vgg=False) and keys,
    PixelNorm; psp_encoders' GradualStyleBlock and EqualLinear."""
    import model_encoder
    from psp_encoder import encoders, psp_encoders
    from torchvision.models import vgg19

    torch.manual_seed(5)
    y = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    want = torch.einsum("nchw,ndhw->ncd", y, y) / (4 * 3 * 5)  # [2, 4, 4]
    got = model_encoder.gram_matrix(y)
    assert got.shape == (2, 4, 4) and torch.allclose(got.double(), want, rtol=1e-6)
    x = torch.randn(1, 3, 3, 8)
    assert torch.allclose(model_encoder.PixelNorm()(x), x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8))
    assert (psp_encoders.GradualStyleBlock, psp_encoders.EqualLinear) == (encoders.GradualStyleBlock, EqualLinear)

    vgg = vgg19()
    monkeypatch.setattr(model_encoder, "imagenet_vgg19_state_dict", lambda: vgg.state_dict())
    extractor, embedder = model_encoder.FeatureExtractor(), model_encoder.StyleEmbedder()
    for layers in (extractor.vgg_layers, embedder.feature_extractor.vgg_layers):
        assert all(torch.equal(layers[i].weight, vgg.features[i].weight) for i in (0, 34))
    random_extractor = model_encoder.FeatureExtractor(load_pretrained_vgg=False)
    assert not torch.equal(random_extractor.vgg_layers[0].weight, vgg.features[0].weight)
    assert list(embedder.state_dict()) == [f"feature_extractor.vgg_layers.{k}" for k in vgg.features[:36].state_dict()]
    img = torch.rand(1, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        feats = extractor(F.adaptive_avg_pool2d(img, (256, 256)))
        assert type(feats).__name__ == "FeatureOutput"
        flat = torch.cat([model_encoder.gram_matrix(f).reshape(1, -1) for f in feats], 1)  # the release's embedding
        assert flat.shape == (1, 610304) and torch.allclose(embedder(img), flat, rtol=1e-4, atol=1e-6 * flat.abs().max())


def test_release_image_conversions_cv2ten_and_ten2cv():
    """utils.cv2ten / ten2cv: the release's arithmetic and argument names. BGR uint8 [H, W, 3] -> RGB [1, 3, H, W]
    (x / 255 - 0.5) / 0.5 in float64, then float32; back: * 0.5 + 0.5, * 255 in float32, clamped, truncated
    to uint8, BGR. Unlike the release's ten2cv, the caller's tensor is left unchanged."""
    from utils import cv2ten, ten2cv

    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = torch.from_numpy(((bgr[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5).copy()).float()[None]
    got = cv2ten(img=bgr, device="cpu")
    assert got.dtype == torch.float32 and got.shape == (1, 3, 5, 7) and torch.equal(got, want)
    assert got[0, 0, 0, 0] == bgr[0, 0, 2] / 127.5 - 1  # channel 0 is red

    t = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2  # beyond [-1, 1]: clamped
    t[0, :, 0, 0] = torch.tensor([-1.0, 1.0, 0.0])
    before = t.clone()
    expect = (t[0] * 0.5 + 0.5).mul(255).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # RGB
    out = ten2cv(img_ten=t)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert np.array_equal(out, expect[:, :, ::-1]) and list(out[0, 0]) == [127, 255, 0]
    assert np.array_equal(ten2cv(t, bgr=False), expect) and torch.equal(t, before)
    assert np.abs(ten2cv(cv2ten(bgr)).astype(int) - bgr).max() <= 1  # the truncating cast may lose one level


def test_fresh_noise_is_drawn_per_sample_and_mixing_injects_after_the_first_layer(monkeypatch):
    """randomize_noise: each sample of a batch its own noise maps (the same z twice gives two images; as
    rosinality's). Style mixing draws the crossover in 1..n_latent-1 (0 would be no mixing) and takes layers
    inject_index: of the second code, also for W+ codes; theta without an indicator is an error."""
    import model as model_module

    g = small_generator(size=16)
    z = torch.randn(1, 16).repeat(2, 1)
    with torch.no_grad():
        image = g([z], randomize_noise=True)[0]
        assert (image[0] - image[1]).abs().max() > 1e-2
        assert torch.equal(*g([z], randomize_noise=False)[0])  # the same noise buffers: equal images

        drawn = []
        monkeypatch.setattr(model_module.random, "randint", lambda a, b: drawn.append((a, b)) or 3)
        numbered = [torch.arange(g.n_latent, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 16) + k
                    for k in (0, 100)]  # W+ codes whose rows say where they come from
        latent = g(numbered, input_is_latent=True, return_latents=True, randomize_noise=False)[1]
        assert drawn == [(1, g.n_latent - 1)]
        assert latent[0, :, 0].tolist() == [0, 1, 2] + [100 + j for j in range(3, g.n_latent)]
        with pytest.raises(ValueError, match="theta needs an indicator"):
            g([z], z_embed=torch.randn(2, 16), theta=0.5)


def test_bias_only_equal_linear_keeps_the_autocast_dtype():
    """Under autocast a bias-only EqualLinear (modulations, D's logit, D_style_latent's l_out / l_style) gives
    the autocast dtype; the float32 bias would otherwise promote its output back to float32."""
    torch.manual_seed(0)
    lin = EqualLinear(8, 4, bias_init=1)
    d = Discriminator(16, channel_multiplier=1)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        logit = d(torch.randn(2, 3, 16, 16))
    assert (out.dtype, logit.dtype) == (torch.bfloat16, torch.bfloat16)
    want = x @ (lin.weight * lin.scale).t() + lin.bias * lin.lr_mul  # float32
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_fused_and_activation_modulation_agree_on_whole_generator():
    g = small_generator(size=32)
    z = torch.randn(3, 16)
    z_embed = torch.randn(3, 16)
    a, _ = g([z], z_embed=z_embed, add_weight_index=2, randomize_noise=False)
    for m in g.modules():
        if hasattr(m, "fused"):
            m.fused = True
    b, _ = g([z], z_embed=z_embed, add_weight_index=2, randomize_noise=False)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_single_sample_and_channels_last_paths_match_batched_contiguous_generator():
    g = small_generator(size=32)
    z, z_embed = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        batched, _ = g([z], z_embed=z_embed, add_weight_index=2, randomize_noise=False)  # [3, 3, 32, 32]
        single = torch.cat([g([z[i:i + 1]], z_embed=z_embed[i:i + 1], add_weight_index=2, randomize_noise=False)[0]
                            for i in range(3)])
        channels_last_(g)
        layouts = []
        g.convs[-1].register_forward_hook(
            lambda m, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        cl_batched, _ = g([z], z_embed=z_embed, add_weight_index=2, randomize_noise=False)
        cl_single, _ = g([z[:1]], z_embed=z_embed[:1], add_weight_index=2, randomize_noise=False)
    tol = 1e-4 * batched.abs().max()
    assert (single - batched).abs().max() <= tol
    assert (cl_batched - batched).abs().max() <= tol
    assert (cl_single - batched[:1]).abs().max() <= tol
    assert layouts == [True, True]  # the layout really reaches the last convolution


def test_equal_linear_float16_backward_stays_finite_under_a_loss_scale(monkeypatch):
    """Under float16 autocast with GradScaler's scale on the loss, a mapping-network layer (lr_mul 0.01, W
    stored as randn / lr_mul) must give the input gradient in range: the backward's grad_out @ W has to be
    formed with the scaled weight. With the scale on x instead, that product is sqrt(in) / lr_mul = 2,263
    times the true gradient and overflows float16 (G's steps skipped, its scale collapsing)."""
    from layers import EqualLinear
    from op import precision

    monkeypatch.setattr(precision, "cpu_native_lowp", lambda name: True)  # the plain float16 ops, as on a GPU
    torch.manual_seed(0)
    lin = EqualLinear(512, 512, lr_mul=0.01, activation="fused_lrelu")
    with torch.no_grad():
        lin.bias.uniform_(-50, 50)  # trained-like biases (b * lr_mul of order 0.5)
    x = torch.randn(4, 512, requires_grad=True)
    upstream = torch.randn(4, 512) * 2 ** 10  # an O(1) gradient times a loss scale of 2^10
    with torch.autocast("cpu", dtype=torch.float16):
        out = lin(x)
    assert out.dtype == torch.float16
    (grad,) = torch.autograd.grad(out, x, upstream.half())
    (want,) = torch.autograd.grad(lin(x), x, upstream)  # float32
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_noise_injection_keeps_the_autocast_dtype():
    """x + w * noise in the activation's dtype: under autocast the float32 weight (and a float32 noise buffer)
    would promote every StyledConv output, and all that follows it, to float32 (twice the bytes)."""
    from layers import NoiseInjection

    noise_in = NoiseInjection()
    with torch.no_grad():
        noise_in.weight.fill_(0.3)
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for given in (noise, None):  # a stored float32 buffer, fresh noise
            assert noise_in(x.bfloat16(), given).dtype == torch.bfloat16
    torch.testing.assert_close(noise_in(x.bfloat16(), noise).float(), x + 0.3 * noise, rtol=2e-2, atol=2e-2)
    assert noise_in(x, noise).dtype == torch.float32
    torch.testing.assert_close(noise_in(x, noise), x + 0.3 * noise)
    g = small_generator()  # every StyledConv's output, under autocast
    dtypes = []
    for conv in [g.conv1, *g.convs]:
        conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        g([torch.randn(1, 16)], z_embed=torch.randn(1, 16), add_weight_index=6, randomize_noise=False)
    assert dtypes == [torch.bfloat16] * (1 + len(g.convs))


def test_bfloat16_networks_stay_close_to_float32():
    """--dtype bfloat16: the generator's image within 30 dB PSNR of float32 (bench.py reports ~38-40 dB at
    32-256 px), and the style code (Gram products in float32, the MLP in bf16) within 2% of float32."""
    g = small_generator(size=32)
    z, z_embed = torch.randn(4, 16), torch.randn(4, 16)
    image = torch.rand(2, 3, 48, 48) * 2 - 1
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        g = channels_last_(g.to(dtype))
        with torch.no_grad():
            img = g([z.to(dtype)], z_embed=z_embed.to(dtype), add_weight_index=2, randomize_noise=False)[0]
            outs.append((img.float().clamp(-1, 1), g.get_z_embed(image.to(dtype)).float()))
    (img32, code32), (img16, code16) = outs
    assert img16.shape == img32.shape == (4, 3, 32, 32)
    psnr = 10 * torch.log10(4 / (img16 - img32).pow(2).mean())
    assert 30 < psnr < 80, psnr  # close, and really computed in a lower precision
    assert (code16 - code32).norm() <= 0.02 * code32.norm()


class _OpDtypes(TorchDispatchMode):
    """Records (op name, dtype of the first input) of every convolution and matrix product."""

    OPS = ("convolution", "convolution_backward", "mm", "addmm", "bmm")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("contiguous_weights", [False, True])
def test_bfloat16_autocast_on_cpu_without_native_kernels_takes_no_slow_path(monkeypatch, contiguous_weights):
    """The issue-14 cliff: a plain Generator under CPU bf16 autocast sent every convolution (the FIR blurs
    one call per channel) through PyTorch's generic bf16 fallback, 20-100x slower than float32, on CPUs
    whose oneDNN has no bf16 kernels. Such a CPU is simulated here (so the test means the same on every
    machine): no convolution or matrix product may then see a bf16 operand, forward or backward, in
    either weight layout; the image is still computed in bf16 (not bit-equal to float32) and close to it,
    the gradients close too."""
    from op import precision

    monkeypatch.setattr(precision, "cpu_native_lowp", lambda name: False)
    g = small_generator(size=32)
    if contiguous_weights:
        for t in g.parameters():
            t.data = t.data.contiguous()
    z, z_embed = torch.randn(2, 16), torch.randn(2, 16)
    results = []
    for amp in (False, True):
        g.zero_grad()
        with _OpDtypes() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                img = g([z], z_embed=z_embed, add_weight_index=2, randomize_noise=False)[0]
            (img.float() * torch.linspace(-1, 1, 32)).sum().backward()  # outside autocast, as the trainers
        results.append((img, g.convs[1].conv.weight.grad.clone(), ops.seen))
    (img32, grad32, _), (img16, grad16, seen) = results
    assert {name for name, _ in seen} >= {"convolution", "convolution_backward", "mm"}
    assert [op for op in seen if op[1] != torch.float32] == []
    assert img16.shape == img32.shape == (2, 3, 32, 32)
    psnr = 10 * torch.log10(4 / (img16.float().clamp(-1, 1) - img32.clamp(-1, 1)).pow(2).mean())
    assert 30 < psnr < 80, psnr  # close to float32 and really rounded to bf16
    assert grad16.dtype == torch.float32
    assert (grad16 - grad32).norm() <= 0.05 * grad32.norm()


def test_low_precision_ops_emulated_only_where_the_cpu_lacks_them(monkeypatch):
    """precision.conv2d: the plain op on a CPU with native kernels (bf16 operands reach the convolution)
    and under float32; where they are missing, the inputs rounded to bf16 as autocast casts them, float32
    compute, the result rounded once: what a native kernel computes (independent: F.conv2d in float64 of
    the rounded inputs, rounded; float32 sums in another order may flip a last bit)."""
    from op import precision

    x, w = torch.randn(1, 8, 12, 12), torch.randn(8, 8, 3, 3)
    bf16 = torch.bfloat16
    want = F.conv2d(x.to(bf16).double(), w.to(bf16).double(), padding=1).to(bf16)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_native_lowp", lambda name, native=native: native)
        with _OpDtypes() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            out = precision.conv2d(x, w, padding=1)
        assert out.dtype == torch.bfloat16
        assert ops.seen == [("convolution", torch.bfloat16 if native else torch.float32)]
        if not native:
            ulp = want.float().abs() * 2 ** -7  # one bf16 step (8 significant bits)
            assert ((out.float() - want.float()).abs() <= ulp).all()
            assert (out == want).float().mean() > 0.97
            unrounded = F.conv2d(x.double(), w.double(), padding=1).to(bf16)  # what the inputs' rounding changes
            assert (out != unrounded).float().mean() > 0.1
        with _OpDtypes() as ops:
            assert precision.conv2d(x, w, padding=1).dtype == torch.float32
        assert ops.seen == [("convolution", torch.float32)]
        # float64 is left alone by autocast, and so here: a float64 convolution stays float64, exact
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out64 = precision.conv2d(x.double(), w.double(), padding=1)
        assert out64.dtype == torch.float64 and torch.equal(out64, F.conv2d(x.double(), w.double(), padding=1))


def test_native_low_precision_probe_reads_each_dtypes_own_probe(monkeypatch):
    """A CPU may have native bf16 kernels without float16 ones (AVX512-BF16 without AVX512-FP16): each dtype
    asks oneDNN's own probe (the answer is cached: cleared around the test)."""
    from op import precision

    probes = {"_is_mkldnn_bf16_supported": True, "_is_mkldnn_fp16_supported": False}
    for name, answer in probes.items():
        monkeypatch.setattr(torch.ops.mkldnn, name, lambda answer=answer: answer, raising=False)
    precision.cpu_native_lowp.cache_clear()
    try:
        assert (precision.cpu_native_lowp("bfloat16"), precision.cpu_native_lowp("float16")) == (True, False)
    finally:
        precision.cpu_native_lowp.cache_clear()


def test_style_encoder_matches_independent_vgg_gram():
    import torchvision

    torch.manual_seed(4)
    vgg = torchvision.models.vgg19(weights=None)
    for m in vgg.features:  # He init: Gram entries up to ~1e-2, not ~1e-4
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    enc = StyleEncoder(8, 4, load_pretrained_vgg=False, pool_size=48)
    enc.load_vgg(vgg.state_dict())
    with torch.no_grad():  # trained-like MLP biases: an output of order 1 (an atol would swallow ~1e-4)
        for lin in enc.embedder_mlp:
            lin.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        gram = enc.embedder(x)
        assert gram.shape == (2, 610304)
        # independent: torchvision's own module, einsum Gram, manual equalized-lr MLP; the taps are the
        # indices of relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 in torchvision's vgg19().features
        taps = (3, 8, 17, 26, 35)
        assert tuple(VGG19_TAPS.values()) == taps
        h = F.adaptive_avg_pool2d(x, (48, 48))
        feats = []
        for i, layer in enumerate(vgg.features):
            h = layer(h)
            if i in taps:
                feats.append(h.clone())
            if i == taps[-1]:
                break
        blocks = []
        for f in feats:
            n, c, hh, ww = f.shape
            gm = torch.einsum("nchw,ndhw->ncd", f, f) / (c * hh * ww)
            assert torch.allclose(gm, gm.transpose(1, 2))
            blocks.append(gm.reshape(n, -1))
        ref = torch.cat(blocks, 1)
        assert torch.allclose(gram, ref, rtol=1e-4, atol=1e-6 * ref.abs().max())
        # the release's feature extractor API: FeatureOutput(relu1, ..., relu5) and layer_name_mapping
        extractor = enc.embedder.feature_extractor
        out = extractor(F.adaptive_avg_pool2d(x, (48, 48)))
        assert type(out).__name__ == "FeatureOutput" and out._fields == ("relu1", "relu2", "relu3", "relu4", "relu5")
        for name, f in zip(out._fields, feats):
            torch.testing.assert_close(getattr(out, name), f, rtol=1e-4, atol=1e-6 * f.abs().max())
        assert extractor.layer_name_mapping == {"3": "relu1", "8": "relu2", "17": "relu3", "26": "relu4",
                                                "35": "relu5"}
        other = VGGFeatureExtractor({"relu2_2": 8, "relu1_2": 3})  # other taps: a list, in layer order
        assert other.layer_name_mapping == {"3": "relu1_2", "8": "relu2_2"}
        other.load_state_dict({k: v for k, v in extractor.state_dict().items() if int(k.split(".")[1]) <= 8})
        got = other(F.adaptive_avg_pool2d(x, (48, 48)))
        assert isinstance(got, list) and [t.shape[1] for t in got] == [64, 128]
        torch.testing.assert_close(got[1], out.relu2)
        z = ref
        for j, lin in enumerate(enc.embedder_mlp):  # lr_mul 1: W / sqrt(in), b
            z = reference_linear(z, lin.weight, lin.bias, 1, activate=j < 3)
        assert z.abs().max() > 0.1 and (z < 0).any()  # the last layer is linear
        assert torch.allclose(enc(x), z, rtol=1e-4, atol=1e-5 * z.abs().max())
        # A Generator holds these weights channels_last (layers.channels_last_); the release's features are
        # contiguous whatever the layout, and code written against it flattens them with .view.
        channels_last_(enc)
        pooled = F.adaptive_avg_pool2d(x, (48, 48))
        for layout in (torch.contiguous_format, torch.channels_last):
            for f, want in zip(extractor(pooled.contiguous(memory_format=layout)), feats):
                assert f.is_contiguous()
                torch.testing.assert_close(f.view(2, -1), want.reshape(2, -1), rtol=1e-4, atol=1e-5 * want.abs().max())


def test_vgg_weights_from_local_file_hub_cache_and_clear_error(tmp_path, monkeypatch):
    import torchvision
    from torchvision.models import VGG19_Weights

    torch.manual_seed(5)
    vgg = torchvision.models.vgg19(weights=None)
    f = tmp_path / "vgg19_local.pth"
    torch.save(vgg.state_dict(), f)
    enc = StyleEncoder(8, 2, load_pretrained_vgg=True, vgg_ckpt=str(f))
    assert torch.equal(enc.embedder.feature_extractor.vgg_layers[34].weight, vgg.features[34].weight)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(VGG19_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match="python download_models.py vgg19-dcbb9e9d.pth puts them at "
                                              f"{tmp_path / 'th' / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth'}"):
        StyleEncoder(8, 2, load_pretrained_vgg=True)  # CheckpointError: the trainers print one line
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(vgg.state_dict(), cache / "vgg19-dcbb9e9d.pth")
    enc = StyleEncoder(8, 2, load_pretrained_vgg=True)
    assert torch.equal(enc.embedder.feature_extractor.vgg_layers[0].weight, vgg.features[0].weight)


def test_release_layout_checkpoint_round_trip(tmp_path):
    g = small_generator(size=64, seed=6)
    path = tmp_path / "blendgan.pt"
    latent_avg = g.mean_latent(16).detach()
    torch.save({"g_ema": g.state_dict(), "latent_avg": latent_avg, "truncation": 0.7}, path)  # as the release
    ckpt = load_checkpoint(path)
    g2 = Generator(64, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    load_state_dict_strict(g2, ckpt["g_ema"], f"{path}['g_ema']")
    for (k, v), (k2, v2) in zip(g.state_dict().items(), g2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(ckpt["latent_avg"], latent_avg) and ckpt["truncation"] == 0.7
    z = torch.randn(1, 16)
    style = torch.rand(1, 3, 64, 64) * 2 - 1
    a, _ = g([z], style_image=style, add_weight_index=3, randomize_noise=False)
    b, _ = g2([z], style_image=style, add_weight_index=3, randomize_noise=False)
    assert torch.equal(a, b)
    # our own atomic writer gives a file the same loader reads back identically
    save_checkpoint({"g_ema": g2.state_dict()}, tmp_path / "again.pt")
    again = load_checkpoint(tmp_path / "again.pt")["g_ema"]
    assert all(torch.equal(again[k], v) for k, v in g.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["again.pt", "blendgan.pt"]  # no temporary file left


class NotATensor:
    pass


def test_bad_checkpoint_files_give_one_clear_line(tmp_path):
    g = small_generator(size=32)
    good = tmp_path / "good.pt"
    torch.save({"g_ema": g.state_dict()}, good)
    data = good.read_bytes()
    cases = {
        "missing.pt": None,
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": os.urandom(4096),
        "text.pt": b"this is not a checkpoint\n",
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p, hint="put it in pretrained_models/")
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, msg
    assert "pretrained_models/" in str(pytest.raises(CheckpointError, load_checkpoint, tmp_path / "missing.pt",
                                                     hint="put it in pretrained_models/").value)
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(p)
    p = tmp_path / "object.pt"
    with open(p, "wb") as f:
        pickle.dump({"g_ema": NotATensor()}, f)
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(p)


def test_layout_mismatch_names_keys_and_fitting_config(tmp_path):
    g32 = small_generator(size=32)
    g64 = Generator(64, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(g64, g32.state_dict(), "blendgan.pt['g_ema']", hint=guess_generator_config)
    msg = str(e.value)
    assert "missing" in msg and "convs.6" in msg and "mis-shaped" in msg and "add_weight" in msg
    assert "size=32" in msg and "style_dim=16" in msg and "n_mlp=2" in msg
    g64c2 = Generator(64, 16, 2, channel_multiplier=2, load_pretrained_vgg=False, style_pool_size=32)
    assert "channel_multiplier=2" in guess_generator_config(g64c2.state_dict())
    assert "channel_multiplier=1" in guess_generator_config(g64.state_dict())


def test_discriminators_shapes_and_projection_formula():
    from model import minibatch_stddev

    torch.manual_seed(7)
    d = Discriminator(32, channel_multiplier=1)
    pd = ProjectionDiscriminator(32, style_dim=16, channel_multiplier=1)
    with torch.no_grad():
        pd.l_style.bias.normal_()
        pd.l_out.bias.normal_()
    x = torch.randn(4, 3, 32, 32)
    s = torch.randn(4, 16)
    assert d(x).shape == (4, 1)
    # D's head flattens the final features in (C, H, W) order, as rosinality's .view on NCHW does: the
    # 8192 x 512 weights of a StyleGAN2 D meet the features they were trained on (a channels_last
    # flatten would load and give another logit)
    with torch.no_grad():
        for lin in d.final_linear:
            lin.bias.normal_()
        final = d.final_conv(minibatch_stddev(d.convs(x))).contiguous()  # [4, 512, 4, 4]
        assert torch.allclose(d(x), d.final_linear(final.view(4, -1)), rtol=1e-5, atol=1e-5)
    out = pd(x, s)
    assert out.shape == (4, 1)
    # projection discriminator: l_out(h) + <l_style(s), h>, h = spatial sum of the final features
    feat = pd.convs(x)
    y = feat.view(4, 1, 1, feat.shape[1], 4, 4)  # group 4
    std = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean()
    h = pd.final_conv(torch.cat([feat, std.expand(4, 1, 4, 4)], 1)).sum(dim=(2, 3))
    lin = lambda m, v: v @ (m.weight * m.scale).t() + m.bias * m.lr_mul  # noqa: E731
    expected = lin(pd.l_out, h) + (lin(pd.l_style, s) * h).sum(1, keepdim=True)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    # minibatch stddev with group 2 of a batch of 4: two statistics, each shared by its group members
    z = torch.randn(4, 6, 2, 2)
    m = minibatch_stddev(z, group_size=2)
    g = z.view(2, 2, 6, 2, 2)
    ref = torch.sqrt(g.var(0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # [2]
    assert torch.allclose(m[:, 6, 0, 0], ref.repeat(2))
    # odd batch: the group falls back to a divisor of the batch instead of crashing
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1)


def test_resblock_matches_written_out_reference():
    """The discriminator's residual block with torch.nn.functional (float64, non-zero biases): conv1 a 3x3
    conv + bias + leaky ReLU * sqrt 2; conv2 the FIR blur (pads 2, 2), a 3x3 stride-2 conv, bias, leaky ReLU
    * sqrt 2; skip the blur (pads 1, 1) and a 1x1 stride-2 conv without bias or activation; the sum / sqrt 2
    (a mean of two paths of unit variance would halve the variance instead of keeping it)."""
    from layers import ResBlock

    torch.manual_seed(17)
    block = ResBlock(3, 5).double()
    with torch.no_grad():
        block.conv1[1].bias.normal_()
        block.conv2[2].bias.normal_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def lrelu(v, bias):
        return F.leaky_relu(v + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    w1, w2, w_skip = block.conv1[0].weight, block.conv2[1].weight, block.skip[1].weight
    with torch.no_grad():
        h = lrelu(F.conv2d(x, w1 / math.sqrt(3 * 3 * 3), padding=1), block.conv1[1].bias)  # [2, 3, 8, 8]
        main = lrelu(F.conv2d(reference_fir(h, fir_kernel(), (2, 2)), w2 / math.sqrt(3 * 3 * 3), stride=2),
                     block.conv2[2].bias)  # [2, 5, 4, 4]
        skip = F.conv2d(reference_fir(x, fir_kernel(), (1, 1)), w_skip / math.sqrt(3), stride=2)  # [2, 5, 4, 4]
        want = (main + skip) / math.sqrt(2)
        got = block(x)
    assert got.shape == (2, 5, 4, 4)
    assert float(main.abs().mean()) > 0.1 and float(skip.abs().mean()) > 0.1
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_minibatch_stddev_is_finite_in_float16():
    """Under float16 autocast (--amp on GPUs without bfloat16) a group of identical samples has variance 0;
    the statistic must then be sqrt(1e-8) with a finite gradient, as in float64 (in float16 the 1e-8
    vanished and every D backward gave NaN)."""
    from model import minibatch_stddev

    torch.manual_seed(3)
    base = torch.randn(2, 6, 2, 2)
    z64 = torch.cat([base, base]).double()  # groups (samples 0, 2) and (1, 3): identical pairs
    z64[3] += torch.randn(6, 2, 2).double()  # group (1, 3) gets a spread, group (0, 2) keeps variance 0
    z16 = z64.half().requires_grad_()
    ref = z64.clone().requires_grad_()
    out16, out64 = minibatch_stddev(z16, group_size=2), minibatch_stddev(ref, group_size=2)
    assert out16.dtype == torch.float16 and out16.shape == (4, 7, 2, 2)
    assert torch.allclose(out16.double(), out64, rtol=2e-3, atol=2e-3)
    w = torch.randn_like(out64)
    (out16.float() * w.float()).sum().backward()
    (out64 * w).sum().backward()
    assert torch.isfinite(z16.grad).all()
    assert torch.allclose(z16.grad.double(), ref.grad, rtol=1e-2, atol=1e-2)


def test_pixel_norm_of_a_small_float16_code_is_finite():
    """GPU check 2026-11-28: the float16 style transfer wrote NaN images. A small style code's x^2 and the
    1e-8 both flushed to zero in float16 and PixelNorm gave 0 * rsqrt(0); now as float64 does."""
    from layers import PixelNorm

    x64 = torch.randn(3, 16, dtype=torch.float64) * 1e-5
    out = PixelNorm()(x64.half())
    ref = x64 * torch.rsqrt(x64.pow(2).mean(1, keepdim=True) + 1e-8)
    assert out.dtype == torch.float16 and out.shape == (3, 16)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fused,batch", [(False, 1), (False, 2), (True, 2)])
def test_float16_modulated_conv_demodulates_like_float64(fused, batch):
    """Large styles (|s| ~ 500): s^2 and the demodulation sum overflow float16. The demodulation is
    computed in float32 in every path (one sample, a batch, the grouped convolution)."""
    from layers import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 4, 3, style_dim=8, fused=fused)
    x, style = torch.randn(batch, 8, 6, 6), torch.randn(batch, 8) * 1500
    ref = conv.double()(x.double(), style.double())
    assert ref.abs().max() > 0.5  # demodulated: unit-scale outputs whatever the style's size
    out = conv.half()(x.half(), style.half())
    assert out.dtype == torch.float16 and out.shape == ref.shape == (batch, 4, 6, 6)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).norm() <= 1e-2 * ref.norm()


def test_float16_generator_with_a_small_style_code_matches_float32():
    """The whole stylized forward in float16 with a small style code (a style image far from the
    training styles gives one): finite and close to float32."""
    g = small_generator(size=32)
    z, z_embed = torch.randn(2, 16), torch.randn(2, 16) * 1e-5
    imgs = []
    for dtype in (torch.float32, torch.float16):
        g = channels_last_(g.to(dtype))
        with torch.no_grad():
            imgs.append(g([z.to(dtype)], z_embed=z_embed.to(dtype), add_weight_index=2,
                          randomize_noise=False)[0].float())
    assert imgs[1].shape == imgs[0].shape == (2, 3, 32, 32)
    assert torch.isfinite(imgs[1]).all()
    psnr = 10 * torch.log10(4 / (imgs[1].clamp(-1, 1) - imgs[0].clamp(-1, 1)).pow(2).mean())
    assert psnr > 30, psnr


def test_ddp_gradients_arrive_in_the_buckets_layout():
    """Issue #13 8c: under DDP, train.py warned "grad strides do not match bucket view strides" (channels_last
    activations give [out, in, 1, 1] weight gradients channels_last strides) and that broadcast_buffers is
    deprecated. With the parameters stored channels_last at construction and wrap_ddp's options, one
    G + D forward/backward in a 1-process gloo group warns about neither; the gradients have the
    parameters' strides and equal those of the same step without DDP."""
    import socket
    import warnings

    import torch.distributed as dist

    from blendgan_training import TrainOptions, build_networks, r1_penalty, wrap_ddp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = TrainOptions(ffhq_lmdb="-", size=32, batch=2, style_dim=16, n_mlp=2, channel_multiplier=1,
                        style_pool_size=32, device="cpu")
    torch.manual_seed(0)
    nets = build_networks(opts, torch.device("cpu"))
    z, z_embed = torch.randn(2, 16), torch.randn(2, 16)

    def step(g, d, d_latent):
        img, _ = g([z], z_embed=z_embed, randomize_noise=False)
        d(img).sum().backward()
        # d_reg_step's R1 on D_style_latent: its [1, 512] output weight gets the double backward's gradient
        # as the transpose of a [512, 1] tensor (strides (1, 1)), which DDP's buckets ([512, 1]) warned about
        x = img.detach().requires_grad_(True)
        pred = d_latent(x, z_embed)
        (r1_penalty(pred, x) + 0 * pred.sum()).backward()

    step(nets.g, nets.d_face, nets.d_style_latent)
    checked = {"d_face": nets.d_face, "d_style_latent": nets.d_style_latent}
    plain = {(k, n): p.grad.clone() for k, d in checked.items() for n, p in d.named_parameters()}
    for net in (nets.g, *checked.values()):
        net.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g_train, d_train = wrap_ddp(nets, torch.device("cpu"))
            step(g_train, d_train["d_face"], d_train["d_style_latent"])
    finally:
        dist.destroy_process_group()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "bucket view strides" in m or "broadcast_buffers" in m], messages
    for (k, name), grad in plain.items():
        p = checked[k].get_parameter(name)
        assert p.grad.stride() == p.stride(), (k, name)
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-6)
    one_by_one = nets.d_face.convs[1].skip[1].weight  # a [out, in, 1, 1] weight
    c_in = one_by_one.shape[1]
    assert one_by_one.shape[2:] == (1, 1) and one_by_one.stride() == (c_in, 1, c_in, c_in)  # exact NHWC strides
