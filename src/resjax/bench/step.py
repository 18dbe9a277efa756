"""One measurement, made in a child process of ``python -m resjax.bench``: resjax's training step
for a row, built as ``train.train`` builds it and timed step by step (or PyTorch's, via
``torch_twin``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from resjax import configs, inspect_model, kernels, models, tasks, train
from resjax.bench.rows import Row
from resjax.data.images import ImageSplits
from resjax.data.text import TextSplits
from resjax.models import layers


def _config(row: Row, batch: int, dtype: str, scan: bool, conv_impl: str | None,
            remat: str | None = None):
  model = json.loads(json.dumps(row.model))
  if remat is not None:
    model["remat"] = remat
  if row.model["name"] != "transformer":
    model.update(scan=scan, **({"conv_impl": conv_impl} if conv_impl else {}))
  elif dtype != "float32":
    model["dtype"] = dtype
  # The CIFAR recipe augments in the step (4-pixel crops, flips); ImageNet's comes from the host.
  augment = row.data.get("augment", False)
  data = {"name": "synthetic", "pad": 4 if augment else 0, "flip": augment}
  return ml_collections.ConfigDict({
      "model": model, "data": data, "batch_size": batch,
      "schedule": {"unit": "iterations", "total": 64_000, "boundaries": (32_000,), "warmup": 0},
      "optim": row.optim or {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}})


def synthetic_task(row: Row, config, batch: int):
  """A task over random data held on the device, shaped as the row's dataset."""
  rng = np.random.default_rng(0)
  if row.data["kind"] == "text":
    n, vocab = max(batch * 4, 64) * (row.data["context"] + 1), row.data["classes"]
    tokens = lambda k: rng.integers(0, vocab, k, dtype=np.uint8 if vocab <= 256 else np.uint16)
    return tasks.TextTask(config.data, TextSplits("synthetic", tokens(n), tokens(n), vocab),
                          row.data["context"])
  n, shape, classes = max(batch * 4, 64), tuple(row.data["shape"]), row.data["classes"]
  images = lambda k: rng.integers(0, 256, (k, *shape), dtype=np.uint8)
  labels = lambda k: rng.integers(0, classes, k).astype(np.int32)
  splits = ImageSplits(images(n), labels(n), images(batch), labels(batch), classes,
                       np.full(shape, 0.5, np.float32))
  return tasks.ImageTask(config.data, splits)


