"""Paper Table 1: FID against the real artistic set (AAHQ) and LPIPS style diversity, latent- and
reference-guided, per blending indicator i; plus style consistency (cosine between the style code that
drove an output and the code E_style extracts from it).

Writes OUTDIR/table1.csv, OUTDIR/table1.md and OUTDIR/partial_results.json (finished rows: a rerun with
the same settings skips them), and caches the real set's FID statistics (OUTDIR/real_stats.npz).

    python evaluate.py --ckpt pretrained_models/blendgan.pt --real data/aahq.lmdb --indicators 0,2,...,18

Per face code, --n_styles outputs (latent-guided: random style codes; reference-guided: distinct references
drawn from --style_refs); FID takes the first --n_samples outputs, LPIPS diversity and style consistency
the outputs of the first --lpips_faces face codes. Metrics see the outputs as the inference scripts save
them (8-bit). --batch is rounded down to whole faces (a multiple of --n_styles, at least one face). The
same seed gives the same codes and references on any device and for any --batch.

Determinism: a row is computed whole (a resumed run recomputes unfinished rows from their first face), in
batches fixed by --batch and the face index, with float64 sums; so a rerun or resume on the same machine with
the same --batch gives bit-identical numbers. Another --batch changes only the float32 rounding of the
batched kernels, which the 8-bit quantization can turn into one-level flips of a few pixels: measured
below 5e-5 relative (tests allow 1e-3), far below the digits the table prints.
"""
import argparse
import os
import sys

import torch

from checkpoint import CheckpointError
from evaluation import (MODES, ImageSet, Protocol, evaluation_settings, image_set_id, load_metric_networks,
                        parse_indicators, real_statistics, run_protocol)
from fileio import DiskFullError, exit_on_sigterm
from imageio_utils import UnreadableImageError
from inference import DTYPES, add_common_args, load_blendgan, truncation_centre, validate_common
from utils import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="pretrained_models/blendgan.pt", help="BlendGAN checkpoint (g_ema)")
    p.add_argument("--size", type=int, default=None, help="output size; None: the checkpoint's")
    p.add_argument("--channel_multiplier", type=int, default=None, help="generator width; None: the checkpoint's")
    p.add_argument("--real", default=None, help="real artistic faces (AAHQ): an LMDB of prepare_data.py or a folder of images")
    p.add_argument("--real_resolution", type=int, default=None,
                   help="resolution to read from an LMDB --real / --style_refs, and to bring a folder's images to "
                        "(shorter side scaled, centre square, as prepare_data.py packs them); None: the generator's size")
    p.add_argument("--n_real", type=int, default=None, help="use the first N real images; None: all")
    p.add_argument("--real_stats", default=None,
                   help="FID statistics cache of the real set (.npz, pytorch-fid's layout); read if it exists, "
                        "else computed from --real and written; None: OUTDIR/real_stats.npz")
    p.add_argument("--style_refs", default=None,
                   help="reference style images for reference-guided rows, LMDB or folder; None: --real")
    p.add_argument("--modes", default="latent,reference", help="rows to compute: latent and/or reference")
    p.add_argument("--indicators", default=None,
                   help="blending indicators i, e.g. 0,2,...,18; None: every second one from 0 to n_latent")
    p.add_argument("--n_samples", type=int, default=50000, help="generated images for FID")
    p.add_argument("--lpips_faces", type=int, default=1000, help="face codes for LPIPS diversity and style consistency")
    p.add_argument("--n_styles", type=int, default=10, help="style codes (or references) per face code")
    p.add_argument("--lpips_size", type=int, default=256,
                   help="side outputs are resized to for LPIPS (StarGAN v2 works at 256); 0: as generated")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi of the face codes (1: none)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights pt_inception-2015-12-05-6726825d.pth; None: the torch hub cache")
    p.add_argument("--lpips_alexnet", default=None,
                   help="torchvision AlexNet weights alexnet-owt-7be5be79.pth for LPIPS; None: the torch hub cache")
    p.add_argument("--no_download", action="store_true", help="never download missing weights files")
    p.add_argument("--outdir", default="results/evaluation", help="output folder")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    add_common_args(p, batch_default=20)
    opts = p.parse_args(argv)
    validate_common(p, opts)
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if not opts.modes or any(m not in MODES for m in opts.modes):
        p.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    if opts.indicators is not None:
        try:
            opts.indicators = parse_indicators(opts.indicators)
        except ValueError as e:
            p.error(f"--indicators: {e}")
    if opts.n_samples < 2:
        p.error("--n_samples must be >= 2 (FID needs a covariance)")
    if opts.lpips_faces < 0 or opts.n_styles < 2:
        p.error("--lpips_faces must be >= 0 and --n_styles >= 2")
    if opts.lpips_size < 0 or opts.workers < 0 or (opts.n_real is not None and opts.n_real < 2):
        p.error("--lpips_size and --workers must be >= 0, --n_real >= 2")
    if not 0 < opts.truncation <= 1:
        p.error("--truncation must be in (0, 1]")
    if "reference" in opts.modes and not (opts.style_refs or opts.real):
        p.error("reference-guided rows need --style_refs (or --real); or pass --modes latent")
    opts.real_stats = opts.real_stats or os.path.join(opts.outdir, "real_stats.npz")
    return opts


@torch.no_grad()
def evaluate(opts):
    device, dtype = opts.device, DTYPES[opts.dtype]
    extractor, lpips_model = load_metric_networks(opts.inception, opts.lpips_alexnet, not opts.no_download)
    extractor, lpips_model = extractor.to(device), lpips_model.to(device)
    g, ckpt = load_blendgan(opts.ckpt, opts.size, opts.channel_multiplier, device, dtype, opts.compile)
    indicators = opts.indicators if opts.indicators is not None else list(range(0, g.n_latent + 1, 2))
    bad = [i for i in indicators if not 0 <= i <= g.n_latent]
    if bad:
        raise ValueError(f"--indicators {bad}: must be in [0, {g.n_latent}] at size {g.size} ({g.n_latent} = natural face)")
    resolution = opts.real_resolution or g.size
    real_mu, real_sigma, real_id = real_statistics(opts.real, resolution, opts.n_real, opts.real_stats, extractor,
                                                   opts.batch, device, opts.workers)
    refs_path = opts.style_refs or opts.real  # part of the settings even for latent-only runs: rows can be added
    refs_id = image_set_id(refs_path, resolution) if refs_path else None
    refs = ImageSet(refs_path, resolution) if "reference" in opts.modes else None

    truncation_latent = None
    if opts.truncation < 1:
        truncation_latent = truncation_centre(g, ckpt, 4096, torch.Generator().manual_seed(opts.seed), device, dtype)
    protocol = Protocol(opts.n_samples, opts.lpips_faces, opts.n_styles, opts.lpips_size, opts.truncation, opts.theta,
                        opts.seed)
    settings = evaluation_settings(opts.ckpt, g.size, real_id, refs_id, protocol, dtype=opts.dtype,
                                   inception=extractor.weights_id, lpips_alexnet=lpips_model.weights_id)
    return run_protocol(g, opts.modes, indicators, protocol, real_mu, real_sigma, extractor, lpips_model, opts.outdir,
                        settings, opts.batch, refs, truncation_latent, opts.workers)


def main(argv=None):
    opts = parse_args(argv)
    try:
        with exit_on_sigterm():  # a stopped run leaves no temporary files behind
            table = evaluate(opts)
    except (CheckpointError, ValueError, FileNotFoundError, UnreadableImageError, DiskFullError) as e:
        raise SystemExit(f"error: {e}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
