"""Tests for the highway shortcut and the highway model family (2015 conv highway, 2024 Highway-110)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from resjax import shortcuts, train
from resjax.errors import ConfigError
from resjax.models import highway, resnet


def _n_params(module):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rngs(seed=0):
  return nnx.Rngs(params=train.key(seed), dropout=train.key(seed + 1))


def _conv(h, w, stride=1):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(h, w, (stride, stride), ((p, p), (p, p)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _bn(h):
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  return (h - mean) / jnp.sqrt(var + 1e-5)


def test_highway_layer_against_a_hand_written_one():
  """y = H(x) T(x) + x (1 - T(x)), H = ReLU(BN(conv3x3 x)), T = sigmoid(conv3x3 x + b_T)."""
  sc = ml_collections.ConfigDict(dict(name='highway', option='B', gate='conv', gate_kernel=3,
                                      gate_bias=-2.0))
  unit = resnet.Unit(4, 4, 1, kind='single', placement='relu_before_add', shortcut=sc,
                     skip_preact=False, rngs=_rngs())
  w_h, w_t = 0.3 * _normal((3, 3, 4, 4), 1), 0.3 * _normal((3, 3, 4, 4), 2)
  unit.convs[0].kernel.set_value(w_h)
  unit.shortcut.gate.convs[0].kernel.set_value(w_t)
  np.testing.assert_array_equal(unit.shortcut.gate.bias[...], np.full(4, -2.0, np.float32))
  x = _normal((2, 6, 6, 4))
  t = jax.nn.sigmoid(_conv(x, w_t) - 2.0)
  expected = jax.nn.relu(_bn(_conv(x, w_h))) * t + x * (1 - t)
  np.testing.assert_allclose(unit(x, train=True), expected, rtol=1e-4, atol=1e-4)


def test_gate_on_a_shape_change_is_strided_and_x_is_projected():
  sc = ml_collections.ConfigDict(dict(name='highway', option='B', gate='conv', gate_bias=-1.0))
  s = shortcuts.make_shortcut(sc, 4, 8, 2, rngs=_rngs())
  assert s.projects and s.gate.convs[0].kernel.shape == (3, 3, 4, 8)
  x, f = _normal((2, 6, 6, 4)), _normal((2, 3, 3, 8), 1)
  y = s(x, f, train=True)
  t = s.gate(x, train=True)
  np.testing.assert_allclose(y, (1 - t) * s.carried(x, True) + t * f, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match='exclusive_gate'):
    s(_normal((2, 5, 4)), _normal((2, 5, 8)), train=True)
  with pytest.raises(ConfigError, match='config.model.shortcut.gate'):
    shortcuts.make_shortcut(ml_collections.ConfigDict(dict(name='highway', gate='dense')),
                            4, 4, 1, rngs=_rngs())


@pytest.mark.parametrize('depth, bias', [(8, -1.0), (11, -1.0), (20, -2.0), (32, -3.0), (110, -3.0)])
def test_default_gate_bias_by_depth(depth, bias):
  """Highway networks: b_T about -1, -2, -3 for conv nets of depth 10, 20, 30."""
  assert highway.default_gate_bias(depth) == bias


def test_highway_family_defaults():
  cfg = ml_collections.ConfigDict(dict(name='highway', depth=20))
  model = nnx.eval_shape(lambda: highway.from_config(cfg, num_classes=10, in_channels=3,
                                                     rngs=nnx.Rngs(0)))
  unit = model.stages[0].first
  assert len(unit.convs) == 1 and unit.placement == 'relu_before_add'
  assert isinstance(unit.shortcut, shortcuts.Highway)
  assert unit.shortcut.gate.convs[0].kernel.shape == (3, 3, 16, 16)
  assert highway.shortcut_config(cfg).gate_bias == -2.0
  two, n = highway.repeats(cfg, 2)
  assert n == 6 and two.depth == 8 and two.shortcut.gate_bias == -2.0  # b_T stays the real net's


def test_highway_110_of_the_2024_rerun():
  """Two-conv gate with its last BN bias at -6, option B, widths x0.875: 2.65M parameters."""
  cfg = ml_collections.ConfigDict(highway.HIGHWAY_110_2024)
  model = nnx.eval_shape(lambda: highway.from_config(cfg, num_classes=10, in_channels=3,
                                                     rngs=nnx.Rngs(0)))
  assert [st.out_features for st in model.stages] == [14, 28, 56]
  assert sum(st.n for st in model.stages) == 54
  assert round(_n_params(model) / 1e4) / 100 == 2.65
  # Each unit doubles ResNet-110's: the gate branch is the size of F, so about 2 x 0.875^2 x 1.73M.
  resnet110 = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=110, num_classes=10, shortcut=ml_collections.ConfigDict(dict(name='identity', option='B')),
      rngs=nnx.Rngs(0)))
  assert abs(_n_params(model) / (2 * 0.875 ** 2 * _n_params(resnet110)) - 1) < 0.01


def test_two_conv_gate_starts_nearly_closed():
  """b_T = -6 on the gate's last BN: T is about sigmoid(-6) = 0.0025, the unit carries x."""
  sc = ml_collections.ConfigDict(dict(name='highway', option='B', gate='two_conv', gate_bias=-6.0))
  s = shortcuts.make_shortcut(sc, 8, 8, 1, rngs=_rngs())
  np.testing.assert_array_equal(s.gate.norms[1].bias[...], np.full(8, -6.0, np.float32))
  np.testing.assert_array_equal(s.gate.norms[0].bias[...], np.zeros(8, np.float32))
  x = _normal((4, 5, 5, 8))
  t = s.gate(x, train=True)
  # The gate's logits are BN-normalised around -6 with unit variance, so the mean of T is about
  # E[exp(-6 + z)] = exp(-5.5) = 0.0041 for z ~ N(0, 1), above sigmoid(-6) = 0.0025.
  assert 0.0025 < float(t.mean()) < 0.006


def test_highway_net_with_probes_and_zero_init():
  """With zero_init_residual the branch is 0 and y = (1 - T) x: the gradient shrinks by (1 - T)."""
  cfg = ml_collections.ConfigDict(dict(name='highway', depth=11, zero_init_residual=True,
                                       conv_impl='xla', shortcut=dict(gate_bias=-1.0)))
  model = nnx.jit(lambda: highway.from_config(cfg, num_classes=10, in_channels=1, rngs=_rngs()))()
  x = _normal((4, 8, 8, 1))
  shapes = model.probe_shapes(x.shape)
  assert [s[0] for s in shapes] == [1, 2, 1, 2, 1, 2]
  graphdef, state = nnx.split(model)

  @jax.jit
  def rms_of_inputs(state):
    m = nnx.merge(graphdef, state, copy=True)
    return m(x, train=True, probes=[jnp.zeros(s) for s in shapes])[1]

  act = np.concatenate(jax.device_get(rms_of_inputs(state)))
  # Where x passes unprojected, each unit multiplies its (non-negative) input by 1 - T < 1.
  for before, after in [(0, 1), (1, 2), (4, 5), (7, 8)]:
    assert act[after] < act[before]
