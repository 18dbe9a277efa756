"""Tests for the highway shortcut and the highway model family (2015 conv highway, 2024 Highway-110)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import assert_f32_close, make_rngs
from resjax import configs, inspect_model
from resjax.errors import ConfigError
from resjax.models import highway, resnet, shortcuts


def _n_params(module):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv(h, w, stride=1):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(h, w, (stride, stride), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _bn(h):
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  return (h - mean) / jnp.sqrt(var + 1e-5)


def test_highway_layer_against_a_hand_written_one():
  """y = H(x) T(x) + x (1 - T(x)), H = ReLU(BN(conv3x3 x)), T = sigmoid(conv3x3 x + b_T)."""
  sc = ml_collections.ConfigDict(dict(name="highway", option="B", gate="conv", gate_kernel=3,
                                      gate_bias=-2.0))
  unit = resnet.Unit(4, 4, 1, kind="single", placement="relu_before_add", shortcut=sc,
                     skip_preact=False, rngs=make_rngs())
  w_h, w_t = 0.3 * _normal((3, 3, 4, 4), 1), 0.3 * _normal((3, 3, 4, 4), 2)
  unit.convs[0].kernel.set_value(w_h)
  unit.shortcut.gate.convs[0].kernel.set_value(w_t)
  np.testing.assert_array_equal(unit.shortcut.gate.bias[...], np.full(4, -2.0, np.float32))
  x = _normal((2, 6, 6, 4))
  t = jax.nn.sigmoid(_conv(x, w_t) - 2.0)
  expected = jax.nn.relu(_bn(_conv(x, w_h))) * t + x * (1 - t)
  assert_f32_close(unit(x, train=True), expected, terms=2 * 6 * 6)  # a conv with BN, a gate


def test_gate_on_a_shape_change_is_strided_and_x_is_projected():
  sc = ml_collections.ConfigDict(dict(name="highway", option="B", gate="conv", gate_bias=-1.0))
  s = shortcuts.make_shortcut(sc, 4, 8, 2, rngs=make_rngs())
  assert s.projects and s.gate.convs[0].kernel.shape == (3, 3, 4, 8)
  x, f = _normal((2, 6, 6, 4)), _normal((2, 3, 3, 8), 1)
  y = s(x, f, train=True)
  t = s.gate(x, train=True)
  assert_f32_close(y, (1 - t) * s.carried(x, True) + t * f, terms=2)
  with pytest.raises(ConfigError, match="exclusive_gate"):
    s(_normal((2, 5, 4)), _normal((2, 5, 8)), train=True)
  with pytest.raises(ConfigError, match="config.model.shortcut.gate"):
    shortcuts.make_shortcut(ml_collections.ConfigDict(dict(name="highway", gate="dense")),
                            4, 4, 1, rngs=make_rngs())


@pytest.mark.parametrize("depth, bias", [(8, -1.0), (11, -1.0), (20, -2.0), (32, -3.0), (110, -3.0)])
def test_default_gate_bias_by_depth(depth, bias):
  """Highway networks: b_T about -1, -2, -3 for conv nets of depth 10, 20, 30."""
  assert highway.default_gate_bias(depth) == bias


def test_highway_family_defaults():
  cfg = ml_collections.ConfigDict(dict(name="highway", depth=20))
  model = nnx.eval_shape(lambda: highway.from_config(cfg, num_classes=10, in_channels=3,
                                                     rngs=nnx.Rngs(0)))
  unit = model.stages[0].first
  assert len(unit.convs) == 1 and unit.placement == "relu_before_add"
  assert isinstance(unit.shortcut, shortcuts.Highway)
  assert unit.shortcut.gate.convs[0].kernel.shape == (3, 3, 16, 16)
  assert highway.shortcut_config(cfg).gate_bias == -2.0
  two, n = highway.repeats(cfg, 2)
  assert n == 6 and two.depth == 8 and two.shortcut.gate_bias == -2.0  # b_T stays the real net's


def _highway110_2024_by_hand():
  """The re-run's resnet.py, module by module: a 16-channel stem conv + BN, 18 units per stage at
  int(0.875 w) channels, each H's and the gate's conv-BN pairs, a 1x1 conv + BN (option B) where
  the shape changes, and the Dense head."""
  total, c = 3 * 9 * 16 + 2 * 16, 16
  for w in (14, 28, 56):
    for _ in range(18):
      total += 2 * (9 * c * w + 2 * w + 9 * w * w + 2 * w)  # H and the gate: conv-BN, conv-BN
      if c != w:
        total += c * w + 2 * w
      c = w
  return total + 56 * 10 + 10


def test_highway_110_of_the_2024_rerun():
  """2,649,918 parameters, the count in the re-run's log (log_highway110/metrics.json)."""
  assert _highway110_2024_by_hand() == 2_649_918
  cfg = ml_collections.ConfigDict(highway.HIGHWAY_110_2024)
  model = nnx.eval_shape(lambda: highway.from_config(cfg, num_classes=10, in_channels=3,
                                                     rngs=nnx.Rngs(0)))
  assert model.stem.kernel.shape == (3, 3, 3, 16)  # the stem stays at 16 channels
  assert [st.out_features for st in model.stages] == [14, 28, 56]
  assert sum(st.n for st in model.stages) == 54
  first = model.stages[0].first
  assert first.placement == "relu_before_add" and first.shortcut.projects  # 16 -> 14 channels
  assert first.shortcut.gate.convs[0].kernel.shape == (3, 3, 16, 14)
  assert _n_params(model) == 2_649_918


