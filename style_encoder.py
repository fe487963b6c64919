"""The style encoder E_style (paper Sec. 3.1, A.1) and its SimCLR projection head.

E_style(x) = MLP(concat_l vec(Gram(VGG19_l(pool256(x))))), l in relu1_2, relu2_2, relu3_4, relu4_4,
relu5_4. The VGG-19 is frozen ImageNet VGG; only the MLP (and, in training, the projection head) learn.

Preprocessing is the release's and is used for training and inference alike: an RGB image in [-1, 1]
goes straight into VGG (no ImageNet mean/std), after AdaptiveAvgPool2d((256, 256)).
"""
import os
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from layers import EqualLinear
from op.precision import Conv2d

# torchvision's vgg19().features configuration ('E'): channel counts, 'M' = 2x2 max-pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
# Index in vgg19().features of the ReLU after which each Gram matrix is taken.
VGG19_TAPS = {"relu1_2": 3, "relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "relu5_4": 35}
# The feature extractor's output for VGG19_TAPS: the release's namedtuple, fields in tap order.
FeatureOutput = namedtuple("FeatureOutput", ["relu1", "relu2", "relu3", "relu4", "relu5"])
STYLE_POOL_SIZE = 256
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's VGG19_Weights.IMAGENET1K_V1 file name


def vgg19_features(last_index):
    """torchvision's vgg19().features[:last_index + 1] with the same module indices (so the same keys)."""
    layers, in_ch = [], 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
        if len(layers) > last_index:
            break
    return nn.Sequential(*layers[:last_index + 1])


def gram_dim(taps=VGG19_TAPS):
    """Length of the concatenated Gram embedding: sum of C^2 over the tapped layers (610,304 for VGG-19).

    Counted from VGG19_CFG (no layers built, so no random numbers drawn)."""
    channels, ch = [], 3  # output channels of each module of vgg19_features, by index
    for v in VGG19_CFG:
        ch = ch if v == "M" else v
        channels += [ch] if v == "M" else [ch, ch]  # max-pool | conv, relu
    return sum(channels[i] ** 2 for i in taps.values())


def imagenet_vgg19_state_dict(vgg_ckpt=None):
    """ImageNet VGG-19 weights as a ``features.N.*`` -> tensor dict.

    vgg_ckpt: a local torchvision-format file (full vgg19 state dict, or only its ``features.*``).
    Without it the torchvision weight enum is used: from the torch hub cache if the file is there,
    otherwise torchvision downloads it. Offline and uncached, the error says where to put the file.
    """
    from torchvision.models import VGG19_Weights

    from checkpoint import CheckpointError, load_checkpoint
    from model_zoo import COMMAND

    if vgg_ckpt is None:
        url = VGG19_Weights.IMAGENET1K_V1.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if os.path.isfile(cached):
            vgg_ckpt = cached
        else:
            try:
                return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
            except Exception as e:  # a CheckpointError: the trainers print it as one line
                raise CheckpointError(
                    f"could not get the ImageNet VGG-19 weights ({type(e).__name__}: {e}): {COMMAND} "
                    f"{os.path.basename(url)} puts them at {cached} (published at {url}), or pass the file's path "
                    f"as vgg_ckpt / --vgg_ckpt") from None
    return load_checkpoint(vgg_ckpt)


class VGGFeatureExtractor(nn.Module):
    """VGG-19 up to relu5_4; returns the tapped activations in layer order, for VGG19_TAPS as the release's
    ``FeatureOutput(relu1, ..., relu5)`` namedtuple (a tuple: iterating it gives the five), for other taps
    as a list. Keys ``vgg_layers.N.*`` as torchvision's."""

    def __init__(self, taps=VGG19_TAPS):
        super().__init__()
        self.taps = dict(taps)
        self.vgg_layers = vgg19_features(max(self.taps.values()))

    @property
    def layer_name_mapping(self):
        """Module index (str) -> output name, as the release's attribute: {'3': 'relu1', ...} for VGG19_TAPS."""
        if self.taps == VGG19_TAPS:
            return {str(i): name for i, name in zip(sorted(self.taps.values()), FeatureOutput._fields)}
        return {str(i): name for name, i in sorted(self.taps.items(), key=lambda tap: tap[1])}

    def load_vgg(self, vgg_state_dict):
        """Copy torchvision VGG-19 weights (``features.N.*`` or ``N.*`` keys) into the layers."""
        own = self.vgg_layers.state_dict()
        sd = {}
        for k, v in vgg_state_dict.items():
            k = k[len("features."):] if k.startswith("features.") else k
            if k in own:
                sd[k] = v
        missing = [k for k in own if k not in sd]
        if missing:
            raise RuntimeError(f"VGG-19 weights lack {len(missing)} keys of the feature extractor, e.g. {missing[:3]}")
        self.vgg_layers.load_state_dict(sd)

    def features(self, x):
        """The tapped activations [N, C_k, H_k, W_k] in layer order, in the memory format the layers give
        (channels_last inside a Generator): what the Gram matrices are computed from."""
        tap_at = set(self.taps.values())
        feats = []
        for i, layer in enumerate(self.vgg_layers):
            x = layer(x)
            if i in tap_at:
                # In-place ReLUs are safe here: each tap is followed by a max-pool (a new tensor).
                feats.append(x)
        return feats

    def forward(self, x):
        # Contiguous, as the release's: code written against it flattens them with .view.
        feats = [f.contiguous() for f in self.features(x)]
        return FeatureOutput(*feats) if self.taps == VGG19_TAPS else feats


def gram_matrix(feat):
    """[N, C, H, W] -> [N, C*C], G = F F^T / (C*H*W), computed in float32 (also under autocast)."""
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w).float()
    with torch.autocast(device_type=f.device.type, enabled=False):
        g = torch.bmm(f, f.transpose(1, 2)) / (c * h * w)
    return g.reshape(n, c * c)


