"""Check the CUDA ops against their PyTorch references on a GPU, in one command:

    python -m op.check_cuda            # from the repository root

Builds both extensions (showing the compiler output if a build fails), then for every case of the
parameter grid below (the same grid tests/test_op.py uses) compares, in float32, the outputs and the
first- and second-order gradients of impl='cuda' with impl='ref' (relative error < TOLERANCE), and runs
gradcheck / gradgradcheck of the CUDA path in float64; then the same comparisons with the kernels in
float16 and bfloat16 (against the float32 reference, LOWP_TOLERANCE), in both memory layouts (contiguous
and channels_last), one upfirdn2d case with 67M outputs, and a small Generator and Discriminator run with
the kernels and with the reference ops (image, D score, R1's first and second derivatives, G's gradient).
Prints one table row per case; the exit status is 1 when any check fails.
"""

import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

TOLERANCE = 1e-5

# upfirdn2d cases: x shape [N, C, H, W], kernel shape (kh, kw), up, down, pad. Odd and even, square and
# non-square kernels; up/down 1, 2, 3 and per axis; symmetric, asymmetric and negative (cropping) pads.
UPFIRDN2D_CASES = [
    dict(shape=(1, 2, 5, 6), kernel=(3, 3), up=1, down=1, pad=(1, 1)),
    dict(shape=(1, 2, 5, 6), kernel=(4, 4), up=2, down=1, pad=(2, 1)),
    dict(shape=(1, 2, 5, 6), kernel=(4, 4), up=1, down=2, pad=(1, 1)),
    dict(shape=(1, 2, 5, 6), kernel=(3, 4), up=(2, 1), down=(1, 2), pad=(1, 0, 2, -1)),
    dict(shape=(1, 2, 5, 6), kernel=(5, 5), up=2, down=2, pad=(-1, 2)),
    dict(shape=(1, 2, 5, 6), kernel=(2, 3), up=1, down=(2, 1), pad=(0, 0, -1, 1)),
    dict(shape=(1, 2, 4, 5), kernel=(4, 5), up=3, down=2, pad=(2, 3, 1, 0)),
    dict(shape=(2, 3, 4, 4), kernel=(4, 4), up=2, down=2, pad=(1, 2)),
    dict(shape=(1, 2, 3, 2), kernel=(2, 2), up=1, down=1, pad=(-3, 4)),  # crop wider than the input
]

# fused_leaky_relu cases: x shape (rank 2 as after EqualLinear, 3, 4, 5), bias or None, slope, scale.
FUSED_LRELU_CASES = [
    dict(shape=(3, 4), bias=True, negative_slope=0.2, scale=2 ** 0.5),
    dict(shape=(2, 3, 4, 5), bias=True, negative_slope=0.2, scale=2 ** 0.5),
    dict(shape=(2, 3, 7), bias=False, negative_slope=0.2, scale=2 ** 0.5),
    dict(shape=(1, 3, 2, 2, 3), bias=True, negative_slope=0.01, scale=1.0),
    dict(shape=(2, 5, 3, 3), bias=True, negative_slope=0.3, scale=-0.5),
]


# The self-check that op.build runs on a freshly loaded extension before its first use: the FIR
# combinations the networks use (ToRGB's 2x upsampling, the blur after an upsampling conv, the blurs
# before the discriminators' strided 3x3 and 1x1 convs), one cropping case, channels_last inputs (the
# networks' layout) and the activation after a linear and a conv layer.
SELF_CHECK_CASES = {
    "upfirdn2d": [
        dict(shape=(2, 3, 6, 6), kernel=(4, 4), up=2, down=1, pad=(2, 1)),
        dict(shape=(2, 3, 9, 9), kernel=(4, 4), up=1, down=1, pad=(1, 1)),
        dict(shape=(2, 3, 8, 8), kernel=(4, 4), up=1, down=1, pad=(2, 2)),
        dict(shape=(1, 2, 5, 6), kernel=(3, 4), up=(2, 1), down=(1, 2), pad=(1, 0, 2, -1)),
    ],
    "fused_bias_act": [
        dict(shape=(4, 8), bias=True, negative_slope=0.2, scale=2 ** 0.5),
        dict(shape=(2, 3, 5, 5), bias=True, negative_slope=0.2, scale=2 ** 0.5),
    ],
}
SELF_CHECK_TOLERANCE = 1e-4

