"""Layers whose implementation resjax chooses itself.

``Conv2D`` keeps an HWIO kernel and computes with XLA's convolution (``impl="xla"``: cuDNN on GPU,
the MXU path on TPU) or, on CPU, with oneDNN's (``impl="onednn"``, ``resjax.kernels``: built on
request) or as matrix multiplies (``impl="im2col"``). ``"auto"`` is XLA's off CPU, and on CPU
oneDNN's where its library is built, else the matmuls. XLA:CPU compiles the backward pass of its own
convolution inside a ``lax.scan`` body to a slow generic loop (README, Speed), hence the two CPU
paths. The matmul path:

* 1x1: subsample, then one matmul over channels;
* k x k, stride 1 (almost all of a ResNet): ``conv_rows``. The k column shifts of the padded
  input are concatenated along channels (k*C wide, not im2col's k*k*C), one matmul against the
  kernel laid out as (dx, c) x (dy, o) gives every row's contribution to k output rows at once,
  and the output is the sum of those k row-shifted slices. Its custom VJP keeps only the input
  for the backward pass (the k*C patches are rebuilt there), so a scan stacks activations, not
  patches, across units: im2col's k*k*C patches were the largest buffers of a ResNet step;
* k x k, stride > 1 (one per stage): im2col, k*k*C patches and one matmul.

Every form uses the symmetric padding k // 2 of the papers' code, so all compute the same function.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from resjax import kernels
from resjax.errors import ConfigError
from resjax.kernels import conv as onednn

try:
  from resjax.kernels import channel_sums
except ImportError:  # the jax internals it lowers with have moved: BatchNorm's sums stay jnp's
  channel_sums = None

CONV_IMPLS = ("auto", "im2col", "onednn", "xla")
he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_conv_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ConfigError(f"unknown conv implementation {impl!r}: set config.model.conv_impl to one of "
                      f"{', '.join(CONV_IMPLS)}")
  on_cpu = jax.default_backend() == "cpu"
  if impl == "auto":
    return ("onednn" if kernels.available() else "im2col") if on_cpu else "xla"
  if impl == "onednn":
    if not on_cpu:
      raise ConfigError(f"conv_impl='onednn' is a CPU kernel, and this is {jax.default_backend()}: "
                        f"set config.model.conv_impl to auto or xla")
    try:
      kernels.require()
    except kernels.NotBuilt as e:
      raise ConfigError(f"{e} (or set config.model.conv_impl to auto)") from None
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


# ------------------------------------------------------------------------------------------------
# Stride-1 k x k convolution as one matmul over column shifts, summed over row shifts.
# ------------------------------------------------------------------------------------------------

def column_patches(x: jax.Array, k: int) -> jax.Array:
  """[B, H, W, C] -> [B, H + k - 1, W, k*C]: the zero-padded rows, k column shifts side by side."""
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate([xp[:, :, dx:dx + x.shape[2], :] for dx in range(k)], axis=-1)


def _row_kernel(w: jax.Array) -> jax.Array:
  """HWIO [k, k, C, O] -> [k*C, k*O], rows in (dx, c) order, columns in (dy, o) order."""
  k, _, c, o = w.shape
  return w.transpose(1, 2, 0, 3).reshape(k * c, k * o)


@jax.custom_vjp
def conv_rows(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution of NHWC ``x`` with an HWIO kernel of odd size k."""
  k, o = w.shape[0], w.shape[-1]
  b, h, wd, _ = x.shape
  z = (column_patches(x, k) @ _row_kernel(w)).reshape(b, h + k - 1, wd, k, o)
  return sum(z[:, dy:dy + h, :, dy] for dy in range(k))


def _conv_rows_fwd(x, w):
  return conv_rows(x, w), (x, w)


