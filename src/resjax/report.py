"""Turns a workdir of finished (or unfinished) runs into results.md and figure.png.

Layout read: WORKDIR/<run name>/seed<k>/{summary.json, metrics.jsonl}. Anything
missing means "not run yet"; nothing here raises on a partial workdir.
"""

import dataclasses
import json
import math
import os
import re
import tempfile
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_SEED_DIR = re.compile(r'seed(\d+)')
# A failed summary whose reason names nan/inf diverged, even if `final` kept an older eval.
_DIVERGED = re.compile(r'\b(nan|inf|infinite|diverg\w*)\b', re.IGNORECASE)


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


@dataclasses.dataclass
class RowResult:
  """One table row: its config fields and the seeds found on disk."""
  name: str
  label: str
  paper_error: float | None
  paper_failed: bool
  failure_error: float
  seeds: list[SeedResult]

  @property
  def errors(self) -> list[float]:
    return [s.error for s in self.seeds if s.error is not None]

  @property
  def median(self) -> float | None:
    return float(np.median(self.errors)) if self.errors else None

  @property
  def running(self) -> bool:
    return any(s.status == 'running' for s in self.seeds)

  @property
  def failed(self) -> bool | None:
    """True when the seed median is inf or above the threshold; None when unknown."""
    m = self.median
    return None if m is None else (math.isinf(m) or m > self.failure_error)

  @property
  def agree(self) -> bool | None:
    """Whether we match the paper on fail / not fail; None when not comparable yet."""
    paper_claims = self.paper_failed or self.paper_error is not None
    if self.running or self.failed is None or not paper_claims:
      return None
    return self.failed == self.paper_failed


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # absent, or caught mid-write by a live trainer


def load_run(run_dir: str) -> tuple[dict | None, list[dict]]:
  """Reads one seed directory: (summary or None, metric lines sorted by step).

  Lines for the same step are merged key by key, later lines winning, so a
  resumed run's re-logged steps replace the old ones while a step logged as
  separate train and eval lines keeps both.
  """
  summary = _read_json(os.path.join(run_dir, 'summary.json'))
  by_step = {}
  try:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue  # a torn last line from a crash
        if isinstance(rec, dict) and isinstance(rec.get('step'), (int, float)):
          by_step.setdefault(int(rec['step']), {}).update(rec)
  except OSError:
    pass
  return (summary if isinstance(summary, dict) else None), [by_step[k] for k in sorted(by_step)]


def _finite_or_none(x):
  return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _last(metrics, key):
  vals = [m[key] for m in metrics if m.get(key) is not None]
  return vals[-1] if vals else None


def load_seed(run_dir: str, seed: int, metric: str = 'test_error') -> SeedResult | None:
  """Reads one seed into a SeedResult; None when the directory holds nothing yet."""
  summary, metrics = load_run(run_dir)
  if summary is None and not metrics:
    return None
  summary = summary or {'status': 'running'}  # metrics but no summary: still going
  final = summary.get('final') or {}
  status = summary.get('status') or 'running'
  raw = final.get(metric, _last(metrics, metric))
  error = _finite_or_none(raw)
  reason = summary.get('reason')
  steps = summary.get('steps') or (metrics[-1]['step'] if metrics else 0)
  # Diverged: a non-finite loss or error anywhere we look, or the trainer said so. A failure
  # without either (a crash, OOM) is no result at all, not an inf.
  seen = [raw, final.get('train_loss'), final.get('test_loss'), _last(metrics, 'train_loss')]
  nonfinite = any(isinstance(x, (int, float)) and not math.isfinite(x) for x in seen)
  diverged = nonfinite or (status == 'failed' and bool(_DIVERGED.search(reason or '')))
  return SeedResult(
      seed=seed, status=status, error=math.inf if diverged else error,
      diverged_step=(summary.get('failed_step') or steps) if diverged else None,
      reason=reason, steps=steps, total_steps=summary.get('total_steps'),
      wall_s=float(summary.get('wall_s') or _last(metrics, 'wall_s') or 0.0),
      metrics=metrics)


def row_result(workdir: str, run, failure_error: float, metric: str = 'test_error') -> RowResult:
  """Collects every seed<k>/ under WORKDIR/<run name>/, in seed order.

  `run` is one entry of config.runs: a ConfigDict or a plain dict (ConfigDict keeps
  dicts inside lists as dicts), so only item access and .get are used.
  """
  run_dir = os.path.join(workdir, run['name'])
  found = []
  if os.path.isdir(run_dir):
    for entry in os.listdir(run_dir):
      m = _SEED_DIR.fullmatch(entry)
      if m and os.path.isdir(os.path.join(run_dir, entry)):
        found.append((int(m.group(1)), entry))
  seeds = [load_seed(os.path.join(run_dir, e), k, metric) for k, e in sorted(found)]
  return RowResult(
      name=run['name'], label=run.get('label', run['name']), paper_error=run.get('paper_error'),
      paper_failed=bool(run.get('paper_failed', False)), failure_error=float(failure_error),
      seeds=[s for s in seeds if s is not None])


