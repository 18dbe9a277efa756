"""Tests for how runs record how they were made (resjax.provenance, the results.md footer), the
persistent compile cache of the CLI, and model init compiled once per row."""

import datetime
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import ml_collections
import pytest

from resjax import configs, main, models, provenance, report, tasks, train
from test_scale_out import SMALL

FIG2 = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "resnetv2_fig2.py"


def _git(cwd, *args):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                        check=True, capture_output=True, text=True).stdout.strip()


def _utc(stamp):
  t = datetime.datetime.fromisoformat(stamp)
  assert t.utcoffset() == datetime.timedelta(0), stamp
  return t


# ------------------------------------------------------------------------- the record


def test_record_names_the_installed_versions_the_devices_and_the_command():
  p = provenance.gather()
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    assert p["versions"][package] == importlib.metadata.version(package)
  assert p["device"] == {"platform": jax.devices()[0].platform,
                         "kind": jax.devices()[0].device_kind, "count": jax.device_count()}
  assert p["process_count"] == jax.process_count() == 1
  assert p["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["commit"])
  assert (p["dirty"] is None) == (p["commit"] is None)
  assert shlex.split(p["command"]) == sys.orig_argv
  assert _utc(p["started"]) <= datetime.datetime.now(datetime.timezone.utc)
  assert provenance.gather() is p  # once per process


def test_git_state_reports_commit_and_dirt_and_nothing_outside_a_checkout(tmp_path):
  repo, pkg = tmp_path / "repo", tmp_path / "repo" / "pkg"
  pkg.mkdir(parents=True)
  (pkg / "mod.py").write_text("x = 1\n")
  (repo / ".gitignore").write_text("venv/\n")
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "commit", "-q", "-m", "first")
  head = _git(repo, "rev-parse", "HEAD")
  assert provenance.git_state(str(pkg)) == (head, False)
  (pkg / "mod.py").write_text("x = 2\n")  # an edit not committed
  assert provenance.git_state(str(pkg)) == (head, True)
  _git(repo, "checkout", "-q", "--", "pkg/mod.py")
  (repo / "new_experiment.py").write_text("")  # untracked code ran too
  assert provenance.git_state(str(pkg)) == (head, True)
  # A package installed in an ignored folder of some other repository is not that repository's.
  site = repo / "venv" / "site-packages" / "resjax"
  site.mkdir(parents=True)
  assert provenance.git_state(str(site)) == (None, None)
  assert provenance.git_state(str(tmp_path)) == (None, None)  # no repository at all


# ------------------------------------------------------------------------- the footer


def _record(commit, started, finished, command="python -m resjax.main --config fig2.py"):
  return {"versions": {"jax": "0.10.2", "flax": "0.12.8"},
          "device": {"platform": "gpu", "kind": "NVIDIA H100", "count": 8}, "process_count": 1,
          "commit": commit, "dirty": commit == "b" * 40, "command": command, "started": started,
          "finished": finished}


def _write_summary(workdir, run, seed, record):
  d = workdir / run / f"seed{seed}"
  d.mkdir(parents=True)
  summary = {"run": run, "seed": seed, "status": "ok", "steps": 10, "total_steps": 10,
             "final": {"test_error": 5.0, "test_loss": 0.2, "train_loss": 0.1}, "wall_s": 1.0,
             "provenance": record}
  (d / "summary.json").write_text(json.dumps(summary))


def _config(kind):
  c = ml_collections.ConfigDict()
  c.experiment, c.scale, c.failure_error, c.report = "fig2", "test", 20.0, kind
  c.metric, c.baseline = "test_error", "identity"
  c.runs = [dict(name=n, label=n, overrides={}) for n in ("identity", "gate", "conv1x1")]
  return c


def _footer(md):
  assert "## Provenance" in md, md
  return md[md.index("## Provenance"):]


@pytest.mark.parametrize("kind", ["failure", "compare"])
def test_footer_lists_each_commit_with_its_rows_when_runs_disagree(tmp_path, kind):
  a, b = "a" * 40, "b" * 40
  _write_summary(tmp_path, "identity", 0, _record(a, "2026-01-01T10:00:00+00:00",
                                                  "2026-01-01T10:30:00+00:00"))
  _write_summary(tmp_path, "identity", 1, _record(a, "2026-01-01T10:00:00+00:00",
                                                  "2026-01-01T10:30:00+00:00"))
  _write_summary(tmp_path, "gate", 0, _record(b, "2026-01-02T09:00:00+00:00",
                                              "2026-01-02T09:10:00+00:00"))
  md_path, _ = report.write_report(str(tmp_path), _config(kind))
  footer = _footer(pathlib.Path(md_path).read_text())
  assert "- Commit: differs between runs:" in footer
  assert f"  - `{a}`: identity\n" in footer  # both seeds of the row: named once
  assert f"  - `{b}` (dirty): gate\n" in footer
  # What the runs agree on is stated once.
  assert "- Versions: jax 0.10.2, flax 0.12.8\n" in footer
  assert "- Device: 8 × NVIDIA H100 (gpu), 1 process\n" in footer
  assert "- Command: `python -m resjax.main --config fig2.py`\n" in footer
  # From the first start to the last end.
  assert "- Runs: 2026-01-01T10:00:00+00:00 to 2026-01-02T09:10:00+00:00 (UTC)" in footer