def _conv_rows_bwd(residuals, g):
  x, w = residuals
  k, _, c, o = w.shape
  b, h, wd, _ = x.shape
  p, rows = k // 2, b * (h + k - 1) * wd
  # The output's row h took block dy of patch row h + dy: block dy of dz is g shifted down dy rows.
  # Written as k in-place updates of one buffer, not a concatenation of k padded copies: XLA fuses
  # g's producer (BatchNorm's backward) into either, but a concatenation evaluates it per output
  # element through k-way selects (13% of a ResNet-110 step here), an update once per element of g.
  dz = jnp.zeros((b, h + k - 1, wd, k, o), g.dtype)
  for dy in range(k):
    dz = dz.at[:, dy:dy + h, :, dy].set(g)
  dz = dz.reshape(rows, k * o)
  patches = column_patches(x, k).reshape(rows, k * c)
  dw = jnp.matmul(patches.T, dz, preferred_element_type=jnp.float32)  # a sum over every pixel
  dw = dw.reshape(k, c, k, o).transpose(2, 0, 1, 3)
  dpatches = (dz @ _row_kernel(w).T).reshape(b, h + k - 1, wd, k, c)
  dxp = sum(jnp.pad(dpatches[:, :, :, dx], ((0, 0), (0, 0), (dx, k - 1 - dx), (0, 0)))
            for dx in range(k))
  return dxp[:, p:p + h, p:p + wd], dw.astype(w.dtype)


conv_rows.defvjp(_conv_rows_fwd, _conv_rows_bwd)


def matmul_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """NHWC x HWIO convolution, padding k // 2, as matrix multiplies (the CPU path)."""
  k = w.shape[0]
  if k == 1:
    return x[:, ::stride, ::stride, :] @ w[0, 0]
  if stride == 1 and k % 2 == 1:
    return conv_rows(x, w)
  return im2col(x, k, stride) @ w.reshape(-1, w.shape[-1])


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
    if self.impl == "onednn" and x.dtype == jnp.float32:
      return onednn.conv(x, w, self.stride)
    if self.impl in ("im2col", "onednn"):  # oneDNN's is float32 only: other dtypes take the matmuls
      return matmul_conv(x, w, self.stride)
    p = self.k // 2
    return jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def set_compute_dtype(model: nnx.Module, dtype) -> None:
  """Makes every convolution, Dense layer and BatchNorm of ``model`` compute in ``dtype``.

  Parameters stay float32, and BatchNorm still reduces its batch statistics in float32 (flax
  promotes them to at least float32): only matrix multiplies and BN's output are ``dtype``.
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, (Conv2D, nnx.Linear, nnx.BatchNorm)):
      module.dtype = dtype


def rms(a: jax.Array, axes=None) -> jax.Array:
  """Root mean square over ``axes`` (all by default), scaled by the peak first: in float32 the
  squares of values below about 1e-19 would flush to zero, and a gradient that halves at each of
  a hundred units goes far below that."""
  a = a.astype(jnp.float32)
  peak = jnp.max(jnp.abs(a), axis=axes, keepdims=True)
  safe = jnp.where(peak > 0, peak, 1.0)
  return jnp.squeeze(peak, axis=axes) * jnp.sqrt(jnp.mean(jnp.square(a / safe), axis=axes))


# ------------------------------------------------------------------------------------------------
# Identical units under one scan, optionally rematerialised.
# ------------------------------------------------------------------------------------------------

# config.model.remat -> the jax.checkpoint policy of the scanned unit (what its backward may keep
# from the forward pass; everything else is recomputed). "none": no checkpoint, keep everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


REMATS = ("auto", *REMAT_POLICIES)  # config.model.remat's values


def check_remat(remat: str) -> str:
  if remat not in REMATS:
    raise ConfigError(f"unknown remat {remat!r}: set config.model.remat to one of "
                      f"{', '.join(REMATS)}")
  return remat


# On CPU "auto" remats a scanned stack of units only where it would keep more than this for its
# backward pass, per replica: above ResNet-110's stacks at batch 128, which ran faster without remat
# on both of the project's CPU machines, below pre-act ResNet-1001's first at batch 16 (README,
# Memory at depth).
AUTO_REMAT_KEPT_GIB = 1.0

_chosen: list | None = None  # where ``remats_chosen`` collects, else None


@contextlib.contextmanager
def remats_chosen():
  """Collects, while tracing under it, what each "auto" became: a list of (policy, kept GiB)."""
  global _chosen
  outer, _chosen = _chosen, []
  try:
    yield _chosen
  finally:
    _chosen = outer


def remat_used(requested: str, chosen: list) -> str:
  """What ``requested`` remat became in a program traced under ``remats_chosen`` (``chosen``):
  "auto"'s policies stack by stack, joined by "+" where they differ; "none" without a scanned
  stack."""
  if requested != "auto":
    return check_remat(requested)
  policies = [policy for policy, _ in chosen] or ["none"]
  return policies[0] if len(set(policies)) == 1 else "+".join(policies)


def resolve_remat(remat: str, kept_gib: float | None = None) -> str:
  """``remat`` as a ``REMAT_POLICIES`` key. "auto" is "none" off CPU; on CPU it is "full" where a
  scanned stack would keep more than ``AUTO_REMAT_KEPT_GIB`` (``kept_gib``: what it keeps without
  remat, per replica; unknown counts as more), else "none".

  Full remat keeps one map per unit instead of about four and a quarter; what it costs in speed
  depends on the machine, from a gain to a quarter of the throughput (README, Speed). On
  accelerators recomputing is a third more FLOPs for memory a net may not need.
  """
  if check_remat(remat) != "auto":
    return remat
  if jax.default_backend() != "cpu":
    return "none"
  return "none" if kept_gib is not None and kept_gib <= AUTO_REMAT_KEPT_GIB else "full"


def scan_kept_gib(step, h, scanned, units: int) -> float:
  """GiB that ``units`` scanned steps ``step(h, scanned[i])`` keep for the backward pass without
  remat: the residuals of one step's VJP with respect to ``h`` and its floating-point inputs, times
  ``units``. Traced abstractly; the caller's state is not touched."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), scanned)

  def residuals(h, scanned):
    leaves, tree = jax.tree.flatten(scanned)
    floats = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating)]

    def f(h, xs):
      full = list(leaves)
      for i, a in zip(floats, xs):
        full[i] = a
      return step(h, jax.tree.unflatten(tree, full))

    return jax.vjp(f, h, [leaves[i] for i in floats])[1]

  out = jax.eval_shape(residuals, jax.ShapeDtypeStruct(h.shape, h.dtype), one)
  kept = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(out))
  return units * kept / 2**30


