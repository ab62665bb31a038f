"""Stage 1, the stores: pattern and mask stores in zarr (stores.py), their locks (locking.py) and the text
data readers (data.py). Imports only attnmask.errors and attnmask.version."""
