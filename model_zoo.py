"""Every external weight file the project reads: one manifest, and the download / verify logic for it.

Each file has one row in MANIFEST: its name, what reads it, where its publisher puts it, and how it is
checked. A file is checked by its SHA-256 where one is published (torchvision and pytorch-fid put a
prefix of it in the file name) and always by its structure: it loads with the project's one safe loader
(checkpoint.load_checkpoint, ``weights_only``) and has exactly the keys and shapes the project's own
modules expect, built on the meta device (for ``blendgan.pt`` that is the release's full g_ema schema).
Its SHA-256 is printed so that it can be pinned.

Downloads stream into a partial file beside the target (``.NAME.part``), resume from it with an HTTP
range request after an interruption, and are moved into place only after the checks pass; a file that
fails them is deleted, so the target is always absent, the old file, or a verified new one. Google Drive
files go through gdown (it follows Drive's confirmation page and names the quota page), then through the
same checks. The scripts' missing-file messages come from missing_files_message(), and the modules that
load a torch-hub weights file at run time (evaluation.py and psp_training.py, for metrics.py's FID
Inception and LPIPS AlexNet) find it with pretrained_file(). Nothing happens at import.
"""
import errno
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch

from checkpoint import CheckpointError, html_title, load_checkpoint, require_key
from fileio import disk_full_message, is_disk_full

COMMAND = "python download_models.py"
MIRROR_ENV = "BLENDGAN_MIRROR"  # URL prefix that replaces every source, like --mirror
DRIVE_PREFIX = "gdrive:"  # a source "gdrive:ID" is a Google Drive file id
RELEASE_README = "https://github.com/onion-liu/BlendGAN#pretrained-models"
CHUNK = 1 << 20
TIMEOUT_S = 30

# Published locations (checked against torchvision / pytorch-fid by the tests; metrics.py reads them here).
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"  # VGG19_Weights.IMAGENET1K_V1
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # AlexNet_Weights.IMAGENET1K_V1
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")  # pytorch_fid.inception.FID_WEIGHTS_URL


@dataclass(frozen=True)
class WeightFile:
    """One row of the manifest.

    sources: tried in order; "gdrive:ID" is a Google Drive file id, anything else a URL.
    layout: key of LAYOUTS (how the structure is checked), with layout_args for it.
    home: "dir" (the --dir folder, pretrained_models/ by default) or "hub" (torch hub's checkpoints
        folder, where torchvision, pytorch-fid and pretrained_file() look for these files).
    sha256: full published hash, or sha256_prefix: the prefix torch.hub puts in the file name.
    approx_mb: size as its publisher states it (None: not published).
    page: where the publisher documents the file (for the manual fallback).
    """
    name: str
    used_by: str
    sources: tuple
    layout: str
    layout_args: dict = field(default_factory=dict)
    home: str = "dir"
    sha256: str = None
    sha256_prefix: str = None
    approx_mb: float = None
    page: str = ""
    note: str = ""


