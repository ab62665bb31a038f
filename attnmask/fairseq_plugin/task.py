"""The `attnmask_translation` fairseq task: fairseq's translation task with a mask store applied.

`--attnmask-masks MASKS` names a mask store; every model the task builds gets the store's `keep`
inside the MultiheadAttention modules of the masked sites (attnmask.models.fairseq.apply_masks), so
training, validation and generation all run masked. The task state saved in every checkpoint
records the store: task_state['attnmask_masks'] = {'digest', 'path', 'sites', 'beyond'}; resuming
from a checkpoint trained with other masks is refused.
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


class AttnmaskTranslationTask(TranslationTask):
    """Translation with attnmask masks on the encoder/decoder self-attention and cross-attention."""

    cfg: AttnmaskTranslationConfig

    def build_model(self, cfg, from_checkpoint=False):
        from attnmask.models.fairseq import apply_masks
        from attnmask.store import read_masks

        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.attnmask_masks:
            record = apply_masks(model, read_masks(self.cfg.attnmask_masks))
            previous = self.state.state_dict.get("attnmask_masks")
            if previous and previous["digest"] != record["digest"]:
                raise ValueError(f"this run was trained with masks {previous['digest']}, "
                                 f"but --attnmask-masks holds {record['digest']}")
            self.state.merge_state_dict({"attnmask_masks": record})
        return model

    def load_state_dict(self, state_dict):
        """Refuse to resume a run whose checkpoint was trained with other masks."""
        saved = (state_dict or {}).get("attnmask_masks")
        current = self.state.state_dict.get("attnmask_masks")
        if saved and current and saved["digest"] != current["digest"]:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']}, "
                             f"but --attnmask-masks holds {current['digest']}")
        if saved and not current:
            raise ValueError(f"the checkpoint was trained with masks {saved['digest']} ({saved['path']}); "
                             "pass them with --attnmask-masks to resume")
        super().load_state_dict(state_dict)


if TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=AttnmaskTranslationConfig)(AttnmaskTranslationTask)
