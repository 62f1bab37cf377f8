"""Padding-free layouts: the groups of a micro-batch in one row.

Three layouts of the same groups give the same ``GroupStats`` (tests/test_packing.py):

- ``padded`` (``collate``): one right-padded row per (prompt, response), the reference path;
- ``packed``: every (prompt, response) of the micro-batch in one row, one document each,
  positions restarting at 0 per document, attention kept inside the document;
- ``shared``: one document per group, ``[prompt, r1, r2, ..., rK]``; response k sees the prompt
  and itself (causally), never another response, and its positions continue from the prompt's
  end, so each response computes exactly what it would alone after its prompt. The prompt is
  run once instead of K times.

The packed layouts describe attention with two integer vectors over the row: ``doc_ids`` (which
document a token belongs to) and ``branch_ids`` (0 for tokens every later token of the document
may see: the prompt, or the whole sequence in ``packed``; k + 1 for response k of a shared
prompt). Query i may attend to key j iff j <= i, doc[i] == doc[j] and branch[j] in (0, branch[i]).
Collation also writes that rule in the forms the kernels read, none of them (L, L), here on the
host so that a forward never waits for one: ``varlen`` (FlashAttention's variable-length
interface: one segment per prompt and per response, separate query and key offsets,
``VarlenIndex``), ``blocks`` (the FlexAttention block sparsity, built at 128-token granularity by
``doc_blocks``) and ``cu_seqlens`` (whole documents, for transformers' own
``flash_attention_2``, ``packed`` only). The masks the kernels evaluate from ``doc_ids`` and
``branch_ids`` (dense, FlexAttention's ``mask_mod``) live with them,
``prefopt/model/kernels/masks.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from prefopt.config import Layout, check_choice
from prefopt.data.collate import Batch, Group, GroupBatch, collate, group_fields

Groups = list[Group]
FLEX_BLOCK = 128  # FlexAttention's block size: compiled kernels read mask inputs up to a multiple


class DocBlocks(NamedTuple):
    """FlexAttention's block sparsity of a packed row (``BlockMask.from_kv_blocks`` inputs).

    For each 128-token query block: the key blocks that need the mask (``kv_*``: partly visible)
    and the ones every query of the block sees whole (``full_kv_*``); other blocks are skipped.
    """

    kv_num_blocks: Tensor  # (1, 1, nb) int32
    kv_indices: Tensor  # (1, 1, nb, nb) int32, the partial blocks first, ascending
    full_kv_num_blocks: Tensor  # (1, 1, nb) int32
    full_kv_indices: Tensor  # (1, 1, nb, nb) int32

    def to(self, device: torch.device | str) -> DocBlocks:
        return DocBlocks(*(t.to(device) for t in self))


# (query start, query end, context start, context end): the queries see the whole context and
# themselves causally. A packed document is one span without context; a shared prompt too, and
# each of its responses a span whose context is the prompt.
Span = tuple[int, int, int, int]


class VarlenIndex(NamedTuple):
    """A row as FlashAttention's variable-length call sees it: segment s has the queries
    ``[cu_q[s], cu_q[s + 1])`` of the row (the segments cover it in order: no gather) and the keys
    ``kv_index[cu_k[s]:cu_k[s + 1]]``, causal aligned at the bottom right (extra keys come first
    and every query sees them). A shared prompt is one segment over itself, response k one over
    [its prompt; itself]: the prompt's keys and values are copied per response, not recomputed.
    ``kv_index`` is None when every segment's keys are its queries (packed, padded rows)."""

    cu_q: Tensor  # (S + 1,) int32
    cu_k: Tensor  # (S + 1,) int32
    kv_index: Tensor | None  # (Tk,) int64 row positions of the keys, segment after segment
    max_q: int  # longest segment's queries (host ints: the kernels take them without a sync)
    max_k: int  # longest segment's keys

    def to(self, device: torch.device | str) -> VarlenIndex:
        return VarlenIndex(*(t.to(device) if isinstance(t, Tensor) else t for t in self))

    @staticmethod
    def of_spans(spans: Sequence[Span]) -> VarlenIndex:
        cu_q, cu_k, keys = [0], [0], []
        for qs, qe, cs, ce in spans:
            keys += [*range(cs, ce), *range(qs, qe)]
            cu_q.append(qe)
            cu_k.append(len(keys))
        gather = any(cs != ce for *_, cs, ce in spans)
        return VarlenIndex(
            torch.tensor(cu_q, dtype=torch.int32),
            torch.tensor(cu_k, dtype=torch.int32),
            torch.tensor(keys) if gather else None,
            max(qe - qs for qs, qe, *_ in spans),
            max(ce - cs + qe - qs for qs, qe, cs, ce in spans),
        )

    @staticmethod
    def of_rows(rows: int, width: int, device: torch.device | str = "cpu") -> VarlenIndex:
        """Right-padded rows (the padded layout) as ``rows`` causal segments of ``width``: padding
        comes after every real token, so causal attention keeps it out of every real position."""
        cu = torch.arange(0, rows * width + 1, width, dtype=torch.int32, device=device)
        return VarlenIndex(cu, cu, None, width, width)


