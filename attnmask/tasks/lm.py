"""Word-level language modelling with Transformer-XL: training with attention masks, and perplexity.

The text is read by the paper's LM iterator (attnmask/models/transfo_xl_vocab.py: B parallel streams of
word ids, segments of T tokens); each layer's memory carries over from one segment to the next and starts
empty.

Perplexity = exp(sum of -log P(target) / number of targets), over every target of the streams.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.models.transfo_xl import LMRun, load_lm, load_masks, recorded_store, with_lengths
from attnmask.models.transfo_xl_model import TransfoXLConfig, TransfoXLLM
from attnmask.models.transfo_xl_vocab import Vocabulary, batchify, segments
from attnmask.runtime.attach import MaskHandle
from attnmask.store.data import default_eval_split, iter_texts, resolve_data
from attnmask.store.stores import MaskStore
from attnmask.tasks.trainer import LoopSettings, RunFolder, make_trainer, run_training, step_losses, training_arguments


# Architecture presets for training from scratch (vocabulary size and cutoffs come from the text).
PRESETS = {
    "small": dict(n_layer=4, d_model=128, d_embed=128, n_head=4, d_head=32, d_inner=512, div_val=2,
                  mem_len=32, tgt_len=32, dropout=0.1, dropatt=0.0),
    "base": dict(n_layer=8, d_model=256, d_embed=256, n_head=8, d_head=32, d_inner=1024, div_val=2,
                 mem_len=64, tgt_len=64, dropout=0.1, dropatt=0.0),
}


def text_source(text: str | Path, split: str | None = None):
    """A plain text DATA argument (attnmask.store.data.DataSource): a text file (its one split, train) or a
    built-in text such as `hamlet` (split train, the default, or valid)."""
    source = resolve_data(str(text), split=split)
    if source.kind != "text":
        raise AttnmaskError(f"{text} is a {source.kind} table; a language model reads a plain text file "
                            "(one line after another)")
    return source


def read_lines(text: str | Path, split: str | None = None) -> list[str]:
    """The non-empty lines of a plain text (text_source), read as `collect` reads them."""
    return list(iter_texts(text_source(text, split)))


# ----------------------------------------------------------------------------------------------
# Running


def evaluate(run: LMRun, stream: torch.Tensor, batch_size: int) -> dict:
    """Perplexity of the model over `stream` read by the LM iterator (memories start empty)."""
    model = run.model
    device = next(model.parameters()).device
    streams = batchify(stream, batch_size).to(device)
    model.eval()
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        mems = model.transformer.empty_mems(batch_size)
        for x, y in segments(streams, run.tgt_len):
            out = model(x, mems, targets=y)
            mems = out.mems
            total += float(out.losses.double().sum())
            count += y.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "seconds": time.perf_counter() - start}


def eval_lm(model: str | Path, text: str | Path, *, masks: str | Path | MaskStore | None = None,
            batch_size: int = 8, tgt_len: int | None = None, mem_len: int | None = None,
            device: torch.device | str = "cpu", backend: str = "auto", split: str | None = None) -> dict:
    """Perplexity of a saved Transformer-XL on a text (read_lines: a file, or a built-in text's `split`,
    by default its held-out one, attnmask.store.data.default_eval_split), with attention masks: `masks`, or when
    None the store recorded in the model's config (if it is still there, same digest), or 'none'.

    Returns {'split', 'loss', 'perplexity', 'tokens', 'seconds', 'masks'} (masks: the digest or None)."""
    source = text_source(text, split or default_eval_split(str(text)))
    lines = list(iter_texts(source))
    run = load_lm(model, device, tgt_len, mem_len)
    store = None
    if masks is None:
        masks = recorded_store(model, run.model.config)
    if masks is not None and str(masks) != "none":
        store = load_masks(run.model, masks, run.tgt_len, run.mem_len, backend).store
    result = {"split": source.split, **evaluate(run, run.vocab.encode_lines(lines), batch_size)}
    result["masks"] = store.digest if store is not None else None
    return result


def new_model(config: str, vocab: Vocabulary, seed: int) -> TransfoXLLM:
    """A randomly initialised Transformer-XL of preset `config` for this vocabulary."""
    if config not in PRESETS:
        raise AttnmaskError(f"unknown --config {config!r} (use {', '.join(PRESETS)})")
    preset = dict(PRESETS[config])
    tgt_len = preset.pop("tgt_len")
    v = len(vocab)
    cutoffs = [c for c in (2000, 10000, 50000) if c < v - 1]
    torch.manual_seed(seed)
    cfg = TransfoXLConfig(vocab_size=v, cutoffs=cutoffs, clamp_len=-1, same_length=False, **preset,
                          extra={"tgt_len": tgt_len})
    return TransfoXLLM(cfg)


class StreamSegments(torch.utils.data.Dataset):
    """The LM iterator as a dataset: item i = s·B + b is segment s of stream b (inputs
    streams[b, sT : sT+t], targets shifted by one, t = T except at the end). Read in order in batches
    of B items, batch s is segment s of every stream, as `segments` yields it."""

    def __init__(self, streams: torch.Tensor, tgt_len: int):
        self.streams = streams
        self.starts = list(range(0, streams.shape[1] - 1, tgt_len))
        self.tgt_len = tgt_len

    def __len__(self) -> int:
        return len(self.starts) * self.streams.shape[0]

    def __getitem__(self, i: int) -> dict:
        s, b = divmod(i, self.streams.shape[0])
        start = self.starts[s]
        t = min(self.tgt_len, self.streams.shape[1] - 1 - start)
        return {"input_ids": self.streams[b, start:start + t], "labels": self.streams[b, start + 1:start + 1 + t],
                "first": s == 0}


def stack_segments(items: list[dict]) -> dict:
    """Trainer's collator: one segment of every stream -> input_ids, labels [B, t]; `first`: segment 0."""
    return {"input_ids": torch.stack([x["input_ids"] for x in items]),
            "labels": torch.stack([x["labels"] for x in items]), "first": items[0]["first"]}


