"""fairseq translation Transformers end to end on a tiny reverse-the-sequence task (CPU).

One module-scoped run makes the task, trains a 2+2-layer dim-64 model densely, collects its three
attention sites and compiles masks; the tests then check the patterns, mask application inside
fairseq's MultiheadAttention (full-sequence and incremental), masked training through fairseq-train
and BLEU with and without masks.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from attnmask.collect.patterns import collect
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import AttnmaskError
from attnmask.models.fairseq import FairseqAdapter, load_checkpoint_state
from attnmask.masks.rules import Window, window_keep
from attnmask.models.families import apply_masks
from attnmask.store.stores import read_masks, read_patterns, write_masks, write_patterns
from attnmask.tasks.translate import evaluate_fairseq, load_translation_model, make_reverse_task, train_fairseq

MODEL_ARGS = ("--arch transformer --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 "
              "--decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 "
              "--encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings").split()
TRAIN_ARGS = ("--optimizer adam --adam-betas (0.9,0.98) --lr 0.005 --lr-scheduler inverse_sqrt "
              "--warmup-updates 10 --max-tokens 1200 --criterion label_smoothed_cross_entropy "
              "--label-smoothing 0.1 --dropout 0.0 --no-epoch-checkpoints --no-progress-bar --log-interval 50 "
              "--cpu --seed 1 --num-workers 0 --disable-validation --max-epoch 500").split()
MAX_LENGTH = 10  # plane size; sentences hold <= 8 tokens + </s>
SITES = ("encoder.self", "decoder.self", "decoder.cross")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Task, dense checkpoint (120 updates), pattern store over valid, masks at tau 0.8 (cross 0.5)."""
    root = tmp_path_factory.mktemp("fairseq")
    data = make_reverse_task(root / "task", vocab=10, train=1000, valid=100, test=60, min_length=3,
                             max_length=8, seed=0)
    train_fairseq(data, None, MODEL_ARGS + TRAIN_ARGS + ["--max-update", "120", "--save-dir", str(root / "dense")])
    checkpoint = root / "dense" / "checkpoint_last.pt"
    adapter = FairseqAdapter.load(checkpoint, data, "valid")
    result = collect(adapter, adapter.examples(), batch_size=16, max_length=MAX_LENGTH)
    patterns = write_patterns(root / "p.zarr", result.sites, {"model": adapter.identity(),
                                                                     "data": {"name": "valid"}, "max_length": MAX_LENGTH})
    settings = CompileSettings(tau=0.8, budget="plane", site_tau={"decoder.cross": 0.5})  # short sentences:
    # with --budget data the row guarantee alone keeps more than 20% of the decoder.self entries
    sites, attrs = compile_sites(read_patterns(patterns.path), settings)
    masks = write_masks(root / "m.zarr", sites, attrs)
    return {"root": root, "data": data, "checkpoint": checkpoint, "adapter": adapter, "result": result,
            "patterns": patterns.path, "masks": masks.path}


def test_collect_counts_exclude_padding_and_rows_sum_to_one(run):
    """count[q, k] = number of valid pairs with a real query q and a real key k; rows sum to their count."""
    adapter, result = run["adapter"], run["result"]
    pairs = list(adapter.examples())
    src_len = np.array([len(s) for s, _ in pairs])
    tgt_len = np.array([len(t) for _, t in pairs])
    assert result.sequences == len(pairs) == 100
    q = np.arange(MAX_LENGTH)
    expected = {"encoder.self": (src_len, src_len), "decoder.self": (tgt_len, tgt_len),
                "decoder.cross": (tgt_len, src_len)}
    for name, (query_len, key_len) in expected.items():
        site = result.sites[name]
        want = ((q[None, :, None] < query_len[:, None, None]) & (q[None, None, :] < key_len[:, None, None])).sum(0)
        np.testing.assert_array_equal(site.count, want)
        assert site.sum.shape == (2, 4, MAX_LENGTH, MAX_LENGTH)
        rows_real = (q[None, :] < query_len[:, None]).sum(0)  # sequences whose query q is real
        np.testing.assert_allclose(site.sum.sum(-1), np.broadcast_to(rows_real, site.sum.shape[:3]), atol=1e-4)
        assert (site.sum[..., site.count == 0] == 0).all()
    causal = result.sites["decoder.self"].sum
    assert (causal[..., np.triu_indices(MAX_LENGTH, 1)[0], np.triu_indices(MAX_LENGTH, 1)[1]] == 0).all()
    assert result.sites["decoder.self"].causal and not result.sites["decoder.cross"].causal
    # heads are not averaged: some layer has heads with different patterns
    assert np.abs(np.diff(result.sites["encoder.self"].sum, axis=1)).max() > 1e-3