@dataclass(frozen=True, kw_only=True)
class PackedBatch(GroupBatch):
    """The groups of a micro-batch in one row (``packed`` or ``shared`` layout); the (B, K) and
    per-row fields are ``GroupBatch``'s, with one row per real response."""

    input_ids: Tensor  # (1, L) every document back to back, no padding
    position_ids: Tensor  # (1, L) restart at 0 per document; responses continue after the prompt
    doc_ids: Tensor  # (L,) document of each token
    branch_ids: Tensor  # (L,) 0: visible to the rest of the document; k + 1: response k only
    cu_seqlens: Tensor  # (D + 1,) int32 document boundaries (flash-attn varlen)
    target_index: Tensor  # (M,) position whose hidden state predicts each response token
    targets: Tensor  # (M,) the response tokens, row after row
    row_lengths: Tensor  # (N,) response tokens per row (EOS included)
    max_seqlen: int = 0  # longest document (flash-attn varlen)
    shared: bool = False  # prompts shared: responses of one document must not see each other
    row_index: Tensor | None = None  # (M,) row of each target: sums per row without a host sync
    blocks: DocBlocks | None = None  # FlexAttention block sparsity (``doc_blocks``)
    varlen: VarlenIndex | None = None  # the varlen kernels' segments (``VarlenIndex``)

    @property
    def forward_tokens(self) -> int:
        """Positions the forward computes (a shared prompt counts once)."""
        return self.input_ids.shape[1]


