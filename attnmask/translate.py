"""fairseq translation with attnmask masks: train (fairseq's own loop), evaluate BLEU, toy data.

* `train_fairseq(data_bin, masks, fairseq_args)` runs fairseq-train in this process with the
  `attnmask_translation` task of the `--user-dir` plugin attnmask/fairseq_plugin, so the masks are
  applied inside every MultiheadAttention while fairseq's CLI, checkpoints and logging stay its own.
* `evaluate_fairseq(checkpoint, data_bin, masks=None)` decodes a split with beam search
  (incremental decoding, masked when masks are given) and scores corpus BLEU with sacrebleu.
* `collect_fairseq(checkpoint, data_bin, split=..., out=...)` collects the three attention sites
  (teacher-forced) into a pattern store: the `attnmask collect CHECKPOINT.pt DATA_BIN` path.
* `make_reverse_task(folder)` writes a synthetic reverse-the-sequence task and binarizes it with
  fairseq-preprocess (joined dictionary); tests and benchmarks use it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.fairseq import (build_task_and_model, check_data_bin, import_fairseq,
                                     load_checkpoint_state, quiet_logs, recorded_masks, trusted_checkpoints)
from attnmask.runtime import apply_masks
from attnmask.store import read_masks

PLUGIN_DIR = Path(__file__).resolve().parent / "fairseq_plugin"
TASK_NAME = "attnmask_translation"
RECORDED = "recorded"  # evaluate with the masks a checkpoint was trained with
_RESERVED_ARGS = ("--user-dir", "--attnmask-masks")


@contextlib.contextmanager
def preserved_logging():
    """Restore the root logger's level and handlers afterwards (fairseq_cli modules configure logging
    at import and while running)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


# ----------------------------------------------------------------------------------------------
# Training


