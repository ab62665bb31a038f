"""attnmask: data-informed global attention sparsity (collect patterns, compile masks, run them).

The Python API (attnmask/api.py): `collect_patterns`, `compile_masks`, `apply_masks`, `load_model`.
"""

from attnmask.version import __version__

API = ("collect_patterns", "compile_masks", "apply_masks", "load_model")
__all__ = [*API, "__version__"]


def __getattr__(name):
    """The API functions, imported on first use: `import attnmask` does not import torch."""
    if name in API:
        from attnmask import api

        return getattr(api, name)
    raise AttributeError(f"module 'attnmask' has no attribute {name!r}")
