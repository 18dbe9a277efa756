"""Tests for the Transformer LM: GPT-2 size, causality, norm order, value residual, scan, probes."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import (abstract_transformer, assert_f32_close, f32_tol, initialised_transformer)
from resjax import train
from resjax.errors import ConfigError
from resjax.models import shortcuts, transformer

VOCAB, WIDTH, HEADS, CONTEXT = 11, 16, 2, 8


def _cfg(**fields):
  c = transformer.default_config()
  c.update(vocab_size=VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT, depth=3)
  for key, value in fields.items():
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


_abstract = abstract_transformer
_initialised = initialised_transformer


def _randomize(model, seed=0):
  """Fills every variable with random values: O(1) activations, scalars away from their inits."""
  rng = np.random.default_rng(seed)

  def weight(path, a):
    name, n = jax.tree_util.keystr(path), rng.standard_normal(a.shape)
    if "'kernel'" in name:
      v = n / np.sqrt(a.shape[-2])
    elif "'scale'" in name:
      v = 1 + 0.1 * n
    else:  # biases, embeddings
      v = (1.0 if "'embedding'" in name else 0.1) * n
    return jnp.asarray(v, jnp.float32)

  scalar = lambda a: jnp.asarray(rng.uniform(0.2, 0.8, a.shape), jnp.float32)
  rng_key = lambda a: jax.random.split(train.key(int(rng.integers(1 << 30))),
                                       math.prod(a.shape)).reshape(a.shape)
  nnx.update(model, jax.tree_util.tree_map_with_path(
      weight, nnx.state(model, nnx.All(nnx.Param, nnx.Not(shortcuts.ResidualScalar)))))
  nnx.update(model, jax.tree.map(scalar, nnx.state(model, shortcuts.ResidualScalar)))
  nnx.update(model, jax.tree.map(rng_key, nnx.state(model, nnx.RngKey)))
  nnx.update(model, jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.uint32),
                                 nnx.state(model, nnx.RngCount)))
  return model


def _tokens(b=2, t=CONTEXT, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


forward = nnx.jit(lambda m, tokens: m(tokens, train=False))


# ------------------------------------------------------------------------ size


def test_gpt2_small_has_124439808_parameters():
  """GPT-2 small: 12 layers, width 768, 12 heads, vocab 50257, context 1024, tied head."""
  c = transformer.default_config()
  count = lambda cfg: train.count_params(nnx.eval_shape(lambda: transformer.from_config(
      cfg, num_classes=50257, in_channels=0, rngs=nnx.Rngs(0))))
  assert count(c) == 124_439_808
  c.scan = False
  assert count(c) == 124_439_808
  untied, rotary = transformer.default_config(), transformer.default_config()
  untied.tie_head, rotary.positions = False, "rotary"
  assert count(untied) == 124_439_808 + 50257 * 768  # a head of its own
  assert count(rotary) == 124_439_808 - 1024 * 768  # no position table


def test_residual_additions_and_repeats():
  assert _abstract(_cfg(depth=12)).residual_additions == 24
  assert _abstract(_cfg(depth=12, parallel=True)).residual_additions == 12
  two, real = transformer.repeats(_cfg(depth=12), 2)
  assert (two.depth, real) == (2, 12)


# ------------------------------------------------------------------------ causality


def test_future_tokens_do_not_change_earlier_logits():
  """Rotary positions, value residual, embedding shortcut (learned positions: the reference)."""
  model = _randomize(_abstract(_cfg(positions="rotary", value_residual={"name": "lambda"},
                                    embed_shortcut=True)))
  tokens = _tokens()
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
  # Bitwise: one compiled program, and every value positions < t read is the same in both runs
  # (later scores are masked to exp(...) = 0 before any sum), so the same operations run on them.
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.all(np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 1e-3)


# ------------------------------------------------------------------------ hand-written reference


def _layer_norm(x, p):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _params(module):
  """A module's parameters as nested dicts of float64 numpy arrays."""
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module)))


