"""fairseq as a translation researcher uses it (issue 13, items 8-11; issue 14, masks that travel).

One module-scoped tiny task (reverse-the-sequence, 20-30 tokens a sentence, so that tau 0.9 is
reachable on its planes) and a dense 2+2-layer checkpoint trained with validation (checkpoint_best.pt).
The stock fairseq CLIs run as subprocesses of the project's environment, where `make install` put
attnmask-fairseq-safe-load.pth; attnmask's own commands run in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import AttnmaskError
from attnmask.models.fairseq_safe_load import PTH_NAME
from attnmask.models.fairseq import load_checkpoint_state
from attnmask.models.fairseq_attention import MASKS_MARKER
from attnmask.store.stores import read_masks, read_patterns, write_masks
from attnmask.tasks.translate import evaluate_fairseq, make_reverse_task, train_fairseq

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_ARGS = ("--arch transformer --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 "
              "--decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 "
              "--encoder-attention-heads 2 --decoder-attention-heads 2 --share-all-embeddings")
TRAIN_ARGS = ("--optimizer adam --lr 0.005 --lr-scheduler inverse_sqrt --warmup-updates 5 --max-tokens 2000 "
              "--criterion label_smoothed_cross_entropy --label-smoothing 0.1 --dropout 0.0 --no-epoch-checkpoints "
              "--no-progress-bar --cpu --seed 1 --num-workers 0")
runner = CliRunner()


def environment() -> dict:
    """The subprocess environment: this venv's commands first, one thread, no GPU."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def shell(command: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """cwd with data-bin/ and checkpoints/checkpoint_best.pt (dense, 40 updates, validated every 20)."""
    root = tmp_path_factory.mktemp("fairseq_cli")
    shutil.copytree(make_reverse_task(root / "task", vocab=12, train=300, valid=40, test=30, min_length=20,
                                      max_length=30, seed=0), root / "data-bin")
    train_fairseq(root / "data-bin", None, MODEL_ARGS.split() + TRAIN_ARGS.split() + [
        "--max-update", "40", "--validate-interval-updates", "20", "--save-dir", str(root / "checkpoints")])
    assert (root / "checkpoints" / "checkpoint_best.pt").is_file()
    return root


