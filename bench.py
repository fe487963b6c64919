"""Benchmarks: median wall time of the main forward/backward passes, after warm-up; prints a table.

    python bench.py --sizes 256,1024 --batch 1 --device cpu --dtype float32

Rows: generator forward (natural face, i = n_latent, and stylized, i = 6, from a given style code),
one style embedding (VGG-19 Gram + MLP), one pSp encoding, one discriminator forward + backward.
Weights are random (timings do not depend on them). Speed is measured here, never asserted in tests.
"""
import argparse
import resource
import statistics
import sys
import time

import torch

from inference import DTYPES, default_device
from model import Discriminator, Generator


def timed(fn, device, warmup, repeat):
    """Median seconds of fn() over `repeat` runs after `warmup` runs (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(cls, *args, device, dtype, **kw):
    """The module with its constructor's own initialisation (realistic scales, real FIR kernels)."""
    return cls(*args, **kw).to(device=device, dtype=dtype).eval()


def bench_size(size, opts):
    device, dtype = opts.device, DTYPES[opts.dtype]
    rows = []
    g = build(Generator, size, 512, 8, channel_multiplier=2, load_pretrained_vgg=False, device=device, dtype=dtype)
    z = torch.randn(opts.batch, 512, device=device, dtype=dtype)
    z_s = torch.randn(opts.batch, 512, device=device, dtype=dtype)
    img = torch.rand(opts.batch, 3, size, size, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        rows.append(("G forward, natural", timed(lambda: g([z], randomize_noise=False), device, opts.warmup, opts.repeat)))
        rows.append(("G forward, stylized i=6", timed(
            lambda: g([z], z_embed=z_s, add_weight_index=6, randomize_noise=False), device, opts.warmup, opts.repeat)))
        rows.append(("style embedding", timed(lambda: g.get_z_embed(img), device, opts.warmup, opts.repeat)))
        if opts.psp:
            from psp_encoder.psp_encoders import PSPEncoder

            psp = PSPEncoder(None, output_size=size).to(device=device, dtype=dtype).eval()
            rows.append(("pSp encoding", timed(lambda: psp(img), device, opts.warmup, opts.repeat)))
            del psp
    del g
    d = build(Discriminator, size, channel_multiplier=2, device=device, dtype=dtype)

    def d_step():
        x = img.detach().requires_grad_(True)
        d(x).sum().backward()

    rows.append(("D forward+backward", timed(d_step, device, opts.warmup, opts.repeat)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024", help="comma-separated output sizes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no_psp", dest="psp", action="store_false", help="skip the pSp row")
    opts = p.parse_args(argv)
    print(f"# device={opts.device} dtype={opts.dtype} batch={opts.batch} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print(f"| size | what | median s | images/s |\n| --- | --- | --- | --- |")
    for size in [int(s) for s in opts.sizes.split(",")]:
        for what, sec in bench_size(size, opts):
            print(f"| {size} | {what} | {sec:.3f} | {opts.batch / sec:.2f} |", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"# peak RSS {rss:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
