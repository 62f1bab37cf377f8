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
    return _chunked(_chunk_logps, (hidden, targets), (head, softcap), chunk_size)


def _chunked(fn, split: tuple[Tensor, ...], const: tuple, chunk_size: int) -> Tensor:
    """cat of ``fn(*chunk, *const)`` over row chunks of ``split``; each chunk is recomputed in
    backward, so only one chunk's (chunk x vocab) logits ever exist."""
    out = []
    for chunk in zip(*(t.split(chunk_size) for t in split), strict=True):
        if torch.is_grad_enabled():
            out.append(checkpoint(fn, *chunk, *const, use_reentrant=False))
        else:
            out.append(fn(*chunk, *const))
    return torch.cat(out) if out else split[0].new_zeros(0, dtype=torch.float32)


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


def _chunk_kl(hidden: Tensor, ref_hidden: Tensor, head: nn.Module, ref_head: nn.Module) -> Tensor:
    logp = head(hidden)
    logp = logp.to(torch.promote_types(logp.dtype, torch.float32)).log_softmax(-1)  # (C, V)
    with torch.no_grad():
        logq = ref_head(ref_hidden).to(logp.dtype).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)  # (C,) gradient through both factors


def sequence_kl(
    policy: PreTrainedModel, ref: PreTrainedModel, batch: Batch, chunk_size: int = 1024
) -> Tensor:
    """(N,) per row: sum over response positions of the exact full-vocabulary KL(pi || ref).

    SPO's token-wise estimator (paper 002, Eq. 15): the position that emits each response token
    (EOS included) contributes KL(pi(.|prefix) || ref(.|prefix)). Chunked like ``group_stats``;
    the reference's logits are recomputed per chunk, so no (tokens x vocab) tensor is kept.
    """
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = policy.get_decoder()(**kwargs).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref.get_decoder()(**kwargs).last_hidden_state
    target_mask = batch.response_mask[:, 1:]
    h, rh = hidden[:, :-1][target_mask], ref_hidden[:, :-1][target_mask]
    head, ref_head = policy.get_output_embeddings(), ref.get_output_embeddings()
    kl = _chunked(_chunk_kl, (h, rh), (head, ref_head), chunk_size)  # (M,)
    lengths = target_mask.sum(1)
    rows = torch.arange(len(lengths), device=kl.device).repeat_interleave(lengths)
    return kl.new_zeros(len(lengths)).index_add(0, rows, kl)
