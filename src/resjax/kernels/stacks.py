"""``lax.scan``'s stacks on CPU: stacked outputs without their zero fill, custom calls' rows read in
place or written by a custom call of its own, and values computed once (``materialize``, used by
``layers``' BatchNorm and ReLU).

jax starts every stacked output of a scan (its ``ys``, and the residuals that a scan's forward pass
keeps for its backward pass) as a broadcast of zeros, which the loop then overwrites row by row.
In a deep CPU training step that fill is a single-threaded pass over hundreds of MiB per step.
``install()``, called when the kernels load, makes the stacks of single-device CPU programs start
from the ``resjax_uninitialized`` custom call (``uninitialized.cc``) instead. The loop still writes
every row before anything reads it. Programs over several devices, sharded or varying avals, and
other platforms keep jax's zeros.

Each step of a scan reads its rows of the stacked inputs and writes its rows of the stacked outputs.
Where a row is a custom call's operand or result (a convolution's input kept for its backward pass,
its output kept for BatchNorm's), XLA:CPU copies it between the stack and a buffer of its own on
one thread. ``install()`` also lowers single-device CPU scans so that the weight gradient and
BatchNorm's backward sums read their saved inputs in place, from the stack at the row's index
(``ROW_OPERANDS``), and that large rows a custom call makes are written by ``resjax_write_row``
(non-temporal stores, see ``uninitialized.cc``); rows that XLA fuses into their elementwise
producers or consumers stay XLA's.

It replaces jax's private ``loops._empty_array`` and the CPU lowering of ``scan_p``, and only where
they have the signatures they were written against (jax 0.10); elsewhere ``install()`` returns
False and changes nothing.
"""

from __future__ import annotations

import contextlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core, sharding_impls
from jax._src import ffi as jffi
from jax._src.interpreters import ad, batching, mlir
from jax._src.lax import slicing
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


def _plain(aval) -> bool:
  return (aval.sharding.mesh.empty and aval.memory_space == core.MemorySpace.Device
          and not _varying(aval) and not jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended))


def _empty_array(prefix, length_spec, aval):
  """A stack of ``prefix`` rows of ``aval``, the custom call's where the aval is plain."""
  if _plain(aval):
    return uninitialized_p.bind(shape=(*prefix, *aval.shape), dtype=aval.dtype)
  return _jax_empty_array(prefix, length_spec, aval)


# The stack with row i replaced: XLA's in-place dynamic update slice, or on single-device CPU the
# custom call (uninitialized.cc). i is clamped to the stack either way.
ROW_COPY_MIN_BYTES = 1 << 20  # smaller rows stay XLA's

write_row_p = core.Primitive("resjax_write_row")
write_row_p.def_abstract_eval(lambda stack, row, i: core.ShapedArray(stack.shape, stack.dtype))

_xla_write = mlir.lower_fun(
    lambda stack, row, i: slicing.dynamic_update_index_in_dim(stack, row, i, 0,
                                                              allow_negative_indices=False),
    multiple_results=False)
_write_call = jax.ffi.ffi_lowering("resjax_write_row", operand_output_aliases={0: 0})

mlir.register_lowering(write_row_p, _xla_write)
mlir.register_lowering(
    write_row_p, lambda ctx, *a: (_write_call if _one_device(ctx) else _xla_write)(ctx, *a),
    platform="cpu")


