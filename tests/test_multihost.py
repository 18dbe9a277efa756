"""Facts that need two processes (jax.distributed on CPU, one device each, a local coordinator).

* two processes end with bitwise the parameters and metrics of one process with two devices;
* SIGTERM (or Ctrl-C) to one of two processes stops both at one step, which both save, and the rerun
  ends bitwise equal to a run never stopped.
All train fig2's ResNet at scale=test, shrunk to depth 8 and widths 8/16/32 (test_scale_out.SMALL).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np

from test_scale_out import SMALL, _leaves

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every process here, and the one-process reference, compiles with LLVM's -O0 (as test_sharding):
# a third of the compile time, and one program for all of them, so bitwise comparisons hold.
O0 = "--xla_backend_optimization_level=0"
TWO_PROCESSES = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": O0}
ONE_WITH_TWO_DEVICES = {"JAX_PLATFORMS": "cpu",
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {O0}"}


# ------------------------------------------------------------------------- two processes


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _restore(path):
  import orbax.checkpoint as ocp
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    return c.restore(path, target)


def _metrics(run_dir):
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "examples_per_s"} for line in lines]


def test_two_processes_train_to_the_parameters_of_one_process_with_two_devices(cli, tmp_path):
  args = ["--config", "experiments/resnetv2_fig2.py:scale=test,run=identity", *SMALL,
          "--config.schedule.total=6"]  # the checkpoint below is step 6's
  env = {**cli.env, **TWO_PROCESSES}
  port = _free_port()
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        cli.argv(*args, "--workdir", tmp_path / "two", "--multihost",
                 "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", i),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  one = cli.run(*args, "--workdir", tmp_path / "one", timeout=600,
                env=ONE_WITH_TWO_DEVICES)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert one.returncode == 0, one.stderr
  # Only process 0 writes the report and the logs.
  assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]
  two_run, one_run = tmp_path / "two" / "identity", tmp_path / "one" / "identity"
  # Metrics and parameters bitwise, by construction: both run one SPMD program partitioned over 2
  # devices, compiled for this CPU, with the same per-device shapes; the only sums across devices
  # are all-reduces of 2 operands, a + b, which no order or transport changes.
  assert _metrics(two_run / "seed0") == _metrics(one_run / "seed0")
  a = _restore(two_run / "ckpt" / "seeds_0" / "6" / "default")
  b = _restore(one_run / "ckpt" / "seeds_0" / "6" / "default")
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb) > 50
  assert all(np.array_equal(x, y) for x, y in zip(la, lb))


# --------------------------------------------- two processes, SIGTERM to one: both stop at one step


def _two_processes(cli, args, workdir, port, out_dir):
  env = {**cli.env, **TWO_PROCESSES}
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        cli.argv(*args, "--workdir", workdir, "--multihost", "--coordinator", f"localhost:{port}",
                 "--num_processes", "2", "--process_id", i),
        cwd=REPO, env=env, stdout=open(out_dir / f"out{i}", "w"),
        stderr=open(out_dir / f"err{i}", "w"), text=True))
  return procs


def _finish(procs, timeout):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(cli, tmp_path):
  import time
  args = ["--config", "experiments/resnetv2_fig2.py:scale=test,run=identity", *SMALL,
          "--config.checkpoint_every=1000000", "--config.eval_every=1000000"]
  workdir = tmp_path / "two"
  metrics = workdir / "identity" / "seed0" / "metrics.jsonl"
  (tmp_path / "first").mkdir()
  procs = _two_processes(cli, [*args, "--config.schedule.total=100000"], workdir, _free_port(),
                         tmp_path / "first")
  try:
    deadline = time.time() + 400
    while not (metrics.exists() and metrics.read_text().strip()):
      assert time.time() < deadline and all(p.poll() is None for p in procs), \
          (tmp_path / "first" / "err0").read_text()
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 hears of it from JAX
  finally:
    codes = _finish(procs, 300)
  errs = [(tmp_path / "first" / f"err{i}").read_text() for i in range(2)]
  assert codes == [143, 143], errs
  assert not any("Traceback" in e for e in errs)
  summary = json.loads((workdir / "identity" / "seed0" / "summary.json").read_text())
  stopped = summary["steps"]
  assert summary["status"] == "preempted" and 1 <= stopped < 100000
  assert f"at step {stopped}; rerun" in summary["reason"]
  # Both processes reported the same step, and both wrote their part of that one checkpoint.
  for i in range(2):
    out = (tmp_path / "first" / f"out{i}").read_text()
    assert "identity seed0: preempted, stopped by a preemption notice" in out
    assert f"at step {stopped}; rerun" in out
  step_dir = workdir / "identity" / "ckpt" / "seeds_0" / str(stopped)
  assert sorted(os.listdir(step_dir.parent)) == [str(stopped)]
  assert sorted(p.name for p in (step_dir / "default").glob("ocdbt.process_*")) == [
      "ocdbt.process_0", "ocdbt.process_1"]

  # The rerun resumes; beside it, one process with two devices trains the same steps unstopped.
  (tmp_path / "second").mkdir()
  end = [f"--config.schedule.total={stopped + 2}"]
  procs = _two_processes(cli, [*args, *end], workdir, _free_port(), tmp_path / "second")
  one = cli.run(*args, *end, "--workdir", tmp_path / "one", timeout=600,
                env=ONE_WITH_TWO_DEVICES)
  codes = _finish(procs, 600)
  assert codes == [0, 0], [(tmp_path / "second" / f"err{i}").read_text() for i in range(2)]
  assert one.returncode == 0, one.stderr
  # Bitwise, by construction: the step decays at fixed boundaries, so schedule.total does not
  # enter the step's program; the resumed and the unstopped run both run that one SPMD program over
  # 2 devices (the two-process test above shows two processes and one with two devices agree
  # bitwise), on the same batches, and the checkpoint restores the state and the open log window
  # exactly.
  a = _restore(workdir / "identity" / "ckpt" / "seeds_0" / str(stopped + 2) / "default")
  b = _restore(tmp_path / "one" / "identity" / "ckpt" / "seeds_0" / str(stopped + 2) / "default")
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb) > 50
  assert all(np.array_equal(x, y) for x, y in zip(la, lb))
  last = lambda run: [m for m in _metrics(run) if m["step"] == stopped + 2]
  assert last(workdir / "identity" / "seed0") == last(tmp_path / "one" / "identity" / "seed0")


CTRL_C_SCRIPT = r"""
import os, sys, time
import jax
import orbax.checkpoint as ocp
process, port, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process)
from resjax import train

class Manager:  # the one call of a CheckpointManager that train.stop_requested makes
  reached_preemption = staticmethod(ocp.multihost.reached_preemption)

step = 0
with train.stop_signals_save(2):
  open(ready + str(process), "w").close()
  while step < 100000:
    step += 1
    time.sleep(0.01 * (1 + process))  # the hosts run at different speeds
    if train.stop_requested(Manager(), step, 2):
      break
print(step, train.Preemption.signal)
"""


def test_ctrl_c_on_one_of_two_processes_stops_both_at_one_step(tmp_path):
  """SIGINT is no signal JAX's preemption service hears: train passes it on as SIGTERM."""
  import time
  port, ready = str(_free_port()), str(tmp_path / "ready")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(i), port, ready],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    deadline = time.time() + 120
    while not all(os.path.exists(ready + str(i)) for i in range(2)):
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.1)
    time.sleep(1)
    procs[0].send_signal(signal.SIGINT)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    _finish(procs, 1)
  assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
  (step0, signal0), (step1, signal1) = [out.split() for out, _ in outs]
  assert step0 == step1 and int(step0) < 100000  # both stopped, at the one step they agreed on
  assert (signal0, signal1) == ("SIGINT", "None")
