"""Stage 5, token pruning (tokens.py, LTP-style) and packing the kept tokens (packing.py). Imports models and
below."""
