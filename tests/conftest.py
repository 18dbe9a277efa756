"""Shared by the tests: the CLI as a subprocess, one XLA cache per session, model RNGs, mocked
TFDS records, float32 tolerances."""

import contextlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# The suite compiles with LLVM's -O0 (in this process, before JAX starts its backend, and in every
# command line it starts): about a third of the compile time, which is most of the suite's time.
# XLA's HLO passes (fusion, layout, buffer assignment) are the same; no test asserts a speed.
O0 = "--xla_backend_optimization_level=0"
if O0 not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {O0}".strip()
FIG2 = REPO / "experiments" / "resnetv2_fig2.py"

# The suite runs on the matmul convolutions whether or not a developer built oneDNN's into the
# default directory: conv_impl="auto" looks in this directory, which nothing creates (and so do the
# command lines the tests start). tests/test_kernels.py builds its own and tests that path.
os.environ["RESJAX_KERNELS_DIR"] = str(REPO / "tests" / "no-kernels")


# The longest files on 2 cores (pytest --durations=0), longest first. pyproject runs the suite on
# pytest-xdist workers a file at a time; handing these out first lets the workers finish together.
# A stale list costs time, never correctness.
LONGEST_FIRST = ("test_multihost", "test_train", "test_cli", "test_experiments", "test_models",
                 "test_bench", "test_scale_out", "test_faults")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable otherwise


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory):
  """A persistent XLA cache: runs of the same config compile their step once per session."""
  return tmp_path_factory.mktemp("xla_cache")


class Cli:
  """`python -m resjax.main ...` from the repo root, sharing the session's XLA cache."""

  def __init__(self, cache_dir):
    self.env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  def argv(self, *args):
    return [sys.executable, "-m", "resjax.main", *map(str, args)]

  def run(self, *args, env=None, timeout=300):
    return subprocess.run(self.argv(*args), cwd=REPO, env={**self.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)

  def run_many(self, cases, timeout=600):
    """Each (args, env) of ``cases`` as its own command line, forked from one process that
    imported JAX once (tests/cli_forks.py); returns their CompletedProcess results in order."""
    cases = [{"args": [str(a) for a in args], "env": dict(env or {})} for args, env in cases]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_forks.py")], cwd=REPO,
                          env=self.env, input=json.dumps(cases), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [subprocess.CompletedProcess(self.argv(*c["args"]), r["returncode"], r["stdout"],
                                        r["stderr"])
            for c, r in zip(cases, json.loads(proc.stdout))]

  def popen(self, *args, stdout, stderr):
    return subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env, stdout=stdout,
                            stderr=stderr, text=True)

  @contextlib.contextmanager
  def background(self, root, *args):
    """Runs the CLI in the background with stdout/stderr in root/out, root/err; kills it on exit."""
    with open(root / "out", "w") as out, open(root / "err", "w") as err:
      proc = self.popen(*args, stdout=out, stderr=err)
      try:
        yield proc
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()


@pytest.fixture(scope="module")
def xla_cache(compile_cache_dir):
  """Points this process's XLA cache at the session's, and back afterwards."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def cli(compile_cache_dir):
  return Cli(compile_cache_dir)


def write_experiment(path, body):
  """Writes an experiment file whose get_config takes fig2 at scale=test as `c` and runs `body`."""
  head = textwrap.dedent(f"""\
      import importlib.util
      from resjax.configs import row

      _spec = importlib.util.spec_from_file_location('resnetv2_fig2', {str(FIG2)!r})
      _fig2 = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_fig2)


      def get_config(arg=None):
        c = _fig2.get_config('scale=test')
        c.claims = []  # fig2's claims name its rows; the body may replace them
      """)
  path.write_text(head + textwrap.indent(textwrap.dedent(body).strip(), "  ") + "\n  return c\n")
  return path


@pytest.fixture(scope="session")
def experiment_file():
  return write_experiment


# ------------------------------------------------------------------------ models and data

def make_rngs(seed=0):
  """The trainer's parameter and dropout streams for ``seed``."""
  # Imported here, as in randomize_resnet: JAX, Flax and orbax take seconds, and the launch,
  # claims and import-graph tests never build a model.
  from flax import nnx

  from resjax import train
  return nnx.Rngs(params=train.key(seed), dropout=train.key(seed + 1))


