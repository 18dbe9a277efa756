"""Tests for resjax.claims: a paper's claims tested over paired seeds, on synthetic results."""

import copy
import json
import math
import os

import ml_collections
import pytest
from scipy import stats

from resjax import claims, report
from resjax.configs import row
from resjax.errors import ConfigError
from resjax.report import RowResult, SeedResult

INF = math.inf


def _row(name, values, status="ok"):
  """A RowResult whose seed k holds values[k] (a dict seed -> value, or a list for seeds 0..)."""
  if isinstance(values, (list, tuple)):
    values = dict(enumerate(values))
  seeds = [SeedResult(seed=k, status=status, error=v, diverged_step=None, reason=None, steps=10,
                      total_steps=10, wall_s=1.0, metrics=[]) for k, v in values.items()]
  return RowResult(name=name, label=name, paper_error=None, paper_failed=False,
                   failure_error=20.0, seeds=seeds)


def _config(names, declared, scale="cpu", baseline="identity", paper_errors=None, **extra):
  c = ml_collections.ConfigDict()
  c.experiment = "synthetic"
  c.scale = scale
  c.failure_error = 20.0
  c.baseline = baseline
  c.runs = [row(n, n, paper_error=(paper_errors or {}).get(n)) for n in names]
  c.claims = declared
  for k, v in extra.items():
    c[k] = v
  return c


def _by_text(results):
  return {r.text: r for r in results}


def test_claims_are_storable_in_a_config():
  declared = [claims.claim("a beats b", claims.less("a", "b"), paper=True),
              claims.claim("b fails", claims.fails("b"), paper=False)]
  c = _config(["a", "b"], declared, baseline="a")  # no paper value for a: the 20% line
  # The trainer deep-copies the config per row and writes it as JSON.
  assert copy.deepcopy(c).claims[1]["parts"][0] == {"kind": "fails", "run": "b"}
  saved = json.loads(c.to_json_best_effort())["claims"]
  assert saved[0] == {"text": "a beats b", "paper": True,
                      "parts": [{"kind": "less", "lo": "a", "hi": "b"}]}
  results = claims.evaluate([_row("a", [1, 2, 3]), _row("b", [2, 3, 4.5])], copy.deepcopy(c))
  assert [r.verdict for r in results] == ["holds", "does not hold"]
  with pytest.raises(ConfigError, match="no parts"):
    claims.claim("empty", paper=True)
  with pytest.raises(ConfigError, match="paper="):
    claims.claim("x", claims.less("a", "b"), paper="yes")


def test_check_names_the_missing_row_and_the_missing_line():
  c = _config(["identity", "gate"], [claims.claim("x", claims.less("identity", "gaet"),
                                                  paper=True)])
  with pytest.raises(ConfigError, match="'gaet'.*identity, gate"):
    claims.check(c)
  c.claims = [claims.claim("x", claims.fails("gate"), paper=True)]
  c.failure_error = None
  with pytest.raises(ConfigError, match="failure_error"):
    claims.check(c)


