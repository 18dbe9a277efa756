"""Tests for `python -m resjax.main`: one-line user errors, --mode=describe, corrupt checkpoints."""

import base64
import importlib.util
import json
import os

import pytest

FIG2 = "experiments/resnetv2_fig2.py"
FIG2_ROWS = ["identity", "scaling_0_1", "scaling_0.5_1", "scaling_0.5_0.5", "exclusive_gate_bg-5",
             "exclusive_gate_bg-6", "exclusive_gate_bg-7", "shortcut_gate_bg0",
             "shortcut_gate_bg-6", "conv1x1", "dropout_0.5"]
SHORTCUTS = ["conv1x1", "deepnorm", "dropout", "exclusive_gate", "identity", "lambda", "layerscale",
             "mix", "none", "rezero", "scaling", "shortcut_gate"]


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


# -------------------------------------------------------------------------- user errors

# name -> (arguments of --config, parts of the expected error line[, options]). Every case stops
# before compiling anything. Placeholders in both: EXPERIMENT, EXPERIMENT_CIFAR, EMPTY_FILE,
# NO_GET_CONFIG and SYNTAX_ERROR stand for files the fixture writes, NOT_PREPARED for an empty data
# dir (also TFDS_DATA_DIR in every case), WORKDIR for the case's workdir. Options: 'env' for the
# case; 'workdir': 'FILE' (a file where the workdir goes), 'UNDER_FILE' (a path below such a file)
# or a path used as it is (default: a path in the case's folder, which does not exist).
NOT_PREPARED = "{EMPTY}"
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
TEXT = "experiments/value_residual_gpt2.py:scale=test"
FIX_FILE = "get_config(arg=None)"
CASES = {
    # The rows of fig2 each set model.shortcut.name; total=0 stops a run that ignored the flag.
    "unknown_shortcut": ([f"{FIG2}:scale=test,run=identity", "--config.model.shortcut.name=nope",
                          "--config.schedule.total=0"], ["nope", *SHORTCUTS]),
    "unknown_shortcut_unset_by_rows": (["EXPERIMENT", "--config.model.shortcut.name=nope"],
                                       ["nope", *SHORTCUTS]),
    "impossible_depth": ([f"{FIG2}:scale=test", "--config.model.depth=111"],
                         ["depth 111", "6n+2", "110"]),
    "unknown_arg": ([f"{FIG2}:scale=cpu,colour=red"], ["'colour'", "scale", "run", "seeds"]),
    "unknown_scale": ([f"{FIG2}:scale=huge"], ["'huge'", "paper, cpu, test"]),
    "arg_of_the_wrong_type": ([f"{FIG2}:scale=test,seeds=abc"], ["seeds='abc'", "seeds=3"]),
    "unknown_run": ([f"{FIG2}:scale=test,run=nope"], ["'nope'", ", ".join(FIG2_ROWS)]),
    "not_prepared_data_dir_flag": ([f"{FIG2}:scale=test,run=identity", "--config.data.name=cifar10",
                                    f"--config.data.data_dir={NOT_PREPARED}"],
                                   ["cifar10", "resjax.data.prepare", NOT_PREPARED]),
    "not_prepared_default_dir": ([f"{FIG2}:scale=test,run=identity", "--config.data.name=cifar10"],
                                 ["cifar10", "resjax.data.prepare", NOT_PREPARED]),
    "not_prepared_data_dir_in_file": (["EXPERIMENT_CIFAR"],
                                      ["cifar10", "resjax.data.prepare", NOT_PREPARED]),
    "missing_config_file": (["experiments/no_such_experiment.py:scale=test"],
                            ["no_such_experiment.py", "check the --config path"]),
    # An unknown --config.KEY names the key and the nearest keys of its level.
    "unknown_key": ([f"{FIG2}:scale=test", "--config.optim.warmup_shape=linear"],
                    ["--config.optim.warmup_shape", "config.optim has no 'warmup_shape'",
                     "warmup_lr", "fix the spelling"]),
    "unknown_top_level_key": ([f"{FIG2}:scale=test", "--config.batchsize=64"],
                              ["config has no 'batchsize'", "batch_size"]),
    "unknown_parent_key": ([f"{FIG2}:scale=test", "--config.optimizer.lr=0.1"],
                           ["config has no 'optimizer'", "optim"]),
    "key_set_to_none": ([TEXT, "--config.failure_error=5"],
                        ["--config.failure_error", "value_residual_gpt2.py", "placeholder(int)"]),
    "override_of_the_wrong_type": ([f"{FIG2}:scale=test", "--config.batch_size=abc"],
                                   ["--config.batch_size=abc", "'abc'"]),
    "unknown_flag": ([f"{FIG2}:scale=test", "--wrkdir=elsewhere"], ["'wrkdir'", "workdir"]),
    # Experiment files that cannot give a config.
    "empty_experiment_file": (["EMPTY_FILE"], ["EMPTY_FILE", "is empty", FIX_FILE]),
    "no_get_config": (["NO_GET_CONFIG:scale=test"], ["NO_GET_CONFIG", "no get_config", FIX_FILE]),
    "syntax_error": (["SYNTAX_ERROR"], ["SYNTAX_ERROR line 2", "never closed", "fix that line"]),
    # The README's scale-out keys exist in every experiment, so a bad value is a config error.
    "mesh_larger_than_the_devices": ([f"{FIG2}:scale=test,run=identity",
                                      '--config.mesh=(("data", 2), ("fsdp", 1), ("model", 1))'],
                                     ["config.mesh", "asks for 2 devices but there are 1",
                                      "set one to -1"], {"env": ONE_DEVICE}),
    "sharding_rule_bad_regex": ([f"{FIG2}:scale=test,run=identity",
                                 '--config.sharding_rules=(("[", "fsdp"),)'],
                                ["regex '['", "config.sharding_rules"]),
    "fsdp_min_size_negative": ([f"{FIG2}:scale=test", "--config.fsdp_min_size=-3"],
                               ["config.fsdp_min_size=-3", "0 or more"]),
    "seeds_side_by_side_not_a_bool": ([f"{FIG2}:scale=test", "--config.seeds_side_by_side=maybe"],
                                      ["--config.seeds_side_by_side=maybe", "boolean"]),
    # Workdirs that cannot be written, found before any data is read.
    "workdir_is_a_file": ([f"{FIG2}:scale=test"], ["WORKDIR is a file", "pass a directory"],
                          {"workdir": "FILE"}),
    "workdir_under_a_file": ([f"{FIG2}:scale=test"], ["is under the file", "pass a directory"],
                             {"workdir": "UNDER_FILE"}),
    "workdir_not_writable": ([f"{FIG2}:scale=test"],  # /sys takes no files, not even from root
                             ["cannot write to the workdir /sys/", "writable filesystem"],
                             {"workdir": "/sys/resjax_test_workdir"}),
    "workdir_in_proc": ([f"{FIG2}:scale=test"], ["under /proc", "--workdir on a disk"],
                        {"workdir": "/proc/resjax_test_workdir"}),
    # Non-positive intervals and eval batch: caught by the config check, not by a division mid-run.
    "log_every_zero": ([f"{FIG2}:scale=test", "--config.log_every=0"],
                       ["config.log_every=0", "1 or more"]),
    "eval_every_zero": ([f"{FIG2}:scale=test", "--config.eval_every=0"],
                        ["config.eval_every=0", "1 or more"]),
    "checkpoint_every_negative": ([f"{FIG2}:scale=test", "--config.checkpoint_every=-5"],
                                  ["config.checkpoint_every=-5", "1 or more"]),
    "eval_batch_size_zero": ([f"{FIG2}:scale=test", "--config.eval_batch_size=0"],
                             ["config.eval_batch_size=0", "1 or more"]),
    # --mode=diagnose checks its workdir and config too.
    "diagnose_workdir_is_a_file": ([f"{FIG2}:scale=test", "--mode=diagnose"],
                                   ["WORKDIR is a file", "pass a directory"], {"workdir": "FILE"}),
    "diagnose_batch_zero": ([f"{FIG2}:scale=test", "--mode=diagnose", "--config.batch_size=0"],
                            ["config.batch_size=0", "1 or more"]),
    # The coordinator triple comes whole.
    "coordinator_alone": ([f"{FIG2}:scale=test", "--multihost", "--coordinator=localhost:1234"],
                          ["--coordinator without --num_processes and --process_id",
                           "give all three"]),
    "processes_without_coordinator": ([f"{FIG2}:scale=test", "--multihost", "--num_processes=2",
                                       "--process_id=0"],
                                      ["without --coordinator", "give all three"]),
    "coordinator_without_multihost": ([f"{FIG2}:scale=test", "--coordinator=localhost:1234",
                                       "--num_processes=2", "--process_id=0"],
                                      ["add --multihost"]),
    # Checked before config.json is written.
    "batch_does_not_split_over_devices": ([f"{FIG2}:scale=test,run=identity",
                                           "--config.batch_size=31"],
                                          ["config.batch_size=31", "2 data-parallel devices",
                                           "multiple of 2"], {"env": TWO_DEVICES}),
    # scale picks a recipe in the file; overriding the label alone would mislabel the run.
    "scale_override": ([f"{FIG2}:scale=test", "--config.scale=paper"],
                       ["--config.scale", f"--config {FIG2}:scale=paper"]),
    # The text byte caps are None at test scale yet settable: a bad one reaches the data check.
    "text_byte_cap_not_positive": ([TEXT, "--config.data.max_train_bytes=0"],
                                   ["config.data.max_train_bytes=0", "positive int"]),
}
if importlib.util.find_spec("gcsfs") is None:  # with gcsfs this would go to the network
  # EPATH_USE_TF=false: epath reaches gs:// through fsspec, as it does where TensorFlow is absent.
  CASES["workdir_gs_without_gcsfs"] = ([f"{FIG2}:scale=test"], ["WORKDIR", "pip install gcsfs"],
                                       {"workdir": "gs://resjax-test-no-such-bucket/run",
                                        "env": {"EPATH_USE_TF": "false"}})


