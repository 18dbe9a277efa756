"""resjax's one command line.

    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=cpu --workdir runs/fig2
    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=cpu,run=identity
    python -m resjax.main --config experiments/resnetv2_fig2.py --config.batch_size=64 --mode=describe

``train`` (the default) trains every row of the experiment at every seed, resuming whatever is in the
workdir, then writes WORKDIR/results.md and WORKDIR/figure.png. ``describe`` prints, per run, the
parameter count and the forward FLOPs per example from XLA's cost analysis, and trains nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import json
import os
import re
import signal
import sys
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from resjax.errors import ConfigError, UserError

# JAX, and the resjax modules that import it, are imported in the functions that use them: a bad
# flag or config is reported in 2.0 s instead of 2.9 s (2-core machine, 2026-12-02).

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:args].", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs, results.md and figure.png go "
                               "(default: runs/<experiment file>_<scale>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "describe", "diagnose"], "What to do.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Run as one of several processes: calls jax.distributed.initialize(), "
    "which finds its peers on TPU pod slices and under SLURM by itself.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --multihost "
                                   "where the cluster is not detected, e.g. local processes).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "Keep compiled XLA programs between runs in JAX_COMPILATION_CACHE_DIR, "
    "else $XDG_CACHE_HOME/resjax/xla (~/.cache/resjax/xla): a rerun of a row skips its compile.")
_DEFAULT_MALLOC = flags.DEFINE_bool(
    "default_malloc", False, "Leave glibc malloc as it is. Otherwise, on a CPU-only Linux machine "
    "without GLIBC_TUNABLES set, the command starts again under resjax.malloc.TUNABLES, which keep "
    "XLA:CPU's freed buffers for reuse instead of faulting them in again every step.")

EXIT_USER_ERROR = 2
# Stopped early on purpose, with a checkpoint saved: rerun the same command to resume. The code is
# the shell's 128 + the signal's number: 143 for SIGTERM (a preempted VM), 130 for SIGINT (Ctrl-C).
EXIT_PREEMPTED = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT


# ------------------------------------------------------------------------------------------------
# The experiment file: --config FILE[:ARG] and its --config.KEY=VALUE overrides.
# ------------------------------------------------------------------------------------------------

def optional_keys() -> dict:
  """Keys every experiment has whether or not its file sets them (the README's "Scale out"), with
  resjax.sharding's defaults: added after get_config, so --config.mesh=... works on any file."""
  from resjax import sharding
  return {"mesh": sharding.DEFAULT_MESH, "sharding_rules": sharding.DEFAULT_RULES,
          "fsdp_min_size": sharding.FSDP_MIN_SIZE, "seeds_side_by_side": True}


def load_experiment(argument: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of the file in ``FILE[:ARG]`` (``get_config()`` without a colon, as
  ml_collections calls it), with ``optional_keys`` added. A file that cannot give a config is a
  UserError naming the fix."""
  path, colon, arg = argument.partition(":")
  if not os.path.isfile(path):
    why = "no such file" if not os.path.exists(path) else "not a file"
    raise UserError(f"cannot read the experiment file {path} ({why}): check the --config path")
  example = "as experiments/resnetv2_fig2.py does"
  try:
    with open(path, encoding="utf-8") as f:
      empty = not f.read().strip()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read the experiment file {path} ({e}): check the --config path") \
        from None
  if empty:
    raise UserError(f"the experiment file {path} is empty: define get_config(arg=None) in it, "
                    f"returning the experiment's ConfigDict, {example}")
  spec = importlib.util.spec_from_file_location("config_config", path)  # ml_collections' name
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:  # IndentationError too; in the file or in one it imports
    where = e.filename or path
    raise UserError(f"syntax error in {where} line {e.lineno}: {e.msg}: fix that line") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UserError(f"the experiment file {path} defines no get_config: define "
                    f"get_config(arg=None) returning the experiment's ConfigDict, {example}")
  args = (arg,) if colon else ()
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    raise UserError(f"get_config in {path} takes no arg, yet --config passes one: write "
                    f"get_config(arg=None), {example}" if args else
                    f"get_config in {path} needs an arg: pass --config {path}:ARGS, or give it a "
                    "default (arg=None)") from None
  try:
    config = get_config(*args)
  except (TypeError, ValueError) as e:
    # absl would make these a one-line flag error, hiding the file's own traceback.
    raise RuntimeError(f"get_config in {path} raised {type(e).__name__}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config in {path} returned {type(config).__name__}, not a ConfigDict: "
                    "return the experiment's ConfigDict")
  for key, value in optional_keys().items():
    if key not in config:
      config[key] = value
  return config


def config_overrides(argv: list[str]) -> dict[str, str | None]:
  """KEY -> VALUE of each --config.KEY[=VALUE] (and --noconfig.KEY, VALUE None) in ``argv``, as
  ml_collections reads them; a VALUE given as the next argument is read there."""
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile
  out = {}
  for i, a in enumerate(argv):
    m = re.match(r"-{1,2}(no)?config\.([^=]*)(=(.*))?", a, re.DOTALL)
    if m:
      following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
      out[m.group(2)] = None if m.group(1) else m.group(4) if m.group(3) else following
  return out


def check_override(config: ml_collections.ConfigDict, key: str, path: str) -> None:
  """Raises ConfigError unless ``--config.KEY`` can set a field of ``config`` (read from the
  experiment file ``path``)."""
  if key == "scale":
    raise ConfigError("--config.scale would relabel this experiment without changing its recipe: "
                      "scale is the experiment file's arg, set it there "
                      f"(--config {path}:scale=paper)")
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return  # an index into a tuple: ml_collections checks it
    if part not in node:
      level = ".".join(["config", *parts[:depth]])
      near = difflib.get_close_matches(part, sorted(node.keys()), n=3, cutoff=0.0)
      raise ConfigError(f"unknown config key --config.{key}: {level} has no {part!r}; its nearest "
                        f"keys are {', '.join(near)} (fix the spelling, or add the key to the "
                        "experiment file)")
    if depth == len(parts) - 1 and node.get_type(part) is type(None):
      raise ConfigError(f"--config.{key} cannot be set: {path} sets it to None, which has no "
                        "type; declare it there as placeholder(int) (or float, str)")
    node = node[part]


class ExperimentFileParser(flags.ArgumentParser):
  """Parses --config: ``load_experiment``, then checks every --config.KEY of the command line
  against the config before ml_collections applies them (it would raise a bare AttributeError)."""

  def parse(self, argument):
    from resjax import configs
    config = load_experiment(argument)
    keys = config_overrides(sys.argv)
    # A user's form named on the command line is imported (and checked) here, so that its keys
    # can be set too; then every form's keys, wherever declared.
    configs.declare_shortcut_keys(config, keys)
    for key in keys:
      check_override(config, key, argument.partition(":")[0])
    return config

  def flag_type(self):
    return "config object"


flags.FLAGS["config"].parser = ExperimentFileParser()


def compile_cache_dir(enabled: bool, environ=os.environ) -> str | None:
  """Where compiled programs persist: JAX_COMPILATION_CACHE_DIR, else the user cache folder."""
  if not enabled:
    return None
  home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(home, "resjax", "xla")


def use_compile_cache(enabled: bool) -> None:
  """Turns JAX's persistent compilation cache on (at compile_cache_dir) or off."""
  import jax
  path = compile_cache_dir(enabled)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home: train without the cache rather than not at all
      print(f"warning: compile cache off, cannot create {path} ({e.strerror}): set "
            "JAX_COMPILATION_CACHE_DIR or pass --nocompile_cache", file=sys.stderr)
      jax.config.update("jax_enable_compilation_cache", False)
      return
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # Programs faster to compile than this are not worth a file (eager ops compile in ms).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def default_workdir(config) -> str:
  path = flags.FLAGS["config"].config_filename if "config" in flags.FLAGS else "experiment"
  stem = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
  return os.path.join("runs", f"{stem}_{config.get('scale', 'paper')}")


def command_line_keys() -> tuple[str, ...]:
  """The dotted config keys given as --config.KEY=VALUE."""
  return tuple(config_flags.get_override_values(flags.FLAGS["config"]).keys())


def resolved_runs(config) -> list:
  from resjax import configs
  keep = command_line_keys()
  return [(run, configs.run_config(config, run, keep)) for run in configs.select_runs(config)]


def describe(config) -> list[dict]:
  from resjax import inspect_model
  return [{"run": run.name, **inspect_model.describe(rc)} for run, rc in resolved_runs(config)]


def check_multihost_flags() -> None:
  """--coordinator, --num_processes and --process_id come all three, with --multihost, or not."""
  named = {"--coordinator": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
           "--process_id": _PROCESS_ID.value}
  given = [name for name, value in named.items() if value is not None]
  if not given:
    return
  if len(given) < len(named):
    missing = [name for name in named if name not in given]
    raise UserError(f"{' and '.join(given)} without {' and '.join(missing)}: give all three of "
                    "--coordinator HOST:PORT --num_processes N --process_id I, or none where the "
                    "cluster is detected (TPU pod slices, SLURM)")
  if not _MULTIHOST.value:
    raise UserError("--coordinator, --num_processes and --process_id only apply with --multihost: "
                    "add --multihost")
  n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
  if n < 1 or not 0 <= i < n:
    raise UserError(f"--process_id={i} with --num_processes={n}: use N >= 1 and 0 <= I < N")


def check_runs(config, resolved, *, training: bool) -> None:
  """Checks every run's config (to train: also its mesh, batch split and parameter shardings,
  and the claims) before any runs or anything is written, so a typo in row 9 does not cost rows
  1-8 and a failed start leaves no workdir behind."""
  from resjax import claims, inspect_model, sharding
  for _, rc in resolved:
    inspect_model.check(rc)
    if training:
      mesh = sharding.make_mesh(rc.get("mesh", sharding.DEFAULT_MESH))
      sharding.check_batch_size(rc.batch_size, mesh)
      inspect_model.check_sharding(rc, mesh)
  if training:
    claims.check(config)


def train_all(config, workdir: str, resolved=None, task_of=None, *, echo: bool = True) -> int:
  """Trains every row of ``config`` in ``workdir`` and writes its report. ``resolved`` (from
  ``resolved_runs``, already checked) and ``task_of`` (``tasks.load_all``'s) are computed here
  unless given; ``echo``: print results.md at the end."""
  import jax

  from resjax import fileio, tasks
  if resolved is None:
    resolved = resolved_runs(config)
    check_runs(config, resolved, training=True)
  if task_of is None:  # the data: a dataset not prepared stops here
    task_of = tasks.load_all(rc for _, rc in resolved)
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(fileio.workdir_lock(workdir))
      except UserError as e:
        refused = e
    if jax.process_count() > 1:  # every process stops when process 0 could not lock the workdir
      import numpy as np
      from jax.experimental import multihost_utils
      if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)):
        raise refused or UserError(f"the workdir {workdir} is in use: see process 0's line")
    elif refused is not None:
      raise refused
    with sigterm_exits():
      return train_rows(config, workdir, resolved, task_of, echo=echo)


