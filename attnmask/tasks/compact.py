"""Compact encoders: a span of encoder blocks replaced by a small encoder trained by distillation.

The substitute of the blocks a..b (inclusive) of a BERT encoder of hidden size H is

    S(x) = x + U(C_m(... C_1(D x) ...))

with x [batch, tokens, H] the span's input, D: H -> h and U: h -> H linear maps and C_1..C_m compact
BERT blocks of hidden size h (self-attention with n heads, a feed-forward of width `intermediate`,
post-LayerNorm). U starts at zero, so an untrained substitute is the identity (the span skipped) and
distillation moves it towards the span.

`compact(settings)` runs the stages:

1. teacher. Without a task: MODEL. With `task="classify"`: a sequence classifier of the data's labels,
   MODEL itself when it is one (a folder written by `attnmask train`, say), else MODEL fine-tuned here
   first on the training split with cross-entropy (saved in OUT/teacher, evaluable with `attnmask eval`).
2. distillation of the spans. The teacher runs frozen on the training texts; each substitute gets the
   teacher's input of its span and learns the span's output: the loss is, summed over spans,
   sum over real (not padding) tokens (b, t) of ||S(x)[b, t] - y[b, t]||^2 / (real tokens * H).
3. with `task="classify"`, fine-tuning of the whole student with the teacher's logits z_t:
   KD_WEIGHT * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - KD_WEIGHT) * CE(z_s, label), T = KD_TEMPERATURE.
4. report on the held-out split: accuracy of student and teacher (classify), or the cosine between the
   student's and the teacher's mean-pooled sentence embeddings (mean of the last hidden states over the
   real tokens); parameters; GMACs of one sequence of `gmacs_length` tokens (attnmask/tasks/flops.py).

The result is a Hugging Face folder whose config is the original BERT config with model_type
`attnmask-compact-bert` and `attnmask_compact` (the spans and the substitutes' sizes). attnmask registers
its model classes with transformers' Auto classes (`register_compact_models`, attnmask/models/compact.py,
called by attnmask's loaders), so `from_pretrained` rebuilds the substitutes; no remote code is run.
`compact.json` records what was replaced, why, and the training.

Attention sites: the remaining original blocks stay `encoder.self` (renumbered 0..L'-1 in order); the
compact blocks form the site `encoder.compact` (numbered in order over all substitutes), so masks can be
collected, compiled and applied for both.

Without `replace`, `propose_spans` ranks the spans of a given size by the attention analysis of a
pattern store collected from MODEL (attnmask/analysis/analyze.py): the mean Jensen-Shannon distance between all
pairs of the span's heads, within and across its layers. A low distance means the span's heads repeat
few distinct patterns, which a compact encoder with fewer heads and blocks can reproduce.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification

from attnmask.analysis.analyze import (entropy, js_distances, layer_distributions, mean_distance, site_key_offset,
                                       site_plane)
from attnmask.errors import AttnmaskError
from attnmask.models.base import pick_device
from attnmask.models.compact import (COMPACT_MODEL_TYPE, CompactBertConfig, CompactBertForSequenceClassification,
                                     CompactBertModel, CompactSpec, CompactSubstitute, bert_model_of, parse_spans,
                                     span_text, substitutes)
from attnmask.models.families import load_adapter
from attnmask.models.hf import register_attention, resolve_model_path
from attnmask.store.data import iter_texts, resolve_data
from attnmask.store.stores import match_umask, read_patterns
from attnmask.tasks.classify import label_names, load_classifier, read_labelled, split
from attnmask.tasks.flops import dense_model_flops

RECORD = "compact.json"
TASKS = ("distill", "classify")
KD_TEMPERATURE = 2.0
KD_WEIGHT = 0.5
WARMUP_SHARE = 0.1

Progress = Callable[[str, int, int, float], None]
"""progress(stage, step, total steps, loss) after every optimizer step."""


def check_compactable(config: dict, name: str) -> None:
    """Only plain BERT encoders (model_type bert: BERT, MiniLM, ...) are compacted."""
    model_type = config.get("model_type")
    if model_type == COMPACT_MODEL_TYPE:
        raise AttnmaskError(f"{name} is already a compact model; compact the original model instead")
    if model_type != "bert":
        raise AttnmaskError(f"compact supports BERT encoders (model_type bert, e.g. MiniLM); {name} is {model_type}")
    if config.get("is_decoder"):
        raise AttnmaskError(f"{name} is a BERT used as a decoder; compact supports encoders")


def build_student(teacher: nn.Module, spec: CompactSpec, seed: int) -> nn.Module:
    """The teacher with each span replaced by a fresh substitute (seeded); every other weight copied.

    A classifier teacher gives a classifier student, a base model a base model."""
    fields = {k: v for k, v in teacher.config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "attnmask")}
    config = CompactBertConfig.from_dict({**fields, "attnmask_compact": spec.as_config()})
    config._attn_implementation = teacher.config._attn_implementation
    classify = isinstance(teacher, BertForSequenceClassification)
    torch.manual_seed(seed)
    student = (CompactBertForSequenceClassification if classify else CompactBertModel)(config)
    for substitute in substitutes(student):
        substitute.initialize(config.initializer_range)
    missing, unexpected = student.load_state_dict(renumbered_state(teacher.state_dict(), spec), strict=False)
    fresh = {f"{name}.{p}" for name, module in student.named_modules() if isinstance(module, CompactSubstitute)
             for p, _ in module.named_parameters()}
    if unexpected or set(missing) - fresh:
        raise AttnmaskError(f"cannot copy the teacher's weights (missing {sorted(set(missing) - fresh)[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return student.to(next(teacher.parameters()).device)


def renumbered_state(state: dict, spec: CompactSpec) -> dict:
    """The teacher's state with blocks inside a span dropped and kept blocks at their new index."""
    new_index = {entry: j for j, entry in enumerate(spec.layout()) if isinstance(entry, int)}
    out = {}
    for key, value in state.items():
        match = re.search(r"(^|\.)encoder\.layer\.(\d+)\.", key)
        if match is None:
            out[key] = value
        elif int(match[2]) in new_index:
            out[key[:match.start(2)] + str(new_index[int(match[2])]) + key[match.end(2):]] = value
    return out


