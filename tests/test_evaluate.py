"""metrics.py / evaluation.py / evaluate.py on CPU: FID and its matrix square root against scipy and pytorch-fid, the FID
Inception and LPIPS wrappers against the pytorch-fid / lpips packages (random weights built here), the
weights-file errors, and the Table 1 protocol (table contents, resume, determinism) against an independent
recomputation with tiny models."""
import csv
import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from PIL import Image

import evaluate
import evaluation
import metrics
import model_zoo
import prepare_data
from checkpoint import CheckpointError
from evaluation import (ImageSet, Protocol, dataset_statistics, draw_codes, draw_references, parse_indicators,
                        real_statistics, reference_codes, run_protocol)
from fileio import DiskFullError
from metrics import (FeatureStats, frechet_distance, load_inception, load_lpips, lpips_diversity, style_consistency,
                     trace_sqrt_product)
from model_zoo import INCEPTION_URL, pretrained_file
from model import Generator
from utils import img2ten, ten2img

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = os.path.join(ROOT, "test_imgs", "style_imgs")
SIZE = 16  # n_latent 6: the smallest generator, synthesis dominates the run time


class TinyFeatures(nn.Module):
    """A small fixed random conv net behind the feature-extractor interface ([0, 1] images -> [N, dim])."""

    input_size = 32
    weights_id = weights_file = "test"  # what real_statistics records in a stats file

    def __init__(self, dim=6):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, dim, 3, 2, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        rng = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=rng) * 0.3)

    def forward(self, x):
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(x)


def random_covariance(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------------------------- FID math


def test_matrix_square_root_matches_scipy():
    rng = np.random.default_rng(0)
    s1, s2 = random_covariance(rng, 40, 200), random_covariance(rng, 40, 200)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)
    assert trace_sqrt_product(s2, s1) == pytest.approx(expected, rel=1e-9)
    # one singular covariance (fewer samples than dimensions), either order
    s3 = random_covariance(rng, 40, 10)
    assert np.linalg.matrix_rank(s3) < 40
    expected = np.trace(scipy.linalg.sqrtm(s3 @ s1)).real
    assert trace_sqrt_product(s3, s1) == pytest.approx(expected, rel=1e-6)
    assert trace_sqrt_product(s1, s3) == pytest.approx(expected, rel=1e-6)
    # both singular: Tr sqrt(S S) = Tr S; the rounding-level eigenvalues of the null space enter through
    # their square roots, hence sqrt(eps)-level agreement
    assert trace_sqrt_product(s3, s3) == pytest.approx(np.trace(s3), rel=1e-6)
    s4 = random_covariance(rng, 40, 12)
    expected = np.sqrt(np.clip(np.linalg.eigvals(s3 @ s4).real, 0, None)).sum()
    assert trace_sqrt_product(s3, s4) == pytest.approx(expected, rel=1e-6)


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance, the definition evaluate.py's FID is held to. pytorch-fid 0.3
    calls scipy.linalg.sqrtm(..., disp=False), an argument SciPy 1.18 removes; there its computation is written
    out here: the same sqrtm, the eps offset it retries a non-finite root with, the real part."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        return calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    except TypeError as e:
        if "disp" not in str(e):
            raise
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    s1, s2 = random_covariance(rng, 64, 500), random_covariance(rng, 64, 500)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(pytorch_fid_distance(mu1, s1, mu2, s2), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((37, 5)) * 3 + 10
    stats = FeatureStats()
    for chunk in (feats[:10], feats[10:11], feats[11:]):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    f32 = feats.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.n == 37


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    extractor = TinyFeatures(dim=16).eval()
    images = ImageSet(STYLES)
    mu, sigma, n, skipped = dataset_statistics(images, extractor, batch=8, device="cpu")
    assert n == len(images) == 30 and skipped == []
    # the same images through the extractor one by one (pytorch-fid resizes each to the network's input)
    x = torch.cat([F.interpolate(torch.from_numpy(images.read(k)).permute(2, 0, 1)[None].float() / 255,
                                 size=(32, 32), mode="bilinear", align_corners=False) for k in range(n)])
    with torch.no_grad():
        feats = extractor(x).double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)

    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=rng)
    fids = []
    for level in (0.03, 0.1, 0.3):
        stats = FeatureStats()
        with torch.no_grad():
            stats.update(extractor((x + level * noise).clamp(0, 1)))
        fids.append(frechet_distance(*stats.mean_cov(), mu, sigma))
    assert 0 < fids[0] < fids[1] < fids[2], fids
    assert fids[0] > 1e-6 * np.trace(sigma)


