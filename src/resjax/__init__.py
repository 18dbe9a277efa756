"""resjax: residual connections in JAX, every form behind one Shortcut protocol."""

__version__ = "0.1.0"
