"""Benchmarks: median wall time of inference passes and training phases, after warm-up; prints a table.

    python bench.py --sizes 256,1024 --batch 1,16 --device cpu --dtype float32,bfloat16 [--compile] [--train]

Every size x batch x dtype combination runs in one process (one start, one build of the CUDA ops).

Inference rows (per size): generator forward (natural face, i = n_latent, and stylized, i = 6, from a
given style code), one style embedding (VGG-19 Gram + MLP), one pSp encoding, one full style-transfer
pair without caching (pSp + style embedding + stylized forward), one discriminator forward + backward.
The networks are prepared as the inference scripts prepare them (inference.for_inference: channels_last,
eval, optionally torch.compile). GFLOP/image of the generator comes from torch's FLOP counter.
Training rows (--train): the four phases of one BlendGAN iteration (train.py's own functions) at
--train_size with --train_batch and Eq. 8 read as --train_eq8 (d_step and g_step: two generator passes
each), the amortised iteration (R1 every 16, path length every 4), and one
style-encoder SimCLR step (VGG in --dtype autocast when that is not float32, Gram products in float32).
--plain adds rows for modules used as code written against the release uses them: built, `.eval()`,
called, with no preparation (no for_inference), in float32 and under CPU/CUDA bfloat16 autocast; with
--release_dir PATH (a checkout of the official repository, which the user provides) the release's own
Generator runs beside it in the same process.
Weights are random (timings do not depend on them). Speed is measured here, never asserted in tests.
"""
import argparse
import functools
import importlib
import os
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from blendgan_training import EQ8_READINGS
from distributed import init_distributed
from inference import DTYPES, default_device, for_inference, keep_freed_memory
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


def generator_gflop(g, z):
    """FLOPs of one natural forward per image, counted by torch (convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        getattr(g, "_orig_mod", g)([z], randomize_noise=False)  # eager: the counter's hooks stay out of compile
    return counter.get_total_flops() / z.shape[0] / 1e9


@functools.lru_cache(maxsize=None)  # once per size and dtype, whatever the batches
def low_precision_psnr(size, dtype, device, seed=0):
    """PSNR (dB, images clamped to [-1, 1]) of the `dtype` generator's stylized i=6 images against
    float32, on 4 face/style codes. Weights: the constructor's random initialisation with trained-like
    WBM weights (face weight falling from 0.9 to 0.1 over the layers; at init it is 1, no style at all)."""
    torch.manual_seed(seed)
    g = Generator(size, 512, 8, channel_multiplier=2, load_pretrained_vgg=False)
    with torch.no_grad():
        g.add_weight.copy_(torch.linspace(0.9, 0.1, g.n_latent).view(1, -1, 1))
    z, z_s = torch.randn(4, 512, device=device), torch.randn(4, 512, device=device)
    images = []
    for dt in (torch.float32, dtype):
        net = for_inference(g, device, dt)  # moves g itself: float32 first, then the low precision
        with torch.no_grad():
            images.append(net([z.to(dt)], z_embed=z_s.to(dt), add_weight_index=6, randomize_noise=False)[0]
                          .float().clamp(-1, 1))
    mse = (images[0] - images[1]).pow(2).mean()
    return float(10 * torch.log10(2 ** 2 / mse))


def inference_networks(size, opts):
    """(G, pSp or None, D) prepared as the scripts prepare them, for every batch of one size and dtype;
    prints G's GFLOP per image, and first, for a low precision, its PSNR against float32 (whose own
    generators are gone before these are built)."""
    from psp_encoder.psp_encoders import PSPEncoder

    device, dtype = opts.device, DTYPES[opts.dtype]
    if dtype != torch.float32:
        print(f"# {size} px: {opts.dtype} vs float32 image, PSNR {low_precision_psnr(size, dtype, device):.1f} dB",
              flush=True)
    g = for_inference(Generator(size, 512, 8, channel_multiplier=2, load_pretrained_vgg=False), device, dtype,
                      opts.compile)
    print(f"# {size} px: generator {generator_gflop(g, torch.randn(1, 512, device=device, dtype=dtype)):.1f} "
          "GFLOP/image", flush=True)
    encoder = for_inference(PSPEncoder(None, output_size=size), device, dtype, opts.compile) if opts.psp else None
    return g, encoder, for_inference(Discriminator(size, channel_multiplier=2), device, dtype)


def bench_inference(size, opts, networks):
    """Yields (what, seconds per call, images per call) for one output size with inference_networks'
    ``networks``, each row as soon as it is timed (a run killed at its time limit still shows the rows
    before)."""
    device, dtype, n = opts.device, DTYPES[opts.dtype], opts.batch
    run = lambda fn: timed(fn, device, opts.warmup, opts.repeat)  # noqa: E731
    g, psp, d = networks
    z = torch.randn(n, 512, device=device, dtype=dtype)
    z_s = torch.randn(n, 512, device=device, dtype=dtype)
    img = torch.rand(n, 3, size, size, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        yield ("G forward, natural", run(lambda: g([z], randomize_noise=False)), n)
        yield ("G forward, stylized i=6", run(
            lambda: g([z], z_embed=z_s, add_weight_index=6, randomize_noise=False)), n)
        yield ("style embedding", run(lambda: g.get_z_embed(img)), n)
        if psp is not None:
            yield ("pSp encoding", run(lambda: psp(img)), n)

            def pair():
                codes = psp(img)  # [N, n_latent, 512]
                return g([codes], input_is_latent=True, z_embed=g.get_z_embed(img), add_weight_index=6,
                         randomize_noise=False)

            yield ("style-transfer pair (pSp + embedding + G)", run(pair), n)

    def d_step():
        x = img.detach().requires_grad_(True)
        d(x).sum().backward()

    yield ("D forward+backward", run(d_step), n)
    d.zero_grad(set_to_none=True)  # not carried into the next batch's memory


def release_generator_class(release_dir):
    """The Generator class of the release's model.py in `release_dir`, imported with the release's own
    `op` and `model_encoder` packages; this repository's modules of the same names are restored after."""
    names = ("model", "model_encoder", "op")
    owned = lambda name: name in names or name.startswith("op.")  # noqa: E731
    if not os.path.isfile(os.path.join(release_dir, "model.py")):
        raise SystemExit(f"--release_dir {release_dir}: no model.py there (a checkout of the official BlendGAN)")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if owned(k)}
    sys.path.insert(0, os.path.abspath(release_dir))
    try:
        return importlib.import_module("model").Generator
    finally:
        sys.path.remove(os.path.abspath(release_dir))
        for k in [k for k in sys.modules if owned(k)]:
            del sys.modules[k]
        sys.modules.update(ours)


