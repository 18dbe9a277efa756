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

from resjax import configs, models, shortcuts
from resjax.data import images as image_data
from resjax.errors import CheckpointError, ConfigError

FILTERS = (shortcuts.ResidualScalar, nnx.Param, ...)  # -> scalars, weights, rest (BN stats, RNG)

# XLA on CPU takes seconds to compile threefry for every initialiser; the RngBitGenerator-based
# "rbg" keys compile in milliseconds and are native on TPU and GPU.
PRNG_IMPL = "rbg"


def key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=PRNG_IMPL)


# ------------------------------------------------------------------------------------------------
# Model and train state.
# ------------------------------------------------------------------------------------------------

def build_model(config, data: image_data.ImageSplits, seed: int) -> nnx.Module:
  """Initialises the model in one compiled program (eager init dispatches one per parameter)."""
  build = lambda: models.build(config.model, num_classes=data.num_classes,
                               in_channels=data.train_images.shape[-1],
                               rngs=nnx.Rngs(params=key(seed), dropout=jax.random.fold_in(key(seed), 2)))
  return nnx.jit(build)()


def split_model(model: nnx.Module):
  graphdef, scalars, weights, rest = nnx.split(model, *FILTERS)
  return graphdef, {"weights": weights, "scalars": scalars}, rest


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------

def learning_rate(optim, steps: dict) -> optax.Schedule:
  """Constant warm-up LR, then the base LR divided at each boundary (or cosine decay)."""
  warmup, total = steps["warmup"], steps["total"]
  decay = optim.get("decay", "step")
  if decay == "step":
    main = optax.piecewise_constant_schedule(
        optim.lr, {b: optim.get("decay_factor", 0.1) for b in steps["boundaries"]})
  elif decay == "cosine":
    main = lambda s: optim.lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(s / max(total, 1), 1.0)))
  else:
    raise ConfigError(f"unknown LR decay {decay!r}: set config.optim.decay to step or cosine")
  if not warmup:
    return main
  warm_lr = optim.get("warmup_lr", optim.lr)
  return lambda s: jnp.where(s < warmup, warm_lr, main(s))


