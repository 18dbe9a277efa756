"""The optimizer groups and schedules of resjax.train, on hand-made parameter trees."""

import dataclasses
import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from resjax import configs, train
from resjax.errors import ConfigError
from resjax.models import shortcuts

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_experiment(stem, arg):
  spec = importlib.util.spec_from_file_location(stem, REPO / "experiments" / f"{stem}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _config(**optim):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(optim)
  return c


def _params():
  return {"weights": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))},
          "scalars": {"lambda1": jnp.asarray(0.5)}}


STEPS = {"total": 100, "warmup": 10, "boundaries": [50]}


def _one_update(config, grads_value=0.0):
  tx = train.make_optimizer(config, STEPS)
  params = _params()
  grads = {k: {n: jnp.full_like(v, grads_value) for n, v in g.items()} for k, g in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  return params, updates


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_learnable_scalars_carry_no_weight_decay(name):
  config = _config(name=name, lr=0.1, weight_decay=0.5, momentum=0.9, warmup_lr=0.1,
                   warmup_shape="constant", decay="step", scalar_lr=0.02)
  _, updates = _one_update(config)  # zero gradients: only weight decay can move anything
  assert float(updates["scalars"]["lambda1"]) == 0.0
  assert np.all(np.asarray(updates["weights"]["kernel"]) < 0)  # decayed towards zero
  if name == "adamw":  # AdamW decays matrices only, not biases
    assert np.all(np.asarray(updates["weights"]["bias"]) == 0)
  else:  # the ResNet papers' L2 reaches every weight
    assert np.all(np.asarray(updates["weights"]["bias"]) < 0)


def test_adamw_scalars_move_at_their_own_learning_rate():
  config = _config(name="adamw", lr=1e-3, weight_decay=0.0, scalar_lr=0.02, warmup_shape="linear",
                   decay="cosine")
  _, updates = _one_update(config, grads_value=1.0)
  # Adam's first step moves every parameter by its LR (times the warm-up factor 1/10 here).
  assert float(updates["scalars"]["lambda1"]) == pytest.approx(-0.02, rel=1e-4)
  assert float(updates["weights"]["kernel"][0, 0]) == pytest.approx(-1e-4, rel=1e-4)


def test_schedules():
  step = train.learning_rate(ml_collections.ConfigDict(dict(
      lr=0.1, warmup_lr=0.01, decay="step", decay_factor=0.1)), STEPS)
  assert [float(step(s)) for s in (0, 9, 10, 49, 50, 99)] == pytest.approx(
      [0.01, 0.01, 0.1, 0.1, 0.01, 0.01])
  cos = train.learning_rate(ml_collections.ConfigDict(dict(
      lr=1.0, decay="cosine", warmup_shape="linear", final_lr_fraction=0.1)), STEPS)
  # Linear warm-up to the peak at step 9, then cosine from 1 to the floor 0.1 over steps 10..100.
  assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
  assert float(cos(55)) == pytest.approx(0.55) and float(cos(100)) == pytest.approx(0.1)
  lin = train.learning_rate(ml_collections.ConfigDict(dict(lr=1.0, decay="linear")),
                            {"total": 100, "warmup": 0, "boundaries": []})
  assert float(lin(50)) == pytest.approx(0.5)


# ---------------------------------------------------------------- ResNet-v1's warm-up rule

U = 2.0 ** -24  # float32's unit roundoff: one rounded operation errs by at most U relative
RULE_STEPS = {"total": 100, "warmup": 10, "boundaries": [50], "warmup_until_error": 60.0}
SGD = dict(name="sgd", lr=0.1, warmup_lr=0.01, decay="step", decay_factor=0.1, momentum=0.9,
           weight_decay=1e-4)


def _rule(**changes):
  rule = train.warmup_rule(ml_collections.ConfigDict(SGD), RULE_STEPS)
  return dataclasses.replace(rule, **changes)


def _run_rule(rule, batch_errors):
  """(end_step, update factor) after each step of one replica seeing ``batch_errors`` (%)."""
  warm = jax.tree.map(lambda x: x[0], rule.init(1))
  update = jax.jit(rule.update)
  out = []
  for step, e in enumerate(batch_errors):
    warm, factor = update(warm, jnp.int32(step), jnp.float32(e))
    out.append((int(warm["end_step"]), float(factor)))
  return out


def test_warm_up_ends_at_the_first_step_the_running_error_is_below_the_threshold():
  # tau=4: r <- 0.75 r + 0.25 e from 100, all exact in float32. At 40% per batch r is
  # 85, 73.75, 65.3125, 58.984375: first below 60 at step 3, which runs at the schedule's LR.
  got = _run_rule(_rule(tau=4.0), [40.0] * 6)
  assert [end for end, _ in got] == [-1, -1, -1, 3, 3, 3]
  assert [f for _, f in got] == pytest.approx([0.1, 0.1, 0.1, 1.0, 1.0, 1.0], rel=4 * U)
  # Once ended it stays ended, whatever the error does after.
  assert [end for end, _ in _run_rule(_rule(tau=4.0), [40.0] * 4 + [100.0] * 3)][-1] == 3
  # At the default tau=20 one perfect batch moves r from 100 to 95 only: no lucky-batch switch.
  assert [end for end, _ in _run_rule(_rule(until_error=80.0), [0.0] + [100.0] * 5)] == [-1] * 6


def test_warm_up_cap_ends_it_when_the_error_never_falls():
  got = _run_rule(_rule(), [100.0] * 12)  # cap: 10 steps
  assert [end for end, _ in got] == [-1] * 10 + [10, 10]
  assert [f for _, f in got] == pytest.approx([0.1] * 10 + [1.0] * 2, rel=4 * U)


def test_warm_up_rule_needs_a_cap_and_an_error_in_percent():
  def steps(**schedule):
    c = ml_collections.ConfigDict(dict(batch_size=128, schedule={
        "unit": "iterations", "total": 100, "warmup": 10, "boundaries": (50,), **schedule}))
    return configs.schedule_steps(c, train_size=50_000)

  assert steps(warmup_until_error=80.0)["warmup_until_error"] == 80.0
  assert steps(warmup_until_error=100)["warmup"] == 10
  for bad in (0.0, -5.0, 100.5, float("nan"), "80", True):
    with pytest.raises(ConfigError, match=r"warmup_until_error=.* must be .* in \(0, 100\]"):
      steps(warmup_until_error=bad)
  with pytest.raises(ConfigError, match="set config.schedule.warmup to a positive duration"):
    steps(warmup_until_error=80.0, warmup=0)
  with pytest.raises(ConfigError, match="warmup_shape to constant"):
    train.make_optimizer(_config(**SGD, warmup_shape="linear"), RULE_STEPS)


def test_a_bad_warm_up_rule_is_one_line_and_exit_2(cli):
  result = cli.run("--config", "experiments/resnetv1_table6.py:scale=test", "--mode=describe",
                   "--config.schedule.warmup_until_error=120")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: config.schedule.warmup_until_error=120.0 must be a training error in % in (0, 100], "
      "e.g. 80.0 (or None for a fixed-length warm-up)"]


