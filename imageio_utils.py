"""Robust image decoding, listing and atomic saving shared by the data and inference scripts.

Every input image goes through `read_image_rgb`: any file Pillow can decode (PNG, JPEG, WebP, BMP,
TIFF) in any mode (1, L, P, LA, PA, RGBA, I, I;16, F, CMYK, YCbCr, ...) comes back as an 8-bit RGB
`PIL.Image` turned upright according to its EXIF orientation tag. A file that cannot be decoded raises
`UnreadableImageError` naming the file, so callers can report it and carry on.
"""

import io
import os

import numpy as np
from PIL import Image, ImageOps

from fileio import atomic_path

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')

# Images with a shorter side below this cannot hold a face: the scripts and prepare_data skip them, named.
MIN_SIDE = 32

# Transparent pixels are composited onto this colour (the usual look of a cut-out portrait).
ALPHA_BACKGROUND = (255, 255, 255)


class UnreadableImageError(Exception):
    """Raised when an image file cannot be opened or decoded; the message names the file."""


def is_image_file(path):
    name = os.path.basename(path)
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root, recursive=True):
    """Image files under `root` (a file or a folder), sorted, hidden files and folders left out.

    Linked folders are followed, each real folder once: a link to a parent (a loop) or a second link to a
    folder already listed adds nothing.
    """
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f'no such file or folder: {root}')
    found = []
    visited = set()  # real paths of the folders listed
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith('.')) if recursive else []
        found.extend(os.path.join(folder, n) for n in names if is_image_file(n))
    return sorted(found)


def _alpha_over_background(rgba):
    background = Image.new('RGBA', rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert('RGB')


def _high_bit_depth_to_rgb(img):
    """I;16*, I (taken as 16-bit, as PNG and TIFF produce it) and F (range [0, 1] or [0, 255])."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == 'F':
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # [H, W, 3]


def to_rgb(img):
    """Convert a decoded PIL image of any mode to 8-bit RGB (alpha composited onto white)."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I') or img.mode == 'F':
        return _high_bit_depth_to_rgb(img)
    has_alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
        img.mode == 'P' and 'transparency' in img.info)
    if has_alpha:
        return _alpha_over_background(img.convert('RGBA'))
    return img.convert('RGB')


def read_image_rgb(path):
    """Decode `path` fully into an upright 8-bit RGB PIL image, or raise UnreadableImageError."""
    try:
        with Image.open(path) as img:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:
                # A malformed EXIF block does not make the pixels unusable; keep them as stored.
                pass
            return to_rgb(img).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as error:
        raise UnreadableImageError(f'{path}: cannot decode image ({error})') from error


def size_problem(width, height, least=MIN_SIDE):
    """Why an image of width x height is no face image (its shorter side under ``least``), or None."""
    if min(width, height) < least:
        return f'too small for a face image ({width}x{height} px, need >= {least})'
    return None


def decode_problems(flag, paths):
    """One line per file of option ``flag`` that exists but does not decode ([] when all do): checked when the
    options are read, so that a bad image is named before any network is built or any file written."""
    problems = []
    for path in paths:
        if os.path.isfile(path):
            try:
                read_image_rgb(path)
            except UnreadableImageError as error:
                problems.append(f'{flag} {error}')
    return problems


def encode_image(img, image_format='png', quality=100):
    """Encode a PIL image to bytes: 'png' (lossless) or 'jpeg' (4:4:4 chroma at the given quality)."""
    buffer = io.BytesIO()
    image_format = image_format.lower()
    if image_format == 'png':
        img.save(buffer, format='PNG')
    elif image_format in ('jpeg', 'jpg'):
        img.save(buffer, format='JPEG', quality=quality, subsampling=0)
    else:
        raise ValueError(f"unknown image format {image_format!r}; use 'png' or 'jpeg'")
    return buffer.getvalue()


def save_image_atomic(img, path, image_format=None, **params):
    """Save a PIL image so that `path` is either absent, the old file, or the complete new file."""
    image_format = image_format or Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    with atomic_path(path) as tmp_path:
        with open(tmp_path, 'xb') as f:
            img.save(f, format=image_format, **params)
            f.flush()
            os.fsync(f.fileno())
