"""Issue 25 items 3 and 4 for `sweep` and `demo`: they replace only what is provably their own output (the
marker trainer.RunFolder writes), and build the replacement beside the old output, which stays whole until
the new one is complete. The demo runs here on the tiny BERT and labelled CSV of test_train (the real demo
trains MiniLM three times)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from attnmask.errors import AttnmaskError
from attnmask.tasks.experiments import DemoSettings, run_demo, sweep
from test_hardening_round2 import entries
from test_train import labelled_csv, pattern_store, settings, tiny_model  # noqa: F401 - fixtures and helpers


class Interrupt(Exception):
    pass


def stop_at(n: int):
    def progress(step, total, loss, epoch):
        if step == n:
            raise Interrupt

    return progress


# ----------------------------------------------------------------------------------------------
# sweep: a run of other settings is replaced as `train --overwrite` replaces it


def test_sweep_refuses_a_run_folder_that_is_not_a_run(tiny_model, labelled_csv, pattern_store, tmp_path):  # noqa: F811
    """A folder where the sweep's dense run belongs, with a settings.json of other settings and a file of the
    user's, used to be removed whole before the run was trained again."""
    out = tmp_path / "sw"
    run = out / "runs" / "seed0" / "dense"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"settings": {"lr": 1.0}}))
    (run / "metrics.json").write_text("{}")
    (run / "thesis.tex").write_text("years of work")
    before = entries(run)
    base = settings(tiny_model, labelled_csv, "", epochs=1, limit=40)
    with pytest.raises(AttnmaskError, match="not an attnmask training run"):
        sweep(base, str(pattern_store), [0.0], {"data": {}}, out, seeds=[0])
    assert entries(run) == before


