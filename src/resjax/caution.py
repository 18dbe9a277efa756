"""Does my residual form survive depth? One command, one verdict.

    python -m resjax.caution --shortcut examples/my_residuals.py:ChannelGate --workdir runs/gate
    python -m resjax.caution --shortcut lambda --shortcut conv1x1 --scale paper --workdir runs/c

Trains each form and the identity shortcut on both families, at several depths counted on one
axis in residual additions (a ResNet unit is one, a Transformer block two, a parallel block one):
CIFAR-style ResNets on the recipe of experiments/caution_depth_resnet.py and Pre-LN Transformer
LMs on that of experiments/caution_depth.py (``resjax.configs.caution_resnet`` / ``caution_lm``:
the same recipe for every form at every depth). Seeds are paired: seed k of a form and of identity
see the same initial RNG stream and the same batches.

WORKDIR/resnet and WORKDIR/transformer are ordinary experiment workdirs (their results.md has
every row, curves and provenance); WORKDIR/results.md has each form's advantage over identity per
depth with a paired test, where its sign changes and the verdict, and WORKDIR/verdict.png draws
the advantage against residual additions for both families. Rerunning resumes; identity rows are
shared by every form trained in the same workdir.

A form is resjax's own (``lambda``, ``conv1x1``, ...), a name given to ``resjax.register``, or a
class in a file of your own: ``FILE.py:CLASS`` or ``MODULE:CLASS`` (examples/my_residuals.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import math
import os
import sys
import time

import numpy as np

from resjax import claims, configs
from resjax.errors import DatasetNotPrepared, UserError

FAMILIES = {"resnet": "ResNet", "transformer": "Transformer"}
REFERENCE = "identity"
ALPHA = 0.05
MIN_SEEDS = claims.MIN_SEEDS
FORMS_FILE = "forms.json"


# ------------------------------------------------------------------------------ statistics
# Pure functions of per-seed results, tested on synthetic ones in tests/test_caution.py.


@dataclasses.dataclass
class Point:
  """A form against identity at one depth of one family. ``advantage`` is identity - form of the
  final metric (lower is better for every metric here), so positive means the form is ahead."""
  family: str
  depth: int
  additions: int
  base: dict[int, float]  # seed -> identity's final metric (inf: diverged)
  form: dict[int, float]  # seed -> the form's
  n: int = 0
  mean: float | None = None
  sd: float | None = None
  ratio: float | None = None  # the form's mean over identity's: below 1, the form is ahead
  ratio_sd: float | None = None  # sd of the per-seed ratios
  p: float | None = None  # two-sided paired t-test
  p_holm: float | None = None
  decision: str = "not run"  # helps | hurts | undecided | not run
  note: str = ""


def compare(point: Point) -> Point:
  """Fills the paired statistics of ``point`` from its seeds (Holm's p is set by ``decide``)."""
  seeds = sorted(set(point.base) & set(point.form))
  point.n = len(seeds)
  if not seeds:
    return point
  form_div = [s for s in seeds if not math.isfinite(point.form[s])]
  base_div = [s for s in seeds if not math.isfinite(point.base[s])]
  if base_div:
    point.decision = "undecided"
    point.note = f"identity diverged in {len(base_div)} of {len(seeds)} seeds"
    return point
  if form_div:  # the form's loss became NaN or inf where identity's did not: it failed here
    point.decision = "hurts"
    point.note = f"diverged in {len(form_div)} of {len(seeds)} seeds"
    return point
  base = np.array([point.base[s] for s in seeds], dtype=float)
  form = np.array([point.form[s] for s in seeds], dtype=float)
  d = base - form
  point.mean = float(d.mean())
  point.sd = float(d.std(ddof=1)) if len(d) > 1 else None
  point.ratio = float(form.mean() / base.mean()) if base.mean() else None
  if len(d) > 1 and np.all(base != 0):
    point.ratio_sd = float(np.std(form / base, ddof=1))
  point.decision = "undecided"
  if len(d) < MIN_SEEDS:
    point.note = f"{len(d)} paired seed{'s' * (len(d) != 1)}, {MIN_SEEDS} needed"
    return point
  from resjax import report
  point.p, _ = report.paired_p(point.base, point.form)
  return point


def decide(points: list[Point], alpha: float = ALPHA) -> list[Point]:
  """Holm's correction over the tested depths of one form (both families), then each depth's
  decision: helps or hurts where the adjusted p is below ``alpha``, else undecided."""
  tested = [p for p in points if p.p is not None]
  for point, adjusted in zip(tested, claims.holm([p.p for p in tested])):
    point.p_holm = adjusted
    if adjusted < alpha and point.mean != 0:
      point.decision = "helps" if point.mean > 0 else "hurts"
  return points


def sign_of(point: Point) -> int:
  """The sign of the mean advantage; a form that diverged where identity did not counts as -1."""
  if point.mean is None:
    return -1 if point.decision == "hurts" else 0
  return int(np.sign(point.mean))


def sign_changes(points: list[Point]) -> list[tuple[int, int, int]]:
  """(additions before, additions after, new sign) wherever the mean advantage of one family's
  points changes sign with depth (zeros and points without a value are skipped)."""
  seq = [(p.additions, sign_of(p)) for p in sorted(points, key=lambda p: p.additions)]
  seq = [(a, s) for a, s in seq if s != 0]
  return [(a0, a1, s1) for (a0, s0), (a1, s1) in zip(seq, seq[1:]) if s0 != s1]


def _at(points: list[Point], family_label) -> str:
  """'9, 27 residual additions (ResNet-20, ResNet-56)': where the points are on the shared axis."""
  pts = sorted(points, key=lambda p: (p.additions, p.family))
  adds = ", ".join(dict.fromkeys(str(p.additions) for p in pts))
  return f"{adds} residual additions ({', '.join(family_label(p) for p in pts)})"


def verdict(label: str, points: list[Point], family_label, *, alpha: float = ALPHA) -> str:
  """One paragraph from the decided points: where the form helps, hurts and is undecided, and
  where its mean advantage changes sign, family by family."""
  by = {d: [p for p in points if p.decision == d] for d in ("helps", "hurts", "undecided")}
  parts = []
  helps, hurts = by["helps"], by["hurts"]
  if helps and hurts and max(p.additions for p in helps) < min(p.additions for p in hurts):
    where = lambda pts: ", ".join(f"{family_label(p)} at {p.additions}"
                                  for p in sorted(pts, key=lambda p: (p.additions, p.family)))
    parts.append(f"helps up to {max(p.additions for p in helps)} residual additions "
                 f"({where(helps)}) and hurts from {min(p.additions for p in hurts)} on "
                 f"({where(hurts)})")
  else:
    parts += [f"{word} at {_at(by[word], family_label)}" for word in ("helps", "hurts")
              if by[word]]
  if by["undecided"]:
    every = not helps and not hurts
    parts.append(("undecided at every depth: " if every else "undecided at ")
                 + _at(by["undecided"], family_label))
  missing = [p for p in points if p.decision == "not run"]
  if missing:
    parts.append(f"not run yet at {_at(missing, family_label)}")
  diverged = [p for p in points if "diverged in" in p.note and p.decision == "hurts"]
  seeds = max((p.n for p in points), default=0)
  text = (f"{label}, against identity over {seeds} paired seeds (paired t-tests, Holm-adjusted "
          f"over its {sum(p.p is not None for p in points)} tested depths, alpha {alpha:g}): "
          + "; ".join(parts) + ".")
  if diverged:
    text += (f" Its loss diverged (NaN or inf) at {_at(diverged, family_label)}, counted as a "
             "failure there.")
  families = dict.fromkeys(p.family for p in points)
  for family in families:
    changes = sign_changes([p for p in points if p.family == family])
    name = FAMILIES.get(family, family)
    if changes:
      text += " " + "; ".join(
          f"In the {name}s its mean advantage turns {'positive' if s > 0 else 'negative'} between "
          f"{a0} and {a1} additions" for a0, a1, s in changes) + "."
    elif any(p.mean is not None for p in points if p.family == family):
      text += f" In the {name}s its mean advantage keeps one sign at every depth run."
  return text


# ------------------------------------------------------------------------------ the sweep


@dataclasses.dataclass
class Form:
  name: str  # as given: a built-in name, a registered name or an import path
  key: str  # the row and directory name, and the form's label in the report
  settings: dict

  def fingerprint(self) -> dict:
    """What the form's rows were trained with: its name, settings and, for a user's class, the
    SHA-256 of the class's source, so a rerun after an edit does not mix old rows with new ones."""
    from resjax.models import shortcuts
    source = None
    if shortcuts.is_user_form(self.name):
      try:
        text = inspect.getsource(shortcuts.form(self.name))
        source = hashlib.sha256(text.encode()).hexdigest()
      except (OSError, TypeError):  # defined where no source is kept (an exec'd string)
        source = None
    return {"name": self.name, "settings": self.settings, "source_sha256": source}


def parse_settings(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise UserError(f"--set {item!r}: write --set KEY=VALUE (a setting of the form, e.g. "
                      "--set gate_init=1.0)")
    out[key.strip()] = configs._typed(value.strip())
  return out


def make_forms(names: list[str], settings: dict) -> list[Form]:
  """Resolves and checks each form on both kinds of input before anything trains."""
  import ml_collections

  from resjax.models import shortcuts
  if not names:
    raise UserError("no form given: pass --shortcut NAME (resjax's own, e.g. lambda) or "
                    "--shortcut FILE.py:CLASS")
  forms, used = [], set()
  for name in names:
    if name in (REFERENCE, "none"):
      raise UserError(f"--shortcut {name}: identity is the baseline every form is compared with; "
                      "name another form")
    shortcuts.form(name)
    known = shortcuts.fields(name)
    mine = {k: v for k, v in settings.items() if k in known and k != "name"}
    used |= set(mine)
    key = name.rpartition(":")[2] if shortcuts.is_import_path(name) else name
    key += "".join(f".{k}={v}" for k, v in sorted(mine.items()))
    if any(f.key == key for f in forms):
      raise UserError(f"two forms would share the rows {key!r}: give each class its own name")
    cfg = ml_collections.ConfigDict({**known, **mine})
    if shortcuts.is_user_form(name):
      shortcuts.check_form(cfg, kinds=("tokens", "images"))
    forms.append(Form(name, key, mine))
  unused = sorted(set(settings) - used)
  if unused:
    theirs = lambda f: ", ".join(sorted(set(shortcuts.fields(f.name)) - {"name"})) or "none"
    raise UserError(f"--set {unused[0]}: no form given has that setting (their settings: "
                    + "; ".join(f"{f.key}: {theirs(f)}" for f in forms) + ")")
  return forms


def depth_label(family: str, depth: int) -> str:
  if family == "resnet":
    return f"ResNet-{depth}"
  return f"{depth} block" + "s" * (depth != 1)


def family_config(family: str, scale: str, forms: list[Form], seeds: int | None):
  """The family's recipe with a row per (form or identity, depth); x = residual additions."""
  from resjax import inspect_model, main
  c, depths = (configs.caution_resnet if family == "resnet" else configs.caution_lm)(scale)
  if seeds is not None:
    c.num_seeds = seeds
  c.num_seeds = max(c.num_seeds, MIN_SEEDS)
  c.experiment = (f"Caution at depth, {FAMILIES[family]}s: "
                  + ", ".join(f.key for f in forms) + " against identity")
  c.paper = ("none: a user's form; the recipe is experiments/caution_depth"
             + ("_resnet" if family == "resnet" else "") + ".py's")
  c.run = ""
  c.report = "compare"
  c.figure = "against_x"
  c.reference_series = REFERENCE
  c.x_label = "residual additions"
  for key, value in main.optional_keys().items():
    c[key] = value
  additions = {}
  for depth in depths:
    probe = configs.run_config(c, configs.row("probe", "probe", {"model.depth": depth}))
    additions[depth] = int(inspect_model.abstract_model(probe).residual_additions)
  rows = []
  for form in [Form(REFERENCE, REFERENCE, {}), *forms]:
    for depth in depths:
      overrides = {"model.depth": depth, "model.shortcut.name": form.name,
                   **{f"model.shortcut.{k}": v for k, v in form.settings.items()}}
      rows.append(configs.row(f"{form.key}_d{depth}", f"{form.key}, {depth_label(family, depth)}",
                              overrides, series=form.key, x=additions[depth]))
  c.runs = rows
  return c, depths, additions


def check_fingerprints(workdir: str, forms: list[Form]) -> dict:
  """The forms.json to write: refuses a form whose rows in ``workdir`` came from other code or
  settings (an edited class), which would mix two forms in one verdict."""
  from resjax import fileio
  path = os.path.join(workdir, FORMS_FILE)
  try:
    recorded = fileio.loads(fileio.read_text(path))
  except OSError:
    recorded = {}
  except ValueError:
    raise UserError(f"{path} is not valid JSON: delete it, or use a new --workdir") from None
  for form in forms:
    now, then = form.fingerprint(), recorded.get(form.key)
    if then is not None and then != now:
      raise UserError(f"{form.name} differs from the form whose rows {form.key}_d* are in "
                      f"{workdir} (its source or settings changed): use a new --workdir, or "
                      f"delete {os.path.join(workdir, '*', form.key + '_d*')} and {path}")
    recorded[form.key] = now
  return recorded


def points_of(rows: dict, family: str, depths, additions, form: Form) -> list[Point]:
  """The form against identity at each depth of one family (``rows``: name -> RowResult)."""

  def finished(name: str) -> dict[int, float]:  # seed -> final metric; inf where it diverged
    return {s.seed: s.error for s in rows[name].seeds
            if s.status in claims.FINISHED and s.error is not None}

  return [compare(Point(family, d, additions[d], finished(f"{REFERENCE}_d{d}"),
                        finished(f"{form.key}_d{d}"))) for d in depths]


def _sd(x: float) -> str:
  """Two significant digits, trailing zeros kept: 0.0060, 1.0, 10."""
  return f"{x:#.2g}".rstrip(".")


def _fmt(x: float | None, digits: int = 4) -> str:
  return "—" if x is None else f"{x:.{digits}g}"


def _mean_sd(values) -> str:
  vals = [v for v in values if math.isfinite(v)]
  if not vals:
    return "diverged" if values else "—"
  out = f"{np.mean(vals):.4g}"
  if len(vals) > 1:
    out += f" ± {_sd(np.std(vals, ddof=1))}"
  return out + (f" ({len(values) - len(vals)} diverged)" if len(vals) < len(values) else "")


def render(plan, forms: list[Form], points: dict, command: str, wall_s: float | None) -> str:
  """WORKDIR/results.md: per form, the verdict paragraph and the table of depths."""
  seeds = sorted({s for pts in points.values() for p in pts for s in p.base})
  out = [f"# Does {', '.join(f.key for f in forms)} survive depth?", "",
         f"Command: `{command}`  ", f"Scale: {plan[0][1].scale} · paired seeds: "
         f"{', '.join(map(str, seeds)) or 'none yet'}"]
  for family, c, depths, _ in plan:
    recipe = "caution_resnet" if family == "resnet" else "caution_lm"
    out.append(f"- {FAMILIES[family]}s: {c.data.name}, "
               f"{', '.join(depth_label(family, d) for d in depths)}, {c.schedule.total} "
               f"{c.schedule.unit} at batch {c.batch_size}, metric {c.get('metric', 'test_error')} "
               f"(final, lower is better); recipe resjax.configs.{recipe}; every row in "
               f"{family}/results.md")
  out += ["", "Advantage: identity's final metric minus the form's, seed by seed (positive: the "
          "form is ahead), as mean ± sd over the paired seeds; form / identity: the ratio of their "
          "means (below 1: the form is ahead), the scale of verdict.png. p: "
          "two-sided paired t-test; Holm: adjusted over the form's depths in both families. A "
          "form whose loss diverged where identity's did not fails at that depth.", ""]
  for form in forms:
    pts = points[form.key]
    label_of = lambda p: depth_label(p.family, p.depth)
    out += [f"## {form.key}", "", verdict(form.key, pts, label_of), "",
            "| Family | Depth | Residual additions | Identity | Form | Advantage | "
            "Form / identity | p | p (Holm) | At this depth |", "|---" * 10 + "|"]
    for p in sorted(pts, key=lambda p: (p.additions, p.family)):
      spread = f" ± {_sd(p.sd)}" if p.sd is not None else ""
      adv = "—" if p.mean is None else f"{p.mean:+.4g}{spread} (n={p.n})"
      rel = "—" if p.ratio is None else f"{p.ratio:.4g}"
      at = p.decision + (f" ({p.note})" if p.note else "")
      out.append(f"| {FAMILIES[p.family]} | {depth_label(p.family, p.depth)} | {p.additions} | "
                 f"{_mean_sd(list(p.base.values()))} | {_mean_sd(list(p.form.values()))} | {adv} "
                 f"| {rel} | {_fmt(p.p, 3)} | {_fmt(p.p_holm, 3)} | {at} |")
    out.append("")
  if wall_s is not None:
    out += [f"Wall time of this command: {wall_s / 60:.1f} min (rows already done are skipped).",
            ""]
  return "\n".join(out)


def plot(forms: list[Form], points: dict, path) -> None:
  """verdict.png: the form's final metric over identity's against residual additions (both log
  scales), both families on one axis. Below 1 the form is ahead."""
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8, 5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.axhline(1.0, color="black", lw=0.8)
  palette = matplotlib.colormaps["tab10"].colors
  styles = {"resnet": ("o", "-"), "transformer": ("s", "--")}
  diverged = []
  for i, form in enumerate(forms):
    color = palette[i % 10]
    for family, (marker, line) in styles.items():
      pts = sorted([p for p in points[form.key] if p.family == family], key=lambda p: p.additions)
      if not pts:
        continue
      valued = [p for p in pts if p.ratio is not None]
      ax.errorbar([p.additions for p in valued], [p.ratio for p in valued],
                  yerr=[p.ratio_sd or 0.0 for p in valued], color=color, marker=marker, ls=line,
                  mfc="white", capsize=3, label=f"{form.key}, {FAMILIES[family]}")
      decided = [p for p in valued if p.decision in ("helps", "hurts")]
      ax.scatter([p.additions for p in decided], [p.ratio for p in decided], color=color,
                 marker=marker, zorder=3)
      diverged += [(p.additions, color, f"{form.key}, {FAMILIES[family]}: diverged")
                   for p in pts if p.ratio is None and p.decision == "hurts"]
  if diverged:  # drawn above everything else: a diverged form is the worst outcome
    top = max([1.0] + [y for line in ax.lines for y in line.get_ydata()]) * 2.0
    for x, color, label in diverged:
      ax.scatter([x], [top], color=color, marker="x", s=70, zorder=3, label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set(xlabel="residual additions (ResNet unit = 1, Transformer block = 2)",
         ylabel="form's final metric / identity's (below 1: the form is ahead)")
  ax.grid(True, alpha=0.3, which="both")
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8)
  ax.set_title("Filled: decided (Holm-adjusted paired t-test); hollow: undecided; bars: sd of "
               "the per-seed ratios", fontsize=9)
  fig.savefig(path, format="png", dpi=100)


def write(workdir: str, plan, forms, command: str, wall_s: float | None) -> tuple[str, str, dict]:
  from resjax import report
  rows = {family: report.collect_rows(os.path.join(workdir, family), c) for family, c, _, _ in plan}
  points = {}
  for form in forms:
    pts = []
    for family, _, depths, additions in plan:
      pts += points_of({r.name: r for r in rows[family]}, family, depths, additions, form)
    points[form.key] = decide(pts)
  md = os.path.join(workdir, "results.md")
  png = os.path.join(workdir, "verdict.png")
  text = render(plan, forms, points, command, wall_s)
  # How the rows were made (commit, versions, device, command), as every results.md ends.
  footer = report.render_provenance([r for rs in rows.values() for r in rs],
                                    os.path.join(workdir, plan[0][0]))
  text = text.rstrip("\n") + ("\n\n" + "\n".join(footer) if footer else "") + "\n"
  report.atomic_write(md, lambda f: f.write(text.encode("utf-8")))
  report.atomic_write(png, lambda f: plot(forms, points, f))
  return md, png, points


def run(shortcuts_: list[str], *, scale: str = "cpu", workdir: str | None = None,
        seeds: int | None = None, families=tuple(FAMILIES), settings: dict | None = None,
        command: str | None = None) -> str:
  """Trains and judges; returns the path of WORKDIR/results.md. Everything is checked before
  anything trains: the forms, every row of both families, and the data."""
  from resjax import fileio, main, tasks, train
  if scale not in configs.SCALES:
    raise UserError(f"--scale {scale}: use one of {', '.join(configs.SCALES)}")
  if seeds is not None and seeds < MIN_SEEDS:
    raise UserError(f"--seeds {seeds}: a verdict needs at least {MIN_SEEDS} paired seeds")
  unknown = [f for f in families if f not in FAMILIES]
  if unknown or not families:
    raise UserError(f"--families {','.join(families)}: use resnet, transformer or both")
  workdir = workdir or os.path.join("runs", f"caution_{scale}")
  command = command or "resjax.caution.run(...)"
  forms = make_forms(list(shortcuts_), settings or {})
  fileio.check_writable(workdir)
  plan, checked = [], []
  for family in families:
    c, depths, additions = family_config(family, scale, forms, seeds)
    resolved = [(r, configs.run_config(c, r)) for r in c.runs]
    main.check_runs(c, resolved, training=True)
    plan.append((family, c, depths, additions))
    try:
      checked.append((resolved, tasks.load_all(rc for _, rc in resolved)))
    except DatasetNotPrepared as e:  # the offline fix is a scale here, not a config key
      raise DatasetNotPrepared(e.message, offline="pass --scale cpu") from None
  recorded = check_fingerprints(workdir, forms)
  fileio.makedirs(workdir)
  train.write_json(os.path.join(workdir, FORMS_FILE), recorded)
  t0 = time.time()
  for (family, c, _, _), (resolved, task_of) in zip(plan, checked):
    n = len(resolved)
    print(f"== {FAMILIES[family]}s: {n} rows x {c.num_seeds} seeds in "
          f"{os.path.join(workdir, family)}", flush=True)
    code = main.train_all(c, os.path.join(workdir, family), resolved, task_of, echo=False)
    write(workdir, plan, forms, command, None)
    if code:
      print(f"stopped: rerun the same command to resume ({family} rows left)", file=sys.stderr)
      raise SystemExit(code)
  md, png, _ = write(workdir, plan, forms, command, time.time() - t0)
  print(f"\n{fileio.read_text(md)}\nwrote {md} and {png}", flush=True)
  return md


# ------------------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, as every resjax command
    raise UserError(f"{message} (see python -m resjax.caution --help)")


def parse(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="python -m resjax.caution", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shortcut", action="append", default=[], metavar="FORM",
                 help="a form to judge (repeatable): resjax's own name, a registered name, "
                      "FILE.py:CLASS or MODULE:CLASS")
  p.add_argument("--scale", default="cpu", choices=configs.SCALES,
                 help="cpu: offline data, minutes on a laptop; paper: CIFAR-10 and lm1b; test: "
                      "seconds, for pytest (default cpu)")
  p.add_argument("--workdir", default=None, help="default runs/caution_<scale>")
  p.add_argument("--seeds", type=int, default=None,
                 help=f"paired seeds per row (at least {MIN_SEEDS}; default the recipe's)")
  p.add_argument("--families", default="resnet,transformer",
                 help="resnet, transformer or both, comma-separated (default both)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                 help="a setting of the forms that have it, e.g. gate_init=1.0 (repeatable)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  from resjax.main import EXIT_INTERRUPTED, EXIT_USER_ERROR, use_compile_cache
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse(argv)
    use_compile_cache(True)  # as python -m resjax.main: a rerun skips its compiles
    run(args.shortcut, scale=args.scale, workdir=args.workdir, seeds=args.seeds,
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
        settings=parse_settings(args.settings),
        command="python -m resjax.caution " + " ".join(argv))
  except UserError as e:
    print(f"error: {'; '.join(line.strip() for line in str(e).splitlines() if line.strip())}",
          file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:  # outside the training loop, or twice inside it
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


if __name__ == "__main__":
  from resjax import malloc
  malloc.reexec()  # glibc's settings for XLA:CPU, as python -m resjax.main (see resjax.malloc)
  from absl import logging as _logging
  _logging.set_verbosity(_logging.WARNING)
  sys.exit(main())
