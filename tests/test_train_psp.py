"""train_psp.py / psp_training.py: the pSp encoder trained for a frozen BlendGAN generator (paper A.3).

Loss terms against independent computations (the lpips package's own forward, explicit formulas), the
backbone and ArcFace weight layouts, a short run that learns with the generator untouched and a
checkpoint that PSPEncoder loads, exact resume, the non-finite guard, the command line, and two torchrun
processes on CPU (gloo).

The generator is a 32 px BlendGAN generator (style_dim 512, as pSp's heads require) built here. Two
things keep it cheap: its synthesis layers are 32 channels wide (model.stylegan2_channels is replaced for
this module: StyleGAN2 has 512 channels up to 32 px, ~50 GFLOP per forward, and the trainer does not
depend on the widths), and its embedded style encoder (610304 x 512 first layer) is built on the meta
device and filled cheaply instead of being randomly initialised. The encoder is the real IR-SE-50 pSp
encoder, pooling its input to 32 px instead of 256 (--encoder_input_size) so that a step takes seconds.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model
import prepare_data
import psp_training as pt
import train_psp
import trainutil
from checkpoint import CheckpointError, load_checkpoint
from conftest import inf_gradient, record_returns
from inference import load_psp
from psp_encoder.arcface import ArcFaceIRSE50, load_arcface
from psp_encoder.encoders import GradualStyleEncoder
from psp_encoder.psp_encoders import PSPEncoder, psp_state_dict_for_release, read_psp_checkpoint
from trainutil import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(ROOT, "test_imgs", "face_imgs")
STYLE_IMG = os.path.join(ROOT, "test_imgs", "style_imgs", "100003.jpg")
SIZE = 32  # generator, data and encoder input size (8 W+ entries, the fewest pSp's heads allow)
WIDTH = 32  # channels of every synthesis layer of the test generator


def narrow_channels(channel_multiplier):
    return {2 ** r: WIDTH for r in range(2, 11)}


@contextmanager
def fast_cpu():
    """oneDNN re-packs the weights of every convolution on each call; for these tiny maps the plain kernels
    are about twice as fast. Numbers do not depend on it within one run."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def generator_with_meta_style_encoder(size):
    """model.Generator(size, 512, 2, channel_multiplier=1) whose style encoder is built on the meta device
    (its 610304 x 512 layer is never allocated or initialised)."""
    real = model.StyleEncoder

    def on_meta(*args, **kwargs):
        with torch.device("meta"):
            return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "StyleEncoder", on_meta)
        return model.Generator(size, 512, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)


def tiny_generator():
    """Generator(32, 512, 2) with a cheaply filled style encoder and trained-like WBM and noise weights."""
    torch.manual_seed(0)
    g = generator_with_meta_style_encoder(SIZE)
    g.embedder.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in g.embedder.parameters():
            if p.numel() > 10_000_000:
                p.zero_()  # the 610304 x 512 layer: z_s then comes from the biases (fine for sample grids)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        g.add_weight.copy_(torch.linspace(0.9, 0.1, g.n_latent).view(1, -1, 1))
        for layer in [g.conv1, *g.convs]:
            layer.noise.weight.fill_(0.05)
    return g


def random_alexnet_features(path):
    """A torchvision-format AlexNet file (features only) with random weights, as the LPIPS backbone."""
    from torchvision.models import alexnet

    torch.manual_seed(2)
    features = alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)


def random_arcface(path):
    """A model_ir_se50.pth-layout file with random weights and realistic BatchNorm statistics."""
    torch.manual_seed(3)
    net = ArcFaceIRSE50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_var.fill_(2.0)
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save(net.state_dict(), path)
    return net.eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Faces LMDB at 32 px, the BlendGAN checkpoint (1.4 GB), LPIPS and ArcFace files; deleted when done."""
    root = tmp_path_factory.mktemp("psp_assets")
    lmdb = str(root / "faces.lmdb")
    prepare_data.prepare(prepare_data.PrepareOptions(out=lmdb, paths=[FACES], size=(SIZE,), n_worker=0))
    alexnet_file = str(root / "alexnet_features.pth")
    random_alexnet_features(alexnet_file)
    arcface_file = str(root / "model_ir_se50.pth")
    random_arcface(arcface_file)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "stylegan2_channels", narrow_channels)
        ckpt = str(root / "blendgan.pt")
        torch.save({"g_ema": tiny_generator().state_dict()}, ckpt)
        yield {"lmdb": lmdb, "ckpt": ckpt, "alexnet": alexnet_file, "arcface": arcface_file, "root": root}
    shutil.rmtree(root, ignore_errors=True)


def options(assets, out_dir, **kw):
    base = dict(lmdb=[assets["lmdb"]], blendgan_ckpt=assets["ckpt"], out_dir=str(out_dir), size=SIZE, batch=2,
                iter=2, lr=3e-4, lpips_weight=0.8, lpips_alexnet=assets["alexnet"], id_weight=0.0,
                w_norm_weight=0.005, latent_avg_samples=1000, encoder_input_size=SIZE, sample_every=4, n_sample=3,
                sample_style_img=STYLE_IMG, save_every=4, keep=3, log_every=1, device="cpu", num_workers=0,
                progress=False, encoder_from_scratch=True)
    base.update(kw)
    return pt.PSPTrainOptions(**base)


def cli_args(opts):
    args = opts.lmdb + ["--ckpt", opts.blendgan_ckpt, "--out_dir", opts.out_dir, "--size", str(opts.size),
                        "--batch", str(opts.batch), "--iter", str(opts.iter), "--lr", repr(opts.lr),
                        "--lpips_weight", repr(opts.lpips_weight), "--id_weight", repr(opts.id_weight),
                        "--w_norm_weight", repr(opts.w_norm_weight), "--latent_avg_samples",
                        str(opts.latent_avg_samples), "--encoder_input_size", str(opts.encoder_input_size),
                        "--sample_every", str(opts.sample_every), "--n_sample", str(opts.n_sample),
                        "--save_every", str(opts.save_every), "--keep", str(opts.keep), "--log_every",
                        str(opts.log_every), "--device", "cpu", "--num_workers", "0", "--amp", opts.amp,
                        "--no_progress"]
    for flag in ("lpips_alexnet", "id_weights", "encoder_backbone", "resume", "sample_style_img"):
        if getattr(opts, flag):
            args += [f"--{flag}", getattr(opts, flag)]
    return args + (["--encoder_from_scratch"] if opts.encoder_from_scratch else [])


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One 8-step run (L2 + LPIPS + W-norm), checkpoints at steps 6 and 8; the reference for several tests."""
    out = tmp_path_factory.mktemp("psp_run")
    opts = options(assets, out, iter=8, save_every=6)
    with fast_cpu():
        result = pt.train(opts)
    yield opts, result
    shutil.rmtree(out, ignore_errors=True)  # its module is done: do not keep 3.3 GB to the session's end


