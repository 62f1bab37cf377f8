"""No-grad passes over many groups (held-out evaluation, reference log-probs, KTO's mismatched
pairs): their settings (``PassOptions``) and the one loop they share, ``rank_batches``: each
rank takes a slice of the groups, every rank runs as many forwards, and the groups that only even
out the slices are marked so that nothing counts them.

Nothing here knows a loss or an extra; ``prefopt.train.heldout`` (evaluation),
``prefopt.train.reference`` and ``prefopt.train.extras`` build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import NamedTuple

from torch import nn

from prefopt.config import TrainerConfig
from prefopt.data.collate import Batch, Group
from prefopt.data.packing import PackedBatch, collate_layout
from prefopt.model import parallel


class PassOptions(NamedTuple):
    """How a no-grad pass runs: groups per forward, padding id, log-prob chunk, precision
    (autocast), layout. Each rank takes its own slice (``parallel.rank()`` of ``size()``)."""

    batch_groups: int
    pad_id: int
    chunk_size: int
    autocast: AbstractContextManager
    layout: str = "padded"

    @classmethod
    def of(cls, t: TrainerConfig, pad_id: int, autocast: AbstractContextManager) -> PassOptions:
        """From the ``trainer`` settings: ``eval_batch_groups``, the chunk and the layout."""
        return cls(t.eval_batch_groups, pad_id, t.logps_chunk_size, autocast, t.layout)


class PassBatch(NamedTuple):
    """One forward of a no-grad pass on this rank."""

    items: list[int]  # the indices of its groups among the pass's ``n``
    batch: Batch | PackedBatch
    own: int  # its first ``own`` groups are this rank's; the rest only even out the slices


def rank_batches(
    n: int, group: Callable[[int], Group], model: nn.Module, opts: PassOptions
) -> Iterator[PassBatch]:
    """This rank's share of the groups ``group(0) .. group(n - 1)``, ``opts.batch_groups`` at a
    time in ``opts.layout`` on ``model``'s device. The share is padded (wrapping around) to the
    same length on every rank, so all ranks run the same number of sharded forwards; after the
    last one the model's gathered root is freed (``parallel.reshard``)."""
    order, own = parallel.rank_slice(n, parallel.rank(), parallel.size())
    device = next(model.parameters()).device
    size = opts.batch_groups
    for start in range(0, len(order), size):
        items = order[start : start + size]
        batch = collate_layout([group(i) for i in items], opts.pad_id, opts.layout).to(device)
        yield PassBatch(items, batch, max(0, min(len(items), own - start)))
    parallel.reshard(model)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
