"""glibc malloc settings for XLA:CPU training, which glibc reads only when a process starts.

glibc malloc returns every freed block over 32 MiB to the OS (and threads get their own arenas,
whose large blocks are always fresh mappings), so each step of an XLA:CPU program faults its
temporary buffers in again, page by page (README, Speed, has what that costs). ``TUNABLES`` keeps
one arena that keeps what it frees, for blocks under 64 MiB. Larger ones (XLA:CPU's temporaries of a step,
one block) keep their own mapping, returned at free, because a heap that is never trimmed
fragments around them: ResNet-110's step with remat, 0.48 GiB of XLA buffers, peaked anywhere from
1.3 to 3.0 GiB of RSS with every block in the heap. hugetlb=1 backs those mappings with transparent
huge pages, so mapping one again costs 2 MiB faults, not 4 KiB ones. A glibc that does not know a
tunable (hugetlb is from 2.35) ignores it.

Blocks of 64 MiB and more still cost a fresh mapping each step. Where ``python -m resjax.kernels
build`` has built ``blockcache.c``, ``environment`` also puts it in ``LD_PRELOAD``: it keeps such a
block mapped after free for the next request of its size (see there).

``python -m resjax.main``, ``python -m resjax.caution`` and the bench's children run with these;
``reexec`` starts the command again under them where they are not set yet. It leaves alone a ``GLIBC_TUNABLES`` the user set, a
machine whose JAX has an accelerator plugin (``jax_plugins``, libtpu) or platform other than CPU,
and anything but Linux with glibc.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=67108864:"
            "glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=1")
ENV = "GLIBC_TUNABLES"
PRELOAD = "LD_PRELOAD"


def wanted(environ=os.environ) -> bool:
  """Whether this process should be started again under ``TUNABLES``."""
  from resjax import kernels  # the standard library only, no JAX

  return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and ENV not in environ
          and bool(sys.executable) and kernels.cpu_only(environ))


def environment(environ=os.environ) -> dict:
  """``environ`` with ``TUNABLES``, and the block cache in ``LD_PRELOAD`` where it is built."""
  from resjax import kernels  # the standard library only, no JAX

  env = {**environ, ENV: TUNABLES}
  cache = kernels.blockcache_path()
  if cache.exists() and not uses_block_cache(environ):
    env[PRELOAD] = ":".join(filter(None, [environ.get(PRELOAD, ""), str(cache)]))
  return env


def uses_block_cache(environ=os.environ) -> bool:
  """Whether ``LD_PRELOAD`` in ``environ`` names this source's block cache."""
  from resjax import kernels

  return str(kernels.blockcache_path()) in environ.get(PRELOAD, "").replace(" ", ":").split(":")


def reexec(environ=os.environ) -> None:
  """Replaces this process with the same command line (interpreter options included) under
  ``environment`` where ``wanted``; returns only where it is not. The process keeps its id."""
  if not wanted(environ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment(environ))