def _peak_memory_gib(device) -> float:
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def resident_gib() -> float | None:
  """The process's resident set now (Linux; None elsewhere): the runtime's share of a peak, when
  read after importing the framework and before building anything."""
  try:
    with open("/proc/self/statm") as f:
      pages = int(f.read().split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return pages * resource.getpagesize() / 2**30


def xla_memory_gib(compiled) -> dict:
  """XLA's own account of a compiled program's buffers, in GiB: its arguments, its temporaries,
  and its outputs less those aliased to donated arguments (``step_gib``: the three together,
  what the step holds at once at most, without the runtime). Empty where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    m = None
  if m is None:
    return {}
  gib = lambda b: b / 2**30
  fresh_out = m.output_size_in_bytes - m.alias_size_in_bytes
  return {"xla_argument_gib": gib(m.argument_size_in_bytes), "xla_temp_gib": gib(m.temp_size_in_bytes),
          "xla_output_gib": gib(fresh_out),
          "xla_step_gib": gib(m.argument_size_in_bytes + m.temp_size_in_bytes + fresh_out)}


@dataclasses.dataclass
class CompiledStep:
  """resjax's training step for a row, compiled, with its state and inputs (see ``build_step``)."""
  run: object  # (state, window, batch, aug_keys, arrays) -> (state, window); state donated
  state: object
  window: dict
  batch_at: object  # step -> the replica-stacked batch indices
  aug_keys: object
  arrays: object
  task: object
  config: object
  init_s: float
  compile_s: float
  remat_used: str  # what config.model.remat became (remat_used)


def build_step(row: Row, batch: int, dtype: str = "float32", *, scan: bool = True,
               conv_impl: str | None = None, remat: str | None = None) -> CompiledStep:
  """The step as ``train.train`` builds it: one replica per seed, vmapped; data arrays shared;
  state donated; compiled ahead of time so that compile time is measured on its own. ``remat``
  (``config.model.remat``) replaces the row's own where given."""
  config = _config(row, batch, dtype, scan, conv_impl, remat)
  task = synthetic_task(row, config, batch)
  arrays = task.device_arrays()
  tx = train.make_optimizer(config, configs.schedule_steps(config, task.train_size))
  t = time.perf_counter()
  graphdef, state = train.init_state(config, task, [0], tx)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  if dtype != "float32" and row.model["name"] != "transformer":
    # The same state under a graph whose layers compute in bf16 (their dtype is static structure).
    abstract = nnx.eval_shape(lambda: models.build(
        config.model, num_classes=task.num_classes, in_channels=task.in_channels,
        rngs=nnx.Rngs(params=train.key(0))))
    layers.set_compute_dtype(abstract, jnp.dtype(dtype))
    graphdef = train.split_model(abstract)[0]
  aug_keys = jnp.stack([jax.random.fold_in(train.key(0), 1)])
  step_fn = jax.jit(jax.vmap(functools.partial(train.train_step, graphdef, tx, task),
                             in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1))
  batch_at = lambda s: np.stack([task.train_batch(0, s, batch)])
  window = train.new_window(1)
  t = time.perf_counter()
  with layers.remats_chosen() as chosen:
    compiled = step_fn.lower(state, window, batch_at(0), aug_keys, arrays).compile()
  compile_s = time.perf_counter() - t
  return CompiledStep(compiled, state, window, batch_at, aug_keys, arrays, task, config, init_s,
                      compile_s, layers.remat_used(config.model.get("remat", "none"), chosen))


def measure_resjax(row: Row, batch: int, steps: int, dtype: str = "float32", *, scan: bool = True,
                   conv_impl: str | None = None, remat: str | None = None,
                   flops: bool = True) -> dict:
  model = {**row.model, **({"conv_impl": conv_impl} if conv_impl else {})}
  one_thread = models.onednn_convolutions(model) and kernels.one_pool_thread()  # as main does
  device = jax.devices()[0]  # the runtime started: what the process holds before the model
  base_gib = resident_gib()
  step = build_step(row, batch, dtype, scan=scan, conv_impl=conv_impl, remat=remat)
  compiled, batch_at, aug_keys, arrays = step.run, step.batch_at, step.aug_keys, step.arrays
  task, config, init_s, compile_s = step.task, step.config, step.init_s, step.compile_s
  state, window = compiled(step.state, step.window, batch_at(0), aug_keys, arrays)
  jax.block_until_ready(window)
  times, cpu_times = [], []
  for s in range(steps):
    b = batch_at(s + 1)
    t, c = time.perf_counter(), time.process_time()
    state, window = compiled(state, window, b, aug_keys, arrays)
    jax.block_until_ready(window)
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  loss = float(window["loss"][0] / window["count"][0])
  requested = config.model.get("remat", "none")
  out = {"impl": "resjax", "dtype": dtype, "batch": batch, "init_s": init_s,
         "compile_s": compile_s, "step_s": statistics.median(times),
         "mean_step_s": sum(times) / len(times), "cpu_step_s": statistics.median(cpu_times),
         "peak_gib": _peak_memory_gib(device), "base_gib": base_gib, **xla_memory_gib(compiled),
         "remat": requested, "remat_used": step.remat_used,
         "conv_impl": (layers.resolve_conv_impl(config.model.get("conv_impl", "auto"))
                       if "conv_impl" in config.model or row.data["kind"] == "image" else None),
         "loss": loss, "backend": jax.default_backend(), "device": device.device_kind,
         "xla_pool": "one thread" if one_thread else "a thread per core",
         "jax": jax.__version__}
  out["examples_per_s"] = batch / out["step_s"]
  if row.tokens:
    out["tokens_per_example"] = row.tokens
  if flops:
    out["flops_per_example"] = training_flops(config, task, arrays)
  return out


def training_flops(config, task, arrays) -> float:
  """FLOPs of one example's training step: forward + backward (twice the forward's matmuls), 3x
  the forward as XLA counts it (inspect_model.xla_forward_flops)."""
  x, _ = task.eval_inputs(arrays, next(iter(task.eval_batches(1)))[0])
  example = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return 3 * inspect_model.flops_at_depth(
      config.model, lambda cfg: inspect_model.xla_forward_flops(
          cfg, example, task.num_classes, task.in_channels))


def row_flops(row: Row, dtype: str = "float32") -> float:
  """``training_flops`` of ``row``, counted without building its step: for a table whose FLOPs
  an older resjax counted (tools/gpu_bench.py --recount)."""
  config = _config(row, 2, dtype, True, None)
  task = synthetic_task(row, config, 2)
  return training_flops(config, task, task.device_arrays())


def measure_torch(row: Row, batch: int, steps: int, dtype: str, mode: str,
                  threads: int | None, channels_last: bool = True) -> dict:
  # Here, not at the top: PyTorch is an optional extra ('.[bench]'), and resjax rows run without it.
  if row.data["kind"] == "text":
    from resjax.bench import torch_gpt
    out = torch_gpt.measure_gpt(batch=batch, steps=steps, mode=mode, dtype=dtype, threads=threads,
                                context=row.data["context"], vocab_size=row.data["classes"],
                                **row.torch)
    return {**out, "impl": f"torch-{mode}", "tokens_per_example": row.tokens}
  from resjax.bench import torch_twin
  base_gib = resident_gib()  # torch imported, nothing built
  out = torch_twin.measure(batch=batch, steps=steps, mode=mode, dtype=dtype, threads=threads,
                            size=row.data["shape"][0], num_classes=row.data["classes"],
                            augment=row.data.get("augment", False),
                            channels_last=channels_last, **row.torch)
  return {**out, "impl": f"torch-{mode}", "base_gib": base_gib}