def run_units(units, apply, x: jax.Array, probes=None, *, scan: bool, remat: str = "none"):
  """Runs ``apply(unit, h) -> h`` through identical units: under ``jax.lax.scan`` over the units
  stacked on axis 0 of ``units`` (``scan``), else a Python loop over a list of them.

  With ``probes`` (one per unit, on axis 0) each unit's input gets its probe added, and the RMS of
  every unit's input comes back as a (units,) array (else None). Under the scan, what changed in
  the units besides parameters (BatchNorm statistics, RNG counters) is written back to ``units``,
  and ``remat`` (``REMATS``) names the checkpoint policy of the scanned step.
  """
  check_remat(remat)

  def probed(unit, h, probe):
    r = None
    if probe is not None:
      h = h + probe
      r = rms(h)
    return apply(unit, h), r

  if not scan:
    norms = []
    for i, unit in enumerate(units):
      x, r = probed(unit, x, None if probes is None else probes[i])
      norms.append(r)
    return x, (jnp.stack(norms) if probes is not None and norms else None)

  graphdef, stacked = nnx.split(units)

  def step(h, scanned):
    unit_state, probe = scanned
    unit = nnx.merge(graphdef, unit_state, copy=True)
    h, r = probed(unit, h, probe)
    return h, (nnx.state(unit, nnx.Not(nnx.Param)), r)  # parameters come back unchanged

  if remat == "auto":
    kept = (scan_kept_gib(step, x, (stacked, probes), jax.tree.leaves(stacked)[0].shape[0])
            if jax.default_backend() == "cpu" else None)
    remat = resolve_remat(remat, kept)
    if _chosen is not None:
      _chosen.append((remat, kept))
  policy = REMAT_POLICIES[remat]
  if remat != "none":
    # prevent_cse=False: inside a scan, XLA cannot merge the recomputation with the forward pass.
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  with scanning():
    x, (updated, norms) = jax.lax.scan(step, x, (stacked, probes))
  nnx.update(units, updated)
  return x, norms


