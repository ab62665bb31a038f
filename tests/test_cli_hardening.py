"""The command line against hostile files and arguments (issue 13): planted or damaged training and
collection checkpoints, outputs that cannot be written, values Click cannot parse, piped output, default
mask-store names, and options that do not apply.

Every refusal is exit status 1 with exactly one line `error: ...`, no traceback, nothing written.
"""

from __future__ import annotations

import csv
import json
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app, default_masks_name, name_number
from attnmask.masks.compile import CompileSettings
from attnmask.errors import AttnmaskError
from attnmask.store.stores import read_masks, write_patterns
from scale_helpers import make_text, random_patterns, run_cli

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def fails_cleanly(*args, needles=(), **kwargs) -> str:
    """Invoke the CLI; assert exit 1 with exactly one `error:` line holding every needle."""
    r = invoke(*args, **kwargs)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pattern_store(folder: Path, name: str = "p.zarr") -> Path:
    sites = random_patterns(np.random.default_rng(0), layers=2, heads=2, plane=8)
    write_patterns(folder / name, sites, {"max_length": 8, "model": {"name": "m", "family": "f", "config_digest": "c"},
                                         "data": {"name": name, "digest": name}})
    return folder / name


# ----------------------------------------------------------------------------------------------
# 1. train --resume never unpickles code, and a damaged or changed Trainer checkpoint is one error line


class Planted:
    """Unpickling this object runs code: it writes the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture()
def labelled_csv(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(30):
            words = [rng.choice(["film", "plot", "actor", "story"]) for _ in range(3)]
            writer.writerow([" ".join(words + ["good" if i % 2 else "bad"]), "pos" if i % 2 else "neg"])
    return path


def interrupted_run(out: Path, model: Path, data: Path, monkeypatch) -> tuple[list[str], Path]:
    """A run folder as `train` leaves it when killed after step 3 (settings.json and
    checkpoint/checkpoint-2, written by Trainer and completed by attnmask); returns the matching
    `attnmask train ... --resume` arguments and the checkpoint folder."""
    from attnmask.tasks.classify import TrainSettings, train

    class Killed(Exception):
        pass

    def kill_at_3(step, *_):
        if step == 3:
            raise Killed

    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 2)
    settings = TrainSettings(model=str(model), data=str(data), out=str(out), max_length=16, batch_size=4,
                             device="cpu")
    with pytest.raises(Killed):
        train(settings, progress=kill_at_3)
    return (["train", model, data, "--masks", "none", "--out", out, "--max-length", "16", "--batch-size", "4",
             "--device", "cpu", "--resume"], out / "checkpoint" / "checkpoint-2")


def torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reseal(checkpoint: Path) -> None:
    """Rewrite the manifest to match the files as they are now (a tamperer who knows the format)."""
    from attnmask.store.stores import sha256_hex
    from attnmask.tasks.trainer import MANIFEST

    files = {str(p.relative_to(checkpoint)): sha256_hex(p) for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps({"files": files}))


def test_planted_pickle_in_the_training_checkpoint_never_runs(tiny_bert_dir, labelled_csv, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    for name, state, resealed, needle in [
        ("torch", torch_bytes({"state": Planted(marker)}), True, "could run code"),
        ("pickle", pickle.dumps(Planted(marker)), True, "optimizer.pt"),
        ("unsealed", torch_bytes({"state": Planted(marker)}), False, "changed since it was written"),
    ]:
        args, checkpoint = interrupted_run(tmp_path / name, tiny_bert_dir, labelled_csv, monkeypatch)
        (checkpoint / "optimizer.pt").write_bytes(state)
        if resealed:
            reseal(checkpoint)
        fails_cleanly(*args, needles=("optimizer.pt", needle, "--overwrite"))
        assert not marker.exists(), "the planted object was unpickled"
        assert not (tmp_path / name / "metrics.json").exists()


@pytest.mark.parametrize("case, needle", [
    ("truncated optimizer", "optimizer.pt"),
    ("garbage rng state", "rng_state.pth"),
    ("truncated weights", "model weights"),
    ("foreign weights", "do not fit the model"),
    ("extra file", "files differ"),
    ("damaged manifest", "attnmask-checkpoint.json is damaged"),
    ("cut short while written", "no complete checkpoint"),
])
def test_damaged_training_checkpoint_is_one_error_line(case, needle, tiny_bert_dir, labelled_csv, tmp_path,
                                                       monkeypatch):
    from safetensors.torch import save_file

    args, checkpoint = interrupted_run(tmp_path / "run", tiny_bert_dir, labelled_csv, monkeypatch)
    if case == "truncated optimizer":
        (checkpoint / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes()[:200])
    elif case == "garbage rng state":
        (checkpoint / "rng_state.pth").write_bytes(b"\x00 not a checkpoint")
    elif case == "truncated weights":
        (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:100])
    elif case == "foreign weights":
        save_file({"w": torch.zeros(2)}, str(checkpoint / "model.safetensors"))
    elif case == "extra file":
        (checkpoint / "pytorch_model.bin").write_bytes(torch_bytes({}))
    if case == "damaged manifest":
        (checkpoint / "attnmask-checkpoint.json").write_text("{not json")
    elif case == "cut short while written":
        (checkpoint / "attnmask-checkpoint.json").unlink()
    elif case != "extra file":
        reseal(checkpoint)
    fails_cleanly(*args, needles=(needle, "--overwrite"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_damaged_settings_json_is_one_error_line(tiny_bert_dir, labelled_csv, tmp_path, monkeypatch):
    args, _ = interrupted_run(tmp_path / "run", tiny_bert_dir, labelled_csv, monkeypatch)
    (tmp_path / "run" / "settings.json").write_text("{not json")
    fails_cleanly(*args, needles=("settings.json", "damaged"))


# ----------------------------------------------------------------------------------------------
# 5. collect --resume validates every field of its checkpoint; sums are checked when written too


def collect_settings(model: Path, data: Path, max_length: int, batch_size: int, every: int) -> dict:
    """The settings `collect` records in its checkpoints (see attnmask.collect.run._open)."""
    from attnmask.store.data import resolve_data
    from attnmask.models.families import load_adapter

    identity = {"model": load_adapter(str(model), "cpu").identity(), "data": resolve_data(str(data)).identity()}
    return {**identity, "max_length": max_length, "batch_size": batch_size, "limit": None,
            "checkpoint_every": every, "processes": 1}


def plant_collect_checkpoint(path: Path, meta: dict, sums: np.ndarray, counts: np.ndarray) -> None:
    """Write a checkpoint file as an attacker or a broken disk would: no validation on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{"sum:encoder.self": sums, "count:encoder.self": counts})