def test_highway_unit_of_the_2024_rerun_against_a_hand_written_one():
  """The re-run's forward: h = ReLU(BN(conv(ReLU(BN(conv x))))), t = sigmoid(BN(conv(ReLU(BN(conv
  x)))) - 6), out = x + t (h - x), with no ReLU after the sum (negative outputs survive)."""
  sc = ml_collections.ConfigDict(dict(name="highway", option="B", gate="two_conv", gate_bias=-6.0))
  unit = resnet.Unit(4, 4, 1, kind="basic", placement="relu_before_add", shortcut=sc,
                     skip_preact=False, rngs=make_rngs())
  w = [0.3 * _normal((3, 3, 4, 4), seed) for seed in range(1, 5)]
  for conv, k in zip([*unit.convs, *unit.shortcut.gate.convs], w):
    conv.kernel.set_value(k)
  x = _normal((2, 6, 6, 4))
  h = jax.nn.relu(_bn(_conv(jax.nn.relu(_bn(_conv(x, w[0]))), w[1])))
  t = jax.nn.sigmoid(_bn(_conv(jax.nn.relu(_bn(_conv(x, w[2]))), w[3])) - 6.0)
  y = unit(x, train=True)
  # 2 chained convs with BN in each path, the longest sum BN's 2*6*6 (conftest.f32_tol).
  assert_f32_close(y, x + t * (h - x), terms=2 * 6 * 6, depth=2)
  assert float(y.min()) < 0


def test_highway_experiment_recipe_of_the_2024_rerun():
  """scale=paper: ResNet-110 option A, LR 0.01 through its first epoch (391 steps of 128 of 50k
  images), weight decay 1e-4; the highway rows have no warm-up."""
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "highway.py"
  spec = importlib.util.spec_from_file_location("highway_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("scale=paper")
  runs = {r.name: configs.run_config(config, r) for r in configs.select_runs(config)}
  base, hw = runs["resnet110"], runs["highway110_2024"]
  assert base.model.shortcut.option == "A" and base.optim.warmup_lr == 0.01
  assert configs.schedule_steps(base, train_size=50_000)["warmup"] == 391
  assert base.optim.weight_decay == hw.optim.weight_decay == 1e-4
  assert configs.schedule_steps(hw, train_size=50_000)["warmup"] == 0
  assert hw.model.placement == "relu_before_add" and hw.model.shortcut.option == "B"
  assert _n_params(inspect_model.abstract_model(hw)) == 2_649_918


def test_two_conv_gate_starts_nearly_closed():
  """b_T = -6 on the gate's last BN: T is about sigmoid(-6) = 0.0025, the unit carries x."""
  sc = ml_collections.ConfigDict(dict(name="highway", option="B", gate="two_conv", gate_bias=-6.0))
  s = shortcuts.make_shortcut(sc, 8, 8, 1, rngs=make_rngs())
  np.testing.assert_array_equal(s.gate.norms[1].bias[...], np.full(8, -6.0, np.float32))
  np.testing.assert_array_equal(s.gate.norms[0].bias[...], np.zeros(8, np.float32))
  x = _normal((4, 5, 5, 8))
  t = s.gate(x, train=True)
  # The gate's logits are BN-normalised around -6 with unit variance, so the mean of T is about
  # E[exp(-6 + z)] = exp(-5.5) = 0.0041 for z ~ N(0, 1), above sigmoid(-6) = 0.0025.
  assert 0.0025 < float(t.mean()) < 0.006


def test_highway_net_with_probes_and_zero_init():
  """With zero_init_residual the branch is 0 and y = (1 - T) x: the gradient shrinks by (1 - T)."""
  cfg = ml_collections.ConfigDict(dict(name="highway", depth=11, zero_init_residual=True,
                                       conv_impl="xla", shortcut=dict(gate_bias=-1.0)))
  model = nnx.jit(lambda: highway.from_config(cfg, num_classes=10, in_channels=1,
                                              rngs=make_rngs()))()
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
