"""Hardening, round two (project issue 25, items 3-5 and 7-11; issue 26 item 7's empty patterns/ folder
and 0600 model files): run folders that --overwrite may replace, saves killed half-way, bounded lock
waits, store metadata that drives allocation, non-finite models, and tracebacks turned into one line.
Every test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.errors import AttnmaskError
from attnmask.store.stores import check_output, read_patterns, write_patterns
from scale_helpers import REPO
from test_store_hardening import KILLED, edition, stamp

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def script(code: str, *args, env: dict | None = None, timeout: float = 120, memory: int | None = None):
    """Run `code` in a fresh Python (with at most `memory` bytes of address space when given)."""
    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def one_error_line(result, *needles: str) -> str:
    """A CliRunner result or a finished process: exit 1 and exactly one `error:` line holding every needle."""
    if isinstance(result, subprocess.CompletedProcess):
        code, text = result.returncode, result.stderr + result.stdout
    else:
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        code, text = result.exit_code, result.output
    assert code == 1, text
    lines = [line for line in text.strip().splitlines() if not line.startswith("attnmask: waiting")]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# item 7: a flock held by another process is waited for a bounded time, naming the holder

FLOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(300)
"""

WRITE_OR_READ = """
import sys
from attnmask.errors import AttnmaskError
from attnmask.store.stores import read_patterns, write_patterns
from test_store_hardening import edition, stamp
try:
    if sys.argv[2] == "write":
        write_patterns(sys.argv[1], edition(1), stamp(1), overwrite=True)
    else:
        read_patterns(sys.argv[1])
except AttnmaskError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("held, action", [("shared", "write"), ("exclusive", "read")])
def test_a_foreign_flock_on_a_store_is_waited_for_a_bounded_time_and_named(tmp_path, held, action):
    """Another user's reader (a shared flock on the folder) used to make a writer wait forever without a
    word; a foreign exclusive flock did the same to readers. Now: a notice naming the holder, then one
    error line after $ATTNMASK_LOCK_TIMEOUT seconds, and the store is untouched."""
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    holder = subprocess.Popen([sys.executable, "-c", FLOCK_HOLDER, str(out), held], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        r = script(WRITE_OR_READ, out, action, env={"ATTNMASK_LOCK_TIMEOUT": "3"}, timeout=60)
        assert time.monotonic() - started < 50
        one_error_line(r, f"process {holder.pid}", "gave up after 3 s", "ATTNMASK_LOCK_TIMEOUT")
        assert f"waiting for process {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert read_patterns(out).attrs["edition"] == 0


def test_a_bad_lock_timeout_is_one_error_line(tmp_path, monkeypatch):
    from attnmask.store.locking import lock_timeout

    monkeypatch.setenv("ATTNMASK_LOCK_TIMEOUT", "soon")
    with pytest.raises(AttnmaskError, match="ATTNMASK_LOCK_TIMEOUT must be a number"):
        lock_timeout()


# ----------------------------------------------------------------------------------------------
# item 8: store metadata cannot make a reader hang or allocate what the store does not hold

def small_store(tmp_path: Path) -> Path:
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    return out


def set_shape(array_meta: Path, shape: list[int]) -> None:
    meta = json.loads(array_meta.read_text())
    meta["shape"] = shape
    array_meta.write_text(json.dumps(meta))


INSPECT = """
import sys
from typer.testing import CliRunner
from attnmask.cli import app
r = CliRunner().invoke(app, ["inspect", sys.argv[1]])
sys.stdout.write(r.output)
sys.exit(r.exit_code if r.exception is None or isinstance(r.exception, SystemExit) else 3)
"""


def test_a_fifo_as_zarr_json_is_refused_without_hanging(tmp_path):
    out = small_store(tmp_path)
    (out / "zarr.json").unlink()
    os.mkfifo(out / "zarr.json")
    r = script(INSPECT, out, timeout=60)  # it used to block forever in open()
    one_error_line(r, "not a regular file")


def test_a_fifo_inside_a_store_is_refused_without_hanging(tmp_path):
    out = small_store(tmp_path)
    meta = out / "encoder.self" / "count" / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    r = script(INSPECT, out, timeout=60)
    one_error_line(r, "not a regular file")


def test_dev_zero_as_zarr_json_is_one_error_line(tmp_path):
    out = small_store(tmp_path)
    (out / "zarr.json").unlink()
    (out / "zarr.json").symlink_to("/dev/zero")
    r = script(INSPECT, out, timeout=120, memory=2 << 30)  # it used to end in a MemoryError traceback
    one_error_line(r, "not a regular file")


def test_an_oversized_zarr_json_is_refused_unread(tmp_path):
    out = small_store(tmp_path)
    with open(out / "zarr.json", "r+") as fh:
        fh.seek(0, 2)
        fh.truncate(fh.tell() + (17 << 20))  # valid JSON followed by 17 MB of NULs
    one_error_line(CliRunner().invoke(app, ["inspect", str(out)]), "more than the 16 MB")


def test_claimed_shapes_beyond_the_recorded_sizes_are_refused_before_allocation(tmp_path):
    """The 8x8 store claims 6000x6000 planes (3.4 GB of sums): refused in a process allowed 2 GB, which
    used to end in a MemoryError traceback."""
    out = small_store(tmp_path)
    set_shape(out / "encoder.self" / "sum" / "zarr.json", [3, 4, 6000, 6000])
    set_shape(out / "encoder.self" / "count" / "zarr.json", [6000, 6000])
    r = script(INSPECT, out, timeout=120, memory=2 << 30)
    one_error_line(r, "6000 query positions", "max_length 8")


def test_claimed_layers_beyond_the_recorded_ones_are_refused(tmp_path):
    out = small_store(tmp_path)
    set_shape(out / "encoder.self" / "sum" / "zarr.json", [300, 4, 8, 8])
    one_error_line(CliRunner().invoke(app, ["inspect", str(out)]), "site encoder.self array sum",
                   "records [3x4x8x8]")


def test_claims_beyond_the_machines_memory_are_refused(tmp_path, monkeypatch):
    import attnmask.store.stores as store

    out = small_store(tmp_path)
    monkeypatch.setattr(store, "memory_bytes", lambda: 4096)
    with pytest.raises(AttnmaskError, match="of this machine's memory"):
        read_patterns(out)


# ----------------------------------------------------------------------------------------------
# item 11: a local write killed between its two renames is rolled back on the next access

def test_a_swap_killed_between_the_renames_is_rolled_back_on_the_next_read(tmp_path):
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    r = script(KILLED, out, "moved-aside")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()
    assert read_patterns(out).attrs["edition"] == 0  # it used to say the store does not exist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_a_plain_rerun_after_a_killed_swap_is_refused_before_the_work(tmp_path):
    out = tmp_path / "p.zarr"
    write_patterns(out, edition(0), stamp(0))
    assert script(KILLED, out, "moved-aside").returncode == -signal.SIGKILL
    with pytest.raises(AttnmaskError, match="already exists"):  # it used to pass, and fail after the work
        check_output(out, overwrite=False)
    assert read_patterns(out).attrs["edition"] == 0


# ----------------------------------------------------------------------------------------------
# items 3 and 4: --overwrite replaces only attnmask runs, builds the new run beside the old one, swaps at the end

from test_train import labelled_csv, settings, tiny_model  # noqa: E402,F401 - the tiny BERT and labelled data


def train_run(tiny_model, labelled_csv, out, **kw):  # noqa: F811
    from attnmask.tasks.classify import train

    return train(settings(tiny_model, labelled_csv, out, limit=40, epochs=1, **kw))


def entries(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name: bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_merely_looks_like_a_run(tiny_model, labelled_csv, tmp_path):  # noqa: F811
    """A folder with a checkpoint/ folder and a settings.json (but no marker a run wrote) used to be removed
    whole, the user's other files with it."""
    out = tmp_path / "mine"
    (out / "checkpoint").mkdir(parents=True)
    (out / "settings.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    before = entries(out)
    with pytest.raises(AttnmaskError, match="not an attnmask training run"):
        train_run(tiny_model, labelled_csv, out, overwrite=True)
    assert entries(out) == before and (out / "checkpoint").is_dir()


def test_overwrite_refuses_a_run_holding_files_it_did_not_write(tiny_model, labelled_csv, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_run(tiny_model, labelled_csv, out)
    assert json.loads((out / "attnmask-run.json").read_text())["state"] == "finished"
    (out / "notes.txt").write_text("mine")
    before = entries(out)
    with pytest.raises(AttnmaskError, match="holds notes.txt, which the run did not write"):
        train_run(tiny_model, labelled_csv, out, overwrite=True)
    assert entries(out) == before


class Interrupt(Exception):
    pass


def stop_at(n: int):
    def progress(step, total, loss, epoch):
        if step == n:
            raise Interrupt

    return progress


def test_an_overwrite_killed_midway_leaves_the_old_run_whole(tiny_model, labelled_csv, tmp_path,  # noqa: F811
                                                               monkeypatch):
    """The old run used to be removed before training began: a run killed midway left neither. Now the
    new run is built in .run.next; the old one stays as it was until the new one is complete; --resume
    continues the replacement, and the finished replacement is swapped in."""
    from attnmask.tasks.classify import train

    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 2)
    out = tmp_path / "run"
    train_run(tiny_model, labelled_csv, out)
    old = entries(out)
    with pytest.raises(Interrupt):
        train(settings(tiny_model, labelled_csv, out, limit=40, epochs=2, lr=1e-3, overwrite=True),
              progress=stop_at(3))
    assert entries(out) == old  # the old run, untouched
    staged = tmp_path / ".run.next"
    assert (staged / "checkpoint" / "checkpoint-2").is_dir()
    with pytest.raises(AttnmaskError, match="--resume or --overwrite"):
        train(settings(tiny_model, labelled_csv, out, limit=40, epochs=2, lr=1e-3))
    resumed = train(settings(tiny_model, labelled_csv, out, limit=40, epochs=2, lr=1e-3, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == resumed["steps"]
    assert json.loads((out / "settings.json").read_text())["settings"]["lr"] == 1e-3


KILLED_TRAIN = """
import os, signal, sys
import attnmask.tasks.trainer
from attnmask.tasks.classify import TrainSettings, train

def die(step, *_):
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

attnmask.tasks.trainer.CHECKPOINT_EVERY = 2
train(TrainSettings(model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], limit=40, epochs=2, lr=1e-3, batch_size=8,
                    max_length=16, device="cpu", overwrite=True), progress=die)
"""


def test_an_overwrite_killed_by_sigkill_leaves_the_old_run_and_resumes(tiny_model, labelled_csv,  # noqa: F811
                                                                       tmp_path):
    from attnmask.tasks.classify import train

    out = tmp_path / "run"
    train_run(tiny_model, labelled_csv, out)
    old = entries(out)
    r = script(KILLED_TRAIN, tiny_model, labelled_csv, out, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert entries(out) == old
    train(settings(tiny_model, labelled_csv, out, limit=40, epochs=2, lr=1e-3, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "settings.json").read_text())["settings"]["lr"] == 1e-3


def test_an_overwrite_killed_between_its_renames_is_completed(tiny_model, labelled_csv, tmp_path,  # noqa: F811
                                                              monkeypatch):
    from attnmask.tasks.trainer import RunFolder

    out = tmp_path / "run"
    train_run(tiny_model, labelled_csv, out)
    rename = os.rename

    def die_after_moving_aside(src, dst):
        rename(src, dst)
        if ".old-" in str(dst):
            raise Interrupt

    monkeypatch.setattr(os, "rename", die_after_moving_aside)
    with pytest.raises(Interrupt):
        train_run(tiny_model, labelled_csv, out, lr=1e-3, overwrite=True)
    monkeypatch.setattr(os, "rename", rename)
    assert not out.exists()
    RunFolder(out)  # the next use of the output completes the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "settings.json").read_text())["settings"]["lr"] == 1e-3


def test_overwrite_of_a_finished_run_replaces_it_and_leaves_nothing_beside(tiny_model, labelled_csv,  # noqa: F811
                                                                            tmp_path):
    out = tmp_path / "run"
    train_run(tiny_model, labelled_csv, out)
    train_run(tiny_model, labelled_csv, out, lr=1e-3, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "settings.json").read_text())["settings"]["lr"] == 1e-3
    assert not (out / "checkpoint").exists()


# ----------------------------------------------------------------------------------------------
# item 5: a save with masks cut short leaves a folder attnmask.load_model reads (the old save or the new)

def masked_saves(tmp_path: Path):
    """(model, folder, first store, second store, first weights): a tiny BERT classifier saved once with the
    first masks applied (and its first parameter then), and a second, different store applied now with
    other weights (the next save writes them)."""
    import attnmask
    from test_masks_travel import random_store, tiny_classifier

    model, _ = tiny_classifier(tmp_path / "tok")
    first, second = random_store(tmp_path / "a.zarr", seed=0), random_store(tmp_path / "b.zarr", seed=1)
    folder = tmp_path / "saved"
    handle = attnmask.apply_masks(model, first)
    model.save_pretrained(folder)
    handle.remove()
    saved = next(model.parameters()).detach().clone()
    with torch_no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the second save's weights differ from the first's
    attnmask.apply_masks(model, second)
    return model, folder, first, second, saved


def torch_no_grad():
    import torch

    return torch.no_grad()


def loaded(folder: Path):
    import attnmask
    from transformers import BertForSequenceClassification

    model = attnmask.load_model(folder, model_class=BertForSequenceClassification)
    return model._attnmask_handle.store.digest, next(model.parameters()).detach().clone()


def test_a_save_cut_short_before_its_masks_leaves_the_old_save(tmp_path, monkeypatch):
    """The weights and the config used to be written into the folder before the masks: cut there, the
    folder held new weights whose config named masks it did not hold, and load_model refused it."""
    import attnmask.runtime.saving as runtime

    model, folder, first, second, old_weight = masked_saves(tmp_path)

    def cut(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(runtime, "save_masks_into", cut)
    with pytest.raises(Killed):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert (folder / ".attnmask-saving").is_dir()  # as a kill leaves it
    digest, weight = loaded(folder)
    assert digest == first.digest and bool((weight == old_weight).all())
    assert sorted(p.name for p in folder.iterdir()) == ["attnmask-masks.zarr", "config.json", "model.safetensors"]


def test_a_save_cut_short_while_moving_in_is_completed_by_the_next_load(tmp_path, monkeypatch):
    import attnmask.runtime.saving as runtime

    model, folder, first, second, _ = masked_saves(tmp_path)
    new_weight = next(model.parameters()).detach().clone()
    move, moves = runtime._move_in, []

    def cut_after_one(src, dst):
        if moves:
            raise Killed
        moves.append(dst)
        move(src, dst)

    monkeypatch.setattr(runtime, "_move_in", cut_after_one)
    with pytest.raises(Killed):
        model.save_pretrained(folder)
    monkeypatch.undo()
    digest, weight = loaded(folder)
    assert digest == second.digest and bool((weight == new_weight).all())
    assert sorted(p.name for p in folder.iterdir()) == ["attnmask-masks.zarr", "config.json", "model.safetensors"]


class Killed(BaseException):
    """Stands for a kill: no `except Exception` cleans up after it."""


def test_a_failed_save_leaves_the_old_save_and_nothing_else(tmp_path, monkeypatch):
    import attnmask.runtime.saving as runtime

    model, folder, first, second, old_weight = masked_saves(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "save_masks_into", disk_full)
    with pytest.raises(OSError):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["attnmask-masks.zarr", "config.json", "model.safetensors"]
    digest, weight = loaded(folder)
    assert digest == first.digest and bool((weight == old_weight).all())


def test_a_save_with_masks_replaces_the_older_weights_format(tmp_path):
    """A folder saved before as pytorch_model.bin gets the new model.safetensors and loses the old weights
    (transformers' own save removes them too), nothing else."""
    model, folder, first, second, _ = masked_saves(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (folder / "notes.txt").write_text("mine")
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["attnmask-masks.zarr", "config.json", "model.safetensors",
                                                         "notes.txt"]
    assert loaded(folder)[0] == second.digest


# ----------------------------------------------------------------------------------------------
# issue 26 item 7 (D's parts): model files get the modes the umask gives

def test_saved_weights_follow_the_umask(tiny_model, labelled_csv, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        model, folder, first, second, _ = masked_saves(tmp_path)
        model.save_pretrained(folder)  # with masks applied
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
        out = tmp_path / "run"
        train_run(tiny_model, labelled_csv, out)
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------
# issue 26 item 7 (D's parts): a failed collect leaves no empty patterns/ folder

def test_a_failed_collect_leaves_no_empty_output_folder(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    one_error_line(CliRunner().invoke(app, ["collect", str(tiny_bert_dir), "blank.txt", "--device", "cpu"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]
    nested = tmp_path / "deep" / "er" / "p.zarr"
    one_error_line(CliRunner().invoke(app, ["collect", str(tiny_bert_dir), "blank.txt", "--out", str(nested),
                                            "--device", "cpu"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]
    r = CliRunner().invoke(app, ["collect", str(tiny_bert_dir), str(REPO / "README.md"), "--out", str(nested),
                                 "--device", "cpu", "--limit", "4", "--max-length", "16"])
    assert r.exit_code == 0, r.output
    assert (nested / "zarr.json").is_file()


# ----------------------------------------------------------------------------------------------
# item 9: eval refuses a model with non-finite weights or logits

@pytest.mark.parametrize("damage", ["nan-weight", "overflowing-logits"])
def test_eval_refuses_non_finite_weights_and_logits(labelled_csv, tmp_path, damage):  # noqa: F811
    """A model whose weights are NaN used to report an accuracy (every logit NaN, argmax 0) with exit 0."""
    import torch
    from test_masks_travel import tiny_classifier

    folder = tmp_path / "nan-model"
    model, _ = tiny_classifier(folder)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    with torch.no_grad():
        if damage == "nan-weight":
            model.classifier.weight[0, 0] = float("nan")
        else:  # finite weights whose logits overflow float32
            model.classifier.weight.fill_(3e38)
            model.classifier.bias.fill_(3e38)
    model.save_pretrained(folder)
    r = CliRunner().invoke(app, ["eval", str(folder), str(labelled_csv), "--device", "cpu"])
    one_error_line(r, "NaN or infinite", "weight classifier.weight" if damage == "nan-weight" else "logits")


# ----------------------------------------------------------------------------------------------
# item 10: one error line instead of a traceback

@pytest.mark.parametrize("state, needle", [
    ("{not json", "trainer_state.json is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("GLOBAL_STEP", "global_step 999 is past the 24 steps this run makes"),
])
def test_a_damaged_or_overlong_trainer_state_is_one_error_line(tiny_bert_dir, labelled_csv, tmp_path,  # noqa: F811
                                                               monkeypatch, state, needle):
    from test_cli_hardening import interrupted_run, reseal

    args, checkpoint = interrupted_run(tmp_path / "run", tiny_bert_dir, labelled_csv, monkeypatch)
    if state == "GLOBAL_STEP":
        record = json.loads((checkpoint / "trainer_state.json").read_text())
        state = json.dumps({**record, "global_step": 999})
    (checkpoint / "trainer_state.json").write_text(state)
    reseal(checkpoint)
    one_error_line(CliRunner().invoke(app, [str(a) for a in args]), needle, "--overwrite")
    assert not (tmp_path / "run" / "metrics.json").exists()


def pickled_weights_folder(tmp_path: Path) -> Path:
    """A classifier folder whose only weights are a pytorch_model.bin holding a non-tensor object, which
    torch.load(weights_only=True) refuses."""
    import datetime

    import torch
    from test_masks_travel import tiny_classifier

    folder = tmp_path / "pickled"
    model, _ = tiny_classifier(folder)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "planted": datetime.date(2020, 1, 1)}, folder / "pytorch_model.bin")
    return folder


def test_a_refused_pytorch_model_bin_is_one_error_line(labelled_csv, tmp_path):  # noqa: F811
    import attnmask

    folder = pickled_weights_folder(tmp_path)
    for args in (["eval", str(folder), str(labelled_csv), "--device", "cpu"],
                 ["collect", str(folder), str(labelled_csv), "--out", str(tmp_path / "p.zarr"), "--device", "cpu",
                  "--max-length", "16"]):
        one_error_line(CliRunner().invoke(app, args), "refused unread", "datetime.date")
    with pytest.raises(AttnmaskError, match="refused unread"):
        attnmask.load_model(folder)


@pytest.mark.parametrize("architectures", [["AutoTokenizer"], ["logging"], [3], ["PreTrainedModel"]])
def test_an_architectures_field_that_is_not_a_model_class_is_one_error(tmp_path, architectures):
    import attnmask
    from test_masks_travel import tiny_classifier

    folder = tmp_path / "model"
    model, _ = tiny_classifier(folder)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    with pytest.raises(AttnmaskError, match="not a transformers model class"):
        attnmask.load_model(folder)


@pytest.mark.parametrize("command", ["plot", "analyze"])
def test_plot_and_analyze_refuse_a_store_whose_counts_are_all_zero(tmp_path, command):
    from attnmask.store.stores import SitePatterns

    store = tmp_path / "zero.zarr"
    sites = {"encoder.self": SitePatterns(np.zeros((2, 4, 8, 8)), np.zeros((8, 8), dtype=np.int64), False)}
    write_patterns(store, sites, {"model": {"name": "m"}, "data": {"name": "d"}, "max_length": 8})
    args = [command, str(store)] + (["--out", str(tmp_path / "plots")] if command == "plot" else [])
    one_error_line(CliRunner().invoke(app, args), "counts are all zero", command)
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("damage, needle", [("float keep", "not a bool numpy array"), ("no digest", "no digest")])
def test_an_in_memory_mask_store_that_no_reader_would_accept_is_one_error(tmp_path, damage, needle):
    import attnmask
    from attnmask.store.stores import MaskStore, SiteMask
    from test_masks_travel import random_store, tiny_classifier

    model, _ = tiny_classifier(tmp_path / "tok")
    good = random_store(tmp_path / "m.zarr")
    if damage == "float keep":
        bad = MaskStore(dict(good.attrs), {"encoder.self": SiteMask(good.sites["encoder.self"].keep.astype(float),
                                                                    False)})
    else:
        bad = MaskStore({k: v for k, v in good.attrs.items() if k != "digest"}, good.sites)
    with pytest.raises(AttnmaskError, match=needle):
        attnmask.apply_masks(model, bad)
    assert getattr(model, "_attnmask_handle", None) is None


LOCKFILE_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(300)
"""


def test_a_foreign_flock_on_a_stores_lock_file_names_its_holder(tmp_path):
    """Another user's flock on `.NAME.lock` (the file left empty) used to be reported as 'another process'."""
    from attnmask.store.locking import lock_path

    out = tmp_path / "p.zarr"
    holder = subprocess.Popen([sys.executable, "-c", LOCKFILE_HOLDER, str(lock_path(out))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AttnmaskError, match=rf"in use by process {holder.pid} of user \S+ \(read lock\)"):
            write_patterns(out, edition(0), stamp(0))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


LOAD_MODEL = """
import sys
import attnmask
from attnmask.errors import AttnmaskError
from transformers import BertForSequenceClassification
try:
    attnmask.load_model(sys.argv[1], model_class=BertForSequenceClassification)
except AttnmaskError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_load_model_refuses_a_fifo_in_the_saved_masks_without_hanging(tmp_path):
    model, folder, first, second, _ = masked_saves(tmp_path)
    head = folder / "attnmask-masks.zarr" / "zarr.json"
    head.unlink()
    os.mkfifo(head)
    r = script(LOAD_MODEL, folder, timeout=120)  # it used to block forever
    one_error_line(r, "not a regular file")
