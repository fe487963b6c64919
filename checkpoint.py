"""The project's one checkpoint loader and writer.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: a checkpoint never runs code.
Besides tensors and plain Python values, the load allows exactly the classes in ``SAFE_CLASSES``: plain
data containers that the training files we start from are known to hold.
Files in the zip format are memory-mapped, so a 1.5 GB generator is not read into memory twice.
Errors are one line that names the file and the problem (``CheckpointError``), in plain text.
"""
import argparse
import os
import pickle
import re
import zipfile

import torch

import fileio
from fileio import atomic_path, disk_full_message


# Classes a weights-only load accepts on top of torch's defaults (tensors, containers, numbers, strings).
# rosinality/stylegan2-pytorch's train.py saves {"g", "d", "g_ema", "g_optim", "d_optim", "args",
# "ada_aug_p"} with ``args`` its argparse.Namespace (an attribute bag of command-line values; unpickling it
# sets attributes and calls nothing); the optimizer states and ``ada_aug_p`` are plain values. The
# release's files and pSp's (``opts`` is ``vars(opts)``, a dict) hold only default-allowed types.
SAFE_CLASSES = (argparse.Namespace,)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


class DiskFullError(CheckpointError, fileio.DiskFullError):
    """A checkpoint could not be written for lack of disk space (the files written before it are intact)."""


HTML_SNIFF_BYTES = 1024


def html_title(path):
    """The page's title (or 'untitled') when the file is an HTML page, else None."""
    with open(path, "rb") as f:
        head = f.read(HTML_SNIFF_BYTES)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not (text.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in text):
        return None
    m = re.search(rb"<title[^>]*>(.*?)</title>", head, re.I | re.S)
    return m.group(1).decode("utf-8", "replace").strip()[:80] if m else "untitled"


def not_a_checkpoint(path):
    """Why the file at ``path`` cannot be a torch.save file (None when it may be one): an HTML page (what a
    failed download of a large file often is), or bytes that are neither the zip format nor a pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save writes a zip, or (legacy) a protocol-2 pickle
        return None
    title = html_title(path)
    if title is not None:
        return (f"an HTML page ('{title}'), not weights: a download that got Drive's quota or confirmation page or "
                f"a proxy's error page; download it again (python download_models.py --verify checks the files)")
    return "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle); download or copy it again"


def _plain(text):
    """torch's message without terminal colour codes, on one line."""
    return " ".join(_ANSI.sub("", text).split())


def _refused_globals(path, message):
    """The globals (module.name) that made a weights-only load refuse ``path``, for the message.

    Read from the file's pickle without running it (zip format); torch's own message is the fallback
    (legacy format). Classes in SAFE_CLASSES are left out: they were allowed.
    """
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_CLASSES}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (pre-zip) files: torch cannot list them
        names = re.findall(r"GLOBAL ([\w.]+)", _plain(message))
    return sorted(set(names) - allowed)


def load_checkpoint(path, map_location="cpu", hint=None, expect_dict=True, mmap=True):
    """Load a dict checkpoint safely.

    path: file written by ``torch.save`` (zip or legacy format).
    hint: extra text for the missing-file message (e.g. where the release publishes the file).
    expect_dict: refuse anything but a dict (False: any weights-only object, e.g. a tensor of codes).
    mmap: memory-map the file (zip format): tensors are read when first touched and can be used as
        parameters in place (assign=True). False reads each tensor into its own memory: right when the
        tensors will be converted anyway (a touched mapped page would be held twice while the
        mapping lives).
    Returns the loaded object. Raises CheckpointError with one line naming the file otherwise.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        msg = f"checkpoint {path}: file not found"
        raise CheckpointError(msg + (f"; {hint}" if hint else ""))
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path}: file is empty")
    problem = not_a_checkpoint(path)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    # mmap only works for the zip format; legacy (pre-1.6) files are read normally.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            refused = _refused_globals(path, str(e))
            allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_CLASSES)
            if refused:
                raise CheckpointError(
                    f"checkpoint {path}: refused: it needs the Python global {', '.join(refused)}, which a "
                    f"checkpoint may not load because loading it could run code; only tensors, plain values and "
                    f"{allowed} are read") from None
            # No global to blame (e.g. an opcode the safe unpickler lacks): torch's reason, not its advice.
            reason = re.search(r"Unpickler error:(.*?)(Check the documentation|$)", str(e), re.S)
            reason = _plain(reason.group(1)) if reason and reason.group(1).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {path}: not readable by the safe (weights-only) loader: {reason}; "
                                  f"only tensors, plain values and {allowed} are read") from None
        first = _plain(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint ({first})") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/... for damaged files
        first = _plain(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint, truncated or corrupt "
            f"({type(e).__name__}: {first})") from None
    if expect_dict and not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def require_key(ckpt, key, path):
    """ckpt[key], or a CheckpointError naming the file and the keys it does have."""
    if key not in ckpt:
        have = ", ".join(sorted(map(str, ckpt.keys()))[:8]) or "nothing"
        raise CheckpointError(f"checkpoint {path}: has no '{key}' entry (it has: {have})")
    return ckpt[key]


def state_dict_mismatch(module, state_dict, limit=3):
    """Describe how ``state_dict`` differs from ``module.state_dict()``; '' when it fits exactly."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def with_batchnorm_counters(module, state_dict):
    """state_dict with BatchNorm ``num_batches_tracked`` entries made to fit ``module``: files saved before
    PyTorch 0.4.1 (or trimmed) lack them, and torch's own strict load fills them in too (unused in eval)."""
    own = {k for k in module.state_dict() if k.endswith("num_batches_tracked")}
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked") or k in own}
    for k in own - set(sd):
        sd[k] = torch.tensor(0, dtype=torch.long)
    return sd


def load_state_dict_strict(module, state_dict, what, hint=None, assign=False):
    """Strict ``load_state_dict`` with a one-line error naming the first offending keys.

    what: the file (or file and entry) the weights come from, for the message.
    hint: optional callable(state_dict) -> str suggesting a configuration that would fit.
    assign: use the file's tensors as the parameters (for modules built on the meta device: no copy).
    """
    problem = state_dict_mismatch(module, state_dict)
    if problem:
        extra = hint(state_dict) if hint is not None else ""
        raise CheckpointError(f"{what}: layout does not fit {type(module).__name__}: {problem}"
                              + (f". {extra}" if extra else ""))
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


def tensor_bytes(obj):
    """Bytes of the tensors in ``obj`` (nested dicts, lists and tuples): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file.

    A full disk is a DiskFullError that says so: an OSError ENOSPC / EDQUOT (atomic_path's fileio.DiskFullError),
    or torch's RuntimeError, which has no errno ('unexpected pos 1044480 vs 1044432', 'file write failed'), with
    less space left than the checkpoint takes. Another OSError (read-only, no permission) stays as it is.
    """
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            with open(tmp, "xb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # the temporary is gone: the space it took is free again
        need = tensor_bytes(obj)
        if not isinstance(e, fileio.DiskFullError) and (isinstance(e, OSError) or fileio.free_bytes(path) >= need):
            raise
        raise DiskFullError(disk_full_message(path, f", the checkpoint takes {need / 2**20:.0f} MiB") +
                            "; the files written before it are intact: free some space and run again (a trainer "
                            "continues with --resume latest)") from e
