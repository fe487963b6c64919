"""Self-supervised training of the style encoder E_style (paper Sec. 3.1 and A.1).

A frozen ImageNet VGG-19 gives the Gram matrices of relu1_2 ... relu5_4 (``GramEmbedder``, the same
pooling and [-1, 1] input as at inference); E_style's predictor MLP maps them to z_s and the SimCLR
projection head g (``Projector``) to h; NT-Xent (Eq. 2) pulls the two affine views of each image
together and pushes the other 2N - 2 views of the global batch away. Only the two MLPs learn.

Data and randomness, built for exact resume and for any number of processes:
- ``StreamBatchSampler``: one endless shuffled stream of (position, image index) shared by all ranks;
  step t of rank r takes a fixed slice of it, so the global batch of a step does not depend on how it
  is split over processes, and a resumed run starts at the position stored in the checkpoint.
- ``AffineViewDataset``: each item's views are drawn from a generator seeded by (seed, position), so
  the augmentation of every sample is fixed by its position alone (any number of DataLoader workers,
  any world size). The views are affine only (random resized crop, flip, rotation, shear, translation;
  one bilinear resampling that never leaves the image, so no fill colour): colour is style.

Multi-process: DDP over the trainable head, the projections of all ranks gathered (the local part
with its gradient) so that NT-Xent runs over the global batch, the loss scaled by the world size
because DDP averages gradients (see distributed.all_gather_with_grad).

Checkpoints (``out_dir/checkpoints/NNNNNN.pt``, rank 0 writes, every rank reads on resume, so across
nodes ``out_dir`` must be on a shared filesystem): ``kind``, ``version``, ``step``, ``samples_seen``
(stream position), ``world_size``, ``global_batch``, ``style_encoder`` (the full StyleEncoder state
dict, VGG-19 included: what ``Generator(...).embedder`` loads unchanged), ``projector``,
``style_encoder_config``, ``optimizer``, ``options``, ``rng`` (one entry per rank). The final
``out_dir/style_encoder.pt`` holds the same ``style_encoder``/``projector``/``style_encoder_config``
without the training state. At style_dim 512 a checkpoint is about 3.8 GB (the 610,304 x 512 first
layer and its two Adam moments) and the weights-only file about 1.3 GB.
"""
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

import distributed
import trainutil
from checkpoint import CheckpointError, load_state_dict_strict, save_checkpoint
from dataset import MultiResolutionDataset, lmdb_problems
from fileio import folder_problems
from model_zoo import file_not_found
from style_encoder import STYLE_POOL_SIZE, VGG19_WEIGHTS_FILE, Projector, StyleEncoder, gram_dim, nt_xent
from utils import img2ten

CHECKPOINT_KIND = "blendgan_style_encoder_training"
CHECKPOINT_VERSION = 1
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Options that fix the weights' shapes or what they compute: a resumed run must use the checkpoint's values.
ARCHITECTURE_OPTIONS = ("style_dim", "n_mlp", "proj_layers", "style_pool_size")