# ----------------------------------------------------------------------------------------------
# Cost


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs(model: nn.Module, length: int) -> float:
    """Multiply-accumulates (10^9) of one forward pass of a sequence of `length` tokens, counted by
    torch.utils.flop_counter (FLOPs / 2; matrix products, attention's included)."""
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.ones(1, length, dtype=torch.long, device=device),
              "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        flops = dense_model_flops(lambda: model(**inputs))
    model.train(was_training)
    return flops / 2 / 1e9


# ----------------------------------------------------------------------------------------------
# Proposals from the attention analysis


@dataclass
class SpanProposal:
    span: tuple[int, int]
    rank: int
    score: float      # mean JS distance over all pairs of the span's heads (lower: more redundant)
    within: float     # mean JS distance between heads of the same layer
    across: float     # mean JS distance between heads of different layers (nan for one layer)
    entropy: float    # mean entropy of the span's heads (nats)
    distance: float   # mean attention distance of the span's heads (tokens)
    reason: str


def head_js_matrix(store, site: str = "encoder.self") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(JS distances [L*H, L*H] between all heads of the site, entropy [L, H], mean distance [L, H]).

    Heads are ordered layer-major; distances are analyze.js_distances of the heads' row distributions."""
    patterns = store.sites[site]
    offset = site_key_offset(patterns)
    plane = site_plane(patterns.count, patterns.causal, offset)
    per_layer = [layer_distributions(patterns, layer, plane) for layer in range(patterns.layers)]
    heads = np.concatenate(per_layer)
    ent = np.stack([entropy(P, plane.weights) for P in per_layer])
    dist = np.stack([mean_distance(P, plane.weights, offset) for P in per_layer])
    return js_distances(heads, plane.weights), ent, dist


