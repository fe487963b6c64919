"""train_style_encoder.py / style_encoder_training.py: NT-Xent, Gram features, views, data stream,
a short run that learns, exact resume, the non-finite guard, and two torchrun processes on CPU.

The ImageNet VGG-19 cannot be downloaded here: the tests save torchvision's own VGG-19 ``features``
(``torchvision.models.vgg.make_layers(cfgs['E'])``, the module ``vgg19().features`` is) with a
variance-preserving initialisation and a larger first layer, and pass it with --vgg_ckpt.
torchvision's default fan-out init leaves Gram entries near 1e-6, far below a trained VGG's; at that
scale the first Adam steps (each weight moves by about lr) wash out the differences between images. Sizes are tiny (64 px views, pool 32,
style_dim 8-16) to keep the suite fast; one test builds the full 610,304 x 512 predictor on the meta device.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import prepare_data
import style_encoder_training as se
import train_style_encoder
import trainutil
from checkpoint import DiskFullError, load_checkpoint, load_state_dict_strict
from conftest import inf_gradient, record_returns
from model import Generator
from style_encoder import VGG19_TAPS, GramEmbedder, StyleEncoder, gram_dim, nt_xent
from trainutil import NonFiniteLossError, read_jsonl
from utils import img2ten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLE_IMGS = os.path.join(ROOT, "test_imgs", "style_imgs")
SIZE, POOL = 64, 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An LMDB of the 30 test style images at 64 px (each image a class of its own) and a VGG-19 file."""
    from torchvision.models.vgg import cfgs, make_layers

    root = tmp_path_factory.mktemp("style_assets")
    lmdb = str(root / "style.lmdb")
    prepare_data.prepare(prepare_data.PrepareOptions(out=lmdb, paths=[STYLE_IMGS], size=(SIZE,), n_worker=0))
    torch.manual_seed(1234)
    features = make_layers(cfgs["E"])  # torchvision's vgg19().features
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.05, 0.05)
    features[0].weight.data *= 10  # relu1_2 Gram entries ~0.1, relu5_4 ~1e-3: the scale of a trained VGG
    vgg = str(root / "vgg19.pth")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    return {"lmdb": lmdb, "vgg": vgg, "features": features}


def options(assets, out_dir, **kw):
    base = dict(lmdb=[assets["lmdb"]], out_dir=str(out_dir), size=SIZE, style_pool_size=POOL, style_dim=8,
                batch=4, iter=2, save_every=1000, log_every=1, vgg_ckpt=assets["vgg"], device="cpu",
                num_workers=0, progress=False)
    base.update(kw)
    return se.TrainOptions(**base)


def cli_args(opts):
    args = opts.lmdb + ["--out_dir", opts.out_dir, "--size", str(opts.size), "--style_pool_size",
                        str(opts.style_pool_size), "--style_dim", str(opts.style_dim), "--batch", str(opts.batch),
                        "--iter", str(opts.iter), "--save_every", str(opts.save_every), "--log_every",
                        str(opts.log_every), "--vgg_ckpt", opts.vgg_ckpt, "--device", "cpu", "--num_workers",
                        str(opts.num_workers), "--lr", repr(opts.lr), "--temperature", repr(opts.temperature),
                        "--no_progress"]
    return args + (["--resume", opts.resume] if opts.resume else [])


# ---- NT-Xent (Eq. 2) ----------------------------------------------------------------------------

def nt_xent_loop(h1, h2, tau):
    """Eq. 2 written out: l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged over
    both orders of every positive pair; s = cosine similarity. Float64, plain Python loops."""
    z = [v.double() for v in torch.cat([h1, h2])]
    n2 = len(z)
    n = n2 // 2

    def sim(a, b):
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    def ell(i, j):
        denominator = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / tau) / denominator)

    return sum(ell(k, k + n) + ell(k + n, k) for k in range(n)) / n2


@pytest.mark.parametrize("n,tau", [(1, 0.5), (2, 0.1), (5, 0.5), (8, 1.0), (13, 0.07)])
def test_nt_xent_matches_a_loop_over_eq2(n, tau):
    g = torch.Generator().manual_seed(n)
    h1, h2 = torch.randn(n, 7, generator=g) * 3, torch.randn(n, 7, generator=g)
    assert nt_xent(h1, h2, tau).item() == pytest.approx(nt_xent_loop(h1, h2, tau), rel=1e-5, abs=1e-6)


