"""Muon (momentum orthogonalised by Newton-Schulz) as the modded-nanogpt record of 2024-11-06 ran
it on the matrices of its Transformer blocks.

On one matrix with gradient g, at LR lr and momentum m (0.95):

  buf <- m buf + g                   the momentum buffer (SGD's, not an average)
  u = g + m buf                      Nesterov (``nesterov=False``: u = buf)
  X = u / (||u||_F + 1e-7)           so every singular value is at most 1
  X <- a X + b (X X^T) X + c (X X^T)^2 X, 5 times, (a, b, c) = (3.4445, -4.7750, 2.0315),
                                     on the transpose of X when it has more rows than columns
  p <- p - lr sqrt(max(1, fan_out / fan_in)) X

The iteration maps each singular value s of X to f(s) = a s + b s^3 + c s^5 and keeps the
singular vectors: X ends as U f^5(S / ||u||_F) V^T for u = U S V^T. f has slope a = 3.4445 at 0
and no fixed point it converges to: it maps [0.5545, 1.0501] (between its critical points) onto
[0.6818, 1.2024], and five steps bring every s >= 0.0016 into that band (``BAND``; the record's
docstring says roughly Uniform(0.5, 1.5)). A smaller s, a direction the update barely holds, ends
about 3.4445^5 = 487 times larger, below the band. tests/test_muon.py checks both.

The record wrote the shape factor for PyTorch's (out, in) weights as max(1, rows / cols); Flax
kernels are (in, out), so here it is max(1, columns / rows) of the kernel. A leaf with more than
two axes is a stack of matrices (the scanned blocks' kernels, (blocks, in, out)): each trailing
matrix is normalised and orthogonalised on its own.

Why not ``optax.contrib.muon`` (optax 0.2.8): its Newton-Schulz iteration is the record's (the same
coefficients, 5 steps, Frobenius normalisation, tall matrices transposed) and so is its shape
factor for Flax kernels, but its momentum is not. It keeps a bias-corrected average mu = EMA(g),
and its Nesterov step orthogonalises m mu_t / (1 - m^(t+1)) + (1 - m) g / (1 - m^t): against the
gradient it weighs the record's buffer by m (1 - m^t) / (1 - m^(t+1)), where the record's
g + m buf weighs it by m. At step 1 the buffer is the gradient and both give g's direction; at
step 2 the weight is 0.65 against the record's 0.95 (m = 0.95), nearing it only as t grows. The
orthogonalisation removes a common factor but not this ratio, and no argument of optax's changes
it. It also adds 1e-8, not 1e-7, to the norm (the eps it shares with its Adam), and by default
sends only 2-D leaves to Muon (a stacked kernel would go to its Adam). So Muon is built here from
``optax.trace`` (whose Nesterov form is the record's u = g + m buf) and this module's own
iteration. The record orthogonalises in bfloat16; this runs in the gradients' dtype (float32) at
the backend's default matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  # added to the Frobenius norm before the iteration
# Where 5 steps put every singular value s of u / ||u||_F with s >= BAND_FROM: f's values at its
# local minimum (s = 1.0501) and maximum (s = 0.5545) on (0, 1.21], rounded outwards.
BAND, BAND_FROM = (0.6818, 1.2024), 0.0016  # 0.0015 falls short: f^5(0.0015) = 0.6798


def orthogonalize(u: jax.Array, steps: int = NS_STEPS) -> jax.Array:
  """The record's Newton-Schulz iteration on each trailing matrix of ``u`` (leading axes: a
  stack): U f^5(S / ||u||_F) V^T for u = U S V^T, near U V^T (module docstring)."""
  a, b, c = NS_COEFFS
  swap = lambda x: jnp.swapaxes(x, -1, -2)
  tall = u.shape[-2] > u.shape[-1]
  x = swap(u) if tall else u  # X X^T is then the smaller Gram matrix
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + NS_EPS)
  for _ in range(steps):
    gram = x @ swap(x)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return swap(x) if tall else x


def shape_factor(shape) -> float:
  """sqrt(max(1, fan_out / fan_in)) for a Flax kernel (..., in, out)."""
  return max(1.0, shape[-1] / shape[-2]) ** 0.5


def orthogonalized_updates() -> optax.GradientTransformation:
  """Each update (a matrix or a stack of them) -> its orthogonalisation times the shape factor."""

  def update_fn(updates, state, params=None):
    del params
    out = jax.tree.map(lambda u: (orthogonalize(u) * shape_factor(u.shape)).astype(u.dtype),
                       updates)
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.95, nesterov: bool = True,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Muon for Flax kernels (matrices or stacks of them); ``weight_decay`` is decoupled and, as in
  ``optax.adamw``, multiplied by the LR (the record has none)."""
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  return optax.chain(optax.trace(decay=momentum, nesterov=nesterov), orthogonalized_updates(),
                     *decay, optax.scale_by_learning_rate(learning_rate))
