"""PSPEncoder: face image -> W+ code for the generator, compatible with the released psp_encoder.pt.

Layout of the file (shared/reference/official_checkpoint_format.md, section 1): a dict whose weights
are either inside ``'state_dict'`` or at the top level; keys starting with ``encoder`` lose their
``encoder.`` prefix and are loaded strictly into GradualStyleEncoder(50, 'ir_se', n_styles); other
keys (``decoder.*``, ``opts``, ...) are ignored. ``latent_avg`` is required and always read from the
top-level dict; it is added to the encoder output ([512] and [n_styles, 512] both broadcast).
"""
import math

import torch
from torch import nn

from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from model import EqualLinear
from psp_encoder.encoders import STYLE_DIM, GradualStyleBlock, GradualStyleEncoder

# the release's names in this module; EqualLinear and GradualStyleBlock are re-exported for code written against it
__all__ = ["PSPEncoder", "GradualStyleEncoder", "GradualStyleBlock", "EqualLinear", "get_keys"]

ENCODER_INPUT_SIZE = (256, 256)  # every face is pooled to this size before the encoder
ENCODER_PREFIX = "encoder"
WEIGHTS_WRAPPER = "state_dict"
LATENT_AVG = "latent_avg"


def n_styles_for(output_size):
    """Number of W+ entries of a generator of this output size: 2*log2(size) - 2 (18 at 1024 px)."""
    log_size = int(math.log2(output_size)) if output_size > 0 else 0
    if output_size <= 0 or 2 ** log_size != output_size:
        raise ValueError(f"PSPEncoder: output_size must be a power of two, got {output_size}")
    return 2 * log_size - 2


