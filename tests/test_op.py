"""Tests of op/: fused leaky ReLU and upfirdn2d.

The reference paths are checked on values against formulations written here independently (numpy /
scipy, no torch), and with gradcheck + gradgradcheck in float64. The autograd Functions of the CUDA path
(their backward calls the same kernel with adjoint arguments) are checked on CPU by handing them an
emulation of the compiled extension. GPU cases compare the real kernels with the reference and skip
without a GPU. The build helper is checked for laziness, caching, its fallback and BLENDGAN_NO_CUDA_OPS.
"""

import ctypes
import fcntl
import mmap
import os
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import scipy.signal
import torch

from conftest import under_ci
import op
import op.build
from op import FusedLeakyReLU, check_cuda, fused_leaky_relu, upfirdn2d
from op.check_cuda import (FUSED_LRELU_CASES, TOLERANCE, UPFIRDN2D_CASES, case_id, fused_lrelu_errors,
                           fused_lrelu_gradchecks, fused_lrelu_inputs, self_check, upfirdn2d_errors,
                           upfirdn2d_gradchecks, upfirdn2d_inputs)
from op.fused_act import fused_bias_leaky_relu_with
from op.upfirdn2d import upfirdn2d_ref, upfirdn2d_with

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tensors are tiny: with more than one intra-op thread, thread hand-offs cost more than the
    arithmetic (an order of magnitude more CPU time on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _axis_args(case):
    """(up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1) of a grid case."""
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    pad = tuple(case["pad"])
    pad = pad * 2 if len(pad) == 2 else pad
    return pair(case["up"]), pair(case["down"]), pad


# ---------------------------------------------------------------------------------------------------
# upfirdn2d: independent formulations


def upfirdn2d_scipy(x, kernel, up, down, pad):
    """Zero insertion by slicing into np.zeros, np.pad / slicing for pads and crops, scipy's true 2-D
    convolution ('valid'), then [::down]. x [N, C, H, W] numpy, kernel [kh, kw]."""
    (up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1) = up, down, pad
    n, c, h, w = x.shape
    upsampled = np.zeros((n, c, h * up_y, w * up_x))
    upsampled[:, :, ::up_y, ::up_x] = x
    padded = np.pad(upsampled, ((0, 0), (0, 0), (max(pad_y0, 0), max(pad_y1, 0)),
                                (max(pad_x0, 0), max(pad_x1, 0))))
    padded = padded[:, :, max(-pad_y0, 0):padded.shape[2] - max(-pad_y1, 0),
                    max(-pad_x0, 0):padded.shape[3] - max(-pad_x1, 0)]
    out = np.stack([np.stack([scipy.signal.convolve2d(plane, kernel, mode="valid") for plane in sample])
                    for sample in padded])
    return out[:, :, ::down_y, ::down_x]


def upfirdn2d_scatter(x, kernel, up, down, pad):
    """Direct loops in 'scatter' form: input sample (m, l) sits at (m * up_y + pad_y0, l * up_x + pad_x0)
    of the padded signal; the full true convolution puts x * K[t - position] at position t, and output o
    of the valid part is t = o * down + k - 1."""
    (up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1) = up, down, pad
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out_h = (h * up_y + pad_y0 + pad_y1 - kh) // down_y + 1
    out_w = (w * up_x + pad_x0 + pad_x1 - kw) // down_x + 1
    out = np.zeros((n, c, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            for m in range(h):
                i = oy * down_y + kh - 1 - (m * up_y + pad_y0)
                if not 0 <= i < kh:
                    continue
                for col in range(w):
                    j = ox * down_x + kw - 1 - (col * up_x + pad_x0)
                    if 0 <= j < kw:
                        out[:, :, oy, ox] += x[:, :, m, col] * kernel[i, j]
    return out


@pytest.mark.parametrize("case", UPFIRDN2D_CASES, ids=case_id)
def test_upfirdn2d_matches_independent_formulations(case):
    x, kernel, _ = upfirdn2d_inputs(case, "cpu", torch.float64, seed=1)
    up, down, pad = _axis_args(case)
    expected = upfirdn2d_scipy(x.numpy(), kernel.numpy(), up, down, pad)
    np.testing.assert_allclose(upfirdn2d_scatter(x.numpy(), kernel.numpy(), up, down, pad), expected,
                               rtol=1e-12, atol=1e-12)
    for impl in ("ref", "auto"):
        out = upfirdn2d(x, kernel, case["up"], case["down"], case["pad"], impl=impl)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    out32 = upfirdn2d(x.float(), kernel.float(), case["up"], case["down"], case["pad"])
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_upfirdn2d_is_a_true_convolution():
    """A one-hot input reproduces the (unflipped) kernel: the kernel is flipped before correlating."""
    kernel = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)  # not symmetric
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.0
    out = upfirdn2d(x, kernel, pad=(2, 2, 1, 1))  # 'full' convolution: [3 + 2 - 1, 3 + 3 - 1]
    assert out.shape == (1, 1, 4, 5)
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[1:3, 1:4] = kernel
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)


def test_upfirdn2d_argument_forms():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(upfirdn2d(x, kernel, up=2, down=2, pad=(1, 2)),
                               upfirdn2d(x, kernel, up=(2, 2), down=(2, 2), pad=(1, 2, 1, 2)))
    # StyleGAN2's up-sampling: up=2, pad=(2, 1) for a 4-tap kernel doubles the size exactly.
    assert upfirdn2d(x, kernel, up=2, pad=(2, 1)).shape == (2, 3, 10, 12)
    # per-axis: (x, y) order
    assert upfirdn2d(x, kernel, up=(2, 1), down=(1, 2), pad=(1, 1, 1, 1)).shape == (2, 3, 2, 11)
    # channels-last / non-contiguous input gives the same values
    torch.testing.assert_close(upfirdn2d(x.transpose(2, 3).contiguous().transpose(2, 3), kernel, down=2),
                               upfirdn2d(x, kernel, down=2))
    with pytest.raises(ValueError, match="empty"):
        upfirdn2d(x, kernel, pad=(-2, -2))
    with pytest.raises(ValueError, match="N, C, H, W"):
        upfirdn2d(x[0], kernel)
    with pytest.raises(ValueError, match="2-D"):
        upfirdn2d(x, kernel[0])
    with pytest.raises(ValueError, match="up"):
        upfirdn2d(x, kernel, up=0)
    with pytest.raises(ValueError, match="pad"):
        upfirdn2d(x, kernel, pad=(1, 2, 3))
    with pytest.raises(ValueError, match="impl"):
        upfirdn2d(x, kernel, impl="fast")
    with pytest.raises(ValueError, match="CUDA tensors"):
        upfirdn2d(x, kernel, impl="cuda")


@pytest.mark.parametrize("case", UPFIRDN2D_CASES, ids=case_id)
def test_upfirdn2d_ref_gradcheck(case):
    x, kernel, _ = upfirdn2d_inputs(case, "cpu", torch.float64, seed=2)
    inputs = (x.requires_grad_(True), kernel.requires_grad_(True))

    def fn(t, k):
        return upfirdn2d_ref(t, k, case["up"], case["down"], case["pad"])

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


class EmulatedUpFirDn2dExtension:
    """Stands in for the compiled extension on CPU: the same call signature, computed by the reference
    without autograd, so that the CUDA path's autograd Function (adjoint pads, recursion) is testable."""

    calls = 0

    @classmethod
    def upfirdn2d(cls, x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
        cls.calls += 1
        assert not torch.is_grad_enabled()
        return upfirdn2d_ref(x, kernel, (up_x, up_y), (down_x, down_y), (pad_x0, pad_x1, pad_y0, pad_y1))


@pytest.mark.parametrize("case", UPFIRDN2D_CASES, ids=case_id)
def test_upfirdn2d_cuda_autograd_wiring_on_cpu(case):
    x, kernel, weight = upfirdn2d_inputs(case, "cpu", torch.float64, seed=4)
    x.requires_grad_(True)
    ext = EmulatedUpFirDn2dExtension

    def fn(t):
        return upfirdn2d_with(ext, t, kernel, case["up"], case["down"], case["pad"])

    calls = ext.calls
    out = fn(x)
    assert ext.calls == calls + 1
    torch.testing.assert_close(out, upfirdn2d_ref(x, kernel, case["up"], case["down"], case["pad"]))
    # The backward is the same extension call (adjoint), compared with the reference's autograd.
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    assert ext.calls == calls + 2
    (grad_ref,) = torch.autograd.grad(
        (upfirdn2d_ref(x, kernel, case["up"], case["down"], case["pad"]) * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def random_upfirdn2d_cases(count, seed):
    """Random small configurations (sizes 1-6, up/down 1-3 per axis, pads -4..6) with a non-empty output."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        h, w, kh, kw = (int(v) for v in rng.integers(1, 7, size=4))
        up = tuple(int(v) for v in rng.integers(1, 4, size=2))
        down = tuple(int(v) for v in rng.integers(1, 4, size=2))
        pad = tuple(int(v) for v in rng.integers(-4, 7, size=4))
        if (h * up[1] + pad[2] + pad[3] - kh >= 0) and (w * up[0] + pad[0] + pad[1] - kw >= 0):
            cases.append(dict(shape=(1, 2, h, w), kernel=(kh, kw), up=up, down=down, pad=pad))
    return cases


def test_upfirdn2d_random_configurations():
    """Values against scipy, and the CUDA path's adjoint (through the emulated extension) against the
    reference's autograd, over random configurations beyond the grid (large crops included)."""
    for case in random_upfirdn2d_cases(40, seed=9):
        x, kernel, weight = upfirdn2d_inputs(case, "cpu", torch.float64, seed=10)
        expected = upfirdn2d_scipy(x.numpy(), kernel.numpy(), *_axis_args(case))
        x.requires_grad_(True)
        out = upfirdn2d(x, kernel, case["up"], case["down"], case["pad"])
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=str(case))
        (grad_ref,) = torch.autograd.grad((out * weight).sum(), x)
        emulated = upfirdn2d_with(EmulatedUpFirDn2dExtension, x, kernel, case["up"], case["down"],
                                  case["pad"])
        (grad,) = torch.autograd.grad((emulated * weight).sum(), x)
        torch.testing.assert_close(grad, grad_ref, msg=str(case))


# ---------------------------------------------------------------------------------------------------
# upfirdn2d: the CUDA kernel's index math, built for the CPU


@pytest.fixture(scope="module")
def upfirdn2d_host(tmp_path_factory):
    """tests/upfirdn2d_host.cpp (op/upfirdn2d_math.h, what each CUDA thread computes) built with the system
    C++ compiler; skipped without one, except under CI."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        if under_ci():
            pytest.fail("no C++ compiler (c++ / g++ / $CXX): under CI the kernel's index math must be tested")
        pytest.skip("no C++ compiler (c++ / g++ / $CXX)")
    lib = tmp_path_factory.mktemp("upfirdn2d_host") / "upfirdn2d_host.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(lib),
                    os.path.join(REPO, "tests", "upfirdn2d_host.cpp")], check=True)
    dll = ctypes.CDLL(str(lib))
    pointer = ctypes.POINTER(ctypes.c_double)
    dll.upfirdn2d_host.argtypes = [pointer, pointer, pointer] + [ctypes.c_int64] * 14
    dll.upfirdn2d_host_out_size.argtypes = [ctypes.c_int64] * 12 + [ctypes.POINTER(ctypes.c_int64)]
    dll.upfirdn2d_host_at.argtypes = [ctypes.POINTER(ctypes.c_float), pointer] + [ctypes.c_int64] * 14
    dll.upfirdn2d_host_at.restype = ctypes.c_double
    return dll


def double_pointer(t):
    """A contiguous float64 tensor's memory as a C double* (for the host build)."""
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_double))


class HostUpFirDn2dExtension:
    """The extension's call signature over the host build: the layout chosen as upfirdn2d_kernel.cu
    chooses it (channels_last read in place and the output channels_last, otherwise plane by plane), the
    arithmetic that of the kernel's threads."""

    lib = None
    layouts = []

    @classmethod
    def upfirdn2d(cls, x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
        n, c, in_h, in_w = x.shape
        kernel_h, kernel_w = kernel.shape
        out_hw = (ctypes.c_int64 * 2)()
        cls.lib.upfirdn2d_host_out_size(in_h, in_w, kernel_h, kernel_w, up_x, up_y, down_x, down_y, pad_x0,
                                        pad_x1, pad_y0, pad_y1, out_hw)
        out_h, out_w = out_hw
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        both = x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)  # C == 1, H == W == 1
        cls.layouts.append("both" if both else "channels_last" if channels_last else "contiguous")
        # [major, H, W, minor] in memory: [N, H, W, C] or [N * C, H, W, 1]
        x_mem = (x.permute(0, 2, 3, 1) if channels_last else x).double().contiguous()
        kernel_mem = kernel.double().contiguous()
        out_mem = torch.empty((n, out_h, out_w, c) if channels_last else (n, c, out_h, out_w), dtype=torch.float64)
        major, minor = (n, c) if channels_last else (n * c, 1)
        cls.lib.upfirdn2d_host(double_pointer(out_mem), double_pointer(x_mem), double_pointer(kernel_mem), major, minor,
                               in_h, in_w, kernel_h, kernel_w, up_x, up_y, down_x, down_y, pad_x0, pad_y0, out_h,
                               out_w)
        out = out_mem.permute(0, 3, 1, 2) if channels_last else out_mem
        return out.to(x.dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_kernel_index_math_matches_the_reference(upfirdn2d_host, layout, monkeypatch):
    """The kernel's per-output arithmetic (host build of op/upfirdn2d_math.h) against the reference on the
    grid and random configurations (forward, values and output size), in both memory layouts; and through
    the autograd Function (its backward is the same kernel with adjoint arguments), first and second order."""
    monkeypatch.setattr(HostUpFirDn2dExtension, "lib", upfirdn2d_host)
    monkeypatch.setattr(HostUpFirDn2dExtension, "layouts", [])
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for case in UPFIRDN2D_CASES + random_upfirdn2d_cases(40, seed=11):
        x, kernel, weight = upfirdn2d_inputs(dict(case, shape=(2, 3, *case["shape"][2:])), "cpu", torch.float64,
                                             seed=12)
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        weight = weight.contiguous(memory_format=memory_format)  # the upstream gradient's layout
        out = upfirdn2d_with(HostUpFirDn2dExtension, x, kernel, case["up"], case["down"], case["pad"])
        expected = upfirdn2d_ref(x, kernel, case["up"], case["down"], case["pad"])
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=str(case))
        (grad,) = torch.autograd.grad((out * weight).sum(), x)
        (grad_ref,) = torch.autograd.grad((expected * weight).sum(), x)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12, msg=str(case))
    assert set(HostUpFirDn2dExtension.layouts) - {"both"} == {layout}
    assert check_cuda.self_check("upfirdn2d", HostUpFirDn2dExtension, "cpu") is None


