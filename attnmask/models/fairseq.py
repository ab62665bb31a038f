"""fairseq translation Transformers: per-head attention capture and masks inside MultiheadAttention.

fairseq's `MultiheadAttention` has a documented extension point, `apply_sparse_mask(scores, T, S, B)`,
called on the raw scores [B*H, T, S] before the causal mask, the key padding mask and the softmax;
and it feeds the probabilities (after softmax, before dropout) to its `dropout_module`. attnmask
swaps the class of each attention instance of a loaded model for `AttnmaskMultiheadAttention`, a
subclass that (no fairseq file is edited, parameters and state_dict keys are unchanged):

* always takes fairseq's own (non-fused) attention path, so both seams run;
* reports per-head probabilities [B, H, T, S] to a sink from a pre-hook on its dropout module;
* adds -inf to the scores of pruned (query position, key position) cells of its layer's `keep`.

Positions. A mask cell (q, k) is indexed by the position of the query and key tokens in their
sentences: for keys, position = (number of real tokens up to and including it) - 1, which handles
left-padded sources (fairseq's default) and right-padded targets alike. Decoder queries are the last
T of the target positions seen so far; in incremental decoding the self-attention's cached keys give
the current target position, which it shares with the cross-attention of the same layer, so step t
uses mask row t at both sites.

Rows. Padding queries are never masked. Cells outside the store's plane follow the store's `beyond`
attribute: "dense" keeps them, "error" raises. A real query row left with no kept real key (a short
source, say) gets its own position (self-attention) or source position 0 (cross-attention), as in
attnmask.runtime.guarantee_rows.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, sink_attached
from attnmask.store import BEYOND_POLICIES, MaskStore, json_digest

FAMILY = "fairseq"
_VOLATILE_MODEL_KEYS = {"_name", "data", "no_progress_bar", "log_format", "log_interval", "seed", "cpu",
                        "fp16", "bf16", "tpu", "checkpoint_activations", "offload_activations"}


# ----------------------------------------------------------------------------------------------
# Importing fairseq quietly, loading its checkpoints


def import_fairseq():
    """Import fairseq without letting it reconfigure logging.

    `import fairseq` configures the root logger (DEBUG level, a stderr handler) and logs a hint about
    tensorboardX; the root logger's level and handlers are restored afterwards.
    """
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


@contextlib.contextmanager
def trusted_checkpoints():
    """Let fairseq's own `torch.load` calls read whole checkpoints while active.

    fairseq checkpoints pickle argparse/omegaconf objects, which torch >= 2.6 refuses under its
    default weights_only=True. The user names the checkpoint, so it is trusted like any model file.
    """
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_checkpoint_state(path: str | Path, data_bin: str | Path | None = None) -> dict:
    """fairseq's checkpoint dict (cfg as omegaconf), with cfg.task.data pointed at `data_bin`."""
    import_fairseq()
    import attnmask.fairseq_plugin.task  # noqa: F401 - checkpoints trained with masks name its task
    from fairseq import checkpoint_utils

    path = Path(path)
    if not path.is_file():
        raise AttnmaskError(f"checkpoint {path} does not exist")
    overrides = {"data": str(data_bin)} if data_bin is not None else None
    try:
        with trusted_checkpoints():
            state = checkpoint_utils.load_checkpoint_to_cpu(str(path), arg_overrides=overrides)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means it is no fairseq checkpoint
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
    with open_dict(cfg):
        if "attnmask_masks" in cfg.task:
            cfg.task.attnmask_masks = None
    try:
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except (FileNotFoundError, KeyError, RuntimeError, AssertionError) as e:
        raise AttnmaskError(f"cannot build the checkpoint's model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return cfg, task, model


def recorded_masks(state: dict) -> dict | None:
    """The masks a checkpoint was trained with: {'digest', 'path', 'sites'} or None (dense)."""
    return (state.get("task_state") or {}).get("attnmask_masks")


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

    Attributes set by `install_attention`: _attnmask_site, _attnmask_layer, _attnmask_cursor (dict
    shared by a decoder layer's self- and cross-attention), _attnmask_sink, _attnmask_beyond and the
    non-persistent buffer _attnmask_keep (bool [H, Q, K] or None).
    """

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        self._attnmask_key_padding = key_padding_mask
        if self._attnmask_site == "decoder.self":
            self._attnmask_cursor["start"] = self._cached_keys(incremental_state)
        return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                               incremental_state=incremental_state, need_weights=need_weights,
                               static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax,
                               need_head_weights=need_head_weights)

    def _cached_keys(self, incremental_state) -> int:
        """Number of target positions already decoded (0 without incremental state)."""
        if incremental_state is None:
            return 0
        saved = self._get_input_buffer(incremental_state)
        prev = saved.get("prev_key") if saved else None
        return 0 if prev is None else int(prev.size(2))

    def _positions(self, tgt_len: int, src_len: int, bsz: int, device):
        """(query_pos [B, T], query_real [B, T], key_pos [B, S], key_real [B, S]) in sentence positions."""
        padding = self._attnmask_key_padding
        if padding is not None and padding.dim() == 2 and padding.size(1) == src_len:
            key_real = ~padding.to(device=device, dtype=torch.bool)
            if key_real.size(0) != bsz:  # beam search: one source row per beam group
                key_real = key_real.repeat_interleave(bsz // key_real.size(0), dim=0)
        else:
            key_real = torch.ones(bsz, src_len, dtype=torch.bool, device=device)
        key_pos = (key_real.long().cumsum(1) - 1).clamp(min=0)
        if self._attnmask_site == "decoder.cross":
            start = self._attnmask_cursor.get("start", 0)
            query_pos = (start + torch.arange(tgt_len, device=device)).expand(bsz, tgt_len)
            query_real = torch.ones(bsz, tgt_len, dtype=torch.bool, device=device)
        else:  # self-attention: the queries are the last T keys
            query_pos, query_real = key_pos[:, src_len - tgt_len:], key_real[:, src_len - tgt_len:]
        return query_pos, query_real, key_pos, key_real

    def _allowed(self, tgt_len: int, src_len: int, bsz: int, device) -> torch.Tensor:
        """allowed [B, H, T, S]: keep[h, query_pos[b, t], key_pos[b, s]], with the row rules applied."""
        keep = self._attnmask_keep
        plane_q, plane_k = keep.shape[1:]
        query_pos, query_real, key_pos, key_real = self._positions(tgt_len, src_len, bsz, device)
        query_in, key_in = query_pos < plane_q, key_pos < plane_k
        if self._attnmask_beyond == "error" and ((query_real & ~query_in).any() or (key_real & ~key_in).any()):
            raise AttnmaskError(f"{self._attnmask_site}: a sentence is longer than the masks' {plane_q}x{plane_k} "
                                "plane (the masks were compiled with --beyond error)")
        rows, cols = query_pos.clamp(max=plane_q - 1), key_pos.clamp(max=plane_k - 1)
        allowed = keep[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        untouched = ~(query_in[:, :, None] & key_in[:, None, :]) | ~query_real[:, :, None]
        allowed = allowed | untouched[:, None]
        usable = allowed & key_real[:, None, None, :]
        if self._attnmask_site == "decoder.self":
            usable = usable & (key_pos[:, None, :] <= query_pos[:, :, None])[:, None]
        empty = ~usable.any(-1)  # [B, H, T]
        if empty.any():
            anchor = torch.zeros_like(query_pos) if self._attnmask_site == "decoder.cross" else query_pos
            fallback = (key_pos[:, None, :] == anchor[:, :, None]) & key_real[:, None, :]  # [B, T, S]
            allowed = allowed | (empty[..., None] & fallback[:, None])
        return allowed

    def apply_sparse_mask(self, attn_weights, tgt_len: int, src_len: int, bsz: int):
        keep = getattr(self, "_attnmask_keep", None)
        if keep is None:
            return attn_weights
        allowed = self._allowed(tgt_len, src_len, bsz, attn_weights.device)
        scores = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        return scores.masked_fill(~allowed, float("-inf")).view(bsz * self.num_heads, tgt_len, src_len)

    def _report_probabilities(self, probs: torch.Tensor) -> None:
        """Pass probs [B*H, T, S] (after softmax, before dropout) to the sink as [B, H, T, S]."""
        sink = self._attnmask_sink
        if sink is not None:
            t, s = probs.shape[-2:]
            sink(self._attnmask_site, self._attnmask_layer, probs.view(-1, self.num_heads, t, s))


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
            module.skip_embed_dim_check = True  # only effect: never take the fused path that hides both seams
            module.use_xformers = False
            module._attnmask_site, module._attnmask_layer = site, layer
            module._attnmask_sink, module._attnmask_beyond = None, "dense"
            module._attnmask_key_padding = None
            module.register_buffer("_attnmask_keep", None, persistent=False)
            module.dropout_module._attnmask_owner = weakref.ref(module)
            module.dropout_module.register_forward_pre_hook(_dropout_pre_hook)
    for self_attn, cross_attn in zip(sites["decoder.self"], sites["decoder.cross"]):
        cursor: dict = {}
        self_attn._attnmask_cursor = cursor
        cross_attn._attnmask_cursor = cursor
    for module in sites["encoder.self"]:
        module._attnmask_cursor = {}
    return sites


def apply_masks(model, store: MaskStore) -> dict:
    """Put the store's keep [L, H, Q, K] of every site it holds on the model; other sites stay dense.

    Returns the record {'digest', 'path', 'sites', 'beyond'} to keep with a checkpoint.
    """
    sites = install_attention(model)
    beyond = store.attrs.get("beyond", "dense")
    if beyond not in BEYOND_POLICIES:
        raise AttnmaskError(f"{store.path} has an unknown length policy beyond={beyond!r}")
    for name, mask in store.sites.items():
        modules = sites[name]
        if mask.layers != len(modules) or any(mask.heads != m.num_heads for m in modules):
            raise AttnmaskError(f"{store.path}: site {name} has {mask.layers} layers x {mask.heads} heads, the "
                                f"model {len(modules)} x {modules[0].num_heads}; the masks are for another model")
        device = next(modules[0].parameters()).device
        for layer, module in enumerate(modules):
            module._attnmask_keep = torch.from_numpy(mask.keep[layer].copy()).to(device)
            module._attnmask_beyond = beyond
    return {"digest": store.digest, "path": str(store.path), "sites": sorted(store.sites), "beyond": beyond}


def remove_masks(model) -> None:
    """Make every attention module dense again (the class swap stays; it changes no result)."""
    for modules in attention_sites(model).values():
        for module in modules:
            if hasattr(module, "_attnmask_keep"):
                module._attnmask_keep = None


# ----------------------------------------------------------------------------------------------
# The adapter


class FairseqAdapter(ModelAdapter):
    """A fairseq translation Transformer, teacher-forced over a binarized split's sentence pairs."""

    family = FAMILY

    def __init__(self, model, task, cfg, name: str, data_bin: Path, split: str = "valid"):
        self.model = model
        self.task = task
        self.cfg = cfg
        self.name = name
        self.data_bin = data_bin
        self.split = split
        self.skipped = 0
        self._modules = install_attention(model)

    @classmethod
    def load(cls, checkpoint: str | Path, data_bin: str | Path, split: str = "valid",
             device: torch.device | str = "cpu") -> "FairseqAdapter":
        folder = check_data_bin(data_bin, split)
        state = load_checkpoint_state(checkpoint, folder)
        cfg, task, model = build_task_and_model(state)
        model.to(device).eval()
        return cls(model, task, cfg, str(checkpoint), folder, split)

    def identity(self) -> dict:
        return {"family": self.family, "name": self.name, "config_digest": model_config_digest(self.cfg)}

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
        """Right-padded batches; pairs with a side longer than max_length tokens are skipped (counted in
        `self.skipped`) rather than truncated, so every collected pair is a whole translation."""
        chunk = []
        for source, target in examples:
            if len(source) > max_length or len(target) > max_length:
                self.skipped += 1
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


def is_fairseq_checkpoint(spec: str) -> bool:
    return str(spec).endswith(".pt")
