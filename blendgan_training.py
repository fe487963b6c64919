"""BlendGAN training (paper Sec. 3.2-3.4, supplementary A.1 and A.5): one generator, three discriminators.

Each iteration draws natural faces x_f (FFHQ), artistic faces x_s (AAHQ) and face codes z_f; the style
encoder is frozen, z_s = E_style(x_s) (eval, no gradients). With G(z_f, z_s, i) the generator whose WBM
indicator is i (i = n_latent: the natural face, i = 0: every layer blended), each D step and each G step
runs the generator TWICE: the natural face x_f^ = G(z_f, i = n_latent) and ONE stylized image x_s^, which
Eq. 7 and Eq. 8 share (``generate_branch``, the one place the branches are made):

  Eq. 6  D_face:          real x_f            vs  fake x_f^
  Eq. 7  D_style:         real x_s            vs  fake x_s^
  Eq. 8  D_style_latent:  real (x_s, z_s)     vs  fake (x_s^, z_s^-)
  Eq. 9  G minimises the sum of the three generator terms.
  Eq. 10 plus StyleGAN2's regularisers: lazy R1 on all three discriminators, path length on G.

Every adversarial term is the non-saturating logistic loss: D minimises softplus(-D(real)) +
softplus(D(fake)), G minimises softplus(-D(fake)) on the same fake (pair) D saw: Eq. 9 is one min-max
objective, G enters Eq. 6-8 only through the fake terms, and -log D(fake) is the usual non-saturating
stand-in for log(1 - D(fake)).

z_s^- is a style code taken from an embedding queue (``StyleQueue``) of the style codes of earlier batches
(``--queue_size``), drawn uniformly with replacement; on the very first iteration, with the queue still
empty, the current batch's codes are drawn instead. The current batch's codes enter the queue at the end of
the iteration (gathered from every rank, so all ranks hold the same queue). Two readings of Eq. 8, chosen
with --eq8 (``EQ8_READINGS``), each with one stylized pass:

- ``conditional`` (the default; a projection-cGAN reading): x_s^ = G(z_f, z_s^-, 0), made from the queue
  code and judged with it, (x_s^, z_s^-). D_style_latent judges whether image and code agree, and G's term
  rewards a stylized image for agreeing with the code it was made from: the job Fig. 2 gives this
  discriminator ("the style latent discriminator D_style_latent predicts whether the stylized-face image is
  consistent with the style latent code z_s"). The same image also serves as Eq. 7's fake: queue codes are
  E_style of real AAHQ images, the distribution Eq. 7 averages over.
- ``paper`` (Eq. 7-8 as printed): x_s^ = G(z_f, z_s, 0) is Eq. 7's image, made from the batch's own codes;
  Eq. 8 pairs that same x_s^ with a queue code z_s^-, a negative: the image does not belong to that code.
  D_style_latent thus learns that real images carry their own code while generated images come with
  foreign ones. G is scored on that pair, (x_s^, z_s^-): the minimax form of Eq. 9-10 written as the
  non-saturating loss (G's only path into Eq. 8 is the fake pair). Not the default: z_s^- is drawn
  independently of (z_f, z_s), so G's expected Eq. 8 term E_{z_s^-}[softplus(-D(x_s^, z_s^-))] is a
  function of the image alone, and for any D the image that minimises it is the same whatever z_s is.
  Nothing in Eq. 6-9 read this way rewards G for following its style code (D_style is unconditional),
  and the Eq. 8 term pulls every stylized image toward one that suits the average queue code. It stays
  selectable, for comparison with the equations as printed. Without --eq8, a resumed run keeps the
  reading of its checkpoint (a run begun as ``paper`` under an earlier default is not switched halfway).

Regularisers, as StyleGAN2 / rosinality's trainer: R1 = r1/2 * E||grad_x D(x)||^2 on real images every
d_reg_every iterations (times d_reg_every), on D_face (x_f), D_style (x_s) and D_style_latent (x_s with
its code z_s fixed; the gradient is taken with respect to the image only). The path-length penalty is on
the natural branch only, as StyleGAN2 (not on the stylized one), every g_reg_every iterations (times
g_reg_every) with a batch shrunk by path_batch_shrink; its running mean is averaged over ranks so that
every rank keeps the same value. Both optimizers are Adam(0, 0.99) with lr 0.002 and the lazy
regularisation correction (lr * c, betas ** c, c = every / (every + 1)). Style mixing (probability
--mixing) applies to the face code. g_ema follows G with a half-life of ema_kimg thousand images (per step
decay 0.5 ** (images per step / (ema_kimg * 1000)); default 10, rosinality's 0.5 ** (32 / 10000) at 32
images per step; when fine-tuning a tenth of the run's images, see ema_half_life_images). The WBM weights (``add_weight``, the face weight 1 - alpha) are trained with G and clamped to [0, 1]
after every optimizer step (the paper's clamped alpha; the forward uses a clamped copy as well).

One-shot fine-tuning (A.5): --finetune_style_img. The style encoder stays frozen, G and the three
discriminators train; D_face still sees FFHQ while D_style and D_style_latent see only the reference
image(s), cycled to fill the batch. g_ema's default half-life is a tenth of the run, so that the model
users load has moved (the 10k-image default would leave ~93% of the start after 1000 x 1 images).
Discriminators come from the start file when it holds them; otherwise D_face comes from --stylegan2_ckpt
when given, and the log names every discriminator that starts fresh.

Mixed precision (--amp): the adversarial phases under autocast, bfloat16 where supported (no loss
scaling), float16 on GPUs without bfloat16 tensor cores (compute capability < 8.0), then with a
GradScaler per optimizer (an overflowing step is skipped and the scale halves). R1 and the path length
(double backward) stay float32. A non-finite (rank-averaged) loss, or a non-finite gradient where no
GradScaler checks them (float32, bfloat16, the regularisers), skips that optimizer step; the run
stops with NonFiniteLossError only when one phase stays non-finite for --nonfinite_patience consecutive
steps or the weights are non-finite, and no checkpoint is written during such a run of bad steps (the
last good one stays the newest).

Distributed: torchrun starts one process per GPU; the trained modules are wrapped in DDP (G without its
frozen style encoder, which DDP neither broadcasts nor reduces), each rank reads its share of the data,
losses are averaged over ranks for logging and for the non-finite guard, and rank 0 alone writes files.
"""
import copy
import inspect
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import distributed
from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, require_key
from dataset import MultiResolutionDataset, PairedLoader, infinite_loader, lmdb_problems, random_flip, to_tensor
from fileio import folder_problems
from imageio_utils import decode_problems, read_image_rgb
from model import BLENDGAN_ONLY_KEYS, Discriminator, Generator, ProjectionDiscriminator, guess_generator_config
from model_zoo import file_not_found
from prepare_data import resize_and_center_crop
from style_encoder import VGG19_WEIGHTS_FILE
from trainutil import (CheckpointManager, NonFiniteGuard, RunMonitor, accumulate, checkpoint_tag, default_device,
                       estimated_checkpoint_bytes, gather_rng_states, load_optimizer_state, load_scaler_state,
                       load_tagged_checkpoint, options_dict, require_valid, resolve_resume, restore_rng_states,
                       seed_everything, size_text, write_config)
from utils import save_grid, tile_rows

