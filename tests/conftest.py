import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fileio import free_bytes  # noqa: E402 (after the path)

# The release reference (official_checkpoint_schema.json, ...) that sits beside the repository.
SHARED_REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")

# The most the suite's files take at once (pytest.ini deletes a passing test's files), with a margin.
SUITE_DISK_GB = 10


def record_returns(monkeypatch, owner, name):
    """Wrap ``owner.name`` so that each call's result is appended to the list returned here."""
    returns, original = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        returns.append(original(*args, **kwargs))
        return returns[-1]

    monkeypatch.setattr(owner, name, recorded)
    return returns


def synthesis_only(g):
    """Generator g's state dict as a StyleGAN2 (rosinality) file holds it: without BlendGAN's own keys (style
    encoder, style mapping, WBM weights)."""
    from model import BLENDGAN_ONLY_KEYS

    return {k: v for k, v in g.state_dict().items() if not k.startswith(BLENDGAN_ONLY_KEYS)}


def inf_gradient(x):
    """``x`` unchanged, whose gradient comes back infinite: a finite loss with an overflow in its backward pass."""
    import torch

    class InfGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    return InfGradient.apply(x)


def pytest_sessionstart(session):
    """Say at the start when the temporary folder has less room than the suite needs; otherwise the first sign is
    tests failing with 'the disk is full' minutes later."""
    folder = session.config.option.basetemp or tempfile.gettempdir()
    free = free_bytes(folder) / 2**30
    if free < SUITE_DISK_GB:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"WARNING: {free:.1f} GB free under {folder}; the suite needs about {SUITE_DISK_GB} GB there (set "
            f"TMPDIR or --basetemp to a folder with room)", yellow=True, bold=True)


def under_ci():
    """True when the CI variable says so (CI=true, as GitHub Actions, GitLab and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def reference_file(name, env=None):
    """Path of the reference file ``name`` (``$env`` overrides where it is looked for).

    The one place tests decide what a missing reference means: skip on a developer's clone without it,
    but under CI fail naming the path, so a release-schema check never silently stops running.
    """
    path = os.environ.get(env) if env and os.environ.get(env) else os.path.join(SHARED_REFERENCE, name)
    if not os.path.isfile(path):
        if under_ci():
            pytest.fail(f"reference file {path} is missing; under CI (CI=true) the release-schema tests must run: "
                        f"provide it{f' or point ${env} at it' if env else ''}", pytrace=False)
        pytest.skip(f"reference file {path} not found (the release-schema check did not run)")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system (tmpfs) mounted on a new folder, or a skip where mounting one is not allowed (it needs
    root). Unmounted after the test, also when it fails (lazily, if a file on it is still open)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                           text=True) if shutil.which("mount") and os.geteuid() == 0 else None
    if mount is None or mount.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here ({mount.stderr.strip() if mount else 'needs root'})")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill_disk(folder, leave):
    """Fill the file system of ``folder`` with a file ``folder/fill`` until ``leave`` bytes, rounded up to a whole
    4 KiB page, are free; returns its path (remove it to free the space again)."""
    path = os.path.join(folder, "fill")
    page = 4096
    with open(path, "wb") as f:
        f.write(bytes(max(0, shutil.disk_usage(folder).free - leave) // page * page))
    return path
