"""Tests for the bench's GPT-2 row and the GPU script: the PyTorch GPT is resjax's, its loss starts
at ln(vocab) and a step lowers it, the FLOPs behind the row's MFU are GPT-2's, and
tools/gpu_bench.py runs end to end on the CPU at tiny shapes. No timings."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import assert_f32_close, initialised_transformer, randomize_resnet
from resjax import inspect_model, models
from resjax.bench import cli as bench_cli
from resjax.bench import rows
from resjax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vocab": 64, "context": 16, "width": 32, "depth": 2, "heads": 2}


def _gpt_cfg(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**rows.ROWS["gpt2"].model, **fields})


def _tiny_cfg(scan=True):
  t = TINY
  return _gpt_cfg(vocab_size=t["vocab"], context=t["context"], width=t["width"], depth=t["depth"],
                  heads=t["heads"], scan=scan)


def _tiny_twin():
  torch_gpt = pytest.importorskip("resjax.bench.torch_gpt")
  t = TINY
  return torch_gpt.GPT(t["vocab"], t["context"], t["width"], t["depth"], t["heads"])


# ------------------------------------------------------------------------ the PyTorch GPT

def test_gpt2_row_has_gpt2_smalls_parameter_count_in_both():
  """GPT-2 small: 124,439,808 parameters at its 50257 tokens (nanoGPT's count, positions and the
  tied embedding included); the row's 50304 adds 47 rows of 768."""
  torch = pytest.importorskip("torch")
  torch_gpt = pytest.importorskip("resjax.bench.torch_gpt")
  row = rows.ROWS["gpt2"]
  expected = 124_439_808 + (rows.GPT2_VOCAB - 50257) * 768
  abstract = nnx.eval_shape(lambda: models.build(
      _gpt_cfg(), num_classes=row.data["classes"], in_channels=0, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(p.shape)) for p in params) == expected
  with torch.device("meta"):  # shapes only: nothing drawn
    twin = torch_gpt.GPT(row.data["classes"], row.data["context"], **row.torch)
  assert torch_gpt.count_params(twin) == expected


