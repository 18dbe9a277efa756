"""oneDNN's CPU convolution (resjax.kernels): built here from the project's own files, then checked
against XLA's convolution, forward and both gradients, inside lax.scan and vmap, and in a ResNet
training step against the matmul path."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, assert_f32_close, f32_tol
from resjax import kernels, models, provenance, train
from resjax.bench import profile
from resjax.errors import ConfigError
from resjax.kernels import conv as onednn
from resjax.kernels import stacks
from resjax.models import layers


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The library, compiled into a directory of this module's own; the rest of the suite runs on
  the matmul path (conftest points RESJAX_KERNELS_DIR at an empty directory), so it is unloaded
  again afterwards."""
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU kernel")
  if not kernels.wheels_installed():
    pytest.skip(f"oneDNN's wheels are not installed ({kernels.INSTALL_HINT}; x86-64 Linux only)")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("RESJAX_KERNELS_DIR", str(tmp_path_factory.mktemp("kernels")))
    kernels._load.cache_clear()
    path = kernels.build()
    kernels.require()
    yield path
  kernels._load.cache_clear()
  stacks.uninstall()  # loading installed it; the rest of this worker's files get jax's stacks


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _xla(stride):
  return lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((w.shape[0] // 2,) * 2,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Every geometry a resjax ResNet uses (3x3 stride 1 and 2, 1x1 stride 1 and 2, the ImageNet
# stem's 7x7 stride 2), odd and even sizes, channel counts off oneDNN's vector widths.
CASES = [(3, 1, (2, 8, 8, 4), 5), (3, 1, (3, 5, 7, 2), 3), (3, 2, (2, 8, 8, 16), 32),
         (3, 2, (2, 7, 9, 3), 6), (1, 1, (2, 6, 6, 8), 24), (1, 2, (2, 8, 8, 16), 32),
         (7, 2, (2, 16, 16, 3), 8), (5, 1, (2, 9, 6, 3), 4)]


@pytest.mark.parametrize("k, stride, shape, out", CASES)
def test_forward_and_gradients_are_xla_convolutions(built, k, stride, shape, out):
  x, w = _normal(shape), _normal((k, k, shape[-1], out), seed=1)
  forward = k * k * shape[-1]  # terms of each output's sum
  y = _xla(stride)(x, w)
  ours = onednn.conv(x, w, stride)
  assert ours.shape == y.shape
  assert_f32_close(ours, y, terms=forward)
  # The cotangent cos(y) moves by up to f32_tol(forward) max|y| (a gain of max|y| on values of
  # size 1); then one backward sum: over every output position (for w) or the kernel taps (for x).
  n, h, wd, _ = shape
  backward = max(n * h * wd, k * k * out)
  tol = f32_tol(forward) * float(jnp.abs(y).max()) + f32_tol(backward)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
  for a, b, name in zip(grad(lambda x, w: onednn.conv(x, w, stride)), grad(_xla(stride)), "xw"):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(jnp.abs(b).max()), err_msg=name)


def test_inside_scan_and_vmap(built):
  """Nine residual units of a 3x3 convolution under lax.scan, over two seed replicas under vmap
  (each replica its own kernels): the loss's gradient is XLA's unrolled one."""
  units, c = 9, 8
  x = _normal((2, 4, 8, 8, c))
  ws = 0.2 * _normal((2, units, 3, 3, c, c), seed=1)

  def loss(conv, x, ws):
    h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(conv(h, w)), None), x, ws)
    return jnp.sum(h ** 2)

  grad = lambda conv: jax.jit(jax.vmap(jax.grad(lambda x, w: loss(conv, x, w), argnums=(0, 1))))
  ours = grad(lambda h, w: onednn.conv(h, w, 1))(x, ws)
  ref = grad(_xla(1))(x, ws)
  # Nine chained units, each a 72-term sum; the gradient runs back through all nine.
  for a, b in zip(ours, ref):
    assert_f32_close(a, b, terms=9 * c * 9, depth=2 * units, gain=4)


def _resnet20_step(impl: str = "onednn"):
  """The jitted loss-and-gradient of a scanned ResNet-20 with ``impl`` convolutions on a batch of 8
  8x8 images (16-channel maps of 8192 floats), and its parameters."""
  cfg = ml_collections.ConfigDict({"name": "cifar_resnet", "depth": 20, "unit": "basic",
                                   "placement": "post", "scan": True, "conv_impl": impl,
                                   "shortcut": {"name": "identity", "option": "A"}})
  model = nnx.jit(lambda: models.build(cfg, num_classes=10, in_channels=3,
                                       rngs=nnx.Rngs(params=train.key(0))))()
  x, labels = _normal((8, 8, 8, 3), seed=2), jnp.arange(8) % 10
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest):
    logits = nnx.merge(graphdef, params, rest, copy=True)(x, train=True)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, labels[:, None], -1)[:, 0])

  return jax.jit(jax.value_and_grad(loss_fn)), params, rest