# ------------------------------------------------------------------------------------------------
# BatchNorm with a hand-written backward pass (training mode, float32, NHWC).
# ------------------------------------------------------------------------------------------------

def _one_pass_sums(x) -> bool:
  """Whether BatchNorm's per-channel sums of ``x`` go through ``kernels.channel_sums``: both sums of
  each direction in one pass, where XLA:CPU reduces each on its own (README, Speed)."""
  return channel_sums is not None and channel_sums.usable(x)


@jax.custom_vjp
def batch_norm_train(x, scale, bias, epsilon):
  """(y, mean, var) of BatchNorm over every axis but the last, as flax computes them."""
  axes = tuple(range(x.ndim - 1))
  if _one_pass_sums(x):
    total, total_sq = channel_sums.moments(x)
    n = x.size // x.shape[-1]
    mean, mean_sq = total / n, total_sq / n
  else:
    mean, mean_sq = x.mean(axes), jnp.square(x).mean(axes)
  var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
  a = jax.lax.rsqrt(var + epsilon) * scale
  if reps := _row_reps(x):
    y = (_rows(x) - _lanes(mean, reps)) * _lanes(a, reps) + _lanes(bias, reps)
    return y.reshape(x.shape), mean, var
  return (x - mean) * a + bias, mean, var


def _bn_fwd(x, scale, bias, epsilon):
  y, mean, var = batch_norm_train(x, scale, bias, epsilon)
  kept = _rows(x) if _row_reps(x) else x  # in rows, the backward pass's passes are rows too
  return (y, mean, var), (kept, mean, var, scale, epsilon)


def _bn_bwd(residuals, cts):
  x, mean, var, scale, epsilon = residuals
  g, g_mean, g_var = cts
  c = g.shape[-1]
  reps = x.shape[-1] // c if x.shape != g.shape else 0  # x kept as rows (_bn_fwd)
  if reps:
    g = g.reshape(x.shape)
    per = functools.partial(_lanes, reps=reps)
    fold = lambda v: v.reshape(reps, c).sum(0)
  else:
    per = fold = lambda v: v
  axes = tuple(range(x.ndim - 1))
  n = x.size // c
  inv = jax.lax.rsqrt(var + epsilon)
  if _one_pass_sums(x):
    # Both passes are custom calls: they form xc in registers, read x (in a scan, in place in its
    # stack) and split the work between the OpenMP threads; the same expression as below.
    lanes = lambda v: jnp.tile(v, reps) if reps else v  # custom calls' operands: nothing to fuse
    mean_lanes = lanes(mean)
    dbias, dscale_raw = map(fold, channel_sums.grad_moments(g, x, mean_lanes))
    vectors = (inv * scale, dbias / n, inv * inv, dscale_raw / n, g_mean / n, g_var * (2.0 / n))
    coef = jnp.stack([mean_lanes, *map(lanes, vectors)])
    dx = channel_sums.grad_apply(g, x, coef).reshape(cts[0].shape)
    return dx, dscale_raw * inv, dbias, jnp.zeros_like(epsilon)
  xc = x - per(mean)
  dbias, dscale_raw = fold(g.sum(axes)), fold((g * xc).sum(axes))  # dscale_raw: sum g*xhat / inv
  dx = per(inv * scale) * (g - per(dbias / n) - xc * per(inv * inv) * per(dscale_raw / n))
  dx = dx + per(g_mean / n) + per(g_var * (2.0 / n)) * xc
  if reps:
    dx = _materialize(dx).reshape(cts[0].shape)
  return dx, dscale_raw * inv, dbias, jnp.zeros_like(epsilon)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


