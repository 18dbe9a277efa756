"""A paper's qualitative claims as checked statements over an experiment's rows.

An experiment file states them, each with the paper's own verdict:

    c.claims = [
        claims.claim('(a) identity has the lowest error',
                     *[claims.less('identity', r) for r in others], paper=True),
        claims.claim('(b) 0/1 scaling fails', claims.fails('scaling_0_1'), paper=True)]
    c.baseline = 'identity'  # what `fails` is measured against at scale != paper

``evaluate`` tests every claim over the seeds of the rows it names. Rows train the same seed ids
on the same data streams, so the test is paired by seed id. Holm's correction runs over the
claims of the file. ``render`` writes the Claims section of results.md.

A part is a linear statement d_i = hi_i - (factor * lo_i + const) > 0 for each seed i; a claim
holds when all its parts hold.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from resjax.errors import ConfigError

KINDS = ("less", "fails", "trains")
LINE_KINDS = ("fails", "trains")  # the parts judged against the paper's fail line
MIN_SEEDS = 3  # a claim is never decided on one or two seeds
DIVERGED_ERROR = 100.0  # a diverged seed's error %: worse than any run that trained
FINISHED = ("ok", "failed")  # seed statuses with a final value; 'running' has none yet


# ------------------------------------------------------------------------------ declaration


def less(lo: str, hi: str) -> dict:
  """The part "metric(lo) < metric(hi)": lower is better for every metric here."""
  if lo == hi:
    raise ConfigError(f"claims.less({lo!r}, {hi!r}) compares a row with itself: name two rows")
  return {"kind": "less", "lo": lo, "hi": hi}


def fails(run: str) -> dict:
  """The part "run fails": above config.failure_error at scale=paper, else above k x baseline.

  k = config.failure_error / paper_error of the ``config.baseline`` row: the paper's fail line
  as a multiple of its own baseline, since the absolute line was set for the paper's budget.
  """
  return {"kind": "fails", "run": run}


def trains(run: str) -> dict:
  """The part "run does not fail": the mirror of ``fails``, below the same line."""
  return {"kind": "trains", "run": run}


def chain(steps, *, paper: bool = True) -> list:
  """An ablation chain: for each (row, the row before, what it adds), "adding WHAT lowers the
  loss" (lower is better), with the paper's verdict ``paper``."""
  return [claim(f"adding {what} lowers the loss", less(new, old), paper=paper)
          for new, old, what in steps]


def claim(text: str, *parts: dict, paper: bool) -> ml_collections.ConfigDict:
  """A statement that holds when all its parts hold; ``paper``: whether the paper found it holds.

  The parts are plain dicts in a tuple: a ConfigDict keeps them as they are, and deepcopy and
  to_json_best_effort both handle them.
  """
  if not parts:
    raise ConfigError(f"claim {text!r} has no parts: pass claims.less, fails or trains (...)")
  if not all(isinstance(p, dict) and p.get("kind") in KINDS for p in parts):
    raise ConfigError(f"claim {text!r}: each part must be claims.less, fails or trains (...)")
  if not isinstance(paper, bool):
    raise ConfigError(f"claim {text!r}: paper= must be True or False (the paper's verdict)")
  return ml_collections.ConfigDict({"text": text, "paper": paper,
                                    "parts": tuple(dict(p) for p in parts)})


def _part_rows(part) -> list[str]:
  return [part["hi"], part["lo"]] if part["kind"] == "less" else [part["run"]]


@dataclasses.dataclass(frozen=True)
class FailRule:
  """How ``fails`` is judged in this config: against k x the baseline, or an absolute line."""
  line: float  # config.failure_error
  baseline: str | None  # None: the absolute line is used
  k: float | None
  note: str  # one sentence for results.md


