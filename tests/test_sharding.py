"""Tests for resjax.sharding: the mesh, the parameter rules, and sharded steps equal to one device's.

The rules and mesh sizes are pure functions, tested here in-process. Everything that needs several
devices runs once, in a subprocess of this same file with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8`` only counts if set before JAX starts its backend, and
other test files start it in the pytest process with one device). That subprocess trains a small ResNet with the trainer's real
``train_step`` three times from the same state: on one device, data-parallel (data=8) and FSDP
(data=2, fsdp=4). It writes every state and a few facts to a directory the tests below read.

Tolerance for sharded vs single-device float32 results: every element within TOL of the array's
largest magnitude. The sharded step sums the loss, the gradients and the BatchNorm moments in
another order (per-device partial sums, then an all-reduce), so results agree to float32 rounding of
the sums' scale (conftest.f32_tol), not bitwise and not element-wise relative: a momentum entry that
is a near-cancelling sum of O(1) gradients differs by 1e-6 absolute, which can be 1e-4 of itself.
The longest sums are over the batch's 16 x 8 x 8 positions (BN moments, kernel gradients), through
8 layers forward and 8 back: TOL = 1.2e-4. Measured here: at most 1.2e-6 of an array's scale after
three steps (2.2e-6 at depth 14, with a scanned unit). Anything wrong in the sharding (a batch split
the wrong way, BatchNorm over one shard, an update from one shard's gradient) moves values by 1e-2
of their scale or more.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import f32_tol
from resjax import sharding
from resjax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
FIG2 = REPO / "experiments" / "resnetv2_fig2.py"
NUM_DEVICES = 8
BATCH = 16
STEPS = 3
TOL = f32_tol(terms=BATCH * 8 * 8, depth=2 * 8)  # times the array's largest magnitude


def _small_config(depth=8):
  """fig2 at scale=test (digits 8x8x1, pad-1 crops, warm-up LR 0.01 then 0.1), a smaller ResNet."""
  from resjax import configs
  spec = importlib.util.spec_from_file_location("resnetv2_fig2", FIG2)
  fig2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fig2)
  c = fig2.get_config("scale=test")
  c = configs.run_config(c, c.runs[0])
  c.model.depth = depth  # 8: one unit per stage; 14 adds a scanned unit (passes, ~50% slower)
  c.model.widths = (8, 16, 32)
  c.model.conv_impl = "xla"  # what GPUs and TPUs run; on CPU it also compiles faster than im2col
  c.model.shortcut.option = "B"  # projections: their kernels and BN statistics get sharded too
  c.batch_size = BATCH
  return c


# ------------------------------------------------------------------------------ mesh sizes


def test_mesh_shape_fills_minus_one():
  assert sharding.mesh_shape(sharding.DEFAULT_MESH, 8) == {"data": 8, "fsdp": 1, "model": 1}
  assert sharding.mesh_shape((("data", 2), ("fsdp", -1)), 8) == {"data": 2, "fsdp": 4}
  assert sharding.mesh_shape({"data": -1, "model": 2}, 8) == {"data": 4, "model": 2}
  assert sharding.mesh_shape((("data", 1),), 1) == {"data": 1}


@pytest.mark.parametrize("mesh_cfg, count, says", [
    ((("data", 3), ("fsdp", -1)), 8, "does not divide 8"),
    ((("data", 4), ("fsdp", 1)), 8, "asks for 4 devices but there are 8"),
    ((("data", -1), ("fsdp", -1)), 8, "at most one axis"),
    ((("data", 0),), 8, "positive int"),
    ((("data", 2), ("data", 4)), 8, "distinct"),
    (("data", 8), 8, "pairs"),
])
def test_mesh_shape_errors(mesh_cfg, count, says):
  with pytest.raises(ConfigError, match=says):
    sharding.mesh_shape(mesh_cfg, count)


def test_make_mesh_on_this_process_devices():
  mesh = sharding.make_mesh(sharding.DEFAULT_MESH)
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert mesh.devices.size == len(jax.devices())
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


# ------------------------------------------------------------------------------ rules

SIZES = {"data": 2, "fsdp": 4}


def _spec(name, shape, rules, min_size=1):
  return sharding.param_spec(name, shape, rules, SIZES, fsdp_min_size=min_size)


def test_first_matching_rule_wins():
  rules = [(r"head/kernel$", "replicate"), (r"kernel$", P(None, "data")), (r".*", "fsdp")]
  assert _spec("weights/head/kernel", (32, 8), rules) == P()
  assert _spec("weights/stem/kernel", (32, 8), rules) == P(None, "data")
  assert _spec("weights/stem_norm/scale", (32,), rules) == P("fsdp")
  # No match: replicated.
  assert _spec("weights/stem/kernel", (32, 8), [(r"^scalars/", "fsdp")]) == P()


def test_fsdp_picks_largest_divisible_dimension():
  # 3x3x12x10 conv: 12 is the only dimension 4 divides (10 is larger than 3 but not divisible).
  assert _spec("k", (3, 3, 12, 10), [("", "fsdp")]) == P(None, None, "fsdp", None)
  # 3x3x16x32: both divisible, the larger (output features) wins.
  assert _spec("k", (3, 3, 16, 32), [("", "fsdp")]) == P(None, None, None, "fsdp")
  # 3x3x32x16: the larger is now the input features.
  assert _spec("k", (3, 3, 32, 16), [("", "fsdp")]) == P(None, None, "fsdp", None)
  # A tie goes to the later dimension.
  assert _spec("k", (16, 16), [("", "fsdp")]) == P(None, "fsdp")
  # Nothing divisible by 4, a scalar, or a dimension smaller than the axis: replicated.
  assert _spec("k", (3, 5, 7), [("", "fsdp")]) == P()
  assert _spec("k", (), [("", "fsdp")]) == P()
  assert _spec("k", (2, 2), [("", "fsdp")]) == P()


def test_fsdp_replicates_small_arrays_and_without_fsdp_axis():
  rules = [("", "fsdp")]
  assert sharding.param_spec("k", (3, 3, 16, 32), rules, SIZES, fsdp_min_size=4608) == \
      P(None, None, None, "fsdp")
  assert sharding.param_spec("k", (3, 3, 16, 32), rules, SIZES, fsdp_min_size=4609) == P()
  assert sharding.param_spec("k", (64, 64), rules, {"data": 8}, fsdp_min_size=1) == P()
  assert sharding.param_spec("k", (64, 64), rules, {"data": 2, "fsdp": 1}, fsdp_min_size=1) == P()


@pytest.mark.parametrize("rules, says", [
    ([("kernel", "shard_everything")], "unknown sharding rule"),
    ([("kernel[", "fsdp")], "regex"),
    ([("kernel", P(None, None, "fsdp"))], "3 entries but the array has 2"),
    ([("kernel", P("model"))], "lacks"),
    ([("kernel", P(None, "fsdp"))], "does not divide"),
    (["kernel"], "pair"),
])
def test_bad_rules_are_config_errors(rules, says):
  with pytest.raises(ConfigError, match=says):
    sharding.param_spec("weights/head/kernel", (32, 10), rules, SIZES)


@functools.cache
def _abstract_state(replicas=2):
  """The trainer's real state structure ({step, params, rest, opt}), as shapes only."""
  from resjax import configs, tasks, train
  c = _small_config(depth=14)  # shapes only: cheap, and it has scanned (stacked) units
  task = tasks.load(c)
  tx = train.make_optimizer(c, configs.schedule_steps(c, task.train_size))
  return jax.eval_shape(lambda: train.init_state(c, task, list(range(replicas)), tx)[1])


