"""The trainer: one run (a table row at one seed), from config to ``summary.json``.

Read top to bottom: model and state, optimizer, the jitted steps, checkpoints, the loop.

The run directory holds ``metrics.jsonl`` (one JSON object per logged step, the source of truth),
``tb/`` (TensorBoard events), ``ckpt/`` (orbax checkpoints, the resume point) and ``summary.json``.
A run resumes from its newest checkpoint without being asked. Everything random (initialisation,
batch order, augmentation, dropout) is a function of the seed and the step, so a resumed run ends
with exactly the parameters of one never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from resjax import configs, fileio, models, provenance, sharding, tasks
from resjax.errors import CheckpointError, ConfigError, quiet_logs
from resjax.models import shortcuts

FILTERS = (shortcuts.ResidualScalar, nnx.Param, ...)  # -> scalars, weights, rest (BN stats, RNG)

# XLA on CPU takes seconds to compile threefry for every initialiser; the RngBitGenerator-based
# "rbg" keys compile in milliseconds and are native on TPU and GPU. They draw the parameters.
PRNG_IMPL = "rbg"
# The streams used inside the vmapped step (augmentation, dropout) are threefry: its bits do not
# change under vmap (rbg's do), so a seed trained beside others sees the batches it sees alone.
STREAM_PRNG_IMPL = "threefry2x32"


def key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=PRNG_IMPL)


def stream_key(seed: int, stream: int) -> jax.Array:
  """The key of one per-step random stream (1: augmentation, 2: dropout) of a seed."""
  return jax.random.fold_in(jax.random.key(seed, impl=STREAM_PRNG_IMPL), stream)


# ------------------------------------------------------------------------------------------------
# Model and train state. Seeds trained side by side are replicas stacked on a leading axis.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What ``models.build`` is given besides the keys; equal (one compiled init) when the model
  configs' contents are, so every seed of a row, and a rerun of it, reuses one program."""
  model: Any = dataclasses.field(compare=False)
  num_classes: int
  in_channels: int
  fingerprint: str = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, "fingerprint", self.model.to_json_best_effort(sort_keys=True))


@functools.partial(nnx.jit, static_argnums=0)
def init_model(spec: ModelSpec, params_key: jax.Array, dropout_key: jax.Array) -> nnx.Module:
  """The model at these keys, in one compiled program (eager init dispatches one per parameter).
  The keys are traced, so seeds share the program."""
  return models.build(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                      rngs=nnx.Rngs(params=params_key, dropout=dropout_key))


def build_model(config, task, seed: int) -> nnx.Module:
  return init_model(ModelSpec(config.model, task.num_classes, task.in_channels), key(seed),
                    stream_key(seed, 2))


