"""(model, batch) -> GroupStats: the only place that touches logits.

Log-probs of response tokens are computed from the final hidden states chunk by chunk
(``chunk_size`` tokens: matmul with the output embedding, fp32 logsumexp, gather), and each chunk
is recomputed in backward, so neither forward nor backward ever holds more than one
(chunk x vocab) fp32 logits block. Prompt and padding positions never reach the output layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from prefopt.data.collate import Batch
from prefopt.types import GroupStats


def _chunk_logps(hidden: Tensor, targets: Tensor, head: nn.Module, softcap: float | None) -> Tensor:
    logits = head(hidden)  # (C, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, keep fp64
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    return picked - logits.logsumexp(-1)  # (C,)


def token_logps(
    hidden: Tensor, targets: Tensor, head: nn.Module, chunk_size: int, softcap: float | None = None
) -> Tensor:
    """(M,) log p(targets[i] | hidden[i]) for M positions, one (chunk_size x V) block at a time."""
    out = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logps, h, t, head, softcap, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, t, head, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _to_groups(batch: Batch, row_values: Tensor, fill: float) -> Tensor:
    """Scatter per-row values (N,) into (B, K), ``fill`` in empty slots."""
    out = torch.full(batch.mask.shape, fill, dtype=row_values.dtype, device=row_values.device)
    return out.index_put((batch.row_group, batch.row_slot), row_values)


def group_stats(model: PreTrainedModel, batch: Batch, chunk_size: int = 1024) -> GroupStats:
    """One forward over all B*K responses of the batch; statistics in fp32."""
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (N, T, H)
    # Position t predicts token t + 1: keep the positions whose next token is a response token.
    target_mask = batch.response_mask[:, 1:]  # (N, T-1)
    targets = batch.input_ids[:, 1:][target_mask]  # (M,)
    logps = token_logps(
        hidden[:, :-1][target_mask],
        targets,
        model.get_output_embeddings(),
        chunk_size,
        getattr(model.config, "final_logit_softcapping", None),
    )  # (M,)
    lengths = target_mask.sum(1)  # (N,)
    rows = torch.arange(len(lengths), device=lengths.device).repeat_interleave(lengths)
    row_logps = logps.new_zeros(len(lengths)).index_add(0, rows, logps)
    row_last = logps[lengths.cumsum(0) - 1]  # targets are in row order, so each row's final token
    return GroupStats(
        logps=_to_groups(batch, row_logps, 0.0),
        lengths=_to_groups(batch, lengths.to(logps.dtype), 1.0),
        eos_logps=_to_groups(batch, row_last, 0.0),
        has_eos=batch.has_eos,
        mask=batch.mask,
    )