def _reference_logits(model, tokens, *, norm, value_residual):
  """GPT written out in numpy from the papers' equations, on an unrolled model's weights."""
  p = _params(model)
  blocks = [p["first"]] + [p["rest"][i] for i in range(len(p["rest"]))]
  tokens = np.asarray(tokens)
  t = tokens.shape[1]
  x = p["token_embed"]["embedding"][tokens] + p["position_embed"]["embedding"][:t]
  x0, v_first = x, None
  dense = lambda h, d: h @ d["kernel"] + d["bias"]
  for n, blk in enumerate(blocks):
    if "embed_shortcut" in blk:  # x <- a x + b x0, a = lambda2, b = lambda1
      x = blk["embed_shortcut"]["lambda2"] * x + blk["embed_shortcut"]["lambda1"] * x0

    def attention(h):
      nonlocal v_first
      q, k, v = (dense(h, blk["attn"][name]) for name in ("query", "key", "value"))
      if n == 0:
        v_first = v
      elif value_residual == "scaling":
        v = 0.5 * v_first + 0.5 * v
      elif value_residual == "mix":
        lam = blk["attn"]["value_residual"]["lam"]
        v = (1 - lam) * v_first + lam * v
      elif value_residual == "lambda":
        vr = blk["attn"]["value_residual"]
        v = vr["lambda1"] * v + vr["lambda2"] * v_first
      split = lambda a: a.reshape(a.shape[0], t, HEADS, -1).transpose(0, 2, 1, 3)
      q, k, v = split(q), split(k), split(v)
      scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
      scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      y = (weights @ v).transpose(0, 2, 1, 3).reshape(x.shape)
      return dense(y, blk["attn"]["out"])

    mlp = lambda h: dense(_gelu(dense(h, blk["mlp"]["fc"])), blk["mlp"]["proj"])
    ln = blk["residual_norms"]
    if norm == "pre":
      x = x + attention(_layer_norm(x, ln[0]))
      x = x + mlp(_layer_norm(x, ln[1]))
    else:
      x = _layer_norm(x + attention(x), ln[0])
      x = _layer_norm(x + mlp(x), ln[1])
  if norm == "pre" and "final_norm" in p:
    x = _layer_norm(x, p["final_norm"])
  return x @ p["token_embed"]["embedding"].T


@pytest.mark.parametrize("norm, value_residual, embed_shortcut", [
    ("pre", "scaling", True), ("post", "mix", False), ("pre", "lambda", False)])
def test_blocks_match_a_hand_written_reference(norm, value_residual, embed_shortcut):
  """Pre-LN: x + F(LN(x)), final LN; Post-LN: LN(x + F(x)); value residual on x=V_1, f=V_n."""
  vr = {"name": value_residual}
  if value_residual == "scaling":
    vr.update(scale=0.5, branch_scale=0.5)
  model = _randomize(_abstract(_cfg(norm=norm, value_residual=vr, embed_shortcut=embed_shortcut,
                                    depth=2, scan=False)))
  tokens = _tokens()
  logits = np.asarray(forward(model, tokens))
  # float32 against float64: per block 6 chained matmuls (q/k/v, scores, weights x values, out,
  # fc, proj) with their LNs, then the logits; the longest sum the MLP's 4 * WIDTH.
  assert_f32_close(logits, _reference_logits(model, tokens, norm=norm,
                                             value_residual=value_residual),
                   terms=4 * WIDTH, depth=2 * 6 + 1)
  # The other order on the same weights is another function, so the comparison above can fail.
  other = "post" if norm == "pre" else "pre"
  wrong = _reference_logits(model, tokens, norm=other, value_residual=value_residual)
  assert np.abs(logits - wrong).max() > 0.1


# ------------------------------------------------------------------------ value residual