MANIFEST = (
    WeightFile("blendgan.pt", "inference (all three scripts), evaluate.py, pSp training",
               ("gdrive:1eF04jKMLAb9DvzI72m8Akn5ykWf3EafE",), "blendgan",
               dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2),
               page=RELEASE_README, note="BlendGAN authors' generator with the style encoder inside"),
    WeightFile("psp_encoder.pt", "style_transfer_folder.py, gen_video.py",
               ("gdrive:14nevG94hNkkwaoK5eJLF1iv78cv5O8fN",), "psp", dict(output_size=1024),
               page=RELEASE_README, note="BlendGAN authors' pSp encoder for that generator"),
    WeightFile("style_encoder.pt", "optional: no script of the release reads it",
               ("gdrive:1EaM0ZYsAMdPkbRz0smLNIlJ1rxVAhbEz",), "weights_dict",
               page=RELEASE_README, note="BlendGAN authors' individual style encoder; layout not fixed by "
                                         "any code, so only a weights-only dict is checked"),
    WeightFile("stylegan2-ffhq-config-f.pt", "train.py --stylegan2_ckpt (BlendGAN training start)",
               ("gdrive:1EM87UquaoQmk17Q8d5kYIAHqu0dkYqdT",), "stylegan2",
               dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2),
               page="https://github.com/eladrich/pixel2style2pixel#pretrained-models",
               note="NVIDIA's FFHQ config-f converted by rosinality's convert_weight.py; the file id is the "
                    "one pSp's README links ('FFHQ StyleGAN'); rosinality's README links a Drive folder"),
    WeightFile("model_ir_se50.pth", "train_psp.py --id_weights / --encoder_backbone (ArcFace identity loss)",
               ("gdrive:1KW7bjndL3QG3sxBbZxreGHigcCCpsDgn",), "ir_se50",
               page="https://github.com/eladrich/pixel2style2pixel#pretrained-models",
               note="TreB1eN's IR-SE-50 as pSp's README links it ('IR-SE50 Model')"),
    WeightFile("vgg19-dcbb9e9d.pth", "style encoder training (ImageNet VGG-19 of E_style)",
               (VGG19_URL,), "torchvision", dict(arch="vgg19"), home="hub", sha256_prefix="dcbb9e9d",
               approx_mb=548.1, page="torchvision.models.VGG19_Weights.IMAGENET1K_V1"),
    WeightFile("alexnet-owt-7be5be79.pth", "LPIPS (metrics.py, evaluate.py, pSp training)",
               (ALEXNET_URL,), "torchvision", dict(arch="alexnet"), home="hub", sha256_prefix="7be5be79",
               approx_mb=233.1, page="torchvision.models.AlexNet_Weights.IMAGENET1K_V1"),
    WeightFile("pt_inception-2015-12-05-6726825d.pth", "FID (metrics.py, evaluate.py)",
               (INCEPTION_URL,), "fid_inception", home="hub", sha256_prefix="6726825d",
               page="pytorch_fid.inception.FID_WEIGHTS_URL"),
)
INFERENCE_FILES = ("blendgan.pt", "psp_encoder.pt")  # what the command fetches with no name given


class LayoutError(ValueError):
    """A file that loads but does not have the structure its manifest row asks for."""


# ----------------------------------------------------------------------------------------------------
# Structure: the layout each file must have, from the project's own modules on the meta device


def meta_state_dict(build):
    with torch.device("meta"):
        return build().state_dict()


def compare_layout(state_dict, expected, what, skip=()):
    """Raise LayoutError unless ``state_dict`` has exactly the keys of ``expected`` with the same shapes
    and floating/integer kinds (a half-precision export is accepted). Keys ending with one of ``skip``
    (e.g. BatchNorm counters older files lack) are left out on both sides."""
    if not isinstance(state_dict, dict):
        raise LayoutError(f"{what}: expected a dict of tensors, found {type(state_dict).__name__}")
    keep = lambda k: not (isinstance(k, str) and k.endswith(tuple(skip))) if skip else True  # noqa: E731
    have = {k: v for k, v in state_dict.items() if keep(k)}
    want = {k: v for k, v in expected.items() if keep(k)}
    missing = [k for k in want if k not in have]
    unexpected = [str(k) for k in have if k not in want]
    wrong = []
    for k in want:
        if k in have:
            v = have[k]
            if not isinstance(v, torch.Tensor):
                wrong.append(f"{k} is a {type(v).__name__}")
            elif tuple(v.shape) != tuple(want[k].shape) or v.is_floating_point() != want[k].is_floating_point():
                wrong.append(f"{k} {list(v.shape)} {str(v.dtype)[6:]} vs {list(want[k].shape)} {str(want[k].dtype)[6:]}")
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs expected)", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    if parts:
        raise LayoutError(f"{what}: " + "; ".join(parts))


def generator_layout(size, style_dim, n_mlp, channel_multiplier):
    """g_ema of the release: Generator(...) with its embedded style encoder (load_pretrained_vgg=False)."""
    from model import Generator

    return meta_state_dict(lambda: Generator(size, style_dim, n_mlp, channel_multiplier=channel_multiplier,
                                             load_pretrained_vgg=False))


def check_blendgan(ckpt, size, style_dim, n_mlp, channel_multiplier):
    compare_layout(require_key(ckpt, "g_ema", "file"), generator_layout(size, style_dim, n_mlp, channel_multiplier),
                   f"g_ema (expected Generator({size}, {style_dim}, {n_mlp}, channel_multiplier={channel_multiplier}))")
    return ""


