"""fairseq checkpoints through torch's weights-only unpickler: no file can make the loader run code.

fairseq 0.12 reads checkpoints with a plain `torch.load(f, map_location=...)`. Since torch 2.6 that
means weights_only=True: the unpickler builds tensors, containers and primitive values, and refuses
every other global ("Unsupported global: GLOBAL argparse.Namespace"). A fairseq checkpoint holds a few
more, all plain data holders whose construction runs nothing of the file's choosing:

* `argparse.Namespace`: fairseq's legacy `args`, and `cfg.model` of architectures registered with
  argparse options (`--arch transformer`);
* numpy scalars (numpy's `scalar` reconstructor, `numpy.dtype` and the dtype classes of numbers):
  values such as `best` in checkpoints written by older fairseq versions.

`allow_fairseq_globals()` adds exactly these to torch's allow-list (`add_safe_globals`); anything else
in a checkpoint is still refused. attnmask calls it before it reads a checkpoint. The stock CLIs
(fairseq-train, fairseq-generate, ...) get it from `attnmask-fairseq-safe-load.pth`, which
`make install` writes into the environment's site-packages (`python -m attnmask.fairseq_safe_load
--install`): at interpreter start it installs an import hook that calls `allow_fairseq_globals()` right
after `fairseq.checkpoint_utils` is imported, so processes that never import fairseq pay nothing.
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

HOOKED_MODULE = "fairseq.checkpoint_utils"
PTH_NAME = "attnmask-fairseq-safe-load.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('attnmask') and "
            "__import__('attnmask.fairseq_safe_load', fromlist=['_']).install_import_hook()\n")


def fairseq_safe_globals() -> list:
    """The globals a fairseq checkpoint may name besides what weights_only loading accepts anyway."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    number_dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [argparse.Namespace, scalar, np.dtype, *number_dtypes]


def allow_fairseq_globals() -> None:
    """Add fairseq_safe_globals() to torch's weights-only allow-list (for this process)."""
    import torch

    torch.serialization.add_safe_globals(fairseq_safe_globals())


def refused_global(error: BaseException) -> str | None:
    """The global torch's weights-only unpickler refused in `error` ('posix.system'), or None."""
    import re

    match = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
    return match[1] if match else None


class _AllowAfterImport(importlib.abc.MetaPathFinder):
    """Runs allow_fairseq_globals() once HOOKED_MODULE has been executed (then leaves sys.meta_path)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != HOOKED_MODULE:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def execute_then_allow(module):
            execute(module)
            allow_fairseq_globals()

        spec.loader.exec_module = execute_then_allow
        return spec


def install_import_hook() -> None:
    """Arrange for allow_fairseq_globals() to run when fairseq.checkpoint_utils is imported."""
    if HOOKED_MODULE in sys.modules:
        allow_fairseq_globals()
    elif not any(isinstance(f, _AllowAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AllowAfterImport())


def install_pth(site_packages: str | Path | None = None) -> Path:
    """Write PTH_NAME into `site_packages` (default: this interpreter's purelib folder)."""
    import sysconfig

    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(PTH_LINE)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m attnmask.fairseq_safe_load --install")
    print(f"wrote {install_pth()}")
