"""Layers whose implementation resjax chooses itself.

``Conv2D`` keeps an HWIO kernel and computes either with XLA's convolution or as im2col + one matrix
multiply. On CPU, XLA compiles the backward pass of a convolution inside a ``lax.scan`` body to a
slow generic loop (in a first probe here: 1.3 s against 0.15 s per step for 17 scanned 16-channel
units at 8x8, and 130 s against 6 s at 32x32), and even unrolled its convolution ran at half the
speed of im2col. Accelerators get XLA's own convolution (cuDNN on GPU, the MXU path on TPU).
Both use the symmetric padding k // 2 of the papers' code, so they compute the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resjax.errors import ConfigError

CONV_IMPLS = ("auto", "im2col", "xla")
he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_conv_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ConfigError(f"unknown conv implementation {impl!r}: set config.model.conv_impl to one of "
                      f"{', '.join(CONV_IMPLS)}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


def im2col(x: jax.Array, k: int, stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, H', W', k*k*C] patches, zero padding k // 2, in (dy, dx, c) order."""
  p = k // 2
  if k == 1:
    return x[:, ::stride, ::stride, :]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h_out = (x.shape[1] + 2 * p - k) // stride + 1
  w_out = (x.shape[2] + 2 * p - k) // stride + 1
  cols = [xp[:, dy:dy + stride * (h_out - 1) + 1:stride, dx:dx + stride * (w_out - 1) + 1:stride, :]
          for dy in range(k) for dx in range(k)]
  return jnp.concatenate(cols, axis=-1)


class Conv2D(nnx.Module):
  """A bias-free k x k convolution with stride, NHWC, He-normal (fan-out) kernel."""

  def __init__(self, in_features: int, out_features: int, kernel: int, stride: int = 1, *,
               impl: str = "auto", dtype=None, rngs: nnx.Rngs):
    self.kernel = nnx.Param(he_normal(rngs.params(), (kernel, kernel, in_features, out_features)))
    self.k, self.stride, self.impl, self.dtype = kernel, stride, resolve_conv_impl(impl), dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...]
    if self.dtype is not None:
      x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.impl == "im2col":
      return im2col(x, self.k, self.stride) @ w.reshape(-1, w.shape[-1])
    p = self.k // 2
    return jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