def bench_plain(size, opts):
    """Rows for the plain module (and the release's, with --release_dir): G built the release's way,
    `.eval()`, called in float32 and under bfloat16 autocast; plain StyleEncoder / PSPEncoder too."""
    from style_encoder import StyleEncoder

    device, n = opts.device, opts.batch
    run = lambda fn: timed(fn, device, opts.warmup, opts.repeat)  # noqa: E731
    z = torch.randn(n, 512, device=device)
    z_s = torch.randn(n, 512, device=device)
    img = torch.rand(n, 3, size, size, device=device) * 2 - 1

    def float32_and_autocast(what, fn):
        for amp in (False, True):
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                yield (f"{what}, {'bfloat16 autocast' if amp else 'float32'}", run(fn), n)

    makers = [("plain", Generator)]
    if opts.release_dir:
        makers.append(("release", release_generator_class(opts.release_dir)))
    for who, make in makers:
        torch.manual_seed(0)
        g = make(size, 512, 8, channel_multiplier=2, load_pretrained_vgg=False).eval().to(device)
        yield from float32_and_autocast(f"{who} G stylized i=6",
                                        lambda: g([z], z_embed=z_s, add_weight_index=6, randomize_noise=False))
        del g
    enc = StyleEncoder(512, 4, load_pretrained_vgg=False).eval().to(device)
    encoders = [("style embedding", enc)]
    if opts.psp:
        from psp_encoder.psp_encoders import PSPEncoder

        encoders.append(("pSp encoding", PSPEncoder(None, output_size=size).to(device)))
    for what, net in encoders:
        yield from float32_and_autocast(f"plain {what}", lambda: net(img))


def bench_training(opts):
    """The phases of one BlendGAN iteration (float32 weights; --dtype bfloat16 turns on train.py's --amp)."""
    from blendgan_training import (Batch, StyleQueue, TrainOptions, TrainState, build_networks, d_reg_step, d_step,
                                   encode_styles, g_reg_step, g_step, make_optimizers)

    device, size, n = opts.device, opts.train_size, opts.train_batch
    run = lambda fn: timed(fn, device, opts.warmup, opts.repeat)  # noqa: E731
    amp = opts.dtype != "float32"
    topts = TrainOptions(ffhq_lmdb="-", size=size, batch=n, amp=amp, device=device, eq8=opts.train_eq8)
    nets = build_networks(topts, torch.device(device))
    g_optim, d_optim = make_optimizers(nets, topts)
    s = TrainState(topts, torch.device(device), nets, g_optim, d_optim, StyleQueue(topts.queue_size, 512, device))
    x_f = torch.rand(n, 3, size, size, device=device) * 2 - 1
    x_s = torch.rand(n, 3, size, size, device=device) * 2 - 1
    b = Batch(x_f, x_s, encode_styles(s, x_s))
    phases = {"d_step": lambda: d_step(s, b), "d_reg_step (R1)": lambda: d_reg_step(s, b),
              "g_step": lambda: g_step(s, b), "g_reg_step (path length)": lambda: g_reg_step(s),
              "style codes E_style(x_s)": lambda: encode_styles(s, x_s)}
    secs = {}
    for name, fn in phases.items():
        secs[name] = run(fn)
        yield (f"train {size} px, Eq. 8 '{topts.eq8}': {name}", secs[name], n)
    iteration = (secs["d_step"] + secs["g_step"] + secs["style codes E_style(x_s)"]
                 + secs["d_reg_step (R1)"] / topts.d_reg_every + secs["g_reg_step (path length)"] / topts.g_reg_every)
    yield (f"train {size} px: one iteration, lazy regularisers amortised", iteration, n)


