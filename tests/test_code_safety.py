"""Issue 25, items 1, 2 and 6: no code from a checkpoint's config, no planted kernel, no hang on a stale
build lock.

* fairseq eval()s some config strings; a checkpoint that passes the weights-only allow-list but holds an
  expression there is refused, with one error line, by every entry point (attnmask's commands and the
  stock CLIs through the .pth hook), and the expression never runs.
* The C++ kernel is built into a folder of this environment with its sha256 beside it; a binary that
  does not match is never loaded.
* A build killed mid-way leaves nothing that makes a later call wait.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.fairseq_safe_load import MAX_ITEMS, NotALiteral, allow_fairseq_globals, literal_value

BIN = Path(sys.executable).parent
PLUGIN = Path(__file__).resolve().parents[1] / "attnmask" / "fairseq_plugin"
TINY = ("--arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 8 --decoder-embed-dim 8 "
        "--encoder-ffn-embed-dim 8 --decoder-ffn-embed-dim 8 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2 --share-all-embeddings --optimizer adam --lr 0.005 --max-tokens 500 "
        "--criterion cross_entropy --no-epoch-checkpoints --no-progress-bar --cpu --seed 1 --num-workers 0 "
        "--max-update 1 --disable-validation")


def environment() -> dict:
    """This venv's commands first, one thread, no GPU."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def run(argv: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env={**environment(), **env}, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Item 1: config strings fairseq eval()s


@pytest.fixture(scope="module")
def fairseq_run(tmp_path_factory):
    """(data-bin, a 1-update checkpoint of a tiny Transformer) trained by attnmask's fairseq-train."""
    pytest.importorskip("fairseq")
    from attnmask.translate import make_reverse_task, train_fairseq

    root = tmp_path_factory.mktemp("code_safety")
    data = make_reverse_task(root / "task", vocab=8, train=40, valid=10, test=10, min_length=3, max_length=6)
    train_fairseq(data, None, TINY.split() + ["--save-dir", str(root / "ck")])
    return data, root / "ck" / "checkpoint_last.pt"


def crafted(checkpoint: Path, out: Path, field: str, value: str) -> Path:
    """`checkpoint` with cfg.model.<field> = value, saved as `out`: still only allow-listed globals."""
    allow_fairseq_globals()
    state = torch.load(checkpoint, weights_only=True)
    setattr(state["cfg"]["model"], field, value)
    torch.save(state, out)
    torch.load(out, weights_only=True)  # passes the weights-only allow-list
    return out


def entry_points(checkpoint: Path, data: Path, tmp: Path) -> dict[str, list[str]]:
    return {"attnmask eval fairseq": [str(BIN / "attnmask"), "eval", "fairseq", str(checkpoint), str(data)],
            "attnmask collect": [str(BIN / "attnmask"), "collect", str(checkpoint), str(data),
                                 "--out", str(tmp / "patterns.zarr")],
            "fairseq-generate": [str(BIN / "fairseq-generate"), str(data), "--path", str(checkpoint), "--cpu",
                                 "--beam", "1"],
            "fairseq-validate": [str(BIN / "fairseq-validate"), str(data), "--path", str(checkpoint), "--cpu",
                                 "--batch-size", "4", "--user-dir", str(PLUGIN), "--task", "attnmask_translation"]}


# fields a tiny Transformer's build eval()s: the decoder's output projection (utils.eval_str_list) and
# every MultiheadAttention (utils.eval_str_dict)
EVALUATED_FIELDS = ["adaptive_softmax_cutoff", "encoder_xformers_att_config"]


def test_expression_in_an_evaluated_config_field_never_runs(fairseq_run, tmp_path):
    """Every entry point: one `error:` line, a non-zero exit, no traceback, and the file the expression
    would create does not exist."""
    data, checkpoint = fairseq_run
    ran = tmp_path / "ran"
    evil = crafted(checkpoint, tmp_path / "evil.pt", "adaptive_softmax_cutoff",
                   f"__import__('pathlib').Path({str(ran)!r}).touch()")
    for name, argv in entry_points(evil, data, tmp_path).items():
        r = run(argv, tmp_path)
        output = r.stdout + r.stderr
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert r.returncode != 0, (name, output[-2000:])
        assert "Traceback" not in output, (name, output[-3000:])
        assert len(errors) == 1 and "not a Python literal" in errors[0], (name, output[-2000:])
        assert not ran.exists(), name
    assert not (tmp_path / "patterns.zarr").exists()


