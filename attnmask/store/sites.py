"""The attention sites a store may hold, named once, and what kind of attention each is.

A site is one kind of attention module, repeated once per layer:

    encoder.self     an encoder's (or a BERT-family model's) self-attention: every query sees every key
    decoder.self     a decoder's self-attention: causal, query r sees keys c <= r
    decoder.cross    a decoder's attention over the encoder's output: queries are target tokens, keys source tokens
    encoder.compact  the self-attention of a compact encoder's substituted blocks (attnmask compact)
"""

from __future__ import annotations

ENCODER_SELF = "encoder.self"
DECODER_SELF = "decoder.self"
DECODER_CROSS = "decoder.cross"
ENCODER_COMPACT = "encoder.compact"
SITE_NAMES = (ENCODER_SELF, DECODER_SELF, DECODER_CROSS, ENCODER_COMPACT)


def is_causal(site: str) -> bool:
    """Sites whose queries never see later tokens (the store's `causal` flag says so per store)."""
    return site == DECODER_SELF


def is_cross(site: str) -> bool:
    """Cross-attention sites: queries from one sequence, keys from another."""
    return site == DECODER_CROSS
