"""Training of the pSp encoder for a BlendGAN generator (paper A.3; pSp: Richardson et al., CVPR 2021).

The generator is a BlendGAN checkpoint's ``g_ema``, frozen and used at indicator i = n_latent, i.e. without
a style branch: it produces natural faces only (the release's ``add_weight_index >= n_latent`` gives the very
same images). Only the encoder learns, to reconstruct its input faces:

    w = E(x) + latent_avg                       # [N, n_styles, 512], PSPEncoder: pool to 256, IR-SE-50 + heads
    y_hat = pool_S(G([w], input_is_latent=True))  # [N, 3, S, S], the generator output at the data size S
    loss = l2_weight * ||y_hat - x||^2  + lpips_weight * LPIPS(y_hat, x)
         + id_weight * (1 - cos(ArcFace(y_hat), ArcFace(x)))  + w_norm_weight * ||w - latent_avg||_2

as pSp (its L2, LPIPS, identity and W-norm terms, each switched on by its weight and logged by name).
``latent_avg`` is the generator's mean latent (mean of the face mapping over --latent_avg_samples codes),
stored with the weights as the release's ``psp_encoder.pt`` requires.

What differs from pSp's own trainer, and why:
- Adam (pSp's default is Ranger, RAdam + Lookahead, which torch does not ship); same learning rate 1e-4.
- The generator runs with its stored noise maps (randomize_noise=False), as every inference script of the
  release does; --randomize_noise trains with fresh noise as pSp.
- LPIPS needs torchvision's ImageNet AlexNet (the ``lpips`` package ships only its linear layers), the
  identity loss the ArcFace IR-SE-50 file (model_ir_se50.pth), and the encoder starts from that IR-SE-50
  backbone as pSp's does. Nothing is downloaded, and a run never quietly trains with less: when a file is
  missing it stops before building anything, naming each missing file, the flag that gives it and the one
  that does without it on purpose (``--lpips_weight 0``, ``--id_weight 0``, ``--encoder_from_scratch``).
  config.json records the terms that train (``active_losses``).

Checkpoints (``DIR/checkpoints/NNNNNN.pt``, atomic, the last --keep kept) are loadable by PSPEncoder as they
are: the release layout (top-level ``encoder.*`` weights and ``latent_avg``) plus the training state under
keys the release ignores. ``DIR/psp_encoder.pt`` is the release layout alone, for style_transfer_folder.py
and gen_video.py.

Exact resume: the data stream restarts at the position stored in the checkpoint, flips are drawn from a
generator seeded by (seed, rank, step), and the global random states of every rank are restored.
Multi-process (torchrun): DDP over the encoder; BatchNorm uses each rank's batch statistics (as DDP without
SyncBatchNorm, which has no CPU implementation), its running statistics are rank 0's (DDP broadcasts them
at every forward; they are broadcast once more before every checkpoint so that all ranks agree).
"""
import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

import distributed
import trainutil
from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, require_key, save_checkpoint
from dataset import MultiResolutionDataset, infinite_loader, lmdb_problems, random_flip, to_tensor
from fileio import folder_problems
from imageio_utils import decode_problems, read_image_rgb
from inference import load_blendgan
from model_zoo import file_not_found
from psp_encoder.arcface import ID_INPUT_SIZE, load_arcface
from psp_encoder.encoders import STYLE_DIM
from psp_encoder.psp_encoders import ENCODER_INPUT_SIZE, LATENT_AVG, PSPEncoder, psp_state_dict_for_release
from utils import img2ten, save_grid, tile_rows

CHECKPOINT_KIND = "blendgan_psp_training"
CHECKPOINT_VERSION = 1
EXPORT_NAME = "psp_encoder.pt"
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_NAMES = ("l2", "lpips", "id", "w_norm")
# Options that fix what the weights mean: a resumed run must use the checkpoint's values.
FIXED_ON_RESUME = ("size", "encoder_input_size")