def propose_spans(store, size: int, layers: int, heads: int) -> list[SpanProposal]:
    """All spans of `size` consecutive encoder blocks, best first: ranked by the mean Jensen-Shannon
    distance over all pairs of their size * heads heads (analyze.js_distances of the average patterns)."""
    site = store.sites.get("encoder.self")
    if site is None:
        raise AttnmaskError(f"{store.path}: the pattern store has no encoder.self site")
    if (site.layers, site.heads) != (layers, heads):
        raise AttnmaskError(f"{store.path} holds {site.layers} layers x {site.heads} heads; the model has "
                            f"{layers} x {heads} (collect the patterns from this model)")
    if not 1 <= size <= layers:
        raise AttnmaskError(f"--span-size must lie in 1..{layers}, got {size}")
    js, ent, dist = head_js_matrix(store)
    layer_of = np.repeat(np.arange(layers), heads)
    rows = []
    for first in range(layers - size + 1):
        chosen = (layer_of >= first) & (layer_of < first + size)
        block = js[np.ix_(chosen, chosen)]
        same = layer_of[chosen][:, None] == layer_of[chosen][None, :]
        pairs = ~np.eye(len(block), dtype=bool)
        rows.append(((first, first + size - 1), float(block[pairs].mean()) if pairs.any() else 0.0,
                     float(block[pairs & same].mean()) if (pairs & same).any() else 0.0,
                     float(block[~same].mean()) if (~same).any() else float("nan"),
                     float(ent[first:first + size].mean()), float(dist[first:first + size].mean())))
    rows.sort(key=lambda r: (r[1], r[0]))
    scores = [r[1] for r in rows]
    out = []
    for rank, (span, score, within, across, e, d) in enumerate(rows, 1):
        lead = (f"the most redundant heads of the {len(rows)} spans of {size} blocks" if rank == 1
                else f"rank {rank} of {len(rows)}")
        across_text = "" if math.isnan(across) else f", across layers {across:.3f}"
        reason = (f"blocks {span_text([span])}: {lead}: mean Jensen-Shannon distance {score:.3f} between its "
                  f"{size * heads} heads (spans range {min(scores):.3f}-{max(scores):.3f}; within layers "
                  f"{within:.3f}{across_text}); mean entropy {e:.2f} nats, mean attention distance {d:.1f} tokens")
        out.append(SpanProposal(span, rank, score, within, across, e, d, reason))
    return out


# ----------------------------------------------------------------------------------------------
# Settings and data


@dataclass
class CompactSettings:
    model: str
    data: str
    out: str | None = None
    replace: str | None = None       # '2-4', '1-2,4'; None: the best span of `patterns`' analysis
    patterns: str | None = None      # pattern store collected from MODEL
    span_size: int | None = None     # span size of the proposals [default: half the blocks]
    hidden: int = 192
    blocks: int = 2
    heads: int = 4
    intermediate: int | None = None  # [default: 4 * hidden]
    task: str = "distill"            # distill (hidden states only) | classify (then fine-tune with KD)
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None
    epochs: int = 1                  # passes over the training split, per training stage
    lr: float = 5e-5                 # fine-tuning (teacher and student)
    distill_lr: float = 1e-3         # distillation of the substitutes
    batch_size: int = 16
    max_length: int = 128
    eval_split: float = 0.2
    seed: int = 0
    limit: int | None = None
    device: str = "auto"
    gmacs_length: int = 128
    overwrite: bool = False

    def validate(self) -> None:
        if self.task not in TASKS:
            raise AttnmaskError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.replace is None and self.patterns is None:
            raise AttnmaskError("give --replace SPANS (e.g. 2-4), or --patterns STORE to have spans proposed")
        if self.replace is not None and (self.patterns is not None or self.span_size is not None):
            raise AttnmaskError("--patterns and --span-size choose the span; they do not apply with --replace")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2 or self.gmacs_length < 1:
            raise AttnmaskError("--epochs, --batch-size and --gmacs-length must be positive, --max-length at least 2")
        for name, value in (("--lr", self.lr), ("--distill-lr", self.distill_lr)):
            if not (value > 0 and math.isfinite(value)):
                raise AttnmaskError(f"{name} must be a positive number, got {value}")
        if not 0 < self.eval_split < 1:
            raise AttnmaskError(f"--eval-split must lie in (0, 1), got {self.eval_split}")
        if self.limit is not None and self.limit < 2:
            raise AttnmaskError("--limit must be at least 2 (one training and one held-out example)")
        if self.task == "distill" and (self.label_column is not None or self.labels is not None):
            raise AttnmaskError("--label-column and --labels apply to --task classify")

    def spec(self, spans, layers: int) -> CompactSpec:
        spec = CompactSpec(tuple(spans), layers, self.hidden, self.blocks, self.heads,
                           self.intermediate if self.intermediate is not None else 4 * self.hidden)
        spec.check()
        return spec


