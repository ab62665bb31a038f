"""The `attnmask_translation` fairseq task: fairseq's translation task with a mask store applied.

`--attnmask-masks MASKS` names a mask store; every model the task builds gets the store's `keep`
through attnmask's mask runtime (attnmask.apply_masks; `--attnmask-backend`, default auto), so
training, validation and generation all run masked. The task state saved in every checkpoint
records the store: task_state['attnmask_masks'] = {'digest', 'path', 'sites', 'beyond', ...}; loading
a checkpoint trained with other masks, or with masks but without --attnmask-masks, is refused.
fairseq calls `load_state_dict` before `build_model`, so the check reads the named store itself.
"""

# no `from __future__ import annotations`: fairseq reads the dataclass field types at runtime

from dataclasses import dataclass, field
from typing import Optional

from attnmask.models.fairseq import import_fairseq

import_fairseq()

from fairseq.tasks import TASK_REGISTRY, register_task  # noqa: E402
from fairseq.tasks.translation import TranslationConfig, TranslationTask  # noqa: E402

TASK_NAME = "attnmask_translation"


@dataclass
class AttnmaskTranslationConfig(TranslationConfig):
    attnmask_masks: Optional[str] = field(
        default=None, metadata={"help": "attnmask mask store (zarr folder) applied inside every attention"})
    attnmask_backend: str = field(
        default="auto", metadata={"help": "attnmask mask backend: auto, eager, sdpa, blocksparse or flex"})


class AttnmaskTranslationTask(TranslationTask):
    """Translation with attnmask masks on the encoder/decoder self-attention and cross-attention."""

    cfg: AttnmaskTranslationConfig

    def masks_digest(self) -> str | None:
        """Digest of the store named by --attnmask-masks (None without one)."""
        from attnmask.store import read_masks

        return read_masks(self.cfg.attnmask_masks).digest if self.cfg.attnmask_masks else None

    def build_model(self, cfg, from_checkpoint=False):
        from attnmask.runtime import apply_masks

        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.attnmask_masks:
            record = apply_masks(model, self.cfg.attnmask_masks, backend=self.cfg.attnmask_backend).record()
            self.check_trained_with(self.state.state_dict.get("attnmask_masks"), record["digest"])
            self.state.merge_state_dict({"attnmask_masks": record})
        return model

    @staticmethod
    def check_trained_with(saved: dict | None, digest: str | None) -> None:
        """Refuse masks other than those a checkpoint was trained with."""
        if saved and digest is None:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']} ({saved.get('path')}); "
                             "pass them with --attnmask-masks")
        if saved and saved["digest"] != digest:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']}, "
                             f"but --attnmask-masks holds {digest}")

    def load_state_dict(self, state_dict):
        self.check_trained_with((state_dict or {}).get("attnmask_masks"), self.masks_digest())
        super().load_state_dict(state_dict)


if TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=AttnmaskTranslationConfig)(AttnmaskTranslationTask)
