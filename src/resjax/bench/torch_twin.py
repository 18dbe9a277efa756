"""What ``python -m resjax.bench`` measures against: the same ResNets and training step in PyTorch.

    python -m resjax.bench.torch_twin --depth 110 --batch 128 --mode eager --channels-last

The architecture of ``resjax.models.resnet`` for the bench's rows: CIFAR ResNets (3x3 stem, stages
at 16/32/64) and ImageNet ResNets (7x7/2 stem and 3x3/2 max pool, stages at 64..512); basic or
bottleneck units (stride on the 3x3); post-activation (ResNet-v1) or full pre-activation
(ResNet-v2: stem BN-ReLU, the first unit without its own pre-activation or a BN for it, projections
fed the pre-activated input, a final BN-ReLU); shortcut option A (subsample, zero channels) or B
(1x1 projection + BN where the shape changes); bias-free He-normal (fan-out) convolutions; BN
momentum 0.1 (the Torch convention for resjax's 0.9) and epsilon 1e-5; a Dense head with bias.
CIFAR pre-activation bottleneck nets (ResNet-164, ResNet-1001) are resnet-pre-act.lua's, as in
resjax: the stride on the first 1x1 conv and projections without BN.

The step: gather the batch from a uint8 training set on the device, ``x / 255 - mean``, 4-pixel
zero pad + random crop + horizontal flip per example (CIFAR rows), forward, cross-entropy,
backward, SGD with momentum 0.9 and L2 weight decay 1e-4 added to the gradient. ``mode``: ``eager``
or ``compile`` (``torch.compile`` of the whole step, optimizer included); bf16 is autocast;
``channels_last`` is the memory format PyTorch's CPU and tensor-core kernels run fastest in.

Needs the optional extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from resjax.errors import ConfigError

BOTTLENECK_EXPANSION = 4
PLACEMENTS = ("post", "preact")
MODES = ("eager", "compile")


def units_per_stage(depth: int, unit: str) -> int:
  per_unit = {"basic": 6, "bottleneck": 9}[unit]
  if depth < per_unit + 2 or (depth - 2) % per_unit:
    raise ConfigError(f"depth {depth} is impossible for {unit} CIFAR ResNets: use {per_unit}n+2")
  return (depth - 2) // per_unit


def conv(in_features: int, out_features: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  c = nn.Conv2d(in_features, out_features, kernel, stride, kernel // 2, bias=False)
  nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")  # He, as resjax
  return c


def batch_norm(features: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


class Shortcut(nn.Module):
  """Option A: subsample and zero-pad channels. Option B: 1x1 projection + BN where the shape changes
  (without the BN where ``norm`` is False)."""

  def __init__(self, in_features: int, out_features: int, stride: int, option: str,
               norm: bool = True):
    super().__init__()
    changes = stride != 1 or in_features != out_features
    self.stride, self.extra = stride, out_features - in_features
    self.projects = option == "B" and changes
    if option not in ("A", "B"):
      raise ConfigError(f"shortcut option {option!r}: the torch reference has A and B")
    if self.projects:
      self.proj = conv(in_features, out_features, 1, stride)
      self.norm = batch_norm(out_features) if norm else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.projects:
      x = self.proj(x)
      return x if self.norm is None else self.norm(x)
    if self.stride != 1:
      x = x[:, :, ::self.stride, ::self.stride]
    if self.extra:
      x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
    return x


class Unit(nn.Module):
  """``stride_first``: a bottleneck strides its first 1x1 conv, not its 3x3. ``projection_norm``:
  whether a projecting shortcut has a BN. A pre-act unit that skips its first pre-activation has no
  BN there, so ``norms[i - norm_offset]`` acts before conv i (as resjax's Unit)."""

  def __init__(self, in_features: int, width: int, stride: int, *, unit: str, placement: str,
               option: str, skip_preact: bool, stride_first: bool = False,
               projection_norm: bool = True):
    super().__init__()
    if unit == "basic":
      layers = [(3, width, stride), (3, width, 1)]
    else:  # bottleneck, strided on its 1x1 or its 3x3 convolution, as in resjax
      s1, s3 = (stride, 1) if stride_first else (1, stride)
      layers = [(1, width, s1), (3, width, s3), (1, width * BOTTLENECK_EXPANSION, 1)]
    features = [in_features] + [f for _, f, _ in layers]
    self.convs = nn.ModuleList(conv(features[i], f, k, s) for i, (k, f, s) in enumerate(layers))
    norm_features = features[:-1] if placement == "preact" else features[1:]
    self.norm_offset = int(placement == "preact" and skip_preact)
    self.norms = nn.ModuleList(batch_norm(f) for f in norm_features[self.norm_offset:])
    self.shortcut = Shortcut(in_features, features[-1], stride, option, norm=projection_norm)
    self.placement, self.skip_preact = placement, skip_preact

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    carried, h, last = x, x, len(self.convs) - 1
    for i, conv_i in enumerate(self.convs):
      if self.placement == "preact":
        if not (i == 0 and self.skip_preact):
          h = F.relu(self.norms[i - self.norm_offset](h))
        if i == 0 and self.shortcut.projects:
          carried = h  # projections take the pre-activated input
        h = conv_i(h)
      else:
        h = self.norms[i](conv_i(h))
        if i < last:
          h = F.relu(h)
    y = self.shortcut(carried) + h
    return F.relu(y) if self.placement == "post" else y


# ResNet-v1 Table 1: depth -> unit, units per stage (as resjax.models.resnet.IMAGENET_DEPTHS).
IMAGENET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                   50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                   152: ("bottleneck", (3, 8, 36, 3))}


