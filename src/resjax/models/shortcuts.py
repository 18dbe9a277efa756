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

A user's form lives in the user's own file: ``config.model.shortcut.name`` names it by import
path (``my_residuals:GatedScalar`` or ``path/to/file.py:GatedScalar``), or ``resjax.register``
names it in a notebook. Its ``defaults`` are its config keys, as for resjax's own forms.
``check_form`` runs it on small arrays before anything trains (examples/my_residuals.py).
"""

from __future__ import annotations

import math
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

class MatchedShortcut(nnx.Module):
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


class Identity(MatchedShortcut):
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


class Scaling(MatchedShortcut):
  """Constant scaling: ``scale * x + branch_scale * f`` (Table 1 (b): 0/1, 0.5/1, 0.5/0.5)."""

  defaults = {**MatchedShortcut.defaults, "scale": 0.5, "branch_scale": 1.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.scale = float(self.setting(cfg, "scale"))
    self.branch_scale = float(self.setting(cfg, "branch_scale"))

  def __call__(self, x, f, *, train):
    return self.scale * self.carried(x, train) + self.branch_scale * f


class ExclusiveGate(MatchedShortcut):
  """``(1 - g) x + g f``: the gate is a convex mix of shortcut and branch (Highway's transform gate)."""

  defaults = {**MatchedShortcut.defaults, "gate_bias": 0.0}

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


class DropoutShortcut(MatchedShortcut):
  """``dropout(x) + f`` without the usual 1/(1-p) rescaling.

  Kept units are passed as they are, so in expectation the shortcut is scaled by 1 - p (the paper's
  reading of this form as a stochastic constant scaling); at test time it is scaled by 1 - p exactly.
  """

  defaults = {**MatchedShortcut.defaults, "dropout_rate": 0.5}

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


class LearnableLambda(MatchedShortcut):
  """``lambda1 f + lambda2 x`` with both scalars learnable (init 0.5 / 0.5: Table 1 (b) at init)."""

  defaults = {**MatchedShortcut.defaults, "lambda1_init": 0.5, "lambda2_init": 0.5}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.lambda1 = self.scalar(cfg, "lambda1_init")
    self.lambda2 = self.scalar(cfg, "lambda2_init")

  def __call__(self, x, f, *, train):
    return self.lambda1[...] * f + self.lambda2[...] * self.carried(x, train)


class Mix(MatchedShortcut):
  """``(1 - lambda) x + lambda f`` with one learnable scalar (init 0.5)."""

  defaults = {**MatchedShortcut.defaults, "lambda_init": 0.5}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.lam = self.scalar(cfg, "lambda_init")

  def __call__(self, x, f, *, train):
    lam = self.lam[...]
    return (1.0 - lam) * self.carried(x, train) + lam * f


class ReZero(MatchedShortcut):
  """``x + alpha f`` with a learnable scalar alpha (0 at init: every unit starts as the identity)."""

  defaults = {**MatchedShortcut.defaults, "alpha_init": 0.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.alpha = self.scalar(cfg, "alpha_init")

  def __call__(self, x, f, *, train):
    return self.carried(x, train) + self.alpha[...] * f


class LayerScale(MatchedShortcut):
  """``x + gamma * f`` with a learnable per-channel gamma (1e-5 at depth 24, 1e-6 at 36-48 in CaiT)."""

  defaults = {**MatchedShortcut.defaults, "gamma_init": 1e-5}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    self.gamma = ResidualScalar(jnp.full((out_features,), self.setting(cfg, "gamma_init"),
                                         jnp.float32))

  def __call__(self, x, f, *, train):
    return self.carried(x, train) + self.gamma[...] * f


class DeepNormShortcut(MatchedShortcut):
  """``alpha x + f`` with a fixed alpha (DeepNorm's up-weighted shortcut; the unit applies LN after)."""

  defaults = {**MatchedShortcut.defaults, "alpha": 1.0}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.alpha = float(self.setting(cfg, "alpha"))

  def __call__(self, x, f, *, train):
    return self.alpha * self.carried(x, train) + f


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------

ShortcutFactory = Callable[..., Shortcut]
SHORTCUTS: dict[str, ShortcutFactory] = {}  # resjax's own forms
USER_FORMS: dict[str, ShortcutFactory] = {}  # resjax.register's names and imported FILE.py:CLASS


def register(name: str, factory: ShortcutFactory) -> None:
  SHORTCUTS[name] = factory


for _name, _cls in [("identity", Identity), ("none", NoShortcut), ("scaling", Scaling),
                    ("exclusive_gate", ExclusiveGate), ("shortcut_gate", ShortcutGate),
                    ("conv1x1", Conv1x1), ("dropout", DropoutShortcut), ("lambda", LearnableLambda),
                    ("mix", Mix), ("rezero", ReZero), ("layerscale", LayerScale),
                    ("deepnorm", DeepNormShortcut)]:
  register(_name, _cls)


# ---------------------------------------------------------------------------------------------
# A user's own form: a class in the user's file, named by import path or registered by name.
# ---------------------------------------------------------------------------------------------

CONSTRUCTOR = "cls(cfg, in_features, out_features, stride, *, norm, rngs)"
EXAMPLE = "see examples/my_residuals.py"


def is_import_path(name: str) -> bool:
  """``my_residuals:GatedScalar`` (a module on sys.path) or ``path/to/file.py:GatedScalar``."""
  return ":" in name


def _import_module(where: str, name: str):
  import importlib
  import importlib.util
  import os
  import sys
  if where.endswith(".py") or os.sep in where or "/" in where:
    path = os.path.abspath(where)
    if not os.path.isfile(path):
      raise ConfigError(f"cannot import shortcut {name!r}: no file {where}: check the path "
                        "(FILE.py:CLASS or MODULE:CLASS)")
    module_name = "resjax_user." + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)

    def loader():
      sys.modules[module_name] = module  # so that inspect and pickle find its classes
      try:
        spec.loader.exec_module(module)
      except BaseException:
        del sys.modules[module_name]
        raise
  else:
    module = None
    loader = lambda: importlib.import_module(where)
    if "" not in sys.path and os.getcwd() not in sys.path:
      sys.path.insert(0, os.getcwd())  # MODULE:CLASS finds a module in the working directory
  try:
    loaded = loader()
  except ModuleNotFoundError as e:
    if module is None and e.name == where.split(".")[0]:
      raise ConfigError(f"cannot import shortcut {name!r}: no module {where!r} on the Python path: "
                        f"run from the folder holding {where.replace('.', '/')}.py, or name the "
                        f"file: path/to/{where.split('.')[-1]}.py:CLASS") from None
    raise ConfigError(f"importing {where} for shortcut {name!r} raised ModuleNotFoundError: {e}: "
                      "install the module it imports, or fix the import") from None
  except Exception as e:  # the user's file: report its error, do not crash on it
    line = ""
    tb = e.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_filename.endswith(os.path.basename(where)):
        line = f" (line {tb.tb_lineno})"
      tb = tb.tb_next
    raise ConfigError(f"importing {where} for shortcut {name!r} raised {type(e).__name__}{line}: "
                      f"{e}: fix the file") from None
  return module if module is not None else loaded


def check_class(name: str, cls) -> None:
  """Raises ConfigError unless ``cls`` can be a shortcut form: an nnx.Module subclass whose
  ``defaults`` (if any) is a dict of its settings."""
  if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
    what = f"a {type(cls).__name__}" if not isinstance(cls, type) else f"class {cls.__name__}"
    raise ConfigError(f"shortcut {name!r} is {what}, not a flax.nnx.Module subclass: a shortcut is "
                      f"an nnx.Module built as {CONSTRUCTOR} ({EXAMPLE})")
  defaults = getattr(cls, "defaults", {})
  if not (isinstance(defaults, dict) and all(isinstance(k, str) for k in defaults)):
    raise ConfigError(f"shortcut {name!r}: {cls.__name__}.defaults must be a dict of its settings "
                      "(name -> default value), e.g. defaults = {'gate_init': 1.0}")
  if "name" in defaults:
    raise ConfigError(f"shortcut {name!r}: {cls.__name__}.defaults sets 'name', which is the "
                      "form's own key: rename that setting")


def _load(name: str) -> ShortcutFactory:
  """Imports the class named by the import path ``name``."""
  where, _, attr = name.rpartition(":")
  if not where or not attr.isidentifier():
    raise ConfigError(f"cannot import shortcut {name!r}: write FILE.py:CLASS or MODULE:CLASS")
  module = _import_module(where, name)
  if not hasattr(module, attr):
    found = sorted(k for k, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, nnx.Module) and not k.startswith("_")
                   and v.__module__ == module.__name__)
    raise ConfigError(f"{where} has no {attr!r} for shortcut {name!r}: its nnx.Module classes are "
                      f"{', '.join(found) or 'none'}")
  cls = getattr(module, attr)
  check_class(name, cls)
  return cls