def output_size_for(n_styles):
    """Inverse of n_styles_for, or None if no output size has that many W+ entries."""
    if n_styles < 2 or n_styles % 2:
        return None
    return 2 ** ((n_styles + 2) // 2)


def get_keys(ckpt, name):
    """The weights of checkpoint dict ``ckpt`` (inside 'state_dict' when it has one) whose keys start
    with ``name``, without that prefix and the '.' after it: the release's rule, which compares the first
    len(name) characters."""
    weights = ckpt[WEIGHTS_WRAPPER] if WEIGHTS_WRAPPER in ckpt else ckpt
    return {k[len(name) + 1:]: v for k, v in weights.items() if isinstance(k, str) and k[:len(name)] == name}


def read_psp_checkpoint(path, n_styles):
    """Read a pSp checkpoint; return (encoder state dict without the prefix, latent_avg).

    Raises CheckpointError (one line naming the file) for an unreadable file, a file without encoder
    weights or latent_avg, a latent_avg that does not broadcast to [n_styles, 512], and a file made
    for another output size (it says which).
    """
    # Not memory-mapped: every tensor gets its own memory and becomes the parameter itself (assign),
    # so converting one (dtype, channels_last) frees its original; the 1 GB file is never held twice.
    ckpt = load_checkpoint(path, map_location="cpu", mmap=False)
    weights = ckpt[WEIGHTS_WRAPPER] if WEIGHTS_WRAPPER in ckpt else ckpt
    where = f"checkpoint {path}" + (f" ['{WEIGHTS_WRAPPER}']" if weights is not ckpt else "")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: expected a dict of weights, found {type(weights).__name__}")
    state_dict = get_keys(ckpt, ENCODER_PREFIX)
    if not state_dict:
        have = ", ".join(sorted(map(str, weights.keys()))[:8]) or "nothing"
        raise CheckpointError(f"{where}: no '{ENCODER_PREFIX}.*' weights, not a pSp encoder checkpoint "
                              f"(it has: {have})")

    head_indices = {int(k.split(".")[1]) for k in state_dict
                    if k.startswith("styles.") and k.split(".")[1].isdigit()}
    file_styles = len(head_indices)
    if file_styles != n_styles:
        file_size = output_size_for(file_styles)
        for_size = f"output size {file_size}" if file_size else "no valid output size"
        raise CheckpointError(
            f"checkpoint {path}: has {file_styles} style heads, i.e. it is a pSp encoder for {for_size}, "
            f"not for output size {output_size_for(n_styles)} ({n_styles} heads); use the matching --size "
            f"or a checkpoint made for this one")

    if LATENT_AVG not in ckpt:
        inside = " (there is one inside 'state_dict', but the release reads it from the top level)" \
            if isinstance(weights, dict) and weights is not ckpt and LATENT_AVG in weights else ""
        raise CheckpointError(f"checkpoint {path}: has no top-level '{LATENT_AVG}' entry, which the pSp "
                              f"encoder requires{inside}")
    latent_avg = ckpt[LATENT_AVG]
    if not isinstance(latent_avg, torch.Tensor) or not _broadcasts(latent_avg.shape, n_styles):
        shape = list(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else type(latent_avg).__name__
        raise CheckpointError(f"checkpoint {path}: '{LATENT_AVG}' is {shape}, expected a tensor that "
                              f"broadcasts to [N, {n_styles}, {STYLE_DIM}] (e.g. [{STYLE_DIM}] or "
                              f"[{n_styles}, {STYLE_DIM}])")
    # The parameters are these tensors (assign): float32 as the module would have them (the release's
    # file is float32 already; a half-precision export is widened here).
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return state_dict, latent_avg.detach().clone()


def _broadcasts(shape, n_styles):
    """True if codes [N, n_styles, 512] + a tensor of this shape keeps the shape [N, n_styles, 512]."""
    if len(shape) > 3:
        return False
    padded = (1,) * (3 - len(shape)) + tuple(shape)
    return padded[0] == 1 and padded[1] in (1, n_styles) and padded[2] == STYLE_DIM


class PSPEncoder(nn.Module):
    """Face image [N, 3, H, W] (RGB, [-1, 1]) -> W+ code [N, n_styles, 512] for input_is_latent=True.

    encoder_ckpt_path: a released (or compatible) psp_encoder.pt, or None for a randomly initialised encoder
        with latent_avg = 0 (tests, training).
    output_size: the generator's output size; n_styles = 2*log2(output_size) - 2 must match the file.
    device: optional convenience, same as calling ``.to(device)`` after construction.

    The constructor puts the module in eval mode once (BatchNorm uses running statistics, as at
    inference in the release); call ``.train()`` to train it. forward never changes mode or device.
    latent_avg is a non-persistent buffer: it follows ``.to()`` but is not part of ``state_dict()``, so
    the state dict keys are exactly those of the released file (``encoder.*``).
    """

    def __init__(self, encoder_ckpt_path=None, output_size=1024, device=None):
        super().__init__()
        n_styles = n_styles_for(output_size)
        state_dict = latent_avg = None
        if encoder_ckpt_path is not None:
            # Read and validate the file before building ~270M parameters.
            state_dict, latent_avg = read_psp_checkpoint(encoder_ckpt_path, n_styles)
        self.output_size = output_size
        self.n_styles = n_styles
        self.face_pool = nn.AdaptiveAvgPool2d(ENCODER_INPUT_SIZE)
        if state_dict is None:
            self.encoder = GradualStyleEncoder(50, "ir_se", n_styles)
        else:
            # The file's tensors become the parameters (assign): no random initialisation (seconds for
            # ~270M parameters) and no second copy of the weights.
            with torch.device("meta"):
                self.encoder = GradualStyleEncoder(50, "ir_se", n_styles)
            load_state_dict_strict(self.encoder, state_dict,
                                   f"checkpoint {encoder_ckpt_path} ('{ENCODER_PREFIX}.' weights)", assign=True)
        if latent_avg is None:
            latent_avg = torch.zeros(n_styles, STYLE_DIM)
        self.register_buffer(LATENT_AVG, latent_avg, persistent=False)
        self.eval()
        if device is not None:
            self.to(device)

    def forward(self, x):  # x [N, 3, H, W], RGB in [-1, 1]
        # channels_last: the IR-SE-50 convolutions are faster in it (oneDNN / cuDNN), whatever the weights' layout.
        x = self.face_pool(x).contiguous(memory_format=torch.channels_last)  # [N, 3, 256, 256]
        codes = self.encoder(x)  # [N, n_styles, 512]
        return codes + self.latent_avg  # [N, n_styles, 512]


def psp_state_dict_for_release(encoder):
    """The released psp_encoder.pt layout of a PSPEncoder: {'encoder.<key>': tensor, ..., 'latent_avg': tensor}.

    Tensors are detached CPU copies. A dict with exactly these entries (plus any keys that neither start
    with 'encoder' nor are 'state_dict'/'latent_avg') is what read_psp_checkpoint and the release load.
    """
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}  # 'encoder.*' keys
    state[LATENT_AVG] = encoder.latent_avg.detach().cpu().clone()
    return state