class StreamingLM(nn.Module):
    """A Transformer-XL as a Trainer model: forward(input_ids [B, t], labels [B, t], first) returns
    {"loss": mean -log P(target) over the B·t targets}; each layer's memory carries over from one call
    to the next (detached, as Transformer-XL trains) and starts empty at a stream's first segment."""

    def __init__(self, lm: TransfoXLLM):
        super().__init__()
        self.lm = lm
        self.mems: list[torch.Tensor] | None = None
        # Trainer's name for the tied tensors a checkpoint leaves out: after loading one it calls tie_weights
        self._keys_to_ignore_on_save = sorted(set(super().state_dict()) - set(self.state_dict()))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, first: bool = False) -> dict:
        if first or self.mems is None:
            self.mems = self.lm.transformer.empty_mems(input_ids.shape[0])
        out = self.lm(input_ids, self.mems, targets=labels)
        self.mems = out.mems
        return {"loss": out.losses.mean()}

    def tie_weights(self) -> None:
        self.lm.tie_weights()

    def state_dict(self, *args, **kwargs):
        """Each shared (tied) tensor once, under its first name, so that Trainer's safetensors file can
        hold it."""
        full = super().state_dict(*args, **kwargs)
        seen, out = set(), type(full)()
        for name, tensor in full.items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                out[name] = tensor
        return out


class StreamMemories:
    """The memories of a StreamingLM as checkpoint state, so --resume continues every stream exactly."""

    name = "memories"

    def __init__(self, model: StreamingLM):
        self.model = model

    def state(self) -> dict[str, torch.Tensor]:
        return {str(i): m.detach().cpu() for i, m in enumerate(self.model.mems or [])}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        device = next(self.model.parameters()).device
        self.model.mems = [state[str(i)].to(device) for i in range(len(state))] or None


