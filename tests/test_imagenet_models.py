"""Tests for ImageNet ResNets, the 1-layer-skip unit, zero_init_residual and the probe hooks."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import assert_f32_close, make_rngs
from resjax import inspect_model
from resjax.errors import ConfigError
from resjax.models import resnet


def _n_params(module, kernels_only=False):
  state = nnx.state(module, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return sum(int(np.prod(a.shape)) for path, a in leaves
             if not kernels_only or "'kernel'" in jax.tree_util.keystr(path))


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _shortcut(name="identity", option="B", **fields):
  return ml_collections.ConfigDict({"name": name, "option": option, **fields})


def _imagenet_cfg(depth, option="B", name="identity", **model):
  return ml_collections.ConfigDict(dict(name="imagenet_resnet", depth=depth,
                                        shortcut=dict(name=name, option=option), **model))


def _abstract_imagenet(depth, option="B", name="identity", num_classes=1000, **model):
  cfg = _imagenet_cfg(depth, option, name, **model)
  return nnx.eval_shape(lambda: resnet.imagenet_from_config(
      cfg, num_classes=num_classes, in_channels=3, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------------ parameter counts

# torchvision's option-B ResNets (v1.5: the stride on the 3x3 conv, which moves no parameter).
TORCHVISION = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_option_b_parameter_counts_equal_torchvision(depth):
  assert _n_params(_abstract_imagenet(depth)) == TORCHVISION[depth]


def _projection(c_in, c_out):
  return c_in * c_out + 2 * c_out  # 1x1 conv, BN scale and bias


def test_options_a_c_and_plain_nets_by_hand():
  """ResNet-34: A drops B's three stage-entry projections; C adds one to each of the other 13 units."""
  b = TORCHVISION[34]
  entry = _projection(64, 128) + _projection(128, 256) + _projection(256, 512)
  assert _n_params(_abstract_imagenet(34, "A")) == b - entry == 21_623_848
  others = (3 * _projection(64, 64) + 3 * _projection(128, 128) + 5 * _projection(256, 256)
            + 2 * _projection(512, 512))
  assert _n_params(_abstract_imagenet(34, "C")) == b + others
  assert _n_params(_abstract_imagenet(34, name="none")) == b - entry
  b18 = TORCHVISION[18]
  assert _n_params(_abstract_imagenet(18, name="none")) == b18 - entry


def _resnet_1k_by_hand(depth):
  """resnet-pre-act.lua (KaimingHe/resnet-1k-layers), module by module: the stem conv; per stage a
  unit that changes shape (common BN, 1x1 conv, BN, 3x3 conv, BN, 1x1 conv, and a projection that
  is a 1x1 conv alone) and n - 1 units of BN-conv three times; the final BN and the Linear."""
  n, total, c = (depth - 2) // 9, 3 * 9 * 16, 16
  for k in (16, 32, 64):
    total += 2 * c + c * k + 2 * k + 9 * k * k + 2 * k + k * 4 * k + c * 4 * k
    total += (n - 1) * (2 * 4 * k + 4 * k * k + 2 * k + 9 * k * k + 2 * k + k * 4 * k)
    c = 4 * k
  return total + 2 * 256 + 256 * 10 + 10


def _preact_cifar(depth, **kw):
  return nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=depth, num_classes=10, unit="bottleneck", placement="preact", shortcut=_shortcut(),
      rngs=nnx.Rngs(0), **kw))


def test_preact_cifar_bottleneck_counts():
  """ResNet-v2: pre-act ResNet-164 has 1.7M parameters and ResNet-1001 10.2M (CIFAR-10).

  Exactly the released code's 1,703,258 and 10,327,706. The paper's 10.2M is the weights of
  convolutions and the classifier (10.18M); BN's scale and bias add 0.15M at 1001 layers.
  """
  assert (_resnet_1k_by_hand(164), _resnet_1k_by_hand(1001)) == (1_703_258, 10_327_706)
  m164, m1001 = _preact_cifar(164), _preact_cifar(1001)
  assert m164.head.kernel.shape == (256, 10) and m164.final_norm is not None
  assert _n_params(m164) == 1_703_258 and round(_n_params(m164) / 1e5) / 10 == 1.7
  assert _n_params(m1001) == 10_327_706
  assert round(_n_params(m1001, kernels_only=True) / 1e5) / 10 == 10.2