def test_a_folder_and_its_lmdb_give_the_fid_network_the_same_images(tmp_path):
    """A folder --real of non-square images was squashed to the network's square; an LMDB of the same images
    holds prepare_data's centre squares at --real_resolution. Both routes now give the same inputs."""
    folder = tmp_path / "art"
    folder.mkdir()
    for k, box in enumerate([(0, 0, 512, 300), (100, 0, 340, 512), (0, 0, 512, 512)]):  # wide, tall, square
        Image.open(os.path.join(STYLES, sorted(os.listdir(STYLES))[k])).crop(box).save(folder / f"{k}.png")
    lmdb_path = str(tmp_path / "art.lmdb")
    assert prepare_data.main(["--out", lmdb_path, "--size", "24", "--format", "png", "--n_worker", "0",
                              str(folder)]) == 0
    from_folder, from_lmdb = ImageSet(str(folder), 24), ImageSet(lmdb_path, 24)
    for k in range(3):
        np.testing.assert_array_equal(from_folder.read(k), from_lmdb.read(k))
        assert from_folder.read(k).shape == (24, 24, 3)
    # the wide image's centre square, independently: 512 x 300 scaled to 41 x 24, its middle 24 columns
    wide = Image.open(folder / "0.png").convert("RGB").resize((41, 24), Image.LANCZOS).crop((8, 0, 32, 24))
    np.testing.assert_array_equal(from_folder.read(0), np.asarray(wide))
    x_folder, _ = evaluation.collate_resized([from_folder[k] for k in range(3)], 32)
    x_lmdb, _ = evaluation.collate_resized([from_lmdb[k] for k in range(3)], 32)
    torch.testing.assert_close(x_folder, x_lmdb, rtol=0, atol=0)
    extractor = TinyFeatures(dim=2).eval()
    assert dataset_statistics(from_folder, extractor, 3, "cpu")[0].tolist() == \
        dataset_statistics(from_lmdb, extractor, 3, "cpu")[0].tolist()
    # records made before folders were read this way (path@resolution) do not match: not reused, not resumed
    assert evaluation.image_set_id(lmdb_path, 24) == f"{os.path.abspath(lmdb_path)}@24"
    assert evaluation.image_set_id(str(folder), 24) == f"{folder}@24 (folder: shorter side scaled, centre square)"


# ---------------------------------------------------------------------------------------------- networks


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """The FID Inception's file layout with random weights (He-initialised so the features are not tiny)."""
    torch.manual_seed(0)
    net = metrics.fid_inception_v3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "pt_inception_random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "alexnet_random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return str(path)


def test_lpips_takes_alexnet_features_with_or_without_their_prefix(alexnet_file, tmp_path):
    """torchvision's AlexNet file ('features.N.*') or its features alone ('N.*', as
    ``alexnet.features.state_dict()`` saves them): the same LPIPS."""
    full = torch.load(alexnet_file, weights_only=True)
    bare = str(tmp_path / "alexnet_features.pth")
    torch.save({k[len("features."):]: v for k, v in full.items() if k.startswith("features.")}, bare)
    x, y = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in (0, 1))
    with torch.no_grad():
        want = load_lpips(alexnet_file)(x, y)
        assert torch.equal(load_lpips(bare)(x, y), want) and (want > 0).all()


def test_malformed_fid_statistics_are_named(tmp_path):
    """mu and sigma that do not fit (e.g. another tool's layout) are one error naming the file, not a shape error
    deep inside the Frechet distance."""
    path = str(tmp_path / "real_stats.npz")
    for mu, sigma in ((np.zeros(4), np.eye(3)), (np.zeros((2, 4)), np.eye(4))):
        np.savez(path, mu=mu, sigma=sigma)
        with pytest.raises(ValueError, match=rf"FID statistics {path}: mu \({mu.shape[0]},.*do not fit"):
            evaluation.load_stats(path)
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
    assert evaluation.load_stats(path)[2:] == (-1, "", "")  # another tool's file: no n, source, features


def test_inception_features_match_pytorch_fid(inception_file, monkeypatch):
    import pytorch_fid.inception

    ours = load_inception(inception_file)
    sd = torch.load(inception_file, weights_only=True)
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: sd)
    theirs = pytorch_fid.inception.InceptionV3([3]).eval()  # the FID network, with these weights
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(x)
        b = theirs(x)[0].flatten(1)
    assert a.shape == (2, 2048)
    assert a.std() > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # files saved before BatchNorm counted batches (no num_batches_tracked) load too, to the same weights
    legacy = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = os.path.join(os.path.dirname(inception_file), "legacy.pth")
    torch.save(legacy, path)
    loaded = load_inception(path).state_dict()
    assert loaded.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.items())