def test_table6_warms_up_only_from_110_layers_until_80_percent_error_at_scale_paper():
  def schedules(scale):
    config = _load_experiment("resnetv1_table6", f"scale={scale}")
    out = {}
    for run in config.runs:
      rc = configs.run_config(config, run)
      steps = configs.schedule_steps(rc, train_size=50_000)
      rule = train.warmup_rule(rc.optim, steps)
      out[run.name] = (steps["warmup"], rule and (rule.until_error, rule.cap, rule.warmup_lr),
                       round(float(train.learning_rate(rc.optim, steps)(0)), 6))
    return config, out

  config, paper = schedules("paper")
  rule = (2000, (80.0, 2000, 0.01), 0.1)  # until 80% error, capped at 2000 iterations
  assert paper == {**{f"{kind}{d}": (0, None, 0.1) for kind in ("resnet", "plain")
                      for d in (20, 32, 44, 56)},
                   "resnet110": rule, "plain110": rule, "resnet1202": rule}
  (r110,) = [r for r in config.runs if r.name == "resnet110"]
  assert r110.paper_error == 6.61 and "6.43" in r110.label  # the mean of 5, and their best
  # scale=cpu keeps the shared proxy recipe's fixed warm-up (a sixth of the run) on every row.
  config, cpu = schedules("cpu")
  proxy = ml_collections.ConfigDict({"data": {}, "optim": {}, "schedule": {}})
  configs.digits_cpu(proxy)
  assert set(cpu.values()) == {(config.schedule.total // 6, None, proxy.optim.warmup_lr)}


def test_under_the_rule_the_optimizer_runs_the_schedule_after_the_warm_up():
  lr = train.learning_rate(ml_collections.ConfigDict(SGD), RULE_STEPS)
  # No fixed warm-up in it; the decay boundary stays at step 50.
  assert [float(lr(s)) for s in (0, 9, 10, 49, 50)] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])
  assert train.warmup_rule(ml_collections.ConfigDict(SGD), {**RULE_STEPS,
                                                            "warmup_until_error": None}) is None
  adamw = dict(name="adamw", lr=1e-3, weight_decay=0.1, scalar_lr=0.02)
  # AdamW's scalars at their own constant LR are outside any warm-up, this one included.
  assert train.warmup_rule(ml_collections.ConfigDict(adamw), RULE_STEPS).groups == ("weights",)
  assert _rule().groups == ("weights", "scalars")


