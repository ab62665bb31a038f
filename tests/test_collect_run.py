"""attnmask.collect.run: one collection run from a settings object, with the caller's hooks (what
`attnmask collect` calls; the command's own behaviour is tested in test_cli*.py and test_scale.py)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.collect.run import CollectHooks, CollectSettings, default_store_path, run_collection
from attnmask.errors import AttnmaskError
from attnmask.store.stores import read_patterns, read_root_attrs


class Recorder(CollectHooks):
    """Hooks that record every call as (name, arguments)."""

    def __init__(self):
        self.calls = []
        super().__init__(**{name: self.recording(name) for name in ("check_out", "start", "advance", "stop", "note")})

    def recording(self, name):
        return lambda *args: self.calls.append((name, args))

    def named(self, name):
        return [args for called, args in self.calls if called == name]


def test_a_run_reports_through_its_hooks_and_writes_what_the_command_writes(tiny_bert_dir, texts_file, tmp_path):
    hooks = Recorder()
    out = tmp_path / "api.zarr"
    outcome = run_collection(CollectSettings(model=str(tiny_bert_dir), data=str(texts_file), out=str(out),
                                             max_length=16, batch_size=8, device="cpu"), hooks)
    assert outcome.out == str(out) and not outcome.already_done
    assert (outcome.sequences, outcome.processes) == (40, 1) and outcome.tokens > 0 and outcome.seconds > 0
    assert outcome.store.attrs["sequences"] == 40
    assert hooks.calls[0] == ("check_out", (str(out),))  # before the model was loaded or anything written
    assert hooks.named("start") == [(40, 0)] and hooks.named("stop") == [()] and hooks.named("note") == []
    done = [completed for completed, rate in hooks.named("advance")]
    assert done == sorted(done) and done[-1] == 40 and len(done) == 5  # one report per batch of 8
    assert all(rate > 0 for _, rate in hooks.named("advance"))
    assert [name for name, _ in hooks.calls][-1] == "stop"

    cli_out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(app, ["collect", str(tiny_bert_dir), str(texts_file), "--out", str(cli_out),
                                      "--max-length", "16", "--batch-size", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ours, theirs = read_patterns(out), read_patterns(cli_out)
    np.testing.assert_array_equal(ours.sites["encoder.self"].sum, theirs.sites["encoder.self"].sum)
    np.testing.assert_array_equal(ours.sites["encoder.self"].count, theirs.sites["encoder.self"].count)
    assert read_root_attrs(out)["digest"] == read_root_attrs(cli_out)["digest"]


def test_resume_without_a_checkpoint_notes_it_and_a_finished_store_is_not_collected_again(tiny_bert_dir, texts_file,
                                                                                          tmp_path):
    out = tmp_path / "p.zarr"
    settings = CollectSettings(model=str(tiny_bert_dir), data=str(texts_file), out=str(out), max_length=16,
                               batch_size=8, device="cpu", resume=True)
    first = Recorder()
    assert run_collection(settings, first).store is not None
    assert first.named("note") == [(f"no checkpoint at {tmp_path / '.p.zarr.checkpoint' / 'rank0-of-1.npz'}; "
                                    "collecting from the beginning",)]
    digest = read_root_attrs(out)["digest"]
    again = Recorder()
    outcome = run_collection(settings, again)  # the same settings and data: the store is the run's result
    assert outcome.already_done and outcome.store is None
    assert again.named("start") == [] and read_root_attrs(out)["digest"] == digest


def test_settings_are_checked_before_any_work(tiny_bert_dir, texts_file, tmp_path):
    hooks = Recorder()
    for bad in ({"batch_size": 0}, {"limit": 0}, {"max_length": 0}, {"checkpoint_every": 0}):
        with pytest.raises(AttnmaskError, match="positive"):
            run_collection(CollectSettings(model=str(tiny_bert_dir), data=str(texts_file),
                                           out=str(tmp_path / "p.zarr"), **bad), hooks)
    assert hooks.calls == [] and not (tmp_path / "p.zarr").exists()


def test_the_default_output_is_named_after_model_data_and_split(tmp_path):
    assert default_store_path("minilm", "rotten-tomatoes", "train") == "patterns/minilm-rotten-tomatoes-train.zarr"
    assert default_store_path(str(tmp_path / "texts.txt.gz"), str(tmp_path), None) == \
        f"patterns/texts-{tmp_path.name}.zarr"