# Identity loss (pSp): the face region of a 256 px FFHQ-aligned image, rows 35:223 and columns 32:220,
# average-pooled to the 112 px input of ArcFace. Other image sizes use the same box scaled.
ID_REFERENCE_SIZE = 256
ID_CROP_BOX = (35, 223, 32, 220)  # top, bottom, left, right at ID_REFERENCE_SIZE


@dataclass
class PSPTrainOptions:
    """Everything a run needs; train_psp.py fills it from the command line (pSp's FFHQ-encoding defaults)."""
    lmdb: list  # LMDB(s) of aligned natural faces (prepare_data.py)
    blendgan_ckpt: str  # BlendGAN checkpoint whose g_ema is the frozen generator
    out_dir: str
    size: int = None  # LMDB resolution read = resolution of the losses; default min(generator size, 256)
    batch: int = 8  # per process
    iter: int = 500_000
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    l2_weight: float = 1.0
    lpips_weight: float = 0.8
    id_weight: float = 0.1
    w_norm_weight: float = 0.0
    lpips_alexnet: str = None  # torchvision AlexNet file (alexnet-owt-7be5be79.pth); default: torch hub cache
    id_weights: str = None  # ArcFace IR-SE-50 file (pSp's model_ir_se50.pth)
    encoder_backbone: str = None  # IR-SE-50 file to start the encoder's input layer and body from
    encoder_from_scratch: bool = False  # start the encoder from random weights on purpose (no backbone file)
    latent_avg_samples: int = 100_000  # face codes averaged for latent_avg (pSp: 1e5)
    encoder_input_size: int = ENCODER_INPUT_SIZE[0]  # the release always pools to 256; smaller only for tests
    randomize_noise: bool = False  # fresh noise maps per forward (pSp) instead of the stored ones (inference)
    flip: float = 0.5  # probability of a horizontal flip of each training face
    sample_every: int = 1000
    n_sample: int = 4  # faces in the sample grid (the first images of the data)
    sample_style_img: str = None  # reference style image of the grid's stylized column; default a random z_s
    sample_index: int = 6  # indicator i of the stylized column (the release's default)
    save_every: int = 5000
    keep: int = 3
    log_every: int = 100
    resume: str = None  # a checkpoint path, or 'latest'
    seed: int = 0
    device: str = None  # default: cuda if available, else cpu
    amp: str = "off"  # off | bf16 | fp16: autocast for the encoder and generator; losses stay float32
    num_workers: int = 4
    export: bool = True  # write out_dir/psp_encoder.pt at the end
    progress: bool = True  # tqdm bar on rank 0
    extra: dict = field(default_factory=dict)  # free-form notes stored in config.json


