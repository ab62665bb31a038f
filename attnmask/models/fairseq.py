"""fairseq translation Transformers, the adapter: loading checkpoints (weights-only, the task of a masked
checkpoint registered first), building task and model, their digests, and the batches collection reads.
The attention seam (capture, masks inside MultiheadAttention) is attnmask/models/fairseq_attention.py."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.base import AttentionSink, Batch, ModelAdapter, Site, sink_attached
from attnmask.models.fairseq_attention import MASKS_MARKER, import_fairseq, install_attention, quiet_logs, take_masks_marker
from attnmask.models.fairseq_safe_load import NotALiteral, allow_fairseq_globals, refused_global
from attnmask.store.stores import json_digest

FAMILY = "fairseq"
_VOLATILE_MODEL_KEYS = {"_name", "data", "no_progress_bar", "log_format", "log_interval", "seed", "cpu",
                        "fp16", "bf16", "tpu", "checkpoint_activations", "offload_activations"}


# ----------------------------------------------------------------------------------------------
# Loading checkpoints


def load_checkpoint_state(path: str | Path, data_bin: str | Path | None = None) -> dict:
    """fairseq's checkpoint dict (cfg as omegaconf), with cfg.task.data pointed at `data_bin`; read with
    torch's weights-only unpickler (attnmask.models.fairseq_safe_load), so a file cannot run code."""
    import_fairseq()
    import attnmask.models.fairseq_plugin.task  # noqa: F401 - checkpoints trained with masks name its task
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
    trained = checkpoint_masks_record(state)
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


def checkpoint_masks_record(state: dict) -> dict | None:
    """The masks a checkpoint was trained with, as its task state records them: {'digest', 'path', 'sites'},
    or None (dense)."""
    return (state.get("task_state") or {}).get("attnmask_masks")


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