def test_cuda_kernel_index_math_reaches_past_2_31_elements(upfirdn2d_host):
    """Memory offsets past 2^31 elements, as in a [17, 128, 1024, 1024] float32 activation (2^31 + 2^27
    elements; 1024 px layers at batch 16 are this large): a 1x1 filter reads exactly the element at its
    output's offset, and the last output of ToRGB's 2x upsampling equals the reference on the corner it
    reads, in both layouts. Virtual memory only: the untouched pages of the mapping are never allocated."""
    n, c, h, w = 17, 128, 1024, 1024
    numel = n * c * h * w
    try:
        memory = mmap.mmap(-1, numel * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError) as err:  # e.g. a system that does not overcommit
        pytest.skip(f"cannot map {numel * 4 / 2 ** 30:.1f} GiB of virtual memory: {err}")
    base = ctypes.c_float.from_buffer(memory)
    x = ctypes.cast(ctypes.addressof(base), ctypes.POINTER(ctypes.c_float))
    gen = torch.Generator().manual_seed(13)
    kernel = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    try:
        for minor in (c, 1):  # channels_last [N, H, W, C]; contiguous [N * C, H, W, 1]
            for idx in (2 ** 31 - 1, 2 ** 31, 2 ** 31 + 7, numel - 1):
                x[idx] = float(idx % 1000) + 0.5
                got = upfirdn2d_host.upfirdn2d_host_at(x, double_pointer(one), idx, minor, h, w, 1, 1, 1, 1, 1, 1, 0, 0,
                                                       h, w)
                assert got == float(idx % 1000) + 0.5, (minor, idx)
            # the last output of up=2, pad (2, 1) reads (part of) the last 3 x 3 inputs of the last channel
            corner = torch.randn(3, 3, generator=gen).float()
            for iy in range(3):
                for ix in range(3):
                    row, col = h - 3 + iy, w - 3 + ix
                    offset = (((n - 1) * h + row) * w + col) * c + c - 1 if minor == c else ((n * c - 1) * h + row) * w + col
                    x[offset] = corner[iy, ix].item()
            got = upfirdn2d_host.upfirdn2d_host_at(x, double_pointer(kernel), numel * 4 - 1, minor, h, w, 4, 4, 2, 2, 1, 1,
                                                   2, 2, 2 * h, 2 * w)
            want = upfirdn2d_ref(corner.double()[None, None], kernel, up=2, pad=(2, 1))[0, 0, -1, -1].item()
            assert abs(got - want) < 1e-9 and want != 0, (minor, got, want)
    finally:
        del x, base
        memory.close()


