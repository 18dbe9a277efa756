"""Every residual connection as one protocol: ``y = shortcut(x, f, train=...)``.

``x`` is what the connection carries (a unit's input, or the first layer's values for the value
residual); ``f`` is the branch output F(x). A shortcut owns everything on its own path:

* the mapping of ``x`` to ``f``'s shape where they differ (ResNet-v1 options A, B, C);
* its parameters (a gate's 1x1 projection and bias, learnable scalars);
* the combination rule, which is what the papers vary.

Where norms and activations sit is the unit's business, not the shortcut's.

Forms (``config.model.shortcut.name``):

=================  =======================================  ============================================
name               y                                        from
=================  =======================================  ============================================
identity           x + f                                    ResNet-v1/v2 (a)
none               f                                        plain nets
scaling            scale * x + branch_scale * f             ResNet-v2 Table 1 (b)
exclusive_gate     (1 - g) * x + g * f                      ResNet-v2 (c), Highway networks
shortcut_gate      (1 - g) * x + f                          ResNet-v2 (d)
conv1x1            W x + f  (projection on every unit)      ResNet-v2 (e), ResNet-v1 option C
dropout            dropout(x) + f  (no rescaling)           ResNet-v2 (f)
lambda             lambda1 * f + lambda2 * x, learnable     learnable residual, init 0.5 / 0.5
mix                (1 - lambda) * x + lambda * f, learnable  modded-nanogpt's value residual, init 0.5
rezero             x + alpha * f, alpha learnable           ReZero / SkipInit, init 0
layerscale         x + gamma * f, gamma per channel         CaiT, init small
deepnorm           alpha * x + f, alpha fixed               DeepNorm (the LN after it is the unit's)
highway            (1 - T) * x + T * f, T from a conv       Highway networks; the 2024 Highway-110
                   branch on x (``gate``: conv, two_conv)
=================  =======================================  ============================================

with ``g = sigmoid(W_g x + b_g)`` over the channel (last) axis: a 1x1 convolution for images and a
Dense layer for tokens, which are the same operation on the last axis.

Adding a form is one class and one ``register`` line. A form's ``defaults`` name the config keys
it reads besides ``name``, with their values when a config leaves them out: an experiment's row may
set exactly these (``resjax.configs.set_dotted``), so they are declared nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from resjax.errors import ConfigError
from resjax.models import layers

Array = jax.Array

# He-normal (fan-out) for convolution kernels, as in the ResNet papers' code.
he_normal = layers.he_normal


class ResidualScalar(nnx.Param):
  """A learnable residual coefficient. The optimizer gives these their own group (no weight decay)."""


class Shortcut(Protocol):
  """Combines the carried input ``x`` with the branch output ``f``."""

  projects: bool  # whether x goes through a learned projection (then pre-act units feed it activated)

  def __call__(self, x: Array, f: Array, *, train: bool) -> Array:
    ...


# ---------------------------------------------------------------------------------------------
# Shape matching: ResNet-v1 options A, B, C.
# ---------------------------------------------------------------------------------------------

SHAPE_OPTIONS = ("A", "B", "C")


def subsample(x: Array, stride: int) -> Array:
  """Spatial subsampling of an NHWC map (a 1x1 convolution's stride); tokens are never strided."""
  return x if stride == 1 else x[:, ::stride, ::stride, :]


class ShapeMatch(nnx.Module):
  """Maps x to the branch's shape.

  A: stride subsampling and zero-padded extra channels, no parameters.
  B: a 1x1 projection (convolution + BN) only where the shape changes, identity elsewhere.
  C: a 1x1 projection on every shortcut.
  """

  def __init__(self, in_features: int, out_features: int, stride: int, option: str, *,
               norm: bool, rngs: nnx.Rngs):
    if option not in SHAPE_OPTIONS:
      raise ConfigError(f"unknown shape option {option!r}: use one of A, B, C "
                        "(config.model.shortcut.option)")
    self.stride = stride
    self.extra_channels = out_features - in_features
    changes = stride != 1 or in_features != out_features
    self.projects = option == "C" or (option == "B" and changes)
    if option == "A" and self.extra_channels < 0:
      raise ConfigError("option A cannot reduce channels: use option B or C "
                        "(config.model.shortcut.option)")
    if self.projects:
      # He-normal where BN follows (the papers' choice). Without BN (tokens) nothing rescales the
      # projection's output, so it starts variance-preserving: LeCun normal, std 1/sqrt(fan-in).
      self.proj = nnx.Linear(in_features, out_features, use_bias=not norm,
                             kernel_init=he_normal if norm else nnx.initializers.lecun_normal(),
                             rngs=rngs)
      self.norm = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs) if norm else None

  def __call__(self, x: Array, *, train: bool) -> Array:
    x = subsample(x, self.stride)
    if self.projects:
      x = self.proj(x)
      if self.norm is not None:
        x = self.norm(x, use_running_average=not train)
    elif self.extra_channels:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.extra_channels)])
    return x


