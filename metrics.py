"""Evaluation metrics of the paper (Sec. 4 "Evaluation metrics", Table 1) and the protocol that evaluate.py runs.

- FID (Heusel et al. 2017) between generated stylized faces and the real artistic set (AAHQ), with the
  standard FID Inception-v3 (pytorch-fid's ``pt_inception-2015-12-05`` weights, TensorFlow's network).
- LPIPS style diversity as StarGAN v2: per face code, n_styles style codes (latent-guided: random;
  reference-guided: reference images) -> n_styles outputs; the mean LPIPS (v0.1, AlexNet) over all
  pairs; averaged over the face codes.
- Style consistency (beyond the paper): cosine similarity between the style code z_s that drove an
  output and the code E_style extracts from the output.

Weights files are found in this order: the path given, the torch hub cache, then a download by the library
only when downloads are allowed and the host answers. Otherwise the error says which file to put where.
Nothing happens at import.
"""
import csv
import functools
import io
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from imageio_utils import UnreadableImageError, list_images, read_image_rgb
from inference import atomic_write_bytes, encode_styles

# pytorch-fid's FID_WEIGHTS_URL: TensorFlow's 2015-12-05 Inception graph ported to PyTorch.
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299  # the FID network's input side; every image is resized to it (bilinear, as pytorch-fid)
# torchvision's AlexNet_Weights.IMAGENET1K_V1: the LPIPS backbone (lpips ships only its linear layers).
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_CONVS = (0, 3, 6, 8, 10)  # indices in torchvision's alexnet().features of the 5 conv layers
LPIPS_VERSION = "0.1"
MODES = ("latent", "reference")
METRICS = ("fid", "lpips", "style_consistency")


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights files


def hub_cache_path(url):
    """Where torch.hub (and torchvision / pytorch-fid) keep the file of ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def host_reachable(url, timeout=3.0):
    """True when a TCP connection to the host of ``url`` opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_file(what, url, path=None, flag=None, allow_download=True):
    """Local path of a pretrained weights file: ``path``, else the torch hub cache, else a download.

    The download happens only when allowed and the host answers, and is announced on stderr; any other
    case raises a CheckpointError saying which file to put where.
    """
    name = os.path.basename(urlparse(url).path)
    if path is not None:
        if not os.path.isfile(path):
            raise CheckpointError(f"{what} weights {path}: file not found; put file {name} (from {url}) at {path}")
        return path
    cached = hub_cache_path(url)
    if os.path.isfile(cached):
        return cached
    how = f"put file {name} at {cached} (it is published at {url})" + (f", or pass its path with {flag}" if flag else "")
    if not allow_download:
        raise CheckpointError(f"{what} weights not found and downloads are off: {how}")
    if not host_reachable(url):
        raise CheckpointError(f"{what} weights not found and {urlparse(url).hostname} cannot be reached "
                              f"(offline?): {how}")
    print(f"downloading {what} weights {url} -> {cached}", file=sys.stderr)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=True)  # writes a temporary file, then renames
    except Exception as e:
        raise CheckpointError(f"{what} weights: download failed ({type(e).__name__}: {e}); {how}") from None
    return cached


# ----------------------------------------------------------------------------------------------------------
# Frechet distance