def fail_rule(config) -> FailRule:
  """The rule ``fails`` uses at config.scale (raises ConfigError when there is no line at all)."""
  line = config.get("failure_error", None)
  if line is None:
    raise ConfigError("claims.fails(...) needs config.failure_error, the paper's fail line: set "
                      "it in the experiment file or state the claim with claims.less(...)")
  line = float(line)
  scale = config.get("scale", "paper")
  metric = config.get("metric", "test_error")
  if scale == "paper":
    return FailRule(line, None, None, f"`fails(run)` means: run's {metric} is above the "
                    f"paper's line, {line:g}, seed by seed.")
  name = config.get("baseline", None)
  runs = {r["name"]: r for r in config.get("runs", None) or ()}
  if name is not None and name not in runs:
    raise ConfigError(f'config.baseline {name!r} names no row: use one of {", ".join(runs)}')
  paper_base = runs[name].get("paper_error", None) if name is not None else None
  if not paper_base:
    why = (f"the baseline row {name!r} has no paper_error" if name is not None
           else "config.baseline is not set")
    return FailRule(line, None, None, f"At scale '{scale}' `fails(run)` should be judged "
                    f"against the baseline, but {why}, so it uses the paper's absolute line, "
                    f"{line:g}, which was set for the paper's budget.")
  k = line / float(paper_base)
  return FailRule(line, name, k, f"At scale '{scale}' `fails(run)` means: run's {metric} is "
                  f"above k × {name}'s, seed by seed, with k = {line:g} / {float(paper_base):g} "
                  f"= {k:.2f} (the paper's fail line as a multiple of the paper's {name}).")


def check(config) -> None:
  """Raises ConfigError if a claim names a row that config.runs lacks, or cannot be judged.

  Cheap and data-free: call it before training so a typo does not surface after row 1.
  """
  names = [r["name"] for r in config.get("runs", None) or ()]
  uses_fails = False
  for c in config.get("claims", None) or ():
    for part in c["parts"]:
      uses_fails |= part["kind"] in LINE_KINDS
      for name in _part_rows(part):
        if name not in names:
          raise ConfigError(f'claim {c["text"]!r} names row {name!r}, which config.runs lacks: '
                            f'use one of {", ".join(names)}')
  if uses_fails:
    fail_rule(config)


# ------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Linear:
  """d_i = sign * (hi_i - (factor * lo_i + const)) for each paired seed i; holds if mean d > 0."""
  hi: str
  lo: str | None
  factor: float
  const: float
  what: str  # d in words, e.g. 'scaling_0_1 - 3.03 × identity'
  sign: float = 1.0  # -1: "below the line" (trains) rather than above it (fails)


def _linear(part, rule: FailRule | None) -> Linear:
  if part["kind"] == "less":
    return Linear(part["hi"], part["lo"], 1.0, 0.0, f'{part["hi"]} - {part["lo"]}')
  run = part["run"]
  line = f"{rule.line:g}" if rule.baseline is None else f"{rule.k:.2f} × {rule.baseline}"
  sign, what = (1.0, f"{run} - {line}") if part["kind"] == "fails" else (-1.0, f"{line} - {run}")
  if rule.baseline is None:
    return Linear(run, None, 0.0, rule.line, what, sign)
  return Linear(run, rule.baseline, rule.k, 0.0, what, sign)


@dataclasses.dataclass
class PartResult:
  """One part over its paired seeds. p values are None when the part could not be tested."""
  linear: Linear
  status: str  # 'tested' | 'undecided' | 'not run'
  n: int = 0
  mean: float | None = None
  sd: float | None = None
  p_hold: float | None = None
  p_against: float | None = None
  note: str | None = None  # why it is undecided or not run


@dataclasses.dataclass
class ClaimResult:
  """One claim: ours against the paper's verdict, raw and Holm-adjusted p values."""
  text: str
  paper: bool
  verdict: str  # 'holds' | 'does not hold' | 'undecided' | 'not run'
  parts: list[PartResult]
  p_hold: float | None = None
  p_against: float | None = None
  p_hold_holm: float | None = None
  p_against_holm: float | None = None

  @property
  def weakest(self) -> PartResult:
    """The part furthest from holding: the first untestable one, else the largest p_hold."""
    untested = [p for p in self.parts if p.p_hold is None]
    if untested:
      return untested[0]
    return max(self.parts, key=lambda p: (p.p_hold, -p.mean))  # ties (sd 0): the smaller mean

  @property
  def agree(self) -> bool | None:
    """Whether our verdict is the paper's; None while undecided or not run."""
    if self.verdict not in ("holds", "does not hold"):
      return None
    return (self.verdict == "holds") == self.paper