class ResNet(nn.Module):
  """CIFAR (3x3 stem, 3 stages of n units at 16/32/64) or ImageNet (7x7/2 stem + 3x3/2 max pool,
  4 stages at 64/128/256/512) ResNet; pool and a Dense head."""

  def __init__(self, depth: int, *, unit: str = "basic", placement: str = "post", option: str = "A",
               imagenet: bool = False, num_classes: int = 10, in_channels: int = 3):
    super().__init__()
    if placement not in PLACEMENTS:
      raise ConfigError(f"placement {placement!r}: the torch reference has {', '.join(PLACEMENTS)}")
    if imagenet:
      unit, counts = IMAGENET_DEPTHS[depth]
      widths, strides, stem_width = (64, 128, 256, 512), (1, 2, 2, 2), 64
      self.stem = conv(in_channels, stem_width, 7, 2)
      self.pool = nn.MaxPool2d(3, 2, 1)
    else:
      counts = (units_per_stage(depth, unit),) * 3
      widths, strides, stem_width = (16, 32, 64), (1, 2, 2), 16
      self.stem = conv(in_channels, stem_width, 3)
      self.pool = nn.Identity()
    preact = placement == "preact"
    # CIFAR pre-act bottleneck nets: resnet-pre-act.lua's units (resjax.models.resnet.CifarResNet).
    resnet_1k = not imagenet and unit == "bottleneck" and preact
    self.stem_norm = batch_norm(stem_width)
    units, features = [], stem_width
    for s, (n, width, stride) in enumerate(zip(counts, widths, strides)):
      for j in range(n):
        units.append(Unit(features, width, stride if j == 0 else 1, unit=unit,
                          placement=placement, option=option,
                          skip_preact=preact and s == 0 and j == 0, stride_first=resnet_1k,
                          projection_norm=not resnet_1k))
        features = width * (BOTTLENECK_EXPANSION if unit == "bottleneck" else 1)
    self.units = nn.Sequential(*units)
    self.final_norm = batch_norm(features) if preact else None
    self.head = nn.Linear(features, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.units(self.pool(F.relu(self.stem_norm(self.stem(x)))))
    if self.final_norm is not None:
      h = F.relu(self.final_norm(h))
    return self.head(h.mean((2, 3)))


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def augment(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
  """Zero pad, random crop and random horizontal flip per example, as resjax.data.images.augment."""
  b, _, h, w = x.shape
  padded = F.pad(x, (pad, pad, pad, pad))
  off = torch.randint(0, 2 * pad + 1, (b, 2), device=x.device, generator=generator)
  rows = (off[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
  cols = (off[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
  flip = torch.rand(b, device=x.device, generator=generator) < 0.5
  cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
  batch = torch.arange(b, device=x.device)[:, None, None, None]
  chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
  return padded[batch, chans, rows, cols]


def make_step(model: nn.Module, opt: torch.optim.Optimizer, mean: torch.Tensor, *, pad: int,
              channels_last: bool, autocast_dtype: torch.dtype | None):
  device_type = mean.device.type

  def step(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x = images[idx].permute(0, 3, 1, 2).float() / 255.0 - mean  # uint8 NHWC -> float NCHW
    if pad:
      x = augment(x, pad)
    if channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      loss = F.cross_entropy(model(x).float(), labels[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return step


def measure(depth: int, batch: int, steps: int, size: int = 32, *, unit: str = "basic",
            placement: str = "post", option: str = "A", imagenet: bool = False,
            num_classes: int = 10, augment: bool = True, mode: str = "eager", dtype: str = "float32",
            channels_last: bool = False, threads: int | None = None,
            device: str | None = None) -> dict:
  """Builds the net, runs two warm-up steps (compiling under mode=compile), then times ``steps``.

  Step time is the median of the individually timed steps; compile time is the warm-up's time
  less two steps.
  """
  if mode not in MODES:
    raise ConfigError(f"torch mode {mode!r}: use one of {', '.join(MODES)}")
  if threads:
    torch.set_num_threads(threads)
  dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.manual_seed(0)
  model = ResNet(depth, unit=unit, placement=placement, option=option, imagenet=imagenet,
                 num_classes=num_classes).to(dev)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  n = max(batch * 4, 64)
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen).to(dev)
  labels = torch.randint(0, num_classes, (n,), generator=gen).to(dev)
  mean = torch.full((1, 3, 1, 1), 0.5, device=dev)
  autocast = {"float32": None, "bfloat16": torch.bfloat16}[dtype]
  # CIFAR rows augment in the step as resjax does; ImageNet data comes augmented from the host.
  step = make_step(model, opt, mean, pad=4 if augment else 0, channels_last=channels_last,
                   autocast_dtype=autocast)
  if mode == "compile":
    step = torch.compile(step)
  order = torch.randperm(n, generator=gen).to(dev)

  def inputs(s: int) -> tuple:  # warm-ups (s < 2) on the first batch, then the order's batches
    j = ((s - 1) * batch) % (n - batch + 1) if s >= 2 else 0
    return images, labels, order[j:j + batch]

  out = time_steps(step, inputs, steps, dev)
  return {"depth": depth, "batch": batch, "mode": mode, "dtype": dtype,
          "channels_last": channels_last, "params": count_params(model), **out,
          "examples_per_s": batch / out["step_s"]}


def time_steps(step, inputs, steps: int, dev: torch.device) -> dict:
  """Runs ``step(*inputs(s))`` for s = 0, 1 (warm-up: under torch.compile the optimizer step
  compiles again on the second call, once its state exists), then times s = 2 .. steps + 1 one
  step at a time, each input made before its clock starts. Step time is the median of the timed
  steps; compile time is the warm-up's time less two steps."""
  t = time.perf_counter()
  for s in range(2):
    float(step(*inputs(s)))  # float(): waits for the device
  warmup_s = time.perf_counter() - t
  times, cpu_times = [], []
  for s in range(2, steps + 2):
    args = inputs(s)
    t, c = time.perf_counter(), time.process_time()
    loss = float(step(*args))
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  step_s = statistics.median(times)
  peak = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda"
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  return {"compile_s": max(warmup_s - 2 * step_s, 0.0), "step_s": step_s,
          "mean_step_s": sum(times) / len(times), "cpu_step_s": statistics.median(cpu_times),
          "peak_gib": peak, "loss": loss,
          "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=20)
  p.add_argument("--unit", default="basic")
  p.add_argument("--placement", default="post")
  p.add_argument("--option", default="A")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--mode", default="eager", choices=MODES)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--channels-last", action="store_true")
  p.add_argument("--threads", type=int)
  p.add_argument("--imagenet", action="store_true", help="the ImageNet ResNet of this depth")
  args = p.parse_args(argv)
  print(json.dumps(measure(args.depth, args.batch, args.steps, args.size, unit=args.unit,
                           placement=args.placement, option=args.option,
                           imagenet=args.imagenet, augment=not args.imagenet, mode=args.mode,
                           dtype=args.dtype, channels_last=args.channels_last,
                           threads=args.threads)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