def reference_lpips(alexnet_file, monkeypatch):
    """The lpips package's own LPIPS with the AlexNet backbone from the file (through torchvision)."""
    import lpips

    build = torchvision.models.alexnet

    def alexnet(*args, **kwargs):
        net = build(weights=None)
        net.load_state_dict(torch.load(alexnet_file, weights_only=True))
        return net

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", alexnet)
    return lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=False).eval()


def test_lpips_pairwise_matches_package_and_is_zero_for_identical_outputs(alexnet_file, monkeypatch):
    ours = load_lpips(alexnet_file)
    ref = reference_lpips(alexnet_file, monkeypatch)
    x = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 2 faces x 4 outputs
    div = lpips_diversity(ours, x)
    with torch.no_grad():
        expected = [np.mean([ref(x[f, a:a + 1], x[f, b:b + 1]).item() for a in range(4) for b in range(a + 1, 4)])
                    for f in range(2)]
        torch.testing.assert_close(ours(x[0], x[1]), ref(x[0], x[1]).flatten(), rtol=1e-5, atol=1e-7)
    assert div.shape == (2,)
    np.testing.assert_allclose(div.numpy(), expected, rtol=1e-5)
    assert (div > 0).all()
    same = x[:, :1].expand(-1, 4, -1, -1, -1)
    assert lpips_diversity(ours, same).abs().max().item() == 0


def test_style_consistency_is_cosine_of_style_codes():
    torch.manual_seed(0)
    g = Generator(SIZE, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32).eval()
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    z = g.get_z_embed(x)
    torch.testing.assert_close(style_consistency(g, x, z), torch.ones(4), rtol=0, atol=1e-5)
    other = torch.randn(4, 16)
    torch.testing.assert_close(style_consistency(g, x, other), F.cosine_similarity(z, other, dim=1))


# ---------------------------------------------------------------------------------------------- weights files


def test_missing_weights_say_where_to_put_them_and_never_download_offline(tmp_path, monkeypatch, capsys, inception_file,
                                                                          alexnet_file):
    cache = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(model_zoo, "http_download", no_download)
    monkeypatch.delenv(model_zoo.MIRROR_ENV, raising=False)
    monkeypatch.setattr(model_zoo, "host_reachable", lambda url, timeout=3.0: False)
    expected = cache / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    for allow in (True, False):  # offline, and downloads switched off
        with pytest.raises(CheckpointError) as e:
            pretrained_file("FID Inception-v3", INCEPTION_URL, None, "--inception", allow_download=allow)
        assert f"put file pt_inception-2015-12-05-6726825d.pth at {expected}" in str(e.value)
        assert "--inception" in str(e.value)
    with pytest.raises(CheckpointError, match=f"put file alexnet-owt-7be5be79.pth .* at {tmp_path / 'a.pth'}"):
        evaluation.load_metric_networks(inception_file, str(tmp_path / "a.pth"))
    with pytest.raises(SystemExit, match="put file pt_inception-2015-12-05-6726825d.pth at"):
        evaluate.main(["--real", STYLES, "--device", "cpu", "--outdir", str(tmp_path / "out"), "--no_download"])

    # a cached file is used as is; online, the file is fetched into the cache (announced) by model_zoo's
    # verified download: here the publisher serves the random AlexNet file, whose hash prefix the manifest
    # row is given, and a file that fails the checks (a proxy's HTML page) never reaches the cache
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"x")
    assert pretrained_file("FID Inception-v3", INCEPTION_URL) == str(expected)
    monkeypatch.setattr(model_zoo, "host_reachable", lambda url, timeout=3.0: True)
    with open(alexnet_file, "rb") as f:
        weights = f.read()
    served = {}

    def serve(url, part, desc, retries=3):
        assert url == model_zoo.ALEXNET_URL
        with open(part, "wb") as f:
            f.write(served["bytes"])

    monkeypatch.setattr(model_zoo, "http_download", serve)
    prefix = model_zoo.sha256_of(alexnet_file)[:8]
    monkeypatch.setattr(model_zoo, "MANIFEST", tuple(
        dataclasses.replace(e, sha256_prefix=prefix) if e.sources == (model_zoo.ALEXNET_URL,) else e
        for e in model_zoo.MANIFEST))
    target = cache / "checkpoints" / "alexnet-owt-7be5be79.pth"
    served["bytes"] = b"<html><head><title>Proxy error</title></head></html>"
    with pytest.raises(CheckpointError, match="HTML page.*nothing was written to .*alexnet-owt-7be5be79.pth"):
        pretrained_file("LPIPS AlexNet backbone", model_zoo.ALEXNET_URL)
    assert not target.exists()
    served["bytes"] = weights
    got = pretrained_file("LPIPS AlexNet backbone", model_zoo.ALEXNET_URL)
    assert got == str(target) and target.read_bytes() == weights
    assert f"downloading LPIPS AlexNet backbone weights {model_zoo.ALEXNET_URL} -> {target}" in capsys.readouterr().err