def trace_sqrt_product(sigma1, sigma2):
    """Tr sqrt(sigma1 sigma2) for covariance matrices (the cross term of the Frechet distance), in float64.

    sigma1 sigma2 has the eigenvalues of a symmetric PSD matrix M, so the trace of its principal square
    root is sum_k sqrt(lambda_k(M)), found without eigenvectors: with a = L L^T (Cholesky of whichever of
    the two is positive definite; Tr sqrt(ab) = Tr sqrt(ba)), M = L^T b L. When neither is (sets smaller
    than the feature size), sigma1 = V W V^T gives M = W^1/2 V^T sigma2 V W^1/2. No complex round-off and
    no failure on singular covariances, unlike scipy.linalg.sqrtm, which pytorch-fid retries with an offset.
    """
    s1 = torch.as_tensor(np.asarray(sigma1), dtype=torch.float64)
    s2 = torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    for a, b in ((s1, s2), (s2, s1)):
        chol, info = torch.linalg.cholesky_ex(a)
        if info.item() == 0:
            m = chol.T @ b @ chol
            break
    else:
        w, v = torch.linalg.eigh(s1)
        r = w.clamp(min=0).sqrt()
        m = r[:, None] * (v.T @ s2 @ v) * r[None, :]
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(w.clamp(min=0).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2) (Heusel et al. 2017), in float64."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64 on the features' device."""

    def __init__(self):
        self.n = 0
        self.sum = None  # [D]
        self.sum_outer = None  # [D, D]

    def update(self, feats):
        """feats: [N, D]."""
        f = feats.detach().to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.sum_outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        self.n += f.shape[0]

    def mean_cov(self):
        """(mu [D], sigma [D, D]) as float64 numpy; sigma is the unbiased covariance (as numpy.cov)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def save_stats(path, mu, sigma, n, source):
    """FID statistics as .npz (keys mu, sigma as pytorch-fid's --save-stats, plus n and source), atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=np.int64(n), source=np.str_(source))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path):
    """(mu, sigma, n, source) of a stats .npz; n = -1 and source = '' for files from other tools."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: no 'mu'/'sigma' arrays (has {sorted(f.keys())})")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f else -1
            source = str(f["source"]) if "source" in f else ""
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"FID statistics {path}: not readable ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not fit")
    return mu, sigma, n, source


# ----------------------------------------------------------------------------------------------------------
# Feature extractors. Interface: ``input_size`` (int) and forward(x [N, 3, H, W] in [0, 1]) -> [N, D].


def fid_inception_v3():
    """TensorFlow's FID Inception-v3 (1008 classes, pytorch-fid's patched blocks), without weights."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class InceptionFeatures(nn.Module):
    """The 2048-D pool3 features of the FID Inception-v3, as pytorch-fid's InceptionV3([3]).

    x [N, 3, H, W] in [0, 1] -> bilinear resize to 299 (align_corners=False, no antialiasing) -> 2x - 1 ->
    the network up to the final average pool -> [N, 2048].
    """

    input_size = INCEPTION_SIZE

    def __init__(self, net):
        super().__init__()
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)  # [N, 2048]


def with_batchnorm_counters(module, state_dict):
    """state_dict with BatchNorm ``num_batches_tracked`` entries made to fit ``module`` (unused in eval)."""
    own = {k for k in module.state_dict() if k.endswith("num_batches_tracked")}
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked") or k in own}
    for k in own - set(sd):
        sd[k] = torch.tensor(0, dtype=torch.long)
    return sd


def load_inception(path=None, allow_download=True):
    """InceptionFeatures (eval mode, CPU) with the FID weights of ``path`` / the hub cache / a download."""
    path = pretrained_file("FID Inception-v3", INCEPTION_URL, path, "--inception", allow_download)
    with torch.device("meta"):
        net = fid_inception_v3()
    sd = with_batchnorm_counters(net, load_checkpoint(path))
    load_state_dict_strict(net, sd, path, assign=True)
    features = InceptionFeatures(net).eval()
    features.weights_file = os.path.abspath(path)
    return features


class LPIPSFeatures(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) over the ``lpips`` package's network, features computed once per image.

    d(x0, x1) = sum_l mean_hw( w_l . (f_l(x0) - f_l(x1))^2 ), f_l the channel-normalised AlexNet
    activations of ScalingLayer(x), w_l the package's calibrated 1x1 linear layers. ``pairwise`` gives
    the same numbers as ``lpips.LPIPS(x0, x1)`` for every pair without running the backbone per pair.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model  # lpips.LPIPS

    def features(self, x):
        """x [N, 3, H, W] in [-1, 1] -> list of unit-normalised feature maps [N, C_l, H_l, W_l]."""
        import lpips

        outs = self.model.net(self.model.scaling_layer(x))
        return [lpips.normalize_tensor(o) for o in outs]

    def distance(self, feats0, feats1):
        """[N] distances between the images behind two feature lists of equal batch size."""
        total = 0
        for lin, f0, f1 in zip(self.model.lins, feats0, feats1):
            total = total + lin((f0 - f1) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, x0, x1):
        return self.distance(self.features(x0), self.features(x1))


