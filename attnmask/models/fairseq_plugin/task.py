"""The `attnmask_translation` fairseq task: fairseq's translation task with a mask store applied.

`--attnmask-masks MASKS` names a mask store; every model the task builds gets the store's `keep`
through attnmask's mask runtime (attnmask.apply_masks; `--attnmask-backend`, default auto), so
training, validation and generation all run masked. Masks travel with the checkpoints:

* the task state records the store: task_state['attnmask_masks'] = {'digest', 'path' (absolute),
  'sites', 'beyond', ...};
* the model state carries MASKS_MARKER (attnmask.models.fairseq_attention.mark_masked), so stock fairseq without
  `--user-dir` refuses the checkpoint (an unexpected key) instead of decoding it dense;
* loading a checkpoint trained with masks without --attnmask-masks re-applies the recorded store, if
  its digest still matches; other masks, or a recorded store that is gone or changed, are refused.

fairseq calls `load_state_dict` before `build_model`, so the check reads the stores itself.
"""

# no `from __future__ import annotations`: fairseq reads the dataclass field types at runtime

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from attnmask.models.fairseq_attention import FairseqSeam, import_fairseq, mark_masked
from attnmask.runtime.attach import attach
from attnmask.store.stores import is_url, read_masks

import_fairseq()

from fairseq.tasks import TASK_REGISTRY, register_task  # noqa: E402
from fairseq.tasks.translation import TranslationConfig, TranslationTask  # noqa: E402
from attnmask.errors import AttnmaskError

TASK_NAME = "attnmask_translation"
logger = logging.getLogger(__name__)


@dataclass
class AttnmaskTranslationConfig(TranslationConfig):
    attnmask_masks: Optional[str] = field(
        default=None, metadata={"help": "attnmask mask store (zarr folder) applied inside every attention "
                                  "(default: the store a checkpoint trained with masks records, digest-checked)"})
    attnmask_backend: str = field(
        default="auto", metadata={"help": "attnmask mask backend: auto, eager, sdpa, blocksparse or flex"})


class AttnmaskTranslationTask(TranslationTask):
    """Translation with attnmask masks on the encoder/decoder self-attention and cross-attention."""

    cfg: AttnmaskTranslationConfig
    recorded_path: Optional[str] = None  # the store a loaded checkpoint records, when none is named

    def masks_path(self) -> Optional[str]:
        return self.cfg.attnmask_masks or self.recorded_path

    def masks_digest(self) -> Optional[str]:
        """Digest of the store the task applies (None without one)."""
        path = self.masks_path()
        return read_masks(path).digest if path else None

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        path = self.masks_path()
        if path:
            record = attach(model, FairseqSeam, path, backend=self.cfg.attnmask_backend).record()
            record["path"] = path if is_url(path) else str(Path(path).resolve())
            self.check_trained_with(self.state.state_dict.get("attnmask_masks"), record["digest"])
            self.state.merge_state_dict({"attnmask_masks": record})
            mark_masked(model, record["digest"])
            logger.info(f"attnmask masks {record['digest']} ({record['path']}) applied")
        return model

    @staticmethod
    def check_trained_with(saved: Optional[dict], digest: Optional[str]) -> None:
        """Refuse masks other than those a checkpoint was trained with."""
        if saved and digest is None:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']} ({saved.get('path')}); "
                             "pass them with --attnmask-masks")
        if saved and saved["digest"] != digest:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']}, "
                             f"but --attnmask-masks holds {digest}")

    def recorded_store(self, saved: dict) -> str:
        """The path of the store a checkpoint records, once its digest is checked."""
        path = saved.get("path")
        try:
            digest = read_masks(path).digest if path else None
        except AttnmaskError as e:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']}, recorded at {path}, "
                             f"which cannot be read ({e}); pass them with --attnmask-masks") from None
        if digest != saved["digest"]:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']}, but the recorded store "
                             f"{path} now holds {digest}; pass the original masks with --attnmask-masks")
        return path

    def load_state_dict(self, state_dict):
        saved = (state_dict or {}).get("attnmask_masks")
        if saved and not self.cfg.attnmask_masks:
            self.recorded_path = self.recorded_store(saved)
            logger.info(f"re-applying the masks the checkpoint was trained with: {self.recorded_path}")
        self.check_trained_with(saved, self.masks_digest())
        super().load_state_dict(state_dict)


if TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=AttnmaskTranslationConfig)(AttnmaskTranslationTask)