def test_positive_top1_counts_positive_retrievals():
    h1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert se.positive_top1(h1, h1 * 2).item() == 1.0
    h2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # pairs 0 and 1 swapped: only pair 2 retrieves
    assert se.positive_top1(h1, h2).item() == pytest.approx(2 / 6)


# ---- Gram features --------------------------------------------------------------------------------

def test_gram_features_against_per_layer_einsum(assets):
    assert gram_dim() == 610_304 == sum(c * c for c in (64, 128, 256, 512, 512))
    embedder = StyleEncoder(8, vgg_ckpt=assets["vgg"], pool_size=POOL).embedder
    assert isinstance(embedder, GramEmbedder)
    x = torch.rand(2, 3, 40, 48) * 2 - 1
    with torch.no_grad():
        got = embedder(x)  # [2, 610304]
        assert got.shape == (2, 610_304)
        h = F.adaptive_avg_pool2d(x, (POOL, POOL))
        blocks = []
        for i, layer in enumerate(assets["features"][:max(VGG19_TAPS.values()) + 1]):  # torchvision's module
            h = layer(h)
            if i in VGG19_TAPS.values():
                n, c, hh, ww = h.shape
                f = h.reshape(n, c, hh * ww).double()
                blocks.append(torch.einsum("nci,ndi->ncd", f, f) / (c * hh * ww))
    offset = 0
    for block in blocks:
        c = block.shape[1]
        mine = got[:, offset:offset + c * c].reshape(2, c, c)
        assert torch.equal(mine, mine.transpose(1, 2))
        assert torch.allclose(mine.double(), block, rtol=1e-4, atol=1e-6 * block.abs().max().item())
        assert block.abs().max() > 0
        offset += c * c
    assert offset == got.shape[1]


def test_amp_and_channels_last_gram_features(assets):
    encoder = StyleEncoder(8, vgg_ckpt=assets["vgg"], pool_size=POOL)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    exact = se.gram_features(encoder, x)
    assert exact.dtype == torch.float32
    assert torch.allclose(se.gram_features(encoder, x, channels_last=True), exact, rtol=1e-4, atol=1e-7)
    half = se.gram_features(encoder, x, amp_dtype=torch.bfloat16)
    assert half.dtype == torch.float32  # the Gram products and what follows stay float32
    assert torch.allclose(half, exact, rtol=0.1, atol=0.02 * exact.abs().max().item())
    assert not torch.equal(half, exact)


def test_full_size_predictor_on_meta_device():
    with torch.device("meta"):
        encoder = StyleEncoder(512, 4, load_pretrained_vgg=False)
        generator = Generator(1024, 512, 8, load_pretrained_vgg=False)
        projector = se.Projector(512, 4)
    assert encoder.embedder_mlp[0].weight.shape == (512, 610_304)
    assert [tuple(m.weight.shape) for m in encoder.embedder_mlp] == [(512, 610_304)] + [(512, 512)] * 3
    mine = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in generator.embedder.state_dict().items()}
    assert [k for k in projector.state_dict()] == [f"projector.{i}.{p}" for i in range(4) for p in ("weight", "bias")]


# ---- views and data stream ------------------------------------------------------------------------

def _style_image(name):
    with Image.open(os.path.join(STYLE_IMGS, name)) as img:
        return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def _histogram(x, bins=16):
    """Per-channel normalised histograms of a [3, H, W] tensor in [-1, 1] -> [3, bins]."""
    return torch.stack([torch.histc(c, bins=bins, min=-1, max=1) / c.numel() for c in x])


