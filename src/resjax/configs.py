"""Helpers shared by the experiment files: the arg string, run rows, overrides, durations.

An experiment file's ``get_config(arg)`` receives the text after the colon of
``--config experiments/FILE.py:scale=cpu,run=identity`` and parses it with ``parse_arg``.
"""

from __future__ import annotations

import copy
import math
import ml_collections

from resjax.errors import ConfigError

SCALES = ("paper", "cpu", "test")


def _typed(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"scale=cpu,run=identity,seeds=3"`` into a ConfigDict, typed after ``defaults``.

  Keys not in ``defaults`` are an error, so a typo cannot silently run the wrong experiment.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config arg {key!r}: the args of this file are "
                        f"{', '.join(sorted(defaults))} (e.g. :scale=cpu)")
    out[key] = _typed(value.strip()) if sep else True
  if "scale" in out and out["scale"] not in SCALES:
    raise ConfigError(f"unknown scale {out['scale']!r}: use one of {', '.join(SCALES)}")
  return ml_collections.ConfigDict(out)


def row(name: str, label: str, *, paper_error: float | None = None, paper_failed: bool = False,
        paper: float | None = None, series: str | None = None, x: float | None = None,
        **overrides) -> ml_collections.ConfigDict:
  """One row of a paper table: a run name, its label, the paper's number and its config overrides.

  ``paper_error`` / ``paper_failed``: the paper's test error % (or "fail") for error tables;
  ``paper``: the paper's value of the experiment's metric otherwise (e.g. a validation loss).
  ``series`` and ``x``: for figures of a metric against a swept quantity (a line per series).
  Overrides are dotted keys written with "__" for "." (``model__shortcut__name="scaling"``).
  """
  return ml_collections.ConfigDict({
      "name": name, "label": label, "paper_error": paper_error, "paper_failed": paper_failed,
      "paper": paper if paper is not None else paper_error, "series": series, "x": x,
      # (dotted key, value) pairs: ConfigDict keys cannot hold dots.
      "overrides": tuple((k.replace("__", "."), v) for k, v in overrides.items())})


def set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    if part not in node:
      raise ConfigError(f"override {key!r} names no config field: check the run's overrides")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"override {key!r} names no config field: check the run's overrides")
  with node.ignore_type():
    node[leaf] = value


def get_dotted(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def run_config(config: ml_collections.ConfigDict, run, keep: tuple[str, ...] = ()):
  """The experiment's config with one row's overrides applied (the shared ``runs`` list dropped).

  ``keep``: dotted keys the user set on the command line. They win over the row, since a flag the
  user typed must never be dropped silently.
  """
  out = copy.deepcopy(config)
  with out.ignore_type():
    out.runs = []
  for key, value in run.overrides:
    if not any(key == k or key.startswith(k + ".") for k in keep):
      set_dotted(out, key, value)
  return out


def select_runs(config: ml_collections.ConfigDict) -> list:
  """The rows to train: all of them, or the one named by ``config.run``."""
  runs = list(config.runs)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ConfigError("two runs share a name: make run names unique in the experiment file")
  wanted = config.get("run")
  if not wanted:
    return runs
  if wanted not in names:
    raise ConfigError(f"unknown run {wanted!r}: use one of {', '.join(names)}")
  return [r for r in runs if r.name == wanted]


def to_steps(amount: float, unit: str, *, train_size: int, batch_size: int) -> int:
  """Converts a duration in the paper's unit ('iterations', 'epochs' or 'examples') to steps."""
  if unit in ("iterations", "steps"):
    return int(amount)
  if unit == "epochs":
    return int(math.ceil(amount * train_size / batch_size))
  if unit == "examples":
    return int(math.ceil(amount / batch_size))
  raise ConfigError(f"unknown duration unit {unit!r}: use iterations, epochs or examples")


def schedule_steps(config, train_size: int) -> dict[str, object]:
  """Total, warm-up and decay boundaries of ``config.schedule`` in steps."""
  s = config.schedule
  conv = lambda v: to_steps(v, s.unit, train_size=train_size, batch_size=config.batch_size)
  return {"total": conv(s.total), "warmup": conv(s.get("warmup", 0) or 0),
          "boundaries": [conv(b) for b in s.get("boundaries", ())]}

