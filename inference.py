"""What the three inference scripts share: options, model loading, robust inputs, batched encoding,
atomic outputs and the end-of-run report.

The scripts (generate_image_pairs.py, style_transfer_folder.py, gen_video.py) stay thin: they parse
options, then call the functions here and in model.py / psp_encoder/.
"""
import ctypes
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, require_key
from fileio import (DiskFullError, atomic_write_bytes, distinct_by, exit_on_sigterm, folder_problems,
                    input_folder_problems, without_outputs)
from imageio_utils import UnreadableImageError, read_image_rgb, size_problem
from layers import channels_last_
from model import Generator, guess_generator_config, infer_generator_config, n_latent_for
from model_zoo import COMMAND, missing_files_message
from psp_encoder.encoders import STYLE_DIM as PSP_STYLE_DIM
from utils import img2ten

RELEASE_PAGE = "https://github.com/onion-liu/BlendGAN (README, 'Pretrained models')"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_generator_args(parser):
    """--size, --ckpt, --channel_multiplier: the BlendGAN generator every inference script loads."""
    parser.add_argument("--size", type=int, default=None,
                        help="output size (default: the checkpoint's; the release's is 1024)")
    parser.add_argument("--ckpt", default="pretrained_models/blendgan.pt", help="BlendGAN checkpoint (g_ema)")
    parser.add_argument("--channel_multiplier", type=int, default=None,
                        help="generator width (default: the checkpoint's; release 2)")


def add_photo_args(parser, style_help, outputs):
    """--psp_encoder_ckpt, --style_img_path, --input_img_path, --align, --predictor, --skip_existing: the
    options of the two scripts that stylize real face photos."""
    parser.add_argument("--psp_encoder_ckpt", default="pretrained_models/psp_encoder.pt", help="pSp encoder checkpoint")
    parser.add_argument("--style_img_path", default="test_imgs/style_imgs/", help=style_help)
    parser.add_argument("--input_img_path", default="test_imgs/face_imgs/", help="face image or folder of them")
    parser.add_argument("--align", action="store_true",
                        help="align each face photo FFHQ-style with dlib first (raw photos)")
    parser.add_argument("--predictor", default=None,
                        help="dlib 68-landmark model (default: face-recognition-models' file)")
    parser.add_argument("--skip_existing", action="store_true",
                        help=f"keep {outputs} that already exist (resume a run)")


def add_common_args(parser, batch_default=4):
    """--device, --dtype, --seed, --batch, --theta: the options every inference script has."""
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute precision of the networks (bfloat16/float16 are faster, slightly different)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: the same seed, --batch and inputs (or --pics) give the same files; the "
                             "size of a batch changes float rounding")
    parser.add_argument("--batch", type=int, default=batch_default, help="images generated per forward pass")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generator and pSp encoder: the first call compiles (tens of "
                             "seconds), later ones run 1.2-1.6x faster (bench.py, README)")
    parser.add_argument("--theta", type=float, default=None,
                        help="paper Eq. 5: style weight factor of the boundary layer i (default: the release's "
                             "behaviour, theta = 1)")


def validate_common(parser, opts):
    if opts.batch < 1:
        parser.error("--batch must be >= 1")
    if opts.theta is not None and not 0 <= opts.theta <= 1:
        parser.error("--theta must be in [0, 1]")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {opts.device}: CUDA is not available on this machine; use --device cpu")
    if opts.dtype == "float16" and not opts.device.startswith("cuda"):
        parser.error("--dtype float16 needs a CUDA device (use bfloat16 on CPU)")
    if hasattr(opts, "outdir"):  # app.py writes into no folder of the user's
        problems = folder_problems("--outdir", opts.outdir)
        for flag in ("--input_img_path", "--style_img_path"):
            if getattr(opts, flag[2:], None) is not None:
                problems += input_folder_problems("--outdir", opts.outdir, flag, getattr(opts, flag[2:]))
        for problem in problems:
            parser.error(problem)


def finite_rows(image):
    """[N] bools for image [N, ...]: False where it holds NaN/inf (an overflow, e.g. in float16)."""
    return torch.isfinite(image).flatten(1).all(1).tolist()


def nonfinite_reason(dtype_name):
    """Why an output that finite_rows rejects is not written (Report.drop)."""
    return f"non-finite values in the {dtype_name} image (overflow?); try --dtype float32"


def missing_hint(flag, default_name):
    return (f"get it with: {COMMAND} {default_name} (it writes pretrained_models/{default_name}), or pass "
            f"another path with {flag} (the BlendGAN authors' file, {RELEASE_PAGE})")


def check_files(*files):
    """Every missing file of (path, flag, download_models.py name) in one CheckpointError line, before
    any work starts."""
    missing = [f for f in files if not os.path.isfile(f[0])]
    if missing:
        raise CheckpointError(missing_files_message(missing))


