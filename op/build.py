"""The one build helper for every CUDA extension in `op/`.

Extensions are compiled with `torch.utils.cpp_extension.load` (ninja) the first time an op is used on
a CUDA tensor, never at import. Each process keeps what it loaded in `_CACHE`; the build directory is
keyed by a hash of the sources (and of the torch / CUDA versions and the target architectures), so an
edit to a kernel triggers a rebuild and an unchanged one is reused across processes. Only rank 0 (the
RANK environment variable set by torchrun) prints build progress. A build that fails warns once per
process and the caller falls back to the PyTorch reference; BLENDGAN_NO_CUDA_OPS=1 skips the build and
forces the reference everywhere.
"""

import hashlib
import os
import warnings

OP_DIR = os.path.dirname(os.path.abspath(__file__))

# name -> list of source files (relative to OP_DIR); the binding .cpp first.
EXTENSIONS = {
    "fused_bias_act": ["fused_bias_act.cpp", "fused_bias_act_kernel.cu"],
    "upfirdn2d": ["upfirdn2d.cpp", "upfirdn2d_kernel.cu"],
}

NO_CUDA_OPS_ENV = "BLENDGAN_NO_CUDA_OPS"
BUILD_DIR_ENV = "BLENDGAN_OPS_BUILD_DIR"

# No fast-math, so the kernels match the reference to float32 rounding; torch adds its own -std flag.
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]

# name -> loaded module, or None after a failed build (so it is tried, and warned about, once).
_CACHE = {}


def cuda_ops_disabled():
    """True when BLENDGAN_NO_CUDA_OPS asks for the PyTorch reference everywhere (read on every call)."""
    return os.environ.get(NO_CUDA_OPS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_rank_zero():
    """Rank 0, or a single process: the only one that prints build progress."""
    return int(os.environ.get("RANK", "0")) == 0


def source_paths(name):
    """Absolute paths of the sources of extension `name`."""
    if name not in EXTENSIONS:
        raise KeyError(f"unknown CUDA extension {name!r}; known: {sorted(EXTENSIONS)}")
    return [os.path.join(OP_DIR, f) for f in EXTENSIONS[name]]


def source_hash(name):
    """Hex digest over the sources, the compile flags, torch/CUDA versions and the target archs."""
    import torch

    digest = hashlib.sha256()
    for path in source_paths(name):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    for part in (torch.__version__, str(torch.version.cuda), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                 " ".join(EXTRA_CFLAGS), " ".join(EXTRA_CUDA_CFLAGS)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def build_root():
    """Parent of all build directories: $BLENDGAN_OPS_BUILD_DIR, else under $TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions."""
    if os.environ.get(BUILD_DIR_ENV):
        return os.environ[BUILD_DIR_ENV]
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(base, "blendgan_ops")


def compile_extension(name, verbose=False):
    """Compile (or reuse an up-to-date build of) extension `name` and import it; raises on failure.

    This is the whole build path: `load_extension` adds the per-process cache and the fallback (or,
    with strict=True as op/check_cuda.py uses it, lets the compiler's error through).
    """
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("CUDA toolkit not found (set CUDA_HOME to the directory holding bin/nvcc)")
    digest = source_hash(name)
    build_dir = os.path.join(build_root(), f"{name}-{digest}")
    os.makedirs(build_dir, exist_ok=True)
    if is_rank_zero():
        print(f"[op.build] loading CUDA extension {name!r} from {build_dir} (compiled unless up to date)",
              flush=True)
    # The module name carries the hash too, so two builds of different sources never clash in
    # sys.modules.
    return cpp_extension.load(
        name=f"blendgan_{name}_{digest}",
        sources=source_paths(name),
        build_directory=build_dir,
        extra_cflags=EXTRA_CFLAGS,
        extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
        verbose=verbose and is_rank_zero(),
    )


def load_extension(name, strict=False, verbose=False):
    """The compiled extension `name`, or None when CUDA ops are disabled or the build failed.

    Built at most once per process; a failure is warned about once and then remembered. With
    strict=True a failure raises instead (with the compiler's message), for op/check_cuda.py.
    """
    if cuda_ops_disabled():
        return None
    if name in _CACHE and (_CACHE[name] is not None or not strict):
        return _CACHE[name]
    try:
        module = compile_extension(name, verbose=verbose)
    except Exception as err:  # any build failure (compiler, linker, missing toolkit) means: fall back
        if strict:
            raise
        module = None
        warnings.warn(f"[op.build] could not build CUDA extension {name!r}, using the PyTorch reference "
                      f"instead ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    _CACHE[name] = module
    return module


def select_impl(impl, name, tensors):
    """Resolve `impl` ('auto' | 'ref' | 'cuda') to the extension module to use, or None for the reference.

    'auto' uses the CUDA kernel when every tensor is on a CUDA device and the extension builds;
    'cuda' insists (raises if the inputs are not on CUDA or the build is unavailable).
    """
    if impl not in ("auto", "ref", "cuda"):
        raise ValueError(f"impl must be 'auto', 'ref' or 'cuda', got {impl!r}")
    if impl == "ref":
        return None
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return load_extension(name) if on_cuda else None
    if not on_cuda:
        raise ValueError(f"impl='cuda' needs CUDA tensors for {name!r}")
    if cuda_ops_disabled():
        raise RuntimeError(f"impl='cuda' requested for {name!r} but {NO_CUDA_OPS_ENV} is set")
    module = load_extension(name)
    if module is None:
        raise RuntimeError(f"impl='cuda' requested but the CUDA extension {name!r} did not build")
    return module
