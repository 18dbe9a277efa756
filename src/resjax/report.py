"""Turns a workdir of finished (or unfinished) runs into results.md and figure.png.

Layout read: WORKDIR/<run name>/seed<k>/{summary.json, metrics.jsonl}. Anything
missing means "not run yet"; nothing here raises on a partial workdir.
"""

import dataclasses
import io
import math
import os
import re
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resjax import claims, fileio

_SEED_DIR = re.compile(r"seed(\d+)")
# A failed summary whose reason names nan/inf diverged, even if `final` kept an older eval.
_DIVERGED = re.compile(r"\b(nan|inf|infinite|diverg\w*)\b", re.IGNORECASE)


@dataclasses.dataclass
class SeedResult:
  """One seed of one row, as read from its directory."""
  seed: int
  status: str  # 'ok' | 'failed' | 'running'
  error: float | None  # inf when the loss diverged; None when no eval yet
  diverged_step: int | None
  reason: str | None
  steps: int
  total_steps: int | None
  wall_s: float
  metrics: list[dict]
  provenance: dict | None = None  # resjax.provenance's record, with the run's start and end


@dataclasses.dataclass
class RowResult:
  """One table row: its config fields and the seeds found on disk."""
  name: str
  label: str
  paper_error: float | None
  paper_failed: bool
  failure_error: float
  seeds: list[SeedResult]
  paper_value: float | None = None
  series: str | None = None
  x: float | None = None

  @property
  def errors(self) -> list[float]:
    return [s.error for s in self.seeds if s.error is not None]

  @property
  def median(self) -> float | None:
    return float(np.median(self.errors)) if self.errors else None

  @property
  def running(self) -> bool:
    return any(s.status == "running" for s in self.seeds)

  @property
  def failed(self) -> bool | None:
    """True when the seed median is inf or above the threshold; None when unknown."""
    m = self.median
    return None if m is None else (math.isinf(m) or m > self.failure_error)

  @property
  def agree(self) -> bool | None:
    """Whether we match the paper on fail / not fail; None when not comparable yet."""
    paper_claims = self.paper_failed or self.paper_error is not None
    if self.running or self.failed is None or not paper_claims or math.isinf(self.failure_error):
      return None  # no fail line for this row (a CIFAR-100 row, say): nothing to agree on
    return self.failed == self.paper_failed


def _read_json(path):
  try:
    return fileio.loads(fileio.read_text(path))
  except (OSError, ValueError):
    return None  # absent, or caught mid-write by a live trainer


def load_run(run_dir: str) -> tuple[dict | None, list[dict]]:
  """Reads one seed directory: (summary or None, metric lines sorted by step).

  Lines for the same step are merged key by key, later lines winning, so a
  resumed run's re-logged steps replace the old ones while a step logged as
  separate train and eval lines keeps both.
  """
  summary = _read_json(os.path.join(run_dir, "summary.json"))
  by_step = {}
  try:
    text = fileio.read_text(os.path.join(run_dir, "metrics.jsonl"))
  except OSError:
    text = ""
  for line in text.splitlines():
    try:
      rec = fileio.loads(line)
    except ValueError:
      continue  # a line torn by a crash (the trainer ends it before appending the next)
    if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
      by_step.setdefault(int(rec["step"]), {}).update(rec)
  return (summary if isinstance(summary, dict) else None), [by_step[k] for k in sorted(by_step)]


def _finite_or_none(x):
  return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _last(metrics, key):
  vals = [m[key] for m in metrics if m.get(key) is not None]
  return vals[-1] if vals else None


def load_seed(run_dir: str, seed: int, metric: str = "test_error") -> SeedResult | None:
  """Reads one seed into a SeedResult; None when the directory holds nothing yet."""
  summary, metrics = load_run(run_dir)
  if summary is None and not metrics:
    return None
  summary = summary or {"status": "running"}  # metrics but no summary: still going
  final = summary.get("final") or {}
  status = summary.get("status") or "running"
  raw = final.get(metric, _last(metrics, metric))
  error = _finite_or_none(raw)
  reason = summary.get("reason")
  steps = summary.get("steps") or (metrics[-1]["step"] if metrics else 0)
  # Diverged: a non-finite loss or error anywhere we look, or the trainer said so. A failure
  # without either (a crash, OOM) is no result at all, not an inf.
  seen = [raw, final.get("train_loss"), final.get("test_loss"), _last(metrics, "train_loss")]
  nonfinite = any(isinstance(x, (int, float)) and not math.isfinite(x) for x in seen)
  diverged = nonfinite or (status == "failed" and bool(_DIVERGED.search(reason or "")))
  return SeedResult(
      seed=seed, status=status, error=math.inf if diverged else error,
      diverged_step=(summary.get("failed_step") or steps) if diverged else None,
      reason=reason, steps=steps, total_steps=summary.get("total_steps"),
      wall_s=float(summary.get("wall_s") or _last(metrics, "wall_s") or 0.0),
      metrics=metrics, provenance=summary.get("provenance"))