def seed_values(row, metric: str) -> dict[int, float]:
  """Seed id -> final value, for the row's finished seeds that have one.

  A diverged seed (error inf) is 100 for an error metric (in %); other metrics keep inf.
  """
  out = {}
  for s in row.seeds:
    if s.status in FINISHED and s.error is not None:
      out[s.seed] = DIVERGED_ERROR if math.isinf(s.error) and metric.endswith("error") else s.error
  return out


def one_sided_p(d) -> tuple[float, float]:
  """(P(T >= t), P(T <= t)) of the paired t statistic of ``d`` with n - 1 degrees of freedom.

  With no spread t is +-inf (or 0/0), so the sign of the mean decides; a zero mean supports
  neither side.
  """
  from scipy import stats  # imported here: experiment files import this module for `claim`
  d = np.asarray(d, dtype=float)
  mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
  if sd == 0:
    return (0.0, 1.0) if mean > 0 else (1.0, 0.0) if mean < 0 else (1.0, 1.0)
  t = mean / (sd / math.sqrt(len(d)))
  return float(stats.t.sf(t, len(d) - 1)), float(stats.t.cdf(t, len(d) - 1))


def evaluate_part(lin: Linear, rows_by_name: dict, metric: str) -> PartResult:
  """Tests one part over the seeds finished in every row it touches, paired by seed id."""
  names = [lin.hi] + ([lin.lo] if lin.lo is not None else [])
  vals = {n: seed_values(rows_by_name[n], metric) for n in names}
  empty = [n for n in names if not vals[n]]
  if empty:
    return PartResult(lin, "not run", note=f'{" and ".join(empty)}: no finished seed')
  seeds = sorted(set.intersection(*(set(v) for v in vals.values())))
  hi = np.array([vals[lin.hi][s] for s in seeds], dtype=float)
  lo = np.array([vals[lin.lo][s] for s in seeds], dtype=float) if lin.lo else np.zeros(len(seeds))
  bad = [(n, s) for n in names for s in seeds if not math.isfinite(vals[n][s])]
  if bad:
    n, s = bad[0]
    return PartResult(lin, "undecided", n=len(seeds), note=f"{n} seed{s} diverged: {metric} has "
                      "no value to compare")
  d = lin.sign * (hi - (lin.factor * lo + lin.const))
  mean = float(np.mean(d)) if len(d) else None
  sd = float(np.std(d, ddof=1)) if len(d) > 1 else None
  if len(d) < MIN_SEEDS:
    return PartResult(lin, "undecided", n=len(d), mean=mean, sd=sd,
                      note=f'{len(d)} paired seed{"s" * (len(d) != 1)}, {MIN_SEEDS} needed')
  p_hold, p_against = one_sided_p(d)
  return PartResult(lin, "tested", n=len(d), mean=mean, sd=sd, p_hold=p_hold, p_against=p_against)


def holm(ps: list[float]) -> list[float]:
  """Holm's step-down adjusted p values, in the order given."""
  k = len(ps)
  out = [1.0] * k
  running = 0.0
  for rank, i in enumerate(sorted(range(k), key=lambda i: ps[i])):
    # The max keeps the adjusted values in the order of the raw ones (the step-down rule).
    running = max(running, min(1.0, (k - rank) * ps[i]))
    out[i] = running
  return out