@pytest.mark.parametrize("field", EVALUATED_FIELDS)
def test_attnmask_error_names_the_field(fairseq_run, tmp_path, field):
    from attnmask.translate import load_translation_model

    data, checkpoint = fairseq_run
    ran = tmp_path / "ran"
    evil = crafted(checkpoint, tmp_path / "evil.pt", field, f"__import__('pathlib').Path({str(ran)!r}).touch()")
    with pytest.raises(AttnmaskError, match=rf"cfg\.model\.{field} holds .*not a Python literal"):
        load_translation_model(evil, data)
    assert not ran.exists()


def test_literal_values_still_load(fairseq_run, tmp_path):
    """A literal in such a field is evaluated as fairseq would (here: the attention's xformers setting
    written as the literal None)."""
    from attnmask.translate import load_translation_model

    data, checkpoint = fairseq_run
    plain = crafted(checkpoint, tmp_path / "plain.pt", "encoder_xformers_att_config", "None")
    task, model, *_ = load_translation_model(plain, data)
    assert not model.encoder.layers[0].self_attn.use_xformers


def test_literal_value_is_eval_for_literals():
    cases = {"[0.9, 0.98]": [0.9, 0.98], "(0.9,0.999)": (0.9, 0.999), "  1e-8": 1e-8, "10000,50000": (10000, 50000),
             "True": True, "None": None, "-3": -3, "{'a': [1, 2]}": {"a": [1, 2]}, "{1, 2}": {1, 2},
             "[(512, 3)] * 20": [(512, 3)] * 20, "[(512, 3)] * 2 + [(256, 3)]": [(512, 3)] * 2 + [(256, 3)],
             "3 * [1]": [1, 1, 1], "1 / 4": 0.25, b"[1]": [1]}
    for source, value in cases.items():
        assert literal_value(source) == value == eval(source), source
    with pytest.raises(TypeError):  # as eval: fairseq's eval_bool(True) relies on it
        literal_value(True)


@pytest.mark.parametrize("source", ["__import__('os').system('true')", "open('/etc/passwd')", "x", "(1).real",
                                    "lambda: 1", "[i for i in (1, 2)]", "[*[1]]", "{**{}}", "1 if 1 else 2",
                                    "2 ** 10", "'%s' % 1", "1 / 0", "[0] * 10 ** 9", f"[0] * {MAX_ITEMS + 1}",
                                    "'a' * 9999999999", "(", "x.y[0]"])
def test_literal_value_refuses_everything_else(source):
    with pytest.raises(NotALiteral, match="not a Python literal"):
        literal_value(source)


def test_every_fairseq_eval_is_guarded_in_a_stock_process(tmp_path):
    """In a fresh interpreter of this environment (the .pth hook, as the stock CLIs run), every fairseq
    module that calls eval() gets literal_value, the helpers included, and refuses an expression."""
    pytest.importorskip("fairseq")
    script = textwrap.dedent("""
        import importlib
        import fairseq, fairseq.utils as u, fairseq.options as o
        from attnmask.fairseq_safe_load import literal_value, NotALiteral
        for name in ["fairseq.utils", "fairseq.optim.adam", "fairseq.optim.adamax", "fairseq.models.fconv",
                     "fairseq.models.lightconv_lm", "fairseq.models.wav2vec.wav2vec2", "fairseq.criterions.ctc",
                     "fairseq.data.codedataset", "fairseq.data.audio.raw_audio_dataset"]:
            try:
                module = importlib.import_module(name)
            except ImportError:  # an optional dependency of that module is missing
                continue
            assert module.eval is literal_value, name
        assert u.eval_str_list("[0.9, 0.98]") == [0.9, 0.98] and o.eval_bool("True") and not o.eval_bool(True)
        for call in (lambda: u.eval_str_list("__import__('os').getpid()"), lambda: o.eval_bool("open('x')"),
                     lambda: u.eval_str_dict("{'a': __import__('os')}")):
            try:
                call()
            except NotALiteral:
                continue
            raise SystemExit("ran")
        print("guarded")
    """)
    r = run([sys.executable, "-c", script], tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("guarded"), r.stderr[-2000:]
    assert "eval" not in vars(__import__("json"))  # modules outside fairseq keep the builtin


def test_fairseq_imported_before_the_hook_is_guarded_too():
    """This process imported fairseq (maybe before attnmask): import_fairseq guards what is loaded."""
    pytest.importorskip("fairseq")
    from attnmask.models.fairseq import import_fairseq

    fairseq = import_fairseq()
    assert fairseq.utils.eval is literal_value
    with pytest.raises(NotALiteral):
        fairseq.utils.eval_str_list("__import__('os').getpid()", type=int)
