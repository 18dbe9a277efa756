"""resjax.malloc: `python -m resjax.main` starts again under glibc settings that keep freed buffers."""

import json
import os
import platform
import subprocess
import sys

import pytest

from resjax import main, malloc

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# Allocates, fills and frees a 48 MiB block four times, printing the page faults of each round and
# what GLIBC_TUNABLES the process ended up with. glibc maps a block that size afresh each time
# (over its 32 MiB cap on the mmap threshold), so each round faults it in again; under TUNABLES it
# stays in the heap, and only the first round faults.
PROBE = """
import ctypes, json, os, resource
from resjax import malloc
malloc.reexec()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(48 << 20)
  ctypes.memset(p, 1, 48 << 20)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
"""


def _probe(env_extra):
  env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
  out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's tunables")
def test_the_process_starts_again_under_tunables_and_keeps_a_freed_block():
  got = _probe({"JAX_PLATFORMS": "cpu"})
  assert got["tunables"] == malloc.TUNABLES
  assert got["faults"][0] > 0 and got["faults"][1:] == [0, 0, 0], got["faults"]


@pytest.mark.skipif(not GLIBC, reason="glibc's tunables")
def test_without_them_a_freed_block_is_faulted_in_again():
  # GLIBC_TUNABLES set (to nothing) is the user's choice: left alone, no restart.
  got = _probe({"JAX_PLATFORMS": "cpu", malloc.ENV: ""})
  assert got["tunables"] == ""
  assert all(f > 0 for f in got["faults"]), got["faults"]


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_PLATFORMS": "cpu"}, GLIBC),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"JAX_PLATFORMS": "cpu,tpu"}, False),
    ({"JAX_PLATFORMS": "cpu", malloc.ENV: "glibc.malloc.arena_max=2"}, False),
])
def test_wanted_only_on_a_cpu_only_glibc_machine_without_the_users_own(environ, expected):
  assert malloc.wanted(environ) is expected


@pytest.mark.parametrize("argv, asked", [
    (["m"], False),
    (["m", "--default_malloc"], True),
    (["m", "-default_malloc"], True),
    (["m", "--default_malloc=false"], False),
    (["m", "--default_malloc=true"], True),
    (["m", "--default_malloc", "--nodefault_malloc"], False),
    (["m", "--config", "x.py", "--", "--default_malloc"], False),
    (["m", "--config.default_malloc=1"], False),
])
def test_default_malloc_is_read_before_absl_parses_the_flags(argv, asked):
  assert main.default_malloc_asked(argv) is asked


@pytest.mark.parametrize("extra", [[], ["--default_malloc"]])
def test_the_restarted_command_keeps_its_arguments_and_exit_status(extra):
  env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
  out = subprocess.run([sys.executable, "-m", "resjax.main", "--config", "no/such/file.py", *extra],
                       env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "no/such/file.py" in out.stderr, out.stderr
