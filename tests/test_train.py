"""train.py / blendgan_training.py: losses and the pairs each D is fed under both readings of Eq. 8 (paper Eq.
6-9), two generator passes per step, regularisers (their weights and intervals: the gradients of lazy R1 and
path length), Adam's lazy-regularisation correction, g_ema's decay over every rank's images, the code G's Eq. 8
term pairs its image with, the WBM clamp after a G step, queue, one iteration, a short run that must learn in the
right direction, the non-finite guard and float16 loss scaling, exact resume (also after SIGKILL), two gloo
processes under torchrun (identical weights; the gradients of one process with the combined batch),
fine-tuning that moves g_ema toward the reference, the data check, inference compatibility.

Speed: most tests narrow the StyleGAN2 channel table (model.stylegan2_channels, monkeypatched in-process
and in the subprocess runners) to 32 feature maps above 4x4. The 4x4 layers keep their 512 channels
(the discriminators' heads are fixed at 512), so every code path is the real one, only thinner.
The one-iteration / inference test uses the real channel table.
"""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import blendgan_training as bt
import model
import prepare_data
import train as train_script
from checkpoint import CheckpointError, DiskFullError, load_checkpoint, save_checkpoint
from conftest import record_returns, synthesis_only
from dataset import InfiniteSampler
from model import Discriminator, Generator, ProjectionDiscriminator
from style_encoder import StyleEncoder
from trainutil import NonFiniteGuard, NonFiniteLossError, read_jsonl, require_valid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(ROOT, "test_imgs", "face_imgs")
STYLES = os.path.join(ROOT, "test_imgs", "style_imgs")
STYLE_DIM = 16
NARROW = {4: 512, 8: 32, 16: 32, 32: 32, 64: 32}

RUNNER = """import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import model
model.stylegan2_channels = lambda channel_multiplier: dict({narrow!r})
"""
TRAIN_RUNNER = RUNNER + """import train
sys.exit(train.main(sys.argv[1:]))
"""
DDP_WORKER = RUNNER + """import os
import distributed
import train
from blendgan_training import train as run
opts = train.parse_args(sys.argv[1:])
s = run(opts)
nets = s.nets
state = {{name: m.state_dict() for name, m in [("g", nets.g), ("g_ema", nets.g_ema)] + list(nets.discriminators().items())}}
state.update(queue=s.queue.state_dict(), mean_path_length=s.mean_path_length, g_optim=s.g_optim.state_dict(),
             d_optim=s.d_optim.state_dict())
torch.save(state, os.path.join(opts.out_dir, f"rank{{distributed.get_rank()}}.pt"))
distributed.cleanup()
"""


def checked(opts):
    """opts after train.py's validation (ValueError naming every problem)."""
    require_valid(bt.validate(opts))
    return opts


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread, as the subprocess runners use (and deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(model, "stylegan2_channels", lambda channel_multiplier: dict(NARROW))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """LMDBs of the test faces and styles (8 and 32 px) and a small style-encoder checkpoint."""
    root = tmp_path_factory.mktemp("train_data")
    paths = {}
    for name, folder in (("faces", FACES), ("styles", STYLES)):
        out = str(root / name)
        prepare_data.prepare(prepare_data.PrepareOptions(out=out, paths=[folder], size=(8, 32), n_worker=0,
                                                         format="png"))
        paths[name] = out
    torch.manual_seed(123)
    encoder = StyleEncoder(STYLE_DIM, load_pretrained_vgg=False)
    paths["style_encoder"] = str(root / "style_encoder.pt")
    save_checkpoint({"style_encoder": encoder.state_dict()}, paths["style_encoder"])
    paths["root"] = root
    return paths


def small_options(data, out_dir, **changes):
    opts = bt.TrainOptions(ffhq_lmdb=data["faces"], aahq_lmdb=data["styles"], out_dir=str(out_dir),
                           style_encoder_ckpt=data["style_encoder"], size=8, style_dim=STYLE_DIM, n_mlp=2,
                           channel_multiplier=1, style_pool_size=32, batch=2, iter=1, queue_size=6, num_workers=0,
                           device="cpu", progress=False, log_every=1, n_sample=2, save_every=1000,
                           sample_every=1000)
    for k, v in changes.items():
        setattr(opts, k, v)
    if "from_scratch" not in changes:
        opts.from_scratch = not (opts.stylegan2_ckpt or opts.blendgan_ckpt)
    return opts


def cli_args(opts):
    """TrainOptions -> train.py argv (only what small_options sets)."""
    args = [opts.ffhq_lmdb] + ([opts.aahq_lmdb] if opts.aahq_lmdb else [])
    for name in ("out_dir", "style_encoder_ckpt", "size", "style_dim", "n_mlp", "channel_multiplier",
                 "style_pool_size", "batch", "iter", "queue_size", "num_workers", "device", "log_every", "n_sample",
                 "save_every", "sample_every", "d_reg_every", "g_reg_every", "seed", "keep_checkpoints"):
        value = getattr(opts, name)
        if value is not None:
            args += [f"--{name}", str(value)]
    return args + ["--no_progress"] + ["--from_scratch"] * opts.from_scratch


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def assert_same(a, b, where="checkpoint"):
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, f"{where}: tensor meta differs"
        assert torch.equal(a, b), f"{where}: values differ (max abs {float((a.double() - b.double()).abs().max())})"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def decode_png(path):
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


# ---- the queue, the data offset ------------------------------------------------------------------

def test_style_queue_fills_and_wraps():
    q = bt.StyleQueue(5, 3)
    fallback = torch.arange(6.0).view(2, 3)
    assert len(q) == 0
    drawn = q.sample(7, fallback=fallback)
    assert drawn.shape == (7, 3) and all(any(torch.equal(r, f) for f in fallback) for r in drawn)
    rows = torch.arange(1.0, 61.0).view(20, 3)
    q.push(rows[:3])
    assert len(q) == 3 and q.ptr == 3 and torch.equal(q.codes[:3], rows[:3])
    drawn = q.sample(50)
    assert all(any(torch.equal(r, f) for f in rows[:3]) for r in drawn)  # only filled rows are drawn
    q.push(rows[3:7])  # 7 codes into 5 slots: rows 5 and 6 overwrite the two oldest
    assert len(q) == 5 and q.ptr == 2
    assert torch.equal(q.codes, torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    q.push(rows[7:20])  # more than the queue holds at once: the newest 5 remain, in ring order
    assert len(q) == 5 and q.ptr == (2 + 5) % 5
    assert sorted(q.codes[:, 0].tolist()) == sorted(rows[15:20, 0].tolist())
    assert torch.equal(q.codes[(q.ptr - 1) % 5], rows[19])
    q2 = bt.StyleQueue(5, 3)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.codes, q.codes) and (q2.ptr, q2.count) == (q.ptr, q.count)
    with pytest.raises(RuntimeError, match="empty"):
        bt.StyleQueue(2, 3).sample(1)


def test_queue_sample_reaches_every_filled_row():
    """Eq. 8's negatives are drawn uniformly over all filled rows, the newest one included."""
    q = bt.StyleQueue(5, 2)
    q.push(torch.arange(6.0).view(3, 2))
    torch.manual_seed(0)
    assert {tuple(r) for r in q.sample(300).tolist()} == {(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)}


def test_sampler_start_offset_continues_the_stream():
    for n, rank, world in ((8, 0, 1), (8, 1, 2), (5, 2, 3)):
        it = iter(InfiniteSampler(n, rank, world, seed=4))
        full = [next(it) for _ in range(30)]
        for start in (0, 1, 4, 7, 13):
            it = iter(InfiniteSampler(n, rank, world, seed=4, start=start))
            assert [next(it) for _ in range(30 - start)] == full[start:]


# ---- losses and regularisers ----------------------------------------------------------------------

def _nll_real(logit):
    """-log sigmoid(x) = log(1 + e^-x), in float64 (exact enough for |x| < 700)."""
    return torch.log1p(torch.exp(-logit.double()))


def _nll_fake(logit):
    """-log(1 - sigmoid(x)) = log(1 + e^x)."""
    return torch.log1p(torch.exp(logit.double()))


class Spy(torch.nn.Module):
    """A discriminator that records what it is fed (detached copies) and returns the real logits."""

    def __init__(self, d):
        super().__init__()
        self.d, self.calls = d, []

    def forward(self, *inputs):
        self.calls.append(tuple(x.detach().clone() for x in inputs))
        return self.d(*inputs)


def _small_nets(seed):
    torch.manual_seed(seed)
    d_face, d_style = Discriminator(8, channel_multiplier=1), Discriminator(8, channel_multiplier=1)
    d_sl = ProjectionDiscriminator(8, STYLE_DIM, channel_multiplier=1)
    g = Generator(8, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with torch.no_grad():
        g.add_weight.copy_(torch.rand_like(g.add_weight))
    return g, d_face, d_style, d_sl


def merged(branch_terms):
    """{name: loss} of every branch's terms (the D or G step's (branch, {name: loss}) pairs)."""
    return {k: v for _, terms in branch_terms for k, v in terms.items()}


@pytest.mark.parametrize("reading", bt.EQ8_READINGS)
def test_losses_match_equations_6_to_9(narrow, reading):
    """Both readings of Eq. 8: the images and pairs each D is fed in the D and the G step, against G and the
    logistic losses computed by hand (float64) on fixed tensors."""
    g, d_face, d_style, d_sl = _small_nets(0)
    x_f, x_s = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    z_f, z_s, z_neg = torch.randn(3, STYLE_DIM), torch.randn(3, STYLE_DIM), torch.randn(3, STYLE_DIM)
    codes = bt.fake_codes([z_f], None, z_s, z_neg, reading)
    spies = [Spy(d) for d in (d_face, d_style, d_sl)]
    with torch.no_grad():
        torch.manual_seed(5)
        fakes = bt.generate_fakes(g, codes)
        d_losses = merged(bt.d_adversarial_terms(*spies, x_f, x_s, z_s, fakes))
        d_fed = [spy.calls[:] for spy in spies]
        for spy in spies:
            spy.calls.clear()
        torch.manual_seed(5)  # the G step draws the same noise in the same order
        g_losses = merged(bt.g_adversarial_terms(g, *spies, codes))
        g_fed = [spy.calls[:] for spy in spies]
        # by hand: x_f^ = G(z_f, i = n_latent), x_s^ = G(z_f, z_style, i = 0), z_style per the reading
        torch.manual_seed(5)
        face = g([z_f], z_embed=z_s, add_weight_index=g.n_latent)[0]
        z_style = z_s if reading == "paper" else z_neg
        style = g([z_f], z_embed=z_style, add_weight_index=0)[0]
        logits = {"r_f": d_face(x_f), "f_f": d_face(face), "r_s": d_style(x_s), "f_s": d_style(style),
                  "r_sl": d_sl(x_s, z_s), "f_sl": d_sl(style, z_neg)}
    # the pairs: D step (real, fake) per D; G step the fakes only
    want_d = [[(x_f,), (face,)], [(x_s,), (style,)], [(x_s, z_s), (style, z_neg)]]
    want_g = [[(face,)], [(style,)], [(style, z_neg)]]
    for fed, want in ((d_fed, want_d), (g_fed, want_g)):
        for calls, expected in zip(fed, want):
            assert len(calls) == len(expected)
            for got, exp in zip(calls, expected):
                assert len(got) == len(exp) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, exp))
    assert max(float(v.abs().max()) for v in logits.values()) > 1
    lg = logits
    expected_d = {"d_face": _nll_real(lg["r_f"]).mean() + _nll_fake(lg["f_f"]).mean(),  # Eq. 6
                  "d_style": _nll_real(lg["r_s"]).mean() + _nll_fake(lg["f_s"]).mean(),  # Eq. 7
                  "d_style_latent": _nll_real(lg["r_sl"]).mean() + _nll_fake(lg["f_sl"]).mean()}  # Eq. 8
    expected_g = {"g_face": _nll_real(lg["f_f"]).mean(), "g_style": _nll_real(lg["f_s"]).mean(),
                  "g_style_latent": _nll_real(lg["f_sl"]).mean()}  # Eq. 9 (non-saturating)
    for got, want in ((d_losses, expected_d), (g_losses, expected_g)):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k].double(), want[k], rtol=1e-5, atol=1e-6), k