def test_self_check_rejects_kernels_wrong_only_in_channels_last():
    """The one guard against wrong numbers in the networks' layout on a GPU: a stand-in right on contiguous
    tensors that writes a channels_last result in NHWC order into an NCHW output is refused, naming it."""
    class WrongInChannelsLast(EmulatedUpFirDn2dExtension):
        @classmethod
        def upfirdn2d(cls, x, kernel, *args):
            out = super().upfirdn2d(x, kernel, *args)
            if x.is_contiguous():
                return out
            return out.permute(0, 2, 3, 1).contiguous().view(out.shape)  # NHWC bytes read as NCHW

    reason = self_check("upfirdn2d", WrongInChannelsLast, "cpu")
    assert reason is not None and reason.startswith("output of case") and "(channels_last)" in reason


# ---------------------------------------------------------------------------------------------------
# fused leaky ReLU


def fused_lrelu_numpy(x, bias, negative_slope, scale):
    """x + b (broadcast on dim 1) -> leaky ReLU -> * scale, in numpy."""
    pre = x if bias is None else x + bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    return np.where(pre > 0, pre, pre * negative_slope) * scale


@pytest.mark.parametrize("case", FUSED_LRELU_CASES, ids=case_id)
def test_fused_leaky_relu_values(case):
    x, bias, _ = fused_lrelu_inputs(case, "cpu", torch.float64, seed=5)
    expected = fused_lrelu_numpy(x.numpy(), None if bias is None else bias.numpy(), case["negative_slope"],
                                 case["scale"])
    x_before = x.clone()
    for impl in ("ref", "auto"):
        out = fused_leaky_relu(x, bias, case["negative_slope"], case["scale"], impl=impl)
        assert out.shape == x.shape
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=0)
    assert torch.equal(x, x_before)  # the no-grad path works in place on its own temporary only
    # float32 activations with a float64 bias (the bias follows x's dtype)
    out32 = fused_leaky_relu(x.float(), bias, case["negative_slope"], case["scale"])
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_fused_leaky_relu_defaults_and_errors():
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    bias = torch.tensor([0.5, -0.5])
    expected = torch.tensor([[-0.5 * 0.2, 1.5], [3.5, -4.5 * 0.2]]) * 2 ** 0.5
    torch.testing.assert_close(fused_leaky_relu(x, bias), expected)
    with pytest.raises(ValueError, match="bias"):
        fused_leaky_relu(x, torch.zeros(3))
    with pytest.raises(ValueError, match="rank"):
        fused_leaky_relu(torch.zeros(3), None)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fused_leaky_relu(x, bias, impl="cuda")