def collate_packed(groups: Groups, share_prompts: bool) -> PackedBatch:
    """Lay out groups (each with the response indices of its view) in one row.

    ``share_prompts`` writes each prompt once, followed by all its responses (``shared``);
    otherwise each response gets its own copy of the prompt (``packed``).
    """
    ids: list[int] = []
    pos: list[int] = []
    doc: list[int] = []
    branch: list[int] = []
    doc_lengths: list[int] = []
    target_index: list[int] = []
    rows: list[tuple[int, int, int]] = []  # (group, slot, response length)
    spans: list[Span] = []
    for b, (g, idx) in enumerate(groups):
        P = len(g.prompt_ids)
        for k, r in enumerate(idx):
            if k == 0 or not share_prompts:  # a new document starts with the prompt
                prompt_end = len(ids) + P - 1  # its hidden state predicts every first token
                ids += g.prompt_ids
                pos += range(P)
                doc += [len(doc_lengths)] * P
                branch += [0] * P
                doc_lengths.append(P)
                doc_start = len(ids) - P
                if share_prompts:
                    spans.append((doc_start, len(ids), doc_start, doc_start))
            response = g.response_ids[r]
            R, start = len(response), len(ids)
            if share_prompts:  # the response sees its prompt whole, itself causally
                spans.append((start, start + R, doc_start, doc_start + P))
            else:  # prompt and response: one causal document
                spans.append((doc_start, start + R, doc_start, doc_start))
            ids += response
            pos += range(P, P + R)  # as if the response followed its prompt alone
            doc += [len(doc_lengths) - 1] * R
            branch += [k + 1 if share_prompts else 0] * R
            doc_lengths[-1] += R
            target_index += [prompt_end, *range(start, start + R - 1)]
            rows.append((b, k, R))
    doc_ids, branch_ids = torch.tensor(doc), torch.tensor(branch)
    return PackedBatch(
        input_ids=torch.tensor([ids]),
        position_ids=torch.tensor([pos]),
        doc_ids=doc_ids,
        branch_ids=branch_ids,
        cu_seqlens=torch.tensor([0, *doc_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        target_index=torch.tensor(target_index),
        targets=torch.tensor([t for g, idx in groups for r in idx for t in g.response_ids[r]]),
        row_lengths=torch.tensor([R for *_, R in rows]),
        row_group=torch.tensor([b for b, *_ in rows]),
        row_slot=torch.tensor([k for _, k, _ in rows]),
        **group_fields(groups),
        max_seqlen=max(doc_lengths),
        shared=share_prompts,
        sequence_tokens=sum(len(groups[b][0].prompt_ids) + R for b, _, R in rows),
        row_index=torch.tensor([n for n, (*_, R) in enumerate(rows) for _ in range(R)]),
        blocks=doc_blocks(doc_ids, branch_ids),
        varlen=VarlenIndex.of_spans(spans),
    )


def collate_layout(groups: Groups, pad_id: int, layout: str = "padded") -> Batch | PackedBatch:
    """``collate`` (padded) or ``collate_packed`` by layout name; ``group_stats`` accepts both."""
    check_choice("trainer.layout", layout, Layout)
    if layout == "padded":
        return collate(groups, pad_id)
    return collate_packed(groups, layout == "shared")


def doc_blocks(doc: Tensor, branch: Tensor, block: int = FLEX_BLOCK) -> DocBlocks:
    """The block sparsity of the module docstring's rule, from per-block summaries: O(L + nb^2)
    work and memory for nb = ceil(L / block) blocks, never (L, L).

    Positions are ordered by (document, branch) in both layouts, so a block holds a contiguous
    range of those keys, summarised by its first and last. Key block j is needed by query block
    i iff j <= i, its last document is not before i's first, and it is not wholly inside a
    response whose key i does not hold (a sibling response of a shared prompt). It is full (no
    mask evaluated) iff j < i, both blocks lie in one document, and j is all prompt or both lie
    in one response. Both are exact: a needed block that is not full goes through ``mask_mod``.
    """
    L = doc.numel()
    starts = torch.arange(0, L, block)
    ends = (starts + block).clamp(max=L) - 1  # last real position of each block
    key = doc * (int(branch.max()) + 1) + branch  # non-decreasing along the row
    kf, kl = key[starts], key[ends]  # (nb,) first and last key of each block
    df, dl = doc[starts], doc[ends]
    in_response = torch.nn.functional.pad(branch != 0, (0, -L % block)).view(-1, block)
    prompt_only = ~in_response.any(-1)  # (nb,) every position of the block has branch 0
    one_response = (kf == kl) & ~prompt_only  # the block lies inside one response
    i, j = torch.arange(len(starts))[:, None], torch.arange(len(starts))[None, :]
    needed = (j <= i) & (dl[None, :] >= df[:, None])
    needed &= ~(one_response[None, :] & (kf[None, :] < kf[:, None]))  # a sibling response
    same_doc = (df == dl)[:, None] & (df == dl)[None, :] & (df[:, None] == df[None, :])
    same_response = (kf == kl)[:, None] & (kf == kl)[None, :] & (kf[:, None] == kf[None, :])
    full = (j < i) & same_doc & (prompt_only[None, :] | same_response)
    partial = needed & ~full

    def indices(sel: Tensor) -> tuple[Tensor, Tensor]:  # counts, then selected blocks first
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        return sel.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return DocBlocks(*indices(partial), *indices(full))
