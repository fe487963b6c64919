"""FFHQ face alignment: dlib landmarks, the oriented crop of the FFHQ dataset, PNG output.

Library use (style_transfer_folder.py and gen_video.py call it behind their --align flag):

    detector, predictor = load_face_models()            # once per process
    faces = align_face(img_rgb_uint8, predictor, detector, output_size=1024)  # list of PIL RGB images

CLI:
    python align_faces.py --input_img_path FILE_OR_DIR --outdir DIR [--output_size 1024] [--all_faces]

The crop follows the procedure published with FFHQ (Karras et al., "A Style-Based Generator
Architecture for GANs", 2019, dataset preparation): an oriented square centred just below the eyes,
sized from the eye-to-eye and eye-to-mouth distances, rendered with reflect padding blended into a
blur where the square leaves the photo.
"""

import argparse
import importlib.util
import multiprocessing
import os
import sys
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from fileio import (DiskFullError, distinct_by, exit_on_sigterm, folder_problems, input_folder_problems,
                    pool_worker_sigterm, without_outputs)
from imageio_utils import UnreadableImageError, list_images, read_image_rgb, save_image_atomic, to_rgb

# dlib's 68-point layout (iBUG 300-W): index ranges of the parts the crop is built from.
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
MOUTH_LEFT_CORNER = 48
MOUTH_RIGHT_CORNER = 54

# FFHQ's constants: the crop half-width is max(2 x eye distance, 1.8 x eye-to-mouth distance); its
# centre sits 0.1 of the eye-to-mouth vector below the eye midpoint.
EYE_DISTANCE_SCALE = 2.0
EYE_TO_MOUTH_SCALE = 1.8
CENTRE_SHIFT_TO_MOUTH = 0.1
# FFHQ renders the quad at 4096 px and downsamples to 1024 (4x supersampling against aliasing).
TRANSFORM_OVERSAMPLING = 4

# Above this sigma (pixels) the seam blur is computed at a reduced resolution (see _gaussian_blur).
BLUR_FULL_RES_MAX_SIGMA = 8.0

# Face detection runs on a copy whose long side is at most this (dlib's HOG detector costs grow with
# the pixel count); landmarks are then located on the full-resolution photo.
DETECT_MAX_SIDE = 1024
DETECT_UPSAMPLE = 1

PREDICTOR_FILE = os.path.join('models', 'shape_predictor_68_face_landmarks.dat')


def default_predictor_path():
    """The 68-point model file shipped by the face-recognition-models package (not imported)."""
    spec = importlib.util.find_spec('face_recognition_models')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('the face-recognition-models package is not installed; '
                                'pip install face-recognition-models or pass --predictor PATH')
    path = os.path.join(spec.submodule_search_locations[0], PREDICTOR_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'landmark model not found at {path}; pass --predictor PATH')
    return path


def load_face_models(predictor_path=None):
    """Build dlib's frontal face detector and 68-point shape predictor once; returns (detector, predictor)."""
    import dlib

    predictor_path = predictor_path or default_predictor_path()
    if not os.path.isfile(predictor_path):
        raise FileNotFoundError(f'landmark model not found: {predictor_path}')
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor_path)


def _as_rgb_array(img):
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f'expected an RGB image [H, W, 3], got shape {arr.shape}')
    return arr  # [H, W, 3]


def detect_landmarks(img, detector, predictor, max_detect_side=DETECT_MAX_SIDE):
    """68 (x, y) landmarks of every face dlib finds, as float arrays [68, 2] in image pixels."""
    import dlib

    arr = _as_rgb_array(img)  # [H, W, 3]
    height, width = arr.shape[:2]
    scale = min(1.0, max_detect_side / max(height, width))
    if scale < 1.0:
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(arr).resize(small_size, Image.Resampling.BILINEAR))
    else:
        small = arr
    landmarks = []
    for rect in detector(small, DETECT_UPSAMPLE):
        full_rect = dlib.rectangle(round(rect.left() / scale), round(rect.top() / scale),
                                   round(rect.right() / scale), round(rect.bottom() / scale))
        shape = predictor(arr, full_rect)
        landmarks.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64))  # [68, 2]
    return landmarks