def _tree(directory):
  """Every folder and file under `directory`, with the files' bytes."""
  out = {}
  for d, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), directory) + "/"] = None
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture(scope="module")
def user_errors(cli, experiment_file, tmp_path_factory):
  """Runs every case of CASES (each stops before compiling); name -> (result, parts, files)."""
  root = tmp_path_factory.mktemp("user_errors")
  empty = root / "empty_data_dir"
  empty.mkdir()
  files = {
      "EXPERIMENT": experiment_file(root / "rows_keep_shortcut.py", """
          c.runs = [row('plain_row', 'a row that leaves model.shortcut alone')]
          """),
      "EXPERIMENT_CIFAR": experiment_file(root / "cifar_in_empty_dir.py", f"""
          c.data.update(name='cifar10', data_dir={str(empty)!r})
          c.run = 'identity'
          """),
      "EMPTY_FILE": root / "empty_experiment.py",
      "NO_GET_CONFIG": root / "no_get_config.py",
      "SYNTAX_ERROR": root / "syntax_error.py",
  }
  files["EMPTY_FILE"].write_text("\n")
  files["NO_GET_CONFIG"].write_text("def get_confg(arg=None):\n  return None\n")
  files["SYNTAX_ERROR"].write_text("def get_config(arg=None):\n  return dict(\n      a=(1, 2)\n")

  def workdir_of(name):
    case_dir = root / "cases" / name
    case_dir.mkdir(parents=True)
    where = (CASES[name][2:] or [{}])[0].get("workdir")
    if where in ("FILE", "UNDER_FILE"):
      (case_dir / "work").write_text("a file, not a directory\n")
      return case_dir, case_dir / "work" / ("sub" if where == "UNDER_FILE" else "")
    return case_dir, where or case_dir / "work"

  def substitute(text, workdir):
    text = text.replace(NOT_PREPARED, str(empty)).replace("WORKDIR", str(workdir).rstrip("/"))
    for placeholder in sorted(files, key=len, reverse=True):  # EXPERIMENT_CIFAR before EXPERIMENT
      text = text.replace(placeholder, str(files[placeholder]))
    return text

  command_lines, checks = [], {}
  for name, (args, parts, *options) in CASES.items():
    case_dir, workdir = workdir_of(name)
    checks[name] = [substitute(p, workdir) for p in parts], (case_dir, _tree(case_dir), workdir)
    env = {"TFDS_DATA_DIR": str(empty), **(options[0].get("env", {}) if options else {})}
    command_lines.append((["--config", *[substitute(a, workdir) for a in args], "--workdir",
                           workdir], env))
  # Each case is its own command line, forked from one process that imported JAX once.
  results = cli.run_many(command_lines)
  return {name: (result, *checks[name]) for name, result in zip(CASES, results)}


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_clear_line_and_exit_2(user_errors, name):
  result, parts, _ = user_errors[name]
  lines = _lines(result.stderr)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ")
  for part in parts:
    assert part in lines[0], part


