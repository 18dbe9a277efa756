"""Tests for resjax.models.shortcuts: every form's rule, options A/B/C, learnable scalars,
errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import assert_f32_close, f32_tol, make_rngs
from resjax.errors import ConfigError
from resjax.models import resnet, shortcuts

SHAPE = (2, 4, 4, 3)


def _cfg(name, **fields):
  return ml_collections.ConfigDict({"name": name, "option": "B", **fields})


def _make(name, c_in=3, c_out=3, stride=1, norm=True, **fields):
  return shortcuts.make_shortcut(_cfg(name, **fields), c_in, c_out, stride, norm=norm,
                                 rngs=make_rngs())


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _xf(shape=SHAPE, seed=0):
  return _normal(shape, seed), _normal(shape, seed + 100)


def _n_params(module, kind=nnx.Param):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(module, kind)))


def _zero(param):
  param.set_value(jnp.zeros_like(param[...]))


def _mix_scale(x, f):
  """The magnitude of a y = a x + b f's terms (a, b in [0, 1]): its rounding is relative to it."""
  return float(jnp.max(jnp.abs(x) + jnp.abs(f)))


# ------------------------------------------------------------------------ Table 1 forms


@pytest.mark.parametrize("name, fields, rule", [
    ("identity", {}, lambda x, f: x + f),
    ("scaling", dict(scale=0.0, branch_scale=1.0), lambda x, f: f),
    ("scaling", dict(scale=0.5, branch_scale=1.0), lambda x, f: 0.5 * x + f),
    ("scaling", dict(scale=0.5, branch_scale=0.5), lambda x, f: (x + f) / 2),  # halves both paths
    ("lambda", {}, lambda x, f: 0.5 * f + 0.5 * x),
    ("mix", {}, lambda x, f: (1 - 0.5) * x + 0.5 * f),
    ("rezero", {}, lambda x, f: x),
    ("deepnorm", dict(alpha=2.0), lambda x, f: 2 * x + f),
    ("none", {}, lambda x, f: f),
])
@pytest.mark.parametrize("train_mode", [False, True])
def test_parameter_free_rules_are_exact(name, fields, rule, train_mode):
  """With no projection on x, each rule holds bit for bit (the scales are powers of 2)."""
  x, f = _xf()
  y = _make(name, **fields)(x, f, train=train_mode)
  np.testing.assert_array_equal(y, rule(x, f))


def test_exclusive_gate_with_zero_kernel_is_the_convex_mix():
  """(1 - sigmoid(b)) x + sigmoid(b) f; at b = -6 the unit is 99.75% shortcut."""
  x, f = _xf()
  for b in (-6.0, 0.0, 1.5):
    sc = _make("exclusive_gate", gate_bias=b)
    _zero(sc.gate.proj.kernel)
    g = jax.nn.sigmoid(jnp.float32(b))
    # Two products and a sum, and sigmoid(b) on a tensor vs a scalar (a few ulps of it).
    assert_f32_close(sc(x, f, train=True), (1 - g) * x + g * f, terms=2, scale=_mix_scale(x, f))
  sc = _make("exclusive_gate", gate_bias=-6.0)
  _zero(sc.gate.proj.kernel)
  # sigmoid(-6) = 0.00247 in float32: exp, a sum and a quotient (or 0.5 + 0.5 tanh), of values <= 1.
  np.testing.assert_allclose(sc.gate(x), 1 / (1 + math.exp(6)), rtol=0, atol=f32_tol(depth=2))


def test_exclusive_gate_bias_minus_6_starts_near_the_identity():
  """With the real (He-normal) gate kernel, unit-scale inputs pass almost unchanged."""
  x, f = _xf((8, 4, 4, 16))
  sc = _make("exclusive_gate", c_in=16, c_out=16, gate_bias=-6.0)
  y = sc(x, f, train=True)
  assert float(jnp.abs(sc.gate.proj.kernel[...]).max()) > 0.1  # the kernel is really random
  assert float(jnp.linalg.norm(y - x) / jnp.linalg.norm(x)) < 0.05
  assert float(sc.gate(x).mean()) < 0.02
  # The default bias is 0: a gate of about one half, far from the identity.
  y0 = _make("exclusive_gate", c_in=16, c_out=16)(x, f, train=True)
  assert float(jnp.linalg.norm(y0 - x) / jnp.linalg.norm(x)) > 0.3