def test_holds_does_not_hold_undecided_and_two_seeds():
  identity = [10.0, 12.0, 11.0, 13.0, 12.0]
  worse = [i + d for i, d in zip(identity, [3.0, 4.0, 3.5, 3.0, 4.5])]
  noisy = [i + d for i, d in zip(identity, [5.0, -4.0, 1.0, -3.0, 2.0])]
  rows = [_row("identity", identity), _row("worse", worse), _row("noisy", noisy),
          _row("two", [90.0, 95.0])]
  declared = [claims.claim("identity beats worse", claims.less("identity", "worse"), paper=True),
              claims.claim("worse beats identity", claims.less("worse", "identity"), paper=True),
              claims.claim("identity beats noisy", claims.less("identity", "noisy"), paper=True),
              claims.claim("identity beats two", claims.less("identity", "two"), paper=True)]
  c = _config(["identity", "worse", "noisy", "two"], declared)
  res = _by_text(claims.evaluate(rows, c))
  held = res["identity beats worse"]
  assert (held.verdict, held.agree) == ("holds", True)
  # Independent check: scipy's own paired test, one-sided.
  assert held.p_hold == pytest.approx(
      stats.ttest_rel(worse, identity, alternative="greater").pvalue, rel=1e-9)
  part = held.weakest
  assert (part.n, part.mean) == (5, pytest.approx(3.6))
  assert part.sd == pytest.approx(math.sqrt(1.7 / 4))  # sum of squared deviations 1.7, n-1 = 4
  reversed_ = res["worse beats identity"]
  assert (reversed_.verdict, reversed_.agree) == ("does not hold", False)
  assert reversed_.p_against == pytest.approx(held.p_hold, rel=1e-9)
  assert res["identity beats noisy"].verdict == "undecided"
  assert res["identity beats noisy"].agree is None
  # +80 and +83 points, yet two seeds never decide a claim, nor enter Holm's family.
  two = res["identity beats two"]
  assert two.verdict == "undecided" and two.p_hold is None and two.p_hold_holm is None
  assert two.weakest.mean == pytest.approx(81.5) and "2 paired seeds, 3 needed" in two.weakest.note
  # Holm over the 3 tested claims: the strongest p is multiplied by 3.
  assert held.p_hold_holm == pytest.approx(3 * held.p_hold)


def test_pairing_by_seed_id_beats_overlapping_values():
  base = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
  variant = {0: 11.0, 1: 21.2, 2: 30.9, 3: 41.1}
  # Unpaired, the two rows overlap almost entirely: Welch's test sees nothing.
  assert stats.ttest_ind(list(variant.values()), list(base.values()), equal_var=False,
                         alternative="greater").pvalue > 0.4
  base_row = _row("base", base)
  # A seed in only one row, and one still running in the other, must not enter the pairs:
  # seed 7 (or the running seed 5, paired) would reverse the difference.
  variant_row = _row("variant", {**variant, 7: 0.0, 5: 0.0})
  base_row.seeds.append(_row("base", {5: 99.0}, status="running").seeds[0])
  c = _config(["base", "variant"], [claims.claim("base < variant", claims.less("base", "variant"),
                                                 paper=True)], baseline="base")
  (res,) = claims.evaluate([base_row, variant_row], c)
  assert res.verdict == "holds"
  assert (res.weakest.n, res.weakest.mean) == (4, pytest.approx(1.05))
  assert res.p_hold < 0.001


def test_holm_hand_computed():
  # Sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08, raised to 0.09 to keep the order;
  # 0.20 x 1.
  assert claims.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
  assert claims.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_a_claim_that_passes_alone_fails_after_holm():
  base = [10.0, 11.0, 12.0, 13.0, 14.0]
  deltas = {"strong": [5.0, 5.1, 4.9, 5.0, 5.05], "b": [1.0, 2.0, 3.0, 1.0, 0.0],
            "c": [1.0, 2.0, 2.0, 1.0, -0.5]}
  rows = [_row("base", base)] + [_row(n, [x + d for x, d in zip(base, ds)])
                                 for n, ds in deltas.items()]
  declared = [claims.claim(f"base < {n}", claims.less("base", n), paper=True) for n in deltas]
  c = _config(["base", *deltas], declared, baseline="base")
  alone = claims.evaluate(rows, _config(["base", *deltas], declared[1:2], baseline="base"))
  p_b = claims.one_sided_p(deltas["b"])[0]
  p_c = claims.one_sided_p(deltas["c"])[0]
  assert 0.025 < p_b < 0.026 and 0.037 < p_c < 0.038
  assert alone[0].verdict == "holds" and alone[0].p_hold_holm == pytest.approx(p_b)
  strong, b, cc = claims.evaluate(rows, c)
  assert strong.verdict == "holds"
  # Holm over 3: b is second smallest, so 2 x 0.0258 = 0.0516 > 0.05; c keeps b's value.
  assert b.p_hold_holm == pytest.approx(2 * p_b) and cc.p_hold_holm == pytest.approx(2 * p_b)
  assert b.verdict == cc.verdict == "undecided"
  # A stricter alpha from the config applies to the family.
  c.claims_alpha = 0.001
  assert claims.evaluate(rows, c)[0].verdict == "holds"
  assert strong.p_hold_holm < 0.001