# The same grids in half precision, against the float32 reference on the same (rounded) inputs. The
# reference itself in these dtypes stays within 6e-4 (float16) and 6e-3 (bfloat16) of float32 on them
# (tests/test_op.py); an indexing bug is off by O(1).
LOWP_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
# One case past the kernels' 2^24-output grid-stride loop and 64-bit offsets (67M outputs; every 1024 px
# layer at batch 16 is that large), in float32.
LARGE_UPFIRDN2D_CASE = dict(shape=(4, 64, 256, 256), kernel=(4, 4), up=2, down=1, pad=(2, 1))


def case_id(case):
    """Short readable name of a grid case (pytest ids and table rows)."""
    return "-".join(f"{k}={v}".replace(" ", "") for k, v in case.items())


def rel_error(a, b):
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def exact_float32():
    """Disable TF32 so the cuDNN convolution of the reference computes true float32 products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def upfirdn2d_inputs(case, device, dtype, seed=0):
    """x [N, C, H, W] and a random non-symmetric kernel, from a seeded CPU generator."""
    from op.upfirdn2d import _pads, _pair, out_size

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case["shape"], generator=gen, dtype=torch.float64)
    kernel = torch.randn(case["kernel"], generator=gen, dtype=torch.float64)
    (up_x, up_y), (down_x, down_y) = _pair(case["up"], "up"), _pair(case["down"], "down")
    pad_x0, pad_x1, pad_y0, pad_y1 = _pads(case["pad"])
    out_shape = (*case["shape"][:2],
                 out_size(case["shape"][2], up_y, down_y, pad_y0, pad_y1, case["kernel"][0]),
                 out_size(case["shape"][3], up_x, down_x, pad_x0, pad_x1, case["kernel"][1]))
    weight = torch.randn(out_shape, generator=gen, dtype=torch.float64)  # upstream gradient weights
    return [t.to(device=device, dtype=dtype) for t in (x, kernel, weight)]


def fused_lrelu_inputs(case, device, dtype, seed=0):
    """x, bias (or None) and upstream weights; x + bias kept at least 0.05 away from the kink at 0."""
    gen = torch.Generator().manual_seed(seed)
    shape = case["shape"]
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64) if case["bias"] else None
    pre = torch.randn(shape, generator=gen, dtype=torch.float64)
    pre = pre + 0.05 * pre.sign()  # the pre-activation x + bias
    x = pre - bias.view(1, -1, *([1] * (len(shape) - 2))) if bias is not None else pre
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, bias, weight)]


def channels_last(t):
    """`t` [N, C, ...] with C innermost in memory (channels_last for a 4-D tensor), the networks' layout;
    the CUDA kernels take it without a copy."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if t.ndim > 2 else t


def contiguous(t):
    return t.contiguous()


# The memory layouts the kernels are checked in: name -> conversion of x and of the upstream gradient.
LAYOUTS = {"contiguous": contiguous, "channels_last": channels_last}


def _derivatives(fn, inputs, weight):
    """Output, first-order grads of (out * weight).sum() w.r.t. `inputs`, and second-order grads of the
    squared norm of the first input's gradient w.r.t. `weight` (through the backward of the backward)."""
    out = fn(*inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs, create_graph=True)
    (grad2,) = torch.autograd.grad(grads[0].pow(2).sum(), weight)
    return [out, *grads, grad2]


def _runs(impls, dtype):
    """(impl, dtype) of the checked run and of the reference run: the reference always in float32."""
    return (impls[0], dtype), (impls[1], torch.float32)


