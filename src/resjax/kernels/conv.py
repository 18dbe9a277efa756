"""``conv(x, w, stride)``: oneDNN's convolution as a differentiable JAX function (CPU only).

NHWC ``x``, HWIO ``w`` of odd or even size k, zero padding k // 2 on every side, as
``lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), ("NHWC", "HWIO", "NHWC"))``
computes. float32 only. Its VJP keeps only ``x`` and ``w``; the weight gradient, then the data
gradient, are oneDNN's backward convolutions (XLA drops the data gradient where it is unused, as
for the first layer, whose input is the images). Under ``vmap`` (resjax's seed replicas) each
replica's convolution is its own oneDNN call inside one custom call (leading dimensions are
replicas).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from resjax import kernels


def out_shape(x_shape, w_shape, stride: int) -> tuple[int, int, int, int]:
  b, h, wd, _ = x_shape
  k, o = w_shape[0], w_shape[-1]
  p = k // 2
  return b, (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1, o


def _call(target: str, shapes, *args, stride: int, k: int):
  kernels.require()
  out = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.ffi.ffi_call(target, out, vmap_method="expand_dims")(*args, stride=stride,
                                                                  pad=k // 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
  """oneDNN's forward convolution of float32 NHWC ``x`` with HWIO ``w``."""
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise TypeError(f"the oneDNN convolution is float32 only, got {x.dtype} and {w.dtype}")
  (y,) = _call("resjax_onednn_conv_fwd", [out_shape(x.shape, w.shape, stride)], x, w,
                stride=stride, k=w.shape[0])
  return y


def _fwd(x, w, stride):
  return conv(x, w, stride), (x, w)


def _bwd(stride, residuals, g):
  x, w = residuals
  k = w.shape[0]
  (dw,) = _call("resjax_onednn_conv_bwd_weights", [w.shape], x, g, stride=stride, k=k)
  # dw as an unread operand orders the two calls (see onednn_conv.cc); an unused dx is dead code.
  (dx,) = _call("resjax_onednn_conv_bwd_data", [x.shape], g, w, dw, stride=stride, k=k)
  return dx, dw


conv.defvjp(_fwd, _bwd)
