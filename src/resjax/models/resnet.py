"""ResNets for CIFAR (ResNet-v1 Section 4.2, ResNet-v2 Section 4) and ImageNet (ResNet-v1 Table 1).

A unit is a stack of convolutions whose output ``f`` meets the carried input ``x`` through a
``Shortcut``:

==========  ====================================  =========================================
single      3x3                                    ResNet-v2 Table 3, "1-layer skip"
basic       3x3, 3x3                               ResNet-v1 (18, 34, CIFAR 6n+2)
bottleneck  1x1 k, 3x3 k, 1x1 4k                   ResNet-v1 (50+), ResNet-v2 (164, 1001)
==========  ====================================  =========================================

Where BN and ReLU sit is the unit's ``placement`` (ResNet-v2 Figure 4):

==================  =================================================================
post                conv-BN-ReLU ... conv-BN, add, ReLU       (a) original
bn_after_add        conv-BN-ReLU ... conv, add, BN, ReLU      (b)
relu_before_add     conv-BN-ReLU ... conv-BN-ReLU, add        (c)
relu_preact         ReLU-conv-BN ... ReLU-conv-BN, add        (d) ReLU-only pre-activation
preact              BN-ReLU-conv ... BN-ReLU-conv, add        (e) full pre-activation
==================  =================================================================

A single-conv unit is the same list with one conv (post: conv-BN, add, ReLU; ...).

Pre-activation nets follow ResNet-v2's details: the stem's conv is followed by BN-ReLU and the first
unit skips its own pre-activation (and has no BN there); a final BN-ReLU comes before pooling; a
projecting shortcut takes the pre-activated input.

The CIFAR pre-activation bottleneck nets (ResNet-164, ResNet-1001) follow one source, the authors'
released code for ResNet-1001 (KaimingHe/resnet-1k-layers, resnet-pre-act.lua): a unit that changes
shape applies BN-ReLU once and feeds both paths from it (lines 64-66), strides its first 1x1 conv
(line 70) and projects with a 1x1 conv alone, no BN (line 83). Its stem is a bare conv (line 114)
and stage 1 opens with such a unit, so its BN-ReLU is the one resjax calls the stem's: the same
function and parameters. Other bottleneck nets put the stride on the 3x3 conv (see ImageNetResNet).

BatchNorm's running variance: flax averages the biased batch variance (over the N values per
channel); Torch and Caffe, the papers' frameworks, average the unbiased one, N / (N - 1) times
larger. Only evaluation uses the running variance, and N >= 8192 per channel in a CIFAR net at
batch 128 (8x8 maps), so evaluation differs from theirs by a factor of at most 1 + 6e-5 on each BN's
output scale; resjax keeps flax's.

``zero_init_residual``: each branch's last BN scale starts at 0 (for branches that end in a conv,
bn_after_add and preact, that conv's kernel), so every unit starts as its shortcut alone. Then the
gradient reaching a unit's input is exactly ResNet-v2 Eq. 8's shortcut term.

Every stage is its first unit (which may change shape) followed by ``n - 1`` identical units. Those
run under ``jax.lax.scan`` over stacked parameters, so tracing and compile time do not grow with depth.
``remat`` (``layers.REMATS``; "auto": full on CPU for a stack over ``layers.AUTO_REMAT_KEPT_GIB``)
recomputes the scanned units' activations in the backward pass instead of keeping them, so memory
does not grow with depth as fast either.

Signal-propagation probes (``resjax.diagnose``): ``model.probe_shapes(input_shape)`` lists one
``(units, *unit_input_shape)`` per stack of same-shaped units (each stage's first unit, then its
other ``n - 1``); ``model(x, train=..., probes=zeros)`` adds each unit's probe slice to that unit's
input, so d loss / d probe is d loss / d unit input, and returns ``(logits, rms)`` with the RMS of
every unit's input activation, one ``(units,)`` array per stack.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from resjax.errors import ConfigError
from resjax.models import layers, shortcuts
from resjax.models.layers import Conv2D, rms

PLACEMENTS = ("post", "bn_after_add", "relu_before_add", "relu_preact", "preact")
PREACT = ("relu_preact", "preact")
ENDS_IN_CONV = ("bn_after_add", "preact")  # placements whose branch F ends with a convolution
UNITS = {"single": 1, "basic": 2, "bottleneck": 3}  # convolutions per unit
BOTTLENECK_EXPANSION = 4

# ResNet-v1 Table 1 (and ResNet-v2's ResNet-200): depth -> unit, units per stage.
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def batch_norm(features: int, rngs: nnx.Rngs, *, zero_scale: bool = False) -> nnx.BatchNorm:
  # Momentum 0.9 here is 0.1 in the Torch convention the papers used. The running variance
  # averages the biased batch variance, not Torch's and Caffe's unbiased one (module docstring).
  scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
  return layers.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=scale_init,
                          rngs=rngs)


def conv(in_features: int, out_features: int, kernel: int, stride: int, rngs: nnx.Rngs, *,
         impl: str = "auto") -> Conv2D:
  return Conv2D(in_features, out_features, kernel, stride, impl=impl, rngs=rngs)


def check_unit(unit: str) -> None:
  if unit not in UNITS:
    raise ConfigError(f"unknown unit {unit!r}: set config.model.unit to one of {', '.join(UNITS)}")


def units_per_stage(depth: int, unit: str) -> int:
  """n in depth = 3n + 2 (single), 6n + 2 (basic) or 9n + 2 (bottleneck)."""
  check_unit(unit)
  per_unit = 3 * UNITS[unit]
  if depth < per_unit + 2 or (depth - 2) % per_unit:
    examples = ", ".join(str(per_unit * n + 2) for n in (1, 3, 5, 9, 18))
    raise ConfigError(f"depth {depth} is impossible for {unit} CIFAR ResNets, which have depth "
                      f"{per_unit}n+2 ({examples}, ...): set config.model.depth to one of these")
  return (depth - 2) // per_unit


def with_conv_impl(shortcut_cfg, conv_impl: str):
  """The shortcut config with the model's conv_impl, for shortcuts that convolve (a highway gate)."""
  if shortcut_cfg.get("conv_impl", None) == conv_impl:
    return shortcut_cfg
  out = copy.deepcopy(shortcut_cfg)
  with out.unlocked(), out.ignore_type():
    out.conv_impl = conv_impl
  return out


