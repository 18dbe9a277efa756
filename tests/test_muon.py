"""The modded-nanogpt record's optimizer (config.optim.name="muon"): Muon's Newton-Schulz iteration
on singular values, its band, the shape factor, Nesterov momentum, the four groups of a
Transformer, and the trapezoidal schedule on every group."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import make_rngs
from resjax import configs, models, optim, sharding, train
from resjax.errors import ConfigError

U = 2.0 ** -24  # float32's unit roundoff
A, B, C = optim.NS_COEFFS


def quintic5(s):
  """What the iteration does to each singular value of u / ||u||_F, in float64."""
  for _ in range(optim.NS_STEPS):
    s = A * s + B * s ** 3 + C * s ** 5
  return s


def ns_tol(n: int) -> float:
  """A bound on the float32 iteration's error in a singular value, for matrices whose longer side
  is n. Each step's three products (n-term sums of entries of matrices of spectral norm <= 1.21)
  err by at most about n U; an error then grows by at most f's slope in each later step, below 4
  on [0, 1.21] (3.97 at its end): 3 n U (1 + 4 + ... + 4^4)."""
  return 3 * n * U * sum(4 ** k for k in range(optim.NS_STEPS))


def svals(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def normalised_svals(g):
  g = np.asarray(g, np.float64)
  return svals(g) / (np.linalg.norm(g, axis=(-2, -1))[..., None] + optim.NS_EPS)


def gaussian(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def with_spectrum(s, seed=0):
  """A float32 square matrix Q1 diag(s) Q2^T with random orthogonal Q1, Q2."""
  rng = np.random.default_rng(seed)
  q1, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
  q2, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
  return ((q1 * s) @ q2.T).astype(np.float32)


# A square, a tall and a wide Gaussian, and a stack of 3 whose matrices differ in scale by 10x.
SHAPES = {"square": (32, 32), "tall": (48, 16), "wide": (16, 48), "stacked": (3, 16, 32)}


def _matrix(kind):
  g = gaussian(SHAPES[kind])
  if kind == "stacked":  # a norm over the whole stack would shrink the small matrices' values
    g = g * np.array([1.0, 10.0, 100.0], np.float32)[:, None, None]
  return g


@pytest.mark.parametrize("kind", SHAPES)
def test_each_singular_value_goes_through_the_quintic_five_times(kind):
  g = _matrix(kind)
  out = optim.orthogonalize(jnp.asarray(g))
  assert out.shape == g.shape and out.dtype == jnp.float32
  # The singular values of each matrix, the stack's one by one, are f^5 of u's over its own norm.
  want = np.sort(quintic5(normalised_svals(g)), axis=-1)
  np.testing.assert_allclose(np.sort(svals(out), axis=-1), want, rtol=0,
                             atol=ns_tol(max(g.shape[-2:])))
  if kind == "stacked":
    for k in range(3):
      np.testing.assert_allclose(out[k], optim.orthogonalize(jnp.asarray(g[k])), rtol=0,
                                 atol=ns_tol(32))


def test_the_band_of_singular_values_and_what_falls_below_it():
  lo, hi = optim.BAND
  # The band is f's values at its two positive critical points, where f' = a + 3 b s^2 + 5 c s^4
  # is 0: s^2 = (-3 b -/+ sqrt(9 b^2 - 20 a c)) / (10 c).
  crit = np.sqrt((-3 * B + np.array([1, -1]) * np.sqrt(9 * B ** 2 - 20 * A * C)) / (10 * C))
  f = lambda s: A * s + B * s ** 3 + C * s ** 5
  assert crit == pytest.approx([1.0501, 0.5545], abs=1e-4)
  assert f(crit) == pytest.approx([lo, hi], abs=1e-4)
  # Every s in [BAND_FROM, 1] ends in the band (on a grid 1e-6 apart), and a little less does not.
  s = np.arange(optim.BAND_FROM, 1.0, 1e-6)
  assert lo <= quintic5(s).min() and quintic5(s).max() <= hi
  assert quintic5(0.0015) < lo
  # Measured on float32 matrices: tall and wide Gaussians, and a square one whose singular values
  # span a factor 300 (all at least BAND_FROM of its norm): the iteration fills most of the band.
  spread = with_spectrum(np.logspace(0, -2.5, 32))
  got = []
  for g in (gaussian((48, 16)), gaussian((16, 48)), spread):
    assert normalised_svals(g).min() >= optim.BAND_FROM
    got.append(svals(optim.orthogonalize(jnp.asarray(g))))
    tol = ns_tol(48)
    assert lo - tol <= got[-1].min() and got[-1].max() <= hi + tol
  assert got[-1].min() < 0.75 and got[-1].max() > 1.15
  # Below BAND_FROM a value grows by about a^5 = 487, not into the band: 1e-5 of the norm ends at
  # 0.0049, as f^5 says, orders of magnitude from 1.
  weak = with_spectrum(np.array([1.0] * 15 + [1e-5 * np.sqrt(15)]))
  smallest = svals(optim.orthogonalize(jnp.asarray(weak))).min()
  assert smallest == pytest.approx(quintic5(normalised_svals(weak).min()), abs=ns_tol(16))
  assert smallest < 0.01


def test_shape_factor_reads_flax_kernels_as_in_by_out():
  # PyTorch's max(1, rows / cols) on its (out, in) weight: fan_out / fan_in.
  assert optim.shape_factor((16, 48)) == pytest.approx(3 ** 0.5)  # 16 -> 48 features
  assert optim.shape_factor((48, 16)) == 1.0 and optim.shape_factor((32, 32)) == 1.0
  assert optim.shape_factor((3, 16, 32)) == pytest.approx(2 ** 0.5)  # a stack: its matrices'
  lr = 0.1
  for shape in ((16, 48), (48, 16), (3, 16, 32)):
    g = gaussian(shape, seed=1)
    tx = optim.muon(lr)
    update, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros(shape)))
    # The first step's Nesterov u = (1 + m) g is g up to a factor, which the iteration removes
    # (up to the roundings of m, m g and the sum: 3 U of u, grown at most 4^5-fold).
    want = -lr * optim.shape_factor(shape) * np.asarray(optim.orthogonalize(jnp.asarray(g)))
    tol = lr * optim.shape_factor(shape) * (2 * ns_tol(max(shape)) + 4 ** 5 * 3 * U)
    np.testing.assert_allclose(update, want, rtol=0, atol=tol)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_over_two_steps_is_the_records(nesterov):
  lr, m, shape = 0.1, 0.9, (16, 32)
  g1, g2 = gaussian(shape, seed=2), gaussian(shape, seed=3)
  tx = optim.muon(lr, momentum=m, nesterov=nesterov)
  state = tx.init(jnp.zeros(shape))
  _, state = tx.update(jnp.asarray(g1), state)
  update, state = tx.update(jnp.asarray(g2), state)
  # By hand, in float64: buf_1 = g1, buf_2 = m g1 + g2; Nesterov uses g2 + m buf_2.
  buf = m * g1.astype(np.float64) + g2
  # In float32 the constant m, its product and the sum round: 3 U of m |g1| + |g2|.
  bound = 3 * U * (m * np.abs(g1) + np.abs(g2))
  assert np.all(np.abs(np.asarray(state[0].trace, np.float64) - buf) <= bound)
  u = g2 + m * buf if nesterov else buf
  want = -lr * optim.shape_factor(shape) * np.asarray(optim.orthogonalize(jnp.asarray(u,
                                                                                      jnp.float32)))
  # u rounded to float32 here, and in 6 roundings there (with the buffer's): 16 U of u for slack,
  # grown at most 4^5-fold by the iteration.
  tol = lr * optim.shape_factor(shape) * (2 * ns_tol(32) + 4 ** 5 * 16 * U)
  np.testing.assert_allclose(update, want, rtol=0, atol=tol)
  # The other form's update is far from it: the test tells them apart.
  other = g2 + m * buf if not nesterov else buf
  far = -lr * optim.shape_factor(shape) * np.asarray(optim.orthogonalize(jnp.asarray(other,
                                                                                     jnp.float32)))
  assert np.abs(np.asarray(update) - far).max() > 10 * tol


def test_optax_contrib_muon_iterates_alike_but_weighs_momentum_otherwise():
  """What resjax.optim's docstring says of optax.contrib (optax 0.2.8)."""
  g1, g2 = jnp.asarray(gaussian((16, 32), seed=4)), jnp.asarray(gaussian((16, 32), seed=5))
  # With beta = 0 and no Nesterov its scale_by_muon is the bare iteration: the record's.
  bare = optax.contrib.scale_by_muon(beta=0.0, nesterov=False, eps=optim.NS_EPS)
  update, _ = bare.update(g1, bare.init(g1))
  np.testing.assert_allclose(update, optim.orthogonalize(g1), rtol=0, atol=2 * ns_tol(32))
  # At the record's momentum its Nesterov step is the record's at step 1 (the buffer is g), not at
  # step 2. Ours is -lr (here 1) times the shape factor times the iteration's output.
  theirs, ours = optax.contrib.scale_by_muon(beta=0.95), optim.muon(1.0, momentum=0.95)
  s1, s2 = theirs.init(g1), ours.init(g1)
  gap = []
  for g in (g1, g2):
    u1, s1 = theirs.update(g, s1)
    u2, s2 = ours.update(g, s2)
    gap.append(np.abs(np.asarray(u1) + np.asarray(u2) / optim.shape_factor(g1.shape)).max())
  assert gap[0] <= 2 * ns_tol(32) + 4 ** 5 * 8 * U and gap[1] > 0.01


