"""Training on Hugging Face `transformers.Trainer` (accelerate underneath): one loop for every task.

`attnmask train` builds a Trainer (`make_trainer`) whose extensions carry what attnmask adds:

* masks are applied to the model before training (`attnmask.apply_masks`); nothing else is needed;
* `AttnmaskTrainer.compute_loss` adds LTP's pruning penalty λ · kept-fraction to the task loss while the
  token pruner is in its soft stage, and `create_optimizer` gives the learned thresholds their own
  parameter group (learning rate THRESHOLD_LR, no weight decay);
* `StageSwitch` moves token pruning from the soft to the hard stage once half the optimizer steps are done
  (the thresholds then stop receiving gradients: multi-GPU runs let DDP find unused parameters);
* `SafeCheckpoints` saves every CHECKPOINT_EVERY optimizer steps and at every epoch end; after Trainer has
  written checkpoint-N (model weights, learned thresholds included) it adds `attnmask-state.safetensors`
  (the extensions' state: the token-pruning stage, Transformer-XL memories), drops Trainer's pickled `training_args.bin` (never read on resume),
  writes `attnmask-checkpoint.json` (sha256 of every file) last, and removes older checkpoints;
* `StepReport` calls `progress(step, total, loss, epoch)` after every optimizer step (loss: mean over the
  step's micro-batches, penalty included) and refuses a non-finite loss.

Resume (`verified_checkpoint`): the newest checkpoint whose manifest exists (a checkpoint cut short while
being written has none); every file must match its recorded sha256 and no other file may be present; the
files Trainer reads with `torch.load` (optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth) are read
here first with `weights_only=True` (tensors and plain values only: a planted object cannot run code;
Trainer itself reads them the same way); trainer_state.json must be a JSON object of TrainerState's
fields whose global_step does not pass the run's planned steps; the model weights must carry the model's
tensor names and shapes. Anything else is one error line. Precision (`fp32`, `bf16`, `fp16`), gradient accumulation,
`report_to` and multi-process training (`torchrun` / `accelerate launch`) are Trainer's own.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from attnmask.errors import AttnmaskError
from attnmask.pruning.tokens import THRESHOLD_LR
from attnmask.store.stores import match_umask, sha256_hex

CHECKPOINT_EVERY = 50  # optimizer steps between checkpoints (and one at every epoch end)
CHECKPOINTS = "checkpoint"  # the run folder's subfolder holding Trainer's checkpoint-N folders
MANIFEST = "attnmask-checkpoint.json"
STATE_FILE = "attnmask-state.safetensors"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")  # + rng_state*.pth: what Trainer torch.loads
PRECISIONS = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------
# Settings shared by the tasks


@dataclass
class LoopSettings:
    """What the training loop needs from a task: optimisation, schedule and Trainer's run options.

    The schedule is Trainer's: linear warm-up over `warmup_steps` optimizer steps, then `scheduler`
    (linear to 0, or cosine) over the rest; AdamW with `weight_decay` (0 makes it Adam); gradients
    clipped to `max_grad_norm`. `steps` None trains `epochs` passes over the data."""

    output_dir: Path
    lr: float
    batch_size: int
    epochs: int = 1
    steps: int | None = None
    warmup_share: float = 0.1
    scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    use_cpu: bool = False
    precision: str = "fp32"
    gradient_accumulation: int = 1
    report_to: str = "none"
    eval_batch_size: int | None = None
    sequential: bool = False  # read the data in order (Transformer-XL streams), not shuffled
    changing_parameters: bool = False  # some parameters stop training midway (learned thresholds)


def check_precision(precision: str, use_cpu: bool) -> None:
    if precision not in PRECISIONS:
        raise AttnmaskError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and use_cpu:
        raise AttnmaskError("--precision fp16 needs a CUDA GPU (use bf16 on the CPU)")


def report_targets(report_to: str) -> list[str]:
    """'none' -> []; 'tensorboard,wandb' -> ['tensorboard', 'wandb'] (integrations Trainer knows)."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    missing = [n for n in names if n not in available and n != "all"]
    if missing:
        raise AttnmaskError(f"--report-to {', '.join(missing)}: not installed (installed: "
                            f"{', '.join(available) or 'none'})")
    return names