def test_parse_indicators():
    assert parse_indicators("0,2,...,18") == list(range(0, 19, 2))
    assert parse_indicators("0, 6,18") == [0, 6, 18]
    assert parse_indicators("1,4,...,10") == [1, 4, 7, 10]
    for bad in ("0,...,18", "0,2,...,7", "0,2,2", "a"):
        with pytest.raises(ValueError):
            parse_indicators(bad)


# ---------------------------------------------------------------------------------------------- protocol


@pytest.fixture(scope="module")
def tiny_g():
    torch.manual_seed(0)
    g = Generator(SIZE, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32)
    with torch.no_grad():  # trained-like WBM weights and noise strengths
        g.add_weight.copy_(torch.linspace(0.9, 0.1, g.n_latent).view(1, -1, 1))
        for layer in [g.conv1, *g.convs]:
            layer.noise.weight.fill_(0.05)
    return g.eval()


@pytest.fixture(scope="module")
def protocol_parts(tiny_g, alexnet_file):
    extractor = TinyFeatures(dim=4).eval()  # 4 < 6 samples: full-rank covariances, as scipy needs
    mu, sigma, _, _ = dataset_statistics(ImageSet(STYLES), extractor, batch=16, device="cpu")
    return dict(extractor=extractor, lpips=load_lpips(alexnet_file), mu=mu, sigma=sigma,
                refs=ImageSet(STYLES))


PROTOCOL = Protocol(n_samples=6, lpips_faces=2, n_styles=3, lpips_size=64, seed=3)  # 2 faces x 3 styles
SETTINGS = {"test": 1}


def run(g, parts, outdir, indicators, batch, protocol=PROTOCOL):
    return run_protocol(g, ["latent", "reference"], indicators, protocol, parts["mu"], parts["sigma"],
                        parts["extractor"], parts["lpips"], str(outdir), {**SETTINGS, **vars(protocol)}, batch,
                        parts["refs"])


def read_csv(path):
    with open(path) as f:
        return {(r["mode"], int(r["indicator"])): r for r in csv.DictReader(f)}


EVALUATE_ROW = evaluation.evaluate_row


class Interrupted(Exception):
    pass