CHECKPOINT_KIND = "blendgan_training"  # trainutil.checkpoint_tag, as the other trainers
CHECKPOINT_VERSION = 1
LEGACY_TAG = ("format", "blendgan-train-1")  # how files written before the common tag say the same
ARCH_OPTIONS = ("size", "style_dim", "n_mlp", "channel_multiplier")
PATH_LENGTH_DECAY = 0.01  # running-mean rate of the path-length target (StyleGAN2)
LATENT_AVG_SAMPLES = 4096  # z_f draws for the stored truncation centre (the release scripts' default)
SAMPLE_WBM_INDEX = 6  # middle sample column: WBM indicator of generate_image_pairs.py's default
DEFAULT_EMA_KIMG = 10.0  # g_ema half-life when training (rosinality's 0.5 ** (32 / 10000) at 32 images/step)
FINETUNE_EMA_FRACTION = 10  # one-shot fine-tuning: g_ema's half-life is this fraction of the run's images
TENSORBOARD_CELL = 256  # sample grids go to TensorBoard with cells of at most this size (the PNGs are full size)


# ---- options --------------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    """Everything train.py accepts (see its --help). None for batch/iter means the mode's default."""

    ffhq_lmdb: str
    aahq_lmdb: str = None
    out_dir: str = "runs/blendgan"
    style_encoder_ckpt: str = None
    stylegan2_ckpt: str = None
    blendgan_ckpt: str = None
    from_scratch: bool = False  # G, g_ema and D_face from random weights on purpose (no --stylegan2_ckpt)
    finetune_style_img: list = None
    vgg_ckpt: str = None
    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    style_pool_size: int = 256
    batch: int = None
    iter: int = None
    lr: float = 0.002
    queue_size: int = 1024
    r1: float = 10.0
    path_regularize: float = 2.0
    path_batch_shrink: int = 2
    d_reg_every: int = 16
    g_reg_every: int = 4
    mixing: float = 0.9
    eq8: str = None  # None: the reading of the checkpoint resumed from, else EQ8_READINGS[0] ('conditional')
    ema_kimg: float = None
    flip: bool = True
    save_every: int = 10000
    sample_every: int = 1000
    log_every: int = 100
    keep_checkpoints: int = 3
    n_sample: int = 8
    resume: str = None
    seed: int = 0
    device: str = None
    amp: bool = False
    nonfinite_patience: int = 4
    num_workers: int = 4
    progress: bool = True

    @property
    def finetune(self):
        return bool(self.finetune_style_img)


def resolve_defaults(opts):
    """Fill the mode-dependent defaults: batch 8 / 200k iterations (A.1), batch 1 / 1000 (one-shot, A.5)."""
    if opts.batch is None:
        opts.batch = 1 if opts.finetune else 8
    if opts.iter is None:
        opts.iter = 1000 if opts.finetune else 200000
    if opts.device is None:
        opts.device = default_device()
    return opts


def validate(opts):
    """Clear messages for impossible options (after resolve_defaults); returns a list of problems (empty
    when fine), as the other trainers' validate."""
    problems = []
    size = opts.size
    if size < 8 or 2 ** int(math.log2(size)) != size:
        problems.append(f"--size must be a power of two >= 8, got {size}")
        size = None  # the LMDBs are still checked, at any resolution: one message for a bad --size
    positive = {"batch": opts.batch, "iter": opts.iter, "style_dim": opts.style_dim, "n_mlp": opts.n_mlp,
                "channel_multiplier": opts.channel_multiplier, "queue_size": opts.queue_size,
                "path_batch_shrink": opts.path_batch_shrink, "d_reg_every": opts.d_reg_every,
                "g_reg_every": opts.g_reg_every, "save_every": opts.save_every, "sample_every": opts.sample_every,
                "log_every": opts.log_every, "keep_checkpoints": opts.keep_checkpoints, "n_sample": opts.n_sample,
                "style_pool_size": opts.style_pool_size,
                "nonfinite_patience": opts.nonfinite_patience}
    problems += [f"--{name} must be >= 1, got {value}" for name, value in positive.items() if value < 1]
    if opts.eq8 is not None and opts.eq8 not in EQ8_READINGS:
        problems.append(f"--eq8 must be one of {', '.join(EQ8_READINGS)}, got {opts.eq8!r}")
    problems += [f"--{name} must be > 0, got {getattr(opts, name)}" for name in ("lr", "ema_kimg")
                 if getattr(opts, name) is not None and getattr(opts, name) <= 0]
    problems += [f"--{name} must be >= 0, got {getattr(opts, name)}" for name in ("r1", "path_regularize")
                 if getattr(opts, name) < 0]
    if not 0 <= opts.mixing <= 1:
        problems.append(f"--mixing is a probability in [0, 1], got {opts.mixing}")
    if opts.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {opts.num_workers}")
    lmdbs = [("FFHQ_LMDB", opts.ffhq_lmdb)]
    # --resume latest before any checkpoint exists starts fresh: the start files are then needed as well
    resuming = resolve_resume(opts.resume, opts.out_dir) is not None
    if opts.finetune:
        problems += [f"--finetune_style_img {path}: no such file" for path in opts.finetune_style_img
                     if not os.path.isfile(path)]
        problems += decode_problems("--finetune_style_img", opts.finetune_style_img)
        if opts.blendgan_ckpt is None and not resuming:
            problems.append("one-shot fine-tuning (--finetune_style_img) starts from a trained BlendGAN: "
                            "pass --blendgan_ckpt (the release's blendgan.pt is enough)")
    elif opts.aahq_lmdb is None:
        problems.append("AAHQ_LMDB (the artistic faces) is required unless --finetune_style_img is given")
    else:
        lmdbs.append(("AAHQ_LMDB", opts.aahq_lmdb))
    starts = [f"--{flag}" for flag in ("stylegan2_ckpt", "blendgan_ckpt") if getattr(opts, flag)]
    if opts.from_scratch and starts:
        problems.append(f"--from_scratch and {' / '.join(starts)} contradict each other: pass one")
    elif not (opts.from_scratch or starts or resuming or opts.finetune):
        problems.append("--stylegan2_ckpt is required: G and D_face start from an FFHQ StyleGAN2, as in the paper "
                        "(python download_models.py stylegan2-ffhq-config-f.pt), unless --from_scratch asks for "
                        "random weights on purpose")
    if opts.style_encoder_ckpt is None and opts.blendgan_ckpt is None and not resuming:
        problems.append("--style_encoder_ckpt is required (the frozen style encoder E_style), unless the "
                        "generator comes from --blendgan_ckpt or --resume")
    published = {"style_encoder_ckpt": None, "stylegan2_ckpt": "stylegan2-ffhq-config-f.pt",
                 "blendgan_ckpt": "blendgan.pt", "vgg_ckpt": VGG19_WEIGHTS_FILE}
    problems += [file_not_found(f"--{flag}", getattr(opts, flag), name) for flag, name in published.items()
                 if getattr(opts, flag) is not None and not os.path.isfile(getattr(opts, flag))]
    if opts.resume not in (None, "latest") and not os.path.isfile(opts.resume):
        problems.append(f"--resume {opts.resume}: no such file (or pass 'latest')")
    if str(opts.device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {opts.device}: torch sees no GPU; use --device cpu")
    problems += folder_problems("--out_dir", opts.out_dir)
    problems += lmdb_problems(lmdbs, size)  # opens the LMDBs, before any model is built
    return problems


# ---- the style-code queue -----------------------------------------------------------------------

class StyleQueue:
    """Ring buffer of the last ``size`` style codes z_s [size, style_dim]: the negatives z_s^- of Eq. 8."""

    def __init__(self, size, style_dim, device="cpu"):
        self.codes = torch.zeros(size, style_dim, device=device)
        self.ptr = 0  # next row to write
        self.count = 0  # rows filled so far (<= size)

    def __len__(self):
        return self.count

    @property
    def size(self):
        return self.codes.shape[0]

    @torch.no_grad()
    def push(self, codes):
        """Append codes [N, style_dim], overwriting the oldest rows once full."""
        codes = codes.detach().to(self.codes.dtype)[-self.size:]
        n = codes.shape[0]
        rows = (self.ptr + torch.arange(n, device=self.codes.device)) % self.size
        self.codes[rows] = codes.to(self.codes.device)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)

    def sample(self, n, fallback=None):
        """n codes drawn uniformly with replacement (global RNG); from ``fallback`` while the queue is empty."""
        pool = self.codes[:self.count] if self.count else fallback
        if pool is None:
            raise RuntimeError("the style queue is empty and no fallback codes were given")
        index = torch.randint(0, pool.shape[0], (n,), device=pool.device)
        return pool[index]

    def state_dict(self):
        return {"codes": self.codes.detach().cpu().clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state):
        codes = state["codes"]
        if tuple(codes.shape) != tuple(self.codes.shape):
            raise CheckpointError(f"style queue of shape {tuple(codes.shape)} does not fit --queue_size/--style_dim "
                                  f"{tuple(self.codes.shape)}")
        self.codes.copy_(codes)
        self.ptr, self.count = int(state["ptr"]), int(state["count"])