def training_arguments(loop: LoopSettings, batches_per_epoch: int):
    """Trainer's TrainingArguments for `loop` (checkpoints are written by SafeCheckpoints' rules);
    `batches_per_epoch` (per process) sizes the warm-up."""
    from transformers import TrainingArguments

    check_precision(loop.precision, loop.use_cpu)
    if loop.gradient_accumulation < 1:
        raise AttnmaskError(f"--gradient-accumulation must be positive, got {loop.gradient_accumulation}")
    optimizer_steps = loop.steps or loop.epochs * math.ceil(batches_per_epoch / loop.gradient_accumulation)
    try:
        return TrainingArguments(
            output_dir=str(loop.output_dir), per_device_train_batch_size=loop.batch_size,
            per_device_eval_batch_size=loop.eval_batch_size or loop.batch_size,
            gradient_accumulation_steps=loop.gradient_accumulation, learning_rate=loop.lr,
            weight_decay=loop.weight_decay, max_grad_norm=loop.max_grad_norm, num_train_epochs=loop.epochs,
            max_steps=loop.steps or -1, lr_scheduler_type=loop.scheduler,
            warmup_steps=max(1, int(loop.warmup_share * optimizer_steps)), seed=loop.seed, data_seed=loop.seed,
            bf16=loop.precision == "bf16", fp16=loop.precision == "fp16", use_cpu=loop.use_cpu,
            report_to=report_targets(loop.report_to), logging_strategy="steps",
            logging_steps=max(1, min(50, optimizer_steps // 20)), save_strategy="steps", save_steps=CHECKPOINT_EVERY,
            save_total_limit=None, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            ddp_find_unused_parameters=loop.changing_parameters)
    except (ValueError, ImportError) as e:  # e.g. bf16 on hardware that lacks it
        raise AttnmaskError(f"cannot train with these settings: {(str(e).splitlines() or [''])[0]}") from None


# ----------------------------------------------------------------------------------------------
# Extensions: state a task adds to the model, saved with every checkpoint


class Extension(Protocol):
    """Training state outside the model's weights (saved in attnmask-state.safetensors)."""

    name: str

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


class LearnedThresholds:
    """Token pruning with learned thresholds (attnmask.pruning.tokens.PruningHandle): the stage.

    The thresholds θ [L] are a parameter of the model (its pruning submodule), so Trainer saves and
    restores them with the weights; this extension adds the stage. `parameters` are captured at
    install time (soft stage, the only time the handle lists them) for their optimizer group."""

    name = "pruning"

    def __init__(self, handle):
        self.handle = handle
        self.parameters = handle.threshold_parameters()
        self.stage = "soft"

    def set_stage(self, stage: str) -> None:
        self.handle.set_stage(stage)
        self.stage = stage

    def state(self) -> dict[str, torch.Tensor]:
        return {"hard": torch.tensor(self.stage == "hard")}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"hard"}:
            raise AttnmaskError("the checkpoint's token-pruning state does not match --prune-tokens")
        self.set_stage("hard" if bool(state["hard"]) else "soft")


# ----------------------------------------------------------------------------------------------
# Trainer and callbacks


class LossLog:
    """Micro-batch losses of the current optimizer step (detached), averaged when the step ends."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def pop_mean(self) -> float:
        value = float(torch.stack(self.pending).float().mean()) if self.pending else float("nan")
        self.pending = []
        return value


def make_trainer_class():
    """AttnmaskTrainer, built on first use so that importing attnmask does not import Trainer."""
    from transformers import Trainer

    class AttnmaskTrainer(Trainer):
        """Trainer whose loss adds the token-pruning penalty (soft stage) and whose optimizer trains the
        learned thresholds in their own group."""

        def __init__(self, *args, pruning=None, thresholds: LearnedThresholds | None = None,
                     threshold_lr: float = 1e-3, losses: LossLog | None = None, sequential: bool = False,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.pruning = pruning
            self.thresholds = thresholds
            self.threshold_lr = threshold_lr
            self.losses = losses
            self.sequential = sequential
            # every loss here is a mean over its micro-batch: Trainer then divides by the accumulation steps
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if self.pruning is not None and model.training:
                loss = loss + self.pruning.penalty()
            if self.losses is not None and model.training:
                self.losses.add(loss)
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self.thresholds is not None and self.thresholds.parameters:
                own = {id(p) for p in self.thresholds.parameters}
                for group in optimizer.param_groups:  # move θ out of the model's groups into its own
                    group["params"] = [p for p in group["params"] if id(p) not in own]
                optimizer.add_param_group({"params": self.thresholds.parameters, "lr": self.threshold_lr,
                                           "weight_decay": 0.0})
            return optimizer

        def _get_train_sampler(self, *args, **kwargs):
            if self.sequential:
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

    return AttnmaskTrainer


def callbacks(extensions: list[Extension], losses: LossLog, progress: Callable | None) -> list:
    """The attnmask callbacks: stage switch (when pruning learns thresholds), checkpoints, step report."""
    from transformers import TrainerCallback

    class StageSwitch(TrainerCallback):
        """LTP: learn thresholds (soft stage) for the first half of the optimizer steps, then freeze them
        and remove tokens (hard stage)."""

        def __init__(self, thresholds: LearnedThresholds):
            self.thresholds = thresholds

        def on_step_begin(self, args, state, control, **kwargs):
            if self.thresholds.stage == "soft" and state.global_step >= state.max_steps // 2:
                self.thresholds.set_stage("hard")

    class SafeCheckpoints(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            if not args.should_save:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            finish_checkpoint(folder, extensions)
            for old in Path(args.output_dir).glob("checkpoint-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)

    class StepReport(TrainerCallback):
        def __init__(self):
            self.step_losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            loss = losses.pop_mean()
            if not math.isfinite(loss):
                raise AttnmaskError(f"the training loss became {loss} at step {state.global_step}; lower --lr")
            self.step_losses.append(loss)
            if progress is not None:
                progress(state.global_step, state.max_steps, loss, max(0, math.ceil(state.epoch or 0) - 1))

    thresholds = [e for e in extensions if isinstance(e, LearnedThresholds) and e.parameters]
    return [StageSwitch(t) for t in thresholds] + [SafeCheckpoints(), StepReport()]


def make_trainer(model, loop: LoopSettings, args, train_dataset, collator, *, extensions: Iterable[Extension] = (),
                 pruning=None, progress: Callable | None = None):
    """An AttnmaskTrainer for `model` (already on args.device, masks and pruning installed); `args` from
    training_arguments(loop, ...)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    extensions = list(extensions)
    losses = LossLog()
    cls = make_trainer_class()
    thresholds = next((e for e in extensions if isinstance(e, LearnedThresholds)), None)
    trainer = cls(model=model, args=args, train_dataset=train_dataset,
                  data_collator=collator, callbacks=callbacks(extensions, losses, progress), pruning=pruning,
                  thresholds=thresholds, threshold_lr=THRESHOLD_LR, losses=losses, sequential=loop.sequential)
    for quiet in (PrinterCallback, ProgressCallback):  # the CLI draws its own progress bar
        trainer.remove_callback(quiet)
    trainer.extensions = extensions
    return trainer


def prediction_trainer(model, collator, batch_size: int, use_cpu: bool, precision: str = "fp32"):
    """A plain Trainer for `trainer.predict` only (evaluation: batching, devices, mixed precision); it
    writes nothing (its output folder is a temporary one)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    check_precision(precision, use_cpu)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="attnmask-eval-"), per_device_eval_batch_size=batch_size,
                             use_cpu=use_cpu, bf16_full_eval=precision == "bf16", fp16_full_eval=precision == "fp16",
                             report_to=[], disable_tqdm=True, remove_unused_columns=False)
    shutil.rmtree(args.output_dir)
    return Trainer(model=model, args=args, data_collator=collator)


def step_losses(trainer) -> list[float]:
    """The mean loss of every optimizer step this process ran (oldest first)."""
    report = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "StepReport")
    return report.step_losses


def run_training(trainer, run_dir: Path, resume: bool):
    """trainer.train(), from the newest verified checkpoint under run_dir/checkpoint when resuming; the
    extensions' state is restored when training begins (after Trainer restored weights and optimizer).
    Returns Trainer's TrainOutput (`training_loss`: the mean over this session's optimizer steps of the
    loss it back-propagated, micro-batch losses divided by the accumulation steps and summed)."""
    from transformers import TrainerCallback

    checkpoint = verified_checkpoint(run_dir, trainer.model, trainer.extensions, planned_steps(trainer)) \
        if resume else None
    if checkpoint is not None:
        state = read_extension_state(checkpoint)

        class RestoreExtensions(TrainerCallback):
            def on_train_begin(self, args, state_, control, **kwargs):
                for ext in trainer.extensions:
                    ext.load_state({k.split(".", 1)[1]: v for k, v in state.items()
                                    if k.split(".", 1)[0] == ext.name})

        trainer.add_callback(RestoreExtensions())
    return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def finish_checkpoint(folder: Path, extensions: list[Extension]) -> None:
    """Complete the checkpoint Trainer wrote: extension state, no pickled arguments, manifest last."""
    from safetensors.torch import save_file

    state = {f"{ext.name}.{k}": v.contiguous() for ext in extensions for k, v in ext.state().items()}
    save_file(state, str(folder / STATE_FILE))
    (folder / "training_args.bin").unlink(missing_ok=True)
    files = {str(p.relative_to(folder)): sha256_hex(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.rename(folder / MANIFEST)


def read_extension_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / STATE_FILE))


def checkpoint_error(folder: Path, why: str) -> AttnmaskError:
    return AttnmaskError(f"checkpoint {folder} cannot be resumed ({why}); pass --overwrite to start the run over")


def planned_steps(trainer) -> int:
    """The optimizer steps the run makes in all: --steps, else epochs x ceil(batches / accumulation) (as
    Trainer counts them)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = len(trainer.get_train_dataloader())
    return math.ceil(args.num_train_epochs * max(1, math.ceil(batches / args.gradient_accumulation_steps)))


