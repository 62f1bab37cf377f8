"""Padding-free layouts and token-budget micro-batches.

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
Collation also writes that rule in the forms the kernels read, none of them (L, L): ``varlen``
(FlashAttention's variable-length interface: one segment per prompt and per response, separate
query and key offsets, ``VarlenIndex``), ``blocks`` (the FlexAttention block sparsity, built at
128-token granularity by ``doc_blocks``) and ``cu_seqlens`` (whole documents, for transformers'
own ``flash_attention_2``, ``packed`` only). ``document_mask`` (dense) is the reference the tests
compare them with.

Micro-batches are filled to a token budget by ``plan_micro_batches``: a pure function of the
step's ordered views, so a resumed run (which replays the same views per step) plans the same
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import datasets
import torch
from torch import Tensor

from prefopt.data.collate import Batch, Group, collate, group_fields, per_slot
from prefopt.data.loading import View, group_at
from prefopt.data.tokenize import TokenizedGroup

LAYOUTS = ("padded", "packed", "shared")
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


class PackedBatch(NamedTuple):
    """The groups of a micro-batch in one row (``packed`` or ``shared`` layout).

    The (B, K) fields are exactly ``Batch``'s, so losses and the loop see no difference; the
    per-row fields (``row_group``, ``row_slot``) are too, with one row per real response.
    """

    input_ids: Tensor  # (1, L) every document back to back, no padding
    position_ids: Tensor  # (1, L) restart at 0 per document; responses continue after the prompt
    doc_ids: Tensor  # (L,) document of each token
    branch_ids: Tensor  # (L,) 0: visible to the rest of the document; k + 1: response k only
    cu_seqlens: Tensor  # (D + 1,) int32 document boundaries (flash-attn varlen)
    target_index: Tensor  # (M,) position whose hidden state predicts each response token
    targets: Tensor  # (M,) the response tokens, row after row
    row_lengths: Tensor  # (N,) response tokens per row (EOS included)
    row_group: Tensor  # (N,) group index b of each row
    row_slot: Tensor  # (N,) response slot k of each row
    scores: Tensor  # (B, K) float32
    mask: Tensor  # (B, K) bool, real responses
    has_eos: Tensor  # (B, K) bool
    ref_logps: Tensor | None = None  # (B, K) precomputed reference log-probs, when cached
    ref_eos_logps: Tensor | None = None  # (B, K)
    max_seqlen: int = 0  # longest document (flash-attn varlen)
    shared: bool = False  # prompts shared: responses of one document must not see each other
    sequence_tokens: int = 0  # prompt + response per row, as the padded layout counts them
    row_index: Tensor | None = None  # (M,) row of each target: sums per row without a host sync
    blocks: DocBlocks | None = None  # FlexAttention block sparsity (``doc_blocks``)
    varlen: VarlenIndex | None = None  # the varlen kernels' segments (``VarlenIndex``)

    @property
    def num_groups(self) -> int:
        return self.scores.shape[0]

    @property
    def num_tokens(self) -> int:
        """Sequence tokens (prompt counted once per response): the same number in every layout,
        so a throughput metric built on it compares layouts on the same data."""
        return self.sequence_tokens

    @property
    def forward_tokens(self) -> int:
        """Positions the forward computes (a shared prompt counts once)."""
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            *(t.to(device) if isinstance(t, Tensor | DocBlocks | VarlenIndex) else t for t in self)
        )


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
    scores, mask, has_eos = group_fields(groups)
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
        scores=scores,
        mask=mask,
        has_eos=has_eos,
        ref_logps=per_slot(groups, "ref_logps"),
        ref_eos_logps=per_slot(groups, "ref_eos_logps"),
        max_seqlen=max(doc_lengths),
        shared=share_prompts,
        sequence_tokens=sum(len(groups[b][0].prompt_ids) + R for b, _, R in rows),
        row_index=torch.tensor([n for n, (*_, R) in enumerate(rows) for _ in range(R)]),
        blocks=doc_blocks(doc_ids, branch_ids),
        varlen=VarlenIndex.of_spans(spans),
    )


def collate_layout(groups: Groups, pad_id: int, layout: str = "padded") -> Batch | PackedBatch:
    """``collate`` (padded) or ``collate_packed`` by layout name; ``group_stats`` accepts both."""
    if layout == "padded":
        return collate(groups, pad_id)
    if layout in ("packed", "shared"):
        return collate_packed(groups, layout == "shared")
    raise ValueError(f"trainer.layout must be one of {LAYOUTS}, got {layout!r}")


# ---- attention masks ----


def document_mask(batch: PackedBatch) -> Tensor:
    """(L, L) bool, True where query i may attend to key j (module docstring's rule).

    Built in place, one (L, L) buffer at a time (16K tokens: 256 MB): the reference for tests and
    the ``sdpa``/``eager`` implementations; training kernels read ``spans`` or ``blocks``.
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


# ---- token-budget micro-batches ----


class ViewSize(NamedTuple):
    tokens: int  # positions the view adds to a packed row in its layout
    rows: int  # responses (rows of the padded layout)
    width: int  # longest prompt + response: the padded row width the view needs


def view_size(group: TokenizedGroup, idx: Sequence[int], layout: str) -> ViewSize:
    P, R = len(group.prompt_ids), [len(group.response_ids[r]) for r in idx]
    tokens = P + sum(R) if layout == "shared" else sum(P + r for r in R)
    return ViewSize(tokens, len(R), P + max(R))


def _cost(sizes: Sequence[ViewSize], items: list[int], padded: bool) -> int:
    """Positions a micro-batch computes: rows x widest row (padded) or the packed row length."""
    if padded:
        return sum(sizes[i].rows for i in items) * max(sizes[i].width for i in items)
    return sum(sizes[i].tokens for i in items)


def plan_micro_batches(
    sizes: Sequence[ViewSize], budget: int, layout: str = "packed", num_splits: int = 1
) -> list[list[int]]:
    """Split a step's views (``sizes[i]`` for the i-th view) into micro-batches of at most
    ``budget`` forward positions; returns indices into ``sizes``, ascending in each micro-batch.

    Deterministic (a pure function of its inputs; ties broken by index) and exhaustive: every view
    is in exactly one micro-batch, and a view over the budget gets one of its own. Views are
    taken longest first (length grouping): ``padded`` fills micro-batches one after another, so
    similar widths share one and little is padding; the packed layouts fill the first micro-batch
    with room (first-fit decreasing), so few, full rows are run. The number of micro-batches is a
    multiple of ``num_splits`` (ranks; rank r runs ``plan[r::num_splits]``) by halving the largest
    ones, so every rank runs the same number of sharded forwards.
    """
    if budget <= 0:
        raise ValueError(f"the micro-batch token budget must be positive, got {budget}")
    padded = layout == "padded"
    key = (lambda i: sizes[i].width) if padded else (lambda i: sizes[i].tokens)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-key(i), i)):
        if padded:
            fits = [len(bins) - 1] if bins and _cost(sizes, [*bins[-1], i], True) <= budget else []
        else:
            fits = [j for j, load in enumerate(loads) if load + sizes[i].tokens <= budget][:1]
        if fits:
            bins[fits[0]].append(i)
            loads[fits[0]] += sizes[i].tokens
        else:
            bins.append([i])
            loads.append(sizes[i].tokens)
    while len(bins) % num_splits:
        splittable = [j for j, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            msg = f"{len(sizes)} views cannot make a multiple of {num_splits} micro-batches"
            raise ValueError(f"{msg}; make the global batch a multiple of the ranks")
        j = max(splittable, key=lambda j: (_cost(sizes, bins[j], padded), -j))
        half = len(bins[j]) // 2
        bins[j : j + 1] = [bins[j][:half], bins[j][half:]]
    return [sorted(b) for b in bins]


def budget_batches(
    data: datasets.Dataset,
    views: list[View],
    order: list[int],
    budget: int,
    layout: str,
    pad_id: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch | PackedBatch]:
    """This rank's micro-batches of the step whose views are ``order`` (the global order: every
    rank plans the same split and runs its share ``plan[rank::world_size]``)."""
    groups = [(group_at(data, views[i][0]), views[i][1]) for i in order]
    sizes = [view_size(g, idx, layout) for g, idx in groups]
    plan = plan_micro_batches(sizes, budget, layout, world_size)
    return [
        collate_layout([groups[i] for i in mb], pad_id, layout).to(device)
        for mb in plan[rank::world_size]
    ]


def batches(
    data: datasets.Dataset,
    views: list[View],
    order: list[int],
    size: int,
    pad_id: int,
    device: torch.device | str,
    layout: str = "padded",
):
    """Collated batches of ``size`` views taken in ``order``, in ``layout``."""
    for start in range(0, len(order), size):
        chunk = [views[i] for i in order[start : start + size]]
        groups = [(group_at(data, row), idx) for row, idx in chunk]
        yield collate_layout(groups, pad_id, layout).to(device)