def upfirdn2d_errors(case, device="cuda", dtype=torch.float32, impls=("cuda", "ref"), layout=contiguous):
    """Relative errors (out, grad_x, grad2_weight) of impls[0] in ``dtype`` vs impls[1] in float32, on the
    same inputs (rounded to ``dtype``; x and the upstream gradient converted by ``layout``, e.g.
    channels_last)."""
    from op.upfirdn2d import upfirdn2d

    results = []
    for impl, run_dtype in _runs(impls, dtype):
        x, kernel, weight = (t.to(run_dtype) for t in upfirdn2d_inputs(case, device, dtype))
        x, weight = layout(x), layout(weight)
        x.requires_grad_(True)
        weight.requires_grad_(True)
        with exact_float32():
            results.append(_derivatives(
                lambda t: upfirdn2d(t, kernel, case["up"], case["down"], case["pad"], impl=impl), [x], weight))
    return dict(zip(("out", "grad_x", "grad2_w"), (rel_error(a.float(), b) for a, b in zip(*results))))


def fused_lrelu_errors(case, device="cuda", dtype=torch.float32, impls=("cuda", "ref"), layout=contiguous):
    """Relative errors (out, grad_x[, grad_bias], grad2_weight) of impls[0] in ``dtype`` vs impls[1] in
    float32, on the same inputs (rounded to ``dtype``; x and the upstream gradient converted by
    ``layout``)."""
    from op.fused_act import fused_leaky_relu

    results = []
    for impl, run_dtype in _runs(impls, dtype):
        x, bias, weight = (t.to(run_dtype) if t is not None else None
                           for t in fused_lrelu_inputs(case, device, dtype))
        x, weight = layout(x), layout(weight)
        inputs = [x.requires_grad_(True)] + ([bias.requires_grad_(True)] if bias is not None else [])
        weight.requires_grad_(True)
        results.append(_derivatives(
            lambda *t: fused_leaky_relu(t[0], t[1] if len(t) > 1 else None, case["negative_slope"],
                                        case["scale"], impl=impl), inputs, weight))
    names = ["out", "grad_x"] + (["grad_bias"] if case["bias"] else []) + ["grad2_w"]
    return dict(zip(names, (rel_error(a.float(), b) for a, b in zip(*results))))


def upfirdn2d_gradchecks(case, device="cuda"):
    """gradcheck and gradgradcheck of the CUDA upfirdn2d in float64 (w.r.t. x)."""
    from op.upfirdn2d import upfirdn2d

    x, kernel, _ = upfirdn2d_inputs(case, device, torch.float64)
    x.requires_grad_(True)

    def fn(t):
        return upfirdn2d(t, kernel, case["up"], case["down"], case["pad"], impl="cuda")

    return torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


def fused_lrelu_gradchecks(case, device="cuda"):
    """gradcheck and gradgradcheck of the CUDA fused_leaky_relu in float64 (w.r.t. x and bias)."""
    from op.fused_act import fused_leaky_relu

    x, bias, _ = fused_lrelu_inputs(case, device, torch.float64)
    inputs = (x.requires_grad_(True),) + ((bias.requires_grad_(True),) if bias is not None else ())

    def fn(*t):
        return fused_leaky_relu(t[0], t[1] if len(t) > 1 else None, case["negative_slope"], case["scale"],
                                impl="cuda")

    # eps well below the 0.05 distance to the kink, so finite differences never cross it.
    return (torch.autograd.gradcheck(fn, inputs, eps=1e-6)
            and torch.autograd.gradgradcheck(fn, inputs, eps=1e-6))


