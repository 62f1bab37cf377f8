"""(model, batch) -> GroupStats: the only place that touches logits.

Log-probs of response tokens are computed from the final hidden states chunk by chunk
(``chunk_size`` tokens: matmul with the output embedding, fp32 logsumexp, gather), and each chunk
is recomputed in backward, so neither forward nor backward ever holds more than one
(chunk x vocab) fp32 logits block. Prompt and padding positions never reach the output layer.

Every layout (``Batch``: padded; ``PackedBatch``: packed or prompt-shared, see
``prefopt.data.packing``) is reduced by ``_response_hidden`` to the same three things: the hidden
states that predict response tokens, those tokens, and the tokens per row; the rest is shared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from prefopt.data.collate import Batch
from prefopt.data.packing import PackedBatch
from prefopt.model.attention import decoder_inputs
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


def _chunked(
    fn: Callable[..., Tensor], split: tuple[Tensor, ...], const: tuple, chunk_size: int
) -> Tensor:
    """cat of ``fn(*chunk, *const)`` over row chunks of ``split``; each chunk is recomputed in
    backward, so only one chunk's (chunk x vocab) logits ever exist."""
    out = []
    for chunk in zip(*(t.split(chunk_size) for t in split), strict=True):
        if torch.is_grad_enabled():
            out.append(checkpoint(fn, *chunk, *const, use_reentrant=False))
        else:
            out.append(fn(*chunk, *const))
    return torch.cat(out) if out else split[0].new_zeros(0, dtype=torch.float32)


def _to_groups(batch: Batch | PackedBatch, row_values: Tensor, fill: float) -> Tensor:
    """Scatter per-row values (N,) into (B, K), ``fill`` in empty slots."""
    out = torch.full(batch.mask.shape, fill, dtype=row_values.dtype, device=row_values.device)
    return out.index_put((batch.row_group, batch.row_slot), row_values)


def _response_hidden(model: PreTrainedModel, batch: Batch | PackedBatch) -> tuple[Tensor, ...]:
    """(M, H) hidden states that predict the M response tokens, the (M,) tokens, in row order,
    the (N,) tokens per row, and the (M,) row of each token. The model's attention kernel says
    how the batch reaches its decoder (``prefopt.model.attention.decoder_inputs``)."""
    inputs = decoder_inputs(model.config._attn_implementation, batch, model.dtype)
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    if isinstance(batch, PackedBatch):
        hidden = hidden[0]  # (L, H)
        # A shared prompt's last position appears K times: it predicts every first token.
        # Index gathers with collated indices: no host sync (a boolean mask needs one).
        rows = batch.row_index
        if rows is None:  # a PackedBatch built by hand
            rows = torch.arange(len(batch.row_lengths), device=hidden.device)
            rows = rows.repeat_interleave(batch.row_lengths)
        return hidden[batch.target_index], batch.targets, batch.row_lengths, rows
    # (N, T, H): position t predicts token t + 1: keep the positions whose next token is a
    # response token. (The padded layout is the reference path: its boolean gathers sync.)
    target_mask = batch.response_mask[:, 1:]  # (N, T-1)
    rows = torch.arange(len(target_mask), device=hidden.device)[:, None].expand_as(target_mask)
    targets = batch.input_ids[:, 1:][target_mask]
    return hidden[:, :-1][target_mask], targets, target_mask.sum(1), rows[target_mask]


def group_stats(
    model: PreTrainedModel, batch: Batch | PackedBatch, chunk_size: int = 1024
) -> GroupStats:
    """One forward over all B*K responses of the batch, in any layout; statistics in fp32."""
    hidden, targets, lengths, rows = _response_hidden(model, batch)
    logps = token_logps(
        hidden,
        targets,
        model.get_output_embeddings(),
        chunk_size,
        getattr(model.config, "final_logit_softcapping", None),
    )  # (M,)
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
    return token_kl(logp, logq)  # (C,) gradient through both factors


def token_kl(policy_logits_logp: Tensor, ref_logp: Tensor) -> Tensor:
    """(N,) exact KL(pi_theta || pi_ref) per position from two (N, V) log-softmax tensors.

    SPO (Sharifnassab et al. 2024, arXiv:2405.00747) Eq. 15: sum_s pi_theta(s) (log pi_theta(s)
    - log pi_ref(s)), the analytic full-vocabulary KL, not the single-sample log-ratio.
    Gradients flow through both factors of pi_theta (the paper detaches neither); ``ref_logp``
    should come from the frozen pi_ref.
    Pass float32 or wider log-softmax values. Vocabulary entries with pi_theta = 0 contribute 0.

    ``sequence_kl`` calls this chunk by chunk on on-policy samples and sums over every generated
    position of a sequence (EOS-emitting position included, prompt and padding excluded); the loop
    averages over the samples; by the chain rule of KL over tokens, the sum over a sampled
    sequence is an unbiased estimate of the sequence KL.
    """
    probs = policy_logits_logp.exp()
    log_ratio = (policy_logits_logp - ref_logp).masked_fill(probs == 0, 0.0)
    return (probs * log_ratio).sum(-1)


def sequence_kl(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    batch: Batch | PackedBatch,
    chunk_size: int = 1024,
) -> Tensor:
    """(N,) per row: sum over response positions of the exact full-vocabulary KL(pi || ref).

    SPO's token-wise estimator (paper 002, Eq. 15): the position that emits each response token
    (EOS included) contributes KL(pi(.|prefix) || ref(.|prefix)). Chunked like ``group_stats``;
    the reference's logits are recomputed per chunk, so no (tokens x vocab) tensor is kept.
    """
    h, _, lengths, rows = _response_hidden(policy, batch)
    with torch.no_grad():
        rh = _response_hidden(ref, batch)[0]
    head, ref_head = policy.get_output_embeddings(), ref.get_output_embeddings()
    kl = _chunked(_chunk_kl, (h, rh), (head, ref_head), chunk_size)  # (M,)
    return kl.new_zeros(len(lengths)).index_add(0, rows, kl)


class StatsModel(nn.Module):
    """A causal LM whose forward returns GroupStats, so FSDP's root hooks cover the output layer.

    ``kl`` is a second forward (``prefopt.model.parallel.shard`` registers it with FSDP, so the
    root's parameters are gathered for it as for ``forward``): each returns one type."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch | PackedBatch, chunk_size: int) -> GroupStats:
        """GroupStats of the batch."""
        return group_stats(self.model, batch, chunk_size)

    def kl(self, batch: Batch | PackedBatch, chunk_size: int, ref: StatsModel) -> Tensor:
        """(N,) per-row KL(self || ref) over the response tokens (``sequence_kl``).

        The reference's own (root) parameters must be gathered by the caller, ``unsharded``,
        until after the backward: the chunked KL recomputes its logits there.
        """
        return sequence_kl(self.model, ref.model, batch, chunk_size)
