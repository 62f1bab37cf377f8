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

import torch
from torch import Tensor

from prefopt.data.collate import Group
from prefopt.data.loading import view_group
from prefopt.data.tokenize import TokenizedGroup
from prefopt.model import parallel
from prefopt.model.logprobs import StatsModel
from prefopt.train.extras.base import StepExtra, StepRows
from prefopt.train.passes import PassOptions, rank_batches


def mismatched_pairs(rows: StepRows) -> list[Group]:
    """K = 1 groups: the prompt of the j-th view of ``rows.order`` with the first response of
    the (j + 1)-th (cyclically), in that order."""
    groups = [view_group(rows.data, rows.views[i]) for i in rows.order]
    out = []
    for (g, _), (other, idx) in zip(groups, groups[1:] + groups[:1], strict=True):
        r = idx[0]
        pair = TokenizedGroup(g.prompt_ids, [other.response_ids[r]], [other.has_eos[r]], [0.0])
        out.append((pair, (0,)))
    return out


@torch.no_grad()
def kl_estimate(policy: StatsModel, ref: StatsModel, rows: StepRows, opts: PassOptions) -> Tensor:
    """() float64: mean log-ratio over the mismatched pairs of ``rows``, every rank taking a
    slice (padded to the same number of forwards; padding is not counted), reduced over ranks.
    The pairs are padded rows whatever the run's layout (K = 1: no prompt to share)."""
    pairs = mismatched_pairs(rows)
    device = next(policy.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
    padded = opts._replace(layout="padded")
    for p in rank_batches(len(pairs), pairs.__getitem__, policy, padded):
        with opts.autocast:
            ratio = policy(p.batch, opts.chunk_size).logps - ref(p.batch, opts.chunk_size).logps
        counted = torch.arange(len(p.items), device=device) < p.own
        total += torch.stack([(ratio[:, 0].double() * counted).sum(), counted.double().sum()])
    parallel.all_reduce_sum(total)
    return total[0] / total[1].clamp(min=1)


class MismatchedKL(StepExtra):
    """KTO's ``kl_estimate``: ``kl_estimate`` over the step's (or evaluation split's) views."""

    input_names = ("kl_estimate",)
    uses_reference = True  # the mismatched pairs are rows no reference cache holds

    def inputs(self, policy: StatsModel, rows: StepRows) -> dict[str, Tensor]:
        return {"kl_estimate": kl_estimate(policy, self.env.ref, rows, self.env.passes)}
