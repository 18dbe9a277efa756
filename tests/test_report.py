"""Tests for resjax.report on real workdirs written by hand."""

import json
import math
import os

import ml_collections
import pytest

from resjax import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(runs, scale="cpu"):
  c = ml_collections.ConfigDict()
  c.experiment = "ResNet-v2 Table 1 / Figure 2: shortcut forms on CIFAR-10, ResNet-110"
  c.paper = "He et al. 2016, Identity Mappings in Deep Residual Networks, arXiv 1603.05027"
  c.scale = scale
  c.failure_error = 20.0
  c.data = ml_collections.ConfigDict({"name": "cifar10"})
  c.model = ml_collections.ConfigDict({"depth": 110})
  c.batch_size = 128
  c.schedule = ml_collections.ConfigDict({"unit": "iterations", "total": 400})
  # Experiment files may hold plain dicts here (ConfigDict leaves dicts in lists alone).
  runs = [{"overrides": (), **r} for r in runs]
  c.runs = [ml_collections.ConfigDict(r) if i % 2 else r for i, r in enumerate(runs)]
  return c


def _write_seed(workdir, run, seed, error, status="ok", reason=None, failed_step=None,
                train_loss=0.5, metrics=None, wall_s=60.0):
  d = os.path.join(workdir, run, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  if metrics is None:  # a plain curve ending at the final error
    metrics = [{"step": s, "train_loss": train_loss * 400 / s, "train_error": error, "lr": 0.1,
                "test_loss": 1.0, "test_error": error} for s in (100, 200, 300, 400)]
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for m in metrics:
      f.write(json.dumps(m) + "\n")
  summary = {"run": run, "seed": seed, "status": status, "reason": reason,
             "failed_step": failed_step, "steps": 400, "total_steps": 400,
             "final": {"train_loss": train_loss, "train_error": error, "test_loss": 1.0,
                       "test_error": error}, "wall_s": wall_s}
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(summary, f)


def _diverge(workdir, run, seed, step):
  """A seed whose loss went nan: the trainer kept the last finite eval in `final`."""
  metrics = [{"step": 100, "train_loss": 2.0, "test_error": 50.0},
             {"step": step, "train_loss": float("nan"), "test_error": 90.0}]
  _write_seed(workdir, run, seed, 12.5, status="failed", reason=f"loss is nan at step {step}",
              failed_step=step, metrics=metrics)


def _cells(md, label):
  """The cells of the table line for `label`."""
  for line in md.splitlines():
    if line.startswith(f"| {label} |"):
      return [c.strip() for c in line.strip("|").split("|")]
  raise AssertionError(f"no row {label!r} in:\n{md}")


def _report(tmp_path, config):
  md_path, png_path = report.write_report(str(tmp_path), config)
  with open(md_path) as f:
    return f.read(), png_path


def test_median_and_sample_std_over_three_seeds(tmp_path):
  for seed, err in enumerate([7.0, 6.0, 9.0]):
    _write_seed(str(tmp_path), "identity", seed, err)
  md, _ = _report(tmp_path, _config([dict(name="identity", label="(a) original",
                                          paper_error=6.61)]))
  # Median 7 (not the mean 7.33); sample std of (7, 6, 9) is sqrt(7/3) = 1.53.
  assert _cells(md, "(a) original") == [
      "(a) original", "6.61", "7.00 (7.33 ± 1.53, n=3)", "ok", "yes"]


def test_diverged_seeds_count_as_inf(tmp_path):
  wd = str(tmp_path)
  _write_seed(wd, "gate0", 0, 5.0)
  _diverge(wd, "gate0", 1, 1234)
  _diverge(wd, "gate0", 2, 1500)
  _diverge(wd, "scaling", 0, 77)
  _write_seed(wd, "dropout", 0, 5.0)
  _write_seed(wd, "dropout", 1, 6.0)
  _diverge(wd, "dropout", 2, 300)
  cfg = _config([
      dict(name="gate0", label="gate b_g=0", paper_failed=True),
      dict(name="scaling", label="scaling 0.5", paper_error=12.35),
      dict(name="dropout", label="dropout", paper_error=6.61)])
  md, _ = _report(tmp_path, cfg)
  row = report.row_result(wd, cfg.runs[0], cfg.failure_error)
  assert row.errors == [5.0, math.inf, math.inf] and math.isinf(row.median) and row.failed
  # Median of [5, inf, inf] is inf: the row fails even though one seed reached 5%.
  assert _cells(md, "gate b_g=0")[2:] == [
      "diverged (2 of 3 seeds, at steps 1234, 1500)", "fail: loss diverged", "yes"]
  # The stale finite error in `final` must not hide the nan loss.
  assert _cells(md, "scaling 0.5")[2:] == ["diverged at step 77", "fail: loss diverged", "no"]
  # Median of [5, 6, inf] is 6: the row passes, but the diverged seed is reported.
  assert _cells(md, "dropout")[2:] == [
      "6.00 (n=3, 1 diverged at step 300)", "ok (1 of 3 seeds failed)", "yes"]


def test_agreement_column_and_footer(tmp_path):
  wd = str(tmp_path)
  _write_seed(wd, "gate0", 0, 40.0, status="failed",
              reason="test error 40.0% is above the 20% failure threshold")
  _write_seed(wd, "identity", 0, 25.0, wall_s=3600.0)
  _write_seed(wd, "conv", 0, 12.22)
  _write_seed(wd, "extra", 0, 8.0)
  md, _ = _report(tmp_path, _config([
      dict(name="gate0", label="(c) gate", paper_failed=True),
      dict(name="identity", label="(a) original", paper_error=6.61),
      dict(name="conv", label="(e) 1x1 conv", paper_error=12.22),
      dict(name="extra", label="extra, no paper value"),
      dict(name="never", label="(f) dropout", paper_failed=True)]))
  # A threshold failure keeps its number; it is not a divergence.
  assert _cells(md, "(c) gate")[1:] == ["fail", "40.00", "fail: 40.00% > 20%", "yes"]
  assert _cells(md, "(a) original")[1:] == ["6.61", "25.00", "fail: 25.00% > 20%", "no"]
  assert _cells(md, "(e) 1x1 conv")[1:] == ["12.22", "12.22", "ok", "yes"]
  assert _cells(md, "extra, no paper value")[1:] == ["—", "8.00", "ok", "—"]
  assert _cells(md, "(f) dropout")[1:] == ["fail", "not run", "not run", "—"]
  # Neither the not-run row nor the row without a paper value is counted.
  assert ("Agree with the paper on fail / not fail: 2 of 3 rows compared "
          "(1 not run, 1 without a paper value).") in md
  assert "Total wall time: 1h 03m over 4 seed runs." in md


def test_a_row_without_a_fail_line_shows_the_papers_number_but_is_not_compared(tmp_path):
  """ResNet-v2's 20% line is a CIFAR-10 notion: a CIFAR-100 row at 30% neither fails nor agrees."""
  wd = str(tmp_path)
  _write_seed(wd, "c10", 0, 6.0)
  _write_seed(wd, "c100", 0, 30.0)
  md, _ = _report(tmp_path, _config([
      dict(name="c10", label="cifar10 preact", paper_error=6.37),
      dict(name="c100", label="cifar100 preact", paper_error=22.71,
           overrides=(("failure_error", None),))]))
  assert _cells(md, "cifar10 preact")[1:] == ["6.37", "6.00", "ok", "yes"]
  assert _cells(md, "cifar100 preact")[1:] == ["22.71", "30.00", "ok", "—"]
  assert ("Agree with the paper on fail / not fail: 1 of 1 rows compared "
          "(1 without a fail line).") in md


def test_crash_without_result_is_not_a_divergence(tmp_path):
  wd = str(tmp_path)
  _write_seed(wd, "oom", 0, 0.0, status="failed", reason="RESOURCE_EXHAUSTED: out of memory",
              metrics=[{"step": 100, "train_loss": 2.0}])
  with open(os.path.join(wd, "oom", "seed0", "summary.json")) as f:
    summary = json.load(f)
  summary["final"] = {"train_loss": None, "train_error": None, "test_loss": None,
                      "test_error": None}
  with open(os.path.join(wd, "oom", "seed0", "summary.json"), "w") as f:
    json.dump(summary, f)
  md, _ = _report(tmp_path, _config([dict(name="oom", label="oom", paper_failed=True)]))
  assert _cells(md, "oom")[2:] == [
      "no result", "crashed: RESOURCE_EXHAUSTED: out of memory", "—"]
  assert "0 of 0 rows compared (1 without a result)." in md


def test_header_and_scale_note(tmp_path):
  cfg = _config([dict(name="a", label="a")], scale="cpu")
  md, _ = _report(tmp_path, cfg)
  lines = md.splitlines()
  assert lines[0] == f"# {cfg.experiment}"
  assert cfg.paper in md
  assert "Scale: cpu · data: cifar10 · depth: 110 · 400 iterations · batch: 128" in md
  assert "not comparable" in md
  cfg.scale = "paper"
  md, _ = _report(tmp_path, cfg)
  assert "not comparable" not in md
  # Exactly one table, one line per config row after header and separator.
  assert sum(1 for l in md.splitlines() if l.startswith("|")) == 2 + 1


def test_resume_duplicates_keep_last_and_torn_lines_are_skipped(tmp_path):
  d = tmp_path / "r" / "seed0"
  d.mkdir(parents=True)
  lines = [{"step": 100, "train_loss": 2.0, "train_error": 70.0, "lr": 0.1},
           {"step": 200, "train_loss": 9.9, "test_error": 99.0},   # before the crash
           {"step": 200, "train_loss": 1.5, "lr": 0.1},            # resumed run
           {"step": 200, "test_loss": 1.2, "test_error": 40.0},    # its eval, separate line
           {"step": 150, "train_loss": 1.8, "wall_s": 3.0}]
  (d / "metrics.jsonl").write_text(
      "".join(json.dumps(m) + "\n" for m in lines) + '{"step": 300, "train_lo')
  summary, metrics = report.load_run(str(d))
  assert summary is None
  assert [m["step"] for m in metrics] == [100, 150, 200]
  assert metrics[2]["train_loss"] == 1.5 and metrics[2]["test_error"] == 40.0
  # No summary but metrics on disk: the run is in progress, not absent.
  md, _ = _report(tmp_path, _config([dict(name="r", label="resumed", paper_error=6.61)]))
  assert _cells(md, "resumed")[2:] == ["40.00", "running (step 200/?)", "—"]


def test_row_result_reads_seeds_in_integer_order(tmp_path):
  for seed, err in [(10, 3.0), (2, 2.0), (0, 1.0)]:
    _write_seed(str(tmp_path), "r", seed, err)
  (tmp_path / "r" / "seed5").mkdir()  # created, nothing written yet
  (tmp_path / "r" / "notes").mkdir()
  cfg = _config([dict(name="r", label="r")])
  row = report.row_result(str(tmp_path), cfg.runs[0], cfg.failure_error)
  assert [s.seed for s in row.seeds] == [0, 2, 10]
  assert row.errors == [1.0, 2.0, 3.0] and row.median == 2.0 and row.failed is False
  empty = report.row_result(str(tmp_path), _config([dict(name="none", label="x")]).runs[0], 20.0)
  assert empty.seeds == [] and empty.median is None and empty.agree is None


def test_figure_is_png_and_no_temp_files(tmp_path):
  wd = str(tmp_path)
  runs = []
  for i in range(11):
    name = f"row{i}"
    runs.append(dict(name=name, label=f"({i}) a fairly long row label, b_g=-{i}",
                     paper_error=6.0 + i))
    if i == 3:
      _diverge(wd, name, 0, 250)  # nan loss in the curve
    elif i != 7:  # row 7 has not run
      for seed in range(2):
        _write_seed(wd, name, seed, 5.0 + i + seed, train_loss=0.01 * (i + 1))
  md_path, png_path = report.write_report(wd, _config(runs))
  assert (md_path, png_path) == (os.path.join(wd, "results.md"), os.path.join(wd, "figure.png"))
  with open(png_path, "rb") as f:
    data = f.read()
  assert data.startswith(PNG_MAGIC)
  assert 20_000 < len(data) < 5_000_000
  assert not [n for n in os.listdir(wd) if n.startswith(".") or n.endswith(".tmp")]
  # mkstemp's 0600 must not leak into the report: others read it.
  assert os.stat(md_path).st_mode & 0o777 == 0o644


def test_empty_workdir_still_writes_both_files(tmp_path):
  wd = str(tmp_path / "fresh")
  md_path, png_path = report.write_report(wd, _config([dict(name="a", label="a", paper_error=6.6)]))
  with open(md_path) as f:
    md = f.read()
  assert _cells(md, "a")[2:] == ["not run", "not run", "—"]
  assert "0 of 0 rows compared (1 not run)." in md
  assert os.path.getsize(png_path) > 0


def testatomic_write_keeps_old_file_on_failure(tmp_path):
  path = str(tmp_path / "results.md")
  with open(path, "w") as f:
    f.write("old")

  def broken(f):
    f.write(b"half")
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError):
    report.atomic_write(path, broken)
  assert open(path).read() == "old"
  assert os.listdir(tmp_path) == ["results.md"]


