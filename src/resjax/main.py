"""resjax's one command line.

    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=cpu --workdir runs/fig2
    python -m resjax.main --config experiments/resnetv2_fig2.py:scale=cpu,run=identity
    python -m resjax.main --config experiments/resnetv2_fig2.py --config.batch_size=64 --mode=describe

``train`` (the default) trains every row of the experiment at every seed, resuming whatever is in the
workdir, then writes WORKDIR/results.md and WORKDIR/figure.png. ``describe`` prints, per run, the
parameter count and the forward FLOPs per example from XLA's cost analysis, and trains nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from resjax.errors import UserError

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

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped early on purpose, rerun to resume


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


def train_all(config, workdir: str) -> int:
  import jax

  from resjax import claims, fileio, inspect_model, provenance, report, tasks, train
  resolved = resolved_runs(config)
  # Check every run's config, the claims and the data before training any or writing anything,
  # so a typo in row 9 does not cost rows 1-8 and a failed start leaves no workdir behind.
  for _, rc in resolved:
    inspect_model.check(rc)
  claims.check(config)
  task_of = tasks.load_all(rc for _, rc in resolved)
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
    groups = [todo] if config.get("seeds_side_by_side", True) else [[s] for s in todo]
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
      if any(s["status"] == "preempted" for s in summaries):
        preempted = True
        break
    if preempted:
      break
  if is_main:
    md, png = report.write_report(workdir, config)
    print(f"\n{fileio.read_text(md)}\nwrote {md} and {png} ({time.time() - t_all:.0f} s)")
  if preempted:
    print("preempted: checkpoint saved; rerun the same command to resume", file=sys.stderr)
    return EXIT_PREEMPTED
  return 0


def main(argv) -> int:
  from absl import logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: options are --config, --workdir, --mode")
  config = _CONFIG.value
  if config is None:
    raise UserError("no experiment given: pass --config experiments/FILE.py[:args]")
  try:
    config.get("experiment")  # a file that could not be read raises on first access
  except OSError:
    path = flags.FLAGS["config"].config_filename.split(":")[0]
    why = "no such file" if not os.path.exists(path) else "it failed to load"
    raise UserError(f"cannot read the experiment file {path} ({why}): check the --config path") \
        from None
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
  workdir = _WORKDIR.value or default_workdir(config)
  if _MODE.value == "diagnose":
    from resjax import diagnose
    json_path, png_path = diagnose.run_all(config, resolved_runs(config), workdir)
    print(f"wrote {json_path} and {png_path}")
    return 0
  return train_all(config, workdir)


def run() -> None:
  try:
    app.run(lambda argv: sys.exit(main(argv)))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)



if __name__ == "__main__":
  run()
