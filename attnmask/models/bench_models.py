"""The models `attnmask bench` times (attnmask/tasks/bench.py), one description per family: how to build a
random-weight model of the family's shape, run it at a length, and hand its attention to a sink.

BenchModel is what the bench reads of any family; `bert_base` and `gpt2_base` (Hugging Face), `fairseq_base`
and `transfo_xl_bench_model` build the presets, `hf_folder_bench_model` a Hugging Face folder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from attnmask.masks.rules import Window
from attnmask.models.base import sink_attached
from attnmask.models.fairseq_attention import import_fairseq
from attnmask.models.families import mask_seam
from attnmask.models.hf import (ATTENTION_NAME, attention_modules, loading_error, model_context, quiet_transformers,
                                register_attention, resolve_model_path)
from attnmask.models.transfo_xl import SITE
from attnmask.models.transfo_xl_model import RelativeScores, TransfoXLConfig, TransfoXLLM


@dataclass
class BenchModel:
    """A model to time: its masking seam's sites and how to run it at a length.

    plane(site, L) -> (Q, K) of the masks; window(site, L) -> the op-level call's Window;
    forward(L, batch) -> a zero-argument function running one inference forward pass at L tokens;
    capture(sink) -> a context manager during which every attention probability tensor [B, H, q, k]
    the model computes goes to sink(site, layer, probs), laid out on the plane (what collection reads);
    term(q, k, L) -> the op's additive score term (Transformer-XL) or None.
    """

    model: nn.Module
    heads: int
    head_dim: int
    plane: Callable[[str, int], tuple[int, int]]
    window: Callable[[str, int], Any]
    forward: Callable[[int, int], Callable[[], Any]]
    capture: Callable[[Any], Any]
    term: Callable[[torch.Tensor, int], Any] | None = None
    positions: int | None = None


def self_window(site: str, length: int):
    """The Window of an L-token call at `site`: L x L, self-attention's (queries the last of the keys) unless
    it is cross-attention."""
    return Window(length, length) if site == "decoder.cross" else Window.self_attention(length, length)


def bert_base(positions: int) -> BenchModel:
    """BERT-base's shape (12 layers, 768 wide, 12 heads; no pooler), random weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=max(512, positions))
    return hf_bench_model(BertModel(config, add_pooling_layer=False))


def gpt2_base(positions: int) -> BenchModel:
    """GPT-2 small's shape (12 layers, 768 wide, 12 heads; causal self-attention), random weights."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=max(1024, positions))
    return hf_bench_model(GPT2Model(config))


def hf_bench_model(model: nn.Module) -> BenchModel:
    """A Hugging Face base model as a bench model: dense runs in SDPA, `capture` through attnmask's
    registered attention; L x L planes at every site."""
    model.set_attn_implementation("sdpa")
    cfg = model.config
    heads = cfg.num_attention_heads
    vocab = cfg.vocab_size

    def forward(length: int, batch: int):
        ids = torch.randint(1, vocab, (batch, length), device=model.device)
        return lambda: model(input_ids=ids)

    positions = model_context(cfg)
    return BenchModel(model, heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                      lambda site, n: (n, n), self_window, forward, lambda sink: hf_capture(model, sink),
                      positions=positions)


@contextlib.contextmanager
def hf_capture(model: nn.Module, sink):
    """The model's attention through attnmask's registered function, which hands its probabilities to
    the attention modules' sink (what `attnmask collect` does for Hugging Face models)."""
    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with sink_attached(attention_modules(model), sink):
            yield
    finally:
        model.set_attn_implementation(previous)


def seam_capture(model: nn.Module, sink):
    """The sink on every attention module of the model's mask seam (fairseq's attention calls it)."""
    return sink_attached((m for modules in mask_seam(model).sites(model).values() for m in modules), sink)


def fairseq_base(positions: int, **sizes) -> BenchModel:
    """fairseq's `transformer` architecture (6 + 6 layers, 512 wide, 8 heads; `sizes` overrides its
    arguments, e.g. encoder_layers=2), random weights."""
    from argparse import Namespace
    from types import SimpleNamespace

    import_fairseq()
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, base_architecture

    words = Dictionary()
    for i in range(1000):
        words.add_symbol(f"w{i}")
    args = Namespace(max_source_positions=positions + 2, max_target_positions=positions + 2, dropout=0.0, **sizes)
    base_architecture(args)
    model = TransformerModel.build_model(args, SimpleNamespace(source_dictionary=words, target_dictionary=words))

    def forward(length: int, batch: int):
        tokens = torch.randint(words.nspecial, len(words), (batch, length), device=next(model.parameters()).device)
        lengths = torch.full((batch,), length, device=tokens.device)
        return lambda: model(tokens, lengths, tokens)

    return BenchModel(model, args.encoder_attention_heads, args.encoder_embed_dim // args.encoder_attention_heads,
                      lambda site, n: (n, n), self_window, forward, lambda sink: seam_capture(model, sink),
                      positions=positions)


def transfo_xl_bench_model(positions: int, architecture: dict) -> BenchModel:
    """attnmask's Transformer-XL of `architecture` (TransfoXLConfig's widths, mem_len included), vocabulary
    1000, random weights; segments of L after L memories."""
    model = TransfoXLLM(TransfoXLConfig(vocab_size=1000, cutoffs=[], clamp_len=-1, same_length=False, **architecture))
    heads, dim = architecture["n_head"], architecture["d_head"]

    def forward(length: int, batch: int):
        ids = torch.randint(0, 1000, (batch, length), device=next(model.parameters()).device)
        mems = [torch.zeros(batch, length, architecture["d_model"], device=ids.device)
                for _ in range(architecture["n_layer"])]
        return lambda: model(ids, mems)

    def term(query: torch.Tensor, length: int):
        g = torch.Generator(device=query.device).manual_seed(1)
        r_k = torch.randn(2 * length, heads, dim, generator=g, device=query.device, dtype=query.dtype)
        return RelativeScores(query, r_k, length, dim ** -0.5)

    @contextlib.contextmanager
    def capture(sink):  # L queries after L memories: the probabilities [B, H, L, 2L] fill the plane

        body = model.transformer
        previous = body.prob_sink
        body.prob_sink = lambda layer, probs: sink(SITE, layer, probs)
        try:
            yield
        finally:
            body.prob_sink = previous

    return BenchModel(model, heads, dim, lambda site, n: (n, 2 * n), lambda site, n: Window(n, 2 * n),
                      forward, capture, term, positions)


def hf_folder_bench_model(spec: str) -> BenchModel:
    """A Hugging Face folder ('minilm' too) as a bench model; a folder with config.json but no weights gets
    random weights."""
    from transformers import AutoConfig, AutoModel

    quiet_transformers()
    path = resolve_model_path(spec)
    try:
        if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
            model = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, KeyError) as e:
        raise loading_error(spec, path, e) from None
    return hf_bench_model(model)
