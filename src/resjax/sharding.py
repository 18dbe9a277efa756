"""Where arrays live: the device mesh, parameter and batch shardings, and host-to-device placement.

One module holds every sharding decision, so the same trainer runs on 1 CPU, 8 GPUs, a TPU slice and
several processes (``jax.devices()`` is global once ``jax.distributed.initialize()`` has run).

The mesh has named axes from ``config.mesh``, outermost first, -1 filling the rest of the devices::

    config.mesh = (("data", -1), ("fsdp", 1), ("model", 1))     # the default: pure data parallelism

The batch is split over every data-parallel axis ("data" and "fsdp"); "model" is for rules that
split parameters themselves. Parameters follow ``config.sharding_rules``: ordered ``(regex, rule)``
pairs matched (``re.search``) against each parameter's '/'-joined path in the params tree, such as
``weights/stages/1/first/convs/0/kernel``; the first match wins, and a parameter no rule matches is
replicated. The default is ``((".*", "fsdp"),)``. A rule is a ``PartitionSpec`` over the
parameter's own dimensions, or a name:

==========  ======================================================================================
replicate   every device holds the whole array
fsdp        an array of at least ``fsdp_min_size`` elements is split over the "fsdp" axis along its
            largest dimension that the axis size divides (the later one on ties: output features);
            any other array is replicated (``config.fsdp_min_size``, default 2**14)
==========  ======================================================================================

A stack of scanned units has the stack as its leading dimension, which "fsdp" may pick like any
other; that is correct (XLA gathers the stack before the scan) but saves less memory than splitting
features, so give such stacks a ``PartitionSpec`` rule where it matters.

Optimizer state (momentum, Adam moments) is sharded like the parameter it belongs to: an optimizer
leaf whose path ends with a parameter's path and has its shape takes that parameter's sharding.
Everything else in the train state (step, BatchNorm statistics, RNG keys, counters) is replicated.

BatchNorm needs nothing special: under ``jax.jit`` the model is written for the global batch, so a
mean over the batch axis of a batch-sharded array is the global mean (XLA inserts the all-reduce);
tests/test_sharding.py checks it against the single-device step.

Host values reach the devices in one of two ways: ``put_global`` for values every process holds
whole (the batch indices the trainer draws from (seed, step), the dataset, the initial state), and
``put_process_local`` for values each process holds only its own rows of (a batch each host reads
from its own shard of the data). Both work unchanged with one process or many.

Train states here may carry a leading replica axis (seeds trained side by side); pass
``replica_axis=True`` and that axis stays unsharded while the rules see each replica's shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from resjax.errors import ConfigError

DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("model", 1))
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over, outermost first
FSDP_AXIS = "fsdp"
RULE_NAMES = ("replicate", "fsdp")
DEFAULT_RULES = ((".*", "fsdp"),)
# Below this many elements an array is not worth a collective per use: 16k fp32 is 64 KiB. In a
# CIFAR ResNet-110 this shards the 3x3 kernels of width 64 (36,864 elements) and keeps the rest whole.
FSDP_MIN_SIZE = 2 ** 14


# ------------------------------------------------------------------------------------------------
# The mesh.
# ------------------------------------------------------------------------------------------------

def _mesh_items(mesh_cfg) -> list[tuple[Any, Any]]:
  items = list(mesh_cfg.items()) if isinstance(mesh_cfg, Mapping) else list(mesh_cfg)
  if not items or not all(isinstance(it, Sequence) and len(it) == 2 for it in items):
    raise ConfigError(f"config.mesh={mesh_cfg!r} is not a list of (axis name, size) pairs: write it "
                      'like (("data", -1), ("fsdp", 1), ("model", 1))')
  return items


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """``{axis name: size}`` for ``num_devices`` devices, the one -1 (if any) filling the rest."""
  items = _mesh_items(mesh_cfg)
  names = [name for name, _ in items]
  if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
    raise ConfigError(f"config.mesh={mesh_cfg!r} needs distinct, non-empty string axis names")
  sizes = [size for _, size in items]
  for name, size in items:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh axis {name!r} has size {size!r}: use a positive int, or -1 "
                        "for the devices the other axes leave")
  fills = [name for name, size in items if size == -1]
  if len(fills) > 1:
    raise ConfigError(f"config.mesh={mesh_cfg!r} has -1 on {len(fills)} axes ({', '.join(fills)}): "
                      "give -1 to at most one axis")
  known = math.prod(int(s) for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(f"config.mesh={mesh_cfg!r} does not fit {num_devices} devices: its fixed "
                        f"sizes multiply to {known}, which does not divide {num_devices}; choose "
                        "sizes whose product divides the device count")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  elif known != num_devices:
    raise ConfigError(f"config.mesh={mesh_cfg!r} asks for {known} devices but there are "
                      f"{num_devices}: make the sizes multiply to {num_devices}, or set one to -1")
  return {name: int(size) for name, size in zip(names, sizes)}


def make_mesh(mesh_cfg=DEFAULT_MESH, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of ``config.mesh`` over ``devices`` (default: every device of every process).

  Device order comes from ``jax.make_mesh`` (topology-aware on TPU; process-major elsewhere), so
  the inner axes (fsdp, model) fall within a host where they fit and the outer "data" axis spans
  hosts. A multi-slice TPU topology is refused by ``jax.make_mesh``. Axes are ``Auto``: XLA
  propagates shardings from the ones given at the jit boundary.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                       axis_types=(AxisType.Auto,) * len(shape))


def axis_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(mesh.shape)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: batch sizes must be multiples of this."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "config.batch_size") -> None:
  n = data_parallel_size(mesh)
  if batch_size % n:
    axes = ", ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh))
    raise ConfigError(f"{field}={batch_size} does not split over the {n} data-parallel devices "
                      f"of the mesh ({axes}): set it to a multiple of {n}")


# ------------------------------------------------------------------------------------------------
# Parameter rules and the train state's shardings.
# ------------------------------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def path_str(names: tuple[str, ...]) -> str:
  """'/'-joined, without the ``value`` attribute every NNX Variable ends in."""
  if names and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Split the largest dimension ``fsdp_size`` divides (the later one on ties), or replicate."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  dims = [d for d, n in enumerate(shape) if n >= fsdp_size and n % fsdp_size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda d: (shape[d], d))
  return P(*(FSDP_AXIS if d == best else None for d in range(len(shape))))


def _check_spec(spec: P, shape: Sequence[int], where: str, sizes: Mapping[str, int]) -> P:
  if len(spec) > len(shape):
    raise ConfigError(f"sharding rule {spec} for {where} has {len(spec)} entries but the array has "
                      f"{len(shape)} dimensions {tuple(shape)}: fix the rule in config.sharding_rules")
  for d, entry in enumerate(spec):
    if entry is None or entry is P.UNCONSTRAINED:
      continue
    axes = entry if isinstance(entry, tuple) else (entry,)
    unknown = [a for a in axes if a not in sizes]
    if unknown:
      raise ConfigError(f"sharding rule {spec} for {where} names mesh axes {unknown} that config.mesh "
                        f"lacks (it has {', '.join(sizes)}): fix the rule or the mesh")
    n = math.prod(sizes[a] for a in axes)
    if shape[d] % n:
      raise ConfigError(f"sharding rule {spec} for {where} splits dimension {d} (size {shape[d]}) "
                        f"{n} ways, which does not divide it: fix the rule in config.sharding_rules")
  return spec


def _compile_rules(rules) -> list[tuple[re.Pattern, Any]]:
  out = []
  for item in rules:
    if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], (str, re.Pattern))):
      raise ConfigError(f"sharding rule {item!r} is not a (regex, rule) pair: write it like "
                        '(r"head/kernel", "replicate")')
    pattern, rule = item
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"sharding rule regex {pattern!r} is invalid ({e}): fix it in "
                        "config.sharding_rules") from None
    if isinstance(rule, str) and rule not in RULE_NAMES:
      raise ConfigError(f"unknown sharding rule {rule!r} for {pattern!r}: use a PartitionSpec or one "
                        f"of {', '.join(RULE_NAMES)}")
    out.append((regex, rule))
  return out


def param_spec(name: str, shape: Sequence[int], rules, sizes: Mapping[str, int], *,
               fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one parameter (its path ``name``, its own ``shape``) under ``rules``."""
  for regex, rule in _compile_rules(rules):
    if not regex.search(name):
      continue
    if rule == "replicate":
      return P()
    if rule == "fsdp":
      return fsdp_spec(shape, sizes.get(FSDP_AXIS, 1), fsdp_min_size)
    spec = rule if isinstance(rule, P) else P(*rule)
    return _check_spec(spec, shape, name, sizes)
  return P()