@pytest.mark.parametrize("user_file", ["notes.txt", "summary.csv"])
def test_sweep_refuses_a_folder_whose_files_it_would_overwrite(tiny_model, labelled_csv, pattern_store, tmp_path,  # noqa: F811
                                                               user_file):
    """sweep writes sweep.csv, summary.csv, sweep.json and sweep.png at the top of --out: a folder holding
    other files, or those names without a sweep's sweep.json, is refused before any work, untouched."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / user_file).write_text("the user's own")
    base = settings(tiny_model, labelled_csv, "", epochs=1, limit=40)
    with pytest.raises(AttnmaskError, match="choose a new folder"):
        sweep(base, str(pattern_store), [0.0], {"data": {}}, out, seeds=[0])
    assert entries(out) == {user_file: b"the user's own"}


def test_an_interrupted_sweep_leaves_the_old_run_and_continues_the_replacement(
        tiny_model, labelled_csv, pattern_store, tmp_path, monkeypatch):  # noqa: F811
    """A run of other settings used to be deleted before its replacement was trained: an interrupted sweep
    left neither. Now the replacement is built in .dense.next, the old run stays whole until it is
    complete, and the next sweep resumes it and swaps it in."""
    monkeypatch.setattr("attnmask.tasks.trainer.CHECKPOINT_EVERY", 2)
    out = tmp_path / "sw"
    base = settings(tiny_model, labelled_csv, "", epochs=1, limit=40)
    sweep(base, str(pattern_store), [0.0], {"data": {}}, out, seeds=[0])
    run = out / "runs" / "seed0" / "dense"
    old = entries(run)
    changed = replace(base, epochs=2, lr=1e-3)
    with pytest.raises(Interrupt):
        sweep(changed, str(pattern_store), [0.0], {"data": {}}, out, seeds=[0], progress=stop_at(3))
    assert entries(run) == old  # the old run, untouched
    staged = run.parent / ".dense.next"
    assert (staged / "checkpoint" / "checkpoint-2").is_dir()
    steps = []
    result = sweep(changed, str(pattern_store), [0.0], {"data": {}}, out, seeds=[0],
                   progress=lambda step, *_: steps.append(step))
    assert steps[0] == 3  # resumed after checkpoint-2, not started again
    assert sorted(p.name for p in run.parent.iterdir()) == ["dense"]
    assert json.loads((run / "settings.json").read_text())["settings"]["lr"] == 1e-3
    assert result["rows"][0]["accuracy"] == json.loads((run / "metrics.json").read_text())["accuracy"]


# ----------------------------------------------------------------------------------------------
# demo


@pytest.fixture
def tiny_demo(tiny_model, labelled_csv, monkeypatch):  # noqa: F811
    """run_demo on the tiny BERT instead of MiniLM: (settings for OUT, {"train": calls so far})."""
    import attnmask.models.families
    import attnmask.tasks.experiments

    load, train = attnmask.models.families.load_adapter, attnmask.tasks.experiments.train
    calls = {"train": 0, "fail_at": None}
    monkeypatch.setattr(attnmask.tasks.experiments, "load_adapter", lambda spec, device="cpu": load(str(tiny_model), device))

    def tiny_train(s, progress=None):
        calls["train"] += 1
        if calls["train"] == calls["fail_at"]:
            raise Interrupt
        return train(replace(s, model=str(tiny_model)), progress)

    monkeypatch.setattr(attnmask.tasks.experiments, "train", tiny_train)

    def make(out: Path, **kw) -> DemoSettings:
        return DemoSettings(**{"out": str(out), "data": str(labelled_csv), "limit": 40, "tau": 0.5, "max_length": 16,
                               "batch_size": 8, "device": "cpu", **kw})

    return make, calls


def test_demo_overwrite_refuses_a_folder_that_merely_looks_like_a_demo(tiny_demo, tmp_path, monkeypatch):
    """demo.json or patterns.zarr used to be proof enough: the folder was removed whole, the user's files
    with it."""
    import attnmask.tasks.experiments

    make, _ = tiny_demo

    def no_model(*_, **__):
        raise Interrupt  # the old code got here after removing the folder

    monkeypatch.setattr(attnmask.tasks.experiments, "load_adapter", no_model)
    out = tmp_path / "demo"
    (out / "patterns.zarr").mkdir(parents=True)
    (out / "demo.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    before = entries(out)
    with pytest.raises(AttnmaskError, match="not an attnmask training run"):
        run_demo(make(out, overwrite=True), say=lambda _: None)
    assert entries(out) == before


def test_a_failed_demo_overwrite_leaves_the_old_demo_and_a_finished_one_replaces_it(tiny_demo, tmp_path):
    """The old demo used to be removed before the new one began: a failed --overwrite left neither."""
    make, calls = tiny_demo
    out = tmp_path / "demo"
    first = run_demo(make(out), say=lambda _: None)
    old = entries(out)
    with pytest.raises(AttnmaskError, match=r"already exists \(pass --overwrite\)"):
        run_demo(make(out), say=lambda _: None)

    calls["fail_at"] = calls["train"] + 2  # the dense run of the replacement is trained, then training fails
    with pytest.raises(Interrupt):
        run_demo(make(out, overwrite=True, seed=1), say=lambda _: None)
    assert entries(out) == old  # the old demo, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the failed replacement is gone
    assert json.loads((out / "attnmask-run.json").read_text())["state"] == "finished"
    assert first["runs"]["data"]["masks"] == str(out / "masks-data.zarr")

    calls["fail_at"] = None
    second = run_demo(make(out, overwrite=True, seed=1), say=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert json.loads((out / "demo.json").read_text())["settings"]["seed"] == 1 == second["settings"]["seed"]
    assert second["runs"]["data"]["masks"] == str(out / "masks-data.zarr")  # where the masks are, after the swap

    (out / "notes.txt").write_text("mine")
    with pytest.raises(AttnmaskError, match="holds notes.txt, which the run did not write"):
        run_demo(make(out, overwrite=True), say=lambda _: None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "demo.json").exists()
