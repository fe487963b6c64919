"""PSPEncoder / GradualStyleEncoder: release key layout, both release file layouts, values, errors.

The values are checked against a functional re-computation written here from the description of
the network (official_checkpoint_format.md, section 5) with torch.nn.functional only.
"""
import json
import math
import os

import pytest
import torch
from torch.nn import functional as F

from checkpoint import CheckpointError
from conftest import reference_file
from psp_encoder.encoders import GradualStyleEncoder
from psp_encoder.psp_encoders import PSPEncoder, _broadcasts, get_keys

# From the schema (PSPEncoder_1024_encoder): checked even where the JSON file is not at hand.
RELEASE_1024_KEYS = 621
RELEASE_1024_ELEMENTS = 267161076

SIZE = 64
N_STYLES = 10  # 2*log2(64) - 2
STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))
BN_EPS = 1e-5


def _schema_rows():
    """The release's rows (skips without the reference, fails under CI: see conftest.reference_file)."""
    with open(reference_file("official_checkpoint_schema.json", env="BLENDGAN_SCHEMA")) as f:
        return json.load(f)["modules"]["PSPEncoder_1024_encoder"]["groups"]["encoder"]


def test_state_dict_matches_release_schema():
    with torch.device("meta"):
        psp = PSPEncoder(None, output_size=1024)
    sd = psp.state_dict()
    assert not any("latent_avg" in k for k in sd)  # a buffer, but not part of the file layout
    assert len(sd) == RELEASE_1024_KEYS
    assert sum(v.numel() for v in sd.values()) == RELEASE_1024_ELEMENTS
    assert all(k.startswith("encoder.") for k in sd)
    rows = _schema_rows()  # the key count and size above are checked even without the reference
    assert len(rows) == RELEASE_1024_KEYS
    assert list(sd) == [r[0] for r in rows]  # same keys, same (registration) order
    for key, shape, dtype, _kind in rows:
        assert list(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == f"torch.{dtype}", key


def test_latent_avg_is_a_buffer_that_follows_the_module():
    with torch.device("meta"):
        psp = PSPEncoder(None, output_size=SIZE)
    assert not psp.training and not any(m.training for m in psp.modules())  # eval once, in the constructor
    assert psp.latent_avg.shape == (N_STYLES, 512) and psp.latent_avg.device.type == "meta"
    assert "latent_avg" in dict(psp.named_buffers())
    psp.to(torch.float64)
    assert psp.latent_avg.dtype == torch.float64
    with pytest.raises(ValueError, match="power of two"):
        PSPEncoder(None, output_size=100)


WINDOW_SHIFT = 17  # offset between consecutive tensors drawn from the same random sequence


def _distribution(module_name, module, param_name, shape):
    """(sampler, low, high) for one state-dict entry: weights scaled by fan-in, non-trivial BatchNorm
    statistics, PReLU slopes and biases, so that each of them shows in the output."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        if param_name == "weight":  # unit variance gain, so that every unit's residual branch counts
            return "uniform", -math.sqrt(3 / fan_in), math.sqrt(3 / fan_in)
        if "latlayer" in module_name:
            return "uniform", -0.5, 0.5
        return "uniform", -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)
    if isinstance(module, torch.nn.BatchNorm2d):
        return {"running_mean": ("uniform", -0.2, 0.2), "running_var": ("uniform", 0.5, 1.5),
                "weight": ("uniform", 0.5, 1.5), "bias": ("uniform", -0.2, 0.2)}[param_name]
    if isinstance(module, torch.nn.PReLU):
        return "uniform", 0.05, 0.4
    if module_name.endswith(".linear"):  # EqualLinear
        return ("normal", 0.0, 1.0) if param_name == "weight" else ("uniform", -0.5, 0.5)
    raise AssertionError(f"no test distribution for {module_name}.{param_name} {shape}")


def _random_weights(gen):
    """State dict ('encoder.*' keys) of a 64 px encoder, for release-layout test files.

    Every tensor is a window of a random sequence shared by the tensors of the same distribution, the
    k-th one starting WINDOW_SHIFT * k further on: every key holds different values (a swapped or
    misplaced key changes the output), yet torch.save writes each sequence once, so the files are
    ~20 MB instead of 600 MB.
    """
    with torch.device("meta"):
        layout = PSPEncoder(None, output_size=SIZE)
    entries = []  # (key, distribution, shape)
    for module_name, module in layout.named_modules():
        for param_name, tensor in module.named_parameters(recurse=False):
            entries.append((f"{module_name}.{param_name}",
                            _distribution(module_name, module, param_name, tensor.shape), tensor.shape))
        for buffer_name, tensor in module.named_buffers(recurse=False):
            if buffer_name != "num_batches_tracked" and buffer_name in module.state_dict():
                entries.append((f"{module_name}.{buffer_name}",
                                _distribution(module_name, module, buffer_name, tensor.shape), tensor.shape))
    counts, longest = {}, {}
    for _, dist, shape in entries:
        counts[dist] = counts.get(dist, 0) + 1
        longest[dist] = max(longest.get(dist, 0), math.prod(shape))
    sequences = {}
    for (sampler, low, high), count in counts.items():
        seq = torch.empty(longest[(sampler, low, high)] + WINDOW_SHIFT * count)
        if sampler == "normal":
            seq.normal_(low, high, generator=gen)
        else:
            seq.uniform_(low, high, generator=gen)
        sequences[(sampler, low, high)] = seq
    taken = {}
    weights = {}
    for key, dist, shape in entries:
        start = WINDOW_SHIFT * taken.get(dist, 0)
        taken[dist] = taken.get(dist, 0) + 1
        weights[key] = sequences[dist][start:start + math.prod(shape)].view(shape)
    layout_sd = layout.state_dict()
    for key in layout_sd:
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(7)
    assert set(weights) == set(layout_sd)
    return {key: weights[key] for key in layout_sd}  # the module's key order


def _bn(sd, prefix, x):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=BN_EPS)


def reference_codes(sd, x, n_styles):
    """GradualStyleEncoder(50, 'ir_se', n_styles) written out with functional ops from its state dict.

    x: [N, 3, 256, 256]. Returns [N, n_styles, 512] (without latent_avg).
    """
    h = F.conv2d(x, sd["input_layer.0.weight"], padding=1)
    h = F.prelu(_bn(sd, "input_layer.1.", h), sd["input_layer.2.weight"])
    stage_out = []
    unit, in_ch = 0, 64
    for out_ch, count in STAGES:
        for j in range(count):
            stride = 2 if j == 0 else 1
            p = f"body.{unit}."
            if in_ch == out_ch:
                shortcut = h[:, :, ::stride, ::stride]
            else:
                shortcut = _bn(sd, p + "shortcut_layer.1.",
                               F.conv2d(h, sd[p + "shortcut_layer.0.weight"], stride=stride))
            r = _bn(sd, p + "res_layer.0.", h)
            r = F.prelu(F.conv2d(r, sd[p + "res_layer.1.weight"], padding=1), sd[p + "res_layer.2.weight"])
            r = F.conv2d(r, sd[p + "res_layer.3.weight"], stride=stride, padding=1)
            r = _bn(sd, p + "res_layer.4.", r)
            gate = r.mean(dim=(2, 3), keepdim=True)  # squeeze-and-excitation
            gate = F.relu(F.conv2d(gate, sd[p + "res_layer.5.fc1.weight"]))
            gate = F.conv2d(gate, sd[p + "res_layer.5.fc2.weight"])
            h = r * torch.sigmoid(gate) + shortcut
            in_ch = out_ch
            unit += 1
        stage_out.append(h)
    c1, c2, c3 = stage_out[1], stage_out[2], stage_out[3]
    assert c1.shape[1:] == (128, 64, 64) and c2.shape[1:] == (256, 32, 32) and c3.shape[1:] == (512, 16, 16)

    def up(a, b):
        return F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True) + b

    p2 = up(c3, F.conv2d(c2, sd["latlayer1.weight"], sd["latlayer1.bias"]))
    p1 = up(p2, F.conv2d(c1, sd["latlayer2.weight"], sd["latlayer2.bias"]))
    codes = []
    for i in range(n_styles):
        level = c3 if i < 3 else p2 if i < 7 else p1
        g = level
        for k in range(int(math.log2(level.shape[-1]))):
            conv = f"styles.{i}.convs.{2 * k}."
            g = F.leaky_relu(F.conv2d(g, sd[conv + "weight"], sd[conv + "bias"], stride=2, padding=1), 0.01)
        assert g.shape[-2:] == (1, 1)
        w = sd[f"styles.{i}.linear.weight"]
        codes.append(F.linear(g.flatten(1), w / math.sqrt(w.shape[1]), sd[f"styles.{i}.linear.bias"]))
    return torch.stack(codes, dim=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Release-layout files of a random 64 px encoder (10 style heads), and their expected contents."""
    folder = tmp_path_factory.mktemp("psp")
    gen = torch.Generator().manual_seed(1234)
    weights = _random_weights(gen)  # 'encoder.*' keys, as in the file
    latent_rows = torch.randn(N_STYLES, 512, generator=gen)  # [10, 512], every row different
    latent_vec = torch.randn(512, generator=gen)  # [512]
    ignored = {"decoder.style.1.weight": torch.randn(8, 8, generator=gen)}
    opts = {"output_size": SIZE, "encoder_type": "GradualStyleEncoder", "learn_in_w": False}
    files = {
        "flat": {**weights, **ignored, "latent_avg": latent_rows, "opts": opts},
        "wrapped": {"state_dict": {**weights, **ignored}, "latent_avg": latent_rows, "opts": opts},
        "flat_vec": {**weights, "latent_avg": latent_vec},
        "latent_inside_only": {"state_dict": {**weights, "latent_avg": latent_rows}},
    }
    paths = {}
    for name, content in files.items():
        paths[name] = str(folder / f"{name}.pt")
        torch.save(content, paths[name])
    x = torch.rand(1, 3, 40, 48, generator=gen) * 2 - 1  # any size: the encoder pools to 256x256
    sd = {k[len("encoder."):]: v for k, v in weights.items()}
    with torch.no_grad():
        codes = reference_codes(sd, F.adaptive_avg_pool2d(x, (256, 256)), N_STYLES)
    yield {"paths": paths, "x": x, "codes": codes, "latent_rows": latent_rows, "latent_vec": latent_vec,
           "weights": weights}
    for path in paths.values():
        os.remove(path)


def _encode(path, x, output_size=SIZE):
    psp = PSPEncoder(path, output_size=output_size)
    with torch.no_grad():
        out = psp(x)
    return psp, out


def _assert_close_rel(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err} vs scale {scale}"


def test_both_release_layouts_load_and_match_reference(release):
    x, codes, latent_rows = release["x"], release["codes"], release["latent_rows"]
    psp_flat, out_flat = _encode(release["paths"]["flat"], x)
    assert out_flat.shape == (1, N_STYLES, 512) and out_flat.dtype == torch.float32
    assert not psp_flat.training  # forward leaves the mode alone
    assert torch.equal(psp_flat.latent_avg, latent_rows)
    assert "latent_avg" not in psp_flat.state_dict()
    for key, value in psp_flat.state_dict().items():  # every weight came from the file
        assert torch.equal(value, release["weights"][key]), key
    # independent recomputation: functional network + latent_avg, every style row its own offset
    _assert_close_rel(out_flat - latent_rows, codes)
    assert not torch.allclose(out_flat[:, 7], out_flat[:, 8])
    del psp_flat

    _, out_wrapped = _encode(release["paths"]["wrapped"], x)
    assert torch.equal(out_wrapped, out_flat)  # bit-identical across the two layouts
    # the release's keyword and helper: get_keys(ckpt, 'encoder') unwraps 'state_dict' and drops the prefix
    psp = PSPEncoder(encoder_ckpt_path=release["paths"]["wrapped"], output_size=SIZE)
    wrapped = torch.load(release["paths"]["wrapped"])
    keys = get_keys(wrapped, "encoder")
    assert sorted(keys) == sorted(k[len("encoder."):] for k in release["weights"])
    assert all(torch.equal(keys[k], release["weights"][f"encoder.{k}"]) for k in keys)
    assert all(torch.equal(v, keys[k]) for k, v in psp.encoder.state_dict().items())
    assert get_keys(wrapped, "decoder") and not set(get_keys(wrapped, "decoder")) & set(keys)


def test_weights_are_the_files_tensors_widened_to_float32(release, tmp_path):
    """The parameters are assigned from the file (no second copy); a half-precision export is widened."""
    psp = PSPEncoder(release["paths"]["flat"], output_size=SIZE)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in psp.parameters())
    assert not any(t.is_meta for t in [*psp.parameters(), *psp.buffers()])
    half = {k: v.half() if k.startswith("encoder.") and v.is_floating_point() else v
            for k, v in torch.load(release["paths"]["flat"], weights_only=True).items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    psp_half = PSPEncoder(str(path), output_size=SIZE)
    assert all(p.dtype == torch.float32 for p in psp_half.parameters())
    for key, value in psp_half.state_dict().items():
        assert torch.equal(value, half[key].to(value.dtype)), key  # state dict keys are the file's
    with torch.no_grad():
        out = psp_half(release["x"])  # float32 input works
    _assert_close_rel(out - release["latent_rows"], release["codes"], rel=2e-2)


class _FixedCodes(torch.nn.Module):
    """Stand-in for the network: records what it is fed and returns given codes [N, n_styles, 512]."""

    def __init__(self, codes):
        super().__init__()
        self.codes = codes
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.codes


def test_latent_avg_from_file_broadcasts_like_the_release(release):
    """[512] and [n_styles, 512] are both added as ``codes + latent_avg.repeat(N, 1, 1)`` in the release."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 24, 20, generator=gen) * 2 - 1
    codes = torch.randn(2, N_STYLES, 512, generator=gen)
    psp = PSPEncoder(release["paths"]["flat_vec"], output_size=SIZE)
    latent_vec = release["latent_vec"]
    assert psp.latent_avg.shape == (512,) and torch.equal(psp.latent_avg, latent_vec)
    for latent_avg in (latent_vec, release["latent_rows"]):
        psp.latent_avg = latent_avg
        psp.encoder = _FixedCodes(codes)
        out = psp(x)
        assert torch.equal(psp.encoder.seen, F.adaptive_avg_pool2d(x, (256, 256)))  # [2, 3, 256, 256]
        assert out.shape == (2, N_STYLES, 512)
        assert torch.equal(out, codes + latent_avg.repeat(2, 1, 1))


def test_file_for_another_output_size_is_refused_clearly(release):
    for wrong in (1024, 32):
        with pytest.raises(CheckpointError, match=r"for output size 64\b") as info:
            PSPEncoder(release["paths"]["wrapped"], output_size=wrong)
        assert "wrapped.pt" in str(info.value)
        assert f"not for output size {wrong}" in str(info.value)


def test_missing_latent_avg_is_refused_clearly(release):
    with pytest.raises(CheckpointError, match="top-level 'latent_avg'") as info:
        PSPEncoder(release["paths"]["latent_inside_only"], output_size=SIZE)
    assert "latent_inside_only.pt" in str(info.value) and "inside 'state_dict'" in str(info.value)


def test_missing_file_and_non_psp_file_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        PSPEncoder(str(tmp_path / "absent.pt"), output_size=SIZE)
    other = tmp_path / "generator.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}, "latent_avg": torch.zeros(512)}, other)
    with pytest.raises(CheckpointError, match=r"no 'encoder\.\*' weights"):
        PSPEncoder(str(other), output_size=SIZE)


def test_layout_mismatch_names_the_key(release, tmp_path):
    weights = dict(release["weights"])
    del weights["encoder.latlayer2.bias"]
    bad = tmp_path / "bad.pt"
    torch.save({**weights, "latent_avg": torch.zeros(512)}, bad)
    with pytest.raises(CheckpointError, match=r"missing: latlayer2\.bias"):
        PSPEncoder(str(bad), output_size=SIZE)


def test_bad_latent_avg_shape_is_refused(release, tmp_path):
    weights = dict(release["weights"])
    bad = tmp_path / "bad_latent.pt"
    torch.save({**weights, "latent_avg": torch.zeros(18, 512)}, bad)
    with pytest.raises(CheckpointError, match=r"latent_avg' is \[18, 512\]"):
        PSPEncoder(str(bad), output_size=SIZE)


def test_encoder_rejects_unsupported_configurations():
    with pytest.raises(ValueError, match="ir_se"):
        GradualStyleEncoder(num_layers=100, mode="ir_se", n_styles=18)
    with pytest.raises(ValueError, match="n_styles"):
        GradualStyleEncoder(num_layers=50, mode="ir_se", n_styles=6)


def test_a_latent_avg_is_accepted_exactly_when_it_keeps_the_codes_shape():
    """A file's latent_avg (512-D latents) is added to codes [N, n_styles, 512]: a shape is taken exactly when the
    sum keeps the codes' shape for every N (a vector, one row, n_styles rows, with or without a leading 1);
    torch's broadcasting is the reference."""
    def keeps_shape(shape):
        try:
            return all(torch.broadcast_shapes((n, N_STYLES, 512), shape) == (n, N_STYLES, 512) for n in (1, 4))
        except RuntimeError:
            return False

    shapes = [(512,), (1, 512), (N_STYLES, 512), (1, N_STYLES, 512), (1, 1, 512), (2, N_STYLES, 512),
              (4, N_STYLES, 512), (N_STYLES, 256), (3, 512), (1, 1, N_STYLES, 512), (N_STYLES, 1)]
    for shape in shapes:
        assert _broadcasts(shape, N_STYLES) == (keeps_shape(shape) and shape[-1] == 512), shape
    assert sum(_broadcasts(shape, N_STYLES) for shape in shapes) == 5
