"""Scale-out facts in one process: seeds side by side, and a preempted run on a sharded mesh.

* num_seeds=3 trains three differently initialised replicas in one program, and each is bitwise
  the run of its seed in any place beside any other seeds;
* on 8 fake devices (data=2, fsdp=4), a run stopped and resumed ends bitwise equal to one never
  stopped;
(tests/test_multihost.py has the facts that need two processes.)
All train fig2's ResNet at scale=test, shrunk to depth 8 and widths 8/16/32.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from resjax import tasks, train

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.model.depth=8", "--config.model.widths=(8,16,32)", "--config.failure_error=100"]


def _fig2_identity(**changes):
  import importlib.util
  spec = importlib.util.spec_from_file_location("fig2", REPO / "experiments" / "resnetv2_fig2.py")
  fig2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fig2)
  from resjax import configs
  config = fig2.get_config("scale=test")
  (run,) = [r for r in config.runs if r.name == "identity"]
  config = configs.run_config(config, run)
  config.model.depth, config.model.widths = 8, (8, 16, 32)
  config.schedule.total = 4
  config.eval_every = config.checkpoint_every = 4
  for k, v in changes.items():
    config[k] = v
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)
          if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


# ------------------------------------------------------------------------ seeds side by side


@pytest.fixture(scope="module")
def side_by_side(xla_cache, tmp_path_factory):
  config = _fig2_identity()
  task = tasks.load(config)
  root = tmp_path_factory.mktemp("seeds")
  together, state = train.train(config, str(root / "together"), seeds=[0, 1, 2], task=task,
                                progress=False)
  # Seed 1 again, first now, beside two other seeds: the same compiled program (3 replicas).
  moved, moved_state = train.train(config, str(root / "moved"), seeds=[1, 3, 4], task=task,
                                   progress=False)
  return together, jax.device_get(state), moved, jax.device_get(moved_state)


def test_three_seeds_side_by_side_start_from_three_different_initialisations(side_by_side):
  config = _fig2_identity()
  task = tasks.load(config)
  tx = train.make_optimizer(config, {"total": 4, "warmup": 1, "boundaries": [3]})
  _, state = train.init_state(config, task, [0, 1, 2], tx)
  kernels = jax.device_get(state["params"]["weights"]["stem"]["kernel"])
  assert kernels.shape[0] == 3
  for i in range(3):
    for j in range(i):
      assert not np.allclose(kernels[i], kernels[j])


def test_each_replica_is_its_seed_run_in_any_place_beside_any_seeds(side_by_side):
  together, state, moved, moved_state = side_by_side
  assert [s["seed"] for s in together] == [0, 1, 2] and [s["seed"] for s in moved] == [1, 3, 4]
  replica = _leaves(train.replica(state, 1))
  again = _leaves(train.replica(moved_state, 0))
  other = _leaves(train.replica(state, 0))
  # Bitwise: one compiled program, in which no op mixes replicas, runs seed 1's slice through the
  # same operations on the same values, second beside seeds 0 and 2 or first beside 3 and 4.
  # Anything that leaks between replicas (a shared BN statistic or gradient, a data or dropout
  # stream drawn by place rather than by seed) changes it. (A run of seed 1 alone is another
  # program, vmapped over 1 replica, so it would agree only to rounding.)
  assert len(replica) == len(again) > 50
  for a, b in zip(replica, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(replica, other))
  for key in ("test_loss", "test_error"):
    assert together[1]["final"][key] == moved[0]["final"][key]


# ------------------------------------------------- a preempted run on 8 fake devices, resumed

RESUME_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
from test_scale_out import _fig2_identity, _leaves
from resjax import tasks, train
assert jax.device_count() == 8
root = sys.argv[1]
mesh = (("data", 2), ("fsdp", 4), ("model", 1))
config = _fig2_identity(mesh=mesh, fsdp_min_size=64)
task = tasks.load(config)
# Bitwise by construction: the step's program does not depend on schedule.total under a step decay
# (fixed boundaries), so the straight and the resumed runs run one compiled step on the same
# batches, and a checkpoint restores the state exactly.
assert config.optim.decay == "step"
config.schedule.total = 6
_, straight = train.train(config, root + "/straight", seeds=[0], task=task, progress=False)
config.schedule.total = 3
train.train(config, root + "/resumed", seeds=[0], task=task, progress=False)
config.schedule.total = 6
summaries, resumed = train.train(config, root + "/resumed", seeds=[0], task=task, progress=False)
kernel = straight["params"]["weights"]["stages"][2]["first"]["convs"][0]["kernel"]
print(json.dumps({
    "steps": summaries[0]["steps"],
    "sharded": str(kernel.sharding.spec),
    "equal": all(np.array_equal(a, b) for a, b in zip(_leaves(jax.device_get(straight)),
                                                       _leaves(jax.device_get(resumed)))),
}))
"""


def test_preempted_run_on_a_sharded_mesh_resumes_to_the_uninterrupted_result(tmp_path):
  # The three runs compile one step: the first writes it to an XLA cache the other two read.
  # LLVM's -O0 (as test_sharding): a third of the compile time, and the same HLO for all three.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  result = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), str(REPO / "tests")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["steps"] == 6
  assert "fsdp" in out["sharded"]  # the big kernels really are split over the fsdp axis
  assert out["equal"]
