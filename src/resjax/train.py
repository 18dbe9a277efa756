"""The trainer: one run (a table row at one seed), from config to ``summary.json``.

Read top to bottom: model and state, optimizer, the jitted steps, checkpoints, stopping early,
the run directory's files, then the trainer in three parts: setup_train_loop, train_loop, finalize.

The run directory holds ``metrics.jsonl`` (one JSON object per logged step, the source of truth),
``tb/`` (TensorBoard events), ``ckpt/`` (orbax checkpoints, the resume point) and ``summary.json``.
A run resumes from its newest checkpoint without being asked. Everything random (initialisation,
batch order, augmentation, dropout) is a function of the seed and the step, so a resumed run ends
with exactly the parameters of one never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from resjax import configs, fileio, models, provenance, sharding, tasks
from resjax import optim as optim_lib
from resjax.errors import CheckpointError, ConfigError, quiet_logs
from resjax.models import layers, shortcuts

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

def learning_rate(optim, steps: dict, peak: float | None = None) -> optax.Schedule:
  """Warm-up (constant at warmup_lr as in the ResNet papers, or linear from 0), then the decay,
  joined from optax's schedules, peaking at ``peak`` (default: the weights' LR, config.optim.lr).

  ``linear_warmdown`` is the modded-nanogpt record's trapezoid: the peak until the last
  ``warmdown`` steps (config.schedule.warmdown), then linearly to final_lr_fraction (default 0):
  lr (total - step) / warmdown in them.

  Under the warm-up rule (``steps["warmup_until_error"]``) each replica decides in the step when
  its warm-up ends (``WarmupRule``); this is then the schedule after the warm-up: step decays at
  their boundaries, cosine and linear decays from the cap, wherever the warm-up ended.
  """
  warmup, total = steps["warmup"], steps["total"]
  lr = _setting(optim, "lr") if peak is None else peak
  muon = optim.get("name", "sgd") == "muon"
  decay = optim.get("decay", configs.MUON["decay"] if muon else "step")
  span = max(total - warmup, 1)  # the cosine and linear decays run from the warm-up's end
  floor = optim.get("final_lr_fraction", 0.0)
  if decay == "step":  # boundaries in absolute steps, whatever the warm-up
    factor = optim.get("decay_factor", 0.1)
    main = optax.piecewise_constant_schedule(lr, {b: factor for b in steps["boundaries"]})
  elif decay == "cosine":
    main = optax.join_schedules([optax.constant_schedule(lr),
                                 optax.cosine_decay_schedule(lr, span, alpha=floor, exponent=1)],
                                [warmup])
  elif decay == "linear":
    main = optax.join_schedules([optax.constant_schedule(lr),
                                 optax.linear_schedule(lr, lr * floor, span)],
                                [warmup])
  elif decay == "linear_warmdown":
    warmdown = steps.get("warmdown", 0)
    if not 0 < warmdown <= total - warmup:
      raise ConfigError(f"config.schedule.warmdown is {warmdown} steps: linear_warmdown needs 1 to "
                        f"{total - warmup} (the steps after the warm-up); set it in the schedule's "
                        "unit")
    main = optax.join_schedules([optax.constant_schedule(lr),
                                 optax.linear_schedule(lr, lr * floor, warmdown)],
                                [total - warmdown])
  elif decay == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ConfigError(f"unknown LR decay {decay!r}: set config.optim.decay to step, cosine, "
                      "linear, linear_warmdown or constant")
  shape = optim.get("warmup_shape", "constant")
  if steps.get("warmup_until_error") is not None:
    if shape != "constant":
      raise ConfigError("config.schedule.warmup_until_error holds a constant warm-up LR: set "
                        "config.optim.warmup_shape to constant or drop warmup_until_error")
    return main
  if not warmup:
    return main
  if shape == "linear":  # lr (s + 1) / warmup at step s: the peak at step warmup - 1
    warm = optax.linear_schedule(lr / warmup, lr, warmup - 1)
  else:
    warm = optax.constant_schedule(optim.get("warmup_lr", lr))
  # join_schedules counts each part from its boundary; `main` counts from 0, as `steps` does.
  return optax.join_schedules([warm, lambda s: main(s + warmup)], [warmup])


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


def _setting(optim, key: str):
  """config.optim[key]; a muon config may leave a key out for the record's (``configs.MUON``)."""
  if optim.get("name", "sgd") == "muon":
    return optim.get(key, configs.MUON[key])
  return optim[key]


