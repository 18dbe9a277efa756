"""A decoder-only language model in the GPT-2 mould, with every residual a ``Shortcut``.

tokens [B, T] -> token embedding (+ learned positions) (-> norm) -> blocks -> (final norm) -> head
-> logits [B, T, vocab]. A block is causal multi-head self-attention and an MLP, each a residual
branch whose output ``f`` meets the carried stream ``x`` through the configured shortcut. Where the
norm N sits is the block's ``norm``:

==========  ====================================================  ================================
norm        one residual of a block                               from
==========  ====================================================  ================================
pre         x <- shortcut(x, F(N(x))), plus a final N             GPT-2 (Pre-LN)
post        x <- N(shortcut(x, F(x)))                             the original Transformer
deepnorm    x <- N(alpha x + F(x)) (the ``deepnorm`` shortcut)    DeepNet, decoder-only
none        x <- shortcut(x, F(x)), no norm anywhere              ReZero / SkipInit (``rezero``)
==========  ====================================================  ================================

What N is, is ``norm_kind``: ``layernorm`` (GPT-2: a gain, and a bias unless ``bias=False``,
eps 1e-5) or ``rmsnorm``, x / sqrt(mean(x^2) + eps) over the channels without a gain, so without
parameters, eps = 2^-23 (float32's machine epsilon, PyTorch's ``F.rms_norm`` default on float32).
``embed_norm`` puts the same N on the embedding output, so x0 (the stream before block 1, and the
embedding shortcut's x0) is normed. The parts of a block:

================  ================================================================================
option            effect
================  ================================================================================
activation        the MLP's: ``gelu`` (tanh form, GPT-2) or ``relu2``, relu(h)^2 (Primer)
qk_norm           queries and keys RMS-normed per head (over head_dim, no gain, eps 2^-23) before
                  rotary positions
bias              False: no bias in the attention and MLP Dense layers and the LayerNorms (the
                  head never has one; a projecting shortcut keeps its own)
parallel          the GPT-J / PaLM block: attention and MLP read the same (normed) input and their
                  sum is one residual, ``x <- shortcut(x, attn(N(x)) + mlp(N(x)))`` for Pre-LN
================  ================================================================================

Initialisation (``init``):

* ``gpt2``: Dense kernels and embeddings N(0, 0.02), biases 0. With Pre-LN the residual output
  projections (attention out, MLP out) are scaled by 1/sqrt(N), N = residual additions (GPT-2).
* ``pytorch``: PyTorch's defaults, Dense kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear)
  and embeddings N(0, 1) (nn.Embedding); biases 0 (nn.Linear draws them uniform; modded-nanogpt
  has none). No 1/sqrt(N) scaling unless ``scaled_out_init=True``.

``scaled_out_init`` True or False applies or drops the 1/sqrt(N) scaling whatever the norm (None:
Pre-LN with ``gpt2`` init), so that norm placement and initialisation can be varied one at a time.
DeepNorm takes the paper's decoder-only alpha = (2 L)^(1/4) and scales the value, attention-out
and MLP weights by beta = (8 L)^(-1/4), L = blocks; written in residual additions R = 2 L these are
R^(1/4) and (4 R)^(-1/4), which is how parallel blocks (R = L) are treated. Under ``pytorch`` init
these factors scale the uniform bound as they scale GPT-2's std. ``zero_init_out`` starts the
attention-out and MLP-out kernels at 0, so every branch output starts at 0; ``zero_init_head``
starts the (untied) head at 0, so the logits at init are 0 and the loss is log(vocab).

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

``value_residual_first=True`` gives block 1 one as well, applied to its own values (x = f = V_1),
as modded-nanogpt does: ``mix`` then gives (1 - lambda) V_1 + lambda V_1 = V_1 (up to rounding),
so that lambda is a parameter (the record counts it) that leaves the function unchanged. Later
blocks read block 1's values from before it.

The embedding shortcut (``embed_shortcut=True``) is the ``lambda`` shortcut with x = the stream and
f = x0 (the embedding output) at the input of every block n > 1, and of block 1 too with
``embed_shortcut_first=True`` (modded-nanogpt): x <- a x + b x0 with a = lambda2, b = lambda1,
initialised to ``embed_shortcut_init`` = (a, b) = (1, 0) as in modded-nanogpt, every block its own
(a, b). Learnable scalars are ``shortcuts.ResidualScalar``, which the optimizer keeps out of weight
decay.

Shortcuts are built with ``norm=False``: a projecting shortcut on tokens is a Dense with a bias,
not a projection followed by BatchNorm, whose statistics would pool over the batch and over all
positions and so let a token see the future in training.

Block 1 runs on its own (it produces V_1); blocks 2..L are identical and run under ``jax.lax.scan``
over stacked parameters (``scan=False``: a Python loop computing the same function).

Dropout (``dropout`` > 0) acts on the embedding output and on every branch output before its
residual (GPT-2's embd and resid dropout). Attention probabilities are not dropped, so attention can
use the fused kernels of ``jax.nn.dot_product_attention``. With ``dtype="bfloat16"`` the matrix
multiplies and attention run in bfloat16; parameters, norms (QK-norm included, whose output is
cast back to bfloat16), the residual stream and the logits stay float32.

Config (``config.model``, see ``default_config``; every default is GPT-2's):

====================  ========================================================================
name                  "transformer"
vocab_size            vocabulary size; None: the data's (``num_classes`` from the trainer)
context               longest sequence; rows of the learned position table
width                 residual stream width d
depth                 blocks L (residual additions: 2 L, or L for parallel blocks)
heads                 attention heads (width must divide by it)
mlp_ratio             MLP hidden width / width (4)
positions             "learned" (GPT-2) or "rotary" (RoPE on queries and keys, base 10000)
tie_head              head = token embedding transposed (GPT-2); False: a separate bias-free Dense
norm                  "pre", "post", "deepnorm" or "none" (table above)
norm_kind             "layernorm" (with gain) or "rmsnorm" (no gain, no parameters)
embed_norm            the norm on the embedding output (x0 normed)
activation            "gelu" or "relu2"
qk_norm               RMS-norm each head's queries and keys before rotary
bias                  biases in the attention and MLP Dense layers and the LayerNorms
parallel              GPT-J / PaLM parallel block
shortcut              the Shortcut config of both residuals of every block (``shortcuts.py``)
value_residual        a Shortcut config on the value stream; name "none" or absent: off
value_residual_first  block 1 has a value residual too (on its own values)
embed_shortcut        x <- a x + b x0 at the input of every block n > 1
embed_shortcut_first  ... and of block 1, with its own (a, b)
embed_shortcut_init   (a, b) at init
dropout               rate (0: no dropout modules at all)
scan                  run blocks 2..L under jax.lax.scan
remat                 "none", or recompute the scanned blocks in the backward pass under a
                      named jax.checkpoint policy (``layers.REMAT_POLICIES``)
dtype                 compute dtype of matrix multiplies: "float32" or "bfloat16"
init                  "gpt2" or "pytorch" (above)
scaled_out_init       None, True or False: the 1/sqrt(N) scaling of the output projections
zero_init_out         attention-out and MLP-out projections start at 0
zero_init_head        the untied head starts at 0 (needs tie_head=False)
====================  ========================================================================

The Transformer of the modded-nanogpt speedrun record of 2024-11-06 is ``configs.RECORD_MODEL``:
12 blocks of width 768, 6 heads of 128, rotary positions, RMSNorm without gains (Pre-norm, on
the embedding and before the untied head), QK-norm, ReLU^2, no biases, PyTorch's init with the
output projections and the head at 0, the ``mix`` value residual and the embedding shortcut at
every block; 162,201,636 parameters at its vocabulary of 50304.

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
NORM_KINDS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu2")
INITS = ("gpt2", "pytorch")
POSITIONS = ("learned", "rotary")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_STD = 0.02  # GPT-2
LN_EPSILON = 1e-5  # GPT-2
RMS_EPSILON = float(jnp.finfo(jnp.float32).eps)  # 2^-23: F.rms_norm's default on float32 inputs
ROTARY_BASE = 10000.0


def default_config() -> ml_collections.ConfigDict:
  """GPT-2 small (124M with a 50257-token vocabulary): Pre-LN, learned positions, tied head; the
  model of ``resjax.configs.lm_recipe``."""
  return configs.lm_recipe().model


def _config_dict(cfg) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _normal(std: float):
  return nnx.initializers.normal(std)


def _fan_in_uniform(factor: float):
  """U(-b, b) with b = factor / sqrt(fan_in) on a [fan_in, fan_out] kernel (factor 1: PyTorch's
  nn.Linear default, kaiming_uniform with a = sqrt(5))."""
  def init(key, shape, dtype=jnp.float32):
    bound = factor / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _kernel_init(scheme: str, std: float):
  """A Dense kernel's initialiser: N(0, std) (``gpt2``), or PyTorch's uniform scaled by the same
  factor std / 0.02 (``pytorch``), so that Pre-LN's and DeepNorm's scalings carry over."""
  return _normal(std) if scheme == "gpt2" else _fan_in_uniform(std / INIT_STD)


def _dense(in_features: int, out_features: int, kernel_init, dtype, rngs: nnx.Rngs, *,
           bias: bool = True) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=kernel_init,
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def layer_norm(width: int, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=LN_EPSILON, use_bias=bias, rngs=rngs)


def rms_norm(x: Array) -> Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, without a gain; computed in float32, returned
  in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(mean_square + RMS_EPSILON)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """``rms_norm`` as a module: no parameters."""

  def __call__(self, x: Array) -> Array:
    return rms_norm(x)


def make_norm(kind: str, width: int, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Module:
  """LayerNorm with a gain (and a bias unless ``bias`` is False), or RMSNorm without a gain."""
  return layer_norm(width, rngs, bias=bias) if kind == "layernorm" else RMSNorm()


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
  """Multi-head causal self-attention whose values may first meet V_1 through a value residual.

  ``kernels``: the initialisers of the query, key, value and out kernels, by those names.
  """

  def __init__(self, width: int, heads: int, *, rotary: bool, qk_norm: bool, kernels: dict,
               bias: bool, value_residual, dtype, rngs: nnx.Rngs):
    self.heads, self.rotary, self.qk_norm = heads, rotary, qk_norm
    dense = lambda name: _dense(width, width, kernels[name], dtype, rngs, bias=bias)
    self.query, self.key, self.value, self.out = map(dense, ("query", "key", "value", "out"))
    # On [B, T, width] values, so a gate (a Dense over the last axis) sees every head's channels.
    self.value_residual = (None if value_residual is None else
                           shortcuts.make_shortcut(value_residual, width, width, 1, norm=False,
                                                   rngs=rngs))

  def __call__(self, x: Array, v_first: Array | None, *, train: bool) -> tuple[Array, Array]:
    """Returns the branch output and the values: block 1's own (V_1, before any value residual),
    a later block's those it used."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    own = v
    if self.value_residual is not None:  # block 1 (v_first None) mixes V_1 with itself
      v = self.value_residual(own if v_first is None else v_first, v, train=train).astype(v.dtype)
    b, t, d = x.shape
    split = lambda a: a.reshape(b, t, self.heads, d // self.heads)
    q, k, heads_v = split(q), split(k), split(v)
    if self.qk_norm:
      q, k = rms_norm(q), rms_norm(k)
    if self.rotary:
      q, k = apply_rotary(q), apply_rotary(k)
    y = jax.nn.dot_product_attention(q, k, heads_v, is_causal=True)
    return self.out(y.reshape(b, t, d)), own if v_first is None else v


class Mlp(nnx.Module):
  """Dense, GELU (tanh form, as GPT-2) or ReLU squared, Dense."""

  def __init__(self, width: int, hidden: int, *, activation: str, fc_init, out_init, bias: bool,
               dtype, rngs: nnx.Rngs):
    self.activation = activation
    self.fc = _dense(width, hidden, fc_init, dtype, rngs, bias=bias)
    self.proj = _dense(hidden, width, out_init, dtype, rngs, bias=bias)

  def __call__(self, x: Array) -> Array:
    h = self.fc(x)
    if self.activation == "relu2":
      h = jnp.square(jax.nn.relu(h))
    else:
      h = jax.nn.gelu(h, approximate=True)
    return self.proj(h)


# ---------------------------------------------------------------------------------------------
# The block.
# ---------------------------------------------------------------------------------------------

class Block(nnx.Module):
  """Attention and MLP residuals (or one parallel residual), with the norm where ``norm`` puts it.

  ``residual_norms`` and ``residual_shortcuts`` hold one entry per residual addition, in order
  (attention, then MLP; a parallel block has one). ``kernels``: the initialisers of the
  attention's query, key, value and out kernels and of the MLP's fc and proj, by those names.
  """

  def __init__(self, width: int, heads: int, *, mlp_ratio: int, rotary: bool, norm: str,
               norm_kind: str, activation: str, qk_norm: bool, bias: bool, parallel: bool,
               shortcut, value_residual, embed_shortcut, kernels: dict, dropout: float, dtype,
               rngs: nnx.Rngs):
    self.norm, self.parallel = norm, parallel
    self.attn = CausalSelfAttention(width, heads, rotary=rotary, qk_norm=qk_norm,
                                    kernels=kernels, bias=bias, value_residual=value_residual,
                                    dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_ratio * width, activation=activation, fc_init=kernels["fc"],
                   out_init=kernels["proj"], bias=bias, dtype=dtype, rngs=rngs)
    n = 1 if parallel else 2
    self.residual_norms = (None if norm == "none" else
                           nnx.List([make_norm(norm_kind, width, rngs, bias=bias)
                                     for _ in range(n)]))
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
               norm: str = "pre", norm_kind: str = "layernorm", embed_norm: bool = False,
               activation: str = "gelu", qk_norm: bool = False, bias: bool = True,
               parallel: bool = False, value_residual=None, value_residual_first: bool = False,
               embed_shortcut: bool = False, embed_shortcut_first: bool = False,
               embed_shortcut_init=(1.0, 0.0), dropout: float = 0.0, scan: bool = True,
               dtype: str = "float32", init: str = "gpt2", scaled_out_init: bool | None = None,
               zero_init_out: bool = False, zero_init_head: bool = False, remat: str = "none",
               rngs: nnx.Rngs):
    _check(vocab_size=vocab_size, context=context, width=width, depth=depth, heads=heads,
           mlp_ratio=mlp_ratio, positions=positions, norm=norm, norm_kind=norm_kind,
           activation=activation, init=init, dropout=dropout, dtype=dtype)
    shortcuts.check_name(shortcut.name)
    self.context, self.width, self.depth, self.norm = context, width, depth, norm
    compute = DTYPES[dtype]
    self.compute_dtype = None if compute == jnp.float32 else compute
    # Residual additions on the stream: 2 per block, 1 per parallel block (ResNets: 1 per unit).
    self.residual_additions = additions = depth * (1 if parallel else 2)

    # Initial scales of the branch weights (as GPT-2 stds); see the module docstring.
    std = {"value": INIT_STD, "fc": INIT_STD, "out": INIT_STD}
    if scaled_out_init is None:
      scaled_out_init = norm == "pre" and init == "gpt2"
    if scaled_out_init:
      std["out"] = INIT_STD / math.sqrt(additions)
    if norm == "deepnorm":
      beta = (4 * additions) ** -0.25
      std = {k: INIT_STD * beta for k in std}
      if shortcut.name not in ("identity", "deepnorm"):
        raise ConfigError(f"norm='deepnorm' brings its own shortcut, not {shortcut.name!r}: set "
                          "config.model.shortcut.name to 'deepnorm' (or 'identity')")
      shortcut = _config_dict(shortcut)
      shortcut.name = "deepnorm"
      if shortcut.get("alpha") is None:
        shortcut.alpha = additions ** 0.25
    out_init = nnx.initializers.zeros if zero_init_out else _kernel_init(init, std["out"])
    kernels = {"query": _kernel_init(init, INIT_STD), "key": _kernel_init(init, INIT_STD),
               "value": _kernel_init(init, std["value"]), "out": out_init,
               "fc": _kernel_init(init, std["fc"]), "proj": out_init}

    value_residual = (None if value_residual is None or value_residual.get("name", "none") == "none"
                      else value_residual)
    if value_residual is not None:
      try:
        shortcuts.check_name(value_residual.name)
      except ConfigError as e:
        raise ConfigError(f"value residual: {e} (config.model.value_residual.name; 'none' for "
                          "none)") from None
    elif value_residual_first:
      raise ConfigError("value_residual_first=True needs a value residual: set "
                        "config.model.value_residual.name (e.g. 'mix') or value_residual_first "
                        "to False")
    embed = None
    if embed_shortcut:
      a, b = embed_shortcut_init
      embed = ml_collections.ConfigDict({"name": "lambda", "lambda1_init": float(b),
                                         "lambda2_init": float(a)})
    elif embed_shortcut_first:
      raise ConfigError("embed_shortcut_first=True needs the embedding shortcut: set "
                        "config.model.embed_shortcut to True or embed_shortcut_first to False")
    if zero_init_head and tie_head:
      raise ConfigError("zero_init_head=True would zero the tied head, i.e. the token embedding: "
                        "set config.model.tie_head to False or zero_init_head to False")

    embedding_init = _normal(INIT_STD if init == "gpt2" else 1.0)  # nn.Embedding: N(0, 1)
    self.token_embed = nnx.Embed(vocab_size, width, embedding_init=embedding_init, rngs=rngs)
    self.position_embed = (nnx.Embed(context, width, embedding_init=embedding_init, rngs=rngs)
                           if positions == "learned" else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.embed_norm = make_norm(norm_kind, width, rngs, bias=bias) if embed_norm else None

    block_kw = dict(mlp_ratio=mlp_ratio, rotary=positions == "rotary", norm=norm,
                    norm_kind=norm_kind, activation=activation, qk_norm=qk_norm, bias=bias,
                    parallel=parallel, shortcut=shortcut, kernels=kernels, dropout=dropout,
                    dtype=self.compute_dtype)
    self.first = Block(width, heads, value_residual=value_residual if value_residual_first else None,
                       embed_shortcut=embed if embed_shortcut_first else None, rngs=rngs,
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

    self.final_norm = make_norm(norm_kind, width, rngs, bias=bias) if norm == "pre" else None
    head_init = nnx.initializers.zeros if zero_init_head else _kernel_init(init, INIT_STD)
    self.head = (None if tie_head else
                 _dense(width, vocab_size, head_init, self.compute_dtype, rngs, bias=False))

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
    """x0: token (+ position) embeddings, normed (``embed_norm``), after dropout."""
    t = tokens.shape[1]
    if t > self.context:
      raise ConfigError(f"sequences of {t} tokens exceed the model's context {self.context}: "
                        "raise config.model.context or shorten the data's sequences")
    x = self.token_embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(t))[None]
    if self.embed_norm is not None:
      x = self.embed_norm(x)
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


def _check(*, vocab_size, context, width, depth, heads, mlp_ratio, positions, norm, norm_kind,
           activation, init, dropout, dtype) -> None:
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
  for name, value, known in [("norm", norm, NORMS), ("norm_kind", norm_kind, NORM_KINDS),
                             ("activation", activation, ACTIVATIONS), ("init", init, INITS),
                             ("dtype", dtype, DTYPES)]:
    if value not in known:
      raise ConfigError(f"unknown {name} {value!r}: set config.model.{name} to one of "
                        f"{', '.join(known)}")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"dropout {dropout} is outside [0, 1): set config.model.dropout")


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
      norm_kind=get("norm_kind"), embed_norm=get("embed_norm"), activation=get("activation"),
      qk_norm=get("qk_norm"), bias=get("bias"), parallel=get("parallel"),
      shortcut=get("shortcut"), value_residual=get("value_residual"),
      value_residual_first=get("value_residual_first"), embed_shortcut=get("embed_shortcut"),
      embed_shortcut_first=get("embed_shortcut_first"),
      embed_shortcut_init=tuple(get("embed_shortcut_init")), dropout=float(get("dropout")),
      scan=get("scan"), dtype=get("dtype"), init=get("init"),
      scaled_out_init=get("scaled_out_init"), zero_init_out=get("zero_init_out"),
      zero_init_head=get("zero_init_head"), remat=get("remat"), rngs=rngs)


def repeats(model_cfg, k: int):
  """The same Transformer with k blocks, and its real number of blocks."""
  out = copy.deepcopy(model_cfg)
  out.depth = k
  return out, model_cfg.depth
