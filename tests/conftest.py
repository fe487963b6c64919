import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The release reference (official_checkpoint_schema.json, ...) that sits beside the repository.
SHARED_REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")


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