def test_import_keeps_logging_clean(run):
    """`import fairseq` (and fairseq-train/preprocess run in-process) leave the root logger as it was:
    WARNING level, no stderr handler (pytest's own capture handlers are not StreamHandler itself)."""
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert not [h for h in root.handlers if type(h) is logging.StreamHandler]


def test_site_tau_compiles_per_site(run):
    masks = read_masks(run["masks"])
    assert masks.sites["decoder.cross"].attrs["tau"] == 0.5
    assert masks.sites["encoder.self"].attrs["tau"] == 0.8
    assert masks.sites["decoder.self"].attrs["tau"] == 0.8
    kept = {n: masks.sites[n].keep.mean() for n in SITES}
    assert kept["decoder.cross"] > kept["encoder.self"]


def test_masked_collection_gives_zero_probability_to_pruned_cells(run):
    """Collect again with the masks applied: cells the runtime prunes (the plane after the row guarantee
    of attnmask.masks.rules) get exactly 0, rows still sum to their count."""
    adapter, masks = run["adapter"], read_masks(run["masks"])
    with apply_masks(adapter.model, masks):
        result = collect(adapter, adapter.examples(), batch_size=7, max_length=MAX_LENGTH)
    dense = run["result"]
    for name in SITES:
        mask, site = masks.sites[name], result.sites[name]
        plane_q, plane_k = mask.keep.shape[2:]
        keep = np.stack([window_keep(torch.from_numpy(layer), Window(plane_q, plane_k), causal=mask.causal,
                                     cross=name == "decoder.cross", beyond="dense")[0].numpy()
                         for layer in mask.keep])
        assert (site.sum[~keep] == 0).all(), name
        assert (keep != mask.keep).mean() < 0.05, name  # the guarantee changes few cells
        np.testing.assert_allclose(site.sum.sum(-1), dense.sites[name].sum.sum(-1), atol=1e-4)
        assert np.abs(site.sum - dense.sites[name].sum).max() > 1e-3  # the masks changed attention


def _forced_batch(task, model, n=6):
    """A fairseq-collated test batch (sources left-padded, fairseq's default)."""
    task.load_dataset("test")
    dataset = task.dataset("test")
    sample = dataset.collater([dataset[i] for i in range(n)])
    assert (sample["net_input"]["src_tokens"][:, 0] == task.source_dictionary.pad()).any()
    return sample


def test_incremental_decoding_equals_full_sequence_with_masks(run):
    """Step t of incremental decoding uses mask row t of decoder.self and decoder.cross."""
    task, model, *_ = load_translation_model(run["checkpoint"], run["data"], run["masks"])
    sample = _forced_batch(task, model)
    net = sample["net_input"]
    prev = net["prev_output_tokens"]
    with torch.inference_mode():
        encoder_out = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
        full, _ = model.decoder(prev, encoder_out=encoder_out)
        state: dict = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0][:, -1]
                 for t in range(prev.size(1))]
        model._attnmask_handle.remove()
        dense, _ = model.decoder(prev, encoder_out=model.encoder(net["src_tokens"], src_lengths=net["src_lengths"]))
    incremental = torch.stack(steps, 1)
    real = prev.ne(task.target_dictionary.pad())
    torch.testing.assert_close(incremental[real], full[real], atol=1e-4, rtol=1e-4)
    assert (full[real] - dense[real]).abs().max() > 1e-3


def test_masks_do_not_depend_on_padding(run):
    """A sentence decodes the same alone and left-padded inside a batch (positions come from tokens)."""
    task, model, *_ = load_translation_model(run["checkpoint"], run["data"], run["masks"])
    sample = _forced_batch(task, model)
    net = sample["net_input"]
    pad = task.source_dictionary.pad()
    i = int(net["src_tokens"][:, 0].eq(pad).nonzero()[0])  # a padded row
    src = net["src_tokens"][i : i + 1]
    src = src[:, src[0].ne(pad)]
    with torch.inference_mode():
        batch_out, _ = model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"])
        alone, _ = model(src, torch.tensor([src.size(1)]), net["prev_output_tokens"][i : i + 1])
    real = net["prev_output_tokens"][i].ne(pad)
    torch.testing.assert_close(alone[0][real], batch_out[i][real], atol=1e-4, rtol=1e-4)