@pytest.mark.parametrize("config, scalars, expected", [
    ({"name": "scaling", "scale": 0.5, "branch_scale": 0.5}, {}, [2.0, 4.0]),  # ResFormer
    ({"name": "mix"}, {"lam": 0.25}, [1.5, 3.0]),  # 0.75 V_1 + 0.25 V_n
    ({"name": "lambda"}, {"lambda1": 0.2, "lambda2": 0.7}, [1.3, 2.6]),  # 0.2 V_n + 0.7 V_1
])
def test_value_residual_forms_on_hand_computed_values(config, scalars, expected):
  """The value residual of block 2, with V_1 = (1, 2) and V_n = (3, 6)."""
  model = _abstract(_cfg(value_residual=config, scan=False))
  assert model.first.attn.value_residual is None  # block 1 keeps its own values
  mix = model.rest[0].attn.value_residual
  for name, value in scalars.items():
    getattr(mix, name).set_value(jnp.asarray(value, jnp.float32))
  v_first, v_n = jnp.asarray([1.0, 2.0]), jnp.asarray([3.0, 6.0])
  # 2 products and a sum, and the float32 roundings of 0.2 and 0.7: within 1.5 eps of the sum.
  assert_f32_close(mix(v_first, v_n, train=False), expected, terms=2)


@functools.cache
def _lambda_model():
  """At init, Pre-LN: lambda on every residual, the mix value residual, the embedding shortcut."""
  return _initialised(_cfg(depth=3, shortcut={"name": "lambda"}, value_residual={"name": "mix"},
                           embed_shortcut=True))


def test_learnable_scalars_start_at_the_papers_inits_and_skip_weight_decay():
  model = _lambda_model()
  rest = model.rest
  for block in (model.first, rest):
    for sc in block.residual_shortcuts:
      np.testing.assert_array_equal(sc.lambda1[...], 0.5)  # lambda1 f + lambda2 x, 0.5 / 0.5
      np.testing.assert_array_equal(sc.lambda2[...], 0.5)
  np.testing.assert_array_equal(rest.attn.value_residual.lam[...], [0.5, 0.5])  # modded-nanogpt
  np.testing.assert_array_equal(rest.embed_shortcut.lambda2[...], [1.0, 1.0])  # a x + b x0: a = 1
  np.testing.assert_array_equal(rest.embed_shortcut.lambda1[...], [0.0, 0.0])  # b = 0
  assert model.first.embed_shortcut is None
  # All of them land in the optimizer's no-decay group: block 1's 2 x 2 lambdas, then per later
  # block 2 x 2 lambdas, 1 mix and 2 embedding scalars: 4 + 2 * 7 = 18.
  _, params, _ = train.split_model(model)
  size = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
  assert size(params["scalars"]) == 18
  assert size(params["weights"]) + 18 == train.count_params(model)


def _zero_branches(model):
  for block in (model.first, model.rest):
    for proj in (block.attn.out, block.mlp.proj):
      proj.kernel.set_value(jnp.zeros_like(proj.kernel[...]))
      proj.bias.set_value(jnp.zeros_like(proj.bias[...]))
  return model


@nnx.jit
def _probed(model, tokens):
  """Logits, each block's input RMS, and the logits the embedding x0 alone would give."""
  probes = [jnp.zeros(s) for s in model.probe_shapes(tokens.shape)]
  logits, norms = model(tokens, train=False, probes=probes)
  return logits, jnp.concatenate(norms), model.logits(model.embed(tokens, train=False))


def test_stacked_lambda_residual_halves_the_stream_per_addition():
  """Branches zeroed, lambda1 f + lambda2 x at init is 0.5 x: each block input is 0.25 the last."""
  model = _zero_branches(nnx.clone(_lambda_model()))
  _, norms, _ = _probed(model, _tokens())
  # Each input is exactly 0.25 the last (0.5 x + 0.5 * 0, twice), but the first block's RMS and
  # the scanned ones' are other code: sums of 2 * CONTEXT * WIDTH squares in another order.
  np.testing.assert_allclose(norms[1:] / norms[:-1], 0.5 ** 2, rtol=f32_tol(2 * CONTEXT * WIDTH))


def test_stacked_lambda_residual_halves_parallel_blocks_once():
  """A parallel block is one residual addition: 0.5 per block, 0.5^3 on the logits (no LN)."""
  cfg = _cfg(depth=3, norm="none", parallel=True, shortcut={"name": "lambda"})
  model = _zero_branches(_randomize(_abstract(cfg)))
  assert model.residual_additions == 3
  nnx.update(model, jax.tree.map(lambda a: jnp.full(a.shape, 0.5),  # the init
                                 nnx.state(model, shortcuts.ResidualScalar)))
  logits, norms, embedding_logits = _probed(model, _tokens())
  np.testing.assert_allclose(norms[1:] / norms[:-1], 0.5, rtol=f32_tol(2 * CONTEXT * WIDTH))
  # The same matmul on exactly 0.125 x0 (no LN): scaling by a power of 2 commutes with rounding,
  # but the two are separate ops, so up to WIDTH-term sums in another order.
  assert_f32_close(logits, 0.5 ** 3 * embedding_logits, terms=WIDTH)


