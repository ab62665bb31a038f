"""Word-level language modelling with Transformer-XL: vocabulary, the LM iterator, training with
attention masks, and perplexity.

The LM iterator is the paper's: the text becomes one stream of word ids (a `<eos>` after every
line), cut into B equally long parallel streams (stream b is the b-th contiguous chunk), read in
segments of T tokens: inputs x[:, i:i+T] and targets x[:, i+1:i+1+T]; each layer's memory carries
over from one segment to the next and starts empty.

Perplexity = exp(sum of -log P(target) / number of targets), over every target of the streams.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.rules import Window, check_beyond
from attnmask.models.transfo_xl_model import TransfoXLConfig, TransfoXLLM
from attnmask.runtime import MaskHandle, apply_masks
from attnmask.store import MaskStore, read_masks

EOS, UNK = "<eos>", "<unk>"
VOCAB_FILE = "vocab.txt"
SITE = "decoder.self"
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")

# Architecture presets for training from scratch (vocabulary size and cutoffs come from the text).
PRESETS = {
    "small": dict(n_layer=4, d_model=128, d_embed=128, n_head=4, d_head=32, d_inner=512, div_val=2,
                  mem_len=32, tgt_len=32, dropout=0.1, dropatt=0.0),
    "base": dict(n_layer=8, d_model=256, d_embed=256, n_head=8, d_head=32, d_inner=1024, div_val=2,
                 mem_len=64, tgt_len=64, dropout=0.1, dropatt=0.0),
}


def tokenize(line: str) -> list[str]:
    """Words, numbers and single punctuation marks, in order ("lord," -> "lord", ",")."""
    return _WORD.findall(line)


class Vocabulary:
    """Word <-> id; `<eos>` is 0 and `<unk>` 1, then words by decreasing frequency (what the
    adaptive softmax's cutoffs assume)."""

    def __init__(self, symbols: list[str]):
        if symbols[:2] != [EOS, UNK]:
            raise AttnmaskError(f"a vocabulary must start with {EOS} and {UNK}")
        self.symbols = symbols
        self.index = {s: i for i, s in enumerate(symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def build(cls, lines: Iterable[str], min_freq: int = 1) -> "Vocabulary":
        counts = Counter(w for line in lines for w in tokenize(line))
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in (EOS, UNK)),
                       key=lambda w: (-counts[w], w))
        return cls([EOS, UNK] + words)

    def encode_lines(self, lines: Iterable[str]) -> torch.Tensor:
        """One long stream [N] of ids: each non-empty line's words then `<eos>`; unknown -> `<unk>`."""
        ids: list[int] = []
        unk = self.index[UNK]
        for line in lines:
            words = tokenize(line)
            if words:
                ids.extend(self.index.get(w, unk) for w in words)
                ids.append(0)
        return torch.tensor(ids, dtype=torch.long)

    def save(self, folder: Path) -> None:
        with open(Path(folder) / VOCAB_FILE, "w", encoding="utf-8") as fh:
            fh.write("\n".join(self.symbols) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Vocabulary":
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise AttnmaskError(f"{folder} has no {VOCAB_FILE} (the word vocabulary of the model)")
        with open(path, encoding="utf-8") as fh:
            return cls([line.rstrip("\n") for line in fh if line.rstrip("\n")])


def read_lines(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise AttnmaskError(f"text file {p} does not exist")
    with open(p, encoding="utf-8", errors="replace") as fh:
        return [line.rstrip("\r\n") for line in fh]


def batchify(stream: torch.Tensor, batch: int) -> torch.Tensor:
    """[N] -> [B, N // B]: row b is the b-th contiguous chunk (the tail that does not fit is dropped)."""
    per = stream.numel() // batch
    if per < 2:
        raise AttnmaskError(f"{stream.numel()} tokens are too few for {batch} parallel streams")
    return stream[: per * batch].view(batch, per)


def segments(streams: torch.Tensor, tgt_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, t], targets [B, t]) with targets the next tokens; t = tgt_len except at the end."""
    n = streams.shape[1]
    for i in range(0, n - 1, tgt_len):
        t = min(tgt_len, n - 1 - i)
        yield streams[:, i:i + t], streams[:, i + 1:i + 1 + t]


# ----------------------------------------------------------------------------------------------
# Masks


def load_masks(lm: TransfoXLLM, masks: str | Path | MaskStore, tgt_len: int, mem_len: int,
               backend: str = "auto") -> MaskHandle:
    """Apply the store's decoder.self masks to the model (attnmask.apply_masks); with the length policy
    "error", segments of tgt_len tokens and mem_len memories must fit the plane (checked before any work)."""
    store = masks if isinstance(masks, MaskStore) else read_masks(masks)
    if SITE not in store.sites:
        raise AttnmaskError(f"mask store {store.path} has no {SITE} site (sites: {', '.join(store.sites)})")
    plane_q, plane_k = store.sites[SITE].keep.shape[2:]
    if plane_k < plane_q:
        raise AttnmaskError(f"masks of {plane_q} queries x {plane_k} keys are not a Transformer-XL plane "
                            "(keys >= queries)")
    check_beyond(Window(tgt_len, mem_len + tgt_len, 0, plane_k - plane_q - mem_len), plane_q, plane_k,
                 store.attrs.get("beyond", "dense"), SITE)
    return apply_masks(lm, store, backend=backend)


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class LMRun:
    model: TransfoXLLM
    vocab: Vocabulary
    tgt_len: int
    mem_len: int


def load_lm(model: str | Path, device: torch.device | str = "cpu", tgt_len: int | None = None,
            mem_len: int | None = None) -> LMRun:
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise AttnmaskError(f"{model} is not a model folder (no config.json)")
    lm = TransfoXLLM.from_pretrained(folder, device)
    return _with_lengths(lm, Vocabulary.load(folder), tgt_len, mem_len)


def _with_lengths(lm: TransfoXLLM, vocab: Vocabulary, tgt_len: int | None, mem_len: int | None) -> LMRun:
    tgt_len = tgt_len or int(lm.config.extra.get("tgt_len", 128))
    if mem_len is not None:
        lm.config.mem_len = mem_len
    if tgt_len < 1 or lm.config.mem_len < 0:
        raise AttnmaskError("--tgt-len must be positive and --mem-len non-negative")
    return LMRun(lm, vocab, tgt_len, lm.config.mem_len)


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
            device: torch.device | str = "cpu", backend: str = "auto") -> dict:
    """Perplexity of a saved Transformer-XL on a text file, with attention masks: `masks`, or when
    None the store recorded in the model's config (if it is still there, same digest), or 'none'.

    Returns {'loss', 'perplexity', 'tokens', 'seconds', 'masks'} (masks: the digest or None)."""
    run = load_lm(model, device, tgt_len, mem_len)
    store = None
    if masks is None:
        masks = recorded_store(run.model.config)
    if masks is not None and str(masks) != "none":
        store = load_masks(run.model, masks, run.tgt_len, run.mem_len, backend).store
    result = evaluate(run, run.vocab.encode_lines(read_lines(text)), batch_size)
    result["masks"] = store.digest if store is not None else None
    return result


def recorded_store(config: TransfoXLConfig) -> MaskStore | None:
    """The mask store a model was trained with, if its config records one that still exists."""
    record = config.extra.get("attnmask")
    if not isinstance(record, dict) or not record.get("path"):
        return None
    path = Path(record["path"])
    if not path.exists():
        raise AttnmaskError(f"the model was trained with masks {path}, which no longer exist; "
                            "pass --masks (or 'none' for dense attention)")
    store = read_masks(path)
    if store.digest != record.get("digest"):
        raise AttnmaskError(f"masks {path} changed since training (digest differs); pass --masks explicitly")
    return store


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


def train_lm(model: str | Path | None, text: str | Path, *, out: str | Path,
             masks: str | Path | MaskStore | None = None, config: str | None = None,
             valid: str | Path | None = None, steps: int | None = 1000, epochs: int = 1, batch_size: int = 16,
             tgt_len: int | None = None, mem_len: int | None = None, lr: float | None = None,
             seed: int = 0, device: torch.device | str = "cpu", overwrite: bool = False,
             log: Callable[[str], None] | None = None, backend: str = "auto") -> dict:
    """Train a Transformer-XL language model on `text` for `steps` segments (None: `epochs` passes
    over the text), with masks if given.

    model None and config 'small'|'base': from scratch (vocabulary built from `text`); otherwise
    fine-tune the model folder `model` (its vocabulary). Adam, linear warm-up over the first 5 % of
    steps then cosine decay, gradients clipped at norm 0.25; the text is read in epochs by the LM
    iterator. Saves config.json (with "tgt_len" and, with masks, the "attnmask" record),
    model.safetensors and vocab.txt to `out`. Returns {'steps', 'train_loss', 'seconds',
    'valid_perplexity' (when `valid`), 'masks'}.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise AttnmaskError(f"output {out} already exists (pass --overwrite to replace it)")
    if (steps is not None and steps < 1) or epochs < 1 or batch_size < 1:
        raise AttnmaskError("--steps, --epochs and --batch-size must be positive")
    if lr is not None and not lr > 0:
        raise AttnmaskError(f"--lr must be positive, got {lr}")
    lines = read_lines(text)
    if model is None:
        if config is None:
            raise AttnmaskError("give a model folder to fine-tune or --config small|base to train from scratch")
        vocab = Vocabulary.build(lines)
        run = _with_lengths(new_model(config, vocab, seed), vocab, tgt_len, mem_len)
        run.model.to(device)
        lr = lr or 1e-3
    else:
        if config is not None:
            raise AttnmaskError("--config trains from scratch; it cannot be combined with a model folder")
        run = load_lm(model, device, tgt_len, mem_len)
        lr = lr or 2e-4
    lm, handle = run.model, None
    if masks is not None:
        handle = load_masks(lm, masks, run.tgt_len, run.mem_len, backend)
    streams = batchify(run.vocab.encode_lines(lines), batch_size).to(device)
    if steps is None:
        steps = epochs * math.ceil((streams.shape[1] - 1) / run.tgt_len)

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(lm.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    lm.train()
    step, recent, start = 0, [], time.perf_counter()
    while step < steps:
        mems = lm.transformer.empty_mems(batch_size)
        for x, y in segments(streams, run.tgt_len):
            result = lm(x, mems, targets=y)
            mems = result.mems
            loss = result.losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 0.25)
            optimizer.step()
            schedule.step()
            recent = (recent + [float(loss.detach())])[-50:]
            step += 1
            if log is not None and step % 50 == 0:
                log(f"step {step}/{steps}: loss {np.mean(recent):.3f}")
            if step >= steps:
                break
    seconds = time.perf_counter() - start
    summary = {"steps": step, "train_loss": float(np.mean(recent)), "seconds": seconds,
               "masks": handle.store.digest if handle is not None else None}
    if valid is not None:
        summary["valid_perplexity"] = evaluate(run, run.vocab.encode_lines(read_lines(valid)),
                                               batch_size)["perplexity"]
    save_lm(run, out, handle)
    return summary


def save_lm(run: LMRun, out: Path, handle: MaskHandle | None) -> None:
    """config.json (+ tgt_len, + "attnmask" record with masks), model.safetensors, vocab.txt."""
    config = run.model.config
    config.extra["tgt_len"] = run.tgt_len
    if handle is not None:
        config.extra["attnmask"] = handle.record()
    else:
        config.extra.pop("attnmask", None)
    run.model.save_pretrained(out)
    run.vocab.save(out)