def load_lpips(alexnet_path=None, allow_download=True):
    """LPIPSFeatures (AlexNet, v0.1, eval mode, CPU).

    The linear layers come from the weights file inside the ``lpips`` package; the AlexNet backbone from
    ``alexnet_path`` (torchvision's alexnet-owt-7be5be79.pth or any torchvision AlexNet state dict), the
    torch hub cache, or torchvision's URL. The package is built with a random backbone (pnet_rand) so it
    never downloads by itself.
    """
    import lpips

    path = pretrained_file("LPIPS AlexNet backbone", ALEXNET_URL, alexnet_path, "--lpips_alexnet", allow_download)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version=LPIPS_VERSION, pretrained=False, pnet_rand=True, verbose=False)
    backbone = load_checkpoint(path)
    backbone = {k[len("features."):] if k.startswith("features.") else k: v for k, v in backbone.items()}
    for slice_index, conv in enumerate(ALEXNET_CONVS, start=1):
        layer = getattr(model.net, f"slice{slice_index}")
        load_state_dict_strict(getattr(layer, str(conv)),
                               {p: require_tensor(backbone, f"{conv}.{p}", path) for p in ("weight", "bias")},
                               f"{path} (AlexNet features.{conv})")
    lin_path = os.path.join(os.path.dirname(os.path.abspath(lpips.__file__)), "weights", f"v{LPIPS_VERSION}",
                            "alex.pth")
    lins = load_checkpoint(lin_path, hint="the lpips package is incomplete; reinstall it (pip install lpips)")
    for k, lin in enumerate(model.lins):
        load_state_dict_strict(lin, {"model.1.weight": require_tensor(lins, f"lin{k}.model.1.weight", lin_path)},
                               f"{lin_path} (lin{k})")
    features = LPIPSFeatures(model.eval())
    features.weights_file = os.path.abspath(path)
    return features


def require_tensor(state_dict, key, path):
    if key not in state_dict:
        raise CheckpointError(f"{path}: no '{key}' entry; is it a torchvision AlexNet / lpips weights file?")
    return state_dict[key]


@torch.no_grad()
def lpips_diversity(lpips_model, images):
    """Mean LPIPS over all pairs of outputs of each face (StarGAN v2's diversity score).

    images: [F, S, 3, H, W] in [-1, 1], the S outputs of each of F face codes. Returns [F].
    """
    n_faces, n_styles = images.shape[:2]
    i, j = torch.triu_indices(n_styles, n_styles, offset=1, device=images.device)  # the S(S-1)/2 pairs
    out = []
    for face in images:
        feats = lpips_model.features(face)  # list of [S, C, H, W]
        out.append(lpips_model.distance([f[i] for f in feats], [f[j] for f in feats]).mean())
    return torch.stack(out)


@torch.no_grad()
def style_consistency(g, images, z_style):
    """cos(z_s, E_style(output)) per image: images [N, 3, H, W] in [-1, 1], z_style [N, style_dim] -> [N]."""
    p = next(g.embedder.parameters())
    z_out = g.get_z_embed(images.to(device=p.device, dtype=p.dtype))
    return F.cosine_similarity(z_out.float(), z_style.to(z_out.device).float(), dim=1)


# ----------------------------------------------------------------------------------------------------------
# Image sets: an LMDB of prepare_data.py or a folder