def _named_leaves(tree):
  return {sharding.path_str(sharding.path_names(p)): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))}


def test_state_specs_opt_follows_params_rest_replicated():
  state = _abstract_state()
  specs = _named_leaves(sharding.state_specs(state, SIZES, fsdp_min_size=256, replica_axis=True))
  shapes = _named_leaves(state)
  params = {k[len("params/"):]: v for k, v in specs.items() if k.startswith("params/")}
  sharded = [k for k, v in params.items() if "fsdp" in v]
  assert "weights/head/kernel" in sharded and "weights/stages/2/rest/convs/1/kernel" in sharded
  # The replica axis (leading) is never split; the rest of the spec is the rule's on one replica.
  assert params["weights/head/kernel"] == P(None, "fsdp", None)  # [R, 32, 10]
  assert params["weights/stages/2/rest/convs/1/kernel"] == P(None, None, None, None, None, "fsdp")
  assert params["weights/head/bias"] == P(None)  # 10 elements < 256
  # Every momentum trace has exactly its parameter's spec, and there is one per parameter.
  traces = {k: v for k, v in specs.items() if k.startswith("opt/") and "/trace/" in k}
  assert len(traces) == len(params)
  for k, v in traces.items():
    param = k.split("/trace/", 1)[1]
    assert v == params[param], k
    assert shapes["opt/" + k[4:]].shape == shapes["params/" + param].shape
  # Counters, step, BatchNorm statistics: replicated.
  others = {k: v for k, v in specs.items() if not k.startswith("params/") and k not in traces}
  assert any(k.startswith("rest/") and k.endswith("/mean") for k in others)
  assert all(v == P() for v in others.values()), others


