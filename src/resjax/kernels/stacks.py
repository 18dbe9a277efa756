"""``lax.scan``'s stacked outputs on CPU without their zero fill, and values a scan keeps computed
once (``materialize``, used by ``layers.relu`` in scan bodies).

jax starts every stacked output of a scan (its ``ys``, and the residuals that a scan's forward pass
keeps for its backward pass) as a broadcast of zeros, which the loop then overwrites row by row.
In a deep CPU training step that fill is a single-threaded pass over hundreds of MiB per step.
``install()``, called when the kernels load, makes the stacks of single-device CPU programs start
from the ``resjax_uninitialized`` custom call (``uninitialized.cc``) instead. The loop still writes
every row before anything reads it. Programs over several devices, sharded or varying avals, and
other platforms keep jax's zeros.

It replaces jax's private ``loops._empty_array``, and only where that has the signature it was
written against (jax 0.10); elsewhere ``install()`` returns False and changes nothing.
"""

from __future__ import annotations

import inspect

import jax
from jax._src import core, sharding_impls
from jax._src.interpreters import ad, batching, mlir
from jax._src.lax.control_flow import loops

TARGET = "resjax_uninitialized"

uninitialized_p = core.Primitive(TARGET)
uninitialized_p.def_abstract_eval(lambda *, shape, dtype: core.ShapedArray(shape, dtype))


def _zeros(ctx, *, shape, dtype):
  return [mlir.full_like_aval(ctx, 0, ctx.avals_out[0])]


_custom_call = jax.ffi.ffi_lowering(TARGET, has_side_effect=True)  # never merged with another


def _one_device(ctx) -> bool:
  """Whether the program being lowered runs on one device (custom calls here have no sharding)."""
  axes = ctx.module_context.axis_context
  return isinstance(axes, sharding_impls.ShardingContext) and axes.num_devices == 1


def _cpu(ctx, *, shape, dtype):
  return _custom_call(ctx) if _one_device(ctx) else _zeros(ctx, shape=shape, dtype=dtype)


mlir.register_lowering(uninitialized_p, _zeros)
mlir.register_lowering(uninitialized_p, _cpu, platform="cpu")

_jax_empty_array = getattr(loops, "_empty_array", None)


def _varying(aval) -> bool:
  return bool(getattr(getattr(aval, "mat", None), "varying", None) or getattr(aval, "vma", None))


def _empty_array(prefix, length_spec, aval):
  """A stack of ``prefix`` rows of ``aval``, the custom call's where the aval is plain."""
  if (aval.sharding.mesh.empty and aval.memory_space == core.MemorySpace.Device
      and not _varying(aval) and not jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended)):
    return uninitialized_p.bind(shape=(*prefix, *aval.shape), dtype=aval.dtype)
  return _jax_empty_array(prefix, length_spec, aval)


def install() -> bool:
  """Makes scans lowered from now on start their stacks uninitialized (see above); whether it did."""
  if _jax_empty_array is None:
    return False
  try:
    params = list(inspect.signature(_jax_empty_array).parameters)
  except (TypeError, ValueError):
    return False
  if params != ["prefix", "length_spec", "aval"]:
    return False
  loops._empty_array = _empty_array
  return True


def uninstall() -> None:
  """Back to jax's zero-filled stacks for scans lowered from now on."""
  if _jax_empty_array is not None:
    loops._empty_array = _jax_empty_array


# x behind resjax_materialize, an aliasing custom call that does nothing: XLA computes x once
# instead of again inside each stack write that keeps it (uninitialized.cc). Single-device CPU
# programs only, as above; elsewhere x itself.
materialize_p = core.Primitive("resjax_materialize")
materialize_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(materialize_p, lambda ctx, x: [x])
_aliasing_call = jax.ffi.ffi_lowering("resjax_materialize", operand_output_aliases={0: 0})


def _materialize_cpu(ctx, x):
  return _aliasing_call(ctx, x) if _one_device(ctx) else [x]


mlir.register_lowering(materialize_p, _materialize_cpu, platform="cpu")
batching.primitive_batchers[materialize_p] = lambda args, dims: (materialize_p.bind(*args), dims[0])
ad.primitive_jvps[materialize_p] = lambda primals, tangents: (materialize_p.bind(*primals),
                                                              tangents[0])


def materialize(x: jax.Array) -> jax.Array:
  """``x``, computed once by XLA:CPU where the kernels are loaded (see ``materialize_p``)."""
  return materialize_p.bind(x)
