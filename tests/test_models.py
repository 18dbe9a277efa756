"""Tests for the CIFAR ResNets: sizes, FLOPs, depth rules, scan, convs, placements, gradients."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_f32_close, make_rngs, randomize_resnet
from resjax import inspect_model
from resjax.errors import ConfigError
from resjax.models import layers, resnet

FIG2 = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "resnetv2_fig2.py"


def _fig2_config(depth, **model):
  """fig2 at scale=test as `--mode=describe` sees it, as ResNet-v1 Table 6: option A, CIFAR-10."""
  spec = importlib.util.spec_from_file_location("resnetv2_fig2", FIG2)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("scale=test")
  c.data.name = "cifar10"
  c.model.depth = depth
  c.model.shortcut.option = "A"
  c.model.update(model)
  return c


def _n_params(module):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _shortcut(name="identity", **fields):
  return ml_collections.ConfigDict({"name": name, "option": "B", **fields})


# ------------------------------------------------------------------------ sizes and FLOPs

# ResNet-v1 Table 6 (CIFAR-10, option A): depth -> params, rounded as the paper prints them.
TABLE6 = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_table6_parameter_counts(depth):
  n = _n_params(inspect_model.abstract_model(_fig2_config(depth)))
  shown = round(n / 1e6, 2) if depth < 100 else round(n / 1e5) / 10
  assert shown == TABLE6[depth]


def _conv_macs(depth, hw=32, c_in=3, widths=(16, 32, 64)):
  """Multiply-adds of the 3x3 convolutions, every tap counted (the paper's way)."""
  n = (depth - 2) // 6
  macs, c, size = hw * hw * c_in * widths[0] * 9, widths[0], hw
  for s, w in enumerate(widths):
    size //= 1 if s == 0 else 2
    macs += size * size * 9 * (c * w + (2 * n - 1) * w * w)
    c = w
  return macs


def test_conv_macs_reference_is_the_papers():
  assert round(_conv_macs(20) / 1e5) / 10 == 40.6
  assert round(_conv_macs(110) / 1e5) / 10 == 252.9


@functools.cache
def _describe(depth):
  """describe with conv_impl='xla' (what `auto` is on accelerators): XLA skips padding taps.

  rbg keys only speed up the throwaway eager init inside describe (threefry compiles for seconds
  per parameter shape on CPU); counts and FLOPs do not depend on the key.
  """
  with jax.default_prng_impl("rbg"):
    return inspect_model.describe(_fig2_config(depth, conv_impl="xla"))


@pytest.mark.parametrize("depth", [20, 110])
def test_describe_params_and_flops(depth):
  """describe's FLOPs are a few % below the paper's multiply-adds (XLA's conv skips the padding)."""
  d = _describe(depth)
  assert d["params"] == _n_params(inspect_model.abstract_model(_fig2_config(depth)))
  macs = d["forward_flops_per_example"] / 2
  assert 0.9 * _conv_macs(depth) < macs < _conv_macs(depth)


@pytest.mark.parametrize("depth", [20, 110])
def test_describe_extrapolation_matches_an_unrolled_count(depth):
  """describe counts 1 and 2 units per stage and extends linearly; the unrolled net agrees.

  n = 3 and 18 units per stage pin the factor n - 1. The count is of the lowered program, whose
  units are alike op for op, so the two agree up to the count's own float rounding (2e-7 seen).
  """
  unrolled = _fig2_config(depth, conv_impl="xla", scan=False)
  with jax.default_prng_impl("rbg"):
    counted = inspect_model.forward_flops(unrolled, unrolled.model)
  assert abs(_describe(depth)["forward_flops_per_example"] / counted - 1) < 1e-5


def test_forward_flops_count_each_multiply_add_once():
  """describe counts multiply-adds once even when the run itself uses im2col convolutions."""
  c = _fig2_config(8, conv_impl="im2col")
  c.data.name = "digits"  # 8x8x1: the same effect, a fast compile
  with jax.default_prng_impl("rbg"):
    macs = inspect_model.forward_flops(c, c.model) / 2
  reference = _conv_macs(8, hw=8, c_in=1) + 64 * 10  # + the Dense head
  assert macs < 1.05 * reference


# ------------------------------------------------------------------------ depth rules


@pytest.mark.parametrize("depth", [111, 7, 2, 21])
def test_impossible_basic_depth(depth):
  with pytest.raises(ConfigError) as e:
    inspect_model.abstract_model(_fig2_config(depth))
  msg = str(e.value)
  assert f"depth {depth}" in msg and "6n+2" in msg and "config.model.depth" in msg
  assert "\n" not in msg


def test_bottleneck_depth_rule():
  assert resnet.units_per_stage(164, "bottleneck") == 18
  assert resnet.units_per_stage(1001, "bottleneck") == 111
  assert resnet.units_per_stage(110, "basic") == 18
  assert resnet.units_per_stage(110, "bottleneck") == 12  # 110 = 9 * 12 + 2 also fits
  for depth in (164 + 6, 32, 1202):
    with pytest.raises(ConfigError, match=r"9n\+2"):
      resnet.units_per_stage(depth, "bottleneck")
  with pytest.raises(ConfigError, match=r"6n\+2"):
    resnet.units_per_stage(1001, "basic")


def test_bottleneck_width_and_parameter_count():
  """ResNet-164 (bottleneck, 4x expansion) has 1.7M parameters (ResNet-v2 Table 2)."""
  c = _fig2_config(164, unit="bottleneck")
  c.model.shortcut.option = "B"
  model = inspect_model.abstract_model(c)
  assert model.head.kernel.shape == (256, 10)
  assert round(_n_params(model) / 1e5) / 10 == 1.7


# ------------------------------------------------------------------------ scan vs loop


def _transfer(scanned, looped):
  """Copies a scanned net's state into the same net built with a Python loop."""
  for name in ("stem", "stem_norm", "head"):
    nnx.update(getattr(looped, name), nnx.state(getattr(scanned, name)))
  for s_stage, l_stage in zip(scanned.stages, looped.stages):
    nnx.update(l_stage.first, nnx.state(s_stage.first))
    stacked = nnx.state(s_stage.rest)
    for i, unit in enumerate(l_stage.rest):
      nnx.update(unit, jax.tree.map(lambda a: a[i], stacked))


def test_scan_and_loop_compute_the_same_function():
  """ResNet-20 (n = 3, so the scan really iterates) with the same weights, train then eval."""
  kw = dict(depth=20, num_classes=10, in_channels=1, shortcut=_shortcut(), conv_impl="xla")
  scanned = randomize_resnet(nnx.eval_shape(
      lambda: resnet.CifarResNet(scan=True, rngs=make_rngs(), **kw)))
  looped = nnx.eval_shape(lambda: resnet.CifarResNet(scan=False, rngs=make_rngs(), **kw))
  assert isinstance(scanned.stages[0].rest, resnet.Unit) and len(looped.stages[0].rest) == 2
  _transfer(scanned, looped)
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(looped)))
  before = np.asarray(scanned.stages[0].rest.norms[0].mean[...])
  x = _normal((8, 8, 8, 1))
  fwd = nnx.jit(lambda m, x: (m(x, train=True), m(x, train=False)))
  (s_train, s_eval), (l_train, l_eval) = fwd(scanned, x), fwd(looped, x)
  # Another program: 20 chained layers with BN, the longest sum a 3x3x64 conv's (conftest).
  assert_f32_close(s_train, l_train, terms=3 * 3 * 64, depth=20)
  assert_f32_close(s_eval, l_eval, terms=3 * 3 * 64, depth=20)
  assert np.abs(np.asarray(s_train) - np.asarray(s_eval)).max() > 1e-3
  # Each scanned unit's BatchNorm statistics moved, as the looped unit's did.
  after = np.asarray(scanned.stages[0].rest.norms[0].mean[...])
  assert np.all(np.abs(after - before).max(axis=-1) > 1e-3)
  for i, unit in enumerate(looped.stages[0].rest):
    assert_f32_close(after[i], unit.norms[0].mean[...], terms=3 * 3 * 64, depth=20)
    assert_f32_close(scanned.stages[2].rest.norms[1].var[...][i],
                     looped.stages[2].rest[i].norms[1].var[...], terms=3 * 3 * 64, depth=20)


