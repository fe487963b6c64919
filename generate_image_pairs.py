"""Generate natural / stylized face pairs (paper Fig. 1, 5): latent-guided without --style_img (a random
style code), reference-guided with it. Writes OUTDIR/000000.jpg ... as [natural | stylized].

    python generate_image_pairs.py --size 1024 --pics 20 --ckpt pretrained_models/blendgan.pt \
        --outdir results/generated_pairs/reference_guided --style_img test_imgs/style_imgs/100036.jpg
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_checkpoint
from imageio_utils import decode_problems
from inference import (DTYPES, Report, add_common_args, add_generator_args, add_indicator_arg,
                       check_model_files, encode_styles, finite_rows, keep_freed_memory, load_blendgan,
                       nonfinite_reason, read_input, run_job, truncation_centre, validate_common, write_jpeg)
from utils import HelpFormatter, ten2img


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_generator_args(p)
    p.add_argument("--pics", type=int, default=20, help="number of pairs to generate")
    p.add_argument("--style_img", default=None, help="reference style image (reference-guided); none: a random style code")
    p.add_argument("--outdir", default="results/generated_pairs", help="output folder")
    p.add_argument("--truncation", type=float, default=0.75, help="truncation psi of the face codes (overridden by ckpt['truncation'])")
    p.add_argument("--truncation_mean", type=int, default=4096, help="samples for the truncation centre when ckpt has no latent_avg")
    p.add_argument("--sample_zs", default=None, help="torch file with face codes (indexable, items [1, 512]) instead of random ones")
    add_indicator_arg(p, 6)
    add_common_args(p)
    opts = p.parse_args(argv)
    validate_common(p, opts)
    if opts.pics < 1:
        p.error("--pics must be >= 1")
    if opts.style_img is not None:
        if not os.path.isfile(opts.style_img):
            p.error(f"--style_img {opts.style_img}: " + ("a folder, not an image file" if os.path.isdir(opts.style_img)
                                                         else "no such file"))
        for problem in decode_problems("--style_img", [opts.style_img]):
            p.error(problem)
    return opts


@torch.no_grad()
def generate_pairs(opts):
    check_model_files(opts)
    device, dtype = opts.device, DTYPES[opts.dtype]
    g, ckpt = load_blendgan(opts.ckpt, opts.size, opts.channel_multiplier, device, dtype, opts.compile,
                            indicator=opts.add_weight_index)
    rng = torch.Generator().manual_seed(opts.seed)  # CPU draws: the same numbers on every device
    truncation = float(ckpt.get("truncation", opts.truncation))
    trunc_latent = truncation_centre(g, ckpt, opts.truncation_mean, rng, device, dtype) if truncation < 1 else None

    if opts.style_img:
        report = Report()
        img = read_input(opts.style_img, report)
        if img is None:
            raise SystemExit(f"error: {report.skipped[0][0]}: {report.skipped[0][1]}")
        z_embed = encode_styles(g, [img], 1, device, dtype)  # [1, style_dim]
    else:
        z_embed = torch.randn(1, g.style_dim, generator=rng).to(device=device, dtype=dtype)

    if opts.sample_zs:
        sample_zs = load_checkpoint(opts.sample_zs, expect_dict=False)
        if len(sample_zs) < opts.pics:
            raise SystemExit(f"error: {opts.sample_zs} holds {len(sample_zs)} codes, --pics asks for {opts.pics}")
        zs = [torch.as_tensor(sample_zs[i]).reshape(1, -1) for i in range(opts.pics)]
    else:
        zs = [torch.randn(1, g.style_dim, generator=rng) for _ in range(opts.pics)]  # one draw per picture

    report = Report()
    kw = dict(truncation=truncation, truncation_latent=trunc_latent, randomize_noise=False)
    os.makedirs(opts.outdir, exist_ok=True)
    for start in tqdm(range(0, opts.pics, opts.batch), desc="pairs", unit="batch"):
        z = torch.cat(zs[start:start + opts.batch]).to(device=device, dtype=dtype)  # [B, style_dim]
        natural, _ = g([z], **kw)
        stylized, _ = g([z], z_embed=z_embed.expand(len(z), -1), add_weight_index=opts.add_weight_index,
                        theta=opts.theta, **kw)
        finite = [a and b for a, b in zip(finite_rows(natural), finite_rows(stylized))]
        for k, (a, b, ok) in enumerate(zip(ten2img(natural), ten2img(stylized), finite)):
            path = os.path.join(opts.outdir, f"{start + k:06d}.jpg")
            if not ok:
                report.drop(path, nonfinite_reason(opts.dtype))
                continue
            write_jpeg(path, np.concatenate([a, b], axis=1))
            report.written += 1
    return report


def main(argv=None):
    return run_job(generate_pairs, parse_args(argv), "pairs")


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