# ------------------------------------------------------------------------------------------------
# ReLU whose backward pass avoids XLA:CPU's scalar loops over bool operands.
# ------------------------------------------------------------------------------------------------

# The tangent of ReLU gated by its output. As a checkpoint of its own, linearizing it saves y (kept
# anyway as the next layer's input) and recomputes y > 0 in the backward pass.
_relu_gate = jax.checkpoint(lambda y, t: jnp.where(y > 0, t, jnp.zeros_like(t)), prevent_cse=False)


# The same gate over rows (``_row_reps``), so that its transpose, the backward pass's gate, is a
# pass over rows too. It reshapes inside the checkpoint, so that what linearizing it saves is y
# itself, the array the next convolution keeps, not a second stack of the same values.
_relu_gate_rows = jax.checkpoint(
    lambda y, t: jnp.where(_rows(y) > 0, _rows(t), jnp.zeros_like(_rows(t))).reshape(t.shape),
    prevent_cse=False)


_scanning = False  # True while run_units traces a scan's body


@contextlib.contextmanager
def scanning():
  """Marks a scan body being traced: its ReLU results that the scan keeps for the backward pass
  are materialized (``_materialized``)."""
  global _scanning
  outer, _scanning = _scanning, True
  try:
    yield
  finally:
    _scanning = outer


def _materialized(x):
  """``x`` behind ``kernels.stacks.materialize`` where the kernels are loaded: as rows where
  ``_row_reps`` allows (the pass that computes it then runs over rows, ``_rows``), else inside a
  scan body only. XLA fuses a ReLU's elementwise producer (BatchNorm's apply, a residual add) into
  every consumer, so a value that a scan both uses and keeps is computed a second time inside the
  stack's row write, which XLA:CPU runs on one thread; behind the custom call the write is a copy.
  Outside scans an NHWC value is left to fuse (README, Speed, has the measurements)."""
  if not kernels.available():
    return x
  if _row_reps(x):
    return _materialize(_rows(x)).reshape(x.shape)
  return _materialize(x) if _scanning else x


# XLA:CPU runs an elementwise pass over an NHWC map with few channels as loops whose innermost
# trip is the channel count: a BatchNorm apply and ReLU over 128x32x32x16 floats took 0.75 ms on
# 2 cores, the same pass over the same memory as rows of 64 floats 0.17 ms (README, Speed). So
# on CPU, with the kernels loaded, BatchNorm and ReLU compute such maps as rows of
# ROW_FLOATS (the per-channel vectors repeated along a row), and each pass's result goes behind
# ``materialize`` in that shape: XLA emits a fusion's loops over its result's shape, and the custom
# call keeps the result a row array. The forward values are the same, element for element; the
# backward pass adds its per-channel sums in another order (over ROW_FLOATS columns, then folded).
ROW_FLOATS = 64


def _row_reps(x) -> int:
  """How many copies of ``x``'s channels a row of ROW_FLOATS holds, where ``x``'s passes run as
  rows (a float32 map of at least 3 axes and at most ROW_FLOATS channels, on CPU with the kernels
  loaded); 0 elsewhere."""
  c = x.shape[-1] if x.ndim else 0
  if (x.ndim < 3 or x.dtype != jnp.float32 or not c or ROW_FLOATS % c
      or x.size % ROW_FLOATS or jax.default_backend() != "cpu" or not kernels.available()):
    return 0
  return ROW_FLOATS // c


def _rows(x):
  return x.reshape(-1, ROW_FLOATS)


def _lanes(v, reps: int):
  """A per-channel vector repeated along a row, computed on its own (XLA fuses a repeat into its
  consumer as index arithmetic, which puts the slow loops back)."""
  return _materialize(jnp.tile(v, reps))