def check_psp(ckpt, output_size):
    from psp_encoder.encoders import STYLE_DIM, GradualStyleEncoder
    from psp_encoder.psp_encoders import ENCODER_PREFIX, LATENT_AVG, WEIGHTS_WRAPPER, _broadcasts, n_styles_for

    n_styles = n_styles_for(output_size)
    weights = ckpt[WEIGHTS_WRAPPER] if WEIGHTS_WRAPPER in ckpt else ckpt
    if not isinstance(weights, dict):
        raise LayoutError(f"'{WEIGHTS_WRAPPER}' is a {type(weights).__name__}, not a dict of weights")
    # The release's rule: keys whose first 7 characters are 'encoder' lose the first 8; others are ignored.
    sd = {k[len(ENCODER_PREFIX) + 1:]: v for k, v in weights.items()
          if isinstance(k, str) and k[:len(ENCODER_PREFIX)] == ENCODER_PREFIX}
    compare_layout(sd, meta_state_dict(lambda: GradualStyleEncoder(50, "ir_se", n_styles)),
                   f"'{ENCODER_PREFIX}.*' weights (expected a pSp encoder for {output_size} px, {n_styles} style heads)")
    latent_avg = ckpt.get(LATENT_AVG)
    if not isinstance(latent_avg, torch.Tensor) or not _broadcasts(latent_avg.shape, n_styles):
        raise LayoutError(f"top-level '{LATENT_AVG}' must be a [{STYLE_DIM}] or [{n_styles}, {STYLE_DIM}] tensor, "
                          f"found {list(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else latent_avg!r}")
    return ""


def check_stylegan2(ckpt, size, style_dim, n_mlp, channel_multiplier):
    """rosinality's layout {g_ema, latent_avg, g, d}: generators without BlendGAN's style branch."""
    from model import BLENDGAN_ONLY_KEYS, Discriminator

    g = {k: v for k, v in generator_layout(size, style_dim, n_mlp, channel_multiplier).items()
         if not k.startswith(BLENDGAN_ONLY_KEYS)}
    compare_layout(require_key(ckpt, "g_ema", "file"), g, f"g_ema (expected a StyleGAN2 generator, {size} px)")
    if "g" in ckpt:
        compare_layout(ckpt["g"], g, "g")
    if "d" in ckpt:
        compare_layout(ckpt["d"], meta_state_dict(lambda: Discriminator(size, channel_multiplier)), "d")
    absent = [k for k in ("g", "d") if k not in ckpt]
    return f"no {'/'.join(absent)} entry: train.py --stylegan2_ckpt needs g, g_ema and d" if absent else ""


def check_ir_se50(ckpt):
    from psp_encoder.arcface import ArcFaceIRSE50

    compare_layout(ckpt, meta_state_dict(ArcFaceIRSE50), "ArcFace IR-SE-50 weights")
    return ""


def check_torchvision(ckpt, arch):
    import torchvision

    compare_layout(ckpt, meta_state_dict(lambda: getattr(torchvision.models, arch)(weights=None)),
                   f"torchvision {arch} weights")
    return ""


def check_fid_inception(ckpt):
    from metrics import fid_inception_v3

    compare_layout(ckpt, meta_state_dict(fid_inception_v3), "FID Inception-v3 weights", skip=("num_batches_tracked",))
    return ""


def check_weights_dict(ckpt):
    tensors = sum(isinstance(v, torch.Tensor) for v in ckpt.values())
    nested = sum(isinstance(v, dict) for v in ckpt.values())
    if not tensors and not nested:
        raise LayoutError("holds no tensors or state dicts")
    return ""


LAYOUTS = dict(blendgan=check_blendgan, psp=check_psp, stylegan2=check_stylegan2, ir_se50=check_ir_se50,
               torchvision=check_torchvision, fid_inception=check_fid_inception, weights_dict=check_weights_dict)


# ----------------------------------------------------------------------------------------------------
# Checks of a file on disk


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class FileProblem(Exception):
    """A file that must not be used: one line saying why."""


def verify_file(entry, path):
    """Check ``path`` against its manifest row. Returns (sha256, note); raises FileProblem."""
    if os.path.getsize(path) == 0:
        raise FileProblem("file is empty")
    title = html_title(path)
    if title is not None:
        raise FileProblem(f"is an HTML page ('{title}'), not the weights: Drive's quota or confirmation page, "
                          f"or a proxy's error page")
    digest = sha256_of(path)
    if entry.sha256 and digest != entry.sha256:
        raise FileProblem(f"SHA-256 {digest} differs from the published {entry.sha256}")
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
        raise FileProblem(f"SHA-256 {digest} does not start with {entry.sha256_prefix} (the hash in its published name)")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise FileProblem(str(e).split(": ", 1)[-1]) from None
    try:
        note = LAYOUTS[entry.layout](ckpt, **entry.layout_args)
    except (LayoutError, CheckpointError) as e:  # CheckpointError: require_key's missing entry
        raise FileProblem(f"wrong layout: {str(e).removeprefix('checkpoint file: ')}") from None
    return digest, note


