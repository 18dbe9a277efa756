"""Tests for the options that build the Transformer of the modded-nanogpt record of 2024-11-06:
RMSNorm without gain, the normed embedding, ReLU^2, QK-norm, no biases, PyTorch's init, zero-init
output projections and head, the value residual and embedding shortcut at block 1 too."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import (F32_EPS, abstract_transformer, assert_f32_close, f32_tol,
                      initialised_transformer)
from resjax import configs, train
from resjax.errors import ConfigError
from resjax.models import transformer

VOCAB, WIDTH, HEADS, CONTEXT, DEPTH = 11, 16, 2, 8, 3
HEAD_DIM = WIDTH // HEADS


def _cfg(**fields):
  c = transformer.default_config()
  c.update(vocab_size=VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT, depth=DEPTH)
  for key, value in fields.items():
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


def _record(**fields):
  """The record's model at test size: width 16, 2 heads of 8, 3 blocks, a vocabulary of 11."""
  size = dict(vocab_size=VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT, depth=DEPTH)
  return _cfg(**{**configs.RECORD_MODEL, **size, **fields})


_abstract = abstract_transformer
_initialised = initialised_transformer


def _randomize(model, seed=0):
  """Every parameter random: kernels with O(1) outputs, scalars in [0.2, 0.8] (away from 0, 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "'kernel'" in name:
      v = rng.standard_normal(a.shape) / np.sqrt(a.shape[-2])
    elif "'embedding'" in name:
      v = rng.standard_normal(a.shape)
    else:
      v = rng.uniform(0.2, 0.8, a.shape)
    return jnp.asarray(v, jnp.float32)

  state = nnx.state(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))  # no dropout, no norm stats
  nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
  return model


def _tokens(b=2, t=CONTEXT, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def _leaves(module):
  """Parameters by name, e.g. "['head']['kernel']"."""
  return {jax.tree_util.keystr(p): a for p, a in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))}


forward = nnx.jit(lambda m, tokens: m(tokens, train=False))


# ------------------------------------------------------------------------ the parts


def test_rms_norm_gives_unit_rms_per_token_and_uses_float32_eps():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, WIDTH))
                  * np.array([1.0, 1e3, 1e-1])[None, :, None], jnp.float32)
  y = np.asarray(transformer.rms_norm(x), np.float64)
  # Over the last axis only: every token's channels have RMS 1, whatever its scale, but for eps:
  # sqrt(m / (m + eps)) is 1 - eps / (2 m) to first order for a mean square m.
  eps_shift = 2.0 ** -23 / (2 * float(np.mean(np.square(x), axis=-1).min()))
  rms = np.sqrt(np.mean(y ** 2, axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=f32_tol(WIDTH, depth=2) + eps_shift)
  # A mean square of 2^-24 beside eps = 2^-23: x / sqrt(3 * 2^-24) = 1/sqrt(3) (eps 1e-5 would
  # give 0.077, eps 0 would give 1).
  tiny = transformer.rms_norm(jnp.full((WIDTH,), 2.0 ** -12, jnp.float32))
  assert_f32_close(tiny, np.full(WIDTH, 1 / np.sqrt(3)), terms=WIDTH, depth=2)
  assert transformer.rms_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rmsnorm_has_no_parameters_and_layernorm_keeps_its_gain():
  count = lambda **f: train.count_params(_abstract(_cfg(**f)))
  rms = _abstract(_cfg(norm_kind="rmsnorm", embed_norm=True))
  for norm in [*rms.first.residual_norms, rms.final_norm, rms.embed_norm]:
    assert isinstance(norm, transformer.RMSNorm) and not jax.tree.leaves(nnx.state(norm))
  # LayerNorm: scale and bias of width each, 2 per block and the final one (and the embedding's).
  layer_norms = 2 * DEPTH + 1
  assert count() - count(norm_kind="rmsnorm") == layer_norms * 2 * WIDTH
  assert count(embed_norm=True) - count() == 2 * WIDTH
  assert count() - count(bias=False) == (
      layer_norms * WIDTH  # LayerNorm biases; the gains stay
      + DEPTH * (4 * WIDTH + 4 * WIDTH + WIDTH))  # query, key, value, out; fc; proj


def test_relu2_is_relu_squared():
  x = jnp.asarray([[-2.0, -0.5, 0.0, 0.5, 1.5, 3.0, -1e-3, 1e-3] * 2], jnp.float32)
  expected = np.where(np.asarray(x) > 0, np.asarray(x) ** 2, 0.0)
  for activation, should_match in [("relu2", True), ("gelu", False)]:
    model = _initialised(_cfg(activation=activation, mlp_ratio=1, bias=False))
    mlp = model.first.mlp
    for dense in (mlp.fc, mlp.proj):  # identity matrices: exact products and sums
      dense.kernel.set_value(jnp.eye(WIDTH, dtype=jnp.float32))
    y = np.asarray(mlp(x))
    assert np.array_equal(y, expected) == should_match


def test_qk_norm_makes_each_heads_queries_and_keys_unit_rms(monkeypatch):
  """What reaches the attention kernel, with learned positions (rotary, also norm-preserving,
  is covered by the reference test below)."""
  seen = {}
  attention = jax.nn.dot_product_attention

  def capture(q, k, v, **kw):
    seen.update(q=np.asarray(q, np.float64), k=np.asarray(k, np.float64),
                v=np.asarray(v, np.float64))
    return attention(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", capture)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, CONTEXT, WIDTH)), jnp.float32)
  head_rms = lambda a: np.sqrt(np.mean(a ** 2, axis=-1))  # [B, T, heads]
  for qk_norm in (True, False):
    block = _randomize(_abstract(_cfg(qk_norm=qk_norm, positions="learned"))).first
    block.attn(x, None, train=False)
    for name in ("q", "k"):
      assert seen[name].shape == (2, CONTEXT, HEADS, HEAD_DIM)
      unit = np.allclose(head_rms(seen[name]), 1.0, rtol=f32_tol(HEAD_DIM, depth=2), atol=0)
      assert unit == qk_norm, name
    assert not np.allclose(head_rms(seen["v"]), 1.0, rtol=0.05)  # values are not normed


# ------------------------------------------------------------------------ initialisation


def test_zero_init_gives_zero_logits_and_log_vocab_loss_at_init():
  model = _initialised(_record())
  for block in (model.first, model.rest):
    for dense in (block.attn.out, block.mlp.proj):
      assert not np.any(np.asarray(dense.kernel[...]))
    for dense in (block.attn.query, block.attn.key, block.attn.value, block.mlp.fc):
      assert np.all(np.asarray(dense.kernel[...]) != 0)
  assert not np.any(np.asarray(model.head.kernel[...]))
  tokens = _tokens()
  logits = forward(model, tokens)
  assert logits.dtype == jnp.float32 and not np.any(np.asarray(logits))
  targets = jnp.roll(tokens, -1, axis=1)
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  assert abs(float(loss) - math.log(VOCAB)) <= 4 * F32_EPS * math.log(VOCAB)
  # Every branch adds exactly 0 and the embedding shortcut starts at 1 x + 0 x0: the stream
  # leaves the last block as the normed embedding x0, bit for bit.
  x0 = model.embed(tokens, train=False)
  x, v_first = model.first(x0, x0=x0, v_first=None, train=False)
  x, _ = model.run_rest(x, x0=x0, v_first=v_first, train=False)
  np.testing.assert_array_equal(x, x0)


def test_pytorch_init_draws_uniform_kernels_over_fan_in_and_unit_embeddings():
  """nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) with in the input width (fc: 16, proj: 64), no
  1/sqrt(N) scaling; nn.Embedding's N(0, 1). Each std comes from 176 to 2048 draws (10% slack)."""
  model = _initialised(_record(zero_init_out=False, zero_init_head=False))
  blocks = (model.first, model.rest)
  groups = {
      1 / math.sqrt(WIDTH): [*(b.attn.query for b in blocks), *(b.attn.out for b in blocks),
                             *(b.mlp.fc for b in blocks), model.head],
      1 / math.sqrt(4 * WIDTH): [b.mlp.proj for b in blocks],
  }
  for bound, denses in groups.items():
    for dense in denses:
      w = np.asarray(dense.kernel[...])
      assert bound * 0.9 < np.abs(w).max() <= bound
      assert np.std(w) == pytest.approx(bound / math.sqrt(3), rel=0.1)
  assert np.std(np.asarray(model.token_embed.embedding[...])) == pytest.approx(1.0, rel=0.15)
  # GPT-2's init is untouched: N(0, 0.02), and 0.02 / sqrt(2L) on the output projections.
  gpt2 = _initialised(_cfg())
  assert np.std(np.asarray(gpt2.token_embed.embedding[...])) == pytest.approx(0.02, rel=0.15)
  outs = np.concatenate([np.ravel(b.mlp.proj.kernel[...]) for b in (gpt2.first, gpt2.rest)])
  assert np.std(outs) == pytest.approx(0.02 / math.sqrt(2 * DEPTH), rel=0.1)