def train_lm(model: str | Path | None, text: str | Path, *, out: str | Path,
             masks: str | Path | MaskStore | None = None, config: str | None = None,
             valid: str | Path | None = None, steps: int | None = 1000, epochs: int = 1, batch_size: int = 16,
             tgt_len: int | None = None, mem_len: int | None = None, lr: float | None = None,
             seed: int = 0, device: torch.device | str = "cpu", overwrite: bool = False, resume: bool = False,
             precision: str = "fp32", gradient_accumulation: int = 1, report_to: str = "none",
             progress: Callable | None = None, backend: str = "auto", split: str | None = None) -> dict:
    """Train a Transformer-XL language model on `text` (read_lines: a file, or a built-in text's `split`,
    by default train) for `steps` optimizer steps (None: `epochs` passes over the text), with masks if
    given, on transformers.Trainer (attnmask/tasks/trainer.py).

    model None and config 'small'|'base': from scratch (vocabulary built from `text`); otherwise
    fine-tune the model folder `model` (its vocabulary). Adam (AdamW without decay), linear warm-up over
    the first 5 % of steps then cosine decay, gradients clipped at norm 0.25; one step reads
    `gradient_accumulation` consecutive segments of every stream. One process only (the memories follow
    the streams in order). `resume` continues from the last checkpoint in out/checkpoint (the memories
    are saved with it). Saves config.json (with "tgt_len" and, with masks, the "attnmask" record),
    model.safetensors, vocab.txt, settings.json and metrics.json to `out`. Returns {'steps',
    'train_loss' (mean of the last 50 steps), 'seconds', 'valid_perplexity' (when `valid`), 'masks'}.
    """
    import json

    if (steps is not None and steps < 1) or epochs < 1 or batch_size < 1:
        raise AttnmaskError("--steps, --epochs and --batch-size must be positive")
    if lr is not None and not lr > 0:
        raise AttnmaskError(f"--lr must be positive, got {lr}")
    if model is None and config is None:
        raise AttnmaskError("give a model folder to fine-tune or --config small|base to train from scratch")
    if model is not None and config is not None:
        raise AttnmaskError("--config trains from scratch; it cannot be combined with a model folder")
    lr = lr or (1e-3 if model is None else 2e-4)
    comparable = {"model": None if model is None else str(model), "text": str(text), "split": split, "config": config,
                  "masks": None if masks is None else str(getattr(masks, "path", masks)), "steps": steps,
                  "epochs": epochs, "batch_size": batch_size, "tgt_len": tgt_len, "mem_len": mem_len, "lr": lr,
                  "seed": seed, "precision": precision, "gradient_accumulation": gradient_accumulation}
    run_dir = RunFolder(Path(out), resume, overwrite)
    loop = LoopSettings(output_dir=run_dir.checkpoints, lr=lr, batch_size=batch_size, epochs=epochs, steps=steps,
                        warmup_share=0.05, scheduler="cosine", weight_decay=0.0, max_grad_norm=0.25, seed=seed,
                        use_cpu=torch.device(device).type == "cpu", precision=precision,
                        gradient_accumulation=gradient_accumulation, report_to=report_to, sequential=True)
    lines = read_lines(text, split)
    if model is None:
        vocab = Vocabulary.build(lines)
        run = with_lengths(new_model(config, vocab, seed), vocab, tgt_len, mem_len)
    else:
        run = load_lm(model, "cpu", tgt_len, mem_len)
    streams = batchify(run.vocab.encode_lines(lines), batch_size)
    data = StreamSegments(streams, run.tgt_len)
    args = training_arguments(loop, len(data.starts))
    if args.world_size > 1:
        raise AttnmaskError("--task lm trains in one process (each stream's memory follows its segments in order)")
    run_dir.check(comparable)
    run_dir.create()
    lm = run.model.to(args.device)
    handle = load_masks(lm, masks, run.tgt_len, run.mem_len, backend) if masks is not None else None
    if not resume:
        (run_dir.path / "settings.json").write_text(json.dumps({"settings": comparable}, indent=2))
    streaming = StreamingLM(lm)
    trainer = make_trainer(streaming, loop, args, data, stack_segments, extensions=[StreamMemories(streaming)],
                           progress=progress)
    start = time.perf_counter()
    run_training(trainer, run_dir.path, resume)
    recent = step_losses(trainer)[-50:]
    summary = {"steps": trainer.state.global_step, "train_loss": float(np.mean(recent)) if recent else None,
               "seconds": time.perf_counter() - start, "masks": handle.store.digest if handle is not None else None}
    if valid is not None:
        summary["valid_perplexity"] = evaluate(run, run.vocab.encode_lines(read_lines(valid)),
                                               batch_size)["perplexity"]
    save_lm(run, run_dir.path, handle)
    (run_dir.path / "metrics.json").write_text(json.dumps(summary, indent=2))
    run_dir.finish()
    return summary


def save_lm(run: LMRun, out: Path, handle: MaskHandle | None) -> None:
    """config.json (+ tgt_len, + "attnmask" record with masks), model.safetensors, vocab.txt; with masks
    applied, the model's save_pretrained also writes the mask store into the folder (the runtime's
    follow_saves, as attnmask-masks.zarr), where eval_lm and attnmask.load_model find it."""
    config = run.model.config
    config.extra["tgt_len"] = run.tgt_len
    if handle is not None:
        config.extra["attnmask"] = handle.record()
    else:
        config.extra.pop("attnmask", None)
    run.model.save_pretrained(out)
    run.vocab.save(out)