"""Where a run's numbers came from: library versions, devices, the code's commit, the command.

``gather()`` collects it once per process. ``train`` copies it into every seed's summary.json (with
the run's start and end), ``main`` into WORKDIR/config.json, and results.md ends with it.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys

import jax

from resjax import kernels

# The libraries whose versions change the numbers (kernels, initialisers, optimizers, checkpoints).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))


def utc_now() -> str:
  """The current time, UTC, ISO 8601 to the second (e.g. 2026-11-27T10:04:05+00:00)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def git_state(directory: str) -> tuple[str | None, bool | None]:
  """(commit, dirty) of the git checkout whose tracked files include ``directory``.

  (None, None) when there is none: an installed wheel, a site-packages folder inside some other
  repository, no git on the machine. Untracked files that git does not ignore count as dirty: an
  experiment file not yet committed changes what ran.
  """
  def git(*args):
    out = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout

  try:
    git("ls-files", "--error-unmatch", ".")  # fails unless the source here is tracked
    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain").strip())
  except (OSError, subprocess.SubprocessError):
    return None, None
  return commit, dirty


@functools.cache
def gather() -> dict:
  """This process's provenance (after jax.distributed.initialize(), which jax.devices() needs)."""
  devices = jax.devices()
  commit, dirty = git_state(SOURCE_DIR)
  versions = {**{p: version(p) for p in PACKAGES}, "resjax": version("resjax"),
              "python": platform.python_version()}
  if devices[0].platform == "cpu" and kernels.available():
    versions["onednn"] = kernels.onednn_version()  # the CPU convolutions of conv_impl="auto"
  return {
      "versions": versions,
      "device": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                 "count": len(devices)},
      "process_count": jax.process_count(),
      "commit": commit,
      "dirty": dirty,
      # As typed: the interpreter and ``-m resjax.main`` too, which sys.argv[0] hides.
      "command": shlex.join(sys.orig_argv),
      "started": utc_now(),
  }