def _assert_resnet20_close(results_a, results_b):
  (l1, g1), (l2, g2) = results_a, results_b
  # 19 convolutions of up to 3*3*64 terms between the input and the loss, each through BatchNorm.
  assert_f32_close(l1, l2, terms=576, depth=19, gain=10)
  for a, b in zip(g1, g2):
    assert_f32_close(a, b, terms=576, depth=2 * 19, gain=100, scale=float(jnp.abs(b).max()))


def test_resnet_training_step_matches_the_matmul_path(built):
  """One SGD step of a scanned ResNet-20 (CIFAR shapes at 8x8): loss and updated parameters equal
  those of the matmul convolutions to float32 rounding, and the step's program calls oneDNN."""
  results = {}
  for impl in ("onednn", "im2col"):
    step, params, rest = _resnet20_step(impl)
    if impl == "onednn":
      hlo = step.lower(params, rest).compile().as_text()
      calls = {d: hlo.count(f'custom_call_target="resjax_onednn_conv_bwd_{d}"')
               for d in ("weights", "weights_row", "data")}
      # Every convolution's weight gradient (inside the stages' scans, on the saved input read in
      # place); every data gradient but the first layer's, whose input is the images and whose
      # data gradient XLA removes as dead code.
      weights = calls["weights"] + calls["weights_row"]
      assert calls["weights_row"] > 1 and calls["data"] == weights - 1
    loss, grads = step(params, rest)
    results[impl] = (loss, jax.tree.leaves(grads))
  _assert_resnet20_close(results["onednn"], results["im2col"])


def test_auto_is_onednn_once_built_and_float32_only(built):
  assert layers.resolve_conv_impl("auto") == "onednn"
  conv = layers.Conv2D(4, 6, 3, 1, impl="onednn", rngs=nnx.Rngs(params=0))
  y = conv(_normal((2, 8, 8, 4)).astype(jnp.bfloat16).astype(jnp.float32))
  assert y.dtype == jnp.float32
  conv.dtype = jnp.bfloat16  # bf16 compute takes the matmul path, same function
  yb = conv(_normal((2, 8, 8, 4)))
  assert yb.dtype == jnp.bfloat16
  # bf16 keeps 8 bits: the kernel's rounding in each of 36 terms, and the output's.
  bf16_tol = 2.0 ** -8 * (np.sqrt(36) + 1) * float(jnp.abs(y).max())
  np.testing.assert_allclose(yb.astype(jnp.float32), y, rtol=0, atol=bf16_tol)
  with pytest.raises(TypeError, match="float32 only"):
    onednn.conv(_normal((2, 8, 8, 4)).astype(jnp.bfloat16), conv.kernel[...], 1)