def faces(assets):
    """The training faces, [8, 3, 32, 32] in [-1, 1], read as the trainer reads them."""
    dataset = pt.face_dataset([assets["lmdb"]], SIZE)
    return torch.stack([dataset[i] for i in range(len(dataset))])


# ---- loss terms ---------------------------------------------------------------------------------

def test_w_norm_is_the_mean_frobenius_distance_to_latent_avg():
    g = torch.Generator().manual_seed(0)
    codes, avg = torch.randn(3, 8, 512, generator=g), torch.randn(512, generator=g)
    expected = sum(float(((codes[i] - avg) ** 2).sum()) ** 0.5 for i in range(3)) / 3
    assert pt.w_norm(codes, avg).item() == pytest.approx(expected, rel=1e-6)
    assert pt.w_norm(codes, avg.expand(8, 512)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk", [3, 10, 64])
def test_generator_latent_avg_is_the_mapping_mean_over_seeded_codes_for_any_chunk(chunk):
    torch.manual_seed(1)
    mapping = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 16))
    g = type("G", (), {"style": mapping, "style_dim": 16, "input": type("C", (), {"input": torch.zeros(1)})})
    z = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))  # one draw of all 10 codes
    expected = mapping(z).double().mean(dim=0).float()
    assert torch.allclose(pt.generator_latent_avg(g, 10, seed=5, chunk=chunk), expected, atol=1e-6)


def test_id_crop_is_psps_box_scaled_to_the_image():
    x = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 256, 256)  # pixel value = column index
    crop = pt.id_crop(x)
    assert crop.shape == (1, 3, 112, 112)
    # Columns 32:220 (188 px) averaged into 112 bins: first bin starts at column 32, last ends at 219.
    assert crop[0, 0, 0, 0].item() == pytest.approx(32.5) and crop[0, 0, 0, -1].item() == pytest.approx(218.5)
    rows = torch.arange(256.0).view(1, 1, 256, 1).expand(1, 3, 256, 256)
    assert pt.id_crop(rows)[0, 0, 0, 0].item() == pytest.approx(35.5)  # rows 35:223
    small = pt.id_crop(torch.arange(64.0).view(1, 1, 1, 64).expand(1, 3, 64, 64))
    assert small[0, 0, 0, 0].item() == 8 and small[0, 0, 0, -1].item() == 54  # box / 4: columns 8:55