def split_model(model: nnx.Module):
  graphdef, scalars, weights, rest = nnx.split(model, *FILTERS)
  return graphdef, {"weights": weights, "scalars": scalars}, rest


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def stack(trees: list):
  """Replica trees -> one tree with a leading replica axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def init_state(config, task, seeds: list[int], tx, warmup: WarmupRule | None = None):
  """The stacked train state of one replica per seed, and the model's graphdef.

  With ResNet-v1's warm-up rule the state also holds each replica's running training error and
  the step its warm-up ended (``state["warmup"]``), so a checkpoint carries them.
  """
  params, rests = [], []
  for seed in seeds:
    graphdef, p, r = split_model(build_model(config, task, seed))
    params.append(p)
    rests.append(r)
  params = stack(params)
  state = {"step": jnp.zeros((len(seeds),), jnp.int32), "params": params, "rest": stack(rests),
           "opt": jax.vmap(tx.init)(params)}
  if warmup is not None:
    state["warmup"] = warmup.init(len(seeds))
  return graphdef, state


# ------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------

def learning_rate(optim, steps: dict) -> optax.Schedule:
  """Warm-up (constant at warmup_lr as in the ResNet papers, or linear from 0), then the decay.

  Under the warm-up rule (``steps["warmup_until_error"]``) each replica decides in the step when
  its warm-up ends (``WarmupRule``); this is then the schedule after the warm-up: step decays at
  their boundaries, cosine and linear decays from the cap, wherever the warm-up ended.
  """
  warmup, total = steps["warmup"], steps["total"]
  decay = optim.get("decay", "step")
  if decay == "step":
    main = optax.piecewise_constant_schedule(
        optim.lr, {b: optim.get("decay_factor", 0.1) for b in steps["boundaries"]})
  elif decay in ("cosine", "linear"):
    floor = optim.get("final_lr_fraction", 0.0)

    def main(s):
      t = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
      shape = 0.5 * (1 + jnp.cos(jnp.pi * t)) if decay == "cosine" else 1.0 - t
      return optim.lr * (floor + (1 - floor) * shape)
  elif decay == "constant":
    main = optax.constant_schedule(optim.lr)
  else:
    raise ConfigError(f"unknown LR decay {decay!r}: set config.optim.decay to step, cosine, "
                      "linear or constant")
  if steps.get("warmup_until_error") is not None:
    if optim.get("warmup_shape", "constant") != "constant":
      raise ConfigError("config.schedule.warmup_until_error holds a constant warm-up LR: set "
                        "config.optim.warmup_shape to constant or drop warmup_until_error")
    return main
  if not warmup:
    return main
  if optim.get("warmup_shape", "constant") == "linear":
    return lambda s: jnp.where(s < warmup, optim.lr * (s + 1) / warmup, main(s))
  warm_lr = optim.get("warmup_lr", optim.lr)
  return lambda s: jnp.where(s < warmup, warm_lr, main(s))


# ResNet-v1 (He et al. 2015, 4.2) warms the 110-layer net up at 0.01 "until the training error is
# below 80% (about 400 iterations)". The running training error is an exponential moving average
# of the per-step batch error, r <- (1 - 1/tau) r + e / tau, started at 100% (no evidence yet).
# tau = 20 steps: one batch of 128 at 80% error is noisy by 3.5 points, the average by about 0.6,
# so no lucky batch ends the warm-up, and its lag (~tau steps) is small against the paper's ~400.
# From 100%, even a net at 0% error needs 5 steps to get below 80%.
WARMUP_ERROR_TAU = 20.0


@dataclasses.dataclass(frozen=True)
class WarmupRule:
  """Hold ``warmup_lr`` until the running training error is below ``until_error`` % or ``cap``
  steps have passed, whichever comes first, per replica; then the schedule ``lr`` applies.

  The optimizer always runs ``lr`` (its decay boundaries in absolute steps); while a replica warms
  up, its updates are scaled by warmup_lr / lr(step). Every group the rule scales ends in a
  multiplication by the LR (momentum SGD with L2 in the gradient, Adam, AdamW's decoupled decay),
  so this is exactly a step at warmup_lr, up to float32 rounding.
  """
  until_error: float
  cap: int
  warmup_lr: float
  lr: Any  # the optax schedule the optimizer runs
  groups: tuple[str, ...]  # the parameter groups whose LR is ``lr``
  tau: float = WARMUP_ERROR_TAU

  def init(self, replicas: int) -> dict:
    # end_step: the first step at the schedule's LR, -1 while warming up.
    return {"error": jnp.full((replicas,), 100.0, jnp.float32),
            "end_step": jnp.full((replicas,), -1, jnp.int32)}

  def update(self, warm: dict, step, batch_error):
    """One replica at ``step`` with this step's batch error (%, measured before its update):
    the new warm-up state and the factor on this step's updates."""
    decay = 1.0 - 1.0 / self.tau
    error = decay * warm["error"] + (1.0 - decay) * batch_error
    ends = (warm["end_step"] < 0) & ((error < self.until_error) | (step >= self.cap))
    end_step = jnp.where(ends, step, warm["end_step"]).astype(jnp.int32)
    lr = self.lr(step)
    # An LR of 0 moves nothing whatever it is scaled by: leave it alone rather than divide by 0.
    factor = jnp.where((end_step < 0) & (lr > 0), self.warmup_lr / jnp.where(lr > 0, lr, 1.0), 1.0)
    return {"error": error, "end_step": end_step}, factor

  def lr_used(self, step: int, end_step: int) -> float:
    """The LR (of the weights' group) that a replica whose warm-up ended at ``end_step`` used."""
    return self.warmup_lr if end_step < 0 or step < end_step else float(self.lr(step))


def warmup_rule(optim, steps: dict) -> WarmupRule | None:
  """The warm-up rule of ``steps`` (``configs.schedule_steps``), or None for a fixed warm-up."""
  until = steps.get("warmup_until_error")
  if until is None:
    return None
  # As in make_optimizer: AdamW's scalars at their own scalar_lr are outside the LR schedule,
  # so neither a fixed warm-up nor this rule changes their LR.
  follows = optim.get("name", "sgd") == "sgd" or not optim.get("scalar_lr", None)
  return WarmupRule(until_error=float(until), cap=int(steps["warmup"]),
                    warmup_lr=float(optim.get("warmup_lr", optim.lr)),
                    lr=learning_rate(optim, steps),
                    groups=("weights", "scalars") if follows else ("weights",))


def _decay_mask(weights):
  """AdamW decays matrices and kernels; biases, norm scales and gains stay undecayed."""
  return jax.tree.map(lambda x: x.ndim >= 2, weights)


def make_optimizer(config, steps: dict) -> optax.GradientTransformation:
  """The two parameter groups: weights, and learnable residual scalars (never weight-decayed).

  ``sgd``: momentum SGD with L2 weight decay added to the gradient, as the ResNet papers applied it.
  ``adamw``: Adam with decoupled weight decay on matrices, gradient clipping by global norm.
  The scalars get their own optimizer: SGD at the weights' LR, or Adam at ``scalar_lr``.
  """
  optim = config.optim
  name = optim.get("name", "sgd")
  for k in ("lr", "weight_decay"):
    if not (optim[k] >= 0 and math.isfinite(optim[k])):
      raise ConfigError(f"config.optim.{k}={optim[k]} must be a finite number >= 0")
  lr = learning_rate(optim, steps)
  if name == "sgd":
    weights = optax.chain(optax.add_decayed_weights(optim.weight_decay),
                          optax.sgd(lr, momentum=optim.momentum))
    scalars = optax.sgd(lr, momentum=optim.momentum)
  elif name == "adamw":
    b1, b2, eps = optim.get("b1", 0.9), optim.get("b2", 0.95), optim.get("eps", 1e-8)
    weights = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=optim.weight_decay,
                          mask=_decay_mask)
    scalar_lr = optim.get("scalar_lr", None) or lr
    scalars = optax.adam(scalar_lr, b1=b1, b2=b2, eps=eps)
  else:
    raise ConfigError(f"unknown optimizer {name!r}: set config.optim.name to sgd or adamw")
  tx = optax.multi_transform({"weights": weights, "scalars": scalars}, lambda p: {k: k for k in p})
  clip = optim.get("clip_norm", None)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


