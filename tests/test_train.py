"""Tests for resjax.train: resuming, divergence, the failure threshold, preemption, the logs.

Every training here is ResNet-14 on digits (fig2 at scale=test). They share one compiled step
through the session's XLA cache, so only the first pays for compilation.
"""

import copy
import importlib.util
import json
import math
import os
import pathlib
import time

import jax
import numpy as np
import pytest

from resjax import configs, fileio, tasks, train

FIG2 = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "resnetv2_fig2.py"


def _fig2_row(arg, name):
  spec = importlib.util.spec_from_file_location("resnetv2_fig2", FIG2)
  fig2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fig2)
  config = fig2.get_config(arg)
  (run,) = [r for r in config.runs if r.name == name]
  return configs.run_config(config, run)


def _read_jsonl(path):
  with open(path) as f:
    return [fileio.loads(line) for line in f if line.strip()]


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _leaves(tree):
  """(path, numpy array) for every leaf, PRNG keys as their raw data."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append((jax.tree_util.keystr(path), np.asarray(x)))
  return out


def _bitwise_differences(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  return [p for (p, x), (_, y) in zip(la, lb)
          if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()]


# ------------------------------------------------------------------------- in-process runs


@pytest.fixture(scope="module")
def runs(xla_cache, tmp_path_factory):
  """The identity row of fig2 at scale=test (6 steps, checkpoints every 3), trained twice.

  `straight`: 6 steps in one call, with failure_error=-1 (any error fails).
  `resumed`: 3 steps (total=3, same LR boundaries), then total=6 in the same run dir, with
  failure_error=100 (no error fails). failure_error only judges the end; it cannot change training.
  """
  config = _fig2_row("scale=test", "identity")
  assert config.model.depth == 14
  # The schedule these tests count with, whatever fig2's scale=test trains.
  config.schedule.update(total=6, boundaries=(4,), warmup=2)
  config.optim.update(lr=0.1, warmup_lr=0.01)
  config.log_every, config.eval_every, config.checkpoint_every = 2, 3, 3
  task = tasks.load(config)
  arrays = task.device_arrays()
  root = tmp_path_factory.mktemp("runs")

  def run(run_dir, total, failure_error):
    c = copy.deepcopy(config)
    c.schedule.total = total
    c.failure_error = failure_error
    (summary,), state = train.train(c, str(run_dir.parent), seeds=[0], task=task, arrays=arrays,
                                    progress=False)
    return summary, jax.device_get(train.replica(state, 0))

  straight_dir, resumed_dir = root / "straight" / "seed0", root / "resumed" / "seed0"
  straight = run(straight_dir, 6, -1.0)
  first_half = run(resumed_dir, 3, 100.0)
  resumed = run(resumed_dir, 6, 100.0)
  return {"straight": straight, "first_half": first_half, "resumed": resumed,
          "straight_dir": straight_dir, "resumed_dir": resumed_dir}


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(runs):
  (_, straight), (half_summary, half), (summary, resumed) = (
      runs["straight"], runs["first_half"], runs["resumed"])
  assert half_summary["steps"] == 3 and int(half["step"]) == 3
  assert sorted(os.listdir(runs["resumed_dir"].parent / "ckpt" / "seeds_0")) == ["3", "6"]
  assert summary["steps"] == 6 and int(resumed["step"]) == 6 and int(straight["step"]) == 6
  # Not vacuous: the last 3 steps moved the weights.
  assert _bitwise_differences(half["params"], straight["params"])
  # Bitwise by construction: under a step decay (fixed boundaries) schedule.total does not enter
  # the step's program, so all three calls run one compiled step on the same batches and keys,
  # and the checkpoint restores the state exactly.
  for part in ("params", "rest", "opt"):
    assert _bitwise_differences(straight[part], resumed[part]) == [], part


def test_resumed_run_logs_continue_from_the_checkpoint(runs):
  metrics = _read_jsonl(runs["resumed_dir"] / "metrics.jsonl")
  steps = [m["step"] for m in metrics]
  # Steps 1-3 in the first call (log at 2 and at its end 3, eval at 3), 4-6 in the second.
  assert steps == [2, 3, 3, 4, 6, 6]
  # The window 5-6 is the same in both runs, and so is every eval at step 6.
  straight = _read_jsonl(runs["straight_dir"] / "metrics.jsonl")
  pick = lambda ms, key: [m[key] for m in ms if m["step"] == 6 and key in m]
  for key in ("train_loss", "train_error", "test_loss", "test_error"):
    assert pick(metrics, key) == pick(straight, key), key


def test_run_above_failure_threshold_is_failed_with_the_threshold_named(runs):
  summary, _ = runs["straight"]
  error = summary["final"]["test_error"]
  assert summary["status"] == "failed"
  assert summary["reason"] == f"test error {error:.2f}% is above the -1% failure threshold"
  assert summary["failed_step"] is None  # it finished; nothing diverged
  on_disk = _read_json(runs["straight_dir"] / "summary.json")
  assert on_disk["status"] == "failed" and on_disk["reason"] == summary["reason"]


def test_run_below_failure_threshold_is_ok(runs):
  summary, _ = runs["resumed"]
  assert summary["final"]["test_error"] <= 100.0
  assert summary["status"] == "ok" and summary["reason"] is None


def test_metrics_lines_and_summary_agree(runs):
  metrics = _read_jsonl(runs["straight_dir"] / "metrics.jsonl")
  train_lines = [m for m in metrics if "train_loss" in m]
  eval_lines = [m for m in metrics if "test_loss" in m]
  assert len(train_lines) + len(eval_lines) == len(metrics)
  # log_every=2, eval_every=3, total=6.
  assert [m["step"] for m in train_lines] == [2, 4, 6]
  assert [m["step"] for m in eval_lines] == [3, 6]
  for m in train_lines:
    assert set(m) == {"step", "train_loss", "train_error", "lr", "examples_per_s"}
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0
    # Two steps of 32 examples per window.
    assert 0 <= m["train_error"] <= 100 and (m["train_error"] * 64 / 100) % 1 == 0
  for m in eval_lines:
    assert set(m) == {"step", "test_loss", "test_error"}
    assert (m["test_error"] * 300 / 100) == pytest.approx(round(m["test_error"] * 3))
  # The LR of each window's last step: warm-up 0.01 until step 2, 0.1, then /10 after step 4.
  assert [m["lr"] for m in train_lines] == pytest.approx([0.01, 0.1, 0.01], rel=1e-6)
  summary = _read_json(runs["straight_dir"] / "summary.json")
  assert summary["steps"] == summary["total_steps"] == 6
  assert summary["final"]["test_error"] == eval_lines[-1]["test_error"]
  assert summary["final"]["test_loss"] == eval_lines[-1]["test_loss"]
  assert summary["final"]["train_loss"] == train_lines[-1]["train_loss"]
  assert summary["final"]["train_error"] == train_lines[-1]["train_error"]


# -------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module", autouse=True)
def diverging_sweep(cli, experiment_file, tmp_path_factory):
  """Starts, with the module, a sweep of two rows: LR 1e30 (logged every step), then fig2's LR."""
  root = tmp_path_factory.mktemp("diverging_sweep")
  exp = experiment_file(root / "two_rows.py", """
      c.failure_error = 100.0
      c.schedule.update(total=6, boundaries=(4,), warmup=2)
      c.log_every, c.eval_every, c.checkpoint_every = 2, 3, 3
      c.runs = [
          row('diverges', 'LR 1e30', model__shortcut__name='identity', optim__lr=1e30,
              optim__warmup_lr=1e30, log_every=1),
          row('stable', 'LR as in fig2', model__shortcut__name='identity'),
      ]
      """)
  with cli.background(root, "--config", exp, "--workdir", root / "work") as proc:
    yield proc, root


