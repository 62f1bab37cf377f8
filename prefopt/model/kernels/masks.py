"""The attention masks the kernels evaluate from a packed row's ``doc_ids`` and ``branch_ids``
(``prefopt.data.packing``'s rule: query i sees key j iff j <= i, same document, and key j is the
prompt or in query i's own response): dense, for transformers' ``sdpa``/``eager``, and as
FlexAttention's ``mask_mod``. Collation writes the sparse forms (``VarlenIndex``, the block
sparsity) on the host; these are evaluated where the kernel runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prefopt.data.packing import FLEX_BLOCK, PackedBatch


def document_mask(batch: PackedBatch) -> Tensor:
    """(L, L) bool, True where query i may attend to key j (module docstring's rule).

    Built in place, one (L, L) buffer at a time (16K tokens: 256 MB): the reference for tests and
    the ``sdpa``/``eager`` implementations; training kernels read ``varlen`` or ``blocks``.
    """
    doc, branch = batch.doc_ids, batch.branch_ids
    allowed = doc[:, None] == doc[None, :]
    allowed &= (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    return allowed.tril_()


def document_mask_mod(batch: PackedBatch) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The same rule as a FlexAttention ``mask_mod(b, h, q, kv)``.

    Compiled FlexAttention evaluates the mask on whole 128-token blocks, so indices past the row
    occur; the lookups are padded to a multiple of the block (padding is document -1, which no
    real token sees), otherwise they read out of bounds (verified: wrong outputs on CPU).
    """
    L = batch.doc_ids.numel()
    pad = -L % FLEX_BLOCK
    doc = torch.nn.functional.pad(batch.doc_ids, (0, pad), value=-1)
    branch = torch.nn.functional.pad(batch.branch_ids, (0, pad), value=0)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        visible = (branch[kv] == 0) | (branch[kv] == branch[q])
        return (doc[q] == doc[kv]) & (kv <= q) & visible

    return mask_mod
