"""The one build helper for every CUDA extension in `op/`.

Extensions are compiled with `torch.utils.cpp_extension.load` (ninja) the first time an op is used on
a CUDA tensor, never at import. Each process keeps what it loaded in `_CACHE`; the build directory is
keyed by a hash of the sources (and of the torch / CUDA versions and the target architectures), so an
edit to a kernel triggers a rebuild and an unchanged one is reused across processes. Only rank 0 (the
RANK environment variable set by torchrun) prints build progress.

Never silently wrong: a freshly loaded extension is checked against the PyTorch reference on the GPU
before its first use (`self_check`: forward, gradient and gradient of gradient on the up/down/pad
combinations the networks use, from op/check_cuda.py); a build failure or a mismatch warns once, naming
the reason, and the callers fall back to the reference.

BLENDGAN_CUDA_OPS=auto (default: kernels when they build and pass the check) | ref (never build, the
reference everywhere; BLENDGAN_NO_CUDA_OPS=1 is the older spelling) | cuda (the kernels wherever the
inputs are on CUDA: a build failure raises, a failed check still warns).

Concurrent builds (torchrun starts N processes that all want the kernels): one process builds holding an
exclusive flock on a file in the build directory, the others wait for it and then load the finished
build. The kernel releases an flock when its process ends, however it ends, so an interrupted build
leaves no lock behind (a check-then-delete of a stale lock file would let two ranks in at once). Older
torch guards its build with a baton file (`lock`) that an interrupted build leaves and that would block
forever: while holding our lock, that file can only be stale and is cleared with a message (newer torch
flocks the same name and leaves the file in place: nothing to clear).
"""

import fcntl
import hashlib
import json
import os
import socket
import warnings

OP_DIR = os.path.dirname(os.path.abspath(__file__))

# name -> list of source files (relative to OP_DIR); the binding .cpp first.
EXTENSIONS = {
    "fused_bias_act": ["fused_bias_act.cpp", "fused_bias_act_kernel.cu"],
    "upfirdn2d": ["upfirdn2d.cpp", "upfirdn2d_kernel.cu"],
}
# name -> headers its sources include from OP_DIR (not compiled on their own; part of the build's key).
HEADERS = {
    "upfirdn2d": ["upfirdn2d_math.h"],
}

NO_CUDA_OPS_ENV = "BLENDGAN_NO_CUDA_OPS"
CUDA_OPS_ENV = "BLENDGAN_CUDA_OPS"
BUILD_DIR_ENV = "BLENDGAN_OPS_BUILD_DIR"
LOCK_NAME = "blendgan_build.lock"

# No fast-math, so the kernels match the reference to float32 rounding; torch adds its own -std flag.
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]

# name -> loaded module, or None after a failed build or check (so it is tried, and warned about, once);
# name -> why it is None.
_CACHE = {}
_FAILED = {}