# ------------------------------------------------------------------------ block 1's shortcuts


def test_block_1_has_its_own_embedding_shortcut_starting_as_the_identity():
  model = _initialised(_record())
  first, rest = model.first.embed_shortcut, model.rest.embed_shortcut
  assert (first.lambda2[...].shape, rest.lambda2[...].shape) == ((), (DEPTH - 1,))
  assert (float(first.lambda2[...]), float(first.lambda1[...])) == (1.0, 0.0)  # a x + b x0
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, CONTEXT, WIDTH)), jnp.float32)
  x0 = jnp.asarray(np.random.default_rng(3).standard_normal((2, CONTEXT, WIDTH)), jnp.float32)
  np.testing.assert_array_equal(first(x, x0, train=False), x)  # 1 x + 0 x0, exactly
  # Scalars: block 1 has a value-residual lambda and (a, b), every later block the same three.
  _, params, _ = train.split_model(model)
  assert sum(a.size for a in jax.tree.leaves(params["scalars"])) == 3 * DEPTH
  # The default keeps today's model: block 1 without either.
  default = _abstract(_cfg(embed_shortcut=True, value_residual={"name": "mix"}))
  assert default.first.embed_shortcut is None and default.first.attn.value_residual is None


def test_block_1_embedding_shortcut_scales_x0_by_a_plus_b_and_changes_the_function():
  """At block 1 the stream is x0 itself, so a x + b x0 = (a + b) x0: only a + b matters there."""
  model = _randomize(_abstract(_record()))
  tokens = _tokens()

  def logits(a, b):
    model.first.embed_shortcut.lambda2.set_value(jnp.asarray(a, jnp.float32))
    model.first.embed_shortcut.lambda1.set_value(jnp.asarray(b, jnp.float32))
    return np.asarray(forward(model, tokens))

  base = logits(0.25, 0.5)
  # (a, b) -> (a + b) x0 in float32: 0.75 both ways, but two products and a sum per element.
  assert_f32_close(logits(0.5, 0.25), base, terms=4 * WIDTH, depth=DEPTH * 6 + 1)
  assert np.abs(logits(0.25, 0.25) - base).max() > 1e-2 * np.abs(base).max()