@pytest.mark.parametrize("name", CASES)
def test_user_error_writes_nothing_to_the_workdir(user_errors, name):
  result, _, (case_dir, before, workdir) = user_errors[name]
  assert result.returncode != 0
  # No workdir created, no probe file left beside it, a workdir that is a file untouched.
  assert _tree(case_dir) == before
  if not str(workdir).startswith(str(case_dir)) and "://" not in str(workdir):
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("experiment", ["value_residual", "value_residual_gpt2", "preln_postln",
                                        "caution_depth"])
def test_text_byte_caps_can_be_set_from_the_command_line_at_every_scale(experiment):
  # None at cpu and test scale, yet typed: ml_collections parses an int override for them.
  from resjax import main
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", f"{experiment}.py")
  for scale in ("paper", "cpu", "test"):
    config = main.load_experiment(f"{path}:scale={scale}")
    for cap in ("max_train_bytes", "max_test_bytes"):
      main.check_override(config, f"data.{cap}", path)
      assert config.data.get_type(cap) is int, (scale, cap)


def test_scale_out_flags_reach_the_trainer(cli, tmp_path):
  """The README's --config.mesh, .sharding_rules, .fsdp_min_size and .seeds_side_by_side are in no
  experiment file; each works on fig2 all the same. Two CPU devices, two seeds, one step."""
  workdir = tmp_path / "work"
  result = cli.run("--config", f"{FIG2}:scale=test,run=identity,seeds=2", "--workdir", workdir,
                   "--config.schedule.total=1",
                   '--config.mesh=(("data", -1), ("fsdp", 2), ("model", 1))',
                   '--config.sharding_rules=(("stages/2/", "replicate"), (".*", "fsdp"))',
                   "--config.fsdp_min_size=1000", "--config.seeds_side_by_side=False",
                   env=TWO_DEVICES)
  assert result.returncode == 0, result.stderr
  config = json.loads((workdir / "config.json").read_text())
  assert config["mesh"] == [["data", -1], ["fsdp", 2], ["model", 1]]
  assert config["sharding_rules"] == [["stages/2/", "replicate"], [".*", "fsdp"]]
  assert (config["fsdp_min_size"], config["seeds_side_by_side"]) == (1000, False)
  # Seeds one after another: a checkpoint of each seed alone, not one of both.
  ckpt = workdir / "identity" / "ckpt"
  assert sorted(os.listdir(ckpt)) == ["seeds_0", "seeds_1"]
  # The shardings orbax recorded (keys: base64 of the dotted tree path). A 3x3x16x16 kernel has
  # 2,304 elements: split over fsdp only because fsdp_min_size=1000 (the default is 16,384); a
  # 3x3x64x64 kernel (36,864) would be split by ".*" but the first rule replicates stage 3.
  recorded = json.loads(next(ckpt.glob("seeds_0/*/default/_sharding")).read_text())
  specs = {base64.b64decode(k).decode(): json.loads(v)["partition_spec"]
           for k, v in recorded.items()}
  assert specs["params.weights.stages.0.first.convs.0.kernel.value"] == [None] * 4 + ["fsdp"]
  assert specs["params.weights.stages.2.rest.convs.0.kernel.value"] == [None]
  assert specs["params.weights.stem.kernel.value"] == [None]  # 144 elements, under 1000