def _fails_results(scale, identity_paper=6.61):
  identity = [10.0, 12.0, 11.0, 10.0]
  rows = [_row("identity", identity), _row("mid", [25.0, 30.0, 27.0, 26.0]),
          _row("bad", [45.0, 50.0, 48.0, 44.0])]
  declared = [claims.claim("mid fails", claims.fails("mid"), paper=True),
              claims.claim("bad fails", claims.fails("bad"), paper=True)]
  c = _config(["identity", "mid", "bad"], declared, scale=scale,
              paper_errors={"identity": identity_paper})
  return c, claims.evaluate(rows, c)


def test_fails_uses_the_absolute_line_at_paper_scale():
  c, (mid, bad) = _fails_results("paper")
  # 25, 30, 27, 26 are all above 20: the paper's line, whatever the baseline did.
  assert mid.verdict == "holds" and mid.weakest.linear.what == "mid - 20"
  assert mid.weakest.mean == pytest.approx(108 / 4 - 20)
  assert bad.verdict == "holds"
  assert "above the paper's line, 20" in "\n".join(claims.render([mid, bad], c))


def test_fails_is_k_times_the_baseline_below_paper_scale():
  c, (mid, bad) = _fails_results("cpu")
  k = 20 / 6.61  # the paper's line over the paper's identity error: 3.03
  # mid is above the 20% line but below 3.03 x identity (30.3 to 36.3) on every seed.
  assert (mid.verdict, mid.agree) == ("does not hold", False)
  assert bad.verdict == "holds"
  assert bad.weakest.linear.what == "bad - 3.03 × identity"
  assert bad.weakest.mean == pytest.approx((187 - k * 43) / 4)  # sums of bad and identity
  text = "\n".join(claims.render([mid, bad], c))
  assert "k = 20 / 6.61 = 3.03" in text
  # Without a paper value for the baseline there is no k: the absolute line, said so.
  c, (mid, _) = _fails_results("cpu", identity_paper=None)
  assert mid.verdict == "holds" and mid.weakest.linear.what == "mid - 20"
  assert "uses the paper's absolute line" in "\n".join(claims.render([mid], c))


def test_diverged_seeds_count_as_100_for_an_error_and_undecide_a_loss():
  rows = [_row("identity", [6.0, 7.0, 6.5]), _row("gate", [INF, 30.0, INF])]
  c = _config(["identity", "gate"], [claims.claim("gate fails", claims.fails("gate"),
                                                  paper=True)], scale="paper")
  (res,) = claims.evaluate(rows, c)
  assert res.weakest.mean == pytest.approx((80 + 10 + 80) / 3)  # 100 - 20 on the diverged seeds
  assert res.weakest.n == 3
  loss_claim = claims.claim("identity < gate", claims.less("identity", "gate"), paper=True)
  c = _config(["identity", "gate"], [loss_claim], metric="test_loss")
  rows = [_row("identity", [2.0, 2.1, 2.2]), _row("gate", [3.0, INF, 3.1])]
  (res,) = claims.evaluate(rows, c)
  assert res.verdict == "undecided" and res.p_hold is None
  assert res.weakest.note == "gate seed1 diverged: test_loss has no value to compare"