@contextlib.contextmanager
def sigterm_exits():
  """Outside the training loop (which saves first), SIGTERM exits at once with EXIT_PREEMPTED,
  through Python's cleanup, so the workdir lock is released. One process only: with several,
  SIGTERM belongs to JAX's preemption service."""
  import jax
  if jax.process_count() > 1:
    yield
    return

  def handler(signum, frame):
    del signum, frame
    sys.exit(EXIT_PREEMPTED)

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def train_rows(config, workdir: str, resolved, task_of, *, echo: bool = True) -> int:
  """Trains every row of ``resolved`` in ``workdir`` (locked), then writes the report."""
  import jax

  from resjax import fileio, provenance, report, tasks, train
  is_main = jax.process_index() == 0
  fileio.makedirs(workdir)
  if is_main:
    train.write_json(os.path.join(workdir, "config.json"),
                     {**json.loads(config.to_json_best_effort()),
                      "provenance": provenance.gather()})

  arrays: dict[str, object] = {}
  seeds = [config.get("seed", 0) + k for k in range(config.get("num_seeds", 1))]
  t_all = time.time()
  preempted = False
  for i, (run, rc) in enumerate(resolved, 1):
    group_dir = os.path.join(workdir, run.name)
    todo = [s for s in seeds
            if (train.read_summary(os.path.join(group_dir, f"seed{s}")) or {}).get("status")
            not in ("ok", "failed")]
    if not todo:
      print(f"[{i}/{len(resolved)}] {run.name}: already done, skipped")
      continue
    # Seeds train side by side; with config.seeds_side_by_side=False, one after another.
    groups = [todo] if config.seeds_side_by_side else [[s] for s in todo]
    key = tasks.task_key(rc)
    if key not in arrays:
      arrays[key] = task_of[key].device_arrays()
    for group in groups:
      summaries, _ = train.train(rc, group_dir, seeds=group, task=task_of[key], arrays=arrays[key])
      for summary in summaries:
        final = summary.get("final") or {}
        err = final.get(config.get("metric", "test_error"))
        what = f"{config.get('metric', 'test_error')} {err:.4g}" if err is not None else (
            summary.get("reason") or "")
        print(f"[{i}/{len(resolved)}] {run.name} seed{summary['seed']}: {summary['status']}, "
              f"{what} ({summary['wall_s']:.0f} s)", flush=True)
      if is_main:
        report.write_report(workdir, config)
      # A signal after the last step still stops the sweep: the row is saved and done.
      if any(s["status"] == "preempted" for s in summaries) or train.Preemption.requested:
        preempted = True
        break
    if preempted:
      break
  if is_main:
    md, png = report.write_report(workdir, config)
    text = f"\n{fileio.read_text(md)}\n" if echo else ""
    print(f"{text}wrote {md} and {png} ({time.time() - t_all:.0f} s)")
  if preempted:
    print("preempted: checkpoint saved; rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED if train.Preemption.signal == "SIGINT" else EXIT_PREEMPTED
  return 0


def main(argv) -> int:
  from absl import logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: options are --config, --workdir, --mode")
  config = _CONFIG.value  # loaded and its overrides checked by ExperimentFileParser
  if config is None:
    raise UserError("no experiment given: pass --config experiments/FILE.py[:args]")
  check_multihost_flags()
  workdir = None
  if _MODE.value != "describe":  # describe writes nothing
    from resjax import fileio
    workdir = _WORKDIR.value or default_workdir(config)
    fileio.check_writable(workdir)
  use_compile_cache(_COMPILE_CACHE.value)
  if _MULTIHOST.value:
    import jax
    kw = {}
    if _COORDINATOR.value:
      kw = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kw)
  if _MODE.value == "describe":
    print(json.dumps(describe(config), indent=1))
    return 0
  from resjax import kernels, models
  if not _MULTIHOST.value and any(models.onednn_convolutions(rc.model)
                                  for _, rc in resolved_runs(config)):
    kernels.one_pool_thread()  # before JAX starts its CPU client (see there)
  if _MODE.value == "diagnose":
    from resjax import diagnose
    resolved = resolved_runs(config)
    check_runs(config, resolved, training=False)
    json_path, png_path = diagnose.run_all(config, resolved, workdir)
    print(f"wrote {json_path} and {png_path}")
    return 0
  return train_all(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (unknown, or a value of the wrong type) a UserError."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(f"{e} (see --helpfull)") from None


def default_malloc_asked(argv: list[str]) -> bool:
  """Whether ``argv`` sets --default_malloc (read before absl parses it: glibc's settings must be in
  place when the process starts, before anything is allocated under the old ones)."""
  asked = False
  for arg in argv[1:]:
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in ("default_malloc", "nodefault_malloc"):
      asked = (name == "default_malloc") == (value.lower() not in ("false", "0", "f", "n", "no"))
  return asked


def run() -> None:
  if not default_malloc_asked(sys.argv):
    from resjax import malloc
    malloc.reexec()
  try:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
  except UserError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop, or twice inside it
    print("interrupted: stopped before a checkpoint could be saved; rerun the same command to "
          "resume from the last one", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
  run()
