"""Signal propagation at initialisation: ``--mode=diagnose``.

For every run of an experiment, at the run's seed and on the batch its first training step sees
(train mode, so BatchNorm uses batch statistics), per unit: the RMS of the unit's input activation
and the RMS of d loss / d (unit input), the cross-entropy loss averaged over the batch.

ResNet-v2 Eq. 8 with a scaled shortcut x_{l+1} = lambda x_l + F(x_l): the gradient reaching unit
l is the top gradient times prod(lambda) over the units above l, plus terms through the branches.
With ``config.model.zero_init_residual=True`` every branch starts at F = 0, so only the shortcut
term is left: for lambda = 0.5 the gradient halves at every unit on its way down. At the default
init the branch terms are there too, and BatchNorm renormalises what a shrunken input gives them.

Units come in stacks of the same shape (``model.probe_shapes``; for ResNets each stage's first
unit, then its other units). Summaries per run, all as natural logs per unit in the direction
the gradient flows (from the last unit to the first; log(0.5) = -0.693 is halving per unit):

* ``grad_log_slope``: least-squares slope of ln(grad_rms) within the stacks (one intercept per
  stack). This is where Eq. 8's product applies unit by unit; between stages a projection's
  BatchNorm rescales the gradient by the inverse of its input's scale.
* ``grad_log_slope_all``: the same slope fitted over all units at once.
* ``grad_first_over_last``: grad_rms of the first unit over that of the last.

Process 0 writes WORKDIR/diagnose.json and WORKDIR/diagnose.png (activation and gradient RMS
against the unit index, log scale, a line per run), through ``fileio``, so WORKDIR may be gs://.
"""

from __future__ import annotations

import io
import math
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resjax import fileio, tasks, train
from resjax.errors import ConfigError, quiet_logs
from resjax.models import resnet

SLOPE_DEFINITION = ("natural log of grad_rms per unit, from the last unit to the first (the way "
                    "the gradient flows); grad_log_slope fits within stacks of same-shaped units, "
                    "grad_log_slope_all over all units")


# ------------------------------------------------------------------------------------------------
# Per-unit signals of one model on one batch.
# ------------------------------------------------------------------------------------------------

def _signals(graphdef, state, probes, x, labels):
  def loss_fn(probes):
    model = nnx.merge(graphdef, state, copy=True)  # BatchNorm may update its copies here
    logits, act_rms = model(x, train=True, probes=probes)
    return tasks.cross_entropy(logits, labels).mean(), act_rms

  (loss, act_rms), grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
  grad_rms = [resnet.rms(g, axes=tuple(range(1, g.ndim))) for g in grads]
  return loss, act_rms, grad_rms


_signals_jit = jax.jit(_signals, static_argnums=0)


def unit_signals(model: nnx.Module, x: jax.Array, labels: jax.Array) -> dict:
  """Loss, and per unit in network order: stack index, input activation RMS, gradient RMS."""
  shapes = model.probe_shapes(x.shape)
  probes = [jnp.zeros(s, jnp.float32) for s in shapes]
  graphdef, state = nnx.split(model)
  loss, act, grad = jax.device_get(_signals_jit(graphdef, state, probes, x, labels))
  stack = np.concatenate([np.full(s[0], i) for i, s in enumerate(shapes)])
  return {"loss": float(loss), "stack": stack,
          "act_rms": np.concatenate([np.asarray(a, np.float64) for a in act]),
          "grad_rms": np.concatenate([np.asarray(g, np.float64) for g in grad])}


def log_slopes(grad_rms: np.ndarray, stack: np.ndarray) -> dict:
  """The summaries of the module docstring; None where a gradient is 0 or not finite (and the
  within-stack slope None where no stack holds two units)."""
  g = np.asarray(grad_rms, np.float64)
  out = {"grad_log_slope": None, "grad_log_slope_all": None, "grad_first_over_last": None}
  if len(g) < 2 or not np.all(np.isfinite(g)) or not np.all(g > 0):
    return out
  # Unit index counted from the top, so that a gradient shrinking on its way down has slope < 0.
  t, y = -np.arange(len(g), dtype=np.float64), np.log(g)
  num = den = 0.0
  for s in np.unique(stack):
    ts, ys = t[stack == s], y[stack == s]
    num += float(np.sum((ts - ts.mean()) * (ys - ys.mean())))
    den += float(np.sum((ts - ts.mean()) ** 2))
  out["grad_log_slope"] = num / den if den > 0 else None
  out["grad_log_slope_all"] = float(np.polyfit(t, y, 1)[0])
  out["grad_first_over_last"] = float(g[0] / g[-1])
  return out


# ------------------------------------------------------------------------------------------------
# A run's model and the batch of its first training step.
# ------------------------------------------------------------------------------------------------

def first_batch(rc, task, seed: int) -> tuple[jax.Array, jax.Array]:
  """Inputs and targets of step 0 of ``train.train``: the same batch, the same augmentation."""
  if rc.batch_size > task.train_size:
    raise ConfigError(f"batch_size {rc.batch_size} exceeds the {task.train_size} training "
                      "examples: lower config.batch_size")
  batch = task.train_batch(seed, 0, rc.batch_size)
  aug_key = train.stream_key(seed, 1)
  # One compiled program rather than an eager dispatch (and compile) per augmentation op.
  return jax.jit(task.train_inputs)(task.device_arrays(), batch, jax.random.fold_in(aug_key, 0))