def bench_simclr(opts):
    """One style-encoder SimCLR step at opts.batch (2 views at 256 px; VGG under --dtype autocast when
    that is not float32, Gram products in float32)."""
    from style_encoder_training import SimCLRHead, contrastive_loss
    from style_encoder import Projector, StyleEncoder

    device = opts.device
    encoder = StyleEncoder(512, 4, load_pretrained_vgg=False).to(device)
    encoder.embedder.to(memory_format=torch.channels_last)
    head = SimCLRHead(encoder.embedder_mlp, Projector(512, 2).to(device))
    optim = torch.optim.Adam(head.parameters(), lr=1e-4)
    views = torch.rand(opts.batch, 2, 3, 256, 256, device=device) * 2 - 1  # [B, 2 views, 3, 256, 256]
    amp_dtype = DTYPES[opts.dtype] if opts.dtype != "float32" else None

    def style_step():
        loss, _ = contrastive_loss(head, encoder, views, 0.2, amp_dtype, channels_last=True)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    yield ("train E_style: SimCLR step (2 views)", timed(style_step, device, opts.warmup, opts.repeat), opts.batch)


def comma_list(text, kind=str):
    return [kind(x) for x in text.split(",") if x]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024", help="comma-separated output sizes ('' for none)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, each timed in turn")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", help=f"comma-separated, of {', '.join(sorted(DTYPES))}")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator and pSp (as --compile)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no_psp", dest="psp", action="store_false", help="skip the pSp rows")
    p.add_argument("--plain", action="store_true",
                   help="also time the plain modules (no preparation) in float32 and bfloat16 autocast")
    p.add_argument("--release_dir", default=None,
                   help="with --plain: a checkout of the official BlendGAN repository, timed beside ours")
    p.add_argument("--train", action="store_true", help="also time the training phases")
    p.add_argument("--train_size", default="64", help="comma-separated training sizes")
    p.add_argument("--train_batch", default="8", help="comma-separated, one batch per --train_size")
    p.add_argument("--simclr_batch", type=int, default=None,
                   help="batch of the style-encoder SimCLR row (default: the training batch)")
    p.add_argument("--train_eq8", default=EQ8_READINGS[0], choices=EQ8_READINGS,
                   help="train.py's --eq8 for the training rows")
    opts = p.parse_args(argv)
    try:
        dtypes, batches = comma_list(opts.dtype), comma_list(opts.batch, int)
        train_sizes, train_batches = comma_list(opts.train_size, int), comma_list(opts.train_batch, int)
    except ValueError as e:
        p.error(f"--batch, --train_size and --train_batch take comma-separated whole numbers ({e})")
    if opts.train and "float16" in dtypes:
        p.error("--train with --dtype float16: the training rows run train.py's --amp, which picks bfloat16 "
                "where the device supports it; time them with --dtype bfloat16")
    if len(train_sizes) != len(train_batches):
        p.error(f"--train_size {opts.train_size} and --train_batch {opts.train_batch}: one batch per size")
    if set(dtypes) - set(DTYPES):
        p.error(f"--dtype {opts.dtype}: each of {', '.join(sorted(DTYPES))}")
    keep_freed_memory()  # as the inference scripts do
    cuda = opts.device.startswith("cuda")
    init_distributed(opts.device)  # one process: makes cuda:N current (synchronize, the peak-memory rows)
    print(f"# device={opts.device} compile={opts.compile} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| size | dtype | batch | what | median s | images/s |\n| --- | --- | --- | --- | --- | --- |")

    def show(size, config, rows):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for what, sec, n in rows:
            print(f"| {size} | {config.dtype} | {config.batch} | {what} | {sec:.3f} | {n / sec:.2f} |", flush=True)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 1024 ** 3
            print(f"# peak CUDA memory {peak:.2f} GB (size {size}, dtype {config.dtype}, batch {config.batch})")

    def configured(**settings):
        """opts with one combination's settings (dtype, batch, ...) in place of the lists."""
        return argparse.Namespace(**{**vars(opts), **settings})

    for dtype in dtypes:
        for size in comma_list(opts.sizes, int):
            networks = inference_networks(size, configured(dtype=dtype))  # once for all batches
            for batch in batches:
                config = configured(dtype=dtype, batch=batch)
                show(size, config, bench_inference(size, config, networks))
            del networks  # freed before the next size, dtype or the rows below
            if opts.plain:
                for batch in batches:
                    config = configured(dtype=dtype, batch=batch)
                    show(size, config, bench_plain(size, config))
        if opts.train:
            for size, batch in zip(train_sizes, train_batches):
                config = configured(dtype=dtype, batch=batch, train_size=size, train_batch=batch)
                show(size, config, bench_training(config))
            config = configured(dtype=dtype, batch=opts.simclr_batch or train_batches[-1])
            show(256, config, bench_simclr(config))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"# peak RSS {rss:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