def count_rows(monkeypatch, fail_after=None):
    """Record the indicator of every row computed; with fail_after, stop the run at the next row."""
    calls = []

    def counted(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted
        calls.append(args[1])
        return EVALUATE_ROW(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_row", counted)
    return calls


def independent_row(g, parts, indicator, z_style):
    """One row recomputed from the documented protocol with the packages' own metrics."""
    p = PROTOCOL
    n_faces = max(-(-p.n_samples // p.n_styles), p.lpips_faces)
    rng = torch.Generator().manual_seed(2 * p.seed)
    z_face = torch.stack([torch.randn(16, generator=rng) for _ in range(n_faces)])
    saved = []  # the 8-bit images an inference script would write, face-major
    with torch.no_grad():
        for k in range(n_faces):
            out, _ = g([z_face[k:k + 1].expand(p.n_styles, -1)], z_embed=z_style[k], add_weight_index=indicator,
                       randomize_noise=False)
            saved += ten2img(out)
    x01 = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in saved[:p.n_samples]])
    with torch.no_grad():
        feats = parts["extractor"](x01).double().numpy()
    fid = pytorch_fid_distance(feats.mean(0), np.cov(feats, rowvar=False), parts["mu"], parts["sigma"])
    ref = parts["ref_lpips"]
    div, cos = [], []
    for k in range(p.lpips_faces):
        x = torch.cat([img2ten(im) for im in saved[k * p.n_styles:(k + 1) * p.n_styles]])
        with torch.no_grad():
            cos += F.cosine_similarity(g.get_z_embed(x), z_style[k], dim=1).tolist()
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
            div.append(np.mean([ref(x[a:a + 1], x[b:b + 1]).item() for a in range(p.n_styles)
                                for b in range(a + 1, p.n_styles)]))
    return fid, float(np.mean(div)), float(np.mean(cos))


def test_protocol_table_resume_and_determinism(tiny_g, protocol_parts, alexnet_file, tmp_path, monkeypatch):
    g, parts = tiny_g, protocol_parts
    calls = count_rows(monkeypatch)
    table = run(g, parts, tmp_path / "a", [0, 6], batch=6)
    assert sorted(calls) == [0, 0, 6, 6]
    rows = read_csv(tmp_path / "a" / "table1.csv")
    assert set(rows) == {("latent", 0), ("latent", 6), ("reference", 0), ("reference", 6)}
    for r in rows.values():
        assert int(r["n_fid"]) == 6 and int(r["lpips_faces"]) == 2
        assert all(np.isfinite(float(r[k])) for k in ("fid", "lpips", "style_consistency"))
    with open(tmp_path / "a" / "table1.md") as f:
        md = f.read()
    assert md == table
    lines = md.strip().splitlines()
    assert "latent-guided FID" in lines[0] and "reference-guided LPIPS" in lines[0]
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0", "6"]
    # i = n_latent is the natural face: the S outputs of a face are identical, LPIPS diversity 0
    for mode in ("latent", "reference"):
        assert float(rows[(mode, 6)]["lpips"]) < 1e-6
        assert float(rows[(mode, 0)]["lpips"]) > 1e-5  # a tiny random G: styles move its output only a little

    # every number of a row against an independent recomputation (latent- and reference-guided, i = 0)
    parts = {**parts, "ref_lpips": reference_lpips(alexnet_file, monkeypatch)}
    n_faces = PROTOCOL.n_faces()
    _, z_latent = draw_codes(n_faces, PROTOCOL.n_styles, 16, PROTOCOL.seed)
    picks = draw_references(n_faces, PROTOCOL.n_styles, 30, PROTOCOL.seed)
    refs = parts["refs"]
    with torch.no_grad():
        z_ref = torch.stack([g.get_z_embed(torch.cat([img2ten(refs.read(k)) for k in face])) for face in picks.tolist()])
    torch.testing.assert_close(reference_codes(g, refs, n_faces, PROTOCOL.n_styles, PROTOCOL.seed, 5, "cpu",
                                               torch.float32), z_ref, rtol=1e-5, atol=1e-6)
    assert all(len(set(face)) == PROTOCOL.n_styles for face in picks.tolist())
    for mode, z_style in (("latent", z_latent), ("reference", z_ref)):
        fid, div, cos = independent_row(g, parts, 0, z_style)
        r = rows[(mode, 0)]
        assert float(r["fid"]) == pytest.approx(fid, rel=1e-4, abs=1e-6)
        assert float(r["lpips"]) == pytest.approx(div, rel=1e-4)
        assert float(r["style_consistency"]) == pytest.approx(cos, rel=1e-4)

    # resume: a rerun asking for one more indicator computes only the new rows, keeps the others as they were
    calls.clear()
    run(g, parts, tmp_path / "a", [0, 4, 6], batch=6)
    assert calls == [4, 4]
    rows_b = read_csv(tmp_path / "a" / "table1.csv")
    assert len(rows_b) == 6 and all(rows_b[k] == rows[k] for k in rows)

    # an interrupted run finishes on rerun with the very same numbers (same --batch: same batches, same sums)
    calls_c = count_rows(monkeypatch, fail_after=1)
    with pytest.raises(Interrupted):
        run(g, parts, tmp_path / "c", [0], batch=6)
    with open(tmp_path / "c" / "partial_results.json") as f:
        assert list(json.load(f)["rows"]) == ["latent/0"]
    calls_c = count_rows(monkeypatch)
    run(g, parts, tmp_path / "c", [0], batch=6)
    assert calls_c == [0]
    rows_c = read_csv(tmp_path / "c" / "table1.csv")
    assert set(rows_c) == {("latent", 0), ("reference", 0)}
    for k in rows_c:
        for name in ("fid", "lpips", "style_consistency"):
            assert rows_c[k][name] == rows[k][name], (k, name)  # bit-identical, not approximately equal

    # Another --batch (1 face per step instead of 2) changes only the float32 rounding of the batched kernels,
    # which the 8-bit quantization can turn into one-level flips of a few pixels: up to ~5e-5 relative
    # measured (a 1e-5 tolerance failed by chance); 1e-3 still lies far below the table's printed digits.
    n_faces = PROTOCOL.n_faces()
    z_face, _ = draw_codes(n_faces, PROTOCOL.n_styles, 16, PROTOCOL.seed)
    other = EVALUATE_ROW(g, 0, z_face, z_latent, PROTOCOL, parts["mu"], parts["sigma"], parts["extractor"],
                         parts["lpips"], batch=3)
    for name in ("fid", "lpips", "style_consistency"):
        assert other[name] == pytest.approx(float(rows[("latent", 0)][name]), rel=1e-3), name

    # other settings in the same folder are refused, not mixed
    with pytest.raises(ValueError, match="other settings.*n_samples: 6 -> 9"):
        run(g, parts, tmp_path / "a", [0, 6], batch=6, protocol=Protocol(9, 2, 3, 64, seed=3))


def test_unreadable_reference_is_named_and_the_references_drawn_from_the_rest(tiny_g, tmp_path, capsys):
    """A bad file among the references is skipped as the real set's statistics skip it, not an abort after
    the long statistics pass."""
    names = sorted(os.listdir(STYLES))[:6]
    for name in names:
        shutil.copy(os.path.join(STYLES, name), tmp_path / name)
    broken = tmp_path / (names[0][:-4] + "b.jpg")  # sorts second: drawn among 3 of 7
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    refs = ImageSet(str(tmp_path))
    assert len(refs) == 7 and refs.files[1] == str(broken)
    draws = draw_references(4, 3, 7, seed=2)
    assert 1 in draws.flatten().tolist()  # the broken file is among the first draws
    codes = reference_codes(tiny_g, refs, 4, 3, 2, 4, "cpu", torch.float32)
    assert f"skipped {broken}: cannot decode image" in capsys.readouterr().err
    readable = [0, 2, 3, 4, 5, 6]
    picks = [[readable[k] for k in face] for face in draw_references(4, 3, 6, seed=2).tolist()]
    with torch.no_grad():
        expected = torch.stack([tiny_g.get_z_embed(torch.cat([img2ten(refs.read(k)) for k in face]))
                                for face in picks])  # [4, 3, style_dim]
    torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-6)


def test_cli_end_to_end_with_weights_files(tiny_g, inception_file, alexnet_file, tmp_path, capsys):
    """evaluate.py with the weights files through its options (the release pools style images to 256 px
    before VGG, so this run is kept to one reference-guided row of 2 images)."""
    ckpt = tmp_path / "blendgan.pt"
    torch.save({"g_ema": tiny_g.state_dict()}, ckpt)
    out = tmp_path / "eval"
    args = ["--ckpt", ckpt, "--real", STYLES, "--n_real", 3, "--modes", "reference", "--indicators", "0",
            "--n_samples", 2, "--n_styles", 2, "--lpips_faces", 1, "--lpips_size", 64, "--batch", 4, "--workers", 0,
            "--device", "cpu", "--outdir", out, "--inception", inception_file, "--lpips_alexnet", alexnet_file,
            "--no_download", "--seed", 1]
    assert evaluate.main([str(a) for a in args]) == 0
    rows = read_csv(out / "table1.csv")
    assert list(rows) == [("reference", 0)]
    r = rows[("reference", 0)]
    assert int(r["n_fid"]) == 2 and int(r["lpips_faces"]) == 1
    assert float(r["fid"]) > 0 and float(r["lpips"]) > 0 and -1 <= float(r["style_consistency"]) <= 1
    # the cached real statistics: pytorch-fid's npz layout, and the features of the first 3 images
    with np.load(out / "real_stats.npz") as f:
        mu, sigma, n = f["mu"], f["sigma"], int(f["n"])
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and n == 3
    # the real images at the generator's size (16 px: the 512 px squares scaled down, as prepare_data packs them)
    firsts = [os.path.join(STYLES, name) for name in sorted(os.listdir(STYLES))[:3]]
    x = torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)))
                     .permute(2, 0, 1).float() / 255 for path in firsts])
    with torch.no_grad():
        feats = load_inception(inception_file)(x).double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-3, atol=1e-5)

    stats_mtime = os.stat(out / "real_stats.npz").st_mtime_ns
    capsys.readouterr()
    assert evaluate.main([str(a) for a in args]) == 0  # everything kept: statistics cache and the row
    printed = capsys.readouterr().out
    assert "reference-guided i=0: kept" in printed and "| 0 |" in printed
    assert os.stat(out / "real_stats.npz").st_mtime_ns == stats_mtime
    assert read_csv(out / "table1.csv") == rows
    digest = hashlib.sha256(open(inception_file, "rb").read()).hexdigest()
    with np.load(out / "real_stats.npz") as f:
        assert str(f["features"]) == f"sha256:{digest}"  # the weights' content, not their path
    # the same weights copied elsewhere (a job's local scratch): the cache and the row are still kept
    copy = tmp_path / "scratch" / "pt_inception.pth"
    os.makedirs(copy.parent)
    shutil.copy(inception_file, copy)
    assert evaluate.main([str(copy if a == inception_file else a) for a in args]) == 0
    assert "reference-guided i=0: kept" in capsys.readouterr().out
    # results written when the weights were named by their path: still this evaluation's rows
    partial = json.loads((out / "partial_results.json").read_text())
    assert partial["settings"]["inception"] == f"sha256:{digest}"
    partial["settings"].update(inception=os.path.abspath(inception_file), lpips_alexnet=os.path.abspath(alexnet_file))
    (out / "partial_results.json").write_text(json.dumps(partial))
    assert evaluate.main([str(a) for a in args]) == 0
    assert "reference-guided i=0: kept" in capsys.readouterr().out
    assert os.stat(out / "real_stats.npz").st_mtime_ns == stats_mtime and read_csv(out / "table1.csv") == rows
    # other Inception weights: the cached statistics are refused, not mixed with the new features
    other = tmp_path / "other_inception.pth"
    state = torch.load(inception_file)
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, other)
    os.remove(out / "partial_results.json")
    with pytest.raises(SystemExit, match=f"statistics of the Inception weights sha256:{digest}, not of {other}"):
        evaluate.main([str(other if a == inception_file else a) for a in args])