class TinyNet(nnx.Module):
  """logits = x kernel + bias + gain * e_1 with x = 1: bias 200 on class 0 makes the softmax
  exactly one-hot in float32 (exp(-200) is 0), so the net predicts class 0 for many steps and the
  gradients are exact: kernel and bias get (1, -1, 0, 0) * (fraction of labels 1), gain minus it."""

  def __init__(self):
    bias = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[0].set(200.0)
    self.linear = nnx.Linear(1, 4, kernel_init=nnx.initializers.zeros, bias_init=bias,
                             rngs=nnx.Rngs(0))
    self.gain = shortcuts.ResidualScalar(jnp.zeros(()))

  def __call__(self, x, train=False):
    del train
    return self.linear(x) + self.gain * jax.nn.one_hot(1, 4)


class ScriptedTask:
  """Batches whose training error is scripted: ``errors[seed][step]`` % of the labels are 1, the
  rest 0, and TinyNet predicts 0. The batch is its labels; every input is 1."""

  kind, sequence, host_local_batches = "image", False, False
  num_classes, in_channels, train_size, test_size = 4, 1, 1024, 32

  def __init__(self, errors):
    self.errors = errors

  def device_arrays(self):
    return {}

  def train_batch(self, seed, step, batch_size):
    wrong = round(self.errors[seed][step] * batch_size / 100)
    return np.array([1] * wrong + [0] * (batch_size - wrong), np.int32)

  def train_inputs(self, arrays, labels, key):
    return jnp.ones(labels.shape + (1,), jnp.float32), labels

  def eval_batches(self, batch_size):
    yield np.zeros(batch_size, np.int32), np.ones(batch_size, bool)

  def eval_inputs(self, arrays, labels):
    return jnp.ones(labels.shape + (1,), jnp.float32), labels


def test_a_warming_replica_steps_at_warmup_lr_and_a_switched_one_at_the_schedule(monkeypatch):
  monkeypatch.setattr(train, "build_model", lambda config, task, seed: TinyNet())
  config = ml_collections.ConfigDict(dict(optim=SGD))
  # From r = 100 at tau=20 one batch gives r = 95 + e / 20: 98.75 at 75% error stays above 98,
  # 97.5 at 50% is below it. Both replicas take their first step in one vmapped program.
  rule = _rule(until_error=98.0)
  task = ScriptedTask({0: [75.0], 1: [50.0]})
  tx = train.make_optimizer(config, RULE_STEPS)
  graphdef, state = train.init_state(config, task, [0, 1], tx, rule)
  step_fn = jax.jit(jax.vmap(functools.partial(train.train_step, graphdef, tx, task, warmup=rule),
                             in_axes=(0, 0, 0, 0, None)))
  batch = np.stack([task.train_batch(s, 0, 32) for s in (0, 1)])
  keys = jnp.stack([train.stream_key(s, 1) for s in (0, 1)])
  new, _ = step_fn(state, train.new_window(2), batch, keys, task.device_arrays())
  assert [int(e) for e in new["warmup"]["end_step"]] == [-1, 0]
  for k, (lr, wrong) in enumerate([(0.01, 0.75), (0.1, 0.5)]):
    # Step 0 from kernel = gain = 0: momentum has nothing to carry and L2 nothing to decay, so
    # the update is -lr * gradient: rounded are lr, warmup_lr, their ratio, and two products.
    kernel = np.asarray(new["params"]["weights"]["linear"]["kernel"][k, 0], np.float64)
    expected = -lr * np.array([wrong, -wrong, 0.0, 0.0])
    np.testing.assert_allclose(kernel, expected, rtol=5 * U, atol=0)
    gain = float(new["params"]["scalars"]["gain"][k])  # the scalar group follows the rule too
    assert gain == pytest.approx(lr * wrong, rel=5 * U, abs=0)


# The same rule through train(): replica 0 sees 6.25% error (2 of 32) from the start, so
# r = 6.25 + 93.75 * 0.95^(k+1) after step k: 82.61 after step 3, 78.79 after step 4, the first
# below 80. Replica 1 sees 100% throughout and hits the cap, 6. Checkpoints every 3 steps: the
# resumed run stops mid-warm-up.
ERRORS = {0: [6.25] * 8, 1: [100.0] * 8}
ENDS = {0: 4, 1: 6}