def _twin_with_resjax_weights():
  """A tiny resjax GPT (unscanned, random weights) and the PyTorch GPT holding its weights."""
  torch = pytest.importorskip("torch")
  model = randomize_resnet(initialised_transformer(_tiny_cfg(scan=False)))
  twin = _tiny_twin()
  target = dict(twin.named_parameters())
  qkv = {}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path, v = [str(p) for p in path], np.array(value[...])
    if path[0] in ("first", "rest"):  # first.* / rest.i.* -> blocks.(0 | i + 1).*
      i = 0 if path[0] == "first" else int(path[1]) + 1
      path = ["blocks", str(i)] + path[1 if path[0] == "first" else 2:]
    if path[2:4] == ["residual_norms", "0"] or path[2:4] == ["residual_norms", "1"]:
      path = path[:2] + ["norm1" if path[3] == "0" else "norm2"] + path[4:]
    if path[2:3] == ["mlp"]:
      path = path[:2] + path[3:]
    if path[-1] in ("embedding", "scale"):
      path = path[:-1] + ["weight"]
    elif path[-1] == "kernel":  # [in, out] -> [out, in]
      path, v = path[:-1] + ["weight"], v.T
    if path[2:3] == ["attn"] and path[3] in ("query", "key", "value"):
      qkv.setdefault(".".join(path[:3] + ["qkv", path[4]]), {})[path[3]] = v
      continue
    name = ".".join(path)
    assert target[name].shape == v.shape, name
    with torch.no_grad():
      target[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
  for name, parts in qkv.items():  # one Dense three widths wide: query, key, value side by side
    v = np.concatenate([parts[k] for k in ("query", "key", "value")], axis=0)
    assert target[name].shape == v.shape, name
    with torch.no_grad():
      target[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
  loaded = {n for n in target if n.split(".")[-2] != "qkv"} | set(qkv)
  assert loaded == set(target)
  return model, twin


def test_gpt_twin_computes_the_resjax_function():
  """Same weights, same tokens: the same logits, so the twin is the same net (a head split the
  wrong way, GELU's other form or a missing causal mask move them by far more)."""
  torch = pytest.importorskip("torch")
  model, twin = _twin_with_resjax_weights()
  tokens = np.random.default_rng(3).integers(0, TINY["vocab"], (3, TINY["context"]))
  ours = model(jnp.asarray(tokens, jnp.int32), train=False)
  with torch.no_grad():
    theirs = twin(torch.from_numpy(tokens)).numpy()
  # Another framework's kernels: 2 residual additions per block and the head, the longest sum
  # the MLP's projection (4 x width terms).
  assert_f32_close(theirs, ours, terms=4 * TINY["width"], depth=2 * TINY["depth"] + 1)


def test_gpt_twin_starts_at_log_vocab_and_one_step_lowers_the_loss():
  torch = pytest.importorskip("torch")
  torch_gpt = pytest.importorskip("resjax.bench.torch_gpt")
  torch.manual_seed(0)
  twin = _tiny_twin()
  step = torch_gpt.make_step(twin, torch_gpt.make_optimizer(twin, fused=False), compile=False,
                             autocast_dtype=None)
  g = torch.Generator().manual_seed(0)
  windows = torch.randint(0, TINY["vocab"], (4, TINY["context"] + 1), generator=g)
  before = float(step(windows))
  # Logits at init are the final LN's output (unit variance per channel) times N(0, 0.02)
  # embeddings: std s = 0.02 sqrt(width) = 0.11. The loss exceeds ln(vocab) by about s^2 / 2
  # (0.006), and the mean target logit over 64 positions wanders by s / 8 (0.014).
  assert abs(before - math.log(TINY["vocab"])) < 0.05
  after = float(step(windows))  # the loss on the same windows after the first update
  assert after < before


# ------------------------------------------------------------------------ the gpt2 row

def test_text_row_shrinks_for_quick_checks():
  row = rows.resolve_row("gpt2", 16)
  assert row.model["context"] == row.data["context"] == row.tokens == 16
  assert (row.model["width"], row.model["depth"], row.model["heads"]) == (16, 2, 2)
  assert row.torch == {"width": 16, "depth": 2, "heads": 2}
  assert row.data["classes"] == rows.GPT2_VOCAB and row.optim == rows.GPT2_ADAMW
  assert rows.resolve_row("gpt2").tokens == 1024 and rows.resolve_row("resnet110").tokens == 0
  with pytest.raises(ConfigError, match="even size"):
    rows.resolve_row("gpt2", 15)


def test_gpt2_forward_flops_are_the_matmuls_of_gpt2():
  """XLA's count behind the row's MFU: per token, 2 FLOPs per matmul weight (12 L d^2 in the
  blocks, V d in the tied head) and 4 T d per block for attention's two T x T products (all of
  them: the causal mask does not halve the count); norms, GELU and softmax add under 2% here."""
  row = rows.ROWS["gpt2"]
  t, d, n, v = row.tokens, row.model["width"], row.model["depth"], row.data["classes"]
  example = jax.ShapeDtypeStruct((t,), jnp.int32)
  flops = inspect_model.flops_at_depth(
      _gpt_cfg(vocab_size=v), lambda c: inspect_model.xla_forward_flops(c, example, v, 0))
  matmuls = t * (2 * (12 * n * d * d + v * d) + 4 * n * t * d)
  assert 1.0 <= flops / matmuls < 1.02


def test_token_table_counts_tokens_and_gives_each_implementation_its_mfu():
  def result(ex_s, **kw):
    return {"examples_per_s": ex_s, "step_s": 32 / ex_s, "compile_s": 1.0, "peak_gib": 1.0,
            "batch": 32, "tokens_per_example": 1024, **kw}
  flops = 3 * 2.9e11  # about GPT-2 small's training FLOPs per sequence of 1024
  results = {("resnet110", "float32"): {"resjax": result(10.0)},
             ("gpt2", "bfloat16"): {"resjax": result(100.0, flops_per_example=flops),
                                    "torch-eager": result(50.0),
                                    "torch-compile": {"error": "no C++ compiler"}}}
  header, _, line = bench_cli.token_table(results, peak=989.0)[1:]
  cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
  assert cells["model"] == "GPT-2 small, T=1024"  # the image row has no line here
  assert cells["resjax tok/s"] == "102,400" and cells["torch eager tok/s"] == "51,200"
  assert cells["torch.compile tok/s"] == "failed" and cells["compile MFU"] == "-"
  # PyTorch's MFU from resjax's FLOPs: the same net does the same work.
  assert cells["eager MFU"] == f"{flops * 50 / 989e12:.1%}"
  assert cells["resjax MFU"] == f"{flops * 100 / 989e12:.1%}"
  assert bench_cli.token_table({("resnet110", "float32"): results[("resnet110", "float32")]},
                               peak=None) == []


# ------------------------------------------------------------------------ tools/gpu_bench.py

sys.path.insert(0, str(REPO / "tools"))
import gpu_bench  # noqa: E402


def test_plan_measures_eager_before_compile_bf16_first_quickest_compile_first():
  p = gpu_bench.plan(["resnet110", "gpt2"], ["float32", "bfloat16"], torch_compile=True)
  assert p[:4] == [("resnet110", "bfloat16", "resjax"), ("resnet110", "bfloat16", "torch-eager"),
                   ("gpt2", "bfloat16", "resjax"), ("gpt2", "bfloat16", "torch-eager")]
  assert p[-4:] == [("gpt2", "bfloat16", "torch-compile"), ("resnet110", "bfloat16", "torch-compile"),
                    ("gpt2", "float32", "torch-compile"), ("resnet110", "float32", "torch-compile")]
  assert len(p) == 12 and len(set(p)) == 12
  assert all(i != "torch-compile" for _, _, i in gpu_bench.plan(["gpt2"], ["float32"], False))


def test_version_floor_and_missing_wheels(monkeypatch, tmp_path):
  assert gpu_bench._at_least("0.12.8", (0, 12)) and gpu_bench._at_least("1.0", (0, 12))
  assert not gpu_bench._at_least("0.11.2", (0, 12))
  assert gpu_bench._at_least("0.12.0rc1", (0, 12))
  monkeypatch.setattr(gpu_bench, "REQUIRES", (("no-such-dist-of-resjax", None),))
  with pytest.raises(gpu_bench.UserError, match="no-such-dist-of-resjax .*--fetch-wheels"):
    gpu_bench.install_lacking(tmp_path, tmp_path / "site")


def _gpu_bench(tmp_path, *args, **env):
  return subprocess.run([sys.executable, "tools/gpu_bench.py", "--dry-run", "--out",
                         str(tmp_path), *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "OUT": "", **env})


def test_gpu_bench_dry_run_writes_the_table_and_the_bench_json(tmp_path):
  pytest.importorskip("torch")
  proc = _gpu_bench(tmp_path, "--rows", "gpt2", "--dtypes", "float32", "--no-torch-compile")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "gpu_bench.md").read_text()
  assert md.startswith("# resjax and PyTorch training steps on cpu (cpu), ")
  tokens = next(l for l in md.splitlines()
                if l.startswith("| GPT-2 small, T=1024 | float32 | 16 |"))
  cells = [c.strip() for c in tokens.split("|")[1:-1]]
  assert float(cells[3].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0
  assert cells[5] == "-"  # torch.compile not asked for
  data = json.loads((tmp_path / "gpu_bench.json").read_text())
  runs = data["rows"][0]["runs"]
  assert set(runs) == {"resjax", "torch-eager"}
  # Width 16: logits at init have std 0.02 * 4, so both losses are ln(50304) to a few 1e-3.
  for impl in runs:
    assert abs(runs[impl][0]["loss"] - math.log(rows.GPT2_VOCAB)) < 0.05
    assert runs[impl][0]["tokens_per_example"] == 16 and runs[impl][0]["batch"] == 2
  assert runs["resjax"][0]["flops_per_example"] > 0
  # The bench's own --merge reads the file back into the same table.
  merged = subprocess.run([sys.executable, "-m", "resjax.bench", "--merge",
                           str(tmp_path / "gpu_bench.json")], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
  assert merged.returncode == 0 and tokens in merged.stdout
  # --recount replaces a wrong count (XLA:GPU's compiled program left out its library calls) with
  # this resjax's, keeping the run's own; here both are this resjax's, so it comes back exactly.
  counted = runs["resjax"][0]["flops_per_example"]
  data["rows"][0]["runs"]["resjax"][0]["flops_per_example"] = counted / 100
  (tmp_path / "gpu_bench.json").write_text(json.dumps(data))
  proc = subprocess.run([sys.executable, "tools/gpu_bench.py", "--recount",
                         str(tmp_path / "gpu_bench.json")], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  again = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"][0]["runs"]["resjax"][0]
  assert again["flops_per_example"] == counted
  assert again["flops_per_example_as_measured"] == counted / 100
  md = (tmp_path / "gpu_bench.md").read_text()
  assert "counted again by `python tools/gpu_bench.py --recount`" in md and tokens in md
  missing = subprocess.run([sys.executable, "tools/gpu_bench.py", "--recount",
                            str(tmp_path / "none.json")], cwd=REPO, capture_output=True, text=True)
  assert missing.returncode == 2 and "give --recount the gpu_bench.json" in missing.stderr
  (tmp_path / "other.json").write_text('{"rows": []}')
  other = subprocess.run([sys.executable, "tools/gpu_bench.py", "--recount",
                          str(tmp_path / "other.json")], cwd=REPO, capture_output=True, text=True)
  assert other.returncode == 2 and other.stderr.count("\n") == 1
  assert "is not a gpu_bench.json" in other.stderr
  assert (tmp_path / "other.json").read_text() == '{"rows": []}'  # left as it was


def test_gpu_bench_names_what_the_budget_left_out_and_the_xla_flags(tmp_path):
  """The table says what did not run, and the XLA_FLAGS its children ran under (a workaround
  for a compiler's abort changes what is measured)."""
  flag = "--xla_cpu_enable_fast_min_max=true"
  proc = _gpu_bench(tmp_path, "--rows", "resnet110", "--budget", "0", XLA_FLAGS=flag)
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "gpu_bench.md").read_text()
  assert f"; XLA_FLAGS={flag}." in md
  assert "Not measured: the budget of 0 s was spent before resnet110 bfloat16 resjax," in md
  assert md.rstrip().endswith("resnet110 float32 torch-compile.")
  assert json.loads((tmp_path / "gpu_bench.json").read_text())["rows"] == []