def randomize_resnet(model, seed=0):
  """Fills every weight and BN statistic of a ResNet with random values (no compile, unlike an
  init): kernels He-normal over fan-in, BN variances in [0.5, 1.5], scales near 1, others small."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name, n = jax.tree_util.keystr(path), rng.standard_normal(a.shape)
    if "'var'" in name:
      v = rng.uniform(0.5, 1.5, a.shape)
    elif "'scale'" in name:
      v = 1 + 0.1 * n
    elif "'kernel'" in name:  # k * k * in (convolutions) or in (Dense)
      v = n * np.sqrt(2 / np.prod(a.shape[-4 if a.ndim > 3 else 0:-1]))
    else:
      v = 0.1 * n
    return jnp.asarray(v, jnp.float32)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model)))
  return model


def _getitems(record_keys, generator, serialized=False):
  del serialized  # Never requested by resjax.
  return [generator[k] for k in record_keys]


def _encode_with_pillow(self, array):
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=self.encoding_format.upper())
  return buffer.getvalue()


@contextlib.contextmanager
def mocked_tfds(num_examples, *, pillow=False):
  """Random fake records behind the real ``tfds.data_source``; yields the ``tfds`` module.

  USE_CODE: features and label counts come from the real builders (the pip package ships no
  metadata files for USE_FILES). The mock binds its batched reader without ``self``, so
  ``__getitems__`` fails as shipped; ``_getitems`` stands in with the same fake records.
  ``pillow``: encode the fake images with Pillow, not TensorFlow (half a minute to import on a
  busy machine); the records read back are the same.
  """
  # Imported here: TFDS takes seconds, and only the tests of TFDS-backed datasets need it.
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.features import image_feature
  from tensorflow_datasets.testing import mocking
  with contextlib.ExitStack() as stack:
    stack.enter_context(tfds.testing.mock_data(num_examples=num_examples,
                                               policy=tfds.testing.MockPolicy.USE_CODE))
    stack.enter_context(mock.patch.object(mocking, "_getitems", _getitems))
    if pillow:
      stack.enter_context(mock.patch.object(image_feature._ImageEncoder, "_encode_image",
                                            _encode_with_pillow))
    yield tfds


# ------------------------------------------------------------------------ float32 tolerances
#
# Two float32 programs that compute the same mathematics in another order (XLA fusing another
# graph differently, AVX-512 vs AVX2 vs SSE vector widths in a reduction, Eigen splitting a
# contraction over another number of threads, a scan vs an unrolled loop, a vmap, a hand-written
# jnp or numpy reference) agree only to rounding, on any CPU:
#
# * one float32 rounding errs by at most u = eps / 2 of the value (eps = 2^-23 = 1.19e-7, the
#   spacing of float32 numbers in [1, 2));
# * a K-term sum (a dot, a convolution, a mean or variance, a softmax's denominator) makes K - 1
#   roundings of its partial sums: at worst (K - 1) u of the sum of the terms' magnitudes, but
#   roundings of either sign are practically independent, so it errs by about sqrt(K) u (Higham,
#   Accuracy and Stability of Numerical Algorithms, 2nd ed., sections 3.1 and 4.2). Two programs
#   each that close to the exact sum differ by at most 2 sqrt(K) u = sqrt(K) eps; ULPS = 2 times
#   that covers the tail of that spread over the many elements a test compares, and the few-ulp
#   differences of exp, tanh, log and rsqrt between vectorised and scalar code;
# * `depth` chained layers add up to `depth` times one layer's error. A layer is a weight layer (a
#   dense layer, a convolution, an attention matmul) with the normalisation, activation and
#   residual addition that ride with it, each passing its input's relative error on with a gain
#   of about 1; `terms` is the longest sum among them (a matmul's inner size, a convolution's
#   kh * kw * c_in, a BatchNorm's N * H * W). A training step's backward pass doubles `depth`.
#
# The error is relative to the magnitude of the terms summed, not to each result: a logit that is
# a near-cancelling sum of O(1) terms errs by 1e-7 absolute, which can be 1e-5 of itself. So the
# comparison is |actual - desired| <= f32_tol(...) * scale, scale = max |desired| unless a test
# knows its terms' magnitude better. Where a computation amplifies errors (a cancelling variance,
# cos of a large argument) a test multiplies in that gain and says why. Anything wrong (a unit
# skipped, BN and ReLU in another order, a batch split the wrong way) moves results by 1e-2 of
# their scale or more, far above these tolerances.

F32_EPS = 2.0 ** -23
ULPS = 2


def f32_tol(terms=1, depth=1, ulps=ULPS):
  """Relative tolerance between float32 programs: `depth` chained layers of `terms`-term sums."""
  return ulps * F32_EPS * math.sqrt(terms) * depth


def assert_f32_close(actual, desired, *, terms=1, depth=1, gain=1.0, scale=None, err_msg=""):
  """|actual - desired| <= gain * f32_tol(terms, depth) * scale, scale = max |desired| by default"""
  desired = np.asarray(desired)
  if scale is None:
    scale = float(np.max(np.abs(desired), initial=0.0))
  np.testing.assert_allclose(actual, desired, rtol=0,
                             atol=gain * f32_tol(terms, depth) * scale, err_msg=err_msg)


def abstract_transformer(cfg):
  """The Transformer of ``cfg`` as shapes only (nnx.eval_shape): nothing is drawn or compiled."""
  from flax import nnx

  from resjax.models import transformer
  return nnx.eval_shape(lambda: transformer.from_config(cfg, num_classes=0, in_channels=0,
                                                        rngs=make_rngs()))


def initialised_transformer(cfg):
  """The Transformer of ``cfg``, initialised eagerly: XLA compiles each normal sampler of a jitted
  init separately (about 0.1 s each on CPU), while eager calls reuse one per shape."""
  from resjax.models import transformer
  return transformer.from_config(cfg, num_classes=0, in_channels=0, rngs=make_rngs())