def row_result(workdir: str, run, failure_error: float, metric: str = "test_error") -> RowResult:
  """Collects every seed<k>/ under WORKDIR/<run name>/, in seed order.

  `run` is one entry of config.runs: a ConfigDict or a plain dict (ConfigDict keeps
  dicts inside lists as dicts), so only item access and .get are used.
  """
  run_dir = os.path.join(workdir, run["name"])
  found = []
  if fileio.isdir(run_dir):
    for entry in fileio.listdir(run_dir):
      m = _SEED_DIR.fullmatch(entry)
      if m and fileio.isdir(os.path.join(run_dir, entry)):
        found.append((int(m.group(1)), entry))
  seeds = [load_seed(os.path.join(run_dir, e), k, metric) for k, e in sorted(found)]
  for key, value in run.get("overrides", ()) or ():
    if key == "failure_error":  # a row may judge failure by its own threshold, or not at all
      failure_error = math.inf if value is None else value
  return RowResult(
      name=run["name"], label=run.get("label", run["name"]), paper_error=run.get("paper_error"),
      paper_failed=bool(run.get("paper_failed", False)), failure_error=float(failure_error),
      seeds=[s for s in seeds if s is not None], paper_value=run.get("paper", run.get("paper_error")),
      series=run.get("series"), x=run.get("x"))


def collect_rows(workdir: str, config) -> list[RowResult]:
  """One RowResult per entry of config.runs, in config order."""
  metric = config.get("metric", "test_error")
  threshold = config.get("failure_error", None)
  threshold = math.inf if threshold is None else threshold
  return [row_result(workdir, r, threshold, metric) for r in config.runs]


def _cell(text) -> str:
  return str(text).replace("|", r"\|")


def _fmt_error(row: RowResult) -> str:
  errs = row.errors
  if not row.seeds:
    return "not run"
  if not errs:
    return "no eval yet" if row.running else "no result"
  diverged = [s for s in row.seeds if s.error == math.inf]
  at = ("step " if len(diverged) == 1 else "steps ") + ", ".join(
      str(s.diverged_step) for s in diverged)
  if len(errs) == 1:
    return f"diverged at {at}" if diverged else f"{errs[0]:.2f}"
  if math.isinf(row.median):
    return f"diverged ({len(diverged)} of {len(errs)} seeds, at {at})"
  if diverged:
    return f"{row.median:.2f} (n={len(errs)}, {len(diverged)} diverged at {at})"
  return f"{row.median:.2f} ({np.mean(errs):.2f} ± {np.std(errs, ddof=1):.2f}, n={len(errs)})"


def _fmt_status(row: RowResult) -> str:
  if not row.seeds:
    return "not run"
  if row.running:
    if len(row.seeds) == 1:
      s = row.seeds[0]
      return f'running (step {s.steps}/{s.total_steps or "?"})'
    done = sum(s.status != "running" for s in row.seeds)
    return f"running ({done}/{len(row.seeds)} seeds done)"
  if row.failed is None:
    crashed = [s.reason for s in row.seeds if s.status == "failed"]
    return f'crashed: {crashed[0] or "no reason given"}'[:80] if crashed else "no eval"
  if row.failed:
    if math.isinf(row.median):
      return "fail: loss diverged"
    return f"fail: {row.median:.2f}% > {row.failure_error:g}%"
  bad = sum(s.status == "failed" or s.error == math.inf for s in row.seeds)
  return f"ok ({bad} of {len(row.seeds)} seeds failed)" if bad else "ok"


def _fmt_duration(s: float) -> str:
  s = int(round(s))
  h, m, sec = s // 3600, s // 60 % 60, s % 60
  return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


