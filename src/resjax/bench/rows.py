"""The benchmark's rows and the devices' peak FLOP/s: plain data, no JAX or PyTorch imported.

A new row is one ``Row``: its ``config.model``, its data (image shape, classes and whether the
step augments, or a text context and vocabulary) and, where PyTorch has the same net, the
``torch_twin.measure`` arguments that build it (None: resjax alone).
"""

from __future__ import annotations

import dataclasses

from resjax.errors import ConfigError

DTYPES = ("float32", "bfloat16")

# Dense bf16 peak TFLOP/s per chip (REFERENCE section 6; H200 is H100's chip with more memory),
# matched against jax's device_kind in order, so "TPU v5 lite" is tried before "TPU v5".
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
               ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0))


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmarked model: its resjax config, its synthetic data, its PyTorch twin (if any)."""
  label: str
  model: dict  # config.model
  data: dict  # {"kind": "image", "shape", "classes", "augment"} or {"kind": "text", "context", ...}
  torch: dict | None = None  # keyword arguments of torch_twin.measure; None: no reference
  paper_macs: float | None = None  # forward multiply-adds per example (REFERENCE section 6)
  batch: int = 128
  cpu_batch: int | None = None  # on CPU, when --batch is not given (memory, minutes per step)
  cpu_steps: int | None = None  # on CPU, when --steps is not given


def _cifar(depth: int, unit: str = "basic", placement: str = "post", option: str = "A") -> dict:
  # remat as the CIFAR recipe has it (configs.cifar_resnet_recipe): full on CPU, none elsewhere.
  return {"name": "cifar_resnet", "depth": depth, "unit": unit, "placement": placement,
          "shortcut": {"name": "identity", "option": option}, "remat": "auto"}


CIFAR = {"kind": "image", "shape": (32, 32, 3), "classes": 10, "augment": True}
ROWS = {
    # ResNet-v1 Section 4.2: basic units, post-activation, option A shortcuts.
    "resnet20": Row("ResNet-20", _cifar(20), CIFAR, {"depth": 20}, 40.6e6),
    "resnet110": Row("ResNet-110", _cifar(110), CIFAR, {"depth": 110}, 252.9e6),
    # ResNet-v2 Section 4: bottleneck units, full pre-activation, projections where shapes change.
    # At batch 128 its activations take about 40 GB; on CPU it runs at 16 (compile time does not
    # depend on the batch).
    "resnet1001": Row("pre-act ResNet-1001", _cifar(1001, "bottleneck", "preact", "B"), CIFAR,
                      {"depth": 1001, "unit": "bottleneck", "placement": "preact", "option": "B"},
                      1.49e9, cpu_batch=16, cpu_steps=3),
    # ResNet-v1 Table 1 at 224x224 (accelerators; on CPU one step takes minutes).
    "resnet50": Row("ImageNet ResNet-50", {"name": "imagenet_resnet", "depth": 50,
                                           "shortcut": {"name": "identity", "option": "B"}},
                    {"kind": "image", "shape": (224, 224, 3), "classes": 1000, "augment": False},
                    {"depth": 50, "imagenet": True, "option": "B"}, 4.09e9, batch=256,
                    cpu_batch=8, cpu_steps=3),
    # A byte-level GPT (no PyTorch twin yet): the Transformer row's hook.
    "transformer": Row("Transformer 6x256, T=256", {"name": "transformer", "context": 256,
                                                    "width": 256, "depth": 6, "heads": 4},
                       {"kind": "text", "context": 256, "classes": 256}),
}
DEFAULT_ROWS = ("resnet20", "resnet110", "resnet1001")


def resolve_row(name: str, size: int | None = None) -> Row:
  """``ROWS[name]``, with its images ``size`` x ``size`` if given (small sizes: quick checks)."""
  if name not in ROWS:
    raise ConfigError(f"unknown bench row {name!r}: use --rows with any of {', '.join(ROWS)}")
  row = ROWS[name]
  if size and row.data["kind"] == "image":
    row = dataclasses.replace(row, data={**row.data, "shape": (size, size, row.data["shape"][2])})
  return row


def peak_tflops(device_kind: str) -> float | None:
  """The device's dense bf16 peak TFLOP/s, or None where it is not known (CPUs)."""
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def mfu(flops_per_example: float, examples_per_s: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation: training FLOPs achieved per second over the peak (TFLOP/s)."""
  if peak is None or not flops_per_example:
    return None
  return flops_per_example * examples_per_s / (peak * 1e12)