def test_opt_state_follows_params_by_path_not_only_shape():
  """Two parameters of one shape with different rules: each optimizer leaf takes its own's."""
  import optax
  params = {"weights": {"a": np.zeros((8, 16), np.float32), "b": np.zeros((8, 16), np.float32)}}
  opt = optax.adam(1e-3).init(params)
  state = {"step": np.zeros((), np.int32), "params": params, "opt": opt}
  rules = [("weights/a$", P("fsdp", None)), ("weights/b$", P(None, "fsdp"))]
  specs = _named_leaves(sharding.state_specs(state, SIZES, rules))
  assert specs["opt/0/mu/weights/a"] == specs["opt/0/nu/weights/a"] == P("fsdp", None)
  assert specs["opt/0/mu/weights/b"] == specs["opt/0/nu/weights/b"] == P(None, "fsdp")
  assert specs["opt/0/count"] == P()


def test_batch_size_must_split_over_data_parallel_devices():
  mesh = sharding.make_mesh((("data", -1),))
  sharding.check_batch_size(len(jax.devices()) * 4, mesh)  # no error
  assert sharding.batch_spec(mesh) == P(("data",))
  assert sharding.batch_spec(mesh, replica_axis=True) == P(None, ("data",))


# ------------------------------------------------------------------------------ 8 fake devices


def _state_arrays(state) -> dict[str, np.ndarray]:
  out = {}
  for p, x in jax.tree_util.tree_leaves_with_path(state):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out[sharding.path_str(sharding.path_names(p))] = np.asarray(jax.device_get(x))
  return out