def test_preact_cifar_bottleneck_units_are_resnet_1k_layers():
  """The stride on the first 1x1 conv, a projection without BN, no BN where the first unit skips
  its pre-activation; the post-activation bottleneck keeps the stride on its 3x3 and BN after
  the projection."""
  model = _preact_cifar(20)
  first = model.stages[0].first
  assert first.skip_preact and [n.num_features for n in first.norms] == [16, 16]
  for stage, norms in zip(model.stages[1:], ([64, 32, 32], [128, 64, 64])):
    unit = stage.first
    assert [c.stride for c in unit.convs] == [2, 1, 1]
    assert unit.shortcut.projects and unit.shortcut.match.norm is None
    assert [n.num_features for n in unit.norms] == norms
  post = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=20, num_classes=10, unit="bottleneck", placement="post", shortcut=_shortcut(),
      rngs=nnx.Rngs(0)))
  assert [c.stride for c in post.stages[1].first.convs] == [1, 2, 1]
  assert post.stages[1].first.shortcut.match.norm is not None


def _strided_conv(h, w, stride):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(h, w, (stride, stride), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_preact_bottleneck_unit_against_resnet_1k_layers():
  """A unit that changes shape, as resnet-pre-act.lua computes it: a = ReLU(BN(x)) feeds both the
  branch (1x1 stride 2, BN-ReLU, 3x3, BN-ReLU, 1x1) and the projection (1x1 stride 2)."""
  unit = resnet.Unit(8, 4, 2, kind="bottleneck", placement="preact", shortcut=_shortcut(),
                     skip_preact=False, stride_first=True, projection_norm=False, rngs=make_rngs())
  x = _normal((2, 6, 6, 8))
  ws = [c.kernel[...] for c in unit.convs]
  proj = unit.shortcut.match.proj.kernel[...]
  a = jax.nn.relu(_bn(x))
  h = _strided_conv(a, ws[0], 2)
  h = _strided_conv(jax.nn.relu(_bn(h)), ws[1], 1)
  h = _strided_conv(jax.nn.relu(_bn(h)), ws[2], 1)
  expected = a[:, ::2, ::2] @ proj + h
  # Another program for the same function: 3 chained convs with BN, the longest sum BN's 2*6*6.
  assert_f32_close(unit(x, train=True), expected, terms=2 * 6 * 6, depth=3)


def test_layout_errors_are_one_line():
  for kwargs, words in [(dict(depth=42), "config.model.depth"),
                        (dict(depth=50, unit="basic"), "config.model.unit=bottleneck"),
                        (dict(depth=18, stage_units=(2, 2, 2)), "stage_units")]:
    with pytest.raises(ConfigError) as e:
      resnet.imagenet_layout(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
  assert resnet.imagenet_layout(50) == ("bottleneck", (3, 4, 6, 3))
  assert resnet.imagenet_layout(200) == ("bottleneck", (3, 24, 36, 3))


# ------------------------------------------------------------------------ multiply-adds


def _taps(size, k, stride):
  """Kernel taps along one axis summed over the outputs: (every tap, taps inside the image)."""
  p, out = k // 2, -(-size // stride)
  inside = sum(1 for o in range(out) for t in range(k) if 0 <= o * stride - p + t < size)
  return out * k, inside


def _imagenet_macs(depth):
  """Multiply-adds of every convolution and the classifier, (every tap, taps inside the image)."""
  unit, counts = resnet.IMAGENET_DEPTHS[depth]
  convs = [(224, 7, 2, 3, 64)]  # (input size, kernel, stride, in, out)
  size, c = 56, 64
  for s, (n, w) in enumerate(zip(counts, (64, 128, 256, 512))):
    for i in range(n):
      st = 2 if s > 0 and i == 0 else 1
      if unit == "basic":
        convs += [(size, 3, st, c, w), (-(-size // st), 3, 1, w, w)]
        out = w
      else:
        convs += [(size, 1, 1, c, w), (size, 3, st, w, w), (-(-size // st), 1, 1, w, 4 * w)]
        out = 4 * w
      if st != 1 or c != out:
        convs.append((size, 1, st, c, out))
      size, c = -(-size // st), out
  every = sum(_taps(h, k, s)[0] ** 2 * i * o for h, k, s, i, o in convs) + c * 1000
  inside = sum(_taps(h, k, s)[1] ** 2 * i * o for h, k, s, i, o in convs) + c * 1000
  return every, inside


def test_every_tap_multiply_adds_are_the_papers():
  """ResNet-v1 counts every kernel tap: ResNet-18 1.8G, ResNet-34 3.66G, ResNet-50 4.09G."""
  assert round(_imagenet_macs(18)[0] / 1e8) / 10 == 1.8
  assert round(_imagenet_macs(34)[0] / 1e7) / 100 == 3.66
  assert round(_imagenet_macs(50)[0] / 1e7) / 100 == 4.09


@functools.cache
def _xla_macs(depth):
  """Forward multiply-adds as describe counts them: XLA's flops / 2, one unit per stage at a time.

  describe takes f(1 unit per stage) and, for each stage s, f(2 units in s) - f(1) as the cost of
  one of its units; the stages differ in length, so the net is f1 + sum_s (n_s - 1) (f_s - f1).
  """
  # conv_impl is named so that forward_flops counts XLA's convolution, as on an accelerator.
  c = ml_collections.ConfigDict(dict(data=dict(name="imagenet2012"),
                                     model=_imagenet_cfg(depth, conv_impl="auto")))
  one, counts = resnet.imagenet_repeats(c.model, 1)
  with jax.default_prng_impl("rbg"):
    f1 = inspect_model.forward_flops(c, one)
    total = f1
    for s, n in enumerate(counts):
      k = tuple(2 if i == s else 1 for i in range(len(counts)))
      total += (n - 1) * (inspect_model.forward_flops(c, resnet.imagenet_repeats(c.model, k)[0]) - f1)
  return total / 2


@pytest.mark.parametrize("depth, paper", [(34, 3.6e9), (50, 4.1e9)])
def test_xla_multiply_adds(depth, paper):
  """XLA's count is the in-image taps (+1.5% elementwise work), 7.5% (34) and 2% (50) below the paper.

  XLA's convolution cost leaves out the taps that fall on the zero padding, which on ResNet-34's
  7x7 maps are 18% of each 3x3 convolution; the paper counts every tap.
  """
  every, inside = _imagenet_macs(depth)
  macs = _xla_macs(depth)
  assert inside < macs < 1.02 * inside
  assert 0.9 * paper < macs < paper
  assert abs(every / paper - 1) < 0.02


def test_repeats_per_stage():
  cfg = _imagenet_cfg(101)
  two, counts = resnet.imagenet_repeats(cfg, 2)
  assert counts == (3, 4, 23, 3)
  assert two.unit == "bottleneck" and tuple(two.stage_units) == (2, 2, 2, 2)
  mixed, _ = resnet.imagenet_repeats(cfg, (1, 2, 1, 3))
  model = nnx.eval_shape(lambda: resnet.imagenet_from_config(
      mixed, num_classes=10, in_channels=3, rngs=nnx.Rngs(0)))
  assert [st.n for st in model.stages] == [1, 2, 1, 3]
  assert cfg.get("stage_units") is None  # the caller's config is untouched


# ------------------------------------------------------------------------ stem, v2 details, probes


def test_stem_max_pool_ignores_padding():
  """3x3/2 max pooling with padding 1: a padded cell never wins, even over negative values."""
  x = -1.0 - jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  y = resnet.max_pool_3x3_s2(x)
  assert y.shape == (2, 3, 3, 1)
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                            for j in range(3)], 1) for i in range(3)], 1)
  np.testing.assert_array_equal(y, ref)


def test_imagenet_probe_shapes_at_224():
  model = _abstract_imagenet(50)
  shapes = model.probe_shapes((8, 224, 224, 3))
  assert shapes[:4] == [(1, 8, 56, 56, 64), (2, 8, 56, 56, 256), (1, 8, 56, 56, 256),
                        (3, 8, 28, 28, 512)]
  assert shapes[-1] == (2, 8, 7, 7, 2048)
  assert sum(s[0] for s in shapes) == 16


def _tiny_imagenet(placement):
  cfg = _imagenet_cfg(18, placement=placement, stage_units=(2, 1, 1, 2), unit="basic",
                      widths=(4, 8, 8, 8), stem_width=4, conv_impl="xla")
  return nnx.eval_shape(lambda: resnet.imagenet_from_config(
      cfg, num_classes=5, in_channels=3, rngs=make_rngs()))


def test_v1_and_v2_details():
  """v2 (preact): the first unit skips its pre-activation, a final BN-ReLU; v1 (post) has neither."""
  for placement in ("post", "preact"):
    model = _tiny_imagenet(placement)
    assert (model.final_norm is not None) == (placement == "preact")
    assert model.stages[0].first.skip_preact == (placement == "preact")
    assert not any(st.first.skip_preact for st in model.stages[1:])


def test_tiny_imagenet_net_runs_with_probes():
  """Probes fit every unit's input, rms has one value per unit, zero probes change nothing."""
  model = _tiny_imagenet("preact")
  x = _normal((2, 32, 32, 3))
  shapes = model.probe_shapes(x.shape)
  assert [s[0] for s in shapes] == [1, 1, 1, 1, 1, 1]
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: 0.3 * _normal(a.shape) if a.ndim > 1 else jnp.ones(a.shape), state)

  @jax.jit
  def run(state, probes):
    m = nnx.merge(graphdef, state, copy=True)
    return m(x, train=True), m(x, train=True, probes=probes)

  plain, (logits, rms) = run(state, [jnp.zeros(s) for s in shapes])
  assert logits.shape == (2, 5) and [r.shape for r in rms] == [(s[0],) for s in shapes]
  # x + 0 is x exactly, but the probed forward is another graph that XLA fuses differently (BN's
  # sums in another order), so the logits agree to rounding: 14 chained layers (the stem, 12
  # convs, the head), each with BN, the longest sum the stem BN's 2*16*16.
  assert_f32_close(logits, plain, terms=2 * 16 * 16, depth=14)
  assert all(float(r.min()) > 0 for r in rms)


# ------------------------------------------------------------------------ 1-layer skip


def test_single_unit_depth_rule():
  """ResNet-110 with 1-layer skip (ResNet-v2 Table 3): 108 units, 36 per stage, depth 3n+2."""
  assert resnet.units_per_stage(110, "single") == 36
  with pytest.raises(ConfigError, match=r"3n\+2"):
    resnet.units_per_stage(111, "single")
  model = nnx.eval_shape(lambda: resnet.CifarResNet(
      depth=110, num_classes=10, unit="single", shortcut=_shortcut(), rngs=nnx.Rngs(0)))
  assert sum(s[0] for s in model.probe_shapes((1, 32, 32, 3))) == 108
  assert len(model.stages[1].rest.convs) == 1


def _bn(h):
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  return (h - mean) / jnp.sqrt(var + 1e-5)


def _conv(h, w):
  return jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


SINGLE = {  # ResNet-v2 Figure 4's placements with one 3x3 conv in the branch
    "post": lambda x, c: jax.nn.relu(x + _bn(c(x))),
    "bn_after_add": lambda x, c: jax.nn.relu(_bn(x + c(x))),
    "relu_before_add": lambda x, c: x + jax.nn.relu(_bn(c(x))),
    "relu_preact": lambda x, c: x + _bn(c(jax.nn.relu(x))),
    "preact": lambda x, c: x + c(jax.nn.relu(_bn(x))),
}


@pytest.mark.parametrize("placement", resnet.PLACEMENTS)
def test_single_unit_placements(placement):
  x = _normal((2, 6, 6, 4))
  w = 0.3 * _normal((3, 3, 4, 4), seed=1)
  unit = resnet.Unit(4, 4, 1, kind="single", placement=placement, shortcut=_shortcut(),
                     skip_preact=False, rngs=make_rngs())
  assert len(unit.convs) == 1 and len(unit.norms) == 1
  unit.convs[0].kernel.set_value(w)
  # One conv with BN against the same in jnp: the longest sum BN's 2*6*6.
  assert_f32_close(unit(x, train=True), SINGLE[placement](x, lambda h: _conv(h, w)),
                   terms=2 * 6 * 6)


# ------------------------------------------------------------------------ zero_init_residual

STARTS_AS_SHORTCUT = {  # y at init with F = 0, for x >= 0 (a post-ReLU input) and shortcut 0.5 x
    "post": lambda x: jax.nn.relu(0.5 * x),
    "bn_after_add": lambda x: jax.nn.relu(_bn(0.5 * x)),
    "relu_before_add": lambda x: 0.5 * x,
    "relu_preact": lambda x: 0.5 * x,
    "preact": lambda x: 0.5 * x,
}


@pytest.mark.parametrize("kind", ["single", "basic", "bottleneck"])
@pytest.mark.parametrize("placement", resnet.PLACEMENTS)
def test_zero_init_units_start_as_their_shortcut(kind, placement):
  features = 8 if kind == "bottleneck" else 2  # width 2: a bottleneck maps 8 -> 8
  unit = resnet.Unit(features, 2, 1, kind=kind, placement=placement, zero_init=True,
                     shortcut=_shortcut("scaling", scale=0.5, branch_scale=1.0),
                     skip_preact=False, rngs=make_rngs())
  x = jnp.abs(_normal((2, 5, 5, features)))
  y, expected = unit(x, train=True), STARTS_AS_SHORTCUT[placement](x)
  if placement == "bn_after_add":
    # BN of 0.5 x, 2*5*5 terms, by flax (var = E[x^2] - E[x]^2) and by _bn: for x = |N(0, 1)| the
    # variance cancels, amplifying rounding by E[x^2] / var = 1 / (1 - 2 / pi) < 3.
    assert_f32_close(y, expected, terms=2 * 5 * 5, gain=3)
  else:
    # Bitwise: F is exactly 0 (0 * a finite value, + 0), 0.5 x is exact and x + 0 is x.
    np.testing.assert_array_equal(y, expected)
  # Only the branch's last BN scale (or, ending in a conv, its kernel) starts at zero.
  scales = [float(jnp.abs(n.scale[...]).max()) for n in unit.norms]
  kernels = [float(jnp.abs(c.kernel[...]).max()) for c in unit.convs]
  if placement in ("bn_after_add", "preact"):
    assert kernels[-1] == 0 and min(kernels[:-1] + [1]) > 0 and min(scales) == 1
  else:
    assert scales[-1] == 0 and min(scales[:-1] + [1]) == 1 and min(kernels) > 0


def test_zero_init_residual_from_config():
  cfg = _imagenet_cfg(18, zero_init_residual=True)
  model = nnx.eval_shape(lambda: resnet.imagenet_from_config(
      cfg, num_classes=10, in_channels=3, rngs=nnx.Rngs(0)))
  assert model.stages[2].rest.norms[-1].scale.shape == (1, 256)
  cifar = ml_collections.ConfigDict(dict(name="cifar_resnet", depth=8, zero_init_residual=True,
                                         shortcut=dict(name="identity", option="A")))
  built = nnx.jit(lambda: resnet.cifar_from_config(cifar, num_classes=10, in_channels=1,
                                                   rngs=make_rngs()))()
  assert float(jnp.abs(built.stages[1].first.norms[-1].scale[...]).max()) == 0
  assert float(jnp.abs(built.stages[1].first.norms[0].scale[...]).min()) == 1