def evaluate(rows, config) -> list[ClaimResult]:
  """Tests config.claims over ``rows`` (report.collect_rows), Holm-corrected over the file."""
  check(config)
  declared = config.get("claims", None) or ()
  metric = config.get("metric", "test_error")
  alpha = config.get("claims_alpha", 0.05)
  rows_by_name = {r.name: r for r in rows}
  rule = None
  if any(p["kind"] in LINE_KINDS for c in declared for p in c["parts"]):
    rule = fail_rule(config)
  results = []
  for c in declared:
    parts = [evaluate_part(_linear(p, rule), rows_by_name, metric) for p in c["parts"]]
    res = ClaimResult(c["text"], bool(c["paper"]), "undecided", parts)
    if any(p.status == "not run" for p in parts):
      res.verdict = "not run"
    elif any(p.p_hold is not None for p in parts):
      # All parts must hold (intersection-union: the largest p); one reversed part is enough
      # against it (Bonferroni over the parts). An untested part cannot show the claim holds.
      res.p_hold = max(1.0 if p.p_hold is None else p.p_hold for p in parts)
      res.p_against = min(1.0, len(parts) * min(p.p_against for p in parts
                                                if p.p_against is not None))
    results.append(res)
  # The family is the claims with a p value: one that could not be tested adds no test.
  tested = [r for r in results if r.p_hold is not None]
  for r, ph, pa in zip(tested, holm([r.p_hold for r in tested]),
                       holm([r.p_against for r in tested])):
    r.p_hold_holm, r.p_against_holm = ph, pa
    r.verdict = "holds" if ph < alpha else "does not hold" if pa < alpha else "undecided"
  return results


# -------------------------------------------------------------------------------- rendering


def _cell(text) -> str:
  return str(text).replace("|", r"\|")


def _fmt_p(p_hold, p_against) -> str:
  return "—" if p_hold is None else f"hold {p_hold:.3g}, against {p_against:.3g}"


def _fmt_effect(part: PartResult, digits: int) -> str:
  lin = part.linear
  if part.status == "not run":
    return f"{lin.what}: not run ({part.note})"
  if part.mean is None:
    return f"{lin.what}: n={part.n} ({part.note})"
  sd = "" if part.sd is None else f" ± {part.sd:.{digits}f}"
  note = f" ({part.note})" if part.note else ""
  return f"{lin.what}: {part.mean:+.{digits}f}{sd}, n={part.n}{note}"


def render(results: list[ClaimResult], config) -> list[str]:
  """The Claims section of results.md: a table, how to read it, and the agreement count."""
  metric = config.get("metric", "test_error")
  alpha = config.get("claims_alpha", 0.05)
  digits = 2 if metric.endswith("error") else 4  # % points, or a loss
  out = ["## Claims", "",
         "| Claim | Paper | Ours | Effect (mean ± sd of paired differences, n) | "
         "p (one-sided paired t) | Holm-adjusted p |", "|---|---|---|---|---|---|"]
  for r in results:
    ours = r.verdict if r.agree is None else f'{r.verdict}, {"agrees" if r.agree else "disagrees"}'
    cells = [r.text, "holds" if r.paper else "does not hold", ours,
             _fmt_effect(r.weakest, digits), _fmt_p(r.p_hold, r.p_against),
             _fmt_p(r.p_hold_holm, r.p_against_holm)]
    out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  k = sum(r.p_hold is not None for r in results)
  diverged = (f"; a diverged seed counts as {DIVERGED_ERROR:g}%" if metric.endswith("error")
              else "")
  out += ["",
          f"How to read: rows train the same seed ids on the same data, so each part is a paired "
          f"test over the seeds finished in every row it names ({MIN_SEEDS} at least): d per "
          f"seed is the difference shown under Effect, in {metric}, positive in the claim's "
          f"direction{diverged}. p is a one-sided paired t-test of mean d > 0 (hold) and < 0 "
          "(against). A claim holds only if all its parts do (p hold: the largest of its "
          "parts'), and does not hold if any part is reversed (p against: the smallest times the "
          "number of parts); Effect shows its weakest part.", "",
          f'Holm\'s correction runs over the {k} claim{"s" * (k != 1)} tested here at '
          f'alpha={alpha:g}, for hold and against separately. "undecided" means neither adjusted '
          'p is below alpha (too few seeds or too small an effect); it is not "does not hold".']
  if any(p["kind"] in LINE_KINDS for c in config.get("claims", None) or () for p in c["parts"]):
    out += ["", fail_rule(config).note]
  decided = [r for r in results if r.agree is not None]
  out += ["", f"Agree with the paper: {sum(r.agree for r in decided)} of {len(decided)} decided "
          "claims" + (f" ({len(results) - len(decided)} undecided or not run)."
                      if len(decided) < len(results) else "."), ""]
  return out
