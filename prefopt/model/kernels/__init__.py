"""Attention kernel families (``varlen``: FlashAttention's variable-length call and its CPU
reference; ``flex``: FlexAttention over BlockMasks). Which one runs is the registry's choice:
``prefopt.model.attention``."""
