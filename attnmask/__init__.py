"""attnmask: data-informed global attention sparsity (collect patterns, compile masks, run them)."""

__version__ = "0.1.0"