class PatternGenerator(nn.Module):
    """A stand-in generator: 128 px outputs of fine random texture set by the codes, and a linear style encoder."""

    def __init__(self, dim=8, size=128):
        super().__init__()
        rng = torch.Generator().manual_seed(11)
        self.register_buffer("texture", torch.randn(3, size, size, generator=rng))
        self.embedder = nn.Linear(3, dim)

    def forward(self, styles, z_embed=None, **kwargs):
        zf = styles[0]
        return torch.tanh(zf[:, :3, None, None] * self.texture + z_embed[:, :3, None, None]), None

    def get_z_embed(self, images):
        return self.embedder(images.mean((2, 3)))


def test_cli_ends_a_full_disk_with_one_line(tmp_path, monkeypatch):
    """A row or the table that the disk has no room for ends evaluate.py with its one line (the finished rows stay
    in partial_results.json: test_disk_full), not a traceback."""
    message = f"cannot write {tmp_path / 'table1.csv'}: the disk is full (0 MiB free in {tmp_path}); no part of it"

    def full(opts):
        raise DiskFullError(message)

    monkeypatch.setattr(evaluate, "evaluate", full)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--real", STYLES, "--device", "cpu", "--outdir", str(tmp_path)])
    assert stop.value.code == f"error: {message}"