def test_shortcut_gate_gates_only_x():
  x, f = _xf()
  sc = _make("shortcut_gate", gate_bias=-2.0)
  _zero(sc.gate.proj.kernel)
  g = jax.nn.sigmoid(jnp.float32(-2.0))
  assert_f32_close(sc(x, f, train=False), (1 - g) * x + f, terms=2, scale=_mix_scale(x, f))


def test_conv1x1_projects_even_when_shapes_match():
  """W x (+ BN) + f on an equal-shape unit; kernel in*out plus BN scale and bias."""
  x, f = _xf()
  sc = _make("conv1x1")
  assert sc.projects
  assert _n_params(sc) == 3 * 3 + 2 * 3
  z = x @ sc.match.proj.kernel[...]
  # Running stats at init (mean 0, var 1): a 3-term 1x1 conv vs a matmul, then the BN (rsqrt vs
  # sqrt and a quotient), two chained steps.
  assert_f32_close(sc(x, f, train=False), z / np.sqrt(1 + 1e-5) + f, terms=3, depth=2)
  mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
  # Batch statistics: BN's sums of 2*4*4 terms, by flax and by jnp.
  assert_f32_close(sc(x, f, train=True), (z - mean) / jnp.sqrt(var + 1e-5) + f, terms=2 * 4 * 4)
  # Without norm (Transformers) the projection carries a bias instead of BN.
  assert _n_params(_make("conv1x1", norm=False)) == 3 * 3 + 3


@pytest.mark.parametrize("name, projecting", [
    ("conv1x1", {(0, "first"), (0, "rest"), (1, "first"), (1, "rest"), (2, "first"), (2, "rest")}),
    ("identity", {(1, "first"), (2, "first")}),  # option B: only where the shape changes
])
def test_which_units_of_a_resnet_project(name, projecting):
  model = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=20, num_classes=10, shortcut=_cfg(name), rngs=nnx.Rngs(0)))
  found, widths = set(), (16, 16, 32, 64)
  for s, stage in enumerate(model.stages):
    shapes = {"first": (widths[s], widths[s + 1]),
              "rest": (2, widths[s + 1], widths[s + 1])}  # stacked over n - 1 = 2 scanned units
    for part in ("first", "rest"):
      sc = getattr(stage, part).shortcut
      if sc.projects:
        found.add((s, part))
        assert sc.match.proj.kernel.shape == shapes[part]
      else:
        assert not hasattr(sc.match, "proj")
  assert found == projecting


def test_dropout_shortcut_at_test_time_scales_by_keep_rate():
  x, f = _xf()
  # Bitwise: (1 - 0.5) x is exact, so either way one rounded sum (an FMA rounds the same).
  np.testing.assert_array_equal(_make("dropout", dropout_rate=0.5)(x, f, train=False), 0.5 * x + f)


def test_dropout_shortcut_in_training_keeps_or_drops_without_rescaling():
  x, _ = _xf((4, 8, 8, 8))
  f = jnp.zeros_like(x)
  sc = _make("dropout", dropout_rate=0.5)
  y1, y2 = sc(x, f, train=True), sc(x, f, train=True)
  for y in (y1, y2):
    kept = np.asarray(y == x)
    assert np.all(kept | np.asarray(y == 0))  # each element is x (not x / (1 - p)) or 0
    assert 0.45 < 1 - kept.mean() < 0.55
  assert np.any((y1 == 0) != (y2 == 0))  # the RNG advanced between calls


def test_residual_scalars_init_and_filter():
  """ResidualScalar subclasses Param; filtering by it finds exactly the learnable coefficients."""
  assert issubclass(shortcuts.ResidualScalar, nnx.Param)
  expected = {"lambda": [0.5, 0.5], "mix": [0.5], "rezero": [0.0],
              "layerscale": [1e-5] * 3}
  for name in shortcuts.SHORTCUTS:
    sc = _make(name)
    leaves = jax.tree.leaves(nnx.state(sc, shortcuts.ResidualScalar))
    np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in leaves] or [[]]),
                               expected.get(name, []), err_msg=name)
  gamma = _make("layerscale").gamma[...]
  assert gamma.shape == (3,)
  # Scalars are also Params, so the optimizer's weight group must filter them out first.
  assert _n_params(_make("lambda")) == 2
  assert _n_params(_make("layerscale", gamma_init=1e-6)) == 3
  np.testing.assert_allclose(_make("layerscale", gamma_init=1e-6).gamma[...], 1e-6)


