"""Test set-up: 8 fake CPU devices (sharding tests) and shared tiny data fixtures.

XLA_FLAGS must be set before jax is first imported, so this file sets it at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib


REPO = pathlib.Path(__file__).resolve().parent.parent
# The real CT fixtures; PETFM_TOTALSEG_DIR points elsewhere (e.g. from a git worktree).
TOTALSEG_DIR = pathlib.Path(os.environ.get(
    "PETFM_TOTALSEG_DIR") or REPO.parent / "shared" / "data" / "totalseg")
GOLDEN_DIR = REPO / "tests" / "golden"
