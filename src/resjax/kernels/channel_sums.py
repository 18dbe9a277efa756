"""BatchNorm's per-channel sums in one pass each (``channel_sums.cc``), for ``layers.BatchNorm``'s
training step on CPU.

``moments(x)`` is ``(x.sum(axes), (x * x).sum(axes))`` and ``grad_moments(g, x, mean)`` is
``(g.sum(axes), (g * (x - mean)).sum(axes))``, over every axis of float32 ``x`` but the last
(``mean`` one value per channel, formed into ``x - mean`` in registers, never as a map).
``grad_apply(g, x, coef)`` is BatchNorm's input gradient from them, one elementwise pass split
between the OpenMP threads, where XLA:CPU runs its loops on its pool's one thread
(``kernels.one_pool_thread``).
Single-device CPU programs where the kernels are loaded take the custom calls; programs over
several devices and other platforms take the same sums as jax.numpy writes them (XLA partitions
those; a custom call has no sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core
from jax._src.interpreters import batching, mlir

from resjax import kernels
from resjax.kernels.stacks import _one_device


def _axes(ndim: int, reduced: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1 - reduced, ndim - 1))


def _out(x, reduced):
  shape = x.shape[:x.ndim - 1 - reduced] + x.shape[-1:]
  return core.ShapedArray(shape, jnp.float32)


def _moments_ref(x, *, reduced):
  axes = _axes(x.ndim, reduced)
  return [x.sum(axes), jnp.square(x).sum(axes)]


def _grad_moments_ref(g, x, mean, *, reduced):
  axes = _axes(x.ndim, reduced)
  mean = mean.reshape(mean.shape[:-1] + (1,) * reduced + mean.shape[-1:])
  return [g.sum(axes), (g * (x - mean)).sum(axes)]


def _sums(first, *rest, reduced):  # the two sums' shapes (g or x: either shape)
  return [_out(first, reduced)] * 2


def _primitive(name, reference, abstract=_sums):
  """The custom call ``name`` on one CPU device, ``reference`` (jax.numpy) elsewhere; its results
  are a list (``abstract``'s), as the row calls expect (stacks.ROW_OPERANDS)."""
  p = core.Primitive(name)
  p.multiple_results = True
  p.def_abstract_eval(abstract)
  portable = mlir.lower_fun(reference, multiple_results=True)
  mlir.register_lowering(p, portable)
  custom_call = jax.ffi.ffi_lowering(name)

  def cpu(ctx, *args, reduced):
    if _one_device(ctx):
      return custom_call(ctx, *args, reduced=np.int64(reduced))
    return portable(ctx, *args, reduced=reduced)

  mlir.register_lowering(p, cpu, platform="cpu")

  def batch(args, dims, *, reduced):  # a vmapped axis is one more replica axis, in front
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    out = p.bind(*args, reduced=reduced)
    return out, [0] * len(out)

  batching.primitive_batchers[p] = batch
  return p


moments_p = _primitive("resjax_channel_moments", _moments_ref)
grad_moments_p = _primitive("resjax_channel_grad_moments", _grad_moments_ref)


def usable(x: jax.Array) -> bool:
  """Whether ``moments`` and ``grad_moments`` of ``x`` take the custom calls where lowered for one
  CPU device: float32, and the kernels loaded."""
  return x.dtype == jnp.float32 and x.ndim >= 2 and kernels.available()


def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of x, sum of x * x) over every axis but the last."""
  return tuple(moments_p.bind(x, reduced=x.ndim - 1))


def grad_moments(g: jax.Array, x: jax.Array, mean: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of g, sum of g * (x - mean)) over every axis but the last; ``mean`` per channel."""
  return tuple(grad_moments_p.bind(g, x, mean, reduced=x.ndim - 1))


GRAD_APPLY_COEFS = ("mean", "a", "d", "p", "q", "gm", "h")  # coef's rows, in this order


def _grad_apply_ref(g, x, coef, *, reduced):
  lead = x.ndim - 1 - reduced
  per = lambda k: coef[..., k, :].reshape(coef.shape[:lead] + (1,) * reduced + coef.shape[-1:])
  mean, a, d, p, q, gm, h = map(per, range(len(GRAD_APPLY_COEFS)))
  xc = x - mean
  return [(a * (g - d - (xc * p) * q) + gm) + h * xc]


grad_apply_p = _primitive("resjax_channel_grad_apply", _grad_apply_ref,
                          lambda g, x, coef, *, reduced: [core.ShapedArray(g.shape, g.dtype)])


def grad_apply(g: jax.Array, x: jax.Array, coef: jax.Array) -> jax.Array:
  """With xc = x - mean: (a * (g - d - (xc * p) * q) + gm) + h * xc, each of mean, a, d, p, q, gm
  and h one value per channel, the rows of ``coef`` (7, channels) in ``GRAD_APPLY_COEFS``' order."""
  return grad_apply_p.bind(g, x, coef, reduced=x.ndim - 1)[0]
