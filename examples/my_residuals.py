"""Two residual forms of a user's own, for ``python -m resjax.caution`` (README, "Your own form").

    python -m resjax.caution --shortcut examples/my_residuals.py:LearnedLambda \
        --shortcut examples/my_residuals.py:ChannelGate --workdir runs/my_residuals

A form is an ``nnx.Module`` built as ``cls(cfg, in_features, out_features, stride, *, norm, rngs)``
and called as ``form(x, f, *, train)``: ``x`` is what the connection carries, ``f`` the branch's
output, and the result has ``f``'s shape. ``resjax.MatchedShortcut`` brings ResNet-v1's shape
matching (``self.carried(x, train)``: option A or B where a unit changes width or stride) and the
``projects`` attribute; ``defaults`` are the form's settings, which the config and ``--set`` can
change (``--config.model.shortcut.gate_init=2.0`` in ``python -m resjax.main``).
"""

import jax
import jax.numpy as jnp

import resjax


class LearnedLambda(resjax.MatchedShortcut):
  """``lambda1 * f + lambda2 * x``, both learnable scalars starting at 0.5."""

  defaults = {**resjax.MatchedShortcut.defaults, "lambda1_init": 0.5, "lambda2_init": 0.5}

  def __init__(self, cfg, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    self.lambda1 = self.scalar(cfg, "lambda1_init")
    self.lambda2 = self.scalar(cfg, "lambda2_init")

  def __call__(self, x, f, *, train):
    return self.lambda1[...] * f + self.lambda2[...] * self.carried(x, train)


class ChannelGate(resjax.MatchedShortcut):
  """``g * x + f`` with a learnable gate per channel, ``g = 2 sigmoid(w)`` in (0, 2).

  ``w`` starts at the logit of ``gate_init / 2``, so with the default 1.0 every unit starts as
  the identity shortcut and learns, channel by channel, how much of x to carry.
  """

  defaults = {**resjax.MatchedShortcut.defaults, "gate_init": 1.0}

  def __init__(self, cfg, in_features, out_features, stride, *, norm, rngs):
    super().__init__(cfg, in_features, out_features, stride, norm=norm, rngs=rngs)
    g = float(self.setting(cfg, "gate_init"))
    if not 0.0 < g < 2.0:
      raise ValueError(f"gate_init={g} must be in (0, 2)")
    logit = jnp.log(g / 2.0) - jnp.log1p(-g / 2.0)
    self.w = resjax.ResidualScalar(jnp.full((out_features,), logit, jnp.float32))

  def __call__(self, x, f, *, train):
    return 2.0 * jax.nn.sigmoid(self.w[...]) * self.carried(x, train) + f