# ------------------------------------------------------------------------------------------------
# The jitted steps, written for one replica and vmapped over the seeds.
# ------------------------------------------------------------------------------------------------

def new_window(replicas: int):
  """Device-side sums of the training metrics between two log lines, per replica."""
  zeros = lambda: jnp.zeros((replicas,), jnp.float32)  # distinct buffers: the window is donated
  return {"loss": zeros(), "errors": zeros(), "count": zeros(),
          "first_bad_step": jnp.full((replicas,), -1, jnp.int32)}


def train_step(graphdef, tx, task, state, window, batch, aug_key, arrays, *, mesh=None,
               warmup: WarmupRule | None = None):
  """One optimizer step of one replica on ``batch`` (the task's host batch for this step).

  ``warmup``: ResNet-v1's warm-up rule, whose per-replica state is ``state["warmup"]``.
  """
  step = state["step"]
  x, y = task.train_inputs(arrays, batch, jax.random.fold_in(aug_key, step))
  if mesh is not None:  # each device computes its own rows of what was gathered from `arrays`
    x, y = sharding.constrain_batch((x, y), mesh)

  def loss_fn(params, rest):
    # copy=True: fresh Variables that belong to this trace, so BatchNorm may update them here.
    model = nnx.merge(graphdef, params["scalars"], params["weights"], rest, copy=True)
    logits = model(x, train=True)
    _, _, _, rest = nnx.split(model, *FILTERS)
    return tasks.cross_entropy(logits, y).mean(), (logits, rest)

  (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], state["rest"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  count = jnp.asarray(y.size, jnp.float32)
  errors = jnp.sum(jnp.argmax(logits, -1) != y)
  new = {"step": step + 1, "rest": rest, "opt": opt}
  if warmup is not None:  # a replica still warming up steps at warmup_lr
    new["warmup"], factor = warmup.update(state["warmup"], step, 100.0 * errors / count)
    scale = lambda tree: jax.tree.map(lambda u: (u * factor).astype(u.dtype), tree)
    updates = {g: scale(u) if g in warmup.groups else u for g, u in updates.items()}
  new["params"] = optax.apply_updates(state["params"], updates)
  bad = ~jnp.isfinite(loss)
  window = {
      "loss": window["loss"] + loss * count,
      "errors": window["errors"] + errors,
      "count": window["count"] + count,
      # Counted in steps done, as metrics.jsonl and summary.json count them.
      "first_bad_step": jnp.where((window["first_bad_step"] < 0) & bad, step + 1,
                                  window["first_bad_step"]),
  }
  return new, window


def eval_step(graphdef, task, state, batch, valid, arrays):
  """Loss and error sums (and the count of targets) over one padded test batch of one replica."""
  model = nnx.merge(graphdef, state["params"]["scalars"], state["params"]["weights"], state["rest"])
  x, y = task.eval_inputs(arrays, batch)
  logits = model(x, train=False)
  mask = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (y.ndim - 1)), y.shape)
  loss = jnp.sum(jnp.where(mask, tasks.cross_entropy(logits, y), 0.0))
  errors = jnp.sum(mask & (jnp.argmax(logits, -1) != y))
  return loss, errors, jnp.sum(mask)


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------