class Unit(nnx.Module):
  """One residual unit: a conv stack F and a shortcut, with BN and ReLU where ``placement`` puts them.

  ``stride_first``: a bottleneck strides its first 1x1 conv instead of its 3x3 conv.
  ``projection_norm=False``: a projecting shortcut is a 1x1 conv without BN. resnet-pre-act.lua
  does both (module docstring); the defaults are torchvision's.
  """

  def __init__(self, in_features: int, width: int, stride: int, *, kind: str, placement: str,
               shortcut, skip_preact: bool, conv_impl: str = "auto", zero_init: bool = False,
               stride_first: bool = False, projection_norm: bool = True, rngs: nnx.Rngs):
    if placement not in PLACEMENTS:
      raise ConfigError(f"unknown placement {placement!r}: set config.model.placement to one of "
                        f"{', '.join(PLACEMENTS)}")
    check_unit(kind)
    self.placement = placement
    self.skip_preact = skip_preact
    if kind == "single":
      layers = [(3, width, stride)]
    elif kind == "basic":
      layers = [(3, width, stride), (3, width, 1)]
    else:  # bottleneck, strided on its 1x1 or its 3x3 convolution
      s1, s3 = (stride, 1) if stride_first else (1, stride)
      layers = [(1, width, s1), (3, width, s3), (1, width * BOTTLENECK_EXPANSION, 1)]
    out_features = layers[-1][1]
    features = [in_features] + [f for _, f, _ in layers]
    self.convs = nnx.List([conv(features[i], f, k, s, rngs, impl=conv_impl)
                           for i, (k, f, s) in enumerate(layers)])
    # Pre-activation BNs act on each conv's input, the others on its output. A pre-act unit that
    # skips its first pre-activation has no BN there.
    norm_features = features[:-1] if placement == "preact" else features[1:]
    self.norm_offset = int(placement == "preact" and skip_preact)
    norm_features = norm_features[self.norm_offset:]
    last = len(norm_features) - 1
    # zero_init: F's last BN scale is 0 where F ends in a BN (for relu_before_add, BN then ReLU).
    zero_bn = zero_init and placement not in ENDS_IN_CONV
    self.norms = nnx.List([batch_norm(f, rngs, zero_scale=zero_bn and i == last)
                           for i, f in enumerate(norm_features)])
    if zero_init and placement in ENDS_IN_CONV:
      kernel = self.convs[-1].kernel
      kernel.set_value(jnp.zeros_like(kernel[...]))
    self.shortcut = shortcuts.make_shortcut(shortcut, in_features, out_features, stride, rngs=rngs)
    if not projection_norm and self.shortcut.projects and hasattr(self.shortcut, "match"):
      self.shortcut.match.norm = None  # the projection is a 1x1 conv alone

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    p, last = self.placement, len(self.convs) - 1
    bn = lambda i, h: self.norms[i - self.norm_offset](h, use_running_average=not train)
    carried = x
    h = x
    for i, conv_i in enumerate(self.convs):
      skip = i == 0 and self.skip_preact
      if p == "preact":
        h = h if skip else layers.relu(bn(i, h))
        if i == 0 and self.shortcut.projects:
          carried = h  # projections take the pre-activated input
        h = conv_i(h)
      elif p == "relu_preact":
        h = bn(i, conv_i(h if skip else layers.relu(h)))
      else:
        h = conv_i(h)
        if i < last or p != "bn_after_add":
          h = bn(i, h)
        if i < last:
          h = layers.relu(h)
        elif p == "relu_before_add":
          h = layers.relu(h, gate="mask")
    # ReLU's backward gate: its output where that is a convolution's input (kept anyway), else a
    # bool mask, a quarter of a map (here, the unit's output, and before the pooling).
    y = self.shortcut(carried, h, train=train)
    if p == "post":
      y = layers.relu(y, gate="mask")
    elif p == "bn_after_add":
      y = layers.relu(bn(last, y), gate="mask")
    return y