def cuda_ops_mode():
    """'auto' | 'ref' | 'cuda' from BLENDGAN_CUDA_OPS (and BLENDGAN_NO_CUDA_OPS=1 -> 'ref'); read on every
    call. An unknown value raises with the variable's name."""
    mode = os.environ.get(CUDA_OPS_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "ref", "cuda"):
        raise ValueError(f"{CUDA_OPS_ENV} must be auto, ref or cuda, got {os.environ[CUDA_OPS_ENV]!r}")
    if mode == "auto" and os.environ.get(NO_CUDA_OPS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return "ref"
    return mode


def cuda_ops_disabled():
    """True when the environment asks for the PyTorch reference everywhere (BLENDGAN_CUDA_OPS=ref or
    BLENDGAN_NO_CUDA_OPS=1)."""
    return cuda_ops_mode() == "ref"


def is_rank_zero():
    """Rank 0, or a single process: the only one that prints build progress."""
    return int(os.environ.get("RANK", "0")) == 0


def source_paths(name):
    """Absolute paths of the sources of extension `name`."""
    if name not in EXTENSIONS:
        raise KeyError(f"unknown CUDA extension {name!r}; known: {sorted(EXTENSIONS)}")
    return [os.path.join(OP_DIR, f) for f in EXTENSIONS[name]]


def header_paths(name):
    """Absolute paths of the headers the sources of extension `name` include."""
    source_paths(name)  # the same error for an unknown name
    return [os.path.join(OP_DIR, f) for f in HEADERS.get(name, [])]


def source_hash(name):
    """Hex digest over the sources and headers, the compile flags, torch/CUDA versions and the target
    archs."""
    import torch

    digest = hashlib.sha256()
    for path in source_paths(name) + header_paths(name):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    for part in (torch.__version__, str(torch.version.cuda), target_archs(),
                 " ".join(EXTRA_CFLAGS), " ".join(EXTRA_CUDA_CFLAGS)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def target_archs():
    """The GPU architectures a build is for: TORCH_CUDA_ARCH_LIST, else (as torch compiles then) those of the
    visible GPUs. Part of the build directory's key: a cache shared by machines with different GPUs never
    hands one a binary without its architecture (torch's own up-to-date check ignores the flags)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if not torch.cuda.is_available():
        return ""
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


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
    build_dir = build_dir_for(name)
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


def torch_uses_baton():
    """Whether this torch guards its extension builds with a FileBaton (a `lock` file that exists only while
    a build runs), rather than an flock'ed file that stays (newer torch)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


class BuildLock:
    """Exclusive lock on a build directory: an flock on LOCK_NAME there, held for the build. The others
    block until it is released; the holder's pid and host are in the file, for the waiting message."""

    def __init__(self, build_dir, log=print):
        self.path = os.path.join(build_dir, LOCK_NAME)
        self.build_dir = build_dir
        self.log = log
        self.waited = False
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waited = True
            if is_rank_zero():
                self.log(f"[op.build] another process ({self._holder()}) is building in {self.build_dir}; "
                         f"waiting for it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        baton = os.path.join(self.build_dir, "lock")
        if os.path.exists(baton) and torch_uses_baton():  # we hold the lock: no build of ours is running
            self.log(f"[op.build] clearing torch's stale build lock {baton} (left by an interrupted build)")
            os.remove(baton)
        return self

    def _holder(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return f"pid {holder['pid']} on {holder['host']}"
        except (OSError, ValueError, KeyError):
            return "pid unknown"

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        return False


def build_dir_for(name):
    return os.path.join(build_root(), f"{name}-{source_hash(name)}")


def locked_compile(name, verbose=False):
    """compile_extension under the build directory's BuildLock (one builder, the others wait)."""
    build_dir = build_dir_for(name)
    os.makedirs(build_dir, exist_ok=True)
    with BuildLock(build_dir):
        return compile_extension(name, verbose=verbose)


def self_check(name, module, device="cuda"):
    """None when extension `module` matches the PyTorch reference on `device` (forward, gradient, gradient
    of gradient, the cases of op.check_cuda.SELF_CHECK_CASES), else the reason (a sentence)."""
    from op import check_cuda

    return check_cuda.self_check(name, module, device)


def load_extension(name, strict=False, verbose=False, check=True, device="cuda"):
    """The compiled extension `name`, or None when CUDA ops are disabled, the build failed or the kernels
    disagree with the reference (self_check on `device`, the first caller's, once, before first use).

    Built and checked at most once per process; a failure is warned about once and then remembered.
    With strict=True a build failure raises instead (with the compiler's message), for op/check_cuda.py.
    BLENDGAN_CUDA_OPS=cuda keeps kernels that fail the check (with the warning).
    """
    if cuda_ops_disabled():
        return None
    if name in _CACHE and (_CACHE[name] is not None or not strict):
        return _CACHE[name]
    try:
        module = locked_compile(name, verbose=verbose)
    except Exception as err:  # any build failure (compiler, linker, missing toolkit) means: fall back
        if strict:
            raise
        module = None
        _FAILED[name] = f"it did not build ({type(err).__name__}: {err})"
        warnings.warn(f"[op.build] could not build CUDA extension {name!r}, using the PyTorch reference "
                      f"instead ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    if module is not None and check:
        import torch

        try:
            # The first CUDA op call often comes under no_grad / inference_mode / autocast; the check needs
            # gradients and full precision whatever the caller's mode.
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False), \
                    torch.autocast("cpu", enabled=False):
                reason = self_check(name, module, device)
        except Exception as err:  # a kernel that crashes is as unusable as a wrong one
            reason = f"the check raised {type(err).__name__}: {err}"
        if reason is not None:
            forced = cuda_ops_mode() == "cuda"
            warnings.warn(f"[op.build] CUDA extension {name!r} disagrees with the PyTorch reference: {reason}; "
                          + (f"kept because {CUDA_OPS_ENV}=cuda" if forced else "using the reference instead"),
                          RuntimeWarning, stacklevel=2)
            if not forced:
                module = None
                _FAILED[name] = f"it disagrees with the PyTorch reference ({reason})"
    _CACHE[name] = module
    return module


def select_impl(impl, name, tensors):
    """Resolve `impl` ('auto' | 'ref' | 'cuda') to the extension module to use, or None for the reference.

    'auto' uses the CUDA kernel when every tensor is on a CUDA device and the extension builds;
    'cuda' insists (raises if the inputs are not on CUDA or the build is unavailable).
    """
    if impl not in ("auto", "ref", "cuda"):
        raise ValueError(f"impl must be 'auto', 'ref' or 'cuda', got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    device = next((t.device for t in tensors if t is not None), None)  # the self-check runs there
    if impl == "auto" and cuda_ops_mode() == "cuda" and on_cuda:
        impl = "cuda"  # BLENDGAN_CUDA_OPS=cuda: insist on the kernels
    if impl == "ref":
        return None
    if impl == "auto":
        return load_extension(name, device=device) if on_cuda else None
    if not on_cuda:
        raise ValueError(f"impl='cuda' needs CUDA tensors for {name!r}")
    if cuda_ops_disabled():
        raise RuntimeError(f"impl='cuda' requested for {name!r} but {CUDA_OPS_ENV}=ref or {NO_CUDA_OPS_ENV} is set")
    module = load_extension(name, device=device)
    if module is None:
        raise RuntimeError(f"impl='cuda' requested but the CUDA extension {name!r} is unavailable: "
                           f"{_FAILED.get(name, 'it did not build')}")
    return module