def test_arcface_has_the_model_ir_se50_layout_and_identity_loss_is_one_minus_cosine(assets):
    with torch.device("meta"):
        sd = ArcFaceIRSE50().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["input_layer.0.weight"] == (64, 3, 3, 3) and shapes["input_layer.2.weight"] == (64,)
    assert "body.0.shortcut_layer.0.weight" not in shapes  # 64 -> 64: a strided max-pool, no weights
    assert shapes["body.3.shortcut_layer.0.weight"] == (128, 64, 1, 1)
    assert shapes["body.23.res_layer.5.fc2.weight"] == (512, 32, 1, 1)
    assert shapes["output_layer.0.running_var"] == (512,)
    assert shapes["output_layer.3.weight"] == (512, 512 * 7 * 7) and shapes["output_layer.3.bias"] == (512,)
    assert shapes["output_layer.4.weight"] == (512,) and "output_layer.4.running_mean" in shapes
    with torch.device("meta"):
        encoder = GradualStyleEncoder(50, "ir_se", 8).state_dict()
    stem_body = {k: tuple(v.shape) for k, v in encoder.items() if k.startswith(("input_layer.", "body."))}
    assert stem_body == {k: v for k, v in shapes.items() if k.startswith(("input_layer.", "body."))}

    net = load_arcface(assets["arcface"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        emb = net(torch.rand(1, 3, 112, 112) * 2 - 1)
    assert emb.shape == (1, 512) and emb.norm().item() == pytest.approx(1, abs=1e-5)

    # The loss itself with a cheap stand-in embedding (the network is an argument).
    torch.manual_seed(5)
    stand_in = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 27 * 27, 16))
    embed = lambda t: F.normalize(stand_in(t), dim=1)  # noqa: E731
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y_hat = (x + 0.5 * torch.randn(2, 3, 64, 64)).requires_grad_(True)
    loss, similarity = pt.identity_loss(embed, y_hat, x)
    with torch.no_grad():  # rows 9:56 and columns 8:55 of 64 px (pSp's 35:223, 32:220 of 256, rounded)
        crop = lambda t: F.interpolate(t[:, :, 9:56, 8:55], size=(112, 112), mode="area")  # noqa: E731
        cos = F.cosine_similarity(stand_in(crop(y_hat)), stand_in(crop(x)), dim=1)  # [2]
    assert similarity.item() == pytest.approx(cos.mean().item(), abs=1e-6)
    assert loss.item() == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    assert 1e-3 < loss.item() < 1.5
    loss.backward()
    assert y_hat.grad.abs().sum() > 0
    # a file without BatchNorm's num_batches_tracked (saved before PyTorch 0.4.1; torch's strict load, which
    # pSp uses, fills them in): the same network
    old_style = assets["root"] / "arcface_without_counters.pth"
    torch.save({k: v for k, v in torch.load(assets["arcface"], weights_only=True).items()
                if not k.endswith("num_batches_tracked")}, old_style)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_arcface(str(old_style))(x), net(x))
    with pytest.raises(CheckpointError, match="layout does not fit"):
        bad = assets["root"] / "not_arcface.pth"
        torch.save({k: v for k, v in torch.load(assets["arcface"], weights_only=True).items()
                    if not k.startswith("output_layer.")}, bad)
        load_arcface(str(bad))


def lpips_reference(alexnet_file):
    """The lpips package's own LPIPS (v0.1, AlexNet) with the backbone copied in parameter by parameter."""
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # linear layers: the package's file
    features = torch.load(alexnet_file, weights_only=True)
    with torch.no_grad():
        for name, p in ref.net.named_parameters():  # 'slice2.3.weight' <- 'features.3.weight'
            _, index, kind = name.split(".")
            p.copy_(features[f"features.{index}.{kind}"])
    return ref.eval()


def test_loss_terms_against_the_lpips_package_and_explicit_formulas(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no AlexNet in the hub cache
    losses = pt.build_losses(options(assets, tmp_path), "cpu")
    assert losses.active() == ["l2", "lpips", "w_norm"]
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    y_hat = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    codes, avg = torch.randn(3, 8, 512, generator=g), torch.randn(8, 512, generator=g)
    total, stats = pt.reconstruction_losses(losses, x, y_hat, codes, avg)
    with torch.no_grad():
        ref_lpips = lpips_reference(assets["alexnet"])(y_hat, x).mean().item()
    l2 = ((y_hat - x) ** 2).mean().item()
    assert stats["l2"].item() == pytest.approx(l2, rel=1e-6)
    assert stats["lpips"].item() == pytest.approx(ref_lpips, rel=1e-5) and ref_lpips > 0.01
    assert stats["w_norm"].item() == pytest.approx(pt.w_norm(codes, avg).item())
    assert total.item() == pytest.approx(l2 + 0.8 * ref_lpips + 0.005 * stats["w_norm"].item(), rel=1e-5)
    assert stats["total"].item() == total.item()

    # Without their files LPIPS and the identity loss do not quietly switch off; turned off on purpose (weight
    # 0) they are gone from the total while L2 and W-norm are still logged.
    with pytest.raises(ValueError, match="--lpips_alexnet.*--lpips_weight 0.*--id_weights.*--id_weight 0"):
        pt.build_losses(options(assets, tmp_path, lpips_alexnet=None, id_weight=0.1), "cpu")
    off = pt.build_losses(options(assets, tmp_path, lpips_alexnet=None, lpips_weight=0.0), "cpu")
    assert off.active() == ["l2", "w_norm"]
    total, stats = pt.reconstruction_losses(off, x, y_hat, codes, avg)
    assert set(stats) == {"l2", "w_norm", "total"}
    assert total.item() == pytest.approx(l2 + 0.005 * stats["w_norm"].item(), rel=1e-6)


def test_encoder_backbone_copies_stem_and_body_only(assets, tmp_path):
    with torch.device("meta"):
        encoder = GradualStyleEncoder(50, "ir_se", 8)
    encoder = encoder.to_empty(device="cpu")
    with torch.no_grad():
        for t in encoder.state_dict().values():
            t.zero_()
    arcface = torch.load(assets["arcface"], weights_only=True)
    n = pt.load_encoder_backbone(encoder, assets["arcface"])
    own = encoder.state_dict()
    stem_body = [k for k in own if k.startswith(("input_layer.", "body."))]
    assert n == len(stem_body) > 300
    assert all(torch.equal(own[k], arcface[k]) for k in stem_body)
    assert all(not own[k].any() for k in own if k.startswith(("styles.", "latlayer")))

    # A pSp checkpoint (encoder.* keys inside 'state_dict') also brings the heads it has.
    psp_file = tmp_path / "psp.pt"
    head = {k: torch.full_like(v, 0.5) for k, v in own.items() if k.startswith("styles.7.linear.")}
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in {**arcface, **head}.items()},
                "latent_avg": torch.zeros(512)}, psp_file)
    assert pt.load_encoder_backbone(encoder, str(psp_file)) == len(stem_body) + 2
    assert (encoder.state_dict()["styles.7.linear.weight"] == 0.5).all()
    assert not encoder.state_dict()["styles.6.linear.weight"].any()

    counters = [k for k in stem_body if k.endswith("num_batches_tracked")]
    without = tmp_path / "without_counters.pth"
    torch.save({k: v for k, v in arcface.items() if not k.endswith("num_batches_tracked")}, without)
    assert counters and pt.load_encoder_backbone(encoder, str(without)) == len(stem_body) - len(counters)

    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in arcface.items() if not k.startswith("body.5.")}, broken)
    with pytest.raises(CheckpointError, match="not an IR-SE-50 backbone.*missing"):
        pt.load_encoder_backbone(encoder, str(broken))


