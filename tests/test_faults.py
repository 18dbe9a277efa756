"""Faults that must lose nothing: each is made to happen, and the run or its record is checked.

* a run that dies after its final checkpoint, before summary.json, comes back with its last train
  window and the wall time of both sessions;
* a line of metrics.jsonl torn by kill -9 is ended before the next record, and the logs are strict
  JSON;
* a run stopped mid log window logs, after its resume, the value of a run never stopped;
* a workdir in use is refused, a stale lock recovered, and the lock released on every exit;
* a corrupt newest checkpoint is set aside and the run resumes from the step before;
* SIGTERM saves and exits 143, Ctrl-C saves and exits 130, and the rerun resumes.
* a disk that fills up stops the run before a checkpoint it cannot hold, in one line, exit 2;
  the last checkpoint is kept and, with space freed, the rerun resumes.
In-process runs train fig2's identity row at scale=test (ResNet-14 on digits, 6 steps); the
command lines (SIGTERM, Ctrl-C, a workdir in use) train it too, and compile it once between them
through the session's XLA cache.
"""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess

import jax
import numpy as np
import pytest

from resjax import fileio, report, tasks, train
from resjax.errors import CheckpointError
from test_train import _bitwise_differences, _fig2_row, _read_json, _read_jsonl, _wait_for


@pytest.fixture(scope="module")
def row(xla_cache):
  """fig2's identity row as test_train trains it: 6 steps, logs every 2, checkpoints every 3."""
  config = _fig2_row("scale=test", "identity")
  config.schedule.update(total=6, boundaries=(4,), warmup=2)
  config.optim.update(lr=0.1, warmup_lr=0.01)
  config.log_every, config.eval_every, config.checkpoint_every = 2, 3, 3
  config.failure_error = 100.0
  task = tasks.load(config)
  return config, task, task.device_arrays()


def _train(row, group_dir, total=6):
  config, task, arrays = row
  c = copy.deepcopy(config)
  c.schedule.total = total
  (summary,), state = train.train(c, str(group_dir), seeds=[0], task=task, arrays=arrays,
                                  progress=False)
  return summary, jax.device_get(train.replica(state, 0))


@pytest.fixture(scope="module")
def straight(row, tmp_path_factory):
  """6 steps never stopped: checkpoints at 3 and 6."""
  group = tmp_path_factory.mktemp("straight") / "identity"
  summary, state = _train(row, group)
  return group, summary, state


def _copy(group, tmp_path):
  """The straight run's directory, as a run that died before its summary would leave it."""
  dest = tmp_path / "identity"
  shutil.copytree(group, dest)
  os.remove(dest / "seed0" / "summary.json")
  return dest


# --------------------------------------------------------------------- a: the final summary


def test_a_run_dead_before_its_summary_keeps_its_last_train_window_and_wall_time(straight, row,
                                                                                  tmp_path):
  group, first, _ = straight
  dead = _copy(group, tmp_path)
  loop = json.loads((dead / "ckpt" / "seeds_0" / "6" / "train" / "metadata").read_text())
  summary, _ = _train(row, dead)  # resumes at the final step: no step runs
  assert summary["status"] == "ok" and summary["steps"] == 6 and summary["compile_s"] is None
  # The last window (steps 5-6) was logged by the first session; its numbers are the summary's.
  for key in ("train_loss", "train_error", "test_loss", "test_error"):
    assert summary["final"][key] == first["final"][key], key
  assert summary["final"]["train_loss"] is not None
  # Wall time: the first session's, up to its last checkpoint (which includes its compile), plus
  # this one's.
  assert loop["wall_s"] >= first["compile_s"] > 0
  assert summary["wall_s"] >= loop["wall_s"]
  assert _read_json(dead / "seed0" / "summary.json")["wall_s"] == summary["wall_s"]
  assert report.load_seed(str(dead / "seed0"), 0).wall_s == summary["wall_s"]


# --------------------------------------------------------------------- b: metrics.jsonl


def _strict_loads(line):
  def refuse(token):
    raise ValueError(f"bare {token} is not JSON")
  return json.loads(line, parse_constant=refuse)


