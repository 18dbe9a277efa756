"""Optional native kernels: oneDNN's CPU convolution as XLA custom calls (``onednn_conv.cc``), scan
stacks without their zero fill and with custom calls' rows copied by calls of their own
(``uninitialized.cc``, ``stacks.py``), BatchNorm's per-channel sums
in one pass and its input gradient (``channel_sums.cc``, ``channel_sums.py``), and a large-block
cache for malloc (``blockcache.c``, see ``resjax.malloc``). ``one_pool_thread`` starts JAX's CPU
client so that all of these calls come from one thread, and run in one OpenMP team.

    pip install -e '.[onednn]'          # oneDNN's CPU build (OpenMP) and its headers, x86-64 Linux
    python -m resjax.kernels build      # compiles them against oneDNN and jaxlib's FFI
                                        # (--optional: exit 0 where the wheels are not installed)
    python -m resjax.kernels status     # where the library is, or why it is not there

XLA:CPU turns a convolution's backward pass inside ``lax.scan`` into a slow generic loop (README,
Speed), so resjax's CPU convolutions were matrix multiplies over shifted copies of the input
(``layers.conv_rows``). With this library built, ``conv_impl="auto"`` on CPU is ``"onednn"``: the
forward pass, data gradient and weight gradient are oneDNN's direct convolutions on the NHWC
arrays in place, called from inside the compiled program, scan or not. It is never used on GPU
or TPU (the targets are registered for CPU only, and ``"auto"`` picks XLA's convolution there).
Without the library, ``"auto"`` stays the matmul path.

The libraries land in ``$RESJAX_KERNELS_DIR`` (default ``~/.cache/resjax/kernels``) under names
that hash their sources, the compilers' flags and (for the custom calls) jaxlib's version and
oneDNN's, so a stale build is never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "onednn_conv.cc", HERE / "uninitialized.cc", HERE / "channel_sums.cc")  # one library
BLOCKCACHE = HERE / "blockcache.c"  # an LD_PRELOAD library of its own
ONEDNN = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")  # the runtime and its headers (PyPI)
TARGETS = {  # FFI target name -> symbol in the library
    "resjax_onednn_conv_fwd": "ResjaxOnednnConvFwd",
    "resjax_onednn_conv_bwd_weights": "ResjaxOnednnConvBwdWeights",
    "resjax_onednn_conv_bwd_weights_row": "ResjaxOnednnConvBwdWeightsRow",
    "resjax_onednn_conv_bwd_data": "ResjaxOnednnConvBwdData",
    "resjax_uninitialized": "ResjaxUninitialized",
    "resjax_materialize": "ResjaxMaterialize",
    "resjax_write_row": "ResjaxWriteRow",
    "resjax_channel_moments": "ResjaxChannelMoments",
    "resjax_channel_grad_moments": "ResjaxChannelGradMoments",
    "resjax_channel_grad_moments_row": "ResjaxChannelGradMomentsRow",
    "resjax_channel_grad_apply": "ResjaxChannelGradApply",
    "resjax_channel_grad_apply_row": "ResjaxChannelGradApplyRow",
}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
C_FLAGS = ("-O2", "-shared", "-fPIC", "-ldl", "-lpthread")
INSTALL_HINT = "pip install -e '.[onednn]' && python -m resjax.kernels build"


class NotBuilt(RuntimeError):
  """The oneDNN library is not built for this source, jaxlib and oneDNN."""


def kernels_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  return pathlib.Path(os.environ.get("RESJAX_KERNELS_DIR", default / "resjax" / "kernels"))


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def wheels_installed() -> bool:
  """Whether oneDNN's runtime and headers are installed (``pip install -e '.[onednn]'``)."""
  return all(_version(d) is not None for d in ONEDNN)


def library_path() -> pathlib.Path:
  """Where the library for these sources, jaxlib and installed oneDNN is (or would be) built."""
  tag = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES))
  tag.update(f"{FLAGS} jaxlib {_version('jaxlib')} onednn {_version(ONEDNN[0])}".encode())
  return kernels_dir() / f"onednn_conv-{tag.hexdigest()[:16]}.so"


def blockcache_path() -> pathlib.Path:
  """Where the block cache for this source is (or would be) built."""
  tag = hashlib.sha256(BLOCKCACHE.read_bytes() + f"{C_FLAGS}".encode())
  return kernels_dir() / f"blockcache-{tag.hexdigest()[:16]}.so"


def _installed_file(dist: str, name: str) -> pathlib.Path:
  """A file of an installed distribution whose path ends in ``name`` (the oneDNN wheels put
  theirs under the environment's prefix)."""
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise NotBuilt(f"{dist} is not installed: {INSTALL_HINT}") from None
  for f in files:
    path = pathlib.Path(f.locate()).resolve()
    if path.as_posix().endswith("/" + name):
      return path
  raise NotBuilt(f"{dist} has no {name}: reinstall it ({INSTALL_HINT})")