def register_user(name: str, cls) -> None:
  """``resjax.register``: a user's form under a name of the user's choice, for notebooks."""
  if not isinstance(name, str) or not name or is_import_path(name):
    raise ConfigError(f"register({name!r}, ...): a form's name is a non-empty string without ':'")
  if name in SHORTCUTS:
    raise ConfigError(f"register({name!r}, ...): {name!r} is one of resjax's own forms: choose "
                      "another name")
  check_class(name, cls)
  USER_FORMS[name] = cls


def form(name: str) -> ShortcutFactory:
  """The class of the form ``name``: resjax's own, a registered one, or an import path."""
  if name in SHORTCUTS:
    return SHORTCUTS[name]
  if name in USER_FORMS:
    return USER_FORMS[name]
  if isinstance(name, str) and is_import_path(name):
    USER_FORMS[name] = _load(name)
    return USER_FORMS[name]
  registered = f"; registered: {', '.join(sorted(USER_FORMS))}" if USER_FORMS else ""
  raise ConfigError(f"unknown shortcut {name!r}: set config.model.shortcut.name to one of "
                    f"{', '.join(sorted(SHORTCUTS))}{registered}, or to a form of your own as "
                    "FILE.py:CLASS or MODULE:CLASS")


def check_name(name: str) -> None:
  form(name)