def ffhq_quad(landmarks):
    """The oriented crop square of FFHQ from 68 landmarks: corners [4, 2] (TL, BL, BR, TR) and side length."""
    lm = np.asarray(landmarks, dtype=np.float64)  # [68, 2]
    eye_left = lm[LEFT_EYE].mean(axis=0)
    eye_right = lm[RIGHT_EYE].mean(axis=0)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_mid = (lm[MOUTH_LEFT_CORNER] + lm[MOUTH_RIGHT_CORNER]) / 2
    eye_to_mouth = mouth_mid - eye_mid

    # The horizontal axis averages the eye line with the eye-to-mouth line turned by -90 degrees, so a
    # tilted mouth steadies the orientation given by the eyes.
    axis_x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    axis_x /= np.hypot(*axis_x)
    axis_x *= max(np.hypot(*eye_to_eye) * EYE_DISTANCE_SCALE, np.hypot(*eye_to_mouth) * EYE_TO_MOUTH_SCALE)
    axis_y = np.array([-axis_x[1], axis_x[0]])  # axis_x turned by +90 degrees (image y points down)
    centre = eye_mid + eye_to_mouth * CENTRE_SHIFT_TO_MOUTH
    quad = np.stack([centre - axis_x - axis_y, centre - axis_x + axis_y,
                     centre + axis_x + axis_y, centre + axis_x - axis_y])  # [4, 2]
    return quad, np.hypot(*axis_x) * 2


