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
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from attnmask.errors import AttnmaskError
from attnmask.models.fairseq_safe_load import MAX_ITEMS, NotALiteral, allow_fairseq_globals, literal_value
from attnmask.store.stores import sha256_hex

BIN = Path(sys.executable).parent
PLUGIN = Path(__file__).resolve().parents[1] / "attnmask" / "models" / "fairseq_plugin"
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
    from attnmask.tasks.translate import make_reverse_task, train_fairseq

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
    payload = f"__import__('pathlib').Path({str(ran)!r}).touch()"
    eval(payload)  # what fairseq's eval_str_list did with it
    assert ran.exists()
    ran.unlink()
    evil = crafted(checkpoint, tmp_path / "evil.pt", "adaptive_softmax_cutoff", payload)
    for name, argv in entry_points(evil, data, tmp_path).items():
        r = run(argv, tmp_path)
        output = r.stdout + r.stderr
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert r.returncode != 0, (name, output[-2000:])
        assert "Traceback" not in output, (name, output[-3000:])
        assert len(errors) == 1 and "not a Python literal" in errors[0], (name, output[-2000:])
        assert not ran.exists(), name
    assert not (tmp_path / "patterns.zarr").exists()


def test_stock_cli_refuses_a_pickle_that_runs_code_on_one_line(fairseq_run, tmp_path):
    """The weights-only refusal (a global a checkpoint does not need) is one line in the stock CLIs too."""
    import pickle

    data, checkpoint = fairseq_run
    ran = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    allow_fairseq_globals()
    state = torch.load(checkpoint, weights_only=True)
    state["extra_state"]["best"] = Exploit()
    torch.save(state, tmp_path / "evil.pt", pickle_module=pickle)
    r = run([str(BIN / "fairseq-generate"), str(data), "--path", str(tmp_path / "evil.pt"), "--cpu"], tmp_path)
    output = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: refusing to unpickle the checkpoint: unsupported GLOBAL posix.system, which a fairseq checkpoint "
        "does not need"]
    assert not ran.exists()


@pytest.mark.parametrize("field", EVALUATED_FIELDS)
def test_attnmask_error_names_the_field(fairseq_run, tmp_path, field):
    from attnmask.tasks.translate import load_translation_model

    data, checkpoint = fairseq_run
    ran = tmp_path / "ran"
    evil = crafted(checkpoint, tmp_path / "evil.pt", field, f"__import__('pathlib').Path({str(ran)!r}).touch()")
    with pytest.raises(AttnmaskError, match=rf"cfg\.model\.{field} holds .*not a Python literal"):
        load_translation_model(evil, data)
    assert not ran.exists()


def test_literal_values_still_load(fairseq_run, tmp_path):
    """A literal in such a field is evaluated as fairseq would (here: the attention's xformers setting
    written as the literal None)."""
    from attnmask.tasks.translate import load_translation_model

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
        from attnmask.models.fairseq_safe_load import literal_value, NotALiteral
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
    from attnmask.models.fairseq_attention import import_fairseq

    fairseq = import_fairseq()
    assert fairseq.utils.eval is literal_value
    with pytest.raises(NotALiteral):
        fairseq.utils.eval_str_list("__import__('os').getpid()", type=int)


# ----------------------------------------------------------------------------------------------
# Items 2 and 6: the C++ kernel's build folder, its recorded sha256, its lock

from attnmask.runtime import native  # noqa: E402