def model_and_batch(rc, seed: int, loaded: dict):
  """(model at ``seed``, inputs, targets) for one run; ``loaded`` caches tasks by ``task_key``."""
  key = tasks.task_key(rc)
  if key not in loaded:
    with quiet_logs():  # TFDS warns about missing folders before resjax says how to fix it
      loaded[key] = tasks.load(rc)
  task = loaded[key]
  model = train.build_model(rc, task, seed)
  if not hasattr(model, "probe_shapes"):
    # ---- TRANSFORMER / OTHER MODELS -----------------------------------------------------------
    # Text runs need nothing else here (the task gives token windows and next-token targets;
    # the loss averages over batch and positions), only the probe protocol in the model.
    raise ConfigError(f"model {rc.model.name!r} has no signal-propagation probes "
                      "(probe_shapes): --mode=diagnose cannot measure it yet")
  x, labels = first_batch(rc, task, seed)
  return model, x, labels


# ------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------

def _finite(v):
  return v if v is None or math.isfinite(v) else None


def plot(results: list[dict], title: str, f) -> None:
  """Two panels, activation RMS and gradient RMS against the unit index, log y, a line per run."""
  fig = Figure(figsize=(13, 5.5 + 0.25 * len(results)), layout="constrained")
  FigureCanvasAgg(fig)
  ax_act, ax_grad = fig.subplots(1, 2)
  palette, styles = matplotlib.colormaps["tab10"].colors, ["-", "--", "-.", ":"]
  for i, r in enumerate(results):
    kw = dict(color=palette[i % 10], linestyle=styles[i // 10 % 4], linewidth=1.3)
    units = np.asarray(r["units"])
    act, grad = np.asarray(r["act_rms"], float), np.asarray(r["grad_rms"], float)
    slope = r["grad_log_slope"]
    label = r["label"] + ("" if slope is None else f" (grad slope {slope:+.3f}/unit)")
    # Zeros cannot sit on a log axis: they are left out of the line.
    ax_act.plot(units, np.where(act > 0, act, np.nan), label=label, **kw)
    ax_grad.plot(units, np.where(grad > 0, grad, np.nan), **kw)
  ax_act.set(xlabel="unit", ylabel="RMS of the unit's input", title="forward activation RMS",
             yscale="log")
  ax_grad.set(xlabel="unit", ylabel="RMS of d loss / d unit input", title="gradient RMS",
              yscale="log")
  for ax in (ax_act, ax_grad):
    ax.grid(True, alpha=0.3, which="both")
  handles, labels = ax_act.get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
  fig.suptitle(f"{title}\nat initialisation, one training batch, train-mode BatchNorm", fontsize=11)
  fig.savefig(f, format="png", dpi=100)


def run_all(config, runs, workdir: str) -> tuple[str, str]:
  """Diagnoses every (row, run_config) of ``runs``; writes diagnose.json and diagnose.png."""
  loaded: dict = {}
  results = []
  for i, (row, rc) in enumerate(runs, 1):
    t0 = time.time()
    seed = rc.get("seed", 0)
    model, x, labels = model_and_batch(rc, seed, loaded)
    s = unit_signals(model, x, labels)
    del model
    summary = log_slopes(s["grad_rms"], s["stack"])
    results.append({
        "run": row.name, "label": row.label, "seed": seed, "batch_size": int(x.shape[0]),
        "zero_init_residual": bool(rc.model.get("zero_init_residual", False)),
        "loss": _finite(s["loss"]), "units": list(range(len(s["grad_rms"]))),
        "stack": s["stack"].tolist(), "act_rms": s["act_rms"].tolist(),
        "grad_rms": s["grad_rms"].tolist(), **summary, "seconds": time.time() - t0})
    slope = summary["grad_log_slope"]
    print(f"[{i}/{len(runs)}] {row.name}: grad slope "
          f"{'n/a' if slope is None else f'{slope:+.3f}'} per unit, first/last "
          f"{summary['grad_first_over_last'] or float('nan'):.3g} ({time.time() - t0:.1f} s)",
          flush=True)
  return write(config, results, workdir)


def write(config, results: list[dict], workdir: str) -> tuple[str, str]:
  """diagnose.json and diagnose.png in ``workdir`` (local or gs://), written by process 0 only."""
  json_path = os.path.join(workdir, "diagnose.json")
  png_path = os.path.join(workdir, "diagnose.png")
  if jax.process_index() == 0:  # every process measures the same runs; one writes them
    fileio.makedirs(workdir)
    train.write_json(json_path, {
        "experiment": config.get("experiment", ""), "scale": config.get("scale", None),
        "slope_definition": SLOPE_DEFINITION, "runs": results})
    png = io.BytesIO()
    plot(results, str(config.get("experiment", "")), png)
    fileio.write_atomic(png_path, png.getvalue())
  return json_path, png_path