# ------------------------------------------------------------------------ the whole model


def _rms64(x):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 2.0 ** -23)


def _rotary64(x):
  """RoPE on [B, T, heads, d] as resjax turns it: pair (i, i + d/2) by t * 10000^(-2i/d)."""
  t, half = x.shape[1], x.shape[-1] // 2
  angles = np.arange(t)[:, None] * 10000.0 ** (-np.arange(half) / half)
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _record_logits(model, tokens, *, first_embed_shortcut=True):
  """The record's GPT written out in numpy (float64) from its equations, on a model's weights:
  x = N(embed), x0 = x; per block x <- a x + b x0, x <- x + attn(N(x)), x <- x + mlp(N(x)), with
  v <- (1 - l) v + l v1 (v1 block 1's values), q and k RMS-normed per head before rotary, the
  MLP relu(.)^2; logits N(x) @ head. N: RMSNorm without gain. No biases anywhere."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
  rest = p["rest"]
  if isinstance(rest, dict) and "attn" in rest:  # scanned: parameters stacked on axis 0
    rest = [jax.tree.map(lambda a, i=i: a[i], rest) for i in range(DEPTH - 1)]
  else:
    rest = [rest[i] for i in range(DEPTH - 1)]
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  x = _rms64(p["token_embed"]["embedding"][tokens])
  x0, v1 = x, None
  for n, blk in enumerate([p["first"], *rest]):
    if n > 0 or first_embed_shortcut:
      x = blk["embed_shortcut"]["lambda2"] * x + blk["embed_shortcut"]["lambda1"] * x0
    h = _rms64(x)
    q, k, v = (h @ blk["attn"][name]["kernel"] for name in ("query", "key", "value"))
    if v1 is None:
      v1 = v
    lamb = 1 - blk["attn"]["value_residual"]["lam"]  # the record's lambda, on v1
    v = (1 - lamb) * v + lamb * v1
    heads = lambda a: a.reshape(b, t, HEADS, HEAD_DIM)
    q, k, v = _rotary64(_rms64(heads(q))), _rotary64(_rms64(heads(k))), heads(v)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(HEAD_DIM)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhst,bthd->bshd", weights, v).reshape(b, t, WIDTH)
    x = x + y @ blk["attn"]["out"]["kernel"]
    h = _rms64(x)
    x = x + np.maximum(h @ blk["mlp"]["fc"]["kernel"], 0) ** 2 @ blk["mlp"]["proj"]["kernel"]
  return _rms64(x) @ p["head"]["kernel"]


@pytest.mark.parametrize("scan", [True, False])
def test_record_model_matches_a_hand_written_reference(scan):
  model = _randomize(_abstract(_record(scan=scan)))
  # Block 1's (a, b) away from a + b = 1, so that dropping its shortcut changes the function.
  model.first.embed_shortcut.lambda2.set_value(jnp.asarray(0.3, jnp.float32))
  model.first.embed_shortcut.lambda1.set_value(jnp.asarray(0.2, jnp.float32))
  tokens = _tokens()
  logits = np.asarray(forward(model, tokens))
  # float32 against float64: per block 6 chained matmuls (q/k/v, scores, weights x values, out,
  # fc, proj) with their norms, then the logits; the longest sum the MLP's 4 * WIDTH. The square
  # doubles the relative error of what it squares (gain 2); rotary angles up to CONTEXT - 1 radians
  # carry their float32 rounding into cos and sin, within the same budget.
  assert_f32_close(logits, _record_logits(model, tokens), terms=4 * WIDTH, depth=DEPTH * 6 + 1,
                   gain=2.0)
  # Without block 1's embedding shortcut (resjax's default placement) it is another function.
  other = _record_logits(model, tokens, first_embed_shortcut=False)
  assert np.abs(logits - other).max() > 1e-2 * np.abs(logits).max()


def test_record_model_has_the_records_parameter_count():
  """12 x 768, 6 heads, vocabulary 50304, context 1024, rotary, untied head, no biases, no norm
  gains, the mix value residual and the embedding shortcut at every block (abstract: no memory)."""
  cfg = configs.lm_recipe(**configs.RECORD_MODEL).model
  model = nnx.eval_shape(lambda: transformer.from_config(cfg, num_classes=50304, in_channels=0,
                                                         rngs=nnx.Rngs(0)))
  # By hand, from the record's modules:
  embedding = 50304 * 768  # wte: nn.Embedding(50304, 768)
  head = 768 * 50304  # lm_head: nn.Linear(768, 50304, bias=False)
  attention = 4 * 768 ** 2  # c_q, c_k, c_v, c_proj: nn.Linear(768, 768, bias=False)
  mlp = 2 * 768 * 3072  # c_fc 768 -> 3072, c_proj 3072 -> 768, bias=False
  scalars = 1 + 2  # attn.lamb; Block.lambdas = [1., 0.]
  expected = embedding + head + 12 * (attention + mlp + scalars)
  assert expected == 162_201_636
  assert train.count_params(model) == expected
  names = _leaves(model)
  assert not [n for n in names if "'bias'" in n or "'scale'" in n]  # no biases, no gains
  _, params, _ = train.split_model(model)
  assert sum(a.size for a in jax.tree.leaves(params["scalars"])) == 12 * scalars
  # The optimizer's groups find the embedding and the head by these names.
  assert names["['token_embed']['embedding']"].shape == (50304, 768)
  assert names["['head']['kernel']"].shape == (768, 50304)


def test_default_parameter_tree_is_unchanged():
  """GPT-2's layout, name by name (the new options add nothing by default)."""
  model = _abstract(_cfg(depth=2))
  assert {n: a.shape for n, a in _leaves(model).items()} == DEFAULT_TREE