def test_b_a_torn_line_does_not_eat_the_next_record_and_logs_are_strict_json(tmp_path):
  path = tmp_path / "metrics.jsonl"
  whole = '{"step": 2, "train_loss": 2.5}\n'
  path.write_text(whole + '{"step": 4, "train_lo')  # kill -9 in the middle of a write
  log = train.MetricsLog(str(tmp_path), enabled=True)
  log.write(6, {"train_loss": float("nan"), "train_error": 12.5})
  log.write(8, {"train_loss": float("inf"), "lr": -float("inf")})
  log.close()
  lines = path.read_text().splitlines()
  assert lines[0] == whole.strip() and lines[1] == '{"step": 4, "train_lo'
  assert len(lines) == 4
  records = [_strict_loads(line) for line in lines[2:]]  # no bare NaN or Infinity token
  assert records[0] == {"step": 6, "train_loss": "NaN", "train_error": 12.5}
  assert records[1] == {"step": 8, "train_loss": "Infinity", "lr": "-Infinity"}
  # The report reads every whole record, the non-finite values as floats again.
  _, metrics = report.load_run(str(tmp_path))
  assert [m["step"] for m in metrics] == [2, 6, 8]
  assert np.isnan(metrics[1]["train_loss"]) and metrics[1]["train_error"] == 12.5
  assert metrics[2]["train_loss"] == float("inf") and metrics[2]["lr"] == -float("inf")
  # A bare NaN token from before this fix still reads.
  assert np.isnan(fileio.loads('{"x": NaN}')["x"])


def test_b_summary_json_is_strict_too(tmp_path):
  path = tmp_path / "summary.json"
  train.write_json(str(path), {"final": {"test_loss": float("nan")}, "steps": np.int32(3)})
  assert _strict_loads(path.read_text()) == {"final": {"test_loss": "NaN"}, "steps": 3}
  assert np.isnan(train.read_summary(str(tmp_path))["final"]["test_loss"])


# --------------------------------------------------------------------- c: a resume mid window


def test_c_a_resume_mid_log_window_logs_the_uninterrupted_value(straight, row, tmp_path,
                                                                 monkeypatch):
  group, _, straight_state = straight
  resumed = tmp_path / "identity"
  # Stop after step 3 as a signal would (the CLI tests send real ones): step 3 is mid window.
  real = train.stop_requested
  monkeypatch.setattr(train, "stop_requested", lambda manager, step, n: step == 3)
  first, _ = _train(row, resumed)
  monkeypatch.setattr(train, "stop_requested", real)
  assert first["status"] == "preempted" and first["steps"] == 3
  summary, state = _train(row, resumed)
  assert summary["status"] == "ok"
  lines = lambda g: {m["step"]: m for m in _read_jsonl(g / "seed0" / "metrics.jsonl")
                     if "train_loss" in m}
  straight_lines, resumed_lines = lines(group), lines(resumed)
  assert sorted(resumed_lines) == [2, 3, 4, 6]  # 3: the open window, logged at the stop
  # Bitwise: the window's float32 sums of step 3 went through the checkpoint exactly, and step 4
  # added to them in the same compiled step as in the run never stopped.
  for step in (4, 6):
    for key in ("train_loss", "train_error", "lr"):
      assert resumed_lines[step][key] == straight_lines[step][key], (step, key)
  assert resumed_lines[3]["train_loss"] != straight_lines[4]["train_loss"]  # not vacuous
  for part in ("params", "rest", "opt"):
    assert _bitwise_differences(straight_state[part], state[part]) == [], part


# --------------------------------------------------------------------- e: a corrupt checkpoint


def test_e_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    straight, row, tmp_path, capsys):
  group, first, straight_state = straight
  dead = _copy(group, tmp_path)
  ckpt = dead / "ckpt" / "seeds_0"
  data = [p for p in (ckpt / "6" / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:  # the array files, overwritten in place as a failing disk might
    p.write_bytes(b"\0" * p.stat().st_size)
  broken_bytes = {p.relative_to(ckpt / "6"): p.read_bytes() for p in (ckpt / "6").rglob("*")
                  if p.is_file()}
  capsys.readouterr()
  summary, state = _train(row, dead)
  err = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
  assert len(err) == 1, err
  aside = dead / "ckpt" / "seeds_0.broken" / "6"
  assert err[0].startswith("warning: checkpoint step 6 cannot be restored (")
  assert f"resuming from step 3, the broken step is kept in {aside}" in err[0]
  # Kept as it was, for inspection; the good step 3 is kept too, and step 6 written anew.
  assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} \
      == broken_bytes
  assert sorted(os.listdir(ckpt)) == ["3", "6"]
  assert summary["status"] == "ok" and summary["compile_s"] is not None  # steps 4-6 ran again
  assert summary["final"]["test_error"] == first["final"]["test_error"]
  for part in ("params", "rest", "opt"):
    assert _bitwise_differences(straight_state[part], state[part]) == [], part


def test_e_when_no_step_restores_nothing_is_moved(straight, tmp_path):
  group, _, _ = straight
  dead = _copy(group, tmp_path)
  ckpt = dead / "ckpt" / "seeds_0"
  manager = train.checkpoint_manager(str(ckpt))
  other = {"step": np.zeros((1,), np.int32), "params": {"w": np.zeros((3,), np.float32)}}
  with pytest.raises(CheckpointError, match=r"seeds_0/6 cannot be restored .* nor any of the 1 "
                                            r"older steps: delete"):
    train.restore(manager, other)  # another structure (a changed config), not a broken file
  assert sorted(os.listdir(ckpt)) == ["3", "6"]
  assert not (dead / "ckpt" / "seeds_0.broken").exists()


# --------------------------------------------------------------------- d: the workdir lock


ROW = ["--config", "experiments/resnetv2_fig2.py:scale=test,run=identity",
       "--config.failure_error=100"]


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_d_a_workdir_in_use_is_refused_naming_the_process(cli, tmp_path):
  workdir = tmp_path / "work"
  with fileio.workdir_lock(str(workdir)):  # held by this (live) process
    before = _files(workdir)
    result = cli.run(*ROW, "--workdir", workdir)
    assert _files(workdir) == before == [".resjax.lock"]
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"error: the workdir {workdir} is in use by process {os.getpid()} "
                             f"on {socket.gethostname()} (")
  assert not (workdir / ".resjax.lock").exists()  # released when the with block ended


