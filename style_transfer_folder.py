"""Stylize every face photo with every style image: OUTDIR/{face}_v_{style}.jpg = [face | style | result].

Faces are inverted to W+ by the pSp encoder and styles encoded by the style encoder once per image, not
once per pair; the pairs are then generated in batches.

    python style_transfer_folder.py --size 1024 --ckpt pretrained_models/blendgan.pt \
        --psp_encoder_ckpt pretrained_models/psp_encoder.pt --style_img_path test_imgs/style_imgs/ \
        --input_img_path test_imgs/face_imgs/ --outdir results/style_transfer/
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from inference import (DTYPES, Report, add_common_args, add_generator_args, add_indicator_arg, add_photo_args,
                       check_model_files, distinct_names, encode_faces, encode_styles, face_pool_size, finite_rows,
                       keep_freed_memory, list_inputs, load_aligner, load_blendgan, load_psp, nonfinite_reason,
                       pooled, read_input, release_freed_memory, resize, run_job, stem, style_pool_size,
                       validate_common, write_jpeg)
from utils import HelpFormatter, ten2img


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_generator_args(p)
    add_photo_args(p, style_help="style image or folder of them", outputs="outputs")
    add_indicator_arg(p, 6)
    p.add_argument("--outdir", default="results/style_transfer/", help="output folder")
    add_common_args(p)
    opts = p.parse_args(argv)
    validate_common(p, opts)
    return opts


def read_all(paths, report, size, pool_size, aligner=None):
    """(stems, the images pooled to their encoder's input [1, 3, pool, pool], size x size thumbnails for
    the mosaic). Pooled as they are read: a folder of 12-megapixel photos does not stay in memory whole."""
    stems, images, thumbs = [], [], []
    for path in tqdm(paths, desc="reading", unit="img", leave=False):
        img = read_input(path, report, aligner, align_size=size)
        if img is not None:
            stems.append(stem(path))
            images.append(pooled(img, pool_size))
            thumbs.append(resize(img, size))
    return stems, images, thumbs


@torch.no_grad()
def style_transfer(opts):
    device, dtype = opts.device, DTYPES[opts.dtype]
    # One network at a time, each dropped when its part is done, so that E_style's 1.25 GB layer, the
    # 1 GB pSp encoder and the 1024 px activations are never in memory together (peak RSS: README).
    # The generator is memory-mapped: in float32 loading it reads little more than what is used.
    check_model_files(opts, psp=True)  # every missing file in one message, before any work
    g = load_blendgan(opts.ckpt, opts.size, opts.channel_multiplier, device, dtype, indicator=opts.add_weight_index,
                      photos=True)[0]
    size = g.size
    report = Report()
    aligner = load_aligner(opts.align, opts.predictor)
    face_paths = distinct_names(list_inputs(opts.input_img_path, opts.outdir), report)
    face_stems, faces, face_thumbs = read_all(face_paths, report, size, face_pool_size(), aligner)
    style_paths = distinct_names(list_inputs(opts.style_img_path, opts.outdir), report)
    style_stems, styles, style_thumbs = read_all(style_paths, report, size, style_pool_size(g))
    if not faces or not styles:
        print(f"nothing to do: {len(faces)} usable face(s), {len(styles)} usable style(s)", file=sys.stderr)
        return report
    z_embeds = encode_styles(g, styles, opts.batch, device, dtype)  # [S, style_dim]
    del g
    release_freed_memory()
    psp = load_psp(opts.psp_encoder_ckpt, size, device, dtype, opts.compile)
    codes = encode_faces(psp, faces, opts.batch, device, dtype)  # [F, n_latent, 512]
    del psp, faces, styles
    if opts.compile:
        torch.compiler.reset()  # compiled code holds references to the encoder's weights
    release_freed_memory()
    # A fresh mapping of the file, without E_style: the pages read above are not part of it.
    g = load_blendgan(opts.ckpt, size, opts.channel_multiplier, device, dtype, opts.compile,
                      with_style_encoder=False)[0]

    os.makedirs(opts.outdir, exist_ok=True)
    pairs = [(f, s) for f in range(len(face_stems)) for s in range(len(style_stems))]
    out_path = lambda f, s: os.path.join(opts.outdir, f"{face_stems[f]}_v_{style_stems[s]}.jpg")  # noqa: E731
    if opts.skip_existing:
        todo = [(f, s) for f, s in pairs if not os.path.exists(out_path(f, s))]
        report.existing = len(pairs) - len(todo)
        pairs = todo
    for start in tqdm(range(0, len(pairs), opts.batch), desc="style transfer", unit="batch"):
        chunk = pairs[start:start + opts.batch]
        f_idx = torch.tensor([f for f, _ in chunk])
        s_idx = torch.tensor([s for _, s in chunk])
        out, _ = g([codes[f_idx]], z_embed=z_embeds[s_idx], add_weight_index=opts.add_weight_index,
                   theta=opts.theta, input_is_latent=True, randomize_noise=False)
        for (f, s), result, ok in zip(chunk, ten2img(out), finite_rows(out)):
            if not ok:
                report.drop(out_path(f, s), nonfinite_reason(opts.dtype))
                continue
            write_jpeg(out_path(f, s), np.concatenate([face_thumbs[f], style_thumbs[s], result], axis=1))
            report.written += 1
    return report


def main(argv=None):
    return run_job(style_transfer, parse_args(argv), "stylized faces")


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