DEFAULT_TREE = {  # _cfg(depth=2): width 16, 2 heads, vocabulary 11, context 8
    "['final_norm']['bias']": (16,),
    "['final_norm']['scale']": (16,),
    "['first']['attn']['key']['bias']": (16,),
    "['first']['attn']['key']['kernel']": (16, 16),
    "['first']['attn']['out']['bias']": (16,),
    "['first']['attn']['out']['kernel']": (16, 16),
    "['first']['attn']['query']['bias']": (16,),
    "['first']['attn']['query']['kernel']": (16, 16),
    "['first']['attn']['value']['bias']": (16,),
    "['first']['attn']['value']['kernel']": (16, 16),
    "['first']['mlp']['fc']['bias']": (64,),
    "['first']['mlp']['fc']['kernel']": (16, 64),
    "['first']['mlp']['proj']['bias']": (16,),
    "['first']['mlp']['proj']['kernel']": (64, 16),
    "['first']['residual_norms'][0]['bias']": (16,),
    "['first']['residual_norms'][0]['scale']": (16,),
    "['first']['residual_norms'][1]['bias']": (16,),
    "['first']['residual_norms'][1]['scale']": (16,),
    "['position_embed']['embedding']": (8, 16),
    "['rest']['attn']['key']['bias']": (1, 16),
    "['rest']['attn']['key']['kernel']": (1, 16, 16),
    "['rest']['attn']['out']['bias']": (1, 16),
    "['rest']['attn']['out']['kernel']": (1, 16, 16),
    "['rest']['attn']['query']['bias']": (1, 16),
    "['rest']['attn']['query']['kernel']": (1, 16, 16),
    "['rest']['attn']['value']['bias']": (1, 16),
    "['rest']['attn']['value']['kernel']": (1, 16, 16),
    "['rest']['mlp']['fc']['bias']": (1, 64),
    "['rest']['mlp']['fc']['kernel']": (1, 16, 64),
    "['rest']['mlp']['proj']['bias']": (1, 16),
    "['rest']['mlp']['proj']['kernel']": (1, 64, 16),
    "['rest']['residual_norms'][0]['bias']": (1, 16),
    "['rest']['residual_norms'][0]['scale']": (1, 16),
    "['rest']['residual_norms'][1]['bias']": (1, 16),
    "['rest']['residual_norms'][1]['scale']": (1, 16),
    "['token_embed']['embedding']": (11, 16),
}


# ------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("fields, fix", [
    ({"norm_kind": "batchnorm"}, "config.model.norm_kind"),
    ({"activation": "swiglu"}, "config.model.activation"),
    ({"init": "xavier"}, "config.model.init"),
    ({"zero_init_head": True}, "config.model.tie_head"),
    ({"embed_shortcut_first": True}, "config.model.embed_shortcut"),
    ({"value_residual_first": True}, "config.model.value_residual.name"),
])
def test_impossible_options_name_the_fix(fields, fix):
  with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
    _abstract(_cfg(**fields))