# The muon optimizer's groups, by the Transformer's attribute names (resjax.models.transformer).
# The record has no position table (it uses rotary positions); GPT-2's learned one goes with the
# token embedding, the other lookup table. Every other weight outside the blocks (the final norm)
# is 0-D or 1-D and goes with the scalars.
EMBEDDINGS = ("token_embed", "position_embed")
HEAD = "head"  # a Dense only when tie_head=False
BLOCKS = ("first", "rest")  # block 1; blocks 2..L, stacked on a leading axis under scan


def muon_groups(params) -> dict:
  """The muon optimizer's group of each leaf of ``{"weights", "scalars"}`` (a Transformer's split):
  ``muon`` (a matrix in a block, or a stack of them), ``embed``, ``head``, or ``scalars`` (the
  learnable residual scalars and every 0-D or 1-D weight: biases, norm gains)."""

  def weight(path, x):
    names = sharding.path_names(path)
    if names[0] in EMBEDDINGS:
      return "embed"
    if names[0] == HEAD:
      return "head"
    # Blocks 2..L under scan are one Block whose leaves carry a leading (L - 1) axis; unscanned
    # they are a list, whose next key is an index.
    stacked = names[0] == "rest" and len(names) > 1 and not names[1].isdigit()
    matrix = x.ndim - stacked >= 2
    if names[0] in BLOCKS and matrix:
      return "muon"
    if matrix:
      raise ConfigError(f"the muon optimizer has no group for the matrix {'/'.join(names)}: use "
                        "config.optim.name=adamw for this model")
    return "scalars"

  return {"weights": jax.tree_util.tree_map_with_path(weight, params["weights"]),
          "scalars": jax.tree.map(lambda _: "scalars", params["scalars"])}


def _muon_transforms(optim, steps: dict, model) -> dict:
  """The record's four groups, each at its own LR on the one schedule (warm-down included)."""
  get = lambda k: _setting(optim, k)
  if model is not None and model.get("name") != "transformer":
    raise ConfigError(f"config.optim.name=muon groups a Transformer's parameters, not "
                      f"{model.get('name')!r}'s: use config.optim.name=sgd or adamw")
  if "warmup_lr" in optim:
    raise ConfigError("config.optim.warmup_lr is one LR; muon's groups warm up from their own: "
                      "drop it (warmup_shape=linear ramps every group)")
  if steps.get("warmup_until_error") is not None:
    raise ConfigError("config.schedule.warmup_until_error holds one warm-up LR; muon has four: set "
                      "it to None")
  for k in ("embed_lr", "head_lr", "scalar_lr"):
    if not (get(k) >= 0 and math.isfinite(get(k))):
      raise ConfigError(f"config.optim.{k}={get(k)} must be a finite number >= 0")
  for k in ("momentum", "b1", "b2"):
    if not 0 <= get(k) < 1:
      raise ConfigError(f"config.optim.{k}={get(k)} must be in [0, 1)")
  if not (get("eps") > 0 and math.isfinite(get("eps"))):
    raise ConfigError(f"config.optim.eps={get('eps')} must be a finite number > 0")
  if not isinstance(get("nesterov"), bool):
    raise ConfigError(f"config.optim.nesterov={get('nesterov')!r} must be True or False")
  lr = lambda k: learning_rate(optim, steps, peak=get(k))
  wd, adam = get("weight_decay"), dict(b1=get("b1"), b2=get("b2"), eps=get("eps"))
  return {"muon": optim_lib.muon(lr("lr"), get("momentum"), get("nesterov"), weight_decay=wd),
          "embed": optax.adamw(lr("embed_lr"), weight_decay=wd, **adam),
          "head": optax.adamw(lr("head_lr"), weight_decay=wd, **adam),
          "scalars": optax.adam(lr("scalar_lr"), **adam)}


def _decay_mask(weights):
  """AdamW decays matrices and kernels; biases, norm scales and gains stay undecayed."""
  return jax.tree.map(lambda x: x.ndim >= 2, weights)