def _benchmark(device, shape=(8, 256, 128, 128), repeat=10):
    """Milliseconds per forward+backward of a StyleGAN blur and activation ([8, 256, 128, 128] by default),
    for the reference and (on CUDA) the kernels, contiguous and channels_last (the networks' layout)."""
    import time

    from op.fused_act import fused_leaky_relu
    from op.upfirdn2d import upfirdn2d

    kernel = torch.outer(*(2 * [torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)]))
    kernel = kernel / kernel.sum() * 4
    bias = torch.randn(shape[1], device=device, requires_grad=True)
    rows = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape, device=device).contiguous(memory_format=layout).requires_grad_(True)
        ops = {
            "upfirdn2d up=2 k=4": lambda impl: upfirdn2d(x, kernel, up=2, pad=(2, 1), impl=impl),
            "upfirdn2d blur k=4": lambda impl: upfirdn2d(x, kernel, pad=(2, 1), impl=impl),
            "fused_leaky_relu": lambda impl: fused_leaky_relu(x, bias, impl=impl),
        }
        for name, op_fn in ops.items():
            # An upstream gradient in the output's layout, as a network's next layer hands back (the
            # gradient of .sum() is an expanded tensor that any kernel would first copy).
            with torch.no_grad():
                grad = torch.randn_like(op_fn("ref"))
            timings = {}
            for impl in ("ref", "cuda") if device == "cuda" else ("ref",):
                for _ in range(2):
                    op_fn(impl).backward(grad)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeat):
                    op_fn(impl).backward(grad)
                if device == "cuda":
                    torch.cuda.synchronize()
                timings[impl] = (time.perf_counter() - start) / repeat * 1000
            label = "channels_last" if layout is torch.channels_last else "contiguous"
            rows.append(f"{name:<22} {label:<13} " + "   ".join(f"{k} {v:8.3f} ms" for k, v in timings.items()))
    return rows


# The networks with the kernels vs with the reference ops, float32 without TF32: the same convolutions in
# both, so the differences are float32 rounding carried through a few dozen layers (~1e-6 relative); a
# kernel bug in a shape or layout the networks use but the op cases miss is off by O(1).
NETWORK_TOLERANCE = 1e-3


def _cuda_ops(mode):
    """BLENDGAN_CUDA_OPS=mode inside (op.build reads it on every op call)."""
    from op.build import CUDA_OPS_ENV

    return mock.patch.dict(os.environ, {CUDA_OPS_ENV: mode})


def network_errors(device="cuda", size=64, seed=0):
    """Relative errors of a small Generator and Discriminator run as training runs them, the CUDA ops
    ('auto') vs the reference ops ('ref'), on the same weights and inputs: the stylized image (every
    upsampling, blur and activation of the mapping and synthesis networks), D's score, R1's gradient
    w.r.t. the image, R1's gradient w.r.t. D's weights (the double backward) and G's weight gradient
    through D (the non-saturating loss's backward)."""
    from model import Discriminator, Generator

    torch.manual_seed(seed)
    g = Generator(size, 16, 2, channel_multiplier=1, load_pretrained_vgg=False, style_pool_size=32).to(device)
    d = Discriminator(size, channel_multiplier=1).to(device)
    with torch.no_grad():  # trained-like WBM weights and noise strengths (zeros at init)
        g.add_weight.copy_(torch.linspace(-0.3, 1.3, g.n_latent).view(1, -1, 1))
        for conv in list(g.convs) + [g.conv1]:
            conv.noise.weight.fill_(0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    z, z_embed = (torch.randn(2, 16, generator=gen).to(device) for _ in range(2))
    g_params = [p for name, p in g.named_parameters() if not name.startswith("embedder.")]
    results = []
    for mode in ("auto", "ref"):
        with _cuda_ops(mode), exact_float32():
            image, _ = g([z], z_embed=z_embed, add_weight_index=6, randomize_noise=False)  # [2, 3, size, size]
            real = image.detach().requires_grad_(True)
            score = d(real)  # [2, 1]
            (grad_image,) = torch.autograd.grad(score.sum(), real, create_graph=True)
            grad_d = torch.autograd.grad(grad_image.pow(2).sum(), list(d.parameters()),  # (the last bias: 0)
                                         allow_unused=True, materialize_grads=True)
            grad_g = torch.autograd.grad(torch.nn.functional.softplus(-d(image)).sum(), g_params)
        results.append([image, score, grad_image,
                        torch.cat([t.flatten() for t in grad_d]), torch.cat([t.flatten() for t in grad_g])])
    names = ("image", "score", "r1_grad_image", "r1_grad_d", "grad_g")
    return dict(zip(names, (rel_error(a.float(), b.float()) for a, b in zip(*results))))


class _ReferenceKernels:
    """The extension API computed by the PyTorch reference (no autograd): a stand-in with which the
    self-check and the autograd wrappers can be exercised on the CPU (tools/gpu_check.py --cpu-tiny)."""

    @staticmethod
    def upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
        from op.upfirdn2d import upfirdn2d_ref

        with torch.no_grad():
            return upfirdn2d_ref(x, kernel, (up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1))

    @staticmethod
    def fused_bias_leaky_relu(x, bias, negative_slope, scale):
        pre = x if bias is None else x + bias.view(1, -1, *([1] * (x.ndim - 2)))
        return torch.where(pre > 0, pre, pre * negative_slope) * scale

    @staticmethod
    def leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign):
        return torch.where(ref * ref_sign > 0, grad_out * scale, grad_out * (negative_slope * scale))