def row_wall_time(rows: list[RowResult]) -> float:
  """Wall time of the table: seeds of a row train side by side, so each row counts once."""
  return sum(max([s.wall_s for s in r.seeds] or [0.0]) for r in rows)


def depths_run(config) -> str:
  """The depths the rows train at: the model's, or those rows set themselves (e.g. '20, 56')."""
  base = config.get("model", {}).get("depth", "?")
  depths = []
  for r in config.get("runs", None) or [None]:
    d = dict((r or {}).get("overrides", None) or ()).get("model.depth", base)
    if d not in depths:
      depths.append(d)
  return ", ".join(str(d) for d in depths)


def render_markdown(rows: list[RowResult], config) -> str:
  """The results.md text for `rows` (as returned by collect_rows)."""
  scale = config.get("scale", "paper")
  thr = float(config.failure_error)
  metric = config.get("metric", "test_error")
  data = config.get("data", {}).get("name", "?")
  sched = config.get("schedule", {})
  steps = f"{sched.get('total', '?')} {sched.get('unit', 'iterations')}"
  depth = depths_run(config)
  out = [f"# {config.experiment}", "",
         f'Paper: {config.get("paper", "?")}  ',
         f'Scale: {scale} · data: {data} · depth: {depth} · {steps} · '
         f'batch: {config.get("batch_size", "?")} · metric: {metric} · '
         f'a row fails when its seed-median {metric} is above {thr:g}% or its loss diverged', ""]
  if scale != "paper":
    judged = ("the claims below, judged against the baseline row; the absolute fail line "
              "belongs to the paper's budget" if config.get("claims") else
              "whether each row fails or not")
    out += [f"> Scale '{scale}' uses different data and training length than the paper, so the "
            f"error values are not comparable with the paper's. The comparable facts are {judged}.",
            ""]
  out += ["| Run | Paper error % | Ours error % | Ours status | Agree on fail? |",
          "|---|---|---|---|---|"]
  for r in rows:
    paper = "fail" if r.paper_failed else "—" if r.paper_error is None else f"{r.paper_error:.2f}"
    agree = "—" if r.agree is None else "yes" if r.agree else "no"
    cells = [r.label, paper, _fmt_error(r), _fmt_status(r), agree]
    out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  compared = [r for r in rows if r.agree is not None]
  ran = [r for r in rows if r.seeds]
  notes = [f"{len(rows) - len(ran)} not run"] if len(ran) < len(rows) else []
  if sum(r.running for r in rows):
    notes.append(f"{sum(r.running for r in rows)} still running")
  judged = [r for r in ran if not r.running and r.failed is not None and r.agree is None]
  no_line = sum(1 for r in judged if math.isinf(r.failure_error))
  if len(judged) - no_line:
    notes.append(f"{len(judged) - no_line} without a paper value")
  if no_line:
    notes.append(f"{no_line} without a fail line")
  no_eval = sum(1 for r in ran if not r.running and r.failed is None)
  if no_eval:
    notes.append(f"{no_eval} without a result")
  n_seeds = sum(len(r.seeds) for r in rows)
  wall = row_wall_time(rows)
  out += ["", f"Agree with the paper on fail / not fail: {sum(r.agree for r in compared)} of "
          f"{len(compared)} rows compared" + (f' ({", ".join(notes)}).' if notes else "."),
          f"Total wall time: {_fmt_duration(wall)} over {n_seeds} seed runs. "
          "(Seeds of a row train side by side: a row counts its wall time once.) "
          "Multi-seed cells read median (mean ± sample std, n=seeds).", ""]
  return "\n".join(out)


def _median_curve(seeds: list[SeedResult], key: str):
  """Median over seeds at the steps every seed logged `key`; nan counts as inf."""
  per_seed = [{m["step"]: m[key] for m in s.metrics if m.get(key) is not None} for s in seeds]
  per_seed = [d for d in per_seed if d]
  if not per_seed:
    return np.zeros(0), np.zeros(0)
  steps = sorted(set.intersection(*(set(d) for d in per_seed)))
  vals = np.array([[d[t] for t in steps] for d in per_seed], dtype=float).reshape(len(per_seed), -1)
  vals[np.isnan(vals)] = np.inf  # a nan loss is a diverged run: worst, not missing
  return np.array(steps, dtype=float), np.median(vals, axis=0)