@dataclass
class Examples:
    """Texts (and labels for classify) with the seeded split: train/held are indices into texts."""

    texts: list[str]
    labels: list[int] | None
    names: list[str] | None
    train: list[int]
    held: list[int]


def read_examples(settings: CompactSettings, names: list[str] | None) -> Examples:
    """DATA's texts (distill) or labelled texts (classify), split as `attnmask train` splits them."""
    if settings.task == "classify":
        data = read_labelled(settings.data, settings.text_column, settings.label_column, settings.labels, names)
        texts, labels, names = data.texts, data.labels, data.names
    else:
        texts, labels = list(iter_texts(resolve_data(settings.data, settings.text_column))), None
        if not texts:
            raise AttnmaskError(f"{settings.data} holds no texts")
    train, held = split(len(texts), settings.eval_split, settings.seed, settings.limit)
    return Examples(texts, labels, names, train, held)


def epoch_batches(examples: Examples, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """Index batches of the training split, one seeded permutation per epoch."""
    for epoch in range(epochs):
        order = np.random.default_rng(seed + 1 + epoch).permutation(examples.train).tolist()
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]


def steps_of(examples: Examples, settings: CompactSettings) -> int:
    return math.ceil(len(examples.train) / settings.batch_size) * settings.epochs


# ----------------------------------------------------------------------------------------------
# Training


def optimizer_for(params: list[nn.Parameter], lr: float, total: int):
    """AdamW (weight decay 0.01) with linear warmup over WARMUP_SHARE of the steps and linear decay to 0."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, int(total * WARMUP_SHARE))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    return optimizer, scheduler


def run_steps(stage: str, losses: Iterator[torch.Tensor], params: list[nn.Parameter], lr: float, total: int,
              progress: Progress | None) -> list[float]:
    """Minimise each loss the iterator yields with one optimizer step (gradients clipped at norm 1)."""
    optimizer, scheduler = optimizer_for(params, lr, total)
    history = []
    for step, loss in enumerate(losses, 1):
        if not torch.isfinite(loss):
            raise AttnmaskError(f"{stage}: the loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        if progress is not None:
            progress(stage, step, total, history[-1])
    return history


def encode(tokenizer, texts: list[str], max_length: int, device) -> dict:
    """Token ids and attention mask, padded to the longest text (at most max_length), on `device`."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def fine_tune_teacher(model, tokenizer, examples: Examples, settings: CompactSettings, device,
                      progress: Progress | None) -> list[float]:
    """Cross-entropy fine-tuning of the whole classifier on the training split."""

    def losses():
        model.train()
        for idx in epoch_batches(examples, settings.batch_size, settings.epochs, settings.seed):
            labels = torch.tensor([examples.labels[i] for i in idx], device=device)
            logits = model(**encode(tokenizer, [examples.texts[i] for i in idx], settings.max_length, device)).logits
            yield F.cross_entropy(logits, labels)

    return run_steps("teacher", losses(), list(model.parameters()), settings.lr, steps_of(examples, settings),
                     progress)


class _SpansCaptured(Exception):
    """Raised by the hook on the last span's last block: the rest of the teacher's pass is not needed."""


def distillation_losses(teacher, student, spec: CompactSpec, batches: Iterator[dict]) -> Iterator[torch.Tensor]:
    """For each batch: the teacher runs (no gradients) until the end of the last span, with hooks taking
    each span's input (the arguments of its first block) and output (of its last block); the loss is the
    sum over spans of mean over real tokens and hidden units of (S(input) - output)^2."""
    blocks = bert_model_of(teacher).encoder.layer
    subs = substitutes(student)
    captured: dict[int, list] = {}
    handles = []
    for i, (first, last) in enumerate(spec.spans):
        def take_input(module, args, kwargs, i=i):
            captured[i] = [args, kwargs]

        def take_output(module, args, output, i=i, final=i == len(spec.spans) - 1):
            captured[i].append(output[0] if isinstance(output, tuple) else output)
            if final:
                raise _SpansCaptured

        handles.append(blocks[first].register_forward_pre_hook(take_input, with_kwargs=True))
        handles.append(blocks[last].register_forward_hook(take_output))
    try:
        teacher.eval()
        for sub in subs:
            sub.train()
        for inputs in batches:
            with torch.no_grad():
                try:
                    teacher(**inputs)
                except _SpansCaptured:
                    pass
            real = inputs["attention_mask"].bool()
            loss = 0.0
            for i, sub in enumerate(subs):
                args, kwargs, target = captured[i]
                predicted = sub(*args, **kwargs)
                loss = loss + (predicted - target)[real].pow(2).mean()
            yield loss
    finally:
        for handle in handles:
            handle.remove()