TRAINER_STATE = "trainer_state.json"


def check_trainer_state(folder: Path, planned: int | None) -> None:
    """Trainer's trainer_state.json in a checkpoint is a JSON object of TrainerState's fields whose
    global_step is an integer in [0, planned] (Trainer would fail on anything else with a traceback, or
    train past the end)."""
    from dataclasses import fields

    from transformers import TrainerState

    try:
        record = json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise checkpoint_error(folder, f"it has no {TRAINER_STATE}") from None
    except (ValueError, UnicodeDecodeError):
        raise checkpoint_error(folder, f"{TRAINER_STATE} is not valid JSON") from None
    if not isinstance(record, dict):
        raise checkpoint_error(folder, f"{TRAINER_STATE} holds a JSON {type(record).__name__}, not an object")
    unknown = sorted(set(record) - {f.name for f in fields(TrainerState)})
    if unknown:
        raise checkpoint_error(folder, f"{TRAINER_STATE} has fields Trainer does not know: {', '.join(unknown[:3])}")
    step = record.get("global_step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise checkpoint_error(folder, f"{TRAINER_STATE} has global_step {step!r}, not a non-negative integer")
    if planned is not None and step > planned:
        raise checkpoint_error(folder, f"its global_step {step} is past the {planned} steps this run makes")
    kinds = {"log_history": list, "stateful_callbacks": dict, "epoch": (int, float)}
    wrong = [k for k, kind in kinds.items() if record.get(k) is not None and not isinstance(record[k], kind)]
    if wrong or not all(isinstance(entry, dict) for entry in record.get("log_history") or []):
        raise checkpoint_error(folder, f"{TRAINER_STATE} has a malformed {(wrong or ['log_history'])[0]}")


def verified_checkpoint(run_dir: Path, model: nn.Module, extensions: list[Extension],
                        planned: int | None = None) -> Path:
    """The newest complete checkpoint under run_dir/checkpoint, checked as the module docstring says
    (`planned`: the optimizer steps of the whole run, which the checkpoint's global_step may not pass)."""
    complete = sorted((p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if (p / MANIFEST).is_file()),
                      key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    if not complete:
        raise AttnmaskError(f"{run_dir / CHECKPOINTS} holds no complete checkpoint to resume from; "
                            "pass --overwrite to start the run over")
    folder = complete[-1]
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise checkpoint_error(folder, f"{MANIFEST} is damaged") from None
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(files):
        extra = sorted(present ^ set(files))
        raise checkpoint_error(folder, f"files differ from those it was written with: {', '.join(extra[:3])}")
    changed = [name for name, digest in files.items() if sha256_hex(folder / name) != digest]
    if changed:
        raise checkpoint_error(folder, f"{', '.join(changed[:3])} changed since it was written (sha256 differs)")
    for name in sorted(files):
        if name in TORCH_FILES or (name.startswith("rng_state") and name.endswith(".pth")):
            check_torch_file(folder, name)
    check_trainer_state(folder, planned)
    check_weights(folder, model)
    try:
        state = read_extension_state(folder)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise checkpoint_error(folder, f"{STATE_FILE}: {first_line(e)}") from None
    names = {ext.name for ext in extensions}
    if {k.split(".", 1)[0] for k in state} - names:
        raise checkpoint_error(folder, "it holds training state this run does not have")
    return folder


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def check_torch_file(folder: Path, name: str) -> None:
    """Read a file Trainer will torch.load, with weights_only=True under the same allow-list (numpy
    arrays of the RNG state): tensors and plain values only; anything else is one error line."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with warnings.catch_warnings(), safe_globals():
            warnings.simplefilter("ignore")
            torch.load(folder / name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise checkpoint_error(folder, f"{name} holds objects other than tensors and plain values; never loaded: "
                                       "they could run code") from None
    except Exception as e:  # noqa: BLE001 - zip and I/O errors of a damaged file
        raise checkpoint_error(folder, f"{name}: {first_line(e)}") from None


def check_weights(folder: Path, model: nn.Module) -> None:
    """The checkpoint's model weights name only tensors the model has, with the model's shapes, and cover
    every tensor that is not tied to another one."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != STATE_FILE]
    if not files:
        raise checkpoint_error(folder, "it has no model weights (*.safetensors)")
    own = model.state_dict()
    shapes = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    except Exception as e:  # noqa: BLE001
        raise checkpoint_error(folder, f"model weights: {first_line(e)}") from None
    wrong = [k for k, s in shapes.items() if k not in own or tuple(own[k].shape) != s]
    loaded = {own[k].data_ptr() for k in shapes if k in own}
    missing = [k for k, t in own.items() if k not in shapes and t.data_ptr() not in loaded
               and not k.endswith("inv_freq")]
    if wrong or missing:
        raise checkpoint_error(folder, f"its weights do not fit the model ({(wrong + missing)[0]})")


# ----------------------------------------------------------------------------------------------
# Run folders


RUN_MARKER = "attnmask-run.json"  # written by every run into its folder: proof that it is one, and what it wrote
RUN_FORMAT = "attnmask.run"
TRAINING_ENTRIES = ("settings.json", CHECKPOINTS)  # what a run's folder holds while it trains


@dataclass
class RunFolder:
    """A training run's output folder `out`: RUN_MARKER, settings.json (what must match to resume) and
    checkpoint/ while training, the model files and metrics.json at the end.

    RUN_MARKER proves that a folder is an attnmask run and lists the entries the run wrote (settings.json
    and checkpoint/ while it trains; everything it holds once finished). Only such a folder is replaced by
    --overwrite, only when it holds nothing else, and only those entries are deleted.

    A new run is built in `out` itself. A run replacing an existing one (--overwrite) is built beside it,
    in `.NAME.next` (`path`), and swapped in by `finish`: out is renamed to `.NAME.old-<hex>`, the new run
    to out, and the old run is removed. Until then out is the old run, untouched; a run killed between the
    two renames is completed (the new run is finished) on the next use of out (`settle_run`). --resume
    continues the unfinished replacement in `.NAME.next` when there is one, else the run in out.

    Other outputs made of runs (the demo) use the same folder: `entries` are what the marker lists while
    the work is under way, and `resumable` False for a command without --resume (its messages name only
    --overwrite)."""

    out: Path
    resume: bool = False
    overwrite: bool = False
    entries: tuple[str, ...] = TRAINING_ENTRIES
    resumable: bool = True
    path: Path = field(init=False)  # where the run is built: out, or its replacement `.NAME.next`

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        settle_run(self.out)
        if self.resume:
            self.path = self.staging if is_run(self.staging) else self.out
        elif self.overwrite and has_entries(self.out):
            self.path = self.staging
        else:
            self.path = self.out

    @property
    def staging(self) -> Path:
        return staging_of(self.out)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def check(self, comparable: dict) -> None:
        """Refuse, before any work, a run that is neither new, resumable (--resume, same comparable
        settings) nor replaceable (--overwrite of an attnmask run holding only what it wrote). Reads only."""
        run = self.path
        if self.resume:
            if (run / "metrics.json").exists() and not self.checkpoints.exists():
                raise AttnmaskError(f"{run} holds a finished run; nothing to resume")
            if not self.checkpoints.exists():
                raise AttnmaskError(f"{run} has no checkpoint to resume from")
            saved = read_record(run / "settings.json", "settings")["settings"]
            diff = [k for k in comparable if saved.get(k) != comparable[k]]
            if diff:
                raise AttnmaskError(f"--resume with settings that differ from the checkpoint's: {', '.join(diff)}")
            return
        if has_entries(self.out):
            if not self.overwrite:
                unfinished = (self.out / CHECKPOINTS).exists() or is_run(self.staging)
                hint = "--resume or --overwrite" if unfinished and self.resumable else "--overwrite"
                raise AttnmaskError(f"output {self.out} already exists (pass {hint})")
            replaceable_entries(self.out)
        if self.path == self.staging and self.staging.exists():
            replaceable_entries(self.staging)

    def create(self) -> None:
        """After `check`: an empty folder for a new run (holding RUN_MARKER), as is for --resume; a
        replacement left by a killed --overwrite is removed first."""
        if self.resume:
            return
        if self.path == self.staging and self.staging.exists():
            remove_run(self.staging)
        self.path.mkdir(parents=True, exist_ok=True)
        write_marker(self.path, "training", self.entries)

    def finish(self) -> None:
        """The run is complete in `path`: its checkpoints are removed, RUN_MARKER lists what it holds, and a
        replacement is swapped in for the old run (see the class docstring)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        match_umask(self.path)  # the user's umask decides the modes (transformers leaves its weights 0600)
        write_marker(self.path, "finished", sorted(p.name for p in self.path.iterdir() if p.name != RUN_MARKER))
        if self.path != self.out:
            swap_in(self.path, self.out)

    def discard(self) -> None:
        """A replacement that failed: remove what it built beside the old run (which stays as it was).
        One holding something it did not list is left for the next --overwrite to name."""
        if self.path != self.out and is_run(self.path):
            with contextlib.suppress(AttnmaskError):
                remove_run(self.path)


def staging_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.next")


def has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir()) or (folder.exists() and not folder.is_dir())


def write_marker(folder: Path, state: str, entries) -> None:
    """RUN_MARKER in `folder` (written to a temporary name and renamed: never half written)."""
    tmp = folder / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps({"format": RUN_FORMAT, "state": state, "entries": sorted(set(entries))}, indent=1))
    tmp.rename(folder / RUN_MARKER)


def read_marker(folder: Path) -> dict | None:
    """The RUN_MARKER record of `folder`, or None when it has none (or a damaged one)."""
    try:
        record = json.loads((folder / RUN_MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    entries = record.get("entries")
    if record.get("format") != RUN_FORMAT or not isinstance(entries, list) or \
            not all(isinstance(e, str) and e and "/" not in e and e not in (".", "..") for e in entries):
        return None
    return record


def is_run(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and read_marker(folder) is not None


def replaceable_entries(folder: Path) -> list[str]:
    """The entries of the run folder `folder` that --overwrite deletes (all of them but RUN_MARKER); refuses
    a folder that is not provably an attnmask run or that holds entries the run did not write."""
    if not is_run(folder):
        raise AttnmaskError(f"output {folder} exists and is not an attnmask training run (it has no valid "
                            f"{RUN_MARKER}); refusing to replace it: choose another output or remove it yourself")
    written = set(read_marker(folder)["entries"])
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in written and p.name != RUN_MARKER)
    if foreign:
        hint = " (a run cut short while saving: finish it with --resume)" if (folder / CHECKPOINTS).exists() else ""
        raise AttnmaskError(f"output {folder} holds {', '.join(foreign[:5])}, which the run did not write{hint}; "
                            "move them away before --overwrite")
    return sorted(written & {p.name for p in folder.iterdir()})


def remove_run(folder: Path) -> None:
    """Delete the entries the run in `folder` wrote, then its marker and the folder (after
    replaceable_entries has found nothing else in it)."""
    for name in replaceable_entries(folder):
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / RUN_MARKER).unlink()
    folder.rmdir()


def swap_in(new: Path, out: Path) -> None:
    """Replace the run `out` by the finished run `new`: out is renamed aside, new renamed to out, and the
    old run removed (settle_run completes a swap killed half-way)."""
    import uuid

    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(new, out)
    remove_run(old)


def settle_run(out: Path) -> None:
    """Complete a swap_in killed half-way: when out is missing and a run moved aside as `.NAME.old-*` is
    there, the finished replacement `.NAME.next` is renamed to out (else the old run is put back); a run
    moved aside that is no longer needed is removed."""
    olds = sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.old-*") if is_run(p)) \
        if out.parent.is_dir() else []
    if not olds:
        return
    try:
        if not os.path.lexists(out):
            staged = staging_of(out)
            if is_run(staged) and read_marker(staged)["state"] == "finished":
                os.rename(staged, out)
            else:
                os.rename(olds.pop(), out)
        for old in olds:
            remove_run(old)
    except FileNotFoundError:  # another process of the same run (torchrun) settled it first
        pass


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