def test_d_the_lock_is_released_when_the_run_raises(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with fileio.workdir_lock(str(tmp_path)):
      assert json.loads((tmp_path / ".resjax.lock").read_text())["pid"] == os.getpid()
      raise RuntimeError("boom")
  assert not (tmp_path / ".resjax.lock").exists()
  with fileio.workdir_lock(str(tmp_path)):  # and can be taken again
    pass


def test_d_a_lock_of_another_host_is_not_taken_over(tmp_path):
  lock = tmp_path / ".resjax.lock"
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid"}))
  with pytest.raises(fileio.UserError, match="in use by process 1 on elsewhere.invalid"):
    with fileio.workdir_lock(str(tmp_path)):
      pass
  assert json.loads(lock.read_text())["host"] == "elsewhere.invalid"


# ------------------------ SIGTERM, then d and f: a stale lock, then Ctrl-C saves, exits 130, resumes


def _stop_mid_run(cli, args, metrics, signum, tmp_path):
  """Starts a long run, sends ``signum`` once its first metrics are logged: (exit code, stderr)."""
  with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
    proc = cli.popen(*args, "--config.schedule.total=100000", stdout=out, stderr=err)
    try:
      started = _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, proc)
      assert started, (tmp_path / "err").read_text()
      proc.send_signal(signum)
      code = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return code, (tmp_path / "err").read_text()


def test_sigterm_saves_exits_143_and_the_rerun_resumes(cli, tmp_path):
  workdir = tmp_path / "work"
  run_dir = workdir / "identity" / "seed0"
  metrics = run_dir / "metrics.jsonl"
  args = [*ROW, "--workdir", workdir, "--config.checkpoint_every=1000000"]
  code, stderr = _stop_mid_run(cli, args, metrics, signal.SIGTERM, tmp_path)
  assert code == 143, stderr
  assert "Traceback" not in stderr
  assert "rerun the same command to resume" in stderr
  assert not (workdir / ".resjax.lock").exists()  # released on the way out
  summary = _read_json(run_dir / "summary.json")
  assert summary["status"] == "preempted"
  stopped = summary["steps"]
  assert 2 <= stopped < 100000
  assert f"stopped by SIGTERM at step {stopped}" in summary["reason"]
  assert summary["final"] == {}
  # checkpoint_every is never reached: the only checkpoint is the one SIGTERM asked for.
  assert sorted(os.listdir(run_dir.parent / "ckpt" / "seeds_0")) == [str(stopped)]
  assert max(m["step"] for m in _read_jsonl(metrics)) == stopped
  lines_before = len(_read_jsonl(metrics))

  result = cli.run(*args, f"--config.schedule.total={stopped + 2}")
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr
  summary = _read_json(run_dir / "summary.json")
  assert summary["status"] == "ok"
  assert summary["steps"] == summary["total_steps"] == stopped + 2
  new = _read_jsonl(metrics)[lines_before:]
  assert new and min(m["step"] for m in new) > stopped
  assert max(m["step"] for m in new) == stopped + 2


