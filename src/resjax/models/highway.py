"""Convolutional Highway networks (Srivastava, Greff, Schmidhuber 2015) on the CIFAR ResNet skeleton.

A highway unit computes y = H(x) T(x) + x (1 - T(x)), with the transform gate T(x) = sigmoid(conv(x)
+ b_T) from the unit's own input and b_T negative, so that a deep net starts out carrying its input.
That is ResNet-v2's exclusive gating with a gate as large as H, so it is the ``highway`` shortcut
(``models.shortcuts.Highway``) on the units of ``resjax.models.resnet``: stem, three stages at
16/32/64 channels, pool, Dense, all under the same scan and signal-propagation probes.

Defaults of the ``highway`` model family (``config.model``), each one overridable:

* ``unit="single"``, ``placement="relu_before_add"``: H(x) = ReLU(BN(conv3x3(x))), one layer per
  unit as in the 2015 highway layers (they had no BN; here H carries one, as every resjax unit does);
* ``shortcut.gate="conv"``, ``gate_kernel=3``: T from a 3x3 convolution, the receptive field of H;
* ``shortcut.gate_bias`` unset: -1, -2, -3 for depth about 10, 20, 30 and beyond (the paper's
  rule of thumb for conv nets); ``shortcut.option="B"`` where the shape changes;
* ``width_multiplier`` scales the stage widths; the stem keeps ``widths[0]`` channels.

``HIGHWAY_110_2024`` is the 2024 re-run's Highway-110, as in its code (flukeskywalker/
highway-resnet-comparison, resnet.py): 54 basic units whose H is conv-BN-ReLU-conv-BN-ReLU and
whose gated sum x + T (H - x) has no ReLU after it (lines 116-125: ``relu_before_add``); the gate
from a two-conv branch (conv-BN-ReLU-conv-BN) whose last BN bias starts at -6 (lines 96-100);
option B (line 89); stages at int(0.875 w) = 14/28/56 channels after a 16-channel stem
(lines 131-139). 2,649,918 parameters on CIFAR-10, the count its log reports.
"""

from __future__ import annotations

import copy

import ml_collections
from flax import nnx

from resjax.models import shortcuts
from resjax.models import resnet

HIGHWAY_110_2024 = dict(
    name="highway", depth=110, unit="basic", placement="relu_before_add", width_multiplier=0.875,
    shortcut=dict(name="highway", option="B", gate="two_conv", gate_kernel=3, gate_bias=-6.0))


def default_gate_bias(depth: int) -> float:
  """b_T = -1, -2, -3 for conv highway nets of depth about 10, 20, 30 (and -3 deeper)."""
  return -float(min(3, max(1, round(depth / 10))))


def shortcut_config(model_cfg) -> ml_collections.ConfigDict:
  """The model's shortcut settings as a ``highway`` shortcut config, defaults filled in."""
  given = model_cfg.get("shortcut", None)
  sc = ml_collections.ConfigDict(shortcuts.fields("highway"))
  if given is not None:
    for key in ("option", "gate", "gate_kernel", "gate_bias"):
      if key in given:
        with sc.ignore_type():
          sc[key] = given[key]
  if sc.gate_bias is None:
    with sc.ignore_type():
      sc.gate_bias = default_gate_bias(model_cfg.depth)
  return sc


def widths(model_cfg) -> tuple[int, ...]:
  """The stage widths, scaled by ``width_multiplier`` (the stem's stays ``widths[0]``)."""
  m = float(model_cfg.get("width_multiplier", 1.0))
  return tuple(int(round(w * m)) for w in model_cfg.get("widths", (16, 32, 64)))


def from_config(model_cfg, *, num_classes: int, in_channels: int,
                rngs: nnx.Rngs) -> resnet.CifarResNet:
  """The CIFAR ResNet of ``model_cfg`` with the highway family's defaults filled in."""
  cfg = copy.deepcopy(model_cfg)
  with cfg.unlocked(), cfg.ignore_type():
    cfg.shortcut = shortcut_config(model_cfg)
    cfg.unit = model_cfg.get("unit", "single")
    cfg.placement = model_cfg.get("placement", "relu_before_add")
    cfg.stem_width = model_cfg.get("widths", (16, 32, 64))[0]
    cfg.widths = widths(model_cfg)
  return resnet.cifar_from_config(cfg, num_classes=num_classes, in_channels=in_channels, rngs=rngs)


def repeats(model_cfg, k: int):
  """The same highway net with k units per stage (gate bias pinned), and its real units per stage."""
  unit = model_cfg.get("unit", "single")
  out = copy.deepcopy(model_cfg)
  with out.unlocked(), out.ignore_type():
    out.shortcut = shortcut_config(model_cfg)  # the depth rule must not move b_T
    out.unit = unit
    out.depth = 3 * resnet.UNITS[unit] * k + 2
  return out, resnet.units_per_stage(model_cfg.depth, unit)
