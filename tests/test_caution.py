"""`python -m resjax.caution`: the paired statistics on synthetic results, a user's form in
tmp_path through the command at scale=test (and a form that diverges at depth), each bad input's
one line, and a user's form by import path in `python -m resjax.main`."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import make_rngs
from scipy import stats

from resjax import caution
from resjax.caution import Point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------- statistics, synthetic results


def _point(base, form, family="resnet", depth=20, additions=9):
  return caution.compare(Point(family, depth, additions, dict(enumerate(base)),
                               dict(enumerate(form))))


def test_advantage_is_identity_minus_form_paired_by_seed_with_scipys_p():
  base, form = [7.0, 6.5, 7.4, 6.9], [6.1, 6.4, 6.8, 6.0]
  p = _point(base, form)
  d = np.subtract(base, form)
  assert p.n == 4 and p.mean == pytest.approx(d.mean()) and p.sd == pytest.approx(d.std(ddof=1))
  assert p.ratio == pytest.approx(np.mean(form) / np.mean(base))
  assert p.ratio_sd == pytest.approx(np.std(np.divide(form, base), ddof=1))
  assert p.p == pytest.approx(stats.ttest_rel(base, form).pvalue)
  # Pairing matters: the same values with seeds shuffled in one row give another p.
  shuffled = caution.compare(Point("resnet", 20, 9, dict(enumerate(base)),
                                   dict(zip([1, 2, 3, 0], form))))
  assert shuffled.p != pytest.approx(p.p)


def test_only_seeds_both_rows_finished_are_paired():
  p = caution.compare(Point("resnet", 20, 9, {0: 5.0, 1: 6.0, 2: 7.0, 3: 8.0},
                            {1: 5.0, 2: 6.5, 3: 7.0, 4: 1.0}))
  assert p.n == 3 and p.mean == pytest.approx(np.mean([1.0, 0.5, 1.0]))


def test_fewer_than_three_seeds_is_undecided_however_large_the_gap():
  p = _point([50.0, 51.0], [5.0, 5.1])
  assert p.decision == "undecided" and p.p is None and "3 needed" in p.note


def test_a_form_that_diverged_where_identity_did_not_hurts_at_that_depth():
  p = _point([5.0, 5.1, 5.2], [4.0, math.inf, 4.1])
  assert p.decision == "hurts" and "diverged in 1 of 3" in p.note and p.mean is None
  q = _point([math.inf, 5.1, 5.2], [math.inf, 6.0, 6.1])
  assert q.decision == "undecided" and "identity diverged" in q.note


def test_holm_over_the_forms_depths_decides_and_can_undo_a_raw_p():
  # A clear win; a depth whose raw p (0.047) is below 0.05 but, second of three, is doubled by
  # Holm; and a depth of noise.
  helps = _point([10.0, 11.0, 12.0, 10.5, 11.5], [8.0, 9.1, 9.9, 8.4, 9.6], additions=9)
  close = _point([5.0, 5.1, 5.2, 5.0, 5.3], [4.8, 5.08, 4.9, 4.95, 5.15], additions=27)
  noise = _point([5.0, 5.2, 5.1, 5.3, 4.9], [5.1, 5.0, 5.3, 5.2, 5.0], "transformer", 16, 32)
  assert helps.p < close.p < 0.05 < noise.p
  pts = caution.decide([helps, close, noise])
  assert [p.decision for p in pts] == ["helps", "undecided", "undecided"]
  assert close.p_holm == pytest.approx(max(3 * helps.p, 2 * close.p))
  assert noise.p_holm == pytest.approx(max(close.p_holm, noise.p))
  # A clear loss is decided as one.
  hurts = _point([5.0, 5.2, 5.1, 5.3, 4.9], [7.0, 7.1, 7.3, 7.2, 6.8], "transformer", 16, 32)
  assert caution.decide([hurts])[0].decision == "hurts"


def test_the_verdict_names_where_the_form_helps_hurts_and_changes_sign():
  pts = [
      Point("transformer", 1, 2, {}, {}, n=3, mean=0.02, p=0.001, decision="helps"),
      Point("resnet", 20, 9, {}, {}, n=3, mean=0.5, p=0.01, decision="helps"),
      Point("resnet", 56, 27, {}, {}, n=3, mean=-0.1, p=0.4, decision="undecided"),
      Point("resnet", 110, 54, {}, {}, n=3, mean=-3.0, p=0.001, decision="hurts"),
      Point("transformer", 16, 32, {}, {}, n=3, decision="hurts", note="diverged in 3 of 3 seeds"),
  ]
  text = caution.verdict("Gate", pts, lambda p: caution.depth_label(p.family, p.depth))
  assert "helps up to 9 residual additions (1 block at 2, ResNet-20 at 9)" in text
  assert "hurts from 32 on (16 blocks at 32, ResNet-110 at 54)" in text
  assert "undecided at 27 residual additions (ResNet-56)" in text
  assert "diverged (NaN or inf) at 32 residual additions (16 blocks)" in text
  assert "In the ResNets its mean advantage turns negative between 9 and 27 additions" in text
  assert "In the Transformers its mean advantage turns negative between 2 and 32" in text
  assert caution.sign_changes(pts[1:4]) == [(9, 27, -1)]


def test_a_form_that_helps_at_depth_and_hurts_shallow_is_not_called_a_caution_case():
  pts = [Point("resnet", 20, 9, {}, {}, n=3, mean=-1.0, decision="hurts"),
         Point("resnet", 110, 54, {}, {}, n=3, mean=1.0, decision="helps")]
  text = caution.verdict("F", pts, lambda p: caution.depth_label(p.family, p.depth))
  assert "helps up to" not in text
  assert "helps at 54 residual additions" in text and "hurts at 9 residual additions" in text
  assert "turns positive between 9 and 54" in text


# ------------------------------------------------------------------ the command, end to end

FORMS = textwrap.dedent("""\
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import resjax


    class Gate(resjax.MatchedShortcut):
      defaults = {**resjax.MatchedShortcut.defaults, "gate_init": 1.0}

      def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.g = resjax.ResidualScalar(jnp.asarray(self.setting(cfg, "gate_init"), jnp.float32))

      def __call__(self, x, f, *, train):
        return self.g[...] * self.carried(x, train) + f


    class Blowup(resjax.MatchedShortcut):
      # Multiplies the carried stream by 1e8 per addition. After 2 additions (1 block) the
      # final LayerNorm's mean of squares is about 1e28; after 4 it overflows float32.
      def __call__(self, x, f, *, train):
        return 1e8 * self.carried(x, train) + f


    class NotAModule:
      pass


    class NoProjects(nnx.Module):
      def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
        pass

      def __call__(self, x, f, *, train):
        return x + f


    class WrongShape(resjax.MatchedShortcut):
      def __call__(self, x, f, *, train):
        return x  # never maps x to f's shape


    class Broken(resjax.MatchedShortcut):
      def __init__(self, cfg, *args, **kwargs):
        raise RuntimeError("not built yet")
    """)


@pytest.fixture
def forms(tmp_path):
  path = tmp_path / "user_forms.py"
  path.write_text(FORMS)
  return path


def _caution(args, cache, cwd=REPO, timeout=600):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.run([sys.executable, "-m", "resjax.caution", *map(str, args)], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_a_users_form_in_tmp_path_gets_a_verdict_and_a_rerun_trains_nothing(
    forms, tmp_path, compile_cache_dir):
  work = tmp_path / "work"
  args = ["--shortcut", f"{forms}:Gate", "--set", "gate_init=0.9", "--scale", "test",
          "--workdir", work]
  proc = _caution(args, compile_cache_dir)
  assert proc.returncode == 0, proc.stderr
  md = (work / "results.md").read_text()
  key = "Gate.gate_init=0.9"
  assert f"## {key}" in md and f"{key}, against identity over 3 paired seeds" in md
  table = [line for line in md.splitlines() if line.startswith(("| ResNet |", "| Transformer |"))]
  # ResNet-8 and -14 (3 and 6 units), 1 and 2 blocks (2 and 4 additions): one axis.
  assert [line.split(" | ")[2] for line in table] == ["2", "3", "4", "6"]
  assert (work / "verdict.png").stat().st_size > 10_000
  for family, depths in (("resnet", (8, 14)), ("transformer", (1, 2))):
    for name in ("identity", key):
      for d in depths:
        summaries = [json.loads((work / family / f"{name}_d{d}" / f"seed{s}" / "summary.json")
                                .read_text()) for s in range(3)]
        assert all(s["status"] in ("ok", "failed") for s in summaries)
  # The form trained with its setting: the row's config says so.
  config = json.loads((work / "transformer" / "config.json").read_text())
  row = next(r for r in config["runs"] if r["name"] == f"{key}_d2")
  assert ["model.shortcut.gate_init", 0.9] in [list(o) for o in row["overrides"]]
  recorded = json.loads((work / "forms.json").read_text())[key]
  assert recorded["settings"] == {"gate_init": 0.9} and len(recorded["source_sha256"]) == 64

  again = _caution(args, compile_cache_dir)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count("already done, skipped") == 8
  assert (work / "results.md").read_text().split("Wall time")[0] == md.split("Wall time")[0]

  # An edited class may not reuse the rows of the old one.
  forms.write_text(FORMS.replace("self.g[...] * self.carried", "self.g[...] * 1.0 * self.carried"))
  edited = _caution(args, compile_cache_dir)
  assert edited.returncode == 2
  assert edited.stderr.count("\n") == 1 and "source or settings changed" in edited.stderr


def test_a_form_whose_loss_diverges_at_depth_fails_there_and_the_sweep_goes_on(
    forms, tmp_path, compile_cache_dir):
  work = tmp_path / "work"
  proc = _caution(["--shortcut", f"{forms}:Blowup", "--families", "transformer", "--scale",
                   "test", "--workdir", work], compile_cache_dir)
  assert proc.returncode == 0, proc.stderr
  md = (work / "results.md").read_text()
  rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| Transformer")}
  assert "hurts (diverged in 3 of 3 seeds)" in rows["2 blocks"]
  # The sweep trained every row: each seed of both depths has a summary.
  for d in (1, 2):
    for s in range(3):
      summary = json.loads((work / "transformer" / f"Blowup_d{d}" / f"seed{s}" / "summary.json")
                           .read_text())
      assert summary["status"] in ("ok", "failed")
  assert "Its loss diverged (NaN or inf) at" in md


# ------------------------------------------------------------------------------ bad input

BAD = {
    "no_such_file": (["--shortcut", "nowhere/forms.py:Gate"], ["no file nowhere/forms.py"]),
    "no_such_module": (["--shortcut", "no_such_module_here:Gate"],
                       ["no module 'no_such_module_here'", "path/to/no_such_module_here.py"]),
    "no_such_class": (["--shortcut", "FORMS:Nope"], ["has no 'Nope'", "Gate", "Blowup"]),
    "not_a_module": (["--shortcut", "FORMS:NotAModule"], ["not a flax.nnx.Module subclass"]),
    "no_projects": (["--shortcut", "FORMS:NoProjects"], ["no boolean `projects` attribute"]),
    "wrong_shape": (["--shortcut", "FORMS:WrongShape"],
                    ["returned shape (2, 4, 4, 8) for a branch of shape (2, 2, 2, 16)",
                     "stride 2", "self.carried(x, train)"]),
    "constructor_raises": (["--shortcut", "FORMS:Broken"], ["could not be built",
                                                            "RuntimeError: not built yet"]),
    "unknown_builtin": (["--shortcut", "lamda"], ["unknown shortcut 'lamda'", "lambda",
                                                  "FILE.py:CLASS"]),
    "identity": (["--shortcut", "identity"], ["the baseline"]),
    "no_form": ([], ["--shortcut"]),
    "two_seeds": (["--shortcut", "lambda", "--seeds", "2"], ["at least 3 paired seeds"]),
    "unknown_setting": (["--shortcut", "lambda", "--set", "gate_init=1"],
                        ["--set gate_init", "lambda1_init"]),
    "bad_setting": (["--shortcut", "lambda", "--set", "lambda1_init"], ["KEY=VALUE"]),
    "unknown_family": (["--shortcut", "lambda", "--families", "mlp"], ["resnet, transformer"]),
    "unknown_scale": (["--shortcut", "lambda", "--scale", "huge"], ["huge", "cpu"]),
    "unknown_flag": (["--shortcut", "lambda", "--depths", "3"], ["--depths"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_before_anything_is_written(case, forms, tmp_path, capsys):
  args, parts = BAD[case]
  work = tmp_path / "work"
  args = [a.replace("FORMS", str(forms)) for a in args] + ["--scale=test", "--workdir", str(work)]
  if "--scale" in args[:-3]:
    args = args[:-3] + args[-2:]
  assert caution.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for part in parts:
    assert part in err, (part, err)
  assert not work.exists()


def test_a_dataset_not_prepared_is_one_line_naming_both_fixes(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
  assert caution.main(["--shortcut", "conv1x1", "--scale", "paper", "--workdir",
                       str(tmp_path / "work")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "cifar10 is not prepared" in err
  assert "resjax.data.prepare" in err and "--scale cpu" in err and "config.data" not in err
  assert not (tmp_path / "work").exists()


def test_an_unwritable_workdir_is_one_line(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  assert caution.main(["--shortcut", "lambda", "--scale", "test", "--workdir",
                       str(tmp_path / "file" / "work")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "file" in err


# ------------------------------------------------- a user's form in python -m resjax.main


def _params(proc):
  assert proc.returncode == 0, proc.stderr
  return {r["run"]: r for r in json.loads(proc.stdout)}


def test_main_takes_a_users_form_by_import_path_and_its_own_keys(forms, cli):
  exp = "experiments/caution_depth.py:scale=test,variants=identity"
  base = _params(cli.run("--config", exp, "--mode=describe"))
  gate = _params(cli.run("--config", exp, f"--config.model.shortcut.name={forms}:Gate",
                         "--config.model.shortcut.gate_init=0.25", "--mode=describe"))
  for d, blocks in (("identity_d1", 1), ("identity_d2", 2)):
    # One learnable scalar per residual addition, two additions per block.
    assert gate[d]["params"] == base[d]["params"] + 2 * blocks
    assert gate[d]["model"]["shortcut"]["gate_init"] == 0.25
  # A form that is not a shortcut is refused in one line before anything is built. (WrongShape
  # passes here: tokens never change shape, so it is only wrong in a ResNet.)
  bad = cli.run("--config", exp, f"--config.model.shortcut.name={forms}:NoProjects",
                "--mode=describe")
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1
  assert "no boolean `projects` attribute (tokens, width 8)" in bad.stderr
  missing = cli.run("--config", exp, "--config.model.shortcut.name=no/such/forms.py:Gate",
                    "--mode=describe")
  assert missing.returncode == 2 and "no file no/such/forms.py" in missing.stderr


def test_register_names_a_form_for_the_config_and_refuses_resjaxs_own_names(forms):
  import importlib.util

  import ml_collections

  import resjax
  from resjax.errors import ConfigError
  from resjax.models import shortcuts
  spec = importlib.util.spec_from_file_location("user_forms_for_register", forms)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  resjax.register("test_gate", module.Gate)
  try:
    cfg = ml_collections.ConfigDict({"name": "test_gate", "gate_init": 0.5})
    shortcuts.check_form(cfg)
    assert shortcuts.fields("test_gate") == {"name": "test_gate", "option": "B", "gate_init": 1.0}
    with pytest.raises(ConfigError, match="one of resjax's own forms"):
      resjax.register("lambda", module.Gate)
    with pytest.raises(ConfigError, match="not a flax.nnx.Module subclass"):
      resjax.register("test_plain", module.NotAModule)
  finally:
    shortcuts.USER_FORMS.pop("test_gate", None)


@pytest.mark.parametrize("family,depth,parallel,additions", [
    ("cifar_resnet", 20, False, 9), ("cifar_resnet", 110, False, 54),
    ("transformer", 4, False, 8), ("transformer", 4, True, 4)])
def test_residual_additions_put_both_families_on_one_axis(family, depth, parallel, additions):
  from resjax import configs, inspect_model
  c, _ = (configs.caution_resnet if family == "cifar_resnet" else configs.caution_lm)("test")
  c.model.depth = depth
  if parallel:
    c.model.parallel = True
  assert inspect_model.abstract_model(c).residual_additions == additions


def test_the_examples_forms_pass_the_checks_and_their_lambda_is_resjaxs_lambda():
  import jax
  import jax.numpy as jnp
  import ml_collections

  from resjax.models import shortcuts
  path = os.path.join(REPO, "examples", "my_residuals.py")
  for cls in ("LearnedLambda", "ChannelGate"):
    shortcuts.check_form(ml_collections.ConfigDict({"name": f"{path}:{cls}"}))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  f = jax.random.normal(jax.random.key(1), (2, 2, 2, 16))
  cfg = lambda name: ml_collections.ConfigDict({"name": name, "option": "A"})
  mine = shortcuts.make_shortcut(cfg(f"{path}:LearnedLambda"), 8, 16, 2, rngs=make_rngs())
  ours = shortcuts.make_shortcut(cfg("lambda"), 8, 16, 2, rngs=make_rngs())
  # The same parameters under the same names, and the same ops in the same order.
  same = jax.tree.map(jnp.array_equal, nnx_state(mine), nnx_state(ours))
  assert jax.tree.all(same)
  np.testing.assert_array_equal(mine(x, f, train=True), ours(x, f, train=True))
  # ChannelGate starts as the identity shortcut: 2 sigmoid(w) = 1 within float32 rounding.
  gate = shortcuts.make_shortcut(cfg(f"{path}:ChannelGate"), 8, 16, 2, rngs=make_rngs())
  identity = shortcuts.make_shortcut(cfg("identity"), 8, 16, 2, rngs=make_rngs())
  eps = float(jnp.finfo(jnp.float32).eps)
  np.testing.assert_allclose(gate(x, f, train=True), identity(x, f, train=True),
                             rtol=4 * eps, atol=4 * eps * float(jnp.abs(x).max()))


def nnx_state(module):
  from flax import nnx
  return nnx.state(module, nnx.Param)


def test_the_readmes_form_is_the_examples_form():
  """The README shows ChannelGate's code: every line of it is in examples/my_residuals.py."""
  import re
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  block = re.search(r"```python\n(class ChannelGate.*?)```", readme, re.S).group(1)
  example = open(os.path.join(REPO, "examples", "my_residuals.py"), encoding="utf-8").read()
  lines = [line.split("  #")[0].rstrip() for line in block.splitlines()]
  for line in filter(None, lines):
    assert line in example, line


def test_a_module_on_the_path_is_found_from_the_working_directory(tmp_path, monkeypatch):
  """MODULE:CLASS imports a module of the working directory, as `python -m` runs from there."""
  import ml_collections

  from resjax.models import shortcuts
  (tmp_path / "my_forms_in_cwd.py").write_text(FORMS)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  monkeypatch.delitem(sys.modules, "my_forms_in_cwd", raising=False)
  name = "my_forms_in_cwd:Gate"
  try:
    assert shortcuts.form(name).__name__ == "Gate"
    assert shortcuts.fields(name)["gate_init"] == 1.0
    shortcuts.check_form(ml_collections.ConfigDict({"name": name, "gate_init": 0.5}))
  finally:
    shortcuts.USER_FORMS.pop(name, None)
    sys.modules.pop("my_forms_in_cwd", None)