def _multi_device_main(out_dir: str) -> None:
  """The subprocess: 8 CPU devices. Writes facts.json and one .npz of final states per run."""
  import jax.numpy as jnp
  from flax import nnx

  from resjax import configs, tasks, train

  facts: dict = {"devices": jax.device_count()}
  assert jax.device_count() == NUM_DEVICES, jax.devices()

  # Meshes on real devices.
  facts["mesh_default"] = dict(sharding.make_mesh(sharding.DEFAULT_MESH).shape)
  facts["mesh_fsdp"] = dict(sharding.make_mesh((("data", 2), ("fsdp", -1), ("model", 1))).shape)
  try:
    sharding.make_mesh((("data", 3), ("fsdp", -1)))
    facts["mesh_error"] = None
  except ConfigError as e:
    facts["mesh_error"] = str(e)

  c = _small_config()
  task = tasks.load(c)
  tx = train.make_optimizer(c, configs.schedule_steps(c, task.train_size))
  seeds = [0]
  graphdef, state0 = train.init_state(c, task, seeds, tx)
  state0 = jax.device_get(state0)  # host copy: every run starts from it (the steps donate)
  aug_keys = jnp.stack([jax.random.fold_in(train.key(s), 1) for s in seeds])
  batches = [np.stack([task.train_batch(s, step, BATCH) for s in seeds]) for step in range(STEPS)]
  # The trainer's step: one replica's train_step, vmapped over replicas, state donated.
  replica_step = jax.vmap(functools.partial(train.train_step, graphdef, tx, task),
                          in_axes=(0, 0, 0, 0, None))

  single_step = jax.jit(replica_step, donate_argnums=(0, 1))  # one device, no shardings at all

  def run(name, mesh_cfg=None, batches=batches, save=True):
    arrays = task.device_arrays()
    state, window = jax.device_put(state0), train.new_window(len(seeds))
    step_fn, aug = single_step, aug_keys
    if mesh_cfg is not None:
      mesh = sharding.make_mesh(mesh_cfg)
      state_sh = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES, fsdp_min_size=256,
                                          replica_axis=True)
      batch_sh = sharding.batch_sharding(mesh, replica_axis=True)
      repl = sharding.replicated(mesh)
      step_fn = jax.jit(replica_step, in_shardings=(state_sh, repl, batch_sh, repl, repl),
                        out_shardings=(state_sh, repl), donate_argnums=(0, 1))
      state = sharding.put_global(state, state_sh)
      window = sharding.put_global(window, repl)
      arrays = sharding.put_replicated(arrays, mesh)
      aug = sharding.put_global(aug_keys, repl)
    losses = []
    for step, idx in enumerate(batches):
      batch = idx
      if mesh_cfg is not None:
        batch = sharding.put_global(idx, batch_sh)
        facts.setdefault(f"{name}_batch_shard_rows", [
            s.data.shape[1] for s in batch.addressable_shards])
      old = state
      state, window = step_fn(state, window, batch, aug, arrays)
      facts.setdefault(f"{name}_donated", bool(jax.tree.leaves(old["params"])[0].is_deleted()))
      losses.append(float(window["loss"][0]))  # cumulative: loss x batch size, summed
      if step == 0 and save:
        np.savez(os.path.join(out_dir, f"{name}_step1.npz"), **_state_arrays(state))
    facts[f"{name}_losses"] = losses
    if mesh_cfg is not None:
      kernel = state["params"]["weights"]["stages"][2]["first"]["convs"][1]["kernel"][...]
      facts[f"{name}_kernel_spec"] = str(kernel.sharding.spec)
      facts[f"{name}_kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
      facts[f"{name}_num_sharded_params"] = sum(
          any(a is not None for a in x.sharding.spec) for x in jax.tree.leaves(state["params"]))
    if save:
      np.savez(os.path.join(out_dir, f"{name}.npz"), **_state_arrays(state))
    return state

  run("single")
  run("dp", (("data", NUM_DEVICES), ("fsdp", 1), ("model", 1)))
  run("fsdp", (("data", 2), ("fsdp", 4), ("model", 1)))

  # BatchNorm statistics of the first step's augmented batch: all 16 rows (which must give the
  # train step's own), and each data shard's 2 rows alone (tiled 8 times: the same moments).
  def batch_stats(params, rest, x):
    model = nnx.merge(graphdef, params["scalars"], params["weights"], rest, copy=True)
    model(x, train=True)
    return nnx.split(model, *train.FILTERS)[3]

  first = jax.tree.map(lambda a: a[0], jax.device_put(state0))
  x, _ = task.train_inputs(task.device_arrays(), batches[0][0],
                           jax.random.fold_in(aug_keys[0], 0))
  stats_fn = jax.jit(functools.partial(batch_stats, first["params"], first["rest"]))
  rows = BATCH // NUM_DEVICES
  np.savez(os.path.join(out_dir, "forward_full.npz"), **_state_arrays(stats_fn(x)))
  shards = {}
  for k in range(NUM_DEVICES):
    tiled = jnp.tile(x[k * rows:(k + 1) * rows], (NUM_DEVICES, 1, 1, 1))
    shards.update({f"{k}/{name}": v for name, v in _state_arrays(stats_fn(tiled)).items()})
  np.savez(os.path.join(out_dir, "forward_shards.npz"), **shards)

  # A batch gathered from replicated data inside a jitted, replica-vmapped function and constrained
  # there keeps the batch sharding (batch axis 1, after the replica axis).
  mesh = sharding.make_mesh(sharding.DEFAULT_MESH)
  images = sharding.put_replicated(np.arange(64 * 3, dtype=np.float32).reshape(64, 3), mesh)
  idx = sharding.put_global(np.arange(2 * BATCH, dtype=np.int32).reshape(2, BATCH) % 64,
                            sharding.replicated(mesh))
  gathered = jax.jit(jax.vmap(lambda i: sharding.constrain_batch(images[i], mesh)))(idx)
  facts["constrained_is_batch_sharded"] = gathered.sharding.is_equivalent_to(
      sharding.batch_sharding(mesh, replica_axis=True), gathered.ndim)
  facts["constrained_shard_shapes"] = sorted({s.data.shape for s in gathered.addressable_shards})
  facts["constrained_values_ok"] = bool(np.array_equal(
      np.asarray(gathered), np.asarray(images)[np.asarray(idx)]))

  # Host placement and fetching on the 8-device mesh (one process: each process's rows are all).
  host_rows = np.arange(3 * BATCH * 2, dtype=np.int32).reshape(3, BATCH, 2)
  batch_sh = sharding.batch_sharding(mesh, replica_axis=True)
  local = sharding.put_process_local(host_rows, batch_sh)
  whole = sharding.put_global(host_rows, batch_sh)
  facts["process_local_equals_global"] = bool(
      local.sharding.is_equivalent_to(whole.sharding, 3) and np.array_equal(local, whole))
  facts["device0_rows"] = np.asarray(whole.addressable_shards[0].data)[0, :, 0].tolist()
  facts["to_host_ok"] = bool(
      np.array_equal(sharding.to_host(whole), host_rows) and
      np.array_equal(sharding.to_host(sharding.put_replicated(host_rows, mesh)), host_rows))
  try:
    sharding.check_batch_size(12, mesh)
    facts["batch_error"] = None
  except ConfigError as e:
    facts["batch_error"] = str(e)

  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f, indent=1)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding8")
  env = {**os.environ,
         # LLVM's -O0: a third of the compile time, and the same HLO (so the same float32 sums).
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                       f" --xla_force_host_platform_device_count={NUM_DEVICES}"
                       " --xla_backend_optimization_level=0").strip(),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  facts = json.loads((out / "facts.json").read_text())
  states = {path.stem: dict(np.load(path)) for path in out.glob("*.npz")}
  return facts, states