class Gate(nnx.Module):
  """g(x) = sigmoid(W x + b_g) per channel; W is a (strided) 1x1 convolution, i.e. a Dense on the last axis."""

  def __init__(self, in_features: int, out_features: int, stride: int, bias: float, *,
               rngs: nnx.Rngs):
    self.stride = stride
    self.proj = nnx.Linear(in_features, out_features, kernel_init=he_normal,
                           bias_init=nnx.initializers.constant(bias), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jax.nn.sigmoid(self.proj(subsample(x, self.stride)))


# ---------------------------------------------------------------------------------------------
# The forms.
# ---------------------------------------------------------------------------------------------

class _MatchedShortcut(nnx.Module):
  """Base for the forms whose x path is ``ShapeMatch``."""

  defaults = {"option": "B"}

  def __init__(self, cfg, in_features: int, out_features: int, stride: int, *, norm: bool,
               rngs: nnx.Rngs, option: str | None = None):
    self.match = ShapeMatch(in_features, out_features, stride, option or self.setting(cfg, "option"),
                            norm=norm, rngs=rngs)
    self.projects = self.match.projects

  def setting(self, cfg, key: str):
    """``cfg[key]``, or this form's default for it."""
    return cfg.get(key, self.defaults[key])

  def scalar(self, cfg, key: str) -> ResidualScalar:
    """A learnable float32 scalar initialised at ``setting(cfg, key)`` (kept out of weight decay)."""
    return ResidualScalar(jnp.asarray(self.setting(cfg, key), jnp.float32))

  def carried(self, x: Array, train: bool) -> Array:
    return self.match(x, train=train)


class Identity(_MatchedShortcut):
  def __call__(self, x, f, *, train):
    return self.carried(x, train) + f


class NoShortcut(nnx.Module):
  """The plain net: the unit's output is its branch alone."""

  projects = False
  defaults = {}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    del cfg, in_features, out_features, stride, norm, rngs

  def __call__(self, x, f, *, train):
    return f


class Scaling(_MatchedShortcut):
  """Constant scaling: ``scale * x + branch_scale * f`` (Table 1 (b): 0/1, 0.5/1, 0.5/0.5)."""

  defaults = {**_MatchedShortcut.defaults, "scale": 0.5, "branch_scale": 1.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.scale = float(self.setting(cfg, "scale"))
    self.branch_scale = float(self.setting(cfg, "branch_scale"))

  def __call__(self, x, f, *, train):
    return self.scale * self.carried(x, train) + self.branch_scale * f


class ExclusiveGate(_MatchedShortcut):
  """``(1 - g) x + g f``: the gate is a convex mix of shortcut and branch (Highway's transform gate)."""

  defaults = {**_MatchedShortcut.defaults, "gate_bias": 0.0}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    self.gate = Gate(in_features, out_features, stride, float(self.setting(cfg, "gate_bias")),
                     rngs=rngs)

  def __call__(self, x, f, *, train):
    g = self.gate(x)
    return (1.0 - g) * self.carried(x, train) + g * f


class ShortcutGate(ExclusiveGate):
  """``(1 - g) x + f``: only the shortcut is gated."""

  def __call__(self, x, f, *, train):
    return (1.0 - self.gate(x)) * self.carried(x, train) + f


class Conv1x1(Identity):
  """A 1x1 projection on every shortcut (ResNet-v1 option C, ResNet-v2 Table 1 (e))."""

  defaults = {}  # the option is C

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, option="C", **kwargs)


class DropoutShortcut(_MatchedShortcut):
  """``dropout(x) + f`` without the usual 1/(1-p) rescaling.

  Kept units are passed as they are, so in expectation the shortcut is scaled by 1 - p (the paper's
  reading of this form as a stochastic constant scaling); at test time it is scaled by 1 - p exactly.
  """

  defaults = {**_MatchedShortcut.defaults, "dropout_rate": 0.5}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    self.rate = float(self.setting(cfg, "dropout_rate"))
    if not 0.0 <= self.rate < 1.0:
      raise ConfigError(f"dropout_rate {self.rate} is outside [0, 1): "
                        "set config.model.shortcut.dropout_rate")
    self.rngs = rngs.fork()

  def __call__(self, x, f, *, train):
    x = self.carried(x, train)
    if train:
      keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x, 0.0)
    else:
      x = (1.0 - self.rate) * x
    return x + f