def state_specs(state: Mapping[str, Any], sizes: Mapping[str, int], rules=DEFAULT_RULES, *,
                fsdp_min_size: int = FSDP_MIN_SIZE, replica_axis: bool = False):
  """PartitionSpecs for the train state ``{step, params, rest, opt}`` (arrays or shape structs).

  Pure: needs only the mesh's axis sizes, so the rules are testable without devices. ``params`` go by
  ``rules``; ``opt`` leaves follow their parameter; every other leaf is replicated.
  """
  lead = 1 if replica_axis else 0
  rules = _compile_rules(rules)

  def own_shape(x) -> tuple[int, ...]:
    return tuple(x.shape[lead:])

  def spec_of(spec: P) -> P:
    return P(*([None] * lead), *spec)

  param_specs: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}

  def params_leaf(path, x):
    names = path_names(path)
    spec = param_spec(path_str(names), own_shape(x), rules, sizes, fsdp_min_size=fsdp_min_size)
    param_specs[names] = (own_shape(x), spec)
    return spec_of(spec)

  out = {k: v for k, v in state.items()}
  for k, v in state.items():
    if k not in ("params", "opt"):
      out[k] = jax.tree.map(lambda _: P(), v)
  out["params"] = jax.tree_util.tree_map_with_path(params_leaf, state["params"])

  def opt_leaf(path, x):
    names = path_names(path)
    for start in range(len(names)):  # the longest parameter path that ends this one
      hit = param_specs.get(names[start:])
      if hit is not None and hit[0] == own_shape(x):
        return spec_of(hit[1])
    return P()

  if "opt" in state:
    out["opt"] = jax.tree_util.tree_map_with_path(opt_leaf, state["opt"])
  return out


