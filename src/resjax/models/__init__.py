"""Model registry: ``config.model.name`` -> a Flax NNX module."""

from __future__ import annotations

import copy

from flax import nnx

from resjax.errors import ConfigError
from resjax.models import resnet


def build(model_cfg, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> nnx.Module:
  name = model_cfg.name
  if name == "cifar_resnet":
    return resnet.CifarResNet(
        depth=model_cfg.depth, num_classes=num_classes, in_channels=in_channels,
        shortcut=model_cfg.shortcut, unit=model_cfg.get("unit", "basic"),
        placement=model_cfg.get("placement", "post"),
        widths=tuple(model_cfg.get("widths", (16, 32, 64))), scan=model_cfg.get("scan", True),
        conv_impl=model_cfg.get("conv_impl", "auto"), rngs=rngs)
  raise ConfigError(f"unknown model {name!r}: set config.model.name to one of {', '.join(MODELS)}")


MODELS = ("cifar_resnet",)


def with_repeats(model_cfg, k: int):
  """The same model with k repeated units per stage (for counting FLOPs, which are affine in k)."""
  out = copy.deepcopy(model_cfg)
  if model_cfg.name == "cifar_resnet":
    per_unit = 3 * resnet.UNITS[model_cfg.get("unit", "basic")]
    out.depth = per_unit * k + 2
    return out, resnet.units_per_stage(model_cfg.depth, model_cfg.get("unit", "basic"))
  raise ConfigError(f"unknown model {model_cfg.name!r}")