def reference_kernels(name):
    """A stand-in for extension `name` computed by the reference (see _ReferenceKernels)."""
    if name not in SELF_CHECK_CASES:
        raise KeyError(f"unknown extension {name!r}")
    return _ReferenceKernels


def _self_check_outputs(name, case, kernels, device, layout):
    """[out, grads..., grad of grad] of the extension `kernels` (None: the reference) on one case, x and the
    upstream gradient converted by `layout`."""
    from op.fused_act import fused_bias_leaky_relu_with, fused_leaky_relu_ref
    from op.upfirdn2d import upfirdn2d_ref, upfirdn2d_with

    if name == "upfirdn2d":
        x, kernel, weight = upfirdn2d_inputs(case, device, torch.float32, seed=1)
        args = (kernel, case["up"], case["down"], case["pad"])
        fn = (lambda t: upfirdn2d_ref(t, *args)) if kernels is None else (lambda t: upfirdn2d_with(kernels, t, *args))
        inputs = [layout(x).requires_grad_(True)]
    else:
        x, bias, weight = fused_lrelu_inputs(case, device, torch.float32, seed=1)
        slope, scale = case["negative_slope"], case["scale"]
        if kernels is None:
            fn = lambda t, b: fused_leaky_relu_ref(t, b, slope, scale)  # noqa: E731
        else:
            fn = lambda t, b: fused_bias_leaky_relu_with(kernels, t, b, slope, scale)  # noqa: E731
        inputs = [layout(x).requires_grad_(True), bias.requires_grad_(True)]
    weight = layout(weight).requires_grad_(True)
    with exact_float32():
        return _derivatives(fn, inputs, weight)


def self_check(name, kernels, device="cuda"):
    """None when the extension `kernels` (its module, or a stand-in with the same functions) agrees with
    the PyTorch reference on SELF_CHECK_CASES[name] (forward, gradients, gradient of gradient; contiguous
    and channels_last; relative error < SELF_CHECK_TOLERANCE), else the first disagreement as a sentence."""
    quantities = ["output", "input gradient", "bias gradient", "gradient of the gradient"]
    for case in SELF_CHECK_CASES[name]:
        for layout_name, layout in LAYOUTS.items():
            got = _self_check_outputs(name, case, kernels, device, layout)
            want = _self_check_outputs(name, case, None, device, layout)
            names = quantities if len(got) == 4 else [quantities[0], quantities[1], quantities[3]]
            for what, a, b in zip(names, got, want):
                err = rel_error(a.float(), b.float()) if a.shape == b.shape else float("inf")
                if not err < SELF_CHECK_TOLERANCE:  # also catches NaN
                    return (f"{what} of case {case_id(case)} ({layout_name}) is off by {err:.2g} relative "
                            f"(tolerance {SELF_CHECK_TOLERANCE:g})")
    return None