# ------------------------------------------------------------------------ remat


@functools.cache  # the remat="none" program serves every policy's test
def _loss_and_grads(remat, depth=20, conv_impl="im2col"):
  """(loss, grads) of a ResNet (random weights, train mode) under ``remat``, and its program."""
  kw = dict(depth=depth, num_classes=10, in_channels=1, shortcut=_shortcut(option="A"))
  model = randomize_resnet(nnx.eval_shape(lambda: resnet.CifarResNet(
      remat=remat, conv_impl=conv_impl, rngs=make_rngs(), **kw)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, labels = _normal((8, 8, 8, 1)), jnp.arange(8) % 10

  def loss(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  program = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  return program(params), program


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_computes_the_same_loss_and_gradients_with_less_memory(remat):
  """Recomputing the scanned units in the backward pass is the same math in another program:
  loss and every gradient agree to rounding, and the program keeps fewer bytes alive (on CPU the
  3x3 convolutions keep only their input for the backward pass, so every policy saves alike)."""
  (loss, grads), kept = _loss_and_grads("none")
  (loss_r, grads_r), remat_program = _loss_and_grads(remat)
  # 20 chained layers forward and 20 back, the longest sum a 3x3x64 convolution's (conftest).
  assert_f32_close(loss_r, loss, terms=3 * 3 * 64, depth=2 * 20)
  flat, flat_r = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)
  assert len(flat) == len(flat_r)
  for (path, g), g_r in zip(flat, flat_r):
    assert_f32_close(g_r, g, terms=3 * 3 * 64, depth=2 * 20, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads["stages"][0]["rest"]["convs"][0]["kernel"][...]).max()) > 1e-3
  # Without remat the scan stacks each unit's inner activations (after its first conv, BN and
  # ReLU: several maps the size of its input) for the backward pass; with it, only each unit's
  # input. So remat saves at least one input-sized float32 map per scanned unit: ResNet-20 has 2
  # per stage, at 8x8x16, 4x4x32 and 2x2x64 for a batch of 8.
  one_map_per_unit = sum(2 * 8 * hw * hw * c * 4 for hw, c in ((8, 16), (4, 32), (2, 64)))
  temp = lambda program: program.memory_analysis().temp_size_in_bytes
  assert temp(kept) - temp(remat_program) >= one_map_per_unit, (temp(kept), temp(remat_program))


def _step_temp_bytes(remat, depth, batch=32, hw=16):
  """XLA's temporary bytes of a CIFAR ResNet's loss and gradients (compiled, never run)."""
  model = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=depth, num_classes=10, in_channels=1, shortcut=_shortcut(option="A"), remat=remat,
      conv_impl="im2col", rngs=make_rngs()))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.ShapeDtypeStruct((batch, hw, hw, 1), jnp.float32)

  def loss(params, rest, x):
    return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(x, train=True))

  program = jax.jit(jax.grad(loss)).lower(params, rest, x).compile()
  return program.memory_analysis().temp_size_in_bytes


