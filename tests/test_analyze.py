"""Head statistics against hand-made patterns whose statistics are known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attnmask.analysis.analyze import (analyze_store, concentration, js_distances, mask_summary, parse_indices,
                              row_distributions, site_key_offset, site_plane, site_stats, store_stats)
from attnmask.errors import AttnmaskError
from attnmask.store.stores import (PatternStore, SiteMask, SitePatterns, MaskStore, TokenClasses, patterns_digest,
                            read_patterns, write_masks, write_patterns)

SEQUENCES = 3


def site_from_rows(rows: np.ndarray, causal: bool = False, count: np.ndarray | None = None,
                   attrs: dict | None = None) -> SitePatterns:
    """A site whose every head h of layer 0 has row distributions rows[h] ([H, Q, K]), seen SEQUENCES times."""
    rows = np.asarray(rows, dtype=np.float64)
    if count is None:
        count = np.full(rows.shape[1:], SEQUENCES, np.int64)
    return SitePatterns(rows[None] * count, count, causal, attrs or {})


def one_head(site: SitePatterns, head: int = 0, key_offset: int | None = None):
    offset = site_key_offset(site) if key_offset is None else key_offset
    stats, _ = site_stats("encoder.self", site, offset)
    return stats[head]


def diagonal(q: int) -> np.ndarray:
    return np.eye(q)


def uniform(q: int, k: int | None = None) -> np.ndarray:
    k = q if k is None else k
    return np.full((q, k), 1.0 / k)


def first_token(q: int) -> np.ndarray:
    rows = np.zeros((q, q))
    rows[:, 0] = 1
    return rows


def share(level: float, cells: int, hot: int | None = None) -> float:
    """Share for `hot` equal hot cells (all cells when None) out of `cells` eligible cells."""
    hot = cells if hot is None else hot
    return math.ceil(level * hot - 1e-9) / cells


Q = 8


def test_pure_diagonal():
    s = one_head(site_from_rows([diagonal(Q)]))
    assert s.entropy == 0.0
    assert s.mean_distance == 0.0
    assert s.diagonal == pytest.approx(1.0)
    assert s.previous == 0.0 and s.next == 0.0
    assert s.first == pytest.approx(1 / Q)  # only query 0's own position is the first key
    assert s.entropy_uniform == pytest.approx(math.log(Q))
    # Q hot cells of equal mass among Q*Q eligible ones
    assert s.share50 == pytest.approx(share(0.5, Q * Q, Q))
    assert s.share90 == pytest.approx(share(0.9, Q * Q, Q))
    assert s.share99 == pytest.approx(Q / (Q * Q))


def test_uniform_rows():
    s = one_head(site_from_rows([uniform(Q)]))
    assert s.entropy == pytest.approx(math.log(Q))
    assert s.entropy == pytest.approx(s.entropy_uniform)
    # E|q - k| for q, k independent uniform on 0..Q-1 is (Q^2 - 1) / (3Q)
    assert s.mean_distance == pytest.approx((Q * Q - 1) / (3 * Q))
    assert s.first == pytest.approx(1 / Q)
    assert s.diagonal == pytest.approx(1 / Q)
    # the first row has no previous key and the last no next key
    assert s.previous == pytest.approx((Q - 1) / Q / Q)
    assert s.next == pytest.approx((Q - 1) / Q / Q)
    assert s.share50 == pytest.approx(share(0.5, Q * Q))
    assert s.share90 == pytest.approx(share(0.9, Q * Q))
    assert s.share99 == pytest.approx(share(0.99, Q * Q))


def test_all_mass_on_first_token():
    s = one_head(site_from_rows([first_token(Q)]))
    assert s.first == pytest.approx(1.0)
    assert s.entropy == 0.0
    assert s.mean_distance == pytest.approx((Q - 1) / 2)  # mean of q over the rows
    assert s.diagonal == pytest.approx(1 / Q)
    assert s.previous == pytest.approx(1 / Q)  # query 1's previous key is key 0
    assert s.next == 0.0


def test_causal_site_uniform_over_the_past():
    rows = np.tril(np.ones((Q, Q)))
    rows /= rows.sum(1, keepdims=True)
    s = one_head(site_from_rows([rows], causal=True))
    q = np.arange(Q)
    assert s.entropy == pytest.approx(np.mean(np.log(q + 1)))
    assert s.entropy == pytest.approx(s.entropy_uniform)  # uniform over the causal band is the maximum
    assert s.first == pytest.approx(np.mean(1 / (q + 1)))
    assert s.diagonal == pytest.approx(np.mean(1 / (q + 1)))
    assert s.next == 0.0
    assert s.mean_distance == pytest.approx(np.mean(q / 2))
    # eligible cells are the band only: Q (Q + 1) / 2; all of them are needed for 99 % of the mass
    band = Q * (Q + 1) // 2
    assert s.share99 > 0.9 and s.share99 <= 1.0
    assert site_plane(np.ones((Q, Q), np.int64), True).eligible.sum() == band


def test_rectangular_cross_site_is_relative_to_the_same_index():
    q, k = 3, 5
    rows = np.zeros((q, k))
    rows[np.arange(q), np.arange(q) + 1] = 1  # target q attends to source q + 1
    site = site_from_rows([rows, uniform(q, k)])
    stats, _ = site_stats("decoder.cross", site, site_key_offset(site))
    nxt, uni = stats
    assert site_key_offset(site) == 0
    assert nxt.next == pytest.approx(1.0) and nxt.diagonal == 0.0 and nxt.previous == 0.0
    assert nxt.mean_distance == pytest.approx(1.0)
    assert uni.entropy == pytest.approx(math.log(k))
    assert uni.first == pytest.approx(1 / k)
    assert uni.mean_distance == pytest.approx(np.mean(np.abs(np.arange(q)[:, None] - np.arange(k)[None])))


@pytest.mark.parametrize("attrs", [{"key_offset": 6}, {}])
def test_memory_offset_plane(attrs):
    """Transformer-XL: 6 memory keys first, then 4 segment keys; query q sits at key column 6 + q."""
    mem, tgt = 6, 4
    own = np.zeros((tgt, mem + tgt))
    own[np.arange(tgt), mem + np.arange(tgt)] = 1
    back = np.zeros((tgt, mem + tgt))
    back[np.arange(tgt), mem + np.arange(tgt) - 1] = 1  # query 0's previous key is the last memory
    count = np.tri(tgt, mem + tgt, mem).astype(np.int64) * SEQUENCES
    site = site_from_rows([own, back], causal=True, count=count, attrs=attrs)
    assert site_key_offset(site) == mem  # from the attribute, or K - Q for a causal plane
    stats, _ = site_stats("decoder.self", site, site_key_offset(site))
    own_stats, back_stats = stats
    assert own_stats.diagonal == pytest.approx(1.0) and own_stats.mean_distance == 0.0
    assert back_stats.previous == pytest.approx(1.0) and back_stats.mean_distance == pytest.approx(1.0)
    assert own_stats.first == 0.0  # key column 0 is the oldest memory
    assert own_stats.entropy_uniform == pytest.approx(np.mean(np.log(mem + 1 + np.arange(tgt))))


def test_explicit_key_offset_overrides_the_default():
    site = site_from_rows([uniform(4, 10)], attrs={"key_offset": 2})
    assert site_key_offset(site) == 2
    with pytest.raises(AttnmaskError, match="key_offset"):
        site_key_offset(site_from_rows([uniform(4, 10)], attrs={"key_offset": -1}))
    with pytest.raises(AttnmaskError, match="outside"):
        site_plane(np.ones((4, 10), np.int64), False, 10)


def test_rows_are_weighted_by_how_often_the_query_occurred():
    """Sequences of lengths 4 and 2: queries 0, 1 occur twice, 2, 3 once, so W = [1/3, 1/3, 1/6, 1/6]."""
    lengths = [4, 2]
    total = np.zeros((4, 4))
    count = np.zeros((4, 4), np.int64)
    for n in lengths:
        rows = np.zeros((4, 4))
        rows[:2, 0] = 1  # queries 0 and 1 look at the first token ...
        rows[np.arange(2, n), np.arange(2, n)] = 1  # ... later queries at themselves
        total[:n, :n] += rows[:n, :n]
        count[:n, :n] += 1
    s = one_head(SitePatterns(total[None, None], count, False))
    assert s.first == pytest.approx(2 / 3)
    assert s.diagonal == pytest.approx(1 / 3 + 1 / 6 + 1 / 6)


def test_padded_rows_are_renormalized():
    """Uniform attention over 4 and over 2 real keys: A[0] = [.375, .375, .25, .25] -> P[0] = [.3, .3, .2, .2]."""
    total = np.zeros((4, 4))
    count = np.zeros((4, 4), np.int64)
    for n in (4, 2):
        total[:n, :n] += 1 / n
        count[:n, :n] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), 0)
    P = row_distributions(mean, count > 0)
    np.testing.assert_allclose(P[0], [0.3, 0.3, 0.2, 0.2])
    np.testing.assert_allclose(P.sum(1), 1.0)


def test_concentration_of_a_skewed_row():
    """One row with masses .6, .3, .1: 50 % needs 1 cell, 90 % 2 cells, 99 % 3 cells of 3."""
    P = np.array([[[0.1, 0.6, 0.3]]])
    out = concentration(P, np.array([1.0]), np.ones((1, 3), bool))
    np.testing.assert_allclose(out[0], [1 / 3, 2 / 3, 1.0])


def test_js_distances_find_redundant_heads():
    heads = np.stack([diagonal(Q), diagonal(Q), first_token(Q), uniform(Q)])
    site = site_from_rows(heads)
    stats, js = site_stats("encoder.self", site)
    js = js[0]
    assert js[0, 1] == pytest.approx(0.0, abs=1e-7)
    # diagonal vs first token: identical in row 0, disjoint (1 bit) in the other Q - 1 rows
    assert js[0, 2] == pytest.approx(math.sqrt((Q - 1) / Q))
    np.testing.assert_allclose(js, js.T)
    assert (js >= 0).all() and (js <= 1).all()
    assert stats[0].nearest_head == 1 and stats[1].nearest_head == 0
    assert stats[0].nearest_js == pytest.approx(0.0, abs=1e-7)
    disjoint = js_distances(np.stack([diagonal(2), diagonal(2)[::-1]]), np.array([0.5, 0.5]))
    assert disjoint[0, 1] == pytest.approx(1.0)


def test_mask_summary_sparsity_and_kept_mass(tmp_path):
    rows = np.tril(np.ones((Q, Q)))
    rows /= rows.sum(1, keepdims=True)
    patterns_site = site_from_rows([rows, diagonal(Q)], causal=True)
    keep = np.broadcast_to(np.eye(Q, dtype=bool), (1, 2, Q, Q)).copy()
    masks = MaskStore({}, {"decoder.self": SiteMask(keep, True)})
    patterns = PatternStore({}, {"decoder.self": patterns_site})
    result = mask_summary(masks, patterns)["sites"]["decoder.self"]
    band = Q * (Q + 1) // 2
    uniform_head, diagonal_head = result["heads"]
    assert uniform_head["eligible"] == band and uniform_head["kept"] == Q
    assert uniform_head["plane_sparsity"] == pytest.approx(1 - Q / band)
    assert uniform_head["mass_kept"] == pytest.approx(np.mean(1 / (np.arange(Q) + 1)))
    assert diagonal_head["mass_kept"] == pytest.approx(1.0)
    assert result["plane_sparsity"] == pytest.approx(1 - Q / band)
    alone = mask_summary(masks)["sites"]["decoder.self"]
    assert alone["mass_kept"] is None and alone["heads"][0]["eligible"] == band
    assert alone["plane_sparsity"] == pytest.approx(1 - Q / band)
    wrong = PatternStore({}, {"decoder.self": site_from_rows([diagonal(Q - 1)] * 2, causal=True)})
    with pytest.raises(AttnmaskError, match="has shape"):
        mask_summary(masks, wrong)


def test_store_round_trip_and_json(tmp_path):
    site = site_from_rows([diagonal(Q), uniform(Q)])
    write_patterns(tmp_path / "p", {"encoder.self": site}, {"model": {"name": "hand-made"}, "data": {"name": "rows"},
                                                             "max_length": Q})
    result = analyze_store(str(tmp_path / "p"))
    assert result["kind"] == "patterns"
    heads = result["sites"]["encoder.self"]["heads"]
    assert heads[0]["diagonal"] == pytest.approx(1.0) and heads[1]["entropy"] == pytest.approx(math.log(Q))
    json.dumps(result)  # plain JSON
    with pytest.raises(AttnmaskError, match="not in the store"):
        store_stats(PatternStore({}, {"encoder.self": site}), "decoder.cross")
    keep = np.ones((1, 2, Q, Q), bool)
    keep[0, 0, 0, 1] = False
    write_masks(tmp_path / "m", {"encoder.self": SiteMask(keep, False)}, {})
    masks = analyze_store(str(tmp_path / "m"), patterns=str(tmp_path / "p"))
    assert masks["kind"] == "masks"
    assert masks["sites"]["encoder.self"]["heads"][0]["kept"] == Q * Q - 1
    assert masks["sites"]["encoder.self"]["heads"][0]["mass_kept"] == pytest.approx(1.0)  # P[0, 1] = 0
    assert masks["sites"]["encoder.self"]["heads"][1]["mass_kept"] == pytest.approx(1.0)
    with pytest.raises(AttnmaskError, match="mask store"):
        analyze_store(str(tmp_path / "p"), patterns=str(tmp_path / "p"))


def test_parse_indices():
    assert parse_indices(None, 4, "layers") == [0, 1, 2, 3]
    assert parse_indices("0,3", 4, "layers") == [0, 3]
    assert parse_indices("1-2, 0", 4, "heads") == [0, 1, 2]
    with pytest.raises(AttnmaskError, match="out of range"):
        parse_indices("4", 4, "layers")
    with pytest.raises(AttnmaskError, match="expects numbers"):
        parse_indices("a", 4, "heads")


# ----------------------------------------------------------------------------------------------
# Attention to token classes (collect --token-classes)

PUNCTUATED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot", ".", ",", "!"]
PUNCTUATED_TEXTS = ["good film.", "bad plot, bad film!", "film", "plot. good, good film, bad plot!! film film bad",
                    "!", "good good good"]
CLASS_OF = {"[CLS]": 0, "[SEP]": 1, ".": 2, ",": 2, "!": 2}


@pytest.fixture(scope="module")
def punctuated_bert(tmp_path_factory):
    """A random 2-layer, 2-head BERT whose word-level vocabulary has punctuation."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("punctuated-bert")
    (folder / "vocab.txt").write_text("\n".join(PUNCTUATED_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(PUNCTUATED_VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def expected_class_mass(folder, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The class sums computed independently: each text alone (no padding) through transformers' own eager
    attention with output_attentions, its keys classed by their token strings."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    mass, tokens = np.zeros((2, 2, 4)), np.zeros(4, np.int64)
    for text in texts:
        enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            attentions = torch.stack(model(**enc, output_attentions=True).attentions)[:, 0]  # [L, H, n, n]
        onehot = np.eye(4)[[CLASS_OF.get(t, 3) for t in tok.convert_ids_to_tokens(enc["input_ids"][0])]]
        mass += np.einsum("lhqk,kc->lhc", attentions.double().numpy(), onehot)
        tokens += onehot.sum(0).astype(np.int64)
    return mass, tokens


def test_token_classes_sum_the_attention_each_class_receives(punctuated_bert, tmp_path):
    from attnmask.collect.patterns import collect
    from attnmask.models.hf import HuggingFaceAdapter

    adapter = HuggingFaceAdapter.load(str(punctuated_bert))
    assert adapter.token_classes() == ["[CLS]", "[SEP]", "punctuation", "other"]
    # batches of 4 with padding, and one text truncated at 8 tokens
    result = collect(adapter, PUNCTUATED_TEXTS, batch_size=4, max_length=8, token_classes=True)
    site = result.sites["encoder.self"]
    classes = site.token_classes
    mass, tokens = expected_class_mass(punctuated_bert, PUNCTUATED_TEXTS, 8)
    np.testing.assert_allclose(classes.mass, mass, atol=1e-5)
    np.testing.assert_array_equal(classes.tokens, tokens)
    # every real query's attention is split among the classes; [CLS] sits at position 0, so it receives the
    # mass of the first key column of the positional sums
    np.testing.assert_allclose(classes.mass.sum(-1), site.count.max(1).sum(), rtol=1e-6)
    np.testing.assert_allclose(classes.mass[..., 0], site.sum[..., :, 0].sum(-1), rtol=1e-6)
    without = collect(adapter, PUNCTUATED_TEXTS, batch_size=4, max_length=8)
    assert without.sites["encoder.self"].token_classes is None
    np.testing.assert_array_equal(without.sites["encoder.self"].sum, site.sum)  # positions unchanged

    attrs = {"model": adapter.identity(), "data": {"name": "texts"}, "max_length": 8}
    write_patterns(tmp_path / "p", result.sites, attrs)
    back = read_patterns(tmp_path / "p").sites["encoder.self"]
    assert back.token_classes.names == classes.names and "token_classes" not in back.attrs
    np.testing.assert_array_equal(back.token_classes.mass, classes.mass)
    analyzed = analyze_store(str(tmp_path / "p"))["sites"]["encoder.self"]
    shares = classes.mass / classes.mass.sum(-1, keepdims=True)
    assert analyzed["heads"][3]["token_classes"]["[SEP]"] == pytest.approx(shares[1, 1, 1])
    assert analyzed["token_shares"]["punctuation"] == pytest.approx(tokens[2] / tokens.sum())
    json.dumps(analyzed)


def test_stores_without_token_classes_stay_valid_and_keep_their_digest(tmp_path):
    site = site_from_rows([diagonal(Q), uniform(Q)])
    plain = write_patterns(tmp_path / "plain", {"encoder.self": site}, {"model": {"name": "m"},
                                                                        "data": {"name": "d"}, "max_length": Q})
    assert read_patterns(tmp_path / "plain").sites["encoder.self"].token_classes is None
    assert analyze_store(str(tmp_path / "plain"))["sites"]["encoder.self"]["token_shares"] is None
    assert plain.attrs["digest"] == patterns_digest({"encoder.self": SitePatterns(site.sum, site.count, False)})
    with_classes = SitePatterns(site.sum, site.count, False, {},
                                TokenClasses(["[CLS]", "other"], np.ones((1, 2, 2)), np.array([1, 7])))
    assert patterns_digest({"encoder.self": with_classes}) != plain.attrs["digest"]  # the classes are covered
    bad = SitePatterns(site.sum, site.count, False, {}, TokenClasses(["[CLS]"], np.ones((1, 2, 2)), np.array([1])))
    with pytest.raises(AttnmaskError, match="token_class_mass"):
        write_patterns(tmp_path / "bad", {"encoder.self": bad}, {"model": {"name": "m"}, "data": {"name": "d"},
                                                                 "max_length": Q})
    assert not (tmp_path / "bad").exists()


def test_collect_token_classes_on_the_command_line(punctuated_bert, tmp_path):
    from typer.testing import CliRunner

    from attnmask.cli import app

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(PUNCTUATED_TEXTS) + "\n")
    runner = CliRunner()
    out = tmp_path / "p.zarr"
    result = runner.invoke(app, ["collect", str(punctuated_bert), str(texts), "--max-length", "8",
                                 "--out", str(out), "--token-classes", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_patterns(out).sites["encoder.self"].token_classes.names[-1] == "other"
    table = runner.invoke(app, ["analyze", str(out)])
    assert table.exit_code == 0 and "[SEP]" in table.stdout and "punctuation" in table.stdout
    refused = runner.invoke(app, ["collect", str(punctuated_bert), str(texts), "--out", str(tmp_path / "q.zarr"),
                                  "--max-length", "8", "--token-classes", "--checkpoint-every", "1", "--device", "cpu"])
    assert refused.exit_code == 1 and refused.output.startswith("error:") and "--token-classes" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "q.zarr").exists()
