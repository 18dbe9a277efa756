"""resjax: residual connections in JAX, every form behind one Shortcut protocol.

A form of your own (examples/my_residuals.py) is an ``nnx.Module`` built as
``cls(cfg, in_features, out_features, stride, *, norm, rngs)``, called as ``shortcut(x, f, *,
train)``, with a ``projects`` attribute. Subclass ``MatchedShortcut`` for ResNet-v1's shape
matching (``self.carried(x, train)``) and its ``defaults`` (the form's config keys); make learnable
scalars ``ResidualScalar`` so the optimizer keeps them out of weight decay.
"""

__version__ = "0.1.0"

# Importing resjax stays light: these load JAX and flax on first use.
_LAZY = {"MatchedShortcut": "resjax.models.shortcuts", "ResidualScalar": "resjax.models.shortcuts",
         "Shortcut": "resjax.models.shortcuts"}


def register(name: str, cls) -> None:
  """Makes the form ``cls`` usable by ``name`` (``config.model.shortcut.name``, and
  ``python -m resjax.caution``'s ``caution.run``), e.g. from a notebook."""
  from resjax.models import shortcuts
  shortcuts.register_user(name, cls)


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'resjax' has no attribute {name!r}")
