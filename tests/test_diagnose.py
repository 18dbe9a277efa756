"""Tests for --mode=diagnose: probe gradients, the Eq. 8 slope at init, the files written."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import f32_tol, make_rngs, randomize_resnet
from resjax import configs, diagnose, tasks
from resjax.models import resnet

FIG2 = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "resnetv2_fig2.py"


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_log_slopes_by_hand():
  """Slopes are per unit in the direction the gradient flows: halving on the way down is log(0.5)."""
  stack = np.array([0, 1, 1, 1, 2, 2, 2])
  g = np.array([5.0, 1, 2, 4, 100, 200, 400])
  s = diagnose.log_slopes(g, stack)
  assert math.isclose(s["grad_log_slope"], math.log(0.5), rel_tol=1e-12)
  assert s["grad_first_over_last"] == 5.0 / 400
  assert s["grad_log_slope_all"] < 0
  assert diagnose.log_slopes(np.array([1.0, 0.0, 2.0]), np.zeros(3))["grad_log_slope"] is None


def test_rms_survives_tiny_values():
  """Squares of 1e-25 underflow float32; the RMS of such a gradient must not read as 0."""
  a = jnp.full((4, 3), 3e-25, jnp.float32)
  # Rounded: 3e-25 to float32, the mean of 12 ones, its sqrt, the product with the peak.
  np.testing.assert_allclose(resnet.rms(a), 3e-25, rtol=f32_tol(12))
  np.testing.assert_allclose(resnet.rms(a, axes=(1,)), np.full(4, 3e-25), rtol=f32_tol(12))


# ------------------------------------------------------------------------ probes = d loss / d input


def _loss(logits, labels):
  return tasks.cross_entropy(logits, labels).mean()


def test_probe_gradients_are_gradients_at_unit_inputs():
  """d loss / d probe equals jax.grad of the loss with respect to that unit's input, run by hand.

  A pre-activation net of 1-layer-skip units, depth 8 (n = 2: each stage a first unit and a
  scanned rest), in train mode.
  By hand: the same weights unit by unit, the net cut before the first unit, before stage 2's
  scanned unit and before the last unit.
  """
  kw = dict(depth=8, unit="single", num_classes=10, in_channels=1, placement="preact",
            conv_impl="xla",
            shortcut=ml_collections.ConfigDict(dict(name="scaling", option="B", scale=0.5,
                                                    branch_scale=1.0)))
  model = randomize_resnet(nnx.eval_shape(
      lambda: resnet.CifarResNet(scan=True, rngs=make_rngs(), **kw)))
  x, labels = _normal((8, 8, 8, 1)), jnp.arange(8) % 10
  s = diagnose.unit_signals(model, x, labels)
  assert s["stack"].tolist() == [0, 1, 2, 3, 4, 5]
  graphdef, state = nnx.split(model)
  cuts = (0, 3, 5)

  def units(m):  # every unit in order, the scanned ones sliced out of their stack
    out = []
    for st in m.stages:
      g, stacked = nnx.split(st.rest)
      out += [st.first] + [nnx.merge(g, jax.tree.map(lambda a: a[i], stacked))
                           for i in range(st.n - 1)]
    return out

  @jax.jit
  def inputs_at_cuts():
    m = nnx.merge(graphdef, state, copy=True)
    h, out = m.stem_forward(x, train=True), []
    for i, u in enumerate(units(m)):
      if i in cuts:
        out.append(h)
      h = u(h, train=True)
    return out

  def loss_from(h, cut):  # unit `cut` and everything above it, to the loss
    m = nnx.merge(graphdef, state, copy=True)
    for u in units(m)[cut:]:
      h = u(h, train=True)
    h = jax.nn.relu(m.final_norm(h, use_running_average=False))
    return _loss(m.head(h.mean(axis=(1, 2))), labels)

  hs = inputs_at_cuts()
  loss, grads = jax.jit(lambda hs: (loss_from(hs[0], 0), [
      jax.grad(loss_from)(h, cut) for h, cut in zip(hs, cuts)]))(hs)
  # Two programs for one net: 8 chained layers (stem, 6 units, head), each with BN, the longest
  # sum a 3x3x64 conv's. The loss moves by at most 2 max|d logit|, and the logits here are no
  # larger than the loss (1.4 against 2.5): gain 2. Gradients run the layers back too (depth 16);
  # an RMS adds a sum of N * H * W * C <= 8 * 8 * 8 * 16 squares.
  net = f32_tol(3 * 3 * 64, depth=8)
  assert math.isclose(s["loss"], float(loss), rel_tol=2 * net)
  rms_tol = f32_tol(8 * 8 * 8 * 16)
  for cut, h, g in zip(cuts, hs, grads):
    np.testing.assert_allclose(s["grad_rms"][cut], float(resnet.rms(g)), rtol=2 * net + rms_tol)
    np.testing.assert_allclose(s["act_rms"][cut], float(resnet.rms(h)), rtol=net + rms_tol)
  assert s["grad_rms"][5] > s["grad_rms"][3] > 0


# ------------------------------------------------------------------------ Eq. 8 at init, files


def _fig2(depth, **model):
  spec = importlib.util.spec_from_file_location("resnetv2_fig2", FIG2)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("scale=test")
  c.model.depth = depth
  c.model.conv_impl = "xla"
  c.model.update(model)
  return c


@pytest.fixture(scope="module")
def zero_init_fig2(tmp_path_factory):
  """fig2's nets (option B, post-activation) at zero_init_residual, identity and 0.5/1.

  Depth 11 with 1-layer-skip units: 9 units in stacks of 1 and 2, as ResNet-20, at half the compile.
  """
  c = _fig2(11, unit="single", zero_init_residual=True)
  wanted = ("identity", "scaling_0.5_1")
  runs = [(r, configs.run_config(c, r)) for r in c.runs if r.name in wanted]
  workdir = tmp_path_factory.mktemp("diagnose")
  json_path, png_path = diagnose.run_all(c, runs, str(workdir))
  with open(json_path) as f:
    doc = json.load(f)
  return {r["run"]: r for r in doc["runs"]}, json_path, png_path


def test_scaled_shortcut_gradient_halves_per_unit(zero_init_fig2):
  """ResNet-v2 Eq. 8: with F = 0 at init the gradient is the shortcut product, 0.5 per unit."""
  runs, _, _ = zero_init_fig2
  scaled, ident = runs["scaling_0.5_1"], runs["identity"]
  assert abs(scaled["grad_log_slope"] / math.log(0.5) - 1) < 0.1
  assert 0.1 < ident["grad_first_over_last"] < 10
  assert abs(ident["grad_log_slope"]) < 0.1 * abs(math.log(0.5))
  # Between two units of a stage's scanned stack the 0.5/1 net's gradient halves exactly.
  g = np.asarray(scaled["grad_rms"])
  # Exactly 0.5 x the next gradient (a power of 2 commutes with rounding); each RMS sums up to
  # batch 32 x 8 x 8 x 16 squares, maybe in another order.
  np.testing.assert_allclose([g[1] / g[2], g[7] / g[8]], [0.5, 0.5], rtol=f32_tol(32 * 8 * 8 * 16))


def test_files_written(zero_init_fig2):
  runs, json_path, png_path = zero_init_fig2
  assert pathlib.Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(json_path) as f:
    doc = json.load(f)
  assert "Figure 2" in doc["experiment"] and "slope" in doc["slope_definition"]
  r = runs["identity"]
  assert r["units"] == list(range(9)) and len(r["act_rms"]) == len(r["grad_rms"]) == 9
  assert r["stack"] == [0, 1, 1, 2, 3, 3, 4, 5, 5]
  assert r["zero_init_residual"] is True and r["batch_size"] == 32
  assert math.isfinite(r["loss"]) and r["seconds"] > 0
  assert not list(pathlib.Path(json_path).parent.glob(".*"))  # no temporary files left behind


def test_files_go_through_fileio_on_process_0_only(tmp_path, monkeypatch, zero_init_fig2):
  """A gs:// workdir reaches fileio whole (no local 'gs:' folder); other processes write nothing."""
  runs, _, _ = zero_init_fig2
  written = {}
  monkeypatch.setattr(diagnose.fileio, "makedirs", lambda path: written.setdefault(path, b""))
  monkeypatch.setattr(diagnose.fileio, "write_atomic",
                      lambda path, data: written.__setitem__(path, data))
  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict({"experiment": "x"})
  assert diagnose.write(config, list(runs.values()), "gs://bucket/diag") == (
      "gs://bucket/diag/diagnose.json", "gs://bucket/diag/diagnose.png")
  assert set(written) == {"gs://bucket/diag", "gs://bucket/diag/diagnose.json",
                          "gs://bucket/diag/diagnose.png"}
  assert written["gs://bucket/diag/diagnose.png"][:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads(written["gs://bucket/diag/diagnose.json"])["experiment"] == "x"
  assert not list(tmp_path.iterdir())
  written.clear()
  monkeypatch.setattr(diagnose.jax, "process_index", lambda: 1)
  diagnose.write(config, list(runs.values()), "gs://bucket/diag")
  assert not written