@dataclass
class TrainOptions:
    """Everything a run needs; train_style_encoder.py fills it from the command line (A.1 defaults)."""
    lmdb: list
    out_dir: str
    size: int = 256  # LMDB resolution read, and the size of the augmented views
    batch: int = 64  # per process: global batch = batch x processes (A.1: 256 = 4 GPUs x 64)
    iter: int = 500_000
    lr: float = 0.002
    beta1: float = 0.0
    beta2: float = 0.99
    temperature: float = 0.5  # tau of Eq. 2; not stated in the paper, 0.5 is a common SimCLR setting
    style_dim: int = 512
    n_mlp: int = 4  # E_style predictor MLP layers (fixed to 4 by the generator's embedder)
    proj_layers: int = 4  # projection head layers: the release's Projector default; the paper says 2
    style_pool_size: int = STYLE_POOL_SIZE
    vgg_ckpt: str = None
    crop_scale: tuple = (0.5, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    shear: float = 5.0  # degrees
    flip: float = 0.5  # probability of a horizontal flip
    save_every: int = 5000
    keep: int = 3
    log_every: int = 100
    resume: str = None  # a checkpoint path, or 'latest' (newest in out_dir/checkpoints, if any)
    seed: int = 0
    device: str = None  # default: cuda if available, else cpu
    amp: str = "off"  # off | bf16 | fp16: autocast for the frozen VGG (Gram products stay float32)
    channels_last: str = "auto"  # auto (on for CUDA) | on | off
    num_workers: int = 4
    export: bool = True  # write out_dir/style_encoder.pt (weights only) at the end
    progress: bool = True  # tqdm bar on rank 0


def validate(options):
    """Clear messages for impossible options; returns a list of problems (empty when fine)."""
    problems = []
    positive = ("size", "batch", "iter", "style_dim", "n_mlp", "proj_layers", "style_pool_size", "save_every",
                "keep", "log_every")
    for name in positive:
        if getattr(options, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(options, name)}")
    if options.batch >= 1 and options.batch * distributed.get_world_size() < 2:
        problems.append(f"--batch {options.batch} on one process: NT-Xent's negatives are the other images of the "
                        "global batch (--batch x processes), which must be at least 2")
    if not options.temperature > 0:
        problems.append(f"--temperature must be positive, got {options.temperature}")
    if not options.lr > 0:
        problems.append(f"--lr must be positive, got {options.lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(options, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(options, name)}")
    if options.amp not in AMP_DTYPES:
        problems.append(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {options.amp}")
    if options.channels_last not in ("auto", "on", "off"):
        problems.append(f"--channels_last must be auto, on or off, got {options.channels_last}")
    if options.style_pool_size < 16:
        problems.append("--style_pool_size must be at least 16 (VGG-19 halves it four times before relu5_4)")
    lo, hi = options.crop_scale
    if not 0 < lo <= hi <= 1:
        problems.append(f"--crop_scale must satisfy 0 < min <= max <= 1, got {options.crop_scale}")
    lo, hi = options.crop_ratio
    if not 0 < lo <= hi:
        problems.append(f"--crop_ratio must satisfy 0 < min <= max, got {options.crop_ratio}")
    if not 0 <= options.rotate < 45 or not 0 <= options.shear < 45:
        problems.append("--rotate and --shear are small angles in degrees, in [0, 45)")
    if not 0 <= options.flip <= 1:
        problems.append(f"--flip is a probability, got {options.flip}")
    if options.num_workers < 0:
        problems.append("--num_workers must be >= 0")
    problems += lmdb_problems([("LMDB", path) for path in options.lmdb], options.size)
    problems += folder_problems("--out_dir", options.out_dir)
    if options.vgg_ckpt is not None and not os.path.isfile(options.vgg_ckpt):
        problems.append(file_not_found("--vgg_ckpt", options.vgg_ckpt, VGG19_WEIGHTS_FILE))
    if options.resume not in (None, "", "latest") and not os.path.isfile(options.resume):
        problems.append(f"--resume {options.resume}: file not found")
    return problems


# ---- data: one resumable stream, seeded affine views ------------------------------------------

def stream_seed(seed, *parts):
    """A 63-bit generator seed from integers (seed, *parts), e.g. (seed, epoch) or (seed, position)."""
    text = ":".join(str(int(v)) for v in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class StreamBatchSampler(Sampler):
    """Endless batches of (position, index) for one rank, cut from a stream shared by all ranks.

    The stream visits the dataset in epochs, each a permutation drawn from stream_seed(seed, 0, epoch):
    position p holds index perm_{p // n}[p % n]. Step t of rank r takes positions
    start + (t * world_size + r) * batch_size + [0, batch_size), so the ranks' batches, concatenated
    in rank order, are positions start + t * G + [0, G) with G the global batch, whatever the split.
    start: positions already consumed (a checkpoint's ``samples_seen``).
    """

    def __init__(self, dataset_size, batch_size, rank=0, world_size=1, seed=0, start=0):
        if dataset_size < 1:
            raise ValueError("StreamBatchSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start

    def epoch_order(self, epoch):
        generator = torch.Generator().manual_seed(stream_seed(self.seed, 0, epoch))
        return torch.randperm(self.n, generator=generator)  # [n]

    def __iter__(self):
        step = 0
        epoch, order = -1, None
        while True:
            first = self.start + (step * self.world_size + self.rank) * self.batch_size
            batch = []
            for p in range(first, first + self.batch_size):
                if p // self.n != epoch:
                    epoch = p // self.n
                    order = self.epoch_order(epoch)
                batch.append((p, int(order[p % self.n])))
            yield batch
            step += 1


def random_affine_theta(generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), rotate=10.0, shear=5.0, flip=0.5):
    """A random affine map from output to input coordinates, as affine_grid's theta [2, 3].

    Coordinates are normalised to [-1, 1] on both sides. The map is crop (area fraction in ``scale``,
    aspect in ``ratio``, log-uniform) x shear x rotation x optional horizontal flip; the crop shrinks if
    the rotated, sheared square would reach outside the image, and its centre is drawn uniformly
    among the positions that keep it inside (the translation). All draws come from ``generator``.
    """
    u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    sx, sy = math.sqrt(area * aspect), math.sqrt(area / aspect)  # half-widths, in units of the half-image
    angle = math.radians(rotate * (2 * u[2] - 1))
    sh = math.tan(math.radians(shear * (2 * u[3] - 1)))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    a = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([sx, sy])  # [2, 2]
    extent = np.abs(a).sum(axis=1)  # half-extent of the mapped output square along x and y
    if extent.max() > 1:
        a = a / extent.max()
        extent = extent / extent.max()
    centre = [(1 - extent[0]) * (2 * u[4] - 1), (1 - extent[1]) * (2 * u[5] - 1)]
    if torch.rand(1, generator=generator, dtype=torch.float64).item() < flip:
        a = a @ np.diag([-1.0, 1.0])
    theta = np.concatenate([a, np.array(centre)[:, None]], axis=1)  # [2, 3]
    return torch.tensor(theta, dtype=torch.float32)


def affine_warp(image, theta, size, mode="bilinear"):
    """Resample image [3, H, W] (or [N, 3, H, W]) through theta [2, 3] (or [N, 2, 3]) to size x size.

    Pixel-centre convention (align_corners=False): the identity theta returns the image unchanged
    when size equals its side. Colours are only interpolated, never transformed.
    """
    batched = image.ndim == 4
    x = image if batched else image[None]
    t = theta if theta.ndim == 3 else theta[None].expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out if batched else out[0]


class AffineViewDataset(Dataset):
    """Images of one or several LMDBs as ``n_views`` affine views: item (position, index) -> [V, 3, S, S].

    Each image is converted exactly as at inference (utils.img2ten: RGB in [-1, 1]); its views are drawn
    from a generator seeded by stream_seed(seed, 1, position). A plain integer item is its own position.
    """

    def __init__(self, paths, size, resolution=None, n_views=2, seed=0, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 rotate=10.0, shear=5.0, flip=0.5):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.images = ConcatDataset([MultiResolutionDataset(p, None, resolution or size) for p in paths])
        self.size = size
        self.n_views = n_views
        self.seed = seed
        self.augment = dict(scale=tuple(scale), ratio=tuple(ratio), rotate=rotate, shear=shear, flip=flip)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        position, index = item if isinstance(item, tuple) else (item, item)
        x = img2ten(np.asarray(self.images[index]))[0]  # [3, H, W] in [-1, 1]
        generator = torch.Generator().manual_seed(stream_seed(self.seed, 1, position))
        thetas = torch.stack([random_affine_theta(generator, **self.augment) for _ in range(self.n_views)])
        return affine_warp(x[None].expand(self.n_views, -1, -1, -1), thetas, self.size)  # [V, 3, S, S]


# ---- model pieces --------------------------------------------------------------------------------

class SimCLRHead(nn.Module):
    """The trainable part: E_style's predictor MLP, then the projection head g.

    Gram features [N, gram_dim] -> (z_s [N, style_dim], h [N, style_dim]). The modules are E_style's
    own ``embedder_mlp`` and the ``Projector`` (shared, not copied), so training them trains E_style.
    """

    def __init__(self, embedder_mlp, projector):
        super().__init__()
        self.embedder_mlp = embedder_mlp
        self.projector = projector

    def forward(self, gram):
        z = self.embedder_mlp(gram)
        return z, self.projector(z)


def gram_features(encoder, x, amp_dtype=None, channels_last=False):
    """Frozen part of E_style: pool -> VGG-19 -> Gram matrices, [N, gram_dim] float32, no gradient.

    Under ``amp_dtype`` autocast runs the VGG convolutions in bf16/fp16; gram_matrix itself always
    computes in float32.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        return encoder.embedder(x).float()


def positive_top1(h1, h2):
    """Share of the 2N views whose most similar other view (cosine) is its positive partner."""
    n = h1.shape[0]
    h = F.normalize(torch.cat([h1, h2]).float(), dim=1)  # [2N, D]
    sim = (h @ h.t()).fill_diagonal_(float("-inf"))  # [2N, 2N]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(h.device)
    return (sim.argmax(dim=1) == target).float().mean()


def contrastive_loss(head, encoder, views, temperature, amp_dtype=None, channels_last=False):
    """NT-Xent over the global batch for this rank's views [B, 2, 3, S, S]; returns (loss, top-1 acc).

    The loss is the same number on every rank (all projections are gathered); its gradient reaches
    this rank's samples only (distributed.all_gather_with_grad).
    """
    b = views.shape[0]
    x = torch.cat([views[:, 0], views[:, 1]])  # [2B, 3, S, S]: first views, then second views
    _, h = head(gram_features(encoder, x, amp_dtype, channels_last))  # [2B, style_dim]
    h1 = distributed.all_gather_with_grad(h[:b])  # [W*B, style_dim]
    h2 = distributed.all_gather_with_grad(h[b:])  # [W*B, style_dim]
    return nt_xent(h1, h2, temperature), positive_top1(h1.detach(), h2.detach())


def build_models(options, load_vgg=True):
    """(StyleEncoder, Projector) on the CPU; ImageNet VGG-19 loaded unless load_vgg is False."""
    encoder = StyleEncoder(options.style_dim, options.n_mlp, load_pretrained_vgg=load_vgg,
                           vgg_ckpt=options.vgg_ckpt, pool_size=options.style_pool_size)
    projector = Projector(options.style_dim, options.proj_layers)
    return encoder, projector


def style_encoder_config(options):
    """What a user of the weights needs to rebuild E_style (StyleEncoder's arguments)."""
    return {"style_dim": options.style_dim, "n_mlp": options.n_mlp, "pool_size": options.style_pool_size,
            "proj_layers": options.proj_layers, "gram_dim": gram_dim()}


def load_training_checkpoint(path, options):
    """Read a checkpoint of this trainer, checking that its architecture fits ``options``."""
    ckpt = trainutil.load_tagged_checkpoint(path, CHECKPOINT_KIND, "style-encoder training")
    saved = ckpt.get("options", {})
    differ = [f"{k}={saved.get(k)} (command line {getattr(options, k)})" for k in ARCHITECTURE_OPTIONS
              if saved.get(k) != getattr(options, k)]
    if differ:
        raise CheckpointError(f"checkpoint {path}: built with {', '.join(differ)}; pass the checkpoint's values")
    return ckpt


@dataclass
class TrainResult:
    step: int
    checkpoint: str  # the last checkpoint written (None if none)
    export: str  # out_dir/style_encoder.pt, or None
    encoder: StyleEncoder
    projector: Projector
    history: list = field(default_factory=list)  # [{"step", "loss", "acc"}] of every iteration run here


def _scalar(x):
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def train(options):
    """Run (or continue) a training; returns a TrainResult. Raises NonFiniteLossError on a NaN/inf loss."""
    trainutil.require_valid(validate(options))
    device = distributed.init_distributed(options.device or trainutil.default_device())
    try:
        return _train(options, device)
    finally:
        distributed.cleanup()


def _train(options, device):
    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = distributed.is_main()
    global_batch = options.batch * world
    amp_dtype = AMP_DTYPES[options.amp]
    channels_last = options.channels_last == "on" or (options.channels_last == "auto" and device.type == "cuda")
    manager = trainutil.CheckpointManager(options.out_dir, options.keep)
    resume = trainutil.resolve_resume(options.resume, options.out_dir)

    ckpt = load_training_checkpoint(resume, options) if resume else None
    trainutil.seed_everything(options.seed, 0)  # identical initial weights on every rank
    encoder, projector = build_models(options, load_vgg=ckpt is None)
    if ckpt is not None:
        load_state_dict_strict(encoder, ckpt["style_encoder"], f"{resume} ['style_encoder']")
        load_state_dict_strict(projector, ckpt["projector"], f"{resume} ['projector']")
    encoder.to(device)
    projector.to(device)
    encoder.embedder.eval().requires_grad_(False)  # frozen VGG-19 (no dropout/BN: eval is for clarity)
    if channels_last:
        encoder.embedder.to(memory_format=torch.channels_last)
    head = SimCLRHead(encoder.embedder_mlp, projector).train()
    trainable = list(head.parameters())
    optimizer = torch.optim.Adam(trainable, lr=options.lr, betas=(float(options.beta1), float(options.beta2)))
    step, samples_seen, rng, window = 0, 0, None, None
    if ckpt is not None:
        trainutil.load_optimizer_state(optimizer, ckpt["optimizer"], print if main else None)
        step, samples_seen, rng = int(ckpt["step"]), int(ckpt["samples_seen"]), ckpt.get("rng")
        window = ckpt.get("log_window")
    del ckpt
    model = head
    if world > 1:
        model = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = AffineViewDataset(options.lmdb, options.size, seed=options.seed, scale=options.crop_scale,
                                ratio=options.crop_ratio, rotate=options.rotate, shear=options.shear, flip=options.flip)
    sampler = StreamBatchSampler(len(dataset), options.batch, rank, world, options.seed, start=samples_seen)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=options.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=options.num_workers > 0)

    if main:
        os.makedirs(options.out_dir, exist_ok=True)
        checkpoint_bytes = trainutil.estimated_checkpoint_bytes([encoder, projector], [optimizer])
        print(f"style encoder training: {len(dataset)} images, global batch {global_batch} = {world} process(es) "
              f"x {options.batch}, {options.iter} iterations, device {device}, amp {options.amp}, checkpoints "
              f"~{trainutil.size_text(checkpoint_bytes)} each"
              + (f", resuming at step {step} from {resume}" if resume else ""), flush=True)
        warning = manager.room_warning(checkpoint_bytes)
        if warning:
            print(warning, flush=True)
    trainutil.write_config(options.out_dir, options, world_size=world, global_batch=global_batch,
                           gram_dim=gram_dim(), torch_version=torch.__version__)

    last_checkpoint = resume
    history = []
    with trainutil.RunMonitor(options.out_dir, options.iter, step, global_batch, options.progress,
                              desc="E_style", window=window) as run:
        batches = iter(loader)  # creating the iterator draws a base seed from the global generator
        # The random streams start (or continue from the checkpoint) here, right before the first step:
        # what ran since the weights were seeded (the loader's iterator draws a seed) must not shift them,
        # or a resumed run would drift from an uninterrupted one. Writing a checkpoint draws nothing.
        if rng is not None:
            trainutil.restore_rng_states(rng, options.seed)
        else:
            trainutil.seed_everything(options.seed, rank)
        while step < options.iter:
            views = next(batches).to(device, non_blocking=True)  # [B, 2, 3, S, S]
            loss, acc = contrastive_loss(model, encoder, views, options.temperature, amp_dtype, channels_last)
            optimizer.zero_grad(set_to_none=False)  # reuse the gradient buffers (1.25 GB for the first layer)
            (loss * world).backward()  # DDP averages over ranks; the gathered loss needs the sum
            trainutil.check_finite({"nt_xent": loss}, step + 1, last_checkpoint, trainable)
            optimizer.step()
            step += 1
            samples_seen += global_batch
            loss_v, acc_v = _scalar(loss), _scalar(acc)
            history.append({"step": step, "loss": loss_v, "acc": acc_v})
            run.update({"loss": loss_v, "acc": acc_v}, loss=f"{loss_v:.4f}", acc=f"{acc_v:.3f}")
            if run.due(step, options.log_every):
                means = run.means()
                run.log(step, {"loss/nt_xent": means["loss"], "metrics/positive_top1": means["acc"],
                               "lr": optimizer.param_groups[0]["lr"]})
            if run.due(step, options.save_every):
                with run.aside():
                    state = {
                        **trainutil.checkpoint_tag(CHECKPOINT_KIND, CHECKPOINT_VERSION), "step": step,
                        "samples_seen": samples_seen, "world_size": world, "global_batch": global_batch,
                        "style_encoder": encoder.state_dict(), "projector": projector.state_dict(),
                        "style_encoder_config": style_encoder_config(options), "optimizer": optimizer.state_dict(),
                        "options": trainutil.options_dict(options), "rng": trainutil.gather_rng_states(),
                        "log_window": run.window_state(),
                    }
                    last_checkpoint = manager.save(step, state)
                    distributed.barrier()

    export = None
    if options.export and main:
        export = os.path.join(options.out_dir, "style_encoder.pt")
        save_checkpoint({"kind": "blendgan_style_encoder", "step": step, "style_encoder": encoder.state_dict(),
                         "projector": projector.state_dict(), "style_encoder_config": style_encoder_config(options),
                         "options": trainutil.options_dict(options)}, export)
    return TrainResult(step, last_checkpoint, export, encoder, projector, history)