def distill(teacher, student, tokenizer, spec: CompactSpec, examples: Examples, settings: CompactSettings,
            device, progress: Progress | None) -> list[float]:
    """Train the substitutes (only) to reproduce their spans' outputs on the training split."""
    batches = (encode(tokenizer, [examples.texts[i] for i in idx], settings.max_length, device)
               for idx in epoch_batches(examples, settings.batch_size, settings.epochs, settings.seed))
    params = [p for sub in substitutes(student) for p in sub.parameters()]
    return run_steps("distill", distillation_losses(teacher, student, spec, batches), params,
                     settings.distill_lr, steps_of(examples, settings), progress)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KD_WEIGHT * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - KD_WEIGHT) * CE(z_s, labels); the KL
    is summed over classes and averaged over the batch."""
    t = KD_TEMPERATURE
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  log_target=True, reduction="batchmean")
    return KD_WEIGHT * t * t * kl + (1 - KD_WEIGHT) * F.cross_entropy(student_logits, labels)


def fine_tune_student(teacher, student, tokenizer, examples: Examples, settings: CompactSettings, device,
                      progress: Progress | None) -> list[float]:
    """Fine-tune the whole student on the training split with kd_loss against the frozen teacher."""

    def losses():
        teacher.eval()
        student.train()
        for idx in epoch_batches(examples, settings.batch_size, settings.epochs, settings.seed + 1000):
            inputs = encode(tokenizer, [examples.texts[i] for i in idx], settings.max_length, device)
            labels = torch.tensor([examples.labels[i] for i in idx], device=device)
            with torch.no_grad():
                target = teacher(**inputs).logits
            yield kd_loss(student(**inputs).logits, target, labels)

    return run_steps("fine-tune", losses(), list(student.parameters()), settings.lr, steps_of(examples, settings),
                     progress)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: list[str], max_length: int, batch_size: int, device) -> torch.Tensor:
    """[N, H] mean of the last hidden states over each text's real tokens (MiniLM's sentence embedding)."""
    model.eval()
    out = []
    body = bert_model_of(model)
    for start in range(0, len(texts), batch_size):
        inputs = encode(tokenizer, texts[start:start + batch_size], max_length, device)
        hidden = body(**inputs).last_hidden_state
        real = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * real).sum(1) / real.sum(1))
    return torch.cat(out).cpu()


@torch.no_grad()
def predictions(model, tokenizer, texts: list[str], max_length: int, batch_size: int, device) -> torch.Tensor:
    """[N] argmax labels of a classifier."""
    model.eval()
    return torch.cat([model(**encode(tokenizer, texts[s:s + batch_size], max_length, device)).logits.argmax(-1).cpu()
                      for s in range(0, len(texts), batch_size)])


def evaluate_pair(teacher, student, tokenizer, examples: Examples, settings: CompactSettings, device) -> dict:
    """On the held-out split: accuracy of both and their agreement (classify), or the mean, minimum and
    10th percentile over texts of the cosine between student and teacher sentence embeddings."""
    texts = [examples.texts[i] for i in examples.held]
    batch = settings.batch_size * 2
    if settings.task == "classify":
        labels = torch.tensor([examples.labels[i] for i in examples.held])
        t = predictions(teacher, tokenizer, texts, settings.max_length, batch, device)
        s = predictions(student, tokenizer, texts, settings.max_length, batch, device)
        accuracy, teacher_accuracy = float((s == labels).float().mean()), float((t == labels).float().mean())
        return {"accuracy": accuracy, "teacher_accuracy": teacher_accuracy,
                "accuracy_share": accuracy / teacher_accuracy if teacher_accuracy else None,
                "agreement": float((s == t).float().mean()), "eval_examples": len(texts)}
    cosine = F.cosine_similarity(sentence_embeddings(student, tokenizer, texts, settings.max_length, batch, device),
                                 sentence_embeddings(teacher, tokenizer, texts, settings.max_length, batch, device))
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "cosine_p10": float(cosine.quantile(0.1)), "eval_examples": len(texts)}


def cost(model, length: int) -> dict:
    return {"parameters": parameter_count(model),
            "encoder_parameters": parameter_count(bert_model_of(model).encoder), "gmacs": gmacs(model, length)}


def cost_report(teacher, student, length: int) -> dict:
    """Parameters and GMACs of both models and the student's reductions (1 - student / teacher)."""
    t, s = cost(teacher, length), cost(student, length)
    return {"gmacs_length": length, "teacher": t, "student": s,
            "reduction": {k: 1 - s[k] / t[k] for k in t}}