# ------------------------------------------------------------------------------- the four groups

VOCAB = 11


def _config(**model):
  """A tiny GPT-2 of lm_recipe (untied head, learnable residual scalars) with the record's
  optimizer on a 4-step run, the last 3 of them a warm-down (muon_optim's share would be 1)."""
  c = configs.lm_recipe()
  c.model.update(vocab_size=VOCAB, width=16, depth=3, heads=2, context=8, tie_head=False,
                 shortcut=ml_collections.ConfigDict(dict(name="lambda")),
                 value_residual=ml_collections.ConfigDict(dict(name="mix")))
  c.model.update(model)
  c.schedule.total = 4
  configs.muon_optim(c)
  c.schedule.warmdown = 3
  return c


def _params(c, seed=0):
  model = models.build(c.model, num_classes=VOCAB, in_channels=0, rngs=make_rngs(seed))
  return train.split_model(model)[1]


def _labelled(params):
  """{(tree, path): (label, shape)} of train.muon_groups."""
  labels = train.muon_groups(params)
  out = {}
  for tree in ("weights", "scalars"):
    flat = jax.tree_util.tree_flatten_with_path(params[tree])[0]
    names = [sharding.path_str(sharding.path_names(p)) for p, _ in flat]
    for name, (_, x), label in zip(names, flat, jax.tree.leaves(labels[tree])):
      out[tree, name] = (label, x.shape)
  return out


