"""A decoder-only language model in the GPT-2 mould, with every residual a ``Shortcut``.

tokens [B, T] -> token embedding (+ learned positions) -> blocks -> (final LN) -> head -> logits
[B, T, vocab]. A block is causal multi-head self-attention and a GELU MLP, each a residual branch
whose output ``f`` meets the carried stream ``x`` through the configured shortcut. Where the layer
norm sits is the block's ``norm``:

==========  ====================================================  ================================
norm        one residual of a block                               from
==========  ====================================================  ================================
pre         x <- shortcut(x, F(LN(x))), plus a final LN           GPT-2 (Pre-LN)
post        x <- LN(shortcut(x, F(x)))                            the original Transformer
deepnorm    x <- LN(alpha x + F(x)) (the ``deepnorm`` shortcut)   DeepNet, decoder-only
none        x <- shortcut(x, F(x)), no LayerNorm anywhere         ReZero / SkipInit (``rezero``)
==========  ====================================================  ================================

``parallel=True`` is the GPT-J / PaLM block: attention and MLP read the same (normed) input and
their sum is one residual, ``x <- shortcut(x, attn(LN(x)) + mlp(LN(x)))`` for Pre-LN.

Initialisation: weights N(0, 0.02), biases 0. With Pre-LN the residual output projections
(attention out, MLP out) are scaled by 1/sqrt(N), N = residual additions (GPT-2);
``scaled_out_init`` True or False applies or drops that scaling whatever the norm, so that norm
placement and initialisation can be varied one at a time. DeepNorm takes the
paper's decoder-only alpha = (2 L)^(1/4) and scales the value, attention-out and MLP weights by
beta = (8 L)^(-1/4), L = blocks; written in residual additions R = 2 L these are R^(1/4) and
(4 R)^(-1/4), which is how parallel blocks (R = L) are treated.

The value residual is the Shortcut protocol on the value stream: in every block n > 1 the values
become ``value_residual(x=V_1, f=V_n)`` before attention, V_1 being block 1's own values:

=================================  =============================================================
config.model.value_residual        V_n <-
=================================  =============================================================
name=none (default)                V_n
name=scaling, scale=0.5,           0.5 V_1 + 0.5 V_n: ResFormer's fixed mix
branch_scale=0.5
name=mix                           (1 - lambda) V_1 + lambda V_n, one learnable lambda per block,
                                   init 0.5: modded-nanogpt's (1 - l) V_n + l V_1 with
                                   l = 1 - lambda (Adam without weight decay trains both alike)
name=lambda                        lambda1 V_n + lambda2 V_1, both learnable, init 0.5 (the seed's)
=================================  =============================================================

The embedding shortcut (``embed_shortcut=True``) is the ``lambda`` shortcut with x = the stream and
f = x0 (the embedding output) at the input of every block n > 1: x <- a x + b x0 with a = lambda2,
b = lambda1, initialised to ``embed_shortcut_init`` = (a, b) = (1, 0) as in modded-nanogpt.
Learnable scalars are ``shortcuts.ResidualScalar``, which the optimizer keeps out of weight decay.

Shortcuts are built with ``norm=False``: a projecting shortcut on tokens is a Dense with a bias,
not a projection followed by BatchNorm, whose statistics would pool over the batch and over all
positions and so let a token see the future in training.

Block 1 runs on its own (it produces V_1); blocks 2..L are identical and run under ``jax.lax.scan``
over stacked parameters (``scan=False``: a Python loop computing the same function).

Dropout (``dropout`` > 0) acts on the embedding output and on every branch output before its
residual (GPT-2's embd and resid dropout). Attention probabilities are not dropped, so attention can
use the fused kernels of ``jax.nn.dot_product_attention``. With ``dtype="bfloat16"`` the matrix
multiplies and attention run in bfloat16; parameters, layer norms, the residual stream and the
logits stay float32.

Config (``config.model``, see ``default_config``):

==================  ==========================================================================
name                "transformer"
vocab_size          vocabulary size; None: the data's (``num_classes`` from the trainer)
context             longest sequence; rows of the learned position table
width               residual stream width d
depth               blocks L (residual additions: 2 L, or L for parallel blocks)
heads               attention heads (width must divide by it)
mlp_ratio           MLP hidden width / width (4)
positions           "learned" (GPT-2) or "rotary" (RoPE on queries and keys, base 10000)
tie_head            head = token embedding transposed (GPT-2); False: a separate bias-free Dense
norm                "pre", "post", "deepnorm" or "none" (table above)
parallel            GPT-J / PaLM parallel block
shortcut            the Shortcut config of both residuals of every block (``shortcuts.py``)
value_residual      a Shortcut config on the value stream; name "none" or absent: off
embed_shortcut      x <- a x + b x0 at the input of every block n > 1
embed_shortcut_init (a, b) at init
dropout             rate (0: no dropout modules at all)
scan                run blocks 2..L under jax.lax.scan
remat               "none", or recompute the scanned blocks in the backward pass under a
                    named jax.checkpoint policy (``layers.REMAT_POLICIES``)
dtype               compute dtype of matrix multiplies: "float32" or "bfloat16"
==================  ==========================================================================

Diagnostics (shared with the ResNets): ``probe_shapes((B, T))`` lists one shape per stack of
units, (units, B, T, width): block 1, then blocks 2..L. ``model(tokens, train=False, probes=zeros)``
adds each probe slice to its block's input (the stream as the previous block left it) and returns
``(logits, rms)``, rms[i] of shape (units,) the RMS of each block's input; the gradient with respect
to a probe is the gradient with respect to that block's input.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from resjax import configs
from resjax.errors import ConfigError
from resjax.models import layers, shortcuts
from resjax.models.layers import rms

Array = jax.Array

NORMS = ("pre", "post", "deepnorm", "none")
POSITIONS = ("learned", "rotary")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_STD = 0.02  # GPT-2
LN_EPSILON = 1e-5  # GPT-2
ROTARY_BASE = 10000.0


def default_config() -> ml_collections.ConfigDict:
  """GPT-2 small (124M with a 50257-token vocabulary): Pre-LN, learned positions, tied head; the
  model of ``resjax.configs.lm_recipe``."""
  return configs.lm_recipe().model


def _config_dict(cfg) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _normal(std: float):
  return nnx.initializers.normal(std)


def _dense(in_features: int, out_features: int, std: float, dtype, rngs: nnx.Rngs, *,
           bias: bool = True) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=_normal(std),
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=LN_EPSILON, rngs=rngs)


def apply_rotary(x: Array) -> Array:
  """RoPE on [B, T, heads, head_dim]: pair (i, i + head_dim/2) turns by t * base^(-2i/head_dim)."""
  t, half = x.shape[1], x.shape[-1] // 2
  freqs = ROTARY_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]  # [T, half]
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # broadcast over heads
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Branches.
# ---------------------------------------------------------------------------------------------

class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention whose values may first meet V_1 through a value residual."""

  def __init__(self, width: int, heads: int, *, rotary: bool, value_std: float, out_std: float,
               value_residual, dtype, rngs: nnx.Rngs):
    self.heads, self.rotary = heads, rotary
    self.query = _dense(width, width, INIT_STD, dtype, rngs)
    self.key = _dense(width, width, INIT_STD, dtype, rngs)
    self.value = _dense(width, width, value_std, dtype, rngs)
    self.out = _dense(width, width, out_std, dtype, rngs)
    # On [B, T, width] values, so a gate (a Dense over the last axis) sees every head's channels.
    self.value_residual = (None if value_residual is None else
                           shortcuts.make_shortcut(value_residual, width, width, 1, norm=False,
                                                   rngs=rngs))

  def __call__(self, x: Array, v_first: Array | None, *, train: bool) -> tuple[Array, Array]:
    """Returns the branch output and the values used (block 1's are V_1)."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    if self.value_residual is not None:
      v = self.value_residual(v_first, v, train=train).astype(v.dtype)
    values = v
    b, t, d = x.shape
    q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
    if self.rotary:
      q, k = apply_rotary(q), apply_rotary(k)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, t, d)), values


class Mlp(nnx.Module):
  """Dense, GELU (tanh form, as GPT-2), Dense."""

  def __init__(self, width: int, hidden: int, *, fc_std: float, out_std: float, dtype,
               rngs: nnx.Rngs):
    self.fc = _dense(width, hidden, fc_std, dtype, rngs)
    self.proj = _dense(hidden, width, out_std, dtype, rngs)

  def __call__(self, x: Array) -> Array:
    return self.proj(jax.nn.gelu(self.fc(x), approximate=True))


# ---------------------------------------------------------------------------------------------
# The block.
# ---------------------------------------------------------------------------------------------

class Block(nnx.Module):
  """Attention and MLP residuals (or one parallel residual), with the norm where ``norm`` puts it.

  ``residual_norms`` and ``residual_shortcuts`` hold one entry per residual addition, in order
  (attention, then MLP; a parallel block has one).
  """

  def __init__(self, width: int, heads: int, *, mlp_ratio: int, rotary: bool, norm: str,
               parallel: bool, shortcut, value_residual, embed_shortcut, init: dict,
               dropout: float, dtype, rngs: nnx.Rngs):
    self.norm, self.parallel = norm, parallel
    self.attn = CausalSelfAttention(width, heads, rotary=rotary, value_std=init["value"],
                                    out_std=init["out"], value_residual=value_residual,
                                    dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_ratio * width, fc_std=init["fc"], out_std=init["out"], dtype=dtype,
                   rngs=rngs)
    n = 1 if parallel else 2
    self.residual_norms = (None if norm == "none" else
                           nnx.List([layer_norm(width, rngs) for _ in range(n)]))
    self.residual_shortcuts = nnx.List([
        shortcuts.make_shortcut(shortcut, width, width, 1, norm=False, rngs=rngs)
        for _ in range(n)])
    self.embed_shortcut = (None if embed_shortcut is None else
                           shortcuts.make_shortcut(embed_shortcut, width, width, 1, norm=False,
                                                   rngs=rngs))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def _residual(self, i: int, x: Array, branch, train: bool) -> tuple[Array, Array | None]:
    h = self.residual_norms[i](x) if self.norm == "pre" else x
    f, values = branch(h)
    if self.dropout is not None:
      f = self.dropout(f, deterministic=not train)
    y = self.residual_shortcuts[i](x, f, train=train)
    if self.norm in ("post", "deepnorm"):
      y = self.residual_norms[i](y)
    return y, values

  def __call__(self, x: Array, *, x0: Array, v_first: Array | None,
               train: bool) -> tuple[Array, Array]:
    """Returns the block's output stream and its values."""
    if self.embed_shortcut is not None:
      x = self.embed_shortcut(x, x0, train=train)
    attn = lambda h: self.attn(h, v_first, train=train)
    if self.parallel:
      def both(h):
        a, values = attn(h)
        return a + self.mlp(h), values
      return self._residual(0, x, both, train)
    x, values = self._residual(0, x, attn, train)
    x, _ = self._residual(1, x, lambda h: (self.mlp(h), None), train)
    return x, values


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