TINY_EXTENSION = """
#include <Python.h>
static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "%(name)s", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_%(name)s(void) { return PyModule_Create(&definition); }
"""
CONSTRUCTOR = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%(mark)s", "w"); if (f) fclose(f); }
"""


def compile_c(source: str, out: Path, *flags: str) -> Path:
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    c = out.with_name(out.name + ".c")
    c.write_text(source)
    subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", str(out), str(c)], check=True, capture_output=True)
    c.unlink()
    return out


@pytest.fixture()
def kernels(tmp_path, monkeypatch):
    """(root, name, compiles): builds go to tmp_path/kernels under a name of this test's own; _compile
    builds a tiny real Python extension (plus the leftovers a torch build has) and counts its calls."""
    import sysconfig

    root, name, compiles = tmp_path / "kernels", f"attnmask_test_{tmp_path.name.replace('-', '_')}", []

    def tiny_compile(module_name, staging):
        compiles.append(staging)
        (staging / "build.ninja").write_text("")
        (staging / "lock").write_text("")
        compile_c(TINY_EXTENSION % {"name": module_name}, staging / f"{module_name}.so",
                  f"-I{sysconfig.get_paths()['include']}")
        return native._import(module_name, staging / f"{module_name}.so")

    monkeypatch.setenv("ATTNMASK_NATIVE_DIR", str(root))
    monkeypatch.setenv("ATTNMASK_NATIVE", "1")
    monkeypatch.setattr(native, "extension_name", lambda: name)
    monkeypatch.setattr(native, "_compile", tiny_compile)
    native.kernel.cache_clear()
    yield root, name, compiles
    native.kernel.cache_clear()


def kernel_warnings() -> tuple[object, list[str]]:
    native.kernel.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = native.kernel()
    return module, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_build_records_the_binarys_sha256_and_loads_verify_it(kernels):
    root, name, compiles = kernels
    module, said = kernel_warnings()
    folder = root / name
    library = native.binary(folder)
    assert said == [] and len(compiles) == 1 and module.__name__ == name and Path(module.__file__) == library
    assert sorted(p.name for p in folder.iterdir()) == [f"{name}.so", f"{name}.so.sha256"]  # no leftovers
    assert native.record(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    assert not list(root.glob(f"{name}.build-*"))
    again, said = kernel_warnings()  # a later process: loaded, verified, not rebuilt
    assert said == [] and len(compiles) == 1 and Path(again.__file__) == library


def plant(root: Path, name: str, mark: Path, how: str) -> Path:
    """A shared object with a constructor (it creates `mark` when loaded) where the build would be."""
    folder = root / name
    folder.mkdir(parents=True, mode=0o700)
    library = native.binary(folder)
    if how == "link to a file elsewhere":
        library.symlink_to(compile_c(CONSTRUCTOR % {"mark": mark}, root / "elsewhere.so"))
    else:
        compile_c(CONSTRUCTOR % {"mark": mark}, library)
    if how == "another binary's sha256":
        native.record(library).write_text(hashlib.sha256(b"the real build").hexdigest() + "\n")
    elif how == "sha256 record is a FIFO":  # reading it would wait forever
        os.mkfifo(native.record(library))
    elif how != "no sha256 recorded":
        native.record(library).write_text(sha256_hex(library) + "\n")
    if how == "folder writable by others":
        folder.chmod(0o777)
    return library


@pytest.mark.parametrize("how", ["no sha256 recorded", "another binary's sha256", "folder writable by others",
                                 "link to a file elsewhere", "sha256 record is a FIFO"])
def test_planted_binary_is_never_loaded(kernels, tmp_path, how):
    root, name, compiles = kernels
    mark = tmp_path / "constructor-ran"
    library = plant(root, name, mark, how)
    module, said = kernel_warnings()
    assert module is None and not mark.exists() and compiles == []
    assert len(said) == 1 and said[0].startswith("attnmask: not loading the C++ block-sparse kernel"), said
    assert not native.usable(torch.zeros(1, 1, 4, 8), 0.0, None, needs_grad=False)  # the Python kernel runs
    loaded = run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], tmp_path)
    assert loaded.returncode == 0 and mark.exists()  # it would have run code had it been loaded


def test_stale_lock_of_a_killed_build_does_not_hold_the_next(kernels, tmp_path):
    """A build killed with -9 leaves NAME.lock (naming a dead pid) and its NAME.build-PID folder with
    torch's own `lock` file: the next process builds at once, without a warning, and removes it."""
    root, name, compiles = kernels
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dying = root / f"{name}.build-{dead.pid}"
    dying.mkdir(parents=True)
    (dying / "lock").write_text("")
    (dying / "blocksparse.o").write_bytes(b"half an object")
    (root / f"{name}.lock").write_text(f"{dead.pid}\n")
    module, said = kernel_warnings()
    assert module is not None and said == [] and len(compiles) == 1
    assert not dying.exists() and native.trust_problem(root / name) is None