def training_argv(data_bin: str | Path, masks: str | Path | None, fairseq_args: Sequence[str]) -> list[str]:
    """fairseq-train's argument list: DATA_BIN, the plugin and its task, then the user's arguments."""
    args = list(fairseq_args)
    for reserved in _RESERVED_ARGS:
        if any(a == reserved or a.startswith(reserved + "=") for a in args):
            raise AttnmaskError(f"do not pass {reserved} after --: attnmask sets it")
    for i, a in enumerate(args):
        if a == "--task" or a.startswith("--task="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            if value not in ("translation", TASK_NAME):
                raise AttnmaskError(f"--task {value} is not supported: attnmask trains fairseq's translation task")
    args = [a for i, a in enumerate(args)
            if not (a == "--task" or a.startswith("--task=") or (i > 0 and args[i - 1] == "--task"))]
    argv = [str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", TASK_NAME]
    if masks is not None:
        argv += ["--attnmask-masks", str(Path(masks).resolve())]
    return argv + args


def train_fairseq(data_bin: str | Path, masks: str | Path | None, fairseq_args: Sequence[str]) -> dict | None:
    """Run fairseq-train with the masks applied; returns the record kept in the checkpoints
    ({'digest', 'path', 'sites', 'beyond'}) or None when training dense."""
    check_data_bin(data_bin, "train")
    record = None
    if masks is not None:
        store = read_masks(masks)
        record = {"digest": store.digest, "path": str(Path(masks).resolve())}
    argv = training_argv(data_bin, masks, fairseq_args)
    import_fairseq()
    import attnmask.fairseq_plugin.task  # noqa: F401 - registers the task before fairseq parses --task
    with preserved_logging():
        from fairseq import distributed_utils, options
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq_cli import train as fairseq_train

        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, input_args=argv)
        with warnings.catch_warnings():  # hydra's deprecation notices about fairseq's own config files
            warnings.filterwarnings("ignore", category=UserWarning)
            cfg = convert_namespace_to_omegaconf(args)
        check_resume(cfg, record)
        try:
            with trusted_checkpoints():
                distributed_utils.call_main(cfg, fairseq_train.main)
        except ValueError as e:
            if "masks" in str(e):
                raise AttnmaskError(str(e)) from None
            raise
    return record


def check_resume(cfg, record: dict | None) -> None:
    """Refuse to resume save_dir/checkpoint_last.pt with masks other than those it was trained with.

    Starting from another checkpoint (--restore-file PATH, e.g. masked fine-tuning of a dense model)
    is allowed."""
    if cfg.checkpoint.restore_file != "checkpoint_last.pt":
        return
    last = Path(cfg.checkpoint.save_dir) / "checkpoint_last.pt"
    if not last.is_file():
        return
    saved = recorded_masks(load_checkpoint_state(last))
    saved_digest = saved["digest"] if saved else None
    new_digest = record["digest"] if record else None
    if saved_digest != new_digest:
        raise AttnmaskError(f"{last} was trained with masks {saved_digest or '(none: dense)'}; resuming it with "
                            f"masks {new_digest or '(none: dense)'} is refused (use another --save-dir)")


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class BleuResult:
    bleu: float
    sentences: int
    masks: str | None  # digest of the masks applied while decoding
    trained_with: str | None  # digest recorded in the checkpoint
    hypotheses: list[str]
    references: list[str]

    def summary(self) -> dict:
        return {"bleu": round(self.bleu, 2), "sentences": self.sentences, "masks": self.masks,
                "trained_with": self.trained_with}


def load_translation_model(checkpoint: str | Path, data_bin: str | Path, masks: str | Path | None = None,
                           device: torch.device | str = "cpu", backend: str = "auto"):
    """(task, model, record of the checkpoint's training masks) with `masks` applied when given.

    masks="recorded" applies the store the checkpoint was trained with (dense if it was trained dense);
    its digest must still match."""
    folder = check_data_bin(data_bin)
    state = load_checkpoint_state(checkpoint, folder)
    with quiet_logs():
        _, task, model = build_task_and_model(state)
    trained = recorded_masks(state)
    if masks == RECORDED:
        masks = trained["path"] if trained else None
        if masks is not None and read_masks(masks).digest != trained["digest"]:
            raise AttnmaskError(f"{masks} changed since {checkpoint} was trained with it (digest differs)")
    model.to(device).eval()
    if masks is not None:
        apply_masks(model, masks, backend=backend)
    return task, model, trained, masks


def evaluate_fairseq(checkpoint: str | Path, data_bin: str | Path, masks: str | Path | None = None, *,
                     split: str = "test", beam: int = 5, max_sentences: int = 64, limit: int | None = None,
                     post_process: str | None = None, device: torch.device | str = "cpu",
                     backend: str = "auto") -> BleuResult:
    """Beam-search translations of `split` and their corpus BLEU (sacrebleu, 13a tokenization).

    `masks`: a mask store, None (dense) or "recorded" (those the checkpoint was trained with).

    Decoding is incremental (one target position per step, cached keys); with masks, step t uses
    mask row t of decoder.self and decoder.cross.
    """
    import sacrebleu

    check_data_bin(data_bin, split)
    task, model, trained, masks = load_translation_model(checkpoint, data_bin, masks, device, backend)
    hypotheses, references = translate_split(task, model, split, beam=beam, max_sentences=max_sentences,
                                             limit=limit, post_process=post_process)
    if not references:
        raise AttnmaskError(f"split {split} of {data_bin} holds no sentence pairs")
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    applied = read_masks(masks).digest if masks is not None else None
    return BleuResult(bleu, len(references), applied, trained["digest"] if trained else None,
                      hypotheses, references)


def translate_split(task, model, split: str, *, beam: int = 5, max_sentences: int = 64,
                    limit: int | None = None, post_process: str | None = None) -> tuple[list[str], list[str]]:
    """(hypotheses, references) as detokenized strings, in the split's order."""
    from fairseq import utils
    from fairseq.dataclass.configs import GenerationConfig

    with quiet_logs():
        task.load_dataset(split)
        dataset = task.dataset(split)
        iterator = task.get_batch_iterator(dataset=dataset, max_sentences=max_sentences,
                                           max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                                     model.max_positions()),
                                           ignore_invalid_inputs=False, seed=1).next_epoch_itr(shuffle=False)
        generator = task.build_generator([model], GenerationConfig(beam=beam))
    tgt_dict = task.target_dictionary
    device = next(model.parameters()).device
    out: dict[int, tuple[str, str]] = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        for sample in iterator:
            if limit is not None and len(out) >= limit:
                break
            sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
            hyps = task.inference_step(generator, [model], sample)
            for i, sample_id in enumerate(sample["id"].tolist()):
                ref = tgt_dict.string(utils.strip_pad(sample["target"][i], tgt_dict.pad()), post_process)
                hyp = tgt_dict.string(hyps[i][0]["tokens"], post_process)
                out[sample_id] = (hyp, ref)
    ids = sorted(out)[:limit] if limit is not None else sorted(out)
    return [out[i][0] for i in ids], [out[i][1] for i in ids]


