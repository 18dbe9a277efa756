"""Tests for the speed benchmark: the PyTorch twin is the same net, the CPU convolution's gradients,
the MFU arithmetic, the table's columns, and one tiny row of the CLI end to end. No timings."""

import json
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

from conftest import assert_f32_close, f32_tol
from resjax import inspect_model, models, train
from resjax.bench import cli as bench_cli
from resjax.bench import profile, rows
from resjax.errors import ConfigError
from resjax.models import layers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _model_cfg(row: str, depth: int | None = None, scan: bool = True):
  cfg = ml_collections.ConfigDict(rows.ROWS[row].model)
  if depth is not None:
    cfg.depth = depth
  cfg.scan = scan
  return cfg


def _resjax_model(cfg, num_classes=10):
  return nnx.jit(lambda: models.build(cfg, num_classes=num_classes, in_channels=3,
                                      rngs=nnx.Rngs(params=train.key(0))))()


# ------------------------------------------------------------------------ the PyTorch twin

# (row, depth): ResNet-v1 CIFAR (option A), pre-act bottleneck with projections (option B).
TWINS = [("resnet20", 20), ("resnet20", 14), ("resnet1001", 11), ("resnet1001", 29)]


@pytest.mark.parametrize("row, depth", TWINS)
def test_torch_twin_has_resjax_parameter_count(row, depth):
  torch_twin = pytest.importorskip("resjax.bench.torch_twin")
  resjax_count = train.count_params(nnx.eval_shape(lambda: models.build(
      _model_cfg(row, depth), num_classes=10, in_channels=3, rngs=nnx.Rngs(0))))
  kwargs = {**rows.ROWS[row].torch, "depth": depth}
  assert torch_twin.count_params(torch_twin.ResNet(**kwargs)) == resjax_count


def test_torch_twin_parameter_counts_are_the_papers():
  torch_twin = pytest.importorskip("resjax.bench.torch_twin")
  # ResNet-v1 Table 6: ResNet-20 0.27M; the torchvision-shaped ResNet-50: 25,557,032.
  assert torch_twin.count_params(torch_twin.ResNet(20)) == 269_722
  resnet50 = torch_twin.ResNet(50, imagenet=True, option="B", num_classes=1000)
  assert torch_twin.count_params(resnet50) == 25_557_032