def _rule_config(**schedule):
  c = ml_collections.ConfigDict(dict(
      batch_size=32, optim=SGD, log_every=1, eval_every=8, checkpoint_every=3, eval_batch_size=32,
      failure_error=100.0, schedule=dict(unit="iterations", total=8, boundaries=(7,), warmup=6,
                                         warmup_until_error=80.0)))
  c.schedule.update(schedule)
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def rule_runs(xla_cache, tmp_path_factory):
  root = tmp_path_factory.mktemp("warmup_rule")
  task = ScriptedTask(ERRORS)

  def run(name, seeds, **schedule):
    summaries, state = train.train(_rule_config(**schedule), str(root / name), seeds=seeds,
                                   task=task, progress=False)
    return summaries, jax.device_get(state)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "build_model", lambda config, task, seed: TinyNet())
    out = {"straight": run("straight", [0, 1]), "half": run("resumed", [0, 1], total=3),
           "resumed": run("resumed", [0, 1]),
           # A fixed warm-up of each replica's length: what the rule must reproduce.
           "fixed": [run(f"fixed{s}", [s], warmup=ENDS[s], warmup_until_error=None)
                     for s in (0, 1)]}
  out["root"] = root
  return out


def test_replicas_end_their_warm_up_independently_and_say_when(rule_runs):
  summaries, state = rule_runs["straight"]
  assert [int(e) for e in state["warmup"]["end_step"]] == [ENDS[0], ENDS[1]]
  assert [(s["warmup_end_step"], s["warmup_hit_cap"]) for s in summaries] == [(4, False), (6, True)]
  for seed in (0, 1):
    on_disk = json.loads((rule_runs["root"] / "straight" / f"seed{seed}" / "summary.json")
                         .read_text())
    assert on_disk["warmup_end_step"] == ENDS[seed]
    lines = [json.loads(s) for s in (rule_runs["root"] / "straight" / f"seed{seed}" /
                                     "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "train_loss" in m]
    # Logged every step: the line of step k holds step k-1's LR, at 0.1 / 10 from step 7 on.
    expected = [0.01 if k - 1 < ENDS[seed] else 0.1 if k - 1 < 7 else 0.01 for k in range(1, 9)]
    assert [m["lr"] for m in train_lines] == pytest.approx(expected, rel=1e-6)
    # The end step once, on the line of the step that ended it; the running error until then.
    assert [(m["step"], m["warmup_end_step"]) for m in train_lines
            if "warmup_end_step" in m] == [(ENDS[seed] + 1, ENDS[seed])]
    assert [m["step"] for m in train_lines if "warmup_error" in m] == list(range(1, ENDS[seed] + 2))


def test_resume_mid_warm_up_equals_an_uninterrupted_run(rule_runs):
  half, half_state = rule_runs["half"]
  # The first call stopped at step 3 with both replicas still warming up.
  assert [(s["steps"], s["warmup_end_step"]) for s in half] == [(3, None), (3, None)]
  assert [int(e) for e in half_state["warmup"]["end_step"]] == [-1, -1]
  straight, resumed = rule_runs["straight"], rule_runs["resumed"]
  assert [(s["warmup_end_step"], s["warmup_hit_cap"]) for s in resumed[0]] == [
      (4, False), (6, True)]
  a, b = _leaves(straight[1]), _leaves(resumed[1])
  assert len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes()
                                  for x, y in zip(a, b))
  for seed in (0, 1):
    pick = lambda run: [{k: v for k, v in m.items() if k != "examples_per_s"} for m in
                        map(json.loads, (rule_runs["root"] / run / f"seed{seed}" /
                                         "metrics.jsonl").read_text().splitlines())
                        if m["step"] > 3]
    assert pick("resumed") == pick("straight")


def test_the_rule_trains_as_a_fixed_warm_up_of_the_same_length(rule_runs):
  # Momentum, L2 on the weights and the scalar group included, the rule's run follows the fixed
  # warm-up's. They differ by rounding: per step, the factor and its product (2 U of the update,
  # at most the distance moved) and the sums p + update that then see different inputs (U |p|).
  # Over 8 steps that is at most 8 U (|p| + 2 |moved|); twice that for slack.
  _, state = rule_runs["straight"]
  init = _leaves(train.split_model(TinyNet())[1])  # gain; bias, kernel
  for k in (0, 1):
    _, fixed = rule_runs["fixed"][k]
    got, want = _leaves(train.replica(state["params"], k)), _leaves(fixed["params"])
    for g, w, w0 in zip(got, [w[0] for w in want], init):
      g, w = g.astype(np.float64), w.astype(np.float64)
      moved = np.abs(w - w0)
      assert np.max(moved) > 0.05  # not vacuous: these parameters moved
      assert np.all(np.abs(g - w) <= 16 * U * (np.abs(w) + 2 * moved)), (g, w)
