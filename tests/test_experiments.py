"""Every experiment file: loads at every scale, carries the paper's numbers, and every run's config
builds (abstract models, nothing trained). One Transformer file runs end to end at scale=test."""

import importlib.util
import json
import math
import pathlib
import re

import pytest

from resjax import claims, configs, inspect_model, report, train
from resjax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "experiments").glob("*.py"))


def _load(path, arg):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_the_readme_lists_every_experiment_file_and_each_states_its_command():
  """The README's table of experiment files is the directory's listing, and each file's docstring
  gives the command that runs it (a new file, or a renamed one, shows up here)."""
  readme = (REPO / "README.md").read_text()
  listed = set(re.findall(r"^\| `(\w+\.py)` \|", readme, re.M))
  assert listed == {p.name for p in FILES}
  for path in FILES:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert f"python -m resjax.main --config experiments/{path.name}" in module.__doc__, path.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("scale", ["paper", "cpu", "test"])
def test_every_run_of_every_file_builds(path, scale):
  config = _load(path, f"scale={scale}")
  assert config.scale == scale and config.experiment and config.paper
  runs = configs.select_runs(config)
  assert runs
  for i, run in enumerate(runs):
    rc = configs.run_config(config, run)  # every row's overrides name real fields
    if scale != "cpu" or i == 0:  # cpu rows build the models of the paper and test rows
      inspect_model.check(rc)
  claims.check(config)  # every claim names rows of this file, and `fails` has its line
  if scale == "paper":  # the paper's own recipe names the real dataset, never the offline one
    assert config.data.name not in ("digits", "stdlib")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_scale_cpu_schedules_at_most_600_steps_per_row(path):
  # scale=cpu is minutes on a laptop: a schedule left in epochs of the paper's recipe would run
  # the offline data's 1497 digits for hundreds of epochs instead (thousands of steps per row).
  config = _load(path, "scale=cpu")
  for run in configs.select_runs(config):
    rc = configs.run_config(config, run)
    assert configs.schedule_steps(rc, train_size=1497)["total"] <= 600, run.name


def test_caution_depth_projects_only_on_the_dense_rows():
  # Every variant but the dense shortcut carries x unchanged: no shortcut parameters at all.
  config = _load(REPO / "experiments" / "caution_depth.py", "scale=test")
  counts = {}
  for run in configs.select_runs(config):
    rc = configs.run_config(config, run)
    counts[(run.series, rc.model.depth)] = train.count_params(inspect_model.abstract_model(rc))
  for (series, depth), n in counts.items():
    extra = n - counts[("identity", depth)]
    w = config.model.width
    if series == "dense shortcut":  # a Dense with bias on both residuals of every block
      assert extra == depth * 2 * (w * w + w), (series, depth)
    elif series == "stacked lambda":  # two scalars per residual addition
      assert extra == depth * 2 * 2, (series, depth)
    elif series == "value residual":  # two scalars per block after the first
      assert extra == (depth - 1) * 2, (series, depth)


PAPER_NUMBERS = {  # one number per file, as REFERENCE.md gives it
    "resnetv2_fig2": ("conv1x1", 12.22), "resnetv2_fig4": ("preact_164", 5.46),
    "resnetv2_table3": ("cifar10_1001_preact", 4.92), "resnetv1_table6": ("resnet1202", 7.93),
    "resnetv1_table3": ("resnet34_C", 24.19), "highway": ("highway110_2024", 6.04),
    "value_residual": ("embed_shortcut", 3.2972), "caution_depth_resnet": ("conv1x1_110", 12.22),
}


@pytest.mark.parametrize("stem", sorted(PAPER_NUMBERS))
def test_results_md_shows_the_papers_number_on_its_row(stem, tmp_path):
  """The number reaches the table beside its row's label, before anything is trained: an error
  table reads ``paper_error``, a comparison table ``paper``, so a row that sets only the other
  one shows a dash."""
  config = _load(REPO / "experiments" / f"{stem}.py", "scale=paper")
  name, value = PAPER_NUMBERS[stem]
  (run,) = [r for r in config.runs if r.name == name]
  rows = report.collect_rows(str(tmp_path), config)  # an empty workdir: every row 'not run'
  if config.get("report", "failure") == "compare":
    text = report.render_comparison(rows, config)
  else:
    text = report.render_markdown(rows, config)
  (line,) = [l for l in text.splitlines() if l.startswith(f"| {run.label} |")]
  assert float(line.split("|")[2]) == pytest.approx(value)


def test_describe_reports_the_records_model_and_its_utilisation(cli):
  result = cli.run("--config", "experiments/value_residual.py:scale=paper,run=embed_shortcut",
                   "--mode=describe")
  assert result.returncode == 0, result.stderr
  (row,) = json.loads(result.stdout)
  assert row["params"] == 162_201_636  # derived module by module in tests/test_record_model.py
  fwd = row["forward_flops_per_example"]
  assert row["forward_flops_per_token"] == pytest.approx(fwd / 1024)
  assert row["train_flops_per_step"] == pytest.approx(3 * fwd * 512)
  ref = row["reference_step"]
  assert (ref["seconds"], ref["devices"]) == (0.15196, 8)
  assert row["mfu_at_reference_step"] == pytest.approx(
      3 * fwd * 512 / (ref["seconds"] * ref["devices"] * ref["peak_flops"]))
  # 2 x 3 FLOPs per matmul parameter (all but the embedding table, a lookup), plus attention's
  # QK^T and AV counted in full (XLA counts the causal mask's zeros): 2 x 2 T d per block, times 3.
  matmuls = 6 * (162_201_636 - 50304 * 768) + 3 * 12 * 4 * 1024 * 768
  assert matmuls <= row["train_flops_per_token"] <= 1.01 * matmuls  # the rest: norms, rotary