def test_row_feeds_exactly_n_samples_to_fid_and_antialiased_lpips_inputs():
    """n_samples 7 with 3 styles and 2 faces per step: the second step holds 3 images, only 1 of which is
    for FID. Outputs of 128 px reach LPIPS at 32 px through an antialiased (area-like) resize."""
    g = PatternGenerator()
    protocol = Protocol(n_samples=7, lpips_faces=2, n_styles=3, lpips_size=32)
    n_faces = protocol.n_faces()
    gen = torch.Generator().manual_seed(4)
    z_face, z_style = torch.randn(n_faces, 8, generator=gen), torch.randn(n_faces, 3, 8, generator=gen)
    fid_inputs, lpips_inputs = [], []

    def extractor(x01):
        fid_inputs.append(x01.clone())
        return x01.mean((2, 3))

    class RecordingLPIPS:
        def features(self, face):
            lpips_inputs.append(face.clone())
            return [face]

        def distance(self, a, b):
            return ((a[0] - b[0]) ** 2).mean((1, 2, 3))

    row = evaluation.evaluate_row(g, 0, z_face, z_style, protocol, np.zeros(3), np.eye(3), extractor,
                                  RecordingLPIPS(), batch=6)

    saved = []  # face-major 8-bit outputs, one face at a time
    with torch.no_grad():
        for k in range(n_faces):
            out, _ = g([z_face[k:k + 1].expand(3, -1)], z_embed=z_style[k])
            saved.append(torch.floor(torch.clamp((out * 0.5 + 0.5) * 255, 0, 255)))
    saved = torch.cat(saved)  # [9, 3, 128, 128]
    assert n_faces == 3 and [len(x) for x in fid_inputs] == [6, 1] and row["n_fid"] == 7
    assert torch.equal(torch.cat(fid_inputs), saved[:7] / 255)

    assert len(lpips_inputs) == 2 and all(x.shape == (3, 3, 32, 32) for x in lpips_inputs)
    expected_div = []
    for k in range(2):
        x = saved[3 * k:3 * k + 3] / 255 * 2 - 1
        smooth = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        aliased = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        assert (smooth - aliased).abs().mean() > 0.1
        assert (smooth - x.view(3, 3, 32, 4, 32, 4).mean((3, 5))).abs().mean() < 0.5 * (smooth - aliased).abs().mean()
        assert torch.allclose(lpips_inputs[k], smooth, atol=1e-5)
        expected_div.append(np.mean([((smooth[a] - smooth[b]) ** 2).mean().item() for a in range(3)
                                     for b in range(a + 1, 3)]))
    assert row["lpips"] == pytest.approx(np.mean(expected_div), rel=1e-5)