# ----------------------------------------------------------------------------------------------
# Loading, output and the whole run


def load_teacher(settings: CompactSettings, untrained_head: bool, device):
    """(teacher, tokenizer, examples), in eager attention: MODEL's base model (distill), MODEL's own
    classifier, or MODEL with a new head for the data's labels (seeded; fine-tuned later)."""
    if settings.task == "distill":
        adapter = load_adapter(settings.model, device)
        teacher, tokenizer, examples = adapter.model, adapter.tokenizer, read_examples(settings, None)
    elif untrained_head:
        examples = read_examples(settings, None)
        torch.manual_seed(settings.seed)
        teacher, tokenizer = load_classifier(settings.model, len(examples.names), examples.names, device)
    else:
        teacher, tokenizer = load_classifier(settings.model, None, None, device)
        examples = read_examples(settings, label_names(teacher))
    return teacher, tokenizer, examples


def model_config(spec: str) -> dict:
    """MODEL's config as a dict (a folder, 'minilm', or a Hub id in the local cache), without weights."""
    from transformers import AutoConfig

    register_attention()
    try:
        return AutoConfig.from_pretrained(resolve_model_path(spec), local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError) as e:
        raise AttnmaskError(f"cannot read the config of {spec}: {str(e).splitlines()[0]}") from None


def is_classifier_folder(spec: str) -> bool:
    """True when MODEL's config names a sequence-classification architecture (a trained head)."""
    return any(str(a).endswith("ForSequenceClassification") for a in model_config(spec).get("architectures") or [])