def test_f_ctrl_c_saves_exits_130_and_the_rerun_resumes_d_from_a_stale_lock(cli, tmp_path):
  workdir = tmp_path / "work"
  run_dir = workdir / "identity" / "seed0"
  metrics = run_dir / "metrics.jsonl"
  gone = subprocess.Popen(["true"])
  gone.wait()  # its pid is free now: a run killed with -9 left this lock
  workdir.mkdir()
  (workdir / ".resjax.lock").write_text(json.dumps({"pid": gone.pid,
                                                    "host": socket.gethostname()}))
  args = [*ROW, "--workdir", workdir, "--config.checkpoint_every=1000000"]
  code, stderr = _stop_mid_run(cli, args, metrics, signal.SIGINT, tmp_path)
  assert code == 130, stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  notices = [line for line in stderr.splitlines() if "lock" in line]
  assert notices == [f'notice: took over the lock of process {gone.pid} on '
                     f'{socket.gethostname()}, which is gone (it stopped without releasing '
                     f'{workdir / ".resjax.lock"})']
  assert not (workdir / ".resjax.lock").exists()  # released on the way out
  summary = _read_json(run_dir / "summary.json")
  stopped = summary["steps"]
  assert summary["status"] == "preempted" and 2 <= stopped < 100000
  assert summary["reason"] == (f"stopped by SIGINT at step {stopped}; rerun the same command to "
                               "resume")
  assert sorted(os.listdir(run_dir.parent / "ckpt" / "seeds_0")) == [str(stopped)]
  assert max(m["step"] for m in _read_jsonl(metrics)) == stopped

  result = cli.run(*args, f"--config.schedule.total={stopped + 2}")
  assert result.returncode == 0, result.stderr
  assert "lock" not in result.stderr
  summary = _read_json(run_dir / "summary.json")
  assert summary["status"] == "ok" and summary["steps"] == stopped + 2
  assert max(m["step"] for m in _read_jsonl(metrics)) == stopped + 2


# ------------------------------------------------------------------ g: a disk that fills up

FULL_DISK = r"""
set -u
mnt=$1 out=$2; shift 2
mount -t tmpfs -o size=2200k tmpfs "$mnt"  # room for one checkpoint (1.5 MB) and the logs
"$@" --workdir "$mnt/work" 2> "$out/err1"; echo $? > "$out/rc1"
cp -a "$mnt/work" "$out/full"
mount -o remount,size=64m "$mnt"  # space freed
"$@" --workdir "$mnt/work" 2> "$out/err2"; echo $? > "$out/rc2"
cp -a "$mnt/work" "$out/rerun"
"""


def _user_namespaces():
  return shutil.which("unshare") and subprocess.run(
      ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="needs unshare -rm to mount a small tmpfs")
def test_g_a_full_disk_mid_checkpoint_keeps_the_last_one_and_the_rerun_resumes(cli, tmp_path):
  """A real ENOSPC: the workdir on a 2.2 MB tmpfs in a user namespace, checkpoints of 1.5 MB."""
  (tmp_path / "mnt").mkdir()
  args = [*ROW, "--config.schedule.total=6", "--config.checkpoint_every=3"]
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", tmp_path / "mnt", tmp_path,
                         *cli.argv(*args)], cwd=cli.env.get("PWD"), env=cli.env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  err1 = (tmp_path / "err1").read_text()
  assert (tmp_path / "rc1").read_text().strip() == "2", err1
  assert "Traceback" not in err1
  (line,) = [line for line in err1.splitlines() if line.startswith("error: ")]
  ckpt = tmp_path / "mnt" / "work" / "identity" / "ckpt" / "seeds_0"
  assert "is full (" in line and "MiB free, the checkpoint of step 6 needs about" in line, line
  assert len([l for l in err1.splitlines() if l.strip()]) == 1, err1  # orbax never began to write
  assert f"step 3 in {ckpt} is kept; free space" in line and "rerun the same command" in line
  assert os.listdir(tmp_path / "full" / "identity" / "ckpt" / "seeds_0") == ["3"]
  assert not (tmp_path / "full" / "identity" / "seed0" / "summary.json").exists()

  err2 = (tmp_path / "err2").read_text()
  assert (tmp_path / "rc2").read_text().strip() == "0", err2
  run_dir = tmp_path / "rerun" / "identity" / "seed0"
  summary = _read_json(run_dir / "summary.json")
  assert summary["status"] == "ok" and summary["steps"] == 6
  # The rerun went on from step 3 and logged steps 4 and 6 again (the report keeps the later
  # record of a step), with the values the stopped run had logged: nothing was lost.
  logged = [(m["step"], m["train_loss"]) for m in _read_jsonl(run_dir / "metrics.jsonl")
            if "train_loss" in m]
  assert [step for step, _ in logged] == [2, 4, 6, 4, 6]
  assert logged[3:] == logged[1:3]