@pytest.mark.parametrize("case", FUSED_LRELU_CASES, ids=case_id)
def test_fused_leaky_relu_ref_gradcheck(case):
    x, bias, _ = fused_lrelu_inputs(case, "cpu", torch.float64, seed=6)
    inputs = (x.requires_grad_(True),) + ((bias.requires_grad_(True),) if bias is not None else ())

    def fn(*t):
        return fused_leaky_relu(t[0], t[1] if len(t) > 1 else None, case["negative_slope"], case["scale"],
                                impl="ref")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6)


class EmulatedFusedBiasActExtension:
    """Stands in for the compiled fused_bias_act extension on CPU (same signatures, no autograd)."""

    @staticmethod
    def fused_bias_leaky_relu(x, bias, negative_slope, scale):
        assert not torch.is_grad_enabled()
        pre = x if bias is None else x + bias.view(1, -1, *([1] * (x.ndim - 2)))
        return torch.where(pre > 0, pre, pre * negative_slope) * scale

    @staticmethod
    def leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign):
        assert not torch.is_grad_enabled()
        return torch.where(ref * ref_sign > 0, grad_out * scale, grad_out * (negative_slope * scale))


@pytest.mark.parametrize("case", FUSED_LRELU_CASES, ids=case_id)
def test_fused_leaky_relu_cuda_autograd_wiring_on_cpu(case):
    x, bias, weight = fused_lrelu_inputs(case, "cpu", torch.float64, seed=7)
    inputs = (x.requires_grad_(True),) + ((bias.requires_grad_(True),) if bias is not None else ())
    weight.requires_grad_(True)
    ext = EmulatedFusedBiasActExtension

    def fn(*t):
        return fused_bias_leaky_relu_with(ext, t[0], t[1] if len(t) > 1 else None, case["negative_slope"],
                                          case["scale"])

    def fn_ref(*t):
        return fused_leaky_relu(t[0], t[1] if len(t) > 1 else None, case["negative_slope"], case["scale"],
                                impl="ref")

    # first and second order against the reference, then numerical checks
    results = []
    for f in (fn, fn_ref):
        out = f(*inputs)
        grads = torch.autograd.grad((out * weight).sum(), inputs, create_graph=True)
        (grad2,) = torch.autograd.grad(grads[0].pow(2).sum(), weight)
        results.append([out, *grads, grad2])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (2, 5, 7), (1, 3, 2, 2, 3)], ids=str)
def test_fused_leaky_relu_kernels_see_channels_last_without_a_copy(shape):
    """The kernels read x as a contiguous [N, C, inner] (fused_bias_act_kernel.cu) and copy anything else.
    A channels-last x ([N, ..., C] in memory, as the networks hold their activations) reaches them as an
    [N * H * W, C] view of its own memory with the bias on dim 1, so does the gradient; the output and
    the input gradient stay channels-last; the numbers are the reference's, first and second order."""
    calls = []

    class Recording(EmulatedFusedBiasActExtension):
        @staticmethod
        def fused_bias_leaky_relu(x, bias, negative_slope, scale):
            calls.append(("forward", tuple(x.shape), x.is_contiguous(), x.data_ptr()))
            return EmulatedFusedBiasActExtension.fused_bias_leaky_relu(x, bias, negative_slope, scale)

        @staticmethod
        def leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign):
            calls.append(("grad", tuple(grad_out.shape), grad_out.is_contiguous() and ref.is_contiguous(), None))
            return EmulatedFusedBiasActExtension.leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign)

    def channels_last(t):
        return t.movedim(1, -1).contiguous().movedim(-1, 1)  # [N, ..., C] in memory

    x, bias, weight = fused_lrelu_inputs(dict(shape=shape, bias=True), "cpu", torch.float64, seed=3)
    x, weight = channels_last(x).requires_grad_(True), channels_last(weight).requires_grad_(True)
    inputs = [x, bias.requires_grad_(True)]
    rows, channels = x.numel() // shape[1], shape[1]
    results = []
    for fn in (lambda *t: fused_bias_leaky_relu_with(Recording, *t), lambda *t: fused_leaky_relu(*t, impl="ref")):
        out = fn(*inputs)
        grads = torch.autograd.grad((out * weight).sum(), inputs, create_graph=True)
        (grad2,) = torch.autograd.grad(grads[0].pow(2).sum(), weight)
        results.append([out, *grads, grad2])
    out, grad_x = results[0][:2]
    assert not out.is_contiguous() and out.movedim(1, -1).is_contiguous()
    assert not grad_x.is_contiguous() and grad_x.movedim(1, -1).is_contiguous()
    assert calls[0] == ("forward", (rows, channels), True, x.data_ptr())
    assert [c[:3] for c in calls[1:]] == [("grad", (rows, channels), True)] * 2  # backward, double backward
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_fused_leaky_relu_module():
    module = FusedLeakyReLU(4)
    assert list(module.state_dict()) == ["bias"]
    assert module.bias.shape == (4,) and torch.count_nonzero(module.bias) == 0
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    gen = torch.Generator().manual_seed(8)
    bias = torch.randn(4, generator=gen)
    module.load_state_dict({"bias": bias})
    x = torch.randn(2, 4, 3, 3, generator=gen)
    expected = fused_lrelu_numpy(x.numpy(), bias.numpy(), 0.2, 2 ** 0.5)
    np.testing.assert_allclose(module(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    module(x).sum().backward()
    assert module.bias.grad is not None and module.bias.grad.shape == (4,)
    no_bias = FusedLeakyReLU(4, 0.1, 1.0, bias=False)  # the release's positional order, then bias by keyword
    assert list(no_bias.state_dict()) == [] and no_bias.bias is None
    np.testing.assert_allclose(no_bias(x).numpy(), fused_lrelu_numpy(x.numpy(), None, 0.1, 1.0), rtol=1e-6)
    with pytest.raises(TypeError, match="pass bias by keyword"):
        FusedLeakyReLU(4, False)  # rosinality's later (channel, bias, ...) order: refused, not slope 0


# ---------------------------------------------------------------------------------------------------
# build helper


def test_importing_op_builds_nothing():
    code = ("import sys, op, op.build, op.check_cuda\n"
            "assert op.build._CACHE == {}, op.build._CACHE\n"
            "assert 'torch.utils.cpp_extension' not in sys.modules\n"
            "assert not [m for m in sys.modules if m.startswith('blendgan_')]\n"
            "print('clean')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


class FakeCudaTensor:
    """Only what `select_impl` reads of a tensor."""

    is_cuda = True
    device = torch.device("cuda", 1)


def test_no_cuda_ops_env_is_honoured(monkeypatch):
    def must_not_build(name, verbose=False):
        raise AssertionError(f"built {name} although {op.build.NO_CUDA_OPS_ENV}=1")

    monkeypatch.setattr(op.build, "compile_extension", must_not_build)
    monkeypatch.setattr(op.build, "_CACHE", {})
    monkeypatch.delenv(op.build.CUDA_OPS_ENV, raising=False)
    monkeypatch.setenv(op.build.NO_CUDA_OPS_ENV, "1")
    assert op.build.cuda_ops_disabled()
    assert op.build.load_extension("upfirdn2d") is None
    assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),)) is None
    with pytest.raises(RuntimeError, match=op.build.NO_CUDA_OPS_ENV):
        op.build.select_impl("cuda", "fused_bias_act", (FakeCudaTensor(),))
    monkeypatch.setenv(op.build.NO_CUDA_OPS_ENV, "0")
    assert not op.build.cuda_ops_disabled()


