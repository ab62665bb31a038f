"""Mask rules (rules.py) and the block-sparse kernel (blocksparse.py); the runtime is attnmask.runtime."""