def _copied_rows(stack, i) -> bool:
  """Whether a row of ``stack`` at ``i`` is written by ``resjax_write_row``."""
  aval = core.typeof(stack)
  return (_plain(aval) and core.typeof(i).dtype == jnp.int32 and aval.ndim >= 1
          and aval.size // max(aval.shape[0], 1) * aval.dtype.itemsize >= ROW_COPY_MIN_BYTES)


def _calls_out(eqn) -> bool:
  return eqn.primitive.name == "ffi_call" or eqn.primitive.name.startswith("resjax_")


def _called_out(v, jaxpr, produced: dict, inner: bool = False) -> bool:
  """Whether ``jaxpr``'s value ``v`` is a custom call's result (looking inside calls such as
  custom_vjp_call, whose results are their own jaxpr's), or else an input of the scan body.
  ``produced``: {value: the equation that makes it} of ``jaxpr``."""
  if isinstance(v, core.Literal):
    return False
  eqn = produced.get(v)
  if eqn is None:
    return not inner  # the body's input; a call's input could be anything outside it
  if _calls_out(eqn):
    return True
  if eqn.primitive.name == "reshape":  # the same buffer
    return _called_out(eqn.invars[0], jaxpr, produced, inner)
  sub = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
  sub = getattr(sub, "jaxpr", sub)
  if not isinstance(sub, core.Jaxpr) or len(sub.outvars) != len(eqn.outvars):
    return False
  return _called_out(sub.outvars[eqn.outvars.index(v)], sub, _producers(sub), inner=True)


def _producers(jaxpr) -> dict:
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def _rows_written(jaxpr, num_carry: int) -> list[bool]:
  """Which stacked outputs of a scan body are a custom call's result or an input passed through:
  the rows XLA would copy on one thread."""
  body = jaxpr.jaxpr
  produced = _producers(body)
  return [_called_out(v, body, produced) for v in body.outvars[num_carry:]]


class _ScanSlicing:
  """``loops.slicing`` while a scan lowers: the k-th row write of each traced step goes through
  ``resjax_write_row`` where ``writes[k]`` says so and the row qualifies."""

  def __init__(self, writes: list[bool]):
    self.writes, self.n_written = writes, 0

  def __getattr__(self, name):
    return getattr(slicing, name)

  def dynamic_update_index_in_dim(self, stack, row, i, axis, **kw):
    k, self.n_written = self.n_written % len(self.writes), self.n_written + 1
    if (self.writes[k] and axis == 0 and core.typeof(row).shape == core.typeof(stack).shape[1:]
        and _copied_rows(stack, i)):
      return write_row_p.bind(stack, row, i)
    return slicing.dynamic_update_index_in_dim(stack, row, i, axis, **kw)


# Custom calls one of whose operands is a row of the scan's stacked inputs can take the stack and
# the row's index instead, and read the row in place: {FFI target or primitive: (its row variant,
# the operand that is the row)}. The weight gradient reads the convolution's saved input, and
# BatchNorm's backward sums and input gradient its saved input: the largest rows a backward scan
# would copy.
ROW_OPERANDS = {"resjax_onednn_conv_bwd_weights": ("resjax_onednn_conv_bwd_weights_row", 0),
                "resjax_channel_grad_moments": ("resjax_channel_grad_moments_row", 1),
                "resjax_channel_grad_apply": ("resjax_channel_grad_apply_row", 1)}

row_call_p = core.Primitive("resjax_row_operand_call")
row_call_p.multiple_results = True
row_call_p.def_abstract_eval(lambda stack, i, *rest, avals, **_: list(avals))


def _operands(inserted, rest, operand):
  """The call's operands: ``rest`` with ``inserted`` (the row, or the stack and index) at
  ``operand``."""
  return [*rest[:operand], *inserted, *rest[operand:]]


def _row_call_xla(ctx, stack, i, *rest, prim, params, operand, **_):
  def call(stack, i, *rest):
    row = slicing.dynamic_index_in_dim(stack, i, 0, keepdims=False, allow_negative_indices=False)
    return prim.bind(*_operands([row], rest, operand), **dict(params))
  return mlir.lower_fun(call, multiple_results=True)(ctx, stack, i, *rest)


def _row_call_cpu(ctx, stack, i, *rest, row_target, attributes, operand, **kw):
  if not _one_device(ctx):
    return _row_call_xla(ctx, stack, i, *rest, operand=operand, **kw)
  avals = ctx.avals_in  # in the call's operand order, as the operands
  ctx = ctx.replace(avals_in=_operands(avals[:2], avals[2:], operand))
  return jax.ffi.ffi_lowering(row_target)(ctx, *_operands([stack, i], rest, operand),
                                          **dict(attributes))


mlir.register_lowering(row_call_p, _row_call_xla)
mlir.register_lowering(row_call_p, _row_call_cpu, platform="cpu")


def _row_operand(eqn) -> tuple[str, int, tuple] | None:
  """(row variant, row operand, FFI attributes) of a call that has one, else None."""
  if eqn.primitive is jffi.ffi_call_p:
    found = ROW_OPERANDS.get(eqn.params["target_name"])
    return found and (*found, tuple(eqn.params["attributes"]))
  found = ROW_OPERANDS.get(eqn.primitive.name)
  return found and (*found, tuple((k, np.int64(v)) for k, v in eqn.params.items()))


def row_call_params(eqn) -> dict:
  """``row_call_p``'s parameters for ``eqn``'s call, bound as (stack, i, the other operands)."""
  row_target, operand, attributes = _row_operand(eqn)
  return dict(row_target=row_target, operand=operand, attributes=attributes, prim=eqn.primitive,
              params=tuple(eqn.params.items()), avals=tuple(v.aval for v in eqn.outvars))


def _row_call(eqn, stack, i):
  """``eqn``'s call with its row operand read in place as row ``i`` of ``stack``."""
  rest = [v for k, v in enumerate(eqn.invars) if k != _row_operand(eqn)[1]]
  return core.new_jaxpr_eqn([stack, i, *rest], eqn.outvars, row_call_p, row_call_params(eqn),
                            eqn.effects, eqn.source_info, eqn.ctx)


def _rows_in_place(args, num_consts: int, num_carry: int, length: int, jaxpr):
  """The scan with each ``ROW_OPERANDS`` call on a row of a stacked input taking the whole stack (a
  new const) and the row's index (a new stacked input, ``arange(length)``, so that jax's reverse
  order applies to it as to the rows), or None where there is none."""
  body = jaxpr.jaxpr
  first_xs = num_consts + num_carry
  position = {v: k for k, v in enumerate(body.invars[first_xs:])}

  def row_of(eqn):
    found = _row_operand(eqn)
    v = found and len(eqn.invars) > found[1] and eqn.invars[found[1]]
    return v if v in position and _plain(core.typeof(args[first_xs + position[v]])) else None

  calls = {id(eqn): v for eqn in body.eqns if (v := row_of(eqn)) is not None}
  if not calls:
    return None
  rows = list(dict.fromkeys(calls.values()))
  stacks = [args[first_xs + position[v]] for v in rows]
  stack_vars = {v: core.Var(core.typeof(a)) for v, a in zip(rows, stacks)}
  index = core.Var(core.ShapedArray((), jnp.int32))
  eqns = [_row_call(eqn, stack_vars[calls[id(eqn)]], index) if id(eqn) in calls else eqn
          for eqn in body.eqns]
  invars = [*body.invars[:num_consts], *stack_vars.values(), *body.invars[num_consts:], index]
  new_body = core.Jaxpr(body.constvars, invars, body.outvars, eqns, body.effects,
                        body.debug_info.with_unknown_names() if body.debug_info else None)
  new_args = [*args[:num_consts], *stacks, *args[num_consts:],
              jnp.arange(length, dtype=jnp.int32)]
  return new_args, num_consts + len(stacks), core.ClosedJaxpr(new_body, jaxpr.consts)


_jax_scan_impl = getattr(loops, "_scan_impl", None)


@contextlib.contextmanager
def _slicing(proxy):
  outer, loops.slicing = loops.slicing, proxy
  try:
    yield
  finally:
    loops.slicing = outer


def _scan_impl(*args, reverse, length, num_consts, num_carry, jaxpr, unroll):
  """jax's scan, its weight gradients reading their rows in place and its custom-call rows
  written by ``resjax_write_row``."""
  params = dict(reverse=reverse, length=length, num_consts=num_consts, num_carry=num_carry,
                jaxpr=jaxpr, unroll=unroll)
  if unroll != 1:
    return _jax_scan_impl(*args, **params)
  in_place = _rows_in_place(args, num_consts, num_carry, length, jaxpr)
  if in_place is not None:
    args, num_consts, jaxpr = in_place
    params.update(num_consts=num_consts, jaxpr=jaxpr)
  writes = _rows_written(jaxpr, num_carry)
  if not any(writes):
    return _jax_scan_impl(*args, **params)
  with _slicing(_ScanSlicing(writes)):
    return _jax_scan_impl(*args, **params)


_scan_lowering = mlir.lower_fun(_scan_impl, multiple_results=True)


def _signature(f) -> list[str] | None:
  try:
    return list(inspect.signature(f).parameters)
  except (TypeError, ValueError):
    return None


def install() -> bool:
  """Makes scans lowered from now on start their stacks uninitialized and copy custom calls' rows
  with the row calls (see above); whether it did."""
  if _jax_empty_array is None or _jax_scan_impl is None:
    return False
  if _signature(_jax_empty_array) != ["prefix", "length_spec", "aval"]:
    return False
  if (_signature(_jax_scan_impl) != ["args", "reverse", "length", "num_consts", "num_carry",
                                     "jaxpr", "unroll"]
      or not callable(getattr(loops.slicing, "dynamic_update_index_in_dim", None))):
    return False
  loops._empty_array = _empty_array
  mlir.register_lowering(loops.scan_p, _scan_lowering, platform="cpu")
  return True


def uninstall() -> None:
  """Back to jax's zero-filled stacks and row copies for scans lowered from now on."""
  if _jax_empty_array is not None:
    loops._empty_array = _jax_empty_array
  cpu = mlir._platform_specific_lowerings.get("cpu", {})
  if getattr(cpu.get(loops.scan_p), "rule", None) is _scan_lowering:
    del cpu[loops.scan_p]


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