def _state(size=8, **changes):
    opts = bt.TrainOptions(ffhq_lmdb="-", size=size, style_dim=STYLE_DIM, n_mlp=2, channel_multiplier=1,
                           style_pool_size=32, batch=2, iter=10, queue_size=6, device="cpu", mixing=0.5)
    for k, v in changes.items():
        setattr(opts, k, v)
    nets = bt.build_networks(opts, torch.device("cpu"))
    g_optim, d_optim = bt.make_optimizers(nets, opts)
    return bt.TrainState(opts, torch.device("cpu"), nets, g_optim, d_optim,
                         bt.StyleQueue(opts.queue_size, STYLE_DIM))


@pytest.mark.parametrize("reading", bt.EQ8_READINGS)
def test_two_generator_passes_per_d_and_g_step(narrow, reading):
    torch.manual_seed(3)
    s = _state(eq8=reading)
    x_f, x_s = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    b = bt.Batch(x_f, x_s, bt.encode_styles(s, x_s))
    calls = []
    forward = s.nets.g.forward

    def counted(*args, **kwargs):
        calls.append(kwargs.get("z_embed"))
        return forward(*args, **kwargs)

    s.nets.g.forward = counted
    s.queue.push(torch.randn(6, STYLE_DIM))
    for step in (bt.d_step, bt.g_step):
        calls.clear()
        step(s, b)
        assert len(calls) == 2, step.__name__  # natural + ONE stylized pass (not 3)
        assert calls[0] is None
        in_queue = any(torch.equal(calls[1][0], row) for row in s.queue.codes)
        assert torch.equal(calls[1], b.z_s) == (reading == "paper") and in_queue == (reading == "conditional")


def test_face_codes_and_mixing():
    """Style mixing (StyleGAN2) with probability --mixing: two different codes, crossing over at a layer drawn
    uniformly from 1 .. n_latent - 1 (0 would be no mixing)."""
    codes, inject = bt.sample_face_codes(4, STYLE_DIM, 6, 1.0, "cpu")
    assert len(codes) == 2 and 1 <= inject < 6
    codes, inject = bt.sample_face_codes(4, STYLE_DIM, 6, 0.0, "cpu")
    assert len(codes) == 1 and inject is None and codes[0].shape == (4, STYLE_DIM)
    torch.manual_seed(0)
    draws = [bt.sample_face_codes(1, 4, 6, 0.9, "cpu") for _ in range(2000)]
    mixed = [(codes, inject) for codes, inject in draws if len(codes) == 2]
    assert abs(len(mixed) / 2000 - 0.9) < 0.03  # 3.2 standard deviations
    assert {inject for _, inject in mixed} == {1, 2, 3, 4, 5}
    assert not any(torch.equal(*codes) for codes, _ in mixed)


def _directional_check(value_fn, param, seed):
    """Gradient of value_fn w.r.t. param (autograd) against a central finite difference, float64."""
    torch.manual_seed(seed)
    value = value_fn()
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, param)
    direction = torch.randn_like(param)
    eps = 1e-6
    with torch.no_grad():
        param.add_(eps * direction)
    torch.manual_seed(seed)
    plus = value_fn().detach()
    with torch.no_grad():
        param.sub_(2 * eps * direction)
    torch.manual_seed(seed)
    minus = value_fn().detach()
    with torch.no_grad():
        param.add_(eps * direction)
    numeric = (plus - minus) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(analytic)) > 1e-8
    assert torch.allclose(analytic, numeric, rtol=1e-4, atol=1e-9), (float(analytic), float(numeric))


def test_r1_penalty_formula_and_double_backward(narrow):
    w = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    pred = (w * x).flatten(1).sum(1, keepdim=True)  # a linear D: grad_x D = w
    assert torch.allclose(bt.r1_penalty(pred, x), w.pow(2).flatten(1).sum(1).mean())
    torch.manual_seed(2)
    for d in (Discriminator(8, channel_multiplier=1).double(),
              ProjectionDiscriminator(8, STYLE_DIM, channel_multiplier=1).double()):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        z = torch.randn(2, STYLE_DIM, dtype=torch.float64)
        call = (lambda d=d, x=x: d(x)) if isinstance(d, Discriminator) else (lambda d=d, x=x, z=z: d(x, z))
        # second derivatives through op/ (upfirdn2d blur, fused leaky ReLU): R1's gradient w.r.t. a weight
        _directional_check(lambda: bt.r1_penalty(call(), x), d.convs[1].conv1[0].weight, 3)
        _directional_check(lambda: bt.r1_penalty(call(), x), d.convs[1].conv2[1].weight, 3)


def test_path_length_formula_and_double_backward(narrow):
    # A linear "generator" img = latents @ M: J^T y is known in closed form.
    torch.manual_seed(4)
    latents = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4 * 5, 3 * 2 * 2, dtype=torch.float64)
    img = (latents.reshape(3, -1) @ m).view(3, 3, 2, 2)
    torch.manual_seed(9)
    penalty, target, lengths = bt.path_length_penalty(img, latents, torch.tensor(1.5, dtype=torch.float64))
    torch.manual_seed(9)
    y = torch.randn(3, 3, 2, 2, dtype=torch.float64) / 2  # / sqrt(H * W)
    jt_y = (y.reshape(3, -1) @ m.t()).view(3, 4, 5)
    want_lengths = jt_y.pow(2).sum(2).mean(1).sqrt()
    want_target = 1.5 + 0.01 * (want_lengths.mean() - 1.5)
    assert torch.allclose(lengths, want_lengths) and torch.allclose(target, want_target)
    assert torch.allclose(penalty, (want_lengths - want_target).pow(2).mean())
    # Through the real generator (op/ twice): the penalty's gradient w.r.t. a synthesis weight.
    torch.manual_seed(5)
    g = Generator(8, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32).double()
    z = torch.randn(2, STYLE_DIM, dtype=torch.float64)

    def value():  # decay 0: a fixed target (the running mean is detached by design, a difference would see it)
        img, lat = g([z], return_latents=True, randomize_noise=False)
        return bt.path_length_penalty(img, lat, torch.tensor(0.3, dtype=torch.float64), decay=0.0)[0]

    _directional_check(value, g.convs[1].conv.weight, 6)
    _directional_check(value, g.style[1].weight, 6)


def test_path_length_target_starts_from_zero_with_the_decay():
    """The running target starts at 0 and moves by decay * (batch mean - target) from its first update on, as
    StyleGAN2's (not straight to the first batch's mean)."""
    torch.manual_seed(0)
    latents = torch.randn(2, 3, 4, requires_grad=True)
    img = (latents.reshape(2, -1) @ torch.randn(12, 12)).view(2, 3, 2, 2)
    _, target, lengths = bt.path_length_penalty(img, latents, torch.tensor(0.0))
    assert float(lengths.mean()) > 0 and torch.allclose(target, bt.PATH_LENGTH_DECAY * lengths.detach().mean())


# ---- the phases' weights and intervals, the optimizers, g_ema, the WBM clamp -----------------------

def _fixed_batch(s, seed):
    """A Batch of two random x_f and x_s (different images) with their codes z_s."""
    gen = torch.Generator().manual_seed(seed)
    x_f, x_s = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1, torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    return bt.Batch(x_f, x_s, bt.encode_styles(s, x_s))


def _assert_grads(named, want, what):
    """Each (name, parameter)'s .grad against ``want`` (autograd.grad's tuple, None = no path: an exact zero)."""
    for (name, p), w in zip(named, want):
        w = torch.zeros_like(p) if w is None else w
        assert p.grad is not None, (what, name)
        error = float((p.grad - w).abs().max())  # float32 double backward, summed in another order
        assert error <= 1e-4 * float(w.abs().max()) + 1e-7, (what, name, error)


def test_r1_step_gradient_is_half_r1_times_interval_on_each_ds_real_images(narrow):
    """Lazy R1 (StyleGAN2 App. B): each D's gradient is that of r1 / 2 * d_reg_every * E||grad_x D(x)||^2, with
    x the real images that D judges: x_f for D_face, x_s for D_style, (x_s, z_s) for D_style_latent."""
    torch.manual_seed(6)
    s = _state(r1=3.0, d_reg_every=5)
    b = _fixed_batch(s, 60)
    start = {name: copy.deepcopy(d) for name, d in s.nets.discriminators().items()}  # the step moves the weights
    stats = bt.d_reg_step(s, b)
    for name, stat, x, extra in (("d_face", "r1_face", b.x_f, ()), ("d_style", "r1_style", b.x_s, ()),
                                 ("d_style_latent", "r1_style_latent", b.x_s, (b.z_s,))):
        d = start[name]
        x = x.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(d(x, *extra).sum(), x, create_graph=True)  # [2, 3, 8, 8]
        penalty = grad_x.pow(2).sum(dim=(1, 2, 3)).mean()
        assert stats[stat] == pytest.approx(float(penalty.detach()), rel=1e-5), stat
        want = torch.autograd.grad(3.0 / 2 * 5 * penalty, list(d.parameters()), allow_unused=True)
        _assert_grads(s.nets.discriminators()[name].named_parameters(), want, name)


def test_path_length_step_gradient_is_weight_times_interval(narrow):
    """Lazy path length: G's gradient is that of path_regularize * g_reg_every * E(L - a)^2 on a batch of
    batch / path_batch_shrink natural faces (L and a written out, StyleGAN2 Sec. 3.2)."""
    torch.manual_seed(7)
    s = _state(batch=4, path_batch_shrink=2, path_regularize=0.7, g_reg_every=3, mixing=0.0)
    s.mean_path_length = torch.tensor(0.3)
    start = copy.deepcopy(s.nets.g)
    torch.manual_seed(70)
    stats = bt.g_reg_step(s)
    torch.manual_seed(70)  # the same draws in the same order: z_f, G's noise, the projection y
    z = torch.randn(2, STYLE_DIM)
    img, latents = start([z], return_latents=True)  # [2, 3, 8, 8], [2, n_latent, STYLE_DIM]
    y = torch.randn_like(img) / math.sqrt(8 * 8)
    (jt_y,) = torch.autograd.grad((img * y).sum(), latents, create_graph=True)
    lengths = jt_y.pow(2).sum(2).mean(1).sqrt()  # [2]
    target = 0.3 + 0.01 * (float(lengths.detach().mean()) - 0.3)
    penalty = (lengths - target).pow(2).mean()
    assert stats["path_loss"] == pytest.approx(float(penalty.detach()), rel=1e-4)
    assert stats["mean_path_length"] == pytest.approx(target, rel=1e-5)
    trainable = [(k, p) for k, p in start.named_parameters() if not k.startswith("embedder.")]
    want = torch.autograd.grad(0.7 * 3 * penalty, [p for _, p in trainable], allow_unused=True)
    after = dict(s.nets.g.named_parameters())
    _assert_grads([(k, after[k]) for k, _ in trainable], want, "g")