class Transformer(nnx.Module):
  """Decoder-only LM: ``model(tokens [B, T] int32, train=...) -> logits [B, T, vocab] float32``."""

  def __init__(self, *, vocab_size: int, context: int, width: int, depth: int, heads: int,
               shortcut, mlp_ratio: int = 4, positions: str = "learned", tie_head: bool = True,
               norm: str = "pre", parallel: bool = False, value_residual=None,
               embed_shortcut: bool = False, embed_shortcut_init=(1.0, 0.0), dropout: float = 0.0,
               scan: bool = True, dtype: str = "float32", scaled_out_init: bool | None = None,
               remat: str = "none", rngs: nnx.Rngs):
    _check(vocab_size=vocab_size, context=context, width=width, depth=depth, heads=heads,
           mlp_ratio=mlp_ratio, positions=positions, norm=norm, dropout=dropout, dtype=dtype)
    shortcuts.check_name(shortcut.name)
    self.context, self.width, self.depth, self.norm = context, width, depth, norm
    compute = DTYPES[dtype]
    self.compute_dtype = None if compute == jnp.float32 else compute
    # Residual additions on the stream: 2 per block, 1 per parallel block (ResNets: 1 per unit).
    self.residual_additions = additions = depth * (1 if parallel else 2)

    # Initial scales of the branch weights; see the module docstring.
    init = {"value": INIT_STD, "fc": INIT_STD, "out": INIT_STD}
    if scaled_out_init is None:
      scaled_out_init = norm == "pre"
    if scaled_out_init:
      init["out"] = INIT_STD / math.sqrt(additions)
    if norm == "deepnorm":
      beta = (4 * additions) ** -0.25
      init = {k: INIT_STD * beta for k in init}
      if shortcut.name not in ("identity", "deepnorm"):
        raise ConfigError(f"norm='deepnorm' brings its own shortcut, not {shortcut.name!r}: set "
                          "config.model.shortcut.name to 'deepnorm' (or 'identity')")
      shortcut = _config_dict(shortcut)
      shortcut.name = "deepnorm"
      if shortcut.get("alpha") is None:
        shortcut.alpha = additions ** 0.25

    value_residual = (None if value_residual is None or value_residual.get("name", "none") == "none"
                      else value_residual)
    if value_residual is not None:
      try:
        shortcuts.check_name(value_residual.name)
      except ConfigError as e:
        raise ConfigError(f"value residual: {e} (config.model.value_residual.name; 'none' for "
                          "none)") from None
    embed = None
    if embed_shortcut:
      a, b = embed_shortcut_init
      embed = ml_collections.ConfigDict({"name": "lambda", "lambda1_init": float(b),
                                         "lambda2_init": float(a)})

    self.token_embed = nnx.Embed(vocab_size, width, embedding_init=_normal(INIT_STD), rngs=rngs)
    self.position_embed = (nnx.Embed(context, width, embedding_init=_normal(INIT_STD), rngs=rngs)
                           if positions == "learned" else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    block_kw = dict(mlp_ratio=mlp_ratio, rotary=positions == "rotary", norm=norm,
                    parallel=parallel, shortcut=shortcut, init=init, dropout=dropout,
                    dtype=self.compute_dtype)
    self.first = Block(width, heads, value_residual=None, embed_shortcut=None, rngs=rngs,
                       **block_kw)
    n_rest = depth - 1
    make = lambda r: Block(width, heads, value_residual=value_residual, embed_shortcut=embed,
                           rngs=r, **block_kw)
    self.scan = scan and n_rest > 0
    self.remat = layers.check_remat(remat)
    if self.scan:
      @nnx.split_rngs(splits=n_rest)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_stacked(r):
        return make(r)
      self.rest = make_stacked(rngs)
    else:
      self.rest = nnx.List([make(rngs) for _ in range(n_rest)])

    self.final_norm = layer_norm(width, rngs) if norm == "pre" else None
    self.head = (None if tie_head else
                 _dense(width, vocab_size, INIT_STD, self.compute_dtype, rngs, bias=False))

  # -- diagnostics -------------------------------------------------------------------------------

  def probe_shapes(self, input_shape) -> list[tuple[int, ...]]:
    """(units, B, T, width) per stack of blocks: block 1, then blocks 2..L if there are any."""
    b, t = input_shape
    shapes = [(1, b, t, self.width)]
    if self.depth > 1:
      shapes.append((self.depth - 1, b, t, self.width))
    return shapes

  # -- forward -----------------------------------------------------------------------------------

  def embed(self, tokens: Array, *, train: bool) -> Array:
    """x0: token (+ position) embeddings, after dropout."""
    t = tokens.shape[1]
    if t > self.context:
      raise ConfigError(f"sequences of {t} tokens exceed the model's context {self.context}: "
                        "raise config.model.context or shorten the data's sequences")
    x = self.token_embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(t))[None]
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train)
    return x

  def logits(self, x: Array) -> Array:
    """Final norm (Pre-LN) and head: the stream after the last block -> float32 logits."""
    if self.final_norm is not None:
      x = self.final_norm(x)
    dt = self.compute_dtype or jnp.float32
    w = self.token_embed.embedding[...].T if self.head is None else self.head.kernel[...]
    return jnp.dot(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)

  def run_rest(self, x: Array, *, x0: Array, v_first: Array, probe: Array | None = None,
               train: bool) -> tuple[Array, Array | None]:
    """Blocks 2..L on the stream x; with a probe, also each block's input RMS."""
    return layers.run_units(
        self.rest, lambda block, h: block(h, x0=x0, v_first=v_first, train=train)[0], x, probe,
        scan=self.scan, remat=self.remat)

  def __call__(self, tokens: Array, *, train: bool, probes: list[Array] | None = None):
    x0 = self.embed(tokens, train=train)
    x, norms = x0, []
    if probes is not None:
      expected = len(self.probe_shapes(tokens.shape))
      if len(probes) != expected:
        raise ValueError(f"expected {expected} probes (probe_shapes), got {len(probes)}")
      x = x + probes[0][0]
      norms.append(rms(x)[None])
    x, v_first = self.first(x, x0=x0, v_first=None, train=train)
    if self.depth > 1:
      x, rest_norms = self.run_rest(x, x0=x0, v_first=v_first,
                                    probe=None if probes is None else probes[1], train=train)
      if probes is not None:
        norms.append(rest_norms)
    logits = self.logits(x)
    return logits if probes is None else (logits, norms)