# ----------------------------------------------------------------------------------------------
# Synthetic data


def make_reverse_task(folder: str | Path, *, vocab: int = 16, train: int = 2000, valid: int = 200,
                      test: int = 200, min_length: int = 3, max_length: int = 10, seed: int = 0) -> Path:
    """Write random token lines and their reversals (raw/), binarize them into folder/bin; returns bin.

    Tokens are 'w0'..'w{vocab-1}'; lengths are uniform in [min_length, max_length].
    """
    folder = Path(folder)
    raw, out = folder / "raw", folder / "bin"
    if out.exists():
        raise AttnmaskError(f"{out} already exists; choose an empty folder")
    raw.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    for split, n in (("train", train), ("valid", valid), ("test", test)):
        with open(raw / f"{split}.src", "w") as src, open(raw / f"{split}.tgt", "w") as tgt:
            for _ in range(n):
                tokens = [rng.choice(words) for _ in range(rng.randint(min_length, max_length))]
                src.write(" ".join(tokens) + "\n")
                tgt.write(" ".join(reversed(tokens)) + "\n")
    preprocess(["--source-lang=src", "--target-lang=tgt", f"--trainpref={raw}/train",
                f"--validpref={raw}/valid", f"--testpref={raw}/test", f"--destdir={out}",
                "--joined-dictionary", "--workers=1"])
    return out


def preprocess(argv: list[str]) -> None:
    """fairseq-preprocess in this process, quietly."""
    import_fairseq()
    with preserved_logging():
        from fairseq import options
        from fairseq_cli import preprocess as fairseq_preprocess

        args = options.get_preprocessing_parser().parse_args(argv)
        with quiet_logs():
            logging.getLogger("fairseq_cli").setLevel(logging.WARNING)
            fairseq_preprocess.main(args)


# ----------------------------------------------------------------------------------------------
# Collection (the `attnmask collect CHECKPOINT.pt DATA_BIN --split valid` path)


def collect_fairseq(checkpoint: str | Path, data_bin: str | Path, *, split: str = "valid", out: str | Path,
                    max_length: int = 128, batch_size: int = 32, limit: int | None = None,
                    device: torch.device | str = "cpu", overwrite: bool = False, on_batch=None):
    """Collect the three attention sites of a fairseq checkpoint over `split` into a pattern store.

    Teacher-forced: the encoder reads the source, the decoder the reference target shifted right.
    Pairs with a side longer than max_length tokens (</s> included) are skipped. Returns
    (store, CollectResult, skipped pairs)."""
    from attnmask.collect import collect
    from attnmask.models import load_adapter
    from attnmask.store import check_output, write_patterns

    check_output(out, overwrite)
    adapter = load_adapter(str(checkpoint), device, data=str(data_bin), split=split)
    result = collect(adapter, adapter.examples(limit), batch_size=batch_size, max_length=max_length,
                     on_batch=on_batch)
    attrs = {"model": adapter.identity(),
             "data": {"name": str(data_bin), "split": split, "limit": limit, "skipped": adapter.skipped},
             "sequences": result.sequences, "tokens": result.tokens, "max_length": max_length}
    store = write_patterns(out, result.sites, attrs, overwrite=overwrite)
    return store, result, adapter.skipped
