"""fairseq translation with attnmask masks: train (fairseq's own loop), evaluate BLEU, toy data.

* `train_fairseq(data_bin, masks, fairseq_args)` runs fairseq-train in this process with the
  `attnmask_translation` task of the `--user-dir` plugin attnmask/models/fairseq_plugin, so the masks are
  applied inside every MultiheadAttention while fairseq's CLI, checkpoints and logging stay its own.
* `evaluate_fairseq(checkpoint, data_bin, masks=None)` decodes a split with beam search
  (incremental decoding, masked when masks are given) and scores corpus BLEU with sacrebleu.
* `make_reverse_task(folder)` writes a synthetic reverse-the-sequence task and binarizes it with
  fairseq-preprocess (joined dictionary); tests and benchmarks use it.

Elsewhere: what `attnmask collect CHECKPOINT.pt DATA_BIN` reads (`FairseqInput`) is in
attnmask/collect/inputs.py; loading a checkpoint and the attention seam, in attnmask/models/fairseq.py and
attnmask/models/fairseq_attention.py; the plugin's task, in attnmask/models/fairseq_plugin/task.py.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from attnmask.errors import AttnmaskError
from attnmask.models.fairseq import (build_task_and_model, check_data_bin, load_checkpoint_state, model_config_digest,
                                     checkpoint_masks_record, weights_digest)
from attnmask.models.fairseq_attention import import_fairseq, quiet_logs
from attnmask.models.families import apply_masks
from attnmask.store.stores import read_masks

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "models" / "fairseq_plugin"
TASK_NAME = "attnmask_translation"
RECORDED = "recorded"  # evaluate with the masks a checkpoint was trained with
_RESERVED_ARGS = ("--user-dir", "--attnmask-masks")
POST_PROCESS = ("none", "subword_nmt", "@@ ", "@@", "sentencepiece", "wordpiece", "letter", "silence", "_EOW")
BLEU_TOKENIZERS = ("13a", "none", "intl", "char", "zh", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200")


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


def train_fairseq(data_bin: str | Path, masks: str | Path | None, fairseq_args: Sequence[str],
                  warn: Callable[[str], None] | None = None) -> dict | None:
    """Run fairseq-train with the masks applied; returns the record kept in the checkpoints
    ({'digest', 'path', 'sites', 'beyond'}) or None when training dense.

    Bad fairseq-train arguments and fairseq's own failures become one AttnmaskError line (`--help`
    prints fairseq's help and exits, as fairseq-train does); `warn` (default warnings.warn) gets one
    line when the masks were collected from other weights than the --restore-file checkpoint."""
    check_data_bin(data_bin, "train")
    record = store = None
    if masks is not None:
        store = read_masks(masks)
        record = {"digest": store.digest, "path": str(Path(masks).resolve())}
    argv = training_argv(data_bin, masks, fairseq_args)
    import_fairseq()
    import attnmask.models.fairseq_plugin.task  # noqa: F401 - registers the task before fairseq parses --task
    with preserved_logging():
        from fairseq import distributed_utils
        from fairseq_cli import train as fairseq_train

        cfg = parse_training_args(argv)
        starting = check_resume(cfg, record)
        mismatch = masks_mismatch(store, starting) if store is not None and starting is not None else None
        if mismatch:
            (warn or warnings.warn)(mismatch)
        try:
            distributed_utils.call_main(cfg, fairseq_train.main)
        except AttnmaskError:
            raise
        except Exception as e:  # noqa: BLE001 - fairseq's failure, reported as one line
            raise AttnmaskError(f"fairseq-train failed: {one_line(e)}") from None
    return record


def one_line(e: BaseException) -> str:
    """'Type: first line of the message' (the message alone for fairseq's plain Exception and ValueError)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if type(e) in (Exception, ValueError) and text else f"{type(e).__name__}: {text}".rstrip(": ")


def parse_training_args(argv: list[str]):
    """fairseq-train's configuration from `argv`; an argument error is one AttnmaskError line (SystemExit(0)
    after `--help`, as argparse does)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()

    def error(message):
        raise AttnmaskError(f"fairseq-train arguments: {message}")

    parser.error = error
    try:
        args = options.parse_args_and_arch(parser, input_args=argv)
        with warnings.catch_warnings():  # hydra's deprecation notices about fairseq's own config files
            warnings.filterwarnings("ignore", category=UserWarning)
            return convert_namespace_to_omegaconf(args)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise AttnmaskError(f"fairseq-train arguments: {e}") from None
    except (KeyError, ValueError, AssertionError) as e:
        raise AttnmaskError(f"fairseq-train arguments: {one_line(e)}") from None


def check_resume(cfg, record: dict | None) -> dict | None:
    """Refuse to start training from a checkpoint with masks that do not fit it; returns the state of
    the checkpoint training starts from (None when from scratch).

    Resuming save_dir/checkpoint_last.pt needs the masks it was trained with; starting from another
    checkpoint (--restore-file PATH, e.g. masked fine-tuning of a dense model) may add or change masks,
    but cannot drop them (a checkpoint trained with masks never trains on dense)."""
    restore = Path(cfg.checkpoint.restore_file)
    resuming = str(restore) == "checkpoint_last.pt"
    path = Path(cfg.checkpoint.save_dir) / "checkpoint_last.pt" if resuming else restore
    if not path.is_file():
        if not resuming:
            raise AttnmaskError(f"--restore-file {restore} does not exist")
        return None
    state = load_checkpoint_state(path)
    saved = checkpoint_masks_record(state)
    saved_digest = saved["digest"] if saved else None
    new_digest = record["digest"] if record else None
    if resuming and saved_digest != new_digest:
        raise AttnmaskError(f"{path} was trained with masks {saved_digest or '(none: dense)'}; resuming it with "
                            f"masks {new_digest or '(none: dense)'} is refused (use another --save-dir)")
    if saved_digest is not None and new_digest is None:
        raise AttnmaskError(f"{path} was trained with masks {saved_digest}; training it without masks is "
                            "refused (pass --masks)")
    return state


def masks_mismatch(store, state: dict) -> str | None:
    """One line when the mask store was collected from other weights than the checkpoint `state`
    (compared by weights_digest, else by config_digest) and the checkpoint was not trained with it."""
    trained = checkpoint_masks_record(state)
    if trained and trained["digest"] == store.digest:
        return None
    source = store.attrs.get("model") or {}
    if source.get("weights_digest"):
        if source["weights_digest"] != weights_digest(state["model"]):
            return (f"the masks {store.digest} were collected from other weights ({source.get('name')}, "
                    f"weights {source['weights_digest'][:19]}) than this checkpoint's")
    elif source.get("config_digest") and source["config_digest"] != model_config_digest(state["cfg"]):
        return f"the masks {store.digest} were collected from another architecture ({source.get('name')})"
    return None


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
    signature: str = ""  # sacrebleu's signature (tokenizer, smoothing, version, ...)
    tokenize: str = "13a"
    post_process: str = "none"
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"bleu": round(self.bleu, 2), "sentences": self.sentences, "masks": self.masks,
                "trained_with": self.trained_with, "tokenize": self.tokenize, "post_process": self.post_process,
                "signature": self.signature}


def load_translation_model(checkpoint: str | Path, data_bin: str | Path, masks: str | Path | None = None,
                           device: torch.device | str = "cpu", backend: str = "auto"):
    """(task, model, record of the checkpoint's training masks, the masks applied, warnings) with
    `masks` applied when given.

    masks="recorded" applies the store the checkpoint was trained with (dense if it was trained dense);
    its digest must still match. `warnings`: a line when the masks were collected from other weights."""
    folder = check_data_bin(data_bin)
    state = load_checkpoint_state(checkpoint, folder)
    trained = checkpoint_masks_record(state)
    if masks == RECORDED:
        masks = trained["path"] if trained else None
        if masks is not None and read_masks(masks).digest != trained["digest"]:
            raise AttnmaskError(f"{masks} changed since {checkpoint} was trained with it (digest differs)")
    mismatch = masks_mismatch(read_masks(masks), state) if masks is not None else None
    with quiet_logs():
        _, task, model = build_task_and_model(state)
    model.to(device).eval()
    if masks is not None:
        apply_masks(model, masks, backend=backend)
    return task, model, trained, masks, [mismatch] if mismatch else []


def evaluate_fairseq(checkpoint: str | Path, data_bin: str | Path, masks: str | Path | None = None, *,
                     split: str = "test", beam: int = 5, max_sentences: int = 64, limit: int | None = None,
                     post_process: str | None = None, tokenize: str = "13a", device: torch.device | str = "cpu",
                     backend: str = "auto") -> BleuResult:
    """Beam-search translations of sentences 0..limit-1 of `split` (all without limit) and their corpus
    BLEU (sacrebleu with `tokenize`, default 13a).

    `masks`: a mask store, None (dense) or "recorded" (those the checkpoint was trained with).
    `post_process`: how fairseq turns target tokens back into text before scoring (subword_nmt removes
    "@@ ", sentencepiece joins pieces, ...); None or "none" scores the tokens as binarized.

    Decoding is incremental (one target position per step, cached keys); with masks, step t uses
    mask row t of decoder.self and decoder.cross.
    """
    from sacrebleu.metrics import BLEU

    if (post_process or "none") not in POST_PROCESS:
        raise AttnmaskError(f"--post-process {post_process!r} is not one of {', '.join(POST_PROCESS)}")
    if tokenize not in BLEU_TOKENIZERS:
        raise AttnmaskError(f"--bleu-tokenize {tokenize!r} is not one of {', '.join(BLEU_TOKENIZERS)}")
    if limit is not None and limit < 1:
        raise AttnmaskError(f"--limit must be positive, got {limit}")
    try:
        metric = BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError) as e:  # tokenizers that need an extra package
        raise AttnmaskError(f"sacrebleu tokenizer {tokenize}: {one_line(e)}") from None
    check_data_bin(data_bin, split)
    task, model, trained, masks, notes = load_translation_model(checkpoint, data_bin, masks, device, backend)
    post_process = None if post_process in (None, "none") else post_process
    hypotheses, references = translate_split(task, model, split, beam=beam, max_sentences=max_sentences,
                                             limit=limit, post_process=post_process)
    if not references:
        raise AttnmaskError(f"split {split} of {data_bin} holds no sentence pairs")
    score = metric.corpus_score(hypotheses, [references]).score
    applied = read_masks(masks).digest if masks is not None else None
    return BleuResult(score, len(references), applied, trained["digest"] if trained else None,
                      hypotheses, references, str(metric.get_signature()), tokenize, post_process or "none", notes)


def translate_split(task, model, split: str, *, beam: int = 5, max_sentences: int = 64,
                    limit: int | None = None, post_process: str | None = None) -> tuple[list[str], list[str]]:
    """(hypotheses, references) as strings, for sentence ids 0..limit-1 of the split (all without limit)
    in id order.

    The chosen ids are batched as fairseq orders them (by length), max_sentences at a time, so which
    sentences are translated does not depend on the batch size."""
    from fairseq import utils
    from fairseq.dataclass.configs import GenerationConfig

    with quiet_logs():
        task.load_dataset(split)
        dataset = task.dataset(split)
        generator = task.build_generator([model], GenerationConfig(beam=beam))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    order = [int(i) for i in dataset.ordered_indices() if i < n]
    too_long = [i for i in order if not all(a <= b for a, b in zip(dataset.size(i), max_positions))]
    if too_long:
        raise AttnmaskError(f"sentence {too_long[0]} of split {split} has {dataset.size(too_long[0])} tokens "
                            f"(source, target), more than the model's {max_positions}")
    tgt_dict = task.target_dictionary
    device = next(model.parameters()).device
    out: dict[int, tuple[str, str]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), max_sentences):
            sample = dataset.collater([dataset[i] for i in order[start:start + max_sentences]])
            sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
            hyps = task.inference_step(generator, [model], sample)
            for i, sample_id in enumerate(sample["id"].tolist()):
                ref = tgt_dict.string(utils.strip_pad(sample["target"][i], tgt_dict.pad()), post_process)
                hyp = tgt_dict.string(hyps[i][0]["tokens"], post_process)
                out[sample_id] = (hyp, ref)
    return [out[i][0] for i in range(n)], [out[i][1] for i in range(n)]


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
