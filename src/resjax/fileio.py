"""Workdir files on a local disk or an object store (gs://...), through one small set of calls.

On a TPU pod slice every host must see the same workdir, so it lives on GCS; orbax reads and
writes checkpoints there itself. Everything else resjax writes (summaries, metric logs, reports)
goes through these functions. Local writes are atomic by rename; object stores commit a whole
object at once, which gives the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
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


def move(src: str, dst: str) -> None:
  """Renames a file or folder (its new parent folder is made)."""
  if is_remote(src):
    _epath(dst).parent.mkdir(parents=True, exist_ok=True)
    _epath(src).rename(_epath(dst))
  else:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)


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


# Strict JSON has no NaN or infinity: resjax writes them as these strings, and reads them back.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _strict(obj):
  if isinstance(obj, float) and not math.isfinite(obj):
    return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
  if isinstance(obj, dict):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict(v) for v in obj]
  return obj


def dumps(obj, **kw) -> str:
  """Strict JSON (a non-finite float becomes "NaN", "Infinity" or "-Infinity"); numpy scalars
  become floats."""
  obj = json.loads(json.dumps(obj, default=float))  # numpy scalars -> floats, tuples -> lists
  return json.dumps(_strict(obj), allow_nan=False, **kw)


def loads(text: str):
  """``dumps``'s inverse: the strings of NONFINITE become floats again (bare NaN is read too)."""
  def hook(d):
    return {k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in d.items()}
  return json.loads(text, object_hook=hook)


class AppendLog:
  """A text file written line by line: appended locally, rewritten whole on object stores
  (which cannot append; metric logs are small). A last line torn by a crash is ended first, so
  the next line is whole and a reader drops only the torn one."""

  def __init__(self, path: str):
    self.path = path
    self.remote = is_remote(path)
    if self.remote:
      self.lines = read_text(path) if exists(path) else ""
      if self.lines and not self.lines.endswith("\n"):
        self.lines += "\n"
    else:
      self.file = open(path, "a+b")
      if self.file.tell() > 0:
        self.file.seek(-1, os.SEEK_END)
        if self.file.read(1) != b"\n":
          self.file.write(b"\n")

  def write(self, line: str) -> None:
    if self.remote:
      self.lines += line
      _epath(self.path).write_text(self.lines)
    else:
      self.file.write(line.encode())
      self.file.flush()

  def close(self) -> None:
    if not self.remote:
      self.file.close()


# ------------------------------------------------------------------------------------------------
# The workdir lock: one run at a time on a workdir.
# ------------------------------------------------------------------------------------------------

LOCK_NAME = ".resjax.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _take(path: str) -> dict | None:
  """Creates the lock file with this process's record; None if it is there already."""
  record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".resjax.lock.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(record) + "\n")
    os.link(tmp, path)  # atomic, and fails if the lock exists: never a half-written lock
  except FileExistsError:
    return None
  finally:
    os.unlink(tmp)
  return record


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds WORKDIR/.resjax.lock while a run trains in ``workdir`` (made if absent), released on
  any exit that runs Python's cleanup (an exception, SystemExit from a signal handler).

  A lock held by a live process is a UserError naming it, and nothing is written. A lock left by
  a process that is gone from this host (kill -9, a crash) is taken over with a one-line notice.
  Object stores have no exclusive create: a remote workdir is not locked.
  """
  if is_remote(workdir):
    yield
    return
  makedirs(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  record = _take(path)
  if record is None:
    try:
      with open(path) as f:
        other = json.loads(f.read())
      pid, host = int(other["pid"]), str(other["host"])
    except (OSError, ValueError, KeyError, TypeError):
      raise UserError(f"the workdir {workdir} holds an unreadable lock {path}: if no run uses "
                      "this workdir, delete that file") from None
    if host != socket.gethostname() or _alive(pid):
      raise UserError(f"the workdir {workdir} is in use by process {pid} on {host} "
                      f"({other.get('command', '?')}): wait for it or stop it, or pass another "
                      f"--workdir (if that process is gone, delete {path})")
    os.unlink(path)
    record = _take(path)
    if record is None:
      raise UserError(f"the workdir {workdir} was taken by another run just now: pass another "
                      "--workdir, or wait for it")
    print(f"notice: took over the lock of process {pid} on {host}, which is gone "
          f"(it stopped without releasing {path})", file=sys.stderr, flush=True)
  try:
    yield
  finally:
    try:
      with open(path) as f:
        mine = json.loads(f.read()).get("pid") == record["pid"]
    except (OSError, ValueError):
      mine = False
    if mine:
      os.unlink(path)