def test_beyond_error_refuses_longer_sentences(run, tmp_path):
    masks = read_masks(run["masks"])
    small = {n: type(m)(m.keep[:, :, :4, :4].copy(), m.causal, m.attrs) for n, m in masks.sites.items()}
    store = write_masks(tmp_path / "small.zarr", small, {**{k: v for k, v in masks.attrs.items()
                                                            if k not in ("digest", "sites")}, "beyond": "error"})
    task, model, *_ = load_translation_model(run["checkpoint"], run["data"], store.path)
    net = _forced_batch(task, model)["net_input"]
    with pytest.raises(AttnmaskError, match="leaves the mask.s 4x4 plane"), torch.inference_mode():
        model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"])


def test_bleu_with_and_without_masks_and_masked_training(run):
    data, checkpoint = run["data"], run["checkpoint"]
    dense = evaluate_fairseq(checkpoint, data, split="test", beam=3)
    assert dense.sentences == 60 and dense.masks is None and dense.trained_with is None
    assert 0 <= dense.bleu <= 100
    masked = evaluate_fairseq(checkpoint, data, run["masks"], split="test", beam=3)
    assert masked.masks == read_masks(run["masks"]).digest
    assert masked.hypotheses != dense.hypotheses  # 80% of the attention pruned changes translations

    # tau 0 prunes nothing: decoding through the masked seam reproduces dense decoding exactly
    sites, attrs = compile_sites(read_patterns(run["patterns"]), CompileSettings(tau=0.0))
    zero = write_masks(run["root"] / "tau0.zarr", sites, attrs)
    assert evaluate_fairseq(checkpoint, data, zero.path, split="test", beam=3).hypotheses == dense.hypotheses

    # fine-tune with the masks through fairseq-train, starting from the dense checkpoint
    out = run["root"] / "masked"
    record = train_fairseq(data, run["masks"], MODEL_ARGS + TRAIN_ARGS + [
        "--max-update", "20", "--save-dir", str(out), "--restore-file", str(checkpoint),
        "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"])
    state = load_checkpoint_state(out / "checkpoint_last.pt")
    saved = state["task_state"]["attnmask_masks"]
    assert saved["digest"] == record["digest"] == read_masks(run["masks"]).digest
    assert saved["sites"] == sorted(SITES)
    assert not torch.equal(state["model"]["encoder.layers.0.self_attn.k_proj.weight"],
                           load_checkpoint_state(checkpoint)["model"]["encoder.layers.0.self_attn.k_proj.weight"])
    tuned = evaluate_fairseq(out / "checkpoint_last.pt", data, run["masks"], split="test", beam=3)
    assert tuned.trained_with == tuned.masks
    recorded = evaluate_fairseq(out / "checkpoint_last.pt", data, "recorded", split="test", beam=3)
    assert recorded.masks == tuned.masks and recorded.hypotheses == tuned.hypotheses
    assert 0 <= tuned.bleu <= 100


def test_training_with_other_masks_is_refused_on_resume(run, tmp_path):
    out = run["root"] / "masked"
    if not (out / "checkpoint_last.pt").exists():
        pytest.skip("needs the masked run of the previous test")
    sites, attrs = compile_sites(read_patterns(run["patterns"]), CompileSettings(tau=0.5))
    other = write_masks(tmp_path / "other.zarr", sites, attrs)
    with pytest.raises(AttnmaskError, match="masks"):
        train_fairseq(run["data"], other.path, MODEL_ARGS + TRAIN_ARGS + ["--max-update", "25", "--save-dir", str(out)])


def test_user_errors_are_one_line(run, tmp_path):
    with pytest.raises(AttnmaskError, match="does not exist"):
        FairseqAdapter.load(tmp_path / "missing.pt", run["data"])
    with pytest.raises(AttnmaskError, match="no binarized split"):
        FairseqAdapter.load(run["checkpoint"], run["data"], "nosuch")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AttnmaskError, match="fairseq checkpoint"):
        FairseqAdapter.load(tmp_path / "junk.pt", run["data"])
    with pytest.raises(AttnmaskError, match="--user-dir"):
        train_fairseq(run["data"], None, ["--user-dir", "x"])
    with pytest.raises(AttnmaskError, match="not supported"):
        train_fairseq(run["data"], None, ["--task", "language_modeling"])


