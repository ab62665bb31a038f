"""Fine-tune and evaluate sequence classifiers with compiled attention masks applied.

`train(settings)` fine-tunes AutoModelForSequenceClassification (the model's body plus a new head when
it has none) on labelled texts, with the masks applied in training and evaluation, and writes into
`settings.out`:

    config.json, model.safetensors, tokenizer files   the model (config records the masks' digest)
    attnmask-masks.zarr                               the mask store used (if any): the model's save_pretrained
                                                      writes it while the masks are applied (so do Trainer's
                                                      checkpoints); `eval` and attnmask.load_model read it
    settings.json                                     the settings, the label names and the split
    metrics.json                                      accuracy on the held-out split, loss, time, the masks'
                                                      data_sparsity, mass_kept, plane_sparsity
    checkpoint/                                       while training: state for --resume (removed at the end)
    attnmask-run.json                                 what the run wrote (only such a run is replaced by
                                                      --overwrite; the new run is built beside it and
                                                      swapped in at the end: trainer.RunFolder)

Training runs on transformers.Trainer through attnmask/tasks/trainer.py (precision, gradient accumulation,
multi-GPU, report_to, verified resume); token pruning plugs in as its loss term and callbacks there.

The held-out split is fixed by the seed: the first `limit` labelled examples (all without a limit) are
shuffled with `seed`, the first round(eval_split * n) of them form the held-out set, the rest the
training set. `split` names the dataset split DATA is read from (the data layer's --split).

Dispatch points for other tasks: `TRAINERS[task]` and `EVALUATORS[task]`; settings are one dataclass
(`TrainSettings`) so new options are one field.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnmask.errors import AttnmaskError
from attnmask.masks.accounting import recorded as recorded_figures
from attnmask.tasks.trainer import (LearnedThresholds, LoopSettings, RunFolder, check_precision, make_trainer,
                                    prediction_trainer, read_record, run_training, step_losses, training_arguments)

from attnmask.models.base import pick_device
from attnmask.models.families import apply_masks
from attnmask.models.hf import loading_error, quiet_transformers, register_attention, resolve_model_path
from attnmask.pruning.tokens import config_from_fields, install_pruning, recorded_config
from attnmask.runtime.attach import load_store, recorded_masks
from attnmask.runtime.saving import MASKS_IN_FOLDER, folder_masks, settle_saved
from attnmask.store.data import iter_labeled, resolve_data
DEFAULT_LR = 2e-4  # peak learning rate of classifier fine-tuning: the measured default (README, "Training defaults")
DEFAULT_LABELS = {name: ("category", ["fresh", "rotten"]) for name in ("rotten-tomatoes", "rotten-tomatoes-full")}


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
    lr: float = DEFAULT_LR
    batch_size: int = 16
    max_length: int = 128
    eval_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    limit: int | None = None  # the first N labelled examples
    split: str | None = None  # the dataset split of DATA (None: the data layer's default)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (Trainer's mixed precision)
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    report_to: str = "none"  # Trainer's logging integrations, comma-separated
    resume: bool = False
    overwrite: bool = False
    pruning: dict | None = None  # token pruning: attnmask.pruning.tokens.PruningConfig fields, None = off

    def validate(self) -> None:
        check_precision(self.precision, self.device == "cpu")
        if self.gradient_accumulation < 1:
            raise AttnmaskError(f"--gradient-accumulation must be positive, got {self.gradient_accumulation}")
        if self.pruning is not None:
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
        for k in ("resume", "overwrite", "device", "out", "report_to"):
            d.pop(k)
        return d


@dataclass
class LabelledData:
    texts: list[str]
    labels: list[int]
    names: list[str]  # label id -> label name
    split: str | None = None  # the dataset split read (the data layer's name for it)


# ----------------------------------------------------------------------------------------------
# Data


def label_defaults(data: str, label_column: str | None, labels: list[str] | None) -> tuple[str, list[str] | None]:
    """(label column, label values kept): rotten-tomatoes defaults to category fresh vs rotten."""
    column, values = DEFAULT_LABELS.get(data, ("label", None))
    if label_column is not None and label_column != column:
        return label_column, labels
    return column, labels if labels is not None else values


def read_labelled(data: str, text_column: str | None, label_column: str | None,
                  labels: list[str] | None, names: list[str] | None = None, split: str | None = None) -> LabelledData:
    """All (text, label) pairs of DATA (its dataset split `split`); label ids follow `names` if given,
    else sorted label values."""
    source = resolve_data(data, text_column, split=split)
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
    return LabelledData([t for t, _ in pairs], [index[label] for _, label in pairs], list(names), source.split)


def split(n: int, eval_split: float, seed: int, limit: int | None) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded permutation of the first `limit` indices of range(n) (all
    without a limit), cut at eval_split."""
    order = np.random.default_rng(seed).permutation(min(n, limit) if limit is not None else n).tolist()
    n_eval = max(1, round(eval_split * len(order)))
    if n_eval >= len(order):
        raise AttnmaskError(f"{len(order)} examples are too few for --eval-split {eval_split}")
    return order[n_eval:], order[:n_eval]


