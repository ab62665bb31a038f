"""fairseq translation Transformers: per-head attention capture and masks inside MultiheadAttention.

attnmask swaps the class of each attention instance of a loaded model for `AttnmaskMultiheadAttention`,
a subclass (no fairseq file is edited, parameters and state_dict keys are unchanged) that:

* for collection, takes fairseq's own non-fused attention path and reports per-head probabilities
  [B, H, T, S] (after softmax, before dropout) to a sink from a pre-hook on its dropout module
  (without a sink and without masks it is fairseq's attention as it was, fused path included);
* with masks applied (attnmask.apply_masks), computes q, k, v itself, with fairseq's key/value cache for
  incremental decoding, and hands them to the mask runtime, so every backend, block-sparse ones
  included, runs inside fairseq.

Positions. A mask cell (q, k) is indexed by the position of the query and key tokens in their
sentences. The key padding mask is handed to the runtime as each sentence's padding before and after
it (`Call.key_start`, `Call.key_len`): left-padded sentences (fairseq's default for sources) run as if
their first real token sat at slot 0 (attnmask/runtime.py), outputs and weights in fairseq's own slots.
Decoder queries are the last T of the target positions seen so far; in incremental decoding the
self-attention's cached keys give the current target position, which it shares with the
cross-attention of the same layer (`_attnmask_cursor`), so step t uses mask row t at both sites.
The mask rules themselves (causality, length policy, row guarantee) are attnmask/masks/rules.py.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.fairseq_safe_load import NotALiteral, allow_fairseq_globals, install_import_hook, refused_global
from attnmask.models.base import AttentionSink, Batch, MaskSeam, ModelAdapter, Site, sink_attached
from attnmask.store import json_digest

FAMILY = "fairseq"
MASKS_MARKER = "attnmask_masks__load_with_the_attnmask_fairseq_plugin"  # model state key of masked checkpoints
_VOLATILE_MODEL_KEYS = {"_name", "data", "no_progress_bar", "log_format", "log_interval", "seed", "cpu",
                        "fp16", "bf16", "tpu", "checkpoint_activations", "offload_activations"}


# ----------------------------------------------------------------------------------------------
# Importing fairseq quietly, loading its checkpoints


def import_fairseq():
    """Import fairseq guarded (attnmask.fairseq_safe_load: its eval() calls take literals only) without
    letting it reconfigure logging.

    `import fairseq` configures the root logger (DEBUG level, a stderr handler) and logs a hint about
    tensorboardX; the root logger's level and handlers are restored afterwards.
    """
    install_import_hook()
    root = logging.getLogger()
    level, handlers, disabled = root.level, list(root.handlers), logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        import fairseq  # noqa: F401
        import fairseq.checkpoint_utils  # noqa: F401
        import fairseq.tasks.translation  # noqa: F401
        import fairseq.sequence_generator  # noqa: F401
        import fairseq.options  # noqa: F401
    except ImportError as e:
        raise AttnmaskError(f"fairseq is not installed ({e}); install attnmask's fairseq extra") from None
    finally:
        logging.disable(disabled)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    import fairseq

    return fairseq


def load_checkpoint_state(path: str | Path, data_bin: str | Path | None = None) -> dict:
    """fairseq's checkpoint dict (cfg as omegaconf), with cfg.task.data pointed at `data_bin`; read with
    torch's weights-only unpickler (attnmask.fairseq_safe_load), so a file cannot run code."""
    import_fairseq()
    import attnmask.fairseq_plugin.task  # noqa: F401 - checkpoints trained with masks name its task
    from fairseq import checkpoint_utils

    path = Path(path)
    if not path.is_file():
        raise AttnmaskError(f"checkpoint {path} does not exist")
    overrides = {"data": str(data_bin)} if data_bin is not None else None
    allow_fairseq_globals()
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path), arg_overrides=overrides)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means it is no fairseq checkpoint
        if refused_global(e):
            raise AttnmaskError(f"cannot read {path} as a fairseq checkpoint: it names {refused_global(e)}, "
                                "which a fairseq checkpoint does not need; refusing to unpickle it") from None
        raise AttnmaskError(f"cannot read {path} as a fairseq checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if state.get("cfg") is None or "model" not in state:
        raise AttnmaskError(f"{path} is not a fairseq checkpoint (no cfg or model)")
    return state


def check_data_bin(data_bin: str | Path, split: str | None = None) -> Path:
    """A fairseq-preprocess output folder (dict.*.txt, and the split's .idx/.bin when `split` is given)."""
    folder = Path(data_bin)
    if not folder.is_dir():
        raise AttnmaskError(f"data folder {folder} does not exist (give fairseq-preprocess's --destdir)")
    if not list(folder.glob("dict.*.txt")):
        raise AttnmaskError(f"{folder} is not a fairseq binarized data folder (no dict.*.txt)")
    if split is not None and not list(folder.glob(f"{split}.*.idx")):
        raise AttnmaskError(f"{folder} has no binarized split {split!r} (no {split}.*.idx)")
    return folder


def build_task_and_model(state: dict):
    """Set up the checkpoint's task and model and load the weights; masks recorded in the task are
    not applied (`apply_masks` does that on request)."""
    from fairseq import tasks
    from omegaconf import open_dict

    cfg = state["cfg"]
    marked = take_masks_marker(state["model"])
    trained = recorded_masks(state)
    if marked is not None and marked != (trained["digest"] if trained else None):
        raise AttnmaskError(f"the checkpoint's weights carry masks {marked or '(none)'} but its task state "
                            f"records {trained['digest'] if trained else '(none)'}: it was altered")
    with open_dict(cfg):
        if "attnmask_masks" in cfg.task:
            cfg.task.attnmask_masks = None
    try:
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except NotALiteral as e:
        fields = ", ".join(fields_holding(cfg, e.source)) or "a config field"
        raise AttnmaskError(f"the checkpoint's {fields} holds {e.source!r}, which fairseq would eval() and which "
                            "is not a Python literal; refusing to build its model") from None
    except (FileNotFoundError, KeyError, RuntimeError, AssertionError) as e:
        raise AttnmaskError(f"cannot build the checkpoint's model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return cfg, task, model


def fields_holding(cfg, text: str, prefix: str = "cfg") -> list[str]:
    """The dotted names of the fields of `cfg` (omegaconf, argparse.Namespace or dict, nested) whose value
    is the string `text`."""
    import argparse

    from omegaconf import DictConfig

    if isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if not isinstance(cfg, (dict, DictConfig)):
        return []
    found = []
    for key in cfg:
        value, name = cfg.get(key), f"{prefix}.{key}"
        found += [name] if isinstance(value, str) and value == text else fields_holding(value, text, name)
    return found


def recorded_masks(state: dict) -> dict | None:
    """The masks a checkpoint was trained with: {'digest', 'path', 'sites'} or None (dense)."""
    return (state.get("task_state") or {}).get("attnmask_masks")


def mark_masked(model, digest: str) -> None:
    """Make the model's state_dict carry MASKS_MARKER (the masks' digest as uint8 bytes) and accept it
    back on load (state-dict hooks on this instance; idempotent).

    fairseq loads checkpoints strictly, so a model built without these hooks (stock fairseq, no
    `--user-dir`) refuses a checkpoint trained with masks ("Unexpected key(s) in state_dict:
    attnmask_masks__...") instead of running it dense."""
    if getattr(model, "_attnmask_marked", None) == digest:
        return
    if getattr(model, "_attnmask_marked", None) is not None:
        raise AttnmaskError("the model already carries other masks")
    model._attnmask_marked = digest
    value = torch.tensor(list(digest.encode()), dtype=torch.uint8)

    def add_marker(module, state_dict, prefix, local_metadata):
        state_dict[prefix + MASKS_MARKER] = value.clone()

    def accept_marker(module, state_dict, prefix, *args):
        state_dict.pop(prefix + MASKS_MARKER, None)

    model.register_state_dict_post_hook(add_marker)
    model.register_load_state_dict_pre_hook(accept_marker)


def take_masks_marker(model_state: dict) -> str | None:
    """Remove MASKS_MARKER from a checkpoint's model state: the digest it held, or None (dense)."""
    value = model_state.pop(MASKS_MARKER, None)
    return None if value is None else bytes(value.tolist()).decode()


def weights_digest(model_state: dict) -> str:
    """sha256 over a checkpoint's parameters and buffers: each tensor's name, dtype, shape and bytes, in
    name order (MASKS_MARKER excluded). Two checkpoints of one architecture differ here, not in
    model_config_digest."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(k for k in model_state if k != MASKS_MARKER):
        t = model_state[name].detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def model_config_digest(cfg) -> str:
    """Digest of the architecture settings (cfg.model without run bookkeeping)."""
    from omegaconf import OmegaConf

    model_cfg = cfg.model
    d = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else vars(model_cfg)
    return json_digest({k: v for k, v in d.items() if k not in _VOLATILE_MODEL_KEYS})


# ----------------------------------------------------------------------------------------------
# The attention seam


def _multihead_attention_class():
    import_fairseq()
    from fairseq.modules.multihead_attention import MultiheadAttention

    return MultiheadAttention


def _attnmask_class():
    """AttnmaskMultiheadAttention, built once fairseq is importable."""
    global AttnmaskMultiheadAttention
    if AttnmaskMultiheadAttention is None:
        AttnmaskMultiheadAttention = type("AttnmaskMultiheadAttention",
                                          (_AttnmaskAttentionMixin, _multihead_attention_class()),
                                          {"__module__": __name__})
    return AttnmaskMultiheadAttention


class _AttnmaskAttentionMixin:
    """Methods of AttnmaskMultiheadAttention (a MultiheadAttention subclass; see the module docstring).

    Attributes set by `install_attention`: _attnmask_site, _attnmask_cursor (dict shared by a decoder
    layer's self- and cross-attention: the number of target positions already decoded), _attnmask_sink;
    by the runtime: _attnmask_mask (a runtime.MaskedAttention) while masks are applied.
    """

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        if self._attnmask_site == "decoder.self":
            self._attnmask_cursor["start"] = self._cached_keys(incremental_state)
        masked = self.__dict__.get("_attnmask_mask")
        if masked is None or before_softmax or self.bias_k is not None or self.add_zero_attn:
            # fairseq's fused path hides the probabilities: take it only when no sink needs them
            self.skip_embed_dim_check = self._attnmask_sink is not None or self._attnmask_unfused
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   incremental_state=incremental_state, need_weights=need_weights,
                                   static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax,
                                   need_head_weights=need_head_weights)
        return self._masked_forward(masked, query, key, key_padding_mask, incremental_state,
                                    need_weights or need_head_weights, need_head_weights, static_kv)

    def _cached_keys(self, incremental_state) -> int:
        """Number of target positions already decoded (0 without incremental state)."""
        if incremental_state is None:
            return 0
        saved = self._get_input_buffer(incremental_state)
        prev = saved.get("prev_key") if saved else None
        return 0 if prev is None else int(prev.size(2))

    def _project(self, query, key, key_padding_mask, incremental_state, static_kv):
        """q [B, H, T, D] (unscaled), k, v [B, H, S, D] and the key padding mask [B, S] (True = pad), with
        fairseq's key/value cache read and updated as MultiheadAttention.forward does."""
        tgt_len, bsz, _ = query.shape
        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        q = self.q_proj(query)
        source = query if self.self_attention else key
        reuse = saved is not None and "prev_key" in saved and static_kv
        k = v = None
        if not reuse:
            k, v = self.k_proj(source), self.v_proj(source)

        def heads(x):  # [N, B', H·D] -> [B', H, N, D]
            return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q = heads(q)
        k = None if k is None else heads(k)
        v = None if v is None else heads(v)
        if saved is not None:
            if "prev_key" in saved:
                k = saved["prev_key"] if static_kv else torch.cat([saved["prev_key"], k], dim=2)
                v = saved["prev_value"] if static_kv else torch.cat([saved["prev_value"], v], dim=2)
            key_padding_mask = self._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask, prev_key_padding_mask=saved.get("prev_key_padding_mask"),
                batch_size=k.shape[0], src_len=k.shape[2], static_kv=static_kv)
            saved.update(prev_key=k, prev_value=v, prev_key_padding_mask=key_padding_mask)
            self._set_input_buffer(incremental_state, saved)
        if k.shape[0] != bsz:  # beam search: one source row per beam group
            beams = bsz // k.shape[0]
            k, v = k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.repeat_interleave(beams, 0)
        return q, k, v, key_padding_mask

    def _masked_forward(self, masked, query, key, key_padding_mask, incremental_state, need_weights,
                        need_head_weights, static_kv):
        """Attention through the mask runtime: out [T, B, E] and, if asked, the weights [B, T, S]
        averaged over heads ([H, B, T, S] per head)."""
        from attnmask.masks.rules import Window
        from attnmask.runtime import Call

        tgt_len, bsz, embed_dim = query.shape
        q, k, v, key_padding_mask = self._project(query, key, key_padding_mask, incremental_state, static_kv)
        src_len = k.shape[2]
        key_start, key_len, model_allowed = sentence_padding(key_padding_mask)
        if self._attnmask_site == "decoder.cross":
            window = Window(tgt_len, src_len, row0=self._attnmask_cursor.get("start", 0))
        else:
            window = Window.self_attention(tgt_len, src_len)
        sink = self._attnmask_sink
        dropout = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
        call = Call(window, self.scaling, key_len, dropout, model_allowed=model_allowed,
                    need_probs=need_weights or sink is not None, key_start=key_start)
        out, probs = masked.attend(q, k, v, call, self.training)
        if sink is not None:
            sink(self._attnmask_site, self._attnmask_layer, probs)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim))
        if not need_weights:
            return out, None
        weights = probs.to(out.dtype).transpose(0, 1)  # [H, B, T, S]
        return out, weights if need_head_weights else weights.mean(0)

    def _report_probabilities(self, probs: torch.Tensor) -> None:
        """Pass probs [B*H, T, S] (after softmax, before dropout) to the sink as [B, H, T, S]."""
        sink = self._attnmask_sink
        if sink is not None:
            t, s = probs.shape[-2:]
            sink(self._attnmask_site, self._attnmask_layer, probs.view(-1, self.num_heads, t, s))


