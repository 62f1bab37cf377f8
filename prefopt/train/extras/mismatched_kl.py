"""KTO's KL baseline z0 over a whole optimizer step (Ethayarajh et al. 2024, arXiv:2402.01306,
Sec. 4.1): the mean over the step's mismatched pairs of log pi(y'|x) - log ref(y'|x).

The paper estimates z0 from the batch by pairing each prompt with another example's response.
Here "the batch" is the optimizer step: prompt j of the step's global view order is paired with
the first response of view j + 1 (the last with the first), every rank takes a slice of those
pairs, and the sums are reduced over ranks. So z0 is the same number for any rank count, any
micro-batch size and any token budget, as the single-process run with the same global batch.
A step of one group pairs its prompt with its own response (no other response exists).

The ``mismatched_kl`` extra (``MismatchedKL``) passes it to the loss as ``kl_estimate``.
"""

from __future__ import annotations

import datasets
import torch
from torch import Tensor

from prefopt.data.collate import collate
from prefopt.data.loading import View, group_at
from prefopt.data.tokenize import TokenizedGroup
from prefopt.model import parallel
from prefopt.model.logprobs import StatsModel
from prefopt.model.parallel import rank_slice
from prefopt.train.extras.base import StepExtra, StepRows


def mismatched_pairs(data: datasets.Dataset, views: list[View], order: list[int]) -> list:
    """K = 1 groups: the prompt of ``views[order[j]]`` with the first response of
    ``views[order[j + 1]]`` (cyclically), in the order of ``order``."""
    groups = [(group_at(data, views[i][0]), views[i][1]) for i in order]
    out = []
    for (g, _), (other, idx) in zip(groups, groups[1:] + groups[:1], strict=True):
        r = idx[0]
        pair = TokenizedGroup(g.prompt_ids, [other.response_ids[r]], [other.has_eos[r]], [0.0])
        out.append((pair, (0,)))
    return out


@torch.no_grad()
def kl_estimate(
    policy: StatsModel,
    ref: StatsModel,
    data: datasets.Dataset,
    views: list[View],
    order: list[int],
    opts,
) -> Tensor:
    """() float64: mean log-ratio over the mismatched pairs of ``order``, every rank taking a
    slice (padded to the same number of forwards; padding is not counted), reduced over ranks.
    ``opts``: ``prefopt.train.passes.PassOptions`` (batch size, padding id, chunk, autocast)."""
    pairs = mismatched_pairs(data, views, order)
    mine, own = rank_slice(len(pairs), parallel.rank(), parallel.size())
    batch_groups, chunk_size = opts.batch_groups, opts.chunk_size
    device = next(policy.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    for start in range(0, len(mine), batch_groups):
        chunk = mine[start : start + batch_groups]
        batch = collate([pairs[i] for i in chunk], opts.pad_id).to(device)
        with opts.autocast:
            ratio = (policy(batch, chunk_size).logps - ref(batch, chunk_size).logps)[:, 0]
        counted = torch.arange(start, start + len(chunk), device=device) < own
        total += torch.stack([(ratio.double() * counted).sum(), counted.double().sum()])
    parallel.reshard(policy)
    parallel.all_reduce_sum(total)
    return total[0] / total[1].clamp(min=1)


class MismatchedKL(StepExtra):
    """KTO's ``kl_estimate``: ``kl_estimate`` over the step's (or evaluation split's) views."""

    input_names = ("kl_estimate",)
    uses_reference = True  # the mismatched pairs are rows no reference cache holds

    def inputs(self, policy: StatsModel, rows: StepRows) -> dict[str, Tensor]:
        env = self.env
        return {
            "kl_estimate": kl_estimate(
                policy, env.ref, rows.data, rows.views, rows.order, env.passes
            )
        }