def is_lmdb(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb"))


class ImageSet(Dataset):
    """RGB images of an LMDB (prepare_data.py layout, one ``resolution``) or of a folder (recursive).

    Items are (uint8 [H, W, 3] or None, None or the reason it could not be read).
    """

    def __init__(self, path, resolution=None):
        self.path = path
        self.lmdb = None
        self.files = None
        if is_lmdb(path):
            from dataset import MultiResolutionDataset

            if resolution is None:
                raise ValueError(f"{path} is an LMDB: say which of its resolutions to read")
            self.lmdb = MultiResolutionDataset(path, None, resolution)
        elif os.path.isdir(path) or os.path.isfile(path):
            self.files = list_images(path)
        else:
            raise FileNotFoundError(f"no such LMDB, folder or image: {path}")
        if len(self) == 0:
            raise ValueError(f"{path}: no images found")

    def __len__(self):
        return len(self.lmdb) if self.lmdb is not None else len(self.files)

    def name(self, index):
        return self.files[index] if self.files is not None else f"{self.path}[{index}]"

    def read(self, index):
        """uint8 RGB [H, W, 3]; raises UnreadableImageError naming the image."""
        if self.files is not None:
            return np.array(read_image_rgb(self.files[index]))
        try:
            return np.array(self.lmdb.read_image(index))
        except (OSError, ValueError, SyntaxError, KeyError) as e:
            raise UnreadableImageError(f"{self.name(index)}: cannot decode image ({e})") from None

    def __getitem__(self, index):
        try:
            return self.read(index), None
        except UnreadableImageError as e:
            return None, str(e)


def collate_rgb(items):
    """(list of uint8 [H, W, 3], list of errors)."""
    return [img for img, err in items if err is None], [err for _, err in items if err is not None]


def collate_resized(items, size):
    """([B, 3, size, size] in [0, 1] or None, list of errors): each image resized as the FID network does.

    Resizing a single image is the same as resizing it in a batch, and a 299 -> 299 bilinear resize is the
    identity, so images of any size give the features pytorch-fid would give them one by one.
    """
    images, errors = collate_rgb(items)
    xs = [F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                        mode="bilinear", align_corners=False) for img in images]
    return (torch.cat(xs) if xs else None), errors


@torch.no_grad()
def dataset_statistics(images, extractor, batch, device, workers=0, desc="real images"):
    """FID statistics (mu, sigma, n, skipped) of an ImageSet (or a Subset of one); unreadable images skipped."""
    loader = DataLoader(images, batch_size=batch, num_workers=workers,
                        collate_fn=functools.partial(collate_resized, size=extractor.input_size))
    stats, skipped = FeatureStats(), []
    for x, errors in tqdm(loader, desc=desc, unit="batch"):
        for err in errors:
            print(f"skipped {err}", file=sys.stderr)
        skipped += errors
        if x is not None:
            stats.update(extractor(x.to(device)))
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n, skipped


def real_statistics(real, resolution, n_real, stats_path, extractor, batch, device, workers=0):
    """FID statistics of the real artistic set, from the cache file ``stats_path`` or computed and cached.

    real: LMDB/folder (None: the cache must exist). n_real: first n images (None: all).
    Returns (mu, sigma, identity) where identity describes the set (it is part of the evaluation settings).
    """
    source = None
    if real is not None:
        source = f"{os.path.abspath(real)}" + (f"@{resolution}" if is_lmdb(real) else "")
        source += f"[:{n_real}]" if n_real else ""
    if stats_path and os.path.isfile(stats_path):
        mu, sigma, n, cached_source = load_stats(stats_path)
        if source is not None and cached_source and cached_source != source:
            raise ValueError(f"{stats_path} holds the statistics of {cached_source}, not of {source}; delete it "
                             f"or pass another --real_stats")
        print(f"FID statistics of the real set: {stats_path} ({n if n >= 0 else 'unknown number of'} images)")
        return mu, sigma, {"real": cached_source or os.path.abspath(stats_path), "n_real": n}
    if real is None:
        raise ValueError(f"no real set: pass --real (an LMDB or folder of artistic faces) or an existing --real_stats "
                         f"file ({stats_path} does not exist)")
    images = ImageSet(real, resolution)
    if n_real:
        if n_real > len(images):
            raise ValueError(f"--n_real {n_real}: {real} has only {len(images)} images")
        images = Subset(images, range(n_real))
    mu, sigma, n, skipped = dataset_statistics(images, extractor, batch, device, workers)
    if stats_path:
        save_stats(stats_path, mu, sigma, n, source)
    print(f"FID statistics of {n} real images" + (f" ({len(skipped)} unreadable, skipped)" if skipped else "")
          + (f" cached in {stats_path}" if stats_path else ""))
    return mu, sigma, {"real": source, "n_real": n}