def collect_rows(workdir: str, config) -> list[RowResult]:
  """One RowResult per entry of config.runs, in config order."""
  metric = config.get('metric', 'test_error')
  return [row_result(workdir, r, config.failure_error, metric) for r in config.runs]


def _cell(text) -> str:
  return str(text).replace('|', r'\|')


def _fmt_error(row: RowResult) -> str:
  errs = row.errors
  if not row.seeds:
    return 'not run'
  if not errs:
    return 'no eval yet' if row.running else 'no result'
  diverged = [s for s in row.seeds if s.error == math.inf]
  at = ('step ' if len(diverged) == 1 else 'steps ') + ', '.join(
      str(s.diverged_step) for s in diverged)
  if len(errs) == 1:
    return f'diverged at {at}' if diverged else f'{errs[0]:.2f}'
  if math.isinf(row.median):
    return f'diverged ({len(diverged)} of {len(errs)} seeds, at {at})'
  if diverged:
    return f'{row.median:.2f} (n={len(errs)}, {len(diverged)} diverged at {at})'
  return f'{row.median:.2f} ({np.mean(errs):.2f} ± {np.std(errs, ddof=1):.2f}, n={len(errs)})'


def _fmt_status(row: RowResult) -> str:
  if not row.seeds:
    return 'not run'
  if row.running:
    if len(row.seeds) == 1:
      s = row.seeds[0]
      return f'running (step {s.steps}/{s.total_steps or "?"})'
    done = sum(s.status != 'running' for s in row.seeds)
    return f'running ({done}/{len(row.seeds)} seeds done)'
  if row.failed is None:
    crashed = [s.reason for s in row.seeds if s.status == 'failed']
    return f'crashed: {crashed[0] or "no reason given"}'[:80] if crashed else 'no eval'
  if row.failed:
    if math.isinf(row.median):
      return 'fail: loss diverged'
    return f'fail: {row.median:.2f}% > {row.failure_error:g}%'
  bad = sum(s.status == 'failed' or s.error == math.inf for s in row.seeds)
  return f'ok ({bad} of {len(row.seeds)} seeds failed)' if bad else 'ok'


def _fmt_duration(s: float) -> str:
  s = int(round(s))
  h, m, sec = s // 3600, s // 60 % 60, s % 60
  return f'{h}h {m:02d}m' if h else f'{m}m {sec:02d}s' if m else f'{sec}s'


def render_markdown(rows: list[RowResult], config) -> str:
  """The results.md text for `rows` (as returned by collect_rows)."""
  scale = config.get('scale', 'paper')
  thr = float(config.failure_error)
  metric = config.get('metric', 'test_error')
  data = config.get('data', {}).get('name', '?')
  sched = config.get('schedule', {})
  steps = f"{sched.get('total', '?')} {sched.get('unit', 'iterations')}"
  depth = config.get('model', {}).get('depth', '?')
  out = [f'# {config.experiment}', '',
         f'Paper: {config.get("paper", "?")}  ',
         f'Scale: {scale} · data: {data} · depth: {depth} · {steps} · '
         f'batch: {config.get("batch_size", "?")} · metric: {metric} · '
         f'a row fails when its seed-median {metric} is above {thr:g}% or its loss diverged', '']
  if scale != 'paper':
    out += [f"> Scale '{scale}' uses different data and training length than the paper, so the "
            "error values are not comparable with the paper's. The comparable fact is whether "
            'each row fails or not.', '']
  out += ['| Run | Paper error % | Ours error % | Ours status | Agree on fail? |',
          '|---|---|---|---|---|']
  for r in rows:
    paper = 'fail' if r.paper_failed else '—' if r.paper_error is None else f'{r.paper_error:.2f}'
    agree = '—' if r.agree is None else 'yes' if r.agree else 'no'
    cells = [r.label, paper, _fmt_error(r), _fmt_status(r), agree]
    out.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
  compared = [r for r in rows if r.agree is not None]
  ran = [r for r in rows if r.seeds]
  notes = [f'{len(rows) - len(ran)} not run'] if len(ran) < len(rows) else []
  if sum(r.running for r in rows):
    notes.append(f'{sum(r.running for r in rows)} still running')
  no_claim = sum(1 for r in ran if not r.running and r.failed is not None and r.agree is None)
  if no_claim:
    notes.append(f'{no_claim} without a paper value')
  no_eval = sum(1 for r in ran if not r.running and r.failed is None)
  if no_eval:
    notes.append(f'{no_eval} without a result')
  n_seeds = sum(len(r.seeds) for r in rows)
  wall = sum(s.wall_s for r in rows for s in r.seeds)
  out += ['', f'Agree with the paper on fail / not fail: {sum(r.agree for r in compared)} of '
          f'{len(compared)} rows compared' + (f' ({", ".join(notes)}).' if notes else '.'),
          f'Total wall time: {_fmt_duration(wall)} over {n_seeds} seed runs. '
          'Multi-seed cells read median (mean ± sample std, n=seeds).', '']
  return '\n'.join(out)


