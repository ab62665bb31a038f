"""Stage 6, the tasks built on the stages below: classification (classify.py, trainer.py), language models
(lm.py), translation (translate.py), compact encoders (compact.py), experiments, bench, and the train/eval
workflows the CLI dispatches to."""