@pytest.fixture(scope="module")
def diverged(diverging_sweep):
  proc, root = diverging_sweep
  code = proc.wait(timeout=400)
  return code, (root / "err").read_text(), root / "work"


def test_diverging_run_is_failed_and_the_sweep_goes_on(diverged):
  code, stderr, workdir = diverged
  assert code == 0, stderr
  assert "Traceback" not in stderr
  bad = _read_json(workdir / "diverges" / "seed0" / "summary.json")
  assert bad["status"] == "failed"
  assert "not finite" in bad["reason"]
  assert isinstance(bad["failed_step"], int) and 0 <= bad["failed_step"] < 6
  assert f'step {bad["failed_step"]}' in bad["reason"]
  assert bad["final"] == {}
  # Logging every step, it stops at the first step whose loss is not finite, and logs it.
  train_lines = [m for m in _read_jsonl(workdir / "diverges" / "seed0" / "metrics.jsonl")
                 if "train_loss" in m]
  assert not math.isfinite(train_lines[-1]["train_loss"])
  assert all(math.isfinite(m["train_loss"]) for m in train_lines[:-1])
  assert train_lines[-1]["step"] == bad["steps"] < 6
  good = _read_json(workdir / "stable" / "seed0" / "summary.json")
  assert good["status"] == "ok" and good["steps"] == 6
  assert math.isfinite(good["final"]["test_loss"])
  table = [line for line in (workdir / "results.md").read_text().splitlines()
           if line.startswith("| ")]
  (bad_line,) = [line for line in table if line.startswith("| LR 1e30 |")]
  (good_line,) = [line for line in table if line.startswith("| LR as in fig2 |")]
  assert "fail" in bad_line and "fail" not in good_line


def test_failed_step_counts_steps_as_the_metrics_do(diverged):
  _, _, workdir = diverged
  bad = _read_json(workdir / "diverges" / "seed0" / "summary.json")
  metrics = _read_jsonl(workdir / "diverges" / "seed0" / "metrics.jsonl")
  (first_nan,) = [m["step"] for m in metrics
                  if "train_loss" in m and not math.isfinite(m["train_loss"])]
  # Logging every step, the line at step k holds the loss of step k alone.
  assert bad["failed_step"] == first_nan
  assert bad["reason"].endswith(f"at step {first_nan}")


def _wait_for(predicate, timeout, proc):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.2)
  return False