def sentence_padding(key_padding_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fairseq's key padding mask [B, S] (True = pad) as the runtime Call's (key_start, key_len,
    model_allowed): left-padded sources and right-padded targets are runs of real slots (positions
    count from each sentence's first token, runtime.key_padding); any other mask is a model mask."""
    from attnmask.runtime import key_padding

    if key_padding_mask is None:
        return None, None, None
    real = ~key_padding_mask.bool()
    padding = key_padding(real)
    if padding is None:
        return None, None, real[:, None, None, :]
    return padding[0], padding[1], None


AttnmaskMultiheadAttention = None


def _dropout_pre_hook(module, args):
    owner = module._attnmask_owner()
    if owner is not None:
        owner._report_probabilities(args[0])


def attention_sites(model) -> dict[str, list]:
    """{'encoder.self': [module per layer], 'decoder.self': [...], 'decoder.cross': [...]}."""
    encoder_layers = getattr(model.encoder, "layers", None)
    decoder_layers = getattr(model.decoder, "layers", None)
    if encoder_layers is None or decoder_layers is None:
        raise AttnmaskError(f"{type(model).__name__} is not a fairseq encoder-decoder Transformer "
                            "(no encoder.layers / decoder.layers)")
    sites = {"encoder.self": [layer.self_attn for layer in encoder_layers],
             "decoder.self": [layer.self_attn for layer in decoder_layers],
             "decoder.cross": [getattr(layer, "encoder_attn", None) for layer in decoder_layers]}
    if any(m is None for m in sites["decoder.cross"]):
        raise AttnmaskError("the decoder has layers without cross-attention; this model is not supported")
    return sites


def install_attention(model) -> dict[str, list]:
    """Swap every attention module's class for AttnmaskMultiheadAttention (idempotent)."""
    import weakref

    cls = _attnmask_class()
    base = _multihead_attention_class()
    sites = attention_sites(model)
    for site, modules in sites.items():
        for layer, module in enumerate(modules):
            if isinstance(module, cls):
                continue
            if type(module) is not base:
                raise AttnmaskError(f"{site} layer {layer} is a {type(module).__name__}, not fairseq's "
                                    "MultiheadAttention; this model is not supported")
            module.__class__ = cls
            module._attnmask_unfused = module.skip_embed_dim_check  # the module's own setting
            module.use_xformers = False
            module._attnmask_site, module._attnmask_layer = site, layer
            module._attnmask_sink = None
            module.dropout_module._attnmask_owner = weakref.ref(module)
            module.dropout_module.register_forward_pre_hook(_dropout_pre_hook)
    for self_attn, cross_attn in zip(sites["decoder.self"], sites["decoder.cross"]):
        cursor: dict = {}
        self_attn._attnmask_cursor = cursor
        cross_attn._attnmask_cursor = cursor
    for module in sites["encoder.self"]:
        module._attnmask_cursor = {}
    return sites


class FairseqSeam(MaskSeam):
    """fairseq translation Transformers: masks inside AttnmaskMultiheadAttention (see the module docstring)."""

    @staticmethod
    def claims(model) -> bool:
        return type(model).__module__.startswith("fairseq.") and hasattr(model, "encoder")

    @staticmethod
    def sites(model) -> dict[str, list]:
        return install_attention(model)

    @staticmethod
    def heads(module) -> int:
        return int(module.num_heads)

    @staticmethod
    def enable(model, record: dict):
        """The class swap stays after removal (it changes no result); the record goes with checkpoints
        through the caller (translate.py, the fairseq plugin)."""
        install_attention(model)
        return lambda: None


# ----------------------------------------------------------------------------------------------
# The adapter


class FairseqAdapter(ModelAdapter):
    """A fairseq translation Transformer, teacher-forced over a binarized split's sentence pairs."""

    family = FAMILY
    windowable = True  # sentence pairs are independent: the stream may be cut anywhere

    def __init__(self, model, task, cfg, name: str, data_bin: Path, split: str = "valid",
                 weights: str | None = None):
        self.model = model
        self.weights = weights
        self.task = task
        self.cfg = cfg
        self.name = name
        self.data_bin = data_bin
        self.split = split
        self._modules = install_attention(model)

    @classmethod
    def load(cls, checkpoint: str | Path, data_bin: str | Path, split: str = "valid",
             device: torch.device | str = "cpu") -> "FairseqAdapter":
        folder = check_data_bin(data_bin, split)
        state = load_checkpoint_state(checkpoint, folder)
        weights = weights_digest(state["model"])  # before fairseq's load upgrades the dict in place
        cfg, task, model = build_task_and_model(state)
        model.to(device).eval()
        return cls(model, task, cfg, str(checkpoint), folder, split, weights)

    def identity(self) -> dict:
        """family, name, config_digest (architecture) and weights_digest (these very weights)."""
        return {"family": self.family, "name": self.name, "config_digest": model_config_digest(self.cfg),
                "weights_digest": self.weights or weights_digest(self.model.state_dict())}

    def sites(self) -> list[Site]:
        return [Site(name, len(modules), modules[0].num_heads, name == "decoder.self")
                for name, modules in self._modules.items()]

    def plane(self, site: str, max_length: int) -> tuple[int, int]:
        """Every site's plane is max_length x max_length (target x source for decoder.cross); tokens
        include the end-of-sentence token."""
        return max_length, max_length

    def examples(self, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(source, target) token tensors of the split, in file order; each ends with </s>."""
        with quiet_logs():
            self.task.load_dataset(self.split)
        dataset = self.task.dataset(self.split)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        for i in range(n):
            item = dataset[i]
            yield item["source"], item["target"]

    def count_examples(self, limit: int | None = None) -> int:
        with quiet_logs():
            self.task.load_dataset(self.split)
        n = len(self.task.dataset(self.split))
        return n if limit is None else min(limit, n)

    def batches(self, examples: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                max_length: int) -> Iterator[Batch]:
        """Right-padded batches; pairs with a side longer than max_length tokens are skipped rather than
        truncated, so every collected pair is a whole translation."""
        chunk = []
        for source, target in examples:
            if len(source) > max_length or len(target) > max_length:
                continue
            chunk.append((source, target))
            if len(chunk) == batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)

    def _batch(self, pairs) -> Batch:
        """src_tokens [B, S] and prev_output_tokens [B, T] (</s> moved to the front), right-padded."""
        pad, eos = self.task.source_dictionary.pad(), self.task.target_dictionary.eos()
        sources = [s for s, _ in pairs]
        prev = [torch.cat([torch.tensor([eos]), t[:-1]]) for _, t in pairs]
        src_tokens = _right_pad(sources, pad)
        prev_tokens = _right_pad(prev, pad)
        src_real = torch.arange(src_tokens.size(1))[None, :] < torch.tensor([len(s) for s in sources])[:, None]
        tgt_real = torch.arange(prev_tokens.size(1))[None, :] < torch.tensor([len(p) for p in prev])[:, None]
        device = self.device
        src_real, tgt_real = src_real.to(device), tgt_real.to(device)
        inputs = {"src_tokens": src_tokens.to(device),
                  "src_lengths": torch.tensor([len(s) for s in sources], device=device),
                  "prev_output_tokens": prev_tokens.to(device)}
        real = {"encoder.self": (src_real, src_real), "decoder.self": (tgt_real, tgt_real),
                "decoder.cross": (tgt_real, src_real)}
        return Batch(inputs, len(pairs), int(src_real.sum() + tgt_real.sum()), real)

    def forward(self, batch: Batch):
        return self.model(**batch.inputs)

    def capture(self, sink: AttentionSink):
        return sink_attached((m for ms in self._modules.values() for m in ms), sink)


def _right_pad(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """Silence fairseq's INFO logging while active."""
    logger = logging.getLogger("fairseq")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
