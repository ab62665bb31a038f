"""Stage 3, attention with masks: MaskedAttention and its backends (attention.py), the block-sparse kernels
(blocksparse.py, the C++ one in native.py), FlexAttention (flex.py) and scratch buffers. Imports masks and
stores; it never names a model family."""