def make_optimizer(config, steps: dict) -> optax.GradientTransformation:
  """The two parameter groups: weights, and learnable residual scalars (never weight-decayed).

  ``sgd``: momentum SGD with L2 weight decay added to the gradient, as the ResNet papers applied it.
  ``adamw``: Adam with decoupled weight decay on matrices, gradient clipping by global norm.
  The scalars get their own optimizer: SGD at the weights' LR, or Adam at ``scalar_lr``.
  ``muon``: the modded-nanogpt record's four groups of a Transformer (``muon_groups``): Muon
  (``resjax.optim``) at ``lr`` on the blocks' matrices, Adam at ``embed_lr`` on the embeddings, at
  ``head_lr`` on an untied head, at ``scalar_lr`` on the scalars; every group on the schedule, and
  the keys a config leaves out at the record's values (``configs.MUON``).
  """
  optim = config.optim
  name = optim.get("name", "sgd")
  for k in ("lr", "weight_decay"):
    if not (_setting(optim, k) >= 0 and math.isfinite(_setting(optim, k))):
      raise ConfigError(f"config.optim.{k}={_setting(optim, k)} must be a finite number >= 0")
  lr = learning_rate(optim, steps)
  if name == "sgd":
    weights = optax.chain(optax.add_decayed_weights(optim.weight_decay),
                          optax.sgd(lr, momentum=optim.momentum))
    groups = {"weights": weights, "scalars": optax.sgd(lr, momentum=optim.momentum)}
  elif name == "adamw":
    b1, b2, eps = optim.get("b1", 0.9), optim.get("b2", 0.95), optim.get("eps", 1e-8)
    weights = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=optim.weight_decay,
                          mask=_decay_mask)
    scalar_lr = optim.get("scalar_lr", None) or lr
    groups = {"weights": weights, "scalars": optax.adam(scalar_lr, b1=b1, b2=b2, eps=eps)}
  elif name == "muon":
    groups = _muon_transforms(optim, steps, config.get("model"))
  else:
    raise ConfigError(f"unknown optimizer {name!r}: set config.optim.name to sgd, adamw or "
                      "muon")
  tx = optax.multi_transform(groups, muon_groups if name == "muon" else lambda p: {k: k for k in p})
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


# A checkpoint holds two items: "default", the stacked train state (orbax arrays), and "train",
# what the loop needs besides it to go on as if never stopped (JSON): the open log window's sums,
# each replica's last logged train metrics and failure, and the wall time spent so far. A streamed
# task's checkpoints hold a third, "data": where its input streams stand (``task.iterator``, saved
# by grain's orbax handler), so a resumed run takes the batches an unstopped one would.
STATE_ITEM, LOOP_ITEM, DATA_ITEM = "default", "train", "data"


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      fileio.absolute(directory), item_names=(STATE_ITEM, LOOP_ITEM, DATA_ITEM),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save(manager: ocp.CheckpointManager, step: int, state, loop: dict, data=None) -> None:
  """Saves step ``step`` (asynchronously), with the input streams' state ``data`` if given. On a
  local disk it first checks that the step fits: a full disk then stops the run before orbax
  starts a write it cannot finish."""
  directory = str(manager.directory)
  if not fileio.is_remote(directory):
    manager.wait_until_finished()  # the step before is on disk: the free space is final
    need = sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count() + (64 << 10)
    free = shutil.disk_usage(directory).free
    fits = free >= need
    if jax.process_count() > 1:  # all save or none: a process alone in the save would wait forever
      fits = bool(multihost_utils.process_allgather(np.int32(fits)).min())
    if not fits:
      each = " on each process's disk" if jax.process_count() > 1 else ""
      raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free, the checkpoint of step {step} "
                                  f"needs about {need / 2**20:.1f} MiB{each}")
  items = {STATE_ITEM: ocp.args.StandardSave(state), LOOP_ITEM: ocp.args.JsonSave(loop)}
  if data is not None:
    import grain
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data)
  manager.save(step, args=ocp.args.Composite(**items))


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract,
                  data=None) -> tuple[Any, dict]:
  items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
  # Checkpoints written before the loop item existed hold the state alone. Those of other tasks,
  # or from before the data item, hold no data item, and another process count wrote other files
  # (grain's, one per process): the streams then start afresh at the step, with the same batches.
  where = os.path.join(fileio.absolute(manager.directory), str(step))
  has_loop = fileio.exists(os.path.join(where, LOOP_ITEM))
  if has_loop:
    items[LOOP_ITEM] = ocp.args.JsonRestore()
  mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if data is not None and fileio.exists(os.path.join(where, DATA_ITEM, mine)):
    import grain
    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data)  # restored into ``data``
  with quiet_logs():  # orbax logs its own errors; resjax reports them in one line
    out = manager.restore(step, args=ocp.args.Composite(**items))
  return out[STATE_ITEM], (out[LOOP_ITEM] if has_loop else {})