MATRICES = [f"{branch}/kernel" for branch in ("attn/query", "attn/key", "attn/value", "attn/out",
                                               "mlp/fc", "mlp/proj")]


@pytest.mark.parametrize("scan", [True, False])
def test_the_four_groups_of_an_untied_transformer(scan):
  got = _labelled(_params(_config(scan=scan)))
  rest = ["rest"] if scan else ["rest/0", "rest/1"]
  muon = {("weights", f"{block}/{m}") for block in ["first"] + rest for m in MATRICES}
  embed = {("weights", "token_embed/embedding"), ("weights", "position_embed/embedding")}
  by_label = {label: {k for k, (g, _) in got.items() if g == label}
              for label in ("muon", "embed", "head", "scalars")}
  assert by_label["muon"] == muon
  assert by_label["embed"] == embed
  assert by_label["head"] == {("weights", "head/kernel")}
  assert {label for label, _ in got.values()} == {"muon", "embed", "head", "scalars"}
  # Scanned blocks' kernels are stacks of matrices; their biases stacks of vectors: scalars'.
  assert got["weights", f"{rest[0]}/attn/query/kernel"][1] == ((2, 16, 16) if scan else (16, 16))
  assert got["weights", f"{rest[0]}/attn/query/bias"] == ("scalars", (2, 16) if scan else (16,))
  assert got["weights", "first/mlp/fc/kernel"][1] == (16, 64)
  assert got["weights", "final_norm/scale"][0] == "scalars"
  # The learnable residual scalars (shortcuts and value-residual mixes) are all scalars'.
  learnable = {k for k in got if k[0] == "scalars"}
  assert learnable and learnable <= by_label["scalars"]


