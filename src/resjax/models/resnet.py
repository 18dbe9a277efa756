"""CIFAR ResNets (ResNet-v1 Section 4.2, ResNet-v2 Section 4) with any shortcut and any BN/ReLU placement.

A unit is a stack of convolutions (basic: 3x3, 3x3; bottleneck: 1x1, 3x3, 1x1 x4) whose output ``f``
meets the carried input ``x`` through a ``Shortcut``. Where BN and ReLU sit is the unit's
``placement`` (ResNet-v2 Figure 4):

==================  =================================================================
post                conv-BN-ReLU ... conv-BN, add, ReLU       (a) original
bn_after_add        conv-BN-ReLU ... conv, add, BN, ReLU      (b)
relu_before_add     conv-BN-ReLU ... conv-BN-ReLU, add        (c)
relu_preact         ReLU-conv-BN ... ReLU-conv-BN, add        (d) ReLU-only pre-activation
preact              BN-ReLU-conv ... BN-ReLU-conv, add        (e) full pre-activation
==================  =================================================================

Pre-activation nets follow ResNet-v2's details: the stem's conv is followed by BN-ReLU and the first
unit skips its own pre-activation; a final BN-ReLU comes before pooling; a projecting shortcut takes
the pre-activated input.

Every stage is its first unit (which may change shape) followed by ``n - 1`` identical units. Those
run under ``jax.lax.scan`` over stacked parameters, so tracing and compile time do not grow with depth.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from resjax import shortcuts
from resjax.errors import ConfigError
from resjax.models.layers import Conv2D

PLACEMENTS = ("post", "bn_after_add", "relu_before_add", "relu_preact", "preact")
PREACT = ("relu_preact", "preact")
UNITS = {"basic": 2, "bottleneck": 3}  # convolutions per unit
BOTTLENECK_EXPANSION = 4


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Momentum 0.9 here is 0.1 in the Torch convention the papers used.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def conv(in_features: int, out_features: int, kernel: int, stride: int, rngs: nnx.Rngs, *,
         impl: str = "auto") -> Conv2D:
  return Conv2D(in_features, out_features, kernel, stride, impl=impl, rngs=rngs)


def units_per_stage(depth: int, unit: str) -> int:
  """n in depth = 6n + 2 (basic) or 9n + 2 (bottleneck)."""
  if unit not in UNITS:
    raise ConfigError(f"unknown unit {unit!r}: set config.model.unit to one of {', '.join(UNITS)}")
  per_unit = 3 * UNITS[unit]
  if depth < per_unit + 2 or (depth - 2) % per_unit:
    examples = ", ".join(str(per_unit * n + 2) for n in (1, 3, 5, 9, 18))
    raise ConfigError(f"depth {depth} is impossible for {unit} CIFAR ResNets, which have depth "
                      f"{per_unit}n+2 ({examples}, ...): set config.model.depth to one of these")
  return (depth - 2) // per_unit


class Unit(nnx.Module):
  """One residual unit: a conv stack F and a shortcut, with BN and ReLU where ``placement`` puts them."""

  def __init__(self, in_features: int, width: int, stride: int, *, kind: str, placement: str,
               shortcut, skip_preact: bool, conv_impl: str = "auto", rngs: nnx.Rngs):
    if placement not in PLACEMENTS:
      raise ConfigError(f"unknown placement {placement!r}: set config.model.placement to one of "
                        f"{', '.join(PLACEMENTS)}")
    self.placement = placement
    self.skip_preact = skip_preact
    if kind == "basic":
      layers = [(3, width, stride), (3, width, 1)]
    else:  # bottleneck; the stride sits on the 3x3 convolution
      layers = [(1, width, 1), (3, width, stride), (1, width * BOTTLENECK_EXPANSION, 1)]
    out_features = layers[-1][1]
    features = [in_features] + [f for _, f, _ in layers]
    self.convs = nnx.List([conv(features[i], f, k, s, rngs, impl=conv_impl)
                           for i, (k, f, s) in enumerate(layers)])
    # Pre-activation BNs act on each conv's input, the others on its output.
    norm_features = features[:-1] if placement == "preact" else features[1:]
    self.norms = nnx.List([batch_norm(f, rngs) for f in norm_features])
    self.shortcut = shortcuts.make_shortcut(shortcut, in_features, out_features, stride, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    p, last = self.placement, len(self.convs) - 1
    bn = lambda i, h: self.norms[i](h, use_running_average=not train)
    carried = x
    h = x
    for i, conv_i in enumerate(self.convs):
      skip = i == 0 and self.skip_preact
      if p == "preact":
        h = h if skip else jax.nn.relu(bn(i, h))
        if i == 0 and self.shortcut.projects:
          carried = h  # projections take the pre-activated input
        h = conv_i(h)
      elif p == "relu_preact":
        h = bn(i, conv_i(h if skip else jax.nn.relu(h)))
      else:
        h = conv_i(h)
        if i < last or p != "bn_after_add":
          h = bn(i, h)
        if i < last or p == "relu_before_add":
          h = jax.nn.relu(h)
    y = self.shortcut(carried, h, train=train)
    if p == "post":
      y = jax.nn.relu(y)
    elif p == "bn_after_add":
      y = jax.nn.relu(bn(last, y))
    return y


class Stage(nnx.Module):
  """A first unit, then ``n - 1`` identical units that run under a scan (or a Python loop)."""

  def __init__(self, n: int, in_features: int, width: int, stride: int, *, scan: bool,
               skip_first_preact: bool, rngs: nnx.Rngs, **unit_kw):
    self.first = Unit(in_features, width, stride, skip_preact=skip_first_preact, rngs=rngs,
                      **unit_kw)
    features = width * (BOTTLENECK_EXPANSION if unit_kw["kind"] == "bottleneck" else 1)
    self.scan = scan and n > 1
    make = lambda r: Unit(features, width, 1, skip_preact=False, rngs=r, **unit_kw)
    if self.scan:
      @nnx.split_rngs(splits=n - 1)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_stacked(r):
        return make(r)
      self.rest = make_stacked(rngs)
    else:
      self.rest = nnx.List([make(rngs) for _ in range(n - 1)])
    self.out_features = features

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.first(x, train=train)
    if not self.scan:
      for unit in self.rest:
        x = unit(x, train=train)
      return x
    graphdef, stacked = nnx.split(self.rest)

    def body(h, unit_state):
      unit = nnx.merge(graphdef, unit_state, copy=True)
      h = unit(h, train=train)
      return h, nnx.state(unit, nnx.Not(nnx.Param))  # parameters come back unchanged: skip them

    x, updated = jax.lax.scan(body, x, stacked)
    nnx.update(self.rest, updated)  # BatchNorm statistics and RNG counters
    return x


class CifarResNet(nnx.Module):
  """A 3-stage CIFAR ResNet: conv3x3 stem, stages of n units at widths 16/32/64, pool, Dense."""

  def __init__(self, *, depth: int, num_classes: int, shortcut, in_channels: int = 3,
               unit: str = "basic", placement: str = "post", widths=(16, 32, 64), scan: bool = True,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    n = units_per_stage(depth, unit)
    shortcuts.check_name(shortcut.name)
    self.depth = depth
    self.preact = placement in PREACT
    self.stem = conv(in_channels, widths[0], 3, 1, rngs, impl=conv_impl)
    self.stem_norm = batch_norm(widths[0], rngs)
    stages, features = [], widths[0]
    for s, width in enumerate(widths):
      stage = Stage(n, features, width, 1 if s == 0 else 2, scan=scan,
                    skip_first_preact=self.preact and s == 0, kind=unit, placement=placement,
                    shortcut=shortcut, conv_impl=conv_impl, rngs=rngs)
      stages.append(stage)
      features = stage.out_features
    self.stages = nnx.List(stages)
    self.final_norm = batch_norm(features, rngs) if self.preact else None
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = self.stem(x)
    h = jax.nn.relu(self.stem_norm(h, use_running_average=not train))
    for stage in self.stages:
      h = stage(h, train=train)
    if self.final_norm is not None:
      h = jax.nn.relu(self.final_norm(h, use_running_average=not train))
    return self.head(jnp.mean(h, axis=(1, 2)))


def cifar_from_config(model_cfg, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> CifarResNet:
  return CifarResNet(
      depth=model_cfg.depth, num_classes=num_classes, in_channels=in_channels,
      shortcut=model_cfg.shortcut, unit=model_cfg.get("unit", "basic"),
      placement=model_cfg.get("placement", "post"),
      widths=tuple(model_cfg.get("widths", (16, 32, 64))), scan=model_cfg.get("scan", True),
      conv_impl=model_cfg.get("conv_impl", "auto"), rngs=rngs)


def cifar_repeats(model_cfg, k: int):
  """The same CIFAR ResNet with k units per stage, and its real units per stage."""
  unit = model_cfg.get("unit", "basic")
  out = copy.deepcopy(model_cfg)
  out.depth = 3 * UNITS[unit] * k + 2
  return out, units_per_stage(model_cfg.depth, unit)