def test_lazy_regularisers_run_on_their_own_intervals(narrow, monkeypatch):
    """R1 at iterations 0, d_reg_every, 2 d_reg_every, ...; the path length at multiples of g_reg_every."""
    s = _state(d_reg_every=3, g_reg_every=2)
    b = _fixed_batch(s, 61)
    ran = []
    monkeypatch.setattr(bt, "d_step", lambda s_, b_: {})
    monkeypatch.setattr(bt, "g_step", lambda s_, b_: {})
    monkeypatch.setattr(bt, "d_reg_step", lambda s_, b_: ran.append(("r1", s_.iteration)) or {})
    monkeypatch.setattr(bt, "g_reg_step", lambda s_: ran.append(("path", s_.iteration)) or {})
    for _ in range(7):
        bt.train_iteration(s, b)
    assert [it for phase, it in ran if phase == "r1"] == [0, 3, 6]
    assert [it for phase, it in ran if phase == "path"] == [0, 2, 4, 6]


def test_adam_carries_the_lazy_regularisation_correction(narrow):
    """StyleGAN2 App. B: with a regulariser every k steps, Adam's lr * c and betas ** c, c = k / (k + 1)."""
    s = _state(lr=0.003, d_reg_every=4, g_reg_every=3)
    for optim, c, params in ((s.d_optim, 4 / 5, s.nets.d_parameters()), (s.g_optim, 3 / 4, s.nets.g_trainable())):
        (group,) = optim.param_groups
        assert group["lr"] == pytest.approx(0.003 * c, rel=1e-12)
        assert group["betas"][0] == 0 and group["betas"][1] == pytest.approx(0.99 ** c, rel=1e-12)
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert not any(name.startswith("embedder.") for name, p in s.nets.g.named_parameters()
                   if any(p is q for q in s.g_optim.param_groups[0]["params"]))


def test_g_ema_half_life_counts_the_images_of_every_rank(narrow, monkeypatch):
    """g_ema's per-step decay 0.5 ** (batch * world_size / half-life images): with 4 processes a step averages
    4 * batch images, as the half-life in images says."""
    s = _state(ema_kimg=0.01)  # half-life 10 images
    b = _fixed_batch(s, 62)
    for phase in ("d_step", "g_step"):
        monkeypatch.setattr(bt, phase, lambda s_, b_: {})
    for phase in ("d_reg_step", "g_reg_step"):
        monkeypatch.setattr(bt, phase, lambda *args: {})
    monkeypatch.setattr(bt.distributed, "get_world_size", lambda: 4)
    with torch.no_grad():
        for name, p in s.nets.g.named_parameters():
            if not name.startswith("embedder."):
                p.add_(torch.randn_like(p))
    old = {k: v.detach().clone() for k, v in s.nets.g_ema.named_parameters()}
    bt.train_iteration(s, b)
    decay = 0.5 ** (2 * 4 / 10)
    for name, p in s.nets.g_ema.named_parameters():
        if name.startswith("embedder."):
            continue
        new = dict(s.nets.g.named_parameters())[name]
        assert torch.allclose(p, old[name] + (1 - decay) * (new - old[name]), atol=1e-6), name


@pytest.mark.parametrize("reading", bt.EQ8_READINGS)
def test_g_step_scores_the_stylized_image_with_its_eq8_code(narrow, reading):
    """G's Eq. 8 term: D_style_latent on (x_s^, z_s^-), the queue code that D saw the same image with.
    'conditional': the code x_s^ was made from; 'paper': x_s^ is made from the batch's z_s, paired with a
    queue code (never its own z_s). The loss is softplus(-D(x_s^, z_s^-)) on that pair."""
    torch.manual_seed(9)
    s = _state(eq8=reading, mixing=0.0)
    b = _fixed_batch(s, 63)
    queue = torch.randn(6, STYLE_DIM) * 3 + 5  # far from the batch's codes
    s.queue.push(queue)
    made = []
    forward = s.nets.g.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        made.append((kwargs.get("z_embed"), out[0].detach().clone()))
        return out

    s.nets.g.forward = recording
    judged = []
    hook = s.nets.d_style_latent.register_forward_hook(
        lambda module, args, out: judged.append((args[0].detach().clone(), args[1].detach().clone(),
                                                 out.detach().clone())))
    stats = bt.g_step(s, b)
    hook.remove()
    assert len(made) == 2 and len(judged) == 1
    (code, stylized), (image, pair, logits) = made[1], judged[0]
    assert torch.equal(image, stylized)
    assert all(any(torch.equal(row, q) for q in queue) for row in pair)  # z_s^-: queue codes
    if reading == "conditional":
        assert torch.equal(pair, code)
    else:
        assert torch.equal(code, b.z_s) and not torch.equal(pair, b.z_s)
    want = torch.log1p(torch.exp(-logits.double())).mean()
    assert stats["g_style_latent"] == pytest.approx(float(want), rel=1e-5)


def test_wbm_weights_clamped_after_a_g_step_without_path_length(narrow, monkeypatch):
    """The WBM weights stay in [0, 1] after every G step, also in an iteration without the path-length step
    (which clamps too): weights at the bounds, with gradients that push every one of them out."""
    torch.manual_seed(11)
    s = _state(g_reg_every=4, mixing=0.0)
    s.iteration = 1  # 1 % 4: no path-length step this iteration
    b = _fixed_batch(s, 64)
    monkeypatch.setattr(bt, "g_reg_step", lambda s_: pytest.fail("the path-length step ran"))
    g = s.nets.g
    with torch.no_grad():
        g.add_weight.copy_((torch.arange(g.add_weight.numel()) % 2).float().view_as(g.add_weight))
    start = g.add_weight.detach().clone()
    outward = torch.where(start == 1, -1.0, 1.0)  # a descent step raises the ones and lowers the zeros
    hook = g.add_weight.register_hook(lambda grad: outward.clone())
    bt.train_iteration(s, b)
    hook.remove()
    assert bool((s.g_optim.state[g.add_weight]["exp_avg"] == outward).all())  # the step pushed them out
    assert torch.equal(g.add_weight.detach(), start)


def _gradients_at_step(s, phase, b, monkeypatch):
    """The .grad that ``phase`` (bt.d_step / bt.g_step) hands to its optimizer, with lr 0 (the weights stay) and
    every .grad pre-filled with 7 (what R1, path length or the step before leave there must not count)."""
    optim, params = ((s.d_optim, s.nets.d_parameters()) if phase is bt.d_step else
                     (s.g_optim, s.nets.g_trainable()))
    for group in optim.param_groups:
        group["lr"] = 0.0
    seen, step = [], optim.step

    def recording_step(*args, **kwargs):
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        return step(*args, **kwargs)

    monkeypatch.setattr(optim, "step", recording_step)
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    torch.manual_seed(21)
    phase(s, b)
    assert len(seen) == 1
    return params, seen[0]


@pytest.mark.parametrize("reading", bt.EQ8_READINGS)
def test_phase_gradients_are_those_of_equations_6_to_9(narrow, monkeypatch, reading):
    """d_step and g_step against Eq. 6-9 written out from the loss helpers (which test_losses_match_equations_6_to_9
    checks): D_face gets x_f and the natural fake, D_style x_s and the stylized fake, D_style_latent (x_s, z_s)
    against (stylized, z_s^-); G's natural image is scored by D_face, its stylized one by D_style and D_style_latent;
    every term reaches the gradient, and no stale .grad does. The codes are fixed, the noise drawn from one seed."""
    torch.manual_seed(13)
    s = _state(mixing=0.0, eq8=reading)
    b = _fixed_batch(s, 68)
    z_f, z_negative = torch.randn(2, STYLE_DIM), torch.randn(2, STYLE_DIM) * 0.03
    codes = bt.fake_codes([z_f], None, b.z_s, z_negative, reading)
    monkeypatch.setattr(bt, "phase_codes", lambda s_, b_: codes)
    g, d_face, d_style, d_style_latent = s.nets.g, s.nets.d_face, s.nets.d_style, s.nets.d_style_latent

    def fakes():  # natural (i = n_latent), then full style (i = 0), as generate_fakes draws their noise
        torch.manual_seed(21)
        return g([z_f])[0], g([z_f], z_embed=codes.z_style, add_weight_index=0)[0]

    params, got = _gradients_at_step(s, bt.d_step, b, monkeypatch)
    with torch.no_grad():
        face, style = fakes()
    eq6_to_8 = (bt.d_logistic_loss(d_face(b.x_f), d_face(face)) + bt.d_logistic_loss(d_style(b.x_s), d_style(style))
                + bt.d_logistic_loss(d_style_latent(b.x_s, b.z_s), d_style_latent(style, z_negative)))
    _assert_close_grads(got, torch.autograd.grad(eq6_to_8, params, allow_unused=True), "D")

    params, got = _gradients_at_step(s, bt.g_step, b, monkeypatch)
    face, style = fakes()
    eq9 = (bt.g_nonsaturating_loss(d_face(face)) + bt.g_nonsaturating_loss(d_style(style))
           + bt.g_nonsaturating_loss(d_style_latent(style, z_negative)))
    _assert_close_grads(got, torch.autograd.grad(eq9, params, allow_unused=True), "G")


def _assert_close_grads(got, want, what):
    for k, (g, w) in enumerate(zip(got, want)):
        w = torch.zeros_like(g) if w is None else w
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (what, k, float((g - w).abs().max()))


def test_the_iterations_own_codes_are_not_its_negatives(narrow):
    """Eq. 8's z_s^- come from the queue of earlier batches: the batch's codes are pushed when its iteration ends.
    (queue_size = batch: were they pushed first, every negative would be one of them.)"""
    torch.manual_seed(12)
    s = _state(queue_size=2, mixing=0.0, eq8="paper")
    b = _fixed_batch(s, 67)
    earlier = torch.randn(2, STYLE_DIM) * 3 + 5
    s.queue.push(earlier)
    pairs = []
    hook = s.nets.d_style_latent.register_forward_hook(lambda m, args, out: pairs.append(args[1].detach().clone()))
    bt.train_iteration(s, b)
    hook.remove()
    negatives = [p for p in pairs if not torch.equal(p, b.z_s)]  # the real pair is (x_s, z_s)
    assert negatives and all(any(torch.equal(row, q) for q in earlier) for p in negatives for row in p)
    assert any(torch.equal(row, b.z_s[0]) for row in s.queue.codes)  # and pushed at the end


def test_path_length_step_mixes_face_codes(narrow):
    """The path-length step draws its face codes as the adversarial steps do (StyleGAN2's g_regularize: mixing),
    for batch // path_batch_shrink samples."""
    s = _state(batch=4, path_batch_shrink=2, mixing=1.0)
    calls, forward = [], s.nets.g.forward

    def recording(styles, *args, **kwargs):
        calls.append((len(styles), styles[0].shape[0], kwargs.get("inject_index")))
        return forward(styles, *args, **kwargs)

    s.nets.g.forward = recording
    bt.g_reg_step(s)
    assert len(calls) == 1
    n_codes, batch, inject = calls[0]
    assert n_codes == 2 and batch == 2 and 1 <= inject < s.n_latent


