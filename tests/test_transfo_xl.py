"""Transformer-XL: the model against its definitions and Hugging Face's outputs, collection with
memory, masks in every segment, and the language-model round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attnmask.collect.patterns import collect
from attnmask.masks.compile import CompileSettings, compile_sites
from attnmask.errors import AttnmaskError
from attnmask.models.transfo_xl_vocab import Vocabulary, batchify, segments
from attnmask.tasks.lm import eval_lm, train_lm
from attnmask.masks.rules import Window, window_keep
from attnmask.models.families import load_adapter
from attnmask.models.transfo_xl import TransfoXLAdapter
from attnmask.models.transfo_xl_model import TransfoXLConfig, TransfoXLLM, blocked_cells, relative_shift, sinusoid
from attnmask.models.families import apply_masks
from attnmask.store.stores import SiteMask, write_masks, write_patterns

FIXTURES = Path(__file__).parent / "fixtures" / "transfo_xl_tiny"


def tiny_config(**kw) -> TransfoXLConfig:
    base = dict(vocab_size=40, cutoffs=[10, 25], d_model=16, d_embed=16, n_head=2, d_head=8, d_inner=32,
                div_val=2, n_layer=2, mem_len=4, clamp_len=-1, same_length=False, dropout=0.0, dropatt=0.0)
    base.update(kw)
    return TransfoXLConfig(**base)


def tiny_model(seed: int = 0, **kw) -> TransfoXLLM:
    torch.manual_seed(seed)
    model = TransfoXLLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # spread the weights so that attention is far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def capture_probs(model, ids, mems):
    seen, previous = {}, model.transformer.prob_sink
    model.transformer.prob_sink = lambda layer, p: seen.__setitem__(layer, p.clone())
    try:
        out = model(ids, mems)
    finally:
        model.transformer.prob_sink = previous
    return seen, out


# ----------------------------------------------------------------------------------------------
# Definitions on small tensors


def test_relative_shift_matches_definition():
    t, m = 3, 4
    k = m + t
    x = torch.randn(2, 3, t, k)
    y = relative_shift(x, m)
    for i in range(t):
        for j in range(k):
            dist = m + i - j  # the embedding of distance d sits at index p = K-1-d
            expected = x[..., i, k - 1 - dist] if dist >= 0 else torch.zeros(2, 3)
            assert torch.equal(y[..., i, j], expected)


def test_blocked_cells_causal_and_same_length():
    t, m = 3, 4
    blocked = blocked_cells(t, m, None)
    for i in range(t):
        for j in range(m + t):
            assert bool(blocked[i, j]) == (j > m + i)
    window = blocked_cells(t, m, 5)
    for i in range(t):
        visible = [j for j in range(m + t) if not window[i, j]]
        assert visible == list(range(m + i - 4, m + i + 1))  # the 5 keys ending at itself


def test_attention_scores_match_the_paper_formula():
    """P[i, j] = softmax_j((q_i+u)·k_j + (q_i+v)·W_r R_{M+i-j}) / sqrt(Dh), computed by hand."""
    model = tiny_model(clamp_len=3)
    attn = model.transformer.layers[0].dec_attn
    b, t, m, d = 2, 3, 4, 16
    h, mem = torch.randn(b, t, d), torch.randn(b, m, d)
    seen = []
    with torch.no_grad():
        distances = torch.arange(m + t - 1, -1, -1.0).clamp(max=3)
        attn(h, model.transformer.pos_emb(distances), mem, blocked_cells(t, m, None), sink=seen.append)
        q, k, _ = attn.qkv_net(torch.cat([mem, h], 1)).chunk(3, -1)
        q = q[:, m:].view(b, t, 2, 8)
        k = k.view(b, m + t, 2, 8)
        inv_freq = model.transformer.pos_emb.inv_freq
        for bi in range(b):
            for n in range(2):
                for i in range(t):
                    scores = []
                    for j in range(m + i + 1):
                        dist = torch.tensor([float(min(m + i - j, 3))])
                        r = attn.r_net(sinusoid(dist, inv_freq)).view(2, 8)[n]
                        s = (q[bi, i, n] + attn.r_w_bias[n]) @ k[bi, j, n] + (q[bi, i, n] + attn.r_r_bias[n]) @ r
                        scores.append(s / math.sqrt(8))
                    expected = torch.softmax(torch.stack(scores), 0)
                    got = seen[0][bi, n, i]
                    torch.testing.assert_close(got[: m + i + 1], expected, atol=1e-5, rtol=1e-5)
                    assert torch.all(got[m + i + 1:] == 0)


def test_rows_sum_to_one_and_future_is_zero():
    model = tiny_model(same_length=True)
    ids = torch.randint(0, 40, (2, 3))
    probs, out = capture_probs(model, ids, model.transformer.empty_mems(2))
    probs2, _ = capture_probs(model, ids, out.mems)
    for p in list(probs.values()) + list(probs2.values()):
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        t, k = p.shape[-2:]
        assert torch.all(p[..., blocked_cells(t, k - t, 4)] == 0)


def test_memory_is_the_last_mem_len_layer_inputs():
    model = tiny_model()
    ids = torch.randint(0, 40, (2, 3))
    inputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
             for layer in model.transformer.layers]
    first = model(ids, model.transformer.empty_mems(2))
    second = model(ids.flip(1), first.mems)
    for h in hooks:
        h.remove()
    for n in range(2):
        assert torch.equal(first.mems[n], inputs[n])  # 3 < mem_len: everything is kept
        expected = torch.cat([inputs[n], inputs[2 + n]], 1)[:, -4:]
        assert torch.equal(second.mems[n], expected)
        assert not second.mems[n].requires_grad


def test_segments_with_memory_equal_one_long_pass():
    """With mem_len >= the text, reading it in segments gives the outputs of reading it at once."""
    model = tiny_model(mem_len=12)
    ids = torch.randint(0, 40, (2, 9))
    whole = model(ids, model.transformer.empty_mems(2)).log_probs
    mems, parts = model.transformer.empty_mems(2), []
    for s in range(3):
        out = model(ids[:, 3 * s:3 * s + 3], mems)
        mems = out.mems
        parts.append(out.log_probs)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)


def test_losses_are_minus_log_probs_of_targets_in_order():
    model = tiny_model()
    ids, targets = torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 5))
    log_probs = model(ids).log_probs
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 5))
    losses = model(ids, targets=targets).losses
    torch.testing.assert_close(losses, -log_probs.gather(-1, targets[..., None]).squeeze(-1))


# ----------------------------------------------------------------------------------------------
# Hugging Face compatibility


@pytest.mark.parametrize("variant", [".", "variant_b"])
def test_matches_hugging_face_reference(variant):
    folder = FIXTURES / variant
    model = TransfoXLLM.from_pretrained(folder).eval()
    ref = load_file(str(folder / "reference.safetensors"))
    ids = ref["input_ids"]
    with torch.no_grad():
        for prefix, mems in (("hf", None), ("empty", model.transformer.empty_mems(2))):
            for s in range(2):
                out = model(ids[s], mems)
                torch.testing.assert_close(out.log_probs, ref[f"{prefix}_log_probs_{s}"], atol=1e-5, rtol=1e-5)
                for n, m in enumerate(out.mems):  # Hugging Face keeps memories [M, B, D]
                    torch.testing.assert_close(m.transpose(0, 1), ref[f"{prefix}_mems_{s}_{n}"],
                                               atol=1e-5, rtol=1e-5)
                mems = out.mems


@pytest.mark.parametrize("untie_r,div_val,d_embed", [(True, 2, 16), (False, 1, 12)])
def test_save_load_round_trip_with_hugging_face_names(tmp_path, untie_r, div_val, d_embed):
    model = tiny_model(untie_r=untie_r, div_val=div_val, d_embed=d_embed)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    for name in ("transformer.word_emb.emb_layers.0.weight", "transformer.layers.0.dec_attn.qkv_net.weight",
                 "transformer.layers.1.dec_attn.r_net.weight", "transformer.layers.0.dec_attn.o_net.weight",
                 "transformer.layers.0.dec_attn.layer_norm.weight", "transformer.layers.0.pos_ff.CoreNet.0.weight",
                 "transformer.layers.0.pos_ff.CoreNet.3.bias", "crit.cluster_weight", "crit.cluster_bias",
                 "crit.out_layers.0.bias", "crit.out_projs.0", "transformer.pos_emb.inv_freq"):
        assert name in keys
    bias = "transformer.layers.0.dec_attn.r_w_bias" if untie_r else "transformer.r_w_bias"
    assert bias in keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "transfo-xl" and config["vocab_size"] == 40 and config["untie_r"] == untie_r
    again = TransfoXLLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(again(ids).log_probs, model(ids).log_probs, rtol=0, atol=0)


def test_loading_refuses_wrong_shapes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_inner"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttnmaskError, match="shape"):
        TransfoXLLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Collection and masks


def model_folder(tmp_path: Path, **kw) -> tuple[Path, list[str]]:
    words = [f"w{i}" for i in range(30)]
    lines = [" ".join(words[(7 * n + i) % 30] for i in range(5)) for n in range(12)]
    vocab = Vocabulary.build(lines)
    model = tiny_model(vocab_size=len(vocab), cutoffs=[10], **kw)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    vocab.save(folder)
    return folder, lines


def test_collection_length_defaults_to_the_trained_segment_length(tmp_path):
    """A Transformer-XL collects at the segment length it was trained with when no max_length is asked."""
    folder, _ = model_folder(tmp_path)
    adapter = load_adapter(str(folder))
    assert adapter.collection_length(None) == 128  # no recorded tgt_len: DEFAULT_MAX_LENGTH
    adapter.model.config.extra["tgt_len"] = 5
    assert adapter.collection_length(None) == 5 and adapter.collection_length(3) == 3


def test_collection_counts_follow_available_memory(tmp_path):
    folder, lines = model_folder(tmp_path)
    adapter = load_adapter(str(folder))
    assert isinstance(adapter, TransfoXLAdapter)
    stream_len = adapter.vocab.encode_lines(lines).numel() // 2
    result = collect(adapter, lines, batch_size=2, max_length=3)
    site = result.sites["decoder.self"]
    assert site.sum.shape == (2, 2, 3, 4 + 3)
    expected = np.zeros((3, 7), dtype=np.int64)
    available = 0
    for start in range(0, stream_len, 3):
        t = min(3, stream_len - start)
        expected[:t, 4 - available: 4 + t] += 2
        available = min(4, available + t)
    np.testing.assert_array_equal(site.count, expected)
    # each real query row sums to the number of (segment, stream) pairs in which it was real
    rows = site.sum.sum(-1)
    np.testing.assert_allclose(rows, np.broadcast_to(expected[:, -3:].diagonal(), rows.shape), atol=1e-9)
    # missing memory and the future got no probability
    assert np.all(site.sum[..., expected == 0] == 0)
    assert np.all(site.sum[:, :, 0, 5:] == 0) and np.all(site.sum[:, :, 1, 6:] == 0)


def test_collected_cells_are_tokens_back(tmp_path):
    """A plane column means the same distance whatever the memory: plane[i, mem_len - M + j] = P[i, j]."""
    folder, lines = model_folder(tmp_path)
    adapter = load_adapter(str(folder))
    planes = []
    with torch.inference_mode(), adapter.capture(lambda site, layer, p: planes.append(p.clone())):
        for batch in adapter.batches(lines, 2, 3):
            raw, _ = capture_probs(adapter.model, batch.inputs, adapter.mems)
            adapter.forward(batch)
            m = raw[0].shape[-1] - raw[0].shape[-2]
            plane = planes[-2]  # layer 0 of this forward
            assert torch.equal(plane[..., 4 - m:], raw[0]) and torch.all(plane[..., :4 - m] == 0)
            if len(planes) > 8:
                break


def txl_store(keep: torch.Tensor, causal: bool, beyond: str = "dense"):
    from attnmask.store.stores import MaskStore, masks_digest

    sites = {"decoder.self": SiteMask(keep.numpy(), causal)}
    return MaskStore({"digest": masks_digest(sites), "beyond": beyond}, sites)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "blocksparse"])
def test_masks_applied_in_first_segments_aligned_on_tokens_back(backend):
    """Segment key j with M memories is plane column (K - Q) - M + j, on every backend; the runtime
    computes the same outputs as the probabilities it reports."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(2, 2, 3, 7, generator=g) > 0.4) & torch.ones(3, 7, dtype=torch.bool).tril(4)
    ids = torch.randint(0, 40, (2, 3))
    with apply_masks(model, txl_store(keep, causal=True), backend="eager"):
        mems = model.transformer.empty_mems(2)
        expected = []
        for _ in range(3):  # memories 0, 3, 4
            probs, out = capture_probs(model, ids, mems)
            m = mems[0].shape[1]
            for layer, p in probs.items():
                allowed, _ = window_keep(keep[layer], Window(3, m + 3, 0, 4 - m), causal=True, cross=False,
                                         beyond="dense")
                assert torch.all(p[:, ~allowed] == 0) and torch.all(p[:, allowed] > 0)
                torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
            expected.append(out.hidden)
            mems = out.mems
    with apply_masks(model, txl_store(keep, causal=True), backend=backend), torch.inference_mode():
        mems = model.transformer.empty_mems(2)
        for want in expected:
            out = model(ids, mems)
            torch.testing.assert_close(out.hidden, want, atol=1e-5, rtol=1e-5)
            mems = out.mems
    with apply_masks(model, txl_store(keep, causal=True, beyond="error"), backend=backend):
        with pytest.raises(AttnmaskError, match="leaves the mask's 3x7 plane"):
            model(torch.randint(0, 40, (2, 5)), model.transformer.empty_mems(2))


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse"])
def test_training_gradients_of_every_backend_match_eager(backend):
    """Loss gradients through masked attention with memories, per backend, against the eager backend."""
    g = torch.Generator().manual_seed(5)
    keep = (torch.rand(2, 2, 3, 7, generator=g) > 0.4) & torch.ones(3, 7, dtype=torch.bool).tril(4)
    ids, targets = torch.randint(0, 40, (2, 3)), torch.randint(0, 40, (2, 3))
    grads = {}
    for name in ("eager", backend):
        model = tiny_model().train()
        mems = [torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
        with apply_masks(model, txl_store(keep, causal=True), backend=name):
            model(ids, mems, targets=targets).losses.mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, want in grads["eager"].items():
        torch.testing.assert_close(grads[backend][n], want, atol=1e-5, rtol=1e-4)


def test_dense_beyond_keeps_cells_outside_the_plane():
    keep = torch.zeros(1, 2, 3, dtype=torch.bool)  # plane: 1 memory, 2 queries
    aligned, _ = window_keep(keep, Window(3, 5, 0, 1 - 2), causal=False, cross=False, beyond="dense")
    assert aligned[0, :2, 0].all()  # two tokens further back than the plane reaches
    assert aligned[0, 2].all()  # a query row beyond the plane
    assert not aligned[0, :2, 1:4].any()  # inside the plane: as compiled


def test_compile_and_train_with_masks_round_trip(tmp_path):
    folder, lines = model_folder(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    adapter = load_adapter(str(folder))
    result = collect(adapter, lines, batch_size=2, max_length=3)
    patterns = write_patterns(tmp_path / "p.zarr", result.sites, {"model": adapter.identity(),
                                                                   "data": {"name": "lines"}, "max_length": 3})
    sites, attrs = compile_sites(patterns, CompileSettings(tau=0.5))
    keep, count = sites["decoder.self"].keep, result.sites["decoder.self"].count
    eligible = (count > 0) & np.tri(3, 7, 4, dtype=bool)
    assert keep.shape == (2, 2, 3, 7)
    assert np.all(keep[:, :, ~np.tri(3, 7, 4, dtype=bool)] == False)  # noqa: E712 - the future is never kept
    pruned = (~keep & eligible).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(pruned, [math.floor(0.5 * 2 * eligible.sum())] * 2)
    masks = write_masks(tmp_path / "m.zarr", sites, attrs)

    summary = train_lm(folder, text, out=tmp_path / "tuned", masks=tmp_path / "m.zarr", steps=3,
                       batch_size=2, tgt_len=3)
    assert summary["steps"] == 3 and summary["masks"] == masks.digest
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved["attnmask"]["digest"] == masks.digest and saved["tgt_len"] == 3
    dense = eval_lm(tmp_path / "tuned", text, masks="none", batch_size=2)
    masked = eval_lm(tmp_path / "tuned", text, masks=tmp_path / "m.zarr", batch_size=2)
    assert math.isfinite(dense["perplexity"]) and masked["perplexity"] != dense["perplexity"]
    recorded = eval_lm(tmp_path / "tuned", text, batch_size=2)  # the masks it was trained with
    assert recorded["masks"] == masks.digest and recorded["perplexity"] == masked["perplexity"]
    with pytest.raises(AttnmaskError, match="already exists"):
        train_lm(folder, text, out=tmp_path / "tuned", steps=1, batch_size=2)


def test_lm_iterator_reads_next_tokens():
    vocab = Vocabulary.build(["a b, c", "b c"])
    stream = vocab.encode_lines(["a b, c", "", "b c d"])
    assert [vocab.symbols[i] for i in stream] == ["a", "b", ",", "c", "<eos>", "b", "c", "<unk>", "<eos>"]
    streams = batchify(stream, 2)
    assert streams.tolist() == [stream[:4].tolist(), stream[4:8].tolist()]
    pairs = list(segments(streams, 2))
    assert [x.shape[1] for x, _ in pairs] == [2, 1]
    assert torch.equal(pairs[0][0], streams[:, 0:2]) and torch.equal(pairs[0][1], streams[:, 1:3])
    assert torch.equal(pairs[1][0], streams[:, 2:3]) and torch.equal(pairs[1][1], streams[:, 3:4])


def test_cli_trains_collects_and_evaluates_a_language_model(tmp_path):
    from typer.testing import CliRunner

    from attnmask.cli import app

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the {w} saw a {v} ." for w in "abcdef" for v in "xyz") + "\n")
    runner = CliRunner()
    model = tmp_path / "lm"
    res = runner.invoke(app, ["train", "none", str(text), "--task", "lm", "--config", "small", "--masks", "none",
                              "--steps", "2", "--batch-size", "2", "--max-length", "8", "--out", str(model),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((model / "config.json").read_text())["model_type"] == "transfo-xl"
    store = tmp_path / "p.zarr"
    res = runner.invoke(app, ["collect", str(model), str(text), "--max-length", "8", "--batch-size", "2",
                              "--out", str(store), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    from attnmask.store.stores import read_patterns

    site = read_patterns(store).sites["decoder.self"]
    assert site.sum.shape == (4, 4, 8, 32 + 8) and site.count[0, 0] < site.count[0, 32]
    res = runner.invoke(app, ["eval", str(model), str(text), "--task", "lm", "--batch-size", "2",
                              "--device", "cpu"])
    assert res.exit_code == 0 and "perplexity" in res.output, res.output


def test_a_learning_rate_that_is_not_positive_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("a b c\n" * 20)
    with pytest.raises(AttnmaskError, match="--lr must be positive"):
        train_lm(None, tmp_path / "t.txt", out=tmp_path / "m", config="small", lr=0.0, steps=1)


# ----------------------------------------------------------------------------------------------
# Hugging Face vocabularies (vocab.pkl / vocab.bin), read without running pickled code


def saved_tokenizer_dict(symbols: list[str], monkeypatch) -> dict:
    """What transformers' TransfoXLTokenizer.save_vocabulary pickles: the tokenizer's whole `__dict__`
    (counter, special, ..., idx2sym, sym2idx, eos_idx) including its helper objects: compiled regexes,
    sacremoses normalisers (a stand-in class registered as `sacremoses`, which is not installed here)
    and tokenizers.AddedToken."""
    import re
    import sys
    import types
    from collections import Counter, OrderedDict

    from tokenizers import AddedToken

    sacremoses = types.ModuleType("sacremoses")

    class MosesPunctNormalizer:
        def __init__(self, lang):
            self.lang, self.substitutions = lang, [(re.compile(r"\s+"), " ")]

    MosesPunctNormalizer.__module__, MosesPunctNormalizer.__qualname__ = "sacremoses", "MosesPunctNormalizer"
    sacremoses.MosesPunctNormalizer = MosesPunctNormalizer
    monkeypatch.setitem(sys.modules, "sacremoses", sacremoses)
    return {"counter": Counter({s: 100 - i for i, s in enumerate(symbols)}), "special": ["<eos>"], "min_freq": 0,
            "max_size": None, "lower_case": False, "delimiter": None, "vocab_file": None, "never_split": ["<eos>"],
            "punctuation_symbols": '!"#$%&()*+,-./\\:;<=>?@[\\]^_`{|}~',
            "punction_without_space_before_pattern": re.compile(r"[^\s][!,.]"),
            "moses_punct_normalizer": MosesPunctNormalizer("en"), "language": "en",
            "idx2sym": list(symbols), "sym2idx": OrderedDict((s, i) for i, s in enumerate(symbols)), "eos_idx": 0,
            "_added_tokens_decoder": {len(symbols): AddedToken("<formula>", special=True)}}


def hf_folder(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """model_folder with its vocab.txt replaced by nothing; the Hugging Face word order: <eos> first,
    <unk> among the words (as in transfo-xl-wt103)."""
    folder, lines = model_folder(tmp_path)
    words = [s for s in Vocabulary.load(folder).symbols if s not in ("<eos>", "<unk>")]
    (folder / "vocab.txt").unlink()
    return folder, lines, ["<eos>"] + words[:5] + ["<unk>"] + words[5:]


def test_hugging_face_vocab_pkl_folder_works_as_is(tmp_path, monkeypatch):
    import pickle

    folder, lines, symbols = hf_folder(tmp_path)
    with open(folder / "vocab.pkl", "wb") as fh:
        pickle.dump(saved_tokenizer_dict(symbols, monkeypatch), fh)
    monkeypatch.delitem(__import__("sys").modules, "sacremoses")  # reading needs none of it
    vocab = Vocabulary.load(folder)
    assert vocab.symbols == symbols and (vocab.eos, vocab.unk) == (0, 6)
    words = lines[0].split()
    assert vocab.encode_lines([lines[0] + " never-seen"]).tolist() == \
        [symbols.index(w) for w in words] + [6, 6, 6, 0]  # "never", "-", "seen" are unknown
    result = collect(load_adapter(str(folder)), lines, batch_size=2, max_length=3)
    assert result.sequences > 0


def test_hugging_face_vocab_bin_is_read_weights_only(tmp_path, monkeypatch):
    from collections import Counter, OrderedDict

    folder, _, symbols = hf_folder(tmp_path)
    torch.save({"counter": Counter(symbols), "special": ["<eos>"], "idx2sym": symbols,
                "sym2idx": OrderedDict((s, i) for i, s in enumerate(symbols)), "eos_idx": 0}, folder / "vocab.bin")
    assert Vocabulary.load(folder).symbols == symbols
    torch.save({"sym2idx": {s: i for i, s in enumerate(symbols)}}, folder / "vocab.bin")  # idx2sym rebuilt
    assert Vocabulary.load(folder).symbols == symbols
    torch.save({"idx2sym": symbols, "sym2idx": {s: i + 1 for i, s in enumerate(symbols)}}, folder / "vocab.bin")
    with pytest.raises(AttnmaskError, match="disagree"):
        Vocabulary.load(folder)


class _Exploit:
    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.witness}",)


@pytest.mark.parametrize("name", ["vocab.pkl", "vocab.bin"])
def test_malicious_vocabulary_is_refused_without_running(tmp_path, name):
    """A pickle whose reduce calls os.system: one error line, and the command never ran."""
    import pickle

    from typer.testing import CliRunner

    from attnmask.cli import app

    folder, lines, symbols = hf_folder(tmp_path)
    witness = tmp_path / "ran"
    payload = {"idx2sym": symbols, "extra": _Exploit(witness)}
    if name == "vocab.pkl":
        (folder / name).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, folder / name)
    with pytest.raises(AttnmaskError, match="refusing to read it|not a Transformer-XL vocabulary"):
        Vocabulary.load(folder)
    (tmp_path / "text.txt").write_text("\n".join(lines))
    r = CliRunner().invoke(app, ["collect", str(folder), str(tmp_path / "text.txt"), "--out", str(tmp_path / "p.zarr")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
    assert "system" in r.stderr
    assert not witness.exists()
    (folder / name).write_bytes(b"\x80\x04truncated")
    with pytest.raises(AttnmaskError, match="not a Transformer-XL vocabulary"):
        Vocabulary.load(folder)