def test_a_tied_head_has_no_head_group():
  got = _labelled(_params(_config(tie_head=True)))
  assert "head" not in {label for label, _ in got.values()}
  assert got["weights", "token_embed/embedding"] == ("embed", (VOCAB, 16))


def test_each_group_steps_at_its_own_lr_on_two_replicas():
  c = _config()
  c.optim.decay = "constant"
  params = train.stack([_params(c, seed) for seed in (0, 1)])
  grads = jax.tree.map(lambda x: jnp.asarray(gaussian(x.shape, seed=int(x.size))), params)
  tx = train.make_optimizer(c, configs.schedule_steps(c, train_size=1 << 20))
  updates, _ = jax.jit(jax.vmap(tx.update))(grads, jax.vmap(tx.init)(params), params)
  labels = train.muon_groups(jax.tree.map(lambda x: x[0], params))
  lrs = {"embed": 0.3, "head": 0.002, "scalars": 0.02}
  seen = set()
  for label, g, u in zip(jax.tree.leaves(labels), jax.tree.leaves(grads), jax.tree.leaves(updates)):
    g, u = np.asarray(g), np.asarray(u)
    seen.add(label)
    for k in (0, 1):
      if label == "muon":  # the first step: the iteration on g (see the shape-factor test)
        lr = c.optim.lr * optim.shape_factor(g[k].shape)
        want = -lr * np.asarray(optim.orthogonalize(jnp.asarray(g[k])))
        np.testing.assert_allclose(u[k], want, rtol=0,
                                   atol=lr * (2 * ns_tol(64) + 4 ** 5 * 3 * U))
      else:  # Adam's first step is lr g / (|g| + eps), in about a dozen roundings
        want = -lrs[label] * g[k] / (np.abs(g[k]) + 1e-8)
        np.testing.assert_allclose(u[k], want, rtol=16 * U, atol=0)
  assert seen == {"muon", "embed", "head", "scalars"}


# ------------------------------------------------------------------------------- the schedule

def test_the_trapezoid_holds_then_falls_linearly_to_zero_over_the_warmdown():
  c = configs.lm_recipe()
  configs.muon_optim(c)
  steps = configs.schedule_steps(c, train_size=1 << 20)
  assert (steps["total"], steps["warmup"], steps["warmdown"]) == (3200, 0, 914)
  lr = train.learning_rate(c.optim, steps)
  for s in (0, 1000, 2285, 2286, 2287, 2743, 3199, 3200):
    factor = min(1.0, (3200 - s) / 914)
    # linear_schedule's 1 - count / 914, times the LR: 3 roundings of values <= the LR.
    assert float(lr(s)) == pytest.approx(0.02 * factor, rel=0, abs=3 * U * 0.02), s
  assert float(lr(2743)) == pytest.approx(0.01, abs=3 * U * 0.02)  # half-way down
  # In epochs: the warm-down is converted like the other durations.
  c.schedule.update(unit="epochs", total=10, warmdown=3)
  assert configs.schedule_steps(c, train_size=1000)["warmdown"] == 6  # ceil(3 * 1000 / 512)
  # A linear warm-up to the peak first, when one is asked for.
  ramp = train.learning_rate(ml_collections.ConfigDict(dict(configs.MUON, warmup_shape="linear")),
                             {"total": 100, "warmup": 10, "warmdown": 50, "boundaries": []})
  assert [float(ramp(s)) for s in (0, 9, 49, 50, 75)] == pytest.approx(
      [0.002, 0.02, 0.02, 0.02, 0.01])