# ---- losses: one helper per term ------------------------------------------------------------------

def d_logistic_loss(real_pred, fake_pred):
    """Discriminator side of the logistic GAN loss: E[softplus(-D(real))] + E[softplus(D(fake))]."""
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred):
    """Generator side, non-saturating: E[softplus(-D(fake))] = -E[log sigmoid(D(fake))]."""
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred, real_img):
    """E ||grad_x D(x)||^2 over real images (Mescheder et al. 2018); differentiable (create_graph)."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def path_length_penalty(fake_img, latents, mean_path_length, decay=PATH_LENGTH_DECAY, reduce=None):
    """StyleGAN2's path-length penalty (Karras et al. 2020, Sec. 3.2).

    fake_img [N, 3, H, W] generated from W+ latents [N, n_latent, D]. With y ~ N(0, I) / sqrt(H*W) the
    path length is L = sqrt(mean over layers of ||J_w^T y||^2) per sample, and the penalty is
    E (L - a)^2 with a the running mean of L (rate ``decay``). reduce: averages the batch mean of L over
    ranks before it updates a (so every rank keeps the same a). Returns (penalty, new a, L [N]).
    """
    height, width = fake_img.shape[2:]
    y = torch.randn_like(fake_img) / math.sqrt(height * width)
    (grad,) = torch.autograd.grad((fake_img * y).sum(), latents, create_graph=True)  # [N, n_latent, D]
    lengths = grad.pow(2).sum(2).mean(1).sqrt()  # [N]
    batch_mean = lengths.detach().mean()
    if reduce is not None:
        batch_mean = reduce(batch_mean)
    target = mean_path_length + decay * (batch_mean - mean_path_length)
    return (lengths - target).pow(2).mean(), target.detach(), lengths


def d_adversarial_terms(d_face, d_style, d_style_latent, x_f, x_s, z_s, fakes):
    """The discriminators' losses of Eq. 6-8, one discriminator at a time: yields (name, {name: loss}).

    A generator, so that the training step can backward each term before the next one is computed (one
    discriminator's activations in memory at a time). fakes: a Fakes (the two generated batches).
    """
    yield "d_face", {"d_face": d_logistic_loss(d_face(x_f), d_face(fakes.face))}  # Eq. 6
    yield "d_style", {"d_style": d_logistic_loss(d_style(x_s), d_style(fakes.style))}  # Eq. 7
    yield "d_style_latent", {"d_style_latent": d_logistic_loss(d_style_latent(x_s, z_s),
                                                               d_style_latent(fakes.style, fakes.z_pair))}  # Eq. 8


def g_adversarial_terms(g, d_face, d_style, d_style_latent, codes, context=lambda branch: nullcontext()):
    """The generator's three terms of Eq. 9 (G's adversarial loss is their sum), one branch at a time.

    Yields (branch, {name: loss}) per generated branch (BRANCHES: the natural face, then the one stylized
    image that Eq. 7 and Eq. 8 share), each generated and scored only when asked for, so that the training
    step can backward it before the next (half of the generator's activations in memory). context(branch)
    stays entered from that branch's forward until the consumer asks for the next one (its backward
    included): DDP's no_sync.
    """
    for branch in BRANCHES:
        with context(branch):
            image = generate_branch(g, codes, branch)
            if branch == "face":
                yield branch, {"g_face": g_nonsaturating_loss(d_face(image))}  # Eq. 6
            else:
                yield branch, {"g_style": g_nonsaturating_loss(d_style(image)),  # Eq. 7
                               "g_style_latent": g_nonsaturating_loss(d_style_latent(image, codes.z_pair))}  # Eq. 8


# ---- sampling the generator -----------------------------------------------------------------------

BRANCHES = ("face", "style")  # the two generator passes of every D and G step, in this order
EQ8_READINGS = ("conditional", "paper")  # see the module docstring; the first is the default
G_SYNC_BRANCH = "style"  # under DDP, G's gradients are reduced with this branch: it reaches every weight
# (i = 0 blends the face code too, with weight 1 - alpha), the natural branch misses `embedding`/add_weight


@dataclass
class FakeCodes:
    """The codes of one phase's generated batch.

    z_f: G's face codes ([z] or [z1, z2] with style mixing) and inject the crossover layer (or None);
    z_style [N, style_dim]: the code the stylized image is made from (z_s under ``paper``, z_s^- under
    ``conditional``); z_pair [N, style_dim]: the code D_style_latent judges it with (z_s^- in both readings).
    """

    z_f: list
    inject: int
    z_style: torch.Tensor
    z_pair: torch.Tensor


def fake_codes(z_f, inject, z_s, z_negative, reading):
    """FakeCodes for Eq. 8 read as ``reading`` (EQ8_READINGS; None: the default, as TrainOptions.eq8 left
    unset: setup() resolves it, a TrainState built by hand may not) from the batch's z_s and queue codes."""
    reading = reading or EQ8_READINGS[0]
    if reading not in EQ8_READINGS:
        raise ValueError(f"--eq8 must be one of {', '.join(EQ8_READINGS)}, got {reading!r}")
    return FakeCodes(z_f, inject, z_s if reading == "paper" else z_negative, z_negative)


@dataclass
class Fakes:
    """One phase's generated batches: natural x_f^ = G(z_f), stylized x_s^ = G(z_f, z_style, 0), and the code
    z_pair that Eq. 8 pairs x_s^ with."""

    face: torch.Tensor  # [N, 3, H, W]
    style: torch.Tensor  # [N, 3, H, W]
    z_pair: torch.Tensor  # [N, style_dim]