def test_footer_names_the_seed_of_a_row_that_ran_under_another_commit(tmp_path):
  a, b = "a" * 40, "b" * 40
  t = "2026-01-01T10:00:00+00:00"
  _write_summary(tmp_path, "identity", 0, _record(a, t, t))
  _write_summary(tmp_path, "identity", 1, _record(b, t, t, command="python -m resjax.main -x"))
  md_path, _ = report.write_report(str(tmp_path), _config("failure"))
  footer = _footer(pathlib.Path(md_path).read_text())
  assert f"  - `{a}`: identity/seed0\n" in footer and f"  - `{b}` (dirty): identity/seed1\n" in footer
  assert "  - `python -m resjax.main -x`: identity/seed1\n" in footer


# ------------------------------------------------------------------------- compiles


def _fig2_identity():
  spec = importlib.util.spec_from_file_location("resnetv2_fig2", FIG2)
  fig2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fig2)
  config = fig2.get_config("scale=test")
  (run,) = [r for r in config.runs if r.name == "identity"]
  return configs.run_config(config, run)


def test_model_init_is_traced_once_for_three_seeds_and_again_for_none(monkeypatch):
  config = _fig2_identity()
  config.model.depth = 8  # a model no other test in this process has initialised
  task = tasks.load(config)
  traces = []
  build = models.build
  monkeypatch.setattr(models, "build", lambda *a, **kw: traces.append(1) or build(*a, **kw))
  tx = train.make_optimizer(config, {"total": 4, "warmup": 1, "boundaries": [3]})
  _, state = train.init_state(config, task, [0, 1, 2], tx)
  assert len(traces) == 1
  _, again = train.init_state(config, task, [5], tx)  # the row rerun (resumed, another seed)
  assert len(traces) == 1
  kernels = jax.device_get(state["params"]["weights"]["stem"]["kernel"])
  assert not (kernels[0] == kernels[1]).all() and not (kernels[1] == kernels[2]).all()


def test_compile_cache_folder_follows_the_environment_and_the_flag():
  env = {"XDG_CACHE_HOME": "/xdg"}
  assert main.compile_cache_dir(True, env) == "/xdg/resjax/xla"
  assert main.compile_cache_dir(True, {**env, "JAX_COMPILATION_CACHE_DIR": "/mine"}) == "/mine"
  assert main.compile_cache_dir(False, {**env, "JAX_COMPILATION_CACHE_DIR": "/mine"}) is None


def _entries(cache):
  return sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))


def test_second_run_of_a_row_compiles_nothing_new_and_records_where_it_came_from(cli, tmp_path):
  cache = tmp_path / "xla"
  args = ["--config", "experiments/resnetv2_fig2.py:scale=test,run=identity", *SMALL,
          "--config.schedule.total=2"]
  summaries = []
  for name in ("first", "second"):
    workdir = tmp_path / name
    r = cli.run(*args, "--workdir", workdir, env={"JAX_COMPILATION_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    summaries.append(json.loads((workdir / "identity" / "seed0" / "summary.json").read_text()))
    if name == "first":
      first_entries = _entries(cache)
      assert first_entries  # the step, the eval and the init were written
  assert _entries(cache) == first_entries  # every program of the second run came from the cache
  for name, s in zip(("first", "second"), summaries):
    assert s["compile_s"] > 0 and s["compile_cache"] == str(cache)
    assert s["remat_used"] == "none"  # the recipe's "auto" at depth 8: no scanned stack
    p = s["provenance"]
    assert shlex.split(p["command"]) == cli.argv(*args, "--workdir", tmp_path / name)
    assert p["versions"]["jax"] == importlib.metadata.version("jax")
    assert _utc(p["started"]) <= _utc(p["finished"])
  config_json = json.loads((tmp_path / "second" / "config.json").read_text())
  assert config_json["provenance"]["command"] == p["command"]
  md = (tmp_path / "second" / "results.md").read_text()
  assert f"- Command: `{p['command']}`" in _footer(md)
  print("compile_s first, second:", [s["compile_s"] for s in summaries])