def state_shardings(state: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES, *,
                    fsdp_min_size: int = FSDP_MIN_SIZE, replica_axis: bool = False):
  """NamedShardings for the whole train state: a pytree of the state's structure."""
  specs = state_specs(state, axis_sizes(mesh), rules, fsdp_min_size=fsdp_min_size,
                      replica_axis=replica_axis)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


# ------------------------------------------------------------------------------------------------
# The batch, and putting host values on the mesh.
# ------------------------------------------------------------------------------------------------

def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, *, replica_axis: bool = False) -> P:
  """Leading (batch) axis over "data" and "fsdp"; after the replica axis if there is one."""
  return P(*([None] if replica_axis else []), batch_axes(mesh) or None)


def batch_sharding(mesh: Mesh, *, replica_axis: bool = False) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh, replica_axis=replica_axis))


def constrain_batch(tree, mesh: Mesh):
  """Inside a jitted step: pins a batch (leading axis) to the batch sharding.

  Use it on what the step gathers from replicated device data (``images[idx]``), so that each
  device computes its own rows whatever XLA's propagation would pick. Under ``jax.vmap`` over
  replicas the vmapped axis is left free, so write it for one replica.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def _put_array(x, sharding: NamedSharding) -> jax.Array:
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    data_sharding = NamedSharding(sharding.mesh, P(*sharding.spec, None))  # + the key's own axis
    return jax.random.wrap_key_data(_put_array(jax.random.key_data(x), data_sharding),
                                    impl=jax.random.key_impl(x))
  # Every process holds the whole value: each device takes its own slice, with no cross-host
  # traffic and no check that the processes agree (jax.device_put would all-gather to check).
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_global(tree, shardings):
  """Host (or single-device) values that every process holds whole -> global arrays.

  ``shardings``: one sharding for every leaf, or a pytree of them matching ``tree``.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _put_array(x, shardings), tree)
  return jax.tree.map(_put_array, tree, shardings)


def put_replicated(tree, mesh: Mesh):
  """The device-resident dataset (and other shared constants): one copy on every device."""
  return put_global(tree, replicated(mesh))


def put_process_local(tree, sharding: NamedSharding):
  """Each process's own rows of a batch -> global arrays (rows stacked in process order).

  The global batch is the process-local one times the number of processes; with one process this
  is ``jax.device_put``.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree):
  """Global arrays -> numpy on every process (``jax.device_get`` fails on other hosts' shards).

  Replicated arrays (metrics, the step) are read from a local copy; sharded ones are gathered.
  """
  def fetch(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(fetch, tree)