def test_not_built_is_one_line_naming_the_build(tmp_path, monkeypatch):
  monkeypatch.setenv("RESJAX_KERNELS_DIR", str(tmp_path))
  kernels._load.cache_clear()
  try:
    assert not kernels.available()
    assert layers.resolve_conv_impl("auto") == ("im2col" if jax.default_backend() == "cpu"
                                                else "xla")
    with pytest.raises(ConfigError, match=r"python -m resjax.kernels build.*conv_impl to auto"):
      layers.resolve_conv_impl("onednn")
    env = {**os.environ, "RESJAX_KERNELS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "resjax.kernels", "status"], capture_output=True,
                         text=True, env=env, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "python -m resjax.kernels build" in out.stderr
    assert not list(tmp_path.iterdir())  # status builds nothing
  finally:
    kernels._load.cache_clear()


def test_a_library_that_does_not_load_is_one_line_naming_the_build(tmp_path, monkeypatch):
  """A file where the library should be that the loader refuses (truncated, or linking a library
  that is gone): not a traceback but NotBuilt, auto falls back, and status says to rebuild."""
  monkeypatch.setenv("RESJAX_KERNELS_DIR", str(tmp_path))
  kernels._load.cache_clear()
  try:
    kernels.library_path().write_bytes(b"\x7fELF truncated")
    assert not kernels.available()
    assert layers.resolve_conv_impl("auto") != "onednn"
    env = {**os.environ, "RESJAX_KERNELS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "resjax.kernels", "status"], capture_output=True,
                         text=True, env=env, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "does not load" in out.stderr
    assert "python -m resjax.kernels build" in out.stderr
  finally:
    kernels._load.cache_clear()


def test_library_name_follows_source_and_versions(tmp_path, monkeypatch):
  monkeypatch.setenv("RESJAX_KERNELS_DIR", str(tmp_path))
  a = kernels.library_path()
  assert a.parent == tmp_path and a.name.startswith("onednn_conv-")
  monkeypatch.setattr(kernels, "_version", lambda dist: "0.0.0")
  assert kernels.library_path() != a  # another jaxlib or oneDNN: another file, never a stale one


def test_main_trains_with_it_and_reuses_the_compiled_step(built, cli, tmp_path):
  """python -m resjax.main with conv_impl=onednn: the targets are registered before the step
  compiles, and a second process that loads the step from the XLA cache gets the same numbers."""
  env = {"RESJAX_KERNELS_DIR": str(built.parent)}
  fig2 = REPO / "experiments" / "resnetv2_fig2.py"
  args = ["--config", f"{fig2}:scale=test,run=identity,seeds=1", "--config.schedule.total=3",
          "--config.model.conv_impl=onednn"]
  summaries = []
  for name in ("first", "second"):
    out = cli.run(*args, "--workdir", tmp_path / name, env=env)
    assert out.returncode == 0, out.stderr
    summaries.append(json.loads(next((tmp_path / name).glob("identity/**/summary.json"))
                                .read_text()))
  assert summaries[0]["final"] == summaries[1]["final"]


def test_provenance_names_the_onednn_that_auto_uses(built):
  versions = provenance.gather.__wrapped__()["versions"]
  assert versions["onednn"] == kernels.onednn_version()
  assert int(versions["onednn"].split(".")[0]) >= 3  # the v3 API the kernel is written against


def test_optional_build_is_a_no_op_without_the_wheels(tmp_path, monkeypatch):
  """The README's quickstart builds with --optional, which must not stop a machine without the
  wheels (not x86-64 Linux): exit 0, one line, nothing written."""
  monkeypatch.setenv("RESJAX_KERNELS_DIR", str(tmp_path))
  monkeypatch.setattr(kernels, "wheels_installed", lambda: False)
  from resjax.kernels import __main__ as cli
  assert cli.main(["build", "--optional"]) == 0
  assert not list(tmp_path.iterdir())


# ------------------------------------------------------------- scan stacks and the block cache


# BatchNorm's per-channel sums (kernels.channel_sums): channel counts that divide 64, read 64 floats a
# row (the first on two threads where there are two), and counts that do not; ranks 4 and 2.
SUM_SHAPES = [(64, 16, 16, 16), (4, 8, 8, 64), (3, 5, 7, 24), (2, 9, 9, 5), (300, 3)]


def _channel_data(shape, seed=0, means=None):
  """float32 data whose channels have different means (default 1, 2, ...), so that sums mixing
  channels, rows or replicas are off by far more than rounding; and a cotangent."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) + (np.arange(1, shape[-1] + 1) if means is None else means)
  return x.astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", SUM_SHAPES)
def test_channel_sums_are_the_sums_they_replace(built, shape):
  from resjax.kernels import channel_sums
  x, g = _channel_data(shape)
  axes, n = tuple(range(len(shape) - 1)), x.size // shape[-1]
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  mean = x64.mean(axes).astype(np.float32)
  xc = (x - mean).astype(np.float64)  # x - mean rounded to float32, as the kernel forms it
  exact = [x64.sum(axes), (x64 * x64).sum(axes), g64.sum(axes), (g64 * xc).sum(axes)]
  scale = [np.abs(x64).sum(axes), (x64 * x64).sum(axes), np.abs(g64).sum(axes),
           np.abs(g64 * xc).sum(axes)]
  got = [*jax.jit(channel_sums.moments)(x), *jax.jit(channel_sums.grad_moments)(g, x, mean)]
  for name, a, want, s in zip(("x", "x*x", "g", "g*xc"), got, exact, scale):
    assert a.shape == (shape[-1],) and a.dtype == jnp.float32
    err = np.abs(np.asarray(a, np.float64) - want)
    assert (err <= f32_tol(n) * s).all(), (name, err.max(), (f32_tol(n) * s).min())
  lowered = jax.jit(channel_sums.moments).lower(x).as_text()
  assert "@resjax_channel_moments" in lowered


def test_channel_sums_under_vmap_are_each_replicas(built):
  from resjax.kernels import channel_sums
  x, g = _channel_data((3, 4, 6, 6, 16))
  g = g[0]  # one cotangent for every replica: a shared operand
  batched = jax.jit(jax.vmap(channel_sums.moments))(x)
  mean = x.mean((1, 2, 3))  # (replicas, channels)
  shared = jax.jit(jax.vmap(channel_sums.grad_moments, in_axes=(None, 0, 0)))(g, x, mean)
  for r in range(3):  # the same call on the same rows: the same bits
    for a, b in zip(batched, jax.jit(channel_sums.moments)(x[r])):
      np.testing.assert_array_equal(a[r], b)
    for a, b in zip(shared, jax.jit(channel_sums.grad_moments)(g, x[r], mean[r])):
      np.testing.assert_array_equal(a[r], b)


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (8192, 64), (3, 7, 5)])
def test_grad_apply_is_its_expression_per_channel(built, shape):
  """BatchNorm's input gradient from the kernel against the same expression in float64: each
  element within rounding of its terms' magnitudes; channels, threads' parts (8192 rows of 64 are
  split) and the wide and general loops all reach the right coefficients."""
  from resjax.kernels import channel_sums
  x, g = _channel_data(shape, seed=7)
  c = shape[-1]
  rng = np.random.default_rng(8)
  coef = rng.standard_normal((7, c)).astype(np.float32)
  coef[0] = x.reshape(-1, c).mean(0)  # the mean, so that xc is centred as in BatchNorm
  got = np.asarray(jax.jit(channel_sums.grad_apply)(g, x, coef), np.float64)
  mean, a, d, p, q, gm, h = coef.astype(np.float64)
  xc = x.astype(np.float64) - mean
  want = (a * (g - d - (xc * p) * q) + gm) + h * xc
  magnitude = np.abs(a) * (np.abs(g) + np.abs(d) + np.abs(xc * p * q)) + np.abs(gm) + np.abs(h * xc)
  err = np.abs(got - want)
  assert (err <= f32_tol(6) * magnitude).all(), (err.max(), float(magnitude.max()))
  assert "@resjax_channel_grad_apply" in jax.jit(channel_sums.grad_apply).lower(g, x, coef).as_text()


def test_grad_apply_under_vmap_and_from_a_stack_row_is_the_same_call(built):
  from resjax.kernels import channel_sums
  xs, g = _channel_data((3, 4, 6, 6, 16), seed=9)
  coef = np.random.default_rng(10).standard_normal((3, 7, 16)).astype(np.float32)
  one = jax.jit(channel_sums.grad_apply)
  batched = jax.jit(jax.vmap(channel_sums.grad_apply, in_axes=(None, 0, 0)))(g[0], xs, coef)
  (call,) = jax.make_jaxpr(channel_sums.grad_apply)(g[0], xs[0], coef[0]).eqns
  row = jax.jit(lambda xs, i, g, coef: stacks.row_call_p.bind(
      xs, i, g, coef, **stacks.row_call_params(call))[0])
  assert "resjax_channel_grad_apply_row" in row.lower(xs, jnp.int32(0), g[0], coef[0]).as_text()
  for r in range(3):  # the same arithmetic on the same values: the same bits
    np.testing.assert_array_equal(batched[r], one(g[0], xs[r], coef[r]))
    np.testing.assert_array_equal(row(xs, jnp.int32(r), g[0], coef[r]), one(g[0], xs[r], coef[r]))


def test_batchnorm_with_channel_sums_is_batchnorm(built, monkeypatch):
  # Means within the spread: var = E[x^2] - mean^2 keeps its digits in float32 (both ways).
  x, g = _channel_data((16, 6, 6, 32), seed=1, means=np.linspace(-1.0, 1.0, 32))
  scale = jnp.linspace(0.5, 1.5, 32, dtype=jnp.float32)
  bias = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32)

  def run():
    def loss(x, scale, bias):
      y, mean, var = layers.batch_norm_train(x, scale, bias, jnp.float32(1e-5))
      return jnp.vdot(jnp.asarray(g), y) + jnp.sum(mean) + jnp.sum(var), (y, mean, var)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)

  (_, ours), ours_grads = run()
  monkeypatch.setattr(layers, "channel_sums", None)  # XLA's reductions, as without the kernels
  (_, ref), ref_grads = run()
  n = x.size // 32
  for name, a, b in zip(("y", "mean", "var", "dx", "dscale", "dbias"), (*ours, *ours_grads),
                        (*ref, *ref_grads)):
    assert_f32_close(a, b, terms=n, depth=2, err_msg=name)  # sums, then sums of their products


def _doubling_scan(x):
  """Five steps of c = 2c + i, stacking c and c - 1: small integers, exact in float32."""
  def body(c, i):
    c = 2.0 * c + i
    return c, (c, c - 1.0)
  return jax.lax.scan(body, x, jnp.arange(5.0))[1]


def test_scan_stacks_start_uninitialized_and_every_row_is_written(built):
  """Once loaded, a CPU scan's stacks (forward outputs and the residuals of its gradient) start
  from the custom call, not a zero fill; every row still holds the loop's value, exactly."""
  x = jnp.arange(1.0, 4.0)
  loss = lambda x: sum(jnp.sum(y ** 2) for y in _doubling_scan(x))
  assert jax.jit(_doubling_scan).lower(x).as_text().count(stacks.TARGET) == 2
  assert jax.jit(jax.grad(loss)).lower(x).as_text().count(stacks.TARGET) >= 2
  c, rows = np.arange(1.0, 4.0), []
  for i in range(5):
    c = 2 * c + i
    rows.append(c)
  rows = np.stack(rows)
  ys = jax.jit(_doubling_scan)(x)
  np.testing.assert_array_equal(ys[0], rows)
  np.testing.assert_array_equal(ys[1], rows - 1)
  # d c_t / d x = 2^(t + 1): the gradient is a sum of integers, exact in float32
  slopes = 2.0 ** np.arange(1, 6)[:, None]
  expected = np.sum(2 * (rows + rows - 1) * slopes, axis=0)
  np.testing.assert_array_equal(jax.jit(jax.grad(loss))(x), expected)


def test_a_kept_relu_output_is_computed_once_and_its_stack_write_is_a_copy(built):
  """A scanned unit whose ReLU output is both the next convolution's input and a saved residual:
  behind resjax_materialize the gradient's compiled program writes the stack with a plain copy,
  no arithmetic fused into it (XLA otherwise recomputes the value there, on one thread), and the
  gradient is the same as jax.nn.relu's to float32 rounding."""
  x = _normal((2, 8, 8, 4))
  ws = 0.3 * _normal((3, 3, 3, 4, 4), seed=1)

  def loss(relu, x, ws):
    step = lambda h, w: (h + onednn.conv(relu(2.0 * h + 1.0), w, 1), None)
    with layers.scanning():  # as layers.run_units traces its scan
      return jnp.sum(jax.lax.scan(step, x, ws)[0] ** 2)

  grad = lambda relu: jax.jit(jax.grad(lambda x, w: loss(relu, x, w), argnums=(0, 1)))
  hlo = grad(layers.relu).lower(x, ws).compile().as_text()
  assert "resjax_materialize" in hlo
  bodies = profile.fusion_bodies(hlo)
  writes = [name for name, (kind, _) in profile.instruction_kinds(hlo).items()
            if kind == "dynamic update slice" and name in bodies]
  assert writes
  for name in writes:
    assert not any(f" {op}(" in bodies[name] for op in ("multiply", "add", "maximum")), bodies[name]
  for a, b in zip(grad(layers.relu)(x, ws), grad(jax.nn.relu)(x, ws)):
    assert_f32_close(a, b, terms=9 * 4 * 3, depth=6, gain=4)
  # Outside a scan only row results are materialized (a map of at most 64 channels); one of 128
  # channels is left to fuse.
  outside = lambda x: jax.jit(jax.grad(lambda x: jnp.sum(layers.relu(2.0 * x + 1.0) ** 2))).lower(
      x).as_text()
  assert re.search(r"@resjax_materialize\(.*: \(tensor<8x64xf32>\)", outside(x))
  assert "resjax_materialize" not in outside(_normal((2, 2, 2, 128)))


@pytest.mark.parametrize("i", [-3, 0, 2, 9])
def test_row_calls_address_the_row_with_the_index_clamped(built, i):
  """resjax_write_row on a stack of 2 MiB rows is the stack with row i replaced, exactly as XLA's
  dynamic update slice computes it; the weight gradient of row i of a stack of inputs is the one of
  that row sliced out. i is clamped into the stack, as XLA's dynamic slices clamp it."""
  stack = _normal((4, 512, 1024))
  row = _normal((512, 1024), seed=1)
  index = jnp.int32(i)
  write = jax.jit(stacks.write_row_p.bind)
  assert "resjax_write_row" in write.lower(stack, row, index).as_text()
  at = min(max(i, 0), 3)
  np.testing.assert_array_equal(write(stack, row, index), stack.at[at].set(row))
  # A row of no whole number of pages, split between the OpenMP team in parts of whole pages.
  odd_stack, odd_row = _normal((3, 517, 1031), seed=5), _normal((517, 1031), seed=6)
  np.testing.assert_array_equal(write(odd_stack, odd_row, index),
                                odd_stack.at[min(max(i, 0), 2)].set(odd_row))

  xs, g, w = _normal((4, 8, 6, 6, 3), seed=2), _normal((8, 6, 6, 5), seed=3), jnp.zeros((3, 3, 3, 5))
  weight_grad = lambda x, g: jax.vjp(lambda w: onednn.conv(x, w, 1), w)[1](g)[0]
  (call,) = [e for e in jax.make_jaxpr(weight_grad)(xs[0], g).eqns
             if e.params.get("target_name") == "resjax_onednn_conv_bwd_weights"]
  in_place = jax.jit(lambda xs, i, g: stacks.row_call_p.bind(xs, i, g,
                                                              **stacks.row_call_params(call))[0])
  assert "resjax_onednn_conv_bwd_weights_row" in in_place.lower(xs, index, g).as_text()
  # The same oneDNN primitive on the same values, but from another address: each weight's sum of
  # 8*6*6 products may be blocked differently, so the bound scales with the sums of |products|.
  magnitude = float(jnp.max(jax.jit(weight_grad)(jnp.abs(xs[at]), jnp.abs(g))))
  assert_f32_close(in_place(xs, index, g), jax.jit(weight_grad)(xs[at], g), terms=8 * 6 * 6,
                   scale=magnitude)

  from resjax.kernels import channel_sums  # BatchNorm's backward sums of row i, read in place
  maps, cot = _channel_data((4, 8, 6, 6, 16), seed=4)
  mean = maps[at].mean((0, 1, 2))
  (call,) = jax.make_jaxpr(channel_sums.grad_moments)(cot[0], maps[0], mean).eqns
  sums = jax.jit(lambda maps, i, g, mean: stacks.row_call_p.bind(
      maps, i, g, mean, **stacks.row_call_params(call)))
  assert "resjax_channel_grad_moments_row" in sums.lower(maps, index, cot[0], mean).as_text()
  for a, b in zip(sums(maps, index, cot[0], mean),
                  jax.jit(channel_sums.grad_moments)(cot[0], maps[at], mean)):
    np.testing.assert_array_equal(a, b)  # the kernel's order of addition ignores the address


def test_a_scans_custom_call_rows_are_copied_by_the_row_calls(built):
  """Scanned convolutions on 4 MiB maps, one of them of a stacked input z. The gradient's forward
  scan writes the rows a custom call made or took (h, kept for its weight gradient) with
  resjax_write_row. The backward scan's weight gradients read their inputs in place, from the
  stacks of h and of z (the _row variant, no row copy). The gradient is the one jax's own row
  writes and reads give: the calls copy or address the same bytes, so only XLA's fusion of the
  rest of the two programs may round differently."""
  x = _normal((64, 32, 32, 16))
  ws = 0.1 * _normal((3, 3, 3, 16, 16), seed=1)
  zs = _normal((3, 64, 32, 32, 16), seed=3)

  def loss(x, ws, zs):
    step = lambda h, wz: (jax.nn.relu(onednn.conv(h, wz[0], 1)) + onednn.conv(wz[1], wz[0], 1) + h,
                          None)
    return jnp.sum(jax.lax.scan(step, x, (ws, zs))[0] ** 2)

  grad = lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  hlo = grad().lower(x, ws, zs).as_text()
  assert hlo.count("@resjax_write_row") >= 1
  assert hlo.count("@resjax_onednn_conv_bwd_weights_row") == 2
  assert "@resjax_onednn_conv_bwd_weights(" not in hlo
  ours = grad()(x, ws, zs)
  stacks.uninstall()
  try:
    theirs_hlo = grad().lower(x, ws, zs).as_text()
    theirs = grad()(x, ws, zs)
  finally:
    assert stacks.install()
  assert not re.search(r"resjax_(write_row|onednn_conv_bwd_weights_row)", theirs_hlo)
  for a, b in zip(ours, theirs):  # 3 units of 3*3*16-term convolutions, through ReLU and the adds
    assert_f32_close(a, b, terms=144, depth=2 * 3, gain=4, scale=float(jnp.abs(b).max()))


def test_batchnorm_and_relu_passes_over_rows_are_the_same_math(built, monkeypatch):
  """On CPU BatchNorm's and ReLU's passes over 16- and 32-channel maps run as rows of 64
  floats (layers.ROW_FLOATS), each result behind resjax_materialize in that shape; the loss and
  every gradient are those of the same passes over NHWC maps to float32 rounding (the backward
  pass's per-channel sums are added in another order)."""
  row_results = lambda text: [  # materialized maps of 128 rows or more (a replica axis first)
      line for line in text.splitlines() if "@resjax_materialize" in line
      and re.search(r"tensor<(1x)?\d{3,}x64xf32>$", line.split("->")[-1].strip())]
  results, texts = [], []
  for rows in (True, False):
    if not rows:
      monkeypatch.setattr(layers, "_row_reps", lambda x: 0)
    step, params, rest = _resnet20_step()
    texts.append(step.lower(params, rest).as_text())
    loss, grads = step(params, rest)
    results.append((loss, jax.tree.leaves(grads)))
  assert len(row_results(texts[0])) >= 4, "no BatchNorm/ReLU result is materialized as rows of 64"
  assert not row_results(texts[1])
  _assert_resnet20_close(*results)


def test_programs_over_several_devices_keep_jaxs_stacks_and_no_custom_calls(built):
  code = f"""
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from resjax import kernels
kernels.require()
f = lambda x: jax.lax.scan(lambda c, _: (c + 1.0, c), x, None, length=3)[1]
x = jnp.zeros((4, 2))
mesh = jax.make_mesh((2,), ("d",))
one = jax.jit(f).lower(x).as_text().count("{stacks.TARGET}")
two = jax.jit(f, in_shardings=NamedSharding(mesh, P("d"))).lower(x).as_text().count("{stacks.TARGET}")
from resjax.kernels import stacks
g = lambda x: stacks.materialize(x + 1.0)
one_m = jax.jit(g).lower(x).as_text().count("@resjax_materialize")
two_m = jax.jit(g, in_shardings=NamedSharding(mesh, P("d"))).lower(x).as_text().count("@resjax_materialize")
from resjax.models import layers
h = lambda x: layers.batch_norm_train(x, jnp.ones(2), jnp.zeros(2), jnp.float32(1e-5))[0]
one_b = jax.jit(h).lower(x).as_text().count("@resjax_channel_moments")
two_b = jax.jit(h, in_shardings=NamedSharding(mesh, P("d"))).lower(x).as_text().count("@resjax_channel_moments")
from resjax.kernels import conv as onednn
big = jnp.zeros((4, 64, 32, 32, 16))
k = lambda x, ws: jnp.sum(jax.lax.scan(lambda h, w: (onednn.conv(h, w, 1), None), x, ws)[0])
gk = jax.grad(k)
ws = jnp.zeros((3, 3, 3, 16, 16))
rows = lambda t: t.count("@resjax_write_row") + t.count("@resjax_onednn_conv_bwd_weights_row")
one_r = rows(jax.jit(gk).lower(big[0], ws).as_text())
two_r = rows(jax.jit(jax.vmap(gk, (0, None)), in_shardings=(NamedSharding(mesh, P("d")), None)).lower(big, ws).as_text())
print(one, two, one_m, two_m, one_b, two_b, int(one_r > 0), two_r)
"""
  env = {**os.environ, "RESJAX_KERNELS_DIR": str(built.parent), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  # stacks, resjax_materialize, BatchNorm's one-pass sums, the scan's row calls: one device,
  # then two
  assert out.stdout.split() == ["1", "0", "1", "0", "1", "0", "1", "0"]


# Rounds of malloc, fill and free of a 96 MiB block (over the tunables' 64 MiB mmap threshold, so
# glibc maps it afresh each round); calloc over a kept block; a block asked for while another
# thread still holds its size, freed 20 ms later (XLA:CPU's next execution against the last one's
# temporaries); then two blocks of one size held at once by one thread, which cannot wait for itself.
BLOCKS = """
import ctypes, json, os, resource, threading, time
import numpy as np
from resjax import malloc
malloc.reexec()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype, libc.malloc_usable_size.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
N = 96 << 20
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds = []
for _ in range(3):
  before = faults()
  p = libc.malloc(N)
  ctypes.memset(p, 1, N)
  libc.free(p)
  rounds.append(faults() - before)
z = libc.calloc(N, 1)
zeroed = not np.ctypeslib.as_array((ctypes.c_ubyte * N).from_address(z)).any()
usable = libc.malloc_usable_size(z)
held = threading.Thread(target=lambda: (time.sleep(0.02), libc.free(z)))
held.start()
before = faults()
w = libc.malloc(N)
ctypes.memset(w, 2, N)
waited = {"same": w == z, "faults": faults() - before}
held.join()
b = libc.malloc(N)
libc.free(w); libc.free(b)
c = libc.malloc(N); d = libc.malloc(N)
print(json.dumps({"preload": os.environ.get("LD_PRELOAD", ""), "rounds": rounds, "zeroed": zeroed,
                  "usable": usable, "waited": waited, "both_kept": {c, d} == {w, b}}))
"""


@pytest.mark.parametrize("users_tunables", [False, True])
def test_the_block_cache_keeps_a_freed_large_block_mapped(built, users_tunables):
  if not kernels.blockcache_path().exists():
    pytest.skip("the block cache did not build here (no C compiler)")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
  # A wait long enough that the freeing thread, 20 ms late, is in time on a loaded machine too.
  env.update(RESJAX_KERNELS_DIR=str(built.parent), JAX_PLATFORMS="cpu",
             RESJAX_BLOCKCACHE_WAIT_MS="2000")
  if users_tunables:  # the user's own malloc settings: no restart, no block cache
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=2"
  out = subprocess.run([sys.executable, "-c", BLOCKS], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["zeroed"]
  assert got["rounds"][0] > 0
  if users_tunables:
    assert got["preload"] == "" and all(f > 0 for f in got["rounds"]), got
    assert got["waited"]["faults"] >= 48
  else:
    assert got["preload"] == str(kernels.blockcache_path())
    assert got["rounds"][1:] == [0, 0], got
    assert got["usable"] == 96 << 20
    # The same block, its pages still mapped: a fresh one faults each 2 MiB (48 times) or 4 KiB.
    assert got["waited"]["same"] and got["waited"]["faults"] < 8, got
    assert got["both_kept"], got


_POOL_CHILD = """
import ctypes, json, os
from resjax import kernels
cores = os.sched_getaffinity(0)
before = len(os.listdir("/proc/self/task"))
done = kernels.one_pool_thread()
import jax, jax.numpy as jnp
jax.devices()
started = len(os.listdir("/proc/self/task")) - before
from resjax.kernels import conv as onednn
x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
g = jax.jit(jax.grad(lambda x, w: onednn.conv(x, w, 1).sum(), argnums=1))(x, w)
gomp = next(l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l)
print(json.dumps({"done": done, "again": kernels.one_pool_thread(), "started": started,
                  "all_cores": all(os.sched_getaffinity(int(t)) == cores
                                   for t in os.listdir("/proc/self/task")),
                  "omp_threads": ctypes.CDLL(gomp).omp_get_max_threads(), "cores": len(cores),
                  "grad": float(g[1, 1, 0, 0])}))
"""


def test_one_pool_thread_starts_xlas_pool_small_and_gives_every_thread_its_cores(built):
  """Where it applies, XLA's pool starts with fewer threads than by default, yet afterwards every
  thread may run on every core, OpenMP's team spans them all, and the numbers are the same."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs 2 cores")
  # Nothing here that sets the threads or devices: OpenMP's team and JAX's CPU devices as default.
  unset = ("XLA_FLAGS", "OMP_NUM_THREADS", "JAX_NUM_CPU_DEVICES", kernels.ONE_POOL_THREAD_ENV)
  env = {k: v for k, v in os.environ.items() if k not in unset}
  env.update(RESJAX_KERNELS_DIR=str(built.parent), JAX_PLATFORMS="cpu")
  runs = {}
  for pool in ("one", "cores"):
    child_env = {**env, **({kernels.ONE_POOL_THREAD_ENV: "cores"} if pool == "cores" else {})}
    out = subprocess.run([sys.executable, "-c", _POOL_CHILD], env=child_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runs[pool] = json.loads(out.stdout.strip().splitlines()[-1])
  one, cores = runs["one"], runs["cores"]
  assert one["done"] and not cores["done"]
  assert not one["again"]  # JAX's backends had started: nothing to do
  assert one["started"] < cores["started"]
  assert one["all_cores"] and cores["all_cores"]
  assert one["omp_threads"] == one["cores"]
  assert one["grad"] == cores["grad"] == 8 * 8 * 2  # every output pixel sees w[1, 1] once