# ------------------------------------------------------------------------ initialisation


def test_initial_scales_of_pre_ln_and_deepnorm():
  """GPT-2: out projections N(0, 0.02 / sqrt(2L)); DeepNorm: alpha = (2L)^(1/4), beta = (8L)^(-1/4).

  Width 16, depth 3: each std is estimated from 3 x 256 weights or more (about 3% error).
  """
  depth = 3
  std = lambda *layers: float(np.std(np.concatenate(
      [np.ravel(layer.kernel[...]) for layer in layers])))
  pre = _lambda_model()
  branch = lambda model, path: [path(model.first), path(model.rest)]
  out = lambda m: branch(m, lambda b: b.attn.out)
  proj = lambda m: branch(m, lambda b: b.mlp.proj)
  value = lambda m: branch(m, lambda b: b.attn.value)
  fc = lambda m: branch(m, lambda b: b.mlp.fc)
  query = lambda m: branch(m, lambda b: b.attn.query)
  assert std(*out(pre)) == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.1)
  assert std(*proj(pre)) == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.1)
  assert std(*value(pre), *fc(pre)) == pytest.approx(0.02, rel=0.1)
  deep = _initialised(_cfg(depth=depth, norm="deepnorm"))
  assert all(sc.alpha == pytest.approx((2 * depth) ** 0.25) for sc in deep.first.residual_shortcuts)
  beta = (8 * depth) ** -0.25
  assert std(*value(deep), *out(deep)) == pytest.approx(0.02 * beta, rel=0.1)
  assert std(*fc(deep), *proj(deep)) == pytest.approx(0.02 * beta, rel=0.1)
  assert std(*query(deep)) == pytest.approx(0.02, rel=0.1)
  assert deep.final_norm is None and pre.final_norm is not None


# ------------------------------------------------------------------------ scan and probes


def _transfer(scanned, looped):
  """Copies a scanned model's state (weights and dropout RNG streams) into its unrolled twin."""
  state = nnx.state(scanned)
  stacked = state.pop("rest")
  nnx.update(looped, state)
  for i, block in enumerate(looped.rest):
    nnx.update(block, jax.tree.map(lambda a: a[i], stacked))


def test_scan_and_loop_compute_the_same_function():
  """Depth 3 (the scan iterates twice), training with dropout and probes."""
  cfg = dict(depth=3, value_residual={"name": "lambda"}, embed_shortcut=True, dropout=0.2)
  scanned = _randomize(_abstract(_cfg(scan=True, **cfg)))
  looped = _abstract(_cfg(scan=False, **cfg))
  _transfer(scanned, looped)
  tokens = _tokens()
  probe_shapes = scanned.probe_shapes(tokens.shape)
  assert probe_shapes == looped.probe_shapes(tokens.shape) == [(1, 2, CONTEXT, WIDTH),
                                                               (2, 2, CONTEXT, WIDTH)]
  run = nnx.jit(lambda m: m(tokens, train=True, probes=[jnp.zeros(s) for s in probe_shapes]))
  (s_logits, s_norms), (l_logits, l_norms) = run(scanned), run(looped)
  # A scan is another program than the unrolled loop: 3 blocks of 6 chained matmuls and the
  # logits, the longest sum the MLP's 4 * WIDTH; the RMS of a block's input (after up to 2 blocks)
  # adds a sum of 2 * CONTEXT * WIDTH squares.
  assert_f32_close(s_logits, l_logits, terms=4 * WIDTH, depth=3 * 6 + 1)
  for s, l, shape in zip(s_norms, l_norms, probe_shapes):
    assert s.shape == shape[:1]
    np.testing.assert_allclose(
        s, l, rtol=f32_tol(4 * WIDTH, depth=2 * 6) + f32_tol(2 * CONTEXT * WIDTH))
  # Each scanned block drew one dropout mask per residual, as each looped block did.
  np.testing.assert_array_equal(scanned.rest.dropout.rngs.count[...], [2, 2])
  assert [int(b.dropout.rngs.count[...]) for b in looped.rest] == [2, 2]


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_blocks_give_the_same_loss_and_gradients(remat):
  """Recomputing the scanned blocks (dropout included: its RNG counters are scanned inputs, so the
  recomputed masks are the same) is the same math in another program."""
  cfg = dict(depth=3, value_residual={"name": "lambda"}, embed_shortcut=True, dropout=0.2)
  kept = _randomize(_abstract(_cfg(**cfg)))
  rematted = _abstract(_cfg(remat=remat, **cfg))
  nnx.update(rematted, nnx.state(kept))
  tokens = _tokens()

  def loss_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest, copy=True)(tokens, train=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)

  (loss, grads), (loss_r, grads_r) = loss_and_grads(kept), loss_and_grads(rematted)
  # 3 blocks of 6 chained matmuls forward and as many back, the longest sum the MLP's 4 * WIDTH.
  assert_f32_close(loss_r, loss, terms=4 * WIDTH, depth=2 * (3 * 6 + 1))
  for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)):
    assert_f32_close(g_r, g, terms=4 * WIDTH, depth=2 * (3 * 6 + 1),
                     err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads["rest"]["mlp"]["fc"]["kernel"][...]).max()) > 1e-4