def hub_checkpoints_dir():
    """torch hub's checkpoints folder (torchvision, pytorch-fid and pretrained_file() keep files there)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def target_path(entry, folder):
    home = hub_checkpoints_dir() if entry.home == "hub" else folder
    return os.path.join(home, entry.name)


def part_path(target):
    return os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.part")


def file_status(entry, folder):
    """('verified', sha256 + note) / ('missing', '') / ('bad', why) for the file at its target."""
    path = target_path(entry, folder)
    if not os.path.isfile(path):
        return "missing", ""
    try:
        digest, note = verify_file(entry, path)
    except FileProblem as e:
        return "bad", str(e)
    return "verified", f"sha256 {digest}" + (f"; note: {note}" if note else "")


# ----------------------------------------------------------------------------------------------------
# Downloads


class Unreachable(Exception):
    """No route to the source (offline, DNS failure, connection refused, timeout)."""


def source_urls(entry, mirror=None):
    """The URLs to try: the mirror's PREFIX/NAME alone when a mirror is set, else the manifest's sources."""
    if mirror:
        return [mirror.rstrip("/") + "/" + entry.name]
    return list(entry.sources)


def manual_page(entry, source, mirror=None):
    """Where to get ``entry`` by hand after ``source`` failed: the publisher's page (a mirror that failed is
    not where to look next)."""
    return browser_url(entry.sources[0] if mirror else source)


def browser_url(source):
    if source.startswith(DRIVE_PREFIX):
        return f"https://drive.google.com/file/d/{source[len(DRIVE_PREFIX):]}/view"
    return source


def http_download(url, part, desc, retries=3):
    """Stream ``url`` into ``part``, appending to what is there with a range request. A connection cut
    mid-file is resumed up to ``retries`` times; after that the partial file is kept (the next run
    resumes) and OSError is raised. Unreachable when no connection can be made."""
    from tqdm import tqdm

    attempt = 0
    while True:
        start = os.path.getsize(part) if os.path.isfile(part) else 0
        request = urllib.request.Request(url, headers={"User-Agent": "blendgan-download_models"})
        if start:
            request.add_header("Range", f"bytes={start}-")
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # the partial file is already complete
                return
            raise OSError(f"HTTP {e.code} {e.reason} from {url}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason) from None
        with response:
            content_range = response.headers.get("Content-Range", "")
            resumed = response.status == 206 and content_range.startswith(f"bytes {start}-")
            if response.status == 206 and not resumed:
                raise OSError(f"{url} answered range {start}- with '{content_range}'")
            if start and not resumed:
                start = 0  # the server sent the whole file: start over
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            try:
                with open(part, "ab" if resumed else "wb") as f, \
                        tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
                done = os.path.getsize(part)
                if total is not None and done < total:
                    raise http.client.IncompleteRead(b"", total - done)
                return
            except (http.client.IncompleteRead, ConnectionError, socket.timeout) as e:
                attempt += 1
                if attempt > retries:
                    raise OSError(f"connection cut after {os.path.getsize(part)} bytes ({type(e).__name__}); "
                                  f"the partial file {part} is kept: run the command again to resume") from None
                print(f"{desc}: connection cut, resuming from byte {os.path.getsize(part)}", file=sys.stderr)


def drive_download(file_id, part, desc):
    """A Google Drive file through gdown (it follows the confirmation page, names the quota page)."""
    import gdown
    import requests

    try:
        gdown.download(id=file_id, output=part, quiet=False, resume=True)
    except requests.exceptions.ConnectionError as e:
        raise Unreachable(str(e).splitlines()[0][:200]) from None
    except gdown.exceptions.FileURLRetrievalError as e:
        raise FileProblem(f"Google Drive gave a page instead of the file ({str(e).strip().splitlines()[0][:160]})") from None
    except Exception as e:  # gdown's DownloadError and requests' other errors: kept partial file, next run resumes
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), part) from e
        raise OSError(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None


@dataclass
class Outcome:
    name: str
    status: str  # "verified" (downloaded or already there), "unreachable", "refused", "failed", "disk full"
    line: str


def already_there(entry, target):
    """The 'verified' Outcome of the file at ``target``; FileProblem when it is bad."""
    digest, note = verify_file(entry, target)
    return Outcome(entry.name, "verified", f"{entry.name}: already at {target}, verified (sha256 {digest})"
                   + (f"; note: {note}" if note else ""))


def fetch(entry, folder, mirror=None, retries=3):
    """Get one file to its target, verified. Returns an Outcome with a one-line message."""
    target = target_path(entry, folder)
    if os.path.isfile(target):
        try:
            return already_there(entry, target)
        except FileProblem as e:
            print(f"{entry.name}: the file at {target} is bad ({e}); downloading it again", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    unreachable = []
    for source in source_urls(entry, mirror):
        manual = f"open {manual_page(entry, source, mirror)} in a browser and save the file as {target}"
        drive = source.startswith(DRIVE_PREFIX)
        # gdown keeps its own partial file beside its output; ours is the HTTP range download's
        part = part_path(target) + (".drive" if drive else "")
        try:
            if drive:
                drive_download(source[len(DRIVE_PREFIX):], part, entry.name)
            else:
                http_download(source, part, entry.name, retries)
        except Unreachable as e:
            unreachable.append((source, str(e)))
            continue
        except FileProblem as e:
            remove(part)
            return Outcome(entry.name, "refused", f"{entry.name}: {e}; {manual}")
        except OSError as e:
            if is_disk_full(e):  # the part downloaded so far stays under its .part name, never as the target
                kept = (f"the {os.path.getsize(part) / 2**20:.0f} MiB downloaded so far are kept in {part}"
                        if os.path.isfile(part) else "the part downloaded so far is kept beside it")
                return Outcome(entry.name, "disk full", f"{entry.name}: {disk_full_message(target)}; {kept}: free "
                                                        f"some space and run the command again to resume")
            return Outcome(entry.name, "failed", f"{entry.name}: download failed: {e}")
        try:
            digest, note = verify_file(entry, part)
        except FileProblem as e:
            remove(part)
            return Outcome(entry.name, "refused", f"{entry.name}: refused, {e}; nothing was written to {target}. "
                                                  f"Manual fallback: {manual}")
        os.replace(part, target)
        return Outcome(entry.name, "verified", f"{entry.name}: downloaded to {target}, verified, sha256 {digest}"
                       + (f"; note: {note}" if note else ""))
    source, reason = unreachable[0]
    host = urlparse(browser_url(source)).hostname
    return Outcome(entry.name, "unreachable",
                   f"{entry.name}: cannot reach {host} ({reason}); download {manual_page(entry, source, mirror)} and "
                   f"save it as {target}, or use --mirror URL_PREFIX (or ${MIRROR_ENV})")


def remove(path):
    if os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------
# A torch-hub weights file at run time (the FID Inception and LPIPS AlexNet of metrics.py)


def hub_cache_path(url):
    """Where torch.hub (and torchvision / pytorch-fid) keep the file of ``url``."""
    return os.path.join(hub_checkpoints_dir(), os.path.basename(urlparse(url).path))


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

    ``url`` is the source of a MANIFEST row kept in the hub cache. The download happens only when allowed
    and the host (or the $BLENDGAN_MIRROR mirror) answers, is announced on stderr, and goes through fetch(): the
    file lands in the cache only once verified. Any other case raises a CheckpointError saying which file
    to put where.
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
    entry = next((e for e in MANIFEST if e.home == "hub" and url in e.sources), None)
    if entry is None:
        raise ValueError(f"{url}: not a source of a torch-hub file in model_zoo.MANIFEST")
    mirror = os.environ.get(MIRROR_ENV) or None
    source = source_urls(entry, mirror)[0]
    if not host_reachable(source):
        raise CheckpointError(f"{what} weights not found and {urlparse(source).hostname} cannot be reached "
                              f"(offline?): {how}")
    print(f"downloading {what} weights {source} -> {cached}", file=sys.stderr)
    outcome = fetch(entry, os.path.dirname(cached), mirror)
    if outcome.status != "verified":
        raise CheckpointError(f"{what} weights: {outcome.line}" + (f"; or pass its path with {flag}" if flag else ""))
    return cached


# ----------------------------------------------------------------------------------------------------
# The command's jobs and the scripts' message


def select(names, manifest, all_files=False):
    """Manifest rows for the given names (default: what inference needs). Raises KeyError naming the
    unknown ones."""
    by_name = {e.name: e for e in manifest}
    if all_files:
        return list(manifest)
    names = names or [n for n in INFERENCE_FILES if n in by_name]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown file(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def download_all(entries, folder, mirror=None, retries=3, out=print):
    """fetch() each entry, print one line per file. Exit code: 0 all verified, 2 some source unreachable
    (and nothing refused or failed), 1 otherwise. A full disk stops there: the next files would not fit either."""
    def not_fetched(entry):  # after a full disk: a good file already there is still verified
        target = target_path(entry, folder)
        try:
            if os.path.isfile(target):
                return already_there(entry, target)
        except FileProblem:
            pass
        return Outcome(entry.name, "disk full", f"{entry.name}: not downloaded, the disk is full")

    outcomes = []
    for e in entries:
        outcomes.append(fetch(e, folder, mirror, retries))
        if outcomes[-1].status == "disk full":
            outcomes += [not_fetched(rest) for rest in entries[len(outcomes):]]
            break
    for o in outcomes:
        out(o.line)
    statuses = {o.status for o in outcomes}
    if statuses <= {"verified"}:
        return 0
    return 2 if statuses <= {"verified", "unreachable"} else 1


def verify_all(entries, folder, explicit=False, out=print):
    """One line per file: verified / missing / BAD. Exit code 1 when a file is bad, or missing though named."""
    code = 0
    for e in entries:
        status, detail = file_status(e, folder)
        path = target_path(e, folder)
        if status == "verified":
            out(f"verified {e.name} ({path}): {detail}")
        elif status == "missing":
            out(f"missing  {e.name} ({path}): get it with {COMMAND} {e.name}")
            code = code or int(explicit)
        else:
            out(f"BAD      {e.name} ({path}): {detail}; replace it with {COMMAND} {e.name}")
            code = 1
    return code


def list_files(manifest, folder, mirror=None, out=print):
    """Every known file: status, size, what uses it, where it comes from, where it goes."""
    for e in manifest:
        status, detail = file_status(e, folder)
        size = f"~{e.approx_mb:.0f} MB" if e.approx_mb else "size not published"
        sources = ", ".join(browser_url(s) + (" (Google Drive id)" if s.startswith(DRIVE_PREFIX) else "")
                            for s in source_urls(e, mirror))
        out(f"{e.name}: {status}" + (f" ({detail})" if status == "bad" else ""))
        out(f"    used by: {e.used_by}")
        out(f"    from:    {sources}" + (f" [{e.page}]" if e.page and not mirror else ""))
        out(f"    to:      {target_path(e, folder)}; {size}"
            + (f"; SHA-256 {e.sha256}" if e.sha256 else f"; SHA-256 starts with {e.sha256_prefix}" if e.sha256_prefix
               else "; no published SHA-256: checked by structure"))
        if e.note:
            out(f"    note:    {e.note}")
    return 0


def file_not_found(flag, path, name=None, folder="pretrained_models"):
    """The trainers' line for a weights file given with ``flag`` and absent: with the download_models.py
    command and the place it writes, when ``name`` is a MANIFEST file (the README's paths are those)."""
    line = f"{flag} {path}: file not found"
    entry = next((e for e in MANIFEST if e.name == name), None)
    if entry is not None:
        line += f" ({COMMAND} {name} writes {target_path(entry, folder)})"
    return line


def missing_files_message(missing, folder="pretrained_models"):
    """One line for all the files a script needs and does not find (the scripts' and app's message).

    missing: [(path, flag, manifest name)]; flag and name may be None. For example
    "missing pretrained_models/blendgan.pt (--ckpt), pretrained_models/psp_encoder.pt (--psp_encoder_ckpt):
    get them with: python download_models.py blendgan.pt psp_encoder.pt (it writes pretrained_models/blendgan.pt,
    pretrained_models/psp_encoder.pt), or pass other paths with the flags (the BlendGAN authors' files, URL)"
    """
    files = ", ".join(f"{path} ({flag})" if flag else str(path) for path, flag, _ in missing)
    names = [name for _, _, name in missing if name]
    line = f"missing {files}"
    if names:
        writes = ", ".join(os.path.join(folder, n) for n in names)
        line += f": get {'it' if len(missing) == 1 else 'them'} with: {COMMAND} {' '.join(names)} (it writes {writes})"
        if any(flag for _, flag, _ in missing):
            line += ", or pass other paths with the flags"
        if any(n in INFERENCE_FILES for n in names):
            line += f" (the BlendGAN authors' files, {RELEASE_README})"
    return line
