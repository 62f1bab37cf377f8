"""Tensor bundles shared by the statistics, the losses and the loop.

Vocabulary: ``logps`` are summed response-token log-probs (EOS included),
``lengths`` count response tokens (EOS included), ``scores`` are scalar rewards, ``mask`` marks
real responses. Every tensor of a bundle is (B, K): B prompt groups with up to K responses each.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class GroupStats(NamedTuple):
    """Statistics of B prompt groups with up to K responses each. Every tensor is (B, K)."""

    logps: Tensor  # sum of response-token log-probs; prompt and padding excluded, EOS included
    lengths: Tensor  # response token counts (EOS included); 1 in empty slots (finite division)
    eos_logps: Tensor  # log-prob of the final response token, which is EOS where has_eos
    has_eos: Tensor  # bool; False where truncation cut the response before its EOS
    mask: Tensor  # bool; False marks empty slots of groups with fewer than K responses

    @property
    def avg_logps(self) -> Tensor:
        """Length-normalised log-probs, Eq. 3 of REFA / SimPO's average log-likelihood."""
        return self.logps / self.lengths

    def detach(self) -> GroupStats:
        return GroupStats(*(t.detach() for t in self))


class LossOutput(NamedTuple):
    """A loss's result; the loop sums ``losses[valid]`` and divides by the global valid count."""

    losses: Tensor  # (B,) per-group loss, finite wherever valid
    valid: Tensor  # (B,) bool; False for groups without signal (e.g. all scores equal)
    metrics: dict[str, Tensor]  # detached (B,) tensors, averaged over valid groups by the loop
    # Detached batch sums for losses with running statistics (e.g. {"sum": .., "sq_sum": ..,
    # "count": ..}); the loop adds them over micro-batches and ranks, then folds them into the
    # loss state with the spec's ``update_state`` once per optimizer step.
    stat_updates: dict[str, Tensor] = {}
