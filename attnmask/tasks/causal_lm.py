"""Language modelling with any Hugging Face causal LM (GPT-2, Llama-style: a model folder whose config.json's
`architectures` names a transformers causal-LM class), with attention masks applied: perplexity over long
text with a sliding window, and fine-tuning with the causal LM loss on transformers.Trainer.

The text (a file, or a built-in text's split; attnmask.tasks.lm.read_lines) is one document: its non-empty
lines joined by newlines and tokenized once (`text_stream`), a stream of N token ids x_0 .. x_{N-1}.

Perplexity (`sliding_windows`, `perplexity`), window W, stride S (1 <= S < W): window k holds the ids
[b_k, e_k) with b_k = k·S and e_k = min(b_k + W, N), for k = 0, 1, .. up to the first window that reaches
N. It scores the targets [e_{k-1}, e_k) (e_{-1} = 1: x_0 has no context and is never scored), each one
conditioned on every token of the window before it. So each of the N - 1 targets is scored exactly once;
in the first window with all the tokens before it, in later ones after W - S tokens of context only (the
window's first W - S tokens are context, scored by an earlier window). Then

    loss = sum over targets t of -log P(x_t | x_{b_k} .. x_{t-1}) / (N - 1),   perplexity = exp(loss).

Fine-tuning (`train_causal_lm`): the stream cut into consecutive windows of --max-length tokens (the
last, shorter one kept when it holds two or more); each window is an example whose loss is the model's
causal LM loss, the mean of -log P(x_t | the window's tokens before t) over its targets (its first token
is context only). The masks are applied before training, so they act in every forward and backward pass;
the saved folder carries them (attnmask-masks.zarr, beside the record in config.json), and `attnmask eval`
and attnmask.load_model apply them again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.accounting import recorded as recorded_figures
from attnmask.models.base import pick_device
from attnmask.models.families import apply_masks
from attnmask.models.hf import (HuggingFaceSeam, architecture_class, from_folder, model_context,
                                quiet_transformers, register_attention, resolve_model_path)
from attnmask.runtime.attach import MaskHandle, load_store, recorded_masks
from attnmask.runtime.saving import settle_saved
from attnmask.store.data import default_eval_split
from attnmask.store.sites import DECODER_SELF
from attnmask.tasks.classify import check_lengths, masks_for_eval
from attnmask.tasks.lm import read_lines, text_source
from attnmask.tasks.trainer import (LoopSettings, RunFolder, check_precision, make_trainer, run_training, step_losses,
                                    training_arguments)

DEFAULT_WINDOW = 1024  # tokens per window (eval) and per example (train) when --max-length is not given
DEFAULT_LR = 5e-5  # peak learning rate of causal-LM fine-tuning (AdamW, linear warm-up and decay)
RECORD_KEYS = ("attnmask", "attnmask_note", "attn_implementation")  # what a masked save adds to config.json


# ----------------------------------------------------------------------------------------------
# Models


def causal_lm_class(spec: str, config):
    """The transformers class config.json's `architectures` names, refused unless it is a causal LM
    (one of transformers' AutoModelForCausalLM classes): a classifier or a bare body is one error line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    found = architecture_class(spec, getattr(config, "architectures", None))
    if found.__name__ not in names:
        named = ", ".join(config.architectures) if getattr(config, "architectures", None) else "no architecture"
        raise AttnmaskError(f"{spec} is not a causal language model (config.json's architectures: {named}); "
                            "--task lm reads a folder of a causal LM class such as GPT2LMHeadModel or "
                            "LlamaForCausalLM")
    return found


def check_window(window: int, config, option: str = "--max-length") -> None:
    """A window of at least 2 tokens and at most the model's context."""
    if window < 2:
        raise AttnmaskError(f"{option} must be at least 2, got {window}")
    context = model_context(config)
    if context is not None and window > context:
        raise AttnmaskError(f"{option} {window} exceeds the model's {context}-token context")


def default_window(config) -> int:
    context = model_context(config)
    return min(DEFAULT_WINDOW, context) if context is not None else DEFAULT_WINDOW


@dataclass
class CausalLM:
    """A causal LM loaded from a folder: the model (dense, on its device), its tokenizer, and the "attnmask"
    record its config carried (the masks it was saved with; None for a dense save)."""
    model: torch.nn.Module
    tokenizer: object
    record: dict | None
    path: Path


def load_causal_lm(spec: str, device: torch.device) -> CausalLM:
    """The causal LM of a Hugging Face folder (or a Hub id in the local cache), dense, in eval mode.

    A folder saved with masks loads dense here too (transformers' default attention): its record is kept
    in CausalLM.record and taken off the config, so that only the masks applied now are saved with it."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(spec)
    settle_saved(path)  # a save with masks cut short: the folder is the old save or the new one
    quiet_transformers()
    register_attention()
    config = from_folder(spec, AutoConfig.from_pretrained, path)
    model_class = causal_lm_class(spec, config)
    tokenizer = from_folder(spec, AutoTokenizer.from_pretrained, path)
    model = from_folder(spec, model_class.from_pretrained, path, attn_implementation=None)
    if DECODER_SELF not in HuggingFaceSeam.sites(model):
        raise AttnmaskError(f"{spec}: its attention is not causal (no {DECODER_SELF} site); --task lm needs a "
                            "decoder")
    record = recorded_masks(model)
    for key in RECORD_KEYS:
        model.config.__dict__.pop(key, None)
    return CausalLM(model.to(device).eval(), tokenizer, record, path)


def text_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    """The text as one stream of token ids int64 [N]: its lines joined by newlines, tokenized once (with
    the tokenizer's own special tokens, e.g. Llama's BOS at the start)."""
    ids = tokenizer("\n".join(lines), return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Perplexity


@dataclass(frozen=True)
class Window:
    """Window k of the stream: ids [start, end), whose last `scored` ids are its targets."""
    start: int
    end: int
    scored: int

    @property
    def length(self) -> int:
        return self.end - self.start


def sliding_windows(n: int, window: int, stride: int) -> list[Window]:
    """The windows of a stream of n ids (module docstring): every id but the first scored once."""
    if n < 2:
        raise AttnmaskError(f"the text holds {n} token{'s' if n != 1 else ''}; perplexity needs at least 2")
    windows, scored_to = [], 1
    for start in range(0, n, stride):
        end = min(start + window, n)
        windows.append(Window(start, end, end - scored_to))
        scored_to = end
        if end == n:
            break
    return windows


def window_batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length and equal scored count, at most batch_size a batch (no padding)."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0].length, last[0].scored) == (w.length, w.scored):
            last.append(w)
        else:
            batches.append([w])
    return batches


def scored_log_probs(model, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """log P(target) float32 [B, scored] of the last `scored` ids of each row of ids [B, T] (T > scored),
    each given the row's ids before it: the logits of the last scored + 1 positions, the last one dropped."""
    logits = model(input_ids=ids, logits_to_keep=scored + 1).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -scored:, None])[..., 0]