def _check(*, vocab_size, context, width, depth, heads, mlp_ratio, positions, norm, dropout,
           dtype) -> None:
  """Raises ConfigError for a model config that cannot work."""
  for name, value in [("vocab_size", vocab_size), ("context", context), ("width", width),
                      ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)]:
    if not (isinstance(value, int) and value > 0):
      raise ConfigError(f"config.model.{name}={value!r} must be a positive integer")
  if width % heads:
    raise ConfigError(f"width {width} does not divide into {heads} heads: set config.model.heads "
                      "to a divisor of config.model.width")
  if positions not in POSITIONS:
    raise ConfigError(f"unknown positions {positions!r}: set config.model.positions to one of "
                      f"{', '.join(POSITIONS)}")
  if positions == "rotary" and (width // heads) % 2:
    raise ConfigError(f"rotary positions need an even head width, not {width // heads}: change "
                      "config.model.width or config.model.heads")
  if norm not in NORMS:
    raise ConfigError(f"unknown norm {norm!r}: set config.model.norm to one of {', '.join(NORMS)}")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"dropout {dropout} is outside [0, 1): set config.model.dropout")
  if dtype not in DTYPES:
    raise ConfigError(f"unknown dtype {dtype!r}: set config.model.dtype to one of "
                      f"{', '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------------
# Registry entries (models/__init__.py).
# ---------------------------------------------------------------------------------------------

def from_config(model_cfg, *, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> Transformer:
  """The Transformer of ``config.model``; the vocabulary is the data's unless vocab_size is set."""
  del in_channels
  d = default_config()
  get = lambda key: model_cfg.get(key, d[key])
  return Transformer(
      vocab_size=model_cfg.get("vocab_size") or num_classes, context=get("context"),
      width=get("width"), depth=get("depth"), heads=get("heads"), mlp_ratio=get("mlp_ratio"),
      positions=get("positions"), tie_head=get("tie_head"), norm=get("norm"),
      parallel=get("parallel"), shortcut=get("shortcut"), value_residual=get("value_residual"),
      embed_shortcut=get("embed_shortcut"), embed_shortcut_init=tuple(get("embed_shortcut_init")),
      dropout=float(get("dropout")), scan=get("scan"), dtype=get("dtype"),
      scaled_out_init=get("scaled_out_init"), remat=get("remat"), rngs=rngs)


def repeats(model_cfg, k: int):
  """The same Transformer with k blocks, and its real number of blocks."""
  out = copy.deepcopy(model_cfg)
  out.depth = k
  return out, model_cfg.depth