def is_user_form(name: str) -> bool:
  return name not in SHORTCUTS


def fields(name: str) -> dict:
  """The config keys of the form ``name``: ``name`` itself and the form's ``defaults``."""
  return {"name": name, **getattr(form(name), "defaults", {})}


def make_shortcut(cfg, in_features: int, out_features: int, stride: int = 1, *, norm: bool = True,
                  rngs: nnx.Rngs) -> Shortcut:
  """Builds the shortcut named by ``cfg.name`` for a unit mapping in_features -> out_features.

  ``norm``: whether a projection is followed by BatchNorm (ResNets) or carries a bias (Transformers).
  """
  return form(cfg.name)(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)


# The probes ``check_form`` runs a user's form through: (what, x shape, f shape, stride, norm).
PROBES = {
    "tokens": [("tokens, width 8", (2, 3, 8), (2, 3, 8), 1, False)],
    "images": [("images, 8 channels, stride 1", (2, 4, 4, 8), (2, 4, 4, 8), 1, True),
               ("images, 8 -> 16 channels, stride 2", (2, 4, 4, 8), (2, 2, 2, 16), 2, True)],
}


def check_form(cfg, kinds=("tokens", "images")) -> None:
  """Raises ConfigError unless the form of the shortcut config ``cfg`` builds as the units build
  it and returns the branch's shape, in training and in evaluation, on each kind of input in
  ``kinds`` (tokens for Transformers, NHWC images for ResNets). resjax's own forms are tested in
  tests/test_shortcuts.py; this runs a user's form on small arrays before anything trains."""
  name = cfg.name
  cls = form(name)
  for kind in kinds:
    for what, x_shape, f_shape, stride, norm in PROBES[kind]:
      case = f"({what})"
      try:
        s = cls(cfg, x_shape[-1], f_shape[-1], stride, norm=norm, rngs=nnx.Rngs(0))
      except ConfigError:
        raise
      except Exception as e:
        raise ConfigError(f"shortcut {name!r} could not be built {case}: {type(e).__name__}: {e}: "
                          f"the units build it as {CONSTRUCTOR}") from None
      if not isinstance(s, nnx.Module):
        raise ConfigError(f"shortcut {name!r} built a {type(s).__name__}, not an nnx.Module "
                          f"({EXAMPLE})")
      if not isinstance(getattr(s, "projects", None), bool):
        raise ConfigError(f"shortcut {name!r} has no boolean `projects` attribute {case}: set "
                          "self.projects (True where x goes through a learned projection, which "
                          "pre-activation units then feed activated; False otherwise)")
      x = jnp.linspace(-1.0, 1.0, math.prod(x_shape), dtype=jnp.float32).reshape(x_shape)
      f = jnp.linspace(1.0, -1.0, math.prod(f_shape), dtype=jnp.float32).reshape(f_shape)
      for train in (True, False):
        try:
          y = s(x, f, train=train)
        except ConfigError:
          raise
        except Exception as e:
          raise ConfigError(f"shortcut {name!r} raised {type(e).__name__} on x {x_shape} and f "
                            f"{f_shape} {case}, train={train}: {e}: it is called as "
                            "shortcut(x, f, *, train) and returns f's shape") from None
        shape = getattr(y, "shape", None)
        if shape != f_shape:
          hint = (": map x to f's shape where they differ (subclass resjax.MatchedShortcut and "
                  "use self.carried(x, train))" if x_shape != f_shape else
                  ": it must return f's shape")
          raise ConfigError(f"shortcut {name!r} returned shape {shape} for a branch of shape "
                            f"{f_shape} {case}, train={train}{hint}")


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
    h = layers.relu(self.norms[0](self.convs[0](x), use_running_average=not train))
    return jax.nn.sigmoid(self.norms[1](self.convs[1](h), use_running_average=not train))


class Highway(MatchedShortcut):
  """``(1 - T) x + T f``, exclusive gating with T from a convolutional branch (``ConvGate``).

  Config: ``gate`` (conv | two_conv), ``gate_kernel``, ``gate_bias`` (b_T, negative so that
  units start close to carrying x; None: -1 here, the depth rule in ``models.highway``),
  ``option`` for the carried x where the shape changes.
  """

  defaults = {**MatchedShortcut.defaults, "gate": "conv", "gate_kernel": 3, "gate_bias": None}

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