def check_out(settings: CompactSettings) -> Path:
    """OUT must be new, empty, or (with overwrite) an earlier compact output; nothing is removed here
    beyond what an interrupted replacement left (settle_output)."""
    out = Path(settings.out)
    settle_output(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not settings.overwrite:
            raise AttnmaskError(f"output {out} already exists (pass --overwrite)")
        if not (out / RECORD).is_file():
            raise AttnmaskError(f"output {out} exists and is not an attnmask compact model; refusing to replace it")
    return out


def settings_record(settings: CompactSettings) -> dict:
    """settings.json: `attnmask eval` reads the data, columns, split and max_length from it."""
    return {"settings": {k: v for k, v in asdict(settings).items() if k not in ("out", "overwrite", "device")}}


def save_folder(folder: Path, model, tokenizer, files: dict[str, dict]) -> None:
    """The model, its tokenizer and `files` ({name: JSON object}) in `folder`, every file and folder with
    the modes the user's umask gives (transformers leaves its weights 0600)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    match_umask(folder)


def moved_aside(out: Path) -> list[Path]:
    """Earlier outputs that replace_output moved aside as `.NAME.old-<hex>`, the last written last."""
    olds = out.parent.glob(f".{glob.escape(out.name)}.old-*") if out.parent.is_dir() else []
    return sorted(olds, key=lambda p: p.stat().st_mtime)


def replace_output(tmp: Path, out: Path) -> None:
    """Move the finished output into place: an earlier output is renamed aside, the new one renamed to
    out, and only then the earlier one removed, so out is always the old output or the new one (a kill
    between the renames is rolled back by settle_output)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def settle_output(out: Path) -> None:
    """Finish what a replace_output killed half-way left: with out missing, the output moved aside is
    put back; beside an out that exists, outputs moved aside are removed."""
    olds = [p for p in moved_aside(out) if (p / RECORD).is_file()]
    if olds and not os.path.lexists(out):
        olds.pop().rename(out)
    for old in olds:
        shutil.rmtree(old)


def choose_spans(settings: CompactSettings, layers: int, heads: int) -> tuple[list[tuple[int, int]], dict]:
    """(spans, how they were chosen): --replace, or the best proposal of the pattern store's analysis."""
    if settings.replace is not None:
        return parse_spans(settings.replace, layers), {"chosen_by": "--replace", "proposals": None}
    proposals = ranked_spans(settings, layers, heads)
    return [proposals[0].span], {"chosen_by": f"analysis of {settings.patterns}",
                                 "proposals": [asdict(p) for p in proposals]}


def ranked_spans(settings: CompactSettings, layers: int, heads: int) -> list[SpanProposal]:
    """propose_spans of the pattern store for spans of --span-size blocks (default: half the blocks)."""
    size = settings.span_size if settings.span_size is not None else max(1, layers // 2)
    return propose_spans(read_patterns(settings.patterns), size, layers, heads)


def model_shape(spec: str) -> tuple[int, int]:
    """(encoder blocks, heads per block) of MODEL, a BERT encoder."""
    config = model_config(spec)
    check_compactable(config, spec)
    return int(config["num_hidden_layers"]), int(config["num_attention_heads"])


def proposals_only(settings: CompactSettings) -> list[SpanProposal]:
    """The ranked span proposals for MODEL from the pattern store, without building anything."""
    return ranked_spans(settings, *model_shape(settings.model))


def compact(settings: CompactSettings, progress: Progress | None = None,
            log: Callable[[str], None] = lambda _: None) -> dict:
    """Build, train, evaluate and save the compact model (see the module docstring); returns compact.json."""
    settings.validate()
    if settings.out is None:
        raise AttnmaskError("--out is required to build the compact model")
    out = check_out(settings)
    device = pick_device(settings.device)
    layers, heads = model_shape(settings.model)
    spans, choice = choose_spans(settings, layers, heads)
    spec = settings.spec(spans, layers)
    for proposal in choice["proposals"] or []:
        log(proposal["reason"])
    classify = settings.task == "classify"
    trained_teacher = classify and not is_classifier_folder(settings.model)
    teacher, tokenizer, examples = load_teacher(settings, trained_teacher, device)
    started = time.perf_counter()
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # the umask's mode, as the output's own folder should have
    try:
        record = {"model": settings.model, "data": settings.data, "replaced": [list(s) for s in spans],
                  "architecture": spec.as_config(), **choice, "teacher": settings.model, "stages": {}}
        if trained_teacher:
            history = fine_tune_teacher(teacher, tokenizer, examples, settings, device, progress)
            record["teacher"] = str(Path(settings.out) / "teacher")
            record["stages"]["teacher"] = stage_record(history)
            save_folder(tmp / "teacher", teacher, tokenizer, {
                "settings.json": settings_record(settings) | {"labels": examples.names},
                "metrics.json": {"trained_by": "attnmask compact (cross-entropy)", **stage_record(history)}})
        teacher.eval()
        student = build_student(teacher, spec, settings.seed)
        record["stages"]["distill"] = stage_record(
            distill(teacher, student, tokenizer, spec, examples, settings, device, progress))
        if classify:
            record["stages"]["fine_tune"] = stage_record(
                fine_tune_student(teacher, student, tokenizer, examples, settings, device, progress))
        metrics = {**evaluate_pair(teacher, student, tokenizer, examples, settings, device),
                   **cost_report(teacher, student, settings.gmacs_length),
                   "train_examples": len(examples.train), "seconds": round(time.perf_counter() - started, 1)}
        record["metrics"] = metrics
        save_folder(tmp, student, tokenizer, {
            "settings.json": settings_record(settings) | ({"labels": examples.names} if classify else {}),
            "metrics.json": metrics, RECORD: record})
        replace_output(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def stage_record(history: list[float]) -> dict:
    """Steps and the mean loss of the first and the last tenth of them."""
    tenth = max(1, len(history) // 10)
    return {"steps": len(history), "loss_first": float(np.mean(history[:tenth])) if history else None,
            "loss_last": float(np.mean(history[-tenth:])) if history else None}