def test_live_builder_is_announced_and_waited_for_a_bounded_time(kernels, monkeypatch):
    root, name, compiles = kernels
    monkeypatch.setenv("ATTNMASK_NATIVE_WAIT", "0.5")
    root.mkdir(parents=True)
    with open(root / f"{name}.lock", "w") as held:  # another open file: flock excludes it like a process
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        module, said = kernel_warnings()
    assert module is None and compiles == []
    assert said == [f"attnmask: process 4242 is building the C++ block-sparse kernel ({root / name}.lock); "
                    "waiting up to 0.5 s for it",
                    "attnmask: process 4242 is still building the C++ block-sparse kernel after 0.5 s; "
                    "using the Python kernel"]


def test_waiter_loads_the_build_another_process_finished(kernels):
    import threading

    root, name, compiles = kernels
    root.mkdir(parents=True)
    taken = threading.Event()

    def other_builder():
        with native.build_lock(root, name):
            taken.set()
            time.sleep(0.5)
            native.build(root, name)

    builder = threading.Thread(target=other_builder)
    builder.start()
    taken.wait(10)
    module, said = kernel_warnings()
    builder.join()
    assert module is not None and Path(module.__file__) == native.binary(root / name)
    assert len(compiles) == 1 and len(said) == 1 and "is building" in said[0]


def test_real_build_killed_mid_way_then_built_verified(tmp_path):
    """The real C++ build, killed with -9 while it compiles, then run again: the second run builds without
    waiting, records the sha256, and never looks at torch's extension cache (where a planted binary lies)."""
    root, torch_cache, mark = tmp_path / "kernels", tmp_path / "torch_extensions", tmp_path / "constructor-ran"
    name = native.extension_name()
    (torch_cache / name).mkdir(parents=True)
    compile_c(CONSTRUCTOR % {"mark": mark}, torch_cache / name / f"{name}.so")
    env = {"ATTNMASK_NATIVE_DIR": str(root), "TORCH_EXTENSIONS_DIR": str(torch_cache), "ATTNMASK_NATIVE": "1",
           "PYTHONWARNINGS": "always"}
    script = "from attnmask.runtime import native; m = native.kernel(); print(m.__file__ if m else None)"
    first = subprocess.Popen([sys.executable, "-c", script], env={**environment(), **env}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(root.glob(f"{name}.build-*/build.ninja")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    os.killpg(first.pid, 9)  # the compiler too
    first.wait()
    assert list(root.glob(f"{name}.build-*")) and not (root / name).exists()  # killed mid-build
    second = run([sys.executable, "-c", script], tmp_path, timeout=900, **env)
    library = native.binary(root / name)
    assert second.returncode == 0 and second.stdout.strip() == str(library), second.stderr[-2000:]
    assert "RuntimeWarning" not in second.stderr, second.stderr[-2000:]
    assert native.record(library).read_text().strip() == sha256_hex(library)
    assert not list(root.glob(f"{name}.build-*")) and not mark.exists()


def test_checkouts_share_builds_by_source_not_by_path(tmp_path, monkeypatch):
    """Two checkouts of one source name one build (switching rebuilds nothing); another source gets a
    build of its own beside it, so switching back rebuilds nothing either."""
    name = native.extension_name()
    other = tmp_path / "other-checkout" / "blocksparse.cpp"
    other.parent.mkdir()
    other.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", other)
    assert native.extension_name() == name
    other.write_bytes(other.read_bytes() + b"\n// edited\n")
    assert native.extension_name() != name