# ------------------------------------------------------------------ comparison experiments


def _write_loss(workdir, run, seed, loss):
  d = os.path.join(workdir, run, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "train_loss": loss + 0.1, "test_loss": loss}) + "\n")
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump({"run": run, "seed": seed, "status": "ok", "steps": 10, "total_steps": 10,
               "final": {"train_loss": loss + 0.1, "test_loss": loss}, "wall_s": 5.0}, f)


def _compare_config(runs, **extra):
  c = _config(runs)
  c.metric = "test_loss"
  c.report = "compare"
  c.failure_error = None
  for k, v in extra.items():
    c[k] = v
  return c


def test_paired_p_matches_the_textbook_value():
  # d = a - b = (-1, -2, -3): mean -2, sd 1, t = -2 / (1 / sqrt 3) = -3.464 at 2 df. For 2 df,
  # P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2 = 0.0371, so the two-sided p is 0.0742.
  a = {0: 1.0, 1: 2.0, 2: 3.0, 9: 50.0}  # seed 9 has no partner: left out
  b = {0: 2.0, 1: 4.0, 2: 6.0, 4: 0.0}
  p, mean_d = report.paired_p(a, b)
  assert p == pytest.approx(1 - 12 ** 0.5 / 14 ** 0.5, abs=1e-9) and mean_d == -2.0
  assert report.paired_p({0: 1.0, 1: 2.0}, {0: 1.5, 5: 2.0}) == (None, -0.5)
  assert report.paired_p({0: 1.0}, {1: 1.0}) == (None, None)
  # No spread in d: the sign decides, and identical rows are no difference at all.
  assert report.paired_p({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0}) == (0.0, -1.0)
  assert report.paired_p({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == (1.0, 0.0)


def test_comparison_table_gives_mean_std_delta_and_p_against_the_baseline(tmp_path):
  wd = str(tmp_path)
  # The rows' values overlap across seeds (seed 1 is harder for every row), but seed by seed the
  # value residual is always 0.05 ahead: a paired test sees it, an unpaired one would not.
  for seed, (b, v, same) in enumerate([(3.00, 2.95, 3.01), (3.20, 3.14, 3.18),
                                       (3.10, 3.06, 3.11)]):
    _write_loss(wd, "base", seed, b)
    _write_loss(wd, "vr", seed, v)
    _write_loss(wd, "noop", seed, same)
  _write_loss(wd, "vr", 3, 9.0)  # no baseline seed 3: not paired, though it counts in the mean
  cfg = _compare_config([dict(name="base", label="baseline", paper=3.3274),
                         dict(name="vr", label="value residual", paper=3.3151),
                         dict(name="noop", label="no-op")], baseline="base")
  md, png = _report(tmp_path, cfg)
  assert open(png, "rb").read(8) == PNG_MAGIC
  assert "| Δ vs baseline (mean paired difference) | p (two-sided paired t-test) |" in md
  base, vr, noop = _cells(md, "baseline"), _cells(md, "value residual"), _cells(md, "no-op")
  assert base[1:] == ["3.3274", "3.1000 ± 0.1000 (n=3)", "—", "—"]
  assert vr[1:3] == ["3.3151", "4.5375 ± 2.9760 (n=4)"] and vr[3] == "-0.0500"
  # d = (-0.05, -0.06, -0.04): t = -8.66 at 2 df, p = 0.013; Welch's test on the same values
  # gives 0.56. noop: d = (0.01, -0.02, 0.01), mean 0, p = 1.
  assert 0.01 < float(vr[4]) < 0.02 and float(noop[4]) > 0.5
  assert "value residual: better than baseline" in md
  assert "no-op: no significant difference from baseline at this scale" in md


def test_sign_change_of_a_variant_against_the_reference_over_depth(tmp_path):
  # The variant is ahead at 4 and 8 additions and behind from 16 on: the sign changes at 16.
  assert report.sign_changes({4: 2.0, 8: 2.0, 16: 2.0, 32: 2.0},
                             {4: 1.9, 8: 1.95, 16: 2.1, 32: 2.5}) == [16]
  assert report.sign_changes({4: 2.0, 8: 2.0}, {4: 1.9, 8: 1.8}) == []
  wd = str(tmp_path)
  runs = []
  for series, losses in (("identity", (2.0, 2.0, 2.0)), ("lambda", (1.9, 2.1, 2.6))):
    for x, loss in zip((4, 8, 16), losses):
      _write_loss(wd, f"{series}_{x}", 0, loss)
      runs.append(dict(name=f"{series}_{x}", label=f"{series} {x}", series=series, x=x))
  cfg = _compare_config(runs, figure="against_x", reference_series="identity", x_label="additions")
  md, png = _report(tmp_path, cfg)
  assert open(png, "rb").read(8) == PNG_MAGIC
  assert _cells(md, "lambda") == ["lambda", "1.9000", "2.1000", "2.6000", "8"]
  assert _cells(md, "identity")[-1] == "reference"
  # A row not run yet is a gap, not a divergence.
  cfg.runs.append(dict(name="lambda_32", label="lambda 32", series="lambda", x=32))
  _write_loss(wd, "identity_32", 0, 2.0)
  cfg.runs.append(dict(name="identity_32", label="identity 32", series="identity", x=32))
  md, _ = _report(tmp_path, cfg)
  assert _cells(md, "lambda") == ["lambda", "1.9000", "2.1000", "2.6000", "—", "8"]


def test_header_names_the_depths_rows_set_themselves(tmp_path):
  from resjax.configs import row
  cfg = _config([], scale="cpu")
  cfg.runs = [row("a", "a", model__depth=56), row("b", "b", model__shortcut__name="none")]
  md, _ = _report(tmp_path, cfg)
  assert "· depth: 56, 110 ·" in md
  cfg.runs = cfg.runs[:1]
  assert "· depth: 56 ·" in _report(tmp_path, cfg)[0]