def make_optimizer(config, steps: dict) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (as the ResNet papers applied it).

  Learnable residual scalars get their own group: no weight decay, and their own optimizer.
  """
  optim = config.optim
  if optim.get("name", "sgd") != "sgd":
    raise ConfigError(f"unknown optimizer {optim.name!r}: set config.optim.name to sgd")
  for key in ("lr", "momentum", "weight_decay"):
    if not (optim[key] >= 0 and math.isfinite(optim[key])):
      raise ConfigError(f"config.optim.{key}={optim[key]} must be a finite number >= 0")
  lr = learning_rate(optim, steps)
  weights = optax.chain(optax.add_decayed_weights(optim.weight_decay),
                        optax.sgd(lr, momentum=optim.momentum))
  scalars = optax.sgd(lr, momentum=optim.momentum)
  return optax.multi_transform({"weights": weights, "scalars": scalars},
                               lambda p: {k: k for k in p})


# ------------------------------------------------------------------------------------------------
# The jitted steps.
# ------------------------------------------------------------------------------------------------

def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def new_window():
  """Device-side sums of the training metrics between two log lines."""
  return {"loss": jnp.zeros((), jnp.float32), "errors": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.float32), "first_bad_step": jnp.full((), -1, jnp.int32)}


def train_step(graphdef, tx, state, window, images, labels, idx, *, mean, pad, flip, aug_key):
  """One SGD step on the batch ``idx`` of the device-resident training set."""
  step = state["step"]
  x = image_data.normalize(images[idx], mean)
  x = image_data.augment(jax.random.fold_in(aug_key, step), x, pad=pad, flip=flip)
  y = labels[idx]

  def loss_fn(params, rest):
    # copy=True: fresh Variables that belong to this trace, so BatchNorm may update them here.
    model = nnx.merge(graphdef, params["scalars"], params["weights"], rest, copy=True)
    logits = model(x, train=True)
    _, _, _, rest = nnx.split(model, *FILTERS)
    return cross_entropy(logits, y).mean(), (logits, rest)

  (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], state["rest"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  bad = ~jnp.isfinite(loss)
  window = {
      "loss": window["loss"] + loss * y.shape[0],
      "errors": window["errors"] + jnp.sum(jnp.argmax(logits, -1) != y),
      "count": window["count"] + y.shape[0],
      # Counted in steps done, as metrics.jsonl and summary.json count them.
      "first_bad_step": jnp.where((window["first_bad_step"] < 0) & bad, step + 1,
                                  window["first_bad_step"]),
  }
  return {"step": step + 1, "params": params, "rest": rest, "opt": opt}, window


def eval_step(graphdef, state, images, labels, idx, valid, *, mean):
  """Loss and error sums over one (padded) test batch."""
  model = nnx.merge(graphdef, state["params"]["scalars"], state["params"]["weights"], state["rest"])
  x = image_data.normalize(images[idx], mean)
  logits = model(x, train=False)
  y = labels[idx]
  loss = jnp.sum(jnp.where(valid, cross_entropy(logits, y), 0.0))
  errors = jnp.sum(valid & (jnp.argmax(logits, -1) != y))
  return loss, errors


# ------------------------------------------------------------------------------------------------
# Batch order: a fixed function of (seed, step), so that a resumed run sees the same batches.
# ------------------------------------------------------------------------------------------------

def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  per_epoch = num_examples // batch_size
  epoch, j = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[j * batch_size:(j + 1) * batch_size].astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(run_dir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(run_dir, "ckpt")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


@contextlib.contextmanager
def quiet_logs():
  """Silences absl logging (TFDS, orbax) where resjax reports a failure in its own one line."""
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(level)


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
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, default=float)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class MetricsLog:
  """metrics.jsonl plus TensorBoard events. Only process 0 writes."""

  def __init__(self, run_dir: str, enabled: bool):
    self.enabled = enabled
    self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if enabled else None
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # light: no TensorFlow
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DeviceData:
  """The image splits on the device, uint8, so that a step moves only batch indices."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  num_train: int
  num_test: int

  @classmethod
  def put(cls, data: image_data.ImageSplits) -> "DeviceData":
    return cls(jnp.asarray(data.train_images), jnp.asarray(data.train_labels),
               jnp.asarray(data.test_images), jnp.asarray(data.test_labels),
               jnp.asarray(data.mean), len(data.train_labels), len(data.test_labels))


