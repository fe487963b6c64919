"""The metrics of the paper (Sec. 4 "Evaluation metrics", Table 1): their math and their networks.

- FID (Heusel et al. 2017): Frechet distance of feature statistics, with the standard FID Inception-v3
  (pytorch-fid's ``pt_inception-2015-12-05`` weights, TensorFlow's network) as feature extractor.
- LPIPS style diversity as StarGAN v2: the mean LPIPS (v0.1, AlexNet) over all pairs of outputs of a face.
- Style consistency (beyond the paper): cosine similarity between the style code z_s that drove an
  output and the code E_style extracts from the output.

The protocol that evaluate.py runs with them (codes, rows, cache, Table 1) is evaluation.py. The loaders take
a weights file that exists; finding or downloading it is model_zoo.pretrained_file's job (the callers').
Nothing happens at import.
"""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, with_batchnorm_counters

INCEPTION_SIZE = 299  # the FID network's input side; every image is resized to it (bilinear, as pytorch-fid)
ALEXNET_CONVS = (0, 3, 6, 8, 10)  # indices in torchvision's alexnet().features of the 5 conv layers
LPIPS_VERSION = "0.1"


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


def load_inception(path):
    """InceptionFeatures (eval mode, CPU) with the FID weights file ``path`` (pt_inception-2015-12-05-6726825d.pth)."""
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


def load_lpips(path):
    """LPIPSFeatures (AlexNet, v0.1, eval mode, CPU).

    The linear layers come from the weights file inside the ``lpips`` package; the AlexNet backbone from
    ``path`` (torchvision's alexnet-owt-7be5be79.pth or any torchvision AlexNet state dict). The package is
    built with a random backbone (pnet_rand) so it never downloads by itself.
    """
    import lpips

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