def test_build_is_cached_and_failure_warns_once(monkeypatch, tmp_path):
    monkeypatch.delenv(op.build.NO_CUDA_OPS_ENV, raising=False)
    monkeypatch.delenv(op.build.CUDA_OPS_ENV, raising=False)
    monkeypatch.setenv(op.build.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(op.build, "self_check", lambda name, module, device: None)
    monkeypatch.setattr(op.build, "_CACHE", {})
    built = []
    module = types.SimpleNamespace()

    def fake_compile(name, verbose=False):
        built.append(name)
        if name == "upfirdn2d":
            raise RuntimeError("nvcc exploded")
        return module

    monkeypatch.setattr(op.build, "compile_extension", fake_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert op.build.load_extension("upfirdn2d") is None
        assert op.build.load_extension("upfirdn2d") is None
        assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),)) is None
    assert len(caught) == 1 and "nvcc exploded" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="did not build"):
        op.build.select_impl("cuda", "upfirdn2d", (FakeCudaTensor(),))
    with pytest.raises(RuntimeError, match="nvcc exploded"):
        op.build.load_extension("upfirdn2d", strict=True)
    assert op.build.load_extension("fused_bias_act") is module
    assert op.build.select_impl("auto", "fused_bias_act", (FakeCudaTensor(),)) is module
    assert built == ["upfirdn2d", "upfirdn2d", "fused_bias_act"]
    # CPU tensors never trigger a build
    assert op.build.select_impl("auto", "fused_bias_act", (torch.zeros(1),)) is None


def test_build_dir_is_keyed_by_source_hash(monkeypatch, tmp_path):
    (tmp_path / "a.cpp").write_text("int a;\n")
    monkeypatch.setattr(op.build, "OP_DIR", str(tmp_path))
    monkeypatch.setattr(op.build, "EXTENSIONS", {"a": ["a.cpp"]})
    first = op.build.source_hash("a")
    assert op.build.source_hash("a") == first
    (tmp_path / "a.cpp").write_text("int a = 1;\n")
    edited = op.build.source_hash("a")
    assert edited != first
    (tmp_path / "a.h").write_text("#pragma once\n")
    monkeypatch.setattr(op.build, "HEADERS", {"a": ["a.h"]})
    second = op.build.source_hash("a")
    assert second != edited
    (tmp_path / "a.h").write_text("#pragma once\nint b;\n")
    assert op.build.source_hash("a") != second  # an included header is part of the key
    (tmp_path / "a.h").write_text("#pragma once\n")
    assert op.build.source_hash("a") == second
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "") + ";7.5+PTX")
    assert op.build.source_hash("a") != second  # the target architectures are part of the key
    # without the variable torch builds for the visible GPUs: theirs are the key (an sm_90 build in a
    # shared cache is not handed to an sm_80 machine)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    hashes = {}
    for caps in ([(9, 0), (9, 0)], [(8, 0), (8, 0)], [(8, 0), (9, 0)]):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, caps=caps: caps[i])
        hashes[op.build.target_archs()] = op.build.source_hash("a")
    assert list(hashes) == ["9.0", "8.0", "8.0;9.0"] and len(set(hashes.values())) == 3


def test_extension_sources_exist():
    for name in ("fused_bias_act", "upfirdn2d"):
        paths = op.build.source_paths(name)
        assert any(p.endswith(".cu") for p in paths) and any(p.endswith(".cpp") for p in paths)
        assert all(os.path.isfile(p) for p in paths + op.build.header_paths(name))
    # every header a source includes from op/ is in the build's key
    for name in op.build.EXTENSIONS:
        included = set()
        for path in op.build.source_paths(name) + op.build.header_paths(name):
            with open(path) as f:
                included |= {line.split('"')[1] for line in f if line.startswith('#include "')}
        assert included == {os.path.basename(p) for p in op.build.header_paths(name)}, name