def test_full_remat_keeps_one_map_per_scanned_unit():
  """Under remat=full the backward pass keeps, of each scanned unit, only its input (the scan's
  carry); without remat it keeps float32 maps of that size and one boolean ReLU mask, 4.25 maps'
  worth with layers.BatchNorm's written backward and layers.relu (6.5 with autodiff's BatchNorm and
  two masks). Six more units per stage (ResNet-20 -> -56) must then cost XLA's buffers six input
  maps per stage with full remat (XLA may reuse a buffer or two, hence the margin), and more than
  three times that without."""
  batch, hw = 32, 16
  maps = 6 * sum(batch * (hw // 2**s) ** 2 * c * 4 for s, c in enumerate((16, 32, 64)))
  full = _step_temp_bytes("full", 56) - _step_temp_bytes("full", 20)
  none = _step_temp_bytes("none", 56) - _step_temp_bytes("none", 20)
  assert 0.75 * maps < full < 1.25 * maps, (full, maps)
  assert none > 3 * maps, (none, maps)


def test_auto_remat_follows_what_a_stack_would_keep():
  cpu = jax.default_backend() == "cpu"
  limit = layers.AUTO_REMAT_KEPT_GIB
  assert layers.resolve_remat("auto", 0.5 * limit) == "none"
  assert layers.resolve_remat("auto", 2.0 * limit) == ("full" if cpu else "none")
  assert layers.resolve_remat("auto") == ("full" if cpu else "none")  # unknown: as if too much
  assert layers.resolve_remat("none", 100.0 * limit) == "none"
  assert layers.resolve_remat("dots_saveable") == "dots_saveable"
  assert layers.remat_used("auto", [("full", 1.3), ("none", 0.7), ("none", 0.4)]) == "full+none+none"
  assert layers.remat_used("auto", [("none", 0.1), ("none", 0.1)]) == "none"
  assert layers.remat_used("full", []) == "full"
  assert layers.remat_used("auto", []) == "none"  # no scanned stack: nothing to recompute


def _auto_remat_choices(batch, depth=56, hw=16):
  """What "auto" chose, stack by stack, tracing a CIFAR ResNet's gradient (never compiled)."""
  model = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=depth, num_classes=10, in_channels=1, shortcut=_shortcut(option="A"), remat="auto",
      conv_impl="im2col", rngs=make_rngs()))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.ShapeDtypeStruct((batch, hw, hw, 1), jnp.float32)

  def loss(params, rest, x):
    return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(x, train=True))

  with layers.remats_chosen() as chosen:
    jax.eval_shape(jax.grad(loss), params, rest, x)
  return chosen