def test_cached_real_statistics_of_another_set_or_count_are_refused(tmp_path):
    """real_stats.npz made from one --real (or --n_real) is not reused for another: FID would be against the
    wrong images."""
    other = tmp_path / 'other'
    other.mkdir()
    for name in sorted(os.listdir(STYLES))[:4]:
        shutil.copy(os.path.join(STYLES, name), other / name)
    stats = str(tmp_path / 'real_stats.npz')
    extractor = TinyFeatures(dim=4).eval()
    real_statistics(STYLES, 16, 6, stats, extractor, 8, 'cpu')
    real_statistics(STYLES, 16, 6, stats, extractor, 8, 'cpu')  # the same set: the cache is used
    for real, n_real in ((str(other), None), (STYLES, None), (STYLES, 5)):
        with pytest.raises(ValueError, match='holds the statistics of'):
            real_statistics(real, 16, n_real, stats, extractor, 8, 'cpu')


def test_evaluation_settings_change_when_the_checkpoint_is_rewritten(tmp_path):
    """A checkpoint overwritten in place by a later training run (same path, same size: same architecture) is
    another evaluation: its settings differ, so partial_results.json rows of the old one are not reused."""
    ckpt = tmp_path / 'blendgan.pt'
    ckpt.write_bytes(b'a' * 100)
    before = evaluation.evaluation_settings(str(ckpt), 16, {}, None, Protocol())
    ckpt.write_bytes(b'b' * 100)
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert evaluation.evaluation_settings(str(ckpt), 16, {}, None, Protocol()) != before


def test_references_are_drawn_uniformly():
    """Each reference image is equally likely in reference-guided rows."""
    picks = draw_references(3000, 2, 5, seed=0)  # [3000, 2]
    counts = np.bincount(picks.flatten().numpy(), minlength=5)
    assert np.abs(counts / counts.sum() - 0.2).max() < 0.02, counts


def test_a_truncated_row_feeds_the_truncation_centre_to_the_generator():
    """--truncation psi < 1: the generator gets psi and the centre evaluate.py computed."""
    seen = []

    class Recording(PatternGenerator):
        def forward(self, styles, z_embed=None, **kwargs):
            seen.append(kwargs)
            return super().forward(styles, z_embed)

    g = Recording()
    protocol = Protocol(n_samples=2, lpips_faces=1, n_styles=2, lpips_size=0, truncation=0.5)
    centre = torch.randn(1, 8)
    z_face, z_style = torch.randn(1, 8), torch.randn(1, 2, 8)

    class LPIPS:
        def features(self, face):
            return [face]

        def distance(self, a, b):
            return ((a[0] - b[0]) ** 2).mean((1, 2, 3))

    evaluation.evaluate_row(g, 0, z_face, z_style, protocol, np.zeros(3), np.eye(3), lambda x: x.mean((2, 3)),
                            LPIPS(), batch=2, truncation_latent=centre)
    assert seen and all(kw['truncation'] == 0.5 and kw['truncation_latent'] is centre for kw in seen)