def perplexity(model, stream: torch.Tensor, window: int, stride: int, batch_size: int,
               progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Perplexity of `model` (a causal LM, on its device, masks applied or not) over stream [N] by sliding
    windows (module docstring). progress(windows done, windows, mean loss so far) after each batch.
    Returns {loss, perplexity, tokens (N - 1, the targets scored), windows, seconds}."""
    device = next(model.parameters()).device
    windows = sliding_windows(int(stream.numel()), window, stride)
    total, count, done = 0.0, 0, 0
    started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for batch in window_batches(windows, batch_size):
            ids = torch.stack([stream[w.start:w.end] for w in batch]).to(device)
            log_probs = scored_log_probs(model, ids, batch[0].scored)
            if not bool(torch.isfinite(log_probs).all()):
                raise AttnmaskError("the model gives NaN or infinite log-probabilities on this text; no perplexity "
                                    "is reported")
            total -= float(log_probs.double().sum())
            count += log_probs.numel()
            done += len(batch)
            if progress is not None:
                progress(done, len(windows), total / count)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": len(windows),
            "seconds": round(time.perf_counter() - started, 3)}


def scoring_note(window: int, stride: int, tokens: int) -> str:
    """The sliding-window rule in one line, as the eval output states it."""
    return (f"sliding window of {window} tokens, stride {stride}: each of the {tokens} target tokens is scored "
            f"once, after at least {window - stride} tokens of context (all tokens before it in the first window)")


@dataclass
class PerplexitySettings:
    model: str
    text: str
    masks: str | None = None  # None: the masks recorded in the model folder; "none": dense; else a store
    split: str | None = None  # None: a built-in text's held-out split (valid), a file's one split
    window: int | None = None  # None: min(DEFAULT_WINDOW, the model's context)
    stride: int | None = None  # None: window // 2
    batch_size: int = 8  # windows per forward pass
    device: str = "auto"
    backend: str = "auto"

    def validate(self) -> None:
        if self.batch_size < 1:
            raise AttnmaskError(f"--batch-size must be positive, got {self.batch_size}")
        if self.stride is not None and self.stride < 1:
            raise AttnmaskError(f"--stride must be positive, got {self.stride}")


def eval_causal_lm(settings: PerplexitySettings, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Perplexity of a Hugging Face causal LM on a text (module docstring), with the masks `settings.masks`
    names (default: those recorded in the folder). Returns the perplexity fields and the run's settings,
    the masks (path, digest, note, figures) and `scoring` (the sliding-window rule in words)."""
    settings.validate()
    device = pick_device(settings.device)
    source = text_source(settings.text, settings.split or default_eval_split(str(settings.text)))
    lm = load_causal_lm(settings.model, device)
    window = settings.window if settings.window is not None else default_window(lm.model.config)
    check_window(window, lm.model.config)
    stride = settings.stride if settings.stride is not None else max(1, window // 2)
    if stride >= window:
        raise AttnmaskError(f"--stride {stride} must be smaller than the window (--max-length {window}): each scored "
                            "token needs context in its window")
    store, note = masks_for_eval(lm.path, lm.record, settings.masks)
    if store is not None:
        check_lengths(store, window)
    stream = text_stream(lm.tokenizer, read_lines(settings.text, source.split))
    handle = apply_masks(lm.model, store, backend=settings.backend) if store is not None else None
    try:
        result = perplexity(lm.model, stream, window, stride, settings.batch_size, progress)
    finally:
        if handle is not None:
            handle.remove()
    return {"model": settings.model, "text": str(settings.text), "split": source.split, "window": window,
            "stride": stride, **result, "scoring": scoring_note(window, stride, result["tokens"]),
            "masks": store.path if store is not None else "none", "masks_note": note,
            "masks_digest": store.digest if store is not None else None, **recorded_figures(store),
            "backend": handle.backend if handle is not None else None}


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class CausalTrainSettings:
    model: str
    text: str
    out: str
    masks: str | None = None  # a mask store path, or None for dense training
    split: str | None = None  # None: a built-in text's train split, a file's one split
    epochs: int = 1
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the windows
    lr: float = DEFAULT_LR
    batch_size: int = 8  # windows per batch and process
    max_length: int | None = None  # tokens per window; None: min(DEFAULT_WINDOW, the model's context)
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    precision: str = "fp32"
    gradient_accumulation: int = 1
    report_to: str = "none"
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        check_precision(self.precision, self.device == "cpu")
        if self.epochs < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise AttnmaskError("--steps, --epochs and --batch-size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AttnmaskError(f"--lr must be a positive number, got {self.lr}")
        if self.gradient_accumulation < 1:
            raise AttnmaskError(f"--gradient-accumulation must be positive, got {self.gradient_accumulation}")

    def comparable(self) -> dict:
        """Settings that must match for --resume to continue a run."""
        d = asdict(self)
        for k in ("resume", "overwrite", "device", "out", "report_to"):
            d.pop(k)
        return d


class StreamWindows(torch.utils.data.Dataset):
    """The stream cut into consecutive windows of `length` ids (the last one shorter; one under 2 ids is
    dropped): item i = {"input_ids": stream[i·length : (i+1)·length]}."""

    def __init__(self, stream: torch.Tensor, length: int):
        starts = range(0, int(stream.numel()), length)
        self.windows = [stream[s:s + length] for s in starts if stream.numel() - s >= 2]
        if not self.windows:
            raise AttnmaskError(f"the text holds {int(stream.numel())} token(s); training needs at least 2")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


@dataclass
class PadWindows:
    """Trainer's collator: windows right-padded to the batch's longest -> input_ids, attention_mask and
    labels [B, T] (labels are the ids, -100 at padding: the model shifts them and ignores -100)."""
    pad_id: int

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.int64)
        real = torch.zeros((len(items), longest), dtype=torch.int64)
        for row, x in enumerate(items):
            ids[row, :len(x["input_ids"])] = x["input_ids"]
            real[row, :len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": real, "labels": ids.masked_fill(real == 0, -100)}


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def train_causal_lm(settings: CausalTrainSettings, progress: Callable | None = None) -> dict:
    """Fine-tune a Hugging Face causal LM on a text with the masks applied (module docstring), on Trainer
    (attnmask/tasks/trainer.py: precision, gradient accumulation, several processes, verified --resume).
    AdamW (weight decay 0.01), linear warm-up over the first 10 % of the steps then linear decay, gradients
    clipped at norm 1. Writes into `out` the model (config.json with the masks' record, weights, tokenizer,
    attnmask-masks.zarr with masks), settings.json and metrics.json; returns the metrics."""
    settings.validate()
    device = pick_device(settings.device)
    store = load_store(settings.masks) if settings.masks else None
    run = RunFolder(Path(settings.out), settings.resume, settings.overwrite)
    lm = load_causal_lm(settings.model, torch.device("cpu"))
    max_length = settings.max_length if settings.max_length is not None else default_window(lm.model.config)
    check_window(max_length, lm.model.config)
    if store is not None:
        check_lengths(store, max_length)
    stream = text_stream(lm.tokenizer, read_lines(settings.text, settings.split))
    data = StreamWindows(stream, max_length)
    loop = LoopSettings(output_dir=run.checkpoints, lr=settings.lr, batch_size=settings.batch_size,
                        epochs=settings.epochs, steps=settings.steps, warmup_share=0.1, scheduler="linear",
                        weight_decay=0.01, max_grad_norm=1.0, seed=settings.seed, use_cpu=device.type == "cpu",
                        precision=settings.precision, gradient_accumulation=settings.gradient_accumulation,
                        report_to=settings.report_to)
    args = training_arguments(loop, math.ceil(len(data) / settings.batch_size))
    comparable = {**settings.comparable(), "max_length": max_length}
    run.check(comparable)
    with args.main_process_first(local=False, desc="output folder"):
        if args.process_index == 0:
            run.create()
    model = lm.model.to(args.device)
    handle: MaskHandle | None = apply_masks(model, store, backend=settings.backend) if store is not None else None
    if not settings.resume and args.process_index == 0:
        (run.path / "settings.json").write_text(json.dumps(
            {"settings": comparable, "train_windows": len(data), "train_tokens": int(stream.numel()),
             "masks_digest": store.digest if store else None}, indent=2))
    trainer = make_trainer(model, loop, args, data, PadWindows(pad_id(lm.tokenizer)), progress=progress)
    started = time.perf_counter()
    output = run_training(trainer, run.path, settings.resume)
    recent = step_losses(trainer)[-50:]
    metrics = {"steps": trainer.state.global_step, "train_loss": float(np.mean(recent)) if recent else None,
               "train_loss_all_steps": output.training_loss, "train_windows": len(data),
               "train_tokens": int(stream.numel()), "max_length": max_length,
               "seconds": round(time.perf_counter() - started, 2),
               "masks": store.path if store else None, "masks_digest": store.digest if store else None,
               **recorded_figures(store), "backend": handle.backend if handle else None, "device": str(args.device),
               "processes": args.world_size, "precision": settings.precision}
    if args.process_index == 0:
        model.save_pretrained(run.path)  # with masks applied, their store goes into the folder too
        lm.tokenizer.save_pretrained(run.path)
        (run.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.finish()
    if handle is not None:
        handle.remove()
    return metrics