def check_model_files(opts, psp=False):
    """The scripts' first step: blendgan.pt (--ckpt) and, for photos, psp_encoder.pt (--psp_encoder_ckpt)."""
    files = [(opts.ckpt, "--ckpt", "blendgan.pt")]
    if psp:
        files.append((opts.psp_encoder_ckpt, "--psp_encoder_ckpt", "psp_encoder.pt"))
    check_files(*files)


def for_inference(module, device, dtype, compile=False):
    """The module on `device` in `dtype`, channels_last, in eval mode; torch.compile'd when asked
    (attributes and methods other than forward stay reachable through the compiled wrapper)."""
    module = channels_last_(module.to(device=device, dtype=dtype)).eval()
    return torch.compile(module) if compile else module


def photo_problem(path, style_dim):
    """Why the generator of ``path`` (``style_dim``) cannot render real photos, or None: they go through pSp,
    whose W+ codes are PSP_STYLE_DIM wide (a generator trained with another train.py --style_dim)."""
    if style_dim == PSP_STYLE_DIM:
        return None
    return (f"{path}: a generator with style_dim {style_dim} cannot stylize photos: the pSp encoder gives "
            f"{PSP_STYLE_DIM}-D W+ codes (train.py --style_dim {PSP_STYLE_DIM} for photos)")


def load_blendgan(path, size=None, channel_multiplier=None, device="cpu", dtype=torch.float32, compile=False,
                  with_style_encoder=True, indicator=None, photos=False):
    """Generator from a BlendGAN checkpoint's ``g_ema`` (release layout), ready for inference.

    size / channel_multiplier: None reads them from the file. style_dim and n_mlp always come from the
    file (512 and 8 for the release). The weights are memory-mapped and assigned: in float32 only the
    4-D (VGG) weights are copied, for channels_last (see for_inference), and E_style's 1.25 GB layer is
    read when a style is encoded. with_style_encoder=False leaves E_style out (``g.embedder`` is None):
    for generation from style codes computed before. indicator: the --add_weight_index, noted on stderr when
    it lies beyond the generator's layers (indicator_note). photos: the generator will render pSp's W+ codes of
    real photos, which are STYLE_DIM wide: another style_dim (train.py --style_dim) is refused before any
    work. Returns (generator, the checkpoint dict).
    """
    ckpt = load_checkpoint(path, hint=missing_hint("--ckpt", "blendgan.pt"))
    sd = require_key(ckpt, "g_ema", path)
    if "to_rgbs.0.conv.weight" in sd and "add_weight" not in sd:
        raise CheckpointError(f"{path}['g_ema']: a StyleGAN2 generator without BlendGAN's style mapping and "
                              f"blending weights (no add_weight): train.py --stylegan2_ckpt starts from it")
    try:
        cfg = infer_generator_config(sd)
    except (KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{path}['g_ema']: not a BlendGAN generator state dict "
                              f"(no add_weight/style.*/to_rgbs.* keys)") from None
    size = size or cfg["size"]
    note = indicator_note(indicator, size)
    if note:
        print(f"note: {note}", file=sys.stderr)
    channel_multiplier = channel_multiplier or cfg["channel_multiplier"] or 2
    style_dim, n_mlp = cfg["style_dim"], cfg["n_mlp"]
    problem = photo_problem(path, style_dim) if photos else None
    if problem:
        raise CheckpointError(f"{problem}; generate_image_pairs.py works with it")
    with torch.device("meta"):
        g = Generator(size, style_dim, n_mlp, channel_multiplier=channel_multiplier, load_pretrained_vgg=False)
    load_state_dict_strict(g, sd, f"{path}['g_ema']", hint=guess_generator_config, assign=True)
    if not with_style_encoder:
        g.embedder = None  # its tensors were only mapped, never read: nothing to convert or move
    return for_inference(g, device, dtype, compile), ckpt


def check_psp_file(path):
    """A missing pSp checkpoint as one line with how to get it (before any long work)."""
    check_files((path, "--psp_encoder_ckpt", "psp_encoder.pt"))


def load_psp(path, size, device="cpu", dtype=torch.float32, compile=False):
    from psp_encoder.psp_encoders import PSPEncoder

    check_psp_file(path)
    return for_inference(PSPEncoder(path, output_size=size), device, dtype, compile)