class GramEmbedder(nn.Module):
    """pool256 -> VGG-19 -> Gram matrices of the taps, flattened and concatenated: [N, gram_dim]."""

    def __init__(self, taps=VGG19_TAPS, pool_size=STYLE_POOL_SIZE):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((pool_size, pool_size))  # the release's name
        self.feature_extractor = VGGFeatureExtractor(taps)
        self.out_dim = gram_dim(taps)

    def forward(self, x):
        # channels_last: oneDNN's VGG convolutions are faster in it (the Gram products do not care).
        feats = self.feature_extractor.features(self.avg_pool(x).contiguous(memory_format=torch.channels_last))
        return torch.cat([gram_matrix(f) for f in feats], dim=1)


def mlp(in_dim, dim, n_layers, lr_mul=1):
    """n_layers EqualLinear: all but the last with fused leaky ReLU."""
    layers = [EqualLinear(in_dim if i == 0 else dim, dim, lr_mul=lr_mul,
                          activation="fused_lrelu" if i < n_layers - 1 else None)
              for i in range(n_layers)]
    return nn.Sequential(*layers)


class StyleEncoder(nn.Module):
    """E_style: image [N, 3, H, W] in [-1, 1] -> style code z_s [N, style_dim].

    load_pretrained_vgg: load ImageNet VGG-19 weights (vgg_ckpt: a local file instead of torchvision's
    cache/download). False leaves VGG random: right when a checkpoint supplies the weights (the
    release's generator stores them under ``embedder.embedder.feature_extractor``).
    """

    def __init__(self, style_dim=512, n_mlp=4, load_pretrained_vgg=True, vgg_ckpt=None,
                 pool_size=STYLE_POOL_SIZE):
        super().__init__()
        self.style_dim = style_dim
        self.embedder = GramEmbedder(pool_size=pool_size)
        self.embedder_mlp = mlp(self.embedder.out_dim, style_dim, n_mlp)
        if load_pretrained_vgg:
            self.load_vgg(imagenet_vgg19_state_dict(vgg_ckpt))

    def load_vgg(self, vgg_state_dict):
        """Copy torchvision VGG-19 weights (``features.N.*`` or ``N.*`` keys) into the frozen extractor."""
        self.embedder.feature_extractor.load_vgg(vgg_state_dict)

    def forward(self, image):
        gram = self.embedder(image)  # [N, gram_dim], float32 whatever the network's dtype
        return self.embedder_mlp(gram.to(self.embedder_mlp[0].weight.dtype))  # [N, style_dim]


class Projector(nn.Module):
    """SimCLR projection head g(.) on z_s (paper Sec. 3.1): n_mlp EqualLinear, fused lrelu but the last.

    The paper describes 2 layers; the release's class defaults to 4. Keys ``projector.N.*``.
    """

    def __init__(self, style_dim=512, n_mlp=4):
        super().__init__()
        self.projector = mlp(style_dim, style_dim, n_mlp)

    def forward(self, z):
        return self.projector(z)


def nt_xent(h1, h2, temperature):
    """SimCLR's NT-Xent (paper Eq. 2) over 2N projections; positives are (h1[k], h2[k]).

    h1, h2: [N, D]. Cosine similarity / temperature, each sample's own entry masked out, mean over all
    2N anchors of -log softmax at the positive.
    """
    n = h1.shape[0]
    h = F.normalize(torch.cat([h1, h2], dim=0).float(), dim=1)  # [2N, D]
    sim = h @ h.t() / temperature  # [2N, 2N]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=h.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(h.device)
    return F.cross_entropy(sim, target)