def test_make_mesh_on_8_devices(multi):
  facts, _ = multi
  assert facts["devices"] == NUM_DEVICES
  assert facts["mesh_default"] == {"data": 8, "fsdp": 1, "model": 1}
  assert facts["mesh_fsdp"] == {"data": 2, "fsdp": 4, "model": 1}
  assert "does not divide 8" in facts["mesh_error"]


def _assert_close(got, want, name=""):
  scale = float(np.max(np.abs(want), initial=0.0))
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL * scale, err_msg=name)


def _assert_states_close(got, want, keys):
  assert sorted(got) == sorted(want)
  for k in keys:
    _assert_close(got[k], want[k], k)


@pytest.mark.parametrize("run", ["dp", "fsdp"])
def test_sharded_steps_equal_single_device(multi, run):
  facts, states = multi
  single, got = states["single"], states[run]
  # Sums of cross-entropies, each moved by at most 2 max|d logit|, with logits no larger than it.
  np.testing.assert_allclose(facts[f"{run}_losses"], facts["single_losses"], rtol=2 * TOL)
  # Parameters, momentum traces, BatchNorm running statistics and the step, after 3 steps.
  _assert_states_close(got, single, single.keys())
  assert int(got["step"][0]) == STEPS
  # The step moved the parameters (else equality would prove nothing).
  assert facts["single_losses"][0] > 0
  # Each device got its own rows: 16 over 8 data shards, or over 2 x 4 (data, fsdp).
  assert facts[f"{run}_batch_shard_rows"] == [BATCH // NUM_DEVICES] * NUM_DEVICES
  assert facts[f"{run}_donated"]


def test_fsdp_step_keeps_parameters_sharded(multi):
  facts, _ = multi
  # stages/2/first/convs/1/kernel is [1, 3, 3, 32, 32]: split on its output features over fsdp=4.
  assert facts["fsdp_kernel_spec"] == str(P(None, None, None, None, "fsdp"))
  assert facts["fsdp_kernel_shard_shape"] == [1, 3, 3, 32, 8]
  # Of >= 256 elements: six 3x3 kernels of stages 0-2, stage 2's projection, the head's kernel.
  assert facts["fsdp_num_sharded_params"] == 8
  assert facts["dp_num_sharded_params"] == 0  # fsdp=1: pure data parallelism replicates


def test_batchnorm_statistics_are_over_the_global_batch(multi):
  _, states = multi
  full = states["single_step1"]
  stats = [k for k in full if k.startswith("rest/") and k.endswith(("/mean", "/var"))]
  assert len(stats) == 18  # mean and var of 9 BatchNorms: stem, 2 per unit, 2 projections
  # After one step the sharded runs' running statistics equal those of one device on all 16 rows.
  for run in ("dp", "fsdp"):
    _assert_states_close(states[f"{run}_step1"], full, stats)
  # The model's forward on the step's 16 augmented rows reproduces them; on any one data shard's
  # 2 rows it does not (momentum 0.9: the step moves them by 0.1 x the batch moments).
  forward, shards = states["forward_full"], states["forward_shards"]
  for name in stats:
    _assert_close(forward[name[5:]][None], full[name], name)
  for k in range(NUM_DEVICES):
    worst = max(np.max(np.abs(shards[f"{k}/{name[5:]}"] - forward[name[5:]])) for name in stats)
    assert worst > 1e-2, (k, worst)


def test_host_values_to_global_arrays_and_back(multi):
  facts, _ = multi
  assert facts["process_local_equals_global"]
  # Device 0 holds rows 0 and 1 of the batch axis (axis 1), whose first entries are 0 and 2.
  assert facts["device0_rows"] == [0, 2]
  assert facts["to_host_ok"]
  assert "config.batch_size=12 does not split over the 8 data-parallel devices" in facts["batch_error"]


def test_constrained_gather_is_batch_sharded(multi):
  facts, _ = multi
  assert facts["constrained_values_ok"]
  assert facts["constrained_is_batch_sharded"]
  assert facts["constrained_shard_shapes"] == [[2, BATCH // NUM_DEVICES, 3]]


if __name__ == "__main__":
  _multi_device_main(sys.argv[1])
