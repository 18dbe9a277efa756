"""Model registry: ``config.model.name`` -> a Flax NNX module.

Each entry is "module:function" for a builder ``f(model_cfg, *, num_classes, in_channels, rngs)``
and one for ``repeats(model_cfg, k) -> (cfg with k repeated units per stack, real repeats)``, which
``describe`` uses to count FLOPs (XLA counts a scan body once). Modules import lazily, so a model's
dependencies load only when it is used. For language models ``num_classes`` is the vocabulary size.
"""

from __future__ import annotations

import importlib

from flax import nnx

from resjax.errors import ConfigError

# name -> (builder, repeats)
MODELS = {
    "cifar_resnet": ("resjax.models.resnet:cifar_from_config", "resjax.models.resnet:cifar_repeats"),
    "imagenet_resnet": ("resjax.models.resnet:imagenet_from_config",
                        "resjax.models.resnet:imagenet_repeats"),
    "highway": ("resjax.models.highway:from_config", "resjax.models.highway:repeats"),
    "transformer": ("resjax.models.transformer:from_config", "resjax.models.transformer:repeats"),
}

CONVOLUTIONAL = ("cifar_resnet", "imagenet_resnet", "highway")  # the models built on convolutions


def onednn_convolutions(model_cfg) -> bool:
  """Whether ``model_cfg`` asks for convolutions that run on oneDNN where the kernels are built
  (``conv_impl`` "auto" or "onednn"); decided from the config alone, loading nothing."""
  return (model_cfg.get("name") in CONVOLUTIONAL
          and model_cfg.get("conv_impl", "auto") in ("auto", "onednn"))


def _entry(name: str, which: int):
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}: set config.model.name to one of {', '.join(MODELS)}")
  module, _, fn = MODELS[name][which].partition(":")
  return getattr(importlib.import_module(module), fn)


def build(model_cfg, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> nnx.Module:
  return _entry(model_cfg.name, 0)(model_cfg, num_classes=num_classes, in_channels=in_channels,
                                   rngs=rngs)


def with_repeats(model_cfg, k: int):
  """The same model with k repeated units per stack, and the real number of repeats."""
  return _entry(model_cfg.name, 1)(model_cfg, k)