class Stage(nnx.Module):
  """A first unit, then ``n - 1`` identical units that run under a scan (or a Python loop).

  With ``probes`` (one ``[1, ...]`` array for the first unit, and one ``[n - 1, ...]`` for the
  others when n > 1), each unit's input gets its probe added and its RMS recorded; the scan carries
  the probes as scanned inputs and the RMS values as scanned outputs.
  """

  def __init__(self, n: int, in_features: int, width: int, stride: int, *, scan: bool,
               skip_first_preact: bool, remat: str = "none", rngs: nnx.Rngs, **unit_kw):
    self.first = Unit(in_features, width, stride, skip_preact=skip_first_preact, rngs=rngs,
                      **unit_kw)
    features = width * (BOTTLENECK_EXPANSION if unit_kw["kind"] == "bottleneck" else 1)
    self.n, self.in_features, self.stride = n, in_features, stride
    self.scan = scan and n > 1
    self.remat = layers.check_remat(remat)
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

  @property
  def num_stacks(self) -> int:
    """Stacks of same-shaped units: the first unit, then the other n - 1 if there are any."""
    return 2 if self.n > 1 else 1

  def probe_shapes(self, in_shape: tuple) -> tuple[list[tuple], tuple]:
    """The stage's probe shapes for an input of ``in_shape`` (NHWC), and its output shape."""
    b, h, w, _ = in_shape
    shapes = [(1, b, h, w, self.in_features)]
    out = (b, -(-h // self.stride), -(-w // self.stride), self.out_features)
    if self.n > 1:
      shapes.append((self.n - 1, *out))
    return shapes, out

  def __call__(self, x: jax.Array, *, train: bool, probes=None):
    input_rms = []
    if probes is not None:
      x = x + probes[0][0]
      input_rms.append(rms(x)[None])
    x = self.first(x, train=train)
    rest_probes = probes[1] if probes is not None and self.n > 1 else None
    x, rest_rms = layers.run_units(self.rest, lambda unit, h: unit(h, train=train), x,
                                   rest_probes, scan=self.scan, remat=self.remat)
    if rest_rms is not None:
      input_rms.append(rest_rms)
    return x if probes is None else (x, input_rms)


class ResNet(nnx.Module):
  """What CIFAR and ImageNet ResNets share: stages of units, an optional final BN-ReLU, pool, Dense.

  Subclasses build ``stem``/``stem_norm``, ``stages``, ``final_norm`` and ``head`` and define
  ``stem_forward`` and ``stem_shape``.
  """

  def _build_stages(self, counts, widths, strides, in_features: int, *, unit: str, placement: str,
                    shortcut, scan: bool, conv_impl: str, zero_init_residual: bool,
                    remat: str, rngs: nnx.Rngs, **unit_kw) -> int:
    shortcuts.check_name(shortcut.name)
    self.preact = placement in PREACT
    shortcut = with_conv_impl(shortcut, conv_impl)
    stages, features = [], in_features
    for s, (n, width, stride) in enumerate(zip(counts, widths, strides)):
      stage = Stage(n, features, width, stride, scan=scan, remat=remat,
                    skip_first_preact=self.preact and s == 0, kind=unit, placement=placement,
                    shortcut=shortcut, conv_impl=conv_impl, zero_init=zero_init_residual,
                    rngs=rngs, **unit_kw)
      stages.append(stage)
      features = stage.out_features
    self.stages = nnx.List(stages)
    self.residual_additions = sum(counts)  # one per unit (Transformers: two per block)
    self.final_norm = batch_norm(features, rngs) if self.preact else None
    return features

  def stem_forward(self, x: jax.Array, *, train: bool) -> jax.Array:
    raise NotImplementedError

  def stem_shape(self, input_shape: tuple) -> tuple:
    raise NotImplementedError

  def probe_shapes(self, input_shape: tuple) -> list[tuple]:
    """One (units, *unit_input_shape) per stack of same-shaped units, in network order."""
    shape, out = self.stem_shape(tuple(input_shape)), []
    for stage in self.stages:
      shapes, shape = stage.probe_shapes(shape)
      out += shapes
    return out

  def __call__(self, x: jax.Array, *, train: bool, probes=None):
    h = self.stem_forward(x, train=train)
    input_rms, i = [], 0
    for stage in self.stages:
      if probes is None:
        h = stage(h, train=train)
      else:
        k = stage.num_stacks
        h, r = stage(h, train=train, probes=probes[i:i + k])
        input_rms += r
        i += k
    if self.final_norm is not None:
      h = layers.relu(self.final_norm(h, use_running_average=not train), gate="mask")
    logits = self.head(jnp.mean(h, axis=(1, 2)))
    return logits if probes is None else (logits, input_rms)


class CifarResNet(ResNet):
  """A 3-stage CIFAR ResNet: conv3x3 stem, stages of n units at widths 16/32/64, pool, Dense.

  ``stem_width``: the stem's channels, ``widths[0]`` unless given (the 2024 Highway-110 keeps 16
  while its stages shrink). Pre-activation bottleneck nets are resnet-pre-act.lua's (module
  docstring).
  """

  def __init__(self, *, depth: int, num_classes: int, shortcut, in_channels: int = 3,
               unit: str = "basic", placement: str = "post", widths=(16, 32, 64),
               stem_width: int | None = None, scan: bool = True, conv_impl: str = "auto",
               zero_init_residual: bool = False, remat: str = "none", rngs: nnx.Rngs):
    n = units_per_stage(depth, unit)
    self.depth = depth
    stem_width = widths[0] if stem_width is None else stem_width
    self.stem = conv(in_channels, stem_width, 3, 1, rngs, impl=conv_impl)
    self.stem_norm = batch_norm(stem_width, rngs)
    resnet_1k = unit == "bottleneck" and placement == "preact"
    features = self._build_stages(
        [n] * len(widths), widths, [1] + [2] * (len(widths) - 1), stem_width, unit=unit,
        placement=placement, shortcut=shortcut, scan=scan, conv_impl=conv_impl,
        zero_init_residual=zero_init_residual, remat=remat, rngs=rngs, stride_first=resnet_1k,
        projection_norm=not resnet_1k)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def stem_forward(self, x, *, train):
    return layers.relu(self.stem_norm(self.stem(x), use_running_average=not train))

  def stem_shape(self, input_shape):
    b, h, w, _ = input_shape
    return (b, h, w, self.stem_norm.num_features)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max pooling, stride 2, padding 1 (padded cells never win): ResNet-v1's stem pool."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def imagenet_layout(depth: int, unit: str | None = None, stage_units=None) -> tuple[str, tuple]:
  """(unit, units per stage) of an ImageNet ResNet; ``stage_units`` overrides the depth's counts."""
  if stage_units is not None:
    if unit is None:
      if depth not in IMAGENET_DEPTHS:
        raise ConfigError("config.model.stage_units needs config.model.unit (basic or bottleneck)")
      unit = IMAGENET_DEPTHS[depth][0]
    check_unit(unit)
    counts = tuple(int(c) for c in stage_units)
    if len(counts) != 4 or min(counts) < 1:
      raise ConfigError(f"config.model.stage_units={stage_units!r} must be 4 positive counts")
    return unit, counts
  if depth not in IMAGENET_DEPTHS:
    raise ConfigError(f"no ImageNet ResNet has depth {depth}: set config.model.depth to one of "
                      f"{', '.join(map(str, IMAGENET_DEPTHS))}")
  expected, counts = IMAGENET_DEPTHS[depth]
  if unit is not None and unit != expected:
    raise ConfigError(f"ImageNet ResNet-{depth} has {expected} units (ResNet-v1 Table 1): set "
                      f"config.model.unit={expected} or remove it")
  return expected, counts


class ImageNetResNet(ResNet):
  """ResNet-v1 Table 1: 7x7/2 conv + BN + ReLU + 3x3/2 max pool, 4 stages at 64/128/256/512, pool, Dense.

  v1 is ``placement="post"``, v2 ``placement="preact"``; options A/B/C come with the shortcut
  config, plain nets are ``shortcut.name="none"``. Bottleneck stages put the stride on the 3x3
  convolution (as torchvision does; the 4.1G multiply-adds of ResNet-50 count it there).
  """

  def __init__(self, *, depth: int, num_classes: int, shortcut, in_channels: int = 3,
               unit: str | None = None, stage_units=None, placement: str = "post",
               widths=(64, 128, 256, 512), stem_width: int = 64, scan: bool = True,
               conv_impl: str = "auto", zero_init_residual: bool = False, remat: str = "none",
               rngs: nnx.Rngs):
    unit, counts = imagenet_layout(depth, unit, stage_units)
    self.depth = depth
    self.stem = conv(in_channels, stem_width, 7, 2, rngs, impl=conv_impl)
    self.stem_norm = batch_norm(stem_width, rngs)
    features = self._build_stages(
        counts, widths, [1, 2, 2, 2], stem_width, unit=unit, placement=placement,
        shortcut=shortcut, scan=scan, conv_impl=conv_impl, zero_init_residual=zero_init_residual,
        remat=remat, rngs=rngs)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def stem_forward(self, x, *, train):
    h = layers.relu(self.stem_norm(self.stem(x), use_running_average=not train))
    return max_pool_3x3_s2(h)

  def stem_shape(self, input_shape):
    b, h, w, _ = input_shape
    for _ in range(2):  # the strided conv, then the pool: each ceil(size / 2)
      h, w = -(-h // 2), -(-w // 2)
    return (b, h, w, self.stem_norm.num_features)


# ------------------------------------------------------------------------------------------------
# Registry entries (resjax.models.MODELS).
# ------------------------------------------------------------------------------------------------

def cifar_from_config(model_cfg, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> CifarResNet:
  return CifarResNet(
      depth=model_cfg.depth, num_classes=num_classes, in_channels=in_channels,
      shortcut=model_cfg.shortcut, unit=model_cfg.get("unit", "basic"),
      placement=model_cfg.get("placement", "post"),
      widths=tuple(model_cfg.get("widths", (16, 32, 64))),
      stem_width=model_cfg.get("stem_width", None), scan=model_cfg.get("scan", True),
      conv_impl=model_cfg.get("conv_impl", "auto"),
      zero_init_residual=model_cfg.get("zero_init_residual", False),
      remat=model_cfg.get("remat", "none"), rngs=rngs)


def cifar_repeats(model_cfg, k: int):
  """The same CIFAR ResNet with k units per stage, and its real units per stage."""
  unit = model_cfg.get("unit", "basic")
  out = copy.deepcopy(model_cfg)
  out.depth = 3 * UNITS[unit] * k + 2
  return out, units_per_stage(model_cfg.depth, unit)


def imagenet_from_config(model_cfg, *, num_classes: int, in_channels: int,
                         rngs: nnx.Rngs) -> ImageNetResNet:
  stage_units = model_cfg.get("stage_units", None)
  return ImageNetResNet(
      depth=model_cfg.depth, num_classes=num_classes, in_channels=in_channels,
      shortcut=model_cfg.shortcut, unit=model_cfg.get("unit", None),
      stage_units=None if stage_units is None else tuple(stage_units),
      placement=model_cfg.get("placement", "post"),
      widths=tuple(model_cfg.get("widths", (64, 128, 256, 512))),
      stem_width=model_cfg.get("stem_width", 64), scan=model_cfg.get("scan", True),
      conv_impl=model_cfg.get("conv_impl", "auto"),
      zero_init_residual=model_cfg.get("zero_init_residual", False),
      remat=model_cfg.get("remat", "none"), rngs=rngs)


def imagenet_repeats(model_cfg, k):
  """The same ImageNet ResNet with k units per stage, and the real units per stage.

  The stages differ in length, so the real counts come back per stage (a tuple), and ``k`` may be
  per stage too: the FLOPs of one unit of stage s are f(k = 1 + e_s) - f(1), and the net's are
  f(1) + sum_s (n_s - 1) (f(1 + e_s) - f(1)), exact because a stage's unit costs the same whatever
  the other stages hold.
  """
  stage_units = model_cfg.get("stage_units", None)
  unit, counts = imagenet_layout(model_cfg.depth, model_cfg.get("unit", None), stage_units)
  ks = (k,) * len(counts) if isinstance(k, int) else tuple(k)
  out = copy.deepcopy(model_cfg)
  with out.unlocked(), out.ignore_type():
    out.unit = unit
    out.stage_units = ks
  return out, counts