# ---------------------------------------------------------------------- corrupt checkpoint


def _snapshot(directory):
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(directory) for f in fs}


@pytest.fixture(scope="module")
def corrupt_rerun(cli, tmp_path_factory):
  """Trains identity for 3 steps, corrupts every file of its checkpoint, and runs it again."""
  workdir = tmp_path_factory.mktemp("corrupt") / "work"
  args = ["--config", f"{FIG2}:scale=test,run=identity", "--workdir", workdir,
          "--config.schedule.total=3"]
  first = cli.run(*args)
  assert first.returncode == 0, first.stderr
  run_dir = workdir / "identity" / "seed0"
  ckpt_dir = workdir / "identity" / "ckpt" / "seeds_0"  # the seeds trained together
  assert os.listdir(ckpt_dir) == ["3"]
  step_dir = ckpt_dir / "3"
  os.remove(run_dir / "summary.json")  # otherwise the finished run is skipped
  for path in _snapshot(step_dir):
    with open(step_dir / path, "wb") as f:
      f.write(b"\0corrupt\0")
  before = _snapshot(ckpt_dir)
  again = cli.run(*args)
  return again, run_dir, before


def test_corrupt_checkpoint_error_names_it_and_the_fix(corrupt_rerun):
  result, run_dir, before = corrupt_rerun
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  (line,) = [line for line in _lines(result.stderr) if line.startswith("error: ")]
  ckpt = str(run_dir.parent / "ckpt" / "seeds_0")
  assert f"checkpoint {ckpt}/3 cannot be restored" in line
  assert f"delete {ckpt} to restart this run from scratch" in line
  assert "another --workdir" in line
  # Nothing deleted, repaired or added behind the user's back, and no summary claims a result.
  assert _snapshot(run_dir.parent / "ckpt" / "seeds_0") == before
  assert not (run_dir / "summary.json").exists()