@pytest.mark.skipif(os.environ.get("BLENDGAN_TEST_CUDA_BUILD") != "1",
                    reason="slow (minutes): set BLENDGAN_TEST_CUDA_BUILD=1 and CUDA_HOME to run nvcc")
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["fused_bias_act", "upfirdn2d"])
def test_extensions_compile(name, monkeypatch):
    """Compiles and links with nvcc through the build helper (no GPU needed; importing the module may
    still need the CUDA runtime libraries; the self-check needs a GPU)."""
    monkeypatch.setattr(op.build, "_CACHE", {})
    module = op.build.load_extension(name, strict=True, check=False)
    assert module is not None


# ---------------------------------------------------------------------------------------------------
# CUDA kernels vs reference (GPU only)


@needs_gpu
@pytest.mark.parametrize("case", UPFIRDN2D_CASES, ids=case_id)
def test_upfirdn2d_cuda_matches_ref(case):
    errors = upfirdn2d_errors(case)
    assert max(errors.values()) < TOLERANCE, errors
    assert upfirdn2d_gradchecks(case)


@needs_gpu
@pytest.mark.parametrize("case", FUSED_LRELU_CASES, ids=case_id)
def test_fused_leaky_relu_cuda_matches_ref(case):
    errors = fused_lrelu_errors(case)
    assert max(errors.values()) < TOLERANCE, errors
    assert fused_lrelu_gradchecks(case)


@needs_gpu
def test_cuda_auto_uses_kernels_and_half_precision():
    x = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.float16)
    kernel = torch.ones(4, 4, device="cuda") / 16
    bias = torch.randn(3, device="cuda")
    out = upfirdn2d(x, kernel, up=2, pad=(2, 1))
    assert out.dtype == torch.float16 and out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out.float(), upfirdn2d(x.float(), kernel, up=2, pad=(2, 1), impl="ref"),
                               rtol=2e-3, atol=2e-3)
    act = fused_leaky_relu(x, bias)
    assert act.dtype == torch.float16
    torch.testing.assert_close(act.float(), fused_leaky_relu(x.float(), bias, impl="ref"), rtol=2e-3,
                               atol=2e-3)
    # auto really used the kernels (a fallback would have compared the reference with itself)
    assert op.build.select_impl("auto", "upfirdn2d", (x,)) is not None
    assert op.build.select_impl("auto", "fused_bias_act", (x,)) is not None


def test_check_cuda_half_precision_tolerances_hold_for_the_reference_itself():
    """op/check_cuda.py holds the kernels in float16 / bfloat16 to LOWP_TOLERANCE of the float32 reference:
    the reference run in those dtypes must itself pass with room to spare (else a correct kernel would
    fail on the GPU), and a wrong one (an indexing bug: a border zeroed) must not. The large case really is
    past the kernels' 2^24-output grid-stride path."""
    from op.check_cuda import LARGE_UPFIRDN2D_CASE, LOWP_TOLERANCE

    for dtype, tolerance in LOWP_TOLERANCE.items():
        worst = max(max(fused_lrelu_errors(c, "cpu", dtype, ("ref", "ref")).values()) for c in FUSED_LRELU_CASES)
        worst = max([worst] + [max(upfirdn2d_errors(c, "cpu", dtype, ("ref", "ref")).values())
                               for c in UPFIRDN2D_CASES])
        assert 0 < worst < tolerance / 4, (dtype, worst)
    x, kernel, _ = upfirdn2d_inputs(UPFIRDN2D_CASES[1], "cpu", torch.bfloat16)
    good = upfirdn2d(x.float(), kernel.float(), 2, 1, UPFIRDN2D_CASES[1]["pad"], impl="ref")
    bad = upfirdn2d(x, kernel, 2, 1, UPFIRDN2D_CASES[1]["pad"], impl="ref").float()
    bad[..., 0, :] = 0
    assert (bad - good).abs().max() / good.abs().max() > LOWP_TOLERANCE[torch.bfloat16]
    n, c, h, w = LARGE_UPFIRDN2D_CASE["shape"]
    assert n * c * (h * LARGE_UPFIRDN2D_CASE["up"]) * (w * LARGE_UPFIRDN2D_CASE["up"]) > 2 ** 24


class WrongUpFirDn2dExtension(EmulatedUpFirDn2dExtension):
    """A stand-in extension whose forward is right except for padded borders (an indexing bug)."""

    @classmethod
    def upfirdn2d(cls, x, kernel, *args):
        out = super().upfirdn2d(x, kernel, *args).clone()
        out[..., 0, :] = 0
        return out


class WrongFusedBiasActExtension(EmulatedFusedBiasActExtension):
    """A stand-in whose backward forgets the negative slope (gradient 0 where x + b < 0)."""

    @staticmethod
    def leaky_relu_grad(grad_out, ref, negative_slope, scale, ref_sign):
        return torch.where(ref * ref_sign > 0, grad_out * scale, torch.zeros_like(grad_out))


def test_self_check_accepts_right_kernels_and_names_what_is_wrong():
    assert self_check("upfirdn2d", EmulatedUpFirDn2dExtension, "cpu") is None
    assert self_check("fused_bias_act", EmulatedFusedBiasActExtension, "cpu") is None
    reason = self_check("upfirdn2d", WrongUpFirDn2dExtension, "cpu")
    assert reason.startswith("output of case") and "contiguous" in reason
    reason = self_check("fused_bias_act", WrongFusedBiasActExtension, "cpu")
    assert reason.startswith("input gradient of case")


def test_check_cuda_row_fails_a_case_whose_gradcheck_failed(capsys):
    """check_cuda's table row (main needs CUDA, the row does not): a case passes only with its worst error
    under the tolerance and no failed gradcheck (grad_ok None: none were run)."""
    case = dict(up=2, down=1)
    small, large = dict(out=1e-7, grad=3e-7), dict(out=1e-7, grad=2e-6)
    expected = [(small, None, True, ["3.00e-07", "-", "ok"]), (small, True, True, ["3.00e-07", "True", "ok"]),
                (small, False, False, ["3.00e-07", "False", "FAIL"]),
                (large, True, False, ["2.00e-06", "True", "FAIL"]), (large, None, False, ["2.00e-06", "-", "FAIL"])]
    for errors, grad_ok, ok, fields in expected:
        assert check_cuda.report_row("upfirdn2d", case, errors, 1e-6, grad_ok) is ok
        detail = ["(out=1.0e-07", f"grad={errors['grad']:.1e})"]
        assert capsys.readouterr().out.split() == ["upfirdn2d", "up=2-down=1", *fields, *detail]