def sample_face_codes(batch, style_dim, n_latent, mixing, device):
    """Face codes z_f for G: ([z], None), or with probability ``mixing`` ([z1, z2], crossover layer).

    All draws use the global generators (restored on resume), never Python's ``random``.
    """
    z1 = torch.randn(batch, style_dim, device=device)
    if mixing > 0 and float(torch.rand(())) < mixing:
        z2 = torch.randn(batch, style_dim, device=device)
        return [z1, z2], int(torch.randint(1, n_latent, ()))
    return [z1], None


def generate_branch(g, codes, branch):
    """One generator pass of a phase (fresh noise in every layer, as in training): [N, 3, H, W].

    "face": x_f^ = G(z_f, i = n_latent); "style": x_s^ = G(z_f, z_style, i = 0). The D step
    (generate_fakes) and the G step (g_adversarial_terms) both generate here, in the order of BRANCHES.
    """
    if branch == "face":
        return g(codes.z_f, inject_index=codes.inject)[0]
    if branch == "style":
        return g(codes.z_f, inject_index=codes.inject, z_embed=codes.z_style, add_weight_index=0)[0]
    raise ValueError(f"unknown branch {branch!r}")


def generate_fakes(g, codes):
    """Both generated batches of a phase at once (the D step, under no_grad): a Fakes."""
    images = {branch: generate_branch(g, codes, branch) for branch in BRANCHES}
    return Fakes(images["face"], images["style"], codes.z_pair)


# ---- networks -----------------------------------------------------------------------------------

@dataclass
class Networks:
    """G, its EMA copy (sharing the one frozen style encoder) and the three discriminators."""

    g: Generator
    g_ema: Generator
    d_face: Discriminator
    d_style: Discriminator
    d_style_latent: ProjectionDiscriminator

    def discriminators(self):
        return {"d_face": self.d_face, "d_style": self.d_style, "d_style_latent": self.d_style_latent}

    def g_trainable(self):
        """G's parameters that train: everything but the frozen style encoder (``embedder``)."""
        return [p for name, p in self.g.named_parameters() if not name.startswith("embedder.")]

    def d_parameters(self):
        return [p for d in self.discriminators().values() for p in d.parameters()]


def build_networks(opts, device):
    """Fresh networks for ``opts`` on ``device``; g_ema is a copy of g that shares its style encoder."""
    g = Generator(opts.size, opts.style_dim, opts.n_mlp, channel_multiplier=opts.channel_multiplier,
                  load_pretrained_vgg=False, style_pool_size=opts.style_pool_size)
    freeze(g.embedder)
    # One style encoder for both: the 1.25 GB layer is not duplicated (deepcopy's memo maps it to itself).
    g_ema = copy.deepcopy(g, memo={id(g.embedder): g.embedder})
    g_ema.eval().requires_grad_(False)
    nets = Networks(g, g_ema, Discriminator(opts.size, channel_multiplier=opts.channel_multiplier),
                    Discriminator(opts.size, channel_multiplier=opts.channel_multiplier),
                    ProjectionDiscriminator(opts.size, opts.style_dim, channel_multiplier=opts.channel_multiplier))
    for module in (nets.g, nets.g_ema, nets.d_face, nets.d_style, nets.d_style_latent):
        module.to(device)
    return nets


def freeze(module):
    """Eval mode and no gradients, for good (the style encoder)."""
    module.eval().requires_grad_(False)
    return module


def set_requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


def copy_g_to_ema(nets):
    """g_ema := g exactly (after loading initial weights into g)."""
    nets.g_ema.load_state_dict(nets.g.state_dict())


def _load_with_missing(module, state_dict, missing_prefixes, what):
    """Strict load where keys starting with ``missing_prefixes`` may be absent from the file (kept as they are)."""
    own = module.state_dict()
    merged = {k: v for k, v in own.items() if k.startswith(missing_prefixes) and k not in state_dict}
    merged.update(state_dict)
    load_state_dict_strict(module, merged, what, hint=guess_generator_config if isinstance(module, Generator)
                           else None)


def load_stylegan2(nets, path, log):
    """--stylegan2_ckpt: G (``g`` into g, ``g_ema`` into g_ema) and D_face from a rosinality checkpoint.

    The file's generators hold the synthesis network and the face mapping ``style`` only; the style mapping
    ``embedding`` and D_style / D_style_latent stay fresh and the WBM weights stay at 1.
    """
    ckpt = load_checkpoint(path)
    _load_with_missing(nets.g, require_key(ckpt, "g", path), BLENDGAN_ONLY_KEYS, f"{path}['g']")
    _load_with_missing(nets.g_ema, require_key(ckpt, "g_ema", path), BLENDGAN_ONLY_KEYS, f"{path}['g_ema']")
    # The file's g_ema has no `embedding`: start it from g's fresh one so that g_ema == g there.
    nets.g_ema.embedding.load_state_dict(nets.g.embedding.state_dict())
    with torch.no_grad():
        nets.g_ema.add_weight.copy_(nets.g.add_weight)
    load_state_dict_strict(nets.d_face, require_key(ckpt, "d", path), f"{path}['d']")
    log(f"initialised G, g_ema and D_face from the StyleGAN2 checkpoint {path}")


