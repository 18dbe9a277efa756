"""Workdir files on a local disk or an object store (gs://...), through one small set of calls.

On a TPU pod slice every host must see the same workdir, so it lives on GCS; orbax reads and
writes checkpoints there itself. Everything else resjax writes (summaries, metric logs, reports)
goes through these functions. Local writes are atomic by rename; object stores commit a whole
object at once, which gives the same guarantee.
"""

from __future__ import annotations

import os
import tempfile


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath  # orbax's own path library
  return epath.Path(path)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


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