@pytest.mark.parametrize("name", ["100003.jpg", "100010.jpg", "100020.jpg"])
def test_affine_views_change_geometry_not_colour(name):
    x = img2ten(_style_image(name))[0]  # [3, 64, 64]
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    assert torch.allclose(se.affine_warp(x, identity, SIZE), x, atol=1e-5)
    flipped = se.affine_warp(x, torch.tensor([[-1.0, 0, 0], [0, 1, 0]]), SIZE, mode="nearest")
    assert torch.equal(flipped, x.flip(-1))
    assert torch.equal(_histogram(flipped), _histogram(x))

    g = torch.Generator().manual_seed(0)
    colours = {tuple(c) for c in x.reshape(3, -1).t().tolist()}
    distances = []
    for _ in range(20):
        theta = se.random_affine_theta(g)
        # Nearest-neighbour resampling of the same map: every output colour is a colour of the image.
        nearest = se.affine_warp(x, theta, SIZE, mode="nearest")
        assert {tuple(c) for c in nearest.reshape(3, -1).t().tolist()} <= colours
        # The outer corners map inside the image (no fill colour).
        corners = theta[:, :2] @ torch.tensor([[-1.0, 1, -1, 1], [-1, -1, 1, 1]]) + theta[:, 2:]
        assert corners.abs().max() <= 1 + 1e-6
        view = se.affine_warp(x, theta, SIZE)
        assert not torch.equal(view, x)
        distances.append(0.5 * (_histogram(view) - _histogram(x)).abs().sum(1).max().item())
    # Bilinear views keep the colour histogram (total variation per channel); a colour change does not.
    assert np.mean(distances) < 0.15
    for jittered in ((x * 0.8).clamp(-1, 1), (x + 0.15).clamp(-1, 1), x[[1, 2, 0]]):
        assert 0.5 * (_histogram(jittered) - _histogram(x)).abs().sum(1).max().item() > 2 * np.mean(distances)


def test_random_views_flip_horizontally_and_rotate_both_ways():
    """random_affine_theta's draws: the flip mirrors x (a face's left and right, not upside down), the rotation is
    uniform in [-rotate, rotate] (both directions)."""
    g = torch.Generator().manual_seed(0)
    theta = se.random_affine_theta(g, scale=(1, 1), ratio=(1, 1), rotate=0.0, shear=0.0, flip=1.0)
    assert torch.allclose(theta, torch.tensor([[-1.0, 0, 0], [0, 1, 0]]), atol=1e-6)
    angles = []
    for _ in range(300):
        t = se.random_affine_theta(g, rotate=10.0, shear=0.0, ratio=(1, 1), flip=0.0)
        angles.append(math.degrees(math.atan2(float(t[1, 0]), float(t[0, 0]))))
    assert max(abs(a) for a in angles) <= 10 + 1e-4 and min(angles) < -8 and max(angles) > 8


def test_views_are_fixed_by_position(assets):
    ds = se.AffineViewDataset([assets["lmdb"]], SIZE, seed=3)
    a = ds[(17, 5)]
    assert a.shape == (2, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, ds[(17, 5)])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, ds[(18, 5)])
    assert not torch.equal(a, se.AffineViewDataset([assets["lmdb"]], SIZE, seed=4)[(17, 5)])
    assert a.min() >= -1 and a.max() <= 1


def test_loader_batches_do_not_depend_on_workers(assets):
    ds = se.AffineViewDataset([assets["lmdb"]], SIZE, seed=1)

    def batches(workers):
        loader = DataLoader(ds, batch_sampler=se.StreamBatchSampler(len(ds), 3, seed=1, start=5),
                            num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    for a, b in zip(batches(0), batches(2)):
        assert a.shape == (3, 2, 3, SIZE, SIZE) and torch.equal(a, b)


def _take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_stream_batches_split_over_ranks_and_resume():
    n, steps = 11, 7
    single = _take(se.StreamBatchSampler(n, 6, seed=2), steps)
    ranks = [_take(se.StreamBatchSampler(n, 3, rank=r, world_size=2, seed=2), steps) for r in range(2)]
    for t in range(steps):
        assert ranks[0][t] + ranks[1][t] == single[t]
        assert [p for p, _ in single[t]] == list(range(6 * t, 6 * t + 6))
    stream = [i for batch in single for _, i in batch]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))  # every epoch is a permutation
    assert stream[:n] != list(range(n))
    assert _take(se.StreamBatchSampler(n, 6, seed=2, start=3 * 6), 4) == single[3:]


# ---- training runs --------------------------------------------------------------------------------