def test_describe_reports_gpt2_small_parameters(cli):
  result = cli.run("--config", "experiments/value_residual_gpt2.py:scale=paper,run=baseline",
                   "--config.model.vocab_size=50257", "--mode=describe")
  assert result.returncode == 0, result.stderr
  (row,) = json.loads(result.stdout)
  assert row["params"] == 124_439_808
  # Forward FLOPs of 1024 tokens: at least 2 x the 85M non-embedding parameters per token.
  assert row["forward_flops_per_example"] > 2 * 85e6 * 1024


def test_a_transformer_experiment_trains_end_to_end_and_reports_bits_per_byte(cli, tmp_path):
  workdir = tmp_path / "ln"
  result = cli.run("--config", "experiments/preln_postln.py:scale=test,run=post_nowarm_d1",
                   "--workdir", workdir)
  assert result.returncode == 0, result.stderr
  summaries = [json.loads((workdir / "post_nowarm_d1" / f"seed{s}" / "summary.json").read_text())
               for s in (0, 1)]
  for s in summaries:
    assert s["status"] == "ok" and s["steps"] == 4
    assert s["final"]["test_bpb"] == pytest.approx(s["final"]["test_loss"] / math.log(2))
    # A byte model that learned anything beats the uniform 8 bits per byte... not in 4 steps;
    # but it cannot be worse than a few times uniform either.
    assert 0 < s["final"]["test_loss"] < 3 * math.log(256)
  assert summaries[0]["final"]["test_loss"] != summaries[1]["final"]["test_loss"]  # two inits
  md = (workdir / "results.md").read_text()
  assert "Post-LN, no warm-up, 1 blocks" in md and (workdir / "figure.png").exists()


def test_fig2_paper_rows_are_resnet110_with_option_a_shortcuts():
  # ResNet-v1 §4.2: CIFAR nets use option A (no shortcut parameters), 1,727,962 parameters for
  # ResNet-110 on CIFAR-10; option B would add the two projections' 1x1 kernels and BNs.
  config = _load(REPO / "experiments" / "resnetv2_fig2.py", "scale=paper")
  (run,) = [r for r in config.runs if r.name == "identity"]
  rc = configs.run_config(config, run)
  assert rc.model.shortcut.option == "A"
  assert train.count_params(inspect_model.abstract_model(rc)) == 1_727_962


# ------------------------------------------------------------------------ rows' shortcut keys


def _fig2_test_with_row(overrides):
  config = _load(REPO / "experiments" / "resnetv2_fig2.py", "scale=test")
  return config, configs.row("probe", "probe", overrides)


def test_a_row_may_set_any_key_of_its_shortcut_form_in_any_order():
  """The base config declares no gate_bias; the exclusive gate does, and the row names the form
  after setting its key."""
  config, run = _fig2_test_with_row({"model.shortcut.gate_bias": -3.0,
                                     "model.shortcut.name": "exclusive_gate"})
  assert "gate_bias" not in config.model.shortcut
  rc = configs.run_config(config, run)
  assert rc.model.shortcut.name == "exclusive_gate" and rc.model.shortcut.gate_bias == -3.0
  model = inspect_model.abstract_model(rc)
  bias = model.stages[1].first.shortcut.gate.proj.bias
  assert bias.shape == (32,)  # stage 2's first unit: 16 -> 32 channels


@pytest.mark.parametrize("overrides, fix", [
    ({"model.shortcut.gate_bias": -3.0}, "of the 'identity' shortcut: use one of name, option"),
    ({"model.shortcut.name": "exclusive_gate", "model.shortcut.gate_bais": -3.0},
     "use one of gate_bias, name, option"),
    ({"model.value_residual.scale": 0.5}, "names no config field"),  # no value stream in a ResNet
    ({"model.dpeth": 20}, "names no config field"),
])
def test_a_key_the_form_does_not_have_is_one_error_naming_its_keys(overrides, fix):
  config, run = _fig2_test_with_row(overrides)
  with pytest.raises(ConfigError, match="override") as e:
    configs.run_config(config, run)
  assert fix in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_sets_a_shortcut_key_no_base_config_declares(cli):
  """fig2's base config names identity alone; the flag's value wins over the row's -6."""
  result = cli.run("--config", "experiments/resnetv2_fig2.py:scale=test,run=exclusive_gate_bg-6",
                   "--config.model.shortcut.gate_bias=-2.5", "--mode=describe")
  assert result.returncode == 0, result.stderr
  (row,) = json.loads(result.stdout)
  assert row["model"]["shortcut"] == {"name": "exclusive_gate", "option": "A", "gate_bias": -2.5}