def _gaussian_blur(arr, sigma):
    """gaussian_filter(arr, [sigma, sigma, 0]) with scipy's 'reflect' borders, for [H, W, C] float32.

    A wide blur is computed at 1/factor of the resolution (box average down, Gaussian, linear
    interpolation up; the three variances add up to sigma^2) after reflecting a 4 sigma margin, so it
    costs about factor^3 less. It differs from the full-resolution filter by a few hundredths of a
    grey level (FFHQ's blur reaches sigma ~ 80 px for a close-up photo, where the direct filter takes
    minutes).
    """
    factor = int(sigma // BLUR_FULL_RES_MAX_SIGMA)
    if factor < 2:
        return gaussian_filter(arr, [sigma, sigma, 0])
    height, width = arr.shape[:2]
    margin = int(np.ceil(4 * sigma / factor)) * factor
    extra_h = -(height + 2 * margin) % factor
    extra_w = -(width + 2 * margin) % factor
    arr = cv2.copyMakeBorder(arr, margin, margin + extra_h, margin, margin + extra_w, cv2.BORDER_REFLECT)
    small_size = (arr.shape[1] // factor, arr.shape[0] // factor)
    small = cv2.resize(arr, small_size, interpolation=cv2.INTER_AREA)  # exact factor x factor means
    # box average variance factor^2 / 12 plus linear interpolation variance factor^2 / 6
    small_sigma = np.sqrt(sigma ** 2 / factor ** 2 - 0.25)
    small = gaussian_filter(small, [small_sigma, small_sigma, 0])
    full = cv2.resize(small, (arr.shape[1], arr.shape[0]), interpolation=cv2.INTER_LINEAR)
    return full[margin:margin + height, margin:margin + width]


def _blend_padding(arr, pad, qsize):
    """Fade the reflect-padded margin of `arr` [H, W, 3] float32 into a blur, then into the mean colour."""
    height, width = arr.shape[:2]
    pad_left, pad_top, pad_right, pad_bottom = (np.float32(p) for p in pad)
    y, x = np.ogrid[:height, :width]
    y = y.astype(np.float32)[:, :, None]  # [H, 1, 1]
    x = x.astype(np.float32)[:, :, None]  # [1, W, 1]
    # 1 at the outer edge, 0 where the photo starts, negative inside it.
    mask = np.maximum(1.0 - np.minimum(x / pad_left, (width - 1 - x) / pad_right),
                      1.0 - np.minimum(y / pad_top, (height - 1 - y) / pad_bottom))  # [H, W, 1]
    blur = qsize * 0.02
    arr += (_gaussian_blur(arr, blur) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
    return arr


def align_from_landmarks(img, landmarks, output_size=1024, transform_size=None, enable_padding=True):
    """Crop, rotate and scale a face to FFHQ's layout; `img` RGB PIL image or uint8 array, returns PIL RGB."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(_as_rgb_array(img))
    transform_size = transform_size or output_size * TRANSFORM_OVERSAMPLING
    quad, qsize = ffhq_quad(landmarks)

    # Shrink a large face first so the final resampling never reduces by more than about 2x. (Dividing
    # the quad treats landmark coordinates as pixel edges, a fraction-of-a-pixel offset that FFHQ's own
    # images carry, kept so that results match them.)
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        new_size = (int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink)))
        img = img.resize(new_size, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop to the quad plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(left - border, 0), max(top - border, 0),
            min(right + border, img.size[0]), min(bottom + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # Where the quad leaves the photo, pad by reflection and hide the seam under a blur.
    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    pad = np.array([max(-left + border, 0), max(-top + border, 0),
                    max(right - img.size[0] + border, 0), max(bottom - img.size[1] + border, 0)])
    if enable_padding and pad.max() > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        # cv2's REFLECT_101 is numpy's 'reflect' (edge pixel not repeated), also for pads wider than
        # the image, and much faster on large photos.
        arr = cv2.copyMakeBorder(np.asarray(img), int(pad[1]), int(pad[3]), int(pad[0]), int(pad[2]),
                                 cv2.BORDER_REFLECT_101).astype(np.float32)  # [H', W', 3]
        arr = _blend_padding(arr, pad, qsize)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        quad += pad[:2]

    img = img.transform((transform_size, transform_size), Image.Transform.QUAD,
                        (quad + 0.5).flatten(), Image.Resampling.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img


def align_face(img, predictor, detector, output_size=1024, all_faces=False):
    """Aligned crops of the faces in `img` (RGB uint8 [H, W, 3], or a PIL image of any mode), largest first.

    Returns a list of PIL RGB images of output_size x output_size: every face with all_faces, else only
    the largest (the one whose FFHQ crop is biggest); an empty list when no face is found.
    """
    if isinstance(img, Image.Image):
        img = to_rgb(img)
    arr = _as_rgb_array(img)  # [H, W, 3]
    landmarks = detect_landmarks(arr, detector, predictor)
    landmarks.sort(key=lambda lm: ffhq_quad(lm)[1], reverse=True)
    if not all_faces:
        landmarks = landmarks[:1]
    pil_img = Image.fromarray(arr)
    return [align_from_landmarks(pil_img, lm, output_size) for lm in landmarks]


@dataclass
class AlignOptions:
    input_img_path: str
    outdir: str
    output_size: int = 1024
    all_faces: bool = False
    predictor: str = None
    n_worker: int = 1


def mirrored_folder(input_root):
    """The folder whose tree the outputs mirror: --input_img_path, or the folder of a single file."""
    return input_root if os.path.isdir(input_root) else os.path.dirname(input_root) or '.'


def output_stem(path, input_root):
    """The output path of `path` without '.png', mirroring the input tree."""
    return os.path.splitext(os.path.relpath(path, mirrored_folder(input_root)))[0]


# (predictor path, (detector, predictor)) of this process, built once by _init_worker.
_worker_models = None


def _init_worker(predictor_path):
    global _worker_models
    if _worker_models is None or _worker_models[0] != predictor_path:
        _worker_models = (predictor_path, load_face_models(predictor_path))


def _init_pool_worker(predictor_path):
    pool_worker_sigterm()
    _init_worker(predictor_path)


def _align_one(task):
    """Align one file; returns (path, written output paths, error message or None)."""
    path, out_stem, output_size, all_faces = task
    detector, predictor = _worker_models[1]
    try:
        img = read_image_rgb(path)
    except UnreadableImageError as error:
        return path, [], str(error)
    faces = align_face(img, predictor, detector, output_size, all_faces)
    if not faces:
        return path, [], None
    if all_faces:
        names = [f'{out_stem}_{i}.png' for i in range(len(faces))]
    else:
        names = [f'{out_stem}.png']
    with exit_on_sigterm():  # a pool's terminate() mid-write: the temporary PNG is removed
        for face, name in zip(faces, names):
            save_image_atomic(face, name, 'PNG')
    return path, names, None


def align_images(options):
    """Align every image under options.input_img_path into options.outdir; returns a summary dict."""
    found = list_images(options.input_img_path)
    paths = without_outputs(found, options.input_img_path, options.outdir)  # an earlier run's PNGs
    if len(paths) < len(found):
        print(f'note: {len(found) - len(paths)} image(s) in --outdir {options.outdir} left out: outputs, not inputs',
              file=sys.stderr)
    if not paths:
        raise FileNotFoundError(f'no images (png, jpg, webp, ...) found in {options.input_img_path}')
    paths, same_name = distinct_by(paths, lambda p: output_stem(p, options.input_img_path))
    tasks = [(p, os.path.join(options.outdir, output_stem(p, options.input_img_path)), options.output_size,
              options.all_faces) for p in paths]
    predictor_path = options.predictor or default_predictor_path()
    os.makedirs(options.outdir, exist_ok=True)

    results = []
    progress = tqdm(total=len(tasks), desc='aligning', unit='img')
    if options.n_worker <= 1:
        _init_worker(predictor_path)
        for task in tasks:
            results.append(_align_one(task))
            progress.update()
    else:
        with multiprocessing.Pool(options.n_worker, _init_pool_worker, (predictor_path,)) as pool:
            for result in pool.imap_unordered(_align_one, tasks):
                results.append(result)
                progress.update()
    progress.close()

    results.sort()
    return {
        'written': [name for _, names, _ in results for name in names],
        'no_face': [path for path, names, error in results if not names and error is None],
        'unreadable': [error for _, _, error in results if error is not None],
        'same_name': same_name,  # (path left out, the earlier path with its output name)
        'total': len(results) + len(same_name),
    }


def report(summary, outdir):
    aligned = summary['total'] - len(summary['no_face']) - len(summary['unreadable']) - len(summary['same_name'])
    print(f"aligned {aligned} of {summary['total']} images ({len(summary['written'])} faces) into {outdir}")
    for path in summary['no_face']:
        print(f'skipped (no face found): {path}')
    for message in summary['unreadable']:
        print(f'skipped (unreadable): {message}')
    for path, first in summary['same_name']:
        print(f'skipped (same output name as {first}, rename one): {path}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Align faces as in FFHQ (dlib 68-point landmarks).')
    parser.add_argument('--input_img_path', required=True,
                        help='an image file or a folder (searched recursively)')
    parser.add_argument('--outdir', required=True,
                        help='output folder; PNGs named after the inputs, sub-folders mirrored')
    parser.add_argument('--output_size', type=int, default=1024, help='side of the aligned square in pixels')
    parser.add_argument('--all_faces', action='store_true',
                        help='write every face as NAME_0.png, NAME_1.png, ... (largest first); '
                             'default: only the largest face, as NAME.png')
    parser.add_argument('--predictor', default=None,
                        help="dlib 68-point landmark model; default: the face-recognition-models package's file")
    parser.add_argument('--n_worker', type=int, default=min(8, os.cpu_count() or 1),
                        help='worker processes (each loads its own dlib models)')
    args = parser.parse_args(argv)
    if args.output_size < 8:
        parser.error('--output_size must be at least 8')
    if args.n_worker < 0:
        parser.error('--n_worker must be >= 0')
    if not os.path.exists(args.input_img_path):
        parser.error(f'--input_img_path {args.input_img_path} does not exist')
    if args.predictor is not None and not os.path.isfile(args.predictor):
        parser.error(f'--predictor {args.predictor} is not a file')
    for problem in folder_problems('--outdir', args.outdir) + input_folder_problems(
            '--outdir', args.outdir, '--input_img_path', mirrored_folder(args.input_img_path)):
        parser.error(problem)
    return AlignOptions(**vars(args))


def main(argv=None):
    options = parse_args(argv)
    try:
        with exit_on_sigterm():  # stopped by a scheduler: the PNGs written are complete, no temporaries left
            summary = align_images(options)
    except FileNotFoundError as e:  # no images under --input_img_path: one line, not a traceback
        raise SystemExit(f'error: {e}')
    except DiskFullError as e:  # the next faces would not fit either; the PNGs written before it are complete
        raise SystemExit(f'error: {e}; the PNGs already in {options.outdir} are complete')
    except KeyboardInterrupt:
        print(f'interrupted: the PNGs already in {options.outdir} are complete', file=sys.stderr)
        return 130
    report(summary, options.outdir)
    return 0 if summary['written'] else 1


if __name__ == '__main__':
    sys.exit(main())