def test_short_run_learns_and_writes_a_generator_compatible_checkpoint(assets, tmp_path):
    # A.1's lr 0.002 is for batches of 256; with 8 images a smaller step learns steadily.
    n_iter = 30
    opts = options(assets, tmp_path / "run", batch=8, iter=n_iter, lr=0.0002, save_every=15, keep=2)
    result = se.train(opts)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == n_iter
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2

    # Held-out views (positions the run never drew) of all 30 images: NT-Xent and positive retrieval
    # among 60 views (chance 1 / 59), untrained (the run's initial weights) vs trained.
    dataset = se.AffineViewDataset([assets["lmdb"]], SIZE, seed=opts.seed)
    views = torch.stack([dataset[(10_000 + i, i)] for i in range(len(dataset))])  # [30, 2, 3, S, S]
    trainutil.seed_everything(opts.seed, 0)
    encoder0, projector0 = se.build_models(opts)
    initial = se.SimCLRHead(encoder0.embedder_mlp, projector0)
    trained = se.SimCLRHead(result.encoder.embedder_mlp, result.projector)
    with torch.no_grad():
        before = se.contrastive_loss(initial, result.encoder, views, opts.temperature)
        after = se.contrastive_loss(trained, result.encoder, views, opts.temperature)
    assert after[0] < before[0] - 0.4
    assert after[1] >= max(before[1] + 0.08, 0.2)  # chance: 1 / 59; 0.08 ~ 5 more of the 60 views

    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["000015.pt", f"{n_iter:06d}.pt"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / f"{n_iter:06d}.pt")
    assert ckpt["step"] == n_iter and ckpt["samples_seen"] == 8 * n_iter and ckpt["global_batch"] == 8
    assert ckpt["kind"] == se.CHECKPOINT_KIND and ckpt["options"]["temperature"] == opts.temperature
    assert ckpt["optimizer"]["state"] and len(ckpt["rng"]) == 1
    export = load_checkpoint(result.export)
    for name in ("style_encoder", "projector"):
        assert all(torch.equal(export[name][k], v) for k, v in ckpt[name].items())

    # The weights load unchanged into a generator's embedder and encode like the trained encoder.
    g = Generator(8, 8, 1, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=POOL)
    load_state_dict_strict(g.embedder, export["style_encoder"], "style_encoder.pt")
    x = img2ten(_style_image("100003.jpg"))
    with torch.no_grad():
        assert torch.equal(g.embedder(x), result.encoder(x))
        frozen = StyleEncoder(8, load_pretrained_vgg=True, vgg_ckpt=assets["vgg"], pool_size=POOL)
        assert all(torch.equal(frozen.state_dict()[k], v) for k, v in export["style_encoder"].items()
                   if k.startswith("embedder."))  # VGG-19 stayed frozen

    records = read_jsonl(tmp_path / "run" / "logs" / "scalars.jsonl")
    assert [r["step"] for r in records] == list(range(1, n_iter + 1))
    assert records[-1]["loss/nt_xent"] == pytest.approx(losses[-1])
    assert {"metrics/positive_top1", "lr", "speed/images_per_s"} <= set(records[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "logs"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["global_batch"] == 8 and config["world_size"] == 1 and config["lr"] == 0.0002


def _weights(path):
    ckpt = load_checkpoint(path)
    return {**{f"E.{k}": v for k, v in ckpt["style_encoder"].items()},
            **{f"P.{k}": v for k, v in ckpt["projector"].items()}}, ckpt


def test_resume_continues_exactly(assets, tmp_path, capsys):
    straight = options(assets, tmp_path / "straight", iter=4)
    assert train_style_encoder.main(cli_args(straight)) == 0
    half = options(assets, tmp_path / "resumed", iter=2)
    assert train_style_encoder.main(cli_args(half)) == 0
    rest = options(assets, tmp_path / "resumed", iter=4, resume="latest")
    assert train_style_encoder.main(cli_args(rest)) == 0
    a, ckpt_a = _weights(tmp_path / "straight" / "checkpoints" / "000004.pt")
    b, ckpt_b = _weights(tmp_path / "resumed" / "checkpoints" / "000004.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["E.embedder_mlp.0.weight"],
                           _weights(tmp_path / "resumed" / "checkpoints" / "000002.pt")[0]["E.embedder_mlp.0.weight"])
    for sa, sb in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # exact means exact: the random states saved after the resume are those of the uninterrupted run
    (ra,), (rb,) = ckpt_a["rng"], ckpt_b["rng"]
    assert ra.keys() == rb.keys() and {"python", "numpy", "torch"} <= set(ra)
    assert torch.equal(ra["torch"], rb["torch"])
    assert torch.equal(ra["python"]["state"], rb["python"]["state"]) and ra["python"]["gauss"] == rb["python"]["gauss"]
    assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]
    la = [r["loss/nt_xent"] for r in read_jsonl(tmp_path / "straight" / "logs" / "scalars.jsonl")]
    lb = [r["loss/nt_xent"] for r in read_jsonl(tmp_path / "resumed" / "logs" / "scalars.jsonl")]
    assert la == lb
    assert "global batch 4 = 1 process(es) x 4" in capsys.readouterr().out


def test_a_run_resumed_mid_log_window_logs_the_uninterrupted_means(assets, tmp_path):
    """A checkpoint between two logs (--save_every 2, --log_every 3) carries the steps since the last log: a run
    killed after it and resumed logs the same step-3 mean as the uninterrupted run, not the mean of step 3 alone."""
    straight = options(assets, tmp_path / "straight", iter=4, save_every=2, log_every=3)
    assert train_style_encoder.main(cli_args(straight)) == 0
    mid = str(tmp_path / "straight" / "checkpoints" / "000002.pt")
    window = load_checkpoint(mid)["log_window"]
    assert window["counts"] == {"loss": 2, "acc": 2}
    resumed = options(assets, tmp_path / "resumed", iter=4, log_every=3, resume=mid)
    assert train_style_encoder.main(cli_args(resumed)) == 0
    want = read_jsonl(tmp_path / "straight" / "logs" / "scalars.jsonl")
    got = read_jsonl(tmp_path / "resumed" / "logs" / "scalars.jsonl")
    keys = ("step", "loss/nt_xent", "metrics/positive_top1")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    assert [r["step"] for r in got] == [3, 4]


def test_resume_refuses_another_architecture(assets, tmp_path, capsys):
    first = options(assets, tmp_path / "run", iter=1)
    se.train(first)
    wrong = options(assets, tmp_path / "run", iter=2, style_dim=16, resume="latest")
    assert train_style_encoder.main(cli_args(wrong)) == 1
    assert "style_dim=8 (command line 16)" in capsys.readouterr().err
    other_pool = options(assets, tmp_path / "run", iter=2, style_pool_size=2 * POOL, resume="latest")
    assert train_style_encoder.main(cli_args(other_pool)) == 1  # Gram features of other images: refused too
    assert f"style_pool_size={POOL} (command line {2 * POOL})" in capsys.readouterr().err


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch, capsys, poison):
    """A NaN loss, or a finite loss whose gradient overflows (one Adam step would make the head NaN), at step 3
    stops the run before that step, naming the checkpoint of step 2."""
    calls = {"n": 0}
    real = se.nt_xent

    def poisoned(h1, h2, tau):
        calls["n"] += 1
        loss = real(h1, h2, tau)
        if calls["n"] != 3:
            return loss
        return loss * float("nan") if poison == "loss" else inf_gradient(loss)

    monkeypatch.setattr(se, "nt_xent", poisoned)
    opts = options(assets, tmp_path / "run", iter=5, save_every=2)
    problem = "loss 'nt_xent' is nan" if poison == "loss" else r"a gradient is not finite \(the losses are\)"
    with pytest.raises(NonFiniteLossError, match=rf"step 3: {problem}.*000002\.pt"):
        se.train(opts)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["000002.pt"]
    good, _ = _weights(tmp_path / "run" / "checkpoints" / "000002.pt")
    assert all(torch.isfinite(v).all() for v in good.values())

    calls["n"] = 2  # resumed from step 2: its first step is step 3 again, and the stop names the resumed file
    with pytest.raises(NonFiniteLossError, match=rf"step 3: {problem}.*--resume .*000002\.pt"):
        se.train(options(assets, tmp_path / "run", iter=5, save_every=2, resume="latest"))

    calls["n"] = 0
    assert train_style_encoder.main(cli_args(options(assets, tmp_path / "run2", iter=5, save_every=2))) == 1
    assert ("is nan" if poison == "loss" else "a gradient is not finite") in capsys.readouterr().err