def _materialize(x):
  """``kernels.stacks.materialize``, imported on first use, as the kernels are loaded."""
  from resjax.kernels import stacks
  return stacks.materialize(x)


@jax.custom_jvp
def _relu_gated_by_output(x):
  return _materialized(jnp.maximum(x, jnp.zeros_like(x)))


@_relu_gated_by_output.defjvp
def _relu_jvp(primals, tangents):
  y = _relu_gated_by_output(primals[0])
  return y, (_relu_gate_rows if _row_reps(y) else _relu_gate)(y, tangents[0])


_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _select_bits(mask, g):
  """where(mask, g, 0) bit for bit (+0.0 where masked, NaNs kept where not), as integer AND: a
  loop that XLA:CPU vectorises, where its select on a bool operand runs scalar."""
  u = _UINT[g.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(g, u) & (u(0) - mask.astype(u))
  return jax.lax.bitcast_convert_type(bits, g.dtype)


@jax.custom_vjp
def _relu_gated_by_mask(x):
  return jnp.maximum(x, jnp.zeros_like(x))


def _relu_mask_fwd(x):
  if _row_reps(x):  # both passes over rows, the mask kept as rows
    r = _rows(x)
    return (_materialize(jnp.maximum(r, jnp.zeros_like(r))).reshape(x.shape),
            _materialize(r > 0))
  return _relu_gated_by_mask(x), _materialized(x > 0)


def _relu_mask_bwd(mask, g):
  if mask.shape != g.shape:  # kept as rows (_relu_mask_fwd)
    return (_materialize(_select_bits(mask, g.reshape(mask.shape))).reshape(g.shape),)
  return (_select_bits(mask, g),)


_relu_gated_by_mask.defvjp(_relu_mask_fwd, _relu_mask_bwd)

RELU_GATES = ("output", "mask")


def relu(x: jax.Array, *, gate: str = "output") -> jax.Array:
  """``jax.nn.relu``: the same values and gradients. On CPU its backward pass avoids a select over
  the bool mask that autodiff saves, which XLA:CPU runs as scalar code, about 4x a float
  multiply's time (README, Speed). ``gate="output"`` reads y > 0 off the output instead (for a ReLU
  whose output is kept anyway, as a convolution's input: nothing more is saved; forward-mode
  autodiff works); ``gate="mask"`` keeps the bool mask and applies it as an integer AND (for a
  ReLU whose output is not kept: a quarter of a float32 map; reverse mode only, like
  ``BatchNorm``'s). Elsewhere it is jax.nn.relu."""
  if gate not in RELU_GATES:
    raise ValueError(f"gate must be one of {RELU_GATES}, got {gate!r}")
  if jax.default_backend() != "cpu" or x.dtype.itemsize not in _UINT:
    return jax.nn.relu(x)
  return (_relu_gated_by_output if gate == "output" else _relu_gated_by_mask)(x)


class BatchNorm(nnx.BatchNorm):
  """flax's BatchNorm; in training on float32 input on CPU its backward pass is written out
  (``batch_norm_train``: one reduction pass and one elementwise pass, where autodiff's takes
  more, and only the input kept for it; README, Speed, has what that gains). Where the kernels
  are built, its per-channel sums take one pass each way (``kernels.channel_sums``). Elsewhere, and for
  bf16 or masked or cross-device statistics, it is flax's own."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    train = not (self.use_running_average if use_running_average is None else use_running_average)
    plain = (train and jax.default_backend() == "cpu" and mask is None and self.axis_name is None
             and self.axis == -1 and x.dtype == jnp.float32 and self.dtype in (None, jnp.float32)
             and self.use_fast_variance and self.scale is not None and self.bias is not None)
    if not plain:
      return super().__call__(x, use_running_average, mask=mask)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...],
                                    jnp.asarray(self.epsilon, jnp.float32))
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
    return y