def test_network_check_runs_the_networks_through_the_kernels(monkeypatch):
    """check_cuda.network_errors on the CPU, stand-ins for the extensions wherever a GPU would use them:
    G and D through the CUDA path's autograd wrappers (channels_last views, adjoint calls, double
    backward) agree with the reference ops, and a stand-in whose activation gradient is wrong is caught
    in the gradients while the image agrees."""
    import importlib

    from op.check_cuda import NETWORK_TOLERANCE, network_errors

    calls = {"upfirdn2d": 0, "fused_bias_act": 0}
    stand_ins = {"upfirdn2d": EmulatedUpFirDn2dExtension, "fused_bias_act": EmulatedFusedBiasActExtension}

    def select(impl, name, tensors):  # the kernels, unless BLENDGAN_CUDA_OPS=ref (network_errors' 'ref' run)
        if op.build.cuda_ops_disabled():
            return None
        calls[name] += 1
        return stand_ins[name]

    for module in ("op.upfirdn2d", "op.fused_act"):
        monkeypatch.setattr(importlib.import_module(module), "select_impl", select)
    errors = network_errors("cpu", size=16)
    assert set(errors) == {"image", "score", "r1_grad_image", "r1_grad_d", "grad_g"}
    assert max(errors.values()) < 1e-5, errors
    assert calls["upfirdn2d"] > 0 and calls["fused_bias_act"] > 0
    stand_ins["fused_bias_act"] = WrongFusedBiasActExtension
    errors = network_errors("cpu", size=16)
    assert errors["image"] < 1e-5 and errors["score"] < 1e-5, errors
    assert min(errors["r1_grad_image"], errors["r1_grad_d"], errors["grad_g"]) > NETWORK_TOLERANCE, errors


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """CUDA ops in auto mode, built into tmp_path, nothing built or failed yet in this process."""
    monkeypatch.delenv(op.build.NO_CUDA_OPS_ENV, raising=False)
    monkeypatch.setenv(op.build.CUDA_OPS_ENV, "auto")
    monkeypatch.setenv(op.build.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(op.build, "_CACHE", {})
    monkeypatch.setattr(op.build, "_FAILED", {})


@pytest.mark.parametrize("mode", ["auto", "cuda"])
def test_wrong_kernels_fall_back_to_the_reference_with_one_warning(fresh_build, monkeypatch, tmp_path, mode):
    """A built extension that disagrees with the reference is not used (one warning naming the reason);
    BLENDGAN_CUDA_OPS=cuda keeps it, still warning."""
    monkeypatch.setenv(op.build.CUDA_OPS_ENV, mode)
    monkeypatch.setattr(op.build, "compile_extension", lambda name, verbose=False: WrongUpFirDn2dExtension)
    checked_on = []

    def check_on_the_cpu(name, module, device):
        checked_on.append(device)  # the caller's device (cuda:1), not the current one
        return self_check(name, module, "cpu")

    monkeypatch.setattr(op.build, "self_check", check_on_the_cpu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),))
        again = op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),))
    assert len(caught) == 1 and checked_on == [torch.device("cuda", 1)]
    message = str(caught[0].message)
    assert "'upfirdn2d' disagrees with the PyTorch reference: output of case" in message
    if mode == "auto":
        assert first is None and again is None and "using the reference instead" in message
    else:
        assert first is WrongUpFirDn2dExtension and again is first and "kept because" in message
    build_dir = next(iter(os.scandir(tmp_path))).path
    with op.build.BuildLock(build_dir, log=pytest.fail) as lock:  # the build lock was released
        assert not lock.waited


@pytest.mark.parametrize("caller_mode", ["no_grad", "inference_mode", "autocast"])
def test_self_check_runs_with_gradients_whatever_the_callers_mode(fresh_build, monkeypatch, caller_mode):
    """The first CUDA op call usually comes from a forward under no_grad / inference_mode / autocast: right
    kernels must still pass the check (it takes gradients and gradients of gradients in float32)."""
    monkeypatch.setattr(op.build, "compile_extension", lambda name, verbose=False: EmulatedUpFirDn2dExtension)
    monkeypatch.setattr(op.build, "self_check", lambda name, module, device: self_check(name, module, "cpu"))
    mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
            "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[caller_mode]
    with warnings.catch_warnings(record=True) as caught, mode:
        warnings.simplefilter("always")
        chosen = op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),))
    assert chosen is EmulatedUpFirDn2dExtension and not caught, [str(w.message) for w in caught]


def test_cuda_ops_env_values(monkeypatch):
    monkeypatch.delenv(op.build.NO_CUDA_OPS_ENV, raising=False)
    for value, mode in (("", "auto"), ("auto", "auto"), ("REF", "ref"), ("cuda", "cuda")):
        monkeypatch.setenv(op.build.CUDA_OPS_ENV, value)
        assert op.build.cuda_ops_mode() == mode
    monkeypatch.setenv(op.build.CUDA_OPS_ENV, "gpu")
    with pytest.raises(ValueError, match="BLENDGAN_CUDA_OPS must be auto, ref or cuda"):
        op.build.cuda_ops_mode()
    monkeypatch.delenv(op.build.CUDA_OPS_ENV)
    monkeypatch.setenv(op.build.NO_CUDA_OPS_ENV, "1")  # the older switch is an alias of ref
    assert op.build.cuda_ops_mode() == "ref" and op.build.cuda_ops_disabled()


_LOCK_WORKER = """
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("build", {path!r})  # op/build.py alone: no torch import
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
build_dir, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
with build.BuildLock(build_dir, log=lambda m: None):
    with open(log, "a") as f:
        f.write(json.dumps(["start", os.getpid(), time.time()]) + "\\n")
    time.sleep(hold)
    with open(log, "a") as f:
        f.write(json.dumps(["end", os.getpid(), time.time()]) + "\\n")
"""


