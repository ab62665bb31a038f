"""The workflows behind `attnmask train` and `attnmask eval`: which one a MODEL argument and --task pick, the
command-line options each takes, how each runs from the parsed options and the columns of its result.

The CLI parses, looks the workflow up (`train_workflow`, `eval_workflow`), refuses the options that do not
apply to it, runs it and prints its Outcome. Every branch of these two commands on the model family or the
task lives here (the tables at the end); other commands and the Python API find a model's family through
attnmask/models/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attnmask.errors import AttnmaskError
from attnmask.models.base import pick_device
from attnmask.models.transfo_xl import is_transfo_xl_folder
from attnmask.tasks.causal_lm import CausalTrainSettings, PerplexitySettings, eval_causal_lm, train_causal_lm
from attnmask.tasks.classify import EvalSettings, TrainSettings, evaluate, learning_warnings, train
from attnmask.tasks.lm import eval_lm, train_lm
from attnmask.tasks.translate import evaluate_fairseq, train_fairseq

Progress = Callable[[int, int, float, int], None]
Warn = Callable[[str], None]

_FAIRSEQ_EVAL_OPTIONS = frozenset({"beam", "post_process", "bleu_tokenize"})


@dataclass(frozen=True)
class Applies:
    """The options (parameter names) that apply `where` (a message tail; {name} fields are filled from the
    parsed options): `only` these, or, when `only` is None, every option of the command `but` these."""
    where: str
    only: frozenset[str] | None = None
    but: frozenset[str] = frozenset()

    def names(self, every: set[str]) -> set[str]:
        return set(self.only) if self.only is not None else set(every) - self.but


@dataclass(frozen=True)
class Outcome:
    """What a run reports: `metrics`, its result row (None: no row), and `notes`, lines shown after it."""
    metrics: dict | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workflow:
    """One way `train` or `eval` runs.

    check(options) refuses missing or unexpected positional arguments and a missing --out, before anything
    else; `applies` lists the option checks, in order; run(options, progress, warn) does the work
    (`progress` is the step callback when `progress_bar`, its bar labelled `progress_label`; `warn` gets warning
    lines); `columns` names the result row's table columns, or is None when the row is printed as one JSON object."""
    check: Callable[[dict], None]
    applies: tuple[Applies, ...]
    run: Callable[[dict, Progress | None, Warn], Outcome]
    columns: tuple[str, ...] | None
    progress_bar: bool = False
    progress_label: str = "train"


def _masks(spec: str | None) -> str | None:
    return None if spec == "none" else spec


def _check_train(options: dict) -> None:
    if options["fairseq_args"]:
        raise AttnmaskError(f"unexpected extra arguments {' '.join(options['fairseq_args'])} "
                            "(only MODEL fairseq takes them)")
    if options["out"] is None:
        raise AttnmaskError("--out is required (the folder for the trained model)")


def _check_fairseq_train(options: dict) -> None:
    """fairseq-train takes the arguments after --; nothing else to check."""