@pytest.mark.skipif(jax.default_backend() != "cpu", reason='"auto" measures on CPU only')
def test_auto_remat_measures_what_each_stack_keeps():
  """The kept bytes "auto" measures (the residuals of one unit's VJP, times the units) are the
  4.25 input-sized maps a unit keeps (test above) plus its weights; and since the first stage's
  maps are 2x the second's and 4x the third's, a batch can put the first stack alone over the
  limit."""
  batch, hw, units = 32, 16, 8  # ResNet-56: 9 units a stage, the first one's outside the scan
  chosen = _auto_remat_choices(batch)
  assert [p for p, _ in chosen] == ["none"] * 3
  for s, ((_, kept), c) in enumerate(zip(chosen, (16, 32, 64))):
    maps = units * batch * (hw // 2**s) ** 2 * c * 4 / 2**30
    weights = units * 2 * (3 * 3 * c * c) * 4 / 2**30
    assert 4.2 * maps + weights < kept < 4.4 * maps + weights, (s, kept, maps, weights)
  first = chosen[0][1] / batch  # GiB per example in the first stack
  big = int(layers.AUTO_REMAT_KEPT_GIB / first * 1.5)
  assert [p for p, _ in _auto_remat_choices(big)] == ["full", "none", "none"]


def test_unknown_remat_names_the_choices():
  with pytest.raises(ConfigError, match="config.model.remat") as e:
    resnet.CifarResNet(depth=8, num_classes=10, shortcut=_shortcut(), remat="sometimes",
                       rngs=make_rngs())
  assert all(name in str(e.value) for name in layers.REMATS)


def test_bad_remat_on_the_command_line_is_one_line_and_exit_2(cli, tmp_path):
  r = cli.run("--config", f"{FIG2}:scale=test,run=identity", "--config.model.remat=sometimes",
              "--workdir", tmp_path / "w")
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "config.model.remat" in r.stderr
  assert all(name in r.stderr for name in layers.REMATS)
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------ convolutions


@pytest.mark.parametrize("k, stride, out_hw", [(3, 1, 8), (3, 2, 4), (1, 2, 4)])
def test_im2col_and_xla_convolutions_agree(k, stride, out_hw):
  a = layers.Conv2D(4, 6, k, stride, impl="im2col", rngs=make_rngs())
  b = layers.Conv2D(4, 6, k, stride, impl="xla", rngs=make_rngs(1))
  b.kernel.set_value(a.kernel[...])
  x = _normal((2, 8, 8, 4))
  y = a(x)
  assert y.shape == (2, out_hw, out_hw, 6)
  assert_f32_close(y, b(x), terms=k * k * 4)  # one sum of k * k * 4 terms, in another order
  assert float(jnp.abs(y).mean()) > 0.1


def test_conv_impl_auto_and_unknown():
  assert layers.resolve_conv_impl("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ConfigError, match="conv_impl"):
    layers.resolve_conv_impl("winograd")


# ------------------------------------------------------------------------ gradients at depth


@functools.partial(jax.jit, static_argnums=0)
def _vjp_at_first_unit(graphdef, state, x, cotangent):
  """Logits, and d <cotangent, logits> / d (the first unit's input), in train mode."""
  model = nnx.merge(graphdef, state, copy=True)
  h0 = jax.nn.relu(model.stem_norm(model.stem(x), use_running_average=False))

  def logits(h):
    m = nnx.merge(graphdef, state, copy=True)
    for stage in m.stages:
      h = stage(h, train=True)
    return m.head(h.mean(axis=(1, 2)))

  z, vjp = jax.vjp(logits, h0)
  return z, vjp(cotangent)[0]


def _grad_norms(model, x, labels, readout):
  """|d loss / d h0| for the cross-entropy loss and for the linear loss <readout, logits>."""
  graphdef, state = nnx.split(model)
  z, g_lin = _vjp_at_first_unit(graphdef, state, x, readout)
  d_ce = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(z)
  _, g_ce = _vjp_at_first_unit(graphdef, state, x, d_ce)
  return float(jnp.linalg.norm(g_ce)), float(jnp.linalg.norm(g_lin))


def _zero_branches(model):
  """Zeroes each unit's last BN scale, so F = 0 and only the shortcut path carries signal."""
  for stage in model.stages:
    for unit in (stage.first, stage.rest):
      scale = unit.norms[-1].scale
      scale.set_value(jnp.zeros_like(scale[...]))


def test_shortcut_scaling_vanishes_the_shortcut_signal_at_depth():
  """ResNet-v2 Eq. 8: through 54 units' shortcuts a gradient is multiplied by prod(lambda_i).

  ResNet-110 (post-activation, option A) with shortcut scaling 0.5/1 against identity, same
  weights. On the shortcut path alone (branches zeroed) the gradient at the first unit shrinks by
  exactly 0.5^54 = 5.6e-17. With the branches on, the signal is "forced to flow through the weight
  layers" (Section 3.1) and does not vanish: each BN renormalises the shrinking stream, and the
  scaled net's gradient comes out larger than the identity net's, not smaller.
  """
  kw = dict(depth=110, num_classes=10, in_channels=1, conv_impl="xla")
  identity = nnx.jit(lambda: resnet.CifarResNet(
      shortcut=_shortcut(option="A"), rngs=make_rngs(), **kw))()
  scaled = nnx.eval_shape(lambda: resnet.CifarResNet(
      shortcut=_shortcut("scaling", option="A", scale=0.5, branch_scale=1.0), rngs=make_rngs(),
      **kw))
  nnx.update(scaled, nnx.state(identity))  # option A: no shortcut parameters in either
  x, labels = _normal((16, 8, 8, 1)), jnp.arange(16) % 10
  readout = _normal((16, 10), seed=1)
  grads = lambda m: _grad_norms(m, x, labels, readout)
  (id_ce, _), (sc_ce, _) = grads(identity), grads(scaled)
  assert sc_ce > id_ce > 0
  _zero_branches(identity)
  _zero_branches(scaled)
  (id_ce, id_lin), (sc_ce, sc_lin) = grads(identity), grads(scaled)
  assert sc_ce < 1e-12 * id_ce
  # Element by element the gradient is exactly 0.5^54 times the identity net's (powers of 2 commute
  # with rounding), and both norms sum in one order. But most of its squares (~1e-39) are float32
  # subnormals, which XLA flushes to 0 on any x86: they hold 8e-6 of the sum, 3.9e-6 of the norm,
  # for these (seeded, so everywhere equal) weights. 1e-3 is a margin on that measured loss, not a
  # rounding bound; a wrong power of 0.5 is 100% off.
  np.testing.assert_allclose(sc_lin / id_lin, 0.5 ** 54, rtol=1e-3)


# ------------------------------------------------------------------------ placements


def _bn(h):
  """BatchNorm in training at init: batch statistics over N, H, W; scale 1, bias 0."""
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  return (h - mean) / jnp.sqrt(var + 1e-5)


def _conv(h, w):
  return jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


REFERENCE = {  # ResNet-v2 Figure 4, as the resnet.py docstring orders BN, ReLU and the add.
    "post": lambda x, c1, c2: jax.nn.relu(x + _bn(c2(jax.nn.relu(_bn(c1(x)))))),
    "bn_after_add": lambda x, c1, c2: jax.nn.relu(_bn(x + c2(jax.nn.relu(_bn(c1(x)))))),
    "relu_before_add": lambda x, c1, c2: x + jax.nn.relu(_bn(c2(jax.nn.relu(_bn(c1(x)))))),
    "relu_preact": lambda x, c1, c2: x + _bn(c2(jax.nn.relu(_bn(c1(jax.nn.relu(x)))))),
    "preact": lambda x, c1, c2: x + c2(jax.nn.relu(_bn(c1(jax.nn.relu(_bn(x)))))),
}


def test_placements_follow_the_documented_order():
  assert set(REFERENCE) == set(resnet.PLACEMENTS)
  x = _normal((2, 6, 6, 4))
  w1, w2 = 0.3 * _normal((3, 3, 4, 4), seed=1), 0.3 * _normal((3, 3, 4, 4), seed=2)
  outputs = {}
  for placement, reference in REFERENCE.items():
    unit = resnet.Unit(4, 4, 1, kind="basic", placement=placement, shortcut=_shortcut(),
                       skip_preact=False, rngs=make_rngs())
    unit.convs[0].kernel.set_value(w1)
    unit.convs[1].kernel.set_value(w2)
    y = unit(x, train=True)
    expected = reference(x, lambda h: _conv(h, w1), lambda h: _conv(h, w2))
    assert_f32_close(y, expected, terms=2 * 6 * 6, depth=2, err_msg=placement)  # 2 convs, BN
    outputs[placement] = np.asarray(y)
  names = sorted(outputs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert np.abs(outputs[a] - outputs[b]).max() > 0.1, (a, b)


def test_preact_first_unit_skips_its_preactivation():
  """skip_preact: the stem's BN-ReLU already ran, so the first conv sees x as it is, and the unit
  has no BN there (one BN, before its second conv)."""
  x = _normal((2, 6, 6, 4))
  w1, w2 = 0.3 * _normal((3, 3, 4, 4), seed=1), 0.3 * _normal((3, 3, 4, 4), seed=2)
  unit = resnet.Unit(4, 4, 1, kind="basic", placement="preact", shortcut=_shortcut(),
                     skip_preact=True, rngs=make_rngs())
  assert len(unit.norms) == 1
  unit.convs[0].kernel.set_value(w1)
  unit.convs[1].kernel.set_value(w2)
  expected = x + _conv(jax.nn.relu(_bn(_conv(x, w1))), w2)
  assert_f32_close(unit(x, train=True), expected, terms=2 * 6 * 6, depth=2)


def test_batch_norm_with_written_backward_is_flax_batch_norm():
  """layers.BatchNorm (its own backward pass on CPU) against nnx.BatchNorm: output, gradients of
  input, scale and bias, and the running statistics, to float32 rounding of 256-term sums."""
  x = 3 * jnp.asarray(np.random.default_rng(0).standard_normal((16, 4, 4, 6)), jnp.float32) + 1
  w = jnp.arange(6, dtype=jnp.float32)

  def run(cls):
    bn = cls(6, momentum=0.9, epsilon=1e-5, rngs=make_rngs())
    bn.scale[...] = jnp.linspace(0.5, 1.5, 6)
    bn.bias[...] = jnp.linspace(-1, 1, 6)
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(x, params):
      m = nnx.merge(graphdef, params, stats, copy=True)
      y = m(x, use_running_average=False)
      return jnp.sum(jnp.sin(y) * w), (y, nnx.state(m, nnx.BatchStat))

    (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, grads, new_stats

  ours, flax = run(layers.BatchNorm), run(nnx.BatchNorm)
  assert_f32_close(ours[0], flax[0], terms=256, gain=4)
  for a, b in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(flax[1:])):
    assert_f32_close(a, b, terms=256, depth=2, gain=4)
  assert float(jnp.abs(ours[1][0]).max()) > 0.1  # the gradient is not trivially zero


def test_relu_is_jax_relu_and_keeps_what_its_gate_says():
  """layers.relu under either gate: jax.nn.relu's values and gradient exactly (zeros and negatives
  included), and forward mode under the output gate. On CPU, what its backward pass keeps: the
  float output (gate="output") or the bool mask alone (gate="mask"), never the pair."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 5, 8)), jnp.float32)
  x = x.at[0, 0, 0].set(0.0)
  t = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

  def loss(relu):  # multiplies and the gate alone: the same bits from either program on any CPU
    return lambda v: jnp.sum(relu(1.5 * v) * t)

  def kept(relu):
    _, vjp = jax.vjp(lambda v: relu(1.5 * v), x)
    return sorted(str(a.dtype) for a in jax.tree.leaves(vjp) if getattr(a, "size", 0) == x.size)

  for gate in layers.RELU_GATES:
    ours = functools.partial(layers.relu, gate=gate)
    np.testing.assert_array_equal(ours(x), jax.nn.relu(x))
    np.testing.assert_array_equal(jax.grad(loss(ours))(x), jax.grad(loss(jax.nn.relu))(x))
  np.testing.assert_array_equal(jax.jvp(layers.relu, (x,), (t,))[1],
                                jax.jvp(jax.nn.relu, (x,), (t,))[1])
  assert "bool" in kept(jax.nn.relu)
  if jax.default_backend() == "cpu":
    assert kept(layers.relu) == ["float32"]
    assert kept(functools.partial(layers.relu, gate="mask")) == ["bool"]


def test_relu_mask_gate_is_select_bit_for_bit():
  """The integer AND that applies the mask gives select's bits: +0.0 where masked (whatever the
  gradient there, NaN and -0.0 included), the gradient's own bits (NaN, -0.0, inf) where not."""
  g = jnp.asarray([np.nan, -0.0, np.inf, -np.inf, -1.5, 2.0, np.nan, -0.0, 1e-45, -3e38],
                  jnp.float32)
  mask = jnp.asarray([True, True, True, True, True, False, False, False, True, False])
  got = layers._select_bits(mask, g)
  want = jnp.where(mask, g, jnp.zeros_like(g))
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, jnp.uint32),
                                jax.lax.bitcast_convert_type(want, jnp.uint32))