def test_every_group_scalars_included_follows_the_schedule():
  c = _config()  # 4 steps, warm-down over the last 3: factors 1, 1, 2/3, 1/3
  steps = configs.schedule_steps(c, train_size=1 << 20)
  flat = copy.deepcopy(c)
  flat.optim.decay = "constant"
  params = _params(c)
  txs = [train.make_optimizer(cfg, steps) for cfg in (c, flat)]
  states = [tx.init(params) for tx in txs]
  labels = jax.tree.leaves(train.muon_groups(params))
  update = jax.jit(lambda tx_i, g, s: txs[tx_i].update(g, s, params), static_argnums=0)
  for step, factor in enumerate([1.0, 1.0, 2 / 3, 1 / 3]):
    grads = jax.tree.map(lambda x: jnp.asarray(gaussian(x.shape, seed=step)), params)
    (ours, states[0]), (theirs, states[1]) = [update(i, grads, states[i]) for i in (0, 1)]
    # The states match, as none depends on the LR. Here the LR is 0.02 (1 - count / 3) and the
    # update its product: 4 roundings, and the constant LR's product 1.
    for label, u, v in zip(labels, jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(u, factor * np.asarray(v, np.float64), rtol=6 * U, atol=0,
                                 err_msg=f"{label} at step {step}")
  assert set(labels) == {"muon", "embed", "head", "scalars"}


# ------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("change, message", [
    (dict(schedule={"warmdown": 0}), r"config.schedule.warmdown is 0 steps: linear_warmdown needs"),
    (dict(schedule={"warmdown": 5}), r"needs 1 to 4 "),
    (dict(optim={"momentum": 1.0}), r"config.optim.momentum=1.0 must be in \[0, 1\)"),
    (dict(optim={"head_lr": -1.0}), r"config.optim.head_lr=-1.0 must be a finite number >= 0"),
    (dict(optim={"warmup_lr": 0.01}), r"config.optim.warmup_lr is one LR"),
    (dict(model={"name": "cifar_resnet"}), r"config.optim.name=muon groups a Transformer's"),
    (dict(optim={"decay": "trapezoid"}), r"unknown LR decay 'trapezoid'.*linear_warmdown"),
])
def test_bad_muon_configs_are_one_line_config_errors(change, message):
  c = _config()
  for section, values in change.items():
    c[section].update(values)
  with pytest.raises(ConfigError, match=message) as e:
    train.make_optimizer(c, configs.schedule_steps(c, train_size=1 << 20))
  assert "\n" not in str(e.value)


def test_muon_keys_left_out_take_the_records_values():
  c = _config()
  sparse = ml_collections.ConfigDict(dict(name="muon"))
  c.optim = sparse
  steps = configs.schedule_steps(c, train_size=1 << 20)
  # The record's warm-down, over the 3 steps of the schedule's warmdown.
  lr = train.learning_rate(sparse, steps)
  assert [float(lr(s)) for s in range(4)] == pytest.approx([0.02, 0.02, 0.02 * 2 / 3, 0.02 / 3])
  with pytest.raises(ConfigError, match="config.schedule.warmdown is 0 steps"):
    train.learning_rate(sparse, {**steps, "warmdown": 0})
  params = _params(c)
  tx = train.make_optimizer(c, steps)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step on a gradient of ones: minus the group's LR, up to eps.
  assert float(updates["weights"]["head"]["kernel"][0, 0]) == pytest.approx(-0.002, rel=1e-6)
  assert float(updates["weights"]["token_embed"]["embedding"][0, 0]) == pytest.approx(-0.3,
                                                                                      rel=1e-6)
  for u in jax.tree.leaves(updates["scalars"]):
    np.testing.assert_allclose(u, -0.02, rtol=1e-6)