GOOD_META = {"version": 1, "cursor": 8, "batches": 2, "sequences": 8, "tokens": 40, "collection": "c0ffee",
             "sites": ["encoder.self"]}
TAMPERED = {
    "negative cursor": ({"cursor": -4}, None, "cursor is -4"),
    "cursor not an integer": ({"cursor": "abc"}, None, "cursor is 'abc'"),
    "fractional cursor": ({"cursor": 2.5}, None, "cursor is 2.5"),
    "boolean batches": ({"batches": True}, None, "batches is True"),
    "negative tokens": ({"tokens": -1}, None, "tokens is -1"),
    "settings not an object": ({"settings": "every"}, None, "settings"),
    "checkpoint_every not a number": ({"settings": {"checkpoint_every": "x"}}, None, "checkpoint_every is 'x'"),
    "sites not a list": ({"sites": "encoder.self"}, None, "no list of sites"),
    "NaN sums": ({}, "nan", "NaN"),
    "negative sums": ({}, "negative", "negative"),
    "sums above counts": ({}, "huge", "above-count"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_collect_checkpoint_is_one_error_line_and_writes_nothing(case, tiny_bert_dir, tmp_path):
    meta_change, sums_change, needle = TAMPERED[case]
    data = make_text(tmp_path / "d.txt", 20)
    settings = collect_settings(tiny_bert_dir, data, 8, 4, 1)
    sums = np.full((2, 4, 8, 8), 0.1)
    sums[0, 0, 0, 0] = {"nan": np.nan, "negative": -1.0, "huge": 100.0, None: 0.1}[sums_change]
    out = tmp_path / "p.zarr"
    plant_collect_checkpoint(tmp_path / ".p.zarr.checkpoint" / "rank0-of-1.npz",
                             {**GOOD_META, "settings": settings, **meta_change}, sums,
                             np.full((8, 8), 8, dtype=np.int64))
    fails_cleanly("collect", tiny_bert_dir, data, "--out", out, "--max-length", 8, "--batch-size", 4,
                  "--checkpoint-every", 1, "--device", "cpu", "--resume", needles=("checkpoint", needle))
    assert not out.exists()


def test_a_valid_planted_checkpoint_still_resumes(tiny_bert_dir, tmp_path):
    """The same file with sound fields is accepted: the checks refuse only what collect never writes."""
    data = make_text(tmp_path / "d.txt", 20)
    plant_collect_checkpoint(tmp_path / ".p.zarr.checkpoint" / "rank0-of-1.npz",
                             {**GOOD_META, "settings": collect_settings(tiny_bert_dir, data, 8, 4, 1)},
                             np.full((2, 4, 8, 8), 0.1), np.full((8, 8), 8, dtype=np.int64))
    r = invoke("collect", tiny_bert_dir, data, "--out", tmp_path / "p.zarr", "--max-length", 8, "--batch-size", 4,
               "--checkpoint-every", 1, "--device", "cpu", "--resume")
    assert r.exit_code == 0, r.output


def test_checkpoint_with_nan_sums_is_never_written(tmp_path):
    from attnmask.collect.checkpoint import CollectState, save_checkpoint

    sums = np.zeros((1, 1, 2, 2))
    sums[0, 0, 1, 1] = np.nan
    path = tmp_path / "ck" / "rank0-of-1.npz"
    with pytest.raises(AttnmaskError, match="NaN"):
        save_checkpoint(path, CollectState({"encoder.self": sums}, {"encoder.self": np.ones((2, 2), np.int64)}))
    assert not path.parent.exists()


# ----------------------------------------------------------------------------------------------
# 6. outputs are checked before the work; one rule for every bad value


def never_load(*args, **kwargs):
    raise AssertionError("the model was loaded: the output should have been refused before any work")


@pytest.mark.parametrize("layout", ["loop", "dangling", "file parent", "looping parent"])
def test_unwritable_output_is_refused_before_any_work(layout, tiny_bert_dir, tmp_path, monkeypatch):
    for where in ("attnmask.collect.inputs", "attnmask.tasks.experiments", "attnmask.tasks.compact", "attnmask.api"):
        monkeypatch.setattr(f"{where}.load_adapter", never_load)
    data = make_text(tmp_path / "d.txt", 5)
    if layout == "loop":
        out = tmp_path / "out.zarr"
        out.symlink_to(out)
    elif layout == "dangling":
        out = tmp_path / "out.zarr"
        out.symlink_to(tmp_path / "gone" / "out.zarr")
    elif layout == "file parent":
        (tmp_path / "notes.txt").write_text("precious")
        out = tmp_path / "notes.txt" / "out.zarr"
    else:
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out = tmp_path / "loop" / "sub" / "out.zarr"
    fails_cleanly("collect", tiny_bert_dir, data, "--out", out, "--device", "cpu", needles=("--out",))
    store = pattern_store(tmp_path)
    fails_cleanly("compile", store, "--out", out, needles=("--out",))
    fails_cleanly("merge", store, pattern_store(tmp_path, "q.zarr"), "--out", out, needles=("--out",))
    if layout == "file parent":
        assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("args", [
    ["compile", "STORE", "--tau", "abc"],
    ["compile", "STORE", "--block-size", "1.5"],
    ["compile", "STORE", "--no-such-option"],
    ["compile"],
    ["inspect", "STORE", "--json", "extra"],
    ["collect", "minilm", "d.txt", "--batch-size", "many"],
    ["train", "minilm", "d.txt", "--masks", "none", "--epochs", "two"],
    ["eval", "model", "d.txt", "--max-length", "x"],
    ["sweep", "minilm", "d.txt", "--out", "o"],
    ["bench", "minilm", "--rounds", "-"],
    ["nosuchcommand"],
])
def test_values_click_cannot_parse_give_one_error_line(args, tmp_path):
    store = pattern_store(tmp_path)
    line = fails_cleanly(*[str(store) if a == "STORE" else a for a in args])
    assert "--help" in line and "Usage" not in line


@pytest.mark.parametrize("args, needle", [
    (["demo", "--limit", "0"], "--limit must be at least 2"),
    (["demo", "--tau", "2"], "--tau must lie in [0, 1)"),
    (["demo", "--epochs", "0"], "--epochs and --batch-size must be positive"),
    (["demo", "--device", "tpu"], "device"),
    (["eval", "m", "d.csv", "--batch-size", "0"], "--batch-size and --limit must be positive"),
    (["eval", "m", "d.csv", "--max-length", "0"], "--max-length must be at least 2"),
])
def test_bad_values_are_refused_before_any_work(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where in ("attnmask.collect.inputs", "attnmask.tasks.experiments", "attnmask.tasks.compact", "attnmask.api"):
        monkeypatch.setattr(f"{where}.load_adapter", never_load)
    monkeypatch.setattr("attnmask.tasks.classify.load_classifier", never_load)
    fails_cleanly(*args, needles=(needle,))
    assert not any(tmp_path.iterdir())


def test_real_subprocess_bad_value_help_and_no_arguments(tmp_path):
    bad = run_cli("compile", str(pattern_store(tmp_path)), "--tau", "abc")
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: Invalid value for '--tau'")
    bad = run_cli("train", "minilm", str(tmp_path / "missing.csv"), "--masks", "none", "--out", str(tmp_path / "o"))
    assert bad.returncode == 1 and bad.stderr.splitlines() == [bad.stderr.strip()], bad.stderr  # no progress line
    for args in (["--help"], [], ["compile", "--help"]):
        r = run_cli(*args)
        assert r.returncode == 0 and r.stdout.startswith("Usage:") and r.stderr == "", (args, r.stderr)


# ----------------------------------------------------------------------------------------------
# 13. piped output is never wrapped or cut; help shows the [default: ...] hints


def test_piped_output_keeps_long_lines_whole_and_every_digit(tmp_path):
    store = pattern_store(tmp_path)
    out = tmp_path / ("a-rather-long-folder-name-" * 4) / "masks.zarr"
    r = run_cli("compile", str(store), "--tau", "0.5", "--out", str(out), env={"COLUMNS": "40"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} in "), lines[:2]
    assert "…" not in r.stdout and "..." not in r.stdout
    sparsity = read_masks(out).sites["encoder.self"].attrs["plane_sparsity"]
    assert all(f"{s:.4f}" in r.stdout for s in sparsity)
    r = run_cli("inspect", str(out), env={"COLUMNS": "40"})
    assert r.returncode == 0 and str(out) in r.stdout.splitlines()[0] and "…" not in r.stdout


def test_lines_printed_through_a_progress_bar_to_a_pipe_stay_whole():
    script = "from attnmask.cli import stderr_progress\nwith stderr_progress() as bar:\n    bar.console.print('x' * 200)"
    r = run_cli("-c", script, env={"COLUMNS": "40"}, prefix=(sys.executable,))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["x" * 200]


def test_help_shows_bracketed_default_hints():
    def help_of(command: str) -> str:  # without whitespace: Click wraps the help at the terminal's width
        r = invoke(command, "--help")
        assert r.exit_code == 0, r.output
        return "".join(r.output.split())

    for command, hint in [("eval", "[default: the masks recorded in the model]"), ("eval", "[default: as in training]"),
                          ("train", "[rotten-tomatoes(-full): fresh,rotten]"),
                          ("train", "[default: 128; --task lm: the model's tgt_len]"),
                          ("collect", "[default: patterns/<model>-<data>.zarr]")]:
        assert "".join(hint.split()) in help_of(command), (command, hint)


# ----------------------------------------------------------------------------------------------
# 14. default mask-store names encode every non-default compile setting


@pytest.mark.parametrize("args, name", [  # tau 0.6: reachable on these 8 x 8 planes with --min-keep 2
    ([], "p.tau0.6.masks.zarr"),
    (["--scope", "head"], "p.tau0.6.scope-head.masks.zarr"),
    (["--budget", "plane"], "p.tau0.6.budget-plane.masks.zarr"),
    (["--min-keep", "2"], "p.tau0.6.minkeep2.masks.zarr"),
    (["--beyond", "error"], "p.tau0.6.beyond-error.masks.zarr"),
    (["--site-tau", "encoder.self=0.5"], "p.tau0.6.encoder-self-tau0.5.masks.zarr"),
    (["--tau", "0.5", "--block-size", "2", "--random", "--seed", "3"], "p.tau0.5.b2.random3.masks.zarr"),
])
def test_default_mask_names_differ_for_different_compilations(args, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = pattern_store(tmp_path)
    r = invoke("compile", store, *(args if "--tau" in args else ["--tau", "0.6", *args]))
    assert r.exit_code == 0, r.output
    beside = store.parent  # the default output sits beside the pattern store
    assert (beside / name).exists(), sorted(p.name for p in beside.iterdir())


def test_default_mask_names_keep_every_digit_and_are_filesystem_safe():
    a = default_masks_name("p.zarr", CompileSettings(tau=0.1234567))
    b = default_masks_name("p.zarr", CompileSettings(tau=0.1234568))
    assert a != b and name_number(0.9) == "0.9" and name_number(1e-5) == "1e-05"
    weird = default_masks_name("s3://bucket/p.zarr/", CompileSettings(site_tau={"../x y": 0.5}))
    assert weird == "p.tau0.9.---x-y-tau0.5.masks.zarr" and "/" not in weird


# ----------------------------------------------------------------------------------------------
# 15. explicit values are honoured; options that do not apply are refused


def test_explicit_defaults_reach_the_language_model_trainer(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("attnmask.tasks.workflows.train_lm", lambda *a, **kw: seen.append(kw) or
                        {"steps": 1, "train_loss": 1.0, "seconds": 0.0, "masks": None})
    common = ["train", "none", "t.txt", "--task", "lm", "--config", "small", "--masks", "none", "--out", tmp_path / "o"]
    assert invoke(*common, "--max-length", 128, "--lr", 5e-5).exit_code == 0
    assert invoke(*common).exit_code == 0
    assert (seen[0]["tgt_len"], seen[0]["lr"]) == (128, 5e-5)
    assert (seen[1]["tgt_len"], seen[1]["lr"]) == (None, None)


def test_classifier_training_gets_the_documented_defaults(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("attnmask.tasks.workflows.train", lambda settings, progress=None: seen.append(settings) or
                        {"masks": None, "pruning": None})
    common = ["train", "minilm", "d.csv", "--masks", "none", "--out", tmp_path / "o"]
    assert invoke(*common).exit_code == 0
    assert invoke(*common, "--max-length", 64, "--lr", 1e-4).exit_code == 0
    assert (seen[0].max_length, seen[0].lr) == (128, 2e-4) and (seen[1].max_length, seen[1].lr) == (64, 1e-4)


@pytest.mark.parametrize("args, needle", [
    (["collect", "ckpt.pt", "bin", "--text-column", "x"], "--text-column does not apply to a fairseq checkpoint"),
    (["collect", "ckpt.pt", "bin", "--token-classes"],  # --resume, --checkpoint-every apply since issue 13 item 10
     "--token-classes does not apply to a fairseq checkpoint"),
    (["compile", "STORE", "--seed", "3"], "--seed applies only with --random"),
    (["train", "fairseq", "bin", "--masks", "none", "--epochs", "3"], "--epochs does not apply to fairseq"),
    (["train", "minilm", "d.csv", "--masks", "none", "--out", "o", "--steps", "5"],
     "--steps does not apply to --task classify"),
    (["train", "x", "t.txt", "--task", "lm", "--masks", "none", "--out", "o", "--label-column", "y"],
     "--label-column does not apply to --task lm"),  # --split applies since issue 26 item 4 (hamlet's splits)
    (["train", "minilm", "d.csv", "--masks", "none", "--out", "o", "--keep-rate", "0.3"],
     "--keep-rate is no longer an option: token pruning is one spec, e.g. --prune-tokens topk:keep-rate=0.3"),
    (["train", "minilm", "d.csv", "--masks", "none", "--out", "o", "--prune-tokens", "topk", "--final-threshold",
      "0.1"], "--final-threshold is no longer an option"),
    (["train", "minilm", "d.csv", "--masks", "none", "--out", "o", "--prune-tokens", "threshold:0.01,lambda=1"],
     "temperature and lambda in --prune-tokens apply only with --learn-thresholds"),
    (["eval", "m", "d.csv", "--beam", "3"], "--beam does not apply without MODEL fairseq"),
    (["eval", "fairseq", "ckpt.pt", "bin", "--max-length", "9"], "--max-length does not apply to fairseq"),
    (["eval", "m", "t.txt", "--task", "lm", "--text-column", "x"], "--text-column does not apply to --task lm"),
    (["eval", "m", "t.txt", "--task", "lm", "--on", "all"], "--on does not apply to --task lm"),
    (["eval", "m", "d.csv", "--temperature", "1"], "--temperature is no longer an option"),
    (["bench", "minilm", "--masks", "m.zarr", "--tau", "0.5"], "--tau does not apply with --masks"),
])
def test_options_that_do_not_apply_are_refused(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where in ("attnmask.collect.inputs", "attnmask.tasks.experiments", "attnmask.tasks.compact", "attnmask.api"):
        monkeypatch.setattr(f"{where}.load_adapter", never_load)
    store = pattern_store(tmp_path)
    fails_cleanly(*[str(store) if a == "STORE" else a for a in args], needles=(needle,))
    assert not (tmp_path / "o").exists() and not (tmp_path / "patterns").exists()