def test_style_encoder_amp_reaches_the_frozen_vgg(assets, tmp_path, monkeypatch):
    """--amp bf16 runs the frozen VGG-19 under autocast; without it the run is silently float32 (about twice the
    time and activation memory)."""
    seen = []
    real = se.gram_features

    def recording(encoder, x, amp_dtype=None, channels_last=False):
        seen.append(amp_dtype)
        return real(encoder, x, amp_dtype, channels_last)

    monkeypatch.setattr(se, "gram_features", recording)
    se.train(options(assets, tmp_path / "run", iter=1, amp="bf16"))
    assert seen == [torch.bfloat16]


def test_cli_validates_options(assets, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        train_style_encoder.parse_args([assets["lmdb"], "--out_dir", str(tmp_path), "--temperature", "0"])
    assert "--temperature must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_style_encoder.parse_args([str(tmp_path / "missing"), "--out_dir", str(tmp_path)])
    assert "prepare_data.py" in capsys.readouterr().err
    # a folder that holds no LMDB, and a size the LMDB does not have: one line at parsing, no traceback
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in (([str(tmp_path), "--out_dir", str(tmp_path)], f"LMDB {tmp_path}: not an LMDB"),
                          ([assets["lmdb"], "--out_dir", str(tmp_path), "--size", "128"], "--size 128"),
                          ([assets["lmdb"], "--out_dir", str(a_file / "run")],
                           f"--out_dir {a_file / 'run'}: {a_file} is a file, not a folder")):
        with pytest.raises(SystemExit):
            train_style_encoder.parse_args(argv)
        assert message in capsys.readouterr().err, message
    # NT-Xent's negatives are the rest of the global batch: one image on one process would train nothing
    assert any("at least 2" in p for p in se.validate(options(assets, tmp_path, batch=1)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert se.validate(options(assets, tmp_path, batch=1)) == []
    # train.py's name for --keep works here too
    argv = [assets["lmdb"], "--out_dir", str(tmp_path), "--size", "64", "--keep_checkpoints", "5"]
    assert train_style_encoder.parse_args(argv).keep == 5
    with pytest.raises(SystemExit):
        train_style_encoder.parse_args(["--help"])
    assert "global batch" in capsys.readouterr().out


DRIVER = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
from style_encoder_training import TrainOptions, train
opts = TrainOptions(**json.loads(sys.argv[1]))
result = train(opts)
state = {{"mlp": result.encoder.embedder_mlp.state_dict(), "projector": result.projector.state_dict(),
          "history": result.history}}
torch.save(state, os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".pt"))
"""


def test_torchrun_two_cpu_processes_match_one_process(assets, tmp_path):
    opts = options(assets, tmp_path / "ddp", batch=2, iter=3, save_every=3)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    config = {k: v for k, v in vars(opts).items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           json.dumps(config), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("mlp", "projector"):
        assert all(torch.equal(ranks[0][name][k], ranks[1][name][k]) for k in ranks[0][name])
    assert [h["loss"] for h in ranks[0]["history"]] == [h["loss"] for h in ranks[1]["history"]]

    single = se.train(options(assets, tmp_path / "single", batch=4, iter=3, save_every=3))
    assert [h["loss"] for h in ranks[0]["history"]] == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    assert [h["acc"] for h in ranks[0]["history"]] == [h["acc"] for h in single.history]
    for k, v in single.encoder.embedder_mlp.state_dict().items():
        assert torch.allclose(ranks[0]["mlp"][k], v, rtol=1e-4, atol=1e-6), k
    for k, v in single.projector.state_dict().items():
        assert torch.allclose(ranks[0]["projector"][k], v, rtol=1e-4, atol=1e-6), k
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "000003.pt")
    assert ckpt["world_size"] == 2 and ckpt["global_batch"] == 4 and len(ckpt["rng"]) == 2
    assert ckpt["samples_seen"] == 12


def test_start_says_when_the_checkpoints_will_not_fit(assets, tmp_path, small_disk, capsys, monkeypatch):
    """The start line's checkpoint size is the file's within a few percent; on a 1 MiB disk the start warns (exact
    line) and the run still goes on, to the full disk at its save; with room there is no warning."""
    estimates = record_returns(monkeypatch, trainutil, "estimated_checkpoint_bytes")
    se.train(options(assets, tmp_path / "run", iter=1, save_every=1, keep=2))
    out = capsys.readouterr().out
    real = os.path.getsize(tmp_path / "run" / "checkpoints" / "000001.pt")
    assert len(estimates) == 1 and abs(estimates[0] - real) < 0.03 * real, (estimates, real)
    assert f", checkpoints ~{estimates[0] / 1e6:.1f} MB each" in out and "warning: checkpoints" not in out

    free = shutil.disk_usage(small_disk).free
    with pytest.raises(DiskFullError):
        se.train(options(assets, small_disk / "run", iter=1, save_every=1, keep=2))
    folder = small_disk / "run" / "checkpoints"
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"warning: checkpoints here take ~{estimates[1] / 1e6:.1f} MB each and --keep 2 needs room "
                        f"for 3 at a save; {free / 1e6:.1f} MB free in {folder}: the run will stop at a save (make "
                        "room or lower --keep)"), lines
    assert estimates[1] == estimates[0] and not os.listdir(folder)
