"""fairseq translation Transformers, the attention seam: per-head attention capture and masks inside
MultiheadAttention (the adapter and checkpoint loading are attnmask/models/fairseq.py).

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
their first real token sat at slot 0 (attnmask/runtime/masked.py), outputs and weights in fairseq's own slots.
Decoder queries are the last T of the target positions seen so far; in incremental decoding the
self-attention's cached keys give the current target position, which it shares with the
cross-attention of the same layer (`_attnmask_cursor`), so step t uses mask row t at both sites.
The mask rules themselves (causality, length policy, row guarantee) are attnmask/masks/rules.py.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window
from attnmask.models.fairseq_safe_load import install_import_hook
from attnmask.runtime.attention import Call, key_padding
from attnmask.runtime.seam import MaskSeam

MASKS_MARKER = "attnmask_masks__load_with_the_attnmask_fairseq_plugin"  # model state key of masked checkpoints


# ----------------------------------------------------------------------------------------------
# Importing fairseq quietly; the marker a masked checkpoint carries


def import_fairseq():
    """Import fairseq guarded (attnmask.models.fairseq_safe_load: its eval() calls take literals only) without
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