def test_probe_gradient_is_the_gradient_wrt_the_block_input():
  """On the scanned model: probes ride the scan, and their gradient is d loss / d block input."""
  model = _randomize(_abstract(_cfg(depth=2, value_residual={"name": "mix"})))
  tokens = _tokens()
  loss = lambda logits: jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  @nnx.jit
  def gradients(model):
    probes = [jnp.zeros(s) for s in model.probe_shapes(tokens.shape)]

    def with_probes(p):
      logits, norms = model(tokens, train=False, probes=p)
      return loss(logits), norms

    grads, norms = jax.grad(with_probes, has_aux=True)(probes)
    # Block 2's input by hand: x0, then block 1; the rest of the net as a function of it.
    x0 = model.embed(tokens, train=False)
    h1, v_first = model.first(x0, x0=x0, v_first=None, train=False)
    from_block_2 = lambda h: loss(model.logits(model.run_rest(h, x0=x0, v_first=v_first,
                                                              train=False)[0]))
    return dict(norms=norms, grads=grads, x0=x0, h1=h1, h1_grad=jax.grad(from_block_2)(h1))

  r = gradients(model)
  # Two programs for one gradient: block 2 and the logits (6 + 1 matmuls), forward and backward.
  assert_f32_close(r["grads"][1][0], r["h1_grad"], terms=4 * WIDTH, depth=2 * (6 + 1))
  assert np.abs(r["h1_grad"]).max() > 1e-6
  # The model's RMS against numpy's: a mean of 2 * CONTEXT * WIDTH squares in another order.
  rms_tol = f32_tol(2 * CONTEXT * WIDTH)
  np.testing.assert_allclose(r["norms"][1][0], np.sqrt(np.mean(np.square(r["h1"]))), rtol=rms_tol)
  np.testing.assert_allclose(r["norms"][0][0], np.sqrt(np.mean(np.square(r["x0"]))), rtol=rms_tol)


# ------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("fields, fix", [
    ({"heads": 3}, "config.model.heads"),
    ({"norm": "sandwich"}, "config.model.norm"),
    ({"positions": "alibi"}, "config.model.positions"),
    ({"norm": "deepnorm", "shortcut": {"name": "lambda"}}, "config.model.shortcut.name"),
    ({"value_residual": {"name": "nope"}}, "config.model.value_residual.name"),
])
def test_impossible_configs_name_the_fix(fields, fix):
  with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
    _abstract(_cfg(**fields))


def test_sequences_longer_than_the_context_are_a_config_error():
  with pytest.raises(ConfigError, match="config.model.context"):
    forward(_randomize(_abstract(_cfg())), _tokens(t=CONTEXT + 1))
