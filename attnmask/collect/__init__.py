"""Stage 5, collection: the running sums of attention probabilities (patterns.py), what collect reads,
its checkpoints and the distributed reduction. Imports models and below."""