def test_layerscale_and_lambda_rules():
  x, f = _xf()
  # gamma = float32(1e-5) times f, plus x: a product and a sum, fused into an FMA or not.
  assert_f32_close(_make("layerscale")(x, f, train=True), x + 1e-5 * f, terms=2)
  sc = _make("lambda")
  sc.lambda1.set_value(jnp.float32(2.0))
  # Bitwise: products by powers of 2 are exact, so either way one rounded sum.
  np.testing.assert_array_equal(sc(x, f, train=True), 2.0 * f + 0.5 * x)


# ------------------------------------------------------------------------ options A, B, C


def _option(option, c_in=16, c_out=32, stride=2):
  return shortcuts.make_shortcut(_cfg("identity", option=option), c_in, c_out, stride,
                                 rngs=make_rngs())


@pytest.mark.parametrize("option", ["A", "B", "C"])
def test_options_map_to_the_branch_shape(option):
  x = _normal((2, 8, 8, 16))
  f = jnp.zeros((2, 4, 4, 32))
  y = _option(option)(x, f, train=True)
  assert y.shape == (2, 4, 4, 32)


def test_option_a_subsamples_and_zero_pads():
  x = _normal((2, 8, 8, 16))
  sc = _option("A")
  assert _n_params(sc) == 0 and not sc.projects
  y = sc(x, jnp.zeros((2, 4, 4, 32)), train=True)
  np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., 16:], 0.0)


def test_option_b_projects_only_where_the_shape_changes_and_c_always():
  assert _n_params(_option("B")) == 16 * 32 + 2 * 32 == 576
  assert _n_params(_option("C")) == 576
  assert _n_params(_option("B", 16, 16, 1)) == 0
  assert _n_params(_option("B", 16, 16, 2)) == 16 * 16 + 2 * 16  # a stride alone changes shape
  assert _n_params(_option("C", 16, 16, 1)) == 16 * 16 + 2 * 16
  x = _normal((2, 8, 8, 16))
  np.testing.assert_array_equal(_option("B", 16, 16, 1)(x, 0 * x, train=True), x)


def test_option_a_cannot_reduce_channels():
  with pytest.raises(ConfigError, match="option B or C"):
    _option("A", 32, 16, 1)


# ------------------------------------------------------------------------ errors


def test_unknown_name_lists_the_known_names_on_one_line():
  with pytest.raises(ConfigError) as e:
    _make("exclusive-gate")
  msg = str(e.value)
  assert "'exclusive-gate'" in msg and "config.model.shortcut.name" in msg
  for name in shortcuts.SHORTCUTS:
    assert name in msg
  assert "\n" not in msg


def test_unknown_option_is_a_config_error():
  with pytest.raises(ConfigError, match="'D'") as e:
    _option("D")
  assert "A, B, C" in str(e.value) and "\n" not in str(e.value)


def test_dropout_rate_outside_range_is_a_config_error():
  with pytest.raises(ConfigError, match="dropout_rate"):
    _make("dropout", dropout_rate=1.0)


class _OnlyDeclared:
  """A shortcut config that fails on any key its form does not declare (shortcuts.fields)."""

  def __init__(self, name):
    self.name, self.declared, self.read = name, shortcuts.fields(name), set()

  def get(self, key, default=None):
    # conv_impl is the model's (resnet.with_conv_impl), handed to forms that convolve.
    assert key in self.declared or key == "conv_impl", f"{self.name} reads undeclared {key!r}"
    self.read.add(key)
    return default


@pytest.mark.parametrize("name", sorted(shortcuts.SHORTCUTS))
def test_every_form_reads_exactly_the_keys_it_declares(name):
  """A row may set a form's declared keys and only those, so a key read but not declared could
  never be set, and one declared but not read would be set to no effect."""
  cfg = _OnlyDeclared(name)
  shortcuts.make_shortcut(cfg, 3, 6, 2, rngs=make_rngs())
  assert cfg.read - {"conv_impl"} == set(cfg.declared) - {"name"}