def test_checkpoint_latent_avg_is_the_face_mapping_mean(narrow):
    """The stored truncation centre (inference truncates toward ckpt['latent_avg']) is the mean of the FACE
    mapping over seeded codes, not the style mapping's."""
    g = _state().nets.g_ema
    z = torch.randn(4096, STYLE_DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        face_mean, style_mean = g.style(z).mean(0, keepdim=True), g.embedding(z).mean(0, keepdim=True)
    got = bt.latent_avg(g, 5)
    assert got.shape == (1, STYLE_DIM) and torch.allclose(got, face_mean, atol=1e-6)
    assert not torch.allclose(face_mean, style_mean, atol=1e-3)


def test_defaults_are_stylegan2s_and_fine_tuning_half_life_counts_every_rank():
    """train.py's argparse defaults come from TrainOptions: StyleGAN2's (rosinality's train.py) regularisation,
    mixing, lr and EMA. One-shot fine-tuning's g_ema half-life counts the images of every rank."""
    o = bt.TrainOptions(ffhq_lmdb="-")
    assert (o.r1, o.path_regularize, o.path_batch_shrink, o.d_reg_every, o.g_reg_every, o.mixing, o.lr) == (
        10.0, 2.0, 2, 16, 4, 0.9, 0.002)
    assert bt.DEFAULT_EMA_KIMG == 10.0 and bt.PATH_LENGTH_DECAY == 0.01
    finetune = bt.TrainOptions(ffhq_lmdb="-", iter=10, batch=2)
    finetune.finetune_style_img = ["x.png"]
    assert finetune.finetune
    assert bt.ema_half_life_images(finetune, 4) == 4 * bt.ema_half_life_images(finetune, 1)


# ---- one iteration with the real channel table, StyleGAN2 initialisation, inference -------------

def _rosinality_checkpoint(path, size):
    """A rosinality-format StyleGAN2 file (g, d, g_ema, latent_avg); its generators have no BlendGAN keys."""
    torch.manual_seed(11)
    g = Generator(size, STYLE_DIM, 2, load_pretrained_vgg=False, style_pool_size=32)
    torch.manual_seed(12)
    g_ema = Generator(size, STYLE_DIM, 2, load_pretrained_vgg=False, style_pool_size=32)
    torch.manual_seed(13)
    d = Discriminator(size)
    ckpt = {"g": synthesis_only(g), "d": d.state_dict(), "g_ema": synthesis_only(g_ema),
            "latent_avg": torch.randn(STYLE_DIM)}
    assert not any(k.startswith(("embedder", "embedding", "add_weight")) for k in ckpt["g"])
    save_checkpoint(ckpt, path)
    return ckpt


@pytest.fixture(scope="module")
def real_width_run(data, tmp_path_factory):
    """One iteration (D, R1, G, path length, EMA, queue) with the real channel table and --stylegan2_ckpt."""
    root = tmp_path_factory.mktemp("real_width")
    sg2 = _rosinality_checkpoint(str(root / "stylegan2.pt"), 8)
    opts = small_options(data, root / "run", stylegan2_ckpt=str(root / "stylegan2.pt"), channel_multiplier=2)
    before, _ = bt.setup(checked(bt.resolve_defaults(copy.deepcopy(opts))), log=lambda *a: None)
    after = bt.train(opts, log=lambda *a: None)  # the same seed: `before` is its starting point
    yield {"opts": opts, "before": before, "after": after, "stylegan2": sg2, "dir": root / "run"}
    shutil.rmtree(root, ignore_errors=True)  # its module is done: do not keep 670 MB to the session's end


def test_stylegan2_initialisation(real_width_run, data):
    nets, sg2 = real_width_run["before"].nets, real_width_run["stylegan2"]
    for own, part in ((nets.g, "g"), (nets.g_ema, "g_ema")):
        sd = own.state_dict()
        for k, v in sg2[part].items():
            assert torch.equal(sd[k], v), f"{part}.{k} not loaded"
        assert torch.equal(own.add_weight, torch.ones_like(own.add_weight))  # WBM weights start at 1
    assert not torch.equal(nets.g.style[1].weight, nets.g_ema.style[1].weight)  # g_ema came from 'g_ema'
    for k, v in nets.g.embedding.state_dict().items():  # the style mapping starts fresh, the same in both
        assert torch.equal(v, nets.g_ema.embedding.state_dict()[k])
    for k, v in sg2["d"].items():
        assert torch.equal(nets.d_face.state_dict()[k], v)
    assert not torch.equal(nets.d_style.convs[0][0].weight, nets.d_face.convs[0][0].weight)
    encoder = load_checkpoint(data["style_encoder"])["style_encoder"]
    for k, v in encoder.items():
        assert torch.equal(nets.g.embedder.state_dict()[k], v)
    assert nets.g.embedder is nets.g_ema.embedder  # one copy of the style encoder


def test_one_iteration_updates_trainable_modules_only(real_width_run):
    before, after = real_width_run["before"], real_width_run["after"]
    assert after.iteration == 1
    b_nets, a_nets = before.nets, after.nets
    g_params = {id(p) for group in after.g_optim.param_groups for p in group["params"]}
    for name, p in a_nets.g.named_parameters():
        old = dict(b_nets.g.named_parameters())[name]
        if name.startswith("embedder."):  # the frozen style encoder, VGG-19 included
            assert not p.requires_grad and id(p) not in g_params and torch.equal(p, old), name
            continue
        assert id(p) in g_params, name
        if name.startswith("embedding."):
            # WBM face weight 1 = style weight 0: in the first iteration from StyleGAN2 the style mapping has
            # no influence yet, so it gets no gradient (its training is checked in
            # test_finetune_from_release_layout_g_ema_only, whose WBM weights are inside (0, 1)).
            continue
        assert bool((after.g_optim.state[p]["exp_avg_sq"] > 0).all()), f"{name}: no gradient reached it"
        if name == "add_weight":  # moved down, or pushed above 1 and clamped back (paper: alpha in [0, 1])
            assert bool(((p < old) | (p == 1)).all()) and bool(((p >= 0) & (p <= 1)).all())
            assert bool((p < 1).any()), "no WBM weight left 1"
        else:
            assert not torch.equal(p, old), f"{name} did not change"
    for dname, d in a_nets.discriminators().items():
        for name, p in d.named_parameters():
            old = dict(b_nets.discriminators()[dname].named_parameters())[name]
            assert not torch.equal(p, old), f"{dname}.{name} did not change"
    # g_ema moved towards g by exactly (1 - decay); the shared encoder did not move.
    decay = bt.ema_decay(after.opts, 1)
    for name, p in a_nets.g_ema.named_parameters():
        old = dict(b_nets.g_ema.named_parameters())[name]
        if name.startswith("embedder."):
            assert torch.equal(p, old)
            continue
        want = old + (1 - decay) * (dict(a_nets.g.named_parameters())[name] - old)
        assert torch.allclose(p, want, atol=1e-6), name
    assert len(after.queue) == after.opts.batch
    log = read_jsonl(os.path.join(real_width_run["dir"], "logs", "scalars.jsonl"))
    assert len(log) == 1
    for key in ("d_face", "d_style", "d_style_latent", "g_face", "g_style", "g_style_latent", "r1_face",
                "r1_style", "r1_style_latent", "path_loss", "path_length", "mean_path_length",
                "speed/images_per_s", "wbm/alpha_00"):
        assert math.isfinite(log[0][key]), key
    assert log[0]["r1_face"] > 0 and log[0]["path_length"] > 0 and log[0]["mean_path_length"] > 0


def test_wbm_weights_get_a_gradient_at_their_initial_value(narrow):
    """add_weight starts at exactly 1; a plain clamp would give it no gradient there and it would never train."""
    torch.manual_seed(8)
    g = Generator(8, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    assert torch.equal(g.add_weight, torch.ones_like(g.add_weight))
    img, _ = g([torch.randn(2, STYLE_DIM)], z_embed=torch.randn(2, STYLE_DIM), add_weight_index=0)
    img.square().mean().backward()
    assert g.add_weight.grad is not None and bool((g.add_weight.grad != 0).all())


def test_checkpoint_layout_and_generate_image_pairs(real_width_run, tmp_path):
    run_dir = real_width_run["dir"]
    path = os.path.join(run_dir, "checkpoints", "000001.pt")
    ckpt = load_checkpoint(path)  # weights-only
    for key in ("g", "g_ema", "latent_avg", "d_face", "d_style", "d_style_latent", "g_optim", "d_optim", "queue",
                "iteration", "args", "rng", "mean_path_length"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 1 and ckpt["latent_avg"].shape == (1, STYLE_DIM)
    assert not any(k.startswith("embedder.") for k in ckpt["g"])  # one copy of the encoder per file
    release = Generator(8, STYLE_DIM, 2, load_pretrained_vgg=False)  # the release's constructor
    release.load_state_dict(ckpt["g_ema"], strict=True)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["size"] == 8 and config["style_dim"] == STYLE_DIM
    grid = decode_png(os.path.join(run_dir, "samples", "000001.png"))
    assert grid.shape == (2 * 8, 4 * 8, 3) and grid.std() > 0

    import generate_image_pairs

    out = tmp_path / "pairs"
    style = os.path.join(STYLES, "100000.jpg")
    code = generate_image_pairs.main(["--ckpt", path, "--pics", "2", "--outdir", str(out), "--device", "cpu",
                                      "--add_weight_index", "1", "--style_img", style, "--batch", "2"])
    assert code in (0, None)
    names = sorted(os.listdir(out))
    assert names == ["000000.jpg", "000001.jpg"]
    for name in names:
        with Image.open(out / name) as img:
            assert img.size == (16, 8)
            arr = np.asarray(img.convert("RGB"))
        assert arr.std() > 0


# ---- a short run, samples, non-finite guard, --amp -----------------------------------------------

def _held_out_split(root):
    """LMDBs (32 px) of 6 of the 8 test faces and 24 of the 30 test styles; the others held out, as tensors."""
    lmdbs, held = {}, {}
    for name, folder, n_train in (("faces", FACES, 6), ("styles", STYLES, 24)):
        files = sorted(os.listdir(folder))
        train_dir = root / f"{name}_train"
        train_dir.mkdir()
        for f in files[:n_train]:
            os.symlink(os.path.join(folder, f), train_dir / f)
        lmdbs[name] = str(root / f"{name}.lmdb")
        prepare_data.prepare(prepare_data.PrepareOptions(out=lmdbs[name], paths=[str(train_dir)], size=(32,),
                                                         n_worker=0, format="png"))
        held[name] = bt.read_reference_images([os.path.join(folder, f) for f in files[n_train:]], 32)
    return lmdbs, held


def _real_above_fake(d, real, fake):
    """Fraction of (real, fake) pairs that D scores real above fake (the ROC AUC of D's logits)."""
    with torch.no_grad():
        return float((d(real).view(-1, 1) > d(fake).view(1, -1)).float().mean())


def test_a_hundred_iterations_learn_in_the_right_direction(narrow, data, tmp_path):
    """100 iterations at 32 px (g_ema half-life 50 images, so that it follows so short a run), then on held-out
    faces / styles and fresh samples, against the start: D_face and D_style rank real above g_ema's fakes more
    often; G learned to use the style branch (WBM style weights alpha up from 0) and g_ema's stylized samples'
    style codes are closer to their references than at the start. Every logged value finite, grids written.

    (Stylized codes closer to their references than the natural samples' codes are does not hold yet after so
    few iterations with this test's random-VGG style encoder; it is not asserted.)
    """
    n_iter = 100
    lmdbs, held = _held_out_split(tmp_path)
    opts = small_options(data, tmp_path / "run", ffhq_lmdb=lmdbs["faces"], aahq_lmdb=lmdbs["styles"], size=32,
                         iter=n_iter, sample_every=n_iter // 2, save_every=n_iter, queue_size=32, ema_kimg=0.05)
    start, _ = bt.setup(checked(bt.resolve_defaults(copy.deepcopy(opts))), log=lambda *a: None)
    s = bt.train(opts, log=lambda *a: None)  # the same seed: `start` is its starting point
    torch.manual_seed(1234)
    z = torch.randn(12, STYLE_DIM)
    real_faces = torch.cat([held["faces"], held["faces"].flip(3)])  # [4, 3, 32, 32]
    real_styles = held["styles"]  # [6, 3, 32, 32]
    ranks, closeness = {}, {}
    for when, nets in (("start", start.nets), ("end", s.nets)):
        g = nets.g_ema
        with torch.no_grad():
            z_ref = g.embedder(real_styles)[torch.arange(12) % 6]
            natural = g([z], randomize_noise=False)[0]
            stylized = g([z], z_embed=z_ref, add_weight_index=0, randomize_noise=False)[0]
            closeness[when] = float(torch.nn.functional.cosine_similarity(g.embedder(stylized), z_ref, dim=1).mean())
        ranks[when] = (_real_above_fake(nets.d_face, real_faces, natural),
                       _real_above_fake(nets.d_style, real_styles, stylized))
    for k, name in enumerate(("d_face", "d_style")):
        assert ranks["end"][k] > ranks["start"][k] and ranks["end"][k] > 0.5, (name, ranks)
    alpha = 1 - s.nets.g_ema.add_weight.clamp(0, 1)
    assert float((1 - start.nets.g_ema.add_weight).abs().max()) == 0 and float(alpha.max()) > 0.02
    # the cosine starts high (random VGG Gram codes of any two images are alike): ask the gap to 1 to shrink
    assert 1 - closeness["end"] < 0.75 * (1 - closeness["start"]), closeness

    log = read_jsonl(os.path.join(opts.out_dir, "logs", "scalars.jsonl"))
    assert [r["step"] for r in log] == list(range(1, n_iter + 1))
    for record in log:
        assert all(math.isfinite(v) for v in record.values()), record
    for alpha in (v for k, v in log[-1].items() if k.startswith("wbm/alpha_")):
        assert 0 <= alpha <= 1
    assert len(s.queue) == min(32, n_iter * opts.batch)
    for step in (n_iter // 2, n_iter):
        grid = decode_png(os.path.join(opts.out_dir, "samples", f"{step:06d}.png"))
        assert grid.shape == (2 * 32, 4 * 32, 3)
        columns = grid.reshape(2 * 32, 4, 32, 3).astype(float)
        assert all(columns[:, c].std() > 0 for c in range(4))
    assert os.path.isfile(os.path.join(opts.out_dir, "checkpoints", f"{n_iter:06d}.pt"))


def _poison_d_loss(monkeypatch, bad_iterations):
    """d_logistic_loss returns NaN in the D steps of the given (1-based) iterations (3 terms per D step)."""
    real = bt.d_logistic_loss
    calls = {"n": 0}

    def poisoned(real_pred, fake_pred):
        calls["n"] += 1
        loss = real(real_pred, fake_pred)
        return loss * float("nan") if (calls["n"] - 1) // 3 + 1 in bad_iterations else loss

    monkeypatch.setattr(bt, "d_logistic_loss", poisoned)


def test_flip_mirrors_faces_and_style_images(narrow, data, tmp_path, monkeypatch):
    """--flip augments both real batches: x_f and x_s each go through random_flip once per iteration."""
    flipped = []

    def recording_flip(x, *args, **kwargs):
        flipped.append(x.clone())
        return x

    monkeypatch.setattr(bt, "random_flip", recording_flip)
    bt.train(small_options(data, tmp_path / "run", iter=2, flip=True), log=lambda *a, **k: None)
    assert len(flipped) == 4 and all(x.shape == (2, 3, 8, 8) for x in flipped)
    assert not torch.equal(flipped[0], flipped[1])  # the faces, then the style images


def test_persistent_non_finite_loss_stops_and_keeps_last_good_checkpoint(narrow, data, tmp_path, monkeypatch):
    _poison_d_loss(monkeypatch, range(2, 100))  # from iteration 2 on: NaN for good
    opts = small_options(data, tmp_path / "run", iter=8, save_every=1)
    with pytest.raises(NonFiniteLossError, match="4 consecutive steps.*000001.pt"):
        bt.train(opts, log=lambda *a: None)
    ckpts = sorted(os.listdir(os.path.join(opts.out_dir, "checkpoints")))
    assert ckpts == ["000001.pt"]  # nothing written during the bad run (iterations 2-5 skipped D's step)
    log = read_jsonl(os.path.join(opts.out_dir, "logs", "scalars.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # iteration 5 (the 4th bad D step) stopped the run
    assert all(math.isfinite(v) for v in log[0].values())
    assert all(math.isnan(r["d_face"]) and math.isfinite(r["g_total"]) for r in log[1:])


def test_transient_non_finite_loss_skips_the_step_and_the_run_continues(narrow, data, tmp_path, monkeypatch):
    _poison_d_loss(monkeypatch, {2})
    opts = small_options(data, tmp_path / "run", iter=3, save_every=1, d_reg_every=100)
    seen = {}
    real_d_step = bt.d_step

    def recording(s, b):
        before = [p.detach().clone() for p in s.nets.d_parameters()]
        stats = real_d_step(s, b)
        moved = any(not torch.equal(a, p) for a, p in zip(before, s.nets.d_parameters()))
        seen[s.iteration + 1] = moved
        return stats

    monkeypatch.setattr(bt, "d_step", recording)
    s = bt.train(opts, log=lambda *a: None)
    assert s.iteration == 3 and seen == {1: True, 2: False, 3: True}  # the NaN step changed no weight
    assert all(bool(torch.isfinite(p).all()) for p in s.nets.d_parameters())
    # none written right after the skipped step, the next healthy one is
    assert sorted(os.listdir(os.path.join(opts.out_dir, "checkpoints"))) == ["000001.pt", "000003.pt"]


def test_float16_overflow_skips_the_step_and_halves_the_scale(narrow, monkeypatch):
    """--amp with float16 (GPUs without bfloat16; forced here on the CPU): GradScaler per optimizer."""
    monkeypatch.setattr(bt, "amp_dtype", lambda device: torch.float16)
    torch.manual_seed(4)
    s = _state(amp=True, mixing=0.0, r1=0, path_regularize=0)
    assert s.d_scaler.is_enabled() and s.g_scaler.is_enabled() and s.amp_dtype == torch.float16
    # The forward stays float32 here: on the CPU, float16 makes the minibatch-stddev layer's variance round
    # to 0 (sqrt'(0) = inf) and every step overflows. The scalers are those --amp builds, at a lower start.
    s.amp_dtype = None
    s.d_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    s.g_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x_f, x_s = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    b = bt.Batch(x_f, x_s, bt.encode_styles(s, x_s))

    def d_weights():
        return [p.detach().clone() for p in s.nets.d_parameters()]

    bt.train_iteration(s, b)
    scale = s.d_scaler.get_scale()
    first = next(iter(s.nets.d_face.parameters())).requires_grad_(True)  # (d_step sets it again)
    hook = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # an overflow in one gradient
    before = d_weights()
    stats = bt.train_iteration(s, b)
    hook.remove()
    assert math.isfinite(stats["d_total"])  # the loss was fine, its gradient overflowed
    assert all(torch.equal(a, p) for a, p in zip(before, s.nets.d_parameters()))  # step skipped
    assert s.d_scaler.get_scale() == scale / 2
    before = d_weights()
    bt.train_iteration(s, b)  # the run goes on: the next step updates D again
    assert any(not torch.equal(a, p) for a, p in zip(before, s.nets.d_parameters()))
    assert s.d_scaler.get_scale() == scale / 2
    assert all(bool(torch.isfinite(p).all()) for p in s.nets.d_parameters())


def test_amp_runs_the_adversarial_phases_under_autocast_and_the_regularisers_in_float32(narrow, monkeypatch):
    """--amp's D and G phases run under autocast in amp_dtype's dtype, R1 and path length never; the
    scalers are on for float16 only."""
    torch.manual_seed(5)
    s = _state(amp=True, mixing=0.0)
    assert s.amp_dtype == torch.bfloat16 and not s.d_scaler.is_enabled() and not s.g_scaler.is_enabled()
    b = _fixed_batch(s, 3)
    seen = []

    def record(module, inputs, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    hooks = [m.register_forward_hook(record) for m in (s.nets.g, s.nets.d_face, s.nets.d_style,
                                                         s.nets.d_style_latent)]
    try:
        for phase, amp in ((bt.d_step, True), (bt.d_reg_step, False), (bt.g_step, True), (bt.g_reg_step, False)):
            seen.clear()
            phase(s) if phase is bt.g_reg_step else phase(s, b)
            assert seen, phase.__name__
            if amp:  # the D and G forwards of the adversarial terms (d_step's fakes come from G under no_grad)
                assert all(on and dtype == torch.bfloat16 for on, dtype in seen), (phase.__name__, seen)
            else:
                assert not any(on for on, _ in seen), (phase.__name__, seen)
    finally:
        for h in hooks:
            h.remove()
    # float16 where amp_dtype says so (GPUs before Ampere): autocast in float16, with both GradScalers on
    monkeypatch.setattr(bt, "amp_dtype", lambda device: torch.float16)
    s16 = _state(amp=True)
    assert s16.d_scaler.is_enabled() and s16.g_scaler.is_enabled()
    with s16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def test_float16_non_finite_loss_skips_the_step_and_halves_the_scale(narrow, monkeypatch):
    """A NaN loss under float16 skips the step and halves the loss scale (as GradScaler does on an
    overflowing gradient); the next finite step goes ahead at that scale."""
    monkeypatch.setattr(bt, "amp_dtype", lambda device: torch.float16)
    torch.manual_seed(4)
    s = _state(amp=True, mixing=0.0, r1=0, path_regularize=0)
    s.amp_dtype = None  # float32 forward (see test_float16_overflow_skips_the_step_and_halves_the_scale)
    s.d_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    s.g_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    b = _fixed_batch(s, 9)
    _poison_d_loss(monkeypatch, {1})  # the first D step's three terms are NaN

    def d_weights():
        return [p.detach().clone() for p in s.nets.d_parameters()]

    before = d_weights()
    stats = bt.d_step(s, b)
    assert math.isnan(stats["d_total"])
    assert all(torch.equal(a, p) for a, p in zip(before, s.nets.d_parameters()))
    assert s.d_scaler.get_scale() == 128.0 and s.g_scaler.get_scale() == 256.0
    before = d_weights()
    stats = bt.d_step(s, b)
    assert math.isfinite(stats["d_total"]) and s.d_scaler.get_scale() == 128.0
    assert any(not torch.equal(a, p) for a, p in zip(before, s.nets.d_parameters()))


def test_the_float32_regularisers_ignore_the_loss_scale(narrow, monkeypatch):
    """R1 and path length backpropagate
    unscaled float32 losses, so under float16 Adam must take their gradient as it is, not divided by the loss
    scale (R1 would then weigh 1/65536 of its share in Adam's moments, which the adversarial gradient shares).
    The optimizers are fused (the scale is undone inside Adam's kernel), so the moments are compared."""
    moments = {}
    for amp in (False, True):
        with monkeypatch.context() as m:
            if amp:
                m.setattr(bt, "amp_dtype", lambda device: torch.float16)
            torch.manual_seed(14)
            s = _state(amp=amp, mixing=0.0)
            if amp:
                s.amp_dtype = None  # float32 forward (see test_float16_overflow_skips_the_step_and_halves_the_scale)
                s.d_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
                s.g_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
                for scaler in (s.d_scaler, s.g_scaler):
                    scaler.scale(torch.ones(()))  # in use, as after the run's first D and G steps
            b = _fixed_batch(s, 14)
            bt.d_reg_step(s, b)
            torch.manual_seed(15)
            bt.g_reg_step(s)
            for name, optim, params in (("r1", s.d_optim, s.nets.d_parameters()),
                                        ("path", s.g_optim, s.nets.g_trainable())):
                moments[amp, name] = [optim.state[p]["exp_avg_sq"].clone() for p in params if p in optim.state]
    for name in ("r1", "path"):
        assert moments[False, name] and any(bool(v.sum() > 0) for v in moments[False, name])
        assert len(moments[True, name]) == len(moments[False, name])
        for plain, scaled in zip(moments[False, name], moments[True, name]):
            assert torch.allclose(scaled, plain, rtol=1e-4, atol=1e-30), name


def test_non_finite_weights_stop_the_run_at_once_naming_the_iteration(narrow):
    """One NaN weight tensor among finite ones stops the run at once, naming the iteration (1-based)."""
    guard = NonFiniteGuard(patience=5)
    with pytest.raises(NonFiniteLossError, match="step 3: loss 'a' is nan and the weights are no longer finite"):
        guard.check("d", {"a": float("nan")}, 3, params=[torch.ones(2), torch.tensor([1.0, float("nan")])])
    torch.manual_seed(7)
    s = _state(mixing=0.0)
    b = _fixed_batch(s, 11)
    s.iteration = 4
    with torch.no_grad():
        next(iter(s.nets.d_style.parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 5: loss '.*' is nan and the weights are no longer finite"):
        bt.d_step(s, b)


def test_a_non_finite_path_length_step_keeps_the_running_mean(narrow, monkeypatch):
    """A skipped (NaN) path-length step leaves the mean path length as it was; taken into the running mean,
    one NaN would make every later path-length penalty NaN, and the run would stop."""
    torch.manual_seed(6)
    s = _state(mixing=0.0)
    s.mean_path_length = torch.tensor(0.75)
    real = bt.path_length_penalty

    def poisoned(*args, **kwargs):
        penalty, target, lengths = real(*args, **kwargs)
        return penalty * float("nan"), target * float("nan"), lengths * float("nan")

    monkeypatch.setattr(bt, "path_length_penalty", poisoned)
    before = [p.detach().clone() for p in s.nets.g_trainable()]
    stats = bt.g_reg_step(s)
    assert math.isnan(stats["path_length"]) and stats["mean_path_length"] == 0.75
    assert float(s.mean_path_length) == 0.75
    assert all(torch.equal(a, p) for a, p in zip(before, s.nets.g_trainable()))  # the step was skipped


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step(narrow):
    """float32 (or bfloat16, whose GradScaler is off): an inf gradient of a finite G loss would make G NaN in one
    step, and that iteration's checkpoint would hold NaN weights named the last good ones. The step is skipped
    instead and counted by the guard like a non-finite loss (no checkpoint while it lasts)."""
    torch.manual_seed(12)
    s = _state(mixing=0.0, r1=0, path_regularize=0, nonfinite_patience=2)
    b = _fixed_batch(s, 12)
    before = [p.detach().clone() for p in s.nets.g_trainable()]
    hook = s.nets.g.convs[0].conv.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        stats = bt.g_step(s, b)
        assert math.isfinite(stats["g_total"])
        assert all(torch.equal(a, p) for a, p in zip(before, s.nets.g_trainable()))
        assert not s.nonfinite.healthy
        with pytest.raises(NonFiniteLossError, match=r"step 1: a gradient is not finite \(the losses are\), "
                                                     r"non-finite for 2 consecutive steps"):
            bt.g_step(s, b)
    finally:
        hook.remove()
    bt.g_step(s, b)
    assert s.nonfinite.healthy and not all(torch.equal(a, p) for a, p in zip(before, s.nets.g_trainable()))


def test_amp_dtype_and_guard_patience(monkeypatch):
    assert bt.amp_dtype(torch.device("cpu")) == torch.bfloat16
    # by the training device's compute capability: bfloat16 from Ampere on, float16 (with GradScaler) on a
    # V100 / T4, where torch.cuda.is_bf16_supported() is True too (it counts the emulation)
    capability = {0: (7, 0), 1: (8, 0), 2: (7, 5), 3: (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    assert [bt.amp_dtype(torch.device("cuda", i)) for i in range(4)] == [torch.float16, torch.bfloat16,
                                                                          torch.float16, torch.bfloat16]
    guard = NonFiniteGuard(patience=2)
    w = [torch.ones(3)]
    assert guard.check("d", {"a": 1.0}, 1, params=w) and guard.healthy
    assert not guard.check("d", {"a": float("inf")}, 2, params=w) and not guard.healthy
    assert guard.check("g", {"a": 1.0}, 2, params=w)  # phases counted apart
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps; training stopped, the last good "
                                                 "checkpoint is c.pt"):
        guard.check("d", {"a": float("nan")}, 3, "c.pt", params=w)
    fresh = NonFiniteGuard(patience=5)
    with pytest.raises(NonFiniteLossError, match="weights are no longer finite"):
        fresh.check("d", {"a": float("nan")}, 1, params=[torch.tensor([1.0, float("nan")])])


# ---- starting points: StyleGAN2, BlendGAN and style-encoder files ---------------------------------

def _equal_states(module, sd, skip=()):
    own = module.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith(skip))


def _generator(seed):
    torch.manual_seed(seed)
    g = Generator(8, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with torch.no_grad():
        g.add_weight.copy_(torch.rand_like(g.add_weight))
    return g


# --blendgan_ckpt starts G, g_ema and the discriminators from the file's own entries
def test_blendgan_start_loads_g_g_ema_and_discriminators_from_their_entries(narrow, tmp_path):
    g_ema = _generator(31)
    release = str(tmp_path / "release.pt")
    save_checkpoint({"g_ema": g_ema.state_dict()}, release)  # the release layout: g_ema only
    s = _state()
    bt.load_blendgan_start(s.nets, release, None, lambda *a: None)
    assert _equal_states(s.nets.g_ema, g_ema.state_dict())
    assert _equal_states(s.nets.g, g_ema.state_dict())  # G starts where g_ema is, not from random weights

    # this trainer's layout: 'g' (no style encoder) differs from 'g_ema'; the three Ds are in the file
    g = _generator(32)
    torch.manual_seed(33)
    ds = {"d_face": Discriminator(8, channel_multiplier=1).state_dict(),
          "d_style": Discriminator(8, channel_multiplier=1).state_dict(),
          "d_style_latent": ProjectionDiscriminator(8, STYLE_DIM, channel_multiplier=1).state_dict()}
    own = str(tmp_path / "own.pt")
    save_checkpoint({"g_ema": g_ema.state_dict(), "g": bt._generator_state_without_encoder(g), **ds}, own)
    s = _state()
    bt.load_blendgan_start(s.nets, own, None, lambda *a: None)
    assert _equal_states(s.nets.g_ema, g_ema.state_dict())
    assert _equal_states(s.nets.g, g.state_dict(), skip=("embedder.",))
    assert not torch.equal(s.nets.g.style[1].weight, s.nets.g_ema.style[1].weight)
    for name, sd in ds.items():
        assert _equal_states(s.nets.discriminators()[name], sd), name


# every style-encoder file layout load_style_encoder documents starts E_style from it
def test_style_encoder_loads_from_every_documented_layout(narrow, tmp_path):
    torch.manual_seed(41)
    enc = StyleEncoder(STYLE_DIM, load_pretrained_vgg=False, pool_size=32)
    sd = enc.state_dict()
    blendgan = _generator(42)
    layouts = {"style_encoder": ({"style_encoder": sd}, sd), "embedder": ({"embedder": sd}, sd),
               "bare": (sd, sd),
               "g_ema": ({"g_ema": blendgan.state_dict()},
                         {k[len("embedder."):]: v for k, v in blendgan.state_dict().items()
                          if k.startswith("embedder.")})}
    for name, (ckpt, want) in layouts.items():
        path = str(tmp_path / f"{name}.pt")
        save_checkpoint(ckpt, path)
        s = _state()
        bt.load_style_encoder(s.nets.g, path, None, lambda *a: None)
        assert _equal_states(s.nets.g.embedder, want) and s.nets.g_ema.embedder is s.nets.g.embedder, name

    # MLP only: VGG-19 from --vgg_ckpt (torchvision keys 'features.N.*'), the MLP from the file
    torch.manual_seed(43)
    vgg = StyleEncoder(STYLE_DIM, load_pretrained_vgg=False, pool_size=32).embedder.feature_extractor
    vgg_path = str(tmp_path / "vgg19.pth")
    save_checkpoint({f"features.{k}": v for k, v in vgg.vgg_layers.state_dict().items()}, vgg_path)
    mlp = {k: v for k, v in sd.items() if k.startswith("embedder_mlp.")}
    path = str(tmp_path / "mlp.pt")
    save_checkpoint({"style_encoder": mlp}, path)
    s = _state()
    bt.load_style_encoder(s.nets.g, path, vgg_path, lambda *a: None)
    assert _equal_states(s.nets.g.embedder, mlp)
    assert _equal_states(s.nets.g.embedder.embedder.feature_extractor.vgg_layers, vgg.vgg_layers.state_dict())
    assert not _equal_states(s.nets.g.embedder.embedder.feature_extractor.vgg_layers,
                             enc.embedder.feature_extractor.vgg_layers.state_dict())


# only BlendGAN's own parts may be absent from a StyleGAN2 file; a missing synthesis layer is an error
def test_stylegan2_file_missing_a_synthesis_layer_is_refused(narrow, tmp_path):
    g = _generator(51)
    synthesis = synthesis_only(g)
    torch.manual_seed(52)
    d = Discriminator(8, channel_multiplier=1).state_dict()
    good = str(tmp_path / "good.pt")
    save_checkpoint({"g": synthesis, "g_ema": synthesis, "d": d}, good)
    bt.load_stylegan2(_state().nets, good, lambda *a: None)  # the BlendGAN-only keys may be absent
    lost = "convs.0.conv.weight"
    assert lost in synthesis
    bad = str(tmp_path / "bad.pt")
    save_checkpoint({"g": {k: v for k, v in synthesis.items() if k != lost}, "g_ema": synthesis, "d": d}, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}\['g'\].*1 missing: {lost}"):
        bt.load_stylegan2(_state().nets, bad, lambda *a: None)


# a StyleGAN2 file of another size: the error names the file's size (counted from its ToRGBs), not the run's
def test_stylegan2_file_of_another_size_names_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "stylegan2_channels", lambda channel_multiplier: {4: 512, 8: 32, 16: 32})
    torch.manual_seed(61)
    g16 = Generator(16, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    synthesis = synthesis_only(g16)
    path = str(tmp_path / "stylegan2_16px.pt")
    save_checkpoint({"g": synthesis, "g_ema": synthesis, "d": Discriminator(16, channel_multiplier=1).state_dict()},
                    path)
    with pytest.raises(CheckpointError, match=r"layout does not fit Generator.*looks like Generator\(size=16, "):
        bt.load_stylegan2(_state().nets, path, lambda *a: None)


# WBM weights outside [0, 1] in a start file are clamped before the first step (paper Sec. 3.2)
def test_start_clamps_the_files_wbm_weights(narrow, data, tmp_path):
    g = _generator(71)
    with torch.no_grad():
        g.add_weight.copy_(torch.linspace(-0.5, 1.5, g.add_weight.numel()).view_as(g.add_weight))
    path = str(tmp_path / "blendgan.pt")
    save_checkpoint({"g_ema": g.state_dict()}, path)
    opts = small_options(data, tmp_path / "run", style_encoder_ckpt=None, blendgan_ckpt=path)
    s, _ = bt.setup(bt.resolve_defaults(opts), log=lambda *a: None)
    assert torch.equal(s.nets.g.add_weight, g.add_weight.clamp(0, 1))


# ---- exact resume, also after SIGKILL --------------------------------------------------------------

def test_resume_after_sigkill_matches_uninterrupted_run(narrow, data, tmp_path):
    common = dict(iter=4, save_every=2, d_reg_every=2, g_reg_every=2, keep_checkpoints=5, log_every=3)
    reference = small_options(data, tmp_path / "uninterrupted", **common)
    bt.train(reference, log=lambda *a: None)

    killed = small_options(data, tmp_path / "killed", **common)
    runner = tmp_path / "runner.py"
    runner.write_text(TRAIN_RUNNER.format(root=ROOT, narrow=NARROW))
    ckpt_dir = os.path.join(killed.out_dir, "checkpoints")
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen([sys.executable, str(runner)] + cli_args(killed), stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env(), cwd=ROOT)
        deadline = time.time() + 400
        while not os.path.exists(os.path.join(ckpt_dir, "000002.pt")):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the run ended or stalled before its first checkpoint:\n{open(tmp_path / 'killed.log').read()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".pt") and not n.startswith(".")) == ["000002.pt"]

    ref2 = load_checkpoint(os.path.join(reference.out_dir, "checkpoints", "000002.pt"))
    got2 = load_checkpoint(os.path.join(ckpt_dir, "000002.pt"))
    for ckpt in (ref2, got2):
        ckpt.pop("args")
    assert_same(got2, ref2)  # the subprocess and this process compute the same run

    resumed = small_options(data, tmp_path / "killed", resume="latest", **common)
    s = bt.train(resumed, log=lambda *a: None)
    assert s.iteration == 4
    ref4 = load_checkpoint(os.path.join(reference.out_dir, "checkpoints", "000004.pt"))
    got4 = load_checkpoint(os.path.join(ckpt_dir, "000004.pt"))
    for ckpt in (ref4, got4):
        ckpt.pop("args")
    assert_same(got4, ref4)  # networks, g_ema, optimizers, queue, path-length mean, RNG states, iteration
    assert not torch.equal(got4["g_ema"]["style.1.weight"], got2["g_ema"]["style.1.weight"])
    # the step-3 means cover steps 1-3 as in the uninterrupted run: the checkpoint carried steps 1-2
    assert got2["log_window"]["counts"]["d_total"] == 2
    logs = [read_jsonl(os.path.join(o.out_dir, "logs", "scalars.jsonl")) for o in (reference, resumed)]
    means = [[{k: v for k, v in r.items() if k.startswith("mean/") or k == "step"} for r in log] for log in logs]
    assert means[0] == means[1] and [r["step"] for r in means[0]] == [3, 4] and "mean/d_total" in means[0][0]


def test_command_line_run_ends_naming_its_last_checkpoint(narrow, data, tmp_path, capsys):
    opts = small_options(data, tmp_path / "cli", iter=1, save_every=1)
    assert train_script.main(cli_args(opts)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    path = os.path.join(opts.out_dir, "checkpoints", "000001.pt")
    assert last == f"done at step 1: {path}" and os.path.isfile(path)


def test_eq8_reading_default_and_kept_on_resume(narrow, data, tmp_path):
    """--eq8 not given: a new run reads Eq. 8 as 'conditional'; a resumed run goes on with its checkpoint's
    reading (a run begun as 'paper' is not switched halfway); given, it wins, with a note."""
    import json

    fresh = bt.train(small_options(data, tmp_path / "fresh"), log=lambda *a: None)
    assert fresh.opts.eq8 == "conditional"
    bt.train(small_options(data, tmp_path / "paper", eq8="paper", save_every=1), log=lambda *a: None)
    resumed = bt.train(small_options(data, tmp_path / "paper", iter=2, save_every=1, resume="latest"),
                       log=lambda *a: None)
    assert resumed.opts.eq8 == "paper"
    assert json.load(open(tmp_path / "paper" / "config.json"))["eq8"] == "paper"
    lines = []
    switched = bt.train(small_options(data, tmp_path / "paper", iter=3, resume="latest", eq8="conditional"),
                        log=lines.append)
    assert switched.opts.eq8 == "conditional"
    assert any("was trained with Eq. 8 read as 'paper', this run continues with --eq8 conditional" in line
               for line in lines), lines


def test_start_warns_when_the_checkpoints_will_not_fit(narrow, data, tmp_path, small_disk, monkeypatch):
    """The estimate is the checkpoint file's size within a few percent; on a 1 MiB disk the start logs the exact
    warning and the run goes on as before, to the full disk at its save; with room there is no warning."""
    estimates = record_returns(monkeypatch, bt, "estimated_checkpoint_bytes")
    roomy = []
    bt.train(small_options(data, tmp_path / "run", save_every=1, keep_checkpoints=1), log=roomy.append)
    real = os.path.getsize(tmp_path / "run" / "checkpoints" / "000001.pt")
    assert len(estimates) == 1 and abs(estimates[0] - real) < 0.03 * real, (estimates, real)
    assert not any("warning: checkpoints" in line for line in roomy), roomy
    size = f"{estimates[0] / 1e6:.1f} MB" if estimates[0] < 1e9 else f"{estimates[0] / 1e9:.1f} GB"  # both runs'
    assert f"checkpoints ~{size} each, the last 1 kept in {tmp_path / 'run' / 'checkpoints'}" in roomy, roomy

    free, lines = shutil.disk_usage(small_disk).free, []
    with pytest.raises(DiskFullError):
        bt.train(small_options(data, small_disk / "run", save_every=1, keep_checkpoints=1), log=lines.append)
    folder = small_disk / "run" / "checkpoints"
    assert (f"warning: checkpoints here take ~{size} each and --keep 1 needs room for 2 at a save; "
            f"{free / 1e6:.1f} MB free in {folder}: the run will stop at a save (make room or lower --keep)") in lines
    assert estimates[1] == estimates[0] and not os.listdir(folder)


# a checkpoint trained with another --style_pool_size (same weight shapes, other Gram features) is refused
def test_resume_refuses_another_style_pool_size(narrow, tmp_path):
    s = _state()
    path = str(tmp_path / "000001.pt")
    save_checkpoint(bt.checkpoint_state(s, None), path)
    other = _state(style_pool_size=16)
    with pytest.raises(CheckpointError, match="trained with --style_pool_size 32, this run has --style_pool_size 16"):
        bt.load_training_checkpoint(other, path, log=lambda *a: None)


# float16 loss scales and the checkpoint a later non-finite stop names come back with the resume; a note only
# when the batch or the number of processes changed
def test_resume_restores_the_loss_scales_and_names_its_checkpoint(narrow, tmp_path, monkeypatch):
    monkeypatch.setattr(bt, "amp_dtype", lambda device: torch.float16)
    s = _state(amp=True)
    assert s.g_scaler.is_enabled() and s.d_scaler.is_enabled()
    s.g_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # the scales a float16 run had come down to
    s.d_scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    path = str(tmp_path / "000001.pt")
    save_checkpoint(bt.checkpoint_state(s, None), path)
    resumed = _state(amp=True)
    assert resumed.g_scaler.get_scale() != 1024.0
    logged = []
    bt.load_training_checkpoint(resumed, path, log=logged.append)
    assert (resumed.g_scaler.get_scale(), resumed.d_scaler.get_scale()) == (1024.0, 64.0)
    assert resumed.last_checkpoint == path
    assert not [line for line in logged if line.startswith("note:")]  # same batch, same processes: exact
    bt.load_training_checkpoint(_state(amp=True, batch=4), path, log=logged.append)
    assert any(line.startswith(f"note: {path} was written with --batch 2 on 1 process(es), this run has --batch 4 "
                               "on 1") for line in logged)


# a run resumed in its own folder continues from its step: its earlier checkpoints and log records stay
def test_a_resumed_run_keeps_its_earlier_checkpoints_and_log_records(narrow, data, tmp_path):
    run = tmp_path / "run"
    bt.train(small_options(data, run, iter=2, save_every=1, keep_checkpoints=5), log=lambda *a: None)
    s = bt.train(small_options(data, run, iter=3, save_every=1, keep_checkpoints=5, resume="latest"),
                 log=lambda *a: None)
    assert s.iteration == 3
    names = sorted(n for n in os.listdir(run / "checkpoints") if n.endswith(".pt"))
    assert names == ["000001.pt", "000002.pt", "000003.pt"]
    assert not os.path.exists(run / "checkpoints" / "superseded")
    assert [r["step"] for r in read_jsonl(run / "logs" / "scalars.jsonl")] == [1, 2, 3]


# ---- two processes under torchrun ---------------------------------------------------------------

def test_torchrun_two_gloo_processes_keep_identical_weights(data, tmp_path):
    opts = small_options(data, tmp_path / "ddp", iter=2, d_reg_every=1, g_reg_every=1, save_every=2, queue_size=32)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(root=ROOT, narrow=NARROW))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(worker)] + cli_args(opts),
                            env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(os.path.join(opts.out_dir, "rank0.pt"), weights_only=True)
    rank1 = torch.load(os.path.join(opts.out_dir, "rank1.pt"), weights_only=True)
    for name in ("g", "g_ema", "d_face", "d_style", "d_style_latent", "queue", "mean_path_length"):
        assert_same(rank0[name], rank1[name], name)
    ckpt = load_checkpoint(os.path.join(opts.out_dir, "checkpoints", "000002.pt"))
    assert_same(ckpt["g"], {k: v for k, v in rank0["g"].items() if not k.startswith("embedder.")})
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank its own streams
    assert len(rank0["queue"]["codes"]) == 32 and rank0["queue"]["count"] == 2 * 2 * 2  # gathered codes
    log = read_jsonl(os.path.join(opts.out_dir, "logs", "scalars.jsonl"))  # rank 0 alone writes
    assert [r["step"] for r in log] == [1, 2] and all("r1_face" in r and "path_length" in r for r in log)


DDP_EQUIVALENCE_WORKER = RUNNER + """import os
sys.path.insert(0, os.path.join({root!r}, "tests"))
import distributed
import train
import test_train
opts = train.parse_args(sys.argv[1:])
rank = int(os.environ["RANK"])
grads = test_train.fixed_batch_gradients(opts, rank, 2)
os.makedirs(opts.out_dir, exist_ok=True)
torch.save(grads, os.path.join(opts.out_dir, f"grads{{rank}}.pt"))
distributed.cleanup()
"""


def fixed_batch_gradients(opts, rank, world):
    """Gradients of one D step, R1 step and G step on this rank's share of one fixed combined batch of 4.

    The same data and codes for every world size (z_f, z_s^- fixed, no style mixing, lr 0 so that the weights
    stay at their start). What the math does not allow is taken out: D's minibatch-stddev groups are per rank
    (set to one sample here), and the generator's noise is drawn per rank (its injection weights start at 0,
    so the images do not depend on it; only the noise weights' own gradients do, and they are left out). The
    path length uses per-rank random projections and is not compared.
    """
    bt.resolve_defaults(opts)
    s, _ = bt.setup(opts, log=lambda *a: None)
    for group in (s.g_optim.param_groups + s.d_optim.param_groups):
        group["lr"] = 0.0
    for d in s.nets.discriminators().values():
        d.stddev_group = 1
    gen = torch.Generator().manual_seed(77)
    x_f, x_s = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    z_f, z_neg = torch.randn(4, STYLE_DIM, generator=gen), torch.randn(4, STYLE_DIM, generator=gen)
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    b = bt.Batch(x_f[share], x_s[share], bt.encode_styles(s, x_s[share]))
    bt.phase_codes = lambda s_, b_: bt.fake_codes([z_f[share]], None, b_.z_s, z_neg[share], s_.opts.eq8)
    grads = {}

    def keep(phase, named):
        grads[phase] = {k: p.grad.detach().clone() for k, p in named if p.grad is not None and "noise" not in k}

    discriminators = [(f"{n}.{k}", p) for n, d in s.nets.discriminators().items() for k, p in d.named_parameters()]
    bt.d_step(s, b)
    keep("d", discriminators)
    bt.d_reg_step(s, b)
    keep("r1", discriminators)
    bt.g_step(s, b)
    keep("g", [(k, p) for k, p in s.nets.g.named_parameters() if not k.startswith("embedder.")])
    return grads


def test_two_gloo_ranks_equal_one_process_with_the_combined_batch(narrow, data, tmp_path, monkeypatch):
    reading = bt.EQ8_READINGS[0]  # the default (the readings differ in the codes only; the DDP paths are the same)
    opts = small_options(data, tmp_path / "ddp", eq8=reading, mixing=0.0)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_EQUIVALENCE_WORKER.format(root=ROOT, narrow=NARROW))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(worker)] + cli_args(opts)
                            + ["--eq8", reading, "--mixing", "0"],
                            env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(os.path.join(opts.out_dir, f"grads{r}.pt"), weights_only=True) for r in (0, 1)]
    monkeypatch.setattr(bt, "phase_codes", bt.phase_codes)  # restored after the test
    one = fixed_batch_gradients(small_options(data, tmp_path / "one", eq8=reading, mixing=0.0), 0, 1)
    for phase in ("d", "r1", "g"):
        assert one[phase].keys() == ranks[0][phase].keys() and len(one[phase]) > 10
        for k, want in one[phase].items():
            assert torch.equal(ranks[0][phase][k], ranks[1][phase][k]), (phase, k)  # DDP averaged them
            error = float((ranks[0][phase][k] - want).abs().max())  # float32 sums in another order
            assert error <= 1e-4 * float(want.abs().max()) + 1e-6, (phase, k, error)
    assert any(float(g.abs().max()) > 0 for g in one["g"].values() if g is not None)


# ---- one-shot fine-tuning ---------------------------------------------------------------------------

def test_finetune_from_release_layout_g_ema_only(narrow, data, tmp_path):
    torch.manual_seed(21)
    g = Generator(8, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with torch.no_grad():
        g.add_weight.copy_(torch.rand_like(g.add_weight))
    release = str(tmp_path / "blendgan.pt")
    save_checkpoint({"g_ema": g.state_dict()}, release)  # the release layout: g_ema only
    reference = os.path.join(STYLES, "100004.jpg")
    opts = small_options(data, tmp_path / "ft", aahq_lmdb=None, style_encoder_ckpt=None, blendgan_ckpt=release,
                         finetune_style_img=[reference], batch=None, iter=2, d_reg_every=2, g_reg_every=2)
    lines = []
    s = bt.train(opts, log=lines.append)
    assert opts.batch == 1  # A.5 default
    assert any(f"{release} has no d_face, d_style, d_style_latent: these discriminators START FRESH "
               "(--stylegan2_ckpt would give D_face)" in line for line in lines), lines
    assert s.iteration == 2
    for k, v in g.embedder.state_dict().items():  # the checkpoint's style encoder, frozen
        assert torch.equal(s.nets.g.embedder.state_dict()[k], v)
    for name, p in s.nets.g.named_parameters():  # every trainable part moved, the style branch and WBM included
        if not name.startswith("embedder."):
            assert not torch.equal(p, dict(g.named_parameters())[name]), name
    assert bool(((s.nets.g.add_weight >= 0) & (s.nets.g.add_weight <= 1)).all())
    ckpt = load_checkpoint(os.path.join(opts.out_dir, "checkpoints", "000002.pt"))
    assert ckpt["args"]["finetune_style_img"] == [reference]
    config = json.load(open(os.path.join(opts.out_dir, "config.json")))
    assert (config["global_batch"], config["images_per_iteration"], config["total_images"]) == (1, 1, 2)
    assert lines[0].startswith("global batch 1 (1 per process x 1 process(es)) = 1 images per iteration; "
                               "2 iterations = 2 images in all")

    # With --stylegan2_ckpt, D_face comes from its 'd'; the log names the Ds that start fresh.
    torch.manual_seed(13)
    d = Discriminator(8, channel_multiplier=1)
    sg2 = str(tmp_path / "stylegan2.pt")
    save_checkpoint({"d": d.state_dict()}, sg2)
    lines = []
    with_sg2 = small_options(data, tmp_path / "ft2", aahq_lmdb=None, style_encoder_ckpt=None, blendgan_ckpt=release,
                             finetune_style_img=[reference], stylegan2_ckpt=sg2)
    s2, _ = bt.setup(checked(bt.resolve_defaults(with_sg2)), log=lines.append)
    assert_same(s2.nets.d_face.state_dict(), d.state_dict())
    assert lines == [f"G and g_ema from {release}; d_face from the StyleGAN2 checkpoint {sg2}; {release} has no "
                     "d_style, d_style_latent: these discriminators START FRESH"]

    # D_style and D_style_latent see only the reference (resized like the LMDBs), D_face sees FFHQ.
    with Image.open(reference) as img:
        want = torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.LANCZOS)).copy())
    want = want.permute(2, 0, 1).float() / 127.5 - 1
    stream = bt.DataStream(opts, 0, 1, 0, torch.device("cpu"))
    faces = set()
    for _ in range(5):
        x_f, x_s = next(stream)
        # atol: the trainers share the inference conversion ((x / 255 - 0.5) / 0.5), 1 ulp from x / 127.5 - 1
        assert x_s.shape == (1, 3, 8, 8) and torch.allclose(x_s[0], want, atol=1e-6)
        faces.add(x_f.numpy().tobytes())
    assert len(faces) > 1


def _gram(x):
    """[N, C, H, W] -> [N, C, C] channel second moments."""
    f = x.flatten(2)
    return f @ f.transpose(1, 2) / f.shape[2]


def test_finetune_moves_g_ema_toward_the_reference(narrow, data, tmp_path):
    """One-shot fine-tuning (A.5, default batch 1 and EMA) at 32 px for 20 iterations: g_ema, what the checkpoint
    and the inference scripts use, makes stylized images closer to the reference than the start file did (style
    code cosine up, RGB Gram distance down), and its weights moved measurably."""
    torch.manual_seed(21)
    g = Generator(32, STYLE_DIM, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with torch.no_grad():
        g.add_weight.copy_(torch.rand_like(g.add_weight))
    release = str(tmp_path / "blendgan.pt")
    save_checkpoint({"g_ema": g.state_dict()}, release)
    reference = os.path.join(STYLES, "100004.jpg")
    ref = bt.read_reference_images([reference], 32)  # [1, 3, 32, 32]
    z = torch.randn(8, STYLE_DIM, generator=torch.Generator().manual_seed(99))

    @torch.no_grad()
    def closeness(gen):
        z_ref = gen.embedder(ref)
        out = gen([z], z_embed=z_ref.expand(8, -1), add_weight_index=0, randomize_noise=False)[0]
        cos = torch.nn.functional.cosine_similarity(gen.embedder(out), z_ref, dim=1).mean()
        return float(cos), float((_gram(out) - _gram(ref)).flatten(1).norm(dim=1).mean())

    opts = small_options(data, tmp_path / "ft", aahq_lmdb=None, style_encoder_ckpt=None, blendgan_ckpt=release,
                         finetune_style_img=[reference], batch=None, iter=20, size=32, queue_size=8)
    s = bt.train(opts, log=lambda *a: None)
    cos0, gram0 = closeness(g)
    cos1, gram1 = closeness(s.nets.g_ema)
    assert cos1 > cos0 + 0.05 and gram1 < 0.9 * gram0, ((cos0, gram0), (cos1, gram1))
    start = g.state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in s.nets.g_ema.state_dict().items()
                if not k.startswith("embedder."))
    assert moved > 1e-2
    assert bt.ema_half_life_images(opts, 1) == 2  # a tenth of the run's 20 images


# ---- the command line -----------------------------------------------------------------------------

def test_command_line_validation(data, tmp_path, capsys, monkeypatch):
    paper_start = [data["faces"], data["styles"], "--style_encoder_ckpt", data["style_encoder"]]
    base = paper_start + ["--from_scratch"]
    opts = train_script.parse_args(base + ["--size", "32"])
    assert (opts.batch, opts.iter, opts.size, opts.eq8) == (8, 200000, 32, None)  # None: see test_eq8_reading...
    assert train_script.parse_args(base + ["--size", "32", "--keep", "5"]).keep_checkpoints == 5  # the others' name
    fresh = ["--resume", "latest", "--out_dir", str(tmp_path / "no-checkpoint-yet")]  # latest = a new run here
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad = [(base + ["--size", "48"], "power of two"),
           (base + ["--size", "64"], f"FFHQ_LMDB {data['faces']} holds no images at resolution 64"),
           (base + ["--size", "32", "--eq8", "both"], "--eq8"),
           ([STYLES] + base[1:] + ["--size", "32"], f"FFHQ_LMDB {STYLES}: not an LMDB (no data.mdb"),
           ([data["faces"], "--style_encoder_ckpt", data["style_encoder"]], "AAHQ_LMDB"),
           ([data["faces"], data["styles"]], "--style_encoder_ckpt is required"),
           ([data["faces"], data["styles"]] + fresh, "--style_encoder_ckpt is required"),
           ([data["faces"], "--finetune_style_img", os.path.join(STYLES, "100000.jpg")], "--blendgan_ckpt"),
           ([data["faces"], "--finetune_style_img", os.path.join(STYLES, "100000.jpg")] + fresh, "--blendgan_ckpt"),
           ([data["faces"], "--finetune_style_img", str(text)], f"--finetune_style_img {text}: cannot decode image"),
           (base + ["--mixing", "1.5"], "--mixing"),
           (base + ["--resume", "/nonexistent.pt"], "--resume"),
           (paper_start + ["--stylegan2_ckpt", "ffhq.pt"], "--stylegan2_ckpt ffhq.pt: file not found (python "
                                                           "download_models.py stylegan2-ffhq-config-f.pt writes "
                                                           "pretrained_models/stylegan2-ffhq"),
           (paper_start + ["--size", "32"], "--stylegan2_ckpt is required: G and D_face start from an FFHQ StyleGAN2"),
           (base + ["--blendgan_ckpt", data["style_encoder"]], "--from_scratch and --blendgan_ckpt contradict"),
           (base + ["--out_dir", data["style_encoder"]], f"--out_dir {data['style_encoder']}: {data['style_encoder']} "
                                                         "is a file, not a folder")]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            train_script.parse_args(argv)
        err = capsys.readouterr().err
        assert message in err, message
        if message == "power of two":  # the one message for a bad --size; the LMDB is fine at any size
            assert "resolution 48" not in err and data["faces"] not in err, err
    help_text = " ".join(train_script.build_parser().format_help().split())
    assert "batch size PER GPU" in help_text and "--batch 2 on 4 GPUs" in help_text
    assert "when fine-tuning a tenth of the run's images" in help_text

    # The data is checked before any model is built: one line, no traceback (train.py exits with it).
    def no_models(*args):
        raise AssertionError("models built before the data check")

    monkeypatch.setattr(bt, "build_networks", no_models)
    with pytest.raises(ValueError, match="holds no images at resolution 64; it has"):
        bt.train(small_options(data, "/nonexistent-run", size=64), log=lambda *a: None)
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(base + ["--size", "64", "--out_dir", "/nonexistent-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "resolution 64" in err and "Traceback" not in err