def evaluate(eval_fn, state, dd: DeviceData, batch_size: int) -> dict:
  loss = errors = 0.0
  for start in range(0, dd.num_test, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < dd.num_test
    l, e = eval_fn(state, dd.test_images, dd.test_labels, np.minimum(idx, dd.num_test - 1), valid)
    loss, errors = loss + float(l), errors + float(e)
  return {"test_loss": loss / dd.num_test, "test_error": 100.0 * errors / dd.num_test}


def train(config, run_dir: str, *, seed: int, data: image_data.ImageSplits,
          device_data: DeviceData | None = None, progress: bool = True) -> tuple[dict, dict]:
  """Trains one run; returns its summary (also written to ``run_dir/summary.json``) and final state."""
  os.makedirs(run_dir, exist_ok=True)
  is_main = jax.process_index() == 0
  steps = configs.schedule_steps(config, len(data.train_labels))
  total = steps["total"]
  if config.batch_size > len(data.train_labels):
    raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(data.train_labels)} "
                      "training examples: lower config.batch_size")
  dd = device_data or DeviceData.put(data)

  # Model, optimizer, state.
  model = build_model(config, data, seed)
  graphdef, params, rest = split_model(model)
  tx = make_optimizer(config, steps)
  lr_at = learning_rate(config.optim, steps)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
           "opt": tx.init(params)}
  del model

  # Steps. The state is donated: the step updates it in place.
  aug_key = jax.random.fold_in(key(seed), 1)
  step_fn = jax.jit(functools.partial(
      train_step, graphdef, tx, mean=dd.mean, pad=config.data.get("pad", 0),
      flip=config.data.get("flip", False), aug_key=aug_key), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef, mean=dd.mean))

  # Resume.
  with quiet_logs():
    manager = checkpoint_manager(run_dir)
  state = restore(manager, state)
  start = int(state["step"])
  log = MetricsLog(run_dir, is_main)
  log_every, eval_every = config.get("log_every", 100), config.get("eval_every", 1000)
  ckpt_every = config.get("checkpoint_every", 1000)
  eval_batch = min(config.get("eval_batch_size", 500), dd.num_test)

  summary = {"run": os.path.basename(os.path.dirname(run_dir)), "seed": seed, "status": "running",
             "reason": None, "failed_step": None, "steps": start, "total_steps": total,
             "final": {}, "wall_s": 0.0}
  t0 = time.time()
  window = new_window()
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, desc=summary["run"], unit="step", dynamic_ncols=True,
               disable=None, leave=False)
  last_train: dict = {}
  last_eval: dict = {}
  step = start
  t_window = time.time()
  with sigterm_saves():
    while step < total:
      idx = batch_indices(seed, step, dd.num_train, config.batch_size)
      state, window = step_fn(state, window, dd.train_images, dd.train_labels, idx)
      step += 1
      if bar is not None:
        bar.update(1)
      at_end = step == total
      if step % log_every == 0 or at_end or Preemption.requested:
        w = jax.device_get(window)
        window = new_window()
        if w["first_bad_step"] >= 0:
          summary.update(status="failed", failed_step=int(w["first_bad_step"]),
                         reason=f"loss is not finite (nan/inf) at step {int(w['first_bad_step'])}")
          log.write(step, {"train_loss": float("nan")})
          break
        dt = time.time() - t_window
        t_window = time.time()
        last_train = {"train_loss": w["loss"] / w["count"],
                      "train_error": 100.0 * w["errors"] / w["count"],
                      "lr": float(lr_at(step - 1)),
                      "examples_per_s": w["count"] / max(dt, 1e-9)}
        log.write(step, last_train)
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['train_loss']:.3f}",
                          err=f"{last_train['train_error']:.1f}%")
      if step % eval_every == 0 or at_end:
        last_eval = {"step": step, **evaluate(eval_fn, state, dd, eval_batch)}
        log.write(step, {k: v for k, v in last_eval.items() if k != "step"})
      if step % ckpt_every == 0 or at_end or Preemption.requested:
        manager.save(step, args=ocp.args.StandardSave(state))
      if Preemption.requested:
        break
  manager.wait_until_finished()
  if bar is not None:
    bar.close()

  summary["steps"] = step
  summary["wall_s"] = time.time() - t0
  if summary["status"] == "running" and step < total:
    summary["status"] = "preempted"
    summary["reason"] = f"stopped by SIGTERM at step {step}; rerun the same command to resume"
  elif summary["status"] == "running":
    if last_eval.get("step") != step:  # resumed from a checkpoint of the final step
      last_eval = {"step": step, **evaluate(eval_fn, state, dd, eval_batch)}
    final = {k: v for k, v in last_eval.items() if k != "step"}
    summary["final"] = {**{k: last_train.get(k) for k in ("train_loss", "train_error")}, **final}
    threshold = config.get("failure_error", None)
    if not math.isfinite(final["test_loss"]):
      summary.update(status="failed", failed_step=step,
                     reason=f"test loss is not finite at step {step}")
    elif threshold is not None and final["test_error"] > threshold:
      summary.update(status="failed", reason=(f"test error {final['test_error']:.2f}% is above the "
                                              f"{threshold:g}% failure threshold"))
    else:
      summary["status"] = "ok"
  log.close()
  if is_main:
    write_json(os.path.join(run_dir, "summary.json"), summary)
  return summary, state


def read_summary(run_dir: str) -> dict | None:
  try:
    with open(os.path.join(run_dir, "summary.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None