def validate(options):
    """Clear messages for impossible options; returns a list of problems (empty when fine)."""
    problems = []
    positive = ("batch", "iter", "latent_avg_samples", "sample_every", "save_every", "keep", "log_every")
    for name in positive:
        if getattr(options, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(options, name)}")
    not_powers = []
    for name in ("size", "encoder_input_size"):
        value = getattr(options, name)
        if value is not None and (value < 16 or value & (value - 1)):
            problems.append(f"--{name} must be a power of two >= 16, got {value}")
            not_powers.append(name)
    if options.n_sample < 0:
        problems.append(f"--n_sample must be >= 0, got {options.n_sample}")
    if not options.lr > 0:
        problems.append(f"--lr must be positive, got {options.lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(options, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(options, name)}")
    for name in LOSS_NAMES:
        weight = getattr(options, f"{name}_weight")
        if not (weight >= 0 and math.isfinite(weight)):
            problems.append(f"--{name}_weight must be a finite number >= 0, got {weight}")
    if sum(getattr(options, f"{name}_weight") for name in LOSS_NAMES) <= 0:
        problems.append("every loss weight is 0: nothing to train")
    if not 0 <= options.flip <= 1:
        problems.append(f"--flip is a probability, got {options.flip}")
    if options.amp not in AMP_DTYPES:
        problems.append(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {options.amp}")
    if options.amp == "fp16" and not str(options.device or trainutil.default_device()).startswith("cuda"):
        problems.append("--amp fp16 needs CUDA (its gradient scaler); use --amp bf16 on the CPU")
    if options.num_workers < 0:
        problems.append("--num_workers must be >= 0")
    # a bad --size: the LMDBs are still checked, at any resolution (one message for it, not two)
    lmdb_size = None if "size" in not_powers else options.size
    problems += lmdb_problems([("LMDB", path) for path in options.lmdb], lmdb_size)
    problems += folder_problems("--out_dir", options.out_dir)
    if not options.lmdb:
        problems.append("at least one LMDB of faces is needed")
    # option field -> its flag (blendgan_ckpt is train_psp.py's --ckpt), and the published file it names
    files = {"blendgan_ckpt": ("ckpt", "blendgan.pt"),
             "lpips_alexnet": ("lpips_alexnet", "alexnet-owt-7be5be79.pth"),
             "id_weights": ("id_weights", "model_ir_se50.pth"),
             "encoder_backbone": ("encoder_backbone", "model_ir_se50.pth"),
             "sample_style_img": ("sample_style_img", None)}
    for name, (flag, published) in files.items():
        path = getattr(options, name)
        if path is not None and not os.path.isfile(path):
            problems.append(file_not_found(f"--{flag}", path, published))
    if options.sample_style_img is not None:
        problems += decode_problems("--sample_style_img", [options.sample_style_img])
    if options.resume not in (None, "", "latest") and not os.path.isfile(options.resume):
        problems.append(f"--resume {options.resume}: file not found")
    if options.encoder_from_scratch and options.encoder_backbone:
        problems.append("--encoder_from_scratch and --encoder_backbone contradict each other: pass one")
    # A resumed run takes its encoder from the checkpoint; --resume latest before any checkpoint starts fresh.
    fresh_start = trainutil.resolve_resume(options.resume, options.out_dir) is None
    return problems + missing_files(options, fresh_start=fresh_start)


def missing_files(options, fresh_start):
    """The weights files a run with ``options`` needs and was not given: one problem line per file, naming
    the file, the flag that gives it and the flag that does without it on purpose.

    A run never quietly trains L2-only or from a random encoder because a file was not at hand. Paths
    given but absent are reported by validate ("file not found"); this covers files not given at all.
    fresh_start: the encoder starts from new weights (no checkpoint to resume), so it needs its backbone.
    """
    from model_zoo import ALEXNET_URL, hub_cache_path  # where the project's one LPIPS loader (metrics.py) looks

    problems = []
    alexnet = os.path.basename(ALEXNET_URL)
    if options.lpips_weight > 0 and options.lpips_alexnet is None and not os.path.isfile(hub_cache_path(ALEXNET_URL)):
        problems.append(f"the LPIPS loss (--lpips_weight {options.lpips_weight}) needs torchvision's AlexNet weights "
                        f"{alexnet}, neither given with --lpips_alexnet nor at {hub_cache_path(ALEXNET_URL)} (nothing "
                        f"is downloaded): pass --lpips_alexnet {alexnet}, or --lpips_weight 0 to train without LPIPS")
    if options.id_weight > 0 and options.id_weights is None:
        problems.append(f"the identity loss (--id_weight {options.id_weight}) needs pSp's ArcFace weights "
                        "model_ir_se50.pth: pass --id_weights model_ir_se50.pth, or --id_weight 0 to train without it")
    if fresh_start and options.encoder_backbone is None and not options.encoder_from_scratch:
        problems.append("the encoder starts from pSp's IR-SE-50 backbone model_ir_se50.pth: pass --encoder_backbone "
                        "model_ir_se50.pth, or --encoder_from_scratch to start from random weights on purpose")
    return problems


# ---- losses -------------------------------------------------------------------------------------

def id_crop(x):
    """The face region of aligned faces x [N, 3, S, S] (pSp's box scaled to S), pooled to [N, 3, 112, 112]."""
    s = x.shape[-1]
    top, bottom, left, right = (round(v * s / ID_REFERENCE_SIZE) for v in ID_CROP_BOX)
    return F.adaptive_avg_pool2d(x[:, :, top:bottom, left:right], (ID_INPUT_SIZE, ID_INPUT_SIZE))


def identity_loss(arcface, y_hat, x):
    """pSp's identity loss: mean over the batch of 1 - cos(ArcFace(y_hat), ArcFace(x)); x gives no gradient.

    Returns (loss, mean cosine similarity).
    """
    with torch.no_grad():
        target = arcface(id_crop(x))  # [N, 512]
    pred = arcface(id_crop(y_hat))  # [N, 512]
    similarity = (pred * target).sum(dim=1)  # [N]
    return (1 - similarity).mean(), similarity.detach().mean()


def w_norm(codes, latent_avg):
    """pSp's W-norm regulariser: mean over the batch of ||w - latent_avg||_2 over all n_styles x 512 entries."""
    return (codes - latent_avg).flatten(1).norm(dim=1).mean()


@dataclass
class Losses:
    """The weights of the loss terms and the networks two of them need (None: that term is off)."""
    weights: dict  # {name: weight} for the names in LOSS_NAMES
    lpips: nn.Module = None  # metrics.LPIPSFeatures: (x0, x1) -> [N]
    arcface: nn.Module = None

    def active(self):
        """Names of the terms that enter the total (weight > 0 and, for LPIPS/ID, a network)."""
        available = {"l2": True, "lpips": self.lpips is not None, "id": self.arcface is not None, "w_norm": True}
        return [n for n in LOSS_NAMES if self.weights[n] > 0 and available[n]]


def reconstruction_losses(losses, x, y_hat, codes, latent_avg):
    """All loss terms for one batch; returns (total, {name: detached scalar}) with every computed term logged.

    x, y_hat: [N, 3, S, S] in [-1, 1]; codes: [N, n_styles, 512]; latent_avg broadcasts to codes.
    L2 and the W-norm are always computed (cheap, and the main things to watch); LPIPS and the identity
    loss only when they enter the total.
    """
    active = losses.active()
    terms = {"l2": F.mse_loss(y_hat, x), "w_norm": w_norm(codes, latent_avg)}
    stats = {}
    if "lpips" in active:
        terms["lpips"] = losses.lpips(y_hat, x).mean()
    if "id" in active:
        terms["id"], stats["id_similarity"] = identity_loss(losses.arcface, y_hat, x)
    total = sum(losses.weights[name] * terms[name] for name in active)
    stats.update({name: value.detach() for name, value in terms.items()})
    stats["total"] = total.detach()
    return total, stats


def build_losses(options, device):
    """The loss terms of ``options`` with the networks they need; ValueError naming every missing file."""
    trainutil.require_valid(missing_files(options, fresh_start=False))
    weights = {name: float(getattr(options, f"{name}_weight")) for name in LOSS_NAMES}
    lpips_model = arcface = None
    if weights["lpips"] > 0:
        # The project's one LPIPS loader (metrics.py): the package's linear layers + torchvision's AlexNet.
        from metrics import load_lpips
        from model_zoo import ALEXNET_URL, pretrained_file

        path = pretrained_file("LPIPS AlexNet backbone", ALEXNET_URL, options.lpips_alexnet, "--lpips_alexnet",
                               allow_download=False)  # the given file, else the hub cache; never a download
        lpips_model = load_lpips(path).to(device).eval().requires_grad_(False)
    if weights["id"] > 0:
        arcface = load_arcface(options.id_weights).to(device)
    return Losses(weights, lpips_model, arcface)


# ---- data ---------------------------------------------------------------------------------------

def face_dataset(paths, size):
    """The faces of one or several LMDBs at ``size``, each [3, size, size] in [-1, 1] (the inference conversion)."""
    parts = []
    for path in paths:
        try:
            parts.append(MultiResolutionDataset(path, to_tensor, size))
        except ValueError as e:
            raise ValueError(f"{e} (--size {size}: the LMDB must hold faces at this resolution)") from None
    return ConcatDataset(parts)


# ---- models -------------------------------------------------------------------------------------

@torch.no_grad()
def generator_latent_avg(g, n, seed, chunk=10_000):
    """Mean of the face mapping ``style`` over n codes z ~ N(0, I) drawn on the CPU from ``seed``: [style_dim].

    Computed in chunks; the codes are the same for every device and chunk size (torch's CPU sampler fills
    blocks of 16 values, so this holds while style_dim is a multiple of 16, as 512 is).
    """
    generator = torch.Generator().manual_seed(seed)
    device = g.input.input.device
    total = torch.zeros(g.style_dim, dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        z = torch.randn(min(chunk, n - start), g.style_dim, generator=generator).to(device)
        total += g.style(z).double().sum(dim=0)
    return (total / n).float()


def load_encoder_backbone(encoder, path):
    """Copy an IR-SE-50 backbone into a GradualStyleEncoder; returns the number of tensors copied.

    ``path``: pSp's model_ir_se50.pth (ArcFace) or any file with ``input_layer.*`` and ``body.*`` entries, also
    a pSp checkpoint (``encoder.*`` keys, optionally inside ``state_dict``), whose heads are then copied too
    when their shapes fit. The stem and body must be complete; everything else in the file is ignored.
    """
    ckpt = load_checkpoint(path)
    weights = ckpt.get("state_dict", ckpt)
    prefix = "encoder."
    if any(isinstance(k, str) and k.startswith(prefix) for k in weights):
        weights = {k[len(prefix):]: v for k, v in weights.items() if isinstance(k, str) and k.startswith(prefix)}
    own = encoder.state_dict()
    # BatchNorm's num_batches_tracked counters are not weights (files from before PyTorch 0.4.1 lack them)
    backbone = [k for k in own if k.startswith(("input_layer.", "body.")) and not k.endswith("num_batches_tracked")]
    missing = [k for k in backbone if k not in weights]
    misshaped = [k for k in backbone if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or misshaped:
        first = (missing or misshaped)[:3]
        raise CheckpointError(f"--encoder_backbone {path}: not an IR-SE-50 backbone ({len(missing)} missing and "
                              f"{len(misshaped)} mis-shaped stem/body tensors, e.g. {', '.join(first)})")
    take = {k: weights[k] for k in own if k in weights and tuple(weights[k].shape) == tuple(own[k].shape)}
    encoder.load_state_dict(take, strict=False)
    return len(take)


def build_encoder(options, output_size, ckpt=None, log=print):
    """PSPEncoder (CPU) for a generator of ``output_size`` px, in train mode.

    From ``ckpt`` (a training checkpoint: weights and latent_avg, no random initialisation), else from
    scratch (random, from the current torch seed) with the stem and body of --encoder_backbone when given.
    The encoder pools its input to options.encoder_input_size (256, as at inference, unless changed).
    """
    if ckpt is not None:
        with torch.device("meta"):
            psp = PSPEncoder(None, output_size=output_size)
        psp = psp.to_empty(device="cpu")
        weights = {k: v for k, v in ckpt.items() if isinstance(k, str) and k.startswith("encoder.")}
        load_state_dict_strict(psp, weights, "training checkpoint ('encoder.' weights)")
        psp.latent_avg = ckpt[LATENT_AVG].clone().expand_as(psp.latent_avg).contiguous()
    else:
        psp = PSPEncoder(None, output_size=output_size)
        if options.encoder_backbone:
            n = load_encoder_backbone(psp.encoder, options.encoder_backbone)
            log(f"encoder: {n} of {len(psp.encoder.state_dict())} tensors from {options.encoder_backbone}, "
                "the rest from scratch")
    if options.encoder_input_size != ENCODER_INPUT_SIZE[0]:
        # Only for quick experiments and tests: PSPEncoder always pools to 256 at inference.
        size = options.encoder_input_size
        psp.face_pool = nn.AdaptiveAvgPool2d((size, size))
    return psp.train()


def sync_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm running statistics); no-op on one process."""
    if distributed.is_distributed():
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


# ---- checkpoints --------------------------------------------------------------------------------

def load_training_checkpoint(path, options):
    """Read a checkpoint of this trainer, checking that it fits ``options``."""
    ckpt = trainutil.load_tagged_checkpoint(path, CHECKPOINT_KIND, "pSp training",
                                            "; to start the encoder from weights use --encoder_backbone")
    saved = require_key(ckpt, "options", path)
    differ = [f"--{k} {saved.get(k)} (this run: {getattr(options, k)})" for k in FIXED_ON_RESUME
              if getattr(options, k) is not None and saved.get(k) != getattr(options, k)]
    if differ:
        raise CheckpointError(f"checkpoint {path}: trained with {', '.join(differ)}; pass the checkpoint's values")
    return ckpt


def checkpoint_state(psp, optimizer, scaler, step, options, generator_info, rng, log_window=None):
    """The release layout of the encoder (top-level 'encoder.*', 'latent_avg') plus the training state.

    The training entries use names that neither start with 'encoder' nor are 'state_dict', so PSPEncoder
    and the release read the file as a plain psp_encoder.pt.
    """
    state = psp_state_dict_for_release(psp)
    state.update({
        **trainutil.checkpoint_tag(CHECKPOINT_KIND, CHECKPOINT_VERSION), "step": step,
        "world_size": distributed.get_world_size(), "optimizer": optimizer.state_dict(),
        "grad_scaler": scaler.state_dict(), "options": trainutil.options_dict(options),
        "generator": generator_info, "rng": rng, "log_window": log_window,
    })
    return state


# ---- samples ------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(psp, g, x, z_embed, index):
    """Rows of input | reconstruction | stylized at indicator ``index`` with the style code z_embed [1, 512].

    The encoder runs in eval mode (running statistics, as at inference); the generator uses its stored noise.
    x: [N, 3, S, S]. Returns [3, N*S, 3*S] in [0, 1].
    """
    was_training = psp.training
    psp.eval()
    try:
        codes = psp(x)  # [N, n_styles, 512]
    finally:
        psp.train(was_training)
    size = x.shape[-1]
    recon, _ = g([codes], input_is_latent=True, randomize_noise=False)
    styled, _ = g([codes], input_is_latent=True, randomize_noise=False, z_embed=z_embed.expand(x.shape[0], -1),
                  add_weight_index=index)
    recon = F.adaptive_avg_pool2d(recon.float(), size)
    styled = F.adaptive_avg_pool2d(styled.float(), size)
    return tile_rows(torch.stack([x.float(), recon, styled], dim=1))  # rows [N, 3, 3, S, S] -> [3, N*S, 3*S]


def sample_style_code(g, options, device):
    """z_s of --sample_style_img, or a fixed random style code (latent-guided) without one: [1, style_dim]."""
    if options.sample_style_img:
        return g.get_z_embed(img2ten(np.asarray(read_image_rgb(options.sample_style_img)), device))
    generator = torch.Generator().manual_seed(trainutil.rank_seed(options.seed, 0, 1))
    return torch.randn(1, g.style_dim, generator=generator).to(device)


# ---- training -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    checkpoint: str  # the last checkpoint written (None if none)
    export: str  # out_dir/psp_encoder.pt, or None
    encoder: PSPEncoder
    generator: nn.Module  # the frozen generator (g_ema of --ckpt)
    history: list = field(default_factory=list)  # [{"step", name: value}] of every iteration run here (rank mean)
    active_losses: list = field(default_factory=list)


def train(options, log=None):
    """Run (or continue) a training; returns a TrainResult. Raises NonFiniteLossError on a NaN/inf loss."""
    trainutil.require_valid(validate(options))
    device = distributed.init_distributed(options.device or trainutil.default_device())
    try:
        return _train(options, device, log)
    finally:
        distributed.cleanup()


def _train(options, device, log):
    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = distributed.is_main()
    log = log or (print if main else (lambda *a, **k: None))
    amp_dtype = AMP_DTYPES[options.amp]
    manager = trainutil.CheckpointManager(options.out_dir, options.keep)
    resume = trainutil.resolve_resume(options.resume, options.out_dir)
    if options.resume == "latest" and resume is None:
        log(f"--resume latest: no checkpoint in {options.out_dir}/checkpoints yet, starting from scratch")
    ckpt = load_training_checkpoint(resume, options) if resume else None
    if ckpt is not None and options.size is None:
        options = dataclasses.replace(options, size=ckpt["options"].get("size"))

    g, _ = load_blendgan(options.blendgan_ckpt, device=device)
    if g.style_dim != STYLE_DIM:  # GradualStyleEncoder's heads write 512-D codes, as the release's
        raise ValueError(f"--ckpt {options.blendgan_ckpt}: its generator has {g.style_dim}-D latents; the pSp "
                         f"encoder writes {STYLE_DIM}-D W+ codes (train BlendGAN with --style_dim {STYLE_DIM})")
    g.requires_grad_(False)  # frozen; gradients flow through it to the codes only
    size = options.size or min(g.size, ENCODER_INPUT_SIZE[0])
    if size > g.size:
        raise ValueError(f"--size {size} is larger than the generator's output ({g.size} px)")
    options = dataclasses.replace(options, size=size)  # checkpoints and config.json record the size used
    if options.encoder_input_size != ENCODER_INPUT_SIZE[0]:
        log(f"note: the encoder pools its input to {options.encoder_input_size} px; PSPEncoder (inference) always "
            f"pools to {ENCODER_INPUT_SIZE[0]}, so this encoder is for tests and quick experiments only")
    generator_info = {"path": os.path.abspath(options.blendgan_ckpt), "size": g.size, "n_latent": g.n_latent}

    trainutil.seed_everything(options.seed, 0)  # identical initial weights on every rank
    psp = build_encoder(options, g.size, ckpt, log)
    if ckpt is None:
        psp.latent_avg = generator_latent_avg(g, options.latent_avg_samples, options.seed).expand_as(
            psp.latent_avg).contiguous()  # [n_styles, 512]
    psp.to(device)
    latent_avg = psp.latent_avg
    losses = build_losses(options, device)
    active = losses.active()
    # The fused kernel (CPU and CUDA): one pass over the ~120-270M parameters instead of several.
    trainable = list(psp.parameters())
    optimizer = torch.optim.Adam(trainable, lr=options.lr, betas=(options.beta1, options.beta2), fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16 and device.type == "cuda")
    step = 0
    if ckpt is not None:
        trainutil.load_optimizer_state(optimizer, ckpt["optimizer"], log)
        trainutil.load_scaler_state(scaler, ckpt["grad_scaler"])
        step = int(ckpt["step"])
        if int(ckpt.get("world_size", world)) != world:
            log(f"note: the checkpoint was written by {ckpt.get('world_size')} processes, this run has {world}: "
                "the data order is not continued exactly")
    rng = ckpt.get("rng") if ckpt is not None else None
    window = ckpt.get("log_window") if ckpt is not None else None
    del ckpt
    model = psp
    if world > 1:
        model = nn.parallel.DistributedDataParallel(psp, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = face_dataset(options.lmdb, size)
    batches = infinite_loader(dataset, options.batch, options.num_workers, options.seed, rank, world,
                              pin_memory=device.type == "cuda", start=step * options.batch)
    # Random streams per rank, continued exactly on resume; set after the loader exists (creating its
    # iterator draws from the global generator).
    if rng is not None:
        trainutil.restore_rng_states(rng, options.seed + step)
    else:
        trainutil.seed_everything(options.seed, rank)

    if main:
        os.makedirs(options.out_dir, exist_ok=True)
        checkpoint_bytes = trainutil.estimated_checkpoint_bytes([psp, [psp.latent_avg]], [optimizer])
        log(f"pSp training: {len(dataset)} faces at {size} px, generator {g.size} px ({g.n_latent} W+ entries), "
            f"global batch {options.batch * world} = {world} process(es) x {options.batch}, {options.iter} "
            f"iterations, device {device}, amp {options.amp}, losses {' + '.join(active)}, checkpoints "
            f"~{trainutil.size_text(checkpoint_bytes)} each"
            + (f", resuming at step {step} from {resume}" if resume else ""))
        warning = manager.room_warning(checkpoint_bytes)
        if warning:
            log(warning)
    trainutil.write_config(options.out_dir, options, world_size=world, generator=generator_info,
                           active_losses=active, torch_version=torch.__version__)

    sample_x = z_embed = None
    if main and options.n_sample > 0:
        sample_x = torch.stack([dataset[i % len(dataset)] for i in range(options.n_sample)]).to(device)
        z_embed = sample_style_code(g, options, device)

    last_checkpoint = resume
    history = []
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    with trainutil.RunMonitor(options.out_dir, options.iter, step, options.batch * world, options.progress,
                              desc="pSp", window=window) as run:
        while step < options.iter:
            x = next(batches).to(device, non_blocking=True)  # [B, 3, S, S]
            # flips drawn from (seed, rank, step) only: the same on resume
            x = random_flip(x, options.flip, torch.Generator().manual_seed(trainutil.rank_seed(options.seed, rank, step)))
            with autocast:
                codes = model(x)  # [B, n_styles, 512]
                y_hat, _ = g([codes], input_is_latent=True, randomize_noise=options.randomize_noise)
            # Losses in float32 at the data resolution (pSp pools the 1024 px output to 256 the same way).
            y_hat = F.adaptive_avg_pool2d(y_hat.float(), size)  # [B, 3, S, S]
            total, stats = reconstruction_losses(losses, x, y_hat, codes.float(), latent_avg)
            stats = distributed.reduce_dict(stats)  # mean over ranks: every rank sees the same numbers
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            # No step from a non-finite loss, nor from a non-finite gradient where no GradScaler (float16's
            # skips such a step itself) checks them.
            trainutil.check_finite(stats, step + 1, last_checkpoint, None if scaler.is_enabled() else trainable)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            history.append({"step": step, **stats})
            run.update(stats, loss=f"{stats['total']:.4f}", l2=f"{stats['l2']:.4f}")
            if run.due(step, options.log_every):
                run.log(step, {**{f"loss/{k}" if k in LOSS_NAMES + ("total",) else f"metrics/{k}": v
                                  for k, v in run.means().items()}, "lr": optimizer.param_groups[0]["lr"]})
            with run.aside():
                if sample_x is not None and run.due(step, options.sample_every):
                    grid = sample_grid(psp, g, sample_x, z_embed, options.sample_index)
                    save_grid(grid, os.path.join(options.out_dir, "samples", f"{step:06d}.png"))
                    if run.logger.writer is not None:
                        run.logger.add_image("samples/input|reconstruction|stylized", grid, step)
                if run.due(step, options.save_every):
                    sync_buffers(psp)
                    rng_states = trainutil.gather_rng_states()  # a collective: every rank takes part
                    state = (checkpoint_state(psp, optimizer, scaler, step, options, generator_info, rng_states,
                                              run.window_state()) if main else None)
                    last_checkpoint = manager.save(step, state)
                    distributed.barrier()

    sync_buffers(psp)
    export = None
    if options.export and main:
        export = os.path.join(options.out_dir, EXPORT_NAME)
        state = psp_state_dict_for_release(psp)
        state["opts"] = {"step": step, "generator": generator_info, **trainutil.options_dict(options)}
        save_checkpoint(state, export)
    return TrainResult(step, last_checkpoint, export, psp, g, history, active)


def options_from_checkpoint(path):
    """The PSPTrainOptions a checkpoint was written with (for tools and tests)."""
    saved = load_checkpoint(path).get("options", {})
    names = {f.name for f in dataclasses.fields(PSPTrainOptions)}
    return PSPTrainOptions(**{k: v for k, v in saved.items() if k in names})