def test_cli_collect_compile_train_eval(run, tmp_path):
    """The fairseq paths of `attnmask collect/compile/train/eval` end to end."""
    from typer.testing import CliRunner

    from attnmask.cli import app

    cli = CliRunner()
    data, checkpoint = str(run["data"]), str(run["checkpoint"])
    p, m = str(tmp_path / "p.zarr"), str(tmp_path / "m.zarr")
    r = cli.invoke(app, ["collect", checkpoint, data, "--split", "test", "--max-length", str(MAX_LENGTH), "--out", p])
    assert r.exit_code == 0, r.output
    assert read_patterns(p).attrs["sequences"] == 60
    r = cli.invoke(app, ["compile", p, "--tau", "0.8", "--budget", "plane", "--site-tau", "decoder.cross=0.5", "--out", m])
    assert r.exit_code == 0, r.output
    assert read_masks(m).sites["decoder.cross"].attrs["tau"] == 0.5
    r = cli.invoke(app, ["train", "fairseq", data, "--masks", m, "--", *MODEL_ARGS, *TRAIN_ARGS,
                         "--max-update", "3", "--save-dir", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    trained = tmp_path / "run" / "checkpoint_last.pt"
    r = cli.invoke(app, ["eval", "fairseq", str(trained), data, "--beam", "2", "--limit", "10"])
    assert r.exit_code == 0, r.output
    assert f'"masks": "{read_masks(m).digest}"' in r.output.replace("\n", "")  # the recorded masks by default
    r = cli.invoke(app, ["eval", "fairseq", str(trained), data, "--masks", "none", "--limit", "10"])
    assert r.exit_code == 0 and '"masks": null' in r.output, r.output
    r = cli.invoke(app, ["collect", str(tmp_path / "nope.pt"), data, "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_plugin_checks_recorded_masks_before_the_model_is_built(run, tmp_path):
    """fairseq-generate calls task.load_state_dict before build_model: the right masks pass, other masks
    are refused, and without --attnmask-masks the recorded store is re-applied (issue 13, item 7; issue 14)
    unless it is gone."""
    from attnmask.models.fairseq_plugin.task import AttnmaskTranslationConfig, AttnmaskTranslationTask

    digest = read_masks(run["masks"]).digest
    saved = {"attnmask_masks": {"digest": digest, "path": str(run["masks"])}}
    with_masks = AttnmaskTranslationTask.setup_task(
        AttnmaskTranslationConfig(data=str(run["data"]), attnmask_masks=str(run["masks"])))
    with_masks.load_state_dict(saved)  # no model built yet: the named store is read directly
    with pytest.raises(ValueError, match="trained with masks"):
        with_masks.load_state_dict({"attnmask_masks": {"digest": "sha256:other", "path": "x"}})
    without = AttnmaskTranslationTask.setup_task(AttnmaskTranslationConfig(data=str(run["data"])))
    without.load_state_dict(saved)
    assert without.masks_path() == str(run["masks"]) and without.masks_digest() == digest
    dense = AttnmaskTranslationTask.setup_task(AttnmaskTranslationConfig(data=str(run["data"])))
    dense.load_state_dict({})  # a dense checkpoint loads without masks
    assert dense.masks_path() is None
    with pytest.raises(ValueError, match="pass them with --attnmask-masks"):
        dense.load_state_dict({"attnmask_masks": {"digest": digest, "path": str(tmp_path / "gone.zarr")}})


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse", "flex"])
def test_every_backend_matches_eager_in_full_and_incremental_decoding(run, backend):
    """Left-padded sources (fairseq's default collation), all three sites masked: each backend gives the
    eager backend's outputs, in the teacher-forced forward and step by step with the key/value cache."""
    task, model, *_ = load_translation_model(run["checkpoint"], run["data"], run["masks"], backend="eager")
    net = _forced_batch(task, model)["net_input"]
    prev, real = net["prev_output_tokens"], net["prev_output_tokens"].ne(task.target_dictionary.pad())

    def decode():
        with torch.inference_mode():
            encoder_out = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
            full, _ = model.decoder(prev, encoder_out=encoder_out)
            state: dict = {}
            steps = [model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0][:, -1]
                     for t in range(prev.size(1))]
        return full, torch.stack(steps, 1)

    eager_full, eager_steps = decode()
    model._attnmask_handle.remove()
    with apply_masks(model, run["masks"], backend=backend):
        full, steps = decode()
    torch.testing.assert_close(full[real], eager_full[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[real], eager_steps[real], atol=1e-5, rtol=1e-5)