# ----------------------------------------------------------------------------------------------------------
# The Table 1 protocol


@dataclass
class Protocol:
    """What one evaluation row computes (see evaluate.py --help)."""

    n_samples: int = 50000  # generated images for FID (the first ones, face-major)
    lpips_faces: int = 1000  # face codes for LPIPS diversity and style consistency
    n_styles: int = 10  # style codes / references per face code
    lpips_size: int = 256  # side the outputs are resized to for LPIPS (0: as generated)
    truncation: float = 1.0
    theta: float = None
    seed: int = 0

    def n_faces(self):
        return max(math.ceil(self.n_samples / self.n_styles), self.lpips_faces)


def draw_codes(n_faces, n_styles, dim, seed):
    """Face codes z_f [F, dim] and random style codes z_s [F, S, dim], drawn on the CPU.

    One draw per face from two generators (seeds 2 seed and 2 seed + 1): face k gets the same codes
    whatever the batch size, the number of faces, or the rows computed before.
    """
    face_rng = torch.Generator().manual_seed(2 * seed)
    style_rng = torch.Generator().manual_seed(2 * seed + 1)
    z_face = torch.stack([torch.randn(dim, generator=face_rng) for _ in range(n_faces)])
    z_style = torch.stack([torch.randn(n_styles, dim, generator=style_rng) for _ in range(n_faces)])
    return z_face, z_style


def draw_references(n_faces, n_styles, n_refs, seed):
    """[F, S] indices of distinct references per face (seed 2 seed + 1, one draw per face)."""
    if n_refs < n_styles:
        raise ValueError(f"reference-guided rows need at least --n_styles {n_styles} reference images, "
                         f"the set has {n_refs}")
    rng = torch.Generator().manual_seed(2 * seed + 1)
    weights = torch.ones(n_refs)
    return torch.stack([torch.multinomial(weights, n_styles, replacement=False, generator=rng)
                        for _ in range(n_faces)])


@torch.no_grad()
def reference_codes(g, refs, picks, batch, device, dtype, workers=0):
    """Style codes [F, S, style_dim] (CPU, float32) of the picked references; each image encoded once."""
    unique, inverse = torch.unique(picks, return_inverse=True)
    loader = DataLoader(Subset(refs, unique.tolist()), batch_size=batch, num_workers=workers,
                        collate_fn=collate_rgb)
    codes = []
    for images, errors in tqdm(loader, desc="reference style codes", unit="batch"):
        if errors:
            raise UnreadableImageError(f"{errors[0]}: remove it from the reference set")
        codes.append(encode_styles(g, images, batch, device, dtype).float().cpu())
    return torch.cat(codes)[inverse]  # [F, S, style_dim]


def quantize(images):
    """Generator output [N, 3, H, W] in [-1, 1] -> the 8-bit values the inference scripts save (float 0..255).

    The release's conversion (utils.ten2img): (x * 0.5 + 0.5) * 255, clamped, truncated.
    """
    return ((images.float() * 0.5 + 0.5) * 255).clamp(0, 255).floor()


