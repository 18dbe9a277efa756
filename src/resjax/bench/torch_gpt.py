"""What the bench's ``gpt2`` row measures against: resjax's GPT-2 and its training step in PyTorch.

    python -m resjax.bench.torch_gpt --batch 8 --context 1024 --mode compile --dtype bfloat16

The net is ``resjax.models.transformer`` at its defaults (GPT-2 small at width 768, 12 blocks of 12
heads): token and learned position embeddings N(0, 0.02); Pre-LN blocks of causal multi-head
attention and a GELU (tanh form) MLP four times wide, every Dense layer with a bias, kernels
N(0, 0.02) and the two output projections N(0, 0.02 / sqrt(2 L)); LayerNorms with gain and bias,
eps 1e-5; a final LayerNorm; the head is the token embedding transposed. Query, key and value are
one Dense three widths wide (GPT-2's c_attn): resjax's three Dense layers side by side, the same
function and parameters. Attention is ``F.scaled_dot_product_attention`` (causal), which takes
PyTorch's flash or memory-efficient kernels where it has them.

The step, as ``train.train_step`` with ``configs.lm_recipe``'s optimizer: windows of context + 1
tokens cut from a random token stream on the device, forward, cross-entropy in float32 over every
position, backward, clipping to global norm 1.0, AdamW (LR 6e-4, betas 0.9 / 0.95, eps 1e-8,
weight decay 0.1 on matrices and embeddings alone, as resjax's mask; fused on CUDA). ``mode``:
``eager``, or ``compile``: ``torch.compile`` of the model with its loss, the backward through the
compiled graph, clipping and AdamW eager (nanoGPT's split). bf16 is autocast: matrix multiplies
and attention in bf16, LayerNorm and the loss in float32, parameters float32, as resjax's
``dtype="bfloat16"`` (whose head writes float32 logits; autocast's writes bf16). Float32 matrix
multiplies may use TF32 tensor cores on GPUs, as XLA's default precision does there (PyTorch's
default would not).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

from resjax.bench import torch_twin
from resjax.bench.torch_twin import count_params
from resjax.errors import ConfigError

MODES = ("eager", "compile")
INIT_STD = 0.02  # GPT-2, as resjax.models.transformer
LN_EPSILON = 1e-5
ADAMW = {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}  # lm_recipe's
CLIP_NORM = 1.0


def dense(in_features: int, out_features: int, std: float) -> nn.Linear:
  d = nn.Linear(in_features, out_features)
  nn.init.normal_(d.weight, std=std)
  nn.init.zeros_(d.bias)
  return d


class Attention(nn.Module):
  def __init__(self, width: int, heads: int, out_std: float):
    super().__init__()
    if width % heads:
      raise ConfigError(f"width {width} does not divide into {heads} heads: change either")
    self.heads = heads
    self.qkv = dense(width, 3 * width, INIT_STD)
    self.out = dense(width, width, out_std)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = (a.view(b, t, self.heads, d // self.heads).transpose(1, 2)
               for a in self.qkv(x).split(d, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
  """x <- x + attn(LN(x)); x <- x + mlp(LN(x))."""

  def __init__(self, width: int, heads: int, out_std: float, mlp_ratio: int = 4):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=LN_EPSILON)
    self.attn = Attention(width, heads, out_std)
    self.norm2 = nn.LayerNorm(width, eps=LN_EPSILON)
    self.fc = dense(width, mlp_ratio * width, INIT_STD)
    self.proj = dense(mlp_ratio * width, width, out_std)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class GPT(nn.Module):
  """tokens [B, T] int64 -> logits [B, T, vocab]."""

  def __init__(self, vocab_size: int, context: int, width: int = 768, depth: int = 12,
               heads: int = 12):
    super().__init__()
    self.token_embed = nn.Embedding(vocab_size, width)
    self.position_embed = nn.Embedding(context, width)
    for e in (self.token_embed, self.position_embed):
      nn.init.normal_(e.weight, std=INIT_STD)
    out_std = INIT_STD / math.sqrt(2 * depth)  # GPT-2's 1/sqrt(N), N = residual additions
    self.blocks = nn.ModuleList(Block(width, heads, out_std) for _ in range(depth))
    self.final_norm = nn.LayerNorm(width, eps=LN_EPSILON)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = self.token_embed(tokens) + self.position_embed(positions)
    for block in self.blocks:
      x = block(x)
    return F.linear(self.final_norm(x), self.token_embed.weight)  # the tied head


def make_optimizer(model: nn.Module, fused: bool) -> torch.optim.AdamW:
  """AdamW decaying matrices and embeddings (2-D parameters) alone, as resjax's ``_decay_mask``."""
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, **ADAMW, fused=fused or None)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, *, compile: bool,
              autocast_dtype: torch.dtype | None):
  """step(windows [B, T + 1]) -> the loss before the update (a device tensor)."""
  device_type = next(model.parameters()).device.type

  def loss_of(windows: torch.Tensor) -> torch.Tensor:
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

  forward = torch.compile(loss_of) if compile else loss_of

  def step(windows: torch.Tensor) -> torch.Tensor:
    loss = forward(windows)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    opt.step()
    return loss.detach()

  return step


def measure_gpt(batch: int, steps: int, *, context: int = 1024, vocab_size: int = 50304,
                width: int = 768, depth: int = 12, heads: int = 12, mode: str = "eager",
                dtype: str = "float32", threads: int | None = None,
                device: str | None = None) -> dict:
  """Builds the net, runs two warm-up steps (compiling under mode=compile), then times ``steps``.

  Step time is the median of the individually timed steps; compile time is the warm-up's time
  less two steps. ``examples_per_s`` counts sequences of ``context`` tokens.
  """
  if mode not in MODES:
    raise ConfigError(f"torch mode {mode!r}: use one of {', '.join(MODES)}")
  if threads:
    torch.set_num_threads(threads)
  dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  if dev.type == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32 matrix multiplies, as XLA's default
  torch.manual_seed(0)
  model = GPT(vocab_size, context, width, depth, heads).to(dev)
  opt = make_optimizer(model, fused=dev.type == "cuda")
  autocast = {"float32": None, "bfloat16": torch.bfloat16}[dtype]
  step = make_step(model, opt, compile=mode == "compile", autocast_dtype=autocast)
  gen = torch.Generator().manual_seed(0)
  n = max(batch * 4, 64) * (context + 1)
  stream = torch.randint(0, vocab_size, (n,), generator=gen).to(dev)
  offsets = torch.arange(context + 1, device=dev)

  def windows(s: int) -> torch.Tensor:
    starts = torch.randint(0, n - context - 1, (batch,), generator=gen).to(dev)
    return stream[starts[:, None] + offsets]

  out = torch_twin.time_steps(step, lambda s: (windows(s),), steps, dev)
  return {"depth": depth, "width": width, "context": context, "batch": batch, "mode": mode,
          "dtype": dtype, "params": count_params(model), **out,
          "examples_per_s": batch / out["step_s"], "tokens_per_s": batch * context / out["step_s"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--depth", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--mode", default="eager", choices=MODES)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--threads", type=int)
  args = p.parse_args(argv)
  print(json.dumps(measure_gpt(args.batch, args.steps, context=args.context,
                               vocab_size=args.vocab, width=args.width, depth=args.depth,
                               heads=args.heads, mode=args.mode, dtype=args.dtype,
                               threads=args.threads)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
