"""Fine-tune, evaluate and sweep sequence classifiers with compiled attention masks applied.

`train(settings)` fine-tunes AutoModelForSequenceClassification (the model's body plus a new head when
it has none) on labelled texts, with the masks applied in training and evaluation, and writes into
`settings.out`:

    config.json, model.safetensors, tokenizer files   the model (config records the masks' digest)
    masks/                                            a copy of the mask store used (if any)
    settings.json                                     the settings, the label names and the split
    metrics.json                                      accuracy on the held-out split, loss, time, sparsity
    checkpoint/                                       while training: state for --resume (removed at the end)

The split is fixed by the seed: the labelled examples are shuffled with `seed`, the first
round(eval_split * n) form the held-out set, the rest the training set (`limit` caps n after the
shuffle, so a subset is a random sample of the data).

Dispatch points for other tasks and model families: `TRAINERS[task]`, `EVALUATORS[task]` and
`model_family(spec)`; settings are one dataclass (`TrainSettings`) so new options are one field.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from attnmask.compile import eligible_entries
from attnmask.errors import AttnmaskError

DEFAULT_LABELS = {"rotten-tomatoes": ("category", ["fresh", "rotten"])}
CHECKPOINT_EVERY = 50  # optimizer steps between checkpoints (and one at every epoch end)


@dataclass
class TrainSettings:
    model: str
    data: str
    out: str
    masks: str | None = None  # a mask store path, or None for the dense baseline
    task: str = "classify"
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None  # label values to keep (None: all)
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 128
    eval_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    pruning: dict | None = None  # token pruning: attnmask.pruning.PruningConfig fields, None = off

    def validate(self) -> None:
        if self.pruning is not None:
            from attnmask.pruning import config_from_fields

            config_from_fields(self.pruning).validate()
        if self.task not in TRAINERS:
            raise AttnmaskError(f"--task {self.task!r} is not supported (choose from {', '.join(TRAINERS)})")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise AttnmaskError("--epochs and --batch-size must be positive and --max-length at least 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AttnmaskError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.eval_split < 1:
            raise AttnmaskError(f"--eval-split must lie in (0, 1), got {self.eval_split}")
        if self.limit is not None and self.limit < 2:
            raise AttnmaskError("--limit must be at least 2 (one training and one held-out example)")

    def comparable(self) -> dict:
        """Settings that must match for --resume to continue a run."""
        d = asdict(self)
        for k in ("resume", "overwrite", "device", "out"):
            d.pop(k)
        return d


@dataclass
class LabelledData:
    texts: list[str]
    labels: list[int]
    names: list[str]  # label id -> label name


# ----------------------------------------------------------------------------------------------
# Data


def label_defaults(data: str, label_column: str | None, labels: list[str] | None) -> tuple[str, list[str] | None]:
    """(label column, label values kept): rotten-tomatoes defaults to category fresh vs rotten."""
    column, values = DEFAULT_LABELS.get(data, ("label", None))
    if label_column is not None and label_column != column:
        return label_column, labels
    return column, labels if labels is not None else values


def read_labelled(data: str, text_column: str | None, label_column: str | None,
                  labels: list[str] | None, names: list[str] | None = None) -> LabelledData:
    """All (text, label) pairs of DATA; label ids follow `names` if given, else sorted label values."""
    from attnmask.data import iter_labeled, resolve_data

    source = resolve_data(data, text_column)
    column, keep = label_defaults(data, label_column, labels)
    pairs = list(iter_labeled(source, column, labels=keep))
    if not pairs:
        raise AttnmaskError(f"{data} holds no labelled examples in column {column!r}")
    found = sorted({label for _, label in pairs})
    if names is None:
        names = found
        if len(names) < 2:
            raise AttnmaskError(f"{data}: column {column!r} has a single label value ({names[0]!r}); need two or more")
    unknown = [x for x in found if x not in names]
    if unknown:
        raise AttnmaskError(f"{data} has labels {', '.join(map(repr, unknown[:5]))} the model does not know "
                            f"(model labels: {', '.join(names)})")
    index = {name: i for i, name in enumerate(names)}
    return LabelledData([t for t, _ in pairs], [index[label] for _, label in pairs], list(names))


def split(n: int, eval_split: float, seed: int, limit: int | None) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded permutation of range(n), capped at `limit`, cut at eval_split."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    if limit is not None:
        order = order[:limit]
    n_eval = max(1, round(eval_split * len(order)))
    if n_eval >= len(order):
        raise AttnmaskError(f"{len(order)} examples are too few for --eval-split {eval_split}")
    return order[n_eval:], order[:n_eval]


# ----------------------------------------------------------------------------------------------
# Models


def model_family(spec: str) -> str:
    """The family of a model argument ('huggingface'; other families are dispatched here)."""
    return "huggingface"


def load_classifier(spec: str, num_labels: int | None, names: list[str] | None, device: torch.device):
    """(model, tokenizer): a sequence classifier from a Hugging Face folder or 'minilm', in eager mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from attnmask.models.hf import register_attention, resolve_model_path

    path = resolve_model_path(spec)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    register_attention()
    kwargs = {}
    if num_labels is not None:
        kwargs = {"num_labels": num_labels, "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, attn_implementation="eager", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise AttnmaskError(f"cannot load a sequence classifier from {spec}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def label_names(model) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def mask_plane(store) -> int:
    return min(min(site.keep.shape[2:]) for site in store.sites.values())


def check_lengths(store, max_length: int) -> None:
    """With beyond=error, refuse a --max-length longer than the masks' plane before any work."""
    if store.attrs.get("beyond", "dense") == "error" and max_length > mask_plane(store):
        raise AttnmaskError(f"--max-length {max_length} exceeds the masks' {mask_plane(store)}-position plane "
                            "and they were compiled with --beyond error")


def mask_sparsity(store) -> float:
    """Pruned / eligible entries over all sites, layers and heads of a mask store (0 for no store).

    The compiler records per site `pruned` (over all layers and heads) and `eligible` (per [Q, K]
    plane); without them the share of False entries of `keep` is used.
    """
    if store is None:
        return 0.0
    pruned = eligible = 0
    for site in store.sites.values():
        layers, heads = site.keep.shape[:2]
        if "pruned" in site.attrs and "eligible" in site.attrs:
            pruned += site.attrs["pruned"]
            eligible += site.attrs["eligible"] * layers * heads
        else:
            pruned += int((~site.keep).sum())
            eligible += site.keep.size
    return pruned / max(eligible, 1)


def data_weighted_sparsity(masks, patterns) -> float:
    """Share of the attention entries computed on the collected data that the masks prune.

    sum over sites, layers, heads, (q, k) of count[q, k] * eligible * ~keep, divided by
    sum of count[q, k] * eligible (times layers * heads), with count from the pattern store the
    masks were compiled from and eligible = count > 0 (and k <= q on causal sites). Unlike the
    plane sparsity, an entry reached by few sequences weighs little.
    """
    if masks is None:
        return 0.0
    pruned = total = 0.0
    for name, site in masks.sites.items():
        count = patterns.sites[name].count
        weight = np.where(eligible_entries(count, site.causal), count, 0).astype(np.float64)
        pruned += float((weight * ~site.keep).sum())
        total += float(weight.sum()) * site.keep.shape[0] * site.keep.shape[1]
    return pruned / max(total, 1.0)


def batches(texts: list[str], labels: list[int], order: list[int], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield [texts[j] for j in idx], torch.tensor([labels[j] for j in idx])


def encode(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], batch_size: int, max_length: int,
             device: torch.device) -> float:
    """Share of examples whose argmax logit is the label."""
    model.eval()
    correct = 0
    for chunk, y in batches(texts, labels, list(range(len(texts))), batch_size):
        logits = model(**encode(tokenizer, chunk, max_length, device)).logits
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return correct / max(len(texts), 1)


# ----------------------------------------------------------------------------------------------
# Training


def read_record(path: Path, need: str | None = None) -> dict:
    """A JSON object a run wrote (settings.json, metrics.json), in which `need` (if given) holds an
    object; a damaged file is a clear error."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or (need is not None and not isinstance(record.get(need), dict)):
        raise AttnmaskError(f"{path} is damaged (not a JSON object{f' with {need!r}' if need else ''}); "
                            "train the run again (--overwrite)")
    return record


def prepare_out(settings: TrainSettings) -> Path:
    """Check the output folder: new, resumable (--resume), or replaceable (--overwrite)."""
    out = Path(settings.out)
    ckpt = out / "checkpoint"
    if settings.resume:
        if (out / "metrics.json").exists() and not ckpt.exists():
            raise AttnmaskError(f"{out} holds a finished run; nothing to resume")
        if not ckpt.exists():
            raise AttnmaskError(f"{out} has no checkpoint to resume from")
        saved = read_record(out / "settings.json", "settings")["settings"]
        mine = settings.comparable()
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise AttnmaskError(f"--resume with settings that differ from the checkpoint's: {', '.join(diff)}")
        return out
    if out.exists() and any(out.iterdir()):
        if not settings.overwrite:
            hint = "--resume or --overwrite" if ckpt.exists() else "--overwrite"
            raise AttnmaskError(f"output {out} already exists (pass {hint})")
        if not ((out / "settings.json").exists() or (out / "checkpoint").exists()):
            raise AttnmaskError(f"output {out} exists and is not an attnmask training run; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(out: Path, model, optimizer, scheduler, epoch: int, step_in_epoch: int, global_step: int) -> None:
    """Write the training state to out/checkpoint atomically (temporary folder, then rename)."""
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    old = out / "checkpoint"
    if old.exists():
        shutil.rmtree(old)
    tmp.rename(old)


def load_checkpoint(out: Path, model, optimizer, scheduler, device: torch.device) -> tuple[int, int, int]:
    """Restore the state `save_checkpoint` wrote into model, optimizer, scheduler and torch's RNG; returns
    (epoch, step in epoch, global step). The file is read with torch's weights-only unpickler, which
    builds tensors and plain containers and refuses anything else, so a planted file cannot run code;
    a damaged or foreign file is one clear error."""
    path = out / "checkpoint" / "state.pt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol of a foreign file
            state = torch.load(path, map_location=device, weights_only=True)
        counters = [state[k] for k in ("epoch", "step_in_epoch", "global_step")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counters):
            raise ValueError("its step counters are not non-negative integers")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    except pickle.UnpicklingError:
        raise AttnmaskError(f"checkpoint {path} is damaged or holds objects other than tensors and plain values "
                            "(never loaded: they could run code); pass --overwrite to start the run over") from None
    except Exception as e:  # noqa: BLE001 - zip, I/O, key, type and shape errors of a damaged file
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise AttnmaskError(f"checkpoint {path} cannot be resumed ({type(e).__name__}{': ' if detail else ''}"
                            f"{detail}); pass --overwrite to start the run over") from None
    return counters[0], counters[1], counters[2]


def train_classifier(settings: TrainSettings, progress: Callable | None = None) -> dict:
    """Fine-tune a sequence classifier (see the module docstring); returns the metrics written."""
    from attnmask.models.base import pick_device
    from attnmask.runtime import apply_masks, load_store

    settings.validate()
    device = pick_device(settings.device)
    store = load_store(settings.masks) if settings.masks else None
    if store is not None:
        check_lengths(store, settings.max_length)
    data = read_labelled(settings.data, settings.text_column, settings.label_column, settings.labels)
    train_idx, eval_idx = split(len(data.texts), settings.eval_split, settings.seed, settings.limit)
    out = prepare_out(settings)

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model, tokenizer = load_classifier(settings.model, len(data.names), data.names, device)
    handle = apply_masks(model, store, backend=settings.backend) if store is not None else None
    pruning = None
    if settings.pruning is not None:
        from attnmask.pruning import config_from_fields, install_pruning

        pruning = install_pruning(model, config_from_fields(settings.pruning), tokenizer)
    if not settings.resume:
        (out / "settings.json").write_text(json.dumps(
            {"settings": settings.comparable(), "labels": data.names, "train_examples": len(train_idx),
             "eval_examples": len(eval_idx), "masks_digest": store.digest if store else None,
             "backend": handle.backend if handle else None}, indent=2))

    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    groups = [{"params": list(model.parameters())}]
    if pruning is not None and pruning.threshold_parameters():
        from attnmask.pruning import THRESHOLD_LR

        groups.append({"params": pruning.threshold_parameters(), "lr": THRESHOLD_LR, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.01)
    warmup = max(1, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    start_epoch, start_step, global_step = 0, 0, 0
    if settings.resume:
        start_epoch, start_step, global_step = load_checkpoint(out, model, optimizer, scheduler, device)

    started = time.perf_counter()
    losses: list[float] = []
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        order = np.random.default_rng(settings.seed + 1 + epoch).permutation(train_idx).tolist()
        for step, (chunk, y) in enumerate(batches(data.texts, data.labels, order, settings.batch_size)):
            if epoch == start_epoch and step < start_step:
                continue
            if pruning is not None and pruning.pruner.stage == "soft" and global_step >= total_steps // 2:
                pruning.set_stage("hard")  # LTP: learn thresholds for half the steps, then freeze and remove
            loss = model(**encode(tokenizer, chunk, settings.max_length, device), labels=y.to(device)).loss
            if pruning is not None:
                loss = loss + pruning.penalty()
            if not torch.isfinite(loss):
                raise AttnmaskError(f"the training loss became {loss.item()} at step {global_step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            global_step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(global_step, total_steps, loss.item(), epoch)
            if global_step % CHECKPOINT_EVERY == 0:
                save_checkpoint(out, model, optimizer, scheduler, epoch, step + 1, global_step)
        save_checkpoint(out, model, optimizer, scheduler, epoch + 1, 0, global_step)
    train_seconds = time.perf_counter() - started

    eval_started = time.perf_counter()
    if pruning is not None:
        if pruning.pruner.stage == "soft":
            pruning.set_stage("hard")
        pruning.reset_stats()
    eval_texts = [data.texts[i] for i in eval_idx]
    eval_labels = [data.labels[i] for i in eval_idx]
    acc = accuracy(model, tokenizer, eval_texts, eval_labels, settings.batch_size * 2, settings.max_length, device)
    metrics = {
        "accuracy": acc,
        "eval_examples": len(eval_idx),
        "train_examples": len(train_idx),
        "train_loss_last_epoch": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "steps": global_step,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - eval_started, 2),
        "masks": store.path if store else None,
        "masks_digest": store.digest if store else None,
        "tau": store.attrs.get("tau") if store else None,
        "random": store.attrs.get("random") if store else None,
        "sparsity": mask_sparsity(store),
        "backend": handle.backend if handle else None,
        "device": str(device),
        "pruning": pruning.record() if pruning is not None else None,
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if store is not None and store.path:
        shutil.rmtree(out / "masks", ignore_errors=True)
        shutil.copytree(store.path, out / "masks")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if handle is not None:
        handle.remove()
    if pruning is not None:
        pruning.remove()
    return metrics


TRAINERS: dict[str, Callable[..., dict]] = {"classify": train_classifier}


def train(settings: TrainSettings, progress: Callable | None = None) -> dict:
    """Dispatch on the task (and, inside a trainer, on the model family)."""
    if settings.task not in TRAINERS:
        raise AttnmaskError(f"--task {settings.task!r} is not supported (choose from {', '.join(TRAINERS)})")
    return TRAINERS[settings.task](settings, progress)


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalSettings:
    model: str
    data: str
    masks: str | None = None  # None: the masks recorded in the model; "none": dense
    task: str = "classify"
    text_column: str | None = None
    label_column: str | None = None
    split: str = "auto"  # auto | eval | all
    batch_size: int = 32
    max_length: int | None = None  # None: the training max length, else 128
    device: str = "auto"
    backend: str = "auto"
    limit: int | None = None
    pruning: dict | str | None = None  # PruningConfig fields; None: as trained (metrics.json); "none": off

    def validate(self) -> None:
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise AttnmaskError("--batch-size and --limit must be positive")
        if self.max_length is not None and self.max_length < 2:
            raise AttnmaskError(f"--max-length must be at least 2, got {self.max_length}")


def pruning_for_eval(model_dir: Path, pruning: dict | str | None):
    """(PruningConfig or None, note): explicit, 'none', or the one the model was trained with."""
    from attnmask.pruning import config_from_fields, recorded_config

    if pruning == "none":
        return None, "off (requested)"
    if isinstance(pruning, dict):
        return config_from_fields(pruning), "requested"
    metrics = model_dir / "metrics.json"
    record = read_record(metrics).get("pruning") if metrics.exists() else None
    if record is None:
        return None, "off (the model was trained without token pruning)"
    return recorded_config(record), "as trained"


def masks_for_eval(model_dir: Path, record: dict | None, masks: str | None):
    """The mask store to evaluate with: explicit, 'none', or the one recorded in the model."""
    from attnmask.runtime import load_store

    if masks == "none":
        return None, "dense (requested)"
    if masks is not None:
        store = load_store(masks)
        if record is None:
            note = "requested; the model was trained dense"
        elif record["digest"] == store.digest:
            note = "requested; the masks the model was trained with"
        else:
            note = "requested; NOT the masks the model was trained with"
        return store, note
    if record is None:
        return None, "dense (the model records no masks)"
    local = model_dir / "masks"
    if not local.exists():
        raise AttnmaskError(f"the model was trained with masks {record['digest'][:19]}… but {local} is missing; "
                            "pass --masks")
    store = load_store(local)
    if store.digest != record["digest"]:
        raise AttnmaskError(f"{local} has digest {store.digest[:19]}…, not the {record['digest'][:19]}… "
                            "recorded in the model")
    return store, "recorded in the model"


def evaluate_classifier(settings: EvalSettings) -> dict:
    """Accuracy of a trained classifier on DATA (held-out split when DATA is its training data)."""
    from attnmask.models.base import pick_device
    from attnmask.models.hf import resolve_model_path
    from attnmask.runtime import apply_masks, recorded_masks

    device = pick_device(settings.device)
    path = resolve_model_path(settings.model)
    trained = read_record(path / "settings.json", "settings") if (path / "settings.json").exists() else None
    model, tokenizer = load_classifier(settings.model, None, None, device)
    store, note = masks_for_eval(path, recorded_masks(model), settings.masks)
    names = label_names(model)
    ts = trained["settings"] if trained else {}
    same_data = trained is not None and ts.get("data") == settings.data
    text_column = settings.text_column or (ts.get("text_column") if same_data else None)
    label_column = settings.label_column or (ts.get("label_column") if same_data else None)
    data = read_labelled(settings.data, text_column, label_column, ts.get("labels") if same_data else None, names)
    use = settings.split if settings.split != "auto" else ("eval" if same_data else "all")
    if use == "eval":
        if not same_data:
            raise AttnmaskError("--split eval needs the data the model was trained on")
        if settings.limit is not None:
            raise AttnmaskError("--limit applies only with --split all (the held-out split is fixed by training)")
        _, idx = split(len(data.texts), ts["eval_split"], ts["seed"], ts.get("limit"))
    elif use == "all":
        idx = list(range(len(data.texts)))[: settings.limit]
    else:
        raise AttnmaskError(f"--split must be auto, eval or all, got {settings.split!r}")
    max_length = settings.max_length if settings.max_length is not None else ts.get("max_length", 128)
    if store is not None:
        check_lengths(store, max_length)
    handle = apply_masks(model, store, backend=settings.backend) if store is not None else None
    prune_config, prune_note = pruning_for_eval(path, settings.pruning)
    pruning = None
    if prune_config is not None:
        from attnmask.pruning import install_pruning

        pruning = install_pruning(model, prune_config, tokenizer)
    started = time.perf_counter()
    try:
        acc = accuracy(model, tokenizer, [data.texts[i] for i in idx], [data.labels[i] for i in idx],
                       settings.batch_size, max_length, device)
    finally:
        if handle is not None:
            handle.remove()
        if pruning is not None:
            pruning.remove()
    return {"model": settings.model, "data": settings.data, "split": use, "examples": len(idx),
            "accuracy": acc, "masks": (store.path if store else "none"), "masks_note": note,
            "masks_digest": store.digest if store else None, "sparsity": mask_sparsity(store),
            "backend": handle.backend if handle else None, "max_length": max_length,
            "seconds": round(time.perf_counter() - started, 2),
            "pruning": pruning.record() if pruning is not None else None, "pruning_note": prune_note}


EVALUATORS: dict[str, Callable[[EvalSettings], dict]] = {"classify": evaluate_classifier}


def evaluate(settings: EvalSettings) -> dict:
    settings.validate()
    if settings.task not in EVALUATORS:
        raise AttnmaskError(f"--task {settings.task!r} is not supported (choose from {', '.join(EVALUATORS)})")
    return EVALUATORS[settings.task](settings)


# ----------------------------------------------------------------------------------------------
# Sweep


SWEEP_FIELDS = ("kind", "tau", "sparsity", "accuracy", "train_loss_last_epoch", "train_seconds", "run")


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnmaskError(f"--taus expects comma-separated numbers, got {text!r}") from None
    if not taus or any(not 0 <= t < 1 for t in taus):
        raise AttnmaskError(f"--taus must be numbers in [0, 1), got {text!r}")
    return taus


def sweep(base: TrainSettings, patterns: str, taus: list[float], random_baseline: bool, out: Path,
          compile_options: dict | None = None, dense: bool = True,
          on_run: Callable[[str, dict], None] | None = None, progress: Callable | None = None) -> list[dict]:
    """Compile, train and evaluate at each tau (and random masks when asked); returns one row per run.

    Runs already finished under out/runs/<name> (metrics.json present) are reused, so an interrupted
    sweep continues where it stopped. Writes out/sweep.csv and out/sweep.png.
    """
    from attnmask.compile import CompileSettings, compile_masks
    from attnmask.store import read_patterns, write_masks

    store = read_patterns(patterns)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, str, float | None, str | None]] = []
    if dense:
        runs.append(("dense", "dense", None, None))
    for tau in taus:
        kinds = ["data"] + (["random"] if random_baseline else [])
        for kind in kinds:
            name = f"{kind}-tau{tau:g}"
            masks = out / "masks" / f"{name}.masks.zarr"
            if not masks.exists():
                settings = CompileSettings(tau=tau, random=kind == "random", seed=base.seed,
                                           **(compile_options or {}))
                sites, attrs = compile_masks(store, settings)
                write_masks(masks, sites, attrs)
            runs.append((name, kind, tau, str(masks)))
    rows = []
    for name, kind, tau, masks in runs:
        run_dir = out / "runs" / name
        wanted = replace(base, masks=masks, out=str(run_dir)).comparable()
        saved = json.loads((run_dir / "settings.json").read_text())["settings"] \
            if (run_dir / "settings.json").exists() else None
        if saved != wanted and run_dir.exists():
            shutil.rmtree(run_dir)  # a run of other settings: retrain rather than reuse or resume it
        if (run_dir / "metrics.json").exists() and not (run_dir / "checkpoint").exists():
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            resume = (run_dir / "checkpoint").exists()
            metrics = train(replace(base, masks=masks, out=str(run_dir), resume=resume, overwrite=not resume),
                            progress)
        row = {"kind": kind, "tau": tau if tau is not None else 0.0, "sparsity": metrics["sparsity"],
               "accuracy": metrics["accuracy"], "train_loss_last_epoch": metrics["train_loss_last_epoch"],
               "train_seconds": metrics["train_seconds"], "run": str(run_dir)}
        rows.append(row)
        if on_run is not None:
            on_run(name, row)
    write_csv(out / "sweep.csv", rows)
    plot_sweep(out / "sweep.png", rows, title=f"{base.model} on {base.data}")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(path: Path, rows: list[dict], title: str) -> None:
    """Accuracy against tau: one line per mask kind, the dense accuracy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("data", "o-"), ("random", "s--")):
        pts = sorted((r["tau"], r["accuracy"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                    label="data-informed" if kind == "data" else "random")
    for r in rows:
        if r["kind"] == "dense":
            ax.axhline(r["accuracy"], color="gray", linestyle=":", label="dense")
    ax.set_xlabel("tau (share of eligible attention entries pruned)")
    ax.set_ylabel("accuracy (held-out split)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Demo: the whole story on the embedded default


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    collect_limit: int = 500  # snippets whose attention is averaged (the first ones of the corpus)
    limit: int = 600  # labelled fresh/rotten snippets (seeded sample): 480 training + 120 held out
    tau: float = 0.9
    max_length: int = 64
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print, progress: Callable | None = None) -> dict:
    """collect (MiniLM, Rotten Tomatoes) -> compile at tau -> train dense and masked classifiers.

    Returns {"dense": metrics, "masked": metrics, "sparsity", "seconds", ...}; every stage writes
    under settings.out (patterns.zarr, masks.zarr, dense/, masked/).
    """
    from attnmask.collect import collect
    from attnmask.compile import CompileSettings, compile_masks
    from attnmask.data import iter_texts, resolve_data
    from attnmask.models import load_adapter, pick_device
    from attnmask.store import write_patterns, write_masks

    compile_settings = CompileSettings(tau=settings.tau)
    compile_settings.validate()
    base = TrainSettings(model="minilm", data="rotten-tomatoes", out="", epochs=settings.epochs, lr=settings.lr,
                         batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
                         device=settings.device, backend=settings.backend, limit=settings.limit)
    base.validate()
    if settings.collect_limit < 1:
        raise AttnmaskError(f"--collect-limit must be positive, got {settings.collect_limit}")
    device = pick_device(settings.device)
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()):
        if not settings.overwrite:
            raise AttnmaskError(f"output {out} already exists (pass --overwrite)")
        if not (out / "demo.json").exists() and not (out / "patterns.zarr").exists():
            raise AttnmaskError(f"output {out} exists and is not an attnmask demo; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()

    say(f"1/4 collect: MiniLM attention over the first {settings.collect_limit} Rotten Tomatoes snippets "
        f"(max length {settings.max_length})")
    adapter = load_adapter("minilm", device)
    source = resolve_data("rotten-tomatoes")
    result = collect(adapter, iter_texts(source, settings.collect_limit), batch_size=32,
                     max_length=settings.max_length)
    patterns = write_patterns(out / "patterns.zarr", result.sites,
                              {"model": adapter.identity(), "data": source.identity(),
                               "sequences": result.sequences, "tokens": result.tokens,
                               "max_length": settings.max_length})
    del adapter
    t_collect = time.perf_counter() - started

    say(f"2/4 compile: tau {settings.tau} (scope layer)")
    sites, attrs = compile_masks(patterns, compile_settings)
    masks = write_masks(out / "masks.zarr", sites, attrs)
    sparsity = mask_sparsity(masks)
    weighted = data_weighted_sparsity(masks, patterns)

    say(f"3/4 train dense: fresh vs rotten, {settings.limit} snippets (80/20 split, seed {settings.seed}), "
        f"{settings.epochs} epoch(s)")
    dense = train(replace(base, out=str(out / "dense")), progress)
    say(f"4/4 train masked: same settings, masks at tau {settings.tau}")
    masked = train(replace(base, out=str(out / "masked"), masks=str(out / "masks.zarr")), progress)
    summary = {"dense_accuracy": dense["accuracy"], "masked_accuracy": masked["accuracy"],
               "sparsity": sparsity, "data_weighted_sparsity": weighted, "tau": settings.tau, "eval_examples": dense["eval_examples"],
               "train_examples": dense["train_examples"], "collect_seconds": round(t_collect, 1),
               "dense_train_seconds": dense["train_seconds"], "masked_train_seconds": masked["train_seconds"],
               "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
