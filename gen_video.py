"""Style-interpolation videos (the release's gen_video.py): per face photo, a walk through randomly drawn
style images, frames [face | sliding reference window | result], written as H.264 MP4 (yuv420p, 30 fps).

    python gen_video.py --size 1024 --ckpt pretrained_models/blendgan.pt \
        --psp_encoder_ckpt pretrained_models/psp_encoder.pt --style_img_path test_imgs/style_imgs/ \
        --input_img_path test_imgs/face_imgs/ --outdir results/inter_videos/
"""
import argparse
import os
import random
import sys

import torch
from tqdm import tqdm

from inference import (DTYPES, Report, add_common_args, add_generator_args, add_indicator_arg, add_photo_args,
                       check_model_files, distinct_names, encode_faces, encode_styles, finite_rows,
                       keep_freed_memory, list_inputs, load_aligner, load_blendgan, load_psp, nonfinite_reason,
                       read_input, release_freed_memory, resize, run_job, stem, validate_common)
from utils import HelpFormatter
from video import HOLD_FRAMES, compose_frame, interpolation_alphas, sliding_window, write_mp4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_generator_args(p)
    add_photo_args(p, style_help="folder of style images", outputs="videos")
    add_indicator_arg(p, 7, " (the release's video default: 7)")
    p.add_argument("--outdir", default="results/inter_videos/", help="output folder")
    p.add_argument("--n_styles", type=int, default=8, help="style images drawn (with replacement) per face")
    p.add_argument("--fps", type=int, default=30, help="frames per second")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better, 18 is visually lossless)")
    add_common_args(p, batch_default=8)
    opts = p.parse_args(argv)
    validate_common(p, opts)
    if opts.n_styles < 2:
        p.error("--n_styles must be >= 2 (a video walks between styles)")
    return opts


class NonFiniteFrame(ValueError):
    """A frame of NaN/inf pixels: the face's video is not written."""


def frames_per_face(n_styles):
    """(n_styles - 1) walks of len(interpolation_alphas()) frames, then the final hold."""
    return (n_styles - 1) * len(interpolation_alphas()) + HOLD_FRAMES


def counted(frames, progress):
    """``frames``, advancing ``progress`` by one after each."""
    for frame in frames:
        yield frame
        progress.update()


@torch.no_grad()
def face_frames(g, code, face_img, style_imgs, z_styles, opts):
    """Yield one face's frames, uint8 [size, 3*size, 3]: (n_styles - 1) * 31 + 10 of them.

    Frames are generated in batches of distinct codes (a hold repeats its code exactly and reuses the
    image) and streamed, so memory does not grow with the video's length.
    """
    plan = [(k, alpha) for k in range(len(z_styles) - 1) for alpha in interpolation_alphas()]
    z_all = torch.stack([torch.lerp(z_styles[k], z_styles[k + 1], alpha) for k, alpha in plan])  # [T, style_dim]
    distinct = [0]  # index of each frame's code among the distinct consecutive codes
    for t in range(1, len(plan)):
        distinct.append(distinct[-1] + int(not torch.equal(z_all[t], z_all[t - 1])))
    firsts = [t for t in range(len(plan)) if t == 0 or distinct[t] != distinct[t - 1]]
    batch, batch_start, frame = None, None, None
    for t, (k, alpha) in enumerate(plan):
        d = distinct[t]
        if batch is None or d >= batch_start + len(batch):
            batch_start = d
            z = z_all[firsts[d:d + opts.batch]]
            batch, _ = g([code.expand(len(z), -1, -1)], z_embed=z, add_weight_index=opts.add_weight_index,
                         theta=opts.theta, input_is_latent=True, randomize_noise=False)
            if not all(finite_rows(batch)):
                raise NonFiniteFrame(nonfinite_reason(opts.dtype))
        window = sliding_window(style_imgs[k], style_imgs[k + 1], alpha)
        frame = compose_frame(face_img, window, batch[d - batch_start])
        yield frame
    for _ in range(HOLD_FRAMES):
        yield frame


def style_walks(face_paths, style_paths, n_styles, seed):
    """Per face, the style images of its video: random.choices with replacement from one Python RNG
    seeded once and carried from face to face, in sorted order (the release's picks for seed 0)."""
    rng = random.Random(seed)
    return {face: rng.choices(style_paths, k=n_styles) for face in face_paths}


@torch.no_grad()
def gen_videos(opts):
    check_model_files(opts, psp=True)  # every missing file in one message, before any work
    device, dtype = opts.device, DTYPES[opts.dtype]
    # One network at a time, as style_transfer_folder.py: G (memory-mapped) encodes the styles and is
    # dropped; pSp encodes every face and is dropped; a G without E_style renders the videos. So the
    # 1024 px video fits wherever the style transfer fits.
    g, _ = load_blendgan(opts.ckpt, opts.size, opts.channel_multiplier, device, dtype, indicator=opts.add_weight_index,
                      photos=True)
    size = g.size
    report = Report()
    aligner = load_aligner(opts.align, opts.predictor)
    style_paths = []
    style_cache = {}
    for path in list_inputs(opts.style_img_path, opts.outdir):
        img = read_input(path, report)
        if img is not None:
            style_paths.append(path)
            style_cache[path] = resize(img, size)  # the release resizes before encoding
    if not style_paths:
        print("nothing to do: no usable style image", file=sys.stderr)
        return report
    z_cache = dict(zip(style_paths, encode_styles(g, [style_cache[p] for p in style_paths], opts.batch, device, dtype)))
    del g
    release_freed_memory()
    face_paths = distinct_names(list_inputs(opts.input_img_path, opts.outdir), report)
    walks = style_walks(face_paths, style_paths, opts.n_styles, opts.seed)
    todo = []  # (face path, face image, output path)
    for path in face_paths:
        out = os.path.join(opts.outdir, f"{stem(path)}.mp4")
        if opts.skip_existing and os.path.exists(out):
            report.existing += 1
            continue
        img = read_input(path, report, aligner, align_size=size)
        if img is not None:
            todo.append((path, resize(img, size), out))
    if not todo:
        return report
    psp = load_psp(opts.psp_encoder_ckpt, size, device, dtype, opts.compile)
    # One face per call, as before the sequencing: the codes do not depend on the batch composition.
    codes = [encode_faces(psp, [face], 1, device, dtype) for _, face, _ in todo]  # each [1, n_latent, 512]
    del psp
    if opts.compile:
        torch.compiler.reset()  # compiled code holds references to the encoder's weights
    release_freed_memory()
    g, _ = load_blendgan(opts.ckpt, size, opts.channel_multiplier, device, dtype, opts.compile,
                         with_style_encoder=False)
    os.makedirs(opts.outdir, exist_ok=True)
    n_frames = frames_per_face(opts.n_styles)
    progress = tqdm(total=len(todo) * n_frames, desc="videos", unit="frame")  # a 1024 px face takes minutes
    for k, ((path, face, out), code) in enumerate(zip(todo, codes)):
        progress.set_postfix_str(f"face {k + 1}/{len(todo)}: {stem(path)}")
        picks = walks[path]
        frames = face_frames(g, code, face, [style_cache[p] for p in picks], [z_cache[p] for p in picks], opts)
        try:
            write_mp4(out, counted(frames, progress), fps=opts.fps, crf=opts.crf)  # no file unless complete
            report.written += 1
        except NonFiniteFrame as e:
            report.drop(out, str(e))
        progress.update((k + 1) * n_frames - progress.n)
    progress.close()
    return report


def main(argv=None):
    return run_job(gen_videos, parse_args(argv), "videos")


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