def _torch_twin_with_resjax_weights(row, depth):
  """A resjax net (unscanned, so each unit has its own parameters) and its twin holding its weights."""
  torch = pytest.importorskip("torch")
  torch_twin = pytest.importorskip("resjax.bench.torch_twin")
  model = _resjax_model(_model_cfg(row, depth, scan=False))
  twin = torch_twin.ResNet(**{**rows.ROWS[row].torch, "depth": depth})
  per_stage = len(twin.units) // 3
  target = dict(twin.named_parameters())
  loaded = set()
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path, v = [str(p) for p in path], np.array(value[...])
    if path[0] == "stages":  # stages.s.first.* / stages.s.rest.i.* -> units.(s * n + j).*
      j = 0 if path[2] == "first" else 1 + int(path[3])
      path = ["units", str(int(path[1]) * per_stage + j)] + path[3 if path[2] == "first" else 4:]
    if path[-3:-1] == ["match", "proj"]:  # Dense [in, out] -> 1x1 conv [out, in, 1, 1]
      path, v = path[:-3] + ["proj", "weight"], v.T[:, :, None, None]
    elif path[-3:-1] == ["match", "norm"]:
      path = path[:-3] + ["norm", path[-1]]
    elif path[-1] == "kernel" and v.ndim == 4:  # HWIO -> OIHW
      path, v = path[:-1] + ["weight"], v.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel":  # the head, [in, out] -> [out, in]
      path, v = path[:-1] + ["weight"], v.T
    if path[-1] == "scale":
      path = path[:-1] + ["weight"]
    name = ".".join(path)
    assert target[name].shape == v.shape, name
    with torch.no_grad():
      target[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    loaded.add(name)
  assert loaded == set(target)
  return model, twin


@pytest.mark.parametrize("row, depth", [("resnet20", 14), ("resnet1001", 11)])
def test_torch_twin_computes_the_resjax_function(row, depth):
  """Same weights, same batch, train-mode BatchNorm: the same logits, so it is the same net."""
  torch = pytest.importorskip("torch")
  model, twin = _torch_twin_with_resjax_weights(row, depth)
  x = _normal((4, 8, 8, 3), seed=3)
  ours = model(x, train=True)
  theirs = twin.train()(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  # Another framework's kernels: `depth` chained layers with BN, the longest sum a 3x3x64 conv's.
  assert_f32_close(theirs.detach().numpy(), ours, terms=3 * 3 * 64, depth=depth)


def test_torch_augment_crops_and_flips_like_resjax():
  torch = pytest.importorskip("torch")
  torch_twin = pytest.importorskip("resjax.bench.torch_twin")
  x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
  out = torch_twin.augment(x, 2, torch.Generator().manual_seed(0))
  assert out.shape == x.shape
  for image, crop in zip(x, out):
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
    assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)


# ------------------------------------------------------------------------ the CPU convolution

@pytest.mark.parametrize("k, stride, shape", [(3, 1, (2, 8, 8, 4)), (3, 1, (3, 5, 7, 2)),
                                              (5, 1, (2, 9, 6, 3)), (3, 2, (2, 8, 8, 4)),
                                              (1, 2, (2, 8, 8, 4))])
def test_matmul_conv_gradients_are_xla_convolutions(k, stride, shape):
  x, w = _normal(shape), _normal((k, k, shape[-1], 5), seed=1)
  xla = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((k // 2, k // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, w: layers.matmul_conv(x, w, stride)
  forward = k * k * shape[-1]  # terms of each output's sum
  y = xla(x, w)
  assert_f32_close(ours(x, w), y, terms=forward)
  # The cotangent cos(y) moves by |dy| <= f32_tol(forward) max|y| on values of size 1: a gain of
  # max|y| (up to 30 here). Then one backward sum: over the outputs a kernel entry touches (for w)
  # or the k * k * 5 kernel taps (for x).
  n, h, wd, _ = shape
  backward = max(n * h * wd, k * k * 5)
  tol = f32_tol(forward) * float(jnp.abs(y).max()) + f32_tol(backward)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(grad(ours), grad(xla)):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(jnp.abs(b).max()))


def test_conv_rows_backward_keeps_the_input_not_patches():
  """The residual a scan stacks per conv is its input (and kernel), not k*k*C patches."""
  x, w = _normal((2, 8, 8, 4)), _normal((3, 3, 4, 5), seed=1)
  _, residuals = layers._conv_rows_fwd(x, w)
  assert [r.shape for r in residuals] == [x.shape, w.shape]


def test_compute_dtype_bf16_keeps_float32_parameters_and_statistics():
  model = _resjax_model(_model_cfg("resnet20", 8))
  layers.set_compute_dtype(model, jnp.bfloat16)
  assert model.stem(_normal((2, 8, 8, 3))).dtype == jnp.bfloat16
  h = model.stem_norm(model.stem(_normal((2, 8, 8, 3))), use_running_average=False)
  assert h.dtype == jnp.bfloat16
  # The statistics BN just updated, and every parameter, stay float32.
  assert model.stem_norm.mean[...].dtype == jnp.float32 and float(jnp.abs(model.stem_norm.mean[...]).sum()) > 0
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


# ------------------------------------------------------------------------ arithmetic and table

def test_peak_tflops_of_known_devices():
  assert rows.peak_tflops("NVIDIA H100 80GB HBM3") == 989
  assert rows.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
  assert rows.peak_tflops("TPU v5 lite") == 197  # v5e, not v5p's 459
  assert rows.peak_tflops("TPU v5p") == 459
  assert rows.peak_tflops("cpu") is None


def test_mfu_of_resnet110_on_h100():
  # ResNet-110: 252.9M multiply-adds forward, 6 FLOPs per multiply-add in training.
  flops = 6 * 252.9e6
  assert rows.mfu(flops, 10_000, rows.peak_tflops("NVIDIA H100")) == pytest.approx(
      flops * 1e4 / 989e12)
  assert rows.mfu(flops, 10_000, rows.peak_tflops("NVIDIA H100")) == pytest.approx(0.01534,
                                                                      rel=1e-3)
  assert rows.mfu(flops, 10_000, None) is None


def test_xla_flop_count_is_twice_the_papers_multiply_adds():
  """ResNet-20 forward: ResNet-v1's 40.6M multiply-adds (REFERENCE 6) are 81.2M FLOPs; XLA skips
  the taps that meet zero padding (4% of them at 32x32, 16% at 8x8), so it counts 7% fewer."""
  cfg = _model_cfg("resnet20")
  example = jax.ShapeDtypeStruct((32, 32, 3), jnp.float32)
  flops = inspect_model.flops_at_depth(
      cfg, lambda c: inspect_model.xla_forward_flops(c, example, 10, 3))
  assert 0.90 < flops / (2 * rows.ROWS["resnet20"].paper_macs) < 0.96


def _result(ex_s, **kw):
  return {"examples_per_s": ex_s, "step_s": 128 / ex_s, "compile_s": 1.0, "peak_gib": 0.5,
          "batch": 128, **kw}


def _table_lines(table: str) -> list[dict]:
  """The summary table's lines as {column: cell}."""
  header, _, *lines = table.split("\n\n")[0].splitlines()
  names = [c.strip() for c in header.split("|")]
  return [dict(zip(names, [c.strip() for c in line.split("|")])) for line in lines]


def test_markdown_has_ratio_columns_and_failures():
  results = {("resnet20", "float32"): {
      "resjax": _result(300.0, flops_per_example=2.4e8, peak_gib=0.6, xla_step_gib=0.2,
                        remat="none", remat_used="none"),
      "torch-eager": _result(150.0, peak_gib=0.8),
      "torch-compile": {"error": "no C++ compiler"}}}
  table = bench_cli.markdown(results, peak=989.0)
  (cells,) = _table_lines(table)
  assert cells["resjax / eager"] == "2.00x"
  assert cells["resjax / compile"] == "-"
  assert cells["torch.compile ex/s"] == "failed"
  assert cells["MFU"] == f"{2.4e8 * 300 / 989e12:.1%}"
  assert (cells["resjax peak GiB"], cells["XLA GiB"], cells["eager peak GiB"]) == ("0.60", "0.20",
                                                                                   "0.80")
  assert cells["peak resjax / eager"] == "0.75x" and cells["remat"] == "none"
  assert "no C++ compiler" in table


def test_markdown_has_a_line_per_remat_against_the_same_torch_run():
  results = {("resnet110", "float32"): {
      "resjax:none": _result(20.0, peak_gib=6.0, remat="none", remat_used="none"),
      "resjax:auto": _result(25.0, peak_gib=1.5, remat="auto", remat_used="full"),
      "torch-eager": _result(50.0, peak_gib=2.0)}}
  none, auto = _table_lines(bench_cli.markdown(results, peak=None))
  assert (none["remat"], auto["remat"]) == ("none", "auto (full)")
  assert (none["resjax / eager"], auto["resjax / eager"]) == ("0.40x", "0.50x")
  assert (none["peak resjax / eager"], auto["peak resjax / eager"]) == ("3.00x", "0.75x")
  assert none["eager peak GiB"] == auto["eager peak GiB"] == "2.00"


def test_remat_flag_takes_config_values_only():
  assert bench_cli.check_remats("none, full") == ["none", "full"]
  with pytest.raises(ConfigError, match="--remat") as e:
    bench_cli.check_remats("none,sometimes")
  assert all(name in str(e.value) for name in layers.REMATS)


def test_compile_ratio_reads_the_deep_and_shallow_rows():
  results = {("resnet110", "float32"): {"resjax": _result(1.0, compile_s=20.0)},
             ("resnet1001", "float32"): {"resjax": _result(1.0, compile_s=30.0)}}
  assert bench_cli.compile_ratio(results) == pytest.approx(1.5)
  results = {("resnet110", "float32"): {"resjax:full": _result(1.0, compile_s=10.0)},
             ("resnet1001", "float32"): {"resjax:full": _result(1.0, compile_s=30.0)}}
  assert bench_cli.compile_ratio(results) == pytest.approx(3.0)


def test_a_failed_childs_error_is_its_cause_not_its_last_stack_frame():
  """A native abort ends in stack frames; the error names the failed check above them (as an
  XLA:GPU compile crash printed it on an H200), and a Python failure its exception."""
  crash = ("W0000 00:00:1 ok.cc:1] a warning\n"
           "F1204 18:25:24.373458 608 triton_tiling_propagation.cc:703] Check failed: "
           "subdim_size_accumulator == dim_size (784 vs. 56)\n"
           "*** Check failure stack trace: ***\n"
           "    @     0x7fabf2eed62f  xla::Service::BuildExecutable()\n"
           "    @           0x6bc7bd  Py_BytesMain\n")
  assert bench_cli.failure_line(crash, -6).endswith("Check failed: subdim_size_accumulator == "
                                                     "dim_size (784 vs. 56)")
  signal = "*** SIGSEGV received at time=1 on cpu 3 ***\nPC: @ 0x1 (unknown)\n    @ 0x2 main\n"
  assert bench_cli.failure_line(signal, -11).startswith("*** SIGSEGV")
  python = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad row\n'
  assert bench_cli.failure_line(python, 1) == "ValueError: bad row"
  assert bench_cli.failure_line("", -9) == "killed (exit code -9)"


def test_child_env_keeps_a_users_malloc_settings(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert bench_cli.child_env(None)["GLIBC_TUNABLES"] == bench_cli.MALLOC_TUNABLES
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  assert bench_cli.child_env(2)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  assert bench_cli.child_env(2)["OMP_NUM_THREADS"] == "2"


# ------------------------------------------------------------------------ the CLI

def test_bench_cli_runs_a_tiny_row(tmp_path, compile_cache_dir):
  out = tmp_path / "bench.md"
  raw = tmp_path / "bench.json"
  torch_args = ["--no-torch-compile"] if bench_cli.torch_available() else []
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.run(
      [sys.executable, "-m", "resjax.bench", "--rows", "resnet20", "--batch", "4", "--size", "8",
       "--steps", "1", "--threads", "1", "--remat", "auto", "--out", str(out), "--json", str(raw),
       *torch_args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = out.read_text()
  (cells,) = _table_lines(table)
  assert [cells[k] for k in ("model", "dtype", "batch", "remat")] == ["ResNet-20", "float32", "4",
                                                                      "auto (none)"]
  assert float(cells["resjax ex/s"]) > 0
  assert "Device: cpu" in table and bench_cli.MEMORY in table
  runs = json.loads(raw.read_text())["rows"][0]["runs"]
  resjax = runs["resjax:auto"][0]
  assert resjax["remat_used"] == "none"  # a batch of 4 at 8x8 keeps a few KiB
  assert resjax["batch"] == 4 and np.isfinite(resjax["loss"]) and resjax["flops_per_example"] > 0
  # XLA's account: the step holds its arguments (the state, the data), temporaries and new outputs.
  parts = ("xla_argument_gib", "xla_temp_gib", "xla_output_gib")
  assert resjax["xla_step_gib"] == pytest.approx(sum(resjax[k] for k in parts))
  assert resjax["xla_argument_gib"] > 0 and resjax["peak_gib"] > resjax["base_gib"] > 0
  if bench_cli.torch_available():
    assert cells["resjax / eager"].endswith("x") and cells["peak resjax / eager"].endswith("x")
    assert np.isfinite(runs["torch-eager"][0]["loss"])


def _bench_json(path, row, compile_s, kind="cpu"):
  runs = {"resjax": [_result(v, compile_s=compile_s) for v in (3.0, 1.0, 2.0)]}
  path.write_text(json.dumps({"device": {"backend": "cpu", "kind": kind, "jax": jax.__version__},
                              "args": {"repeats": 3, "clock": "wall"},
                              "rows": [{"row": row, "dtype": "float32", "runs": runs}]}))
  return str(path)


def test_merge_joins_rows_measured_separately(tmp_path, capsys):
  a = _bench_json(tmp_path / "a.json", "resnet110", 20.0)
  b = _bench_json(tmp_path / "b.json", "resnet1001", 30.0)
  out = tmp_path / "merged.md"
  assert bench_cli.cli(["--merge", a, b, "--out", str(out)]) == 0
  table = out.read_text()
  lines = _table_lines(table)
  assert [l["model"] for l in lines] == ["ResNet-110", "pre-act ResNet-1001"]
  assert all(l["resjax ex/s"] == "2.0" for l in lines)  # the median of 3, 1, 2 ex/s
  assert "Compile time, pre-act ResNet-1001 / ResNet-110: 1.50x." in table
  assert "median of 3 alternating run(s)" in table


def test_merge_refuses_another_device_and_a_foreign_file(tmp_path, capsys):
  a = _bench_json(tmp_path / "a.json", "resnet110", 20.0)
  b = _bench_json(tmp_path / "b.json", "resnet1001", 30.0, kind="NVIDIA H100")
  assert bench_cli.cli(["--merge", a, b]) == 2
  assert "merge files from one device only" in capsys.readouterr().err
  (tmp_path / "c.json").write_text('{"loss": 1.0}')
  assert bench_cli.cli(["--merge", a, str(tmp_path / "c.json")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "not a bench --json file" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------ the profile

def test_instruction_kinds_read_what_a_fusion_computes():
  f = lambda a, b: (jnp.tanh(a @ b) + 1.0, jnp.concatenate([a, b], 0).sum(0), jnp.exp(a) * 2.0)
  x = jnp.ones((64, 64))
  hlo = jax.jit(f).lower(x, x).compile().as_text()
  kinds = {k for k, _ in profile.instruction_kinds(hlo).values()}
  assert "matmul" in kinds and "reduction" in kinds and "elementwise" in kinds
  assert "convolution" not in kinds


def test_instruction_kinds_keep_tuple_results_and_leave_out_loops():
  # A sort of two arrays returns a tuple, like the oneDNN backward convolution's (dx, dw); a
  # while loop's trace event encloses its body's, which are attributed on their own.
  def f(k, v, n):
    body = lambda i, kv: jax.lax.sort((kv[0] * 0.5, kv[1]), num_keys=1)
    return jax.lax.fori_loop(0, n, body, (k, v))

  x = jnp.arange(64.0)
  kinds = profile.instruction_kinds(jax.jit(f).lower(x, x, 3).compile().as_text())
  sorts = [shape for kind, shape in kinds.values() if kind == "sort"]
  assert sorts and all(s.startswith("(") for s in sorts)
  assert not {"while", "conditional", "call"} & {kind for kind, _ in kinds.values()}


def test_profile_attributes_the_traced_step_to_its_instructions(tmp_path):
  s = profile.profile("resnet20", batch=4, steps=1, out=str(tmp_path), size=8)
  assert s["by_kind"]["matmul"] > 0  # on CPU every convolution is a matmul (conv_impl auto)
  assert "convolution" not in s["by_kind"]
  assert sum(s["by_kind"].values()) == pytest.approx(s["total_ms"])
  assert s["total_ms"] > 0 and s["wall_ms"] > 0
  assert (tmp_path / "profile.md").read_text().startswith("# ResNet-20, batch 4, float32")
