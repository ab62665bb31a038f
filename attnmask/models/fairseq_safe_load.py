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
`make install` writes into the environment's site-packages (`python -m attnmask.models.fairseq_safe_load
--install`): at interpreter start it installs an import hook that calls `allow_fairseq_globals()` right
after `fairseq.checkpoint_utils` is imported, so processes that never import fairseq pay only for this
module's import (a few milliseconds).

Config strings fairseq eval()s. fairseq turns some config strings into values with the builtin eval():
`utils.eval_str_list` / `eval_str_dict` / `eval_bool` (cfg.model.adaptive_softmax_cutoff, the attention's
xformers_att_config, ...) and direct `eval(cfg.adam_betas)`, `eval(args.encoder_layers)` and the like in
optimizers and models. A checkpoint's cfg is data, so a string there must not run code. The same import
hook therefore gives every fairseq module a module-level `eval` =
`literal_value`, which shadows the builtin for that module alone: it evaluates Python literals (and
+, -, *, /, //, % on them, for values such as fconv's "[(512, 3)] * 20", with at most MAX_ITEMS items in
a repeated sequence) and raises NotALiteral for anything else (a name, a call, an attribute, ...), before
any of it runs. This covers every eval in fairseq, whichever config field, data file or entry point
reaches it: attnmask's commands and the stock CLIs alike. In the stock CLIs, where fairseq does not
catch it, NotALiteral is printed as one `error:` line (exit status 1) instead of a traceback, and so is
a global the weights-only unpickler refused.
"""

from __future__ import annotations

import ast
import importlib.abc
import operator
import pickle
import sys
import types
from pathlib import Path

from attnmask.errors import AttnmaskError

HOOKED_MODULE = "fairseq.checkpoint_utils"
GUARDED_PACKAGES = ("fairseq", "fairseq_cli")
MAX_ITEMS = 1_000_000  # the longest sequence a repetition such as "[0] * n" may build
PTH_NAME = "attnmask-fairseq-safe-load.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('attnmask') and "
            "__import__('attnmask.models.fairseq_safe_load', fromlist=['_']).install_import_hook()\n")


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


class NotALiteral(AttnmaskError, ValueError):
    """fairseq was about to eval() a string that is not a Python literal; `source` is that string."""

    def __init__(self, source, why: str):
        shown = repr(source if len(str(source)) <= 120 else str(source)[:117] + "...")
        super().__init__(f"refusing to eval() {shown}: fairseq evaluates this config value, and it is not a "
                         f"Python literal ({why})")
        self.source = source


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_SEQUENCES = (str, bytes, tuple, list)


def literal_value(source, globals=None, locals=None):
    """eval(source) where `source` is a Python literal, else NotALiteral (nothing of it runs).

    Literals: constants, tuples, lists, sets, dicts of literals, unary + and - on numbers, the six
    arithmetic operators + - * / // % on numbers, + of two sequences of one type and * of a sequence by
    an int (at most MAX_ITEMS items). `globals` and `locals` are accepted, as eval's, and ignored: a
    literal names nothing. Like eval, anything but a string raises TypeError (fairseq's eval_bool
    relies on it)."""
    if not isinstance(source, (str, bytes)):
        raise TypeError("eval() arg 1 must be a string, bytes or code object")
    text = source.decode() if isinstance(source, bytes) else source
    try:
        tree = ast.parse(text.lstrip(" \t"), mode="eval")
        return _literal(tree.body, source)
    except NotALiteral:
        raise
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as e:
        raise NotALiteral(source, f"{type(e).__name__}: {e}") from None


def _literal(node: ast.AST, source):
    """The value of the literal expression `node` (see literal_value)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal(item, source) for item in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, source): _literal(v, source) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _literal(node.operand, source)
        if _is_number(value):
            return +value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _combine(node.op, _literal(node.left, source), _literal(node.right, source), source)
    part = node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node
    raise NotALiteral(source, f"{type(part).__name__} is not allowed in one")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, complex))


def _combine(op: ast.operator, left, right, source):
    """left op right for two numbers, two sequences of one type (+) or a sequence and an int (*)."""
    if _is_number(left) and _is_number(right):
        return _ARITHMETIC[type(op)](left, right)
    if isinstance(op, ast.Add) and isinstance(left, _SEQUENCES) and type(left) is type(right):
        if len(left) + len(right) <= MAX_ITEMS:
            return left + right
        raise NotALiteral(source, f"more than {MAX_ITEMS} items")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, _SEQUENCES):
        left, right = right, left
    if isinstance(op, ast.Mult) and isinstance(left, _SEQUENCES) and isinstance(right, int):
        if len(left) * max(right, 0) <= MAX_ITEMS:
            return left * right
        raise NotALiteral(source, f"more than {MAX_ITEMS} items")
    raise NotALiteral(source, f"{type(left).__name__} {type(op).__name__} {type(right).__name__}")


def is_guarded(name: str) -> bool:
    """Whether module `name` belongs to fairseq (whose eval() calls literal_value replaces)."""
    return name.split(".")[0] in GUARDED_PACKAGES


def guard_module(module: types.ModuleType) -> None:
    """Shadow the builtin eval with literal_value in the fairseq module `module`, unless it defines an
    eval of its own (a module that never calls eval is unaffected either way)."""
    vars(module).setdefault("eval", literal_value)


def refusal_line(error: BaseException) -> str | None:
    """The one line for a refusal of this module's (NotALiteral, a global the weights-only unpickler
    refused), or None for any other error."""
    if isinstance(error, NotALiteral):
        return f"error: {error}"
    if isinstance(error, pickle.UnpicklingError) and refused_global(error):
        return (f"error: refusing to unpickle the checkpoint: unsupported GLOBAL {refused_global(error)}, which a "
                "fairseq checkpoint does not need")
    return None


def _print_refusal_on_one_line(previous):
    """A sys.excepthook: refusal_line's errors as one line (the interpreter then exits with status 1)."""

    def excepthook(kind, error, traceback):
        line = refusal_line(error)
        if line is not None:
            sys.stderr.write(line + "\n")
        else:
            previous(kind, error, traceback)

    excepthook.attnmask_refusals = True
    return excepthook


def _after_import(name: str) -> None:
    """What follows the import of fairseq module `name`: the allow-list, one-line refusals."""
    if name == HOOKED_MODULE:
        allow_fairseq_globals()
    if name == "fairseq" and not getattr(sys.excepthook, "attnmask_refusals", False):
        sys.excepthook = _print_refusal_on_one_line(sys.excepthook)


class _FairseqGuard(importlib.abc.MetaPathFinder):
    """Guards each fairseq module as it is executed: guard_module before, _after_import after."""

    def find_spec(self, fullname, path, target=None):
        if not is_guarded(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def execute_guarded(module):
            guard_module(module)
            execute(module)
            _after_import(fullname)

        loader.exec_module = execute_guarded
        return spec


def install_import_hook() -> None:
    """Guard fairseq: every fairseq module imported from now on (see the module docstring), and those
    already imported."""
    if any(isinstance(f, _FairseqGuard) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FairseqGuard())
    for name, module in list(sys.modules.items()):
        if is_guarded(name):
            guard_module(module)
            _after_import(name)


def install_pth(site_packages: str | Path | None = None) -> Path:
    """Write PTH_NAME into `site_packages` (default: this interpreter's purelib folder)."""
    import sysconfig

    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(PTH_LINE)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m attnmask.models.fairseq_safe_load --install")
    print(f"wrote {install_pth()}")