def checkpoint_dir(group_dir: str, seeds: list[int]) -> str:
  """Where the stacked replicas of ``seeds`` are checkpointed: one directory per seed set."""
  return os.path.join(group_dir, "ckpt", "seeds_" + "_".join(str(s) for s in seeds))


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      fileio.absolute(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def restore(manager: ocp.CheckpointManager, state):
  """Restores the newest checkpoint into ``state``'s structure, or returns ``state`` if there is none."""
  with quiet_logs():  # orbax logs its own parse errors; resjax reports them in one line below
    step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    with quiet_logs():
      return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    manager.close()  # stop orbax's background threads before the process exits
    where = os.path.join(manager.directory, str(step))
    raise CheckpointError(
        f"checkpoint {where} cannot be restored ({type(e).__name__}): delete {manager.directory} "
        "to restart this run from scratch, or use another --workdir") from None


# ------------------------------------------------------------------------------------------------
# Preemption: SIGTERM (what a cloud VM gets before it goes) asks the loop to save and stop.
# ------------------------------------------------------------------------------------------------

class Preemption:
  requested = False


@contextlib.contextmanager
def sigterm_saves():
  previous = signal.getsignal(signal.SIGTERM)
  Preemption.requested = False

  def handler(signum, frame):
    del signum, frame
    Preemption.requested = True

  try:
    signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    previous = None
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------
# Run-directory files.
# ------------------------------------------------------------------------------------------------

def write_json(path: str, obj: Any) -> None:
  """Atomic: a crash leaves the old file or the new one, never half of one."""
  fileio.write_atomic(path, (json.dumps(obj, indent=1, default=float) + "\n").encode())


class MetricsLog:
  """metrics.jsonl plus TensorBoard events. Only process 0 writes."""

  def __init__(self, run_dir: str, enabled: bool):
    self.enabled = enabled
    self.jsonl = fileio.AppendLog(os.path.join(run_dir, "metrics.jsonl")) if enabled else None
    self.tb = None
    # TensorBoard events go beside the metrics on local disks; on object stores metrics.jsonl
    # (the source of truth) is written alone.
    if enabled and not fileio.is_remote(run_dir):
      from tensorboardX import SummaryWriter  # light: no TensorFlow
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    # Counts (a step) stay ints; everything else is a float (numpy scalars included).
    values = {k: v if type(v) is int else float(v) for k, v in values.items()}
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


# ------------------------------------------------------------------------------------------------
# The loop: one row of a table, all its seeds side by side as replicas of one program.
# ------------------------------------------------------------------------------------------------

def evaluate(eval_fn, state, arrays, task, batch_size: int, put=lambda x: x) -> list[dict]:
  """Test loss (nats per target) and error (%) of every replica."""
  loss = errors = count = 0.0
  for batch, valid in task.eval_batches(batch_size):
    l, e, c = sharding.to_host(eval_fn(state, put(batch), put(valid), arrays))
    loss, errors, count = loss + l.astype(np.float64), errors + e, count + c
  out = []
  for k in range(len(loss)):
    m = {"test_loss": float(loss[k] / count[k]), "test_error": float(100.0 * errors[k] / count[k])}
    if task.kind == "text":
      m["test_bpb"] = tasks.bits_per_byte(m["test_loss"])
    out.append(m)
  return out


def train(config, group_dir: str, *, seeds: list[int], task, arrays: dict | None = None,
          progress: bool = True) -> tuple[list[dict], dict]:
  """Trains one row at every seed in ``seeds``, side by side (vmapped replicas, one program).

  Each seed writes ``group_dir/seed{K}/{metrics.jsonl, summary.json, tb/}``; the stacked state is
  checkpointed in ``group_dir/ckpt/seeds_{seeds}``: a rerun with the same seeds resumes from it,
  other seeds start afresh. Returns the per-seed summaries and the final stacked state.
  """
  seeds = list(seeds)
  replicas = len(seeds)
  is_main = jax.process_index() == 0
  run_dirs = [os.path.join(group_dir, f"seed{s}") for s in seeds]
  for d in run_dirs:
    fileio.makedirs(d)
  steps = configs.schedule_steps(config, task.train_size)
  total = steps["total"]
  if not task.sequence and config.batch_size > task.train_size:
    raise ConfigError(f"batch_size {config.batch_size} exceeds the {task.train_size} "
                      "training examples: lower config.batch_size")

  # Mesh: the batch splits over the data-parallel axes, the dataset is replicated.
  mesh = sharding.make_mesh(config.get("mesh", sharding.DEFAULT_MESH))
  sharding.check_batch_size(config.batch_size, mesh)
  arrays = arrays if arrays is not None else task.device_arrays()
  arrays = sharding.put_replicated(arrays, mesh)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh, replica_axis=True)
  eval_sh = sharding.batch_sharding(mesh)
  # Streamed tasks hand each process its own rows; device-resident ones the whole (index) batch.
  put = sharding.put_process_local if task.host_local_batches else sharding.put_global

  # Model, optimizer, state: parameters replicated or FSDP-sharded by config.sharding_rules.
  tx = make_optimizer(config, steps)
  lr_at = learning_rate(config.optim, steps)
  warmup = warmup_rule(config.optim, steps)
  graphdef, state = init_state(config, task, seeds, tx, warmup)
  state_sh = sharding.state_shardings(
      state, mesh, config.get("sharding_rules", sharding.DEFAULT_RULES),
      fsdp_min_size=config.get("fsdp_min_size", sharding.FSDP_MIN_SIZE), replica_axis=True)
  state = sharding.put_global(state, state_sh)

  # Steps, vmapped over replicas; the data arrays are shared. The state is donated.
  aug_keys = sharding.put_global(jnp.stack([stream_key(s, 1) for s in seeds]), repl)
  step_fn = jax.jit(jax.vmap(functools.partial(train_step, graphdef, tx, task, mesh=mesh,
                                               warmup=warmup),
                             in_axes=(0, 0, 0, 0, None)),
                    in_shardings=(state_sh, repl, batch_sh, repl, repl),
                    out_shardings=(state_sh, repl), donate_argnums=(0, 1))
  eval_fn = jax.jit(jax.vmap(functools.partial(eval_step, graphdef, task),
                             in_axes=(0, None, None, None)),
                    in_shardings=(state_sh, eval_sh, eval_sh, repl), out_shardings=repl)
  eval_put = lambda x: put(x, eval_sh)

  # Resume.
  with quiet_logs():
    manager = checkpoint_manager(checkpoint_dir(group_dir, seeds))
  state = restore(manager, state)
  start = int(state["step"][0])
  logs = [MetricsLog(d, is_main) for d in run_dirs]
  log_every, eval_every = config.get("log_every", 100), config.get("eval_every", 1000)
  ckpt_every = config.get("checkpoint_every", 1000)
  eval_batch = config.get("eval_batch_size", 500)
  if not task.sequence:
    eval_batch = min(eval_batch, task.test_size)
  n = sharding.data_parallel_size(mesh)
  eval_batch = -(-eval_batch // n) * n  # padded rows are masked out by `valid`
  name = os.path.basename(os.path.normpath(group_dir))
  summaries = [{"run": name, "seed": s, "status": "running", "reason": None, "failed_step": None,
                "steps": start, "total_steps": total, "final": {}, "wall_s": 0.0} for s in seeds]
  alive = [True] * replicas
  t0, started = time.time(), provenance.utc_now()
  compile_s = None  # the step's compile time, alone: a persistent-cache hit makes it seconds less
  window = sharding.put_global(new_window(replicas), repl)
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=None, leave=False)
  last_train: list[dict] = [{} for _ in seeds]
  last_eval: list[dict] = [{} for _ in seeds]
  # The warm-up rule's end step goes into metrics.jsonl once, on the first line after it.
  end_logged = [int(e) >= 0 for e in warmup_ends(state)] if warmup else []
  step = start
  t_window = time.time()
  with sigterm_saves():
    while step < total:
      batch = jax.tree.map(lambda *b: np.stack(b),
                           *[task.train_batch(s, step, config.batch_size) for s in seeds])
      batch = put(batch, batch_sh)
      if compile_s is None:  # the calls below reuse this executable
        t_compile = time.time()
        step_fn.lower(state, window, batch, aug_keys, arrays).compile()
        compile_s = time.time() - t_compile
      state, window = step_fn(state, window, batch, aug_keys, arrays)
      step += 1
      if bar is not None:
        bar.update(1)
      at_end = step == total
      if step % log_every == 0 or at_end or Preemption.requested:
        w = sharding.to_host(window)
        window = sharding.put_global(new_window(replicas), repl)
        dt = time.time() - t_window
        t_window = time.time()
        if warmup is not None:
          warm = sharding.to_host(state["warmup"])
        for k in range(replicas):
          if not alive[k]:
            continue
          if w["first_bad_step"][k] >= 0:
            bad = int(w["first_bad_step"][k])
            summaries[k].update(status="failed", failed_step=bad, steps=step,
                                reason=f"loss is not finite (nan/inf) at step {bad}")
            logs[k].write(step, {"train_loss": float("nan")})
            alive[k] = False
            continue
          loss = float(w["loss"][k] / w["count"][k])
          last_train[k] = {"train_loss": loss, "train_error": 100.0 * float(w["errors"][k] / w["count"][k]),
                           "lr": float(lr_at(step - 1)),
                           "examples_per_s": float(w["count"][k]) / max(dt, 1e-9)}
          if task.kind == "text":
            last_train[k]["train_bpb"] = tasks.bits_per_byte(loss)
          if warmup is not None:  # this replica's own LR, and its running error while it warms
            end = int(warm["end_step"][k])
            last_train[k]["lr"] = warmup.lr_used(step - 1, end)
            if end < 0 or not end_logged[k]:
              last_train[k]["warmup_error"] = float(warm["error"][k])
            if end >= 0 and not end_logged[k]:
              last_train[k]["warmup_end_step"] = end
              end_logged[k] = True
          logs[k].write(step, last_train[k])
        if not any(alive):
          break
        if bar is not None:
          k = alive.index(True)
          bar.set_postfix(loss=f"{last_train[k]['train_loss']:.3f}",
                          err=f"{last_train[k]['train_error']:.1f}%")
      if step % eval_every == 0 or at_end:
        results = evaluate(eval_fn, state, arrays, task, eval_batch, eval_put)
        for k in range(replicas):
          if alive[k]:
            last_eval[k] = {"step": step, **results[k]}
            logs[k].write(step, results[k])
      if step % ckpt_every == 0 or at_end or Preemption.requested:
        manager.save(step, args=ocp.args.StandardSave(state))
      if Preemption.requested:
        break
  manager.wait_until_finished()
  if bar is not None:
    bar.close()

  wall = time.time() - t0
  resumed_at_end = any(alive[k] and last_eval[k].get("step") != step for k in range(replicas))
  if step == total and resumed_at_end:  # resumed from a checkpoint of the final step
    results = evaluate(eval_fn, state, arrays, task, eval_batch, eval_put)
    last_eval = [{"step": step, **r} for r in results]
  threshold = config.get("failure_error", None)
  ends = warmup_ends(state) if warmup else []
  cache_dir = (jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache
               else None)
  for k, summary in enumerate(summaries):
    summary["wall_s"] = wall
    summary["compile_s"] = compile_s  # None when no step ran (resumed at the end)
    summary["compile_cache"] = cache_dir
    summary["provenance"] = {**provenance.gather(), "started": started,
                             "finished": provenance.utc_now()}
    if warmup is not None:  # None: the run stopped while this replica was still warming up
      summary["warmup_end_step"] = ends[k] if ends[k] >= 0 else None
      summary["warmup_hit_cap"] = ends[k] == warmup.cap if ends[k] >= 0 else None
    if not alive[k]:
      continue
    summary["steps"] = step
    if step < total:
      summary["status"] = "preempted"
      summary["reason"] = f"stopped by SIGTERM at step {step}; rerun the same command to resume"
      continue
    final = {k2: v for k2, v in last_eval[k].items() if k2 != "step"}
    keys = ("train_loss", "train_error") + (("train_bpb",) if task.kind == "text" else ())
    summary["final"] = {**{k2: last_train[k].get(k2) for k2 in keys}, **final}
    if not math.isfinite(final["test_loss"]):
      summary.update(status="failed", failed_step=step,
                     reason=f"test loss is not finite at step {step}")
    elif threshold is not None and final["test_error"] > threshold:
      summary.update(status="failed", reason=(f"test error {final['test_error']:.2f}% is above the "
                                              f"{threshold:g}% failure threshold"))
    else:
      summary["status"] = "ok"
  for log in logs:
    log.close()
  if is_main:
    for d, summary in zip(run_dirs, summaries):
      write_json(os.path.join(d, "summary.json"), summary)
  return summaries, state


def warmup_ends(state) -> list[int]:
  """Each replica's first step after the warm-up rule's warm-up, -1 while it still warms up."""
  return [int(e) for e in sharding.to_host(state["warmup"]["end_step"])]


def replica(state, k: int):
  """Replica ``k`` of a stacked state."""
  return jax.tree.map(lambda x: x[k], state)


def read_summary(run_dir: str) -> dict | None:
  try:
    return json.loads(fileio.read_text(os.path.join(run_dir, "summary.json")))
  except (OSError, ValueError):
    return None