class Report:
    """Counts what was processed, names what was skipped and why; decides the exit code."""

    def __init__(self):
        self.skipped = []  # (path, reason): inputs that could not be used
        self.dropped = []  # (path, reason): outputs computed but not written (non-finite values)
        self.written = 0
        self.existing = 0  # outputs kept from an earlier run (--skip_existing)

    def skip(self, path, reason):
        self.skipped.append((path, reason))
        print(f"skipped {path}: {reason}", file=sys.stderr)

    def drop(self, path, reason):
        self.dropped.append((path, reason))
        print(f"not written {path}: {reason}", file=sys.stderr)

    def summary(self, what="images"):
        line = f"done: {self.written} {what} written, {len(self.skipped)} input(s) skipped"
        if self.dropped:
            line += f", {len(self.dropped)} output(s) not written"
        if self.existing:
            line += f", {self.existing} already there"
        named = self.skipped + self.dropped
        if named:
            line += " (" + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in named) + ")"
        return line

    def exit_code(self):
        """Non-zero only when nothing could be processed."""
        return 0 if self.written + self.existing > 0 else 1


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory():
    """Make glibc malloc serve large tensors from its heap and keep freed memory there for reuse.

    By default every block above 32 MB is mapped fresh from the kernel and unmapped when freed, so each
    128 MB activation of a 1024 px forward pays ~32k page faults again: the CPU generator runs 1.6x
    slower and a full style-transfer pair 1.9x (docs/perf_notes.md). Blocks up to 2 GB now come from the
    heap, which is not trimmed on its own (release_freed_memory() does it); the peak can grow a little by
    fragmentation. Process-wide: the scripts call it from their ``__main__`` entry only. Returns whether
    it applied (False off glibc, e.g. macOS or musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def release_freed_memory():
    """Hand the heap's free memory back to the OS (glibc malloc_trim), e.g. after dropping a network
    that is no longer needed; keep_freed_memory() stops glibc from doing it on its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_job(job, opts, what):
    """The scripts' main: seed, run job(opts) -> Report, one-line errors, summary, exit code."""
    torch.manual_seed(opts.seed)
    try:
        with exit_on_sigterm():  # a stopped job leaves no temporary files behind
            report = job(opts)
    except (CheckpointError, FileNotFoundError, DiskFullError) as e:  # a full disk: the next files would not fit either
        raise SystemExit(f"error: {e}")
    print(report.summary(what))
    return report.exit_code()


def list_inputs(path, outdir=None):
    """A file, or the files of a folder (``*.*``, sorted, hidden files left out, as the release globs); files
    in the output folder ``outdir`` are outputs, not inputs (fileio.without_outputs)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    problems = input_folder_problems("output folder", outdir, "input", path) if outdir is not None else []
    if problems:  # validate_common refuses it first; this is for callers from Python
        raise ValueError(problems[0])
    names = sorted(n for n in os.listdir(path) if "." in n and not n.startswith("."))
    paths = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not paths:
        raise FileNotFoundError(f"no input files in {path}: {left_out(path)}")
    return without_outputs(paths, path, outdir) if outdir is not None else paths


def left_out(folder):
    """What list_inputs leaves out of ``folder``, counted in words: 'it holds 2 subfolder(s) ..., 1 dead link(s)'."""
    entries = [os.path.join(folder, name) for name in os.listdir(folder)]
    hidden = [e for e in entries if os.path.basename(e).startswith(".")]
    counts = {
        "subfolder(s) (not searched: pass one as the folder)": sum(os.path.isdir(e) for e in entries
                                                                   if e not in hidden),
        "dead link(s)": sum(os.path.islink(e) and not os.path.exists(e) for e in entries),
        "hidden file(s)": sum(os.path.isfile(e) for e in hidden),
        "file(s) without an extension": sum(os.path.isfile(e) and "." not in os.path.basename(e) for e in entries),
    }
    found = [f"{n} {what}" for what, n in counts.items() if n]
    return "it holds " + ", ".join(found) if found else "it is empty"


def distinct_names(paths, report):
    """``paths`` without the files whose name stem an earlier one has (a.jpg and a.png): outputs are named
    after the stem, so the later file would overwrite the earlier one's results; it is skipped, named."""
    kept, clashes = distinct_by(paths, stem)
    for path, first in clashes:
        report.skip(path, f"same name as {os.path.basename(first)}: its outputs would overwrite that file's (rename one)")
    return kept


def read_input(path, report, aligner=None, align_size=1024):
    """RGB uint8 [H, W, 3] of an input image, or None (reported) if it cannot be used.

    Any mode (grey, palette, RGBA, 16-bit, CMYK) and EXIF orientation are handled by read_image_rgb;
    for RGB JPEG/PNG its pixels equal OpenCV's, which the release reads with.
    aligner: (detector, predictor) to align the face FFHQ-style first (``--align``).
    """
    try:
        img = np.asarray(read_image_rgb(path))
    except UnreadableImageError as e:
        report.skip(path, str(e).split(": ", 1)[-1])
        return None
    problem = size_problem(img.shape[1], img.shape[0])
    if problem:
        report.skip(path, problem)
        return None
    if aligner is not None:
        from align_faces import align_face

        detector, predictor = aligner
        faces = align_face(img, predictor, detector, output_size=align_size)
        if not faces:
            report.skip(path, "no face found to align")
            return None
        img = np.asarray(faces[0])
    return img