# ---- training -----------------------------------------------------------------------------------

def test_short_run_learns_with_the_generator_frozen(assets, trained):
    opts, result = trained
    l2 = [h["l2"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, 9)) and result.step == 8
    assert np.mean(l2[-3:]) < 0.5 * np.mean(l2[:2]), l2

    # The generator is the checkpoint's g_ema, bit for bit, and nothing of it trains.
    g_ema = load_checkpoint(assets["ckpt"])["g_ema"]
    state = result.generator.state_dict()
    assert state.keys() == g_ema.keys()
    assert all(torch.equal(state[k], g_ema[k]) for k in g_ema)
    assert not any(p.requires_grad for p in result.generator.parameters())

    # latent_avg: the mean of the face mapping over 1000 codes drawn from the seed, for every W+ entry.
    z = torch.randn(1000, 512, generator=torch.Generator().manual_seed(opts.seed))
    with torch.no_grad():
        expected = result.generator.style(z).double().mean(0).float()
    assert result.encoder.latent_avg.shape == (8, 512)
    assert torch.allclose(result.encoder.latent_avg, expected.expand(8, 512), atol=1e-6)

    records = read_jsonl(os.path.join(opts.out_dir, "logs", "scalars.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 9))
    for r, h in zip(records, result.history):
        assert r["loss/l2"] == pytest.approx(h["l2"]) and r["loss/lpips"] == pytest.approx(h["lpips"])
        assert r["loss/total"] == pytest.approx(r["loss/l2"] + 0.8 * r["loss/lpips"] + 0.005 * r["loss/w_norm"],
                                                rel=1e-5)
        assert {"lr", "speed/images_per_s"} <= set(r) and "loss/id" not in r
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(opts.out_dir, "logs")))
    config = json.loads(open(os.path.join(opts.out_dir, "config.json")).read())
    assert config["active_losses"] == ["l2", "lpips", "w_norm"] and config["size"] == SIZE


def test_a_hundred_steps_lower_the_reconstruction_loss_clearly(assets, tmp_path):
    """Paper A.3 at test scale: 100 steps of L2 + LPIPS + W-norm on the 8 test faces, batch 4. (Measured: the
    last 20 steps' L2 is 0.13x the first 5 steps' and 0.28x steps 6-10's, LPIPS 0.47x; 0.09x, 0.20x and
    0.37x after 200 steps.)"""
    opts = options(assets, tmp_path / "long", iter=100, batch=4, save_every=100, sample_every=100, log_every=20)
    with fast_cpu():
        result = pt.train(opts)
    assert [h["step"] for h in result.history] == list(range(1, 101))
    l2, perceptual = (np.array([h[k] for h in result.history]) for k in ("l2", "lpips"))
    assert np.isfinite(l2).all() and np.isfinite(perceptual).all()
    assert l2[-20:].mean() < 0.2 * l2[:5].mean()
    assert l2[-20:].mean() < 0.5 * l2[6:10].mean()  # still improving well past the short run's 8 steps
    assert perceptual[-20:].mean() < perceptual[:5].mean()
    assert os.path.isfile(os.path.join(opts.out_dir, "checkpoints", "000100.pt"))