def _median_curve(seeds: list[SeedResult], key: str):
  """Median over seeds at the steps every seed logged `key`; nan counts as inf."""
  per_seed = [{m['step']: m[key] for m in s.metrics if m.get(key) is not None} for s in seeds]
  per_seed = [d for d in per_seed if d]
  if not per_seed:
    return np.zeros(0), np.zeros(0)
  steps = sorted(set.intersection(*(set(d) for d in per_seed)))
  vals = np.array([[d[t] for t in steps] for d in per_seed], dtype=float).reshape(len(per_seed), -1)
  vals[np.isnan(vals)] = np.inf  # a nan loss is a diverged run: worst, not missing
  return np.array(steps, dtype=float), np.median(vals, axis=0)


def plot_figure(rows: list[RowResult], config, path) -> None:
  """Training loss and test error vs iterations, one line per row, saved as PNG to `path`."""
  metric = config.get('metric', 'test_error')
  thr = float(config.failure_error)
  # A bare Figure on an Agg canvas: no pyplot global state, no display needed.
  fig = Figure(figsize=(13, 5.5 + 0.25 * len(rows)), layout='constrained')
  FigureCanvasAgg(fig)
  ax_loss, ax_err = fig.subplots(1, 2)
  curves = [(_median_curve(r.seeds, 'train_loss'), _median_curve(r.seeds, metric)) for r in rows]
  finite = np.concatenate([c[0][1][np.isfinite(c[0][1])] for c in curves] + [np.zeros(0)])
  log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 100
  # Diverged points are drawn at the top of the panel instead of breaking the line.
  loss_cap = finite.max() * (10 if log else 1.2) if finite.size else 1.0
  # Colour by config position so a row keeps its colour across panels and reruns; past
  # ten rows the colours repeat with a new line style.
  palette, styles = matplotlib.colormaps['tab10'].colors, ['-', '--', '-.', ':']
  for i, (row, ((xl, yl), (xe, ye))) in enumerate(zip(rows, curves)):
    kw = dict(color=palette[i % 10], linestyle=styles[i // 10 % 4], linewidth=1.4)
    label = row.label if row.seeds else f'{row.label} (not run)'
    if len(row.seeds) > 1:
      label += f' [median of {len(row.seeds)} seeds]'
    # A lone point (eval once, or diverged at the first log) needs a marker to show at all.
    ax_loss.plot(xl, np.nan_to_num(yl, nan=loss_cap, posinf=loss_cap, neginf=0.0), label=label,
                 marker='o' if len(xl) == 1 else None, **kw)
    ax_err.plot(xe, np.clip(np.nan_to_num(ye, nan=100.0, posinf=100.0), 0.0, 100.0),
                marker='o' if len(xe) == 1 else None, **kw)
  ax_err.axhline(thr, color='black', linestyle='--', linewidth=1.0,
                 label=f'failure threshold ({thr:g}%)')
  if log:
    ax_loss.set_yscale('log')
  ax_loss.set(xlabel='iterations', ylabel='training loss', title='training loss')
  ax_err.set(xlabel='iterations', ylabel=f'{metric} (%)', title=f'{metric} (%)')
  ax_err.set_ylim(bottom=0)
  for ax in (ax_loss, ax_err):
    ax.grid(True, alpha=0.3)
  handles, labels = ax_loss.get_legend_handles_labels()
  h_thr, l_thr = ax_err.get_legend_handles_labels()
  fig.legend(handles + h_thr, labels + l_thr, loc='outside lower center', ncol=2, fontsize=9,
             frameon=False)
  title = textwrap.fill(str(config.experiment), 110)
  fig.suptitle(f'{title}\nscale: {config.get("scale", "paper")}', fontsize=11)
  fig.savefig(path, format='png', dpi=100)


def _atomic_write(path: str, write) -> None:
  """Calls write(file) on a temp file beside `path`, then renames it into place."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f'.{os.path.basename(path)}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read by others
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_report(workdir: str, config) -> tuple[str, str]:
  """Writes WORKDIR/results.md and WORKDIR/figure.png; returns (md_path, png_path)."""
  os.makedirs(workdir, exist_ok=True)
  rows = collect_rows(workdir, config)
  md_path = os.path.join(workdir, 'results.md')
  png_path = os.path.join(workdir, 'figure.png')
  text = render_markdown(rows, config)
  _atomic_write(md_path, lambda f: f.write(text.encode('utf-8')))
  _atomic_write(png_path, lambda f: plot_figure(rows, config, f))
  return md_path, png_path