def report_row(op_name, case, errors, tolerance, grad_ok=None):
    """Prints main's table row for one case and returns whether it passed: the worst of `errors` (name ->
    relative error) under `tolerance`, and the gradchecks not failed (grad_ok None: none were run)."""
    worst = max(errors.values())
    ok = worst < tolerance and grad_ok is not False
    detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    gradchecks = "-" if grad_ok is None else str(grad_ok)
    print(f"{op_name:<24} {case_id(case):<72} {worst:12.2e} {gradchecks:>10}  "
          f"{'ok' if ok else 'FAIL'}  ({detail})", flush=True)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="also time ref vs cuda (forward + backward)")
    parser.add_argument("--bench-only", dest="bench_only", action="store_true",
                        help="only the timing (the kernels still pass the build's self-check first)")
    parser.add_argument("--verbose-build", action="store_true", help="show the full compiler commands")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2

    from op import build

    if build.cuda_ops_disabled():
        print(f"{build.CUDA_OPS_ENV}=ref or {build.NO_CUDA_OPS_ENV} is set: unset it to check the CUDA ops",
              file=sys.stderr)
        return 2
    for name in build.EXTENSIONS:
        # raises with the compiler output; the comparisons below are the (fuller) check, and without them
        # (--bench-only) the self-check keeps wrong kernels out of the timing
        build.load_extension(name, strict=True, verbose=args.verbose_build, check=args.bench_only)
    if args.bench_only:
        print(*_benchmark("cuda"), sep="\n")
        return 0

    failed = False
    header = f"{'op':<24} {'case':<72} {'max rel err':>12} {'gradchecks':>10}  result"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(header)
    print("-" * len(header))

    ops = (("upfirdn2d", UPFIRDN2D_CASES, upfirdn2d_errors, upfirdn2d_gradchecks),
           ("lrelu", FUSED_LRELU_CASES, fused_lrelu_errors, fused_lrelu_gradchecks))
    for op_name, cases, errors_fn, gradchecks_fn in ops:
        for case in cases:
            errors = errors_fn(case)
            try:
                grad_ok = gradchecks_fn(case)
            except Exception as err:  # gradcheck raises GradcheckError with the offending Jacobians
                grad_ok = False
                print(f"  gradcheck failed for {case_id(case)}: {err}")
            failed |= not report_row(op_name, case, errors, TOLERANCE, grad_ok)
    # channels_last: the kernels read and write it in place (no gradchecks: the same arithmetic)
    for op_name, cases, errors_fn, _ in ops:
        for case in cases:
            failed |= not report_row(f"{op_name} channels_last", case, errors_fn(case, layout=channels_last), TOLERANCE)
    for dtype, tolerance in LOWP_TOLERANCE.items():
        for layout_name, layout in LAYOUTS.items():
            name = str(dtype).removeprefix("torch.") + ("" if layout is contiguous else f" {layout_name}")
            for op_name, cases, errors_fn, _ in ops:
                for case in cases:
                    failed |= not report_row(f"{op_name} {name}", case,
                                             errors_fn(case, dtype=dtype, layout=layout), tolerance)
    for layout_name, layout in LAYOUTS.items():
        failed |= not report_row(f"upfirdn2d {layout_name}", LARGE_UPFIRDN2D_CASE,
                                 upfirdn2d_errors(LARGE_UPFIRDN2D_CASE, layout=layout), TOLERANCE)
    failed |= not report_row("G and D", dict(size=64), network_errors(), NETWORK_TOLERANCE)
    if args.bench:
        print()
        print(*_benchmark("cuda"), sep="\n")  # 'auto' uses the kernels on CUDA in both layouts
    print("ALL OK" if not failed else "SOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