def _sync(name: str) -> None:
  """A barrier across processes (nothing with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a checkpoint step that does not restore to DIR.broken/STEP (kept for inspection)."""
  directory = fileio.absolute(str(manager.directory)).rstrip("/")
  aside = f"{directory}.broken/{step}"
  n = 1
  while fileio.exists(aside):
    aside, n = f"{directory}.broken/{step}.{n}", n + 1
  if jax.process_index() == 0:
    fileio.move(f"{directory}/{step}", aside)
  return aside


def restore(manager: ocp.CheckpointManager, state, data=None) -> tuple[Any, dict]:
  """The newest checkpoint that restores into ``state``'s structure, and its loop item; ``state``
  and {} if there is none. Its data item, if any, is restored into ``data``.

  A newer step that fails while an older one restores is broken (the older proves the structure
  right): it is moved aside, said in one line, and the run resumes from the older. When no step
  restores, nothing is moved (a changed config, not a broken file, is then the likely cause).
  """
  with quiet_logs():
    steps = sorted(manager.all_steps(), reverse=True)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  broken = []
  for step in steps:
    try:
      restored, loop = _restore_step(manager, step, abstract, data)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
      broken.append((step, type(e).__name__))
      continue
    if broken:
      _sync("resjax-restored")  # every process has read before process 0 moves
      for bad, why in broken:
        aside = _set_aside(manager, bad)
        print(f"warning: checkpoint step {bad} cannot be restored ({why}): resuming from step "
              f"{step}, the broken step is kept in {aside}", file=sys.stderr, flush=True)
      _sync("resjax-set-aside")
      manager.reload()
    return restored, loop
  if broken:
    manager.close()  # stop orbax's background threads before the process exits
    step, why = broken[0]
    where = os.path.join(str(manager.directory), str(step))
    older = f" nor any of the {len(steps) - 1} older steps" if len(steps) > 1 else ""
    raise CheckpointError(
        f"checkpoint {where} cannot be restored ({why}){older}: delete {manager.directory} "
        "to restart this run from scratch, or use another --workdir")
  return state, {}


# ------------------------------------------------------------------------------------------------
# Stopping early: SIGTERM (what a cloud VM gets before it goes) and SIGINT (Ctrl-C) ask the loop
# to save at the next step boundary and stop. One process acts on its own flag; several agree on
# the step through orbax's reached_preemption (JAX's preemption service, which catches SIGTERM
# itself), so no host enters the collective save while another runs the next step.
# ------------------------------------------------------------------------------------------------

class Preemption:
  requested = False
  signal: str | None = None  # the name of the signal this process got, if any


@contextlib.contextmanager
def stop_signals_save(processes: int = 1):
  """Within: SIGTERM and SIGINT request a save and stop (Preemption); a second SIGINT stops now.

  With several processes SIGTERM is left to JAX's preemption service, and SIGINT is passed on to
  it as SIGTERM.
  """
  Preemption.requested, Preemption.signal = False, None

  def on_sigterm(signum, frame):
    del signum, frame
    Preemption.requested, Preemption.signal = True, "SIGTERM"

  def on_sigint(signum, frame):
    del signum, frame
    if Preemption.signal == "SIGINT":
      raise KeyboardInterrupt  # a second Ctrl-C: stop without waiting for the save
    Preemption.signal = "SIGINT"
    if processes > 1:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      Preemption.requested = True

  handlers = {signal.SIGINT: on_sigint}
  if processes == 1:
    handlers[signal.SIGTERM] = on_sigterm
  previous = {}
  try:
    for signum, handler in handlers.items():
      previous[signum] = signal.signal(signum, handler)
  except ValueError:  # not the main thread: leave signals alone
    pass
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def stop_requested(manager: ocp.CheckpointManager, step: int, processes: int) -> bool:
  """Whether to save and stop after ``step``: this process's flag, or with several processes the
  step they all agreed on. Called at every step (the preemption service needs each one)."""
  if processes > 1:
    return manager.reached_preemption(step)
  return Preemption.requested


