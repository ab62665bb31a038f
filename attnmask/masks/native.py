"""The C++ block-sparse forward (blocksparse.cpp beside this file), built on first use.

torch.utils.cpp_extension compiles it once per machine into torch's extension cache (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions); `make install` builds it ahead. The name carries a digest of the
source, the torch version and the CPU's instruction-set flags, because the build targets the CPU it
runs on (-march=native). Set ATTNMASK_NATIVE=0 to use the Python kernel only. Without a C++ compiler
the build fails once, with one warning, and the Python kernel runs every call.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("blocksparse.cpp")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode())
    return f"attnmask_blocksparse_{digest.hexdigest()[:12]}"


def enabled() -> bool:
    return os.environ.get("ATTNMASK_NATIVE", "1") != "0"


@functools.cache
def kernel():
    """The compiled module (with `attend`), or None when it is switched off or cannot be built."""
    if not enabled():
        return None
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        try:  # the `ninja` package's binary, also where its directory is not on PATH (no venv activated)
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
        return load(extension_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, no BLAS symbol: the Python kernel still works
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"attnmask: the C++ block-sparse kernel could not be built ({first}); "
                      "using the Python kernel", RuntimeWarning, stacklevel=2)
        return None
    finally:
        os.environ["PATH"] = path


def usable(query: torch.Tensor, dropout: float, extra, needs_grad: bool) -> bool:
    """Whether a call can run in the C++ kernel: float32 on the CPU, inference, no dropout, no extra term."""
    return (query.device.type == "cpu" and query.dtype == torch.float32 and not needs_grad and dropout == 0
            and extra is None and kernel() is not None)
