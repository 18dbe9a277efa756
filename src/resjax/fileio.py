"""Workdir files on a local disk or an object store (gs://...), through one small set of calls.

On a TPU pod slice every host must see the same workdir, so it lives on GCS; orbax reads and
writes checkpoints there itself. Everything else resjax writes (summaries, metric logs, reports)
goes through these functions. Local writes are atomic by rename; object stores commit a whole
object at once, which gives the same guarantee.
"""

from __future__ import annotations

import os
import tempfile
import uuid

from etils import epath  # orbax's own path library

from resjax.errors import UserError


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  return epath.Path(path)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def check_writable(workdir: str) -> None:
  """Raises UserError unless files can be written in ``workdir``, leaving nothing behind: a probe
  file is created and removed in the workdir, or locally in its nearest folder that exists (the
  workdir itself is not created)."""
  if is_remote(workdir):
    probe = _epath(f"{workdir.rstrip('/')}/.resjax-probe-{uuid.uuid4().hex}")
    try:
      probe.write_bytes(b"")
      probe.unlink()
    except ImportError as e:  # epath reaches gs:// through fsspec, which needs gcsfs
      fix = "pip install gcsfs" if workdir.startswith("gs://") else "install the package it names"
      raise UserError(f"cannot reach the workdir {workdir} ({e}): {fix}, or pass a local "
                      "--workdir") from None
    except Exception as e:  # noqa: BLE001 - each store and backend raises its own types
      why = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"cannot write to the workdir {workdir} ({why}): check the bucket's name and "
                      "that your credentials may write to it (gcloud auth application-default "
                      "login), or pass a local --workdir") from None
    return
  real = os.path.realpath(workdir)
  if real == "/proc" or real.startswith("/proc/"):
    raise UserError(f"the workdir {workdir} is under /proc, the kernel's view of processes, which "
                    "holds no files: pass a --workdir on a disk")
  existing = real
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == real else f"is under the file {existing}"
    raise UserError(f"the workdir {workdir} {where}, not a directory: pass a directory (or a path "
                    "to create) to --workdir")
  try:
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".resjax-probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"cannot write to the workdir {workdir} ({e.strerror}: {existing}): pass a "
                    "--workdir on a writable filesystem") from None


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def read_text(path: str) -> str:
  """The file's text; OSError (FileNotFoundError) when it is absent, as open() raises."""
  if is_remote(path):
    p = _epath(path)
    if not p.exists():
      raise FileNotFoundError(path)
    return p.read_text()
  with open(path) as f:
    return f.read()


def write_atomic(path: str, data: bytes) -> None:
  """A crash leaves the old file or the new one, never half of one."""
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class AppendLog:
  """A text file written line by line: appended locally, rewritten whole on object stores
  (which cannot append; metric logs are small)."""

  def __init__(self, path: str):
    self.path = path
    self.remote = is_remote(path)
    if self.remote:
      self.lines = read_text(path) if exists(path) else ""
    else:
      self.file = open(path, "a")

  def write(self, line: str) -> None:
    if self.remote:
      self.lines += line
      _epath(self.path).write_text(self.lines)
    else:
      self.file.write(line)
      self.file.flush()

  def close(self) -> None:
    if not self.remote:
      self.file.close()