def style_encoder_state(ckpt, path):
    """The StyleEncoder state dict inside a style-encoder checkpoint (see load_style_encoder)."""
    for key in ("style_encoder", "embedder"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if "g_ema" in ckpt:
        prefix = "embedder."
        sd = {k[len(prefix):]: v for k, v in ckpt["g_ema"].items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"checkpoint {path}: its g_ema holds no style encoder (no embedder.* keys)")
        return sd
    if any(k.startswith("embedder_mlp.") for k in ckpt):
        return ckpt
    raise CheckpointError(f"checkpoint {path}: no style encoder found (expected a 'style_encoder' or 'embedder' "
                          f"state dict, a BlendGAN 'g_ema' with embedder.* keys, or a bare StyleEncoder state dict)")


def load_style_encoder(g, path, vgg_ckpt, log):
    """--style_encoder_ckpt into g.embedder (shared with g_ema).

    Accepted: a dict whose 'style_encoder' (or 'embedder') entry is a StyleEncoder state dict (what
    train_style_encoder.py writes, in its checkpoints and its exported style_encoder.pt), a BlendGAN
    checkpoint whose 'g_ema' holds embedder.* (e.g. the release's blendgan.pt), or a bare StyleEncoder state
    dict. A state dict without the VGG-19 weights (only ``embedder_mlp.*``) is completed with ImageNet VGG-19
    (--vgg_ckpt, or torchvision's cache).
    """
    ckpt = load_checkpoint(path)
    sd = style_encoder_state(ckpt, path)
    pool = ckpt.get("style_encoder_config", {}).get("pool_size") if isinstance(ckpt.get("style_encoder_config"),
                                                                               dict) else None
    own_pool = g.embedder.embedder.avg_pool.output_size[0]
    if pool is not None and pool != own_pool:
        log(f"note: {path} was trained with --style_pool_size {pool}, this run encodes at {own_pool}")
    vgg_prefix = "embedder.feature_extractor."
    if not any(k.startswith(vgg_prefix) for k in sd):
        from style_encoder import imagenet_vgg19_state_dict

        g.embedder.load_vgg(imagenet_vgg19_state_dict(vgg_ckpt))
        _load_with_missing(g.embedder, sd, (vgg_prefix,), f"{path} (style encoder)")
        log(f"style encoder MLP from {path}, VGG-19 from ImageNet weights")
    else:
        load_state_dict_strict(g.embedder, sd, f"{path} (style encoder)")
        log(f"style encoder from {path}")
    freeze(g.embedder)


def load_blendgan_start(nets, path, stylegan2_path, log):
    """--blendgan_ckpt: start from a BlendGAN checkpoint (fine-tuning, A.5, or a warm start).

    'g_ema' (the release layout) is required and initialises g and g_ema, style encoder included; 'g'
    (without its style encoder, as this trainer writes it) replaces g when present. Discriminators come
    from 'd_face' / 'd_style' / 'd_style_latent' when present; otherwise D_face comes from --stylegan2_ckpt
    ('d') when given, and whatever is left starts fresh (said in the log).
    """
    ckpt = load_checkpoint(path)
    sd = require_key(ckpt, "g_ema", path)
    load_state_dict_strict(nets.g_ema, sd, f"{path}['g_ema']", hint=guess_generator_config)
    load_state_dict_strict(nets.g, sd, f"{path}['g_ema']", hint=guess_generator_config)
    if "g" in ckpt:
        _load_with_missing(nets.g, ckpt["g"], ("embedder.",), f"{path}['g']")
    sources, fresh = [], []
    for name, d in nets.discriminators().items():
        if name in ckpt:
            load_state_dict_strict(d, ckpt[name], f"{path}['{name}']")
            sources.append(f"{name} from {path}")
        elif name == "d_face" and stylegan2_path:
            load_state_dict_strict(d, require_key(load_checkpoint(stylegan2_path), "d", stylegan2_path),
                                   f"{stylegan2_path}['d']")
            sources.append(f"{name} from the StyleGAN2 checkpoint {stylegan2_path}")
        else:
            fresh.append(name)
    message = "; ".join([f"G and g_ema from {path}"] + sources)
    if fresh:
        hint = "" if stylegan2_path or "d_face" not in fresh else " (--stylegan2_ckpt would give D_face)"
        message += f"; {path} has no {', '.join(fresh)}: these discriminators START FRESH{hint}"
    log(message)
    freeze(nets.g.embedder)


# ---- training state and phases ------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything the phases read and update."""

    opts: TrainOptions
    device: torch.device
    nets: Networks
    g_optim: torch.optim.Optimizer
    d_optim: torch.optim.Optimizer
    queue: StyleQueue
    g_train: nn.Module = None  # g, or its DDP wrapper
    d_train: dict = None  # {name: D or its DDP wrapper}
    mean_path_length: torch.Tensor = None
    g_scaler: torch.amp.GradScaler = None
    d_scaler: torch.amp.GradScaler = None
    iteration: int = 0  # completed iterations
    last_checkpoint: str = None
    log_window: dict = None  # RunMonitor.window_state() of the checkpoint resumed from

    def __post_init__(self):
        if self.g_train is None:
            self.g_train = self.nets.g
        if self.d_train is None:
            self.d_train = self.nets.discriminators()
        if self.mean_path_length is None:
            self.mean_path_length = torch.zeros((), device=self.device)
        self.amp_dtype = amp_dtype(self.device) if self.opts.amp else None
        # float16 needs loss scaling (overflowing steps are skipped and the scale halves); bfloat16 does not.
        scaled = self.amp_dtype == torch.float16
        if self.g_scaler is None:
            self.g_scaler = torch.amp.GradScaler(self.device.type, enabled=scaled)
        if self.d_scaler is None:
            self.d_scaler = torch.amp.GradScaler(self.device.type, enabled=scaled)
        self.nonfinite = NonFiniteGuard(self.opts.nonfinite_patience)

    def autocast(self):
        """Mixed precision for the adversarial phases with --amp (see amp_dtype); R1 and path length never."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, phase, losses, optim, scaler, params):
        """Reduce the losses over ranks, then the optimizer step, unless they are non-finite.

        A non-finite step (a loss, or a gradient of a finite loss) is skipped (no weight or optimizer-state
        change; under float16 the loss scale halves, as GradScaler does on overflow); NonFiniteGuard stops
        the run when it persists or the weights are non-finite. scaler: the phase's GradScaler, or None for
        the float32 regularisers. Returns the reduced losses (floats).
        """
        stats = distributed.reduce_dict(losses)
        unscaled = scaler is None or not scaler.is_enabled()  # else GradScaler tests the gradients itself
        if self.nonfinite.check(phase, stats, self.iteration + 1, self.last_checkpoint, params, unscaled):
            if scaler is None:  # the float32 regularisers
                optim.step()
            else:
                scaler.step(optim)  # GradScaler also skips the step when the scaled gradients overflowed
                scaler.update()
        else:
            optim.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return stats

    @property
    def n_latent(self):
        return self.nets.g.n_latent


@dataclass
class Batch:
    """One iteration's real data on the device: x_f, x_s [N, 3, H, W] in [-1, 1], z_s = E_style(x_s)."""

    x_f: torch.Tensor
    x_s: torch.Tensor
    z_s: torch.Tensor


def _backward_each(s, terms, scaler):
    """Compute the (name, {loss name: loss}) ``terms`` one by one, forward under autocast, and backward each
    sum before asking for the next.

    The gradients add up in .grad, so the step sees the gradient of the total. Returns {loss name: detached
    loss}.
    """
    losses = {}
    while True:
        with s.autocast():
            item = next(terms, None)
        if item is None:
            return losses
        _, values = item
        scaler.scale(sum(values.values())).backward()
        losses.update({k: v.detach() for k, v in values.items()})


def phase_codes(s, b):
    """FakeCodes of one D or G step: fresh face codes, queue codes z_s^- (Eq. 8), read as --eq8 says."""
    batch = b.x_f.shape[0]
    z_f, inject = sample_face_codes(batch, s.opts.style_dim, s.n_latent, s.opts.mixing, s.device)
    z_negative = s.queue.sample(batch, fallback=b.z_s)
    return fake_codes(z_f, inject, b.z_s, z_negative, s.opts.eq8)


def d_step(s, b):
    """D_face, D_style, D_style_latent: one step on the sum of Eq. 6-8 (two generator passes). Returns
    reduced losses."""
    nets = s.nets
    set_requires_grad(nets.g_trainable(), False)
    set_requires_grad(nets.d_parameters(), True)
    codes = phase_codes(s, b)
    with torch.no_grad(), s.autocast():
        fakes = generate_fakes(nets.g, codes)
    s.d_optim.zero_grad(set_to_none=True)
    terms = d_adversarial_terms(s.d_train["d_face"], s.d_train["d_style"], s.d_train["d_style_latent"],
                                b.x_f, b.x_s, b.z_s, fakes)
    losses = _backward_each(s, terms, s.d_scaler)  # three separate modules: each syncs on its own
    return s.step("d", {**losses, "d_total": sum(losses.values())}, s.d_optim, s.d_scaler, nets.d_parameters())


def d_reg_step(s, b):
    """Lazy R1 on real images for all three discriminators (float32, no autocast), one at a time."""
    set_requires_grad(s.nets.d_parameters(), True)
    s.d_optim.zero_grad(set_to_none=True)
    penalties = {}
    for name, d, x, extra in (("r1_face", s.d_train["d_face"], b.x_f, ()),
                              ("r1_style", s.d_train["d_style"], b.x_s, ()),
                              ("r1_style_latent", s.d_train["d_style_latent"], b.x_s, (b.z_s,))):
        x = x.detach().clone().requires_grad_(True)
        pred = d(x, *extra)
        penalty = r1_penalty(pred, x)
        # + 0 * D(x): the output layers' biases do not enter grad_x D, so without this term they would
        # get no gradient at all and DDP would wait for them forever.
        (s.opts.r1 / 2 * s.opts.d_reg_every * penalty + 0 * pred.sum()).backward()
        penalties[name] = penalty.detach()
    return s.step("r1", penalties, s.d_optim, None, s.nets.d_parameters())


def g_step(s, b):
    """G: one step on the sum of the three non-saturating terms (Eq. 9), two generator passes. Returns
    reduced losses."""
    nets = s.nets
    set_requires_grad(nets.d_parameters(), False)
    set_requires_grad(nets.g_trainable(), True)
    codes = phase_codes(s, b)
    s.g_optim.zero_grad(set_to_none=True)
    ddp = s.g_train is not nets.g

    def context(branch):  # under DDP, G's gradients are reduced once, with G_SYNC_BRANCH
        return s.g_train.no_sync() if ddp and branch != G_SYNC_BRANCH else nullcontext()

    # The discriminators are fixed here: their plain modules (no DDP gradient sync needed).
    terms = g_adversarial_terms(s.g_train, nets.d_face, nets.d_style, nets.d_style_latent, codes, context)
    losses = _backward_each(s, terms, s.g_scaler)
    stats = s.step("g", {**losses, "g_total": sum(losses.values())}, s.g_optim, s.g_scaler, nets.g_trainable())
    clamp_wbm(nets.g)
    return stats


def g_reg_step(s):
    """Path-length regularisation on natural faces (float32, batch shrunk by path_batch_shrink)."""
    nets = s.nets
    set_requires_grad(nets.g_trainable(), True)
    batch = max(1, s.opts.batch // s.opts.path_batch_shrink)
    z_f, inject = sample_face_codes(batch, s.opts.style_dim, s.n_latent, s.opts.mixing, s.device)
    fake, latents = s.g_train(z_f, inject_index=inject, return_latents=True)
    penalty, target, lengths = path_length_penalty(fake, latents, s.mean_path_length,
                                                   reduce=distributed.reduce_mean)
    # Exact zeros for every trainable parameter: the style branch (embedding, add_weight) and the ToRGB
    # biases do not reach the penalty, and DDP needs a gradient for each parameter it reduces.
    anchor = sum(p.reshape(-1)[0] for p in nets.g_trainable()) * 0
    loss = s.opts.path_regularize * s.opts.g_reg_every * penalty + anchor
    s.g_optim.zero_grad(set_to_none=True)
    loss.backward()
    stats = s.step("path", {"path_loss": penalty, "path_length": lengths.mean()}, s.g_optim, None,
                   nets.g_trainable())
    clamp_wbm(nets.g)
    if math.isfinite(stats["path_length"]):
        s.mean_path_length = target
    stats["mean_path_length"] = float(s.mean_path_length)
    return stats


@torch.no_grad()
def clamp_wbm(g):
    """The WBM weights live in [0, 1] (paper Sec. 3.2): clamp after each optimizer step."""
    g.add_weight.clamp_(0, 1)


@torch.no_grad()
def encode_styles(s, x_s):
    """z_s = E_style(x_s) with the frozen encoder (the generator's own ``embedder``)."""
    with s.autocast():
        return s.nets.g.embedder(x_s).float()


def ema_half_life_images(opts, world_size):
    """g_ema's half-life in images: --ema_kimg thousand, else 10k (training) or a tenth of the run (fine-tuning).

    One-shot fine-tuning sees ~1000 images: with the 10k-image half-life g_ema would end ~93% the starting
    weights, and g_ema is what the checkpoint and the inference scripts use. A tenth of the run leaves
    0.5 ** 10 < 0.1% of the start in g_ema while still averaging over the last steps.
    """
    if opts.ema_kimg is not None:
        return opts.ema_kimg * 1000
    if opts.finetune:
        return opts.iter * opts.batch * world_size / FINETUNE_EMA_FRACTION
    return DEFAULT_EMA_KIMG * 1000


def ema_decay(opts, world_size):
    """Per-step EMA decay for g_ema's half-life (ema_half_life_images)."""
    return 0.5 ** (opts.batch * world_size / ema_half_life_images(opts, world_size))


def amp_dtype(device):
    """--amp's autocast dtype: bfloat16 on CPUs and on GPUs with bfloat16 tensor cores (compute capability
    8.0 and up: A100, H100, RTX 30xx; no loss scaling needed), float16 with GradScaler on older GPUs (V100,
    T4), where bfloat16 is only emulated (torch.cuda.is_bf16_supported() still says True there: it counts
    the emulation) and cuDNN has no bfloat16 convolutions."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def train_iteration(s, b):
    """One iteration: D, lazy R1, G, lazy path length, EMA, queue. Returns the merged stats."""
    it = s.iteration
    stats = d_step(s, b)
    if s.opts.r1 > 0 and it % s.opts.d_reg_every == 0:
        stats.update(d_reg_step(s, b))
    stats.update(g_step(s, b))
    if s.opts.path_regularize > 0 and it % s.opts.g_reg_every == 0:
        stats.update(g_reg_step(s))
    # The shared frozen style encoder is left out (it would only be blended with itself).
    accumulate(s.nets.g_ema, s.nets.g, ema_decay(s.opts, distributed.get_world_size()), skip=("embedder.",))
    s.queue.push(distributed.all_gather_with_grad(b.z_s))
    s.iteration += 1
    return stats


# ---- data ---------------------------------------------------------------------------------------

def read_reference_images(paths, size):
    """--finetune_style_img files -> [R, 3, size, size] in [-1, 1] (shorter side resized, centre-cropped)."""
    return torch.stack([to_tensor(resize_and_center_crop(read_image_rgb(p), size)) for p in paths])


class DataStream:
    """Endless real batches (x_f, x_s) of this rank, starting after ``start_batch`` batches (resume)."""

    def __init__(self, opts, rank, world_size, start_batch, device):
        self.opts = opts
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.step = start_batch
        pin = device.type == "cuda"
        self.faces = MultiResolutionDataset(opts.ffhq_lmdb, to_tensor, opts.size)
        if opts.finetune:
            self.references = read_reference_images(opts.finetune_style_img, opts.size)
            self.styles = None
            self.loader = infinite_loader(self.faces, opts.batch, opts.num_workers, 2 * opts.seed, rank, world_size,
                                          pin_memory=pin, start=start_batch * opts.batch)
        else:
            self.references = None
            self.styles = MultiResolutionDataset(opts.aahq_lmdb, to_tensor, opts.size)
            self.loader = PairedLoader(self.faces, self.styles, opts.batch, opts.num_workers, opts.seed, rank,
                                       world_size, pin_memory=pin, start_batch=start_batch)

    def reference_batch(self):
        """The reference image(s), cycled over the batch (and over ranks)."""
        n = self.references.shape[0]
        first = (self.step * self.world_size + self.rank) * self.opts.batch
        return self.references[(first + torch.arange(self.opts.batch)) % n]

    def __next__(self):
        if self.opts.finetune:
            x_f, x_s = next(self.loader), self.reference_batch()
        else:
            x_f, x_s = next(self.loader)
        self.step += 1
        return x_f.to(self.device, non_blocking=True), x_s.to(self.device, non_blocking=True)

    def sample_styles(self, n):
        """Fixed reference style images for the sample grids: [n, 3, H, W]."""
        if self.references is not None:
            return self.references[torch.arange(n) % self.references.shape[0]]
        return torch.stack([self.styles[i % len(self.styles)] for i in range(n)])


# ---- samples, checkpoints -------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(g_ema, z_f, style_images, wbm_index=SAMPLE_WBM_INDEX):
    """Rows: reference style | natural G(z_f) | blended at i = wbm_index | blended at i = 0.

    Stored noise maps (randomize_noise=False): the grid draws no random numbers. Returns [3, H', W'] in [0, 1].
    """
    z_s = g_ema.embedder(style_images)
    natural, _ = g_ema([z_f], randomize_noise=False)
    middle, _ = g_ema([z_f], z_embed=z_s, add_weight_index=wbm_index, randomize_noise=False)
    full, _ = g_ema([z_f], z_embed=z_s, add_weight_index=0, randomize_noise=False)
    return tile_rows(torch.stack([style_images, natural, middle, full], dim=1))  # [N, 4, 3, H, W] -> [3, N*H, 4*W]


@torch.no_grad()
def latent_avg(g_ema, seed):
    """Truncation centre stored with the checkpoint, [1, style_dim]: mean of ``style`` over 4096 z_f.

    Drawn from its own generator, so saving a checkpoint never moves the training random streams.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(LATENT_AVG_SAMPLES, g_ema.style_dim, generator=gen).to(g_ema.input.input.device)
    return g_ema.style(z).mean(0, keepdim=True).cpu()


def _generator_state_without_encoder(g):
    return {k: v for k, v in g.state_dict().items() if not k.startswith("embedder.")}


def checkpoint_state(s, rng_states, log_window=None):
    """The complete, self-describing checkpoint of a training run.

    'g_ema' and 'latent_avg' are the release's layout (generate_image_pairs.py & co. load it as is);
    'g' leaves out the frozen style encoder, which is g_ema's (one copy of the 1.25 GB layer per file).
    """
    nets = s.nets
    return {
        **checkpoint_tag(CHECKPOINT_KIND, CHECKPOINT_VERSION),
        "g": _generator_state_without_encoder(nets.g),
        "g_ema": nets.g_ema.state_dict(),
        "latent_avg": latent_avg(nets.g_ema, s.opts.seed),
        **{name: d.state_dict() for name, d in nets.discriminators().items()},
        "g_optim": s.g_optim.state_dict(),
        "d_optim": s.d_optim.state_dict(),
        "g_scaler": s.g_scaler.state_dict(),
        "d_scaler": s.d_scaler.state_dict(),
        "queue": s.queue.state_dict(),
        "mean_path_length": s.mean_path_length.detach().cpu(),
        "iteration": s.iteration,
        "world_size": distributed.get_world_size(),
        "args": options_dict(s.opts),
        "rng": rng_states,
        "log_window": log_window,
    }


def load_training_checkpoint(s, path, log=print):
    """Restore a checkpoint_state() file into ``s`` (networks, optimizers, queue, counters). Returns its RNG states."""
    ckpt = load_tagged_checkpoint(path, CHECKPOINT_KIND, "train.py",
                                  "; to start from a released generator use --blendgan_ckpt", aliases=(LEGACY_TAG,))
    args = require_key(ckpt, "args", path)
    for name in ARCH_OPTIONS + ("style_pool_size", "queue_size"):
        if name in args and args[name] != getattr(s.opts, name):
            raise CheckpointError(f"checkpoint {path} was trained with --{name} {args[name]}, this run has "
                                  f"--{name} {getattr(s.opts, name)}")
    world = distributed.get_world_size()
    if args.get("batch") != s.opts.batch or ckpt.get("world_size") != world:
        log(f"note: {path} was written with --batch {args.get('batch')} on {ckpt.get('world_size')} process(es), "
            f"this run has --batch {s.opts.batch} on {world}: training continues, but not the exact data order "
            f"and random streams of the original run")
    if s.opts.eq8 is None:  # not chosen on the command line: the run goes on as it was trained
        s.opts.eq8 = args.get("eq8", EQ8_READINGS[0])
    elif args.get("eq8") != s.opts.eq8:
        log(f"note: {path} was trained with Eq. 8 read as {args.get('eq8', 'three generator passes (before --eq8)')!r}, "
            f"this run continues with --eq8 {s.opts.eq8}")
    nets = s.nets
    load_state_dict_strict(nets.g_ema, require_key(ckpt, "g_ema", path), f"{path}['g_ema']")
    _load_with_missing(nets.g, require_key(ckpt, "g", path), ("embedder.",), f"{path}['g']")
    for name, d in nets.discriminators().items():
        load_state_dict_strict(d, require_key(ckpt, name, path), f"{path}['{name}']")
    for name in ("g", "d"):
        load_optimizer_state(getattr(s, f"{name}_optim"), ckpt[f"{name}_optim"], log, f"{name}_optim")
        load_scaler_state(getattr(s, f"{name}_scaler"), ckpt[f"{name}_scaler"])
    s.queue.load_state_dict(ckpt["queue"])
    s.mean_path_length = ckpt["mean_path_length"].to(s.device)
    s.iteration = int(ckpt["iteration"])
    s.last_checkpoint = path
    s.log_window = ckpt.get("log_window")
    return ckpt.get("rng")


# ---- setting up and running ---------------------------------------------------------------------

def make_optimizers(nets, opts):
    """Adam(0, 0.99) at lr 0.002 with the lazy-regularisation correction (StyleGAN2 App. B).

    The fused implementation: one pass over the weights per step (the same update as the default one up
    to float rounding; the 4x4 layers of the three discriminators make the step a large part of a CPU
    iteration).
    """
    g_ratio = opts.g_reg_every / (opts.g_reg_every + 1)
    d_ratio = opts.d_reg_every / (opts.d_reg_every + 1)
    g_optim = torch.optim.Adam(nets.g_trainable(), lr=opts.lr * g_ratio, betas=(0 ** g_ratio, 0.99 ** g_ratio),
                               fused=True)
    d_optim = torch.optim.Adam(nets.d_parameters(), lr=opts.lr * d_ratio, betas=(0 ** d_ratio, 0.99 ** d_ratio),
                               fused=True)
    return g_optim, d_optim


def _grads_in_parameter_strides(module):
    """Hooks on the parameters with a size-1 dimension: a gradient whose strides differ from the
    parameter's is copied into the parameter's strides before it is accumulated (a copy of one weight's
    size, where it happens: the [1, 512] output weights, the 1x1 convolutions, G's [1, 512, 4, 4] input)."""
    def hook_for(p):
        def hook(grad):
            if grad is None or grad.stride() == p.stride():
                return grad
            return torch.empty_strided(p.shape, p.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
        return hook

    for p in module.parameters():
        if p.requires_grad and 1 in p.shape and p.dim() > 1:
            p.register_hook(hook_for(p))


def wrap_ddp(nets, device):
    """DDP wrappers of the modules that train; G's frozen style encoder is left out of DDP entirely.

    Buffers (FIR kernels, stored noise) are identical on every rank by construction and never change:
    synced once at construction, not before each forward. (The networks hold their 4-D parameters
    channels_last, as their activations, so the gradients arrive in the buckets' layout.) DDP compares
    every stride, also those of size-1 dimensions, which autograd's layout contract ignores: R1's double
    backward gives a [1, 512] output weight its gradient as the transpose of a [512, 1] tensor (strides
    (1, 1)); ``_grads_in_parameter_strides`` copies such a gradient into the parameter's strides.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    for module in (nets.g, *nets.discriminators().values()):
        _grads_in_parameter_strides(module)
    ids = [device.index] if device.type == "cuda" else None
    encoder = [f"embedder.{k}" for k in nets.g.embedder.state_dict()]
    DDP._set_params_and_buffers_to_ignore_for_model(nets.g, encoder)
    # forward_sync_buffers replaces the deprecated broadcast_buffers in recent torch; older ones know only the latter
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    kwargs = {"device_ids": ids, sync: False}
    g_train = DDP(nets.g, **kwargs)
    d_train = {name: DDP(d, **kwargs) for name, d in nets.discriminators().items()}
    return g_train, d_train


def setup(opts, log=print):
    """Networks, optimizers, queue and (under torchrun) DDP for ``opts``; resumes when asked.

    Returns (TrainState, RNG states to restore or None). All ranks build identical networks (same seed);
    DDP then checks that by broadcasting rank 0's.
    """
    device = distributed.init_distributed(opts.device)
    seed_everything(opts.seed, 0)  # identical initial weights on every rank
    nets = build_networks(opts, device)
    resume_path = resolve_resume(opts.resume, opts.out_dir)
    if opts.resume == "latest" and resume_path is None:
        log(f"--resume latest: no checkpoint in {opts.out_dir}/checkpoints yet, starting from scratch")
    if resume_path is None:
        opts.eq8 = opts.eq8 or EQ8_READINGS[0]
        if opts.stylegan2_ckpt and not opts.blendgan_ckpt:
            load_stylegan2(nets, opts.stylegan2_ckpt, log)
        if opts.blendgan_ckpt:
            load_blendgan_start(nets, opts.blendgan_ckpt, opts.stylegan2_ckpt, log)
        if opts.style_encoder_ckpt:
            load_style_encoder(nets.g, opts.style_encoder_ckpt, opts.vgg_ckpt, log)
        clamp_wbm(nets.g)
        if not (opts.stylegan2_ckpt or opts.blendgan_ckpt):
            log("G, g_ema and D_face start from random weights (no --stylegan2_ckpt)")
            copy_g_to_ema(nets)  # fresh G: g_ema starts equal to it
    g_optim, d_optim = make_optimizers(nets, opts)
    queue = StyleQueue(opts.queue_size, opts.style_dim, device)
    s = TrainState(opts, device, nets, g_optim, d_optim, queue)
    rng = None
    if resume_path is not None:
        rng = load_training_checkpoint(s, resume_path, log)
        log(f"resumed from {resume_path} at iteration {s.iteration}")
    if distributed.is_distributed():
        s.g_train, s.d_train = wrap_ddp(nets, device)
    return s, rng


def run_budget(opts, world_size):
    """The run's size as config.json and the first log line state it (--batch is per process)."""
    global_batch = opts.batch * world_size
    return {"global_batch": global_batch, "images_per_iteration": global_batch,
            "total_images": global_batch * opts.iter, "ema_half_life_images": ema_half_life_images(opts, world_size)}


def log_wbm(g):
    """WBM weights for the log: alpha_j = 1 - add_weight_j (the paper's style weight per layer)."""
    alpha = 1 - g.add_weight.detach().clamp(0, 1).view(-1).cpu()
    return {f"wbm/alpha_{j:02d}": float(a) for j, a in enumerate(alpha)}


def train(opts, log=None):
    """Run (or continue) a training run as ``opts`` says; returns the final TrainState.

    Raises NonFiniteLossError when losses stay NaN/inf (see NonFiniteGuard; the last written checkpoint is
    the good one).
    """
    require_valid(validate(resolve_defaults(opts)))
    main = distributed.is_main()
    log = log or (print if main else (lambda *a, **k: None))
    world = distributed.get_world_size()  # torchrun's WORLD_SIZE: setup() joins the process group
    budget = run_budget(opts, world)
    log(f"global batch {budget['global_batch']} ({opts.batch} per process x {world} process(es)) = "
        f"{budget['images_per_iteration']} images per iteration; {opts.iter} iterations = "
        f"{budget['total_images']} images in all (the paper: 8 x 200000 = 1.6M); "
        f"g_ema half-life {budget['ema_half_life_images']:g} images")
    s, rng = setup(opts, log)
    log(f"Eq. 8 read as '{opts.eq8}' (--eq8)")
    rank = distributed.get_rank()
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = DataStream(opts, rank, world, s.iteration, s.device)
    # Random streams: per rank, and continued exactly on resume. Set after the data loaders exist
    # (creating a DataLoader iterator draws from the global generator).
    if rng is not None:
        restore_rng_states(rng, opts.seed + s.iteration)
    else:
        seed_everything(opts.seed, rank)

    ckpts = CheckpointManager(opts.out_dir, keep=opts.keep_checkpoints)
    if main:
        checkpoint_bytes = estimated_checkpoint_bytes(
            [_generator_state_without_encoder(s.nets.g), s.nets.g_ema, *s.nets.discriminators().values(),
             s.queue.state_dict()], [s.g_optim, s.d_optim])
        log(f"checkpoints ~{size_text(checkpoint_bytes)} each, the last {opts.keep_checkpoints} kept in {ckpts.dir}")
        warning = ckpts.room_warning(checkpoint_bytes)
        if warning:
            log(warning)
    write_config(opts.out_dir, opts, world_size=world, start_iteration=s.iteration, **budget)
    sample_z = torch.randn(opts.n_sample, opts.style_dim, generator=torch.Generator().manual_seed(opts.seed))
    sample_z = sample_z.to(s.device)
    sample_styles = data.sample_styles(opts.n_sample).to(s.device)
    with RunMonitor(opts.out_dir, opts.iter, s.iteration, opts.batch * world, opts.progress,
                    window=s.log_window) as run:
        while s.iteration < opts.iter:
            x_f, x_s = next(data)
            if opts.flip:
                x_f, x_s = random_flip(x_f), random_flip(x_s)
            stats = train_iteration(s, Batch(x_f, x_s, encode_styles(s, x_s)))
            step = s.iteration
            run.update(stats, d=f"{stats['d_total']:.3f}", g=f"{stats['g_total']:.3f}")
            if run.due(step, opts.log_every):
                run.log(step, {**stats, **{f"mean/{k}": v for k, v in run.means().items()}, **log_wbm(s.nets.g)})
            with run.aside():
                if main and run.due(step, opts.sample_every):
                    grid = sample_grid(s.nets.g_ema, sample_z, sample_styles)
                    save_grid(grid, os.path.join(opts.out_dir, "samples", f"{step:06d}.png"))
                    if run.logger.writer is not None:  # cells of at most 256 px in the event file
                        scale = min(1.0, TENSORBOARD_CELL / opts.size)
                        small = F.interpolate(grid[None], scale_factor=scale, mode="area")[0] if scale < 1 else grid
                        run.logger.add_image("samples", small, step)
                if run.due(step, opts.save_every) and s.nonfinite.healthy:
                    # (during a run of skipped non-finite steps the last good checkpoint stays the newest)
                    rng_states = gather_rng_states()  # a collective: every rank takes part
                    state = checkpoint_state(s, rng_states, run.window_state()) if main else None
                    s.last_checkpoint = ckpts.save(step, state)
    return s
