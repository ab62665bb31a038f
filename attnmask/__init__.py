"""attnmask: data-informed global attention sparsity (collect patterns, compile masks, run them)."""

__version__ = "0.1.0"


def __getattr__(name):
    """`attnmask.apply_masks` without importing torch at package import."""
    if name == "apply_masks":
        from attnmask.runtime import apply_masks

        return apply_masks
    raise AttributeError(f"module 'attnmask' has no attribute {name!r}")