def _compile(out: pathlib.Path, compiler_env: str, compilers: tuple[str, ...], args: list[str],
             verbose: bool) -> None:
  compiler = os.environ.get(compiler_env) or next(filter(None, map(shutil.which, compilers)), None)
  if compiler is None:
    raise NotBuilt(f"no {compilers[0]} found: install it (or set {compiler_env}), then python -m "
                   f"resjax.kernels build")
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so.tmp", delete=False) as tmp:
    pass
  cmd = [compiler, *args, "-o", tmp.name]
  if verbose:
    print(" ".join(cmd), file=sys.stderr)
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp.name)
    raise NotBuilt(f"compiling {out.name} failed:\n{done.stderr.strip()}")
  os.replace(tmp.name, out)  # another process building the same library writes the same bytes


def build(verbose: bool = False) -> pathlib.Path:
  """Compiles the custom calls and the block cache where these sources, jaxlib and oneDNN have none
  yet; returns the custom calls' path."""
  cache = blockcache_path()
  if not cache.exists() and sys.platform == "linux":  # glibc's malloc underneath
    try:
      _compile(cache, "CC", ("gcc", "cc"), [str(BLOCKCACHE), *C_FLAGS], verbose)
    except NotBuilt as e:  # optional: malloc stays glibc's under the tunables
      print(f"the block cache is not built: {e}", file=sys.stderr)
  out = library_path()
  if out.exists():
    return out
  import jax  # its FFI headers

  header = _installed_file(ONEDNN[1], "include/oneapi/dnnl/dnnl.hpp")
  runtime = _installed_file(ONEDNN[0], "lib/libdnnl.so.3")
  _compile(out, "CXX", ("g++", "c++"),
           [*FLAGS, *map(str, SOURCES), "-I", jax.ffi.include_dir(), "-I", str(header.parents[2]),
            str(runtime), f"-Wl,-rpath,{runtime.parent}"], verbose)
  _load.cache_clear()
  return out


@functools.cache
def _load() -> ctypes.CDLL | NotBuilt:
  path = library_path()
  if not path.exists():
    return NotBuilt(f"the oneDNN convolution is not built for this jaxlib and oneDNN: "
                    f"{INSTALL_HINT}")
  import jax

  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:  # a truncated file, or a library it links that is gone
    return NotBuilt(f"the oneDNN convolution at {path} does not load ({e}): build it again with "
                    f"`python -m resjax.kernels build`")
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  try:  # jax internals it patches; without them, scans keep jax's zero-filled stacks
    from resjax.kernels import stacks
  except ImportError:
    return lib
  stacks.install()
  return lib


def cpu_only(environ=os.environ) -> bool:
  """Whether JAX here can only run on its CPU: JAX_PLATFORMS says so, or, where it is not set, no
  accelerator plugin is installed. Decided without importing JAX."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return not any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu"))


# XLA:CPU runs a program's thunks, custom calls included, on its intra-op pool, a thread per core.
# Each pool thread that calls oneDNN becomes the master of an OpenMP team of its own, and libgomp,
# counting more threads than cores, then has every worker sleep between parallel regions. With a
# pool of one thread all custom calls come from that thread: one team, whose worker waits between
# regions spinning, as under PyTorch (README, Speed, has the threads and the times). XLA sizes its
# pool by the cores the process may run on when its CPU client starts, and has no setting for it.
ONE_POOL_THREAD_ENV = "RESJAX_XLA_POOL"  # "cores": XLA's own pool of a thread per core


def one_pool_thread(environ=os.environ) -> bool:
  """Starts JAX's CPU client with a pool of one thread (see above) where this process will call
  the built oneDNN library from XLA:CPU: Linux, JAX on its CPU only and as one device, more than one
  core, before JAX's backends and OpenMP start, and ``RESJAX_XLA_POOL`` not ``cores``. The process
  runs on one core while the client starts; every thread then gets all its cores back. Returns
  whether it did."""
  if (environ.get(ONE_POOL_THREAD_ENV) == "cores" or not hasattr(os, "sched_getaffinity")
      or not cpu_only(environ) or not library_path().exists()
      or "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")):
    return False
  cores = os.sched_getaffinity(0)
  if len(cores) < 2 or _openmp_loaded():
    return False
  import jax
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized() or jax.config.jax_num_cpu_devices > 1:
    return False
  os.sched_setaffinity(0, {min(cores)})
  try:
    jax.devices("cpu")
  finally:
    for _ in range(2):  # and any thread started while the first pass ran
      for tid in os.listdir("/proc/self/task"):
        try:
          os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that has exited
          pass
  return True


def _openmp_loaded() -> bool:
  """Whether libgomp is loaded (it counts the cores it may use when it loads)."""
  try:
    with open("/proc/self/maps") as f:
      return "libgomp" in f.read()
  except OSError:
    return True


def available() -> bool:
  """Whether the oneDNN convolution is built here (loading and registering it if so)."""
  return not isinstance(_load(), NotBuilt)


def require() -> ctypes.CDLL:
  """The loaded library, or NotBuilt saying how to build it."""
  lib = _load()
  if isinstance(lib, NotBuilt):
    raise lib
  return lib


def onednn_version() -> str:
  v = require().resjax_onednn_version()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