class LearnableLambda(_MatchedShortcut):
  """``lambda1 f + lambda2 x`` with both scalars learnable (init 0.5 / 0.5: Table 1 (b) at init)."""

  defaults = {**_MatchedShortcut.defaults, "lambda1_init": 0.5, "lambda2_init": 0.5}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.lambda1 = self.scalar(cfg, "lambda1_init")
    self.lambda2 = self.scalar(cfg, "lambda2_init")

  def __call__(self, x, f, *, train):
    return self.lambda1[...] * f + self.lambda2[...] * self.carried(x, train)


class Mix(_MatchedShortcut):
  """``(1 - lambda) x + lambda f`` with one learnable scalar (init 0.5)."""

  defaults = {**_MatchedShortcut.defaults, "lambda_init": 0.5}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.lam = self.scalar(cfg, "lambda_init")

  def __call__(self, x, f, *, train):
    lam = self.lam[...]
    return (1.0 - lam) * self.carried(x, train) + lam * f


class ReZero(_MatchedShortcut):
  """``x + alpha f`` with a learnable scalar alpha (0 at init: every unit starts as the identity)."""

  defaults = {**_MatchedShortcut.defaults, "alpha_init": 0.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.alpha = self.scalar(cfg, "alpha_init")

  def __call__(self, x, f, *, train):
    return self.carried(x, train) + self.alpha[...] * f


class LayerScale(_MatchedShortcut):
  """``x + gamma * f`` with a learnable per-channel gamma (1e-5 at depth 24, 1e-6 at 36-48 in CaiT)."""

  defaults = {**_MatchedShortcut.defaults, "gamma_init": 1e-5}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    self.gamma = ResidualScalar(jnp.full((out_features,), self.setting(cfg, "gamma_init"),
                                         jnp.float32))

  def __call__(self, x, f, *, train):
    return self.carried(x, train) + self.gamma[...] * f


class DeepNormShortcut(_MatchedShortcut):
  """``alpha x + f`` with a fixed alpha (DeepNorm's up-weighted shortcut; the unit applies LN after)."""

  defaults = {**_MatchedShortcut.defaults, "alpha": 1.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.alpha = float(self.setting(cfg, "alpha"))

  def __call__(self, x, f, *, train):
    return self.alpha * self.carried(x, train) + f


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------

ShortcutFactory = Callable[..., Shortcut]
SHORTCUTS: dict[str, ShortcutFactory] = {}


def register(name: str, factory: ShortcutFactory) -> None:
  SHORTCUTS[name] = factory


for _name, _cls in [("identity", Identity), ("none", NoShortcut), ("scaling", Scaling),
                    ("exclusive_gate", ExclusiveGate), ("shortcut_gate", ShortcutGate),
                    ("conv1x1", Conv1x1), ("dropout", DropoutShortcut), ("lambda", LearnableLambda),
                    ("mix", Mix), ("rezero", ReZero), ("layerscale", LayerScale),
                    ("deepnorm", DeepNormShortcut)]:
  register(_name, _cls)


def check_name(name: str) -> None:
  if name not in SHORTCUTS:
    raise ConfigError(f"unknown shortcut {name!r}: set config.model.shortcut.name to one of "
                      f"{', '.join(sorted(SHORTCUTS))}")


def fields(name: str) -> dict:
  """The config keys of the form ``name``: ``name`` itself and the form's ``defaults``."""
  check_name(name)
  return {"name": name, **getattr(SHORTCUTS[name], "defaults", {})}


def make_shortcut(cfg, in_features: int, out_features: int, stride: int = 1, *, norm: bool = True,
                  rngs: nnx.Rngs) -> Shortcut:
  """Builds the shortcut named by ``cfg.name`` for a unit mapping in_features -> out_features.

  ``norm``: whether a projection is followed by BatchNorm (ResNets) or carries a bias (Transformers).
  """
  check_name(cfg.name)
  return SHORTCUTS[cfg.name](cfg, in_features, out_features, stride, norm=norm, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Highway: the transform gate from its own convolutional branch (images only).
# ---------------------------------------------------------------------------------------------

HIGHWAY_GATES = ("conv", "two_conv")


class ConvGate(nnx.Module):
  """T(x) = sigmoid(B(x)) per channel, with the branch B on the unit's input x.

  ``conv``: B(x) = conv_k(x) + b_T, a k x k convolution as large as H's (Highway networks, 2015).
  ``two_conv``: B(x) = BN(conv(ReLU(BN(conv(x))))) with the last BN's bias starting at b_T, a
  branch shaped like a basic unit's (the 2024 Highway-110 re-run, b_T = -6).
  The first convolution carries the unit's stride, so T has the shape of the branch output f.
  """

  def __init__(self, in_features: int, out_features: int, stride: int, *, kind: str,
               kernel: int, bias: float, conv_impl: str = "auto", rngs: nnx.Rngs):
    if kind not in HIGHWAY_GATES:
      raise ConfigError(f"unknown highway gate {kind!r}: set config.model.shortcut.gate to one of "
                        f"{', '.join(HIGHWAY_GATES)}")
    conv = lambda i, o, s: layers.Conv2D(i, o, kernel, s, impl=conv_impl, rngs=rngs)
    bn = lambda b: nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5,
                                 bias_init=nnx.initializers.constant(b), rngs=rngs)
    if kind == "conv":
      self.convs = nnx.List([conv(in_features, out_features, stride)])
      self.norms = nnx.List([])
      self.bias = nnx.Param(jnp.full((out_features,), bias, jnp.float32))
    else:
      self.convs = nnx.List([conv(in_features, out_features, stride),
                             conv(out_features, out_features, 1)])
      self.norms = nnx.List([bn(0.0), bn(bias)])
      self.bias = None

  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.bias is not None:
      return jax.nn.sigmoid(self.convs[0](x) + self.bias[...])
    h = jax.nn.relu(self.norms[0](self.convs[0](x), use_running_average=not train))
    return jax.nn.sigmoid(self.norms[1](self.convs[1](h), use_running_average=not train))


class Highway(_MatchedShortcut):
  """``(1 - T) x + T f``, exclusive gating with T from a convolutional branch (``ConvGate``).

  Config: ``gate`` (conv | two_conv), ``gate_kernel``, ``gate_bias`` (b_T, negative so that
  units start close to carrying x; None: -1 here, the depth rule in ``models.highway``),
  ``option`` for the carried x where the shape changes.
  """

  defaults = {**_MatchedShortcut.defaults, "gate": "conv", "gate_kernel": 3, "gate_bias": None}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    bias = self.setting(cfg, "gate_bias")
    self.gate = ConvGate(in_features, out_features, stride, kind=self.setting(cfg, "gate"),
                         kernel=int(self.setting(cfg, "gate_kernel")),
                         bias=-1.0 if bias is None else float(bias),
                         conv_impl=cfg.get("conv_impl", "auto"), rngs=rngs)

  def __call__(self, x, f, *, train):
    if x.ndim != 4:
      raise ConfigError("the highway shortcut gates convolutional (NHWC) units: for tokens use "
                        "exclusive_gate (config.model.shortcut.name)")
    t = self.gate(x, train=train)
    return (1.0 - t) * self.carried(x, train) + t * f


register("highway", Highway)