def plot_figure(rows: list[RowResult], config, path) -> None:
  """Training loss and test error vs iterations, one line per row, saved as PNG to `path`."""
  metric = config.get("metric", "test_error")
  thr = config.get("failure_error", None)
  percent = metric.endswith("error")
  # A bare Figure on an Agg canvas: no pyplot global state, no display needed.
  fig = Figure(figsize=(13, 5.5 + 0.25 * len(rows)), layout="constrained")
  FigureCanvasAgg(fig)
  ax_loss, ax_err = fig.subplots(1, 2)
  curves = [(_median_curve(r.seeds, "train_loss"), _median_curve(r.seeds, metric)) for r in rows]
  finite = np.concatenate([c[0][1][np.isfinite(c[0][1])] for c in curves] + [np.zeros(0)])
  log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 100
  # Diverged points are drawn at the top of the panel instead of breaking the line.
  loss_cap = finite.max() * (10 if log else 1.2) if finite.size else 1.0
  # Colour by config position so a row keeps its colour across panels and reruns; past
  # ten rows the colours repeat with a new line style.
  palette, styles = matplotlib.colormaps["tab10"].colors, ["-", "--", "-.", ":"]
  for i, (row, ((xl, yl), (xe, ye))) in enumerate(zip(rows, curves)):
    kw = dict(color=palette[i % 10], linestyle=styles[i // 10 % 4], linewidth=1.4)
    label = row.label if row.seeds else f"{row.label} (not run)"
    if len(row.seeds) > 1:
      label += f" [median of {len(row.seeds)} seeds]"
    # A lone point (eval once, or diverged at the first log) needs a marker to show at all.
    ax_loss.plot(xl, np.nan_to_num(yl, nan=loss_cap, posinf=loss_cap, neginf=0.0), label=label,
                 marker="o" if len(xl) == 1 else None, **kw)
    if percent:
      ye = np.clip(np.nan_to_num(ye, nan=100.0, posinf=100.0), 0.0, 100.0)
    ax_err.plot(xe, ye, marker="o" if len(xe) == 1 else None, **kw)
  if thr is not None:
    ax_err.axhline(thr, color="black", linestyle="--", linewidth=1.0,
                   label=f"failure threshold ({thr:g}%)")
  if log:
    ax_loss.set_yscale("log")
  ax_loss.set(xlabel="iterations", ylabel="training loss", title="training loss")
  unit = " (%)" if percent else ""
  ax_err.set(xlabel="iterations", ylabel=f"{metric}{unit}", title=f"{metric}{unit}")
  if percent:
    ax_err.set_ylim(bottom=0)
  for ax in (ax_loss, ax_err):
    ax.grid(True, alpha=0.3)
  handles, labels = ax_loss.get_legend_handles_labels()
  h_thr, l_thr = ax_err.get_legend_handles_labels()
  fig.legend(handles + h_thr, labels + l_thr, loc="outside lower center", ncol=2, fontsize=9,
             frameon=False)
  title = textwrap.fill(str(config.experiment), 110)
  fig.suptitle(f'{title}\nscale: {config.get("scale", "paper")}', fontsize=11)
  fig.savefig(path, format="png", dpi=100)


def atomic_write(path: str, write) -> None:
  """Calls write(file) on an in-memory buffer, then writes it to ``path`` atomically."""
  buf = io.BytesIO()
  write(buf)
  fileio.write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------- comparison tables
# For experiments whose claim is "row X beats the baseline" (a loss, several seeds): mean ± std,
# the difference to the baseline row and a paired t-test p-value, instead of fail / not fail.
# Rows train the same seed ids on the same data streams, so seed k of one row is compared with
# seed k of the other: the seed-to-seed spread they share cancels.


def finished_values(row: RowResult, metric: str) -> dict[int, float]:
  """Seed id -> final value of the row's finished seeds that did not diverge."""
  return {s: v for s, v in claims.seed_values(row, metric).items() if math.isfinite(v)}


def paired_p(a: dict[int, float], b: dict[int, float]) -> tuple[float | None, float | None]:
  """(two-sided paired t-test p of a - b, mean of a - b) over the seed ids in both.

  p is None below two pairs, the mean None without any.
  """
  seeds = sorted(set(a) & set(b))
  d = [a[s] - b[s] for s in seeds]
  if len(d) < 2:
    return None, (float(d[0]) if d else None)
  p_up, p_down = claims.one_sided_p(d)
  return min(1.0, 2 * min(p_up, p_down)), float(np.mean(d))


def _mean_std(values: list[float]) -> str:
  if not values:
    return "not run"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def _fmt_p(p: float | None) -> str:
  return "—" if p is None else f"{p:.3g}"


def render_comparison(rows: list[RowResult], config) -> str:
  """results.md for a comparison experiment: each row against ``config.baseline``."""
  metric = config.get("metric", "test_loss")
  base_name = config.get("baseline", None)
  base = next((r for r in rows if r.name == base_name), None)
  ref_series = config.get("reference_series", None)

  def baseline_of(r):
    """The row ``r`` is tested against: the reference series at the same x, else the baseline."""
    if ref_series is not None and r.x is not None:
      return next((b for b in rows if b.series == ref_series and b.x == r.x), None)
    return base

  sched = config.get("schedule", {})
  out = [f"# {config.experiment}", "", f'Paper: {config.get("paper", "?")}  ',
         f'Scale: {config.get("scale", "paper")} · data: {config.get("data", {}).get("name", "?")} · '
         f"{sched.get('total', '?')} {sched.get('unit', 'iterations')} · batch: "
         f'{config.get("batch_size", "?")} · metric: {metric} (final, lower is better)', ""]
  if config.get("scale", "paper") != "paper":
    out += [f"> Scale '{config.get('scale')}' differs from the paper's data and length: the "
            "paper's numbers are for reference; the comparable facts are the differences to the "
            "baseline and whether they are significant.", ""]
  against = (f'the {ref_series} row at the same {config.get("x_label", "x")}'
             if ref_series is not None else "the baseline")
  out += [f"Δ and p compare each row with {against}, seed by seed over the seeds both finished "
          "(rows share seed ids and data streams).", "",
          f"| Run | Paper | Ours {metric} | Δ vs baseline (mean paired difference) | "
          "p (two-sided paired t-test) |", "|---|---|---|---|---|"]
  for r in rows:
    base = baseline_of(r)
    vals = [e for e in r.errors if math.isfinite(e)]
    diverged = len(r.errors) - len(vals)
    ours = _mean_std(vals) + (f", {diverged} diverged" if diverged else "")
    if r.running:
      ours += " (running)"
    delta = p = "—"
    if base is not None and r is not base:
      pval, mean_d = paired_p(finished_values(r, metric), finished_values(base, metric))
      delta = "—" if mean_d is None else f"{mean_d:+.4f}"
      p = _fmt_p(pval)
    paper = "—" if r.paper_value is None else f"{r.paper_value:g}"
    out.append("| " + " | ".join(_cell(c) for c in (r.label, paper, ours, delta, p)) + " |")
  alpha = config.get("alpha", 0.05)
  sig = []
  for r in rows:
    base = baseline_of(r)
    if base is not None and r is not base:
      p, mean_d = paired_p(finished_values(r, metric), finished_values(base, metric))
      if p is not None:
        word = ("better" if mean_d < 0 else "worse") if p < alpha else None
        sig.append(f"{r.label}: " + (f"{word} than {base.label} (p={p:.3g})" if word else
                                     f"no significant difference from {base.label} at this "
                                     f"scale (p={p:.3g})"))
  if sig:
    out += ["", f"Significance at alpha={alpha:g} (two-sided paired t-test over shared seeds):",
            ""]
    out += [f"- {line}" for line in sig]
  n_seeds = sum(len(r.seeds) for r in rows)
  wall = row_wall_time(rows)
  out += ["", f"Wall time: {_fmt_duration(wall)} over {n_seeds} seed runs (seeds of a row train "
          "side by side, so a row costs one wall time).", ""]
  out += against_x_summary(rows, config)
  return "\n".join(out)


# ------------------------------------------------------------------ a metric against a sweep
# Rows with ``series`` and ``x`` (e.g. a shortcut variant and its depth) draw one line per series;
# results.md then says where each series' advantage over ``config.reference_series`` changes sign.


def _series(rows: list[RowResult]) -> dict[str, list[tuple[float, list[float]]]]:
  out: dict[str, list] = {}
  for r in rows:
    if r.series is None or r.x is None:
      continue
    vals = [e for e in r.errors if math.isfinite(e)]
    out.setdefault(r.series, []).append((float(r.x), vals, len(r.errors) - len(vals)))
  return {k: sorted(v) for k, v in out.items()}


def sign_changes(reference: dict[float, float], series: dict[float, float]) -> list[float]:
  """The x values at which ``series - reference`` changes sign (first x of the new sign)."""
  xs = sorted(set(reference) & set(series))
  signs = [np.sign(series[x] - reference[x]) for x in xs]
  return [xs[i] for i in range(1, len(xs)) if signs[i] != 0 and signs[i - 1] != 0 and
          signs[i] != signs[i - 1]]


def against_x_summary(rows: list[RowResult], config) -> list[str]:
  ref_name = config.get("reference_series", None)
  series = _series(rows)
  if not series or ref_name not in series:
    return []
  x_name = config.get("x_label", "x")
  metric = config.get("metric", "test_error")
  ref = {x: float(np.mean(v)) for x, v, _ in series[ref_name] if v}
  out = [f"Final {metric} against {x_name}, and where each variant's advantage over "
         f"{ref_name} changes sign (lower is better; diverged runs count as worse):", "",
         "| Variant | " + " | ".join(f"{x:g}" for x in sorted(ref)) + " | sign changes at |",
         "|---|" + "---|" * (len(ref) + 1)]
  for name, points in series.items():
    # A point whose seeds all diverged is inf; one with no result yet (not run) is left out.
    means = {x: (float(np.mean(v)) if v else math.inf) for x, v, d in points if v or d}
    cells = [(f"{means[x]:.4f}" if math.isfinite(means.get(x, math.nan)) else
              "diverged" if x in means else "—") for x in sorted(ref)]
    if name == ref_name:
      change = "reference"
    else:
      xs = sign_changes(ref, means)
      ahead = [x for x in sorted(ref) if x in means and means[x] < ref[x]]
      change = (", ".join(f"{x:g}" for x in xs) if xs else
                "never (always ahead)" if len(ahead) == len([x for x in ref if x in means]) else
                "never (never ahead)" if not ahead else "never")
    out.append(f"| {name} | " + " | ".join(cells) + f" | {change} |")
  return out + [""]


def plot_against_x(rows: list[RowResult], config, path) -> None:
  """Final metric against ``x`` (log axis), a line per series, mean over seeds with std bars."""
  metric = config.get("metric", "test_error")
  fig = Figure(figsize=(8, 5.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  palette = matplotlib.colormaps["tab10"].colors
  top = []
  for i, (name, points) in enumerate(_series(rows).items()):
    xs = [x for x, v, _ in points if v]
    ys = [float(np.mean(v)) for _, v, _ in points if v]
    es = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for _, v, _ in points if v]
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=palette[i % 10], label=name)
    top += ys
    bad = [x for x, v, d in points if d and not v]
    if bad:
      ax.scatter(bad, [max(top or [1.0]) * 1.05] * len(bad), marker="x", color=palette[i % 10],
                 label=f"{name}: diverged")
  ax.set_xscale("log", base=2)
  ax.set(xlabel=config.get("x_label", "x"), ylabel=f"final {metric}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=9)
  fig.suptitle(f'{textwrap.fill(str(config.experiment), 90)}\nscale: {config.get("scale", "paper")}',
               fontsize=11)
  fig.savefig(path, format="png", dpi=100)


# ------------------------------------------------------------------------------- provenance
# The footer: how the runs in the table were made, from their summary.json (resjax.provenance).
# A fact the runs disagree on (rows trained under two commits) is listed with its rows, never
# reduced to one value.


def _provenance_facts(p: dict) -> dict[str, str]:
  commit, device = p.get("commit"), p.get("device") or {}
  kind, platform = device.get("kind", "?"), device.get("platform", "?")
  procs = p.get("process_count")
  return {
      "Commit": ("not a git checkout" if commit is None else
                 f"`{commit}`" + (" (dirty)" if p.get("dirty") else "")),
      "Versions": ", ".join(f"{k} {v}" for k, v in (p.get("versions") or {}).items()),
      "Device": (f"{device.get('count', '?')} × {kind}"
                 + (f" ({platform})" if platform != kind else "")
                 + f", {procs} process{'es' if procs != 1 else ''}"),
      "Command": f"`{p.get('command', '?')}`",
  }


def _where(runs: list[tuple[str, int]], recorded: dict[str, int]) -> str:
  """'identity, gate' for whole rows, 'identity/seed1' for a row whose seeds disagree."""
  per_row: dict[str, list[int]] = {}
  for row, seed in runs:
    per_row.setdefault(row, []).append(seed)
  return ", ".join(row if len(seeds) == recorded[row] else
                   ", ".join(f"{row}/seed{s}" for s in seeds) for row, seeds in per_row.items())


def render_provenance(rows: list[RowResult], workdir: str) -> list[str]:
  """The footer lines: commit, versions, device, command and time span of the seed runs."""
  records = [((r.name, s.seed), s.provenance) for r in rows for s in r.seeds if s.provenance]
  source = "the seed runs' summary.json"
  if not records:  # nothing finished yet: the record of the process that wrote config.json
    config_json = _read_json(os.path.join(workdir, "config.json")) or {}
    if not config_json.get("provenance"):
      return []
    records = [(("config.json", 0), config_json["provenance"])]
    finished = any(s.status != "running" for r in rows for s in r.seeds)
    # config.json is rewritten by every command on the workdir, a resume that trains nothing
    # included: it says who last ran here, not what trained rows recorded before provenance.
    source = ("config.json, the last command run on this workdir; the seed runs carry no record "
              "(written before resjax recorded provenance), so what trained them is not known"
              if finished else "config.json (no seed run has finished yet)")
  recorded: dict[str, int] = {}
  for (row, _), _ in records:
    recorded[row] = recorded.get(row, 0) + 1
  out = ["## Provenance", "", f"From {source}.", ""]
  facts = [(where, _provenance_facts(p)) for where, p in records]
  for field in facts[0][1]:
    seen: dict[str, list[tuple[str, int]]] = {}
    for where, f in facts:
      seen.setdefault(f[field], []).append(where)
    if len(seen) == 1:
      out.append(f"- {field}: {next(iter(seen))}")
    else:
      out.append(f"- {field}: differs between runs:")
      out += [f"  - {value}: {_where(where, recorded)}" for value, where in seen.items()]
  starts = [p["started"] for _, p in records if p.get("started")]
  ends = [p["finished"] for _, p in records if p.get("finished")]
  if starts and records[0][0][0] == "config.json":
    out.append(f"- Started: {starts[0]} (UTC)")
  elif starts:
    out.append(f'- Runs: {min(starts)} to {max(ends) if ends else "?"} (UTC)')
  missing = sum(1 for r in rows for s in r.seeds if not s.provenance)
  if missing and records[0][0][0] != "config.json":
    out.append(f'- {missing} seed run{"s" if missing != 1 else ""} without a record (still '
               'running, or written before resjax recorded provenance)')
  return out + [""]


def write_report(workdir: str, config) -> tuple[str, str]:
  """Writes WORKDIR/results.md and WORKDIR/figure.png; returns (md_path, png_path).

  ``config.report``: "failure" (the paper's fail / not fail table, the default) or "compare"
  (mean ± std against ``config.baseline`` with a paired t-test). ``config.figure``: "curves"
  (training curves, the default) or "against_x" (final metric against the rows' ``x``, a line per
  series). With ``config.claims`` set, either kind ends with the Claims section (resjax.claims).
  """
  fileio.makedirs(workdir)
  rows = collect_rows(workdir, config)
  md_path = os.path.join(workdir, "results.md")
  png_path = os.path.join(workdir, "figure.png")
  if config.get("report", "failure") == "compare":
    text = render_comparison(rows, config)
  else:
    text = render_markdown(rows, config) + "\n".join(against_x_summary(rows, config))
  if config.get("claims", None):
    section = claims.render(claims.evaluate(rows, config), config)
    text = text.rstrip("\n") + "\n\n" + "\n".join(section)
  footer = render_provenance(rows, workdir)
  if footer:
    text = text.rstrip("\n") + "\n\n" + "\n".join(footer)
  plot = plot_against_x if config.get("figure", "curves") == "against_x" else plot_figure
  atomic_write(md_path, lambda f: f.write(text.encode("utf-8")))
  atomic_write(png_path, lambda f: plot(rows, config, f))
  return md_path, png_path