def load_aligner(enabled, predictor_path=None):
    if not enabled:
        return None
    from align_faces import load_face_models

    return load_face_models(predictor_path)


def resize(img, size):
    """cv2.resize to size x size (bilinear, as the release)."""
    return cv2.resize(img, (size, size))


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def pooled(img, pool_size):
    """RGB uint8 [H, W, 3] -> [1, 3, pool, pool] float32: converted like cv2ten, then average-pooled, as
    the encoders' own AdaptiveAvgPool2d would; a tensor already pooled so passes through unchanged."""
    x = img if torch.is_tensor(img) else img2ten(img)
    return F.adaptive_avg_pool2d(x, (pool_size, pool_size))


def pooled_batches(images, pool_size, batch, device, dtype):
    """Yield [B, 3, pool, pool] tensors of RGB uint8 images (or of ``pooled`` ones).

    Both encoders start with AdaptiveAvgPool2d to ``pool_size`` and pooling an already pooled image is
    the identity, so images of different sizes can share a batch without changing any result.
    """
    for i in range(0, len(images), batch):
        xs = [pooled(im, pool_size) for im in images[i:i + batch]]
        yield torch.cat(xs).to(device=device, dtype=dtype)


def style_pool_size(g):
    """The side E_style pools its input to (its --style_pool_size)."""
    return g.embedder.embedder.avg_pool.output_size[0]


def face_pool_size():
    """The side pSp pools its input to (256)."""
    from psp_encoder.psp_encoders import ENCODER_INPUT_SIZE

    return ENCODER_INPUT_SIZE[0]


@torch.no_grad()
def encode_styles(g, images, batch, device, dtype):
    """Style codes z_s [S, style_dim] of RGB images (or of ``pooled`` ones), each encoded once."""
    out = [g.get_z_embed(x) for x in pooled_batches(images, style_pool_size(g), batch, device, dtype)]
    return torch.cat(out) if out else torch.empty(0, g.style_dim, device=device, dtype=dtype)


@torch.no_grad()
def encode_faces(psp, images, batch, device, dtype):
    """W+ codes [F, n_latent, 512] of RGB face images (or of ``pooled`` ones; pSp), each encoded once."""
    out = [psp(x) for x in pooled_batches(images, face_pool_size(), batch, device, dtype)]
    return torch.cat(out)


@torch.no_grad()
def truncation_centre(g, ckpt, n, generator, device, dtype):
    """The truncation centre [1, style_dim]: the checkpoint's latent_avg, else the mean of g's face mapping
    over n codes drawn on the CPU from ``generator`` (the same numbers on every device)."""
    if "latent_avg" in ckpt:
        return ckpt["latent_avg"].to(device=device, dtype=dtype)
    z = torch.randn(n, g.style_dim, generator=generator).to(device=device, dtype=dtype)
    return g.style(z).mean(0, keepdim=True)


def add_indicator_arg(parser, default, note=""):
    """--add_weight_index: the WBM indicator i of the release's scripts (their defaults: 6, videos 7)."""
    parser.add_argument("--add_weight_index", type=int, default=default,
                        help="WBM indicator i: layers below i keep the face code; 0 = full style (every layer blended "
                             "with its learned weight, as no index) ... n_latent = natural face" + note)


def indicator_note(index, size):
    """What --add_weight_index ``index`` outside [-n_latent, n_latent] means for a ``size`` px generator
    (None inside). The release takes any integer (the face weights A[:, :i] = 1, Python slicing): a run at
    256 px with the 1024 px natural-face index 18 gives the natural face there as well."""
    n = n_latent_for(size)
    if index is None or -n <= index <= n:
        return None
    meaning = (f"every layer keeps the face code: the natural face, as {n}" if index > n
               else "no layer keeps the face code: full style, as 0")
    return f"--add_weight_index {index} is outside [{-n}, {n}] for this {size} px generator ({n} layers); {meaning}"


def write_jpeg(path, rgb):
    """RGB uint8 -> JPEG bytes exactly as the release's cv2.imwrite (quality 95), written atomically."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write_bytes(path, buf.tobytes())


ALIGNED_SIDES = (256, 512, 1024)  # the release GUI takes a square image of these sides as an aligned face


def image_size(path):
    """(width, height) of an image file from its header, without decoding the pixels (a cheap check
    before a large upload is decoded); UnreadableImageError when it is not an image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise UnreadableImageError(f"{path}: cannot decode image ({e})") from e


def looks_aligned(width, height):
    """The release GUI's rule: a square 256, 512 or 1024 px face photo is already FFHQ-aligned."""
    return width == height and width in ALIGNED_SIDES