def test_corrupt_checkpoint_error_is_the_only_line(corrupt_rerun):
  result, _, _ = corrupt_rerun
  assert len(_lines(result.stderr)) == 1, result.stderr


# ---------------------------------------------------------------------------- describe


@pytest.fixture(scope="module", autouse=True)
def describe_run(cli, tmp_path_factory):
  """Starts `--mode=describe` with the module: its 22 compilations overlap the tests above."""
  root = tmp_path_factory.mktemp("describe")
  with cli.background(root, "--config", f"{FIG2}:scale=test", "--workdir", root / "work",
                      "--mode=describe") as proc:
    yield proc, root


def test_describe_prints_every_row_and_trains_nothing(describe_run):
  proc, root = describe_run
  assert proc.wait(timeout=400) == 0, (root / "err").read_text()
  rows = json.loads((root / "out").read_text())
  assert [r["run"] for r in rows] == FIG2_ROWS
  for r in rows:
    assert isinstance(r["params"], int) and r["params"] > 0
    assert r["forward_flops_per_example"] > 0
    assert r["model"]["depth"] == 14
  assert not (root / "work").exists()
  by_name = {r["run"]: r for r in rows}
  identity = by_name["identity"]
  # ResNet-14: 3 stages of 2 units at widths 16, 32, 64. Option A (fig2's, as ResNet-v1 §4.2)
  # has no shortcut parameters; conv1x1 projects (1x1 conv + BN) on every one of the 6 units.
  units = [(16, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
  projections = sum(i * o + 2 * o for i, o in units)
  assert by_name["conv1x1"]["params"] - identity["params"] == projections
  assert by_name["conv1x1"]["forward_flops_per_example"] > identity["forward_flops_per_example"]
  # Constant scaling and dropout add no parameters; a gate is a 1x1 conv with bias on every unit.
  for name in ("scaling_0_1", "scaling_0.5_1", "scaling_0.5_0.5", "dropout_0.5"):
    assert by_name[name]["params"] == identity["params"], name
  for name in ("exclusive_gate_bg-5", "exclusive_gate_bg-6", "shortcut_gate_bg0"):
    assert by_name[name]["params"] - identity["params"] == sum(i * o + o for i, o in units), name
