"""Masks on grouped-query, rotary decoders (issue 28 item 6): tiny random Llama and Qwen2 models (4 query
heads sharing 2 key/value heads) with masks from `attnmask collect` -> `attnmask compile` (on the tiny
Llama: see mask_stores), applied -> generate, in every backend, on left-padded batches, against a float64
masked reference.

tests/test_left_padding.py already shows, on synthetic masks, that a left-padded row equals its sequence
alone and that batched generation equals generating one prompt at a time; here the masks are the ones the
commands produce from collected attention (element-wise, blocks of an element store, and a tile store),
and the outputs are checked against attention written out independently of the runtime:

    reference[b, h, i] = softmax over keys j of q_i . k_j * scale, in float64, over the keys with
    keep[layer, h, p(i), p(j)] and p(j) <= p(i) and j a real token of sequence b,

p the position within the sequence (slot minus the row's left padding), keep the store's bits. Prefill
logits equal the reference; and each greedy step of `generate` (key/value cache) gives the logits of the
masked full forward over the tokens generated so far, which also equal the reference.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.models.families import apply_masks
from attnmask.runtime.backends import BACKENDS
from attnmask.store.stores import read_masks
from tests.conftest import make_tokenizer, random_texts

PLANE = 64
PROMPTS = (60, 41, 17)  # a left-padded batch; + NEW tokens stays within the plane
NEW = 4
REFERENCE = "attnmask_test_float64_reference"
MASKS = {"elements": ((), ("--block-size", "1")), "blocks": ((), ("--block-size", "16")),
         "tiles": (("--block-size", "16"), ("--block-size", "16"))}
"""{variant: (collect's extra options, compile's)}: tau 0.5 each."""


def decoder(family: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, pad_token_id=0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    model.generation_config.eos_token_id = None  # every prompt generates NEW tokens
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def mask_stores(tmp_path_factory):
    """{variant: the mask store path} from the CLI on the saved tiny Llama and 40 random texts. Both families
    run these masks (same layers and heads): transformers 5 loads a Qwen2 folder's tokenizer as
    Qwen2Tokenizer whatever tokenizer_config.json says, which turns the test's word-level vocabulary into
    two tokens a text, so the Qwen2 folder cannot be collected on with it."""
    root = tmp_path_factory.mktemp("gqa")
    folder = root / "model"
    make_tokenizer(folder)
    decoder("llama").save_pretrained(folder)
    (root / "texts.txt").write_text("\n".join(random_texts(40, lo=40, hi=80)) + "\n")
    runner, out = CliRunner(), {}
    for name, (collect_options, compile_options) in MASKS.items():
        patterns, masks = root / f"{name}-patterns.zarr", root / f"{name}-masks.zarr"
        result = runner.invoke(app, ["collect", str(folder), str(root / "texts.txt"), "--out", str(patterns),
                                     "--max-length", str(PLANE), "--batch-size", "8", *collect_options])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["compile", str(patterns), "--tau", "0.5", "--out", str(masks), *compile_options])
        assert result.exit_code == 0, result.output
        out[name] = masks
    return out


def left_padded(lengths, seed=0):
    """(input_ids [B, T], attention_mask [B, T]) of random prompts, padded on the left with id 0."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(1, 40, (n,), generator=g)
        mask[b, t - n:] = 1
    return ids, mask


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The docstring's reference on one call: query [B, H, q, D], key/value [B, G, k, D] (G key heads, each
    shared by H / G query heads), transformers' eager mask (0 where allowed); out [B, q, H, D]."""
    planes = module._reference_keep  # bool [L, H, P, P]
    batch, heads, q, _ = query.shape
    k = key.shape[2]
    group = heads // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    real = attention_mask[:, 0, -1, :] == 0  # [B, k]: the keys the last query, a real token, sees
    pad = (~real).int().cumprod(-1).sum(-1)  # left padding of each row
    key_pos = torch.arange(k)[None, :] - pad[:, None]  # [B, k]
    query_pos = torch.arange(k - q, k)[None, :] - pad[:, None]  # [B, q]
    keep = planes[module.layer_idx][:, query_pos.clamp(min=0)[:, :, None], key_pos.clamp(min=0)[:, None, :]]
    keep = keep.permute(1, 0, 2, 3)  # [B, H, q, k]
    allowed = keep & (key_pos[:, None, None, :] <= query_pos[:, None, :, None]) & real[:, None, None, :]
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # padding queries see nothing: 0
    return (probs @ value).transpose(1, 2), probs


@pytest.fixture(scope="module")
def registered():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(REFERENCE, reference_attention)
    AttentionMaskInterface.register(REFERENCE, eager_mask)


def reference_model(model, masks):
    """A float64 copy of `model` whose attention is `reference_attention` over the store's keep bits."""
    import copy

    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation(REFERENCE)
    keep = torch.from_numpy(read_masks(masks).sites["decoder.self"].keep)
    for layer in ref.model.layers:
        layer.self_attn._reference_keep = keep
    return ref


def logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", MASKS)
def test_prefill_and_greedy_steps_equal_the_float64_masked_reference(family, mask_stores, variant, backend, registered):
    model = decoder(family)
    ref = reference_model(model, mask_stores[variant])
    ids, mask = left_padded(PROMPTS)
    real = mask.bool()
    dense = logits(model, ids, mask)
    settings = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True, use_cache=True)
    with torch.no_grad(), apply_masks(model, mask_stores[variant], backend=backend) as handle:
        assert handle.backend == backend
        prefill = logits(model, ids, mask)
        generated = model.generate(input_ids=ids, attention_mask=mask, **settings)
        whole = torch.cat([mask, torch.ones(len(PROMPTS), NEW, dtype=torch.long)], 1)
        full = logits(model, generated.sequences, whole)  # the masked forward without a cache
    want = logits(ref, ids, mask)
    assert (prefill[real] - want[real]).abs().max() <= 1e-4
    assert (prefill[real] - dense[real]).abs().max() > 1e-2  # the masks change the outputs
    t = ids.shape[1]
    steps = torch.stack(generated.scores, 1)  # [B, NEW, V]: the logits each step chose from
    assert (steps - full[:, t - 1:t - 1 + NEW]).abs().max() <= 1e-4
    assert (full[whole.bool()] - logits(ref, generated.sequences, whole)[whole.bool()]).abs().max() <= 1e-4
    assert torch.equal(generated.sequences[:, t:], steps.argmax(-1))  # greedy: each token the step's argmax