# ------------------------------------------------------------------------------------------------
# Run-directory files.
# ------------------------------------------------------------------------------------------------

def write_json(path: str, obj: Any) -> None:
  """Atomic: a crash leaves the old file or the new one, never half of one."""
  fileio.write_atomic(path, (fileio.dumps(obj, indent=1) + "\n").encode())


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
    self.jsonl.write(fileio.dumps({"step": step, **values}) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


# ------------------------------------------------------------------------------------------------
# Evaluation, and the trainer in three parts: setup_train_loop, train_loop, finalize.
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
  run, state, record = setup_train_loop(config, group_dir, seeds, task, arrays, progress)
  try:
    state = train_loop(run, state, record)
    return finalize(run, state, record), state
  except Exception as e:
    full = _disk_full(e)
    if full is None:
      raise
    run.manager.reload()  # the steps on disk: orbax lists a step only once it is complete
    kept = run.manager.latest_step()
    run.manager.close()  # stop orbax's background threads before the process exits
    where = (f"step {kept} in {run.manager.directory} is kept" if kept is not None
             else "no checkpoint was complete")
    raise CheckpointError(
        f"the disk under {group_dir} is full ({full}) at step {record.step}: {where}; "
        "free space (or move the workdir) and rerun the same command to resume") from None


def _disk_full(e: BaseException) -> str | None:
  """"No space left on device" (or the quota's message) when that is what ``e`` comes from, else
  None. Python's writes raise OSError; orbax's array writer (tensorstore) raises a ValueError
  that quotes the OS error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    for code in (errno.ENOSPC, errno.EDQUOT):
      if isinstance(e, OSError) and e.errno == code:
        return e.strerror or os.strerror(code)
      if isinstance(e, ValueError) and os.strerror(code) in str(e):
        return os.strerror(code)
    e = e.__cause__ or e.__context__
  return None


# ------------------------------------------------------------------------------------------------
# Setup: mesh, data, state, shardings, compiled steps, the checkpoint to resume from.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What the loop runs with, fixed for the run: the task, its compiled steps and intervals."""
  config: Any
  task: Any
  name: str
  seeds: list[int]
  run_dirs: list[str]
  total: int
  lr_at: optax.Schedule
  warmup: WarmupRule | None
  step_fn: Any
  eval_fn: Any
  arrays: dict
  aug_keys: jax.Array
  put_batch: Any  # host batch -> global batch
  put_eval: Any
  put_window: Any
  manager: ocp.CheckpointManager
  logs: list[MetricsLog]
  log_every: int
  eval_every: int
  ckpt_every: int
  eval_batch: int
  processes: int
  is_main: bool

  @property
  def replicas(self) -> int:
    return len(self.seeds)


@dataclasses.dataclass
class Record:
  """What the loop keeps between steps besides the train state, and what a checkpoint holds of it
  (``loop_item``): a stopped run goes on as if never stopped, its summary and wall time whole."""
  step: int
  window: Any  # device sums of the open log window
  window_s: float  # its time before this session
  t_window: float  # when this session's part of it began
  summaries: list[dict]
  alive: list[bool]
  last_train: list[dict]
  last_eval: list[dict]
  end_logged: list[bool]  # the warm-up rule's end step is logged once
  wall_before: float  # the run's wall time up to the checkpoint resumed from
  t0: float
  started: str
  compile_s: float | None = None  # the step's compile alone: a persistent-cache hit is faster
  remat_used: str | None = None  # what config.model.remat became in the step (layers.remat_used)
  bar: Any = None

  def wall(self) -> float:
    return self.wall_before + time.time() - self.t0

  def loop_item(self) -> dict:
    return {"wall_s": self.wall(),
            "window": {k: v.tolist() for k, v in sharding.to_host(self.window).items()},
            "window_s": self.window_s + time.time() - self.t_window,
            "last_train": self.last_train,
            "failures": [None if alive else {f: summary[f] for f in FAILURE_FIELDS}
                         for alive, summary in zip(self.alive, self.summaries)]}


FAILURE_FIELDS = ("reason", "failed_step", "steps")


def setup_train_loop(config, group_dir: str, seeds: list[int], task, arrays: dict | None,
                     progress: bool) -> tuple[Run, Any, Record]:
  """The run, its train state (resumed from the newest checkpoint if there is one) and the loop's
  record."""
  seeds = list(seeds)
  replicas = len(seeds)
  run_dirs = [os.path.join(group_dir, f"seed{s}") for s in seeds]
  for d in run_dirs:
    fileio.makedirs(d)
  steps = configs.schedule_steps(config, task.train_size)
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
  warmup = warmup_rule(config.optim, steps)
  graphdef, state = init_state(config, task, seeds, tx, warmup)
  state_sh = sharding.state_shardings(
      state, mesh, config.get("sharding_rules", sharding.DEFAULT_RULES),
      fsdp_min_size=config.get("fsdp_min_size", sharding.FSDP_MIN_SIZE), replica_axis=True)
  state = sharding.put_global(state, state_sh)

  # Steps, vmapped over replicas; the data arrays are shared. The state is donated.
  step_fn = jax.jit(jax.vmap(functools.partial(train_step, graphdef, tx, task, mesh=mesh,
                                               warmup=warmup),
                             in_axes=(0, 0, 0, 0, None)),
                    in_shardings=(state_sh, repl, batch_sh, repl, repl),
                    out_shardings=(state_sh, repl), donate_argnums=(0, 1))
  eval_fn = jax.jit(jax.vmap(functools.partial(eval_step, graphdef, task),
                             in_axes=(0, None, None, None)),
                    in_shardings=(state_sh, eval_sh, eval_sh, repl), out_shardings=repl)

  # Resume: the state, and the loop's own record (the open window, the last train metrics).
  with quiet_logs():
    manager = checkpoint_manager(checkpoint_dir(group_dir, seeds))
  state, loop = restore(manager, state, getattr(task, "iterator", None))
  start = int(state["step"][0])

  eval_batch = config.get("eval_batch_size", 500)
  if not task.sequence:
    eval_batch = min(eval_batch, task.test_size)
  n = sharding.data_parallel_size(mesh)
  is_main = jax.process_index() == 0
  run = Run(
      config=config, task=task, name=os.path.basename(os.path.normpath(group_dir)), seeds=seeds,
      run_dirs=run_dirs, total=steps["total"], lr_at=learning_rate(config.optim, steps),
      warmup=warmup, step_fn=step_fn, eval_fn=eval_fn, arrays=arrays,
      aug_keys=sharding.put_global(jnp.stack([stream_key(s, 1) for s in seeds]), repl),
      put_batch=lambda x: put(x, batch_sh), put_eval=lambda x: put(x, eval_sh),
      put_window=lambda x: sharding.put_global(x, repl), manager=manager,
      logs=[MetricsLog(d, is_main) for d in run_dirs],
      log_every=config.get("log_every", 100), eval_every=config.get("eval_every", 1000),
      ckpt_every=config.get("checkpoint_every", 1000),
      eval_batch=-(-eval_batch // n) * n,  # padded rows are masked out by `valid`
      processes=jax.process_count(), is_main=is_main)

  summaries = [{"run": run.name, "seed": s, "status": "running", "reason": None,
                "failed_step": None, "steps": start, "total_steps": run.total, "final": {},
                "wall_s": 0.0} for s in seeds]
  for summary, failure in zip(summaries, loop.get("failures", [None] * replicas)):
    if failure is not None:  # a replica that diverged before the checkpoint stays failed
      summary.update(status="failed", **failure)
  record = Record(
      step=start, window=run.put_window(loop_window(loop, replicas)),
      window_s=loop.get("window_s", 0.0), t_window=time.time(), summaries=summaries,
      alive=[summary["status"] == "running" for summary in summaries],
      last_train=loop.get("last_train", [{} for _ in seeds]), last_eval=[{} for _ in seeds],
      end_logged=[e >= 0 for e in warmup_ends(state)] if warmup else [],
      wall_before=loop.get("wall_s", 0.0), t0=time.time(), started=provenance.utc_now())
  if progress and is_main:
    from tqdm import tqdm
    record.bar = tqdm(total=run.total, initial=start, desc=run.name, unit="step",
                      dynamic_ncols=True, disable=None, leave=False)
  return run, state, record


def loop_window(loop: dict, replicas: int) -> dict:
  """The open log window of a checkpoint's loop item (exactly its float32 sums), else a new one."""
  fresh = new_window(replicas)
  if "window" not in loop:
    return fresh
  return {k: np.asarray(loop["window"][k], fresh[k].dtype) for k in fresh}


# ------------------------------------------------------------------------------------------------
# The loop: step, log, evaluate, checkpoint; stop early on a signal or when every replica failed.
# ------------------------------------------------------------------------------------------------

def train_loop(run: Run, state, record: Record):
  """Trains from ``record.step`` to the run's total; returns the final state."""
  with stop_signals_save(run.processes):
    while record.step < run.total:
      seeds_batches = [run.task.train_batch(s, record.step, run.config.batch_size)
                       for s in run.seeds]
      batch = run.put_batch(jax.tree.map(lambda *b: np.stack(b), *seeds_batches))
      args = (batch, run.aug_keys, run.arrays)
      if record.compile_s is None:  # the calls below reuse this executable
        t_compile = time.time()
        with layers.remats_chosen() as chosen:
          run.step_fn.lower(state, record.window, *args).compile()
        record.compile_s = time.time() - t_compile
        requested = run.config.get("model", {}).get("remat", "none")  # a task may bring its model
        record.remat_used = layers.remat_used(requested, chosen)
      state, record.window = run.step_fn(state, record.window, *args)
      record.step += 1
      step = record.step
      if record.bar is not None:
        record.bar.update(1)
      at_end = step == run.total
      stop = stop_requested(run.manager, step, run.processes)  # every process, every step
      if step % run.log_every == 0 or at_end or stop:
        log_train(run, state, record)
        if not any(record.alive):
          break
      if step % run.eval_every == 0 or at_end:
        results = evaluate(run.eval_fn, state, run.arrays, run.task, run.eval_batch,
                           run.put_eval)
        for k in range(run.replicas):
          if record.alive[k]:
            record.last_eval[k] = {"step": step, **results[k]}
            run.logs[k].write(step, results[k])
      if step % run.ckpt_every == 0 or at_end or stop:
        save(run.manager, step, state, record.loop_item(), getattr(run.task, "iterator", None))
      if stop:
        break
  run.manager.wait_until_finished()
  if record.bar is not None:
    record.bar.close()
  return state


def log_train(run: Run, state, record: Record) -> None:
  """Writes each live replica's train metrics over the open window, or its failure. The window
  closes only at a multiple of log_every: the end of the run or a stop logs it open, and a
  checkpoint then carries it, so a resumed run logs what an unstopped one does."""
  step = record.step
  w = sharding.to_host(record.window)
  dt = record.window_s + time.time() - record.t_window
  if step % run.log_every == 0:
    record.window = run.put_window(new_window(run.replicas))
    record.window_s, record.t_window = 0.0, time.time()
  warm = sharding.to_host(state["warmup"]) if run.warmup is not None else None
  for k in range(run.replicas):
    if not record.alive[k]:
      continue
    if w["first_bad_step"][k] >= 0:
      bad = int(w["first_bad_step"][k])
      record.summaries[k].update(status="failed", failed_step=bad, steps=step,
                                 reason=f"loss is not finite (nan/inf) at step {bad}")
      run.logs[k].write(step, {"train_loss": float("nan")})
      record.alive[k] = False
      continue
    loss = float(w["loss"][k] / w["count"][k])
    m = {"train_loss": loss, "train_error": 100.0 * float(w["errors"][k] / w["count"][k]),
         "lr": float(run.lr_at(step - 1)), "examples_per_s": float(w["count"][k]) / max(dt, 1e-9)}
    if run.task.kind == "text":
      m["train_bpb"] = tasks.bits_per_byte(loss)
    if warm is not None:  # this replica's own LR, and its running error while it warms up
      end = int(warm["end_step"][k])
      m["lr"] = run.warmup.lr_used(step - 1, end)
      if end < 0 or not record.end_logged[k]:
        m["warmup_error"] = float(warm["error"][k])
      if end >= 0 and not record.end_logged[k]:
        m["warmup_end_step"] = end
        record.end_logged[k] = True
    record.last_train[k] = m
    run.logs[k].write(step, m)
  if record.bar is not None and any(record.alive):
    m = record.last_train[record.alive.index(True)]
    record.bar.set_postfix(loss=f"{m['train_loss']:.3f}", err=f"{m['train_error']:.1f}%")


# ------------------------------------------------------------------------------------------------
# Finalize: each seed's summary.json.
# ------------------------------------------------------------------------------------------------

def finalize(run: Run, state, record: Record) -> list[dict]:
  """Each replica's summary: ok, failed (diverged, or above the failure threshold) or preempted,
  with its final numbers, wall time (summed over sessions) and provenance."""
  step = record.step
  last_eval = record.last_eval
  if step == run.total and any(alive and e.get("step") != step
                               for alive, e in zip(record.alive, last_eval)):
    # Resumed from a checkpoint of the final step: its evaluation was not kept.
    results = evaluate(run.eval_fn, state, run.arrays, run.task, run.eval_batch, run.put_eval)
    last_eval = [{"step": step, **r} for r in results]
  threshold = run.config.get("failure_error", None)
  ends = warmup_ends(state) if run.warmup else []
  cache_dir = (jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache
               else None)
  wall = record.wall()
  for k, summary in enumerate(record.summaries):
    summary["wall_s"] = wall
    summary["compile_s"] = record.compile_s  # None when no step ran (resumed at the end)
    summary["remat_used"] = record.remat_used
    summary["compile_cache"] = cache_dir
    summary["provenance"] = {**provenance.gather(), "started": record.started,
                             "finished": provenance.utc_now()}
    if run.warmup is not None:  # None: the run stopped while this replica was still warming up
      summary["warmup_end_step"] = ends[k] if ends[k] >= 0 else None
      summary["warmup_hit_cap"] = ends[k] == run.warmup.cap if ends[k] >= 0 else None
    if not record.alive[k]:
      continue
    summary["steps"] = step
    if step < run.total:
      summary["status"] = "preempted"
      summary["reason"] = (f"stopped by {stopped_by(run.processes)} at step {step}; rerun the "
                           "same command to resume")
      continue
    final = {key: v for key, v in last_eval[k].items() if key != "step"}
    keys = ("train_loss", "train_error") + (("train_bpb",) if run.task.kind == "text" else ())
    summary["final"] = {**{key: record.last_train[k].get(key) for key in keys}, **final}
    if not math.isfinite(final["test_loss"]):
      summary.update(status="failed", failed_step=step,
                     reason=f"test loss is not finite at step {step}")
    elif threshold is not None and final["test_error"] > threshold:
      summary.update(status="failed", reason=(f"test error {final['test_error']:.2f}% is above the "
                                              f"{threshold:g}% failure threshold"))
    else:
      summary["status"] = "ok"
  for log in run.logs:
    log.close()
  if run.is_main:
    for d, summary in zip(run.run_dirs, record.summaries):
      write_json(os.path.join(d, "summary.json"), summary)
  return record.summaries


def stopped_by(processes: int) -> str:
  """What stopped a run early, for its summary's reason."""
  if processes > 1:
    return f"a preemption notice (SIGTERM or SIGINT to any of the {processes} processes)"
  return Preemption.signal or "SIGTERM"


def warmup_ends(state) -> list[int]:
  """Each replica's first step after the warm-up rule's warm-up, -1 while it still warms up."""
  return [int(e) for e in sharding.to_host(state["warmup"]["end_step"])]


def replica(state, k: int):
  """Replica ``k`` of a stacked state."""
  return jax.tree.map(lambda x: x[k], state)


def read_summary(run_dir: str) -> dict | None:
  try:
    return fileio.loads(fileio.read_text(os.path.join(run_dir, "summary.json")))
  except (OSError, ValueError):
    return None