def test_checkpoints_load_into_psp_encoder_and_the_inference_path(assets, trained):
    opts, result = trained
    ckpt_dir = os.path.join(opts.out_dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["000006.pt", "000008.pt"]
    ckpt = load_checkpoint(os.path.join(ckpt_dir, "000008.pt"))
    assert ckpt["kind"] == pt.CHECKPOINT_KIND and ckpt["step"] == 8 and len(ckpt["rng"]) == 1
    assert ckpt["optimizer"]["state"] and ckpt["options"]["lr"] == opts.lr
    assert not any(k.startswith("encoder") for k in ckpt if not k.startswith("encoder."))
    assert "state_dict" not in ckpt

    trained_state = result.encoder.state_dict()
    export = load_checkpoint(result.export)
    assert set(export) == set(trained_state) | {"latent_avg", "opts"}
    assert export["opts"]["step"] == 8 and export["opts"]["generator"]["size"] == SIZE
    for path in (os.path.join(ckpt_dir, "000008.pt"), result.export):
        weights, latent_avg = read_psp_checkpoint(path, 8)  # the release's reading rule
        assert weights.keys() == {k[len("encoder."):] for k in trained_state}
        assert all(torch.equal(weights[k[len("encoder."):]], v) for k, v in trained_state.items())
        assert torch.equal(latent_avg, result.encoder.latent_avg)
    assert set(psp_state_dict_for_release(result.encoder)) == set(trained_state) | {"latent_avg"}

    # Loaded as style_transfer_folder.py / gen_video.py load it, it encodes as the trained encoder does.
    psp = load_psp(result.export, SIZE)
    assert isinstance(psp, PSPEncoder) and not psp.training
    x = faces(assets)
    g = result.generator
    result.encoder.eval()

    def reconstruction_error(codes):
        y_hat, _ = g([codes], input_is_latent=True, randomize_noise=False)
        return F.mse_loss(y_hat, x).item()

    with torch.no_grad(), fast_cpu():
        codes = result.encoder(x)  # [8, 8, 512]; it pools to 32 px, the identity here
        assert torch.allclose(psp.encoder(x) + psp.latent_avg, codes, atol=1e-5)
        average = reconstruction_error(psp.latent_avg.expand(len(x), 8, 512))
        with_running_stats = reconstruction_error(codes)
        psp.train()  # BatchNorm on the batch's statistics, as in training
        with_batch_stats = reconstruction_error(psp.encoder(x) + psp.latent_avg)
    # All 8 faces are reconstructed far better than by the average face (8 steps only: BatchNorm's running
    # statistics, momentum 0.1, are still mostly their initial values, hence the weaker eval-mode bound).
    assert with_batch_stats < 0.5 * average
    assert with_running_stats < average


def test_sample_grids_show_input_reconstruction_and_stylized(assets, trained):
    opts, result = trained
    x = faces(assets)[:3]
    for step in (4, 8):
        path = os.path.join(opts.out_dir, "samples", f"{step:06d}.png")
        grid = np.asarray(Image.open(path).convert("RGB")).astype(int)  # [3 * 32, 3 * 32, 3]
        assert grid.shape == (3 * SIZE, 3 * SIZE, 3)
        inputs = ((x.permute(0, 2, 3, 1).numpy() * 0.5 + 0.5) * 255).reshape(3 * SIZE, SIZE, 3)
        assert np.abs(grid[:, :SIZE] - inputs).max() <= 1.0
        recon, styled = grid[:, SIZE:2 * SIZE], grid[:, 2 * SIZE:]
        assert np.abs(recon - styled).mean() > 2  # the style branch acts at i = 6
        assert recon.std() > 5


def _encoder_weights(path):
    ckpt = load_checkpoint(path)
    return {k: v for k, v in ckpt.items() if k.startswith("encoder.") or k == "latent_avg"}, ckpt


def test_resume_continues_exactly(assets, trained, tmp_path, capsys, monkeypatch):
    opts, result = trained
    # the checkpoint size the start line gives, unrounded
    estimates = record_returns(monkeypatch, trainutil, "estimated_checkpoint_bytes")
    half = os.path.join(opts.out_dir, "checkpoints", "000006.pt")
    # the log window the checkpoint carries (steps since the last log; empty at --log_every 1) continues: one
    # made up here must show in the first mean after the resume
    ckpt = load_checkpoint(half)
    assert ckpt["log_window"] == {"sums": {}, "counts": {}}
    half = str(tmp_path / "000006.pt")
    torch.save({**ckpt, "log_window": {"sums": {"total": 100.0}, "counts": {"total": 1}}}, half)
    resumed = options(assets, tmp_path / "resumed", iter=8, save_every=6, resume=half, export=False, log_every=2)
    with fast_cpu():
        again = pt.train(resumed)
    out = capsys.readouterr().out
    assert "resuming at step 6" in out and "warning: checkpoints" not in out
    real = os.path.getsize(tmp_path / "resumed" / "checkpoints" / "000008.pt")
    assert len(estimates) == 1 and abs(estimates[0] - real) < 0.03 * real, (estimates, real)
    assert f", checkpoints ~{estimates[0] / 1e9:.1f} GB each, resuming" in out
    assert [h["step"] for h in again.history] == [7, 8]
    assert again.history == result.history[6:]
    (record,) = read_jsonl(tmp_path / "resumed" / "logs" / "scalars.jsonl")
    assert record["step"] == 8
    assert record["loss/total"] == pytest.approx((100.0 + sum(h["total"] for h in again.history)) / 3, rel=1e-6)
    a, ckpt_a = _encoder_weights(os.path.join(opts.out_dir, "checkpoints", "000008.pt"))
    b, ckpt_b = _encoder_weights(tmp_path / "resumed" / "checkpoints" / "000008.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start, _ = _encoder_weights(half)
    assert not torch.equal(start["encoder.styles.0.linear.weight"], b["encoder.styles.0.linear.weight"])
    assert not torch.equal(start["encoder.body.0.res_layer.0.running_mean"],
                           b["encoder.body.0.res_layer.0.running_mean"])  # BatchNorm statistics continue too
    for sa, sb in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# a run resumed in its own folder continues from the checkpoint's step; the checkpoint and the log records up
# to it stay where they are
def test_a_resumed_run_keeps_its_checkpoint_and_earlier_log_records(assets, trained, tmp_path):
    opts, _ = trained
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    os.link(os.path.join(opts.out_dir, "checkpoints", "000006.pt"), run / "checkpoints" / "000006.pt")
    os.makedirs(run / "logs")
    (run / "logs" / "scalars.jsonl").write_text('{"step": 5, "loss/total": 1.0}\n{"step": 7, "loss/total": 1.0}\n')
    with fast_cpu():
        again = pt.train(options(assets, run, iter=6, save_every=6, resume="latest", export=False))
    assert again.step == 6 and again.history == []
    assert sorted(os.listdir(run / "checkpoints")) == ["000006.pt"]
    assert [r["step"] for r in read_jsonl(run / "logs" / "scalars.jsonl")] == [5]  # step 7: a later run's, aside


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_stops_before_any_update(assets, trained, tmp_path, monkeypatch, capsys, poison):
    """A NaN loss, or a finite loss whose gradient overflows (float32 / bfloat16: no GradScaler to skip the step),
    stops the run before its step, naming the checkpoint it resumed from and leaving it as it was."""
    opts, _ = trained
    real = pt.reconstruction_losses

    def poisoned(*args):
        total, stats = real(*args)
        if poison == "gradient":
            return inf_gradient(total), stats
        return total * float("nan"), {**stats, "total": stats["total"] * float("nan")}

    monkeypatch.setattr(pt, "reconstruction_losses", poisoned)
    last_good = os.path.join(opts.out_dir, "checkpoints", "000006.pt")
    before = os.stat(last_good).st_mtime_ns
    run = options(assets, tmp_path / "run", iter=8, save_every=1, resume=last_good)
    with fast_cpu():
        assert train_psp.main(cli_args(run)) == 1
    err = capsys.readouterr().err
    problem = "loss 'total' is nan" if poison == "loss" else "a gradient is not finite (the losses are)"
    assert f"step 7: {problem}" in err and f"--resume {last_good}" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert not os.path.exists(tmp_path / "run" / "psp_encoder.pt")
    assert os.stat(last_good).st_mtime_ns == before


def test_command_line_run_with_identity_loss_bf16_and_the_notes(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no AlexNet in the hub cache
    autocast = []  # (enabled, dtype) at each encoder forward: --amp bf16 must reach the training step's
    encoder_forward = GradualStyleEncoder.forward

    def recording(self, x):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return encoder_forward(self, x)

    monkeypatch.setattr(GradualStyleEncoder, "forward", recording)
    run = options(assets, tmp_path / "run", iter=1, batch=1, id_weight=0.1, id_weights=assets["arcface"],
                  lpips_alexnet=None, lpips_weight=0.0, amp="bf16", sample_style_img=None, n_sample=1, sample_every=1,
                  save_every=1, encoder_from_scratch=False, encoder_backbone=assets["arcface"])
    with fast_cpu():
        assert train_psp.main(cli_args(run)) == 0
    assert autocast[0] == (True, torch.bfloat16)
    out = capsys.readouterr().out
    assert "losses l2 + id + w_norm" in out and f"from {assets['arcface']}" in out
    (record,) = read_jsonl(tmp_path / "run" / "logs" / "scalars.jsonl")
    assert "loss/lpips" not in record and 0 <= record["metrics/id_similarity"] <= 1
    assert record["loss/total"] == pytest.approx(record["loss/l2"] + 0.1 * record["loss/id"]
                                                 + 0.005 * record["loss/w_norm"], rel=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["active_losses"] == ["l2", "id", "w_norm"] and config["amp"] == "bf16"
    psp = PSPEncoder(str(tmp_path / "run" / "psp_encoder.pt"), output_size=SIZE)
    assert all(torch.isfinite(v).all() for v in psp.state_dict().values())


def test_generator_of_another_latent_width_is_one_line(assets, tmp_path, capsys):
    """train.py --style_dim 16 makes a generator pSp cannot invert (its heads write 512-D codes): one line
    naming the file, not a shape error from deep inside the run."""
    torch.manual_seed(0)
    g = model.Generator(SIZE, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    ckpt = str(tmp_path / "g16.pt")
    torch.save({"g_ema": g.state_dict()}, ckpt)
    assert train_psp.main(cli_args(options(assets, tmp_path / "run", blendgan_ckpt=ckpt))) == 1
    err = capsys.readouterr().err
    assert f"--ckpt {ckpt}: its generator has 16-D latents; the pSp encoder writes 512-D W+ codes" in err
    assert "Traceback" not in err


def test_loss_weight_defaults_are_psps():
    """train_psp.py's defaults come from PSPTrainOptions: pSp's FFHQ encoder weights (l2 1, LPIPS 0.8, identity
    0.1, W-norm 0)."""
    o = pt.PSPTrainOptions(lmdb=["-"], blendgan_ckpt="-", out_dir="-")
    assert (o.l2_weight, o.lpips_weight, o.id_weight, o.w_norm_weight) == (1.0, 0.8, 0.1, 0.0)


def test_psp_refuses_fp16_without_cuda():
    """float16 on the CPU has no GradScaler here (it is CUDA's): gradients would underflow silently."""
    message = "--amp fp16 needs CUDA (its gradient scaler); use --amp bf16 on the CPU"
    base = dict(lmdb="-", blendgan_ckpt="-", out_dir="-")
    assert message in pt.validate(pt.PSPTrainOptions(**base, amp="fp16", device="cpu"))
    assert message not in pt.validate(pt.PSPTrainOptions(**base, amp="fp16", device="cuda:1"))
    assert message not in pt.validate(pt.PSPTrainOptions(**base, amp="bf16", device="cpu"))


def test_cli_validates_options(assets, trained, tmp_path, capsys):
    opts, result = trained
    good = cli_args(options(assets, tmp_path / "run"))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    cases = [(["--batch", "0"], "--batch must be at least 1"),
             (["--encoder_input_size", "48"], "--encoder_input_size must be a power of two"),
             (["--l2_weight", "0", "--lpips_weight", "0", "--w_norm_weight", "0"], "every loss weight is 0"),
             (["--flip", "2"], "--flip is a probability"),
             (["--sample_style_img", str(text)], f"--sample_style_img {text}: cannot decode image"),
             (["--id_weights", str(tmp_path / "missing.pth")], "missing.pth: file not found (python download_models.py "
                                                                 "model_ir_se50.pth writes pretrained_models/model_ir_se50.pth)"),
             (["--out_dir", os.path.join(good[0], "data.mdb")], "data.mdb is a file, not a folder")]
    cases.append((["--size", "48"], "--size must be a power of two"))
    for extra, message in cases:
        with pytest.raises(SystemExit):
            train_psp.parse_args(good + extra)
        err = capsys.readouterr().err
        assert message in err
        assert "resolution" not in err, err  # a bad --size is one message, not a second about the LMDB
    with pytest.raises(SystemExit):
        train_psp.parse_args([str(tmp_path / "nowhere")] + good[1:])
    assert "nowhere: no such folder (make it with prepare_data.py)" in capsys.readouterr().err
    # a folder of images instead of an LMDB: one line at parsing (it was a traceback after the generator loaded)
    with pytest.raises(SystemExit):
        train_psp.parse_args([FACES] + good[1:])
    assert f"LMDB {FACES}: not an LMDB (no data.mdb" in capsys.readouterr().err

    ckpt = os.path.join(opts.out_dir, "checkpoints", "000006.pt")
    with pytest.raises(CheckpointError, match="--encoder_input_size 32 .this run: 64."):
        pt.load_training_checkpoint(ckpt, options(assets, tmp_path, encoder_input_size=64))
    with pytest.raises(CheckpointError, match="not a pSp training checkpoint"):
        pt.load_training_checkpoint(result.export, options(assets, tmp_path))


def test_missing_weight_files_stop_the_run_before_it_starts(assets, tmp_path, monkeypatch, capsys):
    """No quiet L2-only run from scratch: each missing file is named with its flag and the flag that does
    without it; each of those flags removes exactly its problem."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no AlexNet in the hub cache
    bare = cli_args(options(assets, tmp_path / "run", lpips_alexnet=None, id_weight=0.1, encoder_from_scratch=False))
    expected = {"lpips": ("alexnet-owt-7be5be79.pth", "--lpips_alexnet", "--lpips_weight 0"),
                "id": ("model_ir_se50.pth", "--id_weights", "--id_weight 0"),
                "backbone": ("--encoder_backbone model_ir_se50.pth", "--encoder_from_scratch")}
    switches = {"lpips": ["--lpips_weight", "0"], "id": ["--id_weight", "0"], "backbone": ["--encoder_from_scratch"]}

    def error_line(argv):  # argparse prints the usage (which lists every flag), then one "error: ..." line
        with pytest.raises(SystemExit):
            train_psp.parse_args(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: " in last
        return last

    err = error_line(bare)
    assert all(text in err for texts in expected.values() for text in texts), err
    for name, switch in switches.items():
        err = error_line(bare + switch)
        assert expected[name][-1] not in err  # this one is off on purpose ...
        assert all(expected[other][-1] in err for other in switches if other != name)  # ... the others still named
    opts = train_psp.parse_args(bare + [flag for switch in switches.values() for flag in switch])
    assert (opts.lpips_weight, opts.id_weight, opts.encoder_from_scratch) == (0.0, 0.0, True)
    assert "contradict" in error_line(bare + ["--encoder_from_scratch", "--encoder_backbone", assets["arcface"]])

    # Resuming from a checkpoint needs no backbone (the encoder comes from the checkpoint) ...
    resumed = options(assets, tmp_path / "run", encoder_from_scratch=False, resume=assets["ckpt"])
    assert pt.validate(resumed) == []
    # ... but --resume latest without a checkpoint is a new run: it stops at parsing, before anything is built;
    # once a checkpoint exists, latest resumes it and needs no backbone.
    latest = options(assets, tmp_path / "run", encoder_from_scratch=False, resume="latest")
    assert "--encoder_from_scratch" in error_line(cli_args(latest))
    os.makedirs(tmp_path / "run" / "checkpoints")
    shutil.copy(assets["ckpt"], tmp_path / "run" / "checkpoints" / "000001.pt")
    assert pt.validate(latest) == []


DRIVER = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
import model
model.stylegan2_channels = lambda channel_multiplier: {{2 ** r: {width} for r in range(2, 11)}}
from psp_training import PSPTrainOptions, train
opts = PSPTrainOptions(**json.loads(sys.argv[1]))
torch.backends.mkldnn.enabled = False  # see fast_cpu
result = train(opts)
state = {{"encoder": result.encoder.state_dict(), "latent_avg": result.encoder.latent_avg, "history": result.history}}
torch.save(state, os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".pt"))
"""


def test_torchrun_two_cpu_processes_stay_identical(assets, tmp_path):
    opts = options(assets, tmp_path / "ddp", batch=1, iter=1, sample_every=1, n_sample=1, export=False)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, width=WIDTH))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           json.dumps(dataclasses.asdict(opts)), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["encoder"].keys() == ranks[1]["encoder"].keys()
    assert all(torch.equal(ranks[0]["encoder"][k], ranks[1]["encoder"][k]) for k in ranks[0]["encoder"])
    assert torch.equal(ranks[0]["latent_avg"], ranks[1]["latent_avg"])
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 1
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "000001.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert all(torch.equal(ckpt[k], v) for k, v in ranks[0]["encoder"].items())
    assert "global batch 2 = 2 process(es) x 1" in run.stdout
    assert os.path.isfile(tmp_path / "ddp" / "samples" / "000001.png")
    assert not os.path.exists(tmp_path / "ddp" / "psp_encoder.pt")




def test_losses_see_the_output_block_averaged_to_the_data_size_and_w_norm_about_latent_avg(assets, tmp_path,
                                                                                          monkeypatch):
    """Faces at 16 px for a 64 px generator: the loss compares each 4 x 4 block mean of the output with
    the face (as pSp pools 1024 to 256), and the logged W-norm is measured from latent_avg, not from 0."""
    lmdb = str(tmp_path / "faces16.lmdb")
    prepare_data.prepare(prepare_data.PrepareOptions(out=lmdb, paths=[FACES], size=(16,), n_worker=0))
    torch.manual_seed(7)
    g64 = generator_with_meta_style_encoder(64)
    g64.embedder = None  # no sample grids in this run: the style encoder is never used
    with torch.no_grad():
        for layer in [g64.conv1, *g64.convs]:
            layer.noise.weight.fill_(0.05)
    monkeypatch.setattr(pt, "load_blendgan", lambda path, device="cpu": (g64.to(device).eval(), None))
    seen = []
    real_losses = pt.reconstruction_losses

    class LossesSeen(Exception):
        pass

    def recording(losses, x, y_hat, codes, latent_avg):
        total, stats = real_losses(losses, x, y_hat, codes, latent_avg)
        seen.append((x.detach().clone(), y_hat.detach().clone(), codes.detach().clone(), stats["w_norm"].item()))
        raise LossesSeen  # the first step's inputs and logged terms are all this test needs

    monkeypatch.setattr(pt, "reconstruction_losses", recording)
    opts = options(assets, tmp_path / "run16", lmdb=[lmdb], size=16, iter=1, lpips_weight=0.0, lpips_alexnet=None,
                   n_sample=0, sample_style_img=None)
    with fast_cpu(), pytest.raises(LossesSeen):
        pt.train(opts)
    assert len(seen) == 1
    x, y_hat, codes, logged_w_norm = seen[0]
    assert x.shape == y_hat.shape == (2, 3, 16, 16) and codes.shape == (2, 10, 512)

    with torch.no_grad(), fast_cpu():
        raw, _ = g64([codes], input_is_latent=True, randomize_noise=False)  # [2, 3, 64, 64]
    blocks = raw.double().view(2, 3, 16, 4, 16, 4).mean((3, 5))
    assert torch.allclose(y_hat.double(), blocks, atol=1e-5)
    bilinear = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False).double()
    assert (bilinear - blocks).abs().max() > 1e-3

    z = torch.randn(1000, 512, generator=torch.Generator().manual_seed(opts.seed))
    with torch.no_grad():
        latent_avg = g64.style(z).double().mean(0)  # [512], the same for every W+ entry
    distances = [float(((codes[i].double() - latent_avg) ** 2).sum().sqrt()) for i in range(2)]
    assert logged_w_norm == pytest.approx(np.mean(distances), rel=1e-5)
    from_zero = np.mean([float(codes[i].double().norm()) for i in range(2)])
    assert abs(from_zero - np.mean(distances)) > 0.01 * np.mean(distances)
