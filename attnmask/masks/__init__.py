"""Stage 2, the masks: the rules of what a call may attend to (rules.py), compile (patterns -> masks),
accounting (the sparsity figures, computed once) and merge. Imports only the stores."""