def test_not_run_stays_out_of_the_family_and_the_agreement_count():
  rows = [_row("a", [1.0, 2.0, 3.0]), _row("b", [2.0, 3.5, 4.2]), _row("c", [5.0], "running")]
  declared = [claims.claim("a < b", claims.less("a", "b"), paper=False),
              claims.claim("a < c", claims.less("a", "c"), paper=True)]
  c = _config(["a", "b", "c"], declared, baseline="a")
  ab, ac = claims.evaluate(rows, c)
  assert (ab.verdict, ab.agree) == ("holds", False)
  assert ac.verdict == "not run" and ac.weakest.note == "c: no finished seed"
  # Holm over the one claim tested: its p is not doubled for the one not run.
  assert 0 < ab.p_hold < 0.025 and ab.p_hold_holm == ab.p_hold
  text = "\n".join(claims.render([ab, ac], c))
  assert "Holm's correction runs over the 1 claim tested here at alpha=0.05" in text
  assert "Agree with the paper: 0 of 1 decided claims (1 undecided or not run)." in text


# ----------------------------------------------------------------------------- in results.md


def _write_seed(workdir, run, seed, error):
  d = os.path.join(workdir, run, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump({"status": "ok", "steps": 10, "total_steps": 10, "wall_s": 1.0,
               "final": {"train_loss": 0.5, "test_loss": 1.0, "test_error": error}}, f)


@pytest.mark.parametrize("kind", ["failure", "compare"])
def test_write_report_appends_the_claims_section(tmp_path, kind):
  wd = str(tmp_path)
  for seed, (a, b) in enumerate([(7.0, 40.0), (6.5, 45.0), (7.5, 38.0)]):
    _write_seed(wd, "identity", seed, a)
    _write_seed(wd, "plain", seed, b)
  c = _config(["identity", "plain"], [
      claims.claim("(a) identity beats a plain net", claims.less("identity", "plain"), paper=True),
      claims.claim("(b) the plain net fails", claims.fails("plain"), paper=True)],
      paper_errors={"identity": 6.61}, report=kind)
  c.data = ml_collections.ConfigDict({"name": "digits"})
  md_path, _ = report.write_report(wd, c)
  md = open(md_path).read()
  head, section = md.split("\n## Claims\n")
  # The report's own table comes first and is unchanged.
  assert ("fail: 40.00% > 20%" in head) == (kind == "failure")
  lines = section.splitlines()
  assert lines[1] == ("| Claim | Paper | Ours | Effect (mean ± sd of paired differences, n) | "
                      "p (one-sided paired t) | Holm-adjusted p |")
  assert lines[3].startswith("| (a) identity beats a plain net | holds | holds, agrees | "
                             "plain - identity: +34.00 ± 4.09, n=3 |")
  assert "k = 20 / 6.61 = 3.03" in section
  assert "Agree with the paper: 2 of 2 decided claims." in section
  # No claims, no section.
  c.claims = []
  report.write_report(wd, c)
  assert "## Claims" not in open(md_path).read()


def test_trains_is_the_mirror_of_fails():
  # identity 10, 11, 12, 10; at cpu the line is k x identity per seed (k = 20 / 6.61).
  k = 20 / 6.61
  rows = [_row("identity", [10.0, 11.0, 12.0, 10.0]), _row("ok", [12.0, 15.0, 13.0, 11.0]),
          _row("bad", [80.0, 85.0, 90.0, 70.0])]
  declared = [claims.claim("ok trains", claims.trains("ok"), paper=True),
              claims.claim("bad trains", claims.trains("bad"), paper=True)]
  paper = {"identity": 6.61}
  ok, bad = claims.evaluate(rows, _config(["identity", "ok", "bad"], declared, paper_errors=paper))
  assert ok.verdict == "holds" and ok.weakest.linear.what == "3.03 × identity - ok"
  assert ok.weakest.mean == pytest.approx((k * 43 - 51) / 4)
  assert (bad.verdict, bad.agree) == ("does not hold", False)
  # At paper scale: below the absolute line, 20.
  ok, bad = claims.evaluate(rows, _config(["identity", "ok", "bad"], declared, scale="paper",
                                          paper_errors=paper))
  assert ok.verdict == "holds" and ok.weakest.mean == pytest.approx(20 - 51 / 4)
  assert bad.verdict == "does not hold"
