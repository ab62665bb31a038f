"""fairseq `--user-dir` plugin: the `attnmask_translation` task (translation with attnmask masks).

    fairseq-train DATA_BIN --user-dir $(python -c 'import attnmask.models.fairseq_plugin as p, os; print(os.path.dirname(p.__file__))') \
        --task attnmask_translation --attnmask-masks MASKS ...

fairseq imports this folder as a top-level module named after it; the import below always goes
through the canonical `attnmask.models.fairseq_plugin.task`, so the task is registered exactly once.
"""

import attnmask.models.fairseq_plugin.task  # noqa: F401  (registers the task)