def readme_fairseq_block() -> list[str]:
    """The lines of the sh block of README's fairseq section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## fairseq translation Transformers"):]
    return section[section.index("```sh\n") + 6:section.index("```", section.index("```sh\n") + 6)].splitlines()


def test_pth_file_is_installed_in_this_environment():
    """`make install` writes it (Makefile); the stock CLIs below depend on it."""
    import sysconfig

    assert (Path(sysconfig.get_paths()["purelib"]) / PTH_NAME).is_file()
    assert f"attnmask.models.fairseq_safe_load --install" in (ROOT / "Makefile").read_text()


def test_readme_recipe_runs_as_written(work):
    """Every command of README's fairseq block, in order, with only ARCH and TRAIN set to the tiny model
    (item 11); the masked checkpoint then decodes with its recorded masks in attnmask and in stock
    fairseq-generate with the plugin (same hypotheses), and stock fairseq without the plugin refuses it."""
    lines = readme_fairseq_block()
    assert [line.split("=")[0] for line in lines[:2]] == ["ARCH", "TRAIN"]
    tiny = [f'ARCH="{MODEL_ARGS}"', f'TRAIN="{TRAIN_ARGS} --max-update 50 --validate-interval-updates 5"']
    outputs = []
    for i, line in enumerate(lines[2:]):
        r = shell("\n".join(tiny + [line]), work)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
        outputs.append(r)
    masked = work / "checkpoints-masked" / "checkpoint_best.pt"
    masks = work / "patterns" / "checkpoint_best-data-bin-valid.tau0.9.decoder-cross-tau0.5.masks.zarr"
    digest = read_masks(masks).digest
    evaluated = json.loads(outputs[3].stdout.strip().splitlines()[-1])
    assert evaluated["masks"] == evaluated["trained_with"] == digest
    assert json.loads(outputs[4].stdout.strip().splitlines()[-1])["masks"] is None

    state = load_checkpoint_state(masked)
    assert state["task_state"]["attnmask_masks"]["path"] == str(masks.resolve())
    generated = outputs[5].stdout + outputs[5].stderr
    assert "re-applying the masks the checkpoint was trained with" in generated
    hypotheses = dict((int(m.group(1)), m.group(2)) for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", generated, re.M))
    api = evaluate_fairseq(masked, work / "data-bin", "recorded", beam=5)
    assert [hypotheses[i] for i in range(len(hypotheses))] == api.hypotheses and len(api.hypotheses) == 30

    stock = shell("fairseq-generate data-bin --path checkpoints-masked/checkpoint_best.pt --beam 2 --cpu", work)
    assert stock.returncode != 0 and f'Unexpected key(s) in state_dict: "{MASKS_MARKER}"' in stock.stderr


def test_stock_cli_load_checkpoints_weights_only(work, tmp_path):
    """Item 8: stock fairseq-train --restore-file and fairseq-generate (no --user-dir) read a checkpoint
    under torch's weights-only default, in the environment `make install` builds."""
    train = shell(f"fairseq-train {work / 'data-bin'} {MODEL_ARGS} {TRAIN_ARGS} --max-update 3 --disable-validation "
                  f"--save-dir {tmp_path / 'ft'} --restore-file {work / 'checkpoints' / 'checkpoint_best.pt'} "
                  "--reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler", tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "Loaded checkpoint" in train.stdout + train.stderr
    generate = shell(f"fairseq-generate {work / 'data-bin'} --path {tmp_path / 'ft' / 'checkpoint_last.pt'} "
                     "--beam 2 --batch-size 16 --cpu", tmp_path)
    assert generate.returncode == 0, generate.stderr[-2000:]
    assert re.search(r"Generate test with beam=2: BLEU4 = ", generate.stdout + generate.stderr)


def test_plugin_records_an_absolute_masks_path_from_stock_fairseq_train(work, tmp_path):
    """Item 10: fairseq-train with the plugin and a relative --attnmask-masks records the absolute path."""
    sites, attrs = compile_sites(read_patterns(collected(work)), CompileSettings(tau=0.5))
    write_masks(tmp_path / "m.zarr", sites, attrs)
    plugin = ROOT / "attnmask" / "models" / "fairseq_plugin"
    r = shell(f"fairseq-train {work / 'data-bin'} --user-dir {plugin} --task attnmask_translation "
              f"--attnmask-masks m.zarr {MODEL_ARGS} {TRAIN_ARGS} --max-update 2 --disable-validation "
              "--save-dir run", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    state = load_checkpoint_state(tmp_path / "run" / "checkpoint_last.pt")
    assert state["task_state"]["attnmask_masks"]["path"] == str((tmp_path / "m.zarr").resolve())
    assert bytes(state["model"][MASKS_MARKER].tolist()).decode() == read_masks(tmp_path / "m.zarr").digest


def collected(work: Path) -> Path:
    """patterns/checkpoint_best-data-bin-valid.zarr, collected once (also by the README test)."""
    path = work / "patterns" / "checkpoint_best-data-bin-valid.zarr"
    if not path.exists():
        r = runner.invoke(app, ["collect", str(work / "checkpoints" / "checkpoint_best.pt"), str(work / "data-bin"),
                                "--out", str(path)])
        assert r.exit_code == 0, r.output
    return path


def test_recorded_masks_are_reapplied_digest_checked(work, tmp_path):
    """Issue 14: the plugin re-applies the store a checkpoint records when --attnmask-masks is absent,
    and refuses it once it is gone or changed."""
    from attnmask.models.fairseq_plugin.task import AttnmaskTranslationConfig, AttnmaskTranslationTask

    sites, attrs = compile_sites(read_patterns(collected(work)), CompileSettings(tau=0.5))
    store = write_masks(tmp_path / "m.zarr", sites, attrs)
    saved = {"attnmask_masks": {"digest": store.digest, "path": str(store.path)}}
    task = AttnmaskTranslationTask.setup_task(AttnmaskTranslationConfig(data=str(work / "data-bin")))
    task.load_state_dict(saved)
    assert task.masks_path() == str(store.path) and task.masks_digest() == store.digest
    shutil.rmtree(store.path)
    write_masks(tmp_path / "m.zarr", *compile_sites(read_patterns(collected(work)), CompileSettings(tau=0.3)))
    task = AttnmaskTranslationTask.setup_task(AttnmaskTranslationConfig(data=str(work / "data-bin")))
    with pytest.raises(ValueError, match="now holds"):
        task.load_state_dict(saved)
    shutil.rmtree(store.path)
    with pytest.raises(ValueError, match="cannot be read"):
        task.load_state_dict(saved)


def test_eval_limit_takes_the_first_sentence_ids_whatever_the_batch_size(work):
    """Item 9: --limit N decodes sentence ids 0..N-1; two batch sizes and the API agree."""
    ckpt, data = str(work / "checkpoints" / "checkpoint_best.pt"), str(work / "data-bin")
    results = []
    for batch in ("2", "64"):
        r = runner.invoke(app, ["eval", "fairseq", ckpt, data, "--limit", "7", "--beam", "2", "--batch-size", batch])
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1] and results[0]["sentences"] == 7
    full = evaluate_fairseq(ckpt, data, beam=2)
    limited = evaluate_fairseq(ckpt, data, beam=2, limit=7, max_sentences=3)
    assert limited.hypotheses == full.hypotheses[:7] and limited.references == full.references[:7]
    assert round(limited.bleu, 2) == results[0]["bleu"]


def test_eval_reports_sacrebleu_signature_and_post_processing(work, tmp_path):
    """Item 10: tokenizer and signature in the output; --remove-bpe applies fairseq's post-processing."""
    ckpt, data = str(work / "checkpoints" / "checkpoint_best.pt"), str(work / "data-bin")
    r = runner.invoke(app, ["eval", "fairseq", ckpt, data, "--limit", "3", "--beam", "2", "--bleu-tokenize", "char"])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokenize"] == "char" and "tok:char" in out["signature"] and out["post_process"] == "none"
    dense = evaluate_fairseq(ckpt, data, beam=2, limit=3)
    pieces = evaluate_fairseq(ckpt, data, beam=2, limit=3, post_process="sentencepiece")
    assert pieces.references == [ref.replace(" ", "") for ref in dense.references]
    r = runner.invoke(app, ["eval", "fairseq", ckpt, data, "--remove-bpe", "bogus"])
    assert r.exit_code == 1 and r.stderr.startswith("error: --post-process 'bogus' is not one of")
    r = runner.invoke(app, ["eval", "fairseq", ckpt, data, "--help"])
    assert "--remove-bpe" in r.stdout and "default: none" in " ".join(r.stdout.split())


def test_masks_from_other_weights_warn_once(work, tmp_path):
    """Item 10: masks collected from another checkpoint of the same shape: one warning line (eval and
    train); the checkpoint they were collected from gives none."""
    ckpt, data = work / "checkpoints" / "checkpoint_best.pt", work / "data-bin"
    sites, attrs = compile_sites(read_patterns(collected(work)), CompileSettings(tau=0.5))
    masks = str(write_masks(tmp_path / "m.zarr", sites, attrs).path)
    train_fairseq(data, None, MODEL_ARGS.split() + TRAIN_ARGS.split() + [
        "--max-update", "2", "--disable-validation", "--save-dir", str(tmp_path / "other"),
        "--restore-file", str(ckpt), "--reset-optimizer", "--reset-dataloader", "--reset-meters"])
    other = str(tmp_path / "other" / "checkpoint_last.pt")
    same = runner.invoke(app, ["eval", "fairseq", str(ckpt), str(data), "--masks", masks, "--limit", "2", "--beam", "1"])
    assert same.exit_code == 0 and same.stderr == "", same.output
    r = runner.invoke(app, ["eval", "fairseq", other, str(data), "--masks", masks, "--limit", "2", "--beam", "1"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("warning: the masks") and "other weights" in r.stderr
    r = runner.invoke(app, ["train", "fairseq", str(data), "--masks", masks, "--", *MODEL_ARGS.split(),
                            *TRAIN_ARGS.split(), "--max-update", "2", "--disable-validation",
                            "--save-dir", str(tmp_path / "again"), "--restore-file", other, "--reset-optimizer",
                            "--reset-dataloader", "--reset-meters"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "other weights" in warnings[0], r.stderr


def test_bad_fairseq_train_arguments_are_one_line(work, tmp_path):
    """Item 10: argparse errors, unknown architectures and fairseq's own failures: one error line."""
    data = str(work / "data-bin")
    cases = [["--arch", "nosuch"], [*MODEL_ARGS.split(), "--bogus", "1"],
             [*MODEL_ARGS.split(), "--restore-file", str(tmp_path / "missing.pt")],
             [*MODEL_ARGS.replace("embed-dim 32", "embed-dim 48").split(), *TRAIN_ARGS.split(),
              "--max-update", "1", "--save-dir", str(tmp_path / "x"),
              "--restore-file", str(work / "checkpoints" / "checkpoint_best.pt")]]
    for args in cases:
        r = runner.invoke(app, ["train", "fairseq", data, "--masks", "none", "--", *args])
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.output


def test_training_a_masked_checkpoint_without_masks_is_refused(work, tmp_path):
    """A checkpoint trained with masks never trains dense (attnmask refuses; stock fairseq's strict load
    refuses the marker key)."""
    sites, attrs = compile_sites(read_patterns(collected(work)), CompileSettings(tau=0.5))
    masks = write_masks(tmp_path / "m.zarr", sites, attrs).path
    args = MODEL_ARGS.split() + TRAIN_ARGS.split() + ["--disable-validation", "--reset-optimizer",
                                                      "--reset-dataloader", "--reset-meters"]
    train_fairseq(work / "data-bin", masks, args + ["--max-update", "2", "--save-dir", str(tmp_path / "m"),
                                                    "--restore-file", str(work / "checkpoints" / "checkpoint_best.pt")])
    with pytest.raises(AttnmaskError, match="training it without masks is refused"):
        train_fairseq(work / "data-bin", None, args + ["--max-update", "4", "--save-dir", str(tmp_path / "d"),
                                                       "--restore-file", str(tmp_path / "m" / "checkpoint_last.pt")])
    stock = shell(f"fairseq-train {work / 'data-bin'} {' '.join(args)} --max-update 4 --save-dir d2 "
                  f"--restore-file {tmp_path / 'm' / 'checkpoint_last.pt'}", tmp_path)
    assert stock.returncode != 0 and MASKS_MARKER in stock.stderr


def test_collect_checkpoints_resume_and_records_the_data(work, tmp_path, monkeypatch):
    """Item 10: fairseq collect resumes after a crash to the uninterrupted run's store; the store's data
    attribute has the folder's absolute path, the split and its digest; --text-column is refused."""
    from attnmask.models.fairseq import FairseqAdapter

    ckpt, data = str(work / "checkpoints" / "checkpoint_best.pt"), str(work / "data-bin")
    base = ["collect", ckpt, data, "--split", "test", "--batch-size", "4", "--max-length", "28"]
    whole = tmp_path / "whole.zarr"
    r = runner.invoke(app, base + ["--out", str(whole), "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    assert re.search(r"\(\d+ pairs longer than --max-length skipped\)", r.stdout)

    forward, calls = FairseqAdapter.forward, []

    def crash_after_five(self, batch):
        calls.append(1)
        if len(calls) > 5:
            raise AttnmaskError("simulated crash")
        return forward(self, batch)

    monkeypatch.setattr(FairseqAdapter, "forward", crash_after_five)
    part = tmp_path / "part.zarr"
    r = runner.invoke(app, base + ["--out", str(part), "--checkpoint-every", "2"])
    assert r.exit_code == 1 and "simulated crash" in r.stderr
    assert list((tmp_path / ".part.zarr.checkpoint").glob("rank0-of-1.npz"))
    monkeypatch.setattr(FairseqAdapter, "forward", forward)
    r = runner.invoke(app, base + ["--out", str(part), "--checkpoint-every", "2", "--resume"])
    assert r.exit_code == 0, r.output
    a, b = read_patterns(whole), read_patterns(part)
    assert a.attrs["sequences"] == b.attrs["sequences"]
    for site in a.sites:
        np.testing.assert_array_equal(a.sites[site].count, b.sites[site].count)
        np.testing.assert_allclose(a.sites[site].sum, b.sites[site].sum, rtol=0, atol=1e-12)
    assert b.attrs["data"]["path"] == str((work / "data-bin").resolve()) and b.attrs["data"]["split"] == "test"
    assert b.attrs["data"]["digest"].startswith("sha256:")
    assert b.attrs["model"]["weights_digest"] == a.attrs["model"]["weights_digest"]
    r = runner.invoke(app, base + ["--text-column", "x", "--out", str(tmp_path / "t.zarr")])
    assert r.exit_code == 1 and "--text-column does not apply" in r.stderr


def test_weights_only_loading_allows_exactly_the_safe_globals(work, tmp_path):
    """A checkpoint with numpy scalars loads; one whose pickle calls os.system is refused, unrun."""
    import pickle

    from attnmask.models.fairseq_safe_load import allow_fairseq_globals

    allow_fairseq_globals()
    state = torch.load(work / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    state["extra_state"]["best"] = np.float64(state["extra_state"]["best"])
    torch.save(state, tmp_path / "numpy.pt")
    assert load_checkpoint_state(tmp_path / "numpy.pt")["extra_state"]["best"] == state["extra_state"]["best"]

    witness = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {witness}",)

    state["extra_state"]["best"] = Exploit()
    torch.save(state, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(AttnmaskError, match="cannot read .* as a fairseq checkpoint"):
        load_checkpoint_state(tmp_path / "evil.pt")
    r = shell(f"fairseq-generate {work / 'data-bin'} --path {tmp_path / 'evil.pt'} --cpu", tmp_path)
    assert r.returncode != 0 and "unsupported global posix.system" in r.stderr.lower()
    assert not witness.exists()


def test_distributed_collection_equals_one_process(work, tmp_path):
    """torchrun with 2 processes gives the single process's store (sentence pairs are independent)."""
    ckpt, data = work / "checkpoints" / "checkpoint_best.pt", work / "data-bin"
    args = f"collect {ckpt} {data} --split test --batch-size 4 --max-length 28"
    one = shell(f"attnmask {args} --out one.zarr", tmp_path)
    two = shell(f"torchrun --nproc-per-node 2 -m attnmask {args} --out two.zarr", tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "over 2 processes" in two.stdout
    a, b = read_patterns(tmp_path / "one.zarr"), read_patterns(tmp_path / "two.zarr")
    assert a.attrs["sequences"] == b.attrs["sequences"] > 0
    for site in a.sites:
        np.testing.assert_array_equal(a.sites[site].count, b.sites[site].count)
        np.testing.assert_allclose(a.sites[site].sum, b.sites[site].sum, rtol=0, atol=1e-9)