def _train_fairseq(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """A fairseq translation model trained by fairseq's own loop (attnmask.tasks.translate.train_fairseq) on the
    binarized DATA, with the masks inside every attention; the fairseq-train arguments come after --."""
    record = train_fairseq(options["data"], _masks(options["masks"]), options["fairseq_args"] or [], warn=warn)
    return Outcome(None, (f"trained with masks {record['digest'] if record else 'none (dense)'}",))


def _train_lm(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """A Transformer-XL language model trained on the text DATA (attnmask.tasks.lm.train_lm: a file, or a built-in
    text's --split, by default train), from MODEL or, with MODEL 'none' and --config, from scratch."""
    model = options["model"]
    summary = train_lm(None if model == "none" else model, options["data"], out=options["out"],
                       config=options["config"], masks=_masks(options["masks"]), steps=options["steps"],
                       epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"],
                       tgt_len=options["max_length"], seed=options["seed"], device=pick_device(options["device"]),
                       overwrite=options["overwrite"], resume=options["resume"], precision=options["precision"],
                       gradient_accumulation=options["gradient_accumulation"], report_to=options["report_to"],
                       progress=progress, backend=options["backend"], split=options["split"])
    return Outcome(summary)


def _train_causal_lm(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """A Hugging Face causal LM fine-tuned on the text DATA (attnmask.tasks.causal_lm.train_causal_lm: a file, or a
    built-in text's --split, by default train) in windows of --max-length tokens, with the masks."""
    given = {k: options[k] for k in ("lr",) if options[k] is not None}
    settings = CausalTrainSettings(model=options["model"], text=options["data"], out=str(options["out"]),
                                   masks=_masks(options["masks"]), split=options["split"], epochs=options["epochs"],
                                   steps=options["steps"], batch_size=options["batch_size"],
                                   max_length=options["max_length"], seed=options["seed"], device=options["device"],
                                   backend=options["backend"], precision=options["precision"],
                                   gradient_accumulation=options["gradient_accumulation"],
                                   report_to=options["report_to"], resume=options["resume"],
                                   overwrite=options["overwrite"], **given)
    return Outcome(train_causal_lm(settings, progress))


def _train_classify(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """A sequence classifier fine-tuned on labelled DATA with the masks (attnmask.tasks.classify.train), token
    pruning from options["pruning"] (the parsed --prune-tokens / --learn-thresholds)."""
    labels = options["labels"]
    given = {k: options[k] for k in ("lr", "max_length") if options[k] is not None}
    settings = TrainSettings(model=options["model"], data=options["data"], out=str(options["out"]),
                             masks=_masks(options["masks"]), task=options["task"],
                             text_column=options["text_column"], label_column=options["label_column"],
                             labels=labels.split(",") if labels else None, epochs=options["epochs"],
                             batch_size=options["batch_size"], eval_split=options["eval_split"],
                             seed=options["seed"], device=options["device"], backend=options["backend"],
                             limit=options["limit"], split=options["split"], precision=options["precision"],
                             gradient_accumulation=options["gradient_accumulation"],
                             report_to=options["report_to"], resume=options["resume"],
                             overwrite=options["overwrite"], pruning=options["pruning"], **given)
    settings.validate()
    metrics = train(settings, progress)
    warn_unlearned(metrics, warn)
    return Outcome(metrics)


def warn_unlearned(metrics: dict, warn: Warn) -> None:
    """A warning line for each reason the classifier's accuracy shows it learned nothing
    (attnmask.tasks.classify.learning_warnings)."""
    for line in learning_warnings(metrics):
        warn(line)


def _check_fairseq_eval(options: dict) -> None:
    if options["data_bin"] is None:
        raise AttnmaskError("usage: attnmask eval fairseq CHECKPOINT DATA_BIN [--masks MASKS]")


def _check_eval(options: dict) -> None:
    if options["data_bin"] is not None:
        raise AttnmaskError(f"unexpected extra argument {options['data_bin']} (only MODEL fairseq takes DATA_BIN)")


def _eval_fairseq(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """BLEU of the fairseq checkpoint DATA on a split of DATA_BIN (attnmask.tasks.translate.evaluate_fairseq),
    decoded with beam search under --masks (default: the masks it was trained with)."""
    masks = options["masks"]
    result = evaluate_fairseq(options["data"], options["data_bin"],
                              "recorded" if masks is None else _masks(masks), split=options["split"] or "test",
                              beam=options["beam"], max_sentences=options["batch_size"], limit=options["limit"],
                              post_process=options["post_process"], tokenize=options["bleu_tokenize"],
                              device=pick_device(options["device"]), backend=options["backend"])
    for line in result.warnings:
        warn(line)
    notes = ((f"note: the checkpoint was trained with masks {result.trained_with}",)
             if result.trained_with and result.trained_with != result.masks else ())
    return Outcome(result.summary(), notes)


def _eval_lm(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """Perplexity of the Transformer-XL MODEL on the text DATA (attnmask.tasks.lm.eval_lm: a file, or a built-in
    text's --split, by default its held-out split valid)."""
    return Outcome(eval_lm(options["model"], options["data"], masks=options["masks"],
                           batch_size=options["batch_size"], tgt_len=options["max_length"],
                           device=pick_device(options["device"]), backend=options["backend"],
                           split=options["split"]))


def _eval_causal_lm(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """Perplexity of the Hugging Face causal LM MODEL on the text DATA by sliding windows of --max-length tokens
    moved by --stride (attnmask.tasks.causal_lm.eval_causal_lm), with the masks recorded in MODEL unless --masks
    says otherwise."""
    settings = PerplexitySettings(model=options["model"], text=options["data"], masks=options["masks"],
                                  split=options["split"], window=options["max_length"], stride=options["stride"],
                                  batch_size=options["batch_size"], device=options["device"],
                                  backend=options["backend"])
    windows = (lambda done, total, loss: progress(done, total, loss, 0)) if progress is not None else None
    result = eval_causal_lm(settings, windows)
    return Outcome(result, (f"masks: {result['masks_note']}", result["scoring"]))


def _eval_classify(options: dict, progress: Progress | None, warn: Warn) -> Outcome:
    """Accuracy of the classifier MODEL on labelled DATA (attnmask.tasks.classify.evaluate), with the masks it was
    trained with unless --masks says otherwise; token pruning from options["pruning"]."""
    result = evaluate(EvalSettings(model=options["model"], data=options["data"], masks=options["masks"],
                                   task=options["task"], text_column=options["text_column"],
                                   label_column=options["label_column"], split=options["split"], on=options["on"],
                                   batch_size=options["batch_size"], max_length=options["max_length"],
                                   precision=options["precision"], device=options["device"],
                                   backend=options["backend"], limit=options["limit"], pruning=options["pruning"]))
    warn_unlearned(result, warn)
    return Outcome(result, (f"masks: {result['masks_note']}",))


FAIRSEQ_TRAIN = Workflow(_check_fairseq_train,
                         (Applies("to fairseq (pass fairseq-train arguments after --)", only=frozenset({"masks"})),),
                         _train_fairseq, None)
_LM_TRAIN_OPTIONS = frozenset({
    "masks", "out", "task", "steps", "epochs", "lr", "batch_size", "max_length", "seed", "device", "backend",
    "overwrite", "resume", "precision", "gradient_accumulation", "report_to", "as_json", "as_csv", "split"})
LM_TRAIN = Workflow(_check_train,
                    (Applies("to --task lm on a Transformer-XL", only=_LM_TRAIN_OPTIONS | {"config"}),),
                    _train_lm, ("masks", "steps", "train_loss", "seconds"), progress_bar=True)
CAUSAL_LM_TRAIN = Workflow(_check_train, (Applies("to --task lm with a Hugging Face model", only=_LM_TRAIN_OPTIONS),),
                           _train_causal_lm, ("masks", "data_sparsity", "backend", "max_length", "train_windows",
                                              "steps", "train_loss", "seconds"), progress_bar=True)
CLASSIFY_TRAIN = Workflow(_check_train, (Applies("to --task {task}", but=frozenset({"config", "steps"})),),
                          _train_classify, ("masks", "data_sparsity", "backend", "train_examples", "eval_examples",
                                            "train_loss_last_epoch", "accuracy", "majority", "train_seconds"),
                          progress_bar=True)
FAIRSEQ_EVAL = Workflow(_check_fairseq_eval,
                        (Applies("to fairseq", only=frozenset({"masks", "split", "batch_size", "limit", "device",
                                                               "backend"}) | _FAIRSEQ_EVAL_OPTIONS),),
                        _eval_fairseq, None)
LM_EVAL = Workflow(_check_eval,
                   (Applies("without MODEL fairseq", but=_FAIRSEQ_EVAL_OPTIONS),
                    Applies("to --task lm on a Transformer-XL", only=frozenset({
                        "masks", "task", "batch_size", "max_length", "device", "backend", "as_json", "as_csv",
                        "split"}))),
                   _eval_lm, ("masks", "split", "tokens", "loss", "perplexity", "seconds"))
CAUSAL_LM_EVAL = Workflow(_check_eval,
                          (Applies("without MODEL fairseq", but=_FAIRSEQ_EVAL_OPTIONS),
                           Applies("to --task lm with a Hugging Face model", only=frozenset({
                               "masks", "task", "batch_size", "max_length", "stride", "device", "backend", "as_json",
                               "as_csv", "split"}))),
                          _eval_causal_lm, ("masks", "data_sparsity", "backend", "split", "window", "stride", "tokens",
                                            "loss", "perplexity", "seconds"), progress_bar=True, progress_label="eval")
CLASSIFY_EVAL = Workflow(_check_eval, (Applies("without MODEL fairseq", but=_FAIRSEQ_EVAL_OPTIONS),
                                       Applies("to --task {task}", but=frozenset({"stride"}))),
                         _eval_classify, ("masks", "data_sparsity", "backend", "split", "on", "examples", "accuracy",
                                         "majority"))

# MODEL keywords that name a workflow whatever --task says, then the --task values with their own workflows,
# one per family of MODEL (lm_family); every other task is the classifier's (attnmask.tasks.classify validates it).
_TRAIN_MODELS = {"fairseq": FAIRSEQ_TRAIN}
_TRAIN_TASKS = {"lm": {"transfo-xl": LM_TRAIN, "huggingface": CAUSAL_LM_TRAIN}}
_EVAL_MODELS = {"fairseq": FAIRSEQ_EVAL}
_EVAL_TASKS = {"lm": {"transfo-xl": LM_EVAL, "huggingface": CAUSAL_LM_EVAL}}


def lm_family(model: str) -> str:
    """The family --task lm runs MODEL as: transfo-xl for a Transformer-XL folder and for 'none' (train from
    scratch with --config), else huggingface (a causal LM folder; attnmask.tasks.causal_lm refuses others)."""
    return "transfo-xl" if model == "none" or is_transfo_xl_folder(model) else "huggingface"


def train_workflow(model: str, task: str) -> Workflow:
    """The workflow of `attnmask train MODEL DATA --task TASK`."""
    if model in _TRAIN_MODELS:
        return _TRAIN_MODELS[model]
    return _TRAIN_TASKS[task][lm_family(model)] if task in _TRAIN_TASKS else CLASSIFY_TRAIN


def eval_workflow(model: str, task: str) -> Workflow:
    """The workflow of `attnmask eval MODEL DATA --task TASK`."""
    if model in _EVAL_MODELS:
        return _EVAL_MODELS[model]
    return _EVAL_TASKS[task][lm_family(model)] if task in _EVAL_TASKS else CLASSIFY_EVAL
