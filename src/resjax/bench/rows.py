"""The benchmark's rows and the devices' peak FLOP/s: plain data, no JAX or PyTorch imported.

A new row is one ``Row``: its ``config.model``, its data (image shape, classes and whether the
step augments, or a text context and vocabulary), its optimizer if not the bench's SGD, and, where
PyTorch has the same net, the arguments of ``torch_twin.measure`` (images) or ``measure_gpt``
(text) that build it (None: resjax alone).
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
  cpu_torch_compile: bool = True  # False: on CPU, torch.compile is not run for this row
  optim: dict | None = None  # config.optim; None: SGD, momentum 0.9, L2 1e-4 (the ResNet recipe)

  @property
  def tokens(self) -> int:
    """Tokens per example: the context of a text row, 0 for images."""
    return self.data["context"] if self.data["kind"] == "text" else 0


def _cifar(depth: int, unit: str = "basic", placement: str = "post", option: str = "A") -> dict:
  # remat as the CIFAR recipe has it (configs.cifar_resnet_recipe): "auto" (layers.resolve_remat).
  return {"name": "cifar_resnet", "depth": depth, "unit": unit, "placement": placement,
          "shortcut": {"name": "identity", "option": option}, "remat": "auto"}


CIFAR = {"kind": "image", "shape": (32, 32, 3), "classes": 10, "augment": True}

# GPT-2 small as configs.lm_recipe builds it (Pre-LN, learned positions, tied head, GELU, biases;
# the Transformer's defaults) on GPT-2 tokens: 50257 padded to a multiple of 128, as FineWeb's
# loader (data.fineweb.VOCAB_SIZE) and nanoGPT pad it; 124M parameters. Its optimizer is
# lm_recipe's AdamW with clipping; the bench's schedule (no warm-up) changes nothing a step costs.
GPT2_VOCAB = 50304
GPT2 = {"name": "transformer", "context": 1024, "width": 768, "depth": 12, "heads": 12}
GPT2_ADAMW = {"name": "adamw", "lr": 6e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
              "weight_decay": 0.1, "clip_norm": 1.0, "decay": "cosine", "final_lr_fraction": 0.1}
ROWS = {
    # ResNet-v1 Section 4.2: basic units, post-activation, option A shortcuts.
    "resnet20": Row("ResNet-20", _cifar(20), CIFAR, {"depth": 20}, 40.6e6),
    "resnet110": Row("ResNet-110", _cifar(110), CIFAR, {"depth": 110}, 252.9e6),
    # ResNet-v2 Section 4: bottleneck units, full pre-activation, projections where shapes change.
    # At batch 128 its activations take about 40 GB; on CPU it runs at 16 (compile time does not
    # depend on the batch).
    "resnet1001": Row("pre-act ResNet-1001", _cifar(1001, "bottleneck", "preact", "B"), CIFAR,
                      {"depth": 1001, "unit": "bottleneck", "placement": "preact", "option": "B"},
                      1.49e9, cpu_batch=16, cpu_steps=3,
                      # On 2 CPU cores torch.compile had not finished after 8 minutes (README).
                      cpu_torch_compile=False),
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
    # GPT-2 small's training step at context 1024 (accelerators; on CPU one sequence a step).
    # Batch 16: XLA's attention keeps B x heads x T x T float32 scores of every block for the
    # backward pass; the step's temporaries are 46 GiB at 16 and 91 GiB at 32 (XLA:CPU's buffer
    # assignment), against JAX's default 75% of an H100's 80 GB or an H200's 141 GB.
    "gpt2": Row("GPT-2 small, T=1024", GPT2,
                {"kind": "text", "context": GPT2["context"], "classes": GPT2_VOCAB},
                {k: GPT2[k] for k in ("width", "depth", "heads")}, batch=16, cpu_batch=1,
                cpu_steps=2, optim=GPT2_ADAMW),
}
DEFAULT_ROWS = ("resnet20", "resnet110", "resnet1001")


def resolve_row(name: str, size: int | None = None) -> Row:
  """``ROWS[name]``, shrunk for quick checks where ``size`` is given: images ``size`` x ``size``;
  a text row's context and width ``size``, 2 blocks of 2 heads (its vocabulary kept)."""
  if name not in ROWS:
    raise ConfigError(f"unknown bench row {name!r}: use --rows with any of {', '.join(ROWS)}")
  row = ROWS[name]
  if size and row.data["kind"] == "image":
    row = dataclasses.replace(row, data={**row.data, "shape": (size, size, row.data["shape"][2])})
  elif size:
    if size % 2:
      raise ConfigError(f"--size {size} for the text row {name!r}: use an even size (2 heads)")
    shape = {"context": size, "width": size, "depth": 2, "heads": 2}
    row = dataclasses.replace(
        row, model={**row.model, **shape}, data={**row.data, "context": size},
        torch=None if row.torch is None else {**row.torch, **{k: shape[k] for k in row.torch}})
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