# ----------------------------------------------------------------------------------------------
# Models


def load_classifier(spec: str, num_labels: int | None, names: list[str] | None, device: torch.device):
    """(model, tokenizer): a sequence classifier from a Hugging Face folder or 'minilm', in eager mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(spec)
    quiet_transformers()
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
        raise loading_error(spec, path, e, "a sequence classifier") from None
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


class LabelledExamples(torch.utils.data.Dataset):
    """Examples i of a LabelledData as {"text", "label"} (tokenized per batch by EncodeBatch)."""

    def __init__(self, data: LabelledData, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        return {"text": self.data.texts[j], "label": self.data.labels[j]}


@dataclass
class EncodeBatch:
    """Trainer's data collator: texts -> input ids padded to the batch's longest (at most max_length)."""

    tokenizer: object
    max_length: int

    def __call__(self, items: list[dict]) -> dict:
        enc = self.tokenizer([x["text"] for x in items], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {**enc, "labels": torch.tensor([x["label"] for x in items])}


def predicted_scores(trainer, dataset: LabelledExamples, names: list[str]) -> dict:
    """Trainer.predict (batched, every process) scored by `scores`: the argmax logit is the prediction."""
    result = trainer.predict(dataset)
    logits = result.predictions[0] if isinstance(result.predictions, tuple) else result.predictions
    return scores(np.asarray(logits).argmax(-1), np.asarray(result.label_ids), names)


def scores(predicted: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """accuracy: share of the n examples whose prediction is the label; majority: the accuracy of always
    answering the most common label of these n examples (the baseline a model must beat), and that label;
    predicted: how many examples were given each label name (names of label ids 0..C-1)."""
    counts = np.bincount(labels, minlength=len(names))
    return {"accuracy": float((predicted == labels).mean()), "majority": float(counts.max() / len(labels)),
            "majority_label": names[int(counts.argmax())],
            "predicted": {names[i]: int(c) for i, c in enumerate(np.bincount(predicted, minlength=len(names)))}}


def learning_warnings(metrics: dict) -> list[str]:
    """Why a classifier's accuracy (scores' fields) shows it learned nothing: it gives one label to every
    example, or it does not beat the majority class. Metrics without those fields (a run recorded before
    they were) give none."""
    if metrics.get("predicted") is None or metrics.get("majority") is None:
        return []
    predicted = {name: n for name, n in metrics["predicted"].items() if n}
    hint = "; try more examples, more --epochs or another --lr"
    if len(predicted) == 1:
        return [f"the model predicts {next(iter(predicted))!r} for all {sum(predicted.values())} examples: "
                f"it has learned nothing from its inputs{hint}"]
    if metrics["accuracy"] <= metrics["majority"]:
        return [f"accuracy {metrics['accuracy']:.4f} does not beat the majority class ({metrics['majority_label']!r}: "
                f"{metrics['majority']:.4f}){hint}"]
    return []


# ----------------------------------------------------------------------------------------------
# Training


def train_classifier(settings: TrainSettings, progress: Callable | None = None) -> dict:
    """Fine-tune a sequence classifier on Trainer (see the module docstring); returns the metrics written."""
    settings.validate()
    device = pick_device(settings.device)
    store = load_store(settings.masks) if settings.masks else None
    if store is not None:
        check_lengths(store, settings.max_length)
    data = read_labelled(settings.data, settings.text_column, settings.label_column, settings.labels,
                         split=settings.split)
    train_idx, eval_idx = split(len(data.texts), settings.eval_split, settings.seed, settings.limit)
    run = RunFolder(Path(settings.out), settings.resume, settings.overwrite)
    loop = LoopSettings(output_dir=run.checkpoints, lr=settings.lr, batch_size=settings.batch_size,
                        epochs=settings.epochs, warmup_share=0.1, scheduler="linear", weight_decay=0.01,
                        max_grad_norm=1.0, seed=settings.seed, use_cpu=device.type == "cpu",
                        precision=settings.precision, gradient_accumulation=settings.gradient_accumulation,
                        report_to=settings.report_to, eval_batch_size=settings.batch_size * 2,
                        changing_parameters=bool(settings.pruning and settings.pruning["learn_thresholds"]))
    args = training_arguments(loop, math.ceil(len(train_idx) / settings.batch_size))
    run.check(settings.comparable())
    with args.main_process_first(local=False, desc="output folder"):
        if args.process_index == 0:
            run.create()

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model, tokenizer = load_classifier(settings.model, len(data.names), data.names, args.device)
    handle = apply_masks(model, store, backend=settings.backend) if store is not None else None
    pruning = None
    if settings.pruning is not None:
        pruning = install_pruning(model, config_from_fields(settings.pruning), tokenizer)
    extensions = [LearnedThresholds(pruning)] if pruning is not None and settings.pruning["learn_thresholds"] else []
    if not settings.resume and args.process_index == 0:
        (run.path / "settings.json").write_text(json.dumps(
            {"settings": settings.comparable(), "labels": data.names, "train_examples": len(train_idx),
             "eval_examples": len(eval_idx), "masks_digest": store.digest if store else None,
             "backend": handle.backend if handle else None}, indent=2))

    trainer = make_trainer(model, loop, args, LabelledExamples(data, train_idx), EncodeBatch(tokenizer, settings.max_length),
                           extensions=extensions, pruning=pruning, progress=progress)
    started = time.perf_counter()
    output = run_training(trainer, run.path, settings.resume)
    train_seconds = time.perf_counter() - started

    eval_started = time.perf_counter()
    if pruning is not None:
        if extensions and extensions[0].stage == "soft":
            extensions[0].set_stage("hard")
        pruning.reset_stats()
    scored = predicted_scores(trainer, LabelledExamples(data, eval_idx), data.names)
    losses = step_losses(trainer)
    steps_per_epoch = math.ceil(trainer.state.max_steps / settings.epochs)
    metrics = {
        **scored,
        "eval_examples": len(eval_idx),
        "train_examples": len(train_idx),
        "train_loss_last_epoch": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - eval_started, 2),
        "masks": store.path if store else None,
        "masks_digest": store.digest if store else None,
        "tau": store.attrs.get("tau") if store else None,
        "random": store.attrs.get("random") if store else None,
        **recorded_figures(store),
        "backend": handle.backend if handle else None,
        "device": str(args.device),
        "processes": args.world_size,
        "precision": settings.precision,
        "pruning": pruning.record() if pruning is not None else None,
    }
    if args.process_index == 0:
        model.save_pretrained(run.path)
        tokenizer.save_pretrained(run.path)
        (run.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.finish()
    if handle is not None:
        handle.remove()
    if pruning is not None:
        pruning.remove()
    return metrics


TRAINERS: dict[str, Callable[..., dict]] = {"classify": train_classifier}


def train(settings: TrainSettings, progress: Callable | None = None) -> dict:
    """Dispatch on the task (TRAINERS)."""
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
    split: str | None = None  # the dataset split of DATA (None: the data layer's default)
    on: str = "auto"  # held-out (the examples training held out) | all | auto
    batch_size: int = 32
    max_length: int | None = None  # None: the training max length, else 128
    precision: str = "fp32"
    device: str = "auto"
    backend: str = "auto"
    limit: int | None = None  # the first N of the examples evaluated
    pruning: dict | str | None = None  # PruningConfig fields; None: as trained (metrics.json); "none": off

    def validate(self) -> None:
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise AttnmaskError("--batch-size and --limit must be positive")
        if self.on not in ("auto", "held-out", "all"):
            raise AttnmaskError(f"--on must be auto, held-out or all, got {self.on!r}")
        check_precision(self.precision, self.device == "cpu")
        if self.max_length is not None and self.max_length < 2:
            raise AttnmaskError(f"--max-length must be at least 2, got {self.max_length}")


def pruning_for_eval(model_dir: Path, pruning: dict | str | None):
    """(PruningConfig or None, note): explicit, 'none', or the one the model was trained with."""
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
    """The mask store to evaluate with: explicit, 'none', or the one the model was saved with (its folder's
    MASKS_IN_FOLDER, read by folder_masks and checked against the digest the model's config records)."""
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
    settle_saved(model_dir)  # a save cut short: the folder is the old save or the new one
    if not (model_dir / MASKS_IN_FOLDER).exists():
        raise AttnmaskError(f"the model was trained with masks {record['digest'][:19]}… but "
                            f"{model_dir / MASKS_IN_FOLDER} is missing; pass --masks")
    return folder_masks(model_dir, record), "recorded in the model"


def evaluate_classifier(settings: EvalSettings) -> dict:
    """Accuracy of a trained classifier on DATA (its held-out examples when DATA is its training data)."""
    device = pick_device(settings.device)
    path = resolve_model_path(settings.model)
    trained = read_record(path / "settings.json", "settings") if (path / "settings.json").exists() else None
    model, tokenizer = load_classifier(settings.model, None, None, device)
    refuse_non_finite(model, settings.model)
    store, note = masks_for_eval(path, recorded_masks(model), settings.masks)
    names = label_names(model)
    ts = trained["settings"] if trained else {}
    same_data = trained is not None and ts.get("data") == settings.data and ts.get("split") == settings.split
    text_column = settings.text_column or (ts.get("text_column") if same_data else None)
    label_column = settings.label_column or (ts.get("label_column") if same_data else None)
    data = read_labelled(settings.data, text_column, label_column, ts.get("labels") if same_data else None, names,
                         split=settings.split)
    on = settings.on if settings.on != "auto" else ("held-out" if same_data else "all")
    if on == "held-out":
        if not same_data:
            raise AttnmaskError("--on held-out needs the data (and --split) the model was trained on")
        _, idx = split(len(data.texts), ts["eval_split"], ts["seed"], ts.get("limit"))
    else:
        idx = list(range(len(data.texts)))
    idx = idx[: settings.limit]
    max_length = settings.max_length if settings.max_length is not None else ts.get("max_length", 128)
    if store is not None:
        check_lengths(store, max_length)
    handle = apply_masks(model, store, backend=settings.backend) if store is not None else None
    prune_config, prune_note = pruning_for_eval(path, settings.pruning)
    pruning = None
    if prune_config is not None:
        pruning = install_pruning(model, prune_config, tokenizer)
    started = time.perf_counter()
    try:
        trainer = prediction_trainer(model, EncodeBatch(tokenizer, max_length), settings.batch_size,
                                     use_cpu=device.type == "cpu", precision=settings.precision)
        scored = predicted_scores(trainer, LabelledExamples(data, idx), names)
    finally:
        if handle is not None:
            handle.remove()
        if pruning is not None:
            pruning.remove()
    return {"model": settings.model, "data": settings.data, "split": data.split, "on": on,
            "examples": len(idx), **scored, "masks": (store.path if store else "none"), "masks_note": note,
            "masks_digest": store.digest if store else None, **recorded_figures(store),
            "backend": handle.backend if handle else None, "max_length": max_length,
            "precision": settings.precision, "seconds": round(time.perf_counter() - started, 2),
            "pruning": pruning.record() if pruning is not None else None, "pruning_note": prune_note}


def refuse_non_finite(model, spec: str) -> None:
    """Refuse a classifier with a NaN or infinite weight (its accuracy would mean nothing), and make every
    forward pass refuse non-finite logits (a forward hook; the model is evaluated and discarded)."""
    bad = next((name for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise AttnmaskError(f"{spec}: weight {bad} holds NaN or infinite values; the model cannot be evaluated "
                            "(train it again)")

    def check_logits(module, inputs, output) -> None:
        if not bool(torch.isfinite(output.logits).all()):
            raise AttnmaskError(f"{spec} gives NaN or infinite logits on these inputs; no accuracy is reported "
                                "(try --precision fp32)")

    model.register_forward_hook(check_logits)


EVALUATORS: dict[str, Callable[[EvalSettings], dict]] = {"classify": evaluate_classifier}


def evaluate(settings: EvalSettings) -> dict:
    settings.validate()
    if settings.task not in EVALUATORS:
        raise AttnmaskError(f"--task {settings.task!r} is not supported (choose from {', '.join(EVALUATORS)})")
    return EVALUATORS[settings.task](settings)