def test_build_lock_serialises_processes_and_a_killed_builder_leaves_no_lock(tmp_path, monkeypatch):
    """Three processes (as torchrun's ranks) building at once run one after another; a builder killed
    with SIGKILL while holding the lock leaves nothing that blocks the next one (the kernel releases an
    flock); an old torch's baton file, which only an interrupted build leaves, is cleared with a message."""
    import json
    import signal
    import time

    script = tmp_path / "worker.py"
    script.write_text(_LOCK_WORKER.format(path=os.path.join(REPO, "op", "build.py")))
    build_dir, log = tmp_path / "build", tmp_path / "log.jsonl"
    build_dir.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(build_dir), str(log), "0.5"]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end"] * 3  # never two holders at once
    assert len({e[1] for e in events}) == 3

    killed = subprocess.Popen([sys.executable, str(script), str(build_dir), str(log), "60"])
    deadline = time.time() + 30
    while len(log.read_text().splitlines()) < 7:  # it holds the lock
        assert time.time() < deadline and killed.poll() is None
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((build_dir / op.build.LOCK_NAME).read_text())["pid"] == killed.pid  # the file stays ...
    (build_dir / "lock").write_text("")  # ... and an old torch's baton, left by the same interrupted build
    monkeypatch.setattr(op.build, "torch_uses_baton", lambda: True)
    messages = []
    with op.build.BuildLock(str(build_dir), log=messages.append) as lock:  # ... but nothing blocks
        assert not lock.waited
        assert json.loads((build_dir / op.build.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert messages == [f"[op.build] clearing torch's stale build lock {build_dir / 'lock'} (left by an "
                        f"interrupted build)"]
    assert not (build_dir / "lock").exists()
    # a newer torch flocks its `lock` file and leaves it after every build: not ours to clear or mention
    (build_dir / "lock").write_text("")
    monkeypatch.setattr(op.build, "torch_uses_baton", lambda: False)
    messages.clear()
    with op.build.BuildLock(str(build_dir), log=messages.append):
        pass
    assert messages == [] and (build_dir / "lock").exists()


def test_a_held_lock_is_waited_for(tmp_path):
    import threading

    holder = op.build.BuildLock(str(tmp_path), log=lambda m: None).__enter__()
    threading.Timer(0.3, holder.__exit__, (None, None, None)).start()  # the holder finishes
    messages = []
    with op.build.BuildLock(str(tmp_path), log=messages.append) as lock:
        assert lock.waited
    host = __import__("socket").gethostname()
    assert messages == [f"[op.build] another process (pid {os.getpid()} on {host}) is building in {tmp_path}; "
                        f"waiting for it"]


class NaNUpFirDn2dExtension(EmulatedUpFirDn2dExtension):
    """A stand-in whose forward is NaN everywhere (e.g. uninitialised shared memory)."""

    @classmethod
    def upfirdn2d(cls, x, kernel, *args):
        return super().upfirdn2d(x, kernel, *args) * float("nan")


def test_kernels_that_return_nan_fail_the_self_check(fresh_build, monkeypatch):
    """NaN outputs are a disagreement (a NaN error passes `err >= tolerance`), and 'auto' falls back."""
    reason = self_check("upfirdn2d", NaNUpFirDn2dExtension, "cpu")
    assert reason is not None and reason.startswith("output of case") and "nan" in reason
    monkeypatch.setattr(op.build, "compile_extension", lambda name, verbose=False: NaNUpFirDn2dExtension)
    monkeypatch.setattr(op.build, "self_check", lambda name, module, device: self_check(name, module, "cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),)) is None
    assert len(caught) == 1 and "disagrees with the PyTorch reference" in str(caught[0].message)


def test_a_self_check_that_raises_falls_back_with_one_warning_and_impl_cuda_says_why(fresh_build, monkeypatch):
    """A kernel that raises in the check (e.g. no kernel image for this GPU) is a disagreement, warned about once,
    not a crash of the run; impl='cuda' then names that reason."""
    def crashing_check(name, module, device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(op.build, "compile_extension", lambda name, verbose=False: EmulatedUpFirDn2dExtension)
    monkeypatch.setattr(op.build, "self_check", crashing_check)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),)) is None
        assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),)) is None
    assert len(caught) == 1 and "the check raised RuntimeError: CUDA error: no kernel image" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="unavailable: it disagrees with the PyTorch reference .*no kernel image"):
        op.build.select_impl("cuda", "upfirdn2d", (FakeCudaTensor(),))


def test_cuda_mode_insists_on_the_kernels_and_mixed_devices_take_the_reference(fresh_build, monkeypatch):
    """BLENDGAN_CUDA_OPS=cuda makes a failed build an error even for impl='auto'; inputs not all on CUDA never
    build."""
    built = []

    def failing_compile(name, verbose=False):
        built.append(name)
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(op.build, "compile_extension", failing_compile)
    assert op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(), torch.zeros(1))) is None
    assert built == []
    monkeypatch.setenv(op.build.CUDA_OPS_ENV, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="unavailable: it did not build .*nvcc exploded"):
            op.build.select_impl("auto", "upfirdn2d", (FakeCudaTensor(),))
    assert built == ["upfirdn2d"]


def test_the_build_runs_holding_the_build_directorys_lock(fresh_build, monkeypatch):
    """While compile_extension runs, another open file description cannot take the build folder's lock (without
    it, under torchrun every rank would compile into the same folder at once)."""
    held = []

    def compile_checking_the_lock(name, verbose=False):
        fd = os.open(os.path.join(op.build.build_dir_for(name), op.build.LOCK_NAME), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return EmulatedUpFirDn2dExtension

    monkeypatch.setattr(op.build, "compile_extension", compile_checking_the_lock)
    assert op.build.locked_compile("upfirdn2d") is EmulatedUpFirDn2dExtension
    assert held == [True]


def test_the_build_key_holds_the_torch_and_cuda_versions_and_false_keeps_the_kernels(monkeypatch):
    """The build key holds torch's and CUDA's versions (else, after a torch upgrade, the old binary is loaded, fails
    to import, and the run silently uses the reference); BLENDGAN_NO_CUDA_OPS=false / no / 0 is not set."""
    first = op.build.source_hash("upfirdn2d")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    second = op.build.source_hash("upfirdn2d")
    assert second != first
    monkeypatch.setattr(torch.version, "cuda", "99.9")
    assert op.build.source_hash("upfirdn2d") not in (first, second)
    monkeypatch.delenv(op.build.CUDA_OPS_ENV, raising=False)
    for value in ("false", "no", "False", "0", ""):
        monkeypatch.setenv(op.build.NO_CUDA_OPS_ENV, value)
        assert op.build.cuda_ops_mode() == "auto", value