@torch.no_grad()
def evaluate_row(g, indicator, z_face, z_style, protocol, real_mu, real_sigma, extractor, lpips_model,
                 batch, truncation_latent=None, desc=None):
    """One Table 1 row: FID, LPIPS diversity and style consistency of G(z_f, z_s, i) at indicator i.

    z_face [F, D] and z_style [F, S, D] (CPU): the codes of the faces in order; face k's S outputs are
    images k*S ... k*S + S - 1. FID takes the first n_samples images against (real_mu, real_sigma);
    LPIPS and style consistency the first lpips_faces faces. Metrics see the outputs as the inference
    scripts save them (8-bit). Returns a dict of floats (NaN for a metric with no samples).
    """
    p = next(g.parameters())
    device, dtype = p.device, p.dtype
    n_faces, n_styles, dim = z_style.shape
    faces_per_step = max(1, batch // n_styles)
    kw = dict(truncation=protocol.truncation, truncation_latent=truncation_latent, randomize_noise=False,
              add_weight_index=indicator, theta=protocol.theta)
    fid_stats, lpips_sum, cos_sum, cos_n = FeatureStats(), 0.0, 0.0, 0
    for start in tqdm(range(0, n_faces, faces_per_step), desc=desc, unit="step"):
        stop = min(start + faces_per_step, n_faces)
        zf = z_face[start:stop].repeat_interleave(n_styles, 0).to(device=device, dtype=dtype)  # [F*S, D]
        zs = z_style[start:stop].reshape(-1, dim).to(device=device, dtype=dtype)  # [F*S, D]
        q = quantize(g([zf], z_embed=zs, **kw)[0])  # [F*S, 3, H, W], 0..255
        n_fid = min(len(q), protocol.n_samples - start * n_styles)
        if n_fid > 0:
            fid_stats.update(extractor(q[:n_fid] / 255))
        n_div = min(stop, protocol.lpips_faces) - start
        if n_div > 0:
            x = (q[:n_div * n_styles] / 255 - 0.5) / 0.5  # [-1, 1], as utils.img2ten reads a saved image
            cos = style_consistency(g, x, zs[:n_div * n_styles])
            cos_sum += cos.double().sum().item()
            cos_n += len(cos)
            if protocol.lpips_size and protocol.lpips_size != x.shape[-1]:
                x = F.interpolate(x, size=(protocol.lpips_size, protocol.lpips_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            lpips_sum += lpips_diversity(lpips_model, x.view(n_div, n_styles, *x.shape[1:])).double().sum().item()
    fid = float("nan")
    if fid_stats.n >= 2:
        mu, sigma = fid_stats.mean_cov()
        fid = frechet_distance(mu, sigma, real_mu, real_sigma)
    n_div_faces = min(n_faces, protocol.lpips_faces)
    return {"fid": fid, "lpips": lpips_sum / n_div_faces if n_div_faces else float("nan"),
            "style_consistency": cos_sum / cos_n if cos_n else float("nan"),
            "n_fid": fid_stats.n, "lpips_faces": n_div_faces}


def parse_indicators(text):
    """'0,2,4' or '0,2,...,18' (an arithmetic progression, step from the first two) -> list of ints."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for k, t in enumerate(tokens):
        if t == "...":
            if len(out) < 2 or k + 1 >= len(tokens):
                raise ValueError(f"'...' in '{text}' needs two values before it and one after")
            step, end = out[-1] - out[-2], int(tokens[k + 1])
            if step <= 0 or (end - out[-1]) % step:
                raise ValueError(f"'{text}': {end} is not reached from {out[-2]},{out[-1]} in steps of {step}")
            out += list(range(out[-1] + step, end, step))
        else:
            out.append(int(t))
    if len(set(out)) != len(out):
        raise ValueError(f"'{text}': an indicator is repeated")
    return out


def row_key(mode, indicator):
    return f"{mode}/{indicator}"


def fmt(value, digits):
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def write_tables(rows, modes, indicators, outdir):
    """table1.csv (one line per mode and indicator) and table1.md (Table 1 layout), atomically."""
    buf = io.StringIO()
    fields = ["mode", "indicator", *METRICS, "n_fid", "lpips_faces"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for mode in modes:
        for i in indicators:
            row = rows.get(row_key(mode, i))
            if row is not None:
                writer.writerow({"mode": mode, "indicator": i, **{k: row[k] for k in fields[2:]}})
    atomic_write_bytes(os.path.join(outdir, "table1.csv"), buf.getvalue().encode())

    names = {"latent": "latent-guided", "reference": "reference-guided"}
    head = ["i"] + [f"{names[m]} {h}" for m in modes for h in ("FID ↓", "LPIPS ↑", "style cos ↑")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in indicators:
        cells = [str(i)]
        for mode in modes:
            row = rows.get(row_key(mode, i), {})
            cells += [fmt(row.get("fid"), 2), fmt(row.get("lpips"), 4), fmt(row.get("style_consistency"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(os.path.join(outdir, "table1.md"), text.encode())
    return text


class PartialResults:
    """Finished rows kept in OUTDIR/partial_results.json (rewritten atomically after each row).

    The file records the settings that determine the numbers; a rerun with other settings is refused
    rather than mixing rows of different evaluations.
    """

    def __init__(self, outdir, settings):
        self.path = os.path.join(outdir, "partial_results.json")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.rows = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                data = json.load(f)
            if data.get("settings") != self.settings:
                old = data.get("settings", {})
                diff = [f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in sorted(set(old) | set(self.settings))
                        if old.get(k) != self.settings.get(k)]
                raise ValueError(f"{self.path} holds rows of an evaluation with other settings ({'; '.join(diff)}); "
                                 f"use another --outdir or delete the file")
            self.rows = data.get("rows", {})

    def add(self, key, row):
        self.rows[key] = row
        data = json.dumps({"settings": self.settings, "rows": self.rows}, indent=1, allow_nan=True)
        atomic_write_bytes(self.path, data.encode())


def run_protocol(g, modes, indicators, protocol, real_mu, real_sigma, extractor, lpips_model, outdir, settings,
                 batch, refs=None, truncation_latent=None, workers=0):
    """Every (mode, indicator) row not already in OUTDIR/partial_results.json; writes the tables after each row.

    Rows are computed whole, in batches that depend only on ``batch`` and the face index (not on which rows
    ran before), so rerun and resume with the same ``batch`` reproduce the numbers bit for bit (evaluate.py).

    refs: ImageSet of reference images (reference-guided rows). Returns the Markdown table.
    """
    os.makedirs(outdir, exist_ok=True)
    partial = PartialResults(outdir, settings)
    todo = [(m, i) for m in modes for i in indicators if row_key(m, i) not in partial.rows]
    for m, i in [(m, i) for m in modes for i in indicators if (m, i) not in todo]:
        print(f"{m}-guided i={i}: kept from {partial.path}")
    if todo:
        n_faces = protocol.n_faces()
        z_face, z_style = draw_codes(n_faces, protocol.n_styles, g.style_dim, protocol.seed)
        p = next(g.parameters())
        for mode in modes:
            if not any(m == mode for m, _ in todo):
                continue
            codes = z_style
            if mode == "reference":
                picks = draw_references(n_faces, protocol.n_styles, len(refs), protocol.seed)
                codes = reference_codes(g, refs, picks, batch, p.device, p.dtype, workers)
            for m, i in todo:
                if m != mode:
                    continue
                t0 = time.time()
                row = evaluate_row(g, i, z_face, codes, protocol, real_mu, real_sigma, extractor, lpips_model,
                                   batch, truncation_latent, desc=f"{mode}-guided i={i}")
                row["seconds"] = round(time.time() - t0, 1)
                partial.add(row_key(mode, i), row)
                write_tables(partial.rows, modes, indicators, outdir)
                print(f"{mode}-guided i={i}: FID {fmt(row['fid'], 2)}, LPIPS {fmt(row['lpips'], 4)}, "
                      f"style cos {fmt(row['style_consistency'], 4)}")
    return write_tables(partial.rows, modes, indicators, outdir)


def evaluation_settings(ckpt, size, real_identity, refs_identity, protocol, **extra):
    """What determines the numbers of a row (stored with the partial results): the checkpoint file, the real
    set, the references, the protocol and ``extra`` (dtype, metric weights files)."""
    st = os.stat(ckpt)
    return {"ckpt": os.path.abspath(ckpt), "ckpt_bytes": st.st_size, "ckpt_mtime_ns": st.st_mtime_ns, "size": size,
            **real_identity, "refs": refs_identity, **asdict(protocol), **extra}
